"""The decode step's CPU kernels (ops/csrc/linear.cpp, rms_norm.cpp, mamba_step.cpp, ffn_step.cpp) against their
plain PyTorch references (ops/decode.py) in float64 and float32, their batch invariance (a row's bits do not depend
on the other rows), and a decode step of the model with and without them."""

from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn.functional as F

from openjamba import ops, quant
from openjamba.model import MambaMixer
from openjamba.ops import cpu_kernels, decode

from .conftest import random_model

AVAILABLE, WHY = cpu_kernels.is_available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"CPU kernels unavailable: {WHY}")


def randn(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture
def all_sizes_threaded(monkeypatch):
    """Every matrix through the kernel, and on two threads (split into work items) unless told otherwise."""
    monkeypatch.setattr(cpu_kernels, "LINEAR_MIN_WEIGHTS", 0)
    monkeypatch.setattr(cpu_kernels, "LINEAR_SERIAL_BELOW", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


# out 37 and in 45: partial tiles of W rows and a scalar tail after the vectors; 1..33 rows of x (tiles of 1..6 rows,
# several groups of them, more rows than the kernel takes) and one token.
@pytest.mark.parametrize("shape", [(1, 45), (2, 45), (3, 45), (4, 45), (5, 45), (7, 45), (13, 45), (32, 45),
                                   (33, 45), (1, 1, 45), (2, 1, 45), (3, 5, 45)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_f_linear(all_sizes_threaded, shape, bias):
    x, w = randn(*shape), randn(37, 45, seed=1)
    b = randn(37, seed=2) if bias else None
    torch.testing.assert_close(cpu_kernels.linear(x, w, b), F.linear(x, w, b), atol=1e-12, rtol=1e-12)
    x32, w32, b32 = x.float(), w.float(), None if b is None else b.float()
    torch.testing.assert_close(cpu_kernels.linear(x32, w32, b32), F.linear(x32, w32, b32), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("out_features, in_features", [(1030, 700), (3, 5), (64, 16)])
def test_linear_large_and_odd_shapes_over_threads(all_sizes_threaded, out_features, in_features):
    w = randn(out_features, in_features, seed=1)
    for rows in (1, 2, 6, 7, 19):
        x = randn(rows, 1, in_features)
        torch.testing.assert_close(cpu_kernels.linear(x, w), F.linear(x, w), atol=1e-12, rtol=1e-12)


def test_linear_reads_strided_rows(all_sizes_threaded):
    """A column slice and the last token of each row (uniform row strides) are read in place; a transposed input
    (no unit stride) is copied first. Each against F.linear on a contiguous copy."""
    w, b = randn(37, 45, seed=1), randn(37, seed=2)
    wide, seq = randn(9, 60), randn(3, 8, 45)
    for x in (wide[:, 5:50], seq[:, -1:], seq[:, -1], randn(45, 6).t(), wide[2, 5:50]):
        assert not x.is_contiguous() or x.dim() == 1
        torch.testing.assert_close(cpu_kernels.linear(x, w, b), F.linear(x.contiguous(), w, b), atol=1e-12,
                                   rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_is_batch_invariant(all_sizes_threaded, dtype):
    """Each row's output bits are the same alone, among any number of other rows and on any number of threads: a
    greedy request then decodes the same tokens alone or batched with others."""
    w, b = randn(300, 257, dtype=dtype, seed=1), randn(300, dtype=dtype, seed=2)
    x = randn(decode.DECODE_MAX_ROWS, 257, dtype=dtype)
    torch.set_num_threads(1)
    alone = torch.cat([cpu_kernels.linear(x[i:i + 1], w, b) for i in range(x.shape[0])])
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        for rows in (2, 5, 6, 7, 12, 16, 17, 31, decode.DECODE_MAX_ROWS):
            assert torch.equal(cpu_kernels.linear(x[:rows], w, b), alone[:rows]), (threads, rows)


def test_linear_falls_back_where_it_does_not_apply(all_sizes_threaded):
    w = randn(8, 6, seed=1)
    for x in (randn(decode.DECODE_MAX_ROWS + 1, 6), randn(2, 6).to(torch.bfloat16)):  # too many rows, bf16
        expected = F.linear(x, w.to(x.dtype))
        torch.testing.assert_close(cpu_kernels.linear(x, w.to(x.dtype)), expected)
    with pytest.raises(RuntimeError):  # a shape mismatch is F.linear's error, never a read past the weight
        cpu_kernels.linear(randn(1, 7), w)
    x = randn(1, 6).requires_grad_(True)
    cpu_kernels.linear(x, w).sum().backward()  # autograd: F.linear's gradient
    torch.testing.assert_close(x.grad, w.sum(0, keepdim=True))


def test_expert_linear_matches_reference(all_sizes_threaded):
    x, weights, index = randn(3, 21), randn(5, 38, 21, seed=1), torch.tensor([4, 0, 4])
    expected = torch.stack([weights[e] @ x[r] for r, e in enumerate(index.tolist())])
    torch.testing.assert_close(decode.expert_linear_ref(x, weights, index), expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(cpu_kernels.expert_linear(x, weights, index), expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(cpu_kernels.expert_linear(x.float(), weights.float(), index), expected.float(),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rms_norm_matches_reference(dtype):
    x, w = randn(2, 1, 37, dtype=dtype), randn(37, dtype=dtype, seed=1)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(decode.rms_norm(x, w, 1e-6), expected, atol=tol, rtol=tol)
    torch.testing.assert_close(cpu_kernels.rms_norm(x, w, 1e-6), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("rows,width,offset", [(16, 256, 0), (5, 48, 0), (4, 64, 1), (3, 64, 0)])
@pytest.mark.parametrize("spread", [True, False])
def test_layer_step_norms_match_reference_and_each_row_alone(rows, width, offset, spread):
    """The one-call layer steps' norms (rms_norm.cpp's *_rows_f32): before a product on several threads (spread),
    from 4 rows (16-multiple widths, 64-byte aligned outputs) they write with streaming stores: the same values as
    the plain stores of one row alone (batch invariance) and the reference's within rounding. offset 1 puts the
    outputs off alignment, 3 rows stay below the streaming size: the plain stores."""
    x, h, w = (randn(rows, width, dtype=torch.float32, seed=i) for i in range(3))
    w = w[0]
    y, s, y2 = (torch.empty(rows * width + offset)[offset:].view(rows, width) for _ in range(3))
    lib = cpu_kernels.cpu_build.library()
    lib.rms_norm_rows_f32.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_double, ctypes.c_bool]
    lib.add_rms_norm_rows_f32.argtypes = ([ctypes.c_void_p] * 5 + [ctypes.c_int64] * 2
                                          + [ctypes.c_double, ctypes.c_bool])
    lib.rms_norm_rows_f32(x.data_ptr(), w.data_ptr(), y.data_ptr(), rows, width, 1e-6, spread)
    lib.add_rms_norm_rows_f32(x.data_ptr(), h.data_ptr(), w.data_ptr(), s.data_ptr(), y2.data_ptr(), rows, width,
                              1e-6, spread)
    for r in range(rows):
        alone = cpu_kernels.rms_norm(x[r:r + 1], w, 1e-6)
        sum_alone, norm_alone = cpu_kernels.add_rms_norm(x[r:r + 1], h[r:r + 1], w, 1e-6)
        assert torch.equal(y[r:r + 1], alone) and torch.equal(s[r:r + 1], sum_alone), r
        assert torch.equal(y2[r:r + 1], norm_alone), r
    torch.testing.assert_close(y, decode.rms_norm(x.double(), w.double(), 1e-6).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s, x + h)
    torch.testing.assert_close(y2, decode.rms_norm((x + h).double(), w.double(), 1e-6).float(), atol=1e-5,
                               rtol=1e-5)


def mamba_inputs(batch=2, inner=37, kernel=4, rank=5, state=8, dtype=torch.float64, conv_bias=True):
    """Random inputs of `mamba_step`; inner 37 = two vector blocks of 16 and a remainder."""
    g = torch.Generator().manual_seed(3)

    def r(*shape, scale=0.5):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    return dict(
        xz=r(batch, 2 * inner, scale=1.0), window=r(batch, kernel - 1, inner), ssm=r(batch, inner, state),
        conv_weight=r(inner, kernel), conv_bias=r(inner) if conv_bias else None,
        x_proj_weight=r(rank + 2 * state, inner), norm_weights=(1 + r(rank), 1 + r(state), 1 + r(state)), eps=1e-6,
        dt_proj_weight=r(inner, rank), dt_bias=r(inner) - 1.0,
        A=-(torch.rand(inner, state, generator=g) * 4 + 0.5).to(dtype), D=r(inner),
    )


def run_step(fn, args):
    """fn on a copy of the inputs: (output, window after, state after)."""
    args = {k: v.clone() if torch.is_tensor(v) else v for k, v in args.items()}
    return fn(**args), args["window"], args["ssm"]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("conv_bias", [True, False])
def test_mamba_step_matches_reference(monkeypatch, dtype, tol, threads, conv_bias):
    monkeypatch.setattr(cpu_kernels, "SERIAL_BELOW", 0 if threads > 1 else 1 << 40)
    args = mamba_inputs(dtype=dtype, conv_bias=conv_bias)
    expected = run_step(decode.mamba_step_ref, args)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = run_step(cpu_kernels.mamba_step, args)
    finally:
        torch.set_num_threads(saved)
    for name, e, g in zip(("output", "window", "state"), expected, got):
        torch.testing.assert_close(g, e, atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("domain", ["usual", "A > 0 somewhere", "dt infinite somewhere"])
def test_mamba_step_with_16_states_is_batch_invariant(monkeypatch, dtype, domain):
    """With 16 states (fp32: mamba_step.cpp's several-row fast path, whole 16-channel blocks and a short one) each of
    16 rows gets, bit for bit, what it gets alone (the one-row path), on one thread or two; also where A or dt leave
    the fast path's domain (A > 0 in one channel, dt infinite in one: the general path, non-finite values in
    the same places)."""
    rows, inner = 16, 83  # five blocks of 16 channels and three more; rank two blocks of 16
    args = mamba_inputs(batch=rows, inner=inner, rank=32, state=16, dtype=dtype)
    if domain == "A > 0 somewhere":
        args["A"][70, 3] = 0.25
    elif domain == "dt infinite somewhere":
        args["dt_bias"][5] = float("inf")
    results = []
    for threads in (1, 2):
        monkeypatch.setattr(cpu_kernels, "SERIAL_BELOW", 0 if threads > 1 else 1 << 40)
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            together = run_step(cpu_kernels.mamba_step, args)
            alone = [run_step(cpu_kernels.mamba_step, {k: v[r:r + 1] if k in ("xz", "window", "ssm") else v
                                                         for k, v in args.items()}) for r in range(rows)]
        finally:
            torch.set_num_threads(saved)
        for name, t, each in zip(("output", "window", "state"), together, zip(*alone)):
            torch.testing.assert_close(t, torch.cat(each), rtol=0, atol=0, equal_nan=True, msg=name)
        results.append(together)
    for name, one, two in zip(("output", "window", "state"), *results):
        torch.testing.assert_close(two, one, rtol=0, atol=0, equal_nan=True, msg=name)
    expected = run_step(decode.mamba_step_ref, args)  # and the kernel computes the step
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for name, e, g in zip(("output", "window", "state"), expected, results[0]):
        torch.testing.assert_close(g, e, atol=tol, rtol=tol, equal_nan=True, msg=name)


@pytest.mark.parametrize("wrong", ["xz", "window", "ssm", "conv_weight", "x_proj_weight", "dt_proj_weight", "D"])
def test_mamba_step_with_a_mismatched_shape_raises_instead_of_running_the_kernel(wrong):
    """The kernel trusts every extent: a tensor of the wrong shape must reach the reference, which raises, and never
    the kernel (which would read and write out of bounds)."""
    args = mamba_inputs(dtype=torch.float32)
    bigger = {"xz": (2, 4 * 37), "window": (2, 3, 74), "ssm": (2, 74, 8), "conv_weight": (74, 4),
              "x_proj_weight": (21, 74), "dt_proj_weight": (74, 5), "D": (74,)}[wrong]
    args[wrong] = randn(*bigger, dtype=torch.float32, seed=6)
    with pytest.raises(RuntimeError):
        run_step(cpu_kernels.mamba_step, args)


def steps_op_by_op_and_fused(model, mixer, step) -> list[tuple[torch.Tensor, ...]]:
    """`step(state)` of a Mamba mixer of `model` from the same random states of a 2-row cache, first op by op (no
    fused-step weights), then fused: (output, conv window, SSM state) of each."""
    results = []
    for fused in (False, True):
        cache = model.make_cache(2)
        state = next(c for c, layer in zip(cache.layers, model.model.layers) if not layer.is_attention)
        state.conv.copy_(randn(*state.conv.shape, seed=4))
        state.ssm.copy_(randn(*state.ssm.shape, seed=5))
        mixer._step_weights = (lambda: None) if not fused else MambaMixer._step_weights.__get__(mixer)
        with torch.no_grad():
            results.append((step(state), state.conv.clone(), state.ssm.clone()))
    return results


def test_mamba_step_reference_is_the_mixers_plain_path():
    """The fused step (kernel or reference) gives what the mixer's op-by-op path gives: output and both states. In
    float64 up to 1e-6: the op-by-op path rounds A, D and the dt bias to fp32 (the state's usual dtype) first."""
    model = random_model().double()
    mixer = next(layer.mamba for layer in model.model.layers if not layer.is_attention)
    x = randn(2, 1, model.config.hidden_size)
    results = steps_op_by_op_and_fused(model, mixer, lambda state: mixer(x, None, state))
    for name, e, g in zip(("output", "window", "state"), *results):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-6, msg=name)


def quantized_mamba_inputs(method: str, batch: int = 2, inner: int = 96, rank: int = 32, state: int = 16):
    """`mamba_inputs` in fp32 with x_proj and dt_proj quantized (groups of 32): inner 96 = six vector blocks, split
    unevenly over two threads; rank 32 = one int4 group. The kernels take inputs in multiples of 32."""
    args = {k: v.float() if torch.is_tensor(v) else v
            for k, v in mamba_inputs(batch=batch, inner=inner, rank=rank, state=state).items()}
    args["norm_weights"] = tuple(t.float() for t in args["norm_weights"])
    for name in ("x_proj_weight", "dt_proj_weight"):
        args[name] = quant.QuantizedWeight(quant.quantize_weight(args[name], method, 32)).prepare()
    return args


class KernelArithmetic:
    """A quantized weight whose product is `quant.kernel_reference`: the CPU kernels' arithmetic in float64."""

    def __init__(self, weight: quant.QuantizedWeight) -> None:
        self.weight, self.in_features = weight, weight.in_features

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return quant.kernel_reference(x, self.weight.tensors()).to(x.dtype)


@pytest.mark.parametrize("method", quant.METHODS)
@pytest.mark.parametrize("conv_bias", [True, False])
def test_quantized_mamba_step_matches_reference(monkeypatch, method, conv_bias):
    """mamba_step with quantized x_proj and dt_proj (their products quant_linear.cpp's, inside the one call) against
    the reference step with the kernels' product arithmetic (`kernel_reference`): equal up to fp32 rounding; against
    the dequantized weights' plain step, within the activations' int8 rounding. The same bits on 1 and 2 threads."""
    monkeypatch.setattr(cpu_kernels, "SERIAL_BELOW", 0)  # the step's phases and both products split over threads
    monkeypatch.setattr(cpu_kernels, "LINEAR_SERIAL_BELOW", 0)
    args = quantized_mamba_inputs(method)
    if not conv_bias:
        args["conv_bias"] = None
    arithmetic = {**args, **{k: KernelArithmetic(args[k]) for k in ("x_proj_weight", "dt_proj_weight")}}
    dequantized = {**args, **{k: quant.dequantize(args[k].tensors()) for k in ("x_proj_weight", "dt_proj_weight")}}
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_step(cpu_kernels.mamba_step, args)
        torch.set_num_threads(2)
        two = run_step(cpu_kernels.mamba_step, args)
    finally:
        torch.set_num_threads(saved)
    expected, plain = run_step(decode.mamba_step_ref, arithmetic), run_step(decode.mamba_step_ref, dequantized)
    for name, e, p, g1, g2 in zip(("output", "window", "state"), expected, plain, one, two):
        assert torch.equal(g1, g2), name
        torch.testing.assert_close(g1, e, atol=1e-4 * e.abs().max().item(), rtol=1e-4, msg=name)
        assert (g1 - p).abs().max() <= 0.05 * p.abs().max(), name
    # The dispatcher's reference path (no kernels: each weight's own `linear`) gives the same step.
    reference = run_step(decode.mamba_step_ref, args)
    for name, e, g in zip(("output", "window", "state"), expected, reference):
        torch.testing.assert_close(g, e, atol=1e-4 * e.abs().max().item(), rtol=1e-4, msg=name)


def test_quantized_mixer_takes_the_fused_step(monkeypatch):
    """A quantized model's Mamba layers decode through the one fused call (not op by op), and it gives what the
    op-by-op path of the same quantized layer gives."""
    model = quant.quantize_model(random_model(hidden_size=64, mamba_dt_rank=32), "int4", group_size=32)
    mixer = next(layer.mamba for layer in model.model.layers if not layer.is_attention)
    assert mixer._step_weights() is not None
    calls = []
    monkeypatch.setattr(cpu_kernels, "call", lambda name, *a, _call=cpu_kernels.call: calls.append(name) or
                        _call(name, *a))
    x = randn(2, model.config.hidden_size, dtype=torch.float32)
    out_proj_inputs = []  # the step's result (out_proj's input), op by op then fused
    mixer.out_proj.register_forward_hook(lambda module, args, out: out_proj_inputs.append(args[0].reshape(2, -1)))
    results = steps_op_by_op_and_fused(model, mixer, lambda state: mixer.decode_step(x, state))
    assert calls.count("mamba_step") == 1
    torch.testing.assert_close(out_proj_inputs[1], out_proj_inputs[0],
                               atol=1e-4 * out_proj_inputs[0].abs().max().item(), rtol=1e-4, msg="step")
    for name, e, g in list(zip(("output", "window", "state"), *results))[1:]:
        torch.testing.assert_close(g, e, atol=1e-4 * e.abs().max().item(), rtol=1e-4, msg=name)
    # out_proj's input differs by ulps (torch's conv, silu and norms against the kernel's): its int8 rounding can
    # flip one activation by a step, max|y| / 127, which moves every output by up to that times a weight (~0.3% of
    # the output's scale here), so the outputs are compared at the activations' rounding, as in test_quant.
    e, g = (r[0] for r in results)
    torch.testing.assert_close(g, e, atol=2e-2 * e.abs().max().item(), rtol=0, msg="output")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_add_rms_norm_matches_reference(dtype):
    x, h, w = randn(3, 37, dtype=dtype), randn(3, 37, dtype=dtype, seed=1), randn(37, dtype=dtype, seed=2)
    s = x + h
    expected = (s, s / torch.sqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6) * w)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for fn in (decode.add_rms_norm_ref, cpu_kernels.add_rms_norm):
        for name, e, g in zip(("sum", "norm"), expected, fn(x, h, w, 1e-6)):
            torch.testing.assert_close(g, e, atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize("width", [1, 17, 63, 64, 200, 8192])
def test_argmax_matches_torch(width):
    """ops.argmax gives torch.argmax's index: first of tied maxima, first NaN, all -inf, tails past whole vectors."""
    x = randn(9, width, dtype=torch.float32).round(decimals=1)  # rounded: ties among the largest values
    x[1] = float("-inf")
    x[2, width // 2] = float("nan")
    x[3, -1] = float("nan")
    x[3, 0] = float("inf")
    x[4] = 0.0
    x[4, width // 3] = -0.0
    x[5, -1] = 100.0
    x[6] = x[6].max()
    x[7, width // 2:] = float("inf")
    for rows in (x, x[:, : max(1, width - 1)], x[2:3]):  # also rows at a stride longer than their width
        assert rows.dtype == torch.float32 and rows.stride(1) == 1  # the kernel's input, not torch's fallback
        assert torch.equal(cpu_kernels.argmax(rows), rows.argmax(-1))
        assert torch.equal(ops.argmax(rows), rows.argmax(-1))
    assert torch.equal(cpu_kernels.argmax(x.double()), x.double().argmax(-1))  # fp64: torch's
    assert cpu_kernels.argmax(x[:0]).shape == (0,)


def ffn_inputs(rows, hidden=45, inner=37, experts=6, dtype=torch.float64):
    """Random inputs of mlp_step / moe_step: hidden 45 and inner 37 leave partial blocks and scalar tails."""
    x, residual = randn(rows, hidden, dtype=dtype), randn(rows, hidden, dtype=dtype, seed=1)
    router = randn(experts, hidden, dtype=dtype, seed=2)
    gate_up, down = randn(experts, 2 * inner, hidden, dtype=dtype, seed=3), randn(experts, hidden, inner, dtype=dtype,
                                                                                  seed=4)
    return x, residual, router, gate_up * 0.3, down * 0.3


def moe_by_hand(x, residual, router, gate_up, down, top_k):
    """The MoE block written out row by row and slot by slot; routing on the logits rounded to fp32, the softmax in
    float64 rounded to fp32 (the model's fp32 softmax, correctly rounded)."""
    inner, out = down.shape[2], residual.clone()
    probs = torch.softmax((x @ router.T).float().double(), -1).float()
    for r in range(x.shape[0]):
        weight, index = torch.topk(probs[r], top_k)
        for w, e in zip(weight.tolist(), index.tolist()):
            gate, up = gate_up[e, :inner] @ x[r], gate_up[e, inner:] @ x[r]
            out[r] += torch.tensor(w, dtype=x.dtype) * (down[e] @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [1, 3, 16, decode.DECODE_MAX_ROWS])
def test_ffn_steps_match_references(monkeypatch, dtype, tol, threads, rows):
    """moe_step (routing, top-2 of 6 experts, weighted sum, residual) and mlp_step against the references and a
    by-hand loop; with 16 or 32 rows most experts are chosen by several rows, which the kernel groups."""
    monkeypatch.setattr(cpu_kernels, "LINEAR_SERIAL_BELOW", 0 if threads > 1 else 1 << 40)
    x, residual, router, gate_up, down = ffn_inputs(rows, dtype=dtype)
    inner = down.shape[2]
    gate, up, down0 = gate_up[0, :inner].contiguous(), gate_up[0, inner:].contiguous(), down[0].contiguous()
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        moe, mlp = cpu_kernels.moe_step(x, router, gate_up, down, 2, residual), cpu_kernels.mlp_step(
            x, gate, up, down0, residual)
    finally:
        torch.set_num_threads(saved)
    expected = moe_by_hand(x, residual, router, gate_up, down, 2)
    atol = tol * expected.abs().max()  # outputs reach ~30: sums of that size differ by their rounding
    torch.testing.assert_close(decode.moe_step_ref(x, router, gate_up, down, 2, residual), expected, atol=atol,
                               rtol=tol)
    torch.testing.assert_close(moe, expected, atol=atol, rtol=tol)
    expected = residual + (F.silu(x @ gate.T) * (x @ up.T)) @ down0.T
    atol = tol * expected.abs().max()
    torch.testing.assert_close(decode.mlp_step_ref(x, gate, up, down0, residual), expected, atol=atol, rtol=tol)
    torch.testing.assert_close(mlp, expected, atol=atol, rtol=tol)


def quantized_mlp_inputs(method: str, rows: int, hidden: int = 64, inner: int = 96):
    """x, gate, up, down, residual of an MLP step in fp32, its weights quantized (groups of 32)."""
    x, residual = randn(rows, hidden, dtype=torch.float32), randn(rows, hidden, dtype=torch.float32, seed=1)
    weights = [quant.QuantizedWeight(quant.quantize_weight(randn(*shape, seed=seed) * 0.3, method, 32)).prepare()
               for shape, seed in (((inner, hidden), 2), ((inner, hidden), 3), ((hidden, inner), 4))]
    return x, *weights, residual


@pytest.mark.parametrize("method", quant.METHODS)
@pytest.mark.parametrize("rows", [1, 5])
def test_quantized_mlp_step_matches_reference(monkeypatch, method, rows):
    """mlp_step with quantized weights (one call of quant_step.cpp) against the reference with the kernels' product
    arithmetic (`kernel_reference`): equal up to fp32 rounding (its silu and the kernel's differ by an ulp, which
    can move one activation of the down product across a rounding step); against the dequantized weights' plain MLP,
    within the activations' int8 rounding. The same bits on 1 and 2 threads."""
    monkeypatch.setattr(cpu_kernels, "LINEAR_SERIAL_BELOW", 0)
    x, gate, up, down, residual = quantized_mlp_inputs(method, rows)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernels.mlp_step(x, gate, up, down, residual)
        torch.set_num_threads(2)
        two = cpu_kernels.mlp_step(x, gate, up, down, residual)
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(one, two)
    expected = decode.mlp_step_ref(x, *(KernelArithmetic(w) for w in (gate, up, down)), residual)
    plain = decode.mlp_step_ref(x, *(quant.dequantize(w.tensors()) for w in (gate, up, down)), residual)
    scale = expected.abs().max().item()
    torch.testing.assert_close(one, expected, atol=1e-4 * scale, rtol=1e-4)
    assert (one - plain).abs().max() <= 0.05 * scale
    torch.testing.assert_close(decode.mlp_step_ref(x, gate, up, down, residual), expected, atol=1e-4 * scale,
                               rtol=1e-4)


def test_moe_step_reference_is_the_models_moe_block():
    """moe_step_ref is model.SparseMoE (plus the residual), up to the routing weights' fp32 rounding."""
    model = random_model().double()
    moe = next(layer.feed_forward for layer in model.model.layers if layer.is_moe)
    x, residual = randn(5, model.config.hidden_size), randn(5, model.config.hidden_size, seed=1)
    with torch.no_grad():
        expected = residual + moe(x)[0]
        got = decode.moe_step_ref(x, moe.router.weight, moe.experts.gate_up_proj, moe.experts.down_proj, moe.top_k,
                                  residual)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("threads", [1, 2])
def test_decode_kernels_are_batch_invariant(monkeypatch, threads):
    """Each row of a call of 2..DECODE_MAX_ROWS rows (the server's batch) equals, bit for bit, the same row computed
    alone: a server's greedy outputs must not depend on which other requests share the batch."""
    monkeypatch.setattr(cpu_kernels, "LINEAR_SERIAL_BELOW", 0 if threads > 1 else 1 << 40)
    monkeypatch.setattr(cpu_kernels, "SERIAL_BELOW", 0 if threads > 1 else 1 << 40)
    most = decode.DECODE_MAX_ROWS
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, residual, router, gate_up, down = ffn_inputs(most, dtype=torch.float32)
        inner, w = down.shape[2], x[0].abs()
        gate, up, down0 = gate_up[0, :inner].contiguous(), gate_up[0, inner:].contiguous(), down[0].contiguous()
        mamba = {k: v.float() if torch.is_tensor(v) else v for k, v in mamba_inputs(batch=most).items()}
        mamba["norm_weights"] = tuple(t.float() for t in mamba_inputs()["norm_weights"])
        calls = {
            "moe_step": lambda rows: cpu_kernels.moe_step(x[rows], router, gate_up, down, 2, residual[rows]),
            "mlp_step": lambda rows: cpu_kernels.mlp_step(x[rows], gate, up, down0, residual[rows]),
            "add_rms_norm": lambda rows: torch.cat(cpu_kernels.add_rms_norm(x[rows], residual[rows], w, 1e-6), -1),
            "rms_norm": lambda rows: cpu_kernels.rms_norm(x[rows], w, 1e-6),
            "mamba_step": lambda rows: torch.cat([t.flatten(1) for t in run_step(cpu_kernels.mamba_step, {
                k: v[rows] if k in ("xz", "window", "ssm") else v for k, v in mamba.items()})], 1),
        }
        for method in quant.METHODS:  # quantized weights: the products inside the step
            qx, qgate, qup, qdown, qres = quantized_mlp_inputs(method, most)
            calls[f"mlp_step {method}"] = lambda rows, a=(qx, qgate, qup, qdown, qres): cpu_kernels.mlp_step(
                a[0][rows], *a[1:4], a[4][rows])
        for method in quant.METHODS:  # x_proj and dt_proj quantized: their products inside the step
            quantized = quantized_mamba_inputs(method, batch=most)
            calls[f"mamba_step {method}"] = lambda rows, q=quantized: torch.cat([t.flatten(1) for t in run_step(
                cpu_kernels.mamba_step, {k: v[rows] if k in ("xz", "window", "ssm") else v for k, v in q.items()})], 1)
        for name, call in calls.items():
            alone = torch.cat([call(slice(r, r + 1)) for r in range(most)])
            for count in range(2, most + 1):
                for first in {0, most - count}:  # the first rows and the last ones
                    together = call(slice(first, first + count))
                    assert torch.equal(together, alone[first:first + count]), (name, first, count)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("threads", [1, 2])
def test_decode_step_is_batch_invariant(monkeypatch, all_sizes_threaded, threads):
    """A decode step of the model (MoE, attention and Mamba layers, every kernel) over DECODE_MAX_ROWS rows of
    different lengths, joined as a server joins requests (`add_rows`), gives each row the logits it gets alone, bit
    for bit."""
    from openjamba.cache import HybridCache

    monkeypatch.setattr(cpu_kernels, "SERIAL_BELOW", 0 if threads > 1 else 1 << 40)
    monkeypatch.setitem(ops._chosen, "cpu", cpu_kernels)
    torch.set_num_threads(1)  # the prompts (not under test) on one thread: quick on a loaded machine
    model = random_model().eval()
    gen = torch.Generator().manual_seed(2)
    most, vocab = decode.DECODE_MAX_ROWS, model.config.vocab_size
    states = []
    with torch.no_grad():
        for r in range(most):
            cache = model.make_cache(1)
            model(torch.randint(0, vocab, (1, 3 + r % 5), generator=gen), cache=cache)
            states.append(cache.row_state(0))
        tokens = torch.randint(0, vocab, (most,), generator=gen)
        torch.set_num_threads(threads)
        alone = torch.cat([model.decode_step(tokens[r:r + 1], HybridCache.from_row_state(model, states[r])).logits
                           for r in range(most)])
        batch = HybridCache.from_row_state(model, states[0])
        for state in states[1:]:
            batch.add_rows(HybridCache.from_row_state(model, state))
        together = model.decode_step(tokens, batch).logits
    assert torch.equal(together, alone)


@pytest.mark.parametrize("kernels", [False, True])
def test_decode_step_equals_the_plain_path_and_never_syncs(monkeypatch, all_sizes_threaded, kernels):
    """Prefill then decode with the CPU kernels (every matrix through linear.cpp) equals one full forward of the
    plain PyTorch path; the decode steps (MoE layers included) never read a tensor into Python."""
    model = random_model().eval()  # moe-gqa: MoE, attention and Mamba layers
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    monkeypatch.setitem(ops._chosen, "cpu", None)
    with torch.no_grad():
        full = model(ids).logits
    monkeypatch.setitem(ops._chosen, "cpu", cpu_kernels if kernels else None)
    with torch.no_grad():
        cache = model.make_cache(1, max_length=12)
        pieces = [model(ids[:, :8], cache=cache).logits]
        with pytest.MonkeyPatch.context() as patch:  # any tensor read into Python raises
            for name in ("tolist", "item", "__bool__", "__int__", "__float__"):
                patch.setattr(torch.Tensor, name, _refuse)
            pieces += [model(ids[:, t:t + 1], cache=cache).logits for t in range(8, 12)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=2e-5, rtol=0)


def _refuse(*args, **kwargs):
    raise AssertionError("host synchronisation in a decode step")
