"""The Triton kernels against the float64 sequential reference: outputs, final states and every gradient.

Without a GPU the kernels run in Triton's interpreter on CPU tensors, in float64, so agreement is tight and any
indexing or gradient mistake shows. With a GPU the same tests run compiled on CUDA in fp32 (mamba_ssm's
tolerances), plus a bf16 case; those are marked `gpu`. A tiny chunk (T=4) and channel block (4, with 6 channels)
put chunk and block edges inside small shapes, which keeps the interpreter fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from openjamba.ops import selective_scan_ref, selective_state_update_ref


def _version(text: str) -> tuple[int, int]:
    return tuple(int(part) for part in text.split(".")[:2])


CUDA = torch.cuda.is_available()
if not CUDA and "triton" not in sys.modules:
    # Triton reads this when triton.language and the kernels are decorated (at import) and again when they run,
    # so it must be set before triton is first imported, and stays set.
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")
from openjamba.ops import triton_kernels as tk  # noqa: E402

# Interpreted only if triton.language itself was decorated under TRITON_INTERPRET (not imported earlier without it).
INTERPRETED = type(triton.language.sum).__name__ == "InterpretedFunction"
# Triton 3.6's interpreter turns runtime loop bounds into 1-element arrays, which NumPy >= 2.4 refuses to int().
OLD_INTERPRETER = _version(triton.__version__) < (3, 7) and _version(np.__version__) >= (2, 4)
T, BD = 4, 4  # chunk and channel block used by most tests
INTERPRETER_MARKS = [
    pytest.mark.skipif(not INTERPRETED, reason="no CUDA, and triton was imported before TRITON_INTERPRET=1"),
    pytest.mark.skipif(INTERPRETED and OLD_INTERPRETER, reason="Triton < 3.7 interpreter with NumPy >= 2.4"),
]
DEVICES = [
    pytest.param("cpu", marks=INTERPRETER_MARKS),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA or INTERPRETED, reason="needs CUDA")]),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def dtype_for(device: str) -> torch.dtype:
    return torch.float64 if device == "cpu" else torch.float32


def tolerance(dtype: torch.dtype) -> dict:
    return dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=6e-4, atol=2e-3)


def scan_inputs(batch=2, length=5, channels=6, state=4, dtype=torch.float64, device="cpu", dt_scale=1.0,
                a_scale=1.0, seed=0):
    """Random scan operands; u and z are the two halves of one (batch, length, 2*channels) tensor, as in the
    mixer, so they are non-contiguous views."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    u, z = r(batch, length, 2 * channels).chunk(2, dim=-1)
    A = -(torch.rand(channels, state, generator=g, dtype=torch.float64) * 8 + 0.1) * a_scale
    return dict(
        u=u, delta=r(batch, length, channels) * dt_scale, A=A.to(device=device, dtype=dtype),
        B=r(batch, length, state), C=r(batch, length, state), D=r(channels), z=z, delta_bias=r(channels),
        initial_state=r(batch, channels, state),
    )


def check_scan(args: dict, tol: dict, grad_tol: dict | None = None, **kwargs) -> None:
    """Kernel vs reference on the same inputs: y, final state, and gradients of a loss that uses both."""
    kernel_args = dict(chunk_size=T, block_d=BD) | kwargs.pop("kernel_args", {})
    args = {k: v.detach().requires_grad_(True) if v is not None else None for k, v in args.items()}
    y, final = tk.selective_scan(**args, **kwargs, **kernel_args, return_final_state=True)
    y_ref, final_ref = selective_scan_ref(**args, **kwargs, return_final_state=True)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(final, final_ref, **tol)

    g = torch.Generator().manual_seed(1)
    w_y = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.device)
    w_h = torch.randn(final.shape, generator=g, dtype=torch.float64).to(y.device)
    names = [k for k, v in args.items() if v is not None]
    inputs = [args[k] for k in names]
    grads = torch.autograd.grad((y.double() * w_y).sum() + (final.double() * w_h).sum(), inputs)
    grads_ref = torch.autograd.grad((y_ref.double() * w_y).sum() + (final_ref.double() * w_h).sum(), inputs)
    for name, got, want in zip(names, grads, grads_ref):
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(got, want, **(grad_tol or tol), msg=lambda m, n=name: f"d{n}: {m}")


# ----------------------------------------------------------------------------------------------------------------
# Selective scan


@pytest.mark.parametrize("length", [1, 2, T - 1, T, T + 1, 3 * T + 5])
def test_scan_matches_reference_across_chunk_edges(device, length):
    dtype = dtype_for(device)
    check_scan(scan_inputs(length=length, dtype=dtype, device=device), tolerance(dtype), delta_softplus=True)


@pytest.mark.parametrize("state", [1, 16])  # 16 > BD: dB/dC through atomics, elsewhere partial buffers
def test_scan_state_sizes(device, state):
    dtype = dtype_for(device)
    args = scan_inputs(batch=1, length=T + 1, channels=5, state=state, dtype=dtype, device=device, seed=2)
    check_scan(args, tolerance(dtype), delta_softplus=True)


def test_scan_large_dt_and_fast_decay(device):
    """softplus inputs far above its threshold (identity branch) and far below (dt ~ 0), and decays that underflow."""
    dtype = dtype_for(device)
    args = scan_inputs(batch=3, length=2 * T + 1, dtype=dtype, device=device, dt_scale=30.0, a_scale=10.0, seed=3)
    check_scan(args, tolerance(dtype), delta_softplus=True)


def test_scan_without_optional_inputs(device):
    dtype = dtype_for(device)
    args = scan_inputs(length=T + 3, dtype=dtype, device=device, seed=4)
    args.update(D=None, z=None, delta_bias=None, initial_state=None, delta=args["delta"].abs())
    check_scan(args, tolerance(dtype), delta_softplus=False)


def test_scan_fp32_within_mamba_tolerances(device):
    args = scan_inputs(length=3 * T + 5, dtype=torch.float32, device=device, seed=5)
    check_scan(args, tolerance(torch.float32), delta_softplus=True)


def test_scan_gradients_arriving_broadcast(device):
    """`.sum()` hands backward stride-0 (expanded) gradients for y and the final state."""
    dtype = dtype_for(device)
    args = scan_inputs(length=T + 1, dtype=dtype, device=device)
    args = {k: v.detach().requires_grad_(True) for k, v in args.items()}
    grads = []
    for fn, extra in ((tk.selective_scan, dict(chunk_size=T, block_d=BD)), (selective_scan_ref, {})):
        y, final = fn(**args, **extra, delta_softplus=True, return_final_state=True)
        grads.append(torch.autograd.grad(y.sum() + final.sum(), list(args.values())))
    for name, got, want in zip(args, *grads):
        torch.testing.assert_close(got, want, **tolerance(dtype), msg=lambda m, n=name: f"d{n}: {m}")


@INTERPRETER_MARKS[0]
@INTERPRETER_MARKS[1]
def test_scan_saves_no_per_token_state():
    """What backward keeps is O(B*D*N*L/T): never a (batch, length, channels, state) tensor."""
    batch, length, channels, state = 1, 64, 6, 4
    args = scan_inputs(batch, length, channels, state, dtype=torch.float32)
    args = {k: v.requires_grad_(True) for k, v in args.items()}
    y = tk.selective_scan(**args, delta_softplus=True, chunk_size=16, block_d=BD)
    extra = [t for t in y.grad_fn.saved_tensors if all(t is not v for v in args.values())]
    assert extra and max(t.numel() for t in extra) <= batch * length * channels * state // 4


# ----------------------------------------------------------------------------------------------------------------
# Decode step


@pytest.mark.parametrize("state, optional", [(1, True), (4, False), (16, True)])
def test_state_update_matches_reference(device, state, optional):
    dtype = dtype_for(device)
    args = scan_inputs(batch=3, length=1, channels=6, state=state, dtype=dtype, device=device, seed=6)
    step = {k: args[k][:, 0] for k in ("u", "delta", "B", "C", "z")}  # u, z: non-contiguous (batch, channels)
    extra = dict(D=args["D"], delta_bias=args["delta_bias"])
    if not optional:
        step["z"], extra = None, {}
    # A non-contiguous state, as a slice of a larger cache buffer would be.
    buffer = args["initial_state"].transpose(1, 2).contiguous().transpose(1, 2)
    state_ref = buffer.clone()
    y = tk.selective_state_update(buffer, A=args["A"], **step, **extra, delta_softplus=optional, block_d=BD)
    y_ref = selective_state_update_ref(state_ref, A=args["A"], **step, **extra, delta_softplus=optional)
    torch.testing.assert_close(y, y_ref, **tolerance(dtype))
    torch.testing.assert_close(buffer, state_ref, **tolerance(dtype))


def test_prefill_then_decode_equals_one_scan(device):
    """Scanning a prompt with the kernel and decoding the rest step by step reproduces one reference pass."""
    dtype = dtype_for(device)
    args = scan_inputs(length=T + 3, dtype=dtype, device=device, seed=7)
    y_ref, final_ref = selective_scan_ref(**args, delta_softplus=True, return_final_state=True)
    prompt = 5
    common = dict(A=args["A"], D=args["D"], delta_bias=args["delta_bias"], delta_softplus=True)
    head = {k: args[k][:, :prompt] for k in ("u", "delta", "B", "C", "z")}
    y_head, state = tk.selective_scan(**head, **common, initial_state=args["initial_state"], return_final_state=True,
                                      chunk_size=T, block_d=BD)
    ys = [y_head]
    for t in range(prompt, args["u"].shape[1]):
        step = {k: args[k][:, t] for k in ("u", "delta", "B", "C", "z")}
        ys.append(tk.selective_state_update(state, **step, **common, block_d=BD).unsqueeze(1))
    torch.testing.assert_close(torch.cat(ys, dim=1), y_ref, **tolerance(dtype))
    torch.testing.assert_close(state, final_ref, **tolerance(dtype))


# ----------------------------------------------------------------------------------------------------------------
# Through the model


def test_model_on_the_triton_ops_matches_plain_pytorch(device, monkeypatch):
    """The mixer's real calls go through the dispatcher to the kernels: in_proj views, fp32 parameters, gradients
    of every weight, and a cache (multi-token prefill, then one-token decode steps)."""
    from openjamba import ops

    from .conftest import random_model

    dtype = dtype_for(device)
    model = random_model(num_hidden_layers=3).to(device, dtype)  # Mamba, Mamba + MoE, attention
    ids = torch.randint(3, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0)).to(device)

    def run(backend):
        monkeypatch.setitem(ops._chosen, device, backend)
        model.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        cache = model.make_cache(2)
        steps = [model(ids[:, :4], cache=cache).logits]
        steps += [model(ids[:, t:t + 1], cache=cache).logits for t in (4, 5)]
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return out.logits.detach(), torch.cat(steps, dim=1).detach(), grads

    logits, cached, grads = run(tk)
    logits_ref, cached_ref, grads_ref = run(None)
    exact = dtype == torch.float64
    torch.testing.assert_close(logits, logits_ref, **tolerance(dtype))
    # The cache keeps the SSM state in fp32, so decoding is fp32 either way.
    torch.testing.assert_close(cached, cached_ref, rtol=1e-4, atol=1e-5)
    assert grads.keys() == grads_ref.keys() and any("A_log" in name for name in grads)
    for name in grads:
        tol = dict(rtol=1e-9, atol=1e-10) if exact else dict(rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(grads[name], grads_ref[name], **tol, msg=name)


# ----------------------------------------------------------------------------------------------------------------
# Availability and GPU-only checks


def test_kernels_compile_for_h100_without_spills():
    """Triton's real compiler and ptxas (bundled with the wheel) for sm_90, no GPU needed: catches compiled-mode
    errors the interpreter cannot, and register spills. Runs in a subprocess, as this one has TRITON_INTERPRET set."""
    from openjamba.ops.triton_tools import ptxas_path

    if ptxas_path(90) is None:
        pytest.skip("this triton has no NVIDIA backend with a bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    command = ["compile", "--arch", "90", "--io", "bf16", "--state", "16", "64"]  # 64: the dB/dC atomics variant
    run = subprocess.run([sys.executable, "-m", "openjamba.ops.triton_tools", *command],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(run.stdout.strip().splitlines()[-1])
    assert {row["kernel"] for row in rows} == {"scan_fwd", "scan_bwd", "state_update"}
    for row in rows:  # ptxas spills a few words in some versions (3.9: none; 3.6: 8 bytes; 3.7: up to 56)
        assert row["registers"] <= 255 and row["spill_stores"] <= 128, row


@pytest.mark.skipif(CUDA and not INTERPRETED, reason="the benchmark runs where there is CUDA")
def test_benchmark_without_cuda_is_one_line():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "openjamba.ops.triton_tools", "bench"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.startswith("python -m openjamba.ops.triton_tools bench: error: ")


def test_is_available_says_why_not():
    ok, why = tk.is_available()
    assert ok == (CUDA and not INTERPRETED)
    assert ok or why


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or INTERPRETED, reason="needs CUDA")
def test_scan_default_config_on_gpu():
    """The production chunk and block sizes, long enough for several chunks."""
    args = scan_inputs(batch=2, length=300, channels=100, state=16, dtype=torch.float32, device="cuda", seed=8)
    check_scan(args, tolerance(torch.float32), delta_softplus=True, kernel_args=dict(chunk_size=tk.CHUNK,
                                                                                    block_d=None))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or INTERPRETED, reason="needs CUDA")
def test_scan_bf16_on_gpu():
    """bf16 activations (as under autocast) with fp32 parameters; the reference sees the same bf16 inputs."""
    args = scan_inputs(batch=2, length=3 * T + 5, channels=6, state=16, dtype=torch.float32, device="cuda", seed=9)
    for k in ("u", "delta", "B", "C", "z"):
        args[k] = args[k].to(torch.bfloat16)
    check_scan(args, dict(rtol=3e-2, atol=5e-2), grad_tol=dict(rtol=5e-2, atol=1e-1), delta_softplus=True)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or INTERPRETED, reason="needs CUDA")
def test_dispatcher_picks_triton_on_cuda():
    from openjamba import ops

    if os.environ.get("OPENJAMBA_KERNEL", "triton") != "triton":
        pytest.skip("another backend is forced")
    assert ops.backend_for(torch.device("cuda")) is tk
