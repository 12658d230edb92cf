"""The decode step bound to a layer's weights (ops/cpu_layer_step.py over layer_step.cpp): a whole Mamba or attention
layer's step in one kernel call, equal to the op-by-op step for every weight format and FFN kind, declining what it
cannot take, and rebound whenever the weights change (swaps, moves, in-place edits: ops/prepared.py)."""

from __future__ import annotations

import pytest
import torch

from openjamba import quant
from openjamba.cache import KVCache
from openjamba.hf import FP32_PARAMS, keep_fp32
from openjamba.model import AttentionMask, MambaMixer
from openjamba.ops import cpu_kernels, decode, prepared

from .conftest import random_model
from .test_decode_kernels import randn

AVAILABLE, WHY = cpu_kernels.is_available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"CPU kernels unavailable: {WHY}")

def test_bound_mamba_layer_step_declines_a_state_of_another_shape():
    """The one-call layer step trusts its state's extents: a conv window or SSM state of other rows or channels than
    its rows and weights make it decline (None: the layer then runs op by op, where torch checks shapes)."""
    model = random_model(hidden_size=128, mamba_dt_rank=32, intermediate_size=96)
    index, layer = next((i, la) for i, la in enumerate(model.model.layers) if not la.is_attention)
    x = randn(2, 128, dtype=torch.float32, seed=7)
    state = model.make_cache(2).layers[index]
    conv, ssm = state.conv, state.ssm
    with torch.no_grad():
        step = layer._prepared_step(x, None)
        assert step is not None and step(x, conv, ssm) is not None
        for window, h in [(conv[:1].clone(), ssm), (conv, ssm[:1].clone()), (torch.zeros(2, conv.shape[1], 1), ssm),
                          (conv, torch.zeros(2, ssm.shape[1], 2 * ssm.shape[2]))]:
            assert step(x, window, h) is None


@pytest.mark.parametrize("method, moe", [(None, False), (None, True), *((m, False) for m in quant.METHODS)])
def test_mamba_layer_is_one_call(monkeypatch, method, moe):
    """A Mamba layer with fp32 or quantized weights and an MLP or (fp32) MoE decodes in one call of layer_step.cpp,
    which gives the bits its six parts give call by call (each part is the same kernel), the same on 1 and 2
    threads and for a row alone or in the batch; against the plain reference (torch's norms, conv and state update,
    the quantized products) it differs by ulps, which can move an int8 activation a step (bound: the activations'
    rounding, as in test_quant)."""
    model = random_model(hidden_size=128, mamba_dt_rank=32, intermediate_size=96)  # fp32 in/out_proj: linear.cpp's
    model = quant.quantize_model(model, method, 32) if method else model
    index, layer = next((i, la) for i, la in enumerate(model.model.layers) if not la.is_attention and la.is_moe == moe)
    x = randn(3, 128, dtype=torch.float32, seed=7)
    calls = []

    def counted(*args, _prepare=cpu_kernels.prepare_mamba_layer_step):
        step = _prepare(*args)
        return None if step is None else lambda *a: calls.append(1) or step(*a)

    monkeypatch.setattr(cpu_kernels, "prepare_mamba_layer_step", counted)

    def run(fn, rows=slice(None), threads=2):
        cache = model.make_cache(3)
        state = cache.layers[index]
        state.conv.copy_(randn(*state.conv.shape, dtype=torch.float32, seed=4))
        state.ssm.copy_(randn(*state.ssm.shape, dtype=torch.float32, seed=5))
        state.conv, state.ssm = state.conv[rows].clone(), state.ssm[rows].clone()
        saved = torch.get_num_threads()
        with monkeypatch.context() as m, torch.no_grad():  # every product and phase on `threads` threads
            m.setattr(cpu_kernels, "SERIAL_BELOW", 0)
            m.setattr(cpu_kernels, "LINEAR_SERIAL_BELOW", 0)
            torch.set_num_threads(threads)
            cpu_kernels.product_threads.cache_clear()
            try:
                return fn(x[rows].contiguous(), state), state.conv, state.ssm
            finally:
                torch.set_num_threads(saved)
                cpu_kernels.product_threads.cache_clear()

    def parts(x, state):  # the model's path call by call (no one-call op)
        with monkeypatch.context() as m:
            m.setattr(layer, "_prepared_step", lambda *a: None)
            return layer.decode_step(x, None, state)

    def reference(x, state):
        in_proj, out_proj, ffn, step_weights = layer.step_weights()
        step = (state.conv, state.ssm, *layer.mamba.step_params(step_weights))
        norms = [(n.weight, n.eps) for n in (layer.input_layernorm, layer.pre_ff_layernorm)]
        return decode.mamba_layer_step_ref(x, norms[0], in_proj, step, out_proj, norms[1], ffn)

    fused = run(lambda x, state: layer.decode_step(x, None, state))
    assert calls == [1]
    for got, expected in zip(fused, run(parts)):
        assert torch.equal(got, expected)
    for got, expected in zip(fused, run(lambda x, state: layer.decode_step(x, None, state), threads=1)):
        assert torch.equal(got, expected)
    alone = run(lambda x, state: layer.decode_step(x, None, state), rows=slice(1, 2))
    for got, expected in zip(alone, fused):
        assert torch.equal(got, expected[1:2])
    plain = run(reference)
    scale = 2e-2 if method else 1e-4
    torch.testing.assert_close(fused[0], plain[0], atol=scale * plain[0].abs().max().item(), rtol=0)
    for got, expected in zip(fused[1:], plain[1:]):
        torch.testing.assert_close(got, expected, atol=1e-4 * expected.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("method, moe", [(None, False), (None, True), *((m, False) for m in quant.METHODS)])
def test_attention_layer_is_one_call(monkeypatch, method, moe):
    """An attention layer (fp32 or quantized projections, an MLP or fp32 MoE) decodes in one call of layer_step.cpp
    that gives the bits of its ops one by one, the cache's new column included: 3 rows over all keys or from each
    row's own start (a serving batch), a row alone, 1 and 2 threads, a cache that must grow, and after its weights
    change. Masked steps (padding without row starts) are left to the op-by-op path."""
    model = random_model(hidden_size=256, num_attention_heads=8, intermediate_size=96,  # fp32 k_proj: linear.cpp's
                         expert_layer_offset=0 if moe else 1)
    model = quant.quantize_model(model, method, 32) if method else model
    layer = next(la for la in model.model.layers if la.is_attention)
    assert layer.is_moe == moe
    past, heads, head_dim = 5, layer.self_attn.num_kv_heads, layer.self_attn.head_dim
    x = randn(3, 256, dtype=torch.float32, seed=7)
    keys = [randn(3, heads, past, head_dim, dtype=torch.float32, seed=s) for s in (3, 4)]
    calls = []

    def counted(*args, _prepare=cpu_kernels.prepare_attention_layer_step):
        step = _prepare(*args)
        return None if step is None else lambda *a: calls.append(1) or step(*a)

    monkeypatch.setattr(cpu_kernels, "prepare_attention_layer_step", counted)

    def run(one_call=True, rows=slice(None), threads=2, starts=None):
        kv = KVCache(3, heads, head_dim, past, False, torch.float32, "cpu")  # full: the step makes room
        kv.k.copy_(keys[0]), kv.v.copy_(keys[1])
        kv.k, kv.v = kv.k[rows].clone(), kv.v[rows].clone()
        mask = AttentionMask(past, None, is_causal=False, row_starts=starts)
        saved = torch.get_num_threads()
        with monkeypatch.context() as m, torch.no_grad():
            m.setattr(cpu_kernels, "SERIAL_BELOW", 0)
            m.setattr(cpu_kernels, "LINEAR_SERIAL_BELOW", 0)
            if not one_call:
                m.setattr(layer, "_prepared_step", lambda *a: None)
            torch.set_num_threads(threads)
            cpu_kernels.product_threads.cache_clear()
            try:
                return layer.decode_step(x[rows].contiguous(), mask, kv), kv.k[:, :, :past + 1], kv.v[:, :, :past + 1]
            finally:
                torch.set_num_threads(saved)
                cpu_kernels.product_threads.cache_clear()

    def same(got, expected):
        for g, e in zip(got, expected):
            assert torch.equal(g, e)

    fused = run()
    assert calls == [1]
    same(fused, run(one_call=False))
    same(fused, run(threads=1))
    same(run(rows=slice(1, 2)), (t[1:2] for t in fused))
    same(run(starts=[0, 3, 5]), run(one_call=False, starts=[0, 3, 5]))
    with torch.no_grad():
        layer.pre_ff_layernorm.weight.mul_(0.5)  # in place: read through the bound step's pointers
        layer.self_attn.o_proj = quant.quantize_model(model, "int8", 32).model.layers[2].self_attn.o_proj
    changed = run()
    assert not torch.equal(changed[0], fused[0])
    same(changed, run(one_call=False))
    with monkeypatch.context() as m:  # a mask (padding, no row starts): op by op
        m.setattr(cpu_kernels, "prepare_attention_layer_step", lambda *a: pytest.fail("bound for a masked step"))
        prepared._KEPT.pop(layer)
        with torch.no_grad():
            mask = AttentionMask(past, torch.ones(3, 1, 1, past + 1, dtype=torch.bool), is_causal=False)
            layer.decode_step(x, mask, KVCache(3, heads, head_dim, past + 1, False, torch.float32, "cpu"))


def test_decay_rates_follow_A_log():
    """The mixer's kept A = -exp(A_log) (what every decode step reads) follows A_log through in-place updates
    (an optimizer step, load_state_dict), conversions and replacement, and is computed afresh, with its gradient,
    under autograd."""
    mixer = next(layer.mamba for layer in random_model().model.layers if not layer.is_attention)
    with torch.no_grad():
        first = mixer.decay_rates()
        assert mixer.decay_rates() is first  # kept between steps
        assert torch.equal(first, -torch.exp(mixer.A_log))
        mixer.A_log.mul_(0.5)  # in place: the same tensor and storage, a new version
        assert torch.equal(mixer.decay_rates(), -torch.exp(mixer.A_log))
        mixer.load_state_dict({**mixer.state_dict(), "A_log": torch.zeros_like(mixer.A_log)})
        assert torch.equal(mixer.decay_rates(), -torch.ones_like(first))
        mixer.double()
        assert mixer.decay_rates().dtype == torch.float64
        mixer.A_log = torch.nn.Parameter(torch.full_like(mixer.A_log, 2.0))
        assert torch.equal(mixer.decay_rates(), -torch.exp(torch.full_like(mixer.A_log, 2.0)))
    A = mixer.decay_rates()  # grad enabled and A_log requires grad: differentiable
    A.sum().backward()
    assert torch.equal(mixer.A_log.grad, A.detach())


def test_module_snapshot_sees_swaps_moves_and_versions():
    """ModuleSnapshot (what keeps a prepared decode step valid): unchanged through in-place updates, which the step's
    pointers see, but not through a swapped module, parameter or storage, a new slot, or an in-place update of a
    versioned tensor (one something was computed from)."""
    layer = next(la for la in random_model().model.layers if not la.is_attention)
    mixer = layer.mamba
    for name, change in _mixer_changes(mixer).items():
        snapshot = prepared.ModuleSnapshot(layer, versioned=(mixer.A_log,))
        change()
        assert snapshot.unchanged() == (name in ("nothing", "D in place")), name


@torch.no_grad()
def _double_in_place(t: torch.Tensor) -> None:
    t.mul_(2.0)


def _mixer_changes(mixer: MambaMixer) -> dict:
    """Changes to a Mamba mixer that a bound decode step's validity check must see, or (updates in place of a tensor
    nothing was computed from) may let through, by name."""
    return {
        "nothing": lambda: None,
        "D in place": lambda: _double_in_place(mixer.D),
        "A_log in place": lambda: _double_in_place(mixer.A_log),
        "storage": lambda: setattr(mixer.D, "data", mixer.D.data.clone()),  # what .to() does
        "parameter": lambda: setattr(mixer, "D", torch.nn.Parameter(mixer.D.detach().clone())),
        "module": lambda: setattr(mixer, "out_proj", torch.nn.Identity()),
        "new slot": lambda: mixer.conv1d.register_buffer("extra", torch.zeros(1)),
    }


def _with_bf16_dynamics(model):
    """The model with its A_log / D / dt bias cast as a narrow-dtype load leaves them (their storages swapped)."""
    for name, param in model.named_parameters():
        if name.endswith(FP32_PARAMS):
            param.data = param.data.bfloat16()
    return model


def test_model_stamp_sees_swaps_moves_and_versions():
    """ModelStamp (what keeps a model's prepared steps valid, checked once per token): unchanged through in-place
    updates, which the steps' pointers see, but not through a swapped module or parameter, a new slot, a moved or
    converted layer or model, an in-place update of a versioned tensor, or `invalidate()`. Its documented blind spot:
    one tensor given another storage below a layer (the steps keep reading the old one until `invalidate()`)."""
    model = random_model()
    layers = model.model.layers
    mixer = next(la for la in layers if not la.is_attention).mamba
    changes = {
        **_mixer_changes(mixer),
        "layer converted": lambda: layers[2].double(),
        "model converted": lambda: model.float(),
        "invalidate": prepared.invalidate,
        "SSM dynamics back to fp32": lambda: keep_fp32(_with_bf16_dynamics(model)),
    }
    for name, change in changes.items():
        stamp = prepared.ModelStamp(layers, versioned=(mixer.A_log,))
        change()
        assert stamp.unchanged() == (name in ("nothing", "D in place", "storage")), name
    assert len(stamp.sentinels) == len(layers)


def test_model_prepared_steps_follow_the_weights(monkeypatch):
    """The model's prepared steps (bound for all layers, kept between tokens, checked once per token, run in one call
    of ops.layer_steps) give what the layers' op-by-op path and their steps one by one give, bit for bit, after each
    kind of change between tokens; and are kept while nothing changes."""
    shape = dict(hidden_size=256, num_attention_heads=8, intermediate_size=96)  # what the one-call kernels take
    model, other = random_model(**shape), random_model(seed=5, **shape)
    layers = model.model.layers
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(3))

    @torch.no_grad()
    def decode(prepared_steps: bool) -> torch.Tensor:
        cache = model.make_cache(2, max_length=6)
        model(ids[:, :3], cache=cache)
        with monkeypatch.context() as m:
            if not prepared_steps:
                m.setattr(model, "_prepared_steps", lambda x, mask: [None] * len(layers))
            return torch.stack([model.decode_step(ids[:, i], cache).logits for i in range(3, 6)])

    calls = []

    def counted(*args, _run=cpu_kernels.layer_steps):
        calls.append(1)
        return _run(*args)

    monkeypatch.setattr(cpu_kernels, "layer_steps", counted)
    before = decode(True)
    kept = prepared._KEPT[layers][2]
    assert all(step is not None for step in kept) and len(calls) == 3  # every layer one step, all in one call
    assert torch.equal(before, decode(False))
    with monkeypatch.context() as m:  # layer by layer, each its prepared step
        m.setattr(cpu_kernels, "layer_steps", lambda *args: None)
        assert torch.equal(before, decode(True))
    decode(True)
    assert prepared._KEPT[layers][2] is kept  # nothing changed: not bound again
    mamba = next(i for i, la in enumerate(layers) if not la.is_attention)

    @torch.no_grad()
    def in_place(t: torch.Tensor, factor: float = 0.5) -> None:
        t.mul_(factor)

    def swap_storage() -> None:
        layers[mamba].mamba.D.data = layers[mamba].mamba.D.data * 3.0
        prepared.invalidate()

    changes = {
        "A_log in place": lambda: in_place(layers[mamba].mamba.A_log),
        "weight in place": lambda: in_place(layers[mamba].pre_ff_layernorm.weight),
        "parameter": lambda: setattr(layers[2].input_layernorm, "weight", torch.nn.Parameter(torch.rand(256) + 0.5)),
        "module": lambda: setattr(layers[3].feed_forward, "experts", other.model.layers[3].feed_forward.experts),
        "load_state_dict": lambda: model.load_state_dict(other.state_dict()),
        "assign": lambda: model.load_state_dict(random_model(seed=6, **shape).state_dict(), assign=True),
        "storage, invalidate()": swap_storage,
        "half and back": lambda: model.half().float(),
        "quantize": lambda: quant.quantize_model(model, "int8", 32),
    }
    for name, change in changes.items():
        change()
        after = decode(True)
        assert not torch.equal(after, before), name
        assert torch.equal(after, decode(False)), name
        before = after


@pytest.mark.parametrize("method, moe", [("int8", False), (None, True)])
def test_prepared_layer_step_follows_the_weights(monkeypatch, method, moe):
    """A layer's prepared step (kept between tokens) gives what the layer's call-by-call path gives after its
    weights change: A_log in place, a norm and an FFN projection replaced, an fp32 weight updated in place (read
    through the step's pointers), new values loaded in place."""
    def make(seed):
        model = random_model(hidden_size=128, mamba_dt_rank=32, intermediate_size=96, seed=seed)
        return quant.quantize_model(model, method, 32) if method else model

    model, other = make(0), make(5)
    index, layer = next((i, la) for i, la in enumerate(model.model.layers) if not la.is_attention and la.is_moe == moe)
    x = randn(2, 128, dtype=torch.float32, seed=7)

    def step(prepared: bool) -> torch.Tensor:
        state = model.make_cache(2).layers[index]
        state.ssm.copy_(randn(*state.ssm.shape, dtype=torch.float32, seed=5))
        with monkeypatch.context() as m, torch.no_grad():
            if not prepared:
                m.setattr(layer, "_prepared_step", lambda *a: None)
            out = layer.decode_step(x, None, state)
        return torch.cat([out.flatten(), state.conv.flatten(), state.ssm.flatten()])

    before = step(True)
    assert prepared._KEPT[layer][2] is not None  # the one-call step is the one kept
    assert torch.equal(before, step(False))
    target = other.model.layers[index]

    @torch.no_grad()
    def halve_A_log() -> None:
        layer.mamba.A_log.mul_(0.5)

    @torch.no_grad()
    def halve_norm_in_place() -> None:
        layer.input_layernorm.weight.mul_(0.5)

    ffn_part = "experts" if moe else "down_proj"
    changes = [
        halve_A_log,
        lambda: setattr(layer.pre_ff_layernorm, "weight", torch.nn.Parameter(torch.rand(128) + 0.5)),
        lambda: setattr(layer.feed_forward, ffn_part, getattr(target.feed_forward, ffn_part)),
        halve_norm_in_place,
        lambda: layer.load_state_dict(target.state_dict()),
    ]
    for i, change in enumerate(changes):
        change()
        after = step(True)
        assert not torch.equal(after, before), i
        assert torch.equal(after, step(False)), i
        before = after
