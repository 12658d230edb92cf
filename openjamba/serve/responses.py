"""`POST /v1/responses` (OpenAI's Responses API, the subset a text chat or a function-calling agent needs),
`GET` and `DELETE /v1/responses/{id}`.

A request is translated into a chat completions request (`responses_protocol.chat_request`) and started by the
chat route's own `start_chat`: the same template, tool-call enforcement, JSON mode and engine. Its output text is
split by the chat format's parser into reasoning, text and tool calls, which become `reasoning`, `message` and
`function_call` output items. Stored responses (`store`, the default) keep their whole conversation as chat
messages, so a follow-up that names `previous_response_id` sends only its new input: the conversation is rendered
again through the template, and the engine's state store reuses the computed history (`cached_tokens`).
"""

from __future__ import annotations

import copy
import itertools
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from . import protocol as p
from .api import ServerConfig, check_key, streaming_response
from .responses_protocol import ResponsesRequest, chat_request, input_messages


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseStore:
    """Stored responses with their conversations (chat messages, instructions excluded: OpenAI does not carry
    them over), the least recently used dropped beyond `capacity`."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: OrderedDict[str, tuple[dict, list[dict]]] = OrderedDict()

    def put(self, response: dict, history: list[dict]) -> None:
        if self.capacity < 1:
            return
        self.entries[response["id"]] = (response, history)
        self.entries.move_to_end(response["id"])
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)

    def get(self, rid: str, param: str | None = None) -> tuple[dict, list[dict]]:
        entry = self.entries.get(rid)
        if entry is None:
            raise p.RequestError(f"no stored response with id {rid!r}", param=param,
                                 code="previous_response_not_found" if param else "response_not_found", status=404)
        self.entries.move_to_end(rid)
        return entry

    def delete(self, rid: str) -> None:
        self.get(rid)
        del self.entries[rid]


def add_response_routes(app: FastAPI, config: ServerConfig, chat, tokenizer, start_chat, run, check_model) -> None:
    store = ResponseStore(config.max_stored_responses)

    @app.post("/v1/responses")
    async def create_response(request: Request):
        check_key(request, config)
        req = p.parse_request(await request.body(), ResponsesRequest)
        check_model(req.model)
        history = store.get(req.previous_response_id, "previous_response_id")[1] if req.previous_response_id else []
        conversation = history + input_messages(req)
        system = [{"role": "system", "content": req.instructions}] if req.instructions is not None else []
        creq = chat_request(req, system + conversation)
        submission, ids, parse_tools = await start_chat(creq)
        choice = submission.choices[0]
        rid, created = new_id("resp"), p.now()

        def response(status: str, output: list[dict], usage: dict | None) -> dict:
            return {"id": rid, "object": "response", "created_at": created, "status": status, "error": None,
                    "incomplete_details": None if status != "incomplete" else {  # abort: the server shut down
                        "reason": "max_output_tokens" if choice.finish_reason == "length" else "server_shutdown"},
                    "model": config.model_name, "output": output, "usage": usage, **req.echo()}

        def finished(items: list[dict], abandoned: tuple[dict, ...] = ()) -> dict:
            """The final response (stored when asked for). `abandoned`: streamed calls that turned out malformed,
            which stay "incomplete" and out of the stored conversation (their text is the message's)."""
            status = "incomplete" if choice.finish_reason in ("length", "abort") else "completed"
            for item in items:
                item["status"] = "incomplete" if any(item is a for a in abandoned) else status
            final = response(status, items, usage_of(submission.usage(), items, tokenizer))
            if req.store:
                kept = [i for i in items if not any(i is a for a in abandoned)]
                store.put(final, conversation + [assistant_message(kept)])
            return final

        if req.stream:
            async def events() -> AsyncIterator[dict]:
                sequence = itertools.count()

                def event(kind: str, **fields) -> dict:
                    return {"type": kind, "sequence_number": next(sequence), **fields}

                yield event("response.created", response=response("in_progress", [], None))
                yield event("response.in_progress", response=response("in_progress", [], None))
                parser = chat.stream_parser(ids, parse_tools, creq.json_mode, stream_tool_calls=True)
                items = ItemStream(event)
                async for _, delta, ended in submission.events(None):
                    parts = parser.feed(delta) if delta else []
                    tail = parser.flush() if ended else []
                    for e in (e for part in parts for e in items.part(part)):
                        yield e
                    if ended and not parser.finish().tool_calls:  # the calls begun were not valid after all
                        for e in items.abandon_calls():
                            yield e
                    for e in (e for part in tail for e in items.part(part)):
                        yield e
                for e in items.finish("incomplete" if choice.finish_reason in ("length", "abort") else "completed"):
                    yield e
                final = finished(items.items, tuple(items.abandoned))
                yield event("response.completed" if final["status"] == "completed" else "response.incomplete",
                            response=final)
            return streaming_response(submission, events())

        if (failed := await run(request, submission)) is not None:
            return failed
        out = chat.parse(choice.text, ids, tools=parse_tools, plain=creq.json_mode)
        return JSONResponse(finished(output_items(out.reasoning_content, out.content, out.tool_calls)))

    @app.get("/v1/responses/{rid}")
    async def get_response(request: Request, rid: str):
        check_key(request, config)
        return store.get(rid)[0]

    @app.delete("/v1/responses/{rid}")
    async def delete_response(request: Request, rid: str):
        check_key(request, config)
        store.delete(rid)
        return {"id": rid, "object": "response", "deleted": True}


# ---------------------------------------------------------------------- output items
def reasoning_item(text: str) -> dict:
    return {"type": "reasoning", "id": new_id("rs"), "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], "status": "in_progress"}


def message_item(text: str | None) -> dict:
    content = [] if text is None else [output_text(text)]
    return {"type": "message", "id": new_id("msg"), "status": "in_progress", "role": "assistant", "content": content}


def output_text(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def function_call_item(call: dict) -> dict:
    return {"type": "function_call", "id": new_id("fc"), "call_id": call["id"], "name": call["function"]["name"],
            "arguments": call["function"]["arguments"], "status": "in_progress"}


def output_items(reasoning: str | None, text: str | None, calls: list[dict]) -> list[dict]:
    """A reply's output items: its thinking, its text (an empty one when there is nothing else), its calls."""
    items = [reasoning_item(reasoning)] if reasoning else []
    if text or not calls:
        items.append(message_item(text or ""))
    return items + [function_call_item(call) for call in calls]


def assistant_message(items: list[dict]) -> dict:
    """A response's output as the chat message a conversation's history holds (its reasoning as
    reasoning_content, which templates keep or drop)."""
    message: dict[str, Any] = {"role": "assistant", "content": ""}
    for item in items:
        if item["type"] == "message":
            message["content"] += "".join(part["text"] for part in item["content"])
        elif item["type"] == "reasoning":
            message["reasoning_content"] = item["content"][0]["text"]
        else:
            message.setdefault("tool_calls", []).append({"id": item["call_id"], "type": "function", "function": {
                "name": item["name"], "arguments": item["arguments"]}})
    return message


def usage_of(chat_usage: dict, items: list[dict], tokenizer) -> dict:
    """The chat usage in the Responses shape; reasoning tokens counted by encoding the reasoning text again."""
    reasoning = "".join(i["content"][0]["text"] for i in items if i["type"] == "reasoning")
    reasoning_tokens = len(tokenizer.encode(reasoning, add_special_tokens=False)) if reasoning else 0
    return {"input_tokens": chat_usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": chat_usage["prompt_tokens_details"]["cached_tokens"],
                                     "cache_write_tokens": 0},  # the SDK requires it; no cache writes are billed
            "output_tokens": chat_usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": min(reasoning_tokens, chat_usage["completion_tokens"])},
            "total_tokens": chat_usage["total_tokens"]}


class ItemStream:
    """The streamed output items: the chat parser's reasoning and content deltas open, extend and close a reasoning
    item and a message item; its tool-call deltas open a function_call item once the call's name is known, extend
    its arguments as they are written and close it when the call's JSON ends. `items` ends as the final response's
    output, the same texts the deltas joined."""

    def __init__(self, event) -> None:
        self.event = event
        self.items: list[dict] = []
        self.open: dict | None = None  # the reasoning or message item receiving deltas
        self.calls: dict[int, dict] = {}  # the function_call items, by the call's index in the reply
        self.abandoned: list[dict] = []  # function_call items of tool text that turned out malformed

    def _where(self, item: dict) -> dict:
        return {"item_id": item["id"], "output_index": self.items.index(item)}

    def part(self, part: dict) -> list[dict]:
        if "tool_call" in part:
            return self._call(part["tool_call"])
        kind = "reasoning" if "reasoning_content" in part else "message"
        events = [] if self.open is not None and self.open["type"] == kind else self._close() + self._start(kind)
        delta = part.get("reasoning_content", part.get("content"))
        self.open["content"][0]["text"] += delta
        name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        extra = {} if kind == "reasoning" else {"logprobs": []}
        return events + [self.event(name, **self._where(self.open), content_index=0, delta=delta, **extra)]

    def _call(self, call) -> list[dict]:
        """One step of a streamed call (a `ToolCallDelta`): its start, a fragment of its arguments, or its end."""
        if call.id is not None:
            events = self._close()
            item = function_call_item({"id": call.id, "function": {"name": call.name, "arguments": ""}})
            self.items.append(item)
            self.calls[call.index] = item
            return events + [self.event("response.output_item.added", output_index=len(self.items) - 1,
                                        item=dict(item))]
        item = self.calls[call.index]
        if call.arguments:
            item["arguments"] += call.arguments
            return [self.event("response.function_call_arguments.delta", **self._where(item),
                               delta=call.arguments)]
        item["status"] = "completed"
        return [self.event("response.function_call_arguments.done", **self._where(item),
                           arguments=item["arguments"], name=item["name"]),
                self.event("response.output_item.done", output_index=self.items.index(item), item=dict(item))]

    def abandon_calls(self) -> list[dict]:
        """The tool-call text turned out malformed (it comes as a message's text, as without streaming): the
        function_call items begun are closed as incomplete (they keep their output index: clients such as the
        SDK's stream accumulator hold items by it) and listed in `abandoned`."""
        events = []
        for item in self.calls.values():
            if item["status"] != "completed":
                item["status"] = "incomplete"
                events.append(self.event("response.output_item.done", output_index=self.items.index(item),
                                         item=dict(item)))
            self.abandoned.append(item)
        self.calls.clear()
        return events

    def _start(self, kind: str) -> list[dict]:
        item = reasoning_item("") if kind == "reasoning" else message_item("")
        self.items.append(item)
        self.open = item
        added = self.event("response.output_item.added", output_index=len(self.items) - 1,
                           item={**copy.deepcopy(item), **({"content": []} if kind == "message" else {})})
        if kind == "reasoning":
            return [added]
        return [added, self.event("response.content_part.added", **self._where(item), content_index=0,
                                  part=output_text(""))]

    def _close(self, status: str = "completed") -> list[dict]:
        item, self.open = self.open, None
        if item is None:
            return []
        item["status"] = status
        text = item["content"][0]["text"]
        if item["type"] == "reasoning":
            done = [self.event("response.reasoning_text.done", **self._where(item), content_index=0, text=text)]
        else:
            done = [self.event("response.output_text.done", **self._where(item), content_index=0, text=text,
                               logprobs=[]),
                    self.event("response.content_part.done", **self._where(item), content_index=0,
                               part=dict(item["content"][0]))]
        return done + [self.event("response.output_item.done", output_index=self.items.index(item),
                                  item=copy.deepcopy(item))]

    def finish(self, status: str = "completed") -> list[dict]:
        """Close the open item with `status` (the response's: "incomplete" when max_output_tokens or a shutdown cut
        it, as its final output says); add an empty message when there is no text and no call."""
        events = []
        if not self.calls and not any(i["type"] == "message" for i in self.items):
            events += self._close() + self._start("message")
        return events + self._close(status)
