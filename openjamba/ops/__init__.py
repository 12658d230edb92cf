"""The model's kernels (the Mamba mixer's selective scan, state update and causal conv; attention over a cache),
each a plain PyTorch reference plus faster implementations.

The model calls the three dispatchers below; they pick a backend for the tensors' device:
  "torch"   plain PyTorch (ops/scan.py, ops/conv.py): runs everywhere, the fallback
  "cpu"     compiled CPU kernels (ops/cpu_kernels.py), when they build on this machine
  "triton"  Triton GPU kernels (ops/triton_kernels.py), on CUDA devices
Set OPENJAMBA_KERNEL=torch|cpu|triton to force one (an error if it cannot run); by default the fast backend of
the device is used when available, with a one-line notice when falling back to plain PyTorch.

A backend module exposes `is_available() -> tuple[bool, str]` (the str says why not) and any of
`selective_scan`, `selective_state_update`, `causal_conv1d`, `attend_to_all`, `linear`, `expert_linear`,
`mamba_step`, `rms_norm`, `add_rms_norm`, `mlp_step`, `moe_step`, `prepare_mamba_layer_step`, `argmax`,
`prepare_attention_layer_step`, `layer_steps` with the signatures below; an op it lacks falls back to the plain
PyTorch one (the `prepare_*` and `layer_steps` have none: without them, or when they or their step return None, the
model runs the layer's ops one by one).
The last nine serve the one-token decode step (ops/decode.py has their references; the attention layer's is the
model's own op-by-op path): every projection of the
model goes through `linear` (model.Linear), which on CPU streams a few-row product's weight
over all threads.
Attention over a long cache is in ops/attention.py: `chunk_attention` for a chunk continuing a cached sequence
(no (chunk, context) mask on CPU), `attend_to_all_sdpa` for a decode step.
The conv's decoding step `causal_conv1d_update` is plain PyTorch on every device (ops/conv.py).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F

from .attention import attend_to_all_sdpa, chunk_attention, to_dtype_of
from .conv import causal_conv1d_ref, causal_conv1d_update
from .decode import DECODE_MAX_ROWS, add_rms_norm_ref, expert_linear_ref, mamba_step_ref, mlp_step_ref, moe_step_ref
from .decode import rms_norm as rms_norm_ref
from .scan import selective_scan_chunked, selective_scan_ref, selective_state_update_ref

__all__ = [
    "add_rms_norm",
    "argmax",
    "attend_to_all",
    "attend_to_all_sdpa",
    "attend_to_rows",
    "attend_to_rows_ref",
    "backend_for",
    "causal_conv1d",
    "causal_conv1d_ref",
    "causal_conv1d_update",
    "chunk_attention",
    "expert_linear",
    "expert_linear_ref",
    "fused_step_rows",
    "layer_steps",
    "linear",
    "mamba_step",
    "prepare_attention_layer_step",
    "prepare_mamba_layer_step",
    "mamba_step_ref",
    "mlp_step",
    "moe_step",
    "rms_norm",
    "rms_norm_ref",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_ref",
    "selective_state_update",
    "selective_state_update_ref",
    "to_dtype_of",
]

BACKEND_MODULES = {"cpu": "openjamba.ops.cpu_kernels", "triton": "openjamba.ops.triton_kernels"}
PREFERRED = {"cpu": "cpu", "cuda": "triton"}
_chosen: dict[str, ModuleType | None] = {}


def _load(name: str) -> tuple[ModuleType | None, str]:
    try:
        module = importlib.import_module(BACKEND_MODULES[name])
    except ImportError as err:
        return None, f"cannot import {BACKEND_MODULES[name]}: {err}"
    ok, why = module.is_available()
    return (module, "") if ok else (None, why)


def backend_for(device: torch.device) -> ModuleType | None:
    """The fast backend module for a device, or None for plain PyTorch. Decided once per device type."""
    kind = device.type
    if kind in _chosen:
        return _chosen[kind]
    forced = os.environ.get("OPENJAMBA_KERNEL", "").strip().lower()
    if forced and forced not in ("torch", *BACKEND_MODULES):
        raise ValueError(f"OPENJAMBA_KERNEL={forced!r}: choose torch, {', '.join(BACKEND_MODULES)}")
    wanted = forced or PREFERRED.get(kind)
    module = None
    if wanted and wanted != "torch":
        module, why = _load(wanted)
        if module is None and forced:
            raise RuntimeError(f"OPENJAMBA_KERNEL={forced} cannot run here: {why}")
        if module is None:
            print(f"openjamba: {wanted} kernels unavailable ({why}); using plain PyTorch ops", file=sys.stderr)
    _chosen[kind] = module
    return module


def _op(device: torch.device, name: str):
    module = backend_for(device)
    return getattr(module, name, None) if module is not None else None


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
    """Full-sequence selective scan; see `ops.scan` for the contract. Labelled for the profiler (`openjamba bench`)."""
    fn = _op(u.device, "selective_scan") or selective_scan_chunked
    with torch.profiler.record_function("openjamba::selective_scan"):
        return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_final_state)


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
    """One decoding step, updating `state` in place."""
    fn = _op(u.device, "selective_state_update") or selective_state_update_ref
    return fn(state, u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    window: torch.Tensor | None = None,
    silu: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv with a carried-in window; see `ops.conv`."""
    fn = _op(x.device, "causal_conv1d") or causal_conv1d_ref
    return fn(x, weight, bias, window, silu)


def attend_to_all(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked GQA attention, q (B, heads, T, hd) over k, v (B, kv_heads, S, hd): a decode step over the cache."""
    fn = _op(q.device, "attend_to_all") or attend_to_all_sdpa
    return fn(q, k, v)


def attend_to_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: list[int]) -> torch.Tensor:
    """A decode step over rows of their own lengths: row i's query (heads, 1, hd) sees keys starts[i]: only, so a
    short row never pays for the columns of a long one, and gets exactly what it gets decoding alone."""
    fn = _op(q.device, "attend_to_rows") or attend_to_rows_ref
    return fn(q, k, v, starts)


def attend_to_rows_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: list[int]) -> torch.Tensor:
    """`attend_to_all` one row at a time over its own keys: the reference of `attend_to_rows`."""
    return torch.cat([attend_to_all(q[i:i + 1], k[i:i + 1, :, s:], v[i:i + 1, :, s:]) for i, s in enumerate(starts)])


def argmax(x: torch.Tensor) -> torch.Tensor:
    """`x.argmax(-1)` of rows (B, V) (a greedy step's tokens from its logits), with the device's fast path."""
    fn = _op(x.device, "argmax")
    return fn(x) if fn is not None else x.argmax(-1)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, with the device's fast path for a few rows (decoding)."""
    fn = _op(x.device, "linear") or F.linear
    return fn(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The model's RMSNorm over the last dim (`ops.decode.rms_norm`), with the device's fast path for a few rows."""
    fn = _op(x.device, "rms_norm") or rms_norm_ref
    return fn(x, weight, eps)


def expert_linear(x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Row r of x (rows, in) through matrix index[r] of weights (E, out, in): (rows, out); see `ops.decode`."""
    fn = _op(x.device, "expert_linear") or expert_linear_ref
    return fn(x, weights, index)


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
    """A Mamba mixer's one-token step from in_proj's output to out_proj's input; see `ops.decode.mamba_step_ref`
    (x_proj_weight and dt_proj_weight: matrices, or quantized weights; A = -exp(A_log))."""
    args = (xz, window, ssm, conv_weight, conv_bias, x_proj_weight, norm_weights, eps, dt_proj_weight, dt_bias, A, D)
    fn = _op(xz.device, "mamba_step")
    return fn(*args) if fn is not None else mamba_step_ref(*args, state_update=selective_state_update)


def add_rms_norm(
    x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + h, rms_norm(x + h)): a residual add and the norm after it; see `ops.decode.add_rms_norm_ref`."""
    fn = _op(x.device, "add_rms_norm") or add_rms_norm_ref
    return fn(x, h, weight, eps)


def fused_step_rows(device: torch.device) -> int:
    """Rows up to which a decode step takes `mlp_step` and `moe_step` on this device: the compiled kernels read each
    expert once for all the rows that chose it; the references gather every row's experts, so there one row only."""
    return DECODE_MAX_ROWS if _op(device, "moe_step") is not None else 1


def mlp_step(x: torch.Tensor, gate, up, down, residual: torch.Tensor) -> torch.Tensor:
    """residual + SwiGLU MLP of a decode step's rows (rows, H); see `ops.decode.mlp_step_ref` (the weights:
    matrices, or quantized weights)."""
    fn = _op(x.device, "mlp_step") or mlp_step_ref
    return fn(x, gate, up, down, residual)


def prepare_mamba_layer_step(in_norm: tuple, in_proj, params: tuple, out_proj, ff_norm: tuple, ffn: tuple,
                             device: torch.device) -> Callable[..., torch.Tensor | None] | None:
    """A Mamba layer and its FFN bound to their weights for a run of decode steps, as one call of the device's
    kernel: `step(x, window, ssm)` gives `ops.decode.mamba_layer_step_ref` of a decode step's rows x (rows, H) with
    the layer's conv window and SSM state (updated in place); params: the Mamba step's arguments after the state
    (see `mamba_step`); ffn: ("mlp", gate, up, down) or ("moe", router, gate_up, down, top_k), weights as `mlp_step`
    and `moe_step` take them. None where the device has no such kernel for these weights (CPU: fp32 or quantized
    projections, an fp32 or quantized MLP or an fp32 MoE), and the step returns None for rows it cannot take: the
    caller then runs the layer's ops one by one (model.DecoderLayer.decode_step). Binding reads and checks every
    weight once: the step may be called while those tensors stay the ones bound (model.DecoderLayer keeps it while
    the layer is unchanged)."""
    prepare = _op(device, "prepare_mamba_layer_step")
    return prepare(in_norm, in_proj, params, out_proj, ff_norm, ffn) if prepare is not None else None


def prepare_attention_layer_step(in_norm: tuple, projections: tuple, heads: int, kv_heads: int, ff_norm: tuple,
                                 ffn: tuple, device: torch.device) -> Callable[..., torch.Tensor | None] | None:
    """An attention layer and its FFN bound to their weights for a run of decode steps, as one call of the device's
    kernel: `step(x, kv, position, starts)` gives what model.DecoderLayer.decode_step's ops give for a decode
    step's rows x (rows, H) with no attention mask: it writes this step's keys and values into column `position` of
    the layer's cache.KVCache `kv` (making room) and attends over columns starts[i]:position + 1 of row i (starts
    None: from 0). projections: (q, k, v, o) as `linear` or a
    quantized layer takes them; in_norm, ff_norm, ffn: as in `prepare_mamba_layer_step`. None where the device has
    no such kernel for these weights; the step returns None where it cannot run (the caller then runs the ops one
    by one)."""
    prepare = _op(device, "prepare_attention_layer_step")
    return prepare(in_norm, projections, heads, kv_heads, ff_norm, ffn) if prepare is not None else None


def layer_steps(steps: list, x: torch.Tensor, states: list[tuple]) -> torch.Tensor | None:
    """The `prepare_*_layer_step` steps of a decode token's layers run in order on x (rows, H), step i with the state
    `states[i]` it takes, as one call where the device has one (CPU: no interpreter between layers, whose objects a
    large model's weights evict from the caches); the last step's output. None, with nothing run, where the device
    has no such call or a step cannot take its rows or state: the caller then runs the steps one by one."""
    fn = _op(x.device, "layer_steps")
    return fn(steps, x, states) if fn is not None else None


def moe_step(
    x: torch.Tensor, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, top_k: int,
    residual: torch.Tensor,
) -> torch.Tensor:
    """residual + MoE block of a decode step's rows (rows, H), routing included; see `ops.decode.moe_step_ref`."""
    fn = _op(x.device, "moe_step") or moe_step_ref
    return fn(x, router, gate_up, down, top_k, residual)
