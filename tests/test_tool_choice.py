"""Forced tool calls (`tool_choice` "required" or a named function): the tool-call grammar against a plain
reference over random mutations, its masks against brute force (markup as several ordinary tokens and as one added
token), and a live server with the official openai client."""

from __future__ import annotations

import dataclasses
import json
import random

import httpx
import openai
import pytest
import torch
from tokenizers import AddedToken

from openjamba.chat_format import TOOL_TAGS, parse_tool_calls
from openjamba.serve.json_mode import JsonVocabulary
from openjamba.serve.tool_choice import ToolChoice, added_token_bytes, call_grammar, tool_call_grammar
from openjamba.tokenizer import load_tokenizer

from .conftest import byte_level_tokenizer
from .serve_helpers import CORPUS, tiny_server
from .tokenizer_fixtures import write_jamba2, write_jamba16

WEATHER = {"name": "get_weather", "description": "the weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city"], "additionalProperties": False}}
TIME = {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["utc", "local"]}},
                                           "required": ["zone"]}}
SEARCH = {"name": "search", "parameters": {"type": "object", "properties": {"q": {"type": "string", "minLength": 2}}}}
TOOLS = [WEATHER, TIME, SEARCH]
MUTATIONS = b'<>/{}[]",: \nabcdeilmnoprstuwy_0123456789'


def replies(kind: str) -> list[bytes]:
    """Valid forced replies in format `kind` (calls to each of TOOLS; SEARCH's arguments are any object)."""
    calls = [b'{"name": "get_weather", "arguments": {"city": "Paris <b> </tool_call x", "unit": "celsius"}}',
             b'{"arguments": {"zone": "utc"}, "name": "get_time"}',
             b'{"name": "search", "arguments": {"anything": [1, {"x": null}], "q": "a"}}']
    open_tag, close_tag = (t.encode() for t in TOOL_TAGS[kind])
    if kind == "jamba":
        return [open_tag + b"[\n" + c + b"\n]" + close_tag for c in calls]
    return [open_tag + b"\n" + c + b"\n" + close_tag for c in calls]


class Reference:
    """What a forced reply is, written plainly: the open literal, a call one of the call grammars accepts, the close
    literal; a byte string is viable when some such reply starts with it."""

    def __init__(self, kind: str, functions: list[dict], think: bool) -> None:
        self.open, self.close = (t.encode() for t in TOOL_TAGS[kind])
        self.open = (b"</think>\n\n" if think else b"") + self.open
        self.calls = [call_grammar(f["name"], f.get("parameters"), kind == "jamba")[0] for f in functions]

    def call_viable(self, data: bytes) -> bool:
        """A call's beginning; never with the close literal in it (in a string), where the parser would cut it."""
        return self.close not in data and any(g.feed(g.start(), data) is not None for g in self.calls)

    def call_complete(self, data: bytes) -> bool:
        return self.close not in data and any((s := g.feed(g.start(), data)) is not None and g.complete(s)
                                              for g in self.calls)

    def splits(self, data: bytes):
        """(call, the part of the close literal after it) for each way `data` is open + complete call + close[:m]."""
        rest = data[len(self.open):]
        for k in range(len(rest) + 1):
            if self.close.startswith(rest[k:]) and self.call_complete(rest[:k]):
                yield rest[:k], rest[k:]

    def viable(self, data: bytes) -> bool:
        if len(data) <= len(self.open):
            return self.open.startswith(data)
        if not data.startswith(self.open):
            return False
        return self.call_viable(data[len(self.open):]) or any(True for _ in self.splits(data))

    def whole(self, data: bytes) -> bool:
        return data.startswith(self.open) and any(tail == self.close for _, tail in self.splits(data))

    def literal_rooms(self, data: bytes) -> list[bytes]:
        """What is left of the literal(s) that `data` ends inside or right before (where an added token may go)."""
        if len(data) < len(self.open):
            return [self.open[len(data):]] if self.open.startswith(data) else []
        return [self.close[len(tail):] for _, tail in self.splits(data) if len(tail) < len(self.close)]


@pytest.mark.parametrize("kind", ["hermes", "jamba"])
@pytest.mark.parametrize("think", [False, True])
def test_grammar_agrees_with_the_reference(kind, think):
    jsonschema = pytest.importorskip("jsonschema")
    grammar = tool_call_grammar(kind, TOOLS, think)
    reference = Reference(kind, TOOLS, think)
    schemas = {f["name"]: f["parameters"] for f in TOOLS}
    head = reference.open + (b"[" if kind == "jamba" else b"") + b'{"name": "get_weather", "arguments": {"city": "'
    assert grammar.feed(grammar.start(), head + reference.close) is None  # the parser would cut the call there
    assert grammar.feed(grammar.start(), head + reference.close.replace(b"/", b"\\/")) is not None  # escaped
    rng = random.Random(0)
    for reply in replies(kind):
        reply = (b"</think>\n\n" if think else b"") + reply
        assert grammar.complete(grammar.feed(grammar.start(), reply)), reply
        for k in range(len(reply)):
            state = grammar.feed(grammar.start(), reply[:k])
            assert state is not None and not grammar.complete(state)
        for _ in range(150):
            data = bytearray(reply)
            for _ in range(rng.randint(1, 3)):
                at = rng.randrange(len(data))
                choice = rng.randrange(3)
                if choice == 0:
                    data.insert(at, rng.choice(MUTATIONS))
                elif choice == 1:
                    del data[at]
                else:
                    data[at] = rng.choice(MUTATIONS)
            data = bytes(data)
            state = grammar.feed(grammar.start(), data)
            assert (state is not None) == reference.viable(data), data
            whole = state is not None and grammar.complete(state)
            assert whole == reference.whole(data), data
            if whole:  # what the server's parser reads back: one call, to a tool, with valid arguments
                calls = parse_tool_calls(data.decode()[len(b"</think>\n\n") if think else 0:], kind)
                assert len(calls) == 1 and calls[0]["function"]["name"] in schemas
                function = calls[0]["function"]
                if function["name"] != "search":  # SEARCH's minLength is beyond the compiler: any object
                    jsonschema.validate(json.loads(function["arguments"]), schemas[function["name"]])


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """The markup as ordinary tokens (byte-level BPE), as added tokens (the same with `<tool_call>` and
    `</tool_call>` added), and as special tokens (Jamba2's ChatML, Jamba 1.6's `<tool_calls>`)."""
    root = tmp_path_factory.mktemp("tool-tokenizers")
    plain = byte_level_tokenizer(CORPUS, vocab_size=400)
    added = byte_level_tokenizer(CORPUS, vocab_size=400)
    added.backend.add_tokens([AddedToken("<tool_call>", special=False), AddedToken("</tool_call>", special=False)])
    return {"byte-level": plain, "added": added, "jamba2": load_tokenizer(write_jamba2(root / "j2")),
            "jamba16": load_tokenizer(write_jamba16(root / "j16"))}


# Ordinary tokens that hold markup (a SentencePiece vocabulary without pre-tokenizer splits may have such): plain
# string bodies with a whole close tag (never inside a call's strings) and tokens that cross into or out of a call.
EXTRA_TOKENS = [b"x</tool_call>y", b"</tool_call>", b"</tool_calls>", b'"}\n</tool_call>', b'"}]</tool_calls>',
                b"</think>\n\n<tool_call>", b'<tool_call>{"', b"\n</tool_", b"s</tool_call"]


@pytest.mark.parametrize("kind, think, tokenizer_kind", [
    ("hermes", False, "byte-level"), ("hermes", True, "added"), ("hermes", True, "jamba2"),
    ("jamba", False, "jamba16"), ("jamba", False, "byte-level")])
def test_masks_equal_brute_force(tokenizers, kind, think, tokenizer_kind):
    tokenizer = tokenizers[tokenizer_kind]
    table = tokenizer.token_bytes() + EXTRA_TOKENS
    eos = list(tokenizer.eos_token_ids) or [2]  # byte-level: <eos>
    added = added_token_bytes(tokenizer)
    grammar = tool_call_grammar(kind, [WEATHER, TIME], think)
    reference = Reference(kind, [WEATHER, TIME], think)
    constraint = ToolChoice(JsonVocabulary(table), grammar, added).constraint(eos)
    literal_ids = [i for i, text in added.items() if text in (t.encode() for t in (*TOOL_TAGS[kind], "</think>"))]
    if tokenizer_kind != "byte-level":
        assert literal_ids  # the markup can come as one token here
    for reply in replies(kind)[:2]:
        reply = (b"</think>\n\n" if think else b"") + reply
        for k in range(len(reply) + 1):
            state = grammar.feed(grammar.start(), reply[:k])
            brute = torch.tensor([bool(b) and i not in eos and grammar.feed(state, b) is not None
                                  for i, b in enumerate(table)])
            rooms = reference.literal_rooms(reply[:k])
            for i, text in added.items():
                brute[i] = i not in eos and any(room.startswith(text) for room in rooms)
            brute[eos] = grammar.complete(state)
            constraint.state = state
            for _ in range(2):  # computed, then from the cache
                assert torch.equal(constraint.mask(len(table)), brute), (reply[:k], torch.nonzero(
                    constraint.mask(len(table)) != brute))
            for i in literal_ids:  # an added token moves the state as its text's bytes do
                assert constraint.allows(i) == bool(brute[i])
                if brute[i]:
                    constraint.advance(i)
                    assert reference.viable(reply[:k] + added[i])
                    assert constraint.state == grammar.feed(state, added[i])
                    constraint.state = state


# ---------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    with tiny_server(tmp_path_factory.mktemp("tool-serve") / "tiny-jamba") as served:
        yield served


def closing_bias(tokenizer) -> dict[str, float]:
    """The random model's strings run on for hundreds of tokens and its optional keys may never stop coming: a
    bias on the quote, the closing brace and EOS makes a call end within a few dozen tokens (every other token is
    still the model's pick among those the grammar allows)."""
    table = tokenizer.token_bytes()
    bias = {str(i): {b'"': 5.0, b"}": 3.0}[b] for i, b in enumerate(table) if b in (b'"', b"}")}
    return {**bias, **{str(i): 5.0 for i in tokenizer.eos_token_ids}}


def _streamed_call(chunks) -> tuple[str, str, str | None, str]:
    """(name, arguments, finish reason, content) of a streamed reply with one call: its start, then fragments."""
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert {tc.index for tc in calls} == {0} and calls[0].id and not any(tc.id for tc in calls[1:])
    return (calls[0].function.name, "".join(tc.function.arguments for tc in calls),
            chunks[-1].choices[0].finish_reason, "".join(d.content or "" for d in deltas))


@pytest.mark.parametrize("tool_choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_forced_tool_call(tool_server, tool_choice):
    jsonschema = pytest.importorskip("jsonschema")
    url, tokenizer, _ = tool_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    tools = [{"type": "function", "function": f} for f in (WEATHER, TIME)]
    schemas = {f["name"]: f["parameters"] for f in (WEATHER, TIME)}
    names = set()
    for args in ({"temperature": 0}, {"temperature": 1.0, "seed": 4}):
        request = dict(model="tiny-jamba", messages=[{"role": "user", "content": "hello world"}], tools=tools,
                       tool_choice=tool_choice, max_tokens=200, logit_bias=closing_bias(tokenizer), **args)
        r = client.chat.completions.create(**request)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and not choice.message.content
        (call,) = choice.message.tool_calls
        if isinstance(tool_choice, dict):
            assert call.function.name == "get_weather"
        names.add(call.function.name)
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
        streamed = _streamed_call(list(client.chat.completions.create(stream=True, **request)))
        assert streamed == (call.function.name, call.function.arguments, "tool_calls", "")
    assert names <= set(schemas)


def test_forced_tool_call_errors(tool_server):
    url, _, chat = tool_server
    tools = [{"type": "function", "function": WEATHER}]
    body = {"model": "tiny-jamba", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "tools": tools}
    named = {"type": "function", "function": {"name": "get_weather"}}
    for extra in ({"tool_choice": {"type": "function", "function": {"name": "nope"}}},
                  {"tool_choice": "required", "tools": None}, {"tool_choice": named, "tools": None},
                  {"tool_choice": named, "response_format": {"type": "json_object"}},
                  {"tool_choice": {"type": "function", "name": "get_weather"}},
                  {"tool_choice": "required", "min_tokens": 2}, {"tool_choice": "required", "ignore_eos": True}):
        r = httpx.post(url + "/v1/chat/completions", json={**body, **extra}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice", (extra, r.text)
    format_before = chat.format
    chat.format = dataclasses.replace(chat.format, tool_calls=None)  # a checkpoint with no tool-call markup
    try:
        r = httpx.post(url + "/v1/chat/completions", json={**body, "tool_choice": "required"}, timeout=30)
        assert r.status_code == 400 and "cannot be enforced" in r.json()["error"]["message"]
    finally:
        chat.format = format_before
    r = httpx.post(url + "/v1/chat/completions", json={**body, "tool_choice": "auto"}, timeout=30)
    assert r.status_code == 200
