"""Exact model states keyed by the token sequence that produced them: an LRU store bounded in bytes.

Jamba's state after a sequence is small (a fixed conv window and SSM state per Mamba layer, plus the K/V of the
few attention layers), so the engine keeps the state at the end of every prompt and every output, and at the
token where a new prompt first departs from a stored one (a shared system prompt, a chat history that was
edited). A request whose tokens extend a stored sequence starts from it and prefills only the rest: reuse at any
token boundary, not at block boundaries.

A lookup does not scan the entries: their token sequences are also kept in lexicographic order, where the longest
common prefix of a query with any of them is its common prefix with one of its two neighbours, and a stored prefix of
the query sorts just before it (`StateStore.lookup`): a few binary searches, so admitting a request costs the same
with thousands of stored states as with a few (`SortedKeys`, which the disk tier's index also uses).

`--state-dir` adds a disk tier (serve/state_disk.py): the states of finished outputs are also written to files, and a
lookup takes the longest prefix among memory and disk, so a restarted server resumes conversations.

Thread-safe: the engine thread stores and looks up, `Engine.export_state`/`import_state` run in the caller's.
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..cache import RowState

if TYPE_CHECKING:
    from .state_disk import DiskTier


@dataclass
class Lookup:
    """The longest stored prefix of a token sequence, and where the sequence departs from any stored one."""

    state: RowState | None  # the state after the first `length` tokens, or None (no stored prefix)
    length: int  # tokens the state covers (0 when none)
    shared: int  # longest common prefix with any stored sequence (>= length): a boundary worth keeping


class SortedKeys:
    """Token sequences in lexicographic order, for longest-prefix queries in a few binary searches.

    A stored prefix p of a query's first `limit` tokens q sorts at or before q, and so does every key between them,
    each of which then starts with p: so the last key at or before q either is such a prefix or shares with q at least
    as many tokens as any such prefix has, which bounds the next try's `limit`. Not thread-safe: its owner locks."""

    def __init__(self) -> None:
        self._sorted: list[tuple[int, ...]] = []
        self._arrays: dict[tuple[int, ...], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._sorted)

    def __contains__(self, key: tuple[int, ...]) -> bool:
        return key in self._arrays

    def add(self, key: tuple[int, ...]) -> None:
        if key not in self._arrays:
            self._arrays[key] = np.asarray(key, dtype=np.int64)
            bisect.insort(self._sorted, key)

    def remove(self, key: tuple[int, ...]) -> None:
        if self._arrays.pop(key, None) is not None:
            del self._sorted[bisect.bisect_left(self._sorted, key)]

    def clear(self) -> None:
        self._sorted.clear()
        self._arrays.clear()

    def shared(self, key: tuple[int, ...], query: np.ndarray) -> int:
        """The longest common prefix of the query with any key: its common prefix with one of its two neighbours."""
        at = bisect.bisect_right(self._sorted, key)  # the keys before `at` sort at or before the query
        return max((self._common(self._sorted[i], query) for i in (at - 1, at) if 0 <= i < len(self._sorted)),
                   default=0)

    def longest_prefix(self, key: tuple[int, ...], query: np.ndarray,
                       whole_ok: Callable[[tuple[int, ...]], bool]) -> tuple[int, ...] | None:
        """The longest key that is a prefix of the query (the query itself only if `whole_ok(query)`)."""
        limit = len(key)
        while limit > 0:
            at = bisect.bisect_right(self._sorted, key[:limit]) - 1
            if at < 0:
                return None
            candidate = self._sorted[at]
            common = min(self._common(candidate, query), limit)
            if common == len(candidate):  # a prefix of the query
                if common < len(key) or whole_ok(candidate):
                    return candidate
                limit = common - 1  # the whole query, not usable: a shorter one
            else:
                limit = common
        return None

    def _common(self, key: tuple[int, ...], query: np.ndarray) -> int:
        return _common_prefix(self._arrays[key], query)


class StateStore:
    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"the state store's size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self.disk: DiskTier | None = None  # a second tier (`--state-dir`): see `attach`
        self._entries: OrderedDict[tuple[int, ...], RowState] = OrderedDict()
        self._keys = SortedKeys()
        self._bytes = 0
        self._lock = threading.Lock()

    def attach(self, disk: DiskTier) -> None:
        """Also keep the states `put` with `persist` in `disk`, and fall back to it on lookups (serve/state_disk.py)."""
        self.disk = disk

    def close(self) -> None:
        """Write what the disk tier has queued and stop its writer (the engine's stop calls this)."""
        if self.disk is not None:
            self.disk.close()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, tokens: Sequence[int], state: RowState, persist: bool = False) -> bool:
        """Keep `state` (the state after `tokens`) as the most recent entry, evicting the least recently used ones
        beyond the byte bound. False if it alone exceeds the bound (then nothing is stored). `persist`: also queue it
        for the disk tier, if any (which writes it on its own thread: this never waits on the disk)."""
        if state.length != len(tokens):
            raise ValueError(f"a state of {state.length} tokens cannot be stored for {len(tokens)} tokens")
        size = state.nbytes()
        key = tuple(tokens)
        if persist and self.disk is not None:
            self.disk.offer(key, state)
        with self._lock:
            if key in self._entries:
                self._bytes -= self._entries.pop(key).nbytes()
                self._keys.remove(key)
            if size > self.max_bytes:
                return False
            while self._bytes + size > self.max_bytes:
                old_key, old = self._entries.popitem(last=False)
                self._bytes -= old.nbytes()
                self._keys.remove(old_key)
            self._entries[key] = state
            self._keys.add(key)
            self._bytes += size
            return True

    def get(self, tokens: Sequence[int]) -> RowState | None:
        with self._lock:
            state = self._entries.get(tuple(tokens))
            if state is not None:
                self._entries.move_to_end(tuple(tokens))
            return state

    def lookup(self, tokens: Sequence[int]) -> Lookup:
        """The longest stored prefix of `tokens` (all of `tokens` only if its state has logits to sample from), in
        memory or, when longer, on disk (loaded into memory then)."""
        key, query = tuple(tokens), np.asarray(tokens, dtype=np.int64)
        with self._lock:
            shared = self._keys.shared(key, query)
            best_key = self._keys.longest_prefix(key, query, lambda k: self._entries[k].logits is not None)
            best = self._entries[best_key] if best_key is not None else None
            if best_key is not None:
                self._entries.move_to_end(best_key)
        found = Lookup(best, best.length if best is not None else 0, shared)
        if self.disk is not None:
            found = self._from_disk(key, query, found)
        return found

    def _from_disk(self, key: tuple[int, ...], query: np.ndarray, found: Lookup) -> Lookup:
        disk_key, disk_shared = self.disk.lookup(key, query)
        shared = max(found.shared, disk_shared)
        if disk_key is not None and len(disk_key) > found.length:
            state = self.disk.load(disk_key)
            if state is not None:
                self.put(disk_key, state)
                return Lookup(state, state.length, shared)
        return Lookup(found.state, found.length, shared)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._keys.clear()
            self._bytes = 0


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n
