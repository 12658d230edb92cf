"""The plain PyTorch ops against the sequential float64 reference: outputs, final states, gradients."""

from __future__ import annotations

import pytest
import torch

from openjamba.ops import (
    attention,
    causal_conv1d_ref,
    causal_conv1d_update,
    selective_scan_chunked,
    selective_scan_ref,
    selective_state_update_ref,
)
from openjamba.ops.attention import attend_to_all_sdpa, chunk_attention, chunk_attention_ref, chunk_attention_split


def scan_inputs(batch, length, channels, state, dtype=torch.float64, dt_scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    return dict(
        u=r(batch, length, channels), delta=r(batch, length, channels) * dt_scale,
        A=-torch.rand(channels, state, generator=g, dtype=dtype) * 8 - 0.1,
        B=r(batch, length, state), C=r(batch, length, state), D=r(channels), z=r(batch, length, channels),
        delta_bias=r(channels), initial_state=r(batch, channels, state),
    )


@pytest.mark.parametrize("length", [1, 2, 31, 32, 33, 100])
@pytest.mark.parametrize("chunk", [1, 7, 32])
def test_chunked_scan_matches_reference(length, chunk):
    args = scan_inputs(2, length, 5, 3)
    y_ref, h_ref = selective_scan_ref(**args, delta_softplus=True, return_final_state=True)
    y, h = selective_scan_chunked(**args, delta_softplus=True, return_final_state=True, chunk_size=chunk)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(h, h_ref, atol=1e-12, rtol=1e-12)


def test_chunked_scan_is_stable_for_large_dt_and_fast_decay():
    args = scan_inputs(1, 200, 4, 4, dtype=torch.float32, dt_scale=30.0)
    args["A"] = args["A"] * 10
    y, h = selective_scan_chunked(**args, delta_softplus=True, return_final_state=True)
    y_ref, h_ref = selective_scan_ref(**args, delta_softplus=True, return_final_state=True)
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    torch.testing.assert_close(y, y_ref, atol=1e-3, rtol=1e-4)


def test_chunked_scan_gradients_match_reference():
    args = scan_inputs(2, 45, 3, 4, seed=1)
    for v in args.values():
        v.requires_grad_(True)
    names = list(args)
    grads_ref = torch.autograd.grad(selective_scan_ref(**args, delta_softplus=True).sum(), [args[n] for n in names])
    grads = torch.autograd.grad(
        selective_scan_chunked(**args, delta_softplus=True, chunk_size=8).sum(), [args[n] for n in names])
    for name, g, g_ref in zip(names, grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=1e-10, msg=name)


def test_state_update_continues_a_scan():
    args = scan_inputs(2, 9, 6, 4)
    y_ref, h_ref = selective_scan_ref(**args, delta_softplus=True, return_final_state=True)
    state = args["initial_state"].clone()
    for t in range(9):
        y_t = selective_state_update_ref(
            state, args["u"][:, t], args["delta"][:, t], args["A"], args["B"][:, t], args["C"][:, t], args["D"],
            args["z"][:, t], args["delta_bias"], delta_softplus=True)
        torch.testing.assert_close(y_t, y_ref[:, t])
    torch.testing.assert_close(state, h_ref)


def test_no_batch_length_channels_state_tensor():
    """The chunked scan's peak extra memory must not grow with length (only with chunk size)."""
    args = scan_inputs(1, 2048, 64, 16, dtype=torch.float32)
    full = 1 * 2048 * 64 * 16 * 4
    with torch.profiler.profile(profile_memory=True) as prof:
        selective_scan_chunked(**args, delta_softplus=True, chunk_size=32)
    biggest = max(e.cpu_memory_usage for e in prof.events())  # the largest single op's allocation
    assert 0 < biggest < full / 8


def test_chunked_scan_training_keeps_one_state_per_chunk():
    """With grad, chunks are recomputed in backward: autograd holds O(L / chunk) states, not the chunks' internals."""
    args = {k: v.requires_grad_(True) for k, v in scan_inputs(1, 512, 32, 16, dtype=torch.float32).items()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = selective_scan_chunked(**args, delta_softplus=True, chunk_size=32)
    activation = 512 * 32  # one (batch, length, channels) tensor; one full state tensor would be 16 times that
    assert sum(saved) <= 12 * activation
    y.sum().backward()
    assert all(torch.isfinite(v.grad).all() for v in args.values())


@pytest.mark.parametrize("kernel", [2, 4])
def test_conv_in_chunks_equals_one_pass(kernel):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 23, 5, generator=g, dtype=torch.float64)
    w = torch.randn(5, kernel, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    y_full, win_full = causal_conv1d_ref(x, w, b)
    expected = torch.nn.functional.conv1d(x.transpose(1, 2), w[:, None], b, padding=kernel - 1, groups=5)
    torch.testing.assert_close(y_full, torch.nn.functional.silu(expected[..., :23]).transpose(1, 2))
    window, pieces = None, []
    for span in (slice(0, 1), slice(1, 8), slice(8, 9), slice(9, 23)):
        y, window = causal_conv1d_ref(x[:, span], w, b, window)
        pieces.append(y)
    torch.testing.assert_close(torch.cat(pieces, 1), y_full)
    torch.testing.assert_close(window, win_full)


@pytest.mark.parametrize("kernel", [2, 4])
@pytest.mark.parametrize("bias,silu", [(True, True), (False, False)])
def test_conv_update_steps_equal_one_pass(kernel, bias, silu):
    g = torch.Generator().manual_seed(kernel)
    x = torch.randn(3, 9, 5, generator=g, dtype=torch.float64)
    w = torch.randn(5, kernel, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64) if bias else None
    y_full, win_full = causal_conv1d_ref(x, w, b, silu=silu)
    _, window = causal_conv1d_ref(x[:, :4], w, b, silu=silu)  # a prefill, then one token at a time
    window = window.clone()
    steps = [causal_conv1d_update(x[:, t], w, b, window, silu=silu) for t in range(4, 9)]
    torch.testing.assert_close(torch.stack(steps, 1), y_full[:, 4:], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(window, win_full, atol=0, rtol=0)  # updated in place


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4), (6, 1)])
@pytest.mark.parametrize("length,past", [(1, 5), (7, 1), (16, 40), (33, 300)])
def test_chunk_attention_split_matches_reference(heads, kv_heads, length, past):
    g = torch.Generator().manual_seed(length + past)
    q = torch.randn(2, heads, length, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, kv_heads, past + length, 8, generator=g, dtype=torch.float64) for _ in range(2))
    expected = chunk_attention_ref(q, k, v)
    torch.testing.assert_close(chunk_attention_split(q, k, v), expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(chunk_attention(q.float(), k.float(), v.float()), expected.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("past", [5, 40, 300])
def test_chunk_attention_over_a_narrower_cache(monkeypatch, past):
    """bf16 K/V (make_cache's kv_dtype) under float64 queries: the past is widened a few keys at a time, each block
    merged in by its log-sum-exp, and the result is the reference's on the widened K/V."""
    monkeypatch.setattr(attention, "PAST_BLOCK", 16)  # several blocks
    g = torch.Generator().manual_seed(past)
    q = torch.randn(2, 4, 7, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, past + 7, 8, generator=g).bfloat16() for _ in range(2))
    expected = chunk_attention_ref(q, k.double(), v.double())
    torch.testing.assert_close(chunk_attention_split(q, k, v), expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(chunk_attention_ref(q, k, v), expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(attend_to_all_sdpa(q[:, :, :1], k, v),
                               attend_to_all_sdpa(q[:, :, :1], k.double(), v.double()), atol=1e-12, rtol=1e-12)


def test_chunk_attention_keeps_autograd_on_the_reference():
    q = torch.randn(1, 2, 4, 8, requires_grad=True)
    k, v = torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    chunk_attention(q, k, v).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("heads,kv_heads,length", [(4, 2, 1), (4, 4, 1), (6, 1, 3)])
def test_attend_to_all_matches_sdpa_with_expanded_heads(heads, kv_heads, length):
    g = torch.Generator().manual_seed(heads + length)
    q = torch.randn(2, heads, length, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, kv_heads, 50, 8, generator=g, dtype=torch.float64)[:, :, :37] for _ in range(2))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(attend_to_all_sdpa(q, k, v), expected, atol=1e-12, rtol=1e-12)
