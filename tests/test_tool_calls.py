"""The incremental tool-call reader: over every split of sample outputs into deltas (one character at a time and
random chunks), in both formats, the streamed deltas join to the final calls (names, ids, count, arguments); the
final calls agree with a plain json.loads reading; malformed and truncated text never raises."""

from __future__ import annotations

import json
import random

import pytest

from openjamba.chat_format import StreamingOutputParser, parse_assistant_output
from openjamba.tool_calls import TOOL_TAGS, ToolCallReader, parse_tool_calls

from .conftest import mutated_text

H = "<tool_call>{}</tool_call>".format
VALID = [  # (kind, tool text, [(name, arguments string)])
    ("hermes", H('{"name": "get_weather", "arguments": {"city": "Zürich"}}'),
     [("get_weather", '{"city": "Zürich"}')]),
    ("hermes", '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n' + H('{"name": "b", "arguments": '
                                                                                  '{"x": [1, 2.5e3, -0, null]}}'),
     [("a", "{}"), ("b", '{"x": [1, 2.5e3, -0, null]}')]),
    ("hermes", H('{"name": "f", "arguments": {"s": "{[}] \\"q\\" </tool_call> \\\\", "n": {"d": {"e": [{}]}}}}'),
     [("f", '{"s": "{[}] \\"q\\" </tool_call> \\\\", "n": {"d": {"e": [{}]}}}')]),
    ("hermes", H('{"arguments": {"zone": "utc", "k": "}"}, "name": "get_time"}'),
     [("get_time", '{"zone": "utc", "k": "}"}')]),
    ("hermes", H('{"name": "f", "arguments": "{\\"a\\": 1}"}'), [("f", '{"a": 1}')]),
    ("hermes", H('{"name": "f", "arguments": null}') + "between" + H('{"name": "g"}'), [("f", "{}"), ("g", "{}")]),
    ("hermes", H('{"name":"f","parameters":{"u":"\\u00e9\\n"}}'), [("f", '{"u":"\\u00e9\\n"}')]),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": true}}', [("f", '{"a": true}')]),  # no closing tag
    ("hermes", H('{"name": "f", "arguments": {"a": 1}, "name": "g", "arguments": 2}'), [("f", '{"a": 1}')]),
    ("jamba", '<tool_calls>[{"name": "a", "arguments": {"q": "x"}}, {"arguments": {"b": [1]}, "name": "b"}]'
              '</tool_calls>', [("a", '{"q": "x"}'), ("b", '{"b": [1]}')]),
    ("jamba", '<tool_calls>\n[\n  {"name": "a",\n   "arguments": {\n    "q": "</tool_calls>"\n  }}\n]\n</tool_calls>'
              'ignored', [("a", '{\n    "q": "</tool_calls>"\n  }')]),
    ("jamba", '<tool_calls>{"name": "solo", "arguments": {"n": 1}}</tool_calls>', [("solo", '{"n": 1}')]),
]
MALFORMED = [
    ("hermes", H('{"name": "a", "arguments": {')),
    ("hermes", H('{"name": "a", "arguments": {}}}')),  # an extra brace
    ("hermes", H('{"name": 3, "arguments": {}}')),
    ("hermes", H('{"arguments": {}}')),
    ("hermes", H('[{"name": "a", "arguments": {}}]')),
    ("hermes", H('{"name": "a", "arguments": {"x": tru}}')),
    ("hermes", H("{'name': 'a'}")),
    ("hermes", H('{"name": "a", "arguments": {"x": 1,}}')),
    ("hermes", H('{"name": "a", "arguments": {"x": "\\q"}}')),
    ("hermes", H('{"name": "a", "arguments": {"x": 01}}')),
    ("hermes", '<tool_call>{"name": "a", "arguments": {}}<tool_call>{"name": "b", "arguments": {}}</tool_call>'),
    ("hermes", H('{"name": "a", "arguments": {}}') + H('{"name": "b", "arguments": {"x" 1}}')),
    ("hermes", H("")),
    ("jamba", '<tool_calls>[]</tool_calls>'),
    ("jamba", '<tool_calls>["a"]</tool_calls>'),
    ("jamba", '<tool_calls>[{"name": "a", "arguments": {}},]</tool_calls>'),
]


def splits(text: str, seed: int) -> list[list[str]]:
    """The text one character at a time, whole, and in random chunks of 1 to 12 characters."""
    rng = random.Random(seed)
    out = [list(text), [text]]
    for _ in range(6):
        cuts, i = [], 0
        while i < len(text):
            n = rng.randint(1, 12)
            cuts.append(text[i:i + n])
            i += n
        out.append(cuts)
    return out


def joined(deltas) -> list[dict]:
    """Streamed deltas assembled per call, as a client does (checking their order as it goes)."""
    calls: list[dict] = []
    for d in deltas:
        if d.id is not None:
            assert d.index == len(calls) and d.name is not None and not d.arguments and not d.done
            calls.append({"id": d.id, "name": d.name, "arguments": "", "done": False})
        else:
            call = calls[d.index]
            assert not call["done"]
            assert not (d.done and d.arguments)
            call["arguments"] += d.arguments
            call["done"] = d.done
    return calls


def stream(kind: str, chunks: list[str]) -> tuple[list[dict], list[dict] | None]:
    reader = ToolCallReader(kind)
    deltas = [d for chunk in chunks for d in reader.feed(chunk)]
    return joined(deltas), reader.finish()


class Pairs(list):
    """A JSON object as its (key, value) pairs in order, so a reading can choose which repeated key wins."""


def last_wins(value: object) -> object:
    """The value json.loads gives: a repeated key's last value."""
    if isinstance(value, Pairs):
        return {key: last_wins(v) for key, v in value}
    return [last_wins(v) for v in value] if isinstance(value, list) else value


def call_object(value: object) -> object:
    """A call's own object keeps the first of a repeated "name" or "arguments", as the reader does (it has streamed
    that one); values inside keep json.loads' last."""
    if not isinstance(value, Pairs):
        return last_wins(value)
    first: dict = {}
    for key, v in value:
        first.setdefault(key, last_wins(v))
    return first


def reference(text: str, kind: str) -> list[tuple[str, object]] | None:
    """A plain reading: each block's JSON by json.loads (closing tags found by text search, so no test text holds one
    inside a string)."""
    open_tag, close_tag = TOOL_TAGS[kind]
    calls, rest = [], text
    while (start := rest.find(open_tag)) >= 0:
        end = rest.find(close_tag, start)
        body = rest[start + len(open_tag): end if end >= 0 else None]
        rest = rest[end + len(close_tag):] if end >= 0 else ""
        try:
            parsed = json.loads(body, object_pairs_hook=Pairs)
        except ValueError:
            return None
        items = parsed if kind == "jamba" and isinstance(parsed, list) and not isinstance(parsed, Pairs) else [parsed]
        for item in map(call_object, items):
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                return None
            args = item.get("arguments", item.get("parameters"))
            calls.append((item["name"], loaded(args) if isinstance(args, str) else args or {}))
        if kind == "jamba":
            break
    return calls or None


def loaded(arguments: str) -> object:
    """The arguments' JSON value (a string value that is not JSON is passed on as it is)."""
    try:
        return json.loads(arguments)
    except ValueError:
        return ("text", arguments)


def plain(calls: list[dict] | None) -> list[tuple[str, object]] | None:
    return None if calls is None else [(c["function"]["name"], loaded(c["function"]["arguments"])) for c in calls]


@pytest.mark.parametrize("kind, text, expected", VALID)
def test_streamed_calls_join_to_the_final_ones(kind, text, expected):
    whole = parse_tool_calls(text, kind)
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in whole] == expected
    for chunks in splits(text, 0):
        streamed, final = stream(kind, chunks)
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in final] == expected
        assert [(c["id"], c["name"], c["arguments"], c["done"]) for c in streamed] == [
            (c["id"], c["function"]["name"], c["function"]["arguments"], True) for c in final]


def test_arguments_stream_as_they_arrive_and_wait_for_the_name():
    reader = ToolCallReader("hermes")
    assert reader.feed('<tool_call>{"name": "f') == []
    start, fragment = reader.feed('", "arguments": {"a": "x')
    assert (start.index, start.name, start.arguments, fragment.arguments) == (0, "f", "", '{"a": "x')
    assert [d.arguments for d in reader.feed('yz"')] == ['yz"']
    reader = ToolCallReader("hermes")
    assert reader.feed('<tool_call>{"arguments": {"a": [1, ') == []  # held until the name is known
    start, held = reader.feed('2]}, "name": "g"')
    assert (start.name, held.arguments) == ("g", '{"a": [1, 2]}')
    assert [d.done for d in reader.feed("}")] == [True]


def test_deltas_stop_at_once_for_invalid_json():
    reader = ToolCallReader("hermes")
    reader.feed('<tool_call>{"name": "f", "arguments": {"a": 1')
    assert [d.arguments for d in reader.feed("x }}</tool_call>")] == []
    assert reader.finish() is None


@pytest.mark.parametrize("kind, text", MALFORMED)
def test_malformed_text_has_no_calls(kind, text):
    assert reference(text, kind) is None
    for chunks in splits(text, 1):
        streamed, final = stream(kind, chunks)
        assert final is None and not any(c["done"] and c["name"] is None for c in streamed)


@pytest.mark.parametrize("kind, text, expected", VALID)
def test_every_truncation_is_safe(kind, text, expected):
    """A reply cut anywhere (the length limit): no exception, and what it streamed is a prefix of what it would
    have been whole."""
    full = joined(d for d in ToolCallReader(kind).feed(text))
    for n in range(len(text)):
        streamed, final = stream(kind, [text[:n]])
        for got, want in zip(streamed, full):
            assert want["arguments"].startswith(got["arguments"]) and got["name"] == want["name"]
        if final is not None:  # whole calls (and at most a cut closing tag) before the cut
            assert [c["function"]["name"] for c in final] == [c["name"] for c in full[:len(final)]]


def test_agrees_with_json_loads_on_random_mutations():
    rng = random.Random(0)
    alphabet = '{}[]":, \n\\abnu0123456789.-e<>/_tool_cals'
    checked = 0
    for kind, text, _ in VALID:
        if text.count(TOOL_TAGS[kind][1]) > text.count(TOOL_TAGS[kind][0]):  # a tag in a string: the plain reading
            continue  # cannot read these
        for _ in range(300):
            mutated = mutated_text(text, rng, alphabet)
            if not mutated.startswith(TOOL_TAGS[kind][0]):
                continue  # the samples are tool text, which begins at its tag
            got = plain(parse_tool_calls(mutated, kind))
            want = reference(mutated, kind)
            if got != want and want is None and mutated.rstrip().endswith(tuple(
                    TOOL_TAGS[kind][1][:n] for n in range(1, len(TOOL_TAGS[kind][1])))):
                continue  # a complete call before a cut closing tag is read as a call
            assert got == want, mutated
            for chunks in splits(mutated, 2)[:3]:
                streamed, final = stream(kind, chunks)
                assert plain(final) == got
                if final is not None:
                    assert [c["arguments"] for c in streamed] == [c["function"]["arguments"] for c in final]
            checked += 1
    assert checked > 1000


@pytest.mark.parametrize("fmt, text, started", [
    ("hermes+think", '<think>hmm</think>Sure. <tool_call>{"name": "f", "arguments": {"a": "<tool_call>"}}'
                     '</tool_call>\n<tool_call>{"name": "g", "arguments": {}}</tool_call>', False),
    ("hermes", 'Let me <b>check</b>\n<tool_call>{"arguments": {"x": 1}, "name": "f"}</tool_call>', False),
    ("jamba", '<tool_calls>[{"name": "a", "arguments": {"q": 1}}, {"name": "b", "arguments": {}}]</tool_calls>',
     False),
    ("hermes+think", 'plan</think>\n<tool_call>{"name": "f", "arguments": {"a": 1}', True),
    ("hermes", 'Sure <tool_call>{"name": "a", "arguments": {"x": 1', False),  # cut: content, as without streaming
])
def test_output_parser_streams_calls(fmt, text, started):
    whole = parse_assistant_output(text, fmt, started_in_reasoning=started)
    for chunks in splits(text, 3):
        parser = StreamingOutputParser(fmt, started_in_reasoning=started, stream_tool_calls=True)
        parts = [part for chunk in chunks for part in parser.feed(chunk)] + parser.flush()
        out = parser.finish()
        assert (out.content, out.reasoning_content, plain(out.tool_calls)) == (
            whole.content, whole.reasoning_content, plain(whole.tool_calls))
        assert "".join(p.get("content", "") for p in parts) == (out.content or "")
        assert "".join(p.get("reasoning_content", "") for p in parts) == (out.reasoning_content or "")
        calls = joined(p["tool_call"] for p in parts if "tool_call" in p)
        if out.tool_calls:
            assert [(c["id"], c["name"], c["arguments"]) for c in calls] == [
                (c["id"], c["function"]["name"], c["function"]["arguments"]) for c in out.tool_calls]
        else:
            assert not any(c["done"] for c in calls)  # a cut call was started but never ended
    quiet = StreamingOutputParser(fmt, started_in_reasoning=started)
    assert not any("tool_call" in p for p in quiet.feed(text) + quiet.flush())
