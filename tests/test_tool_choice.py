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

from openjamba.chat_format import TOOL_TAGS, parse_assistant_output
from openjamba.serve.json_mode import ByteGrammar, JsonVocabulary
from openjamba.serve.tool_choice import ToolChoice, added_token_bytes, call_grammar, tool_call_grammar
from openjamba.tokenizer import load_tokenizer

from .conftest import byte_level_tokenizer, mutated_text
from .serve_helpers import CHAT_TEMPLATE, CORPUS, tiny_server
from .tokenizer_fixtures import write_jamba2, write_jamba16

WEATHER = {"name": "get_weather", "description": "the weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city"], "additionalProperties": False}}
TIME = {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["utc", "local"]}},
                                           "required": ["zone"]}}
SEARCH = {"name": "search", "parameters": {"type": "object", "properties": {"q": {"type": "string", "minLength": 2}}}}
TOOLS = [WEATHER, TIME, SEARCH]
MUTATIONS = b'<>/{}[]",: \nabcdehiklmnoprstuwy_0123456789'
CALLS = [b'{"name": "get_weather", "arguments": {"city": "Paris <b> </tool_call x", "unit": "celsius"}}',
         b'{"arguments": {"zone": "utc"}, "name": "get_time"}',
         b'{"name": "search", "arguments": {"anything": [1, {"x": null}], "q": "a"}}']
REASONINGS = [b"</think>\n\n", b"Weather <tool_call> or </thin> or </thinks <\xc3\xa9</think>  \n"]


def replies(kind: str, think: bool = False, several: bool = False) -> list[bytes]:
    """Valid forced replies in format `kind` (calls to each of TOOLS; SEARCH's arguments are any object): one call
    each, after an empty and a non-empty reasoning when `think`, and with `several` two and three calls too."""
    open_tag, close_tag = (t.encode() for t in TOOL_TAGS[kind])
    if kind == "jamba":
        out = [open_tag + b"[\n" + c + b"\n]" + close_tag for c in CALLS]
        if several:
            out += [open_tag + b"[" + CALLS[0] + b", " + CALLS[1] + b"]" + close_tag,
                    open_tag + b" \n[" + b",\n".join(CALLS[::-1]) + b"\n] " + close_tag]
    else:
        out = [open_tag + b"\n" + c + b"\n" + close_tag for c in CALLS]
        if several:
            out += [open_tag + CALLS[0] + close_tag + open_tag + CALLS[1] + close_tag,
                    b"\n".join(open_tag + b"\n" + c + b"\n" + close_tag for c in CALLS[::-1]) + b"\n"]
    if think:
        out = [r + o for r in REASONINGS for o in out]
    return out


class Reference:
    """What a forced reply is, written plainly as a pattern matched by backtracking: literals, a call one of the call
    grammars accepts (never with the closing tag in it, where the parser would cut it), whitespace runs of at most
    16 bytes, the reasoning (any bytes up to the first `</think>`), and repetitions for several calls. A byte string
    is viable when some such reply starts with it."""

    def __init__(self, kind: str, functions: list[dict], think: bool, several: bool = False) -> None:
        open_tag, self.close = (t.encode() for t in TOOL_TAGS[kind])
        array = kind == "jamba"
        self.calls = [call_grammar(f["name"], f.get("parameters"), array and not several)[0] for f in functions]
        if array and several:
            body = (open_tag, "WS", b"[", "CALL", ("STAR", (b",", "CALL")), b"]", "WS", self.close)
        elif several:
            body = (open_tag, "CALL", self.close, ("STAR", ("WS", open_tag, "CALL", self.close)), "WS")
        else:
            body = (open_tag, "CALL", self.close)
        self.pattern = (("FREE", b"</think>"), "WS", *body) if think else body
        self.atomic: tuple[int, int] | None = None

    def _fits(self, start: int, end: int, may_hold: bool) -> bool:
        """Whether an item over data[start:end] respects the atomic span (an added token's text): outside it, or
        holding it whole when the item may (a literal, the reasoning)."""
        if self.atomic is None:
            return True
        a, b = self.atomic
        if start == end:
            return not a < start < b
        return end <= a or start >= b or (may_hold and start <= a and b <= end)

    def match(self, items: tuple, data: bytes, pos: int, whole: bool) -> bool:
        if pos == len(data) and not whole:
            return True
        if not items:
            return pos == len(data)
        item, rest = items[0], items[1:]
        if isinstance(item, bytes):
            end = pos + len(item)
            if not self._fits(pos, end, True):
                return False
            if end > len(data):
                return not whole and item.startswith(data[pos:])
            return data.startswith(item, pos) and self.match(rest, data, end, whole)
        if item == "WS":
            k = pos
            while True:
                if self._fits(pos, k, False) and self.match(rest, data, k, whole):
                    return True
                if k == len(data) or data[k] not in b" \t\n\r" or k - pos == 16:
                    return False
                k += 1
        if item == "CALL":
            cut = data.find(self.close, pos)
            limit = len(data) if cut < 0 else cut + len(self.close) - 1  # the call may not hold the whole tag
            states = [g.start() for g in self.calls]
            for k in range(pos, limit + 1):
                if k > pos:
                    states = [s if s is None else g.step(s, data[k - 1]) for g, s in zip(self.calls, states)]
                    if all(s is None for s in states):
                        return False
                if not self._fits(pos, k, False):
                    continue
                if k == len(data) and not whole:
                    return True
                if any(s is not None and g.complete(s) for g, s in zip(self.calls, states)) and \
                        self.match(rest, data, k, whole):
                    return True
            return False
        if item[0] == "FREE":
            at = data.find(item[1], pos)
            if at < 0:
                return not whole and self._fits(pos, 1 << 60, True)
            end = at + len(item[1])
            return self._fits(pos, end, True) and self.match(rest, data, end, whole)
        assert item[0] == "STAR"
        return self.match(rest, data, pos, whole) or self.match((*item[1], item, *rest), data, pos, whole)

    def viable(self, data: bytes) -> bool:
        return self.match(self.pattern, data, 0, False)

    def whole(self, data: bytes) -> bool:
        return self.match(self.pattern, data, 0, True)

    def added_viable(self, data: bytes, text: bytes) -> bool:
        """Whether an added token reading `text` may follow `data`: inside one literal or the reasoning."""
        self.atomic = (len(data), len(data) + len(text))
        try:
            return self.viable(data + text)
        finally:
            self.atomic = None


EMPTY = ((), (), None)  # a grammar state with no threads: complete nowhere


@pytest.mark.parametrize("kind", ["hermes", "jamba"])
@pytest.mark.parametrize("think", [False, True])
@pytest.mark.parametrize("several", [False, True])
def test_grammar_agrees_with_the_reference(kind, think, several):
    jsonschema = pytest.importorskip("jsonschema")
    grammar = tool_call_grammar(kind, TOOLS, think, several)
    reference = Reference(kind, TOOLS, think, several)
    schemas = {f["name"]: f["parameters"] for f in TOOLS}
    open_tag = TOOL_TAGS[kind][0].encode()
    head = (b"</think>" if think else b"") + open_tag + (b"[" if kind == "jamba" else b"") + \
        b'{"name": "get_weather", "arguments": {"city": "'
    assert grammar.feed(grammar.start(), head + reference.close) is None  # the parser would cut the call there
    assert grammar.feed(grammar.start(), head + reference.close.replace(b"/", b"\\/")) is not None  # escaped
    rng = random.Random(0)
    for reply in replies(kind, think, several):
        assert reference.whole(reply), reply
        assert grammar.complete(grammar.feed(grammar.start(), reply)), reply
        for k in range(len(reply)):
            state = grammar.feed(grammar.start(), reply[:k])
            assert state is not None and grammar.complete(state) == reference.whole(reply[:k]), reply[:k]
        for _ in range(150):
            data = mutated_text(reply, rng, MUTATIONS)
            state = grammar.feed(grammar.start(), data)
            assert (state is not None) == reference.viable(data), data
            whole = state is not None and grammar.complete(state)
            assert whole == reference.whole(data), data
            if whole:  # what the server's parser reads back: calls to the tools, with valid arguments
                out = parse_assistant_output(data.decode(errors="replace"), kind + "+think", started_in_reasoning=think)
                assert not out.content and (len(out.tool_calls) >= 1 if several else len(out.tool_calls) == 1)
                for call in out.tool_calls:
                    function = call["function"]
                    assert function["name"] in schemas
                    if function["name"] != "search":  # SEARCH's minLength is beyond the compiler: any object
                        jsonschema.validate(json.loads(function["arguments"]), schemas[function["name"]])


def test_grammar_cases():
    """The boundaries spelled out: reasoning runs to the first `</think>` whatever it holds; one call unless
    several; a second Hermes block or Jamba array element only with several."""
    call = CALLS[1]
    one = tool_call_grammar("hermes", TOOLS, True)
    several = tool_call_grammar("hermes", TOOLS, True, several=True)

    def state(grammar, data):
        return grammar.feed(grammar.start(), data)

    for text in (b"", b"<", b"</thin", b"</think", b"a < b </ </thi nk> <think> {\"x\"", b"\xff\xfe", b"<tool_call>"):
        assert state(one, text) is not None and one.in_reasoning(state(one, text)), text
    assert not one.in_reasoning(state(one, b"</think>")) and state(one, b"</think>x") is None
    assert state(one, b"</think>" + b" " * 16 + b"<") is not None and state(one, b"</think>" + b" " * 17) is None
    block = b"<tool_call>" + call + b"</tool_call>"
    for reasoning in (b"</think>", b"hmm </thin </think>\n\n"):
        assert one.complete(state(one, reasoning + block))
        assert state(one, reasoning + block + b"\n") is None  # exactly one call: only the end
        assert several.complete(state(several, reasoning + block + b"\n"))
        assert several.complete(state(several, reasoning + block + b"\n" + block + block))
        assert not several.complete(state(several, reasoning + block + b"\n<tool_call>"))
    assert state(one, b"<tool_call>") is not None and state(one, b"</think><think>") is None
    jamba_one = tool_call_grammar("jamba", TOOLS)
    jamba_several = tool_call_grammar("jamba", TOOLS, several=True)
    two = b"<tool_calls>[" + call + b", " + CALLS[0] + b"]</tool_calls>"
    assert state(jamba_one, two) is None and jamba_several.complete(state(jamba_several, two))
    assert state(jamba_several, b"<tool_calls>[]") is None and state(jamba_several, b"<tool_calls>[" + call + b",]") \
        is None


def test_reasoning_feed_skims_as_steps():
    """`feed` with the reasoning's `bytes.find` shortcut reaches the states byte-by-byte steps do, however the
    bytes are cut into tokens."""
    grammar = tool_call_grammar("hermes", TOOLS, True, several=True)
    rng = random.Random(1)
    for reply in replies("hermes", True, True):
        for _ in range(20):
            state, cuts = grammar.start(), sorted(rng.sample(range(1, len(reply)), 8))
            for a, b in zip([0, *cuts], [*cuts, len(reply)]):
                state = grammar.feed(state, reply[a:b])
                assert state == ByteGrammar.feed(grammar, grammar.start(), reply[:b])
            assert grammar.complete(state)


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
                b"</think>\n\n<tool_call>", b'<tool_call>{"', b"\n</tool_", b"s</tool_call", b"k>", b"nk>\n",
                b"ab</think>", b"</think>x", b'</think>\n<tool_call>{"', b"<thin", b'"}\n</tool_call>\n<tool_call>',
                b'}, {"']


@pytest.mark.parametrize("kind, think, several, tokenizer_kind", [
    ("hermes", False, False, "byte-level"), ("hermes", True, False, "added"), ("hermes", True, True, "jamba2"),
    ("hermes", False, True, "added"), ("jamba", False, False, "jamba16"), ("jamba", False, True, "jamba16"),
    ("jamba", True, True, "byte-level")])
def test_masks_equal_brute_force(tokenizers, kind, think, several, tokenizer_kind):
    tokenizer = tokenizers[tokenizer_kind]
    table = tokenizer.token_bytes() + EXTRA_TOKENS
    eos = list(tokenizer.eos_token_ids) or [2]  # byte-level: <eos>
    added = added_token_bytes(tokenizer)
    grammar = tool_call_grammar(kind, [WEATHER, TIME], think, several)
    reference = Reference(kind, [WEATHER, TIME], think, several)
    constraint = ToolChoice(JsonVocabulary(table), grammar, added).constraint(eos)
    literal_ids = [i for i, text in added.items() if text in (t.encode() for t in (*TOOL_TAGS[kind], "</think>"))]
    if tokenizer_kind != "byte-level":
        assert literal_ids  # the markup can come as one token here
    every = [r for r in replies(kind, think, several) if grammar.complete(grammar.feed(grammar.start(), r) or EMPTY)]
    for reply in (every[0], every[-1]):  # one call (after an empty reasoning); the most calls, longest reasoning
        for k in range(len(reply) + 1):
            state = grammar.feed(grammar.start(), reply[:k])
            brute = torch.tensor([bool(b) and i not in eos and ByteGrammar.feed(grammar, state, b) is not None
                                  for i, b in enumerate(table)])
            for i, text in added.items():
                brute[i] = i not in eos and reference.added_viable(reply[:k], text)
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


def _valid_calls(choice, schemas: dict, jsonschema) -> list[str]:
    """The names of a forced reply's calls, each checked against its tool's schema."""
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    for call in choice.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    return [call.function.name for call in choice.message.tool_calls]


def test_required_allows_several_calls(tool_server):
    """"required" takes one or more calls (with EOS unbiased, a random model writes a second block for some
    seeds); `parallel_tool_calls: false` and a named function take exactly one."""
    jsonschema = pytest.importorskip("jsonschema")
    url, tokenizer, _ = tool_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    tools = [{"type": "function", "function": f} for f in (WEATHER, TIME)]
    schemas = {f["name"]: f["parameters"] for f in (WEATHER, TIME)}
    bias = {**closing_bias(tokenizer), **{str(i): 0.0 for i in tokenizer.eos_token_ids}}
    named = {"type": "function", "function": {"name": "get_weather"}}
    counts: dict[str, list[int]] = {"several": [], "one": [], "named": []}
    for seed in (0, 3):
        for case, extra in (("several", {"tool_choice": "required"}),
                            ("one", {"tool_choice": "required", "parallel_tool_calls": False}),
                            ("named", {"tool_choice": named})):
            r = client.chat.completions.create(
                model="tiny-jamba", messages=[{"role": "user", "content": "hello world"}], tools=tools,
                max_tokens=400, logit_bias=bias, temperature=1.0, seed=seed, **extra)
            counts[case].append(len(_valid_calls(r.choices[0], schemas, jsonschema)))
    assert max(counts["several"]) >= 2 and counts["one"] == counts["named"] == [1, 1], counts


def _joined(chunks) -> tuple[str, list[tuple[str, str]], str | None]:
    """(reasoning, [(name, arguments)], finish_reason) of a streamed reply, its tool-call deltas joined by index
    (whole or in pieces)."""
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls: dict[int, list[str]] = {}
    for d in deltas:
        for tc in d.tool_calls or []:
            call = calls.setdefault(tc.index, ["", ""])
            call[0] += (tc.function.name or "") if tc.function else ""
            call[1] += (tc.function.arguments or "") if tc.function else ""
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    return reasoning, [tuple(calls[i]) for i in sorted(calls)], chunks[-1].choices[0].finish_reason


# ChatML whose generation prompt opens <think> (as Jamba Reasoning 3B's and Jamba2's do), `</think>` an added token
OPENS_THINKING = CHAT_TEMPLATE.replace(
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}", "<think>\n")


@pytest.fixture(scope="module")
def thinking_server(tmp_path_factory):
    assert OPENS_THINKING != CHAT_TEMPLATE
    with tiny_server(tmp_path_factory.mktemp("tool-think") / "tiny-jamba", chat_template=OPENS_THINKING,
                     added_tokens=["</think>"]) as served:
        yield served


def test_forced_call_after_reasoning(thinking_server):
    """The prompt opened <think>: the model reasons freely (a bias on the added `</think>` ends its reasoning after
    a few dozen tokens), then calls; a max_tokens that runs out while it reasons ends with "length" and no call."""
    jsonschema = pytest.importorskip("jsonschema")
    url, tokenizer, chat = thinking_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    tools = [{"type": "function", "function": f} for f in (WEATHER, TIME)]
    schemas = {f["name"]: f["parameters"] for f in (WEATHER, TIME)}
    messages = [{"role": "user", "content": "hello world"}]
    assert chat.opens_reasoning(chat.encode(messages, tools=tools))
    think_close = tokenizer.backend.token_to_id("</think>")
    bias = {**closing_bias(tokenizer), str(think_close): 5.0}
    for tool_choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        for seed in (0, 1):
            r = client.chat.completions.create(model="tiny-jamba", messages=messages, tools=tools,
                                               tool_choice=tool_choice, max_tokens=300, logit_bias=bias,
                                               temperature=1.0, seed=seed)
            choice = r.choices[0]
            names = _valid_calls(choice, schemas, jsonschema)
            assert names and (tool_choice == "required" or names == ["get_time"])
            assert choice.message.reasoning_content  # it thought before the call
        chunks = list(client.chat.completions.create(
            model="tiny-jamba", messages=messages, tools=tools, tool_choice=tool_choice, max_tokens=300,
            logit_bias=bias, temperature=1.0, seed=1, stream=True))
        assert _joined(chunks) == (choice.message.reasoning_content, [
            (c.function.name, c.function.arguments) for c in choice.message.tool_calls], "tool_calls")
    cut = client.chat.completions.create(model="tiny-jamba", messages=messages, tools=tools, tool_choice="required",
                                         max_tokens=8, logit_bias=closing_bias(tokenizer), temperature=1.0, seed=0)
    choice = cut.choices[0]
    assert choice.finish_reason == "length" and not choice.message.tool_calls and not choice.message.content
    assert choice.message.reasoning_content and cut.usage.completion_tokens == 8
