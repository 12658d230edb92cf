"""Orchestration of `openjamba bench`: check the request, measure the machine, plan one worker per cell, run
them in turn with a progress bar, and assemble the report (`report.py` formats and plots it). A --quantize list
(`none,int8,int4`) keeps one worker per cell, in which every format is built and their decode interleaved."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..config import JambaConfig, attention_only_config
from ..quant import METHODS, QuantizationError
from ..runtime import parse_dtype
from .measure import copy_bytes_per_s, machine_info, matmul_flops_per_s
from .report import format_ratios, merge_cells, ratios, utilisation
from .worker import launch_worker

IMPLS = ("openjamba", "transformers", "attention-only")
PHASES = ("prefill", "decode", "train", "scan", "profile")
DEFAULT_PHASES = ("prefill", "decode", "scan")
FULL_PRECISION = "none"  # in a --quantize list: the model in --dtype, unquantized


def parse_formats(quantize: str | None) -> list[str]:
    """--quantize as a list of weight formats: one method (or none), or several separated by commas, which are
    then measured in one process (`worker.run_formats`)."""
    formats = [FULL_PRECISION] if quantize is None else [f.strip() for f in quantize.split(",")]
    choices = (FULL_PRECISION, *METHODS)
    for f in formats:
        if f not in choices:
            raise QuantizationError(f"unknown quantization {f!r}{f' in {quantize!r}' if len(formats) > 1 else ''}; "
                                    f"choose from {', '.join(choices)} (or several, comma-separated)")
        if formats.count(f) > 1:
            raise QuantizationError(f"--quantize {quantize!r} names {f!r} twice")
    return formats


def _check_formats(formats: list[str], compare: tuple[str, ...], phases: tuple[str, ...]) -> None:
    """Several formats compare weight formats against each other, in one process: nothing else fits in it."""
    if len(formats) < 2:
        return
    if compare:
        raise ValueError(f"--compare {compare[0]} compares one openjamba model with another implementation: give "
                         "--quantize one format for it (several formats are compared with each other)")
    apart = [p for p in phases if p in ("train", "profile")]
    if apart:
        raise ValueError(f"phase {apart[0]!r} runs each model in its own process: give --quantize one format for "
                         "it (several formats measure prefill, decode and scan, in one process)")


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
    """Measure every cell and return the report (see `report.format_bench_report`); nothing is printed but progress.
    `quantize`: one weight format ("int8", "int4"; None or "none" = unquantized), or several separated by commas,
    compared in one process per cell: rows then carry "weights", and the report "format_ratios" against the first."""
    from tqdm import tqdm

    for phase in phases:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; choose from {', '.join(PHASES)}")
    if kv_dtype is not None:
        parse_dtype(kv_dtype, "kv_dtype")
    formats = parse_formats(quantize)
    for impl in compare:
        if impl not in IMPLS[1:]:
            raise ValueError(f"unknown --compare {impl!r}; choose from {', '.join(IMPLS[1:])}")
    if "transformers" in compare:
        import importlib.util

        if importlib.util.find_spec("transformers") is None:
            raise ValueError("--compare transformers needs transformers: pip install 'openjamba[dev]'")
    _check_formats(formats, compare, phases)
    interleaved = len(formats) > 1
    quantize = ",".join(formats) if interleaved else None if formats == [FULL_PRECISION] else formats[0]
    weights = [dtype if f == FULL_PRECISION else f for f in formats]  # each format's label in rows and ratios
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
        if interleaved:  # one worker per cell builds every format (worker.run_formats)
            common.update(quantize=None, formats=formats)
        cells = plan_cells(["openjamba", *compare], list(contexts), list(batches), list(phases))
        results = []
        bar = tqdm(cells, desc="bench", unit="cell", disable=None if progress else True, file=sys.stderr)
        for cell in bar:
            bar.set_postfix_str(f"{cell['impl']} context {cell['context']} batch {cell['batch']} "
                                f"{'+'.join(cell['phases'])}")
            spec = {**common, **cell, **sources[cell["impl"]]}
            label = f"{cell['impl']} {cell['context']}x{cell['batch']}"
            outcome = launch_worker(spec, timeout_s, lambda text, label=label: bar.set_postfix_str(f"{label}: {text}"))
            results += _format_cells(cell, outcome, weights) if interleaved else [{**cell, **outcome}]
    rows = merge_cells(results)
    report = {"model": name, "machine": machine, "dtype": dtype, "kv_dtype": kv_dtype, "quantize": quantize,
              "prefill_chunk": prefill_chunk,
              "decode_tokens": decode_tokens, "rows": rows, "ratios": ratios(rows, compare),
              "utilisation": utilisation(rows, machine["matmul_flops_s"])}
    if interleaved:
        report["formats"] = weights
        report["format_ratios"] = format_ratios(rows, weights)
    return report


def _format_cells(cell: dict[str, Any], outcome: dict[str, Any], weights: list[str]) -> list[dict[str, Any]]:
    """An interleaved worker's result as one cell per weight format (`weights`: their labels, in the worker's
    order); a worker that failed fails every format's cell."""
    per_format = outcome.get("formats") or [outcome] * len(weights)
    return [{**cell, "weights": label, **result} for label, result in zip(weights, per_format)]


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
