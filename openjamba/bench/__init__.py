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

The package, by concern: `measure` (timing and memory sampling), `runners` (what is measured, per
implementation), `worker` (the worker process and its launcher), `run` (orchestration: `run_bench`) and `report`
(aggregation, tables and plot).
"""

from __future__ import annotations

from .measure import PeakMemory, best_time
from .report import format_bench_report, plot_bench_report, ratios
from .run import DEFAULT_PHASES, IMPLS, PHASES, plan_cells, run_bench
from .worker import launch_worker

__all__ = ["DEFAULT_PHASES", "IMPLS", "PHASES", "PeakMemory", "best_time", "format_bench_report", "launch_worker",
           "plan_cells", "plot_bench_report", "ratios", "run_bench"]
