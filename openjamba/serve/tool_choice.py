"""Forced tool calls: `tool_choice` "required" or a named function, enforced by constrained decoding.

The reply must be the checkpoint's tool-call markup around the call(s), then one of the request's end tokens:

- Hermes (Jamba2, Jamba Reasoning 3B): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per
  call (several separated by optional whitespace);
- Jamba 1.5-1.7: `<tool_calls>[{"name": ..., "arguments": {...}}, ...]</tool_calls>`, one array.

A named function, or "required" with `parallel_tool_calls: false`, gets exactly one call; "required" otherwise gets
one or more (after each complete call: another, or the end).

Reasoning first. When the prompt itself opened a `<think>` block (Jamba Reasoning 3B's and Jamba2's generation
prompts end with `<think>`), the reply starts with free text up to and including the first `</think>`, then
optional whitespace, then the call: the model thinks as long as it likes (max_tokens still cuts it: finish_reason
"length", no call), and only what follows the reasoning is constrained, as OpenAI's reasoning models and vLLM's
reasoning parsers do. When the prompt did not open one, the call comes at once, even where the template knows
`<think>` and a model might open it itself: such a template has put the model out of reasoning (`enable_thinking:
false` writes an empty block) or never into it, and a forced reply that may wander into unbounded reasoning would
more often end without the call the client asked for (the tests' random model, offered the choice, took it and
reasoned until max_tokens).

`ToolCallGrammar` is a byte-level recogniser with `json_mode.JsonGrammar`'s interface (`start`, `step`, `feed`,
`complete`, `in_string_body`), so `JsonVocabulary` masks tokens with it as it does for JSON mode. It is a small
nondeterministic automaton over parts: a literal (bytes), `Calls` (a set of JSON grammars, json_schema.py's, run side
by side, one per tool the call may name), `Free` (the reasoning) and `Space` (optional whitespace), each followed by
one part or a choice of parts (a loop back for another call, or the end). A state is the tuple of its live threads,
(part, data) each, usually one. A call's JSON is `{"name": <the name>, "arguments": <the tool's parameters
schema>}` (any key order, no other keys); parameters that use keywords the schema compiler refuses fall back to any
JSON object. A call's strings may not contain the closing tag (the parser would end the call there; escaped
`<\\/tool_call>` is fine). A call ends where its grammars accept no more bytes (a JSON object takes only whitespace
once closed), and what may follow begins with a byte no JSON object continues with, so the threads stay few.

The reasoning costs no mask: while the state is in `Free`, `feed` only looks for the closing tag with
`bytes.find`, so the sampler's check of the model's own pick (the usual case) is a few microseconds; a mask (every
token but the end tokens and those that close the tag into something the call cannot start with) is built only
when that pick is refused, once per position in the tag.

The literals may also come as added tokens (Qwen-style `<tool_call>`, Jamba's `<tool_calls>`, `</think>`), which
have no bytes in the vocabulary's trie: `ToolCallConstraint` allows an added token whose text is a prefix of what
is left of a literal at hand (or completes it), including a closing literal right after a complete call, and any
added token in the reasoning other than the end tokens (its text read as bytes: `</think>` closes the reasoning;
a text that would reach past the tag is refused, as one that would leave a literal is).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..chat_format import THINK_CLOSE, TOOL_TAGS
from .json_mode import MAX_WHITESPACE, WHITESPACE, ByteGrammar, JsonConstraint, JsonVocabulary
from .json_schema import compile_schema

ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True, eq=False)
class Calls:
    """One call's JSON: `grammars` run side by side (one per tool it may name). Its bytes may not contain `guard`
    (the closing tag, where the parser would cut the call), which must have its only `<` at its start so that how
    much of it the bytes end with is tracked without backtracking."""

    grammars: tuple
    guard: bytes


@dataclass(frozen=True)
class Free:
    """Any bytes up to and including the first `tag` (the reasoning, up to `</think>`); `tag` has its only `<` at
    its start, as a guard does."""

    tag: bytes


@dataclass(frozen=True)
class Space:
    """Optional whitespace, at most `most` bytes."""

    most: int = MAX_WHITESPACE


def _one_angle_first(tag: bytes) -> bool:
    return tag[:1] == b"<" and tag.count(b"<") == 1


def _advance(tag: bytes, matched: int, byte: int) -> int:
    """How much of `tag` (its only `<` first) the bytes end with after `byte`, when they ended with `matched`."""
    return 1 if byte == 0x3C else matched + 1 if tag[matched] == byte else 0


def _partial(seen: bytes, tag: bytes) -> int:
    """How much of `tag` (its only `<` first, not whole in `seen`) `seen` ends with: a suffix from its last `<`."""
    at = seen.rfind(b"<", max(0, len(seen) - len(tag) + 1))
    return len(seen) - at if at >= 0 and tag.startswith(seen[at:]) else 0


def _unique(threads: list) -> tuple:
    return tuple(threads) if len(threads) < 2 else tuple(dict.fromkeys(threads))


class ToolCallGrammar(ByteGrammar):
    """Parts (bytes, `Calls`, `Free`, `Space`) with their successors: `nexts[i]` the parts that may follow part i
    (default i + 1; `len(parts)` is the end), `nexts[-1]` those that may come first (default 0). A `Space` may be
    skipped, so entering it enters its successors too. State: ((), threads, None), a thread (part, data): data is
    the position in a literal, how much of the tag a `Free` part's bytes end with, the length of a `Space` run, or
    for `Calls` (the alternatives still alive as ((index, state), ...), how much of the guard the bytes end with).
    A complete call enters its successors at once, beside its own thread (which then takes only whitespace). The
    empty first element keeps JsonVocabulary's mask cache key (it slices state[0]) working."""

    def __init__(self, parts: Sequence[bytes | Calls | Free | Space],
                 nexts: dict[int, Sequence[int]] | None = None) -> None:
        if not parts or any(isinstance(p, bytes) and not p for p in parts):
            raise ValueError("a tool-call grammar needs parts, and no empty literal")
        for p in parts:
            if isinstance(p, (Calls, Free)) and not _one_angle_first(p.guard if isinstance(p, Calls) else p.tag):
                raise ValueError("a guard or reasoning tag must begin with its only '<'")
        self.parts = tuple(parts)
        self.end = len(self.parts)
        given = dict(nexts or {})
        self.nexts = {i: tuple(given.get(i, (i + 1,))) for i in range(-1, self.end)}
        self.guards = tuple(p.guard for p in self.parts if isinstance(p, Calls))
        self.free_parts = frozenset(i for i, p in enumerate(self.parts) if isinstance(p, Free))
        self.after = {i: self._enter(self.nexts[i], ()) for i in range(-1, self.end)}  # threads entered after i

    def _enter(self, parts: tuple[int, ...], seen: tuple[int, ...]) -> tuple:
        out: list = []
        for part in parts:
            if part in seen:
                raise ValueError("a loop of Space parts")
            if part == self.end:
                out.append((part, 0))
                continue
            kind = self.parts[part]
            if isinstance(kind, Calls):
                out.append((part, (tuple((i, g.start()) for i, g in enumerate(kind.grammars)), 0)))
            else:
                out.append((part, 0))
            if isinstance(kind, Space):
                out.extend(self._enter(self.nexts[part], (*seen, part)))
        return _unique(out)

    def start(self) -> tuple:
        return ((), self.after[-1], None)

    def complete(self, state: tuple) -> bool:
        return any(part == self.end for part, _ in state[1])

    def in_string_body(self, state: tuple) -> bool:
        """Inside a free JSON string for some alternative of a call, with no part of the guard just written: every
        plain string-body token is then allowed (that alternative takes it) except one that contains the whole
        guard (`ToolCallConstraint` takes those out), and only the other tokens need walking."""
        for part, data in state[1]:
            kind = self.parts[part] if part < self.end else None
            if isinstance(kind, Calls) and data[1] == 0 and any(kind.grammars[i].in_string_body(s)
                                                                for i, s in data[0]):
                return True
        return False

    def in_reasoning(self, state: tuple) -> bool:
        """Whether every thread is in the reasoning (where the constraint needs no mask for the model's pick)."""
        return all(part in self.free_parts for part, _ in state[1])

    def step(self, state: tuple, byte: int) -> tuple | None:
        out: list = []
        for thread in state[1]:
            self._step(thread, byte, out)
        return ((), _unique(out), None) if out else None

    def _step(self, thread: tuple, byte: int, out: list) -> None:
        part, data = thread
        if part == self.end:
            return
        kind = self.parts[part]
        if type(kind) is bytes:
            if kind[data] == byte:
                if data + 1 == len(kind):
                    out.extend(self.after[part])
                else:
                    out.append((part, data + 1))
        elif type(kind) is Calls:
            alive, matched = data
            grammars = kind.grammars
            moved = tuple((i, s) for i, old in alive if (s := grammars[i].step(old, byte)) is not None)
            if moved:
                matched = _advance(kind.guard, matched, byte)
                if matched == len(kind.guard):
                    return
                out.append((part, (moved, matched)))
                if any(grammars[i].complete(s) for i, s in moved):
                    out.extend(self.after[part])
        elif type(kind) is Free:
            matched = _advance(kind.tag, data, byte)
            if matched == len(kind.tag):
                out.extend(self.after[part])
            else:
                out.append((part, matched))
        elif byte in WHITESPACE and data < kind.most:  # Space
            out.append((part, data + 1))
            out.extend(self.after[part])

    def feed(self, state: tuple | None, data: bytes) -> tuple | None:
        """As ByteGrammar's, but the reasoning's bytes are skimmed with one `bytes.find` for the closing tag."""
        if state is None:
            return None
        threads = state[1]
        if len(threads) == 1 and threads[0][0] in self.free_parts:
            part, matched = threads[0]
            tag = self.parts[part].tag
            seen = tag[:matched] + data
            at = seen.find(tag)
            if at < 0:
                return ((), ((part, _partial(seen, tag)),), None)
            state, data = ((), self.after[part], None), seen[at + len(tag):]
        return super().feed(state, data)

    def feed_added(self, state: tuple, text: bytes) -> tuple | None:
        """The state after an added token that reads `text`: it may only continue one literal (what is left of it
        starts with `text`) or lie in the reasoning (closing it at the latest with its last byte); None elsewhere."""
        out: list = []
        for part, data in state[1]:
            kind = self.parts[part] if part < self.end else None
            if type(kind) is bytes and kind.startswith(text, data):
                if data + len(text) == len(kind):
                    out.extend(self.after[part])
                else:
                    out.append((part, data + len(text)))
            elif type(kind) is Free:
                seen = kind.tag[:data] + text
                at = seen.find(kind.tag)
                if at < 0:
                    out.append((part, _partial(seen, kind.tag)))
                elif at + len(kind.tag) == len(seen):
                    out.extend(self.after[part])
        return ((), _unique(out), None) if out and text else None

    def literals_at(self, state: tuple) -> list[tuple[int, int]]:
        """(part, position) of each literal a token may continue in `state`."""
        return [(part, data) for part, data in state[1] if part < self.end and type(self.parts[part]) is bytes]


# ---------------------------------------------------------------------- building one from a request
def _rebased(schema: Any, prefix: str) -> Any:
    """`schema` with its local `$ref`s ("#/...") pointing into the place it is embedded at (`prefix`)."""
    if isinstance(schema, dict):
        out = {}
        for key, value in schema.items():
            if key == "$ref" and isinstance(value, str) and value.startswith("#"):
                out[key] = prefix + value[1:]
            else:
                out[key] = _rebased(value, prefix)
        return out
    if isinstance(schema, list):
        return [_rebased(v, prefix) for v in schema]
    return schema


def call_schema(name: str, parameters: dict | None, array: bool) -> dict:
    """JSON Schema of one call to `name` (an array of that one call when `array`: Jamba 1.5-1.7's format)."""
    prefix = "#/items/properties/arguments" if array else "#/properties/arguments"
    call = {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
            "properties": {"name": {"const": name},
                           "arguments": _rebased(copy.deepcopy(parameters or ANY_OBJECT), prefix)}}
    return {"type": "array", "items": call, "minItems": 1, "maxItems": 1} if array else call


def call_grammar(name: str, parameters: dict | None, array: bool):
    """(grammar of a call to `name`, whether its arguments follow `parameters`); arguments may be any JSON object
    when the compiler refuses `parameters` (a keyword outside its subset)."""
    try:
        return compile_schema(call_schema(name, parameters, array)), True
    except ValueError:
        return compile_schema(call_schema(name, ANY_OBJECT, array)), False


def tool_call_grammar(kind: str, functions: Sequence[dict], opens_reasoning: bool = False,
                      several: bool = False) -> ToolCallGrammar:
    """The grammar of a reply that calls `functions` (OpenAI function definitions: name, parameters) in output
    format `kind` ("hermes" or "jamba"). `opens_reasoning`: the prompt ended inside `<think>`, so the reply starts
    with the reasoning. `several`: one or more calls, else exactly one."""
    if kind not in TOOL_TAGS:
        raise ValueError(f"no tool-call format {kind!r}")
    open_tag, close_tag = (t.encode() for t in TOOL_TAGS[kind])
    parts: list = [Free(THINK_CLOSE.encode()), Space()] if opens_reasoning else []
    nexts: dict[int, tuple[int, ...]] = {}
    first = len(parts)
    array = kind == "jamba"
    grammars = tuple(call_grammar(f["name"], f.get("parameters"), array and not several)[0] for f in functions)
    if array and several:  # <tool_calls> [ call , call ... ] </tool_calls>: the array's punctuation is parts
        parts += [open_tag, Space(), b"[", Calls(grammars, close_tag), b",", b"]", Space(), close_tag]
        calls = first + 3
        nexts[calls], nexts[calls + 1] = (calls + 1, calls + 2), (calls,)
    else:
        parts += [open_tag, Calls(grammars, close_tag), close_tag]
        if several:  # Hermes: whitespace, then another block or the end
            parts.append(Space())
            nexts[len(parts) - 1] = (first, len(parts))
    return ToolCallGrammar(parts, nexts)


def added_token_bytes(tokenizer) -> dict[int, bytes]:
    """The text (UTF-8) of each added/special token that has no bytes in `token_bytes` (they may spell a literal)."""
    backend = getattr(tokenizer, "backend", None)
    if backend is None:
        return {}
    table = tokenizer.token_bytes()
    return {i: t.content.encode() for i, t in backend.get_added_tokens_decoder().items()
            if t.content and (i >= len(table) or table[i] is None)}


# ---------------------------------------------------------------------- the per-request constraint
class ToolChoice:
    """One compiled forced-call grammar with the added tokens that may spell its literals: its `constraint` is the
    per-row constraint factory (`SamplingParams.constraint`)."""

    def __init__(self, vocabulary: JsonVocabulary, grammar: ToolCallGrammar, added: dict[int, bytes]) -> None:
        self.vocabulary, self.grammar = vocabulary, grammar
        self.added = {i: text for i, text in added.items() if i < vocabulary.size}
        # plain string-body tokens that hold a whole guard: a call's strings may not take them
        self.holding_guard = sorted({i for g in grammar.guards for i in vocabulary.string_tokens_containing(g)})
        self.literal_tokens: dict[tuple[int, int], list[int]] = {}
        for part, literal in enumerate(grammar.parts):
            if not isinstance(literal, bytes):
                continue
            for pos in range(len(literal)):
                fits = [i for i, text in self.added.items() if literal.startswith(text, pos)]
                if fits:
                    self.literal_tokens[(part, pos)] = fits
        self._reasoning_masks: dict[tuple, torch.Tensor] = {}
        self._closers: list[tuple[int, bytes]] | None = None
        self._with_bytes = torch.zeros(0, dtype=torch.bool)

    def constraint(self, end_ids: Iterable[int] = ()) -> ToolCallConstraint:
        return ToolCallConstraint(self, list(end_ids))

    def reasoning_mask(self, state: tuple) -> torch.Tensor:
        """The tokens `state` (in the reasoning) allows, end tokens aside: all but those that close the tag into
        bytes the call cannot start with. Only a token with a `>` can close it, so only those are fed; one mask
        per position in the tag, kept."""
        mask = self._reasoning_masks.get(state)
        if mask is None:
            if self._closers is None:  # once per grammar: the tokens with bytes, and those with a `>`
                table = self.vocabulary.token_bytes
                self._with_bytes = torch.tensor([bool(b) for b in table], dtype=torch.bool)
                self._closers = [(i, b) for i, b in enumerate(table) if b and b">" in b]
            mask, grammar = self._with_bytes.clone(), self.grammar
            for i, data in self._closers:
                mask[i] = grammar.feed(state, data) is not None
            for i, text in self.added.items():
                mask[i] = grammar.feed_added(state, text) is not None
            self._reasoning_masks[state] = mask
        return mask


class ToolCallConstraint(JsonConstraint):
    """JsonConstraint over a ToolCallGrammar, plus the added tokens that spell (part of) a literal or lie in the
    reasoning. The last token checked is remembered, so `advance` after `allows` feeds it once."""

    def __init__(self, choice: ToolChoice, end_ids: Sequence[int] = ()) -> None:
        super().__init__(choice.vocabulary, end_ids, choice.grammar)
        self.choice = choice
        self._last: tuple = (None, None, None)  # (token, state, the state after it)

    def _after(self, token: int) -> tuple | None:
        state = self.state
        last_token, last_state, after = self._last
        if last_token == token and last_state is state:
            return after
        data = self.vocabulary.token_bytes[token] if 0 <= token < self.vocabulary.size else None
        if data:
            after = self.grammar.feed(state, data)
        else:
            text = self.choice.added.get(token)
            after = self.grammar.feed_added(state, text) if text else None
        self._last = (token, state, after)
        return after

    def _allowed(self) -> torch.Tensor:
        if self.grammar.in_reasoning(self.state):
            return self.choice.reasoning_mask(self.state)
        mask = self.vocabulary.allowed(self.state, self.grammar)
        ids = [i for at in self.grammar.literals_at(self.state) for i in self.choice.literal_tokens.get(at, ())
               if i not in self._eos]
        banned = self.choice.holding_guard if self.grammar.in_string_body(self.state) else []
        if ids or banned:
            mask = mask.clone()
            mask[ids] = True
            mask[banned] = False
        return mask


def functions_of(tools: Sequence[dict], name: str | None) -> list[dict]:
    """The function definitions a forced call may name: the one called `name`, or every tool's (None)."""
    functions = [t["function"] for t in tools]
    return [f for f in functions if f["name"] == name] if name is not None else functions


def cache_key(kind: str, functions: Sequence[dict], opens_reasoning: bool, several: bool) -> str:
    return json.dumps([kind, opens_reasoning, several, [[f["name"], f.get("parameters")] for f in functions]],
                      sort_keys=True)
