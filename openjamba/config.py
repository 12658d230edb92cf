"""JambaConfig: the Hugging Face `config.json` of a Jamba model as a dataclass, plus named presets.

Field names and defaults are exactly those of transformers' `JambaConfig` (the defaults are the Jamba-v0.1
shape), so a `config.json` written by transformers 4.x or 5.x loads here and ours loads there. The layer plan
(attention or Mamba mixer; MoE or dense MLP per layer) is derived from the period/offset fields the same way
transformers derives it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .files import write_atomic

# Keys transformers writes into config.json that carry no architecture information for us: kept, not warned.
_HF_BOOKKEEPING_KEYS = {
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "_name_or_path",
    "quantization_config",  # written by `openjamba quantize`, read by hf.load_pretrained
    "use_mambapy", "use_associative_scan", "auto_map", "return_dict", "output_hidden_states",
    "output_attentions", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "tie_encoder_decoder", "id2label", "label2id", "problem_type", "tokenizer_class", "prefix",
    "task_specific_params", "finetuning_task", "cross_attention_hidden_size", "decoder_start_token_id",
    "sep_token_id", "torchscript", "pruned_heads", "layer_types", "_attn_implementation_autoset",
    "calc_logits_for_entire_prompt", "mamba_inner_layernorms", "n_ctx", "head_dim",
}


# Fields that decide the tensors' shapes and the layer plan: a config.json without one of them is refused rather
# than filled with Jamba-v0.1's default, which would build a different model than the weights describe.
ARCHITECTURE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_experts",
    "num_experts_per_tok", "expert_layer_period", "expert_layer_offset", "attn_layer_period", "attn_layer_offset",
    "mamba_d_state", "mamba_d_conv", "mamba_expand",
)


@dataclass
class JambaConfig:
    """Architecture of a Jamba model. Defaults reproduce ai21labs/Jamba-v0.1."""

    vocab_size: int = 65536
    tie_word_embeddings: bool = False
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    num_logits_to_keep: int = 1
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    sliding_window: int | None = None
    max_position_embeddings: int = 262144
    attention_dropout: float = 0.0
    num_experts_per_tok: int = 2
    num_experts: int = 16
    expert_layer_period: int = 2
    expert_layer_offset: int = 1
    attn_layer_period: int = 8
    attn_layer_offset: int = 4
    use_mamba_kernels: bool = True
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: int | str = "auto"
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    # Keys of a config.json that are not fields above, kept so that saving writes them back.
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.mamba_dt_rank == "auto" and isinstance(self.hidden_size, int):  # else validate() names the field
            self.mamba_dt_rank = math.ceil(self.hidden_size / 16)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError naming the offending field for any inconsistent architecture."""
        positive = [
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "num_experts", "num_experts_per_tok", "expert_layer_period",
            "attn_layer_period", "mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_dt_rank",
        ]
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("attn_layer_offset", "expert_layer_offset"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.attn_layer_offset >= self.attn_layer_period:
            raise ValueError(
                f"attn_layer_offset ({self.attn_layer_offset}) must be smaller than "
                f"attn_layer_period ({self.attn_layer_period}): set both (e.g. --set attn_layer_offset="
                f"{self.attn_layer_period // 2})"
            )
        if self.expert_layer_offset >= self.expert_layer_period:
            raise ValueError(
                f"expert_layer_offset ({self.expert_layer_offset}) must be smaller than "
                f"expert_layer_period ({self.expert_layer_period})"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must divide hidden_size ({self.hidden_size})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.num_experts > 1 and self.num_experts_per_tok > self.num_experts:  # 1 expert: plain MLPs, no router
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must not exceed num_experts ({self.num_experts})"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act must be 'silu' (the only activation Jamba uses), got {self.hidden_act!r}")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
        if self.sliding_window is not None:
            raise ValueError(f"sliding_window={self.sliding_window!r} is not supported: openjamba's attention layers "
                             "see the whole context, as Jamba's do (transformers applied it only in its v4 "
                             "flash-attention path); set it to null")

    # ------------------------------------------------------------------ derived shape
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def mamba_inner_size(self) -> int:
        """Channels of the Mamba mixer (d_inner = expand * hidden)."""
        return self.mamba_expand * self.hidden_size

    @property
    def layers_block_type(self) -> list[str]:
        """Per layer: "attention" or "mamba" (transformers' rule: i % period == offset is attention)."""
        return [
            "attention" if i % self.attn_layer_period == self.attn_layer_offset else "mamba"
            for i in range(self.num_hidden_layers)
        ]

    @property
    def layers_num_experts(self) -> list[int]:
        """Per layer: number of experts; 1 means a dense MLP (transformers' rule)."""
        return [
            self.num_experts if i % self.expert_layer_period == self.expert_layer_offset else 1
            for i in range(self.num_hidden_layers)
        ]

    @property
    def attention_layer_indices(self) -> list[int]:
        return [i for i, kind in enumerate(self.layers_block_type) if kind == "attention"]

    @property
    def mamba_layer_indices(self) -> list[int]:
        return [i for i, kind in enumerate(self.layers_block_type) if kind == "mamba"]

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    def layer_plan(self) -> list[str]:
        """Human-readable per-layer plan, e.g. ["mamba+mlp", "mamba+moe", ...]."""
        return [
            f"{kind}+{'moe' if n > 1 else 'mlp'}" for kind, n in zip(self.layers_block_type, self.layers_num_experts)
        ]

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, data: dict[str, Any], warn_unknown: bool = True) -> JambaConfig:
        """Build from a config.json dict. Unknown keys are kept in `extra` (and warned about), never fatal."""
        names = {f.name for f in dataclasses.fields(cls) if f.name != "extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        if "model_type" in extra and extra["model_type"] not in ("jamba", None):
            raise ValueError(f"model_type is {extra['model_type']!r}, expected 'jamba'")
        surprising = sorted(k for k in extra if k not in _HF_BOOKKEEPING_KEYS)
        if surprising and warn_unknown:
            warnings.warn(f"JambaConfig: unknown config keys kept but unused: {', '.join(surprising)}", stacklevel=2)
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The config.json content: every field, then the kept extra keys, with HF's bookkeeping keys."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        for key, value in self.extra.items():
            out.setdefault(key, value)
        out["model_type"] = "jamba"
        out["architectures"] = ["JambaForCausalLM"]
        return dict(sorted(out.items()))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> JambaConfig:
        """Read `config.json` from a checkpoint directory (or the file itself)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no config.json found at {path}")
        try:
            data = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{file} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{file} must hold a JSON object of config fields, found a {type(data).__name__}")
        missing = [name for name in ARCHITECTURE_FIELDS if name not in data]
        if missing:
            raise ValueError(f"{file} lacks {', '.join(missing)}: these define the architecture and have no safe "
                             "default (a released Jamba config.json has them all)")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{file}: {err}") from None

    def save_pretrained(self, path: str | Path, dtype: str | None = None) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        if dtype is not None:
            data["dtype"] = dtype
            data["torch_dtype"] = dtype
        write_atomic(path / "config.json", json.dumps(data, indent=2) + "\n")

    def replace(self, **changes: Any) -> JambaConfig:
        """A copy with some fields changed (re-validated)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data.update(changes)
        if changes.get("hidden_size") is not None and "mamba_dt_rank" not in changes:
            data["mamba_dt_rank"] = "auto"
        return JambaConfig(**data)


# ---------------------------------------------------------------------- presets
def _attention_only(**kw: Any) -> dict[str, Any]:
    """An attention-only transformer expressed as a Jamba config (every layer attention)."""
    return {"attn_layer_period": 1, "attn_layer_offset": 0, **kw}


# Jamba 1.5/1.6/1.7 Mini: v0.1's shape; EOS <|endoftext|> (2) and <|eom|> (518), from their config.json.
_JAMBA_MINI = dict(eos_token_id=[2, 518])
# Jamba 1.5/1.6/1.7 Large: 9 blocks of 8 layers, hidden 8192, 64/8 heads. Inferred, not read from a config file:
# the intermediate size (24576, from 398B total / 94B active parameters) and dt_rank (hidden/16 = 512, the rule
# every other release follows).
_JAMBA_LARGE = dict(hidden_size=8192, intermediate_size=24576, num_hidden_layers=72, num_attention_heads=64,
                    num_key_value_heads=8, eos_token_id=[2, 518])
# Jamba Reasoning 3B = Jamba2-3B, from a third-party copy of its config.json: 28 layers, attention at 7 and 21 only,
# 20 query heads sharing one K/V head (1 KiB of 16-bit K/V per token), dense MLPs, tied embeddings, EOS [2, 519].
_JAMBA2_3B = dict(hidden_size=2560, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=20,
                  num_key_value_heads=1, attn_layer_period=14, attn_layer_offset=7, num_experts=1,
                  num_experts_per_tok=1, mamba_dt_rank=160, tie_word_embeddings=True, eos_token_id=[2, 519])
# Jamba2 Mini: the Mini shape (third-party copy of its config.json), which names 519 as EOS; 2 (<|endoftext|>) is
# kept beside it as in every other release (inferred).
_JAMBA2_MINI = dict(eos_token_id=[2, 519])

PRESETS: dict[str, dict[str, Any]] = {
    # Small enough to train and run in seconds on a laptop CPU: one Jamba block of 8 layers.
    "tiny": dict(
        vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=262144,
    ),
    # The README's main job: trains on two CPU cores in minutes. One short Jamba block: Mamba, Mamba+MoE,
    # attention, Mamba+MoE; a small SSM state keeps the CPU scan cheap.
    "quickstart": dict(
        vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, attn_layer_period=4, attn_layer_offset=2,
        mamba_d_state=8, max_position_embeddings=262144,
    ),
    # The CPU benchmark's model (hidden 256, 8 layers, 4 experts top-2): one Jamba block, big enough that
    # matrix multiplies dominate, small enough for 32K-token prompts on a laptop.
    "cpu-bench": dict(
        vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=262144,
    ),
    # The GPU benchmark's model: ~1.07B parameters (0.77B active), two Jamba blocks of 8 layers.
    "gpu-1b": dict(
        vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=12,
        num_key_value_heads=4, num_experts=4, num_experts_per_tok=2, max_position_embeddings=262144,
    ),
    # The released family (shapes: docs of the checkpoints' config.json files, gathered in serving.md). Every one
    # keeps v0.1's architecture; the table below is all that differs.
    "jamba-v0.1": {},
    "jamba-1.5-mini": _JAMBA_MINI,
    "jamba-1.6-mini": _JAMBA_MINI,
    "jamba-1.7-mini": _JAMBA_MINI,
    "jamba-1.5-large": _JAMBA_LARGE,
    "jamba-1.6-large": _JAMBA_LARGE,
    "jamba-1.7-large": _JAMBA_LARGE,
    "jamba-reasoning-3b": _JAMBA2_3B,
    "jamba2-3b": _JAMBA2_3B,  # the same checkpoint shape under its Jamba2 name
    "jamba2-mini": _JAMBA2_MINI,
    # Attention-only reference points of the paper's memory table, in the same config language.
    "mixtral-8x7b": _attention_only(
        vocab_size=32000, num_experts=8, num_experts_per_tok=2, expert_layer_period=1, expert_layer_offset=0,
    ),
    "mistral-7b": _attention_only(vocab_size=32000, num_experts=1, num_experts_per_tok=1),
    "llama-2-7b": _attention_only(
        vocab_size=32000, intermediate_size=11008, num_key_value_heads=32, num_experts=1, num_experts_per_tok=1,
    ),
}


def get_preset(name: str, **overrides: Any) -> JambaConfig:
    """A named preset, optionally with fields overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return JambaConfig(**{**copy.deepcopy(PRESETS[name]), **overrides})  # aliases share one dict: copy it


def attention_only_config(config: JambaConfig) -> JambaConfig:
    """The attention-only model of equal shape: every Mamba mixer replaced by attention, same FFN plan."""
    return config.replace(attn_layer_period=1, attn_layer_offset=0)
