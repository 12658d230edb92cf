"""Parameter counts and inference-memory figures computed from a config alone (no weights needed).

This is what reproduces the paper's memory table: Jamba-v0.1 has 52B parameters, 12B active per token, and a
4 GiB KV cache at 256K tokens in 16-bit, against 32 GiB for Mixtral-8x7B and Mistral-7B and 128 GiB for
Llama-2-7B, because only 4 of its 32 layers are attention layers.
"""

from __future__ import annotations

from typing import Any

from .config import JambaConfig, attention_only_config, get_preset
from .runtime import DTYPES

DTYPE_BYTES = {**{name: dtype.itemsize for name, dtype in DTYPES.items()}, "fp8": 1, "int8": 1}  # what a cache could be
PAPER_REFERENCE_MODELS = ("mixtral-8x7b", "mistral-7b", "llama-2-7b")


def count_parameters(config: JambaConfig) -> dict[str, int]:
    """Total parameters, and active ones (what one token touches: top-k of each MoE layer's experts)."""
    H, I, V = config.hidden_size, config.intermediate_size, config.vocab_size
    Di, N, K, R = config.mamba_inner_size, config.mamba_d_state, config.mamba_d_conv, config.mamba_dt_rank
    hd = config.head_dim
    attention = H * hd * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    bias = config.mamba_proj_bias
    mamba = (
        H * 2 * Di + (2 * Di if bias else 0)  # in_proj
        + Di * K + (Di if config.mamba_conv_bias else 0)  # conv1d
        + Di * (R + 2 * N)  # x_proj
        + R * Di + Di  # dt_proj (always with bias)
        + Di * N + Di  # A_log, D
        + Di * H + (H if bias else 0)  # out_proj
        + R + 2 * N  # dt/B/C norms
    )
    expert = 3 * H * I
    total = active = V * H * (1 if config.tie_word_embeddings else 2) + H  # embeddings, LM head, final norm
    for kind, experts in zip(config.layers_block_type, config.layers_num_experts):
        mixer = attention if kind == "attention" else mamba
        layer = 2 * H + mixer  # two RMSNorms
        if experts > 1:
            total += layer + experts * expert + experts * H  # experts and router
            active += layer + config.num_experts_per_tok * expert + experts * H
        else:
            total += layer + expert
            active += layer + expert
    return {"total": total, "active": active}


def kv_cache_bytes(config: JambaConfig, context: int, batch: int = 1, dtype: str = "bf16") -> int:
    """K and V of every attention layer for `context` tokens."""
    per_token = 2 * config.num_key_value_heads * config.head_dim * DTYPE_BYTES[dtype]
    return len(config.attention_layer_indices) * per_token * context * batch


def mamba_state_bytes(config: JambaConfig, batch: int = 1, dtype: str = "bf16") -> int:
    """Conv window (K-1 inputs, model dtype) and SSM state (fp32) of every Mamba layer: constant in context."""
    Di = config.mamba_inner_size
    per_layer = Di * config.mamba_d_state * 4 + Di * (config.mamba_d_conv - 1) * DTYPE_BYTES[dtype]
    return len(config.mamba_layer_indices) * per_layer * batch


def forward_flops(config: JambaConfig, tokens: int, batch: int = 1, past: int = 0, logits: int | None = None) -> int:
    """Useful floating-point operations of one forward over `tokens` new tokens after `past` cached ones.

    What utilisation figures divide by, so it counts only work the model needs, never an implementation's
    overheads: 2 per multiply-add of every linear layer a token uses (top-k experts only, the router, the LM head
    for the `logits` positions actually computed, default all), the causal attention scores and weighted sums
    (each query sees `past` + its own prefix), the depthwise conv, and 9 per (channel, state) element for the
    selective scan (the Mamba paper's count). Embedding lookups, norms and activations are left out. A
    training step (forward and backward) is three times this.
    """
    H, I, E = config.hidden_size, config.intermediate_size, config.num_experts
    Di, N, K, R = config.mamba_inner_size, config.mamba_d_state, config.mamba_d_conv, config.mamba_dt_rank
    hd, heads, kv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    keys_seen = tokens * past + tokens * (tokens + 1) // 2  # summed over the new queries
    attention = 2 * H * hd * (2 * heads + 2 * kv) * tokens + 2 * 2 * heads * hd * keys_seen
    mamba_per_token = 2 * (H * 2 * Di + Di * (R + 2 * N) + R * Di + Di * H) + 2 * K * Di + 9 * Di * N
    flops = 0
    for kind, experts in zip(config.layers_block_type, config.layers_num_experts):
        flops += attention if kind == "attention" else mamba_per_token * tokens
        ffn = 2 * 3 * H * I * (config.num_experts_per_tok if experts > 1 else 1) + (2 * H * E if experts > 1 else 0)
        flops += ffn * tokens
    flops += 2 * H * config.vocab_size * (tokens if logits is None else min(logits, tokens))
    return flops * batch


def summarize(config: JambaConfig, context: int, batch: int = 1, dtype: str = "bf16") -> dict[str, Any]:
    params = count_parameters(config)
    kv = kv_cache_bytes(config, context, batch, dtype)
    state = mamba_state_bytes(config, batch, dtype)
    return {
        "total_params": params["total"],
        "active_params": params["active"],
        "num_layers": config.num_hidden_layers,
        "attention_layers": len(config.attention_layer_indices),
        "mamba_layers": len(config.mamba_layer_indices),
        "moe_layers": sum(n > 1 for n in config.layers_num_experts),
        "kv_cache_bytes": kv,
        "mamba_state_bytes": state,
        "inference_state_bytes": kv + state,
    }


def checkpoint_dtype_name(config: JambaConfig) -> str:
    """The dtype a checkpoint's config.json declares, as a cache dtype name (bf16 when it declares none): the cache
    of a model is held in the model's own dtype."""
    stored = config.extra.get("dtype") or config.extra.get("torch_dtype")
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(stored, "bf16")


def model_report(
    config: JambaConfig, name: str, context: int, batch: int = 1, dtype: str = "bf16", compare_paper: bool = True
) -> dict[str, Any]:
    """Figures for the model, its attention-only twin of equal shape, and the paper's reference models."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPE_BYTES)}")
    report = {"model": name, "context": context, "batch": batch, "dtype": dtype}
    report.update(summarize(config, context, batch, dtype))
    report["layer_plan"] = config.layer_plan()
    rows = [{"model": name, **summarize(config, context, batch, dtype)}]
    if config.mamba_layer_indices:
        rows.append({"model": f"{name} (attention-only, equal shape)",
                     **summarize(attention_only_config(config), context, batch, dtype)})
    if compare_paper:
        for ref in PAPER_REFERENCE_MODELS:
            if ref != name:
                rows.append({"model": ref, **summarize(get_preset(ref), context, batch, dtype)})
    report["comparison"] = rows
    return report


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def human_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def compact_plan(plan: list[str], per_group: int = 8) -> str:
    """["mamba+mlp", "mamba+moe", ...] -> "M M+ M M+ A M+ M M+ | ..." (groups of 8 layers, one Jamba block)."""
    codes = [("A" if p.startswith("attention") else "M") + ("+" if p.endswith("moe") else "") for p in plan]
    groups = [" ".join(codes[i:i + per_group]) for i in range(0, len(codes), per_group)]
    return " | ".join(groups)


def format_model_report(report: dict[str, Any]) -> str:
    lines = [
        f"model {report['model']}: {report['num_layers']} layers "
        f"({report['attention_layers']} attention, {report['mamba_layers']} Mamba, {report['moe_layers']} MoE)",
        f"parameters: {human_count(report['total_params'])} total, {human_count(report['active_params'])} active",
        f"context {report['context']:,} tokens, batch {report['batch']}, {report['dtype']} cache",
        f"  attention KV cache: {human_bytes(report['kv_cache_bytes'])}",
        f"  Mamba state:        {human_bytes(report['mamba_state_bytes'])} (constant in context)",
        "layer plan (A attention, M Mamba, + MoE): " + compact_plan(report["layer_plan"]),
        "",
        f"{'model':<44}{'total':>10}{'active':>10}{'KV cache':>13}{'Mamba state':>14}",
    ]
    for row in report["comparison"]:
        lines.append(
            f"{row['model']:<44}{human_count(row['total_params']):>10}{human_count(row['active_params']):>10}"
            f"{human_bytes(row['kv_cache_bytes']):>13}{human_bytes(row['mamba_state_bytes']):>14}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------- weight bytes and the context that fits
def weight_shapes(config: JambaConfig) -> list[tuple[str, tuple[int, ...], bool]]:
    """(parameter, shape, quantized by `openjamba.quant`) for every weight, as the model holds them (experts fused);
    a tied LM head is listed once, as lm_head.weight."""
    H, I, E, V = config.hidden_size, config.intermediate_size, config.num_experts, config.vocab_size
    Di, N, K, R = config.mamba_inner_size, config.mamba_d_state, config.mamba_d_conv, config.mamba_dt_rank
    hd, heads, kv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    bias = config.mamba_proj_bias
    out = [("lm_head.weight", (V, H), True), ("model.final_layernorm.weight", (H,), False)]
    if not config.tie_word_embeddings:
        out.append(("model.embed_tokens.weight", (V, H), False))
    for i, (kind, experts) in enumerate(zip(config.layers_block_type, config.layers_num_experts)):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (H,), False), (p + "pre_ff_layernorm.weight", (H,), False)]
        if kind == "attention":
            out += [(p + f"self_attn.{n}.weight", s, True) for n, s in
                    (("q_proj", (heads * hd, H)), ("k_proj", (kv * hd, H)), ("v_proj", (kv * hd, H)),
                     ("o_proj", (H, heads * hd)))]
        else:
            m = p + "mamba."
            out += [(m + "in_proj.weight", (2 * Di, H), True), (m + "x_proj.weight", (R + 2 * N, Di), True),
                    (m + "dt_proj.weight", (Di, R), True), (m + "out_proj.weight", (H, Di), True),
                    (m + "conv1d.weight", (Di, 1, K), False), (m + "A_log", (Di, N), False), (m + "D", (Di,), False),
                    (m + "dt_proj.bias", (Di,), False), (m + "norms", (R + 2 * N,), False)]
            out += [(m + "in_proj.bias", (2 * Di,), False), (m + "out_proj.bias", (H,), False)] if bias else []
            out += [(m + "conv1d.bias", (Di,), False)] if config.mamba_conv_bias else []
        f = p + "feed_forward."
        if experts > 1:
            out += [(f + "router.weight", (E, H), False), (f + "experts.gate_up_proj", (E, 2 * I, H), True),
                    (f + "experts.down_proj", (E, H, I), True)]
        else:
            out += [(f + f"{n}.weight", s, True) for n, s in
                    (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I)))]
    return out


def weight_bytes(config: JambaConfig, quantize: str | None = None, weight_dtype: str = "bf16",
                 skip_mamba: bool = False, group_size: int | None = None) -> dict[str, int]:
    """Bytes of the weights, tensor by tensor as `openjamba.quant` stores them (int8 scales in fp32, int4 scales and
    zeros in bf16).

    `skip_mamba` keeps the Mamba mixers' projections in `weight_dtype` (the Jamba-v0.1 model card's 8-bit recipe,
    `llm_int8_skip_modules=["mamba"]`). Returns {"quantized", "full_precision", "total"} bytes.
    """
    from . import quant

    quant.check_method(quantize)
    group_size = group_size or quant.DEFAULT_GROUP_SIZE
    full = quantized = 0
    for name, shape, quantizable in weight_shapes(config):
        if quantize and quantizable and not (skip_mamba and ".mamba." in name):
            made = quant.empty_quantized(shape, quantize, group_size, device="meta")
            copies = 2 if name == "lm_head.weight" and config.tie_word_embeddings and quantize == "int4" else 1
            quantized += copies * sum(t.numel() * t.element_size() for t in made.values())
        else:
            numel = 1
            for d in shape:
                numel *= d
            full += numel * DTYPE_BYTES[weight_dtype]
    return {"quantized": quantized, "full_precision": full, "total": quantized + full}


def activation_bytes_per_token(config: JambaConfig, dtype: str = "bf16") -> int:
    """An allowance for the activations of one unchunked prefill, per token of context: the largest working set of a
    Mamba layer (layer input and residual 2H, in_proj output 2Di, conv output Di, dt Di, scan output Di). An
    estimate of what an implementation without chunking keeps alive, not a measurement."""
    values = 2 * config.hidden_size + 5 * config.mamba_inner_size if config.mamba_layer_indices else \
        2 * config.hidden_size + 2 * config.intermediate_size
    return values * DTYPE_BYTES[dtype]


def parse_bytes(text: str) -> int:
    """'80GB' (10^9), '80GiB' (2^30), '512MB', '1e9'."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot parse a memory size from {text!r} (examples: 80GB, 24GiB, 512MB)")
    units = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    return int(float(match.group(1)) * units[(match.group(2) or "B").lower()])


def context_that_fits(config: JambaConfig, device_bytes: int, quantize: str | None = None, weight_dtype: str = "bf16",
                      cache_dtype: str = "bf16", skip_mamba: bool = False, reserve_fraction: float = 0.1,
                      batch: int = 1) -> dict[str, Any]:
    """The largest context (batch 1 by default) whose weights, K/V cache, Mamba state and activation allowance fit
    in `device_bytes` after reserving `reserve_fraction` of it (CUDA context, allocator fragmentation, framework).

    tokens = (device - reserve - weights - Mamba state) / (K/V bytes per token + activation bytes per token)
    """
    weights = weight_bytes(config, quantize, weight_dtype, skip_mamba)
    reserve = int(device_bytes * reserve_fraction)
    state = mamba_state_bytes(config, batch, cache_dtype)
    kv_per_token = kv_cache_bytes(config, 1, batch, cache_dtype)
    act_per_token = activation_bytes_per_token(config, weight_dtype) * batch
    free = device_bytes - reserve - weights["total"] - state
    tokens = max(0, free // (kv_per_token + act_per_token))
    return {"device_bytes": device_bytes, "reserve_bytes": reserve, "reserve_fraction": reserve_fraction,
            "weight_bytes": weights, "mamba_state_bytes": state, "kv_bytes_per_token": kv_per_token,
            "activation_bytes_per_token": act_per_token, "free_bytes": free, "max_context": int(tokens),
            "quantize": quantize, "skip_mamba": skip_mamba, "weight_dtype": weight_dtype, "batch": batch}


def format_fit(fit: dict[str, Any]) -> str:
    w = fit["weight_bytes"]
    scheme = fit["quantize"] or fit["weight_dtype"]
    if fit["quantize"] and fit["skip_mamba"]:
        scheme += f" (Mamba layers in {fit['weight_dtype']})"
    per_token = fit["kv_bytes_per_token"] + fit["activation_bytes_per_token"]
    return "\n".join([
        f"weights ({scheme}): {human_bytes(w['total'])} = {human_bytes(w['quantized'])} quantized + "
        f"{human_bytes(w['full_precision'])} in {fit['weight_dtype']}",
        f"device {human_bytes(fit['device_bytes'])} - reserve {fit['reserve_fraction']:.0%} "
        f"({human_bytes(fit['reserve_bytes'])}: CUDA context, allocator, framework) - weights - Mamba state "
        f"{human_bytes(fit['mamba_state_bytes'])} = {human_bytes(fit['free_bytes'])} for the context",
        f"per token: K/V {fit['kv_bytes_per_token']:,} B + activation allowance "
        f"{fit['activation_bytes_per_token']:,} B (one unchunked prefill's Mamba working set) = {per_token:,} B",
        f"largest context: {human_bytes(fit['free_bytes'])} / {per_token:,} B = {fit['max_context']:,} tokens "
        f"(batch {fit['batch']})" if fit["free_bytes"] >= 0 else
        f"no context fits: the weights and state are {human_bytes(-fit['free_bytes'])} over"
        + ("" if fit["quantize"] == "int4" else " (--quantize int8 or int4 shrinks the weights)"),
    ])
