"""Compiled CPU kernels for the Mamba ops: selective scan (forward + backward) and the decode step.

The C++ source (ops/csrc/selective_scan.cpp) includes no PyTorch headers and is called through ctypes, so the
one-time build is a single compiler call of a few seconds rather than a torch extension build of close to a minute
(and needs no ninja). The build is cached per source, compiler and target CPU under ~/.cache/openjamba (or
$OPENJAMBA_CACHE); without a working C++ compiler `is_available()` says why and the dispatcher uses plain PyTorch.

Training memory: the forward keeps only the state entering every chunk of CHUNK steps, (batch, L/CHUNK, channels,
state); the backward recomputes each chunk's states from it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .scan import selective_scan_ref

SOURCE = Path(__file__).with_name("csrc") / "selective_scan.cpp"
ABI_VERSION = 1
CHUNK = 64  # steps between saved states: checkpoint memory (L / CHUNK) vs. recompute buffers (CHUNK * state * 8)
SERIAL_BELOW = 1 << 16  # batch * length * channels * state (~1 ns each) below which waking threads costs more


# --------------------------------------------------------------------------------------------------------------
# Build and load.


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)


def _target_fingerprint(cxx: str, flags: list[str]) -> str:
    """The compiler's predefined macros under these flags: they name the instruction sets -march=native picked."""
    probe = _run([cxx, *flags, "-dM", "-E", "-x", "c++", os.devnull])
    return probe.stdout if probe.returncode == 0 else ""


def _cache_dir() -> Path:
    if os.environ.get("OPENJAMBA_CACHE"):
        return Path(os.environ["OPENJAMBA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "openjamba"


FLAG_SETS = (  # tried in order; the first that compiles wins (Apple clang, for one, has no -fopenmp)
    ["-march=native", "-fopenmp"],
    ["-fopenmp"],
    ["-march=native", "-fopenmp-simd"],
    [],
)
# -fno-trapping-math lets AVX2 if-convert the selects in exp (IEEE results, NaN and inf are unchanged).
BASE_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math"]


def _build() -> Path:
    """Compile (or find in the cache) the shared library; raises RuntimeError with the compiler's complaint."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    source = SOURCE.read_bytes()
    version = _run([cxx, "--version"]).stdout
    errors = []
    for extra in FLAG_SETS:
        flags = BASE_FLAGS + extra
        key = hashlib.sha256(
            b"\0".join(s.encode() if isinstance(s, str) else s for s in
                       (source, cxx, version, " ".join(flags), _target_fingerprint(cxx, extra), platform.machine()))
        ).hexdigest()[:16]
        target = _cache_dir() / f"cpu-kernels-{key}" / "selective_scan.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        print("openjamba: compiling CPU kernels (one-time, ~5 s)...", file=sys.stderr, flush=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
            result = _run([cxx, *flags, "-o", tmp.name, str(SOURCE)])
        if result.returncode == 0:
            os.replace(tmp.name, target)  # atomic: concurrent builders never load a half-written file
            return target
        os.unlink(tmp.name)
        errors.append(f"{' '.join(extra) or 'no extra flags'}: {result.stderr.strip()[-300:]}")
    raise RuntimeError("C++ build failed: " + " | ".join(errors))


class _Rows(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_void_p), ("batch_stride", ctypes.c_int64), ("token_stride", ctypes.c_int64)]


_ROWS = ("u", "delta", "z", "B", "C", "out", "dout", "du", "ddelta", "dz")
_POINTERS = ("A", "D", "bias", "h0", "hT", "ckpt", "dhT", "dA", "dD", "dbias", "dh0", "dB", "dC")


class _ScanArgs(ctypes.Structure):
    """Mirror of `ScanArgs` in selective_scan.cpp (same fields, same order)."""

    _fields_ = (
        [(name, ctypes.c_int64) for name in
         ("batch", "length", "channels", "state", "chunk", "groups", "threads", "softplus")]
        + [(name, _Rows) for name in _ROWS]
        + [(name, ctypes.c_void_p) for name in _POINTERS]
    )


_lib: ctypes.CDLL | None = None
_error: str | None = None


def _library() -> ctypes.CDLL:
    global _lib, _error
    if _lib is None and _error is None:
        try:
            lib = ctypes.CDLL(str(_build()))
            if lib.openjamba_abi_version() != ABI_VERSION:
                raise RuntimeError("stale kernel library (ABI version mismatch)")
            for name in ("scan_forward_f32", "scan_forward_f64", "scan_backward_f32", "scan_backward_f64"):
                getattr(lib, name).argtypes = [ctypes.POINTER(_ScanArgs)]
                getattr(lib, name).restype = None
            lib.openjamba_lanes.restype = ctypes.c_int
            _lib = lib
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:
            _error = str(err)
    if _lib is None:
        raise RuntimeError(_error)
    return _lib


def is_available() -> tuple[bool, str]:
    """(True, "") once the kernels are built and loaded; (False, why) otherwise. Builds on first call."""
    try:
        _library()
    except RuntimeError as err:
        return False, str(err)
    return True, ""


# --------------------------------------------------------------------------------------------------------------
# Calling the kernels.


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _rowwise(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """In the compute dtype with the last dim contiguous; other strides (e.g. `chunk` views) are kept."""
    if t is None:
        return None
    if t.dtype != dtype:
        t = t.to(dtype)
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _dense(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if t is None:
        return None
    if t.dtype != dtype:
        t = t.to(dtype)
    return t.contiguous()


def _rows(t: torch.Tensor | None) -> _Rows:
    """(batch, length, width) rows; a (batch, width) tensor is read as a sequence of length 1."""
    if t is None:
        return _Rows(None, 0, 0)
    return _Rows(t.data_ptr(), t.stride(0), t.stride(1) if t.dim() == 3 else 0)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _args(batch: int, length: int, channels: int, state: int, softplus: bool, groups: int, threads: int,
          **tensors: torch.Tensor | None) -> _ScanArgs:
    args = _ScanArgs(batch, length, channels, state, CHUNK, groups, threads, int(softplus))
    for name, t in tensors.items():
        setattr(args, name, _rows(t) if name in _ROWS else _ptr(t))
    return args


def _threads(work: int) -> int:
    return 1 if work < SERIAL_BELOW else max(1, torch.get_num_threads())


def _call(kind: str, dtype: torch.dtype, args: _ScanArgs) -> None:
    suffix = "f64" if dtype == torch.float64 else "f32"
    getattr(_library(), f"scan_{kind}_{suffix}")(ctypes.byref(args))


def _scan_forward(u, delta, A, B, C, D, z, delta_bias, h0, softplus: bool, keep_checkpoints: bool):
    """Inputs already in the compute dtype. Returns y (compute dtype), final state, checkpoints or None."""
    batch, length, channels = u.shape
    state = A.shape[-1]
    threads = _threads(batch * length * channels * state)
    out = torch.empty(batch, length, channels, dtype=u.dtype)
    final = torch.empty(batch, channels, state, dtype=u.dtype)
    ckpt = None
    if keep_checkpoints:
        ckpt = torch.empty(batch, -(-length // CHUNK), channels, state, dtype=u.dtype)
    args = _args(batch, length, channels, state, softplus, threads, threads, u=u, delta=delta, z=z, B=B, C=C,
                 out=out, A=A, D=D, bias=delta_bias, h0=h0, hT=final, ckpt=ckpt)
    _call("forward", u.dtype, args)
    return out, final, ckpt


class _SelectiveScan(torch.autograd.Function):
    """Chunk-checkpointed scan: saves the inputs and the state entering each chunk, nothing of size L * state."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, softplus):
        dtype = _compute_dtype(u)
        inputs = [_rowwise(t, dtype) for t in (u, delta, B, C, z)]
        params = [_dense(t, dtype) for t in (A, D, delta_bias, initial_state)]
        cu, cdelta, cB, cC, cz = inputs
        cA, cD, cbias, ch0 = params
        y, final, ckpt = _scan_forward(cu, cdelta, cA, cB, cC, cD, cz, cbias, ch0, softplus, keep_checkpoints=True)
        ctx.save_for_backward(cu, cdelta, cB, cC, cz, cA, cD, cbias, ckpt)
        ctx.softplus = softplus
        ctx.dtypes = [None if t is None else t.dtype for t in (u, delta, A, B, C, D, z, delta_bias, initial_state)]
        return y.to(u.dtype), final

    @staticmethod
    def backward(ctx, dy, dfinal):
        u, delta, B, C, z, A, D, bias, ckpt = ctx.saved_tensors
        batch, length, channels = u.shape
        state = A.shape[-1]
        dtype = u.dtype
        threads = _threads(batch * length * channels * state)
        # The backward splits channels only (each thread owns its channels' dA, dD, dbias; see the C++ notes).
        groups = max(1, min(threads, channels // _library().openjamba_lanes()))
        dy = _rowwise(dy, dtype)
        du, ddelta = torch.empty_like(u), torch.empty_like(u)
        dz = None if z is None else torch.empty(batch, length, channels, dtype=dtype)
        dA = torch.empty_like(A)
        dD, dbias = torch.empty(channels, dtype=dtype), torch.empty(channels, dtype=dtype)
        dh0 = torch.empty(batch, channels, state, dtype=dtype)
        dB = torch.empty(groups, batch, length, state, dtype=dtype)
        dC = torch.empty_like(dB)
        args = _args(batch, length, channels, state, ctx.softplus, groups, threads, u=u, delta=delta, z=z, B=B, C=C,
                     A=A, D=D, bias=bias, ckpt=ckpt, dout=dy, dhT=_dense(dfinal, dtype), du=du, ddelta=ddelta,
                     dz=dz, dA=dA, dD=dD, dbias=dbias, dh0=dh0, dB=dB, dC=dC)
        _call("backward", dtype, args)
        grads = (du, ddelta, dA, dB.sum(0), dC.sum(0), dD, dz, dbias, dh0)
        out = [None if g is None or not need or want is None else g.to(want)
               for g, need, want in zip(grads, ctx.needs_input_grad, ctx.dtypes)]
        return (*out, None)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `ops.scan.selective_scan_ref`, compiled; differentiable in every tensor input."""
    if u.shape[1] == 0:  # nothing to scan; the reference returns the right empty shapes
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                                  return_final_state)
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        y, final = _SelectiveScan.apply(*tensors, delta_softplus)
    else:
        dtype = _compute_dtype(u)
        cu, cdelta, cB, cC, cz = (_rowwise(t, dtype) for t in (u, delta, B, C, z))
        cA, cD, cbias, ch0 = (_dense(t, dtype) for t in (A, D, delta_bias, initial_state))
        y, final, _ = _scan_forward(cu, cdelta, cA, cB, cC, cD, cz, cbias, ch0, delta_softplus, False)
        y = y.to(u.dtype)
    return (y, final) if return_final_state else y


def selective_state_update(
    state: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """One decoding step (a scan of length 1 that reads and writes `state` in place); no autograd."""
    direct = state.dtype in (torch.float32, torch.float64) and state.is_contiguous()
    work = state if direct else state.float().contiguous()
    dtype = work.dtype
    cu, cdelta, cz, cB, cC = (_rowwise(t, dtype) for t in (u, delta, z, B, C))  # (batch, width): one-step rows
    cA, cD, cbias = (_dense(t, dtype) for t in (A, D, delta_bias))
    batch, channels = u.shape
    n = A.shape[-1]
    threads = _threads(batch * channels * n)
    out = torch.empty(batch, channels, dtype=dtype)
    args = _args(batch, 1, channels, n, delta_softplus, threads, threads, u=cu, delta=cdelta, z=cz, B=cB, C=cC,
                 out=out, A=cA, D=cD, bias=cbias, h0=work, hT=work)
    _call("forward", dtype, args)
    if not direct:
        state.copy_(work)
    return out if out.dtype == u.dtype else out.to(u.dtype)
