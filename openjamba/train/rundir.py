"""A run directory's ownership: one process at a time (a lock), and never replacing a finished run unasked.

    OUT/.lock            held (flock) by the process training into OUT; holds its pid. The kernel releases it
                         when that process ends, however it ends, so a killed run never leaves a stale lock.
    OUT/checkpoints/ model/ metrics.jsonl loss.png      what a run writes (RUN_OUTPUTS)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from .checkpoint import checkpoint_root, list_checkpoints

LOCK_FILE = ".lock"
RUN_OUTPUTS = ("checkpoints", "model", "metrics.jsonl", "loss.png")


class RunDirectoryBusy(RuntimeError):
    """Another process holds the run directory's lock."""


@contextlib.contextmanager
def run_lock(out: Path, enabled: bool = True) -> Iterator[None]:
    """Hold OUT's lock for the block; a second process gets one line naming the holder's pid."""
    if not enabled:  # ranks other than 0 of a distributed run: rank 0 holds it for all
        yield
        return
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunDirectoryBusy(f"{out} is in use by another openjamba process (pid {holder}); wait for it to "
                                   "finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race with a waiting process) ...
        if created and [p.name for p in out.iterdir()] == [LOCK_FILE]:  # ... unless the run wrote nothing at all
            with contextlib.suppress(OSError):
                (out / LOCK_FILE).unlink()
                out.rmdir()


def existing_outputs(out: Path) -> list[str]:
    """What a previous run left in OUT (an empty checkpoints folder counts as nothing)."""
    found = []
    for name in RUN_OUTPUTS:
        path = out / name
        if name == "checkpoints":
            if list_checkpoints(checkpoint_root(out)):
                found.append(name + "/")
        elif path.exists():
            found.append(name + ("/" if path.is_dir() else ""))
    return found


def claim_for_new_run(out: Path, overwrite: bool) -> None:
    """Refuse to start a fresh run over a previous one, unless `overwrite` asks to delete its outputs first."""
    found = existing_outputs(out)
    if not found:
        return
    if not overwrite:
        raise FileExistsError(f"{out} already holds a run ({', '.join(found)}); continue it with "
                              f"`openjamba train --out {out} --resume`, pass --overwrite to replace it, or "
                              "choose another --out")
    for name in RUN_OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
