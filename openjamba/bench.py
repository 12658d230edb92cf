"""`openjamba bench`: prefill throughput, decode latency, training-step speed, scan cost and peak memory across
context lengths and batch sizes, for a preset or a checkpoint; optionally against transformers' JambaForCausalLM
on the same weights, or against the attention-only model of equal shape (the paper's comparison).

Every (model, context, batch) measurement runs in a fresh worker process (`python -m openjamba.bench --worker`),
so its peak memory is its own and one model's allocator state never colours another's: on CPU the worker's peak
resident set (weights, interpreter and libraries included), on CUDA torch's peak allocation. A worker that runs
out of time or memory becomes an "error" cell; the rest of the run goes on.

Speed is also given as model FLOPs utilisation: useful FLOPs (`info.forward_flops`, three times that for a
training step) per second, over this machine's own matrix-multiply throughput measured at the start of the same
run. That ratio, unlike tokens/s, transfers across machines.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .config import JambaConfig, attention_only_config
from .info import forward_flops, human_bytes

IMPLS = ("openjamba", "transformers", "attention-only")
PHASES = ("prefill", "decode", "train", "scan", "profile")
DEFAULT_PHASES = ("prefill", "decode", "scan")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RESULT_PREFIX = "OPENJAMBA_BENCH_RESULT "
PROGRESS_PREFIX = "OPENJAMBA_BENCH_PROGRESS "
_last_report = [0.0]


def report_progress(text: str, every_s: float = 1.0, force: bool = False) -> None:
    """From a worker: a progress line for the parent's bar, at most one per `every_s` seconds unless `force`."""
    now = time.monotonic()
    if force or now - _last_report[0] >= every_s:
        _last_report[0] = now
        print(PROGRESS_PREFIX + text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- timing and memory
def best_time(fn: Callable[[], Any], device: torch.device, repeats: int, budget_s: float = 5.0) -> float:
    """Minimum wall time of `fn` over up to `repeats` calls, stopping early once `budget_s` is spent."""
    best, spent = float("inf"), 0.0
    for _ in range(max(1, repeats)):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
        if spent > budget_s:
            break
    return best


def _sync(device: torch.device) -> None:
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


# ---------------------------------------------------------------------- what is measured, per implementation
class Runner:
    """One implementation's prefill / decode / training step, all over the same weights."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model, self.device = model, device

    def prefill(self, ids: torch.Tensor, chunk: int) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, token: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def cache_bytes(self) -> int | None:
        return None

    def train_step(self, ids: torch.Tensor) -> None:
        self.model.zero_grad(set_to_none=True)
        self.model(ids, labels=ids).loss.backward()


class OpenJambaRunner(Runner):
    def __init__(self, model: torch.nn.Module, device: torch.device, decode_budget: int,
                 kv_dtype: torch.dtype | None = None) -> None:
        super().__init__(model, device)
        self.decode_budget = decode_budget  # tokens the cache must leave room for after the prompt
        self.kv_dtype = kv_dtype

    def prefill(self, ids: torch.Tensor, chunk: int) -> torch.Tensor:
        """As `generate` prefills: chunk by chunk into a hybrid cache sized for the decode that follows."""
        self.cache = self.model.make_cache(ids.shape[0], max_length=ids.shape[1] + self.decode_budget,
                                           kv_dtype=self.kv_dtype)
        for start in range(0, ids.shape[1], chunk):
            logits = self.model(ids[:, start:start + chunk], cache=self.cache, logits_to_keep=1).logits
            report_progress(f"prefill {min(start + chunk, ids.shape[1]):,}/{ids.shape[1]:,} tokens")
        return logits[:, -1]

    def decode(self, token: torch.Tensor) -> torch.Tensor:
        return self.model(token[:, None], cache=self.cache, logits_to_keep=1).logits[:, -1]

    def cache_bytes(self) -> int:
        return self.cache.nbytes()


class TransformersRunner(Runner):
    def prefill(self, ids: torch.Tensor, chunk: int) -> torch.Tensor:
        """One forward over the whole prompt: transformers cannot continue its Mamba layers from a chunk."""
        out = self.model(ids, use_cache=True, logits_to_keep=1)
        self.past = out.past_key_values
        return out.logits[:, -1]

    def decode(self, token: torch.Tensor) -> torch.Tensor:
        out = self.model(token[:, None], past_key_values=self.past, use_cache=True, logits_to_keep=1)
        self.past = out.past_key_values
        return out.logits[:, -1]


def build_runner(spec: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Runner:
    if spec["impl"] == "transformers":
        import transformers

        transformers.logging.set_verbosity_error()
        model = transformers.JambaForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype).to(device)
        return TransformersRunner(model, device)
    from .model import JambaForCausalLM

    if spec.get("model_dir"):
        model = JambaForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype, device=device)
    else:
        torch.manual_seed(spec["seed"])
        with torch.device(device):
            model = JambaForCausalLM(JambaConfig.from_dict(spec["config"])).to(dtype)
    kv_dtype = DTYPES[spec["kv_dtype"]] if spec.get("kv_dtype") else None
    return OpenJambaRunner(model, device, spec["decode_tokens"], kv_dtype)


# ---------------------------------------------------------------------- the worker
def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one (implementation, context, batch) cell: the phases in spec["phases"]."""
    torch.set_num_threads(spec["threads"])
    device, dtype = torch.device(spec["device"]), DTYPES[spec["dtype"]]
    runner = build_runner(spec, device, dtype)
    config = JambaConfig.from_dict(spec["config"])
    batch, context = spec["batch"], spec["context"]
    ids = torch.randint(0, config.vocab_size, (batch, context), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    result: dict[str, Any] = {"model_mem_bytes": current_memory(device)}
    phases = spec["phases"]
    if "prefill" in phases or "decode" in phases:
        result.update(_measure_inference(runner, ids, spec, config))
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


@torch.no_grad()
def _measure_inference(runner: Runner, ids: torch.Tensor, spec: dict, config: JambaConfig) -> dict[str, Any]:
    runner.model.eval()
    runner.prefill(ids[:, : min(128, ids.shape[1])], spec["prefill_chunk"])  # warm-up: kernels, allocator
    out: dict[str, Any] = {}
    logits = None

    def prefill() -> None:
        nonlocal logits
        logits = runner.prefill(ids, spec["prefill_chunk"])

    report_progress("prefill", force=True)
    with PeakMemory(runner.device) as peak:
        seconds = best_time(prefill, runner.device, spec["repeats"])
    batch, context = ids.shape
    out.update(prefill_s=seconds, prefill_tok_s=batch * context / seconds, peak_mem_bytes=peak.peak,
               prefill_flops_s=forward_flops(config, context, batch, logits=1) / seconds)
    if "decode" in spec["phases"] and spec["decode_tokens"] > 0:
        token = logits.argmax(-1)
        _sync(runner.device)
        start = time.perf_counter()
        report_progress("decode", force=True)
        for _ in range(spec["decode_tokens"]):
            token = runner.decode(token).argmax(-1)
        _sync(runner.device)
        out["decode_ms"] = (time.perf_counter() - start) * 1e3 / spec["decode_tokens"]
        out["decode_tok_s"] = batch * 1e3 / out["decode_ms"]
    cache = runner.cache_bytes()
    if cache is not None:
        out["cache_bytes"] = cache
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
        _sync(runner.device)
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
    from . import ops

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
        from .ops.triton_tools import benchmark

        out["scan_cuda"] = benchmark(batch, length, channels, state, dtype)
    return out


# ---------------------------------------------------------------------- the parent: plan, launch, report
def machine_info(device: torch.device, threads: int) -> dict[str, Any]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": threads,
            "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


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
) -> dict[str, Any]:
    """Measure every cell and return the report (see `format_report`); nothing is printed but progress."""
    from tqdm import tqdm

    for phase in phases:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; choose from {', '.join(PHASES)}")
    if kv_dtype is not None and kv_dtype not in DTYPES:
        raise ValueError(f"unknown kv_dtype {kv_dtype!r}; choose from {', '.join(DTYPES)}")
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
    machine["matmul_flops_s"] = matmul_flops_per_s(dev, DTYPES[dtype])
    if dev.type == "cuda":
        machine["copy_bytes_s"] = copy_bytes_per_s(dev)

    with tempfile.TemporaryDirectory(prefix="openjamba-bench-") as tmp:
        sources = _model_sources(config, model_dir, compare, Path(tmp), seed)
        common = dict(device=device, dtype=dtype, kv_dtype=kv_dtype, threads=threads, decode_tokens=decode_tokens,
                      prefill_chunk=prefill_chunk, repeats=repeats, seed=seed)
        cells = plan_cells(["openjamba", *compare], list(contexts), list(batches), list(phases))
        results = []
        bar = tqdm(cells, desc="bench", unit="cell", disable=not progress, file=sys.stderr)
        for cell in bar:
            bar.set_postfix_str(f"{cell['impl']} context {cell['context']} batch {cell['batch']} "
                                f"{'+'.join(cell['phases'])}")
            spec = {**common, **cell, **sources[cell["impl"]]}
            label = f"{cell['impl']} {cell['context']}x{cell['batch']}"
            results.append({**cell, **launch_worker(spec, timeout_s,
                                                    lambda text, label=label: bar.set_postfix_str(f"{label}: {text}"))})
    rows = merge_cells(results)
    return {"model": name, "machine": machine, "dtype": dtype, "kv_dtype": kv_dtype, "prefill_chunk": prefill_chunk,
            "decode_tokens": decode_tokens, "rows": rows, "ratios": ratios(rows, compare),
            "utilisation": utilisation(rows, machine["matmul_flops_s"])}


def _build_kernels(device: torch.device) -> None:
    """Build (or load) the device's compiled kernels once here, so no worker's timing includes a build."""
    from . import ops

    ops.backend_for(device)


def _model_sources(config: JambaConfig, model_dir, compare, tmp: Path, seed: int) -> dict[str, dict[str, Any]]:
    """Where each implementation's weights come from. transformers needs a checkpoint directory, so a preset is
    written once (random weights, `seed`) for both; otherwise each worker builds the model from config and seed."""
    own = {"config": config.to_dict(), "model_dir": str(model_dir) if model_dir else None}
    if "transformers" in compare and model_dir is None:
        from .model import JambaForCausalLM

        torch.manual_seed(seed)
        JambaForCausalLM(config).save_pretrained(tmp / "model")
        own["model_dir"] = str(tmp / "model")
    sources = {"openjamba": own, "transformers": own}
    sources["attention-only"] = {"config": attention_only_config(config).to_dict(), "model_dir": None}
    return sources


def merge_cells(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (impl, context, batch), the phase groups' figures side by side."""
    rows: dict[tuple, dict[str, Any]] = {}
    for cell in results:
        key = (cell["impl"], cell["context"], cell["batch"])
        row = rows.setdefault(key, {"impl": key[0], "context": key[1], "batch": key[2]})
        for field, value in cell.items():
            if field == "error":
                row.setdefault("errors", []).append(f"{'+'.join(cell['phases'])}: {value}")
            elif field != "phases":
                row[field] = value
    return list(rows.values())


def ratios(rows: list[dict[str, Any]], compare: tuple[str, ...]) -> list[dict[str, Any]]:
    """For each compared implementation and cell: its time over ours (speed-up) and our memory over its memory."""
    ours = {(r["context"], r["batch"]): r for r in rows if r["impl"] == "openjamba"}
    out = []
    for row in rows:
        if row["impl"] == "openjamba" or (row["context"], row["batch"]) not in ours:
            continue
        base = ours[(row["context"], row["batch"])]
        entry: dict[str, Any] = {"versus": row["impl"], "context": row["context"], "batch": row["batch"]}
        for field in ("prefill_s", "decode_ms", "train_s"):
            if field in row and field in base:
                entry[f"{field.split('_')[0]}_speedup"] = row[field] / base[field]
        for field in ("peak_mem_bytes", "added_mem_bytes", "train_peak_mem_bytes", "train_added_mem_bytes",
                      "cache_bytes"):
            if field in row and field in base:
                entry[f"{field.replace('_bytes', '')}_ratio"] = base[field] / row[field]
        out.append(entry)
    return out


def utilisation(rows: list[dict[str, Any]], matmul_flops_s: float) -> list[dict[str, Any]]:
    return [{"impl": r["impl"], "context": r["context"], "batch": r["batch"],
             **{f"{k.split('_')[0]}_mfu": r[k] / matmul_flops_s for k in ("prefill_flops_s", "train_flops_s")
                if k in r}} for r in rows]


# ---------------------------------------------------------------------- output
def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "bytes":
        return human_bytes(value)
    if kind == "pct":
        return f"{100 * value:.0f}%"
    if kind == "x":
        return f"{value:.2f}x"
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def format_report(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"openjamba bench: {report['model']} on {m.get('gpu', m['cpu'])} ({m['device']}, {m['threads']} threads, "
             f"{report['dtype']}{', K/V ' + report['kv_dtype'] if report.get('kv_dtype') else ''}); "
             f"matmul {m['matmul_flops_s'] / 1e9:,.0f} GFLOP/s"]
    mfu = {(u["impl"], u["context"], u["batch"]): u for u in report["utilisation"]}
    columns = [("prefill tok/s", "prefill_tok_s", "n"), ("prefill MFU", "prefill_mfu", "pct"),
               ("decode ms/tok", "decode_ms", "n"), ("train tok/s", "train_tok_s", "n"),
               ("train MFU", "train_mfu", "pct"), ("model mem", "model_mem_bytes", "bytes"),
               ("peak mem", "peak_mem_bytes", "bytes"), ("train peak", "train_peak_mem_bytes", "bytes"),
               ("cache", "cache_bytes", "bytes")]
    rows = [{**r, **mfu.get((r["impl"], r["context"], r["batch"]), {})} for r in report["rows"]]
    columns = [c for c in columns if any(c[1] in r for r in rows)]
    header = f"{'model':<16}{'context':>9}{'batch':>6}" + "".join(f"{c[0]:>15}" for c in columns)
    lines += ["", header]
    for r in rows:
        lines.append(f"{r['impl']:<16}{r['context']:>9}{r['batch']:>6}"
                     + "".join(f"{_fmt(r.get(c[1]), c[2]):>15}" for c in columns))
        lines += [f"    error {e}" for e in r.get("errors", [])]
    if report["ratios"]:
        keys = [k for k in ("prefill_speedup", "decode_speedup", "train_speedup", "peak_mem_ratio", "added_mem_ratio",
                            "train_peak_mem_ratio", "train_added_mem_ratio", "cache_ratio")
                if any(k in r for r in report["ratios"])]
        lines += ["", "openjamba vs " + "/".join(sorted({r["versus"] for r in report["ratios"]}))
                  + " (speedup = their time / ours; memory ratio = ours / theirs; added = peak - loaded model)",
                  f"{'versus':<16}{'context':>9}{'batch':>6}" + "".join(f"{k:>22}" for k in keys)]
        for r in report["ratios"]:
            lines.append(f"{r['versus']:<16}{r['context']:>9}{r['batch']:>6}"
                         + "".join(f"{_fmt(r.get(k), 'x'):>22}" for k in keys))
    scan_rows = [r for r in report["rows"] if "scan_fwd_ns" in r]
    if scan_rows:
        lines += ["", "selective scan alone at one Mamba layer's shape (ns per batch*channel*step*state element); "
                  "model share = scan time x Mamba layers / prefill time"]
        for r in scan_rows:
            share = r["scan_fwd_model_s"] / r["prefill_s"] if "prefill_s" in r else None
            lines.append(f"  {r['impl']} context {r['context']} batch {r['batch']}: {r['scan_backend']} forward "
                         f"{r['scan_fwd_ns']:.2f} ns, backward {r['scan_bwd_ns']:.2f} ns; "
                         f"{_fmt(share, 'pct')} of prefill")
    prof_rows = [r for r in report["rows"] if "profile_total_s" in r]
    if prof_rows:
        lines += ["", "profiled prefill (share of wall time): matmul / attention / selective scan"]
        for r in prof_rows:
            t = r["profile_total_s"]
            lines.append(f"  {r['impl']} context {r['context']} batch {r['batch']}: "
                         f"{_fmt(r['profile_matmul_s'] / t, 'pct')} / {_fmt(r['profile_attention_s'] / t, 'pct')} / "
                         f"{_fmt(r['profile_scan_s'] / t, 'pct')} of {t:.2f} s")
    return "\n".join(lines)


def plot_report(report: dict[str, Any], file: str | Path) -> Path:
    """Throughput and memory against context length, one line per (implementation, batch), as the paper's figures."""
    from .train.metrics import pyplot, save_figure

    plt = pyplot()
    panels = [("prefill_tok_s", "prefill tokens/s"), ("decode_tok_s", "decode tokens/s"),
              ("peak_mem_bytes", "peak memory (GiB)"), ("cache_bytes", "cache (GiB)")]
    panels = [p for p in panels if any(p[0] in r for r in report["rows"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    series: dict[tuple[str, int], list[dict]] = {}
    for r in report["rows"]:
        series.setdefault((r["impl"], r["batch"]), []).append(r)
    for ax, (field, title) in zip(axes[0], panels):
        for (impl, batch), rows in series.items():
            points = sorted((r["context"], r[field]) for r in rows if field in r)
            if not points:
                continue
            xs, ys = zip(*points)
            if field.endswith("bytes"):
                ys = [y / 2**30 for y in ys]
            ax.plot(xs, ys, marker="o", label=f"{impl} (batch {batch})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"openjamba bench: {report['model']} ({report['machine'].get('gpu', report['machine']['cpu'])})",
                 fontsize=9)
    return save_figure(fig, file, dpi=110)


def main() -> None:
    """Worker entry point: `python -m openjamba.bench --worker SPEC_JSON` prints one result line."""
    if len(sys.argv) != 3 or sys.argv[1] != "--worker":
        raise SystemExit("internal worker of `openjamba bench`; run `openjamba bench --help`")
    result = run_worker(json.loads(sys.argv[2]))
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
