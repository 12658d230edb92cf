"""Exact model states keyed by the token sequence that produced them: an LRU store bounded in bytes.

Jamba's state after a sequence is small (a fixed conv window and SSM state per Mamba layer, plus the K/V of the
few attention layers), so the engine keeps the state at the end of every prompt and every output, and at the
token where a new prompt first departs from a stored one (a shared system prompt, a chat history that was
edited). A request whose tokens extend a stored sequence starts from it and prefills only the rest: reuse at any
token boundary, not at block boundaries.

Thread-safe: the engine thread stores and looks up, `Engine.export_state`/`import_state` run in the caller's.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..cache import RowState


@dataclass
class Lookup:
    """The longest stored prefix of a token sequence, and where the sequence departs from any stored one."""

    state: RowState | None  # the state after the first `length` tokens, or None (no stored prefix)
    length: int  # tokens the state covers (0 when none)
    shared: int  # longest common prefix with any stored sequence (>= length): a boundary worth keeping


class StateStore:
    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"the state store's size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, ...], tuple[np.ndarray, RowState]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, tokens: Sequence[int], state: RowState) -> bool:
        """Keep `state` (the state after `tokens`) as the most recent entry, evicting the least recently used ones
        beyond the byte bound. False if it alone exceeds the bound (then nothing is stored)."""
        if state.length != len(tokens):
            raise ValueError(f"a state of {state.length} tokens cannot be stored for {len(tokens)} tokens")
        size = state.nbytes()
        key = tuple(tokens)
        with self._lock:
            if key in self._entries:
                self._bytes -= self._entries.pop(key)[1].nbytes()
            if size > self.max_bytes:
                return False
            while self._bytes + size > self.max_bytes:
                _, (_, old) = self._entries.popitem(last=False)
                self._bytes -= old.nbytes()
            self._entries[key] = (np.asarray(tokens, dtype=np.int64), state)
            self._bytes += size
            return True

    def get(self, tokens: Sequence[int]) -> RowState | None:
        with self._lock:
            entry = self._entries.get(tuple(tokens))
            if entry is None:
                return None
            self._entries.move_to_end(tuple(tokens))
            return entry[1]

    def lookup(self, tokens: Sequence[int]) -> Lookup:
        """The longest stored prefix of `tokens` (all of `tokens` only if its state has logits to sample from)."""
        query = np.asarray(tokens, dtype=np.int64)
        best_key, best, shared = None, None, 0
        with self._lock:
            for key, (stored, state) in self._entries.items():
                common = _common_prefix(stored, query)
                shared = max(shared, common)
                usable = common == len(stored) and (common < len(query) or state.logits is not None)
                if usable and (best is None or common > best.length):
                    best_key, best = key, state
            if best_key is not None:
                self._entries.move_to_end(best_key)
        return Lookup(best, best.length if best is not None else 0, shared)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n
