"""Presets of the released Jamba family: shapes, stop ids, and `openjamba info --preset` for every preset."""

from __future__ import annotations

import pytest

from openjamba import PRESETS, get_preset
from openjamba.cli import main
from openjamba.info import count_parameters, kv_cache_bytes

RELEASED = {  # name: (layers, hidden, attention layers, EOS ids)
    "jamba-v0.1": (32, 4096, 4, 2),
    "jamba-1.5-mini": (32, 4096, 4, [2, 518]),
    "jamba-1.6-mini": (32, 4096, 4, [2, 518]),
    "jamba-1.7-mini": (32, 4096, 4, [2, 518]),
    "jamba-1.5-large": (72, 8192, 9, [2, 518]),
    "jamba-1.6-large": (72, 8192, 9, [2, 518]),
    "jamba-1.7-large": (72, 8192, 9, [2, 518]),
    "jamba-reasoning-3b": (28, 2560, 2, [2, 519]),
    "jamba2-3b": (28, 2560, 2, [2, 519]),
    "jamba2-mini": (32, 4096, 4, [2, 519]),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_shapes(name):
    layers, hidden, attention, eos = RELEASED[name]
    config = get_preset(name)
    assert (config.num_hidden_layers, config.hidden_size, config.eos_token_id) == (layers, hidden, eos)
    assert config.layers_block_type.count("attention") == attention
    assert config.hidden_size // config.num_attention_heads == 128 and config.vocab_size == 65536


def test_reasoning_3b_is_jamba2_3b():
    config = get_preset("jamba-reasoning-3b")
    assert config == get_preset("jamba2-3b")
    assert [i for i, t in enumerate(config.layers_block_type) if t == "attention"] == [7, 21]
    assert config.tie_word_embeddings and config.num_experts == 1 and config.mamba_dt_rank == 160
    assert kv_cache_bytes(config, 262144) == 256 * 2**20  # 1 KiB per token in 16 bits
    assert round(count_parameters(config)["total"] / 1e9, 1) == 3.0
    get_preset("jamba-reasoning-3b").eos_token_id.append(7)  # presets hand out copies
    assert get_preset("jamba2-3b").eos_token_id == [2, 519]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_info_runs_for_every_preset(name, capsys):
    main(["info", "--preset", name])
    out = capsys.readouterr().out
    assert f"model {name}:" in out and "parameters:" in out
