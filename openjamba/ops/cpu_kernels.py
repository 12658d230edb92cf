"""Compiled CPU kernels: selective scan (forward + backward), its decode step, causal conv1d, decode attention, and
the decode step's matrix-vector products and fused Mamba step.

Same contracts as the plain PyTorch ops (ops/scan.py, ops/conv.py); the C++ lives in ops/csrc and is built at first
use (ops/cpu_build.py). Inputs in bf16/fp16 are computed in fp32, fp64 in fp64. Every tensor input of
`selective_scan` and `causal_conv1d` is differentiable through hand-written backward kernels.

Training memory of the scan: the forward keeps only the state entering every chunk of CHUNK steps,
(batch, L / CHUNK, channels, state); the backward recomputes each chunk's states from it, so nothing of size
(batch, L, channels, state) ever exists.
"""

from __future__ import annotations

import ctypes
import functools
import sys

import torch
import torch.nn.functional as F

from . import cpu_build
from .attention import attend_to_all_sdpa
from .cpu_build import (
    AttendArgs,
    ConvArgs,
    FfnStepArgs,
    MambaStepArgs,
    MlpStepArgs,
    ScanArgs,
    Weight,
    call,
    make_args,
)
from .decode import DECODE_MAX_ROWS, add_rms_norm_ref, expert_linear_ref, mamba_step_ref, mlp_step_ref, moe_step_ref
from .decode import rms_norm as rms_norm_ref
from .scan import selective_scan_ref

ATTEND_BLOCK = 1024  # keys per work item of attend_to_all (it buffers rows x 1024 scores)
CHUNK = 64  # steps between saved states: checkpoint memory (L / CHUNK) vs. recompute buffers (CHUNK * state * 16)
SERIAL_BELOW = 1 << 16  # elements of work (~1 ns each) below which waking a second thread costs more than it saves


def eager_under_compile(fn):
    """`torch.compiler.disable(fn)` (ctypes calls run eagerly under torch.compile: a clean graph break), applied only
    once torch._dynamo is loaded: importing it (sympy, triton...) costs ~140 MB of RSS and a second, which inference
    that never compiles should not pay. Nothing can be compiling before torch._dynamo is imported."""
    disabled = []

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    return wrapper


def is_available() -> tuple[bool, str]:
    """(True, "") once the kernels are built and loaded; (False, why) otherwise. Builds on first call."""
    try:
        cpu_build.library()
    except RuntimeError as err:
        return False, str(err)
    return True, ""


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _rowwise(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """In the compute dtype with the last dim contiguous; other strides (e.g. `chunk` views) are kept."""
    if t is None:
        return None
    if t.dtype != dtype:
        t = t.to(dtype)
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _dense(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if t is None:
        return None
    if t.dtype != dtype:
        t = t.to(dtype)
    return t.contiguous()


def _require_shapes(op: str, **named: tuple) -> None:
    """Raise a clear error for a tensor whose shape is not what the kernel reads: the kernels trust every extent
    (a wrong one would read or write out of bounds). named: name=(tensor or None, expected shape)."""
    for name, (t, shape) in named.items():
        if t is not None and tuple(t.shape) != tuple(shape):
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def _threads(work: int) -> int:
    return 1 if work < SERIAL_BELOW else max(1, torch.get_num_threads())


def _owned_groups(threads: int, channels: int) -> int:
    """Backward work items: channel groups, each owning its channels' parameter gradients (no races)."""
    return max(1, min(threads, channels // cpu_build.lanes()))


def _grads_as_inputs(grads, needs, dtypes) -> list:
    return [None if g is None or not need else g.to(dtype) for g, need, dtype in zip(grads, needs, dtypes)]


# --------------------------------------------------------------------------------------------------------------
# Selective scan.


def _scan_forward(u, delta, A, B, C, D, z, delta_bias, h0, softplus: bool, keep_checkpoints: bool):
    """Inputs already in the compute dtype. Returns y (compute dtype), final state, checkpoints or None."""
    batch, length, channels = u.shape
    state = A.shape[-1]
    threads = _threads(batch * length * channels * state)
    out = torch.empty(batch, length, channels, dtype=u.dtype)
    final = torch.empty(batch, channels, state, dtype=u.dtype)
    ckpt = torch.empty(batch, -(-length // CHUNK), channels, state, dtype=u.dtype) if keep_checkpoints else None
    args = make_args(ScanArgs, batch=batch, length=length, channels=channels, state=state, chunk=CHUNK,
                     groups=threads, threads=threads, softplus=int(softplus), u=u, delta=delta, z=z, B=B, C=C,
                     out=out, A=A, D=D, bias=delta_bias, h0=h0, hT=final, ckpt=ckpt)
    call("scan_forward", u.dtype, args)
    return out, final, ckpt


def _scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state) -> tuple:
    dtype = _compute_dtype(u)
    rows = [_rowwise(t, dtype) for t in (u, delta, B, C, z)]
    params = [_dense(t, dtype) for t in (A, D, delta_bias, initial_state)]
    return (*rows, *params)


class _SelectiveScan(torch.autograd.Function):
    """Chunk-checkpointed scan: saves the inputs and the state entering each chunk, nothing of size L * state."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, softplus):
        cu, cdelta, cB, cC, cz, cA, cD, cbias, ch0 = _scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
        y, final, ckpt = _scan_forward(cu, cdelta, cA, cB, cC, cD, cz, cbias, ch0, softplus, keep_checkpoints=True)
        # The inputs as given (bf16 stays bf16, converted again in backward); the initial state is ckpt[:, 0].
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckpt)
        ctx.softplus = softplus
        ctx.dtypes = [None if t is None else t.dtype for t in (u, delta, A, B, C, D, z, delta_bias, initial_state)]
        return y.to(u.dtype), final

    @staticmethod
    def backward(ctx, dy, dfinal):
        *inputs, ckpt = ctx.saved_tensors
        u, delta, B, C, z, A, D, bias, _ = _scan_inputs(*inputs, None)
        batch, length, channels = u.shape
        state, dtype = A.shape[-1], u.dtype
        threads = _threads(batch * length * channels * state)
        groups = _owned_groups(threads, channels)
        du, ddelta = torch.empty(u.shape, dtype=dtype), torch.empty(u.shape, dtype=dtype)
        dz = None if z is None else torch.empty(u.shape, dtype=dtype)
        dB = torch.empty(groups, batch, length, state, dtype=dtype)  # partial sums over each group's channels
        dC = torch.empty_like(dB)
        dA, dD, dbias = torch.empty_like(A), u.new_empty(channels), u.new_empty(channels)
        dh0 = u.new_empty(batch, channels, state)
        args = make_args(ScanArgs, batch=batch, length=length, channels=channels, state=state, chunk=CHUNK,
                         groups=groups, threads=threads, softplus=int(ctx.softplus), u=u, delta=delta, z=z, B=B,
                         C=C, A=A, D=D, bias=bias, ckpt=ckpt, dout=_rowwise(dy, dtype), dhT=_dense(dfinal, dtype),
                         du=du, ddelta=ddelta, dz=dz, dA=dA, dD=dD, dbias=dbias, dh0=dh0, dB=dB, dC=dC)
        call("scan_backward", dtype, args)
        grads = (du, ddelta, dA, dB.sum(0), dC.sum(0), dD, dz, dbias, dh0)
        return (*_grads_as_inputs(grads, ctx.needs_input_grad, ctx.dtypes), None)


@eager_under_compile
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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `ops.scan.selective_scan_ref`, compiled; differentiable in every tensor input."""
    batch, length, channels = u.shape
    state = A.shape[-1]
    rows, per_channel = (batch, length, channels), (channels,)
    _require_shapes("selective_scan", delta=(delta, rows), z=(z, rows), A=(A, (channels, state)),
                    B=(B, (batch, length, state)), C=(C, (batch, length, state)), D=(D, per_channel),
                    delta_bias=(delta_bias, per_channel), initial_state=(initial_state, (batch, channels, state)))
    if u.shape[1] == 0:  # nothing to scan; the reference returns the right empty shapes
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                                  return_final_state)
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        y, final = _SelectiveScan.apply(*tensors, delta_softplus)
    else:
        cu, cdelta, cB, cC, cz, cA, cD, cbias, ch0 = _scan_inputs(*tensors)
        y, final, _ = _scan_forward(cu, cdelta, cA, cB, cC, cD, cz, cbias, ch0, delta_softplus, False)
        y = y.to(u.dtype)
    return (y, final) if return_final_state else y


@eager_under_compile
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
) -> torch.Tensor:
    """One decoding step: the scan kernel over one token, reading and writing `state` in place. No autograd."""
    rows, n = tuple(u.shape), A.shape[-1]
    _require_shapes("selective_state_update", state=(state, (*rows, n)), delta=(delta, rows), z=(z, rows),
                    A=(A, (rows[-1], n)), B=(B, (rows[0], n)), C=(C, (rows[0], n)), D=(D, rows[-1:]),
                    delta_bias=(delta_bias, rows[-1:]))
    dtype = state.dtype if state.dtype in (torch.float32, torch.float64) else torch.float32
    direct = state.dtype == dtype and state.is_contiguous()
    work = state if direct else state.to(dtype).contiguous()  # updated, then copied back into `state`
    cu, cdelta, cz, cB, cC = (_rowwise(t, dtype) for t in (u, delta, z, B, C))  # (batch, width): one-step rows
    cA, cD, cbias = (_dense(t, dtype) for t in (A, D, delta_bias))
    batch, channels = u.shape
    threads = _threads(batch * channels * A.shape[-1])
    out = torch.empty(batch, channels, dtype=dtype)
    args = make_args(ScanArgs, batch=batch, length=1, channels=channels, state=A.shape[-1], chunk=CHUNK,
                     groups=threads, threads=threads, softplus=int(delta_softplus), u=cu, delta=cdelta, z=cz, B=cB,
                     C=cC, out=out, A=cA, D=cD, bias=cbias, h0=work, hT=work)
    call("scan_forward", dtype, args)
    if not direct:
        state.copy_(work)
    return out if out.dtype == u.dtype else out.to(u.dtype)


# --------------------------------------------------------------------------------------------------------------
# Causal depthwise conv1d.


def _conv_args(x, weight, bias, window, silu: bool, groups: int, threads: int, **tensors) -> ConvArgs:
    batch, length, channels = x.shape
    return make_args(ConvArgs, batch=batch, length=length, channels=channels, kernel=weight.shape[-1], groups=groups,
                     threads=threads, silu=int(silu), x=x, weight=weight, bias=bias, window=window, **tensors)


def _conv_inputs(x, weight, bias, window) -> tuple:
    dtype = _compute_dtype(x)
    return _rowwise(x, dtype), _dense(weight, dtype), _dense(bias, dtype), _dense(window, dtype)


def _conv_forward(x, weight, bias, window, silu: bool) -> torch.Tensor:
    """Inputs already in the compute dtype; returns y (batch, length, channels)."""
    batch, length, channels = x.shape
    threads = _threads(batch * length * channels * weight.shape[-1])
    y = torch.empty(batch, length, channels, dtype=x.dtype)
    call("conv_forward", x.dtype, _conv_args(x, weight, bias, window, silu, threads, threads, y=y))
    return y


class _CausalConv1d(torch.autograd.Function):
    """Saves only the inputs; the backward recomputes the pre-activations."""

    @staticmethod
    def forward(ctx, x, weight, bias, window, silu):
        ctx.save_for_backward(x, weight, bias, window)  # as given; converted again in backward
        ctx.silu = silu
        ctx.dtypes = [None if t is None else t.dtype for t in (x, weight, bias, window)]
        return _conv_forward(*_conv_inputs(x, weight, bias, window), silu)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, window = _conv_inputs(*ctx.saved_tensors)
        batch, length, channels = x.shape
        threads = _threads(batch * length * channels * weight.shape[-1])
        dx = torch.empty(batch, length, channels, dtype=x.dtype)
        dweight, dbias = torch.empty_like(weight), x.new_empty(channels)
        dwindow = None if window is None else torch.empty_like(window)
        args = _conv_args(x, weight, bias, window, ctx.silu, _owned_groups(threads, channels), threads,
                          dy=_rowwise(dy, x.dtype), dx=dx, dweight=dweight, dbias=dbias, dwindow=dwindow)
        call("conv_backward", x.dtype, args)
        return (*_grads_as_inputs((dx, dweight, dbias, dwindow), ctx.needs_input_grad, ctx.dtypes), None)


@eager_under_compile
def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    window: torch.Tensor | None = None,
    silu: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `ops.conv.causal_conv1d_ref`: (y, new window), both differentiable."""
    batch, length, channels = x.shape
    kernel = weight.shape[-1]
    _require_shapes("causal_conv1d", weight=(weight, (channels, kernel)), bias=(bias, (channels,)),
                    window=(window, (batch, kernel - 1, channels)))
    out_dtype = torch.promote_types(x.dtype, weight.dtype)  # as the reference's x * weight
    tensors = (x, weight, bias, window)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        y = _CausalConv1d.apply(*tensors, silu)
    else:
        y = _conv_forward(*_conv_inputs(*tensors), silu)
    # The new window is the last K - 1 rows of [window, x]: a few rows, left to plain (differentiable) torch ops.
    before = x.new_zeros(batch, kernel - 1, channels) if window is None else window.to(x.dtype)
    tail = torch.cat([before, x[:, max(0, length - (kernel - 1)):]], dim=1)
    return y.to(out_dtype), tail[:, tail.shape[1] - (kernel - 1):]


# --------------------------------------------------------------------------------------------------------------
# Decode attention.


@eager_under_compile
def attend_to_all(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Same contract as `ops.attention.attend_to_all_sdpa`; reads each K/V row once for all the query heads sharing
    it, split into key blocks over threads. K/V in fp32 or fp64 (with q alike), or bf16 (q any float type, computed
    in fp32: a bf16 model's cache is read at half the bytes). Autograd and other dtypes go to the SDPA version."""
    if not _attend_supported(q, k, v):
        return attend_to_all_sdpa(q, k, v)
    return _attend(q, k, v, None, q.shape[0] * k.shape[2])


@eager_under_compile
def attend_to_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: list[int]) -> torch.Tensor:
    """Same contract as `ops.attend_to_rows_ref` in one call: batch row i sees keys starts[i]: only, each row's
    result bit for bit what `attend_to_all` gives it alone (its key blocks are counted from its own start)."""
    if len(starts) != q.shape[0] or not all(0 <= s < k.shape[2] for s in starts):
        raise ValueError(f"attend_to_rows: starts {starts} do not fit {q.shape[0]} rows of {k.shape[2]} keys")
    if not _attend_supported(q, k, v):
        return torch.cat([attend_to_all_sdpa(q[i:i + 1], k[i:i + 1, :, s:], v[i:i + 1, :, s:])
                          for i, s in enumerate(starts)])
    keys = k.shape[2] * len(starts) - sum(starts)
    return _attend(q, k, v, torch.tensor(starts, dtype=torch.int64), keys)


def _attend_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    bf16_cache = k.dtype == v.dtype == torch.bfloat16
    same_float = q.dtype == k.dtype == v.dtype and q.dtype in (torch.float32, torch.float64)
    return k.shape[2] > 0 and (bf16_cache or same_float) and not _needs_grad(q, k, v)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor | None, keys: int) -> torch.Tensor:
    """attend_to_all.cpp over k, v (B, kv_heads, S, hd); `keys`: the keys all rows see together (for threading)."""
    batch, heads, length, head_dim = q.shape
    kv_heads = k.shape[1]
    _require_shapes("attend_to_all", k=(k, (batch, kv_heads, k.shape[2], head_dim)), v=(v, k.shape))
    if heads % kv_heads:
        raise ValueError(f"attend_to_all: {heads} query heads cannot share {kv_heads} K/V heads")
    dtype = _compute_dtype(q)
    # (B, heads, T, hd) -> (B, kv_heads, group * T, hd): the query rows of each K/V head
    rows = q.to(dtype).reshape(batch, kv_heads, heads // kv_heads * length, head_dim)
    rows, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (rows, k, v))
    out = torch.empty(rows.shape, dtype=dtype)
    (qb, qh, qr, _), (kb, kh, kt, _), (vb, vh, vt, _) = rows.stride(), k.stride(), v.stride()
    args = make_args(AttendArgs, batch=batch, kv_heads=kv_heads, rows=rows.shape[2], length=k.shape[2],
                     head_dim=head_dim, block=ATTEND_BLOCK, threads=_threads(heads * length * keys * head_dim),
                     q_batch_stride=qb, q_head_stride=qh, q_row_stride=qr, k_batch_stride=kb, k_head_stride=kh,
                     k_token_stride=kt, v_batch_stride=vb, v_head_stride=vh, v_token_stride=vt,
                     q=rows, k=k, v=v, out=out, starts=starts)
    call("attend_to_all_bf16" if k.dtype == torch.bfloat16 else "attend_to_all", dtype, args)
    return out.reshape(batch, heads, length, head_dim).to(q.dtype)


# --------------------------------------------------------------------------------------------------------------
# Decoding: matrix-vector products and the Mamba step (references in ops/decode.py).

LINEAR_MIN_WEIGHTS = 1 << 14  # smaller matrices (a router, x_proj) stay with F.linear: its call costs less
LINEAR_SERIAL_BELOW = 1 << 18  # rows x weights below which one thread runs the product (waking another costs more)
QUANT_K_MULTIPLE = 32  # the quantized products take weights with a multiple of this many inputs (quant_linear.cpp)
_FLOATS = (torch.float32, torch.float64)


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def product_threads(work: int) -> int:
    """Threads for a product of `work` multiply-adds per weight pass (rows x weights, or one matrix's weights):
    one below LINEAR_SERIAL_BELOW, where waking another thread costs more than it saves; else all (torch's thread
    count now: a cache by `work` alone kept the count of the first call after `torch.set_num_threads`)."""
    return _product_threads(work, torch.get_num_threads())


@functools.cache
def _product_threads(work: int, threads: int) -> int:
    return 1 if work < LINEAR_SERIAL_BELOW else threads


product_threads.cache_clear = _product_threads.cache_clear  # after changing LINEAR_SERIAL_BELOW (tests)


def _plain_fn(name: str, dtype: torch.dtype):
    """A kernel taking plain arguments (linear, rms_norm) for fp32 or fp64."""
    return getattr(cpu_build.library(), f"{name}_{'f64' if dtype == torch.float64 else 'f32'}")


@eager_under_compile
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`; a product of up to DECODE_MAX_ROWS rows (a decode step's: one per sequence) in fp32/fp64 streams
    the weight once for all rows, over all threads, split by output rows (MKL's matrix-vector product reads it at
    about half the memory bandwidth, and its few-row products use a second thread poorly). Each row's result is
    summed in the same order whatever the other rows and the thread count (linear.cpp), so a sequence gets the
    same bits alone or in a batch. Called dozens of times per decoded token, so the checks are kept to cheap
    attribute reads (~3 us in all)."""
    dtype, w_shape = x.dtype, weight.shape
    if (dtype not in _FLOATS or weight.dtype != dtype or len(w_shape) != 2 or x.shape[-1] != w_shape[1]
            or w_shape[0] * w_shape[1] < LINEAR_MIN_WEIGHTS or not weight.is_contiguous()
            or (bias is not None and (bias.dtype != dtype or bias.shape != w_shape[:1] or not bias.is_contiguous()))
            or _needs_grad(x, weight, bias)):
        return F.linear(x, weight, bias)
    out_features, in_features = w_shape
    rows = x.numel() // in_features
    if rows > DECODE_MAX_ROWS or rows == 0:
        return F.linear(x, weight, bias)
    y = x.new_empty(*x.shape[:-1], out_features)
    x_stride = in_features
    if not x.is_contiguous():  # rows at a uniform stride (a column slice, the last token's rows) are read in place
        x = x.reshape(rows, in_features)
        x = x if x.stride(1) == 1 else x.contiguous()
        x_stride = x.stride(0)
    threads = product_threads(rows * out_features * in_features)
    _plain_fn("linear", dtype)(x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(), None,
                               y.data_ptr(), rows, in_features, out_features, x_stride, out_features, 0, threads)
    return y


@eager_under_compile
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Same contract as `ops.decode.rms_norm`; a few rows (a decode step's) in one kernel call."""
    dtype, width = x.dtype, x.shape[-1]
    if (dtype not in _FLOATS or weight.dtype != dtype or weight.shape != (width,) or not x.is_contiguous()
            or not weight.is_contiguous() or x.numel() > DECODE_MAX_ROWS * width or _needs_grad(x, weight)):
        return rms_norm_ref(x, weight, eps)
    y = torch.empty_like(x)
    _plain_fn("rms_norm", dtype)(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // width, width, eps)
    return y


@eager_under_compile
def expert_linear(x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Same contract as `ops.decode.expert_linear_ref`: row r of x times matrix index[r] of weights, which the
    kernel reads where it lies (no gathered copy, no host synchronisation: the index is read by the kernel)."""
    rows, in_features = x.shape
    if (not 0 < rows <= DECODE_MAX_ROWS or x.dtype not in _FLOATS or weights.dtype != x.dtype or weights.dim() != 3
            or weights.shape[2] != in_features or not weights.is_contiguous() or index.shape != (rows,)
            or _needs_grad(x, weights)):
        return expert_linear_ref(x, weights, index)
    out_features = weights.shape[1]
    x = x if x.stride(-1) == 1 else x.contiguous()
    index = index.to(torch.int64).contiguous()
    if index.min() < 0 or index.max() >= weights.shape[0]:  # CPU tensors: no device to wait for
        raise IndexError(f"expert_linear: index {index.tolist()} out of range for {weights.shape[0]} matrices")
    y = torch.empty(rows, out_features, dtype=x.dtype)
    threads = product_threads(weights[0].numel())
    _plain_fn("linear", x.dtype)(x.data_ptr(), weights.data_ptr(), None, index.data_ptr(), y.data_ptr(), rows,
                                 in_features, out_features, x.stride(0), out_features, weights.stride(0), threads)
    return y


@eager_under_compile
def mamba_step(
    xz: torch.Tensor,
    window: torch.Tensor,
    ssm: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    x_proj_weight,
    norm_weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    eps: float,
    dt_proj_weight,
    dt_bias: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
) -> torch.Tensor:
    """Same contract as `ops.decode.mamba_step_ref`, in one call of mamba_step.cpp when every tensor has the SSM
    state's dtype (fp32 or fp64) and is contiguous (xz: its rows); otherwise the reference. x_proj_weight and
    dt_proj_weight may be quantized weights (fp32 only): their products are then quant_linear.cpp's, run inside
    the call, and give what the weights' own `linear` gives."""
    params = (conv_weight, conv_bias, x_proj_weight, norm_weights, eps, dt_proj_weight, dt_bias, A, D)
    fields = _mamba_step_fields(xz.shape[1] // 2, ssm.dtype, *params)
    if (fields is None or xz.dtype != ssm.dtype or xz.stride(-1) != 1 or _needs_grad(xz)
            or not _plain_rows(ssm.dtype, window, ssm) or xz.shape[1] % 2
            or not _mamba_state_fits(xz.shape[0], fields, window, ssm)):
        return mamba_step_ref(xz, window, ssm, *params)
    batch, inner, rank, state = xz.shape[0], xz.shape[1] // 2, fields[3], fields[4]
    y = torch.empty(batch, inner, dtype=ssm.dtype)
    scratch = torch.empty(batch, rank + 2 * state + 3 * inner, dtype=ssm.dtype)
    fields[0], fields[5], fields[6] = batch, _threads(batch * inner * (rank + 3 * state)), xz.stride(0)
    fields[8], fields[19], fields[20], fields[21], fields[22] = (t.data_ptr() for t in (xz, window, ssm, y, scratch))
    call("mamba_step", ssm.dtype, MambaStepArgs(*fields))
    return y


def _mamba_step_fields(inner, dtype, conv_weight, conv_bias, x_proj_weight, norm_weights, eps, dt_proj_weight,
                       dt_bias, A, D) -> list | None:
    """mamba_step.cpp's MambaStepArgs for the step's parameters (`mamba_step`'s arguments after the state) in field
    order (pointers straight from the tensors: a third of make_args' cost), the per-call fields (batch, threads,
    xz_stride, xz, window, h, y, scratch: 0, 5, 6, 8, 19-22) left for the caller; None where the kernel cannot run
    them (the reference serves)."""
    x_fields, dt_fields = _step_projection(x_proj_weight, dtype), _step_projection(dt_proj_weight, dtype)
    params = (conv_weight, conv_bias, *norm_weights, dt_bias, A, D)
    if (dtype not in _FLOATS or x_fields is None or dt_fields is None
            or any(t is not None and (t.dtype != dtype or not t.is_contiguous()) for t in params)
            or _needs_grad(*params)):
        return None
    rank, state = _in_features(dt_proj_weight), A.shape[-1]
    if not _mamba_shapes_fit(inner, rank, state, conv_weight, conv_bias, x_proj_weight, norm_weights,
                             dt_proj_weight, dt_bias, A, D):
        return None
    return [0, inner, conv_weight.shape[1], rank, state, 0, 0, eps,
            None, *(None if t is None else t.data_ptr() for t in (conv_weight, conv_bias)), x_fields[0],
            *(t.data_ptr() for t in norm_weights), dt_fields[0],
            *(None if t is None else t.data_ptr() for t in (dt_bias, A, D)), None, None, None, None,
            *x_fields[1:4], *dt_fields[1:4], *x_fields[4:], *dt_fields[4:]]


def _mamba_shapes_fit(inner, rank, state, conv_weight, conv_bias, x_proj_weight, norm_weights, dt_proj_weight,
                      dt_bias, A, D) -> bool:
    """Whether the step's parameters have the shapes mamba_step.cpp reads them in, for `inner` channels: it trusts
    every extent, so a mismatch must go to the reference (which raises) rather than read or write out of bounds."""
    vectors = ((conv_bias, inner), (dt_bias, inner), (D, inner), *zip(norm_weights, (rank, state, state)))
    return (conv_weight.dim() == 2 and conv_weight.shape[0] == inner and tuple(A.shape) == (inner, state)
            and _shape(x_proj_weight) == (rank + 2 * state, inner) and _shape(dt_proj_weight) == (inner, rank)
            and all(t is None or tuple(t.shape) == (n,) for t, n in vectors))


def _mamba_state_fits(rows: int, fields: list, window: torch.Tensor, ssm: torch.Tensor) -> bool:
    """Whether a step's conv window and SSM state are (rows, kernel - 1, inner) and (rows, inner, state) for the
    `_mamba_step_fields` they go with."""
    inner, kernel, state = fields[1], fields[2], fields[4]
    return tuple(window.shape) == (rows, kernel - 1, inner) and tuple(ssm.shape) == (rows, inner, state)


def _in_features(weight) -> int:
    return weight.shape[1] if isinstance(weight, torch.Tensor) else weight.in_features


def _step_projection(weight, dtype: torch.dtype) -> tuple | None:
    """mamba_step.cpp's fields for x_proj or dt_proj: (weight, bits, group, threads, scales, zeros), pointers and
    counts; bits 0 for a plain matrix of the step's dtype. None where the kernel cannot read it (the reference
    serves then)."""
    if isinstance(weight, torch.Tensor):
        ok = weight.dtype == dtype and weight.is_contiguous() and weight.dim() == 2 and not _needs_grad(weight)
        return (weight.data_ptr(), 0, 0, 0, None, None) if ok else None
    operands = _quantized_operands(weight) if dtype == torch.float32 else None
    return None if operands is None else (operands[3], *operands[:3], *operands[4:])


def _quantized_operands(weight) -> tuple | None:
    """A quantized weight (openjamba.quant.QuantizedWeight, one matrix) as the kernels take it, in its documented
    layout: (bits, group, threads, q, scales, zeros) pointers and counts; None where they cannot read it."""
    bits, group, q, scales, zeros = weight.kernel_operands()
    if (q.dim() != 2 or not q.is_cpu or weight.in_features % QUANT_K_MULTIPLE
            or scales.dtype != (torch.float32 if bits == 8 else torch.bfloat16)
            or not (q.is_contiguous() and scales.is_contiguous())
            or (zeros is not None and (zeros.dtype != torch.bfloat16 or not zeros.is_contiguous()))):
        return None
    threads = product_threads(weight.out_features * weight.in_features)
    return bits, group, threads, q.data_ptr(), scales.data_ptr(), None if zeros is None else zeros.data_ptr()


def _weight(weight) -> Weight | None:
    """One projection as layer_step.cpp's `Weight`: an fp32 matrix the op-by-op path gives to linear.cpp (as
    `linear` does: not smaller matrices, which F.linear computes), or a quantized weight the kernels read; None
    otherwise (the layer then runs op by op)."""
    if not isinstance(weight, torch.Tensor):
        operands = _quantized_operands(weight)
        return None if operands is None else Weight(*operands)
    if (not _plain_rows(torch.float32, weight) or weight.dim() != 2 or weight.numel() < LINEAR_MIN_WEIGHTS):
        return None
    return Weight(0, 0, product_threads(weight.numel()), weight.data_ptr(), None, None)


def _shape(weight) -> tuple[int, int]:
    """(out, in) of a weight matrix or a quantized one."""
    return tuple(weight.shape) if isinstance(weight, torch.Tensor) else (weight.out_features, weight.in_features)


def _quantized_mlp_args(hidden: int, gate, up, down) -> MlpStepArgs | None:
    """quant_step.cpp's arguments for an MLP's quantized weights, its rows' fields left for the caller; None where
    the kernel cannot take them."""
    weights = [_weight(w) for w in (gate, up, down)]
    inner = gate.out_features
    if (None in weights or _shape(gate) != (inner, hidden) or _shape(up) != (inner, hidden)
            or _shape(down) != (hidden, inner)):
        return None
    return MlpStepArgs(0, hidden, inner, hidden, *weights)


def _quantized_mlp_step(x: torch.Tensor, gate, up, down, residual: torch.Tensor) -> torch.Tensor:
    """mlp_step with quantized weights: one call of quant_step.cpp (its products quant_linear.cpp's)."""
    rows, hidden = x.shape if x.dim() == 2 else (0, 0)
    args = _quantized_mlp_args(hidden, gate, up, down) if x.dtype == torch.float32 else None
    if (args is None or not 0 < rows <= DECODE_MAX_ROWS or x.stride(-1) != 1 or residual.dtype != torch.float32
            or residual.shape != x.shape or not residual.is_contiguous() or _needs_grad(x, residual)):
        return mlp_step_ref(x, gate, up, down, residual)
    out = torch.empty_like(residual)
    scratch = torch.empty(rows, 2 * args.inner)
    args.rows, args.x_stride, args.x, args.residual = rows, x.stride(0), x.data_ptr(), residual.data_ptr()
    args.out, args.scratch = out.data_ptr(), scratch.data_ptr()
    cpu_build.library().quant_mlp_step(ctypes.byref(args))
    return out


def _ffn_args(hidden: int, dtype: torch.dtype, router: torch.Tensor | None, gate: torch.Tensor, up: torch.Tensor | None,
              down: torch.Tensor, top_k: int = 1) -> FfnStepArgs | None:
    """ffn_step.cpp's arguments for an FFN's plain weights, its rows' fields left for the caller: an MLP (router
    None; gate, up (I, H), down (H, I)) or a MoE (router (E, H), gate the fused gate_up (E, 2I, H), up None, down
    (E, H, I)); None where the kernel cannot take them (the reference serves)."""
    if router is None:
        if (not _plain_rows(dtype, gate, up, down) or gate.dim() != 2 or gate.shape != up.shape
                or gate.shape[1] != hidden or down.shape != gate.shape[::-1]):
            return None
        experts, top_k, strides = 1, 1, (0, 0)
    else:
        experts = router.shape[0]
        if (not _plain_rows(dtype, router, gate, down) or router.shape != (experts, hidden) or gate.dim() != 3
                or gate.shape[0] != experts or gate.shape[2] != hidden
                or down.shape != (experts, hidden, gate.shape[1] // 2) or not 0 < top_k <= experts):
            return None
        up, strides = gate[:, down.shape[2]:], (gate.stride(0), down.stride(0))
    inner = down.shape[-1]
    threads = product_threads(top_k * 3 * inner * hidden)
    return FfnStepArgs(0, hidden, inner, experts, top_k, threads, hidden, *strides, None, None,
                       *(None if t is None else t.data_ptr() for t in (router, gate, up, down)))


def _ffn_step(args: FfnStepArgs | None, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor | None:
    """One call of ffn_step.cpp with `_ffn_args`' arguments on a decode step's rows; None where it cannot take
    them."""
    if (args is None or x.dim() != 2 or not 0 < x.shape[0] <= DECODE_MAX_ROWS or residual.shape != x.shape
            or not _plain_rows(x.dtype, x, residual)):
        return None
    out = torch.empty_like(residual)
    args.rows, args.x, args.residual, args.out = x.shape[0], x.data_ptr(), residual.data_ptr(), out.data_ptr()
    call("ffn_step", x.dtype, args)
    return out


@eager_under_compile
def mlp_step(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, residual: torch.Tensor):
    """Same contract as `ops.decode.mlp_step_ref`, in one call of ffn_step.cpp (one expert, no router), or of
    quant_step.cpp for quantized weights (openjamba.quant.QuantizedWeight)."""
    if not isinstance(gate, torch.Tensor):
        return _quantized_mlp_step(x, gate, up, down, residual)
    out = _ffn_step(_ffn_args(x.shape[-1], x.dtype, None, gate, up, down), x, residual)
    return mlp_step_ref(x, gate, up, down, residual) if out is None else out


@eager_under_compile
def moe_step(x: torch.Tensor, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, top_k: int,
             residual: torch.Tensor):
    """Same contract as `ops.decode.moe_step_ref`, in one call of ffn_step.cpp: routing, the chosen experts (each
    expert's weights read once for all the rows that chose it) and the weighted sum; no host synchronisation."""
    out = _ffn_step(_ffn_args(x.shape[-1], x.dtype, router, gate_up, None, down, top_k), x, residual)
    return moe_step_ref(x, router, gate_up, down, top_k, residual) if out is None else out


def _plain_rows(dtype: torch.dtype, *tensors: torch.Tensor) -> bool:
    """All of one float kernel dtype, contiguous, and not needing autograd."""
    return (dtype in _FLOATS and all(t.dtype == dtype and t.is_contiguous() for t in tensors)
            and not _needs_grad(*tensors))


@eager_under_compile
def argmax(x: torch.Tensor) -> torch.Tensor:
    """`x.argmax(-1)` for fp32 rows (B, V) in one call (argmax.cpp: the same indices, NaN and ties included); other
    inputs through torch."""
    if (x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] == 0 or x.stride(1) != 1 or x.requires_grad):
        return x.argmax(-1)
    out = torch.empty(x.shape[0], dtype=torch.int64)
    cpu_build.library().argmax_rows_f32(x.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], x.stride(0))
    return out


@eager_under_compile
def add_rms_norm(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, eps: float):
    """Same contract as `ops.decode.add_rms_norm_ref`, in one call for a decode step's rows."""
    width = x.shape[-1]
    if (not _plain_rows(x.dtype, x, h, weight) or h.shape != x.shape or weight.shape != (width,)
            or x.numel() > DECODE_MAX_ROWS * width):
        return add_rms_norm_ref(x, h, weight, eps)
    s, y = torch.empty_like(x), torch.empty_like(x)
    _plain_fn("add_rms_norm", x.dtype)(x.data_ptr(), h.data_ptr(), weight.data_ptr(), s.data_ptr(), y.data_ptr(),
                                       x.numel() // width, width, eps)
    return s, y


# The whole-layer decode steps (cpu_layer_step.py), built on the kernels above.
from .cpu_layer_step import layer_steps, prepare_attention_layer_step, prepare_mamba_layer_step  # noqa: E402, F401
