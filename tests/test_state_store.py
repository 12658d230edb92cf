"""The state store's lookup against a scan of every entry, and its byte bound."""

from __future__ import annotations

import random

import torch

from openjamba.cache import RowState
from openjamba.serve.state_store import StateStore


def _state(length: int, logits: bool) -> RowState:
    return RowState(length, [(torch.zeros(2), torch.zeros(3))], torch.zeros(4) if logits else None)


def _scan(entries: dict[tuple[int, ...], RowState], query: list[int]) -> tuple[int, int]:
    """(length of the longest usable stored prefix, longest common prefix with any entry): every entry compared."""
    best, shared = 0, 0
    for key, state in entries.items():
        common = next((i for i, (a, b) in enumerate(zip(key, query)) if a != b), min(len(key), len(query)))
        shared = max(shared, common)
        if common == len(key) and (common < len(query) or state.logits is not None):
            best = max(best, common)
    return best, shared


def test_lookup_finds_what_a_scan_of_every_entry_finds():
    """Sequences over a 3-token alphabet share many prefixes of every length; some states lack logits (a
    prompt's intermediate boundary), some keys are prefixes of others, and the bound evicts as the store fills."""
    rng = random.Random(0)
    store = StateStore(max_bytes=60 * _state(1, True).nbytes())
    entries: dict[tuple[int, ...], RowState] = {}
    for step in range(600):
        tokens = [rng.randrange(3) for _ in range(rng.randrange(1, 12))]
        if step % 2 == 0:
            state = _state(len(tokens), logits=rng.random() < 0.7)
            store.put(tokens, state)
            entries[tuple(tokens)] = state
            entries = {k: v for k, v in entries.items() if store.get(k) is v}  # what the bound kept
        found = store.lookup(tokens)
        length, shared = _scan(entries, tokens)
        assert (found.length, found.shared) == (length, shared), tokens
        assert (found.state is None) == (length == 0)
        if found.state is not None:
            assert found.state is entries[tuple(tokens[:length])]
    assert 0 < len(store) < 300 and len(store) == len(entries)


def test_lookup_of_a_long_conversation_among_many_entries():
    store = StateStore(max_bytes=1 << 30)
    system = list(range(100, 400))
    for i in range(2000):  # many conversations sharing a system prompt
        store.put(system + [i, i + 1], _state(len(system) + 2, True))
    store.put(system, _state(len(system), False))
    found = store.lookup(system + [7, 8, 9])
    assert (found.length, found.shared) == (len(system) + 2, len(system) + 2)
    found = store.lookup(system + [5000])
    assert (found.length, found.shared) == (len(system), len(system))
    found = store.lookup(system)  # stored without logits: nothing to sample from, so no usable state
    assert (found.state, found.shared) == (None, len(system))
