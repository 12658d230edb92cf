"""Weight-only quantization: int8 per output channel and int4 per group, for every large projection.

What is quantized: attention q/k/v/o, Mamba in_proj/x_proj/dt_proj/out_proj, the MLPs, the fused experts and the
LM head (with a tied embedding, which then looks its rows up in the quantized table). Norms, the conv, A_log, D,
the router, an untied embedding and the Mamba state stay in full precision.

The formats (what a quantized checkpoint stores for a weight `X.weight` of shape (N, K); see docs/quantization.md):
  int8  X.qweight int8 (N, K), X.scales fp32 (N,)               w[n, k] = q[n, k] * scales[n]
  int4  X.qweight uint8 (N, K/2), X.scales, X.zeros fp32 (N, K/g)   w[n, k] = (q[n, k] - 8) * scales[n, k // g]
        two 4-bit values per byte, column 2j in the low nibble          + zeros[n, k // g]
Scales and zeros are rounded to bf16 values when quantizing (stored as fp32), so the bf16 kernels apply them exactly.

The matrix products use PyTorch's own weight-only kernels on CPU (`aten._weight_int8pack_mm`, and
`aten._weight_int4pack_mm_for_cpu` on its packed layout, as gpt-fast does), which take bf16 activations: inputs are
rounded to bf16 and outputs returned in the caller's dtype. Elsewhere (CUDA) the weight is dequantized to the
activation dtype and applied with F.linear: `reference_linear`, the plain path every kernel is tested against.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

METHODS = ("int8", "int4")
BITS = {"int8": 8, "int4": 4}
DEFAULT_GROUP_SIZE = 128
INT4_GROUP_SIZES = (256, 128, 64, 32)  # what the CPU int4 kernel accepts; a smaller one is used if K needs it
INT4_ROW_MULTIPLE = 16  # the CPU int4 kernel packs output rows in blocks of 16
# The CPU int8 kernel returns garbage for some input sizes (24 inputs, or fewer than 16, in torch 2.13): the kernels
# serve weights with a multiple of 32 inputs (every int4 group is one), the reference the rest (tiny matrices).
KERNEL_K_MULTIPLE = 32
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

    None when no group fits or the rows do not fill the kernel's blocks of 16: that tensor is stored in int8.
    """
    if out_features % INT4_ROW_MULTIPLE:
        return None
    for group in (preferred,) + tuple(g for g in INT4_GROUP_SIZES if g < preferred):
        if in_features % group == 0:
            return group
    return None


def quantize_int8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Symmetric per-output-channel int8 of a (..., N, K) weight: q in [-127, 127], scale = max|w| / 127."""
    w = weight.float()
    scales = _round_to_bf16(w.abs().amax(-1).clamp(min=1e-12) / 127)
    q = torch.round(w / scales[..., None]).clamp_(-127, 127).to(torch.int8)
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
    q = torch.round((w - zeros[..., None]) / scales[..., None] + 8).clamp_(0, 15).to(torch.uint8)
    q = q.reshape(*lead, N, K)
    return {"qweight": q[..., 0::2] | (q[..., 1::2] << 4), "scales": scales, "zeros": zeros}


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
            "scales": torch.empty(*lead, N, K // group, device=device),
            "zeros": torch.empty(*lead, N, K // group, device=device)}


# ---------------------------------------------------------------------- modules
class QuantizedWeight(nn.Module):
    """A quantized (..., N, K) weight (one matrix, or one per expert), applied by `linear(x, *index)`.

    Buffers `qweight`, `scales` (and `zeros` for int4) hold the documented format. `prepare()` builds the CPU
    kernels' operands once loading is done; for int4 on CPU the kernel's packed layout then replaces `qweight`
    (one copy of the weight in memory), and `tensors()` unpacks it again when saving.
    """

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name, t in tensors.items():
            self.register_buffer(name, t)
        self.bits = 8 if self.qweight.dtype == torch.int8 else 4
        self.in_features = self.qweight.shape[-1] * (2 if self.bits == 4 else 1)
        self.out_features = self.qweight.shape[-2]
        self.cpu_packed = False  # int4: qweight holds the CPU kernel's layout
        self.kernel_scales: torch.Tensor | None = None  # bf16 operands of the CPU kernels

    def keep_float32_scales(self) -> None:
        """Undo a model-wide dtype conversion for the scales and zeros (they are stored and applied in fp32)."""
        self.scales = self.scales.float()
        if self.bits == 4:
            self.zeros = self.zeros.float()

    @property
    def group_size(self) -> int | None:
        return self.in_features // self.scales.shape[-1] if self.bits == 4 else None

    @torch.no_grad()
    def prepare(self) -> QuantizedWeight:
        """Build the CPU kernels' operands (called once the buffers hold their final values)."""
        if self.qweight.device.type != "cpu" or self.in_features % KERNEL_K_MULTIPLE:
            return self
        if self.bits == 8:
            self.kernel_scales = self.scales.to(torch.bfloat16)
        elif not self.cpu_packed:
            packed = torch.empty_like(self.qweight)
            for source, dest in zip(self.qweight.reshape(-1, *self.qweight.shape[-2:]),
                                    packed.view(-1, *packed.shape[-2:])):
                _pack_int4_for_cpu(source, dest)
            self.qweight = packed
            # (..., N, groups) scales and zeros -> the kernel's (..., groups, N, 2)
            self.kernel_scales = torch.stack([self.scales, self.zeros], -1).transpose(-3, -2).contiguous().to(
                torch.bfloat16)
            self.cpu_packed = True
        return self

    def tensors(self) -> dict[str, torch.Tensor]:
        """The documented format (what a checkpoint stores): unpacks the CPU int4 layout when it is in use."""
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.bits == 4:
            out["zeros"] = self.zeros
            if self.cpu_packed:
                out["qweight"] = self._unpack_cpu_layout()
        return out

    def _unpack_cpu_layout(self) -> torch.Tensor:
        """Recover the int4 values from the kernel's (undocumented) layout by applying it to the identity matrix:
        with scale 1 and zero 8 every group dequantizes to q itself, and q <= 15 is exact in bf16."""
        K, N = self.in_features, self.out_features
        packed = self.qweight.reshape(-1, *self.qweight.shape[-2:])
        groups = self.scales.shape[-1]
        unit = torch.stack([torch.ones(groups, N), torch.full((groups, N), 8.0)], -1).to(torch.bfloat16)
        eye = torch.eye(K, dtype=torch.bfloat16)
        rows = []
        for m in packed:
            values = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, m, K // groups, unit)  # (K, N) = q^T
            q = values.t().round().to(torch.uint8)
            rows.append(q[:, 0::2] | (q[:, 1::2] << 4))
        return torch.stack(rows).reshape(*self.qweight.shape[:-2], N, K // 2)

    def linear(self, x: torch.Tensor, *index: int) -> torch.Tensor:
        """x @ w.T for the weight w[index] (an expert's matrix) or the whole weight when it is one matrix."""
        if self.kernel_scales is None or x.device.type != "cpu":
            return reference_linear(x, {k: v[index] if index else v for k, v in self.tensors().items()})
        q = self.qweight[index] if index else self.qweight
        scales = self.kernel_scales[index] if index else self.kernel_scales
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # the kernels take bf16 activations
        if self.bits == 8:
            out = torch.ops.aten._weight_int8pack_mm(flat, q, scales)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, q, self.group_size, scales)
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"int{self.bits}, shape={tuple(self.qweight.shape[:-2])+(self.out_features, self.in_features)}{group}"


def _pack_int4_for_cpu(values: torch.Tensor, out: torch.Tensor) -> None:
    """The CPU int4 kernel's layout of one (N, K/2) matrix of the documented layout, into `out` (same shape). The
    kernel packs rows in tiles of 64 when N allows, so a large matrix is packed a block of rows at a time (blocks
    of a multiple of 64 rows give the same bytes as one call) and no int32 copy of it is ever whole."""
    rows, K = values.shape[0], values.shape[1] * 2
    step = rows if rows % 64 else max(64, CHUNK_ELEMENTS // K // 64 * 64)
    for start in range(0, rows, step):
        block = unpack_int4(values[start:start + step]).to(torch.int32)
        out[start:start + step] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(block, 1)


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
        out = self.quantized.linear(x)
        return out if self.bias is None else out + self.bias.to(out.dtype)


class QuantizedEmbedding(nn.Module):
    """The lookup into a tied, quantized embedding/LM-head table: each looked-up row is dequantized.

    It reads the LM head's tensors in the documented layout, taken by `snapshot()` before the head is prepared:
    for int8 the very same tensors; for int4 the head then moves to the kernel's layout, which packs rows in
    blocks, so the lookup keeps the documented one (half a byte per weight, the only duplicate).
    """

    def __init__(self, head: QuantizedWeight, dtype: torch.dtype) -> None:
        super().__init__()
        self.head = [head]  # a plain list: the head is the LM head's module, not this one's
        # Carries the activations' dtype through model.to(dtype) (an empty tensor, not saved).
        self.register_buffer("dtype_of_output", torch.empty(0, dtype=dtype), persistent=False)

    def snapshot(self) -> None:
        for name, tensor in self.head[0].tensors().items():
            self.register_buffer(name, tensor, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        names = ("qweight", "scales", "zeros") if hasattr(self, "zeros") else ("qweight", "scales")
        return dequantize({name: getattr(self, name)[ids] for name in names}, self.dtype_of_output.dtype)


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
    """Once the quantized buffers hold their values: the tied lookup's view of them, then the kernels' operands."""
    for module in model.modules():
        if isinstance(module, QuantizedEmbedding):
            module.snapshot()
    for weight in quantized_weights(model).values():
        weight.prepare()
    release_freed_memory()


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
             "format": "weight-only; activations in bf16 inside the kernels",
             "modules": sorted(weights)}
    if method == "int4":
        block["group_size"] = group_size
        block["group_sizes_used"] = groups
        block["int8_fallback"] = fallback
    return block
