"""`openjamba run-batch`: a file of requests in OpenAI's Batch format run offline through the server's own handlers.

Each input line, `{"custom_id", "method": "POST", "url", "body"}`, is sent to the app `openjamba serve` runs, called in
process through ASGI (no port, no HTTP parsing), so a result's body is byte for byte what the server would answer.
A sliding window keeps 2 x --max-running requests in flight, so the engine batches them continuously while a file of
any size is read a line at a time. Each result is appended as its request finishes (completion order, as OpenAI's
batches) and flushed, so a crash or Ctrl-C loses nothing finished, and a rerun with the same output runs only the
custom_ids it lacks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NoReturn

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages")
WINDOW_PER_ROW = 2  # requests in flight per --max-running row: the next ones already wait in the engine's queue
QUEUE_UNBOUNDED = 1 << 30  # the engine's --max-waiting: the window bounds the queue, so nothing is refused with a 429
PROG = "openjamba run-batch"
CUSTOM_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("custom_id", default=None)  # a task's request


def add_run_batch_arguments(parser: argparse.ArgumentParser) -> None:
    from .server import add_batching_arguments, add_engine_arguments
    from .vllm_flags import add_vllm_arguments

    parser.add_argument("-i", "--input-file", required=True, metavar="INPUT.jsonl",
                        help="requests in OpenAI's Batch format, one JSON object a line: custom_id, method (POST), url "
                        f"({', '.join(URLS)}) and body; - reads stdin")
    parser.add_argument("-o", "--output-file", required=True, metavar="OUTPUT.jsonl",
                        help="results, one line a request in the order they finish; when it exists, the custom_ids it "
                        "holds are skipped and the rest appended (resume); - writes stdout (no resume)")
    add_engine_arguments(parser)
    add_batching_arguments(parser)
    add_vllm_arguments(parser)  # vLLM's run-batch takes the engine flags its serve takes
    parser.set_defaults(func=run_batch, resolve_later=True)  # the input is checked before a Hub download


def json_bytes(value) -> bytes:
    """JSON as the server's responses render it (Starlette's JSONResponse): compact, UTF-8."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def refuse(message: str) -> NoReturn:
    """A bad input or output file: one line, exit 2 (argparse's status for a bad command line), nothing written."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


# ---------------------------------------------------------------------- the input file
@dataclass
class BatchRequest:
    line: int
    custom_id: str
    url: str
    body: dict


def parse_line(number: int, raw: bytes) -> BatchRequest | None:
    """One input line checked as OpenAI checks a batch file (None: a blank line); ValueError says what is wrong. The
    body itself is the server's to check, per request."""
    if not raw.strip():
        return None
    try:
        item = json.loads(raw)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"not JSON ({err})") from None
    if not isinstance(item, dict):
        raise ValueError("not a JSON object")
    custom_id, method, url, body = (item.get(key) for key in ("custom_id", "method", "url", "body"))
    if not isinstance(custom_id, str) or not custom_id:
        raise ValueError("custom_id (a non-empty string) is missing")
    if method != "POST":
        raise ValueError(f"method {method!r}: only POST is supported")
    if url not in URLS:
        raise ValueError(f"url {url!r} is not supported: one of {', '.join(URLS)}")
    if not isinstance(body, dict):
        raise ValueError("body (the request, a JSON object) is missing")
    return BatchRequest(number, custom_id, url, body)


def requests_in(file: IO[bytes]) -> Iterator[BatchRequest]:
    """The requests of an input file already checked by `check_input`, read again a line at a time."""
    file.seek(0)
    for number, raw in enumerate(file, 1):
        if (request := parse_line(number, raw)) is not None:
            yield request


def check_input(file: IO[bytes], name: str) -> dict[str, tuple[str, str | None]]:
    """Every custom_id with its url and the model its body names, the whole file checked before the model loads; a
    bad line: exit 2. Held for every line of a file of any size, so each custom_id shares one (url, model) pair with
    the others of its kind."""
    seen: dict[str, tuple[str, str | None]] = {}
    pairs: dict[tuple[str, str | None], tuple[str, str | None]] = {}
    for number, raw in enumerate(file, 1):
        try:
            request = parse_line(number, raw)
        except ValueError as err:
            refuse(f"{name} line {number}: {err}")
        if request is None:
            continue
        if request.custom_id in seen:
            first = next(r.line for r in requests_in(file) if r.custom_id == request.custom_id)
            refuse(f"{name} line {number}: custom_id {request.custom_id!r} repeats line {first}")
        model = request.body.get("model")
        pair = request.url, model if isinstance(model, str) else None
        seen[request.custom_id] = pairs.setdefault(pair, pair)
    return seen


def open_input(name: str) -> IO[bytes]:
    """The input, to be read twice (checked, then run): stdin is spooled to a temporary file first."""
    if name == "-":
        spool = tempfile.TemporaryFile()
        shutil.copyfileobj(sys.stdin.buffer, spool)
        spool.seek(0)
        return spool
    try:
        return open(name, "rb")
    except OSError as err:
        refuse(f"cannot read {name}: {err.strerror or err}")


# ---------------------------------------------------------------------- the output file
def open_output(name: str) -> IO[bytes]:
    """The output, opened to append before the model loads; a path it cannot write (a missing directory, a
    directory, no permission): exit 2."""
    try:
        return open(name, "ab")
    except OSError as err:
        refuse(f"cannot write {name}: {err.strerror or err}")


def finished_ids(path: Path, known: dict[str, tuple[str, str | None]], input_name: str) -> set[str]:
    """The custom_ids an existing output already holds. A last line without its newline (a crash mid-write) is cut
    off, so its request runs again; any other line that is not a result of this input stops the run (exit 2) rather
    than appending to another file."""
    done: set[str] = set()
    if not path.is_file():  # none yet, or not a file to resume (/dev/stdout, a pipe, /dev/full: never read)
        return done
    end = 0  # where the last whole line ends
    with open(path, "r+b") as file:
        for number, raw in enumerate(file, 1):
            if not raw.endswith(b"\n"):
                print(f"{PROG}: {path} line {number} was cut short (a crash while writing it): dropped, its request "
                      "runs again", file=sys.stderr)
                file.truncate(end)
                break
            end += len(raw)
            if not raw.strip():
                continue
            try:
                custom_id = json.loads(raw)["custom_id"]
            except (ValueError, TypeError, KeyError):
                refuse(f"{path} line {number} is not a batch result line: not appending to it")
            if custom_id not in known:
                refuse(f"{path} line {number}: custom_id {custom_id!r} is not in {input_name} (another batch's "
                       "output?): not appending to it")
            done.add(custom_id)
    return done


def result_line(custom_id: str, status: int, body: bytes) -> bytes:
    """One result in OpenAI's batch output shape, `body` (the server's JSON) embedded as its bytes. A failed request
    is a line like a successful one, its status_code and OpenAI's error body in `response` (as OpenAI's error file);
    `error` is for failures without an HTTP answer, which this runner does not write."""
    head = json_bytes({"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id}).decode()
    return (f'{head[:-1]},"response":{{"status_code":{status},"request_id":"req_{uuid.uuid4().hex}","body":'
            .encode() + body + b'},"error":null}\n')


@dataclass
class Tally:
    """What the summary line and the progress bar report, from the bodies' usage (any of the four APIs' shapes)."""

    ok: int = 0
    failed: int = 0
    prompt: int = 0
    output: int = 0
    cached: int = 0

    def add(self, status: int, body: dict) -> None:
        if status == 200:
            self.ok += 1
        else:
            self.failed += 1
        usage = body.get("usage") or {}
        details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
        cached = details.get("cached_tokens", usage.get("cache_read_input_tokens", 0)) or 0
        prompt = usage.get("prompt_tokens", usage.get("input_tokens", 0)) or 0
        if "cache_read_input_tokens" in usage:  # Anthropic's input_tokens leave out the cache reads
            prompt += cached
        self.prompt += prompt
        self.cached += cached
        self.output += usage.get("completion_tokens", usage.get("output_tokens", 0)) or 0


# ---------------------------------------------------------------------- running the requests
async def call(app, path: str, body: bytes) -> tuple[int, bytes]:
    """POST `body` to `path` of the ASGI `app`, in process: (status, response body). The caller stays connected
    until the response is complete, as a client waiting for it."""
    answered = asyncio.Event()
    sent = False
    status, parts = 500, []

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await answered.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                answered.set()

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 0), "server": ("run-batch", 0)}
    try:
        await app(scope, receive, send)
    except Exception:  # noqa: BLE001 - Starlette re-raises after sending its 500, which is the answer
        if not answered.is_set():
            raise
    return status, b"".join(parts)


async def answer(app, request: BatchRequest) -> tuple[int, bytes, dict]:
    """(status, body bytes, body) of one request; `stream` is refused as vLLM's run-batch refuses it (a 400)."""
    from .protocol import error_body

    CUSTOM_ID.set(request.custom_id)  # this task's own context: the app's warnings are logged inside it
    if request.body.get("stream") is True:
        status, raw = 400, json_bytes(error_body("stream is not supported in a batch", "invalid_request_error",
                                                 "stream"))
    else:
        try:
            status, raw = await call(app, request.url, json.dumps(request.body, ensure_ascii=False).encode())
        except Exception as err:  # noqa: BLE001 - the app's own failure is this request's 500, as the server's
            status, raw = 500, json_bytes(error_body(f"{type(err).__name__}: {err}", "server_error"))
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict):  # no JSON answer (the server would not send one either): a 500 that says so
        status, body = 500, error_body(f"the server answered {status} without a JSON body", "server_error")
        raw = json_bytes(body)
    return status, raw, body


async def run_requests(app, engine, requests: Iterator[BatchRequest], out: IO[bytes], window: int, tally: Tally,
                       bar) -> None:
    """Run `requests` with at most `window` in flight, each result written and flushed as it finishes. A dead
    engine (its 500s are not results: a rerun retries them) or an output that cannot be written (a full disk, a
    closed pipe) stops the run at once with that error; the requests still in flight are cancelled."""
    slots = asyncio.Semaphore(window)
    tasks: set[asyncio.Task] = set()
    failures: list[Exception] = []  # the first stops the run (a task that ended early is no longer gathered)
    start = time.perf_counter()

    async def one(request: BatchRequest) -> None:
        try:
            status, raw, body = await answer(app, request)
            if status >= 500 and not engine.is_running():
                raise RuntimeError(f"the engine stopped: {body.get('error', {}).get('message', body)}")
            out.write(result_line(request.custom_id, status, raw))
            out.flush()
            tally.add(status, body)
            bar.set_postfix_str(f"{tally.output / max(time.perf_counter() - start, 1e-9):.1f} output tok/s",
                                refresh=False)
            bar.update()
        except Exception as err:  # noqa: BLE001 - raised by the loop below, once the others are cancelled
            failures.append(err)
            for task in tasks - {asyncio.current_task()}:
                task.cancel()
        finally:
            slots.release()

    for request in requests:
        await slots.acquire()
        if failures or not engine.is_running():
            break
        task = asyncio.create_task(one(request))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    try:
        await asyncio.gather(*list(tasks))
    except asyncio.CancelledError:  # the tasks cancelled after a failure
        if not failures:
            raise
    if failures:
        raise failures[0]
    if not engine.is_running():
        raise RuntimeError("the engine stopped before the batch finished; a rerun with the same output resumes it")


class FirstOfEachWarning(logging.Filter):
    """The server's per-request warnings in a batch, each distinct one shown once with the custom_id of the request
    that caused it: a field every body sets (the ignored-fields warning) would be a line per request, thousands."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()
        self.hidden = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        message = record.getMessage()
        if message in self.seen:
            self.hidden += 1
            return False
        self.seen.add(message)
        if (custom_id := CUSTOM_ID.get()) is not None:
            record.msg, record.args = f"{message} (custom_id {custom_id!r}; the same warning again is not shown)", ()
        return True


@contextlib.contextmanager
def cleanup_not_interrupted():
    """Ctrl-C pressed again while the run stops does not cut the engine's stop short (its thread went on computing
    as Python exited: 'terminate called without an active exception', exit 134) nor the summary; once more quits
    at once, every finished result being already flushed to the output."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers are the main thread's
        yield
        return
    presses = 0

    def on_interrupt(signum, frame) -> None:
        nonlocal presses
        presses += 1
        if presses > 1:
            os._exit(130)
        print(f"{PROG}: stopping after the engine's step in progress (Ctrl-C again quits at once)", file=sys.stderr,
              flush=True)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------------- the command
def warn_other_models(requests: list[tuple[str, str | None]], served: str) -> None:
    """Before the model loads: requests (url, model) whose body names a model other than the one served fail with
    model_not_found, as at the server and in vLLM's run-batch; a batch written for OpenAI (every body naming
    gpt-4o-mini, say) is told before it runs rather than finding only failures at the end."""
    other = Counter(model for _, model in requests if model is not None and model != served)
    if other:
        names = ", ".join(f"{model!r} ({count:,})" for model, count in other.most_common(3))
        print(f"{PROG}: warning: {sum(other.values()):,} of {len(requests):,} requests name a model other than "
              f"{served!r}, which fail with model_not_found: {names}{', ...' if len(other) > 3 else ''} "
              "(--served-model-name gives the model the name they use)", file=sys.stderr, flush=True)


def run_batch(args: argparse.Namespace) -> None:
    from ..argtypes import resolve_model_flag
    from .server import served_model_name
    from .vllm_flags import check_before_loading

    check_before_loading(args)
    input_name = "stdin" if args.input_file == "-" else args.input_file
    to_stdout = args.output_file == "-"
    if not to_stdout and args.input_file != "-" and Path(args.output_file).resolve() == Path(args.input_file).resolve():
        refuse("the output file is the input file")
    with open_input(args.input_file) as source:
        known = check_input(source, input_name)
        done = set() if to_stdout else finished_ids(Path(args.output_file), known, input_name)
        if done:
            print(f"{PROG}: resuming: {len(done)} of {len(known)} done", file=sys.stderr)
        if len(done) == len(known):
            if not to_stdout:
                open_output(args.output_file).close()  # an empty input still leaves its (empty) output
            print(f"{PROG}: nothing to run ({len(known)} requests, all in {args.output_file})", file=sys.stderr)
            return
        out = sys.stdout.buffer if to_stdout else open_output(args.output_file)
        try:
            args.resolve_later = False
            resolve_model_flag(args)  # after the output opened: a Hub download is not wasted on a path it cannot write
            left = [url_model for custom_id, url_model in known.items() if custom_id not in done]
            warn_other_models(left, served_model_name(args))
            chat = any(url != "/v1/completions" for url, _ in left)
            run_loaded(args, (r for r in requests_in(source) if r.custom_id not in done), out, len(known), len(done),
                       chat)
        finally:
            if not to_stdout:
                out.close()


def run_loaded(args: argparse.Namespace, requests: Iterator[BatchRequest], out: IO[bytes], total: int,
               done: int, needs_chat: bool) -> None:
    """Load the model as `serve` does, then run `requests` through the server's app (`needs_chat`: some of them go
    through the chat template)."""
    from tqdm import tqdm

    from ..info import human_bytes
    from .server import check_kv_bound, load, server_app

    logging.basicConfig(level="WARNING", format=f"{PROG}: %(levelname)s: %(message)s")
    model, tokenizer, engine = load(args, max_running=args.max_running, max_waiting=QUEUE_UNBOUNDED,
                                    kv_cache_bytes=args.kv_cache_memory, seed=args.seed)
    app, config, chat = server_app(args, model, tokenizer, engine, web_ui=False)
    check_kv_bound(engine.kv_budget, config.max_context)
    if chat is None and needs_chat:
        logging.warning("%s has no chat template: its chat, responses and messages requests fail with a 400 "
                        "(--chat-template gives one)", getattr(args, "model_id", args.model))
    budget = engine.kv_budget
    bound = "unbounded" if budget is None else f"{human_bytes(budget.max_bytes)} = {budget.tokens:,} tokens"
    print(f"{PROG}: {config.model_name}, {total - done} requests to run (max {args.max_running} running; K/V "
          f"{bound}; state reuse {'off' if args.no_reuse else 'on'})", file=sys.stderr, flush=True)
    tally = Tally()
    window = WINDOW_PER_ROW * args.max_running
    engine.start()
    start = time.perf_counter()
    bar = tqdm(total=total, initial=done, unit="req", desc="run-batch", dynamic_ncols=True, file=sys.stderr,
               disable=not sys.stderr.isatty())
    warnings, server_log = FirstOfEachWarning(), logging.getLogger("openjamba.serve")
    server_log.addFilter(warnings)
    try:
        asyncio.run(run_requests(app, engine, requests, out, window, tally, bar))
    finally:
        with cleanup_not_interrupted():
            server_log.removeFilter(warnings)
            bar.close()
            engine.stop()
            seconds = time.perf_counter() - start
            if warnings.hidden:
                print(f"{PROG}: {warnings.hidden:,} repeated warnings not shown", file=sys.stderr)
            print(f"{PROG}: {tally.ok} ok, {tally.failed} failed of {tally.ok + tally.failed} requests in "
                  f"{seconds:.1f} s; {tally.prompt:,} prompt tokens ({tally.cached:,} cached), {tally.output:,} "
                  f"output tokens ({tally.output / max(seconds, 1e-9):.1f}/s)", file=sys.stderr, flush=True)
