"""Timing and memory sampling for the benchmark: best-of-N wall time, peak memory of a block, this machine's own
matmul throughput, copy and read bandwidth (the denominators of utilisation figures), and the bytes a decode step
must read."""

from __future__ import annotations

import os
import platform
import resource
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def best_time(fn: Callable[[], Any], device: torch.device, repeats: int, budget_s: float = 5.0) -> float:
    """Minimum wall time of `fn` over up to `repeats` calls, stopping early once `budget_s` is spent."""
    best, spent = float("inf"), 0.0
    for _ in range(max(1, repeats)):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
        if spent > budget_s:
            break
    return best


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a wall-clock reading covers it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _max_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def _rss_bytes() -> int:
    """Current resident set (Linux); elsewhere the peak so far, the best the standard library offers."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return _max_rss_bytes()


def peak_so_far(device: torch.device) -> int:
    """The process's peak memory until now (loading the model, for one): max RSS, or torch's peak on CUDA."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _max_rss_bytes()


class PeakMemory:
    """Peak memory while the block runs. CUDA: torch's peak allocation. CPU: the process's resident set, sampled
    every few milliseconds by a thread (torch releases the GIL inside ops; sparse enough not to slow what is timed),
    or the exact kernel high-water mark when the block set a new one."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak = device, 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._hwm_before, self.peak = _max_rss_bytes(), _rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            return
        self._stop.set()
        self._thread.join()
        hwm = _max_rss_bytes()
        self.peak = max(self.peak, _rss_bytes(), hwm if hwm > self._hwm_before else 0)


def current_memory(device: torch.device) -> int:
    """Bytes in use now: torch's allocation on CUDA, the resident set on CPU."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else _rss_bytes()


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, size: int | None = None) -> float:
    """This machine's dense matrix-multiply throughput in `dtype`: the denominator of every utilisation figure."""
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = best_time(lambda: a @ b, device, repeats=8, budget_s=3.0)
    return 2 * size**3 / seconds


def copy_bytes_per_s(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Achievable memory bandwidth (read + write of a large copy): the reference for memory-bound kernels."""
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    return 2 * nbytes / best_time(lambda: dst.copy_(src), device, repeats=10, budget_s=2.0)


def read_bytes_per_s(device: torch.device, nbytes: int = 1 << 28, budget_s: float = 2.0) -> float:
    """Achievable memory read bandwidth with the current threads: the best of several sums of an array far larger
    than any cache. A decode step reads every active weight once, so this is the rate its floor is measured by."""
    src = torch.ones(nbytes // 4, device=device, dtype=torch.float32)
    src.sum()  # touch every page and wake the threads before timing
    return nbytes / best_time(lambda: src.sum(), device, repeats=10, budget_s=budget_s)


def decode_weight_bytes(model: torch.nn.Module, config) -> int:
    """Bytes of weights one decode step reads per token: every parameter and buffer once (quantized weights and
    their scales as stored), the MoE experts at top-k / E of theirs, the embedding table one row (unless the LM
    head shares it, which reads it all)."""
    share = config.num_experts_per_tok / config.num_experts
    tied = getattr(config, "tie_word_embeddings", False)
    total = 0.0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if "embed_tokens" in name and not tied:
            total += t.nbytes / t.shape[0]
        elif ".experts." in name or name.endswith(".experts"):
            total += t.nbytes * share
        else:
            total += t.nbytes
    return int(total)


def machine_info(device: torch.device, threads: int) -> dict[str, Any]:
    """What a report must say about where it was measured."""
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": threads,
            "cpu": _cpu_name(), "cpu_isa": _cpu_vector_isa(), "cpu_count": os.cpu_count(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def processor_label(machine: dict[str, Any]) -> str:
    """The processor a report ran on, as its headers name it: the GPU's name, else the CPU's with its widest vector
    instructions (the C++ kernels are compiled for them, so figures from an AVX2 and an AVX-512 CPU differ)."""
    if "gpu" in machine:
        return machine["gpu"]
    return f"{machine['cpu']}, {machine['cpu_isa']}" if machine.get("cpu_isa") else machine["cpu"]


# /proc/cpuinfo flags, widest first, and how a report names them.
_VECTOR_ISAS = (("avx512_vnni", "AVX-512 VNNI"), ("avx512f", "AVX-512"), ("avx2", "AVX2"), ("asimd", "NEON"))


def _cpu_vector_isa() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = set(line.split(":", 1)[1].split())
                return next((name for flag, name in _VECTOR_ISAS if flag in flags), None)
    except OSError:
        pass
    return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
