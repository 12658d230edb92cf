"""Structured output (`response_format: {"type": "json_schema"}`): the schema grammar accepts valid instances and
every prefix of them, rejects invalid ones, accepts only valid documents among random mutations (jsonschema as the
oracle), refuses what it does not enforce, and its masks equal brute force."""

from __future__ import annotations

import json
import random

import pytest
import torch

from openjamba.serve.json_mode import JsonVocabulary
from openjamba.serve.json_schema import compile_schema
from openjamba.tokenizer import load_tokenizer

from .conftest import mutated_text
from .tokenizer_fixtures import write_jamba2

SCHEMA = {
    "type": "object", "title": "Record", "additionalProperties": False, "required": ["name", "age", "tags"],
    "properties": {
        "name": {"type": "string", "description": "who"},
        "age": {"type": "integer"},
        "score": {"type": ["number", "null"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "long tag"]}, "minItems": 1, "maxItems": 3},
        "ok": {"type": "boolean"},
        "meta": {"type": "object"},
        "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
        "tree": {"$ref": "#/$defs/Node"},
        "version": {"const": 10},
        "maybe": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
    },
    "$defs": {"Node": {"type": "object", "required": ["v"], "properties": {
        "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/Node"}}}}},
}
GOOD = [
    {"name": "x", "age": 3, "tags": ["a"]},
    {"tags": ["long tag", "b", "a"], "age": -12, "name": "\u00e9\"\\", "score": None, "ok": True,
     "meta": {"q": [1, {}], "r": "s"}, "counts": {"k": 1, "j": 2}, "tree": {"v": 1, "kids": [{"v": 2, "kids": []}]},
     "version": 10, "maybe": "yes"},
    {"name": "", "age": 0, "tags": ["b"], "score": 1.5e3, "maybe": None},
]
BAD = [
    {"name": "x", "age": 3}, {"name": "x", "age": 3.5, "tags": ["a"]}, {"name": "x", "age": 3, "tags": []},
    {"name": "x", "age": 3, "tags": ["a", "a", "a", "a"]}, {"name": "x", "age": 3, "tags": ["c"]},
    {"name": 1, "age": 3, "tags": ["a"]}, {"name": "x", "age": 3, "tags": ["a"], "extra": 1},
    {"name": "x", "age": 3, "tags": ["a"], "version": 11}, {"name": "x", "age": 3, "tags": ["a"], "counts": {"a": "s"}},
    {"name": "x", "age": 3, "tags": ["a"], "tree": {"kids": []}}, {"name": "x", "age": 3, "tags": ["a"], "maybe": 1},
    [1], "x",
]


def accepts(grammar, data: bytes) -> bool:
    state = grammar.feed(grammar.start(), data)
    return state is not None and grammar.complete(state)


def test_schema_grammar_accepts_valid_and_rejects_invalid_instances():
    grammar = compile_schema(SCHEMA)
    for instance in GOOD:
        for indent in (None, 1):
            data = json.dumps(instance, indent=indent, ensure_ascii=indent is None).encode()
            assert accepts(grammar, data), data
            for k in range(len(data)):
                assert grammar.feed(grammar.start(), data[:k]) is not None, (data, k)
    for instance in BAD:
        assert not accepts(grammar, json.dumps(instance).encode()), instance
    assert not accepts(grammar, b'{"name": "x", "name": "y", "age": 1, "tags": ["a"]}')  # a key written twice


def test_documents_the_schema_grammar_accepts_are_valid():
    jsonschema = pytest.importorskip("jsonschema")
    grammar = compile_schema(SCHEMA)
    rng = random.Random(0)
    alphabet = b'{}[]",:.-+eE0123456789 \n\\utrufalsnxabgmeontkv\xc3\xa9'
    accepted = 0
    for instance in GOOD:
        base = json.dumps(instance).encode()
        for _ in range(1000):
            data = mutated_text(base, rng, alphabet)
            if accepts(grammar, data):
                accepted += 1
                jsonschema.validate(json.loads(data), SCHEMA)
    assert accepted > 50


@pytest.mark.parametrize("schema, words", [
    ({"type": "string", "pattern": "a+"}, "pattern"),
    ({"type": "object", "properties": {"d": {"type": "string", "format": "date"}}}, "format"),
    ({"anyOf": [{"type": "object"}, {"type": "object", "properties": {"a": {}}}]}, "same byte"),
    ({"type": ["integer", "number"]}, "same byte"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "not in properties"),
    ({"$ref": "#/$defs/missing"}, "does not exist"),
    ({"$defs": {"A": {"anyOf": [{"$ref": "#/$defs/A"}, {"type": "null"}]}}, "$ref": "#/$defs/A"}, "recursive"),
    ({"type": "tuple"}, "unknown type"),
])
def test_unsupported_schemas_are_refused(schema, words):
    with pytest.raises(ValueError, match=words):
        compile_schema(schema)


def test_schema_mask_equals_brute_force(tmp_path):
    tokenizer = load_tokenizer(write_jamba2(tmp_path / "j2"))
    vocabulary = JsonVocabulary.of(tokenizer)
    grammar = compile_schema(SCHEMA)
    constraint = vocabulary.constraint(tokenizer.eos_token_ids, grammar=grammar)
    table, eos = vocabulary.token_bytes, tokenizer.eos_token_ids
    data = json.dumps(GOOD[1], indent=1, ensure_ascii=False).encode()
    for k in range(0, len(data) + 1, 3):
        state = grammar.feed(grammar.start(), data[:k])
        brute = torch.tensor([bool(b) and i not in eos and grammar.feed(state, b) is not None
                              for i, b in enumerate(table)])
        brute[eos] = grammar.complete(state)
        constraint.state = state
        assert torch.equal(constraint.mask(len(table)), brute), data[:k]
