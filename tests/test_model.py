from __future__ import annotations

import math

import pytest
import torch

from openjamba import JambaForCausalLM, get_preset
from openjamba.model import MambaMixer

from .conftest import make_config, random_model


def test_gradients_reach_every_parameter(config_name):
    model = random_model(config_name).train()
    ids = torch.randint(0, model.config.vocab_size, (4, 48), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_gradient_checkpointing_gives_the_same_gradients():
    model = random_model().train()
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    model(ids, labels=ids).loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing = True
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], atol=1e-6, rtol=1e-5, msg=n)


def test_initialisation():
    torch.manual_seed(0)
    model = JambaForCausalLM(make_config())
    mixer = next(m for m in model.modules() if isinstance(m, MambaMixer))
    n = mixer.state_size
    torch.testing.assert_close(mixer.A_log[3], torch.log(torch.arange(1, n + 1, dtype=torch.float32)))
    assert torch.all(mixer.D == 1)
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-4 * 0.99 and dt.max() <= 0.1 * 1.01  # Mamba's dt init, log-uniform in [1e-3, 0.1]
    assert abs(model.lm_head.weight.std().item() - 0.02) < 0.005
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    out = model(ids, labels=ids)
    assert abs(out.loss.item() - out.aux_loss.item() * model.config.router_aux_loss_coef
               - math.log(model.config.vocab_size)) < 0.1  # near-uniform predictions at init
    assert abs(out.aux_loss.item() - model.config.num_experts_per_tok) < 0.2  # balanced router at init


def test_tied_embeddings_share_storage():
    model = random_model("dense-mha-biases-tied")
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_attention_only_and_mamba_only_models_run():
    for overrides in (dict(attn_layer_period=1, attn_layer_offset=0), dict(attn_layer_period=8, attn_layer_offset=7)):
        model = random_model(**overrides)
        ids = torch.randint(0, model.config.vocab_size, (2, 9))
        assert model(ids).logits.shape == (2, 9, model.config.vocab_size)


def test_tiny_preset_forward():
    model = JambaForCausalLM(get_preset("tiny"))
    ids = torch.randint(0, 4096, (1, 33))
    assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_low_precision_forward_is_close_to_fp32(dtype):
    model = random_model()
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits
        low = model.to(dtype)(ids).logits.float()
    assert (low - ref).abs().max() < 0.1 * ref.abs().max()


def test_single_token_experts_match_the_grouped_path():
    """A decode step (one token) skips the grouping by expert; it must give what the grouped path gives that token."""
    model = random_model(num_experts=4, num_experts_per_tok=2)
    moe = next(layer.feed_forward for layer in model.model.layers if layer.is_moe)
    x = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(4), requires_grad=True)
    weight, index = torch.topk(torch.softmax(moe.router(x), -1), 2, dim=-1)
    grouped = moe.experts(x, index, weight)  # three tokens: grouped by expert
    for row in range(3):
        single = moe.experts(x[row:row + 1], index[row:row + 1], weight[row:row + 1])
        torch.testing.assert_close(single, grouped[row:row + 1], atol=1e-6, rtol=1e-6)
    single.sum().backward()  # and it is differentiable
    assert x.grad is not None and moe.experts.gate_up_proj.grad is not None
