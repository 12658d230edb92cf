"""The server's event-loop CPU per streamed token: `python -m openjamba.bench.loop_cpu --model DIR|REPO_ID [--tree A
--tree B]`.

Starts one `openjamba serve` per source tree (each with that tree on PYTHONPATH), then runs rounds of N concurrent
streaming requests (temperature 0, `ignore_eos`) against them in turn (A B A B ...), and reports for each the CPU
time of the server's main thread (the event loop: uvicorn, routes, SSE) per streamed token, read from
/proc/PID/task/PID/schedstat (nanoseconds), the whole process's CPU per token, and the aggregate tokens/s. CPU per
token is steadier than throughput on a shared machine. The client is a few raw asyncio sockets, so it takes little
CPU from the server; it also checks that every tree sent the same SSE bodies (ids and timestamps aside).

`--profile DIR` runs every server's main thread under cProfile, timed by the thread's CPU clock (stats written to
DIR/tree<i>.prof at exit); the profiler's own cost inflates the CPU figures, so profile and time in separate runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tree: str, args, profile: str | None) -> tuple[subprocess.Popen, int]:
    port = free_port()
    flags = ["serve", "--model", str(args.model), "--threads", str(args.threads), "--port", str(port),
             "--log-level", "warning", "--chat-template", CHAT_TEMPLATE, "--max-running", str(max(32, args.streams))]
    if profile is None:
        command = [sys.executable, "-m", "openjamba", *flags]
    else:
        code = ("import cProfile, sys, time; from openjamba.cli import main; sys.argv = ['openjamba'] + sys.argv[1:]; "
                f"p = cProfile.Profile(time.thread_time); p.runcall(main); p.dump_stats({profile!r})")
        command = [sys.executable, "-c", code, *flags]
    env = {**os.environ, "PYTHONPATH": tree}
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server of {tree} exited ({server.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, port
        except OSError:
            time.sleep(0.3)
    server.kill()
    raise SystemExit(f"the server of {tree} did not start")


def thread_cpu_ns(pid: int, tid: int) -> int:
    return int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])


def cpu_ticks(path: str) -> tuple[int, int]:
    """(user, system) CPU time in ns from a /proc stat file (clock-tick resolution)."""
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    tick = 10**9 // os.sysconf("SC_CLK_TCK")
    return int(fields[11]) * tick, int(fields[12]) * tick


async def stream(port: int, path: str, body: dict) -> bytes:
    """One POST; returns the de-chunked response body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(data)}"
                 f"\r\nConnection: close\r\n\r\n".encode() + data)
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"request failed: {head[:200]!r} {await reader.read()!r}")
    out = bytearray()
    while True:
        size = int((await reader.readline()).strip(), 16)
        if size == 0:
            break
        out += await reader.readexactly(size)
        await reader.readexactly(2)
    writer.close()
    return bytes(out)


def request_body(args, i: int) -> tuple[str, dict]:
    common = {"max_tokens": args.tokens, "temperature": 0, "ignore_eos": True, "stream": True,
              "stream_options": {"include_usage": True}}
    text = f"Once upon a time, in story number {i}, there was"
    if args.endpoint == "chat":
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": text}], **common}
    return "/v1/completions", {"prompt": text, **common}


async def one_round(port: int, args) -> tuple[list[bytes], float]:
    started = time.perf_counter()
    bodies = await asyncio.gather(*(stream(port, *request_body(args, i)) for i in range(args.streams)))
    return bodies, time.perf_counter() - started


def normalized(body: bytes) -> bytes:
    body = re.sub(rb'"id":"[^"]*"', b'"id":""', body)
    body = re.sub(rb'"cached_tokens":\d+', b'"cached_tokens":0', body)  # the warm-up stored the prompts' states
    return re.sub(rb'"created":\d+', b'"created":0', body)


def tokens_of(body: bytes) -> int:
    for line in reversed(body.split(b"\n")):
        if line.startswith(b"data: {") and b'"usage"' in line:
            return json.loads(line[6:])["usage"]["completion_tokens"]
    raise SystemExit("no usage chunk in a response")


def main() -> None:
    from ..hf import CheckpointError, resolve_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, metavar="DIR|REPO_ID",
                        help="checkpoint directory, or a Hugging Face Hub repo id (as the openjamba verbs take it)")
    parser.add_argument("--revision", default=None, help="with a repo id: the branch, tag or commit")
    parser.add_argument("--tree", action="append", default=None, help="source tree (PYTHONPATH); repeat to compare")
    parser.add_argument("--endpoint", default="completions", choices=["completions", "chat"])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per tree (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="the engine's compute threads")
    parser.add_argument("--profile", type=Path, default=None, help="cProfile every server's main thread")
    args = parser.parse_args()
    try:  # once, here: every server then loads the same directory, and a bad id is one line before any starts
        args.model = resolve_checkpoint(args.model, args.revision)
    except CheckpointError as err:
        parser.error(f"--model: {err}")
    trees = args.tree or [str(Path(__file__).resolve().parents[2])]
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    servers = [start_server(t, args, None if args.profile is None else str(args.profile / f"tree{i}.prof"))
               for i, t in enumerate(trees)]
    results: list[list[tuple[float, ...]]] = [[] for _ in trees]
    reference: list[bytes] | None = None
    try:
        for round_ in range(args.rounds + 1):
            for i, (server, port) in enumerate(servers):
                main_before = thread_cpu_ns(server.pid, server.pid)
                all_before = sum(cpu_ticks(f"/proc/{server.pid}/stat"))
                sys_before = cpu_ticks(f"/proc/{server.pid}/task/{server.pid}/stat")[1]
                bodies, wall = asyncio.run(one_round(port, args))
                main_ns = thread_cpu_ns(server.pid, server.pid) - main_before
                all_ns = sum(cpu_ticks(f"/proc/{server.pid}/stat")) - all_before
                sys_ns = cpu_ticks(f"/proc/{server.pid}/task/{server.pid}/stat")[1] - sys_before
                tokens = sum(tokens_of(b) for b in bodies)
                same = [normalized(b) for b in bodies]
                if reference is None:
                    reference = same
                elif same != reference:
                    print(f"!! tree {i} sent different bodies than tree 0", flush=True)
                if round_ == 0:
                    continue  # warm-up
                results[i].append((main_ns / 1e3 / tokens, sys_ns / 1e3 / tokens, all_ns / 1e3 / tokens, tokens / wall))
                print(f"round {round_} tree {i}: main thread {main_ns / 1e3 / tokens:6.1f} us/token (system "
                      f"{sys_ns / 1e3 / tokens:5.1f}), process "
                      f"{all_ns / 1e3 / tokens:6.1f} us/token, {tokens / wall:7.1f} tok/s ({tokens} tokens, "
                      f"{sum(map(len, bodies))} bytes)", flush=True)
    finally:
        for server, _ in servers:
            server.send_signal(signal.SIGINT)
        for server, _ in servers:
            server.wait(timeout=60)
    print(f"\n{args.streams} streams x {args.tokens} tokens, /{args.endpoint}, {args.threads} engine threads, "
          f"medians of {args.rounds} rounds:")
    for tree, rows in zip(trees, results):
        main_us, sys_us, all_us, rate = (statistics.median(col) for col in zip(*rows))
        print(f"  {tree}: main thread {main_us:.1f} us/token (system {sys_us:.1f}), process {all_us:.1f} us/token, "
              f"{rate:.0f} tok/s")


if __name__ == "__main__":
    main()
