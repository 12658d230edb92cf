"""The OpenAI-compatible HTTP API over one `Engine`: routes, validation, errors, SSE streaming, metrics.

Every request becomes one engine request per choice (prompt x n). The engine thread reports tokens through
`on_event`; each HTTP request owns an inbox that those callbacks feed, so the event loop never blocks on
the model. The callbacks only buffer their events (`EventRelay`); after each engine step the buffered events are
handed to the event loop with one `call_soon_threadsafe`, so 16 streams wake the loop once per step, not 16 times
(each wake-up is a write to the loop's pipe, and on a two-core machine every one of them competes with the model's
compute threads for a core and with the engine's thread for the GIL). Text is decoded incrementally here, where
stop strings are matched: a stop string found in the decoded text ends the choice and cancels its engine request,
and streamed text holds back any tail that could still become a stop string. A client that goes away (a closed
stream, or a dropped connection while a non-streaming request waits) has its engine requests cancelled, which frees
their rows.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import protocol as p
from .engine import EngineFull, FinishEvent, SamplingParams, TokenEvent
from .metrics import prometheus_text
from .sse import sse

log = logging.getLogger("openjamba.serve")


@dataclass
class ServerConfig:
    model_name: str
    max_context: int
    vocab_size: int
    api_key: str | None = None
    default_max_tokens: int = 16  # completions, as OpenAI; chat defaults to the rest of the context
    sampling_defaults: dict[str, float] = field(default_factory=dict)  # for fields a request leaves out
    allowed_origins: list[str] = field(default_factory=list)  # browser origins answered with CORS headers
    max_stored_responses: int = 1000  # /v1/responses kept for previous_response_id and GET (least recent dropped)
    web_ui: bool = True  # the chat page at / (serve/web.py)


class _Rejected(Exception):
    def __init__(self, status: int, body: dict, headers: dict | None = None) -> None:
        self.status, self.body, self.headers = status, body, headers


def check_key(request: Request, config: ServerConfig) -> None:
    """401 unless the request carries `Authorization: Bearer KEY` or, as the anthropic client sends it,
    `x-api-key: KEY` (when the server has a key)."""
    if config.api_key is not None and request.headers.get("authorization", "") != f"Bearer {config.api_key}" \
            and request.headers.get("x-api-key") != config.api_key:
        raise _Rejected(401, p.error_body("invalid or missing API key (Authorization: Bearer KEY, or x-api-key: "
                                          "KEY)", "invalid_request_error", code="invalid_api_key"))


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
           code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(p.error_body(message, kind, param, code), status_code=status, headers=headers)


# ---------------------------------------------------------------------- one choice's decoding
@dataclass
class Choice:
    """One engine request: its tokens, the text decoded so far, stop strings, logprobs and finish reason."""

    index: int
    prompt_index: int
    decode: Callable[[list[int]], str]
    stops: list[str]
    hidden_ids: frozenset[int]  # EOS and stop token ids: counted, never shown as text
    request_id: Any = None
    ended: bool = False  # the engine has reported its end
    ids: list[int] = field(default_factory=list)
    text: str = ""  # final text up to `emitted` (stop strings cut off)
    emitted: int = 0
    anchor: int | None = None  # a token that decodes to a plain letter (`Tokenizer.anchor_token`); None: decode all
    decoded: str = ""  # the text of ids[:read], built a few tokens at a time (`_decoded_after`)
    read: int = 0
    anchor_text: str | None = None  # decode([anchor]), once
    finish_reason: str | None = None
    stop_string: str | None = None  # the stop string that ended the choice
    keep_stop: bool = False  # the stop string stays at the end of the text (vLLM's include_stop_str_in_output)
    logprobs: list[tuple[int, float | None, list[tuple[int, float]] | None]] = field(default_factory=list)
    prompt_logprobs: list | None = None  # (logprob, top) of prompt tokens 1.., from the first token's event
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def add(self, event: TokenEvent) -> str:
        """Record a token; returns the text now safe to show (maybe empty)."""
        self.cached_tokens = event.cached_tokens
        if event.prompt_logprobs is not None:
            self.prompt_logprobs = event.prompt_logprobs
        if self.finish_reason is not None:
            return ""
        self.completion_tokens += 1
        self.logprobs.append((event.token_id, event.logprob, event.top_logprobs))
        if event.token_id in self.hidden_ids:
            return ""
        self.ids.append(event.token_id)
        full = self._decoded_after()
        if full is None:  # an incomplete multi-byte character: wait for the next token
            return ""
        for stop in self.stops:
            at = full.find(stop, max(0, self.emitted - len(stop) + 1))
            if at != -1:
                self.finish_reason, self.stop_string = "stop", stop
                return self._emit(full[:at + len(stop) * self.keep_stop])
        return self._emit(full[: len(full) - _held_back(full, self.stops)])

    def finish(self, event: FinishEvent) -> str:
        """The engine's end of this choice; returns the remaining text."""
        self.prompt_tokens, self.cached_tokens = event.prompt_tokens, event.cached_tokens
        self.completion_tokens = max(self.completion_tokens, event.completion_tokens)
        if self.finish_reason is not None:  # already ended by a stop string
            return ""
        self.finish_reason = {"length": "length", "error": "error", "abort": "abort"}.get(event.reason, "stop")
        return self._emit(self.decode(self.ids))

    def _decoded_after(self) -> str | None:
        """The text of all ids, None while it ends inside a multi-byte character. Decoding all ids again for every
        token costs O(length) per token, so with an `anchor` token only the tokens since the last complete text
        are decoded, after the anchor (a plain letter: so a tokenizer does not drop their leading space as the start
        of a text, and a skipped special token among them cannot make another token the first). Where that is not
        an extension of the anchor's text, or holds bytes that are no UTF-8 (they decode differently without their
        context), all ids are decoded again."""
        if self.anchor is None or not self.decoded:  # the text's first characters: as a text starts
            full = self.decode(self.ids)
            if full.endswith("\ufffd"):
                return None
            self.decoded, self.read = full, len(self.ids)
            return full
        if self.anchor_text is None:
            self.anchor_text = self.decode([self.anchor])
        head = self.anchor_text
        window = self.decode([self.anchor] + self.ids[self.read:])
        if window.endswith("\ufffd"):
            return None
        if "\ufffd" not in window and window.startswith(head):
            self.decoded += window[len(head):]
        else:
            self.decoded = self.decode(self.ids)
        self.read = len(self.ids)
        return self.decoded

    def _emit(self, text: str) -> str:
        delta = text[self.emitted:]
        self.text, self.emitted = text, len(text)
        return delta


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


# ---------------------------------------------------------------------- the bridge to the engine
class EventRelay:
    """Carries engine events from the engine thread to the event loops of their HTTP requests, one wake-up of a loop
    per engine step: `post` buffers, and the engine's step listener (`Engine.add_step_listener`) schedules one
    `_deliver` per loop with something buffered. With an engine without step listeners every event is scheduled at
    once."""

    def __init__(self, engine) -> None:
        self._lock = threading.Lock()
        self._pending: dict[asyncio.AbstractEventLoop, list[tuple[Submission, Any]]] = {}
        self._per_step = hasattr(engine, "add_step_listener")
        if self._per_step:
            engine.add_step_listener(self.flush)

    def post(self, loop: asyncio.AbstractEventLoop, submission: Submission, event) -> None:  # on the engine thread
        with self._lock:
            self._pending.setdefault(loop, []).append((submission, event))
        if not self._per_step:
            self.flush()

    def flush(self) -> None:
        """Schedule the delivery of everything buffered (on the engine thread, after a step)."""
        with self._lock:
            loops, self._pending = list(self._pending.items()), {}
        for loop, events in loops:
            try:
                loop.call_soon_threadsafe(_deliver, events)
            except RuntimeError:  # the event loop has closed (server shutting down)
                pass


def _deliver(events: list[tuple[Submission, Any]]) -> None:
    for submission, event in events:
        submission.receive(event)


class Submission:
    """The engine requests of one HTTP request, with the inbox their events arrive in (on the event loop)."""

    def __init__(self, engine, relay: EventRelay, choices: list[Choice]) -> None:
        self.engine = engine
        self.relay = relay
        self.choices = choices
        self.by_id: dict[Any, Choice] = {}
        self.loop = asyncio.get_running_loop()
        self._inbox: deque = deque()
        self._waiter: asyncio.Future | None = None  # set while `events` waits for the inbox

    def _on_event(self, event) -> None:  # called on the engine thread
        self.relay.post(self.loop, self, event)

    def receive(self, event) -> None:
        """Buffer an event (on the event loop) and wake `events` if it waits."""
        self._inbox.append(event)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    @property
    def buffered(self) -> bool:
        """Whether events have arrived that `events` has not read yet (so a response can send the chunks of one
        engine step together)."""
        return bool(self._inbox)

    def submit(self, prompts: list[list[int]], params: list[SamplingParams], keep_states_at: list[int] = ()) -> None:
        """Submit every choice; `keep_states_at`: prompt positions whose state the engine should keep."""
        extra = {"keep_states_at": keep_states_at} if keep_states_at else {}
        try:
            for choice, param in zip(self.choices, params):
                choice.request_id = self.engine.submit(prompts[choice.prompt_index], param, self._on_event, **extra)
                self.by_id[choice.request_id] = choice
        except EngineFull as full:
            self.cancel()
            retry = max(1, math.ceil(full.retry_after))
            raise _Rejected(429, p.error_body("the server is at capacity; retry later", "rate_limit_error",
                                              code="rate_limit_exceeded"), {"Retry-After": str(retry)}) from None
        except ValueError as err:
            self.cancel()
            raise _Rejected(400, p.error_body(str(err), "invalid_request_error")) from None

    def cancel(self) -> None:
        """Cancel every engine request that has not finished (idempotent)."""
        for choice in self.choices:
            if choice.request_id is not None and not choice.ended:
                self.engine.cancel(choice.request_id)
                choice.ended = True

    async def events(self, request: Request | None) -> AsyncIterator[tuple[Choice, str, bool]]:
        """(choice, new text, choice ended) as tokens arrive; polls for a client disconnect when `request` (a
        streaming response learns of it from its ASGI server instead)."""
        open_ids = set(self.by_id)
        inbox = self._inbox
        while open_ids:
            while not inbox:
                await self._arrival(request)
            event = inbox.popleft()
            choice = self.by_id.get(event.request_id)
            if choice is None or event.request_id not in open_ids:
                continue
            if isinstance(event, FinishEvent):
                if event.reason == "error":
                    raise RuntimeError(event.error or "the engine failed on this request")
                open_ids.discard(event.request_id)
                choice.ended = True
                yield choice, choice.finish(event), True
            else:
                was_open = choice.finish_reason is None
                delta = choice.add(event)
                if was_open and choice.finish_reason is not None:  # a stop string: the engine can stop now
                    self.engine.cancel(choice.request_id)
                yield choice, delta, False

    async def _arrival(self, request: Request | None) -> None:
        """Wait for `receive`; with `request`, check every 0.5 s whether its client has gone."""
        waiter = self._waiter = self.loop.create_future()
        try:
            if request is None:
                await waiter
                return
            try:
                await asyncio.wait_for(waiter, timeout=0.5)
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                if await request.is_disconnected():
                    raise ConnectionAbortedError("client disconnected") from None
        finally:
            self._waiter = None

    def usage(self) -> dict:
        """Prompt tokens counted once per prompt (as OpenAI does for n > 1); cached tokens from its first choice."""
        firsts = {}
        for choice in self.choices:
            firsts.setdefault(choice.prompt_index, choice)
        return p.usage(sum(c.prompt_tokens for c in firsts.values()),
                       sum(c.completion_tokens for c in self.choices),
                       sum(c.cached_tokens for c in firsts.values()))


def sampling_params(req, max_tokens: int, index: int, logprobs: int | None,
                    defaults: dict[str, float], constraint=None) -> SamplingParams:
    """The engine's settings for choice `index`: the request's fields, else `defaults` (the checkpoint's
    generation_config.json), else OpenAI's (temperature 1, top_p 1) and the neutral values. `constraint`: the
    factory of the row's output constraint (JSON mode)."""
    def value(name: str, neutral: float) -> float:
        given = getattr(req, name)
        return given if given is not None else defaults.get(name, neutral)

    top_k = value("top_k", 0)
    seed = None if req.seed is None else req.seed + index  # n choices differ, each reproducible
    return SamplingParams(
        max_tokens=max_tokens, temperature=value("temperature", 1.0), top_p=value("top_p", 1.0),
        top_k=top_k if top_k > 0 else 0, min_p=value("min_p", 0.0), seed=seed, ignore_eos=req.ignore_eos,
        logprobs=logprobs, presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=value("repetition_penalty", 1.0),
        logit_bias={int(token): bias for token, bias in (req.logit_bias or {}).items()},
        stop_token_ids=list(req.stop_token_ids or []), min_tokens=req.min_tokens, constraint=constraint,
    )


# ---------------------------------------------------------------------- the app
def create_app(engine, tokenizer, config: ServerConfig, chat=None) -> FastAPI:
    """The FastAPI app serving `engine` (already started; the caller stops it). `chat` renders and parses chat
    turns (`ChatFormat`); None serves completions only."""
    from .routes import add_routes

    app = FastAPI(title="openjamba", docs_url=None, redoc_url=None, openapi_url=None)
    if config.allowed_origins:  # a web page on another origin (a browser chat UI) may call the API
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=config.allowed_origins,
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["*"])
    created = p.now()
    relay = EventRelay(engine)

    @app.exception_handler(Exception)
    async def _crash(request: Request, err: Exception):
        log.error("request failed: %s %s", request.method, request.url.path, exc_info=err)
        return error_response(500, "internal server error", "server_error")

    @app.exception_handler(_Rejected)
    async def _rejected(request: Request, rejected: _Rejected):
        return JSONResponse(rejected.body, rejected.status, headers=rejected.headers)

    @app.exception_handler(p.RequestError)
    async def _invalid(request: Request, err: p.RequestError):
        return error_response(err.status, err.message, param=err.param, code=err.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):
        """An unknown path or a wrong method (its Allow header kept), in Anthropic's shape under /v1/messages."""
        path = request.url.path
        if path == "/v1/messages" or path.startswith("/v1/messages/"):
            from .messages import error_response as anthropic_error

            return anthropic_error(err.status_code, str(err.detail), err.headers)
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return error_response(err.status_code, str(err.detail), kind, headers=err.headers)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        """200 while the engine's loop serves, else 503 (a load balancer then routes elsewhere); HEAD too, as
        uptime monitors send it."""
        if not engine.is_running():
            return JSONResponse({"status": "the engine has stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(engine.stats()), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request, config)
        return {"object": "list", "data": [p.model_card(config.model_name, created, config.max_context)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str):
        check_key(request, config)
        if model_id != config.model_name:
            return error_response(404, f"the model {model_id!r} does not exist; this server serves "
                                  f"{config.model_name!r}", "not_found_error", param="model", code="model_not_found")
        return p.model_card(config.model_name, created, config.max_context)

    add_routes(app, engine, relay, tokenizer, config, chat)
    if config.web_ui:
        from .web import add_web_routes

        add_web_routes(app)
    return app


def openai_error_event(message: str) -> bytes:
    return sse(p.error_body(message, "server_error"))


async def stream_body(submission: Submission, chunks: AsyncIterator[bytes | dict], encode: Callable = sse,
                      error_event: Callable[[str], bytes] = openai_error_event,
                      done: bytes = sse("[DONE]")) -> AsyncIterator[bytes]:
    """SSE bytes from `chunks` (events as bytes, or dicts to `encode`); an engine error becomes `error_event`;
    `done` (OpenAI's `[DONE]`) always ends the stream; the engine requests are cancelled however the stream ends
    (the client closing it included). Chunks made while more events wait in the submission's inbox (n choices, or a
    backlog) are held and sent with the last of them: one write to the socket for them all."""
    held: list[bytes] = []
    try:
        async for chunk in chunks:
            held.append(chunk if type(chunk) is bytes else encode(chunk))
            if not submission.buffered:
                yield b"".join(held)
                held.clear()
    except RuntimeError as err:
        held.append(error_event(str(err)))
    finally:
        submission.cancel()
    held.append(done)
    yield b"".join(held)


def streaming_response(submission: Submission, chunks: AsyncIterator[bytes | dict], **body) -> StreamingResponse:
    """`body`: stream_body's encode, error_event and done (another API's events)."""
    return StreamingResponse(stream_body(submission, chunks, **body), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
