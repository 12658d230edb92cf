"""Jamba: a hybrid Transformer-Mamba mixture-of-experts language model, in one readable file.

Read top to bottom:
  Linear           nn.Linear whose few-row products (decoding) take the ops' fast path
  RMSNorm          the only normalisation, used before every mixer and FFN, and on Mamba's dt, B and C
  Attention        grouped-query attention with no positional encoding (position comes from the Mamba layers)
  MambaMixer       in_proj -> causal conv -> x_proj -> (dt, B, C) norms -> selective scan -> gate -> out_proj
  MLP, SparseMoE   SwiGLU; the MoE routes each token to the top-k of a softmax over all experts (not renormalised)
  DecoderLayer     pre-norm residual block: mixer (attention or Mamba) then FFN (MLP or MoE)
  JambaForCausalLM embeddings, the layers in the config's plan, final norm, LM head; loss and MoE aux loss

The decode fast path: a cached one-token step (`JambaForCausalLM.decode_step`, taken by `forward` when it applies)
runs each module's `decode_step` on rows (B, H) instead of its `forward`. Same math, fewer ops: small models decode
at the speed of their op count, so there the residual adds are fused into the norms and FFN kernels, and on CPU a
whole layer (mixer, FFN, a MoE's routing included) is one call bound once to its weights
(`ops.prepared.BoundDecodeStep`).

Module and parameter names equal Hugging Face's, so a checkpoint's tensors map one to one; the only exception
is the experts, kept fused per layer (`experts.gate_up_proj`, `experts.down_proj`) and converted in `hf.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import ops
from .cache import HybridCache, KVCache, MambaState
from .config import JambaConfig
from .ops.prepared import BoundDecodeStep, invalidate, prepared_model_steps


class Linear(nn.Linear):
    """nn.Linear computed by `ops.linear`: the same product, which on CPU streams the weight over all threads when
    only a few rows go through (a decode step reads every weight once, so it runs at memory speed or not at all).
    Every projection of the model is one of these, so a module swap (quantization) replaces each in one place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In fp32 one fused op; in lower precision normalised in fp32 and scaled in the input dtype (as
        # transformers does); a decode step's few rows in one kernel call (see ops.decode.rms_norm).
        return ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """Grouped-query self-attention. No RoPE, no ALiBi: Jamba's attention layers see no positions."""

    def __init__(self, config: JambaConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        hidden = config.hidden_size
        self.q_proj = Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, mask: AttentionMask, kv: KVCache | None = None) -> torch.Tensor:
        batch, length, _ = x.shape
        # (B, T, heads * hd) -> (B, heads, T, hd)
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if kv is not None:
            k, v = kv.append(k, v, mask.past_length)  # (B, kv_heads, past + T, hd)
        dropout = self.dropout if self.training else 0.0
        if mask.is_causal and mask.past_length > 0:  # a chunk continuing a cached sequence
            out = ops.chunk_attention(q, k, v, dropout)
        elif length == 1 and mask.row_starts is not None and dropout == 0.0:  # rows of their own lengths
            out = ops.attend_to_rows(q, k, v, mask.row_starts)  # each row over its own keys, not all columns
        elif length == 1 and mask.mask is None and dropout == 0.0:  # a decode step: sees every key
            out = ops.attend_to_all(q, k, v)
        else:  # K/V from a narrower cache (make_cache's kv_dtype) are widened; the other paths do it themselves
            out = F.scaled_dot_product_attention(
                q, ops.to_dtype_of(k, q), ops.to_dtype_of(v, q), attn_mask=mask.mask, is_causal=mask.is_causal,
                dropout_p=dropout, enable_gqa=self.num_kv_heads != self.num_heads,
            )
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))  # (B, heads, T, hd) -> (B, T, D)

    def step_weights(self) -> tuple | None:
        """(q, k, v, o) as the fused decode step reads them (`_step_weights`), or None."""
        return _step_weights(self.q_proj, self.k_proj, self.v_proj, self.o_proj)


@dataclass
class AttentionMask:
    """How the attention layers of one forward mask: built once per forward, shared by all of them."""

    past_length: int
    mask: torch.Tensor | None  # bools (B or 1, 1, T, past + T), True = attend; None when nothing is padded
    is_causal: bool  # causal over this chunk, aligned to the last keys (used when mask is None)
    row_starts: list[int] | None = None  # row i's keys are columns row_starts[i]: (the cache's, see cache.py)

    @staticmethod
    def build(
        key_valid: torch.Tensor | None, past_length: int, length: int, device: torch.device,
        row_starts: list[int] | None = None,
    ) -> AttentionMask:
        """key_valid: (B, past + T) bools marking real (non-padding) tokens, or None when nothing is padded."""
        if key_valid is None:
            # Causal over the chunk, aligned to the last keys: one new token sees every key, and a longer chunk
            # continuing a cached sequence goes to ops.chunk_attention (no (T, past + T) mask on CPU).
            return AttentionMask(past_length, None, is_causal=length > 1)
        if row_starts is not None and length == 1:  # each row's keys are one run: no mask needed
            return AttentionMask(past_length, None, is_causal=False, row_starts=row_starts)
        total = past_length + length
        query_pos = torch.arange(past_length, total, device=device)[:, None]
        key_pos = torch.arange(total, device=device)[None, :]
        allowed = (key_pos <= query_pos)[None, None] & key_valid[:, None, None, :]  # (B, 1, T, total)
        # A padding query would see no key at all; let it see itself so its (ignored) output stays finite.
        allowed = allowed | (key_pos == query_pos)[None, None]
        return AttentionMask(past_length, allowed, is_causal=False, row_starts=row_starts if length == 1 else None)


class MambaMixer(nn.Module):
    """Mamba-1 selective state-space mixer with Jamba's RMSNorms on dt, B and C."""

    def __init__(self, config: JambaConfig) -> None:
        super().__init__()
        hidden, inner = config.hidden_size, config.mamba_inner_size
        self.inner = inner
        self.state_size = config.mamba_d_state
        self.dt_rank = config.mamba_dt_rank
        self.in_proj = Linear(hidden, 2 * inner, bias=config.mamba_proj_bias)
        # Stored as HF's Conv1d ([inner, 1, K] weight) for checkpoint compatibility; applied by ops.causal_conv1d.
        self.conv1d = nn.Conv1d(
            inner, inner, config.mamba_d_conv, groups=inner, padding=config.mamba_d_conv - 1,
            bias=config.mamba_conv_bias,
        )
        self.x_proj = Linear(inner, self.dt_rank + 2 * self.state_size, bias=False)
        self.dt_proj = Linear(self.dt_rank, inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(inner, self.state_size))
        self.D = nn.Parameter(torch.empty(inner))
        self._decay: tuple | None = None  # (A_log, its data pointer and version, A): see decay_rates
        self.out_proj = Linear(inner, hidden, bias=config.mamba_proj_bias)
        self.dt_layernorm = RMSNorm(self.dt_rank, config.rms_norm_eps)
        self.b_layernorm = RMSNorm(self.state_size, config.rms_norm_eps)
        self.c_layernorm = RMSNorm(self.state_size, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, token_mask: torch.Tensor | None = None, state: MambaState | None = None
    ) -> torch.Tensor:
        """x: (B, T, hidden). token_mask: (B, T), 0 at padding. state: carried conv window and SSM state."""
        xz = self.in_proj(x)  # (B, T, 2 * inner)
        decoding = state is not None and x.shape[1] == 1
        weights = self._step_weights() if decoding and token_mask is None else None
        if weights is not None:
            return self.out_proj(self._fused_decode_step(xz[:, 0], state, weights).unsqueeze(1))
        u, gate = xz.chunk(2, dim=-1)  # (B, T, inner) each
        # Padding is zeroed before and after the conv, so pads never reach the conv window or the SSM state.
        u = _zero_padding(u, token_mask)
        conv_weight = self.conv1d.weight[:, 0]  # (inner, K)
        if decoding:  # one token: the conv window is updated in place
            u = ops.causal_conv1d_update(u[:, 0], conv_weight, self.conv1d.bias, state.conv).unsqueeze(1)
        else:
            u, window = ops.causal_conv1d(u, conv_weight, self.conv1d.bias, state.conv if state is not None else None)
        u = _zero_padding(u, token_mask)

        dt, B, C = self.x_proj(u).split([self.dt_rank, self.state_size, self.state_size], dim=-1)
        dt = _without_bias(self.dt_proj, self.dt_layernorm(dt))  # bias and softplus are applied in fp32 below
        B, C = self.b_layernorm(B), self.c_layernorm(C)
        A = -torch.exp(self.A_log.float())
        scan_args = dict(D=self.D.float(), delta_bias=self.dt_proj.bias.float(), delta_softplus=True)

        if state is None:
            y = ops.selective_scan(u, dt, A, B, C, z=gate, **scan_args)
        elif decoding:
            y = ops.selective_state_update(state.ssm, u[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], z=gate[:, 0],
                                           **scan_args).unsqueeze(1)
        else:
            y, final = ops.selective_scan(
                u, dt, A, B, C, z=gate, initial_state=state.ssm, return_final_state=True, **scan_args
            )
            state.update(window, final)
        return self.out_proj(y)

    def decode_step(self, x: torch.Tensor, state: MambaState) -> torch.Tensor:
        """`forward` for one cached token per row: x (B, H) -> (B, H), `state` updated in place."""
        weights = self._step_weights()
        if weights is None:
            return self(x.unsqueeze(1), None, state).squeeze(1)
        return self.out_proj(self._fused_decode_step(self.in_proj(x), state, weights))

    def _step_weights(self) -> tuple | None:
        """The weights of x_proj and dt_proj as the fused decode step reads them: plain matrices, or quantized
        weights (openjamba.quant.QuantizedLinear's); None when either is something else."""
        return _step_weights(self.x_proj, self.dt_proj)

    def step_weights(self) -> tuple | None:
        """(in_proj, out_proj, `_step_weights()`) as a whole layer's one-call step reads them (no projection
        biases), or None."""
        weights, inner = _step_weights(self.in_proj, self.out_proj), self._step_weights()
        if weights is None or inner is None or self.in_proj.bias is not None or self.out_proj.bias is not None:
            return None
        return *weights, inner

    def _fused_decode_step(self, xz: torch.Tensor, state: MambaState, weights: tuple) -> torch.Tensor:
        """The steps above for one token (conv, x_proj, norms, dt_proj, state update, gate) as one op (per-op
        overhead bounds small models). xz: (B, 2 * inner) -> (B, inner); `state` updated in place."""
        return ops.mamba_step(xz, state.conv, state.ssm, *self.step_params(weights))

    def step_params(self, weights: tuple) -> tuple:
        """`ops.mamba_step`'s arguments after the state: the conv, the x_proj / dt_proj weights (`weights`), the
        norms, A (`decay_rates`) and D."""
        x_proj, dt_proj = weights
        norms = (self.dt_layernorm.weight, self.b_layernorm.weight, self.c_layernorm.weight)
        return (self.conv1d.weight[:, 0], self.conv1d.bias, x_proj, norms, self.dt_layernorm.eps, dt_proj,
                self.dt_proj.bias, self.decay_rates(), self.D)

    def decay_rates(self) -> torch.Tensor:
        """A = -exp(A_log), as the decode step takes it: computed once and kept while A_log holds the same values
        (the same tensor, storage and version: any in-place update, e.g. an optimizer step or load_state_dict, bumps
        the version), instead of channels x N exponentials per layer and token. Computed afresh, differentiable,
        when autograd tracks A_log."""
        A_log = self.A_log
        if (A_log.requires_grad and torch.is_grad_enabled()) or A_log.is_inference():  # (no version counter)
            return -torch.exp(A_log)
        kept = self._decay
        if kept is None or kept[0] is not A_log or kept[1] != (A_log.data_ptr(), A_log._version):
            with torch.no_grad():
                kept = self._decay = (A_log, (A_log.data_ptr(), A_log._version), -torch.exp(A_log))
        return kept[2]


def _step_weights(*projections: nn.Module) -> tuple | None:
    """What a fused decode step reads for each projection: a plain Linear's weight matrix, or a quantized layer's
    weight (openjamba.quant.QuantizedLinear.quantized, which the kernels read in its stored layout); None when any
    is something else."""
    weights = tuple(p.weight if type(p) is Linear else getattr(p, "quantized", None) for p in projections)
    return None if any(w is None for w in weights) else weights


def _without_bias(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A linear layer's product alone: nn.Linear, or a quantized one (openjamba.quant.QuantizedLinear.matmul)."""
    return linear.matmul(x) if hasattr(linear, "matmul") else ops.linear(x, linear.weight)


def _zero_padding(x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    return x if token_mask is None else x * token_mask.unsqueeze(-1).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: JambaConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def decode_step(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + forward(x) for a decode step's rows (B, H); plain or quantized weights in one kernel call."""
        weights = self.step_weights()
        if weights is not None and x.shape[0] <= ops.fused_step_rows(x.device):
            return ops.mlp_step(x, *weights[1:], residual)
        return residual + self(x)

    def step_weights(self) -> tuple | None:
        """("mlp", gate, up, down) as the fused decode steps read them (`_step_weights`), or None."""
        weights = _step_weights(self.gate_proj, self.up_proj, self.down_proj)
        return None if weights is None else ("mlp", *weights)


class Experts(nn.Module):
    """E SwiGLU experts with fused weights: gate_up_proj (E, 2I, H) (gate rows first) and down_proj (E, H, I)."""

    def __init__(self, config: JambaConfig) -> None:
        super().__init__()
        E, H, I = config.num_experts, config.hidden_size, config.intermediate_size
        self.num_experts = E
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))

    def forward(self, x: torch.Tensor, expert_index: torch.Tensor, expert_weight: torch.Tensor) -> torch.Tensor:
        """x: (N, H); expert_index, expert_weight: (N, k). Each token's k expert outputs, weighted and summed."""
        num_tokens, top_k = expert_index.shape
        if num_tokens == 1:  # a decode step: its k experts side by side, the index never leaving the device
            return self.decode_step(x, expert_index[0], expert_weight[0])
        flat_expert = expert_index.reshape(-1)  # (N*k,)
        order = flat_expert.argsort(stable=True)  # group the (token, slot) pairs by expert
        token_of = order // top_k
        counts = torch.bincount(flat_expert, minlength=self.num_experts).tolist()
        outputs = [self.expert(rows, e) for e, rows in enumerate(x[token_of].split(counts)) if rows.shape[0] > 0]
        weighted = torch.cat(outputs) * expert_weight.reshape(-1)[order, None]
        return x.new_zeros(num_tokens, x.shape[-1]).index_add_(0, token_of, weighted.to(x.dtype))

    def decode_step(self, x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """One token x (1, H) through its experts index (k,), weighted by weight (k,): (1, H). No host sync."""
        rows = x.expand(index.shape[0], -1)  # (k, H): the token once per chosen expert
        gate, up = _experts_by_index(rows, self.gate_up_proj, index).chunk(2, dim=-1)  # (k, I) each
        out = _experts_by_index(F.silu(gate) * up, self.down_proj, index)  # (k, H)
        return (weight.unsqueeze(0) @ out.to(weight.dtype)).to(x.dtype)  # weighted sum of the k rows: (1, H)

    def expert(self, rows: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e's SwiGLU on rows (n, H) -> (n, H)."""
        gate, up = _expert_linear(rows, self.gate_up_proj, e).chunk(2, dim=-1)
        return _expert_linear(F.silu(gate) * up, self.down_proj, e)


def _experts_by_index(x: torch.Tensor, weight, index: torch.Tensor) -> torch.Tensor:
    """Row r of x through expert index[r]: `ops.expert_linear` for a fused expert parameter, or a quantized one
    (openjamba.quant.QuantizedWeight.expert_linear); either reads the chosen matrices where they lie."""
    return ops.expert_linear(x, weight, index) if isinstance(weight, torch.Tensor) else weight.expert_linear(x, index)


def _expert_linear(x: torch.Tensor, weight, e: int) -> torch.Tensor:
    """x @ weight[e].T for a fused expert parameter, or a quantized one (openjamba.quant.QuantizedWeight.linear)."""
    return ops.linear(x, weight[e]) if isinstance(weight, torch.Tensor) else weight.linear(x, e)


class SparseMoE(nn.Module):
    """Softmax over all experts (fp32), then top-k; the k weights are used as they are (no renormalisation)."""

    def __init__(self, config: JambaConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.router = Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = Experts(config)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.reshape(-1, x.shape[-1])  # (B*T, H)
        router_logits = self.router(flat)  # (B*T, E)
        probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
        weight, index = torch.topk(probs, self.top_k, dim=-1)
        out = self.experts(flat, index, weight.to(x.dtype))
        return out.view_as(x), router_logits

    def decode_step(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + forward(x)[0] for a decode step's rows (B, H): with plain weights, routing, the chosen experts
        and their weighted sum in one call that reads each chosen expert once for all rows (no host sync)."""
        weights = self.step_weights()
        if weights is not None and x.shape[0] <= ops.fused_step_rows(x.device):
            return ops.moe_step(x, *weights[1:], residual)
        return residual + self(x)[0]

    def step_weights(self) -> tuple | None:
        """("moe", router, gate_up, down, top_k) as the fused decode steps read them: plain weights only, else None."""
        experts = self.experts
        if type(self.router) is not Linear or not isinstance(experts.gate_up_proj, torch.Tensor):
            return None
        return "moe", self.router.weight, experts.gate_up_proj, experts.down_proj, self.top_k


class DecoderLayer(BoundDecodeStep, nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then + ffn(norm(.)). The mixer is `mamba` or `self_attn`.
    Its decode step bound to its weights (`_prepared_step`, one call on CPU) comes from `BoundDecodeStep`."""

    def __init__(self, config: JambaConfig, index: int) -> None:
        super().__init__()
        self.is_attention = config.layers_block_type[index] == "attention"
        self.is_moe = config.layers_num_experts[index] > 1
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.is_attention:
            self.self_attn = Attention(config)
        else:
            self.mamba = MambaMixer(config)
        self.pre_ff_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = SparseMoE(config) if self.is_moe else MLP(config)

    def forward(
        self, x: torch.Tensor, attn_mask: AttentionMask, token_mask: torch.Tensor | None, layer_cache=None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.input_layernorm(x)
        if self.is_attention:
            h = self.self_attn(h, attn_mask, layer_cache)
        else:
            h = self.mamba(h, token_mask, layer_cache)
        x = x + h
        h = self.pre_ff_layernorm(x)
        router_logits = None
        if self.is_moe:
            h, router_logits = self.feed_forward(h)
        else:
            h = self.feed_forward(h)
        return x + h, router_logits

    def decode_step(self, x: torch.Tensor, attn_mask: AttentionMask, layer_cache) -> torch.Tensor:
        """`forward` for one cached token per row, x (B, H) -> (B, H); the residual adds fused into the ops after.
        A layer whose weights the device's kernel reads is one prepared op (`_prepared_step`)."""
        return self.decode_step_with(self._prepared_step(x, attn_mask), x, attn_mask, layer_cache)

    def decode_step_with(self, prepared, x: torch.Tensor, attn_mask: AttentionMask, layer_cache) -> torch.Tensor:
        """`decode_step` with the layer's prepared step given (None: op by op), as the model looks them up for all its
        layers at once (`JambaForCausalLM._prepared_steps`)."""
        if prepared is not None:
            out = prepared(x, *self.step_state(attn_mask, layer_cache))
            if out is not None:
                return out
        h = self.input_layernorm(x)
        if self.is_attention:
            h = self.self_attn(h.unsqueeze(1), attn_mask, layer_cache).squeeze(1)
        else:
            h = self.mamba.decode_step(h, layer_cache)
        x, h = ops.add_rms_norm(x, h, self.pre_ff_layernorm.weight, self.pre_ff_layernorm.eps)
        return self.feed_forward.decode_step(h, x)


class JambaModel(nn.Module):
    def __init__(self, config: JambaConfig) -> None:
        super().__init__()
        # Left uninitialised (_weight): JambaForCausalLM.reset_parameters initialises it, and nn.Embedding's own
        # normal_ would, on the meta device that loading builds on, import torch._dynamo (~140 MB, a second).
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None  # language-model loss, plus router_aux_loss_coef * aux_loss when computed
    aux_loss: torch.Tensor | None = None  # MoE load-balancing loss (equals top-k when perfectly balanced)
    router_logits: tuple[torch.Tensor, ...] | None = None


class JambaForCausalLM(nn.Module):
    def __init__(self, config: JambaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = JambaModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.gradient_checkpointing = False
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    def tie_weights(self) -> None:
        """Share the LM head with the embedding when the config says so (again after `to_empty`)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialisation for training from scratch (transformers' scheme, with Mamba's dt bias)."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, Experts):
                nn.init.normal_(module.gate_up_proj, 0.0, std)
                nn.init.normal_(module.down_proj, 0.0, std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for module in self.modules():  # after the generic pass, so it cannot overwrite these
            if isinstance(module, MambaMixer):
                init_mamba_parameters(module)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: HybridCache | None = None,
        logits_to_keep: int = 0,
        output_router_logits: bool | None = None,
    ) -> CausalLMOutput:
        """input_ids: (B, T). attention_mask: (B, T) or (B, past + T), 1 for real tokens and 0 for (left) padding.

        With `cache`, continues from the cached state (chunks of any length) and advances it.
        `logits_to_keep=n` computes logits for the last n positions only (0 = all).
        The MoE aux loss is computed when training (labels given) or when `output_router_logits` asks for it.
        """
        batch, length = input_ids.shape
        if (cache is not None and length == 1 and attention_mask is None and labels is None and not self.training
                and not (output_router_logits or (output_router_logits is None and self.config.output_router_logits))):
            return self.decode_step(input_ids[:, 0], cache)
        past = cache.seq_len if cache is not None else 0
        if cache is None or length > 1:  # not in a decode step: its token came from the model itself
            self._check_token_ids(input_ids)
        token_mask, key_valid = self._masks(attention_mask, cache, batch, past, length, input_ids.device)
        attn_mask = AttentionMask.build(key_valid, past, length, input_ids.device,
                                        cache.row_starts if cache is not None else None)

        x = self.model.embed_tokens(input_ids)
        all_router_logits = []
        for i, layer in enumerate(self.model.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            if self.gradient_checkpointing and self.training and cache is None:
                x, router_logits = checkpoint(layer, x, attn_mask, token_mask, None, use_reentrant=False)
            else:
                x, router_logits = layer(x, attn_mask, token_mask, layer_cache)
            if router_logits is not None:
                all_router_logits.append(router_logits)
        if cache is not None:
            cache.advance(length)
        x = self.model.final_layernorm(x)
        logits = self.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x)

        want_aux = output_router_logits if output_router_logits is not None else (
            self.config.output_router_logits or labels is not None
        )
        aux_loss = None
        if want_aux and all_router_logits:
            aux_loss = load_balancing_loss(
                all_router_logits, self.config.num_experts, self.config.num_experts_per_tok, token_mask
            )
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels)
            if aux_loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss
        return CausalLMOutput(logits, loss, aux_loss, tuple(all_router_logits) if want_aux else None)

    def decode_step(self, tokens: torch.Tensor, cache: HybridCache) -> CausalLMOutput:
        """The decode fast path: one token per row (B,) through every layer's `decode_step`, advancing `cache`.
        What `forward` computes for a cached one-token step (its logits (B, 1, V)), on rows (B, H) throughout."""
        key_valid = cache.extend_key_mask(None, 1)
        attn_mask = AttentionMask.build(key_valid, cache.seq_len, 1, tokens.device, cache.row_starts)
        x = self.model.embed_tokens(tokens)  # (B, H)
        x = self._decode_layers(x, attn_mask, cache)
        cache.advance(1)
        return CausalLMOutput(self.lm_head(self.model.final_layernorm(x)).unsqueeze(1))

    def _decode_layers(self, x: torch.Tensor, attn_mask: AttentionMask, cache: HybridCache) -> torch.Tensor:
        """Every layer's decode step on x (B, H): where each layer is one prepared step, all in one call of the
        device's `ops.layer_steps` (no interpreter between layers); else layer by layer."""
        layers, steps = self.model.layers, self._prepared_steps(x, attn_mask)
        if None not in steps:
            out = ops.layer_steps(steps, x, [la.step_state(attn_mask, c) for la, c in zip(layers, cache.layers)])
            if out is not None:
                return out
        for layer, layer_cache, step in zip(layers, cache.layers, steps):
            x = layer.decode_step_with(step, x, attn_mask, layer_cache)
        return x

    def _prepared_steps(self, x: torch.Tensor, attn_mask: AttentionMask) -> list:
        """Each layer's bound step (`DecoderLayer._prepared_step`), kept and checked once per token for all layers."""
        return prepared_model_steps(self.model.layers, x, attn_mask)

    def _check_token_ids(self, input_ids: torch.Tensor) -> None:
        """An id beyond the embedding table would fail deep inside as a bare IndexError (or read garbage on GPU)."""
        if input_ids.numel() == 0:
            return
        low, high = torch.aminmax(input_ids)
        if low < 0 or high >= self.config.vocab_size:
            bad = int(high) if high >= self.config.vocab_size else int(low)
            raise ValueError(f"token id {bad} is outside the model's vocabulary (0..{self.config.vocab_size - 1}): "
                             "was the text encoded with this model's tokenizer?")

    @staticmethod
    def _masks(attention_mask, cache, batch, past, length, device):
        """Split a 2D attention mask into this chunk's token mask (Mamba) and the key validity (attention).

        The cache remembers which cached positions were padding, so later calls need not repeat the mask.
        """
        if attention_mask is not None:
            if attention_mask.shape not in ((batch, length), (batch, past + length)):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}; expected ({batch}, {length}) "
                    f"or ({batch}, {past + length}) (past {past} + new {length} tokens)"
                )
            attention_mask = attention_mask[:, -length:].to(device=device, dtype=torch.bool)
            if bool(attention_mask.all()):
                attention_mask = None
        if cache is not None:
            key_valid = cache.extend_key_mask(attention_mask, length)
        else:
            key_valid = attention_mask
        return attention_mask, key_valid

    # ------------------------------------------------------------------ conveniences
    def make_cache(
        self, batch_size: int, max_length: int | None = None, dtype: torch.dtype | None = None,
        kv_dtype: torch.dtype | None = None,
    ) -> HybridCache:
        """An empty hybrid cache: K/V for attention layers, conv window + fp32 SSM state for Mamba layers.

        With `max_length`, the K/V buffers are allocated once at full size (static shapes); without, they grow.
        Each layer's buffers live on that layer's device, in `dtype` (default: the layer's). `kv_dtype` stores the
        K/V alone narrower, e.g. torch.bfloat16 under an fp32 model: half the cache, and on CPU half the bytes each
        decode step reads; attention still computes in the model's dtype.
        """
        return HybridCache(self, batch_size, max_length, dtype, kv_dtype)

    def _apply(self, fn, recurse: bool = True):
        """Conversions and moves (`.to()`, `.float()`...) replace buffers in place of the registration hooks that
        keep bound decode steps honest (`ops.prepared.ModelStamp`): they are rebound."""
        invalidate()
        return super()._apply(fn, recurse)

    @property
    def device(self) -> torch.device:
        return self.model.final_layernorm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the norms' dtype: never quantized)."""
        return self.model.final_layernorm.weight.dtype

    def num_parameters(self, active: bool = False) -> int:
        """The parameters this model holds (tied weights once); with `active`, only what one token uses: each MoE
        layer's experts count top-k / num_experts of their size. `info.count_parameters` computes the same from a
        config alone."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        k = self.config.num_experts_per_tok
        unused = 0
        for layer in self.model.layers:
            if layer.is_moe:
                experts = layer.feed_forward.experts
                size = sum(p.numel() for p in experts.parameters())
                unused += size * (experts.num_experts - k) // experts.num_experts
        return total - unused

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Prompt plus new tokens, like transformers' generate; see `openjamba.generate.generate`."""
        from .generate import generate

        return generate(self, input_ids, **kwargs)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
        quantize: str | None = None, progress: bool = False, revision: str | None = None,
    ) -> JambaForCausalLM:
        """Load a Hugging Face Jamba checkpoint (safetensors only): a local directory, or a Hub repo id such as
        "ai21labs/AI21-Jamba-Reasoning-3B", fetched into the Hugging Face cache at `revision`. See `openjamba.hf`.

        `quantize` ("int8", "int4") quantizes the large projections' weights as they load (see `openjamba.quant`);
        `progress` shows a bar on stderr once the load has taken a second.
        """
        from .hf import load_pretrained

        return load_pretrained(path, dtype=dtype, device=device, quantize=quantize, progress=progress,
                               revision=revision)

    def save_pretrained(self, path: str | Path, max_shard_size: int | str = "5GB", tokenizer=None) -> None:
        """Write config.json and safetensors (per-expert layout, which transformers loads), and the tokenizer."""
        from .hf import save_pretrained

        save_pretrained(self, path, max_shard_size=max_shard_size, tokenizer=tokenizer)


@torch.no_grad()
def init_mamba_parameters(mixer: MambaMixer, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
    """S4D-real A (A_log = log(1..N)), D = 1, and dt_proj bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max]."""
    n = mixer.state_size
    mixer.A_log.copy_(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).expand(mixer.inner, n))
    mixer.D.fill_(1.0)
    dt = torch.exp(torch.rand(mixer.inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=1e-4)
    mixer.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts labels[t + 1]; ignore_index positions are skipped."""
    labels = labels.to(logits.device)
    if logits.shape[1] != labels.shape[1]:
        labels = labels[:, -logits.shape[1]:]
    shifted = F.pad(labels, (0, 1), value=ignore_index)[:, 1:]
    return F.cross_entropy(logits.float().flatten(0, 1), shifted.flatten(), ignore_index=ignore_index)


def load_balancing_loss(
    router_logits: list[torch.Tensor], num_experts: int, top_k: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch-style load balancing, as transformers computes it: E * sum_e f_e * P_e over all MoE layers.

    f_e: fraction of top-k assignments that go to expert e; P_e: mean router probability of e; padding excluded.
    """
    device = router_logits[0].device
    assignments = torch.zeros(num_experts, device=device)
    prob_sum = torch.zeros(num_experts, device=device)
    rows = torch.zeros((), device=device)
    weight = token_mask.reshape(-1).to(device=device, dtype=torch.float32) if token_mask is not None else None
    for logits in router_logits:
        probs = torch.softmax(logits, dim=-1)
        selected = torch.topk(probs, top_k, dim=-1).indices  # (rows, k)
        w = weight if weight is not None else torch.ones(probs.shape[0], device=device)
        assignments = assignments.scatter_add(0, selected.reshape(-1), w.repeat_interleave(top_k))
        prob_sum = prob_sum + (probs.float() * w[:, None]).sum(0)
        rows = rows + w.sum()
    return num_experts * torch.sum((assignments / rows) * (prob_sum / rows))
