"""The worker process: one (implementation, context, batch) cell measured in a fresh Python process, so its peak
memory is its own, and the launcher that runs it and reads back its result and progress lines. A cell of
several weight formats (`openjamba bench --quantize none,int8,int4`) is the exception: its formats share one
process, so that their decode can be interleaved (`run_formats`).

The protocol is two line prefixes: the worker prints `RESULT_PREFIX + json` on stdout when done, and
`PROGRESS_PREFIX + text` on stderr as it goes (`report_progress`); anything else on stderr is kept for the
error message of a worker that fails.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from ..config import JambaConfig
from ..info import forward_flops
from ..runtime import parse_dtype, use_huge_pages
from .measure import PeakMemory, best_time, current_memory, decode_weight_bytes, peak_so_far, read_bytes_per_s, sync
from .runners import Runner, build_runner

RESULT_PREFIX = "OPENJAMBA_BENCH_RESULT "
PROGRESS_PREFIX = "OPENJAMBA_BENCH_PROGRESS "
_last_report = [0.0]


def report_progress(text: str, every_s: float = 1.0, force: bool = False) -> None:
    """From a worker: a progress line for the parent's bar, at most one per `every_s` seconds unless `force`."""
    now = time.monotonic()
    if force or now - _last_report[0] >= every_s:
        _last_report[0] = now
        print(PROGRESS_PREFIX + text, file=sys.stderr, flush=True)


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one (implementation, context, batch) cell: the phases in spec["phases"]; with spec["formats"]
    (several weight formats), every format's model in this one process (`run_formats`)."""
    torch.set_num_threads(spec["threads"])
    device, dtype = torch.device(spec["device"]), parse_dtype(spec["dtype"])
    config = JambaConfig.from_dict(spec["config"])
    batch, context = spec["batch"], spec["context"]
    ids = torch.randint(0, config.vocab_size, (batch, context), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    if spec.get("formats"):
        return {"formats": run_formats(spec, ids, config, device, dtype)}
    runner = build_runner(spec, device, dtype, on_progress=report_progress)
    result: dict[str, Any] = {"model_mem_bytes": current_memory(device), "load_peak_mem_bytes": peak_so_far(device)}
    phases = spec["phases"]
    if "prefill" in phases or "decode" in phases:
        result.update(_measure_inference({"": runner}, ids, spec, config)[""])
    if "train" in phases:
        result.update(_measure_training(runner, ids, spec, config))
    if "profile" in phases:
        result.update(_profile_prefill(runner, ids, spec))
    if "scan" in phases and spec["impl"] != "transformers" and config.mamba_layer_indices:
        result.update(_measure_scan(config, batch, context, device, dtype, spec["repeats"]))
    for peak in ("peak_mem_bytes", "train_peak_mem_bytes"):  # what the measured work added to the loaded model
        if peak in result:
            result[peak.replace("peak_mem", "added_mem")] = max(0, result[peak] - result["model_mem_bytes"])
    return result


def run_formats(spec: dict[str, Any], ids: torch.Tensor, config: JambaConfig, device: torch.device,
                dtype: torch.dtype) -> list[dict[str, Any]]:
    """Several weight formats of one model (spec["formats"], "none" = unquantized), all in this process: each
    model built as a one-format worker builds it (same seed, so each format's weights are those of its own
    one-format run), prefilled in turn, then decoded interleaved round by round (`_measure_decode`). On a VM whose
    memory rate switches from minute to minute, only this puts every format's decode under the same conditions,
    so their ratios hold; the price is that memory peaks are not any one format's (each result has the resident
    growth while its model was built, and no peak). One result per format, in order."""
    runners = {}
    grown = {}
    for fmt in spec["formats"]:
        report_progress(f"building the {fmt} model", force=True)
        before = current_memory(device)
        runners[fmt] = build_runner({**spec, "quantize": None if fmt == "none" else fmt}, device, dtype,
                                    on_progress=lambda text, fmt=fmt: report_progress(f"{fmt}: {text}"))
        grown[fmt] = current_memory(device) - before
    results = _measure_inference(runners, ids, spec, config)
    for fmt, result in results.items():
        result.pop("peak_mem_bytes", None)
        result["model_mem_bytes"] = grown[fmt]
    first = results[spec["formats"][0]]
    if "scan" in spec["phases"] and config.mamba_layer_indices:  # the scan alone has no weights: measured once
        first.update(_measure_scan(config, ids.shape[0], ids.shape[1], device, dtype, spec["repeats"]))
    return list(results.values())


@torch.no_grad()
def _measure_inference(runners: dict[str, Runner], ids: torch.Tensor, spec: dict, config: JambaConfig
                       ) -> dict[str, dict[str, Any]]:
    """Prefill with each runner in turn (best of spec["repeats"]), then decode them together (`_measure_decode`).
    `runners` maps a name (its progress prefix; "" for a one-model cell) to a runner; results by the same names."""
    out: dict[str, dict[str, Any]] = {}
    tokens: dict[str, torch.Tensor] = {}
    batch, context = ids.shape
    for name, runner in runners.items():
        runner.model.eval()
        runner.prefill(ids[:, : min(128, ids.shape[1])], spec["prefill_chunk"])  # warm-up: kernels, allocator
        logits = None

        def prefill(runner: Runner = runner) -> None:
            nonlocal logits
            logits = runner.prefill(ids, spec["prefill_chunk"])

        report_progress(f"{name}: prefill" if name else "prefill", force=True)
        with PeakMemory(runner.device) as peak:
            seconds = best_time(prefill, runner.device, spec["repeats"])
        out[name] = dict(prefill_s=seconds, prefill_tok_s=batch * context / seconds, peak_mem_bytes=peak.peak,
                         prefill_flops_s=forward_flops(config, context, batch, logits=1) / seconds)
        tokens[name] = logits.argmax(-1)
    if "decode" in spec["phases"] and spec["decode_tokens"] > 0:
        rounds = DECODE_ROUNDS if len(runners) == 1 else INTERLEAVED_ROUNDS
        decoded = _measure_decode(runners, tokens, spec["decode_tokens"], rounds)
        for name, runner in runners.items():
            out[name].update(decoded[name])
            cache_read = runner.cache_read_bytes(context + spec["decode_tokens"] // 2)  # at the middle of the decode
            if cache_read is not None:
                out[name]["decode_read_bytes"] = decode_weight_bytes(runner.model, config) + cache_read
    for name, runner in runners.items():
        cache = runner.cache_bytes()
        if cache is not None:
            out[name]["cache_bytes"] = cache
    return out


DECODE_ROUNDS = 4
INTERLEAVED_ROUNDS = 8  # several formats: more, shorter rounds, so the per-round ratios show their spread


def _measure_decode(runners: dict[str, Runner], tokens: dict[str, torch.Tensor], count: int, rounds: int
                    ) -> dict[str, dict[str, Any]]:
    """Decode `count` tokens with each runner, from its `tokens`, greedily, in up to `rounds` timed rounds. On CPU
    each round is preceded by a read-bandwidth probe: a VM's memory rate drifts by a third within minutes (or
    switches between two levels), so the floor a decode is judged by is measured beside it, and the reported rate
    is the median of the probes (the list is kept). With several runners every round decodes each one's share in
    turn, starting one further along each round, so none always runs right after the probe; each one's per-round
    ms/token is kept (`decode_round_ms`), from which `report.format_ratios` takes per-round ratios."""
    names = list(runners)
    device = runners[names[0]].device
    rounds = min(rounds, count)
    probes: list[float] = []
    seconds = dict.fromkeys(names, 0.0)
    round_ms: dict[str, list[float]] = {name: [] for name in names}
    decoded: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    done = 0
    for r in range(rounds):
        if device.type == "cpu":
            report_progress("memory read bandwidth", force=True)
            probes.append(read_bytes_per_s(device, budget_s=0.5))
        share = count * (r + 1) // rounds - done
        for name in names[r % len(names):] + names[: r % len(names)]:
            report_progress(f"{name + ': ' if name else ''}decode ({done}/{count} tokens)", force=True)
            runner, token = runners[name], tokens[name]
            sync(device)
            start = time.perf_counter()
            for _ in range(share):
                token = runner.decode(token).argmax(-1)
                decoded[name].append(token)
            sync(device)
            elapsed = time.perf_counter() - start
            tokens[name] = token
            seconds[name] += elapsed
            round_ms[name].append(elapsed * 1e3 / share)
        done += share
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        ms = seconds[name] * 1e3 / count
        out[name] = {"decode_ms": ms, "decode_tok_s": tokens[name].shape[0] * 1e3 / ms,
                     "decode_ids": torch.stack(decoded[name], dim=1).tolist()}  # (batch, count): greedy tokens
        if len(names) > 1:
            out[name]["decode_round_ms"] = round_ms[name]
        if probes:
            out[name]["read_bytes_s"] = statistics.median(probes)
            out[name]["read_bytes_s_probes"] = probes
    return out


def _measure_training(runner: Runner, ids: torch.Tensor, spec: dict, config: JambaConfig) -> dict[str, Any]:
    runner.model.train()
    runner.train_step(ids[:, : min(128, ids.shape[1])])  # warm-up
    report_progress("training step", force=True)
    with PeakMemory(runner.device) as peak:
        seconds = best_time(lambda: runner.train_step(ids), runner.device, spec["repeats"])
    batch, context = ids.shape
    return dict(train_s=seconds, train_tok_s=batch * context / seconds, train_peak_mem_bytes=peak.peak,
                train_flops_s=3 * forward_flops(config, context, batch) / seconds)


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
ATTENTION_OPS = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math",
                 "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
                 "aten::_scaled_dot_product_cudnn_attention")


@torch.no_grad()
def _profile_prefill(runner: Runner, ids: torch.Tensor, spec: dict) -> dict[str, Any]:
    """Where one prefill's time goes: the model's matrix multiplies, attention, and the selective scan (each
    Mamba layer's `ops.selective_scan` call, which the dispatcher labels for the profiler)."""
    from torch.profiler import ProfilerActivity, profile

    runner.model.eval()
    runner.prefill(ids[:, : min(128, ids.shape[1])], spec["prefill_chunk"])  # warm-up, as for the timed prefill
    cuda = runner.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    report_progress("profiled prefill", force=True)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        runner.prefill(ids, spec["prefill_chunk"])
        sync(runner.device)
    total = time.perf_counter() - start
    events = prof.key_averages()

    def seconds(names: tuple[str, ...], self_time: bool = True) -> float:
        key = ("self_device_time_total" if self_time else "device_time_total") if cuda else (
            "self_cpu_time_total" if self_time else "cpu_time_total")
        return sum(getattr(e, key) for e in events if e.key in names) / 1e6

    return dict(profile_total_s=total, profile_matmul_s=seconds(MATMUL_OPS), profile_attention_s=seconds(ATTENTION_OPS),
                profile_scan_s=seconds(("openjamba::selective_scan",), self_time=False))


def _measure_scan(config: JambaConfig, batch: int, length: int, device: torch.device, dtype: torch.dtype,
                  repeats: int) -> dict[str, Any]:
    """The selective scan alone at one Mamba layer's shape: ns per (batch, channel, step, state) element."""
    from .. import ops

    channels, state = config.mamba_inner_size, config.mamba_d_state
    g = torch.Generator(device).manual_seed(0)

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, device=device, dtype=dt)

    u, z = randn(batch, length, 2 * channels).chunk(2, dim=-1)  # as the mixer's in_proj produces them
    inputs = dict(u=u, delta=randn(batch, length, channels) - 3, B=randn(batch, length, state),
                  C=randn(batch, length, state), z=z, D=randn(channels, dt=torch.float32),
                  A=-torch.arange(1, state + 1, device=device, dtype=torch.float32).repeat(channels, 1),
                  delta_bias=randn(channels, dt=torch.float32))
    elements = batch * length * channels * state
    report_progress("selective scan alone", force=True)
    with torch.no_grad():
        fwd = best_time(lambda: ops.selective_scan(**inputs, delta_softplus=True), device, repeats)
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}  # every input gets a gradient

    def forward_backward() -> None:
        y = ops.selective_scan(**leaves, delta_softplus=True)
        torch.autograd.grad(y, list(leaves.values()), torch.ones_like(y))

    both = best_time(forward_backward, device, repeats)
    backend = ops.backend_for(device)
    out = dict(scan_backend=backend.__name__.rsplit(".", 1)[-1] if backend else "torch",
               scan_fwd_ns=fwd * 1e9 / elements, scan_bwd_ns=(both - fwd) * 1e9 / elements,
               scan_fwd_model_s=fwd * len(config.mamba_layer_indices))
    if device.type == "cuda" and out["scan_backend"] == "triton_kernels":
        from ..ops.triton_tools import benchmark

        out["scan_cuda"] = benchmark(batch, length, channels, state, dtype)
    return out


def launch_worker(spec: dict[str, Any], timeout_s: float, on_progress: Callable[[str], None] | None = None
                  ) -> dict[str, Any]:
    """Run one cell in a fresh process; errors, timeouts and crashes (out of memory) come back as {"error"}.
    The worker's progress lines (`report_progress`) go to `on_progress` as they arrive."""
    command = [sys.executable, "-m", "openjamba.bench", "--worker", json.dumps(spec)]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stdout: list[str] = []
    stderr: deque[str] = deque(maxlen=20)

    def pump_stderr() -> None:
        for line in proc.stderr:
            if line.startswith(PROGRESS_PREFIX):
                if on_progress is not None:
                    on_progress(line[len(PROGRESS_PREFIX):].strip())
            elif line.strip():
                stderr.append(line.rstrip())

    pumps = [threading.Thread(target=pump_stderr, daemon=True),
             threading.Thread(target=lambda: stdout.extend(proc.stdout), daemon=True)]
    for pump in pumps:
        pump.start()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return {"error": f"timed out after {timeout_s:.0f} s"}
    finally:
        for pump in pumps:
            pump.join(timeout=5)
    for line in reversed(stdout):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = list(stderr)[-3:] or [line.rstrip() for line in stdout[-3:]]
    why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit code {proc.returncode}"
    return {"error": f"{why}: {' | '.join(tail)}"}


def main() -> None:
    """Worker entry point: `python -m openjamba.bench --worker SPEC_JSON` prints one result line."""
    use_huge_pages()  # as `openjamba` itself runs: the weights and the read probe alike
    if len(sys.argv) != 3 or sys.argv[1] != "--worker":
        raise SystemExit("internal worker of `openjamba bench`; run `openjamba bench --help`")
    result = run_worker(json.loads(sys.argv[2]))
    print(RESULT_PREFIX + json.dumps(result), flush=True)

