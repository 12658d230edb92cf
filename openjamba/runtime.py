"""What every verb needs before it can run a model: the default device, the dtype names users type, and the
threads and memory settings of a process that serves.

The one table of dtype names lives here, so `--dtype bf16`, `dtype=bfloat16` (lm-eval's model_args) and a
benchmark spec's "fp16" all mean the same torch dtype, and an unknown name fails the same way everywhere.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
from collections.abc import Callable
from typing import TypeVar

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


T = TypeVar("T")


def on_fresh_thread(fn: Callable[[], T], threads: int | None = None) -> T:
    """`fn()` run on a new thread with `threads` intra-op threads (default: the caller's count); its result, or
    its exception raised here. The thread exits after it and its OpenMP pool with it.

    Why: with torch's OpenMP backend (libgomp) every thread that runs multi-threaded ops keeps a pool of worker
    threads for as long as it lives, and once the pools of a process hold more threads than the machine has CPUs,
    libgomp stops spin-waiting between parallel regions and wakes its workers through the kernel: on two threads a
    262,144-element multiply took 61 us in a second thread against 20 us with one pool, and a 512-token prefill
    chunk of `cpu-bench` ran on one thread's worth of CPU in a serving engine's thread where it used two in the main
    thread (docs/serving-notebook.md). So a process that computes on one long-lived thread (the serving engine's)
    loads its model here and keeps its other threads to one intra-op thread (`torch.set_num_threads(1)`)."""
    threads = threads if threads is not None else torch.get_num_threads()
    result: list = []

    def run() -> None:
        torch.set_num_threads(threads)
        try:
            result.append((True, fn()))
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
            result.append((False, err))

    thread = threading.Thread(target=run, name="openjamba-compute")
    thread.start()
    thread.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value


MALLOC_MMAP_THRESHOLD = 32 << 20  # glibc's largest: smaller blocks come from (and go back to) the heap
MALLOC_TRIM_THRESHOLD = 256 << 20  # free memory a heap keeps before returning any to the system


def hold_freed_memory() -> bool:
    """Fixed glibc malloc thresholds for this process (`mallopt`), so that the buffers of a prefill chunk, freed,
    serve the next one instead of being returned to the system and faulted in again (see the module's docstring):
    blocks under MALLOC_MMAP_THRESHOLD come from the heap, and a heap keeps up to MALLOC_TRIM_THRESHOLD free.
    The process then holds about its peak memory, as a server does. False where the C library is not glibc.

    Why: with glibc's default, adaptive thresholds, a prefill chunk run between decode steps returned part of its
    buffers to the system and faulted them in again on the next chunk (250-5,200 minor page faults per 504-token
    chunk of `cpu-bench` in a warm process, 0-800 with the fixed thresholds; the same chunks run back to back took
    0-1 each), a cost the chunk alone does not pay."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
    return bool(mallopt(M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD))
