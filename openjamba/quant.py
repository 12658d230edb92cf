"""Weight-only quantization: int8 per output channel and int4 per group, for every large projection.

What is quantized: attention q/k/v/o, Mamba in_proj/x_proj/dt_proj/out_proj, the MLPs, the fused experts and the
LM head (with a tied embedding, which then looks its rows up in the quantized table). Norms, the conv, A_log, D,
the router, an untied embedding and the Mamba state stay in full precision.

The formats (what a quantized checkpoint stores for a weight `X.weight` of shape (N, K); see docs/quantization.md):
  int8  X.qweight int8 (N, K), X.scales fp32 (N,)               w[n, k] = q[n, k] * scales[n]
  int4  X.qweight uint8 (N, K/2), X.scales, X.zeros bf16 (N, K/g)   w[n, k] = (q[n, k] - 8) * scales[n, k // g]
        two 4-bit values per byte, column 2j in the low nibble          + zeros[n, k // g]
int8 scales are rounded to bf16 values too (stored as fp32: one per row). int4's scales and zeros are 4 of every 68
bytes a decode step reads, so they are kept in bf16; checkpoints written with fp32 ones (bf16-exact) load unchanged.

On CPU the products run in openjamba's own kernels (ops/csrc/quant_linear.cpp), which read the documented layout
where it lies and quantize the activations per row to int8 in blocks (32 inputs for int8 weights, one weight group
for int4), so each block is an integer dot product (AVX-512 VNNI where the CPU has it); `kernel_reference` is that
arithmetic in plain PyTorch. Elsewhere (CUDA), or where the kernels cannot run, the weight is dequantized to the
activation dtype and applied with F.linear: `reference_linear`, the plain path every kernel is tested against.
"""

from __future__ import annotations

import ctypes
import functools
import re

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .ops import cpu_kernels

METHODS = ("int8", "int4")
BITS = {"int8": 8, "int4": 4}
DEFAULT_GROUP_SIZE = 128
INT4_GROUP_SIZES = (256, 128, 64, 32)  # what the CPU int4 kernel accepts; a smaller one is used if K needs it
INT8_ACTIVATION_BLOCK = 32  # inputs per activation scale in the int8 kernel (int4: one weight group)
INT4_SCALE_DTYPE = torch.bfloat16  # int4 scales and zeros (bf16-exact by construction)
# nn.Linear modules that stay in full precision (the router decides which experts run: small and sensitive).
KEEP_FULL_PRECISION = re.compile(r"(^|\.)router$")


class QuantizationError(ValueError):
    """A bad quantization request or a quantized checkpoint that cannot be used as it is."""


def check_method(method: str | None) -> str | None:
    if method is not None and method not in METHODS:
        raise QuantizationError(f"unknown quantization {method!r}; choose from {', '.join(METHODS)}")
    return method


# ---------------------------------------------------------------------- formats and their plain reference
def _round_to_bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def int4_group_size(in_features: int, out_features: int, preferred: int = DEFAULT_GROUP_SIZE) -> int | None:
    """The int4 group for a (out, in) weight: `preferred`, else the largest smaller one dividing `in_features`.

    None when no group fits: that tensor is stored in int8. (`out_features` is accepted for the callers' symmetry;
    the kernels take any number of rows.)
    """
    for group in (preferred,) + tuple(g for g in INT4_GROUP_SIZES if g < preferred):
        if in_features % group == 0:
            return group
    return None


def quantize_int8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Symmetric per-output-channel int8 of a (..., N, K) weight: q in [-127, 127], scale = max|w| / 127."""
    w = weight.float()
    scales = _round_to_bf16(w.abs().amax(-1).clamp(min=1e-12) / 127)
    q = (w / scales[..., None]).round_().clamp_(-127, 127).to(torch.int8)  # one temporary, updated in place
    return {"qweight": q, "scales": scales}


def quantize_int4(weight: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """Asymmetric int4 of a (..., N, K) weight in groups of `group_size` inputs (q in [0, 15] spans each group)."""
    *lead, N, K = weight.shape
    if K % group_size:
        raise QuantizationError(f"a weight with {K} inputs cannot be split into int4 groups of {group_size}")
    w = weight.float().reshape(*lead, N, K // group_size, group_size)
    low, high = w.amin(-1), w.amax(-1)
    scales = _round_to_bf16(((high - low) / 15).clamp(min=1e-12))
    zeros = _round_to_bf16(low + 8 * scales)  # w = (q - 8) * scale + zero, the kernel's convention
    # One temporary updated in place (a fresh 16 MB buffer per operation costs its page faults again).
    q = (w - zeros[..., None]).div_(scales[..., None]).add_(8).round_().clamp_(0, 15).to(torch.uint8)
    q = q.reshape(*lead, N, K)
    return {"qweight": q[..., 0::2] | (q[..., 1::2] << 4), "scales": scales.to(INT4_SCALE_DTYPE),
            "zeros": zeros.to(INT4_SCALE_DTYPE)}


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(..., N, K/2) uint8 -> (..., N, K) values 0..15 (column 2j from the low nibble)."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


def dequantize(tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The full-precision (..., N, K) weight a quantized one stands for (the reference every kernel matches)."""
    q, scales = tensors["qweight"], tensors["scales"].float()
    if q.dtype == torch.int8:
        return (q.float() * scales[..., None]).to(dtype)
    values = unpack_int4(q).float()
    *lead, N, K = values.shape
    groups = scales.shape[-1]
    grouped = values.view(*lead, N, groups, K // groups)
    return ((grouped - 8) * scales[..., None] + tensors["zeros"].float()[..., None]).view(*lead, N, K).to(dtype)


def reference_linear(x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Dequantize, then F.linear in x's dtype."""
    return F.linear(x, dequantize(tensors, x.dtype))


def quantize_weight(weight: torch.Tensor, method: str, group_size: int = DEFAULT_GROUP_SIZE) -> dict[str, torch.Tensor]:
    """int8 or int4 of a (..., N, K) weight; int4 falls back as `int4_group_size` says (int8 when nothing fits)."""
    K = weight.shape[-1]
    flat = weight.reshape(-1, K)
    return quantize_rows(lambda start, stop: flat[start:stop], tuple(weight.shape), method, group_size)


# Rows quantized per step: 4M weights (16 MB in fp32), so quantizing a large matrix (a 65536 x 2560 LM head)
# never holds more than this in fp32 temporaries.
CHUNK_ELEMENTS = 1 << 22


def quantize_rows(read_rows, shape: tuple[int, ...], method: str, group_size: int = DEFAULT_GROUP_SIZE,
                  out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Quantize a (..., N, K) weight a block of rows at a time. `read_rows(start, stop)` gives rows start:stop of
    the weight seen as (prod(...) * N, K) (from memory, a file or a random generator); rows are independent in both
    formats. `out`: tensors of the format to fill (`empty_quantized`), allocated here when None."""
    *lead, N, K = shape
    out = out if out is not None else empty_quantized(shape, method, group_size)
    rows = N
    for d in lead:
        rows *= d
    flat = {name: t.reshape(rows, *t.shape[len(lead) + 1:]) for name, t in out.items()}
    if any(t.data_ptr() != out[name].data_ptr() for name, t in flat.items()):
        raise QuantizationError("quantize_rows needs contiguous output tensors")
    int4 = out["qweight"].dtype == torch.uint8
    group = K // out["scales"].shape[-1] if int4 else None
    step = max(1, CHUNK_ELEMENTS // K)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        block = read_rows(start, stop).float()
        made = quantize_int4(block, group) if int4 else quantize_int8(block)
        for name, t in flat.items():
            t[start:stop].copy_(made[name])
    return out


def empty_quantized(shape: tuple[int, ...], method: str, group_size: int = DEFAULT_GROUP_SIZE,
                    device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Uninitialised tensors of the format `quantize_weight` gives for a weight of `shape` (filled while loading)."""
    *lead, N, K = shape
    group = int4_group_size(K, N, group_size) if method == "int4" else None
    if group is None:
        return {"qweight": torch.empty(*lead, N, K, dtype=torch.int8, device=device),
                "scales": torch.empty(*lead, N, device=device)}
    return {"qweight": torch.empty(*lead, N, K // 2, dtype=torch.uint8, device=device),
            "scales": torch.empty(*lead, N, K // group, dtype=INT4_SCALE_DTYPE, device=device),
            "zeros": torch.empty(*lead, N, K // group, dtype=INT4_SCALE_DTYPE, device=device)}


# ---------------------------------------------------------------------- the CPU kernels and their reference
def quantize_activations(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, K) -> int8 values (rows, K) and scales (rows, K / block): the CPU kernels' activations, symmetric per
    block of `block` inputs, x ~ q * scale, q = round-half-even(x * 127 / max|x|), the same fp32 operations."""
    rows, K = x.shape
    blocks = x.float().reshape(rows, K // block, block)
    amax = blocks.abs().amax(-1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inv[..., None]).to(torch.int8).reshape(rows, K)
    return q, amax / 127.0


def kernel_reference(x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """What the CPU kernel computes for x (..., K), in float64: x quantized as `quantize_activations` does, times
    the dequantized weight. The kernel equals it up to fp32 accumulation (its block sums are exact integers)."""
    K = x.shape[-1]
    block = INT8_ACTIVATION_BLOCK if tensors["qweight"].dtype == torch.int8 else K // tensors["scales"].shape[-1]
    flat = x.reshape(-1, K)
    q, scales = quantize_activations(flat, block)
    xd = (q.double().view(flat.shape[0], -1, block) * scales.double()[..., None]).view(flat.shape)
    return F.linear(xd, dequantize(tensors, torch.float64)).view(*x.shape[:-1], -1)


def _cpu_library() -> ctypes.CDLL | None:
    """The compiled CPU kernels, or None when they cannot run here (no compiler, or OPENJAMBA_KERNEL=torch): the
    reference serves then. Asked on every product (a dictionary lookup), so a backend switch takes effect."""
    return None if ops.backend_for(_CPU) is None else _quant_functions()


_CPU = torch.device("cpu")


@functools.cache
def _quant_functions() -> ctypes.CDLL:
    """The kernel library with the quantized products' signatures set."""
    from .ops import cpu_build

    lib = cpu_build.library()
    lib.qlinear_int8.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 6
    lib.qlinear_int4.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 7
    lib.qlinear_quantize_activations.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3
    for fn in (lib.qlinear_int8, lib.qlinear_int4, lib.qlinear_quantize_activations):
        fn.restype = None
    lib.qembedding_rows.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 4
    lib.qembedding_rows.restype = ctypes.c_int64
    return lib



# ---------------------------------------------------------------------- modules
class QuantizedWeight(nn.Module):
    """A quantized (..., N, K) weight (one matrix, or one per expert), applied by `linear(x, *index)`.

    Buffers `qweight`, `scales` (and `zeros` for int4) hold the documented format, which the CPU kernels read as it
    is: the weight exists once in memory, in the layout a checkpoint stores.
    """

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name, t in tensors.items():
            self.register_buffer(name, t)
        self.bits = 8 if self.qweight.dtype == torch.int8 else 4
        self.in_features = self.qweight.shape[-1] * (2 if self.bits == 4 else 1)
        self.out_features = self.qweight.shape[-2]

    def restore_scale_dtypes(self) -> None:
        """Undo a model-wide dtype conversion for the scales and zeros: fp32 for int8, bf16 for int4 (the kernels'
        operands; the values are bf16-exact, so either conversion is lossless)."""
        dtype = torch.float32 if self.bits == 8 else INT4_SCALE_DTYPE
        self.scales = self.scales.to(dtype)
        if self.bits == 4:
            self.zeros = self.zeros.to(dtype)

    @property
    def group_size(self) -> int | None:
        return self.in_features // self.scales.shape[-1] if self.bits == 4 else None

    def prepare(self) -> QuantizedWeight:
        """Once the buffers hold their final values: make them contiguous, scales in the kernels' dtypes
        (they already are after loading; nothing is repacked)."""
        for name, t in self.tensors().items():
            if not t.is_contiguous():
                setattr(self, name, t.contiguous())
        self.restore_scale_dtypes()
        return self

    def kernel_operands(self) -> tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(bits, int4 group or 0, q, scales, zeros or None): what a fused decode-step kernel reads (ops.mamba_step,
        ops.mlp_step). Read from the buffers directly: called for several weights of every layer and token."""
        buffers = self._buffers
        scales = buffers["scales"]
        if self.bits == 8:
            return 8, 0, buffers["qweight"], scales, None
        return 4, self.in_features // scales.shape[-1], buffers["qweight"], scales, buffers["zeros"]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The documented format (what a checkpoint stores)."""
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.bits == 4:
            out["zeros"] = self.zeros
        return out

    def linear(self, x: torch.Tensor, *index: int, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ w.T (+ bias) for the weight w[index] (an expert's matrix) or the whole weight when it is one matrix."""
        out = self._cpu_kernel(x, bias, index, None)
        if out is not None:
            return out
        out = reference_linear(x, {k: v[index] if index else v for k, v in self.tensors().items()})
        return out if bias is None else out + bias.to(out.dtype)

    def expert_linear(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Row r of x (rows, K) times matrix index[r] of a stacked (E, N, K) weight: (rows, N), the chosen matrices
        read where they lie and the index read by the kernel (a decode step's experts: no host synchronisation).
        The same contract as `ops.expert_linear` for a full-precision stack."""
        out = self._cpu_kernel(x, None, (), index)
        if out is not None:
            return out
        chosen = dequantize({k: v.index_select(0, index) for k, v in self.tensors().items()}, x.dtype)  # (rows, N, K)
        return torch.bmm(x.unsqueeze(1), chosen.transpose(1, 2)).squeeze(1)

    def _cpu_kernel(self, x: torch.Tensor, bias: torch.Tensor | None, index: tuple,
                    gather: torch.Tensor | None) -> torch.Tensor | None:
        """The product in ops/csrc/quant_linear.cpp, or None where it does not apply (another device or dtype,
        autograd, a weight whose inputs are not a multiple of QUANT_K_MULTIPLE, no compiled kernels). Called for
        every projection of every decoded token, so it reads the buffers directly, checks only what can differ, and
        takes a decode step's rows (B, K) as they are (no reshape, no view)."""
        K, N = self.in_features, self.out_features
        if (x.dtype != torch.float32 or not x.is_cpu or K % cpu_kernels.QUANT_K_MULTIPLE or x.shape[-1] != K
                or (x.requires_grad and torch.is_grad_enabled()) or x.numel() == 0
                or (bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()))):
            return None
        lib = _cpu_library()
        if lib is None:
            return None
        flat = x if x.dim() == 2 else x.reshape(-1, K)
        if flat.stride(-1) != 1:
            flat = flat.contiguous()
        rows = flat.shape[0]
        buffers = self._buffers
        q, scales = buffers["qweight"], buffers["scales"]
        if index:
            q, scales = q[index], scales[index]
        if gather is not None:
            gather = gather.to(torch.int64).contiguous()
        y = torch.empty(rows, N)
        threads = cpu_kernels.product_threads(N * K)
        pointers = (None if bias is None else bias.data_ptr(), None if gather is None else gather.data_ptr(),
                    y.data_ptr())
        if self.bits == 8:
            lib.qlinear_int8(flat.data_ptr(), q.data_ptr(), scales.data_ptr(), *pointers, rows, K, N, flat.stride(0),
                             N, threads)
        else:
            zeros = buffers["zeros"][index] if index else buffers["zeros"]
            lib.qlinear_int4(flat.data_ptr(), q.data_ptr(), scales.data_ptr(), zeros.data_ptr(), *pointers, rows, K,
                             N, K // scales.shape[-1], flat.stride(0), N, threads)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], N)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"int{self.bits}, shape={tuple(self.qweight.shape[:-2])+(self.out_features, self.in_features)}{group}"


class QuantizedLinear(nn.Module):
    """nn.Linear with a quantized weight (the bias, if any, stays in full precision)."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.quantized = weight
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.in_features, self.out_features = weight.in_features, weight.out_features

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """The product without the bias (Mamba's dt_proj adds its bias in fp32 inside the scan)."""
        return self.quantized.linear(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantized.linear(x, bias=self.bias)


class QuantizedEmbedding(nn.Module):
    """The lookup into a tied, quantized embedding/LM-head table: each looked-up row is dequantized from the LM
    head's own tensors (no second copy of the table)."""

    def __init__(self, head: QuantizedWeight, dtype: torch.dtype) -> None:
        super().__init__()
        self.head = [head]  # a plain list: the head is the LM head's module, not this one's
        # Carries the activations' dtype through model.to(dtype) (an empty tensor, not saved).
        self.register_buffer("dtype_of_output", torch.empty(0, dtype=dtype), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self._cpu_kernel(ids)
        if out is not None:
            return out
        return dequantize({name: t[ids] for name, t in self.head[0].tensors().items()}, self.dtype_of_output.dtype)

    def _cpu_kernel(self, ids: torch.Tensor) -> torch.Tensor | None:
        """The rows dequantized by one call of quant_linear.cpp's `qembedding_rows` (a decoded token's lookup was a
        dozen tensor ops), or None where it does not apply (another device or dtype, no compiled kernels)."""
        head = self.head[0]
        stored = head.tensors()
        q, scales = stored["qweight"], stored["scales"]
        if (self.dtype_of_output.dtype != torch.float32 or not ids.is_cpu or ids.dtype != torch.int64
                or not q.is_cpu or q.dim() != 2 or not (q.is_contiguous() and scales.is_contiguous())
                or scales.dtype != (torch.float32 if head.bits == 8 else INT4_SCALE_DTYPE)):
            return None
        lib = _cpu_library()
        if lib is None:
            return None
        zeros = stored.get("zeros")
        if zeros is not None and (zeros.dtype != INT4_SCALE_DTYPE or not zeros.is_contiguous()):
            return None
        flat = ids.reshape(-1)
        if not flat.is_contiguous():
            flat = flat.contiguous()
        K, N = head.in_features, head.out_features
        out = torch.empty(*ids.shape, K)
        bad = lib.qembedding_rows(flat.data_ptr(), flat.numel(), q.data_ptr(), scales.data_ptr(),
                                  None if zeros is None else zeros.data_ptr(), out.data_ptr(), N, K, head.bits,
                                  head.group_size or 0)
        if bad >= 0:
            raise IndexError(f"index {int(flat[bad])} is out of range for an embedding of {N} rows")
        return out


# ---------------------------------------------------------------------- which tensors, and the model swap
def _is_fused_experts(module: nn.Module) -> bool:
    """The model's Experts: fused (E, 2I, H) and (E, H, I) parameters, applied one expert matrix at a time."""
    return isinstance(getattr(module, "gate_up_proj", None), nn.Parameter)


def quantized_params(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """State-dict names of the weights `quantize` replaces, with their shapes (works on a meta model)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not KEEP_FULL_PRECISION.search(name):
            out[f"{name}.weight"] = tuple(module.weight.shape)
        elif _is_fused_experts(module):
            out[f"{name}.gate_up_proj"] = tuple(module.gate_up_proj.shape)
            out[f"{name}.down_proj"] = tuple(module.down_proj.shape)
    return out


def install(model: nn.Module, weights: dict[str, QuantizedWeight], prepare: bool = True) -> nn.Module:
    """Swap the model's quantized layers for their quantized versions. `weights`: param name -> QuantizedWeight
    (as `quantized_params` names them); linear biases are kept. A tied embedding looks up the LM head's table.
    `prepare=False` when the buffers are still to be filled (loading): call `prepare_all` afterwards."""
    for name, module in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, nn.Linear) and f"{name}.weight" in weights:
            setattr(parent, child, QuantizedLinear(weights[f"{name}.weight"], module.bias))
        elif _is_fused_experts(module) and f"{name}.gate_up_proj" in weights:
            # The Experts module stays; its fused parameters become quantized weights (model.Experts.expert
            # applies either kind, one expert matrix at a time).
            for param in ("gate_up_proj", "down_proj"):
                delattr(module, param)
                setattr(module, param, weights[f"{name}.{param}"])
    if model.config.tie_word_embeddings and "lm_head.weight" in weights:
        dtype = model.model.final_layernorm.weight.dtype
        model.model.embed_tokens = QuantizedEmbedding(weights["lm_head.weight"], dtype)
    if prepare:
        prepare_all(model)
    return model


def prepare_all(model: nn.Module) -> None:
    """Once the quantized buffers hold their values: ready them for the kernels (on CPU, gathered into one
    huge-page-aligned buffer), and return freed memory."""
    weights = list(quantized_weights(model).values())
    for weight in weights:
        weight.prepare()
    gather_into_arena([w for w in weights if w.qweight.is_cpu])
    release_freed_memory()


ARENA_ALIGN = 1 << 21  # a transparent huge page
ARENA_RELEASE_EVERY = 64 << 20  # bytes moved between returns of freed memory (bounds the load's peak)


def gather_into_arena(weights: list[QuantizedWeight]) -> None:
    """Move the weights' tensors into one buffer that starts on a 2 MB boundary, each tensor 64-byte aligned, in
    the model's order (a weight's values, then its scales and zeros), and free the separate ones as they go.

    Why: a decode step streams every quantized byte once per token, and one core's reads run at memory rate only on
    huge pages (TLB misses and prefetchers that stop at each 4 KB page cost the rest). Separately allocated, the
    scales and zeros (a few hundred KB each) and each matrix's unaligned ends sit on 4 KB pages: int4 one-row
    products of the 3B shapes from memory read 1.11x faster on one thread from one such buffer (docs/quantization.md).
    The layout each tensor has (shape, dtype, contiguity) and so every product's bits are unchanged. Memory: the
    buffer's pages are touched only as tensors move in, and the freed ones are returned every
    ARENA_RELEASE_EVERY bytes, so the peak stays near the quantized size (not twice it).
    """
    def nbytes(t: torch.Tensor) -> int:
        return (t.numel() * t.element_size() + 63) // 64 * 64

    total = sum(nbytes(t) for w in weights for t in w.tensors().values())
    if total == 0:
        return
    raw = torch.empty(total + ARENA_ALIGN, dtype=torch.uint8)
    offset, moved = (-raw.data_ptr()) % ARENA_ALIGN, 0
    for weight in weights:
        for name in list(weight.tensors()):
            old = getattr(weight, name)
            size = old.numel() * old.element_size()
            view = raw[offset:offset + size].view(old.dtype).view(old.shape)
            view.copy_(old)
            setattr(weight, name, view)
            offset += nbytes(old)
            moved += size
            del old
        if moved >= ARENA_RELEASE_EVERY:
            release_freed_memory()
            moved = 0


def release_freed_memory() -> None:
    """Hand the heap memory that quantizing freed (many blocks of a few MB) back to the system: glibc keeps it
    otherwise, and the process's resident set would stay ~0.6 GB above the model on a 3B shape. Linux/glibc only."""
    import ctypes
    import ctypes.util
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def quantized_weights(model: nn.Module) -> dict[str, QuantizedWeight]:
    """param name (as `quantized_params` gives it) -> QuantizedWeight, for a quantized model."""
    out = {}
    for path, module in model.named_modules():
        if isinstance(module, QuantizedWeight):
            out[path.removesuffix(".quantized") + ".weight" if path.endswith(".quantized") else path] = module
    return out


def logical_state(model: nn.Module) -> list[tuple[str, torch.Tensor | dict[str, torch.Tensor]]]:
    """The model's state under full-precision parameter names; a quantized weight is a dict of its format's tensors.
    With a tied embedding, the LM head's tensors appear under `model.embed_tokens.weight`, as HF stores them."""
    weights = quantized_weights(model)
    paths = tuple(n.removesuffix(".weight") + ".quantized." if n.endswith(".weight") else n + "."
                  for n in weights)
    out: list = [(n, t) for n, t in model.state_dict().items() if not n.startswith(paths)]
    for name, weight in weights.items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            name = "model.embed_tokens.weight"
        out.append((name, weight.tensors()))
    return out


@torch.no_grad()
def quantize_model(model: nn.Module, method: str, group_size: int = DEFAULT_GROUP_SIZE) -> nn.Module:
    """Quantize a loaded full-precision model in place (each weight quantized, then its full copy dropped)."""
    check_method(method)
    state = model.state_dict()
    weights = {name: QuantizedWeight(quantize_weight(state[name], method, group_size))
               for name in quantized_params(model)}
    del state
    install(model, weights)
    model.quantization = quantization_config(method, group_size, weights)
    return model


def quantization_config(method: str, group_size: int, weights: dict[str, QuantizedWeight]) -> dict:
    """The `quantization_config` block of config.json (see docs/quantization.md)."""
    fallback = sorted(n for n, w in weights.items() if w.bits != BITS[method])
    groups = sorted({w.group_size for w in weights.values() if w.bits == 4})
    block = {"quant_method": "openjamba", "method": method, "bits": BITS[method],
             "format": "weight-only; CPU kernels quantize activations to int8 per block",
             "modules": sorted(weights)}
    if method == "int4":
        block["group_size"] = group_size
        block["group_sizes_used"] = groups
        block["int8_fallback"] = fallback
    return block
