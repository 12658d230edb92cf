"""`openjamba bench-serve --url URL`: the `streams` measurement against any OpenAI-compatible server over HTTP.

So openjamba can be compared with llama.cpp's `llama-server`, vLLM, Ollama or itself (`openjamba serve`) on the
same machine and the same prompts: for each N, N concurrent streaming requests (`/v1/completions` with a text
prompt, or `/v1/chat/completions`), each a shared prefix plus its own suffix. The prompts are random words from a
fixed list drawn with `seed`, so every server gets the same text; their lengths in the server's own tokens come
back in `usage` (`stream_options.include_usage`), as do the completion tokens.

Every request asks for `max_tokens` with `ignore_eos` (vLLM's extension, which openjamba serve honours too); a
server that does not honour it may stop early, so the report counts the completion tokens each server said it made
(`usage.completion_tokens`), and the row's `min_completion_tokens` shows any stream that stopped short.

Per request: TTFT = time from sending the request to the first chunk carrying text; ITL = the gaps between
text-carrying chunks (a chunk may carry several tokens on some servers, so these are chunk gaps, and `tpot_p50_ms`
gives the decode time per token: (last chunk - first chunk) / (completion tokens - 1)); aggregate output tokens/s =
the completion tokens of all N / the time from the first send to the last chunk. Timestamps are the client's, so
they include HTTP, JSON and detokenization, which the in-process mode leaves out.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from .measure import _cpu_name
from .serve import _stream_line, percentile, plot_serve_report

ENDPOINTS = {"completions": "/completions", "chat": "/chat/completions"}

# Plain, common English words: each is one or two tokens in most vocabularies, so a prompt of n words is a little
# over n tokens; the server's own count comes back in usage.
WORDS = (
    "time year people way day man thing woman life child world school state family student group country problem "
    "hand part place case week company system program question work government number night point home water room "
    "mother area money story fact month lot right study book eye job word business issue side kind head house "
    "service friend father power hour game line end member law car city community name president team minute idea "
    "kid body information back parent face others level office door health person art war history party result "
    "change morning reason research girl guy moment air teacher force education river garden stone light music"
).split()


class HttpBenchError(Exception):
    """A failure the user can act on (server unreachable, model unknown, a request refused): printed, no traceback."""


@dataclass
class Stream:
    """One streamed request as the client saw it."""

    sent: float
    chunks: list[float] = field(default_factory=list)  # arrival times of chunks that carried text
    text: list[str] = field(default_factory=list)
    usage: dict | None = None
    finish_reason: str | None = None

    @property
    def completion_tokens(self) -> int:
        return self.usage["completion_tokens"] if self.usage else len(self.chunks)

    @property
    def prompt_tokens(self) -> int:
        return self.usage.get("prompt_tokens", 0) if self.usage else 0

    @property
    def cached_tokens(self) -> int:
        details = (self.usage or {}).get("prompt_tokens_details") or {}
        return details.get("cached_tokens") or 0

    @property
    def ttft(self) -> float:
        return self.chunks[0] - self.sent

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.chunks, self.chunks[1:])]

    def per_token(self) -> float | None:
        if len(self.chunks) < 2 or self.completion_tokens < 2:
            return None
        return (self.chunks[-1] - self.chunks[0]) / (self.completion_tokens - 1)


class Words:
    """Random words from WORDS, one generator per run: the same seed gives every server the same prompts."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def __call__(self, n: int) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(n))


# ---------------------------------------------------------------------- HTTP
def _error_message(response: httpx.Response) -> str:
    """The server's own words for a refusal (OpenAI's {"error": {"message": ...}} or whatever text it sent)."""
    try:
        body = json.loads(response.text)
        error = body.get("error", body) if isinstance(body, dict) else body
        message = error.get("message", error) if isinstance(error, dict) else error
    except ValueError:
        message = response.text
    return f"HTTP {response.status_code}: {str(message).strip()[:300]}"


def _text_of(choice: dict) -> str:
    """The text a streamed choice carries: `text` (completions) or the delta's content/reasoning (chat)."""
    if "text" in choice:
        return choice["text"] or ""
    delta = choice.get("delta") or {}
    return (delta.get("content") or "") + (delta.get("reasoning_content") or delta.get("reasoning") or "")


async def stream_one(client: httpx.AsyncClient, path: str, body: dict) -> Stream:
    """POST one streaming request and time its server-sent events (parsed here: `data: {json}` lines, `[DONE]`)."""
    stream = Stream(time.perf_counter())
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise HttpBenchError(f"{path} refused the request: {_error_message(response)}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            now = time.perf_counter()
            event = json.loads(data)
            if "error" in event:
                raise HttpBenchError(f"{path} failed mid-stream: {event['error']}")
            for choice in event.get("choices") or []:
                if piece := _text_of(choice):
                    stream.chunks.append(now)
                    stream.text.append(piece)
                stream.finish_reason = choice.get("finish_reason") or stream.finish_reason
            if event.get("usage"):
                stream.usage = event["usage"]
    if not stream.chunks:
        raise HttpBenchError(f"{path} streamed no text (finish_reason {stream.finish_reason!r})")
    return stream


def request_body(endpoint: str, model: str, prefix: str, suffix: str, max_tokens: int, temperature: float,
                 top_p: float, seed: int) -> dict:
    body: dict[str, Any] = dict(model=model, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                stream=True, stream_options={"include_usage": True}, ignore_eos=True)
    if endpoint == "chat":
        body["messages"] = [{"role": "system", "content": prefix}, {"role": "user", "content": suffix}]
    else:
        body["prompt"] = f"{prefix}\n{suffix}" if suffix else prefix
    return body


async def first_model(client: httpx.AsyncClient) -> str:
    """The first id of GET /models: the model a server serves when it serves one."""
    response = await client.get("/models")
    if response.status_code != 200:
        raise HttpBenchError(f"GET /models failed: {_error_message(response)}")
    models = response.json().get("data") or []
    if not models:
        raise HttpBenchError("GET /models lists no model; name one with --model")
    return models[0]["id"]


# ---------------------------------------------------------------------- the phase
def _row(n: int, streams: list[Stream], start: float) -> dict:
    elapsed = max(s.chunks[-1] for s in streams) - start
    generated = sum(s.completion_tokens for s in streams)
    ttfts = [s.ttft for s in streams]
    gaps = [g for s in streams for g in s.gaps()]
    per_token = [t for s in streams if (t := s.per_token()) is not None]
    return dict(streams=n, reuse=None, output_tok_s=generated / elapsed, seconds=elapsed,
                ttft_p50_ms=1e3 * percentile(ttfts, 50), ttft_p99_ms=1e3 * percentile(ttfts, 99),
                itl_p50_ms=1e3 * percentile(gaps, 50), itl_p99_ms=1e3 * percentile(gaps, 99),
                tpot_p50_ms=1e3 * percentile(per_token, 50),
                cached_tokens=sum(s.cached_tokens for s in streams),
                prompt_tokens=sum(s.prompt_tokens for s in streams), completion_tokens=generated,
                min_completion_tokens=min(s.completion_tokens for s in streams),
                chunks=sum(len(s.chunks) for s in streams), usage_reported=all(s.usage for s in streams))


async def _streams(client: httpx.AsyncClient, model: str, endpoint: str, streams: tuple[int, ...], words: Words,
                   prefix: int, suffix: int, output: int, temperature: float, top_p: float) -> list[dict]:
    path = ENDPOINTS[endpoint]
    rows = []
    shared = words(prefix)
    # warm-up: the server's first request, and the shared prefix read once, as in process (a completion's prompt
    # is the prefix alone; a chat's the system turn with a one-word user turn), for servers that reuse state
    await stream_one(client, path, request_body(endpoint, model, shared, "" if endpoint == "completions" else
                                                words(1), 2, 0.0, 1.0, 0))
    for n in streams:
        bodies = [request_body(endpoint, model, shared, words(suffix), output, temperature, top_p, i)
                  for i in range(n)]  # made first: the N sends follow each other
        start = time.perf_counter()
        done = await asyncio.gather(*(stream_one(client, path, body) for body in bodies))
        rows.append(_row(n, list(done), start))
        print(_stream_line(dict(rows[-1], reuse=True)).replace("  on ", " srv ", 1), flush=True)
    return rows


async def _chat(client: httpx.AsyncClient, model: str, words: Words, history: int, new: int, output: int) -> dict:
    """A conversation's second turn: turn one is a `history`-word user message (read cold), turn two sends it again
    with the reply and `new` more words; a server that keeps (or caches) the first turn's state answers the second
    sooner. The ratio is turn one's TTFT over turn two's (in process: the same turn with reuse off over on)."""
    path = ENDPOINTS["chat"]
    await stream_one(client, path, request_body("chat", model, words(3), words(1), 2, 0.0, 1.0, 0))  # warm-up
    first = [{"role": "user", "content": words(history)}]
    body = dict(request_body("chat", model, "", "", output, 0.0, 1.0, 0), messages=first)
    one = await stream_one(client, path, body)
    second = first + [{"role": "assistant", "content": "".join(one.text)}, {"role": "user", "content": words(new)}]
    two = await stream_one(client, path, dict(body, messages=second))
    return dict(history_words=history, new_words=new, first_ttft_ms=1e3 * one.ttft,
                first_prompt_tokens=one.prompt_tokens, second_ttft_ms=1e3 * two.ttft,
                second_prompt_tokens=two.prompt_tokens, second_cached_tokens=two.cached_tokens,
                ttft_speedup=one.ttft / two.ttft)


async def _bench(url: str, model: str | None, api_key: str | None, phases: tuple[str, ...], streams: tuple[int, ...],
                 timeout: float, chat: dict, **streams_args) -> tuple[str, list[dict] | None, dict | None]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max(streams) + 1, max_keepalive_connections=max(streams) + 1)
    async with httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, limits=limits,
                                 timeout=httpx.Timeout(timeout, connect=10.0)) as client:
        model = model or await first_model(client)
        rows = await _streams(client, model, streams=streams, **streams_args) if "streams" in phases else None
        turns = await _chat(client, model, streams_args["words"], **chat) if "chat" in phases else None
    return model, rows, turns


def run_http_bench(url: str, *, model: str | None = None, api_key: str | None = None, endpoint: str = "completions",
                   streams=(1, 2, 4, 8, 16), prefix=256, suffix=32, output=128, seed=0, temperature=0.0,
                   top_p=1.0, timeout=600.0, phases=("streams",), history=4000, new=32) -> dict:
    """The streams phase against the server at `url` (its OpenAI base, e.g. http://127.0.0.1:8000/v1); `prefix`
    and `suffix` are counted in words (the tokens each server made of them are in the rows). Raises
    HttpBenchError with a one-line message when the server cannot be reached or refuses a request. `phases`:
    streams and/or chat (`history` and `new` words: see _chat)."""
    if endpoint not in ENDPOINTS:
        raise HttpBenchError(f"unknown endpoint {endpoint!r}; choose from {', '.join(ENDPOINTS)}")
    try:
        model, rows, turns = asyncio.run(_bench(
            url, model, api_key, tuple(phases), tuple(streams), timeout, dict(history=history, new=new, output=16),
            endpoint=endpoint, words=Words(seed), prefix=prefix, suffix=suffix, output=output,
            temperature=temperature, top_p=top_p))
    except httpx.TransportError as err:
        raise HttpBenchError(f"cannot reach {url}: {type(err).__name__}: {err or 'no detail'}") from None
    report = dict(mode="http", url=url, endpoint=endpoint, model=model, machine=client_machine(),
                  settings=dict(prefix=prefix, suffix=suffix, output=output, temperature=temperature, top_p=top_p,
                                seed=seed, history=history, new=new, endpoint=endpoint, units="words"))
    if rows is not None:
        report["streams"] = rows
    if turns is not None:
        report["chat"] = turns
    return report


def client_machine() -> dict:
    """Where the client ran (the server may be elsewhere): enough to tell runs apart."""
    return dict(cpu=_cpu_name(), platform=platform.platform(), cpu_count=os.cpu_count(),
                load_avg_at_start=list(os.getloadavg()) if hasattr(os, "getloadavg") else None)


def format_http_report(report: dict) -> str:
    s, m = report["settings"], report["machine"]
    lines = [f"serving benchmark over HTTP: {report['model']} at {report['url']}, client on {m['cpu_count']} CPUs "
             f"({m['cpu']})"]
    if "streams" in report:
        lines += _streams_lines(report["streams"], s)
    if "chat" in report:
        c = report["chat"]
        lines.append(f"\nchat second turn after a {c['history_words']}-word first turn ({c['first_prompt_tokens']} "
                     f"tokens, TTFT {c['first_ttft_ms']:.0f} ms read cold; /chat/completions): TTFT "
                     f"{c['second_ttft_ms']:.0f} ms for {c['second_prompt_tokens']} tokens, "
                     f"{c['second_cached_tokens']} reported cached: {c['ttft_speedup']:.1f}x sooner")
    return "\n".join(lines)


def _streams_lines(rows: list[dict], s: dict) -> list[str]:
    sampling = "greedy" if s["temperature"] == 0 else f"temperature {s['temperature']}, top-p {s['top_p']}"
    lines = [f"\nconcurrent streams ({ENDPOINTS[s['endpoint']]}): a {s['prefix']}-word shared prefix + "
             f"{s['suffix']} own words, {s['output']} output tokens asked each with ignore_eos ({sampling})",
             "streams   srv  output/s  TTFT p50  TTFT p99  ITL p50  ITL p99  cached  prompt  min out  TPOT p50",
             "                (tok/s)      (ms)      (ms)     (ms)     (ms) (tokens)   (tok)    (tok)      (ms)"]
    for row in rows:
        line = _stream_line(dict(row, reuse=True)).replace("  on ", " srv ", 1)
        lines.append(f"{line} {row['prompt_tokens'] // row['streams']:>7} {row['min_completion_tokens']:>8} "
                     f"{row['tpot_p50_ms']:>9.1f}")
    lines.append("\nTTFT and ITL as the client saw them (HTTP, JSON and detokenization included); ITL is the gap "
                 "between text chunks (a chunk may carry several tokens), TPOT the decode time per token from usage; "
                 "prompt = tokens per stream by the server's count.")
    short = [r["streams"] for r in rows if r["min_completion_tokens"] < s["output"]]
    if short:
        lines.append(f"note: some streams ended before {s['output']} tokens (at N = {', '.join(map(str, short))}): "
                     "the server may not honour ignore_eos; output/s counts the tokens it reported.")
    if any(r["prompt_tokens"] and r["cached_tokens"] >= r["prompt_tokens"] for r in rows):
        lines.append("note: the server had whole prompts cached (it ran this --seed before): restart it or change "
                     "--seed to measure reading the streams' own tokens.")
    if not all(r["usage_reported"] for r in rows):
        lines.append("note: the server sent no usage for some streams; their tokens are counted as text chunks.")
    return lines


def cmd_bench_serve_http(args) -> None:
    """`openjamba bench-serve --url`, given the arguments openjamba/cli.py parses: a table, a plot, then JSON."""
    from ..argtypes import usage_error

    if args.preset:
        raise usage_error("openjamba bench-serve", "--url measures a running server; --preset is for the in-process "
                          "mode (with --url, --model names the server's model)")
    phases = tuple(p.strip() for p in (args.phases or "streams").split(",") if p.strip())
    if "interference" in phases:
        raise usage_error("openjamba bench-serve", "with --url the streams and chat phases run (interference reads "
                          "the engine's own iteration log: use --preset or --model without --url)")
    try:
        report = run_http_bench(args.url, model=str(args.model) if args.model else None, api_key=args.api_key,
                                endpoint=args.endpoint, streams=args.streams, prefix=args.prefix_tokens,
                                suffix=args.suffix_tokens, output=args.output_tokens, seed=args.seed,
                                temperature=args.temperature, top_p=args.top_p, timeout=args.timeout,
                                phases=phases, history=args.history)
    except HttpBenchError as err:
        raise SystemExit(f"openjamba bench-serve: error: {err}") from None
    print(format_http_report(report))
    if args.plot and "streams" in report:
        print(f"plot: {plot_serve_report(report, args.plot)}")
    print(json.dumps(report))
