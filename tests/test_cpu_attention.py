"""The compiled decode attention (`cpu_kernels.attend_to_all`) against attention written out in float64."""

from __future__ import annotations

import pytest
import torch

from openjamba import ops
from openjamba.ops import cpu_kernels
from openjamba.ops.attention import attend_to_all_sdpa

from .conftest import random_model

AVAILABLE, WHY = cpu_kernels.is_available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"CPU kernels unavailable: {WHY}")


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v in float64, with every K/V head repeated for its query heads."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    scores = q.double() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    return scores.softmax(-1) @ v


def inputs(batch, heads, kv_heads, queries, keys, head_dim, dtype=torch.float64, seed=0, capacity_extra=5):
    """q as the attention layer makes it (a transposed view); k, v as the cache returns them (a slice of a buffer)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, queries, heads, head_dim, generator=g, dtype=dtype).transpose(1, 2)
    k, v = (torch.randn(batch, kv_heads, keys + capacity_extra, head_dim, generator=g, dtype=dtype)[:, :, :keys]
            for _ in range(2))
    return q, k, v


# Key counts around the 8-key tiles and the blocks (shrunk to 16 keys below); head sizes that take the AVX2 code
# (multiples of 16, Jamba's 128 among them) and the plain loops (the others).
@pytest.mark.parametrize("keys", [1, 7, 8, 9, 16, 17, 100])
@pytest.mark.parametrize("head_dim", [8, 17, 32, 40, 48, 64, 128])
def test_matches_reference_in_float64_and_float32(monkeypatch, keys, head_dim):
    monkeypatch.setattr(cpu_kernels, "ATTEND_BLOCK", 16)
    q, k, v = inputs(2, 4, 2, 1, keys, head_dim, seed=keys * head_dim)
    expected = reference(q, k, v)
    torch.testing.assert_close(cpu_kernels.attend_to_all(q, k, v), expected, atol=1e-12, rtol=1e-12)
    got = cpu_kernels.attend_to_all(q.float(), k.float(), v.float())  # fp32: the AVX2 code where it is built
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected.float(), atol=2e-6, rtol=1e-5)


# Query rows per K/V head (group x queries) from 1 to 9: the AVX2 code keeps up to 8 vectors of sums in registers
# (rows x head size / 8; 16 with AVX-512's 32 registers) and accumulates larger ones in L1.
@pytest.mark.parametrize("heads,kv_heads,queries", [(4, 4, 1), (4, 2, 1), (6, 2, 1), (8, 2, 1), (8, 1, 1), (6, 2, 3)])
@pytest.mark.parametrize("head_dim", [16, 32, 128])
def test_grouped_heads_and_several_queries(heads, kv_heads, queries, head_dim):
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        q, k, v = inputs(3, heads, kv_heads, queries, 300, head_dim, dtype=dtype, seed=heads)
        torch.testing.assert_close(cpu_kernels.attend_to_all(q, k, v), reference(q, k, v).to(dtype), atol=tol,
                                   rtol=tol)


def test_large_scores_stay_finite_and_exact():
    """Scores in the hundreds: each block subtracts its maximum, and the merge rescales blocks by theirs."""
    q, k, v = inputs(1, 2, 1, 1, 3000, 32, dtype=torch.float32, seed=3)
    q = q * 40
    got = cpu_kernels.attend_to_all(q, k, v)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, reference(q, k, v).float(), atol=1e-5, rtol=1e-4)


def test_threads_do_not_change_results():
    q, k, v = inputs(1, 4, 2, 1, 5000, 32, dtype=torch.float32, seed=5)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(cpu_kernels.attend_to_all(q, k, v))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(results[0], results[1], atol=0, rtol=0)  # the same blocks whatever the threads


@pytest.mark.parametrize("head_dim", [16, 32, 40, 128])
def test_bfloat16_cache(head_dim):
    """A bf16 model's cache: K/V widened exactly, so fp64 queries give the float64 reference of the bf16 values."""
    q, k, v = inputs(2, 8, 2, 1, 77, head_dim, seed=head_dim)
    k, v = k.bfloat16(), v.bfloat16()
    expected = reference(q, k, v)
    torch.testing.assert_close(cpu_kernels.attend_to_all(q, k, v), expected, atol=1e-12, rtol=1e-12)
    got = cpu_kernels.attend_to_all(q.float(), k, v)  # fp32 compute (the AVX2 code for multiples of 16)
    torch.testing.assert_close(got, expected.float(), atol=2e-6, rtol=1e-5)
    got = cpu_kernels.attend_to_all(q.bfloat16(), k, v)  # a bf16 model: bf16 out, computed in fp32
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, reference(q.bfloat16(), k, v).bfloat16(), atol=1e-3, rtol=2**-8)  # 1 ulp


def test_other_dtypes_and_autograd_go_to_sdpa():
    q, k, v = inputs(1, 4, 2, 1, 50, 16, dtype=torch.float16)
    torch.testing.assert_close(cpu_kernels.attend_to_all(q, k, v), attend_to_all_sdpa(q, k, v), atol=0, rtol=0)
    q, k, v = (t.float().requires_grad_(True) for t in inputs(1, 4, 2, 1, 50, 16))
    cpu_kernels.attend_to_all(q, k, v).sum().backward()
    assert all(t.grad is not None for t in (q, k, v))


@torch.no_grad()
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 0.15)])  # bf16: logits of size ~3
def test_model_decoding_uses_the_kernel_and_matches_plain_pytorch(monkeypatch, dtype, atol):
    model = random_model().to(dtype)
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    calls = []
    kernel = cpu_kernels.attend_to_all
    monkeypatch.setattr(cpu_kernels, "attend_to_all", lambda *a: calls.append(1) or kernel(*a))
    results = []
    for backend in (None, cpu_kernels):
        monkeypatch.setitem(ops._chosen, "cpu", backend)
        cache = model.make_cache(2)
        model(ids[:, :30], cache=cache)
        results.append(torch.cat([model(ids[:, t:t + 1], cache=cache).logits for t in range(30, 40)], 1).float())
    assert calls, "decode steps did not reach the compiled kernel"
    torch.testing.assert_close(results[1], results[0], atol=atol, rtol=0)


@pytest.mark.parametrize("head_dim", [17, 32, 128])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_attend_to_rows_is_one_call_with_each_rows_own_result(monkeypatch, head_dim, dtype):
    """Rows of their own lengths in one buffer (right-aligned, as a serving batch holds them): one kernel call gives
    each row bit for bit what `attend_to_all` gives it alone over its own keys, whatever its batch-mates, and
    matches attention written out in float64."""
    monkeypatch.setattr(cpu_kernels, "ATTEND_BLOCK", 16)  # several key blocks per row, rows with different counts
    starts = [0, 37, 50, 12, 52]
    q, k, v = inputs(len(starts), 8, 2, 1, 53, head_dim, dtype=dtype, seed=3)
    got = cpu_kernels.attend_to_rows(q, k, v, starts)
    for i, s in enumerate(starts):
        alone = cpu_kernels.attend_to_all(q[i:i + 1], k[i:i + 1, :, s:], v[i:i + 1, :, s:])
        assert torch.equal(got[i:i + 1], alone), f"row {i}"
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        torch.testing.assert_close(got[i:i + 1], reference(q[i:i + 1], k[i:i + 1, :, s:], v[i:i + 1, :, s:]).to(dtype),
                                   atol=tol, rtol=tol)
    # Other batch-mates (another order, other lengths) leave a row's bits alone.
    again = cpu_kernels.attend_to_rows(q[[3, 1]], k[[3, 1]], v[[3, 1]], [starts[3], 1])
    assert torch.equal(again[0], got[3])
    torch.testing.assert_close(ops.attend_to_rows_ref(q, k, v, starts), got, atol=0, rtol=0)


def test_attend_to_rows_with_a_bf16_cache_and_bad_starts():
    starts = [3, 0]
    q, k, v = inputs(2, 4, 2, 1, 40, 32, dtype=torch.float32, seed=4)
    k, v = k.bfloat16(), v.bfloat16()
    got = cpu_kernels.attend_to_rows(q, k, v, starts)
    for i, s in enumerate(starts):
        assert torch.equal(got[i:i + 1], cpu_kernels.attend_to_all(q[i:i + 1], k[i:i + 1, :, s:], v[i:i + 1, :, s:]))
    with pytest.raises(ValueError, match="starts"):
        cpu_kernels.attend_to_rows(q, k, v, [0, 40])
