"""The serving metrics: latency histograms in Prometheus' cumulative buckets, kept by the engine, and the exposition
text of `GET /metrics` (the engine's counters and gauges with their help, its histograms, then any other numeric
statistic), and the periodic engine line of the server's log (`StatsLogger`)."""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable

STEP = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)  # bounds for an iteration's parts
LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)  # for requests


class Histogram:
    """Seconds observed, counted in Prometheus' cumulative buckets (`le`: at most that many seconds)."""

    def __init__(self, bounds: tuple[float, ...] = STEP) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def snapshot(self) -> dict:
        """{"buckets": [(le, cumulative count)...], "sum", "count"}, the last bucket's le inf."""
        cumulative = list(itertools.accumulate(self.counts))
        return dict(buckets=list(zip((*self.bounds, float("inf")), cumulative)), sum=self.sum, count=cumulative[-1])


METRICS = [  # (stats key, metric name, type, help)
    ("running", "openjamba_requests_running", "gauge", "Requests decoding or prefilling now."),
    ("waiting", "openjamba_requests_waiting", "gauge", "Requests queued for admission."),
    ("generated_tokens_total", "openjamba_generation_tokens_total", "counter", "Tokens generated."),
    ("prompt_tokens_total", "openjamba_prompt_tokens_total", "counter", "Prompt tokens received."),
    ("cached_prompt_tokens_total", "openjamba_prompt_tokens_cached_total", "counter",
     "Prompt tokens served from stored state (not prefilled)."),
    ("preemptions_total", "openjamba_preemptions_total", "counter",
     "Rows taken out of the batch to keep the K/V within --kv-cache-memory (each resumed later from its state)."),
    ("kv_cache_bytes", "openjamba_kv_cache_bytes", "gauge",
     "Attention K/V allocated for the requests in flight (the running batch, rows joining it, prompts prefilling)."),
    ("kv_cache_max_bytes", "openjamba_kv_cache_max_bytes", "gauge",
     "The bound on openjamba_kv_cache_bytes (--kv-cache-memory); 0: unbounded."),
]


HISTOGRAM_HELP = {
    "iteration_seconds": "One iteration of the engine loop: admission, prefill chunks and one decode step.",
    "prefill_seconds": "The prefill work of an iteration that had some (at most one chunk's budget of tokens).",
    "decode_step_seconds": "One decode step of the running batch, with sampling and its token events.",
    "time_to_first_token_seconds": "From a request's arrival to its first token (queue and prefill included).",
    "request_seconds": "From a request's arrival to its end (finished, stopped, cancelled or failed).",
}


def prometheus_text(stats: dict) -> str:
    """Prometheus exposition text: the engine's known counters with help, then any other numeric stat."""
    lines, done = [], set()
    for key, name, kind, text in METRICS:
        if key in stats:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {_num(stats[key])}"]
            done.add(key)
    if "queue_time_seconds_sum" in stats and "queue_time_seconds_count" in stats:
        name = "openjamba_queue_time_seconds"
        lines += [f"# HELP {name} Time requests waited before their first step.", f"# TYPE {name} summary",
                  f"{name}_sum {_num(stats['queue_time_seconds_sum'])}",
                  f"{name}_count {_num(stats['queue_time_seconds_count'])}"]
        done |= {"queue_time_seconds_sum", "queue_time_seconds_count"}
    for key, histogram in sorted(stats.get("histograms", {}).items()):
        name, text = "openjamba_engine_" + key, HISTOGRAM_HELP.get(key, key)
        lines += [f"# HELP {name} {text}", f"# TYPE {name} histogram"]
        lines += [f'{name}_bucket{{le="{"+Inf" if math.isinf(le) else le}"}} {n}' for le, n in histogram["buckets"]]
        lines += [f"{name}_sum {_num(histogram['sum'])}", f"{name}_count {_num(histogram['count'])}"]
    for key, value in sorted(stats.items()):
        if key in done or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name = "openjamba_" + "".join(ch if ch.isalnum() else "_" for ch in key)
        lines += [f"# TYPE {name} {'counter' if key.endswith('_total') else 'gauge'}", f"{name} {_num(value)}"]
    return "\n".join(lines) + "\n"


def _num(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(int(value))


def stats_line(before: dict, now: dict, seconds: float) -> str | None:
    """The engine's work since the last line, as vLLM logs it every few seconds: requests in each stage, prompt
    tokens read and reused, tokens generated per second, the memory of the running batch and the stored states.
    None when nothing happened and nothing is in flight (an idle server keeps its log quiet)."""
    def delta(key: str) -> int:
        return now[key] - before[key]

    prompt, cached, generated = delta("prompt_tokens_total"), delta("cached_prompt_tokens_total"), delta(
        "generated_tokens_total")
    if not (prompt or generated or now["running"] or now["prefilling"] or now["waiting"]):
        return None
    seconds = max(seconds, 1e-9)
    preempted = now.get("preemptions_total", 0) - before.get("preemptions_total", 0)
    bound = now.get("kv_cache_max_bytes", 0)
    kv = f"K/V {now.get('kv_cache_bytes', 0) / 2**20:.1f}" + (f" of {bound / 2**20:.1f} MiB" if bound else " MiB")
    return (f"engine: {now['running']} running, {now['prefilling']} prefilling, {now['waiting']} waiting"
            f"{f', {preempted} preempted' if preempted else ''}; "
            f"prompt {(prompt - cached) / seconds:.1f} tokens/s read, {cached} of {prompt} reused; generation "
            f"{generated / seconds:.1f} tokens/s; batch {now['batch_cache_bytes'] / 2**20:.1f} MiB ({kv}), stored "
            f"states {now['store_bytes'] / 2**20:.1f} MiB")


class StatsLogger:
    """A thread that logs `stats_line` every `interval` seconds from `stats()` (the engine's) until `stop()`."""

    def __init__(self, stats: Callable[[], dict], interval: float, log: logging.Logger | None = None) -> None:
        self.stats, self.interval = stats, interval
        self.log = log or logging.getLogger("openjamba.serve")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="openjamba-stats", daemon=True)

    def start(self) -> StatsLogger:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        before, since = self.stats(), time.monotonic()
        while not self._stop.wait(self.interval):
            now, at = self.stats(), time.monotonic()
            line = stats_line(before, now, at - since)
            if line is not None:
                self.log.info(line)
            before, since = now, at
