"""`openjamba bench-serve`: the serving engine under concurrent streams, driven in process with token ids.

Three measurements, all in one run so their ratios compare like with like:
- `streams`: N requests at once (N = 1, 2, 4, 8, 16), each a shared system prefix plus its own random suffix,
  greedy (or sampled at `temperature` and `top_p`, each request with its own seed), a fixed number of output
  tokens (EOS ignored); aggregate output tokens/s, time to first token (TTFT)
  and inter-token latency (ITL) p50/p99; with state reuse on (the shared prefix is read once) and off.
- `chat`: the second turn of a conversation whose history is `--history` tokens: TTFT with reuse on (the engine
  resumes from the state stored after turn one and reads only the new tokens) against reuse off (re-reads all).
- `interference`: a `--long-prompt`-token prompt arrives while 8 streams decode; the worst gap between two
  tokens of those streams while it is prefilled and until its row has joined the batch (it decodes a few tokens),
  against the bound "one prefill chunk plus one decode step", both measured here: the step as the streams' median
  gap before; the chunk as the engine runs it (its size the engine's budget less the 8 decode tokens), the same
  prompt prefilled alone in those chunks on a thread like the engine's, the slowest chunk of a pass, median of 3
  (after an untimed pass).
  The engine first prefills one prompt of that length, so both are measured in a warm process (as a server that
  has run a while). Each gap is also attributed with the engine's own iteration log (`Engine.iterations`): the
  iteration that ends a gap ran some prefill (how many tokens, how long) and one decode step, and whatever else the
  gap holds is the engine's own overhead ("other"); so the report shows whether a gap over the bound came from a
  chunk that ran longer inside the engine than alone (another process taking a core for a while, say) or from
  the engine doing more than one chunk and one step.

Every engine computes on its own thread with `threads` intra-op threads, and so does the alone timing; the
caller's thread should hold one intra-op thread (`openjamba bench-serve` does): see serve/engine.py on OpenMP pools.

The engine is the server's (`openjamba serve` adds only HTTP and text around it); timestamps are taken in its
event callbacks, so they are what a client would see less the network. Prints a table, then JSON as the last line.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..generate import prefill
from ..runtime import hold_freed_memory, on_fresh_thread
from ..serve.engine import Engine, FinishEvent, SamplingParams
from .measure import machine_info, processor_label

SERVE_PHASES = ("streams", "chat", "interference")


@dataclass
class Timed:
    """Submit time, token times and the finish event of one request."""

    submitted: float
    tokens: list[float] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    request_id: int | None = None
    finish: FinishEvent | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def on_event(self, event) -> None:
        if isinstance(event, FinishEvent):
            self.finish = event
            self.done.set()
        else:
            self.tokens.append(time.perf_counter())
            self.ids.append(event.token_id)

    @property
    def ttft(self) -> float:
        return self.tokens[0] - self.submitted

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.tokens, self.tokens[1:])]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def submit(engine: Engine, prompt: list[int], params: SamplingParams) -> Timed:
    timed = Timed(time.perf_counter())
    timed.request_id = engine.submit(prompt, params, timed.on_event)
    return timed


def wait(requests: list[Timed], timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    for r in requests:
        if not r.done.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError("the engine did not finish the benchmark's requests in time")
        if r.finish.reason == "error":
            raise RuntimeError(f"the engine failed a request: {r.finish.error}")


class Tokens:
    """Random token ids, never repeating a sequence across calls (so reuse happens only where intended)."""

    def __init__(self, vocab_size: int, seed: int) -> None:
        self.vocab = vocab_size
        self.g = torch.Generator().manual_seed(seed)

    def __call__(self, n: int) -> list[int]:
        return torch.randint(3, self.vocab, (n,), generator=self.g).tolist()  # ids 0-2: pad/BOS/EOS


# ---------------------------------------------------------------------- phases
def bench_streams(model, streams: tuple[int, ...], reuse: bool, tokens: Tokens, prefix: list[int], suffix: int,
                  output: int, prefill_chunk: int, threads: int, temperature: float = 0.0,
                  top_p: float = 1.0) -> list[dict]:
    rows = []
    with Engine(model, max_running=max(streams), max_waiting=max(streams), prefill_chunk=prefill_chunk,
                reuse=reuse, threads=threads) as engine:
        # warm-up, and the shared system prompt read once (with reuse on, every stream then starts from its state)
        wait([submit(engine, prefix, SamplingParams(max_tokens=2, temperature=0.0))])
        for n in streams:
            prompts = [prefix + tokens(suffix) for _ in range(n)]  # made first: the N submits follow each other
            params = [SamplingParams(max_tokens=output, temperature=temperature, top_p=top_p, seed=i, ignore_eos=True)
                      for i in range(n)]
            start = time.perf_counter()
            requests = [submit(engine, prompt, p) for prompt, p in zip(prompts, params)]
            wait(requests)
            elapsed = max(r.tokens[-1] for r in requests) - start
            generated = sum(len(r.tokens) for r in requests)
            ttfts = [r.ttft for r in requests]
            gaps = [g for r in requests for g in r.gaps()]
            rows.append(dict(streams=n, reuse=reuse, output_tok_s=generated / elapsed, seconds=elapsed,
                             ttft_p50_ms=1e3 * percentile(ttfts, 50), ttft_p99_ms=1e3 * percentile(ttfts, 99),
                             itl_p50_ms=1e3 * percentile(gaps, 50), itl_p99_ms=1e3 * percentile(gaps, 99),
                             cached_tokens=sum(r.finish.cached_tokens for r in requests),
                             prompt_tokens=sum(r.finish.prompt_tokens for r in requests)))
            print(_stream_line(rows[-1]), flush=True)
    return rows


def bench_chat(model, tokens: Tokens, history: int, new: int, output: int, prefill_chunk: int, threads: int) -> dict:
    """TTFT of a chat's second turn with reuse on and off; the same token ids in both."""
    first_prompt = tokens(history)
    turn2 = tokens(new)
    result: dict[str, Any] = dict(history_tokens=history, new_tokens=new)
    for reuse in (True, False):
        with Engine(model, max_running=1, max_waiting=1, prefill_chunk=prefill_chunk, reuse=reuse,
                    threads=threads) as engine:
            first = submit(engine, first_prompt, SamplingParams(max_tokens=output, temperature=0.0))
            wait([first])
            reply = first.ids
            second = submit(engine, first_prompt + reply + turn2, SamplingParams(max_tokens=4, temperature=0.0))
            wait([second])
            key = "reuse" if reuse else "no_reuse"
            result[f"{key}_ttft_ms"] = 1e3 * second.ttft
            result[f"{key}_cached_tokens"] = second.finish.cached_tokens
            result[f"{key}_prompt_tokens"] = second.finish.prompt_tokens
            result["first_turn_ttft_ms"] = 1e3 * first.ttft
    result["ttft_speedup"] = result["no_reuse_ttft_ms"] / result["reuse_ttft_ms"]
    return result


def bench_interference(model, tokens: Tokens, long_prompt: int, streams: int, prefill_chunk: int,
                       threads: int) -> dict:
    params = SamplingParams(max_tokens=model.config.max_position_embeddings - 64, temperature=0.0, ignore_eos=True)
    prompt = tokens(long_prompt)
    with Engine(model, max_running=streams + 1, max_waiting=streams + 1, prefill_chunk=prefill_chunk,
                reuse=False, threads=threads) as engine:
        chunk = engine.prefill_tokens(streams)  # what each iteration prefills while the streams decode
        # A server that has run a while: the first long prefill of a process page-faults its fresh memory
        # (5,600-8,600 minor faults on each of its first five 504-token chunks on cpu-bench, 10-25 ms each on this
        # VM; likely glibc's mmap threshold rising to the chunks' buffers), a one-time cost the alone chunks below,
        # timed later in the same process, would not pay.
        wait([submit(engine, tokens(long_prompt), SamplingParams(max_tokens=1, temperature=0.0))])
        decoding = [submit(engine, tokens(16), params) for _ in range(streams)]
        while min(len(r.tokens) for r in decoding) < 12:
            time.sleep(0.01)
        arrive = time.perf_counter()
        before = [g for r in decoding for a, g in zip(r.tokens[1:], r.gaps()) if a <= arrive][-8 * streams:]
        # It decodes a few tokens too, so its row joins the batch: the window below covers its joining.
        long = submit(engine, prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        wait([long])
        joined = long.tokens[1]  # its first token from a decode step: its row had joined the batch
        time.sleep(0.2)  # a few more steps after it
        for r in decoding:
            engine.cancel(r.request_id)
        wait(decoding)
        iterations = engine.iterations()
    pairs = [(a, b) for r in decoding for a, b in zip(r.tokens, r.tokens[1:]) if b > arrive and a < joined]
    during = [b - a for a, b in pairs]
    parts = [_attribute(a, b, iterations) for a, b in pairs]
    worst_parts = parts[during.index(max(during))]
    step_s = statistics.median(before)
    passes = on_fresh_thread(lambda: _chunk_times(model, prompt, chunk), threads)
    slowest = [max(p) for p in passes]
    chunk_s = statistics.median(slowest)
    worst = max(during)
    return dict(streams=streams, long_prompt_tokens=long_prompt, prefill_chunk=prefill_chunk, chunk_tokens=chunk,
                alone_slowest_chunk_ms=[1e3 * t for t in slowest],
                alone_chunks_ms=[round(1e3 * t, 1) for t in passes[0]],
                prefill_s=long.tokens[0] - arrive, step_ms=1e3 * step_s, chunk_ms=1e3 * chunk_s,
                bound_ms=1e3 * (step_s + chunk_s), worst_gap_ms=1e3 * worst,
                median_gap_during_prefill_ms=1e3 * statistics.median(during),
                gaps_during_prefill=len(during), within_bound=worst <= step_s + chunk_s,
                worst_gap_parts_ms=worst_parts,
                max_prefill_tokens_in_a_gap=max(p["prefill_tokens"] for p in parts),
                max_other_ms=max(p["other"] for p in parts),
                in_engine_chunks_ms=[round(1e3 * i.prefill_s, 1) for i in iterations
                                     if i.prefill_tokens and arrive < i.start < joined])


def _attribute(a: float, b: float, iterations) -> dict:
    """The parts of a gap between two tokens of a stream sent at `a` and `b` (perf_counter seconds): the prefill
    and the decode step of the iteration that sent `b`, in ms, and the rest of the gap ("other")."""
    it = next((i for i in iterations if i.start <= b <= i.end), None)
    if it is None:  # not in the log (it keeps the last ITERATIONS_KEPT)
        return dict(prefill=float("nan"), prefill_tokens=0, step=float("nan"), other=float("nan"))
    step = b - (it.end - it.decode_s)  # the decode step up to the event: its tokens are sent in row order
    return dict(prefill=round(1e3 * it.prefill_s, 2), prefill_tokens=it.prefill_tokens, step=round(1e3 * step, 2),
                other=round(1e3 * (b - a - it.prefill_s - step), 2))


@torch.inference_mode()
def _chunk_times(model, prompt: list[int], chunk: int, passes: int = 3) -> list[list[float]]:
    """Seconds of each `chunk`-token prefill of `prompt` alone, as the engine runs them (`generate.prefill` into a
    fresh one-row cache, the same positions), for each of `passes` passes after one untimed pass: a fresh thread's
    first pass page-faults its buffers in (up to 3,600 minor faults a chunk on cpu-bench), which the engine, warmed
    by its first long prompt and holding freed memory (serve/engine.py), does not pay."""
    hold_freed_memory()  # as the engine's loop does
    ids = torch.tensor([prompt])
    out = []
    for _ in range(passes + 1):
        cache, times = model.make_cache(1), []
        for start in range(0, len(prompt), chunk):
            t = time.perf_counter()
            prefill(model, ids[:, start:start + chunk], cache, chunk_size=chunk)
            times.append(time.perf_counter() - t)
        out.append(times)
    return out[1:]


# ---------------------------------------------------------------------- the run
def run_serve_bench(model, name: str, *, threads: int | None = None, phases=SERVE_PHASES, streams=(1, 2, 4, 8, 16),
                    prefix=256, suffix=32, output=128, history=4000, new=32, long_prompt=4000, prefill_chunk=512,
                    seed=0, temperature=0.0, top_p=1.0) -> dict:
    """`threads`: each engine's intra-op threads (default: the caller's count); `temperature` and `top_p`: the
    streams phase's sampling (default greedy)."""
    model.eval()
    threads = threads if threads is not None else torch.get_num_threads()
    tokens = Tokens(model.config.vocab_size, seed)
    report: dict[str, Any] = dict(model=name, machine=machine(model, threads), prefill_chunk=prefill_chunk,
                                  settings=dict(prefix=prefix, suffix=suffix, output=output, history=history,
                                                new=new, long_prompt=long_prompt, temperature=temperature,
                                                top_p=top_p))
    if "streams" in phases:
        shared = tokens(prefix)
        report["streams"] = [row for reuse in (True, False) for row in
                             bench_streams(model, streams, reuse, tokens, shared, suffix, output, prefill_chunk,
                                           threads, temperature, top_p)]
    if "chat" in phases:
        report["chat"] = bench_chat(model, tokens, history, new, 16, prefill_chunk, threads)
    if "interference" in phases:
        report["interference"] = bench_interference(model, tokens, long_prompt, 8, prefill_chunk, threads)
    report["targets"] = targets(report)
    return report


def targets(report: dict) -> dict:
    out: dict[str, Any] = {}
    rows = [r for r in report.get("streams", []) if r["reuse"]]
    by_n = {r["streams"]: r["output_tok_s"] for r in rows}
    if 1 in by_n and 16 in by_n:
        ratio = by_n[16] / by_n[1]
        out["streams16_vs_1"] = dict(ratio=ratio, target=6.0, met=ratio >= 6.0)
    if "chat" in report:
        ratio = report["chat"]["ttft_speedup"]
        out["chat_ttft_reuse"] = dict(ratio=ratio, target=10.0, met=ratio >= 10.0)
    if "interference" in report:
        i = report["interference"]
        out["interference_gap"] = dict(worst_gap_ms=i["worst_gap_ms"], bound_ms=i["bound_ms"], met=i["within_bound"])
    return out


def machine(model, threads: int) -> dict:
    """`machine_info`, plus the load average: on a shared machine the figures depend on it."""
    info = machine_info(model.device, threads)
    info["load_avg_at_start"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return info


def _sampling(settings: dict) -> str:
    temperature, top_p = settings.get("temperature", 0.0), settings.get("top_p", 1.0)
    return "greedy" if temperature == 0 else f"sampled at temperature {temperature}, top-p {top_p}"


def _stream_line(row: dict) -> str:
    return (f"{row['streams']:>7} {'on' if row['reuse'] else 'off':>5} {row['output_tok_s']:>10.1f} "
            f"{row['ttft_p50_ms']:>9.0f} {row['ttft_p99_ms']:>9.0f} {row['itl_p50_ms']:>8.1f} "
            f"{row['itl_p99_ms']:>8.1f} {row['cached_tokens']:>7}")


def format_serve_report(report: dict) -> str:
    m = report["machine"]
    lines = [f"serving benchmark: {report['model']}, {m['threads']} threads on {m['cpu_count']} CPUs "
             f"({processor_label(m)}), torch {m['torch']}, prefill chunk {report['prefill_chunk']}"]
    if "streams" in report:
        s = report["settings"]
        lines += [f"\nconcurrent streams: {s['prefix']}-token shared prefix + {s['suffix']} own tokens, "
                  f"{s['output']} output tokens each ({_sampling(s)})",
                  "streams reuse  output/s  TTFT p50  TTFT p99  ITL p50  ITL p99  cached",
                  "                (tok/s)      (ms)      (ms)     (ms)     (ms) (tokens)"]
        lines += [_stream_line(row) for row in report["streams"]]
    if "chat" in report:
        c = report["chat"]
        lines += [f"\nchat second turn after {c['history_tokens']} history tokens (+{c['new_tokens']} new): TTFT "
                  f"{c['reuse_ttft_ms']:.0f} ms with reuse ({c['reuse_cached_tokens']} of {c['reuse_prompt_tokens']} "
                  f"tokens reused) vs {c['no_reuse_ttft_ms']:.0f} ms without: {c['ttft_speedup']:.1f}x sooner"]
    if "interference" in report:
        i = report["interference"]
        lines += [f"\n{i['long_prompt_tokens']}-token prompt arriving while {i['streams']} streams decode: prefilled "
                  f"in {i['prefill_s']:.2f} s; gaps meanwhile: median {i['median_gap_during_prefill_ms']:.0f} ms, "
                  f"worst {i['worst_gap_ms']:.0f} ms vs bound {i['bound_ms']:.0f} ms "
                  f"(one {i['chunk_tokens']}-token chunk {i['chunk_ms']:.0f} ms + one step {i['step_ms']:.0f} ms)"]
        if "worst_gap_parts_ms" in i:
            w = i["worst_gap_parts_ms"]
            lines += [f"  the worst gap in the engine: a {w['prefill_tokens']}-token prefill {w['prefill']:.1f} ms + "
                      f"the step {w['step']:.1f} ms + other {w['other']:.1f} ms; in every gap at most "
                      f"{i['max_prefill_tokens_in_a_gap']} prompt tokens and at most {i['max_other_ms']:.1f} ms other; "
                      f"chunks in the engine {', '.join(f'{c:.0f}' for c in i['in_engine_chunks_ms'])} ms, alone "
                      f"{', '.join(f'{c:.0f}' for c in i['alone_chunks_ms'])} ms"]
    if report.get("targets"):
        lines.append("\ntargets:")
        for key, t in report["targets"].items():
            value = f"{t['ratio']:.2f}x (target {t['target']}x)" if "ratio" in t else \
                f"{t['worst_gap_ms']:.0f} ms <= {t['bound_ms']:.0f} ms"
            lines.append(f"  {key}: {value} -> {'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines)


def plot_serve_report(report: dict, path: str | Path) -> Path:
    from ..plotting import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    labels = {True: "reuse on", False: "reuse off", None: "over HTTP"}  # None: `bench-serve --url`'s rows
    for reuse, label in labels.items():
        rows = [r for r in report.get("streams", []) if r["reuse"] is reuse]
        if not rows:
            continue
        n = [r["streams"] for r in rows]
        axes[0].plot(n, [r["output_tok_s"] for r in rows], marker="o", label=label)
        axes[1].plot(n, [r["ttft_p50_ms"] for r in rows], marker="o", label=f"p50, {label}")
        axes[1].plot(n, [r["ttft_p99_ms"] for r in rows], marker="x", linestyle="--", label=f"p99, {label}")
        axes[2].plot(n, [r["itl_p50_ms"] for r in rows], marker="o", label=f"p50, {label}")
        axes[2].plot(n, [r["itl_p99_ms"] for r in rows], marker="x", linestyle="--", label=f"p99, {label}")
    for ax, title in zip(axes, ("aggregate output tokens/s", "time to first token (ms)", "inter-token latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def to_json(report: dict) -> str:
    return json.dumps(report)
