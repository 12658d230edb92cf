"""Triton GPU kernels for the Mamba mixer: the selective scan (forward + backward) and the one-step decode update.

Semantics are those of `ops.scan` (token-major layout; see its docstring); the tests compare every output and
gradient with `selective_scan_ref`.

Design (the mamba_ssm CUDA kernel's plan, written as a sequential-in-time Triton loop):
  * grid = (batch, channel blocks of BLOCK_D). A program owns a (BLOCK_D, BLOCK_N) fp32 state tile in registers
    and walks the sequence one token at a time, so no (batch, length, channels, state) tensor ever exists. Per token
    it loads BLOCK_D contiguous channels of u, delta, z (token-major: coalesced) and the N values of B_t, C_t (shared
    by all channel blocks, so they come from cache), and fuses softplus(delta + bias), exp(dt * A), the state
    update, sum_n C * h, + D * u and * silu(z).
  * forward saves the state at the start of every CHUNK tokens (O(B * D * N * L / CHUNK) memory) and the final
    state.
  * backward walks the chunks in reverse. For each chunk it recomputes the CHUNK states from the chunk's checkpoint
    into a per-program scratch tile (CHUNK, BLOCK_D, BLOCK_N), sized to stay in L2, then runs the adjoint
    recurrence g_t = C_t * dout_t + exp(dt_{t+1} A) * g_{t+1} backwards through it. du, ddelta, dz are
    written directly; dA, dD, ddelta_bias are accumulated in registers and written once per program as per-batch
    partial sums; dB_t, dC_t (reductions over channels) are written per channel block into fp32 partial buffers
    (n_blocks, batch, length, N) and summed afterwards, which keeps the result deterministic (no atomics).
  * the decode kernel applies one step to a (batch, channels, N) fp32 state in place.

Cost model: the forward moves only its inputs and y. The backward also writes and re-reads every recomputed state
through the scratch (8 bytes per token, channel and state: ~8x its essential HBM traffic at N=16), so it depends
on L2 bandwidth; keeping a chunk's states in registers (a parallel scan over the chunk, as the CUDA kernel does)
would remove that traffic. `ops.triton_tools` has a benchmark and an ahead-of-time compile check that reports
registers and spills.

Everything is computed in fp32 (fp64 when the inputs are fp64, which only the interpreter tests use). Run on CPU
tensors with TRITON_INTERPRET=1 set before this module is imported (that is how the CPU tests exercise it).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .scan import compute_dtype

# Tokens between saved states. Checkpoints cost B*D*N*L/CHUNK fp32 (at N=16 and 32: as much as one bf16 activation);
# the backward re-reads every state from its scratch (8 bytes per token, channel and state), which must stay in L2:
# live scratch is (resident programs) * CHUNK * BLOCK_D * N * 4 bytes, ~25 MB on an H100 at these settings.
CHUNK = 32
BLOCK_D = 32  # channels per program (at most); the state tile is (BLOCK_D, next_pow2(N)) fp32
MAX_TILE = 512  # state-tile elements per program: at 32 x 16 the backward uses ~145 registers; 32 x 64 spills
NUM_WARPS = 4
SOFTPLUS_THRESHOLD = tl.constexpr(20.0)  # as torch.nn.functional.softplus: identity above it


def is_available() -> tuple[bool, str]:
    """Compiled Triton kernels need a CUDA (or ROCm) device; the interpreter is for tests on CPU tensors only."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return False, "TRITON_INTERPRET is set (the interpreter only runs CPU tensors, for tests)"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, ""


# ----------------------------------------------------------------------------------------------------------------
# Kernel helpers


@triton.jit
def _load_dt(delta_row, mask_d, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, acc_dtype: tl.constexpr):
    """dt = softplus(delta + bias) (or without the softplus); also returns the softplus input, for its gradient.

    softplus is log1p(exp(x)) computed without log1p (not portable across Triton versions): Goldberg's trick keeps
    small values accurate where log(1 + e) would round to 0. (Inlined: nested calls are slow in the interpreter.)
    """
    x = tl.load(delta_row, mask=mask_d, other=0.0).to(acc_dtype)
    if HAS_BIAS:
        x = x + bias
    if SOFTPLUS:
        e = tl.exp(tl.minimum(x, SOFTPLUS_THRESHOLD))
        w = 1.0 + e
        log1p = tl.where(w == 1.0, e, tl.log(w) * e / tl.where(w == 1.0, 1.0, w - 1.0))
        dt = tl.where(x > SOFTPLUS_THRESHOLD, x, log1p)
    else:
        dt = x
    return dt, x


@triton.jit
def _load_row(ptr, mask, HAS: tl.constexpr, acc_dtype: tl.constexpr):
    """An optional operand in the compute dtype, or zeros when absent (the flag is constexpr: no load, no cost)."""
    if HAS:
        v = tl.load(ptr, mask=mask, other=0.0).to(acc_dtype)
    else:
        v = tl.zeros(ptr.shape, acc_dtype)
    return v


# ----------------------------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, A_ptr, D_ptr, bias_ptr, h0_ptr,  # inputs
    y_ptr, ckpt_ptr, hT_ptr,  # outputs: y (batch, L, D); ckpt (programs, n_chunks, BD, BN); hT (batch, D, N)
    length, channels, state, n_chunks,
    s_ub, s_ul, s_db, s_dl, s_zb, s_zl,  # batch / token strides of u, delta, z (channel stride 1)
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, SAVE_CKPT: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    acc_dtype = hT_ptr.dtype.element_ty
    b64 = pid_b.to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < channels
    mask_n = offs_n < state
    mask_dn = mask_d[:, None] & mask_n[None, :]
    tile_dn = offs_d[:, None] * state + offs_n[None, :]  # (BD, BN) offsets into a (D, N) array

    A = tl.load(A_ptr + tile_dn, mask=mask_dn, other=0.0).to(acc_dtype)
    Dskip = _load_row(D_ptr + offs_d, mask_d, HAS_D, acc_dtype)
    bias = _load_row(bias_ptr + offs_d, mask_d, HAS_BIAS, acc_dtype)
    h = _load_row(h0_ptr + b64 * channels * state + tile_dn, mask_dn, HAS_H0, acc_dtype)  # (BD, BN)

    u_row = u_ptr + b64 * s_ub + offs_d
    delta_row = delta_ptr + b64 * s_db + offs_d
    z_row = z_ptr + b64 * s_zb + offs_d
    y_row = y_ptr + b64 * length * channels + offs_d
    bc_row = b64 * length * state + offs_n  # B and C are contiguous (batch, L, N)
    tile = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + offs_n[None, :]  # (BD, BN) offsets into a padded tile
    ckpt_base = ckpt_ptr + (b64 * tl.num_programs(1) + pid_d) * n_chunks * BLOCK_D * BLOCK_N + tile

    for c in range(0, n_chunks):
        if SAVE_CKPT:
            tl.store(ckpt_base + c * BLOCK_D * BLOCK_N, h)
        for step in range(c * CHUNK, tl.minimum(c * CHUNK + CHUNK, length)):
            t = tl.cast(step, tl.int64)  # t * stride passes 2**31 at long contexts
            dt, _ = _load_dt(delta_row + t * s_dl, mask_d, bias, HAS_BIAS, SOFTPLUS, acc_dtype)
            u = tl.load(u_row + t * s_ul, mask=mask_d, other=0.0).to(acc_dtype)
            Bt = tl.load(B_ptr + bc_row + t * state, mask=mask_n, other=0.0).to(acc_dtype)
            Ct = tl.load(C_ptr + bc_row + t * state, mask=mask_n, other=0.0).to(acc_dtype)
            h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
            y = tl.sum(h * Ct[None, :], axis=1) + Dskip * u  # (BD,)
            if HAS_Z:
                z = tl.load(z_row + t * s_zl, mask=mask_d, other=0.0).to(acc_dtype)
                y = y * z * tl.sigmoid(z)
            tl.store(y_row + t * channels, y.to(y_ptr.dtype.element_ty), mask=mask_d)
    tl.store(hT_ptr + b64 * channels * state + tile_dn, h, mask=mask_dn)


# ----------------------------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, A_ptr, D_ptr, bias_ptr, ckpt_ptr, dy_ptr, dhT_ptr,  # inputs
    scratch_ptr,  # (programs, CHUNK, BD, BN): the recomputed states of the current chunk
    du_ptr, ddelta_ptr, dz_ptr,  # (batch, L, D), contiguous
    dB_ptr, dC_ptr,  # (n_blocks, batch, L, N) partial sums over this program's channels, or (batch, L, N) atomics
    dA_ptr, dD_ptr, dbias_ptr, dh0_ptr,  # (batch, D, N), (batch, D), (batch, D): partial sums over tokens
    length, channels, state, n_chunks,
    s_ub, s_ul, s_db, s_dl, s_zb, s_zl, s_gb, s_gl,  # batch / token strides of u, delta, z, dy
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DHT: tl.constexpr, ATOMIC_DBC: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    acc_dtype = scratch_ptr.dtype.element_ty
    b64 = pid_b.to(tl.int64)
    batch = tl.num_programs(0)
    program = b64 * tl.num_programs(1) + pid_d
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < channels
    mask_n = offs_n < state
    mask_dn = mask_d[:, None] & mask_n[None, :]
    tile_dn = offs_d[:, None] * state + offs_n[None, :]
    tile = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + offs_n[None, :]

    A = tl.load(A_ptr + tile_dn, mask=mask_dn, other=0.0).to(acc_dtype)
    Dskip = _load_row(D_ptr + offs_d, mask_d, HAS_D, acc_dtype)
    bias = _load_row(bias_ptr + offs_d, mask_d, HAS_BIAS, acc_dtype)
    g = _load_row(dhT_ptr + b64 * channels * state + tile_dn, mask_dn, HAS_DHT, acc_dtype)  # dL/dh_t, (BD, BN)
    dA = tl.zeros((BLOCK_D, BLOCK_N), acc_dtype)
    dD = tl.zeros((BLOCK_D,), acc_dtype)
    dbias = tl.zeros((BLOCK_D,), acc_dtype)

    u_row = u_ptr + b64 * s_ub + offs_d
    delta_row = delta_ptr + b64 * s_db + offs_d
    z_row = z_ptr + b64 * s_zb + offs_d
    dy_row = dy_ptr + b64 * s_gb + offs_d
    out_row = b64 * length * channels + offs_d  # du, ddelta, dz
    bc_row = b64 * length * state + offs_n
    if ATOMIC_DBC:
        dbc_row = bc_row
    else:
        dbc_row = (pid_d * batch + b64) * length * state + offs_n
    ckpt_base = ckpt_ptr + program * n_chunks * BLOCK_D * BLOCK_N + tile
    scratch_base = scratch_ptr + program * CHUNK * BLOCK_D * BLOCK_N + tile

    for rc in range(0, n_chunks):
        c = n_chunks - 1 - rc
        t0 = c * CHUNK
        steps = tl.minimum(CHUNK, length - t0)
        # Recompute the chunk's states; the scratch keeps h_{t-1} for every token t of the chunk.
        h = tl.load(ckpt_base + c * BLOCK_D * BLOCK_N)
        for i in range(0, steps):
            tl.store(scratch_base + i * BLOCK_D * BLOCK_N, h)
            t = tl.cast(t0 + i, tl.int64)
            dt, _ = _load_dt(delta_row + t * s_dl, mask_d, bias, HAS_BIAS, SOFTPLUS, acc_dtype)
            u = tl.load(u_row + t * s_ul, mask=mask_d, other=0.0).to(acc_dtype)
            Bt = tl.load(B_ptr + bc_row + t * state, mask=mask_n, other=0.0).to(acc_dtype)
            h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
        tl.debug_barrier()  # the scratch written by other threads of this program must be visible below

        for ri in range(0, steps):
            j = steps - 1 - ri
            t = tl.cast(t0 + j, tl.int64)
            h_prev = tl.load(scratch_base + j * BLOCK_D * BLOCK_N)
            dt, x = _load_dt(delta_row + t * s_dl, mask_d, bias, HAS_BIAS, SOFTPLUS, acc_dtype)
            u = tl.load(u_row + t * s_ul, mask=mask_d, other=0.0).to(acc_dtype)
            Bt = tl.load(B_ptr + bc_row + t * state, mask=mask_n, other=0.0).to(acc_dtype)
            Ct = tl.load(C_ptr + bc_row + t * state, mask=mask_n, other=0.0).to(acc_dtype)
            dy = tl.load(dy_row + t * s_gl, mask=mask_d, other=0.0).to(acc_dtype)
            decay = tl.exp(dt[:, None] * A)
            h = decay * h_prev + (dt * u)[:, None] * Bt[None, :]

            # Output gate: y = (sum_n C h + D u) * silu(z); dout is the gradient of the part in parentheses.
            if HAS_Z:
                z = tl.load(z_row + t * s_zl, mask=mask_d, other=0.0).to(acc_dtype)
                sig = tl.sigmoid(z)
                pre = tl.sum(h * Ct[None, :], axis=1) + Dskip * u
                dz = dy * pre * sig * (1.0 + z * (1.0 - sig))
                tl.store(dz_ptr + out_row + t * channels, dz.to(dz_ptr.dtype.element_ty), mask=mask_d)
                dout = dy * z * sig
            else:
                dout = dy
            dD += dout * u
            dC = tl.sum(dout[:, None] * h, axis=0)  # (BN,): this program's channels only
            if ATOMIC_DBC:
                tl.atomic_add(dC_ptr + dbc_row + t * state, dC, mask=mask_n, sem="relaxed")
            else:
                tl.store(dC_ptr + dbc_row + t * state, dC, mask=mask_n)

            # Adjoint: g_t = C_t dout_t + (carried) exp(dt_{t+1} A) g_{t+1}.
            g = g + dout[:, None] * Ct[None, :]
            gB = tl.sum(g * Bt[None, :], axis=1)  # (BD,)
            dB = tl.sum(g * (dt * u)[:, None], axis=0)
            if ATOMIC_DBC:
                tl.atomic_add(dB_ptr + dbc_row + t * state, dB, mask=mask_n, sem="relaxed")
            else:
                tl.store(dB_ptr + dbc_row + t * state, dB, mask=mask_n)
            g_decay_h = g * decay * h_prev  # d/d(dt*A) of the decay term
            dA += g_decay_h * dt[:, None]
            ddt = u * gB + tl.sum(g_decay_h * A, axis=1)
            if SOFTPLUS:
                ddt = ddt * tl.where(x > SOFTPLUS_THRESHOLD, 1.0, tl.sigmoid(x))
            dbias += ddt
            tl.store(du_ptr + out_row + t * channels, (dt * gB + Dskip * dout).to(du_ptr.dtype.element_ty),
                     mask=mask_d)
            tl.store(ddelta_ptr + out_row + t * channels, ddt.to(ddelta_ptr.dtype.element_ty), mask=mask_d)
            g = g * decay
        tl.debug_barrier()  # the next chunk overwrites the scratch

    tl.store(dh0_ptr + b64 * channels * state + tile_dn, g, mask=mask_dn)
    tl.store(dA_ptr + b64 * channels * state + tile_dn, dA, mask=mask_dn)
    tl.store(dD_ptr + b64 * channels + offs_d, dD, mask=mask_d)
    tl.store(dbias_ptr + b64 * channels + offs_d, dbias, mask=mask_d)


# ----------------------------------------------------------------------------------------------------------------
# Decode


@triton.jit
def _state_update_kernel(
    state_ptr, u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, A_ptr, D_ptr, bias_ptr, y_ptr,
    channels, state,
    s_hb, s_hd, s_hn, s_ub, s_db, s_zb,  # strides of the state (batch, D, N) and batch strides of u, delta, z
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    acc_dtype = state_ptr.dtype.element_ty
    b64 = pid_b.to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < channels
    mask_n = offs_n < state
    mask_dn = mask_d[:, None] & mask_n[None, :]

    h_ptrs = state_ptr + b64 * s_hb + offs_d[:, None] * s_hd + offs_n[None, :] * s_hn
    h = tl.load(h_ptrs, mask=mask_dn, other=0.0)
    A = tl.load(A_ptr + offs_d[:, None] * state + offs_n[None, :], mask=mask_dn, other=0.0).to(acc_dtype)
    Dskip = _load_row(D_ptr + offs_d, mask_d, HAS_D, acc_dtype)
    bias = _load_row(bias_ptr + offs_d, mask_d, HAS_BIAS, acc_dtype)
    dt, _ = _load_dt(delta_ptr + b64 * s_db + offs_d, mask_d, bias, HAS_BIAS, SOFTPLUS, acc_dtype)
    u = tl.load(u_ptr + b64 * s_ub + offs_d, mask=mask_d, other=0.0).to(acc_dtype)
    Bt = tl.load(B_ptr + b64 * state + offs_n, mask=mask_n, other=0.0).to(acc_dtype)
    Ct = tl.load(C_ptr + b64 * state + offs_n, mask=mask_n, other=0.0).to(acc_dtype)

    h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
    tl.store(h_ptrs, h, mask=mask_dn)
    y = tl.sum(h * Ct[None, :], axis=1) + Dskip * u
    if HAS_Z:
        z = tl.load(z_ptr + b64 * s_zb + offs_d, mask=mask_d, other=0.0).to(acc_dtype)
        y = y * z * tl.sigmoid(z)
    tl.store(y_ptr + b64 * channels + offs_d, y.to(y_ptr.dtype.element_ty), mask=mask_d)


# ----------------------------------------------------------------------------------------------------------------
# Launchers


def _token_major(x: torch.Tensor) -> torch.Tensor:
    """Kernels need unit channel stride only; views such as `in_proj(x).chunk(2, -1)` pass through uncopied."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _block_n(state: int) -> int:
    return max(2, triton.next_power_of_2(state))


def default_block_d(state: int) -> int:
    """Channels per program: BLOCK_D, fewer for large N so the state tile stays within MAX_TILE elements."""
    return max(4, min(BLOCK_D, MAX_TILE // _block_n(state)))


def _pick_block_d(batch: int, channels: int, state: int, device: torch.device) -> int:
    """default_block_d, halved (down to 16) while batch * blocks would give fewer than two programs per SM."""
    block = default_block_d(state)
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        while block > 16 and batch * triton.cdiv(channels, block) < 2 * sms:
            block //= 2
    return block


def atomic_dbc(state: int, block_d: int) -> bool:
    """Whether the backward sums dB/dC over channel blocks with fp32 atomics rather than partial buffers.

    Partial buffers cost 8 * N / BLOCK_D bytes per (token, channel): 4 at N=16, BLOCK_D=32, as much as two bf16
    activations, and they keep the result deterministic. When N > BLOCK_D (large states, small channel blocks)
    they would cost more, so programs add into one buffer with atomics (the sum order then varies between runs).
    """
    return state > block_d


def _small(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Parameters and states are tiny: hand them to the kernels contiguous and already in the compute dtype."""
    return None if x is None else x.to(dtype).contiguous()


def _prepare(u, delta, A, B, C, D, z, delta_bias, initial_state):
    """Kernel-ready operands: token-major activations, contiguous B/C, small parameters in the compute dtype."""
    cdtype = compute_dtype(u)
    z = None if z is None else _token_major(z)
    return (_token_major(u), _token_major(delta), z, B.contiguous(), C.contiguous(), _small(A, cdtype),
            _small(D, cdtype), _small(delta_bias, cdtype), _small(initial_state, cdtype))


def _or(x: torch.Tensor | None, dummy: torch.Tensor) -> torch.Tensor:
    """Absent optional operands are passed as a pointer that the kernel never dereferences."""
    return dummy if x is None else x


def _scan_forward(operands, softplus: bool, chunk: int, block_d: int, save_checkpoints: bool):
    """Returns y (batch, L, D) in u's dtype, the final state (batch, D, N) and the chunk checkpoints."""
    u, delta, z, B, C, A, D, bias, h0 = operands
    batch, length, channels = u.shape
    state, block_n = A.shape[1], _block_n(A.shape[1])
    grid = (batch, triton.cdiv(channels, block_d))
    n_chunks = triton.cdiv(length, chunk)
    y = torch.empty(batch, length, channels, dtype=u.dtype, device=u.device)
    final = torch.empty(batch, channels, state, dtype=A.dtype, device=u.device)
    ckpt_shape = (grid[0] * grid[1], n_chunks, block_d, block_n) if save_checkpoints else (1,)
    ckpt = torch.empty(ckpt_shape, dtype=A.dtype, device=u.device)
    _scan_fwd_kernel[grid](
        u, delta, _or(z, u), B, C, A, _or(D, A), _or(bias, A), _or(h0, A),
        y, ckpt, final,
        length, channels, state, n_chunks,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), _or(z, u).stride(0), _or(z, u).stride(1),
        CHUNK=chunk, BLOCK_D=block_d, BLOCK_N=block_n,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None, SOFTPLUS=softplus,
        HAS_H0=h0 is not None, SAVE_CKPT=save_checkpoints, num_warps=NUM_WARPS,
    )
    return y, final, ckpt


def _scan_backward(operands, ckpt, dy, d_final, softplus: bool, chunk: int, block_d: int):
    """Gradients for (u, delta, A, B, C, D, z, delta_bias, initial_state), in the compute dtype where reduced."""
    u, delta, z, B, C, A, D, bias, h0 = operands
    batch, length, channels = u.shape
    state, block_n = A.shape[1], _block_n(A.shape[1])
    grid = (batch, triton.cdiv(channels, block_d))
    dy = _token_major(dy)  # autograd may hand over expanded (stride-0) gradients, e.g. from .sum()
    d_final = None if d_final is None else d_final.to(A.dtype).contiguous()
    device, cdtype = u.device, A.dtype
    scratch = torch.empty(grid[0] * grid[1], chunk, block_d, block_n, dtype=cdtype, device=device)
    du = torch.empty(batch, length, channels, dtype=u.dtype, device=device)
    ddelta = torch.empty(batch, length, channels, dtype=delta.dtype, device=device)
    dz = torch.empty_like(du, dtype=z.dtype) if z is not None else None
    atomic = atomic_dbc(state, block_d)
    if atomic:
        dB, dC = (torch.zeros(batch, length, state, dtype=cdtype, device=device) for _ in range(2))
    else:
        dB, dC = (torch.empty(grid[1], batch, length, state, dtype=cdtype, device=device) for _ in range(2))
    dA, dh0 = (torch.empty(batch, channels, state, dtype=cdtype, device=device) for _ in range(2))
    dD, dbias = (torch.empty(batch, channels, dtype=cdtype, device=device) for _ in range(2))
    _scan_bwd_kernel[grid](
        u, delta, _or(z, u), B, C, A, _or(D, A), _or(bias, A), ckpt, dy, _or(d_final, A),
        scratch, du, ddelta, _or(dz, du), dB, dC, dA, dD, dbias, dh0,
        length, channels, state, triton.cdiv(length, chunk),
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), _or(z, u).stride(0), _or(z, u).stride(1),
        dy.stride(0), dy.stride(1),
        CHUNK=chunk, BLOCK_D=block_d, BLOCK_N=block_n,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None, SOFTPLUS=softplus,
        HAS_DHT=d_final is not None, ATOMIC_DBC=atomic, num_warps=NUM_WARPS,
    )
    # Partial sums: dB/dC over channel blocks, the parameter gradients over the batch.
    if not atomic:
        dB, dC = dB.sum(0), dC.sum(0)
    return (du, ddelta, dA.sum(0), dB, dC, dD.sum(0) if D is not None else None, dz,
            dbias.sum(0) if bias is not None else None, dh0 if h0 is not None else None)


class _SelectiveScan(torch.autograd.Function):
    """Forward saves only the chunk checkpoints (plus the inputs); backward recomputes the states from them."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, softplus, chunk, block_d):
        operands = _prepare(u, delta, A, B, C, D, z, delta_bias, initial_state)
        save = any(ctx.needs_input_grad)
        y, final, ckpt = _scan_forward(operands, softplus, chunk, block_d, save_checkpoints=save)
        ctx.set_materialize_grads(False)
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, ckpt)
        ctx.config = (softplus, chunk, block_d)
        return y, final

    @staticmethod
    def backward(ctx, dy, d_final):
        *inputs, ckpt = ctx.saved_tensors
        operands = _prepare(*inputs)
        if dy is None:  # only the final state was used
            dy = torch.zeros_like(inputs[0])
        grads = _scan_backward(operands, ckpt, dy, d_final, *ctx.config)
        grads = [None if g is None else g.to(x.dtype) for g, x in zip(grads, inputs)]
        return (*grads, None, None, None)


def selective_scan(
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
    *,
    chunk_size: int = CHUNK,
    block_d: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `ops.scan.selective_scan_ref`, differentiable in every tensor input.

    chunk_size and block_d are tuning knobs (the tests make them small to cover chunk and block edges). The chunk
    is capped at the next power of two of the length so short prompts neither over-allocate nor compile one
    kernel per length.
    """
    batch, length, channels = u.shape
    chunk = min(chunk_size, triton.next_power_of_2(max(length, 1)))
    block_d = block_d or _pick_block_d(batch, channels, A.shape[1], u.device)
    y, final = _SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, chunk,
                                    block_d)
    return (y, final) if return_final_state else y


def selective_state_update(
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
    *,
    block_d: int | None = None,
) -> torch.Tensor:
    """One decoding step (no autograd): u, delta, z (batch, D); B, C (batch, N); `state` updated in place."""
    if state.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"the SSM state must be fp32 (or fp64), got {state.dtype}")
    batch, channels = u.shape
    cdtype, n = state.dtype, state.shape[-1]
    block_d = block_d or default_block_d(n)
    u, delta = _token_major(u), _token_major(delta)
    z = None if z is None else _token_major(z)
    A, D, bias = _small(A, cdtype), _small(D, cdtype), _small(delta_bias, cdtype)
    y = torch.empty(batch, channels, dtype=u.dtype, device=u.device)
    _state_update_kernel[(batch, triton.cdiv(channels, block_d))](
        state, u, delta, _or(z, u), B.contiguous(), C.contiguous(), A, _or(D, A), _or(bias, A), y,
        channels, n,
        state.stride(0), state.stride(1), state.stride(2), u.stride(0), delta.stride(0), _or(z, u).stride(0),
        BLOCK_D=block_d, BLOCK_N=_block_n(n),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None, SOFTPLUS=delta_softplus,
        num_warps=NUM_WARPS,
    )
    return y
