"""`POST /v1/messages` and `POST /v1/messages/count_tokens`: Anthropic's Messages API, for clients written against
the anthropic SDK.

A request is translated into a chat completions request (`messages_protocol.chat_request`) and started by the chat
route's own `start_chat`: the same template, tool-call enforcement and engine. Its output text is split by the chat
format's parser into reasoning, text and tool calls, which become `thinking`, `text` and `tool_use` content blocks;
streamed, the parser's deltas open, extend and close those blocks as Anthropic's events (`BlockStream`). Usage
counts the prompt tokens the engine's state store reused as `cache_read_input_tokens` and the rest as
`input_tokens`, as Anthropic counts cache reads; a stream's `message_start` carries them too, so it waits for the
engine's first event (the first token), which reports the reuse. Errors have Anthropic's shape, `{"type": "error",
"error": {"type", "message"}}`, with the status the chat route gives (an unknown model: 404).
"""

from __future__ import annotations

import functools
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from . import protocol as p
from .api import Choice, ServerConfig, _Rejected, check_key, streaming_response
from .messages_protocol import CountTokensRequest, MessagesRequest, chat_request
from .sse import dumps

log = logging.getLogger("openjamba.serve")
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large", 429: "rate_limit_error",
               529: "overloaded_error"}


def error_body(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message), status_code=status, headers=headers)


def event_bytes(event: dict) -> bytes:
    """One server-sent event as Anthropic writes it: its type as the event name, then the event as JSON."""
    return f"event: {event['type']}\ndata: {dumps(event)}\n\n".encode()


def error_event(message: str) -> bytes:
    return event_bytes(error_body(500, message))


def anthropic_errors(handler):
    """The route's errors in Anthropic's shape: an invalid request, a missing key or a full queue with its status,
    anything unexpected a 500 without its traceback (which goes to the log)."""
    @functools.wraps(handler)
    async def answer(request: Request):
        try:
            return await handler(request)
        except p.RequestError as err:
            return error_response(err.status, err.message)
        except _Rejected as rejected:
            return error_response(rejected.status, rejected.body["error"]["message"], rejected.headers)
        except Exception as err:
            log.error("request failed: %s %s", request.method, request.url.path, exc_info=err)
            return error_response(500, "internal server error")
    return answer


def add_message_routes(app: FastAPI, config: ServerConfig, chat, start_chat, render, run) -> None:
    def check_model(name: str) -> None:
        if name != config.model_name:
            raise p.RequestError(f"model: the model {name!r} does not exist; this server serves "
                                 f"{config.model_name!r}", status=404)

    @app.post("/v1/messages")
    @anthropic_errors
    async def create_message(request: Request):
        check_key(request, config)
        req = p.parse_request(await request.body(), MessagesRequest)
        check_model(req.model)
        creq = chat_request(req)
        submission, ids, parse_tools = await start_chat(creq)
        choice = submission.choices[0]
        mid = f"msg_{uuid.uuid4().hex}"

        def message(content: list[dict], reason: tuple[str | None, str | None], usage: dict) -> dict:
            return {"id": mid, "type": "message", "role": "assistant", "model": config.model_name,
                    "content": content, "stop_reason": reason[0], "stop_sequence": reason[1], "usage": usage}

        if req.stream:
            def message_start() -> dict:
                """Sent with the first event, which says how much of the prompt the state store served."""
                cached = choice.cached_tokens
                return {"type": "message_start", "message": message([], (None, None), {
                    "input_tokens": len(ids) - cached, "output_tokens": 0, "cache_read_input_tokens": cached,
                    "cache_creation_input_tokens": 0})}

            async def events() -> AsyncIterator[dict]:
                parser = chat.stream_parser(ids, parse_tools, creq.json_mode, stream_tool_calls=True)
                blocks = BlockStream()
                started = False
                async for _, delta, ended in submission.events(None):
                    if not started:
                        started = True
                        yield message_start()
                    for event in blocks.parts(parser.feed(delta) if delta else []):
                        yield event
                    if not ended:
                        continue
                    tail = parser.flush()
                    if not parser.finish().tool_calls:  # the calls begun were not valid after all
                        for event in blocks.abandon_calls():
                            yield event
                    for event in blocks.parts(tail):
                        yield event
                for event in blocks.finish():
                    yield event
                reason = stop_reason(choice, bool(parser.finish().tool_calls))
                yield {"type": "message_delta", "delta": {"stop_reason": reason[0], "stop_sequence": reason[1]},
                       "usage": usage_of(submission.usage())}
                yield {"type": "message_stop"}
            return streaming_response(submission, events(), encode=event_bytes, error_event=error_event, done=b"")

        if (failed := await run(request, submission)) is not None:
            return failed if failed.status_code == 499 else _reshaped(failed)
        out = chat.parse(choice.text, ids, tools=parse_tools, plain=creq.json_mode)
        content = content_blocks(out.reasoning_content, out.content, out.tool_calls)
        return JSONResponse(message(content, stop_reason(choice, bool(out.tool_calls)), usage_of(submission.usage())))

    @app.post("/v1/messages/count_tokens")
    @anthropic_errors
    async def count_tokens(request: Request):
        check_key(request, config)
        req = p.parse_request(await request.body(), CountTokensRequest)
        check_model(req.model)
        return {"input_tokens": len(render(chat_request(req))[2])}


def _reshaped(response: Response) -> JSONResponse:
    """An error response of the chat route's (OpenAI's shape) in Anthropic's."""
    return error_response(response.status_code, json.loads(response.body)["error"]["message"])


def stop_reason(choice: Choice, called: bool) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) of a finished choice; `called`: its output holds tool calls."""
    if called:
        return "tool_use", None
    if choice.finish_reason == "length":
        return "max_tokens", None
    if choice.stop_string is not None:
        return "stop_sequence", choice.stop_string
    return "end_turn", None


def usage_of(chat_usage: dict) -> dict:
    """The chat usage in Anthropic's shape: reused prompt tokens are cache reads, the rest input tokens."""
    cached = chat_usage["prompt_tokens_details"]["cached_tokens"]
    return {"input_tokens": chat_usage["prompt_tokens"] - cached, "output_tokens": chat_usage["completion_tokens"],
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


def tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def tool_input(arguments: str) -> dict[str, Any]:
    """A call's arguments as a tool_use block's input: the JSON object the model wrote ({} for anything else)."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def content_blocks(reasoning: str | None, text: str | None, calls: list[dict]) -> list[dict]:
    """A reply's content: its thinking, its text, its calls (no block for what is empty)."""
    blocks: list[dict] = [{"type": "thinking", "thinking": reasoning, "signature": ""}] if reasoning else []
    if text:
        blocks.append({"type": "text", "text": text})
    return blocks + [{"type": "tool_use", "id": tool_use_id(c["id"]), "name": c["function"]["name"],
                      "input": tool_input(c["function"]["arguments"])} for c in calls]


class BlockStream:
    """The streamed content blocks: the chat parser's reasoning and content deltas open, extend and close a
    thinking block and a text block; its tool-call deltas open a tool_use block once the call's name is known,
    stream its arguments as input_json_delta and close it when the call's JSON ends. One block is open at a time,
    as Anthropic streams them."""

    def __init__(self) -> None:
        self.kinds: list[str] = []  # the type of each block begun, by index
        self.open: int | None = None  # the thinking or text block receiving deltas
        self.calls: dict[int, int] = {}  # the open tool_use blocks, by the call's index in the reply

    def parts(self, parts: list[dict]) -> list[dict]:
        return [event for part in parts for event in self.part(part)]

    def part(self, part: dict) -> list[dict]:
        if "tool_call" in part:
            return self._call(part["tool_call"])
        kind = "thinking" if "reasoning_content" in part else "text"
        events = []
        if self.open is None or self.kinds[self.open] != kind:
            events = self._close() + self._start({"type": kind, kind: "", **({"signature": ""} if kind ==
                                                                             "thinking" else {})})
            self.open = len(self.kinds) - 1
        delta = part.get("reasoning_content", part.get("content"))
        return events + [{"type": "content_block_delta", "index": self.open,
                          "delta": {"type": f"{kind}_delta", kind: delta}}]

    def _call(self, call) -> list[dict]:
        """One step of a streamed call (a `ToolCallDelta`): its start, a fragment of its arguments, or its end."""
        if call.id is not None:
            events = self._close() + self._start({"type": "tool_use", "id": tool_use_id(call.id),
                                                  "name": call.name, "input": {}})
            self.calls[call.index] = len(self.kinds) - 1
            return events
        index = self.calls[call.index]
        if call.arguments:
            return [{"type": "content_block_delta", "index": index,
                     "delta": {"type": "input_json_delta", "partial_json": call.arguments}}]
        del self.calls[call.index]
        return [{"type": "content_block_stop", "index": index}]

    def _start(self, block: dict) -> list[dict]:
        self.kinds.append(block["type"])
        return [{"type": "content_block_start", "index": len(self.kinds) - 1, "content_block": block}]

    def _close(self) -> list[dict]:
        index, self.open = self.open, None
        return [] if index is None else [{"type": "content_block_stop", "index": index}]

    def abandon_calls(self) -> list[dict]:
        """The tool-call text turned out malformed (it comes as text next, as without streaming): the tool_use
        blocks still open are closed where they stand."""
        events = [{"type": "content_block_stop", "index": index} for index in self.calls.values()]
        self.calls.clear()
        return events

    def finish(self) -> list[dict]:
        return self._close() + self.abandon_calls()
