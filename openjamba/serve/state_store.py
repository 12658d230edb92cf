"""Exact model states keyed by the token sequence that produced them: an LRU store bounded in bytes.

Jamba's state after a sequence is small (a fixed conv window and SSM state per Mamba layer, plus the K/V of the
few attention layers), so the engine keeps the state at the end of every prompt and every output, and at the
token where a new prompt first departs from a stored one (a shared system prompt, a chat history that was
edited). A request whose tokens extend a stored sequence starts from it and prefills only the rest: reuse at any
token boundary, not at block boundaries.

A lookup does not scan the entries: their token sequences are also kept in lexicographic order, where the longest
common prefix of a query with any of them is its common prefix with one of its two neighbours, and a stored prefix of
the query sorts just before it (`StateStore.lookup`): a few binary searches, so admitting a request costs the same
with thousands of stored states as with a few.

Thread-safe: the engine thread stores and looks up, `Engine.export_state`/`import_state` run in the caller's.
"""

from __future__ import annotations

import bisect
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
        self._sorted: list[tuple[int, ...]] = []  # the entries' keys in lexicographic order
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
                self._unsort(key)
            if size > self.max_bytes:
                return False
            while self._bytes + size > self.max_bytes:
                old_key, (_, old) = self._entries.popitem(last=False)
                self._bytes -= old.nbytes()
                self._unsort(old_key)
            self._entries[key] = (np.asarray(tokens, dtype=np.int64), state)
            bisect.insort(self._sorted, key)
            self._bytes += size
            return True

    def _unsort(self, key: tuple[int, ...]) -> None:
        del self._sorted[bisect.bisect_left(self._sorted, key)]

    def get(self, tokens: Sequence[int]) -> RowState | None:
        with self._lock:
            entry = self._entries.get(tuple(tokens))
            if entry is None:
                return None
            self._entries.move_to_end(tuple(tokens))
            return entry[1]

    def lookup(self, tokens: Sequence[int]) -> Lookup:
        """The longest stored prefix of `tokens` (all of `tokens` only if its state has logits to sample from)."""
        key, query = tuple(tokens), np.asarray(tokens, dtype=np.int64)
        with self._lock:
            at = bisect.bisect_right(self._sorted, key)  # the keys before `at` sort at or before the query
            shared = max((self._common(self._sorted[i], query) for i in (at - 1, at) if 0 <= i < len(self._sorted)),
                         default=0)
            best_key = self._longest_prefix(key, query)
            best = self._entries[best_key][1] if best_key is not None else None
            if best_key is not None:
                self._entries.move_to_end(best_key)
        return Lookup(best, best.length if best is not None else 0, shared)

    def _longest_prefix(self, key: tuple[int, ...], query: np.ndarray) -> tuple[int, ...] | None:
        """The longest stored key that is a prefix of the query (the query itself only if its state has logits).

        A stored prefix p of the query's first `limit` tokens q sorts at or before q, and so does every key between
        them, each of which then starts with p: so the last key at or before q either is such a prefix or shares
        with q at least as many tokens as any such prefix has, which bounds the next try's `limit`."""
        limit = len(key)
        while limit > 0:
            at = bisect.bisect_right(self._sorted, key[:limit]) - 1
            if at < 0:
                return None
            candidate = self._sorted[at]
            common = min(self._common(candidate, query), limit)
            if common == len(candidate):  # a prefix of the query
                if common < len(key) or self._entries[candidate][1].logits is not None:
                    return candidate
                limit = common - 1  # the whole query, stored without logits: a shorter one
            else:
                limit = common
        return None

    def _common(self, key: tuple[int, ...], query: np.ndarray) -> int:
        return _common_prefix(self._entries[key][0], query)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._sorted.clear()
            self._bytes = 0


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n
