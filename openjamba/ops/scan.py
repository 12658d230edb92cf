"""Selective scan (Mamba-1) in plain PyTorch: the sequential reference and a chunked version.

Layout is token-major, the layout the projections produce, so no transposes are needed around the scan:
    u, delta, z: (batch, length, channels)     A: (channels, state)     B, C: (batch, length, state)
    D, delta_bias: (channels,)                 states: (batch, channels, state), always fp32 (fp64 for fp64 input)

Per channel d and state n:
    dt_t = softplus(delta_t + delta_bias)       (when delta_softplus)
    h_t  = exp(dt_t * A) * h_{t-1} + dt_t * u_t * B_t
    y_t  = (sum_n C_t * h_t + D * u_t) * silu(z_t)

`selective_scan_ref` is the truth the tests compare every other implementation against. `selective_scan_chunked`
is the portable default: it never builds a (batch, length, channels, state) tensor, only one of
(batch, chunk, channels, state), and it has no Python loop per token (within a chunk it uses a log-depth
Hillis-Steele scan, which only ever multiplies decays <= 1 and so stays stable for any dt).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64 (for reference tests); everything else is computed in fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def prepare_delta(
    delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool, dtype: torch.dtype
) -> torch.Tensor:
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


def finish_output(
    y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """Skip connection and gate: (y + D*u) * silu(z), in the compute dtype, then cast once."""
    if D is not None:
        y = y + u.to(y.dtype) * D.to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sequential reference: one step per token. Slow; used as the oracle in tests."""
    cdtype = compute_dtype(u)
    batch, length, channels = u.shape
    dt = prepare_delta(delta, delta_bias, delta_softplus, cdtype)
    A = A.to(cdtype)
    h = u.new_zeros(batch, channels, A.shape[-1], dtype=cdtype) if initial_state is None else initial_state.to(cdtype)
    ys = []
    for t in range(length):
        dt_t = dt[:, t, :, None]  # (batch, channels, 1)
        h = torch.exp(dt_t * A) * h + dt_t * u[:, t, :, None].to(cdtype) * B[:, t, None, :].to(cdtype)
        ys.append((h * C[:, t, None, :].to(cdtype)).sum(-1))
    y = torch.stack(ys, dim=1) if ys else u.new_zeros(batch, 0, channels, dtype=cdtype)
    y = finish_output(y, u, D, z, u.dtype)
    return (y, h) if return_final_state else y


def _scan_within_chunk(decay: torch.Tensor, inject: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """All states of one chunk: h_t = decay_t * h_{t-1} + inject_t, h_{-1} = h0.

    decay, inject: (batch, T, channels, state). Hillis-Steele doubling: after the step with offset s, each
    position holds the composition of the (up to 2s) transitions ending there. log2(T) steps, no division.
    """
    states = torch.cat([decay[:, :1] * h0.unsqueeze(1) + inject[:, :1], inject[:, 1:]], dim=1)
    length = states.shape[1]
    offset = 1
    while offset < length:
        states = torch.cat([states[:, :offset], states[:, offset:] + decay[:, offset:] * states[:, :-offset]], dim=1)
        if 2 * offset < length:
            decay = torch.cat([decay[:, :offset], decay[:, offset:] * decay[:, :-offset]], dim=1)
        offset *= 2
    return states


def _scan_chunk(
    dt: torch.Tensor, u: torch.Tensor, B: torch.Tensor, C: torch.Tensor, A: torch.Tensor, h: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk from state h: (y (batch, T, channels), state after the chunk). dt, A, h in the compute dtype."""
    decay = torch.exp(dt.unsqueeze(-1) * A)  # (batch, T, channels, state)
    inject = (dt * u.to(dt.dtype)).unsqueeze(-1) * B.to(dt.dtype).unsqueeze(2)
    states = _scan_within_chunk(decay, inject, h)
    # (batch, T, channels, state) x (batch, T, state) -> (batch, T, channels)
    return torch.matmul(states, C.to(dt.dtype).unsqueeze(-1)).squeeze(-1), states[:, -1].clone()


class _RecomputedChunk(torch.autograd.Function):
    """A chunk run without autograd and re-run with it in backward: the graph keeps the chunk's inputs (one
    (batch, channels, state) state beside views of the activations), never its (batch, T, channels, state) internals.

    Used instead of torch.utils.checkpoint, whose non-reentrant form left the freed internals of every chunk in
    glibc's heap (RSS grew ~0.4 GB per 1K tokens at 512 channels although live memory did not).
    """

    @staticmethod
    def forward(ctx, dt, u, B, C, A, h):
        ctx.save_for_backward(dt, u, B, C, A, h)
        return _scan_chunk(dt, u, B, C, A, h)

    @staticmethod
    def backward(ctx, dy, dh):
        inputs = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad)]
        with torch.enable_grad():
            outputs = _scan_chunk(*inputs)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(outputs, wanted, (dy, dh), allow_unused=True))
        return tuple(next(grads) if t.requires_grad else None for t in inputs)


def selective_scan_chunked(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    chunk_size: int = 32,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `selective_scan_ref`; memory O(batch * chunk * channels * state) beyond the activations."""
    cdtype = compute_dtype(u)
    batch, length, channels = u.shape
    dt = prepare_delta(delta, delta_bias, delta_softplus, cdtype)
    A = A.to(cdtype)
    h = u.new_zeros(batch, channels, A.shape[-1], dtype=cdtype) if initial_state is None else initial_state.to(cdtype)
    # Training: each chunk is recomputed in backward, so autograd keeps one (batch, channels, state) state per
    # chunk instead of the chunk's (batch, T, channels, state) intermediates, i.e. memory O(L / T), not O(L).
    recompute = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, delta_bias, initial_state))
    ys = []
    # split, not slicing in the loop: one backward op that concatenates, instead of one (batch, length, channels)
    # zero-filled gradient per chunk and per input (quadratic in length).
    pieces = zip(*(t.split(chunk_size, dim=1) for t in (dt, u, B, C))) if length else ()
    for dt_c, u_c, B_c, C_c in pieces:
        chunk = (dt_c, u_c, B_c, C_c, A, h)
        y_c, h = _RecomputedChunk.apply(*chunk) if recompute else _scan_chunk(*chunk)
        ys.append(y_c)
    y = torch.cat(ys, dim=1) if ys else u.new_zeros(batch, 0, channels, dtype=cdtype)
    y = finish_output(y, u, D, z, u.dtype)
    return (y, h) if return_final_state else y


def selective_state_update_ref(
    state: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """One decoding step. u, delta, z: (batch, channels); B, C: (batch, state); `state` is updated in place."""
    cdtype = state.dtype
    dt = prepare_delta(delta, delta_bias, delta_softplus, cdtype).unsqueeze(-1)  # (batch, channels, 1)
    new_state = torch.exp(dt * A.to(cdtype)) * state + dt * u.to(cdtype).unsqueeze(-1) * B.to(cdtype).unsqueeze(1)
    state.copy_(new_state)
    y = torch.matmul(new_state, C.to(cdtype).unsqueeze(-1)).squeeze(-1)  # (batch, channels)
    return finish_output(y, u, D, z, u.dtype)
