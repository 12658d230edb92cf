"""Structured output: `response_format: {"type": "json_schema", ...}` for a practical subset of JSON Schema.

`compile_schema(schema)` turns a schema into a `SchemaGrammar`, a byte-level recogniser with the interface of
`json_mode.JsonGrammar` (`start`, `step`, `feed`, `complete`), so `JsonVocabulary` masks tokens with it as it does
for JSON mode. Every document it accepts is valid against the schema. What it enforces:

- `type` (one or a list), `properties` with `required`, `additionalProperties` (an object with `properties`
  is written with those keys only, each at most once, in any order, the required ones before it may close: extra
  keys are never generated, which every schema allows; an object with no `properties` takes any keys, with
  values of `additionalProperties`' schema when it has one), `items`, `minItems`, `maxItems`, `enum`, `const`,
  `anyOf` / `oneOf` whose alternatives begin with different bytes (a string and null: yes; two objects: no),
  `$ref` into `$defs` / `definitions` (recursion included);
- annotations are ignored (title, description, default, examples, ...); `strict` is accepted (this is always
  strict). Any other keyword (pattern, format, minLength, minimum, ...) is refused with a ValueError naming it
  rather than silently not enforced.

States are immutable tuples (open containers, mode, data) as in json_mode. A container is a frame: ("o", node,
the keys written so far) or ("a", node, items so far). Free strings use json_mode's string modes (STR & co), so
the vocabulary's string-body shortcut holds for them, and for strings inside generic values: a generic value (a
schema of any value, a number, an object without properties) is a JsonGrammar state inside this one's (mode GEN),
handed back when it can take no more.
"""

from __future__ import annotations

import json
from typing import Any

from .json_mode import STR, STR_ESC, STR_HEX, STR_UTF, WHITESPACE, ByteGrammar, JsonGrammar

VALUE, OBJ_FIRST, OBJ_KEY, KEY, COLON, AFTER, ARR_FIRST, DONE, GEN, LIT = range(20, 30)
WS_MODES = frozenset((OBJ_FIRST, OBJ_KEY, AFTER, ARR_FIRST, DONE))  # data: the whitespace run
WS_PAIR_MODES = frozenset((VALUE, COLON))  # data: (node, whitespace run)

ANNOTATIONS = frozenset(("title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
                         "readOnly", "writeOnly", "$defs", "definitions"))
KEYWORDS = frozenset(("type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems",
                      "enum", "const", "anyOf", "oneOf", "$ref"))
VALUE_STARTS = frozenset(b'{["-0123456789tfn')
NUMBER_STARTS = frozenset(b"-0123456789")
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")

_ANY = JsonGrammar(object_only=False)
_STRINGS = JsonGrammar()  # its string modes, for the bytes of free strings


class _Compiler:
    """Schema -> nodes (tuples in a list; a node id is an index), $refs resolved through a memo so that recursive
    definitions refer to their own node."""

    def __init__(self, root: dict) -> None:
        self.root = root
        self.nodes: list[tuple] = []
        self.refs: dict[str, int] = {}

    def add(self, node: tuple) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def compile(self, schema: Any, where: str) -> int:
        if schema is True or schema == {}:
            return self.add(("any",))
        if not isinstance(schema, dict):
            raise ValueError(f"{where}: a schema must be an object, got {schema!r}")
        unknown = sorted(set(schema) - KEYWORDS - ANNOTATIONS)
        if unknown:
            raise ValueError(f"{where}: {', '.join(unknown)} is not supported (supported: "
                             f"{', '.join(sorted(KEYWORDS))})")
        if "$ref" in schema:
            return self.ref(schema["$ref"], where)
        if "const" in schema:
            return self.enum([schema["const"]], where)
        if "enum" in schema:
            if not isinstance(schema["enum"], list) or not schema["enum"]:
                raise ValueError(f"{where}.enum: must be a non-empty list")
            return self.enum(schema["enum"], where)
        for word in ("anyOf", "oneOf"):
            if word in schema:
                options = schema[word]
                if not isinstance(options, list) or not options:
                    raise ValueError(f"{where}.{word}: must be a non-empty list of schemas")
                return self.union([self.compile(s, f"{where}.{word}[{i}]") for i, s in enumerate(options)], where)
        kind = schema.get("type")
        if isinstance(kind, list):
            rest = {k: v for k, v in schema.items() if k != "type"}
            return self.union([self.compile({**rest, "type": t}, where) for t in kind], where)
        if kind is None:
            kind = "object" if "properties" in schema else "array" if "items" in schema else None
        if kind is None:
            return self.add(("any",))
        if kind not in TYPES:
            raise ValueError(f"{where}.type: unknown type {kind!r}")
        if kind == "object":
            return self.object(schema, where)
        if kind == "array":
            return self.array(schema, where)
        if kind == "string":
            return self.add(("string",))
        if kind in ("number", "integer"):
            return self.add(("number", kind == "integer"))
        return self.enum([True, False] if kind == "boolean" else [None], where)

    def ref(self, ref: Any, where: str) -> int:
        if ref in self.refs:
            return self.refs[ref]
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise ValueError(f"{where}.$ref: only references inside the schema (#/$defs/NAME) are supported")
        target: Any = self.root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise ValueError(f"{where}.$ref: {ref} does not exist")
            target = target[part]
        self.refs[ref] = index = self.add(("ref",))  # filled in below; a recursive reference points here
        target_index = self.compile(target, ref)
        if target_index == index:
            raise ValueError(f"{where}.$ref: {ref} refers to itself")
        self.nodes[index] = ("ref", target_index)
        return index

    def enum(self, values: list, where: str) -> int:
        texts = frozenset(json.dumps(v, ensure_ascii=False, separators=(",", ":")).encode() for v in values)
        prefixes = frozenset(t[:n] for t in texts for n in range(1, len(t) + 1))
        return self.add(("enum", texts, prefixes))

    def union(self, options: list[int], where: str) -> int:
        dispatch: dict[int, int] = {}
        for option in options:
            for byte in self.first_bytes(option, where):
                if byte in dispatch and dispatch[byte] != option:
                    raise ValueError(f"{where}: alternatives that can begin with the same byte ({chr(byte)!r}) are not "
                                     "supported (e.g. two object schemas, or integer and number)")
                dispatch[byte] = option
        return self.add(("union", dispatch))

    def first_bytes(self, index: int, where: str) -> frozenset[int]:
        node = self.nodes[index]
        while node[0] == "ref":
            if len(node) == 1:  # a definition still being compiled: a recursive reference
                raise ValueError(f"{where}: a recursive $ref as an alternative of anyOf/oneOf is not supported")
            node = self.nodes[node[1]]
        kind = node[0]
        if kind == "any":
            return VALUE_STARTS
        if kind in ("object", "free_object"):
            return frozenset(b"{")
        if kind == "array":
            return frozenset(b"[")
        if kind == "string":
            return frozenset(b'"')
        if kind == "number":
            return NUMBER_STARTS
        if kind == "enum":
            return frozenset(t[0] for t in node[1])
        return frozenset(node[1])  # union

    def object(self, schema: dict, where: str) -> int:
        properties = schema.get("properties") or {}
        required = schema.get("required") or []
        extra = schema.get("additionalProperties")
        if not isinstance(properties, dict) or not isinstance(required, list):
            raise ValueError(f"{where}: properties must be an object and required a list")
        missing = [name for name in required if name not in properties]
        if missing:
            raise ValueError(f"{where}.required: {missing} are not in properties")
        if not properties:
            if extra is None or extra is True or extra == {}:
                return self.add(("free_object", None))
            if extra is False:
                return self.enum([{}], where)
            index = self.add(("free_object", None))
            self.nodes[index] = ("free_object", self.compile(extra, f"{where}.additionalProperties"))
            return index
        index = self.add(("object",))
        values = {name: self.compile(s, f"{where}.properties.{name}") for name, s in properties.items()}
        keys = {json.dumps(name, ensure_ascii=False).encode(): name for name in properties}
        prefixes = frozenset(k[:n] for k in keys for n in range(1, len(k) + 1))
        self.nodes[index] = ("object", values, keys, prefixes, frozenset(required))
        return index

    def array(self, schema: dict, where: str) -> int:
        low, high = schema.get("minItems", 0), schema.get("maxItems")
        if not isinstance(low, int) or low < 0 or (high is not None and (not isinstance(high, int) or high < low)):
            raise ValueError(f"{where}: minItems and maxItems must be integers, 0 <= minItems <= maxItems")
        index = self.add(("array",))
        self.nodes[index] = ("array", self.compile(schema.get("items", {}), f"{where}.items"), low, high)
        return index


def compile_schema(schema: Any, max_whitespace: int | None = None) -> SchemaGrammar:
    """The grammar of `schema`; ValueError naming what is not supported."""
    compiler = _Compiler(schema if isinstance(schema, dict) else {})
    root = compiler.compile(schema, "schema")
    return SchemaGrammar(compiler.nodes, root, max_whitespace)


class SchemaGrammar(ByteGrammar):
    def __init__(self, nodes: list[tuple], root: int, max_whitespace: int | None = None) -> None:
        self.nodes = [self._resolve(nodes, node) for node in nodes]
        self.root = root
        self.max_whitespace = max_whitespace if max_whitespace is not None else _ANY.max_whitespace

    @staticmethod
    def _resolve(nodes: list[tuple], node: tuple) -> tuple:
        for _ in range(len(nodes)):
            if node[0] != "ref":
                return node
            node = nodes[node[1]]
        raise ValueError("schema: $refs that only refer to each other")

    def start(self) -> tuple:
        return ((), VALUE, (self.root, 0))

    def in_string_body(self, state: tuple) -> bool:
        """A free string at a character boundary, this grammar's own or a generic value's."""
        return state[1] == STR or (state[1] == GEN and state[2][0][1] == STR)

    def complete(self, state: tuple) -> bool:
        frames, mode, data = state
        if frames:
            return False
        return mode == DONE or (mode == GEN and _ANY.complete(data[0])) or (
            mode == LIT and data[1] in self.nodes[data[0]][1])

    def step(self, state: tuple, byte: int) -> tuple | None:
        frames, mode, data = state
        if mode == STR:
            if byte != 0x22:
                return _STRINGS.step(state, byte)
            return (frames, COLON, (self.nodes[frames[-1][1]][1], 0)) if data else _value_done(frames)
        if mode in (STR_ESC, STR_HEX, STR_UTF):
            return _STRINGS.step(state, byte)
        if mode == GEN:
            inner, integer = data
            after = None if integer and byte in b".eE" else _ANY.step(inner, byte)
            if after is not None:
                return (frames, GEN, (after, integer))
            return self.step(_value_done(frames), byte) if _ANY.complete(inner) else None
        if mode == LIT:
            index, typed = data
            node, longer = self.nodes[index], typed + bytes((byte,))
            if longer in node[2]:
                return (frames, LIT, (index, longer))
            return self.step(_value_done(frames), byte) if typed in node[1] else None
        if mode == KEY:
            return self._key(frames, data + bytes((byte,)))
        if byte in WHITESPACE:
            if mode in WS_PAIR_MODES:
                return (frames, mode, (data[0], data[1] + 1)) if data[1] < self.max_whitespace else None
            return (frames, mode, data + 1) if data < self.max_whitespace else None
        return self._structural(frames, mode, data, byte)

    def _structural(self, frames: tuple, mode: int, data, byte: int) -> tuple | None:
        if mode == VALUE:
            return self._open(frames, data[0], byte)
        if mode == COLON:
            return (frames, VALUE, (data[0], 0)) if byte == 0x3A else None
        if mode == DONE:
            return None
        top = frames[-1]
        node = self.nodes[top[1]]
        if top[0] == "a":
            _, items, low, high = node
            if mode == ARR_FIRST:
                if byte == 0x5D:
                    return _value_done(frames[:-1]) if low == 0 else None
                return self._open(frames, items, byte) if high != 0 else None
            if byte == 0x2C:  # mode AFTER
                return (frames, VALUE, (items, 0)) if high is None or top[2] < high else None
            return _value_done(frames[:-1]) if byte == 0x5D and top[2] >= low else None
        free = node[0] == "free_object"
        seen = top[2]
        if byte == 0x7D and mode in (OBJ_FIRST, AFTER):
            return _value_done(frames[:-1]) if free or node[4] <= set(seen) else None
        more = free or len(seen) < len(node[1])
        if byte == 0x2C and mode == AFTER:
            return (frames, OBJ_KEY, 0) if more else None
        if byte == 0x22 and mode in (OBJ_FIRST, OBJ_KEY) and more:
            return (frames, STR, True) if free else (frames, KEY, b'"')
        return None

    def _key(self, frames: tuple, typed: bytes) -> tuple | None:
        """A closed object's key, `typed` so far (its quotes included): one of the keys not written yet."""
        top = frames[-1]
        _, values, keys, prefixes, _ = self.nodes[top[1]]
        if typed not in prefixes:
            return None
        name = keys.get(typed)
        if name is not None:
            if name in top[2]:
                return None
            frames = frames[:-1] + (("o", top[1], tuple(sorted((*top[2], name)))),)
            return (frames, COLON, (values[name], 0))
        if all(name in top[2] for key, name in keys.items() if key.startswith(typed)):
            return None  # only keys already written begin so
        return (frames, KEY, typed)

    def _open(self, frames: tuple, index: int, byte: int) -> tuple | None:
        """The state after the first byte of a value of node `index`."""
        node = self.nodes[index]
        kind = node[0]
        if kind == "string":
            return (frames, STR, False) if byte == 0x22 else None
        if kind == "object":
            return (frames + (("o", index, ()),), OBJ_FIRST, 0) if byte == 0x7B else None
        if kind == "free_object":
            if byte != 0x7B:
                return None
            if node[1] is None:
                return (frames, GEN, (_ANY.step(_ANY.start(), byte), False))
            return (frames + (("o", index, ()),), OBJ_FIRST, 0)
        if kind == "array":
            return (frames + (("a", index, 0),), ARR_FIRST, 0) if byte == 0x5B else None
        if kind == "enum":
            first = bytes((byte,))
            return (frames, LIT, (index, first)) if first in node[2] else None
        if kind == "union":
            target = node[1].get(byte)
            return None if target is None else self._open(frames, target, byte)
        if kind == "number" and byte not in NUMBER_STARTS:
            return None
        inner = _ANY.step(_ANY.start(), byte)  # "any", "number"
        return None if inner is None else (frames, GEN, (inner, kind == "number" and node[1]))


def _value_done(frames: tuple) -> tuple:
    if not frames:
        return (frames, DONE, 0)
    top = frames[-1]
    if top[0] == "a":
        frames = frames[:-1] + (("a", top[1], top[2] + 1),)
    return (frames, AFTER, 0)
