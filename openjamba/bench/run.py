"""Orchestration of `openjamba bench`: check the request, measure the machine, plan one worker per cell, run
them in turn with a progress bar, and assemble the report (`report.py` formats and plots it)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..config import JambaConfig, attention_only_config
from ..quant import check_method
from ..runtime import parse_dtype
from .measure import copy_bytes_per_s, machine_info, matmul_flops_per_s
from .report import merge_cells, ratios, utilisation
from .worker import launch_worker

IMPLS = ("openjamba", "transformers", "attention-only")
PHASES = ("prefill", "decode", "train", "scan", "profile")
DEFAULT_PHASES = ("prefill", "decode", "scan")

def plan_cells(impls: list[str], contexts: list[int], batches: list[int], phases: list[str]) -> list[dict[str, Any]]:
    """One worker per (impl, context, batch, phase group). Training and profiling run apart from inference, so each
    phase's peak memory is its own (and a profiler running out of memory loses only its own cell)."""
    apart = ("train", "profile")
    groups = [[p for p in phases if p not in apart], *([p] for p in apart if p in phases)]
    return [dict(impl=impl, context=context, batch=batch, phases=group)
            for context in contexts for batch in batches for impl in impls for group in groups if group]


def run_bench(
    config: JambaConfig,
    name: str,
    model_dir: str | Path | None = None,
    contexts: tuple[int, ...] = (1024, 4096, 8192),
    batches: tuple[int, ...] = (1,),
    phases: tuple[str, ...] = DEFAULT_PHASES,
    compare: tuple[str, ...] = (),
    device: str = "cpu",
    dtype: str = "fp32",
    kv_dtype: str | None = None,
    threads: int | None = None,
    decode_tokens: int = 32,
    prefill_chunk: int = 2048,
    repeats: int = 3,
    timeout_s: float = 3600.0,
    seed: int = 0,
    progress: bool = True,
    quantize: str | None = None,
) -> dict[str, Any]:
    """Measure every cell and return the report (see `report.format_bench_report`); nothing is printed but progress."""
    from tqdm import tqdm

    for phase in phases:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; choose from {', '.join(PHASES)}")
    if kv_dtype is not None:
        parse_dtype(kv_dtype, "kv_dtype")
    check_method(quantize)
    for impl in compare:
        if impl not in IMPLS[1:]:
            raise ValueError(f"unknown --compare {impl!r}; choose from {', '.join(IMPLS[1:])}")
    if "transformers" in compare:
        import importlib.util

        if importlib.util.find_spec("transformers") is None:
            raise ValueError("--compare transformers needs transformers: pip install 'openjamba[dev]'")
    dev = torch.device(device)
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    _build_kernels(dev)
    machine = machine_info(dev, threads)
    machine["matmul_flops_s"] = matmul_flops_per_s(dev, parse_dtype(dtype))
    if dev.type == "cuda":
        machine["copy_bytes_s"] = copy_bytes_per_s(dev)

    with tempfile.TemporaryDirectory(prefix="openjamba-bench-") as tmp:
        sources = _model_sources(config, model_dir, compare, Path(tmp), seed)
        common = dict(device=device, dtype=dtype, kv_dtype=kv_dtype, threads=threads, decode_tokens=decode_tokens,
                      prefill_chunk=prefill_chunk, repeats=repeats, seed=seed, quantize=quantize)
        cells = plan_cells(["openjamba", *compare], list(contexts), list(batches), list(phases))
        results = []
        bar = tqdm(cells, desc="bench", unit="cell", disable=None if progress else True, file=sys.stderr)
        for cell in bar:
            bar.set_postfix_str(f"{cell['impl']} context {cell['context']} batch {cell['batch']} "
                                f"{'+'.join(cell['phases'])}")
            spec = {**common, **cell, **sources[cell["impl"]]}
            label = f"{cell['impl']} {cell['context']}x{cell['batch']}"
            results.append({**cell, **launch_worker(spec, timeout_s,
                                                    lambda text, label=label: bar.set_postfix_str(f"{label}: {text}"))})
    rows = merge_cells(results)
    return {"model": name, "machine": machine, "dtype": dtype, "kv_dtype": kv_dtype, "quantize": quantize,
            "prefill_chunk": prefill_chunk,
            "decode_tokens": decode_tokens, "rows": rows, "ratios": ratios(rows, compare),
            "utilisation": utilisation(rows, machine["matmul_flops_s"])}


def _build_kernels(device: torch.device) -> None:
    """Build (or load) the device's compiled kernels once here, so no worker's timing includes a build."""
    from .. import ops

    ops.backend_for(device)


def _model_sources(config: JambaConfig, model_dir, compare, tmp: Path, seed: int) -> dict[str, dict[str, Any]]:
    """Where each implementation's weights come from. transformers needs a checkpoint directory, so a preset is
    written once (random weights, `seed`) for both; otherwise each worker builds the model from config and seed."""
    own = {"config": config.to_dict(), "model_dir": str(model_dir) if model_dir else None}
    if "transformers" in compare and model_dir is None:
        from ..model import JambaForCausalLM

        torch.manual_seed(seed)
        JambaForCausalLM(config).save_pretrained(tmp / "model")
        own["model_dir"] = str(tmp / "model")
    sources = {"openjamba": own, "transformers": own}
    sources["attention-only"] = {"config": attention_only_config(config).to_dict(), "model_dir": None}
    return sources
