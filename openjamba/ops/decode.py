"""The one-token decoding step's fused ops, as plain PyTorch references: a projection of a few rows, a decode step's
MoE expert projections, the Mamba mixer's whole step between in_proj and out_proj, a residual add with the norm
after it, and a whole feed-forward block (MLP or MoE: router, top-k, experts, weighted sum) with its residual add.

Decoding reads every weight once per token, so it is bound by memory bandwidth (large models) or by per-op overhead
(small ones). The compiled CPU kernels (ops/csrc/linear.cpp, mamba_step.cpp, rms_norm.cpp, ffn_step.cpp) stream
each weight matrix over all threads and run each fused step in one call; the functions here define what they
compute, are the fallback on other devices, and are what the tests compare them with. None of them synchronises
with the host, so a decode step can be captured or compiled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .conv import causal_conv1d_update
from .scan import selective_state_update_ref

# Rows (a serving batch: the engine's default max_running) up to which every compiled decode kernel runs (linear,
# expert_linear, rms_norm, add_rms_norm, mlp_step, moe_step; mamba_step takes any batch). One limit for all of them:
# each kernel's row results are batch-invariant, and a batch beyond it falls back to torch ops, which are not, so a
# greedy request gives the same tokens alone or among up to this many others.
DECODE_MAX_ROWS = 32


def expert_linear_ref(x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Row r of x (rows, in) times matrix index[r] of weights (E, out, in), transposed: (rows, out).

    The index stays on the device (no `.tolist()`); the chosen matrices are gathered, which costs a copy of them.
    """
    return torch.bmm(x.unsqueeze(1), weights.index_select(0, index).transpose(1, 2)).squeeze(1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The model's RMSNorm (model.RMSNorm) on a tensor and a weight."""
    if x.dtype == weight.dtype and x.dtype in (torch.float32, torch.float64):
        return F.rms_norm(x, weight.shape, weight, eps)
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def mamba_step_ref(
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
    state_update=selective_state_update_ref,
) -> torch.Tensor:
    """One token through a Mamba mixer, from in_proj's output xz (batch, 2 * inner) to out_proj's input (batch, inner).

    window (batch, K - 1, inner) and ssm (batch, inner, N) are the layer's cached conv inputs and SSM state, both
    updated in place. conv_weight: (inner, K); x_proj_weight: (rank + 2N, inner); norm_weights: the RMSNorm weights
    of dt, B and C; dt_proj_weight: (inner, rank); dt_bias, D: (inner,); A: (inner, N), -exp(A_log) (the mixer keeps
    it between steps: `model.MambaMixer.decay_rates`). `state_update` runs the SSM step (the dispatcher passes a
    device's kernel for it where there is no fused step).

    x_proj_weight and dt_proj_weight may also be quantized weights (openjamba.quant.QuantizedWeight), applied by
    their `linear`: the step of a quantized layer.
    """
    inner, state = xz.shape[-1] // 2, A.shape[1]
    rank = dt_proj_weight.shape[1] if isinstance(dt_proj_weight, torch.Tensor) else dt_proj_weight.in_features
    u, z = xz[:, :inner], xz[:, inner:]  # (batch, inner) each
    u = causal_conv1d_update(u, conv_weight, conv_bias, window)
    dt, B, C = _project(u, x_proj_weight).split([rank, state, state], dim=-1)
    dt, B, C = (rms_norm(t, w, eps) for t, w in zip((dt, B, C), norm_weights))
    dt = _project(dt, dt_proj_weight)  # bias and softplus are applied in the state's dtype
    return state_update(ssm, u, dt, A.to(ssm.dtype), B, C, D.to(ssm.dtype), z,
                        dt_bias.to(ssm.dtype), delta_softplus=True)


def _project(x: torch.Tensor, weight) -> torch.Tensor:
    """x @ weight.T for a weight matrix, or a quantized weight's product (openjamba.quant.QuantizedWeight.linear)."""
    return F.linear(x, weight) if isinstance(weight, torch.Tensor) else weight.linear(x)


def add_rms_norm_ref(
    x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """A residual branch h joining the stream x, and the norm of the sum: (x + h, rms_norm(x + h))."""
    s = x + h
    return s, rms_norm(s, weight, eps)


def mlp_step_ref(x: torch.Tensor, gate, up, down, residual: torch.Tensor) -> torch.Tensor:
    """residual + the SwiGLU MLP (model.MLP) of x (rows, H): gate, up (I, H), down (H, I) -> (rows, H). The weights
    may be quantized weights (openjamba.quant.QuantizedWeight), applied by their own `linear`."""
    return residual + _project(F.silu(_project(x, gate)) * _project(x, up), down)


def mamba_layer_step_ref(x: torch.Tensor, in_norm: tuple, in_proj, step: tuple, out_proj, ff_norm: tuple,
                         ffn: tuple) -> torch.Tensor:
    """A Mamba layer and its FFN (model.DecoderLayer) for a decode step's rows x (rows, H) -> (rows, H):
    in_norm, ff_norm: (weight, eps) of the norms before the mixer and the FFN; in_proj, out_proj: the mixer's
    projections; step: `mamba_step_ref`'s arguments after xz (the conv window and SSM state are updated in place);
    ffn: ("mlp", gate, up, down) or ("moe", router, gate_up, down, top_k). Projections are weight matrices or
    quantized weights (openjamba.quant.QuantizedWeight)."""
    h = rms_norm(x, *in_norm)
    y = mamba_step_ref(_project(h, in_proj), *step)
    s, h = add_rms_norm_ref(x, _project(y, out_proj), *ff_norm)
    kind, *weights = ffn
    return mlp_step_ref(h, *weights, s) if kind == "mlp" else moe_step_ref(h, *weights, s)


def moe_step_ref(
    x: torch.Tensor, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, top_k: int,
    residual: torch.Tensor,
) -> torch.Tensor:
    """residual + the MoE block (model.SparseMoE) of x (rows, H): router (E, H), gate_up (E, 2I, H), down (E, H, I).

    The routing probabilities are fp32, as the model's, here correctly rounded from a float64 softmax (the kernel
    computes them the same way; torch's fp32 softmax can differ from it by an ulp). Each row's top_k experts'
    outputs are summed in top-k order, weighted by their probabilities (not renormalised).
    """
    rows, hidden = x.shape
    probs = torch.softmax(F.linear(x, router).float().double(), dim=-1).float()
    weight, index = torch.topk(probs, top_k, dim=-1)  # (rows, k)
    flat = index.reshape(-1)
    each = x.unsqueeze(1).expand(rows, top_k, hidden).reshape(-1, hidden)  # (rows * k, H): a row per chosen expert
    gate, up = expert_linear_ref(each, gate_up, flat).chunk(2, dim=-1)  # (rows * k, I) each
    out = expert_linear_ref(F.silu(gate) * up, down, flat).view(rows, top_k, hidden)
    return residual + (weight.to(x.dtype).unsqueeze(1) @ out).squeeze(1)
