"""Progress of long work on stderr (loading a checkpoint of tens of gigabytes), in the ecosystem's manner: a line
rewritten in place on a terminal, a line per tenth in a log. Work that ends within `delay` seconds prints nothing,
so small models and tests stay quiet."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, what: str, total_bytes: int, stream: TextIO | None = None, delay: float = 1.0,
                 enabled: bool = True) -> None:
        self.what, self.total, self.enabled = what, max(int(total_bytes), 1), enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.delay, self.start, self.done = delay, time.perf_counter(), 0
        self.shown_tenth, self.shown_at, self.shown = -1, 0.0, False

    def advance(self, nbytes: int) -> None:
        self.done += int(nbytes)
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.start < self.delay:
            return
        tenth = 10 * self.done // self.total
        if (self.tty and now - self.shown_at >= 0.2) or (not self.tty and tenth > self.shown_tenth):
            self._show(now, final=False)
            self.shown_tenth, self.shown_at = tenth, now

    def close(self) -> None:
        """The closing line (only when a report was shown: quick work stays silent)."""
        if self.shown:
            self._show(time.perf_counter(), final=True)

    def _show(self, now: float, final: bool) -> None:
        seconds = now - self.start
        scale, unit = (1e9, "GB") if self.total >= 1e9 else (1e6, "MB")  # a small model on a busy machine: MB
        line = (f"{self.what}: {100 * min(self.done, self.total) // self.total}% "
                f"({self.done / scale:.1f} of {self.total / scale:.1f} {unit}, {seconds:.0f} s)")
        if final:
            line = f"{self.what}: {self.total / scale:.1f} {unit} in {seconds:.1f} s"
        end = "\n" if final or not self.tty else ""
        self.stream.write(("\r\033[K" if self.tty else "") + line + end)
        self.stream.flush()
        self.shown = True
