"""The hybrid cache against our own full forward (transformers gets multi-token continuation wrong)."""

from __future__ import annotations

import pytest
import torch

from openjamba import ops
from openjamba.cache import KVCache, MambaState
from openjamba.info import kv_cache_bytes, mamba_state_bytes

from .conftest import left_padded_batch, random_model

# A one-token matmul rounds differently from the same row in a batched one (~4e-6 here), and several layers add up.
ATOL = 2e-5


@pytest.mark.parametrize("static", [True, False])
@torch.no_grad()
def test_chunked_prefill_then_decode_equals_full_forward(config_name, static):
    model = random_model(config_name)
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    full = model(ids).logits
    cache = model.make_cache(2, max_length=40 if static else None)
    pieces, start = [], 0
    for size in (5, 1, 13, 3, 1, 1, 2, 14):  # multi-token chunks, single tokens, mixed
        pieces.append(model(ids[:, start:start + size], cache=cache).logits)
        start += size
    assert start == 40 and cache.seq_len == 40
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=ATOL, rtol=0)


@torch.no_grad()
def test_left_padded_batch_equals_each_prompt_alone(config_name):
    model = random_model(config_name)
    ids, mask, rows = left_padded_batch([11, 4, 8], model.config.vocab_size, seed=2)
    batched = model(ids, attention_mask=mask).logits
    for i, row in enumerate(rows):
        alone = model(row[None]).logits[0]
        torch.testing.assert_close(batched[i, -len(row):], alone, atol=ATOL, rtol=0)


@torch.no_grad()
def test_left_padded_chunked_prefill_and_decode_equal_each_prompt_alone(config_name):
    model = random_model(config_name)
    ids, mask, rows = left_padded_batch([9, 3, 6], model.config.vocab_size, seed=3)
    extra = torch.randint(3, model.config.vocab_size, (3, 4), generator=torch.Generator().manual_seed(4))
    cache = model.make_cache(3)
    model(ids[:, :4], attention_mask=mask[:, :4], cache=cache)  # the mask may be given per chunk...
    out = [model(ids[:, 4:], attention_mask=mask, cache=cache).logits]  # ...or for past + new tokens
    for t in range(4):
        out.append(model(extra[:, t:t + 1], cache=cache).logits)  # later calls need no mask
    out = torch.cat(out, 1)  # logits of prompt positions 4.. and the 4 extra tokens
    for i, row in enumerate(rows):
        alone = model(torch.cat([row, extra[i]])[None]).logits[0]
        n = min(len(row) + 4, out.shape[1])
        torch.testing.assert_close(out[i, -n:], alone[-n:], atol=ATOL, rtol=0)


@torch.no_grad()
def test_reorder_rows():
    model = random_model()
    ids = torch.randint(0, model.config.vocab_size, (3, 10), generator=torch.Generator().manual_seed(5))
    nxt = torch.randint(0, model.config.vocab_size, (3, 1), generator=torch.Generator().manual_seed(6))
    cache = model.make_cache(3)
    model(ids, cache=cache)
    cache.reorder([2, 0])
    got = model(nxt[[2, 0]], cache=cache).logits
    expected = model(torch.cat([ids, nxt], 1)[[2, 0]]).logits[:, -1:]
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_layout_and_nbytes():
    model = random_model("moe-period3-two-attention")
    config = model.config
    cache = model.make_cache(2, max_length=64)
    kinds = [type(layer) for layer in cache.layers]
    assert kinds == [MambaState if t == "mamba" else KVCache for t in config.layers_block_type]
    mamba = next(layer for layer in cache.layers if isinstance(layer, MambaState))
    assert mamba.ssm.dtype == torch.float32
    assert mamba.ssm.shape == (2, config.mamba_inner_size, config.mamba_d_state)
    assert mamba.conv.shape == (2, config.mamba_d_conv - 1, config.mamba_inner_size)
    assert cache.kv_nbytes() == kv_cache_bytes(config, 64, batch=2, dtype="fp32")
    assert cache.mamba_nbytes() == mamba_state_bytes(config, batch=2, dtype="fp32")
    assert cache.nbytes() == cache.kv_nbytes() + cache.mamba_nbytes()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("padded", [False, True])  # unpadded chunks take ops.chunk_attention, padded ones a mask
@torch.no_grad()
def test_bf16_kv_cache_under_an_fp32_model(monkeypatch, backend, padded):
    """make_cache(kv_dtype=bf16): half the K/V bytes; chunked prefill, padding and decoding give the fp32 cache's
    logits up to bf16 rounding of K and V."""
    from openjamba import ops
    from openjamba.ops import cpu_kernels

    if backend == "cpu" and not cpu_kernels.is_available()[0]:
        pytest.skip("CPU kernels unavailable")
    monkeypatch.setitem(ops._chosen, "cpu", cpu_kernels if backend == "cpu" else None)
    model = random_model("moe-period3-two-attention")
    ids, mask, _ = left_padded_batch([30, 22], model.config.vocab_size, seed=5)
    spans = [slice(0, 20), slice(20, 27), slice(27, 28), slice(28, 29), slice(29, 30)]
    results = []
    for kv_dtype in (None, torch.bfloat16):
        cache = model.make_cache(2, kv_dtype=kv_dtype)
        logits = [model(ids[:, span], attention_mask=mask[:, span] if padded else None, cache=cache).logits
                  for span in spans]
        results.append((torch.cat(logits, 1), cache))
    (full, cache32), (narrow, cache16) = results
    assert all(layer.k.dtype == torch.bfloat16 for layer in cache16.layers if isinstance(layer, KVCache))
    assert cache16.kv_nbytes() * 2 == cache32.kv_nbytes() and cache16.mamba_nbytes() == cache32.mamba_nbytes()
    error = (narrow - full).abs().max() / full.abs().max()
    assert 0 < error < 0.02, error  # bf16 rounding shows, and stays small
    model.generate(ids[:1, 8:], max_new_tokens=3, kv_dtype=torch.bfloat16)  # and generate takes it


@torch.no_grad()
def test_static_cache_overflow_is_a_clear_error():
    model = random_model()
    cache = model.make_cache(1, max_length=8)
    model(torch.ones(1, 8, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_length"):
        model(torch.ones(1, 1, dtype=torch.long), cache=cache)


def test_bad_mask_shape_is_a_clear_error():
    model = random_model()
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))


# ---------------------------------------------------------------- rows of their own lengths (serving)
def _prefilled(model, ids: torch.Tensor):
    """A one-row cache holding `ids` (T,), and the logits after it (1, V)."""
    from openjamba.generate import prefill

    cache = model.make_cache(1)
    return cache, prefill(model, ids[None], cache, chunk_size=5)


@torch.no_grad()
def test_rows_of_different_lengths_joining_and_leaving_equal_each_row_alone(config_name):
    """Rows join a running batch and leave it mid-decode; every step's logits equal each row decoded alone."""
    from openjamba.generate import decode_step

    model = random_model(config_name)
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=gen) for n in (9, 3, 14, 6)]
    feeds = torch.randint(3, model.config.vocab_size, (4, 8), generator=gen)  # the tokens each row is fed
    expected = []  # per row, the logits after each fed token, computed alone
    for prompt, feed in zip(prompts, feeds):
        cache, _ = _prefilled(model, prompt)
        expected.append([decode_step(model, feed[t:t + 1], cache)[0] for t in range(8)])

    batch, rows, fed = None, [], {}
    joins = {0: [0, 1], 2: [2], 3: [3]}  # step -> rows that join before it
    leaves = {3: [1], 5: [0, 2]}  # step -> rows that leave before it
    for step in range(8):
        for r in leaves.get(step, []):
            batch.remove_rows([rows.index(r)])
            rows.remove(r)
        for r in joins.get(step, []):
            cache, _ = _prefilled(model, prompts[r])
            if batch is None:
                batch = cache
            else:
                batch.add_rows(cache)
            rows.append(r)
            fed[r] = 0
        tokens = torch.stack([feeds[r, fed[r]] for r in rows])
        logits = decode_step(model, tokens, batch)
        for i, r in enumerate(rows):
            torch.testing.assert_close(logits[i], expected[r][fed[r]], atol=ATOL, rtol=0)
            fed[r] += 1
        assert batch.row_lengths() == [len(prompts[r]) + fed[r] for r in rows]
    assert rows == [3] and batch.key_mask is None  # one row left: back on the unmasked path
    assert batch.seq_len == len(prompts[3]) + fed[3]  # the columns of departed rows were freed


@torch.no_grad()
def test_row_state_restores_exactly_and_continues_as_one_full_forward(config_name):
    from openjamba.cache import HybridCache, RowState
    from openjamba.generate import decode_step

    model = random_model(config_name)
    gen = torch.Generator().manual_seed(8)
    ids = torch.randint(3, model.config.vocab_size, (20,), generator=gen)
    other = torch.randint(3, model.config.vocab_size, (13,), generator=gen)
    full = model(ids[None]).logits[0]  # (20, V)
    # The row's state copied out of a mixed-length batch at 12 tokens, then restored and continued.
    batch, logits = _prefilled(model, ids[:12])
    second, _ = _prefilled(model, other)
    second.add_rows(batch)  # the row of interest is row 1, padded on the left
    with pytest.raises(ValueError, match=r"logits\[1\]"):  # the batch's (B, V): refused at once, not at restore
        second.row_state(1, logits)
    state = second.row_state(1, logits[0])
    assert state.length == 12
    torch.testing.assert_close(state.logits, full[11], atol=ATOL, rtol=0)
    assert state.nbytes() == sum(t.nbytes for t in state.to_dict().values()) - 8  # all but the int64 length
    state = RowState.from_dict(state.to_dict(), model)  # through the serialisable form
    restored = HybridCache.from_row_state(model, state)
    assert not any(t.untyped_storage().data_ptr() == s.untyped_storage().data_ptr()
                   for layer, pair in zip(restored.layers, state.layers) for t, s in zip(layer.tensors(), pair))
    steps = [decode_step(model, ids[t:t + 1], restored)[0] for t in range(12, 20)]
    torch.testing.assert_close(torch.stack(steps), full[12:], atol=ATOL, rtol=0)


@torch.no_grad()
def test_from_row_states_equals_one_row_caches_joined_by_add_rows(config_name):
    """Stored states of different lengths restored as one batch in one pass hold exactly what their one-row caches
    joined by `add_rows` hold (the same K/V columns, masks, row starts and Mamba states), and both continue alike."""
    from openjamba.cache import HybridCache
    from openjamba.generate import prefill

    model = random_model(config_name)
    gen = torch.Generator().manual_seed(10)
    states = []
    for n in (7, 12, 12, 3):
        cache, logits = _prefilled(model, torch.randint(3, model.config.vocab_size, (n,), generator=gen))
        states.append(cache.row_state(0, logits[0]))
    joined = HybridCache.from_row_state(model, states[0])
    for state in states[1:]:
        joined.add_rows(HybridCache.from_row_state(model, state))
    together = HybridCache.from_row_states(model, states)
    assert together.batch_size == 4 and together.seq_len == joined.seq_len == 12
    assert together.row_lengths() == joined.row_lengths() == [7, 12, 12, 3]
    assert together.row_starts == joined.row_starts
    assert torch.equal(together.key_mask, joined.key_mask)
    for mine, theirs in zip(together.layers, joined.layers):
        for a, b in zip(mine.tensors(), theirs.tensors()):
            assert torch.equal(a[:, :, :12] if a.dim() == 4 else a, b[:, :, :12] if b.dim() == 4 else b)
    assert not any(t.untyped_storage().data_ptr() == s.untyped_storage().data_ptr()
                   for state in states for layer, pair in zip(together.layers, state.layers)
                   for t, s in zip(layer.tensors(), pair))  # copies: the stored states stay as they were
    more = torch.randint(3, model.config.vocab_size, (4, 5), generator=gen)
    assert torch.equal(prefill(model, more, together), prefill(model, more, joined))
    same = HybridCache.from_row_states(model, states[1:3])  # equal lengths: no mask, the unmasked fast paths
    assert same.key_mask is None and same.row_starts is None and same.seq_len == 12
    shared = HybridCache.from_row_states(model, [states[0]] * 3)  # one stored prefix resumed by several requests
    alone = HybridCache.from_row_state(model, states[0])
    for mine, theirs in zip(shared.layers, alone.layers):
        for a, b in zip(mine.tensors(), theirs.tensors()):
            a, b = (a[:, :, :7], b[:, :, :7]) if a.dim() == 4 else (a, b)  # K/V: the used columns
            assert a.dtype == b.dtype and all(torch.equal(row, b[0]) for row in a)


def test_row_state_from_another_model_is_a_clear_error():
    from openjamba.cache import RowState

    small, other = random_model(), random_model("moe-period3-two-attention")
    cache, logits = _prefilled(small, torch.arange(3, 9))
    with pytest.raises(ValueError, match="another model|layers"):
        RowState.from_dict(cache.row_state(0, logits[0]).to_dict(), other)


@torch.no_grad()
def test_rows_much_shorter_than_the_longest_attend_to_their_own_keys_only(config_name):
    """With most columns padding, a decode step attends row by row over each row's own keys (ops.attend_to_rows);
    the logits equal each row decoded alone, and the path switches back once the long row leaves."""
    from openjamba.generate import decode_step

    model = random_model(config_name)
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=gen) for n in (40, 3, 5)]
    feed = torch.randint(3, model.config.vocab_size, (3, 3), generator=gen)
    alone = []
    for prompt, tokens in zip(prompts, feed):
        cache, _ = _prefilled(model, prompt)
        alone.append(torch.stack([decode_step(model, tokens[t:t + 1], cache)[0] for t in range(3)]))
    batch, _ = _prefilled(model, prompts[0])
    for prompt in prompts[1:]:
        batch.add_rows(_prefilled(model, prompt)[0])
    assert batch.row_starts == [0, 37, 35]
    got = torch.stack([decode_step(model, feed[:, t], batch) for t in range(3)], 1)
    for i in range(3):
        torch.testing.assert_close(got[i], alone[i], atol=ATOL, rtol=0)
    batch.remove_rows([0])
    assert batch.row_lengths() == [6, 8]
    if hasattr(ops.backend_for(torch.device("cpu")), "attend_to_rows"):  # one call whatever the padding
        assert batch.row_starts == [2, 0]
    else:  # a loop over rows: only worth it with most columns padding, so one masked call again at 25%
        assert batch.row_starts is None


@torch.no_grad()
def test_bounded_capacities_hold_exactly_what_is_asked_and_continue_unchanged():
    """`resize_kv` (grow or trim), `add_rows(max_capacity=)` and `from_row_states(capacity=)`, as a K/V-bounded
    engine sizes its caches: the capacities asked for, and the next steps' logits those of the default layout."""
    from openjamba.cache import HybridCache

    model = random_model()
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, model.config.vocab_size, (1, 30), generator=gen)
    short = torch.randint(3, model.config.vocab_size, (1, 9), generator=gen)
    steps = torch.randint(3, model.config.vocab_size, (2, 3), generator=gen)

    def run(bounded: bool):
        a, b = model.make_cache(1), model.make_cache(1)
        model(ids, cache=a), model(short, cache=b)
        if bounded:
            a.resize_kv(40)
            assert a.kv_capacity() == 40
            a.add_rows(b, max_capacity=32)  # its headroom of 10 columns kept only up to the bound
            assert a.kv_capacity() == 32
            a.resize_kv(30)  # a trim to what is in use
            with pytest.raises(ValueError, match="cannot hold"):
                a.resize_kv(29)
            a.resize_kv(33)
        else:
            a.add_rows(b)
        assert a.seq_len == 30
        logits = [model(steps[:, i:i + 1], cache=a).logits for i in range(3)]
        return torch.cat(logits, 1), a

    bounded, cache = run(True)
    assert cache.kv_capacity() == 33  # three steps fit: no doubling
    torch.testing.assert_close(bounded, run(False)[0], atol=0, rtol=0)
    state = cache.row_state(1)
    assert HybridCache.from_row_states(model, [state], capacity=state.length + 1).kv_capacity() == state.length + 1
    assert HybridCache.from_row_state(model, state).kv_capacity() == 2 * state.length
    moved = state.to("cpu")
    assert moved.length == state.length and torch.equal(moved.layers[0][0], state.layers[0][0])
