"""A whole decoder layer's one-token step as one call of layer_step.cpp, bound once to the layer's weights:
`ops.prepare_mamba_layer_step` and `ops.prepare_attention_layer_step` for the CPU backend (ops/cpu_kernels.py,
which exposes them and whose kernels and checks these reuse).

Binding reads and checks every weight once and builds the kernel's argument structure, so that a step fills in only
its rows and its state: decoding spent about as long in the Python gathering these arguments per layer and token as
in the calls' small ops. Each part of the layer is the kernel its op-by-op call runs, so a step gives the same bits.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from collections.abc import Callable

import torch

from . import cpu_build
from . import cpu_kernels as kernels
from .cpu_build import AttendArgs, AttentionLayerArgs, FfnArgs, FfnStepArgs, MambaLayerArgs, MambaStepArgs, MlpStepArgs
from .decode import DECODE_MAX_ROWS


def _ffn_binding(hidden: int, ffn: tuple) -> tuple[FfnArgs, int] | None:
    """layer_step.cpp's FfnArgs for ("mlp", gate, up, down) (fp32 or quantized weights) or ("moe", router, gate_up,
    down, top_k) (fp32), as `mlp_step` and `moe_step` take them, and the scratch it needs per row; None where those
    kernels cannot take them."""
    kind, *weights = ffn
    if kind == "mlp" and not isinstance(weights[0], torch.Tensor):
        mlp = kernels._quantized_mlp_args(hidden, *weights)
        return None if mlp is None else (FfnArgs(1, FfnStepArgs(), mlp), 2 * mlp.inner)
    if kind == "mlp":
        args = kernels._ffn_args(hidden, torch.float32, None, *weights)
    else:
        args = kernels._ffn_args(hidden, torch.float32, weights[0], weights[1], None, *weights[2:])
    return None if args is None else (FfnArgs(0, args, MlpStepArgs()), 0)


def _plain_projections(names: tuple[str, ...], weights: tuple) -> tuple[tuple[str, int], ...]:
    """(field, weights) of each fp32 projection, whose thread count `_set_threads` sets per call."""
    return tuple((name, w.numel()) for name, w in zip(names, weights) if isinstance(w, torch.Tensor))


def _set_threads(args, projections: tuple[tuple[str, int], ...], rows: int) -> None:
    """Each fp32 projection's threads for this call's rows, as `ops.linear` picks them (rows x weights): binding
    cannot know the rows, and a 256 x 512 matrix is one thread's work for one row but not for a batch of 16."""
    for name, weights in projections:
        getattr(args, name).threads = kernels.product_threads(rows * weights)


def _keep(step: Callable, tensors: tuple, weights: tuple) -> None:
    """Keep in `step` what its pointers point into: `tensors` and the quantized weights' buffers (`step.tensors`),
    and their storages, which stay valid even when a tensor is given another storage (`tensor.data = other`)."""
    step.tensors = (*tensors, *(t for w in weights if not isinstance(w, (torch.Tensor, int))
                                for t in w.kernel_operands()[2:] if t is not None))
    step.storages = tuple(t.untyped_storage() for t in step.tensors)


def prepare_mamba_layer_step(in_norm: tuple, in_proj, params: tuple, out_proj, ff_norm: tuple,
                             ffn: tuple) -> Callable | None:
    """`ops.prepare_mamba_layer_step` (`ops.decode.mamba_layer_step_ref`): the projections fp32 matrices (as `linear`
    takes them) or quantized weights, the FFN as `_ffn_binding` takes it, the Mamba step's parameters what
    `mamba_step` takes in fp32. None where the kernel cannot read these weights; the step returns None for rows
    (fp32 (rows, H), contiguous) or a state it cannot take, and under autograd."""
    A, hidden = params[7], in_norm[0].shape[0]
    inner = A.shape[0]
    fields = kernels._mamba_step_fields(inner, torch.float32, *params)
    projections = (kernels._weight(in_proj), kernels._weight(out_proj))
    ffn_binding = _ffn_binding(hidden, ffn)
    if (fields is None or None in projections or ffn_binding is None
            or kernels._shape(in_proj) != (2 * inner, hidden) or kernels._shape(out_proj) != (hidden, inner)
            or not _norms_fit(hidden, in_norm, ff_norm)):
        return None
    rank, state = fields[3], fields[4]
    step_work = inner * (rank + 3 * state)
    per_row = 4 * hidden + 6 * inner + rank + 2 * state + ffn_binding[1]
    bound = MambaLayerArgs(0, hidden, inner, in_norm[1], ff_norm[1], *projections, None, in_norm[0].data_ptr(),
                           ff_norm[0].data_ptr(), None, None, MambaStepArgs(*fields), ffn_binding[0])
    weights = (in_proj, out_proj, *ffn[1:])
    projections = _plain_projections(("in_proj", "out_proj"), (in_proj, out_proj))
    # The parameters also for the autograd check.
    parameters = (in_norm[0], ff_norm[0], *(t for t in params if isinstance(t, torch.Tensor)), *params[3],
                  *(w for w in weights if isinstance(w, torch.Tensor)))
    run = cpu_build.library().mamba_layer_step

    def arguments(x: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor, window: torch.Tensor,
                  ssm: torch.Tensor) -> tuple | None:
        """This call's MambaLayerArgs (and nothing more to keep alive), or None where the kernel cannot take it."""
        rows = x.shape[0]
        if (not _rows_fit(x, hidden) or scratch.numel() < rows * per_row
                or not kernels._plain_rows(torch.float32, window, ssm)
                or not kernels._mamba_state_fits(rows, fields, window, ssm)
                or (torch.is_grad_enabled() and kernels._needs_grad(x, *parameters))):
            return None
        args = MambaLayerArgs.from_buffer_copy(bound)  # this call's own copy: steps may run in threads
        args.rows, args.x, args.out, args.scratch = rows, x.data_ptr(), out.data_ptr(), scratch.data_ptr()
        _set_threads(args, projections, rows)
        mamba = args.mamba  # a view into args
        mamba.threads, mamba.window, mamba.h = kernels._threads(rows * step_work), window.data_ptr(), ssm.data_ptr()
        return args, None

    @kernels.eager_under_compile
    def step(x: torch.Tensor, window: torch.Tensor, ssm: torch.Tensor) -> torch.Tensor | None:
        if not _rows_fit(x, hidden):
            return None
        out = torch.empty_like(x)
        made = arguments(x, out, _scratch(x.shape[0] * per_row), window, ssm)
        if made is None:
            return None
        run(ctypes.byref(made[0]))
        return out

    step.kind, step.per_row, step.arguments = 0, per_row, arguments
    _keep(step, parameters, (*weights, params[2], params[5]))
    return step


def prepare_attention_layer_step(in_norm: tuple, projections: tuple, heads: int, kv_heads: int, ff_norm: tuple,
                                 ffn: tuple) -> Callable | None:
    """`ops.prepare_attention_layer_step`: projections (q, k, v, o) fp32 matrices (as `linear` takes them) or
    quantized weights, the FFN as `_ffn_binding` takes it. None where the kernel cannot read these weights; the
    step returns None for rows, a cache (fp32, contiguous) or key starts it cannot take, and under autograd."""
    hidden = in_norm[0].shape[0]
    head_dim = kernels._shape(projections[0])[0] // heads
    weights = tuple(kernels._weight(w) for w in projections)
    ffn_binding = _ffn_binding(hidden, ffn)
    shapes = [(heads * head_dim, hidden), (kv_heads * head_dim, hidden), (kv_heads * head_dim, hidden),
              (hidden, heads * head_dim)]
    if (None in weights or ffn_binding is None or heads % kv_heads
            or [kernels._shape(w) for w in projections] != shapes or not _norms_fit(hidden, in_norm, ff_norm)):
        return None
    per_row = 4 * hidden + 2 * heads * head_dim + 2 * kv_heads * head_dim + ffn_binding[1]
    bound = AttentionLayerArgs(0, hidden, heads, kv_heads, head_dim, 0, in_norm[1], ff_norm[1], *weights, None,
                               in_norm[0].data_ptr(), ff_norm[0].data_ptr(), None, None,
                               AttendArgs(block=kernels.ATTEND_BLOCK), ffn_binding[0])
    parameters = (in_norm[0], ff_norm[0], *(w for w in (*projections, *ffn[1:]) if isinstance(w, torch.Tensor)))
    plain = _plain_projections(("q_proj", "k_proj", "v_proj", "o_proj"), projections)
    run = cpu_build.library().attention_layer_step

    def arguments(x: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor, kv, position: int,
                  starts: list[int] | None) -> tuple | None:
        """This call's AttentionLayerArgs and the row starts it points into, or None where the kernel cannot take
        them (the cache made room for column `position` first)."""
        rows = x.shape[0]
        kv.reserve(position + 1)
        k_cache, v_cache = kv.k, kv.v
        if (not _rows_fit(x, hidden) or scratch.numel() < rows * per_row
                or not kernels._plain_rows(torch.float32, k_cache, v_cache)
                or k_cache.shape != v_cache.shape or k_cache.shape[0] != rows or k_cache.shape[1] != kv_heads
                or k_cache.shape[3] != head_dim or not 0 <= position < k_cache.shape[2]
                or (starts is not None and (len(starts) != rows or not all(0 <= s <= position for s in starts)))
                or (torch.is_grad_enabled() and kernels._needs_grad(x, *parameters))):
            return None
        first = None if starts is None else torch.tensor(starts, dtype=torch.int64)
        keys = rows * (position + 1) - (0 if starts is None else sum(starts))
        args = AttentionLayerArgs.from_buffer_copy(bound)
        args.rows, args.position, args.x, args.out = rows, position, x.data_ptr(), out.data_ptr()
        args.scratch = scratch.data_ptr()
        _set_threads(args, plain, rows)
        attend = args.attend  # a view into args
        attend.threads = kernels._threads(heads * keys * head_dim)
        attend.k_batch_stride, attend.k_head_stride, attend.k_token_stride = k_cache.stride()[:3]
        attend.v_batch_stride, attend.v_head_stride, attend.v_token_stride = v_cache.stride()[:3]
        attend.k, attend.v = k_cache.data_ptr(), v_cache.data_ptr()
        attend.starts = None if first is None else first.data_ptr()
        return args, first

    @kernels.eager_under_compile
    def step(x: torch.Tensor, kv, position: int, starts: list[int] | None) -> torch.Tensor | None:
        """x (rows, H); kv: the layer's cache.KVCache, this step's keys written at column `position`; starts: each
        row's first key (None: column 0)."""
        if not _rows_fit(x, hidden):
            return None
        out = torch.empty_like(x)
        made = arguments(x, out, _scratch(x.shape[0] * per_row), kv, position, starts)
        if made is None:
            return None
        run(ctypes.byref(made[0]))
        return out

    step.kind, step.per_row, step.arguments = 1, per_row, arguments
    _keep(step, parameters, (*projections, *ffn[1:]))
    return step


@kernels.eager_under_compile
def layer_steps(steps: list, x: torch.Tensor, states: list[tuple]) -> torch.Tensor | None:
    """`ops.layer_steps`: the prepared steps (this module's) run in order on x (rows, H), step i with the state
    `states[i]` its own call takes, as one call of layer_step.cpp's `layer_steps`; the last one's output. None, with
    nothing run, where a step cannot take its rows or state (an attention cache may have made room for a column)."""
    scratch = _scratch(x.shape[0] * max(step.per_row for step in steps))
    outs = (torch.empty_like(x), torch.empty_like(x))  # each layer's out is the next one's x: two, in turn
    made = []
    for i, (step, state) in enumerate(zip(steps, states)):
        out = outs[i % 2]
        args = step.arguments(x, out, scratch, *state)
        if args is None:
            return None
        made.append(args)
        x = out
    count = len(made)
    kinds = (ctypes.c_int64 * count)(*(step.kind for step in steps))
    pointers = (ctypes.c_void_p * count)(*(ctypes.addressof(args) for args, _ in made))
    _layer_steps()(kinds, pointers, count)
    return x


@functools.cache
def _layer_steps():
    run = cpu_build.library().layer_steps
    run.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_void_p), ctypes.c_int64]
    run.restype = None
    return run


_thread = threading.local()


def _scratch(size: int) -> torch.Tensor:
    """At least `size` floats of scratch for this thread's next layer step, kept between calls and shared by every
    layer: one fresh for each call (230 KB for a row of a 3B layer) is mapped and page-faulted in anew each time."""
    scratch = getattr(_thread, "scratch", None)
    if scratch is None or scratch.numel() < size:
        scratch = _thread.scratch = torch.empty(size)
    return scratch


def _norms_fit(hidden: int, *norms: tuple) -> bool:
    return all(n[0].shape == (hidden,) for n in norms) and kernels._plain_rows(torch.float32, *(n[0] for n in norms))


def _rows_fit(x: torch.Tensor, hidden: int) -> bool:
    return (x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] == hidden and 0 < x.shape[0] <= DECODE_MAX_ROWS
            and x.is_contiguous())
