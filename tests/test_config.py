from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from openjamba import PRESETS, JambaConfig, JambaForCausalLM, get_preset
from openjamba.info import count_parameters, forward_flops, kv_cache_bytes

from .conftest import CONFIGS, make_config

FIXTURES = Path(__file__).parent / "fixtures"


def test_defaults_are_jamba_v01_and_match_transformers():
    transformers = pytest.importorskip("transformers")
    theirs = transformers.JambaConfig().to_dict()
    ours = JambaConfig().to_dict()
    shared = [k for k in ours if k in theirs and k not in ("architectures", "transformers_version", "dtype")]
    assert len(shared) > 30
    for key in shared:
        assert ours[key] == theirs[key], key
    assert JambaConfig().mamba_dt_rank == 256


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_layer_plan_matches_transformers(name):
    transformers = pytest.importorskip("transformers")
    ours = make_config(name)
    data = {k: v for k, v in ours.to_dict().items() if k not in ("architectures", "model_type")}
    theirs = transformers.JambaConfig(**data)
    assert ours.layers_block_type == theirs.layers_block_type
    assert ours.layers_num_experts == theirs.layers_num_experts


def test_jamba_v01_layer_plan():
    config = JambaConfig()
    assert config.attention_layer_indices == [4, 12, 20, 28]
    assert [i for i, n in enumerate(config.layers_num_experts) if n > 1] == list(range(1, 32, 2))


@pytest.mark.parametrize("fixture", sorted(p.name for p in FIXTURES.glob("config_*.json")))
def test_reads_configs_written_by_transformers_4_and_5_and_remote_code(fixture):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # their bookkeeping keys are known: no warning
        config = JambaConfig.from_pretrained(FIXTURES / fixture)
    data = json.loads((FIXTURES / fixture).read_text())
    assert config.hidden_size == data["hidden_size"]
    assert config.mamba_dt_rank == data.get("mamba_dt_rank", config.mamba_dt_rank)


def test_unknown_keys_are_kept_and_warned(tmp_path):
    data = JambaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2).to_dict()
    data["my_new_field"] = {"x": 1}
    with pytest.warns(UserWarning, match="my_new_field"):
        config = JambaConfig.from_dict(data)
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["my_new_field"] == {"x": 1}


def test_round_trip(tmp_path):
    config = make_config("moe-period3-two-attention")
    config.save_pretrained(tmp_path)
    assert JambaConfig.from_pretrained(tmp_path) == config


def test_dt_rank_auto():
    assert JambaConfig(hidden_size=100, num_attention_heads=4, num_key_value_heads=2).mamba_dt_rank == 7


@pytest.mark.parametrize("change, field", [
    (dict(attn_layer_offset=8), "attn_layer_offset"),
    (dict(expert_layer_offset=2), "expert_layer_offset"),
    (dict(num_attention_heads=5), "num_attention_heads"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(num_experts_per_tok=17), "num_experts_per_tok"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(mamba_d_state=-1), "mamba_d_state"),
    (dict(num_hidden_layers=0), "num_hidden_layers"),
    (dict(sliding_window=4096), "sliding_window"),  # not silently ignored: attention always sees everything
])
def test_validation_names_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        JambaConfig(**change)


def test_bad_json_and_wrong_model_type(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        JambaConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type"):
        JambaConfig.from_dict({"model_type": "llama"})
    with pytest.raises(FileNotFoundError):
        JambaConfig.from_pretrained(tmp_path / "missing")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid(name):
    assert get_preset(name).num_hidden_layers > 0


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parameter_count_matches_the_model(name):
    """The formula from a config (info.count_parameters) against the model's own count of what it holds."""
    config = make_config(name)
    model = JambaForCausalLM(config)
    counts = count_parameters(config)
    assert counts["total"] == sum(p.numel() for p in model.parameters()) == model.num_parameters()
    assert counts["active"] == model.num_parameters(active=True)
    assert (counts["active"] < counts["total"]) == (config.num_experts > config.num_experts_per_tok)


def test_paper_memory_table():
    """Paper Table 1: 52B/12B active and 4GB KV at 256K for Jamba; 32GB Mixtral/Mistral; 128GB Llama-2-7B."""
    gib = 2**30
    counts = count_parameters(get_preset("jamba-v0.1"))
    assert round(counts["total"] / 1e9) == 52 and round(counts["active"] / 1e9) == 12
    assert kv_cache_bytes(get_preset("jamba-v0.1"), 262144) == 4 * gib
    assert kv_cache_bytes(get_preset("jamba-1.5-large"), 262144) == 9 * gib
    assert kv_cache_bytes(get_preset("mixtral-8x7b"), 262144) == 32 * gib
    assert kv_cache_bytes(get_preset("mistral-7b"), 262144) == 32 * gib
    assert kv_cache_bytes(get_preset("llama-2-7b"), 262144) == 128 * gib
    assert round(count_parameters(get_preset("mixtral-8x7b"))["total"] / 1e8) == 467
    assert round(count_parameters(get_preset("mixtral-8x7b"))["active"] / 1e8) == 129
    assert round(count_parameters(get_preset("mistral-7b"))["total"] / 1e8) == 72
    assert round(count_parameters(get_preset("llama-2-7b"))["total"] / 1e8) == 67


@pytest.mark.parametrize("name", ["moe-gqa", "dense-mha-biases-tied", "moe-period3-two-attention"])
def test_forward_flops_counts_every_linear_layer_a_token_uses(name):
    """At one token with no context, attention and scan terms are known in closed form; the rest must equal
    2 x the weights of the linear layers one token touches, read off a built model (top-k of each MoE's experts)."""
    config = make_config(name)
    model = JambaForCausalLM(config)
    linear = 0
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            linear += module.weight.numel()
        elif module_name.endswith("experts"):  # fused (E, 2I, H) and (E, H, I): a token uses top-k of E
            linear += sum(p.numel() for p in module.parameters()) * config.num_experts_per_tok // config.num_experts
    attention_scores = 2 * 2 * config.num_attention_heads * config.head_dim * len(config.attention_layer_indices)
    Di, N, K = config.mamba_inner_size, config.mamba_d_state, config.mamba_d_conv
    conv_and_scan = (2 * K * Di + 9 * Di * N) * len(config.mamba_layer_indices)
    assert forward_flops(config, tokens=1) == 2 * linear + attention_scores + conv_and_scan


def test_forward_flops_attention_grows_with_context_and_batch():
    config = make_config()
    base = forward_flops(config, tokens=4)
    per_key = 2 * 2 * config.num_attention_heads * config.head_dim * len(config.attention_layer_indices)
    assert forward_flops(config, tokens=4, past=10) - base == per_key * 4 * 10
    assert forward_flops(config, tokens=4, batch=3) == 3 * base
    lm_head = 2 * config.hidden_size * config.vocab_size
    assert base - forward_flops(config, tokens=4, logits=1) == 3 * lm_head
