"""What every verb needs before it can run a model: the default device and the dtype names users type.

The one table of dtype names lives here, so `--dtype bf16`, `dtype=bfloat16` (lm-eval's model_args) and a
benchmark spec's "fp16" all mean the same torch dtype, and an unknown name fails the same way everywhere.
"""

from __future__ import annotations

import os

import torch

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}
SHORT_DTYPES = ("fp32", "bf16", "fp16")  # the spellings offered as command-line choices
HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"  # torch's CPU allocator madvises allocations of 2 MB and more when set


def use_huge_pages() -> None:
    """Back the large CPU tensors (the weights, above all) with transparent huge pages, where the kernel offers them
    on request (/sys/kernel/mm/transparent_hugepage/enabled: madvise). A decode step streams every weight once per
    token, and on 4 KB pages it pays a TLB miss per page and the hardware prefetchers stop at every page boundary.
    torch reads the variable once, at its first allocation of 2 MB or more, so this runs before any model is built;
    a value the user set wins (THP_MEM_ALLOC_ENABLE=0 keeps 4 KB pages)."""
    os.environ.setdefault(HUGE_PAGES_ENV, "1")


def default_device() -> str:
    """cuda when a GPU is visible, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_device(name: str) -> str:
    """A device string users type ('cpu', 'cuda', 'cuda:1', 'mps'), checked: an unknown kind, or a GPU this
    machine does not have, is a ValueError saying so (torch would fail later, deep inside a model)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available on this machine; use cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} requested but MPS is not available on this machine; use cpu")
    return name


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU (bf16 matmuls are hundreds of times slower on most CPUs)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def parse_dtype(name: str, flag: str = "dtype") -> torch.dtype:
    """'bf16' or 'bfloat16' -> torch.bfloat16; an unknown name is a ValueError that names `flag`."""
    if name not in DTYPES:
        raise ValueError(f"unknown {flag} {name!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_dtype(name: str | None, device: str | torch.device, flag: str = "--dtype") -> torch.dtype:
    """The dtype `name` names, or the device's default when it is None (or 'auto')."""
    if name is None or name == "auto":
        return default_dtype(device)
    return parse_dtype(name, flag)



def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bf16' (the short spelling)."""
    for name in SHORT_DTYPES:
        if DTYPES[name] == dtype:
            return name
    raise ValueError(f"no name for dtype {dtype}")
