"""The compiled CPU kernels against the sequential float64 reference: outputs, final states, every gradient."""

from __future__ import annotations

import pytest
import torch

from openjamba import ops
from openjamba.ops import causal_conv1d_ref, cpu_build, cpu_kernels, selective_scan_ref, selective_state_update_ref

from .conftest import random_model
from .test_ops import scan_inputs

AVAILABLE, WHY = cpu_kernels.is_available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"CPU kernels unavailable: {WHY}")

T = cpu_kernels.CHUNK
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def both(args: dict, **kwargs):
    """(reference, kernel) results of the same call."""
    return (selective_scan_ref(**args, **kwargs), cpu_kernels.selective_scan(**args, **kwargs))


def grads(fn, args: dict, seed: int = 7) -> dict:
    """Gradients of a random linear function of y and of the final state, for every tensor input."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in args.items() if torch.is_tensor(v)}
    y, h = fn(**{**args, **leaves}, delta_softplus=True, return_final_state=True)
    g = torch.Generator().manual_seed(seed)
    wy, wh = torch.randn(y.shape, generator=g, dtype=torch.float64), torch.randn(h.shape, generator=g,
                                                                                dtype=torch.float64)
    loss = (y * wy.to(y.dtype)).sum() + (h * wh.to(h.dtype)).sum()
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


def assert_grads_close(args: dict, atol: float, rtol: float) -> None:
    expected, got = grads(selective_scan_ref, args), grads(cpu_kernels.selective_scan, args)
    for name in expected:
        assert got[name].dtype == args[name].dtype, name
        torch.testing.assert_close(got[name], expected[name], atol=atol, rtol=rtol, msg=name)


# Channels 37 = two full vector blocks of 16 plus 5 single channels; 5 = single channels only.
@pytest.mark.parametrize("length", [1, 2, T - 1, T, T + 1, 3 * T + 5])
@pytest.mark.parametrize("state", [1, 4, 16])
def test_forward_and_gradients_match_reference(length, state):
    args = scan_inputs(2, length, 37 if state != 4 else 5, state, seed=length)
    (y_ref, h_ref), (y, h) = both(args, delta_softplus=True, return_final_state=True)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(h, h_ref, atol=1e-12, rtol=1e-12)
    assert_grads_close(args, atol=1e-10, rtol=1e-10)


def test_optional_inputs_absent():
    args = scan_inputs(3, T + 3, 19, 4)
    args["delta"] = args["delta"].abs() * 0.5  # used as dt directly (no softplus), so keep it positive
    for drop in ("D", "z", "delta_bias", "initial_state"):
        args.pop(drop)
        y_ref, y = both(args)  # also without softplus
        torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12, msg=drop)
    assert_grads_close(args, atol=1e-10, rtol=1e-10)


def test_large_dt_and_fast_decay():
    """softplus inputs up to ~30 (dt ~ 30) and A down to -500: decays underflow to 0, nothing becomes NaN."""
    args = scan_inputs(2, T + 9, 21, 16, dt_scale=15.0, seed=3)
    args["A"] = args["A"] * 60
    (y_ref, h_ref), (y, h) = both(args, delta_softplus=True, return_final_state=True)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    assert_grads_close(args, atol=1e-9, rtol=1e-10)
    args32 = {k: v.float() for k, v in args.items()}
    y32, h32 = cpu_kernels.selective_scan(**args32, delta_softplus=True, return_final_state=True)
    assert torch.isfinite(y32).all() and torch.isfinite(h32).all()
    torch.testing.assert_close(y32.double(), y_ref, atol=1e-4 * y_ref.abs().max().item(), rtol=1e-4)


def test_nan_and_inf_propagate_like_the_reference():
    """The fast fp32 exp/softplus must not turn NaN into numbers, nor overflow into NaN."""
    args = {k: v.float() for k, v in scan_inputs(1, 12, 20, 4).items()}
    args["u"][0, 3, 2] = float("nan")
    args["delta"][0, 5, 7] = float("nan")
    args["delta"][0, 6, 9] = float("inf")  # dt = inf: the decay is exp(-inf) = 0, the input term inf
    args["z"][0, 2, 4] = -200.0  # silu -> -0, no overflow
    y_ref, y = both(args, delta_softplus=True)
    torch.testing.assert_close(y.isnan(), y_ref.isnan())
    torch.testing.assert_close(y.isinf(), y_ref.isinf())
    finite = y_ref.isfinite()
    torch.testing.assert_close(y[finite], y_ref[finite], atol=1e-5, rtol=1e-5)


def test_float32_accuracy():
    args = scan_inputs(2, 3 * T + 5, 40, 16, seed=5)
    args["delta"] = args["delta"] - 2  # Mamba-like dt ~ softplus(-2 +- 1): slow decay, long memory
    (y_ref, h_ref) = selective_scan_ref(**args, delta_softplus=True, return_final_state=True)
    args32 = {k: v.float() for k, v in args.items()}
    y, h = cpu_kernels.selective_scan(**args32, delta_softplus=True, return_final_state=True)
    assert y.dtype == torch.float32 and h.dtype == torch.float32
    scale = y_ref.abs().max().item()
    torch.testing.assert_close(y.double(), y_ref, atol=2e-6 * scale, rtol=1e-5)
    torch.testing.assert_close(h.double(), h_ref, atol=2e-6 * h_ref.abs().max().item(), rtol=1e-5)
    expected = grads(selective_scan_ref, args)
    got = grads(cpu_kernels.selective_scan, args32)
    for name in expected:
        g_scale = expected[name].abs().max().item()
        torch.testing.assert_close(got[name].double(), expected[name], atol=2e-5 * g_scale, rtol=1e-4, msg=name)


def test_bfloat16_inputs_compute_in_float32():
    args = scan_inputs(2, 20, 18, 4)
    low = {k: (v.bfloat16() if k in ("u", "delta", "z", "B", "C") else v.float()) for k, v in args.items()}
    y, h = cpu_kernels.selective_scan(**low, delta_softplus=True, return_final_state=True)
    y_ref, h_ref = selective_scan_ref(**low, delta_softplus=True, return_final_state=True)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)
    expected = grads(selective_scan_ref, low)
    for name, g in grads(cpu_kernels.selective_scan, low).items():
        assert g.dtype == low[name].dtype, name
        scale = expected[name].float().abs().max().item()
        torch.testing.assert_close(g.float(), expected[name].float(), atol=3e-2 * scale, rtol=3e-2, msg=name)


def test_non_contiguous_views_as_the_mixer_passes_them():
    """u, z are `chunk`s of one projection; dt, B, C are `split`s of another; outputs must not care."""
    g = torch.Generator().manual_seed(11)
    batch, length, channels, state = 2, T + 7, 23, 4
    xz = torch.randn(batch, length, 2 * channels, generator=g, dtype=torch.float64)
    proj = torch.randn(batch, length, channels + 2 * state, generator=g, dtype=torch.float64)
    u, z = xz.chunk(2, dim=-1)
    delta, B, C = proj.split([channels, state, state], dim=-1)
    base = scan_inputs(batch, length, channels, state)
    args = dict(base, u=u, z=z, delta=delta, B=B, C=C)
    assert not u.is_contiguous() and not B.is_contiguous()
    (y_ref, h_ref), (y, h) = both(args, delta_softplus=True, return_final_state=True)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    assert_grads_close(args, atol=1e-10, rtol=1e-10)


def test_threads_do_not_change_results():
    args = scan_inputs(3, 2 * T + 1, 70, 16, dtype=torch.float32, seed=4)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append((cpu_kernels.selective_scan(**args, delta_softplus=True), grads(cpu_kernels.selective_scan,
                                                                                           args)))
    finally:
        torch.set_num_threads(before)
    (y1, g1), (y2, g2) = results
    torch.testing.assert_close(y1, y2, atol=0, rtol=0)
    for name in g1:  # only dB and dC (sums over channels, split among threads) may differ, by rounding
        torch.testing.assert_close(g1[name], g2[name], atol=1e-6 * g1[name].abs().max().item(), rtol=0, msg=name)


def test_gradcheck(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "CHUNK", 2)  # several chunks in a 5-step sequence
    args = scan_inputs(2, 5, 3, 2, seed=9)
    leaves = [args[k].clone().requires_grad_(True) for k in NAMES]

    def fn(*tensors):
        return cpu_kernels.selective_scan(**dict(zip(NAMES, tensors)), delta_softplus=True, return_final_state=True)

    assert torch.autograd.gradcheck(fn, leaves)


def test_empty_sequence():
    args = scan_inputs(2, 0, 5, 3)
    y, h = cpu_kernels.selective_scan(**args, return_final_state=True)
    assert y.shape == (2, 0, 5)
    torch.testing.assert_close(h, args["initial_state"])


def test_saved_memory_does_not_grow_with_length_times_state():
    """Autograd keeps the inputs and one state per chunk: nothing of size batch * length * channels * state."""
    args = scan_inputs(1, 16 * T, 32, 16, dtype=torch.float32)
    leaves = {k: v.requires_grad_(True) for k, v in args.items()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        cpu_kernels.selective_scan(**leaves, delta_softplus=True)
    full = 16 * T * 32 * 16
    assert saved and max(saved) <= full // 16 and sum(saved) < full // 2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("contiguous_state", [True, False])
def test_state_update_continues_a_scan(dtype, contiguous_state):
    args = {k: v.to(dtype) for k, v in scan_inputs(3, 6, 21, 16).items()}
    y_ref, h_ref = selective_scan_ref(**args, delta_softplus=True, return_final_state=True)
    state = args["initial_state"].clone()
    if not contiguous_state:  # a view the kernel cannot write directly: updated through a copy
        state = state.transpose(1, 2).contiguous().transpose(1, 2)
    ref_state = args["initial_state"].clone()
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    for t in range(6):
        step = [args["u"][:, t], args["delta"][:, t], args["A"], args["B"][:, t], args["C"][:, t], args["D"],
                args["z"][:, t], args["delta_bias"]]
        y_t = cpu_kernels.selective_state_update(state, *step, delta_softplus=True)
        y_ref_t = selective_state_update_ref(ref_state, *step, delta_softplus=True)
        torch.testing.assert_close(y_t, y_ref_t, **tol)
        torch.testing.assert_close(y_t, y_ref[:, t], **tol)
    torch.testing.assert_close(state, h_ref, **tol)


@pytest.fixture
def cpu_backend(monkeypatch):
    monkeypatch.setitem(ops._chosen, "cpu", cpu_kernels)


@torch.no_grad()
def test_model_prefill_then_decode_equals_full_forward(cpu_backend):
    model = random_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 3 * T + 3), generator=torch.Generator().manual_seed(1))
    full = model(ids).logits
    cache = model.make_cache(2)
    pieces = [model(ids[:, :T + 5], cache=cache).logits]
    pieces += [model(ids[:, t:t + 1], cache=cache).logits for t in range(T + 5, T + 9)]
    pieces.append(model(ids[:, T + 9:], cache=cache).logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=0)


def test_model_gradients_match_plain_pytorch(monkeypatch):
    model = random_model().train()
    ids = torch.randint(0, model.config.vocab_size, (2, T + 10), generator=torch.Generator().manual_seed(2))
    results = []
    for backend in (None, cpu_kernels):
        monkeypatch.setitem(ops._chosen, "cpu", backend)
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_torch, g_torch), (loss_cpu, g_cpu) = results
    torch.testing.assert_close(loss_cpu, loss_torch, atol=1e-5, rtol=1e-5)
    for name in g_torch:
        torch.testing.assert_close(g_cpu[name], g_torch[name], atol=1e-5, rtol=1e-3, msg=name)


def test_unavailable_without_a_compiler(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_build, "_lib", None)
    monkeypatch.setattr(cpu_build, "_error", None)
    monkeypatch.setattr(cpu_build, "_compiler", lambda: None)
    monkeypatch.setenv("OPENJAMBA_CACHE", str(tmp_path))
    ok, why = cpu_kernels.is_available()
    assert not ok and "compiler" in why


def conv_inputs(batch, length, channels, kernel, window=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return dict(x=r(batch, length, channels), weight=r(channels, kernel), bias=r(channels),
                window=r(batch, kernel - 1, channels) if window else None)


@pytest.mark.parametrize("length", [1, 2, 3, 50])
@pytest.mark.parametrize("kernel", [1, 2, 4])
@pytest.mark.parametrize("silu", [True, False])
def test_conv_matches_reference(length, kernel, silu):
    args = conv_inputs(2, length, 37, kernel, window=length != 2, seed=length + kernel)
    y_ref, win_ref = causal_conv1d_ref(**args, silu=silu)
    y, win = cpu_kernels.causal_conv1d(**args, silu=silu)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(win, win_ref, atol=0, rtol=0)
    leaves = {k: v.clone().requires_grad_(True) for k, v in args.items() if v is not None}
    g = torch.Generator().manual_seed(1)
    wy, ww = torch.randn(y.shape, generator=g, dtype=y.dtype), torch.randn(win.shape, generator=g, dtype=y.dtype)

    def loss(fn):
        y, win = fn(**{**args, **leaves}, silu=silu)
        return (y * wy).sum() + (win * ww).sum()

    expected = torch.autograd.grad(loss(causal_conv1d_ref), list(leaves.values()))
    got = torch.autograd.grad(loss(cpu_kernels.causal_conv1d), list(leaves.values()))
    for name, a, b in zip(leaves, got, expected):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=name)


def test_conv_float32_and_views():
    xz = torch.randn(2, 70, 2 * 40, generator=torch.Generator().manual_seed(3))
    x = xz.chunk(2, dim=-1)[0]  # a view, as the mixer passes it
    weight, bias = torch.randn(40, 4), torch.randn(40)
    y_ref, win_ref = causal_conv1d_ref(x, weight, bias)
    y, win = cpu_kernels.causal_conv1d(x, weight, bias)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(win, win_ref)


def test_conv_bfloat16_gradients():
    args = {k: v.bfloat16() for k, v in conv_inputs(2, 30, 20, 4, seed=6).items()}
    leaves = {k: v.clone().requires_grad_(True) for k, v in args.items()}
    results = []
    for fn in (causal_conv1d_ref, cpu_kernels.causal_conv1d):
        y, _ = fn(**leaves)
        results.append((y, torch.autograd.grad(y.float().square().sum(), list(leaves.values()))))
    (y_ref, g_ref), (y, g) = results
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, atol=5e-2, rtol=2e-2)
    for name, a, b in zip(leaves, g, g_ref):
        assert a.dtype == torch.bfloat16, name
        torch.testing.assert_close(a.float(), b.float(), atol=3e-2 * b.float().abs().max().item(), rtol=3e-2, msg=name)


def test_conv_gradcheck():
    args = conv_inputs(2, 5, 3, 3, seed=4)
    leaves = [v.clone().requires_grad_(True) for v in args.values()]
    assert torch.autograd.gradcheck(lambda *t: cpu_kernels.causal_conv1d(*t), leaves)


@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64", "sapphirerapids"])
def test_library_builds_for_each_instruction_set(tmp_path, march):
    """The kernels compile for a CPU without AVX-512 (most laptops: AVX2, or plain x86-64), and their AVX-512
    paths (VNNI, VBMI, GFNI: sapphirerapids enables them all) compile on a machine that cannot run them. A build
    that fails leaves such a machine on the plain PyTorch ops, so every source must compile for each, not only for
    this machine's -march=native."""
    import platform
    import subprocess

    cxx = cpu_build._compiler()
    if cxx is None or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("needs an x86-64 C++ compiler")
    known = subprocess.run([cxx, f"-march={march}", "-E", "-x", "c++", "/dev/null"], capture_output=True)
    if known.returncode != 0:
        pytest.skip(f"this compiler does not know -march={march}")
    result = cpu_build.compile_library(cxx, [f"-march={march}", "-fopenmp"], tmp_path / "lib.so")
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.fixture(scope="module")
def avx2_scan_builds(tmp_path_factory) -> list:
    """selective_scan.cpp for AVX2 + FMA without AVX-512 (x86-64-v3), with its AVX2 forward and without it
    (OPENJAMBA_PLAIN_SCAN: the plain vectorised loops), loaded; skips where this machine cannot run them."""
    import ctypes
    import platform

    cxx = cpu_build._compiler()
    if cxx is None or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("needs an x86-64 C++ compiler")
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("needs a CPU with AVX2")
    libs, folder = [], tmp_path_factory.mktemp("avx2_scan")
    for name, extra in (("avx2", []), ("plain", ["-DOPENJAMBA_PLAIN_SCAN"])):
        path = folder / f"scan_{name}.so"
        result = cpu_build.compile_library(cxx, ["-march=x86-64-v3", "-fopenmp", *extra], path,
                                           [cpu_build.CSRC / "selective_scan.cpp"])
        assert result.returncode == 0, result.stderr[-2000:]
        lib = ctypes.CDLL(str(path))
        lib.scan_forward_f32.argtypes = [ctypes.POINTER(cpu_build.ScanArgs)]
        lib.scan_backward_f32.argtypes = [ctypes.POINTER(cpu_build.ScanArgs)]
        libs.append(lib)
    return libs


def _scan_outputs(lib, args: dict, softplus: bool, threads: int) -> tuple:
    """y, the final state and the chunk checkpoints of one fp32 forward call of `lib`."""
    import ctypes

    batch, length, channels = args["u"].shape
    state = args["A"].shape[1]
    y, hT = torch.empty(batch, length, channels), torch.empty(batch, channels, state)
    ckpt = torch.empty(batch, -(-length // T), channels, state)
    call = cpu_build.make_args(cpu_build.ScanArgs, batch=batch, length=length, channels=channels, state=state,
                               chunk=T, groups=threads, threads=threads, softplus=int(softplus), out=y, hT=hT,
                               ckpt=ckpt, u=args["u"], delta=args["delta"], z=args.get("z"), B=args["B"],
                               C=args["C"], A=args["A"], D=args.get("D"), bias=args.get("delta_bias"),
                               h0=args.get("initial_state"))
    lib.scan_forward_f32(ctypes.byref(call))
    return y, hT, ckpt


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, where any NaN equals any NaN (compilers may pick either operand's NaN)."""
    return bool(((a.view(torch.int32) == b.view(torch.int32)) | (a.isnan() & b.isnan())).all())


# Channels: whole 16-channel blocks and single ones (37, 53), one block (16), single channels only (5); state sizes
# around the 2-state groups; lengths around the 16-step passes and the 64-step chunks.
@pytest.mark.parametrize("channels, state", [(37, 16), (53, 8), (16, 4), (40, 5), (37, 24), (5, 16), (21, 1)])
@pytest.mark.parametrize("length", [1, 7, 17, T + 5])
def test_avx2_forward_equals_the_plain_loops(avx2_scan_builds, channels, state, length):
    """The AVX2 forward (selective_scan.cpp's forward_chunk_avx2) computes the plain loops' bits: outputs, final
    states and checkpoints, with and without softplus, each optional input, A with positive entries (no hint), dt
    large enough for the decays to underflow, NaN and inf, one or two threads."""
    avx2, plain = avx2_scan_builds
    base = {k: v.float() for k, v in scan_inputs(2, length, channels, state, seed=length + state).items()}
    positive_a = dict(base, A=base["A"] * torch.where(torch.rand(channels, state) < 0.2, -0.05, 1.0))
    fast_decay = dict(base, delta=base["delta"] * 15, A=base["A"] * 60)
    special = {k: v.clone() for k, v in base.items()}
    special["u"][0, -1, 2] = float("nan")
    special["delta"][1, 0, 3] = float("nan")
    special["delta"][0, length // 2, 17 % channels] = float("inf")
    cases = [base, positive_a, fast_decay, special]
    cases += [{k: v for k, v in base.items() if k not in drop} for drop in (("z",), ("D", "delta_bias"),
                                                                           ("initial_state",))]
    for i, args in enumerate(cases):
        for softplus in (True, False):
            for threads in (1, 2):
                got, expected = (_scan_outputs(lib, args, softplus, threads) for lib in (avx2, plain))
                for name, a, b in zip(("y", "final state", "checkpoints"), got, expected):
                    assert _same_bits(a, b), (i, softplus, threads, name)


def _scan_gradients(lib, args: dict, softplus: bool, threads: int) -> dict:
    """Every gradient of one fp32 backward call of `lib` (after its forward, for the checkpoints)."""
    import ctypes

    batch, length, channels = args["u"].shape
    state = args["A"].shape[1]
    ckpt = _scan_outputs(lib, args, softplus, threads)[2]
    groups = max(1, min(threads, channels // cpu_build.lanes()))
    g = torch.Generator().manual_seed(1)
    dout, dhT = torch.randn(batch, length, channels, generator=g), torch.randn(batch, channels, state, generator=g)
    rows, per_channel = (batch, length, channels), (channels,)
    grads = dict(du=torch.zeros(rows), ddelta=torch.zeros(rows), dz=torch.zeros(rows), dA=torch.zeros(channels, state),
                 dD=torch.zeros(per_channel), dbias=torch.zeros(per_channel), dh0=torch.zeros(batch, channels, state),
                 dB=torch.zeros(groups, batch, length, state), dC=torch.zeros(groups, batch, length, state))
    call = cpu_build.make_args(cpu_build.ScanArgs, batch=batch, length=length, channels=channels, state=state,
                               chunk=T, groups=groups, threads=threads, softplus=int(softplus), ckpt=ckpt, dout=dout,
                               dhT=dhT, u=args["u"], delta=args["delta"], z=args.get("z"), B=args["B"], C=args["C"],
                               A=args["A"], D=args.get("D"), bias=args.get("delta_bias"), h0=args.get("initial_state"),
                               **grads)
    lib.scan_backward_f32(ctypes.byref(call))
    return grads


@pytest.mark.parametrize("channels, state", [(37, 16), (53, 8), (40, 5), (5, 16)])
@pytest.mark.parametrize("length", [1, 17, 2 * T + 5])
def test_avx2_backward_equals_the_plain_loops(avx2_scan_builds, channels, state, length):
    """The backward's AVX2 recomputation of each chunk's states (recompute_chunk_avx2) gives the plain loops' bits:
    every gradient equal, with and without softplus, each optional input, A with positive entries."""
    avx2, plain = avx2_scan_builds
    base = {k: v.float() for k, v in scan_inputs(2, length, channels, state, seed=length + state).items()}
    positive_a = dict(base, A=base["A"] * torch.where(torch.rand(channels, state) < 0.2, -0.05, 1.0))
    cases = [base, positive_a] + [{k: v for k, v in base.items() if k not in drop}
                                  for drop in (("z",), ("D", "delta_bias", "initial_state"))]
    for i, args in enumerate(cases):
        for softplus in (True, False):
            for threads in (1, 2):
                got, expected = (_scan_gradients(lib, args, softplus, threads) for lib in (avx2, plain))
                for name in got:
                    assert _same_bits(got[name], expected[name]), (i, softplus, threads, name)


def _r(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


# (op, args, expected error): each kernel trusts every extent, so a tensor of another shape must raise before the
# kernel runs (without the checks several of these read or write out of bounds and abort the process).
MISMATCHED = {
    "scan A": (lambda: cpu_kernels.selective_scan(_r(2, 50, 37), _r(2, 50, 37), -_r(10, 16).abs(), _r(2, 50, 16),
                                                 _r(2, 50, 16)), ValueError),
    "scan initial state": (lambda: cpu_kernels.selective_scan(_r(2, 50, 37), _r(2, 50, 37), -_r(37, 16).abs(),
                                                              _r(2, 50, 16), _r(2, 50, 16),
                                                              initial_state=_r(1, 37, 16)), ValueError),
    "state update state": (lambda: cpu_kernels.selective_state_update(_r(2, 37, 4), _r(2, 37), _r(2, 37),
                                                                      -_r(37, 16).abs(), _r(2, 16), _r(2, 16)),
                           ValueError),
    "state update u": (lambda: cpu_kernels.selective_state_update(_r(2, 37, 16), _r(2, 74), _r(2, 74),
                                                                  -_r(37, 16).abs(), _r(2, 16), _r(2, 16)),
                       ValueError),
    "conv weight": (lambda: cpu_kernels.causal_conv1d(_r(2, 50, 37), _r(10, 4), _r(37)), ValueError),
    "conv window": (lambda: cpu_kernels.causal_conv1d(_r(2, 50, 37), _r(37, 4), _r(37), window=_r(1, 3, 37)),
                    ValueError),
    "attend v": (lambda: cpu_kernels.attend_to_all(_r(2, 8, 1, 16), _r(2, 2, 100, 16), _r(2, 2, 10, 16)),
                 ValueError),
    "attend batch": (lambda: cpu_kernels.attend_to_all(_r(4, 8, 1, 16), _r(2, 2, 100, 16), _r(2, 2, 100, 16)),
                     ValueError),
    "expert index": (lambda: cpu_kernels.expert_linear(_r(2, 256), _r(4, 512, 256), torch.tensor([0, 10 ** 6])),
                     IndexError),
}


@pytest.mark.parametrize("case", list(MISMATCHED))
def test_kernels_raise_on_shapes_they_cannot_read(case):
    call, error = MISMATCHED[case]
    with pytest.raises(error):
        call()
