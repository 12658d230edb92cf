"""Attention of a chunk of queries that continues a cached sequence: the reference and a CPU path that stays small.

The last T positions of a sequence of S = past + T attend causally to all S keys ("lower-right" causal). PyTorch's
SDPA runs that efficiently on CUDA (`causal_lower_right`), but on CPU it materialises a (T, S) mask and, through
it, (heads, T, S) scores: 2.6 GB of temporaries for one 2K-token chunk at 256K context, growing with the context.
`chunk_attention_split` instead makes two mask-free calls of PyTorch's CPU flash kernel, one over the past keys
(all visible) and one causal over the chunk's own keys, and merges them with their log-sum-exps:

    out = w * out_past + (1 - w) * out_chunk,   w = sigmoid(lse_past - lse_chunk)

which is exact (softmax over the union of two key sets) and needs memory O(T) beyond the K/V. A decode step (one
query, every key visible) goes to `attend_to_all_sdpa`, which reads the cache once per K/V head (the CPU kernels
have a faster `attend_to_all`, ops/csrc/attend_to_all.cpp, that `ops.attend_to_all` prefers).

A cache may hold K/V in a narrower dtype than the queries (`make_cache(kv_dtype=torch.bfloat16)`). They are then
widened to the queries' dtype here, the past keys of a chunk in blocks of PAST_BLOCK (each merged in by its
log-sum-exp like the two parts above), so no full-size widened copy of the cache is made.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
PAST_BLOCK = 16384  # past keys widened at a time when the cache is narrower than the queries


def to_dtype_of(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """t in ref's dtype (a no-op when it already is): K/V from a narrower cache, widened for the queries."""
    return t if t.dtype == ref.dtype else t.to(ref.dtype)


def chunk_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """q: (B, heads, T, hd) at the last T positions; k, v: (B, kv_heads, S, hd) with S >= T. Causal, GQA."""
    from torch.nn.attention.bias import causal_lower_right  # imports torch._dynamo: only when needed

    return F.scaled_dot_product_attention(
        q, to_dtype_of(k, q), to_dtype_of(v, q), attn_mask=causal_lower_right(q.shape[2], k.shape[2]),
        dropout_p=dropout_p, enable_gqa=k.shape[1] != q.shape[1],
    )


def attend_to_all_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked GQA attention (every query sees every key: a decode step). The query heads sharing a K/V head are
    stacked along the query axis, (B, heads, T, hd) -> (B, kv_heads, group * T, hd), so the long K/V is read once
    per K/V head and never expanded to `heads` (SDPA's enable_gqa materialises that copy on CPU)."""
    batch, heads, length, head_dim = q.shape
    folded = q.reshape(batch, k.shape[1], heads // k.shape[1] * length, head_dim)
    out = F.scaled_dot_product_attention(folded, to_dtype_of(k, q), to_dtype_of(v, q))
    return out.reshape(batch, heads, length, head_dim)


def chunk_attention_split(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Same result as `chunk_attention_ref` (no dropout), without a (T, S) mask or scores. CPU, no autograd."""
    batch, heads, length, head_dim = q.shape
    kv_heads, past = k.shape[1], k.shape[2] - length
    group = heads // kv_heads
    # Past keys are visible to every query: heads folded into the query axis as in `attend_to_all_sdpa`. A cache in
    # the queries' dtype is one piece; a narrower one is widened a block at a time.
    folded = q.reshape(batch, kv_heads, group * length, head_dim)
    block = past if k.dtype == q.dtype else PAST_BLOCK
    merged = None
    for start in range(0, past, block):
        keys = slice(start, min(past, start + block))
        out, lse = _CPU_FLASH(folded, to_dtype_of(k[:, :, keys], q), to_dtype_of(v[:, :, keys], q), 0.0, False)
        merged = _merge(merged, out.reshape(batch, heads, length, head_dim), lse.reshape(batch, heads, length))
    # The chunk's own keys: a square causal block (upper-left = lower-right), heads expanded (T keys only).
    k_new = to_dtype_of(k[:, :, past:], q).repeat_interleave(group, dim=1)
    v_new = to_dtype_of(v[:, :, past:], q).repeat_interleave(group, dim=1)
    out, _ = _merge(merged, *_CPU_FLASH(q, k_new, v_new, 0.0, True))
    return out.to(q.dtype)


def _merge(merged: tuple[torch.Tensor, torch.Tensor] | None, out: torch.Tensor, lse: torch.Tensor):
    """Attention over two disjoint key sets from each one's output (B, heads, T, hd) and log-sum-exp (B, heads, T):
    softmax weights exp(lse_i - lse_total). `merged` is the (output, lse) so far, or None. Kept in fp32 at least."""
    dtype = torch.promote_types(out.dtype, torch.float32)
    out, lse = out.to(dtype), lse.to(dtype)
    if merged is None:
        return out, lse
    merged_out, merged_lse = merged
    total = torch.logaddexp(merged_lse, lse)
    out = merged_out * torch.exp(merged_lse - total).unsqueeze(-1) + out * torch.exp(lse - total).unsqueeze(-1)
    return out, total


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """The split path for CPU inference (where it saves memory), the reference everywhere else."""
    use_split = (
        _CPU_FLASH is not None and q.device.type == "cpu" and dropout_p == 0.0 and k.shape[2] > q.shape[2]
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
    )
    return chunk_attention_split(q, k, v) if use_split else chunk_attention_ref(q, k, v, dropout_p)
