"""Forced tool calls: `tool_choice` "required" or a named function, enforced by constrained decoding.

The reply must be the checkpoint's tool-call markup around one call, then one of the request's end tokens:

- Hermes (Jamba2, Jamba Reasoning 3B): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`;
- Jamba 1.5-1.7: `<tool_calls>[{"name": ..., "arguments": {...}}]</tool_calls>`.

When the prompt itself opened a `<think>` block, the reply starts with `</think>\\n\\n` (an empty reasoning): the
call is forced at once, as vLLM does for a named function; a model gets no room to think first.

`ToolCallGrammar` is a byte-level recogniser with `json_mode.JsonGrammar`'s interface (`start`, `step`, `feed`,
`complete`, `in_string_body`), so `JsonVocabulary` masks tokens with it as it does for JSON mode: a sequence of
parts, each a literal (bytes) or a set of JSON grammars (json_schema.py's) run side by side, one per tool the call
may name. A call's JSON is `{"name": <the name>, "arguments": <the tool's parameters schema>}` (any key order, no
other keys); parameters that use keywords the schema compiler refuses fall back to any JSON object. A part's
documents end where its grammars accept no more bytes (a JSON object or array takes only whitespace once closed),
and the next literal begins with `<`, so the sequence never has to guess where a part ends.

The literals may also come as added tokens (Qwen-style `<tool_call>`, Jamba's `<tool_calls>`), which have no
bytes in the vocabulary's trie: `ToolCallConstraint` allows an added token whose text is a prefix of what is left
of the literal at hand (or completes it), including a closing literal right after a complete call.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ..chat_format import THINK_CLOSE, TOOL_TAGS
from .json_mode import ByteGrammar, JsonConstraint, JsonVocabulary
from .json_schema import compile_schema

ANY_OBJECT: dict[str, Any] = {"type": "object"}


class ToolCallGrammar(ByteGrammar):
    """Parts in order: a literal (bytes) or a tuple of grammars (alternatives). State: ((), part, data) where data
    is the position in a literal, or for grammars (the alternatives still alive as ((index, state), ...), how many
    bytes of the next literal the part's bytes end with); part == len(parts) is the end. The empty first element
    keeps JsonVocabulary's mask cache key (it slices state[0]) working.

    A grammar part may not contain the literal after it (in a JSON string): the parser would end the call there.
    Such a literal must have its only `<` at its start (true of every tool-call tag), so how much of it the bytes
    end with is tracked without backtracking."""

    def __init__(self, parts: Sequence[bytes | tuple]) -> None:
        if not parts or any(isinstance(p, bytes) and not p for p in parts):
            raise ValueError("a tool-call grammar needs parts, and no empty literal")
        self.parts = tuple(parts)
        self.guards = tuple(self._guard(i) for i in range(len(self.parts)))

    def _guard(self, part: int) -> bytes | None:
        """The literal a grammar part must not contain: the one after it."""
        if isinstance(self.parts[part], bytes) or part + 1 == len(self.parts):
            return None
        literal = self.parts[part + 1]
        if not isinstance(literal, bytes) or literal[:1] != b"<" or literal.count(b"<") != 1:
            raise ValueError("a grammar part must be followed by a literal that begins with its only '<'")
        return literal

    def _entry(self, part: int) -> tuple:
        if part == len(self.parts) or isinstance(self.parts[part], bytes):
            return ((), part, 0)
        return ((), part, (tuple((i, g.start()) for i, g in enumerate(self.parts[part])), 0))

    def start(self) -> tuple:
        return self._entry(0)

    def complete(self, state: tuple) -> bool:
        return state[1] == len(self.parts)

    def in_string_body(self, state: tuple) -> bool:
        """Inside a free JSON string for some alternative, with no part of the next literal just written: every
        plain string-body token is then allowed (that alternative takes it) except one that contains the whole
        literal (`ToolCallConstraint` takes those out), and only the other tokens need walking."""
        part = state[1]
        if part == len(self.parts) or isinstance(self.parts[part], bytes):
            return False
        grammars, (alive, matched) = self.parts[part], state[2]
        return matched == 0 and any(grammars[i].in_string_body(s) for i, s in alive)

    def step(self, state: tuple, byte: int) -> tuple | None:
        _, part, data = state
        if part == len(self.parts):
            return None
        kind = self.parts[part]
        if isinstance(kind, bytes):
            if kind[data] != byte:
                return None
            return self._entry(part + 1) if data + 1 == len(kind) else ((), part, data + 1)
        alive, matched = data
        after = tuple((i, s) for i, old in alive if (s := kind[i].step(old, byte)) is not None)
        if after:
            guard = self.guards[part]
            if guard is not None:
                matched = 1 if byte == 0x3C else matched + 1 if guard[matched] == byte else 0
                if matched == len(guard):
                    return None
            return ((), part, (after, matched))
        if self._done(kind, alive) and part + 1 < len(self.parts):
            return self.step(self._entry(part + 1), byte)
        return None

    @staticmethod
    def _done(grammars: tuple, alive: tuple) -> bool:
        return any(grammars[i].complete(s) for i, s in alive)

    def literal_at(self, state: tuple) -> tuple[int, int] | None:
        """(part, position) of the literal a token may continue in `state`: the literal it is in, or the one that
        starts right after a complete JSON part; None elsewhere."""
        _, part, data = state
        if part == len(self.parts):
            return None
        if isinstance(self.parts[part], bytes):
            return part, data
        nxt = part + 1
        if nxt < len(self.parts) and isinstance(self.parts[nxt], bytes) and self._done(self.parts[part], data[0]):
            return nxt, 0
        return None


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


def tool_call_grammar(kind: str, functions: Sequence[dict], opens_reasoning: bool = False) -> ToolCallGrammar:
    """The grammar of a reply that calls one of `functions` (OpenAI function definitions: name, parameters) in
    output format `kind` ("hermes" or "jamba"); `opens_reasoning`: the prompt ended inside `<think>`."""
    if kind not in TOOL_TAGS:
        raise ValueError(f"no tool-call format {kind!r}")
    open_tag, close_tag = (t.encode() for t in TOOL_TAGS[kind])
    if opens_reasoning:
        open_tag = THINK_CLOSE.encode() + b"\n\n" + open_tag
    grammars = tuple(call_grammar(f["name"], f.get("parameters"), kind == "jamba")[0] for f in functions)
    return ToolCallGrammar((open_tag, grammars, close_tag))


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
        # plain string-body tokens that hold a whole guard: a call's strings may not take them
        self.holding_guard = sorted({i for g in grammar.guards if g is not None
                                     for i in vocabulary.string_tokens_containing(g)})
        self.literal_tokens: dict[tuple[int, int], list[tuple[int, bytes]]] = {}
        for part, literal in enumerate(grammar.parts):
            if not isinstance(literal, bytes):
                continue
            for pos in range(len(literal)):
                rest = literal[pos:]
                fits = [(i, text) for i, text in added.items() if rest.startswith(text)]
                if fits:
                    self.literal_tokens[(part, pos)] = fits

    def constraint(self, end_ids: Iterable[int] = ()) -> ToolCallConstraint:
        return ToolCallConstraint(self, list(end_ids))


class ToolCallConstraint(JsonConstraint):
    """JsonConstraint over a ToolCallGrammar, plus the added tokens that spell (part of) a literal."""

    def __init__(self, choice: ToolChoice, end_ids: Sequence[int] = ()) -> None:
        super().__init__(choice.vocabulary, end_ids, choice.grammar)
        self.choice = choice

    def _literal_tokens(self) -> tuple[tuple[int, int] | None, list[tuple[int, bytes]]]:
        at = self.grammar.literal_at(self.state)
        return at, (self.choice.literal_tokens.get(at, []) if at is not None else [])

    def _after(self, token: int) -> tuple | None:
        data = self.vocabulary.token_bytes[token] if 0 <= token < self.vocabulary.size else None
        if data:
            return self.grammar.feed(self.state, data)
        at, fits = self._literal_tokens()
        text = next((t for i, t in fits if i == token), None)
        return None if text is None else self.grammar.feed(((), at[0], at[1]), text)

    def _allowed(self) -> torch.Tensor:
        mask = self.vocabulary.allowed(self.state, self.grammar)
        _, fits = self._literal_tokens()
        ids = [i for i, _ in fits if i < self.vocabulary.size and i not in self._eos]
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


def cache_key(kind: str, functions: Sequence[dict], opens_reasoning: bool) -> str:
    return json.dumps([kind, opens_reasoning, [[f["name"], f.get("parameters")] for f in functions]],
                      sort_keys=True)
