"""Numerical parity with transformers' JambaForCausalLM (the oracle), in fp32, through the one converter."""

from __future__ import annotations

import pytest
import torch

from openjamba import JambaForCausalLM

from .conftest import CONFIGS, left_padded_batch, make_config, randomize_

transformers = pytest.importorskip("transformers")

ATOL = 1e-4


def hf_model(name: str, seed: int = 0):
    """A random transformers Jamba model of the named tiny config."""
    ours = make_config(name)
    data = {k: v for k, v in ours.to_dict().items() if k not in ("architectures", "model_type")}
    config = transformers.JambaConfig(**data)
    torch.manual_seed(seed)
    return randomize_(transformers.JambaForCausalLM(config), seed).eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(name, transformers model, our model loaded from what transformers saved)."""
    hf = hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, JambaForCausalLM.from_pretrained(path)


@torch.no_grad()
def test_logits_match(pair):
    _, hf, ours = pair
    ids = torch.randint(0, hf.config.vocab_size, (3, 37), generator=torch.Generator().manual_seed(1))
    expected = hf(ids).logits
    got = ours(ids).logits
    assert expected.abs().max() > 0.5, "logits too small for the comparison to mean anything"
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@torch.no_grad()
def test_logits_to_keep(pair):
    _, hf, ours = pair
    ids = torch.randint(0, hf.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(ours(ids, logits_to_keep=3).logits, hf(ids, logits_to_keep=3).logits, atol=ATOL, rtol=0)


@torch.no_grad()
def test_loss_and_aux_loss_match(pair):
    _, hf, ours = pair
    # transformers' padded outputs differ when in_proj has a bias (see below), so that config is compared unpadded.
    lengths = [14, 14, 14] if ours.config.mamba_proj_bias else [9, 14, 5]
    ids, mask, _ = left_padded_batch(lengths, hf.config.vocab_size, seed=3)
    # A row's first real token is predicted from a padding position, whose output is meaningless: ignore it.
    first_real = torch.cat([mask[:, :1], mask[:, 1:] > mask[:, :-1]], dim=1).bool()
    labels = ids.masked_fill((mask == 0) | first_real, -100)
    moe = ours.config.num_experts > 1  # transformers fails on output_router_logits without MoE layers
    expected = hf(ids, attention_mask=mask, labels=labels, output_router_logits=moe)
    got = ours(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(got.loss, expected.loss, atol=ATOL, rtol=0)
    if moe:
        torch.testing.assert_close(got.aux_loss, expected.aux_loss, atol=1e-5, rtol=0)
    else:
        assert got.aux_loss is None


@torch.no_grad()
def test_left_padded_batch_matches_transformers(pair):
    name, hf, ours = pair
    if ours.config.mamba_proj_bias:
        pytest.skip("transformers masks before in_proj, so its padded output differs when in_proj has a bias; "
                    "our padded-vs-alone equality is tested in test_cache.py")
    ids, mask, _ = left_padded_batch([12, 5, 9], hf.config.vocab_size, seed=4)
    expected = hf(ids, attention_mask=mask).logits
    got = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=ATOL, rtol=0)


@torch.no_grad()
def test_greedy_generation_is_token_identical(pair):
    _, hf, ours = pair
    prompt = torch.randint(3, hf.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(5))
    expected = hf.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = ours.generate(prompt, max_new_tokens=24, eos_token_id=[])
    assert torch.equal(got, expected)


@torch.no_grad()
def test_greedy_generation_left_padded_batch_matches_transformers(pair):
    name, hf, ours = pair
    if ours.config.mamba_proj_bias:
        pytest.skip("see test_left_padded_batch_matches_transformers")
    ids, mask, _ = left_padded_batch([6, 10, 3], hf.config.vocab_size, seed=6)
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(got, expected)


@torch.no_grad()
def test_greedy_generation_with_a_repetition_penalty_matches_transformers(pair):
    _, hf, ours = pair
    ids, mask, _ = left_padded_batch([5, 9], hf.config.vocab_size, seed=8)
    for penalty in (1.3, 0.7):
        expected = hf.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=None,
                               pad_token_id=0, repetition_penalty=penalty)
        got = ours.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=[], repetition_penalty=penalty)
        assert torch.equal(got, expected)
        assert not torch.equal(got, ours.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=[]))


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_our_checkpoint_loads_in_transformers(name, tmp_path):
    torch.manual_seed(0)
    ours = randomize_(JambaForCausalLM(make_config(name)), seed=7).eval()
    ours.save_pretrained(tmp_path, max_shard_size="20KB")  # sharded, to exercise the index too
    assert (tmp_path / "model.safetensors.index.json").is_file()
    hf = transformers.JambaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(hf(ids).logits, ours(ids).logits, atol=ATOL, rtol=0)


@torch.no_grad()
def test_fused_expert_layout_loads(tmp_path):
    """transformers 5.x's in-memory layout (experts.gate_up_proj / experts.down_proj) is accepted on disk too."""
    from safetensors.torch import save_file

    hf = hf_model("moe-gqa", seed=9)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    hf.config.save_pretrained(tmp_path)
    ours = JambaForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, hf.config.vocab_size, (1, 13), generator=torch.Generator().manual_seed(10))
    torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=ATOL, rtol=0)
