"""Build, cache and load the C++ CPU kernels (ops/csrc/*.cpp) as a plain shared library called through ctypes.

Why not a torch C++ extension: the sources include no PyTorch headers, so the one-time build is a compiler call per
source, run side by side on every core, and one link (about 15 s for all of csrc/ on a 2-core Zen 3); it needs no
ninja, and the library does not depend on torch's C++ ABI.
The price is that arguments travel as ctypes structures of pointers and strides (mirrored here field by field).

The build is cached under $OPENJAMBA_CACHE or ~/.cache/openjamba, keyed by the sources, the compiler, the flags and
the instruction sets `-march=native` enables, so a cache shared between machines never hands one a binary for
another CPU. Without a working compiler `library()` raises with the reason and the dispatcher uses plain PyTorch.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "selective_scan.cpp", CSRC / "causal_conv1d.cpp", CSRC / "attend_to_all.cpp", CSRC / "linear.cpp",
           CSRC / "mamba_step.cpp", CSRC / "rms_norm.cpp", CSRC / "ffn_step.cpp",
           CSRC / "quant_linear.cpp", CSRC / "quant_step.cpp", CSRC / "layer_step.cpp", CSRC / "argmax.cpp")
HEADERS = (CSRC / "common.h", CSRC / "avx2_math.h", CSRC / "tiles.h", CSRC / "quant_linear.h", CSRC / "quant_vnni.h",
           CSRC / "quant_avx2.h", CSRC / "mamba_step.h", CSRC / "ffn_step.h", CSRC / "attend_to_all.h")
ABI_VERSION = 6

# Tried in order; the first that compiles wins (Apple clang, for one, has no -fopenmp; some compilers lack
# -march=native). OpenMP shares torch's runtime (same libgomp soname), so threads come from one pool.
FLAG_SETS = (
    ["-march=native", "-fopenmp"],
    ["-fopenmp"],
    ["-march=native", "-fopenmp-simd"],
    [],
)
# -fno-trapping-math lets AVX2 if-convert the selects in exp (results, NaN and inf are unchanged); no -ffast-math.
BASE_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math"]


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def compile_library(cxx: str, flags: list[str], out: Path, sources=SOURCES) -> subprocess.CompletedProcess:
    """Compile `sources` with BASE_FLAGS + `flags` into the shared library `out`: each source to an object in its own
    compiler process, as many at once as there are cores (the objects are those of one call naming every source),
    then one link. Returns the first failing step's result, or the link's."""
    with tempfile.TemporaryDirectory(dir=out.parent) as objects:
        def compile_one(i_source):
            i, source = i_source
            return _run([cxx, *BASE_FLAGS, *flags, "-c", "-o", str(Path(objects) / f"{i}.o"), str(source)])

        with ThreadPoolExecutor(min(len(sources), os.cpu_count() or 1)) as pool:
            results = list(pool.map(compile_one, enumerate(sources)))
        failed = [r for r in results if r.returncode != 0]
        if failed:
            return failed[0]
        return _run([cxx, *BASE_FLAGS, *flags, "-o", str(out), *(str(Path(objects) / f"{i}.o")
                                                                   for i in range(len(sources)))])


def _cache_dir() -> Path:
    """$OPENJAMBA_CACHE, else ~/.cache/openjamba; the temp dir when that cannot be created (a read-only home)."""
    root = Path(os.environ.get("OPENJAMBA_CACHE") or
                Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "openjamba")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        root = Path(tempfile.gettempdir()) / "openjamba-cache"
    return root


def _cached_path(cxx: str, extra: list[str]) -> Path:
    """Where the build with these flags lives: keyed by sources, compiler, flags and the CPU they target."""
    target = _run([cxx, *extra, "-dM", "-E", "-x", "c++", os.devnull])  # predefined macros name the ISA
    parts = [p.read_bytes() for p in (*SOURCES, *HEADERS)]
    parts += [s.encode() for s in (cxx, _run([cxx, "--version"]).stdout, " ".join(BASE_FLAGS + extra),
                                   target.stdout if target.returncode == 0 else "", platform.machine())]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    return _cache_dir() / f"cpu-kernels-{key}" / "openjamba_cpu.so"


def build() -> Path:
    """Find in the cache or compile the shared library; raises RuntimeError with the compiler's complaint."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    candidates = []
    for extra in FLAG_SETS:
        target = _cached_path(cxx, extra)
        if target.exists():
            return target
        candidates.append((extra, target))
    print("openjamba: compiling CPU kernels (one-time, under a minute)...", file=sys.stderr, flush=True)
    errors = []
    for extra, target in candidates:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
            result = compile_library(cxx, extra, Path(tmp.name))
        if result.returncode == 0:
            os.replace(tmp.name, target)  # atomic: concurrent builders never load a half-written file
            return target
        os.unlink(tmp.name)
        errors.append(f"{' '.join(extra) or 'no extra flags'}: {result.stderr.strip()[-300:]}")
    raise RuntimeError("C++ build failed: " + " | ".join(errors))


# --------------------------------------------------------------------------------------------------------------
# Argument structures: mirrors of the C++ ones (same fields, same order).


class Rows(ctypes.Structure):
    """A (batch, length, width) tensor with unit stride along width; strides in elements."""

    _fields_ = [("ptr", ctypes.c_void_p), ("batch_stride", ctypes.c_int64), ("token_stride", ctypes.c_int64)]


def _fields(ints: str, rows: str, pointers: str) -> list:  # space-separated names of each kind
    return ([(n, ctypes.c_int64) for n in ints.split()] + [(n, Rows) for n in rows.split()]
            + [(n, ctypes.c_void_p) for n in pointers.split()])


class ScanArgs(ctypes.Structure):
    """`ScanArgs` of selective_scan.cpp."""

    _fields_ = _fields("batch length channels state chunk groups threads softplus",
                       "u delta z B C out dout du ddelta dz",
                       "A D bias h0 hT ckpt dhT dA dD dbias dh0 dB dC")


class ConvArgs(ctypes.Structure):
    """`ConvArgs` of causal_conv1d.cpp."""

    _fields_ = _fields("batch length channels kernel groups threads silu", "x y dy dx",
                       "weight bias window dweight dbias dwindow")


class AttendArgs(ctypes.Structure):
    """`AttendArgs` of attend_to_all.cpp."""

    _fields_ = _fields("batch kv_heads rows length head_dim block threads q_batch_stride q_head_stride q_row_stride "
                       "k_batch_stride k_head_stride k_token_stride v_batch_stride v_head_stride v_token_stride",
                       "", "q k v out starts")


class MambaStepArgs(ctypes.Structure):
    """`MambaStepArgs` of mamba_step.cpp."""

    _fields_ = (_fields("batch channels kernel rank state threads xz_stride", "", "")
                + [("eps", ctypes.c_double)]
                + _fields("", "", "xz conv_w conv_bias x_proj_w dt_norm_w B_norm_w C_norm_w dt_proj_w dt_bias A D "
                          "window h y scratch")
                + _fields("x_bits x_group x_threads dt_bits dt_group dt_threads", "",
                          "x_scales x_zeros dt_scales dt_zeros"))


class Weight(ctypes.Structure):
    """`Weight` of quant_linear.h: one weight matrix, fp32 (bits 0) or quantized in openjamba.quant's layout."""

    _fields_ = _fields("bits group threads", "", "q scales zeros")


class MlpStepArgs(ctypes.Structure):
    """`MlpStepArgs` of ffn_step.h (quant_step.cpp's MLP)."""

    _fields_ = (_fields("rows hidden inner x_stride", "", "") + [(n, Weight) for n in ("gate", "up", "down")]
                + _fields("", "", "x residual out scratch"))


class FfnStepArgs(ctypes.Structure):
    """`FfnStepArgs` of ffn_step.h (ffn_step.cpp's MLP or MoE)."""

    _fields_ = _fields("rows hidden inner experts top_k threads x_stride expert_stride down_stride", "",
                       "x residual router_w gate_w up_w down_w out")


class FfnArgs(ctypes.Structure):
    """`FfnArgs` of layer_step.cpp: the FFN after a layer's mixer."""

    _fields_ = [("quantized_mlp", ctypes.c_int64), ("ffn", FfnStepArgs), ("mlp", MlpStepArgs)]


class MambaLayerArgs(ctypes.Structure):
    """`MambaLayerArgs` of layer_step.cpp."""

    _fields_ = (_fields("rows hidden inner", "", "") + [("in_eps", ctypes.c_double), ("ff_eps", ctypes.c_double)]
                + [(n, Weight) for n in ("in_proj", "out_proj")]
                + _fields("", "", "x in_norm_w ff_norm_w out scratch")
                + [("mamba", MambaStepArgs), ("ffn", FfnArgs)])


class AttentionLayerArgs(ctypes.Structure):
    """`AttentionLayerArgs` of layer_step.cpp."""

    _fields_ = (_fields("rows hidden heads kv_heads head_dim position", "", "")
                + [("in_eps", ctypes.c_double), ("ff_eps", ctypes.c_double)]
                + [(n, Weight) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
                + _fields("", "", "x in_norm_w ff_norm_w out scratch")
                + [("attend", AttendArgs), ("ffn", FfnArgs)])


# linear.cpp's arguments: x, weight, bias, index, y, then rows, in, out, x_stride, y_stride, matrix_stride, threads.
# Plain arguments, not a structure: decoding makes dozens of these calls per token, and this is the cheapest call.
LINEAR_ARGTYPES = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 7
RMS_NORM_ARGTYPES = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_double]  # x, weight, y, rows, width, eps
ARGMAX_ARGTYPES = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 3  # x, out, rows, width, x_stride
ADD_RMS_NORM_ARGTYPES = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 2 + [ctypes.c_double]  # x, h, weight, s, y, ...


def make_args(cls: type[ctypes.Structure], **values: int | torch.Tensor | None) -> ctypes.Structure:
    """Fill a structure from ints and tensors (or None: a null pointer / absent rows).

    The structure keeps the tensors alive: a pointer to a temporary (say `x.float()` written inline in the call)
    would otherwise dangle by the time the kernel runs. Decoding calls this a few times per layer and token, so it
    is kept cheap (one constructor call: ~8 us, half what setting each field cost).
    """
    kinds = _field_kinds(cls)
    fields, tensors = {}, []
    for name, value in values.items():
        if value is None:
            continue  # zero-initialised: a null pointer, or Rows(None, 0, 0)
        if isinstance(value, torch.Tensor):
            tensors.append(value)
            if kinds[name] is Rows:  # 2-D rows: one step
                value = Rows(value.data_ptr(), value.stride(0), value.stride(1) if value.dim() == 3 else 0)
            else:
                value = value.data_ptr()
        fields[name] = value
    args = cls(**fields)
    args.tensors = tensors
    return args


@functools.cache
def _field_kinds(cls: type[ctypes.Structure]) -> dict:
    return dict(cls._fields_)


_FUNCTIONS = {"scan_forward": ScanArgs, "scan_backward": ScanArgs, "conv_forward": ConvArgs,
              "conv_backward": ConvArgs, "attend_to_all": AttendArgs, "attend_to_all_bf16": AttendArgs,
              "mamba_step": MambaStepArgs, "ffn_step": FfnStepArgs}
_lib: ctypes.CDLL | None = None
_error: str | None = None


def library() -> ctypes.CDLL:
    """The loaded library (built on first use); raises RuntimeError with the reason when it cannot be had."""
    global _lib, _error
    if _lib is None and _error is None:
        try:
            lib = ctypes.CDLL(str(build()))
            if lib.openjamba_abi_version() != ABI_VERSION:
                raise RuntimeError("stale kernel library (ABI version mismatch)")
            for name, cls in _FUNCTIONS.items():
                for suffix in ("f32", "f64"):
                    fn = getattr(lib, f"{name}_{suffix}")
                    fn.argtypes, fn.restype = [ctypes.POINTER(cls)], None
            for suffix in ("f32", "f64"):
                for name, argtypes in (("linear", LINEAR_ARGTYPES), ("rms_norm", RMS_NORM_ARGTYPES),
                                       ("add_rms_norm", ADD_RMS_NORM_ARGTYPES)):
                    fn = getattr(lib, f"{name}_{suffix}")
                    fn.argtypes, fn.restype = argtypes, None
            lib.openjamba_lanes.restype = ctypes.c_int
            lib.argmax_rows_f32.argtypes, lib.argmax_rows_f32.restype = ARGMAX_ARGTYPES, None
            lib.quant_mlp_step.argtypes, lib.quant_mlp_step.restype = [ctypes.POINTER(MlpStepArgs)], None
            lib.mamba_layer_step.argtypes, lib.mamba_layer_step.restype = [ctypes.POINTER(MambaLayerArgs)], None
            lib.attention_layer_step.argtypes = [ctypes.POINTER(AttentionLayerArgs)]
            lib.attention_layer_step.restype = None
            _lib = lib
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:
            _error = str(err)
    if _lib is None:
        raise RuntimeError(_error)
    return _lib


def call(name: str, dtype: torch.dtype, args: ctypes.Structure) -> None:
    """Run kernel `name` (e.g. "scan_forward") in fp64 for fp64 tensors, else fp32. Releases the GIL meanwhile."""
    getattr(library(), f"{name}_{'f64' if dtype == torch.float64 else 'f32'}")(ctypes.byref(args))


def lanes() -> int:
    """Channels per vector block in the compiled kernels (their unit of work splitting)."""
    return library().openjamba_lanes()
