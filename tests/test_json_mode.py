"""JSON mode (`response_format: {"type": "json_object"}`): token bytes, the JSON recogniser against Python's json
module, masks against brute force, the sampler's constraint, and a live server with the official openai client."""

from __future__ import annotations

import json
import random

import httpx
import openai
import pytest
import torch

from openjamba import JambaConfig, JambaForCausalLM
from openjamba.serve.engine import Engine, TokenEvent
from openjamba.serve.json_mode import JsonGrammar, JsonVocabulary
from openjamba.serve.sampling import RowSampling, SamplingParams, sample_rows

from .conftest import mutated_text
from .serve_helpers import tiny_server
from .tokenizer_fixtures import tokenizer_styles

VALID = [
    b'{"a": [1, 2.5e-3, -0, 0.5E+2, true, false, null, "x\\u00e9\\n\\"y\\/\\b\\f\\r\\t\\\\"], "b": {}, "c": []}',
    b' {\n  "k" : [ [ ] , { "n" : -12.0e9 } ],\t"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80": "\xe4\xb8\xad" } \r\n',
    b'[]', b'0', b'-1.0E+2', b'"\\ud83d\\ude00"', b'123', b'1e5', b'null', b'"\xf4\x8f\xbf\xbf"',
]
MUTATIONS = b'{}[]",:.-+eE0123456789 \t\n\rtrufalsn\\u/bxA\xc3\xa9\xff\x01\x7f\xed\xa0\x80\xc0\xf5'


def python_accepts(data: bytes) -> bool:
    """json.loads of strict UTF-8, without Python's NaN/Infinity extension."""
    def no_constant(name):
        raise ValueError(name)
    try:
        json.loads(data.decode("utf-8"), parse_constant=no_constant)
        return True
    except (ValueError, UnicodeDecodeError):
        return False


def grammar_accepts(grammar: JsonGrammar, data: bytes) -> bool:
    state = grammar.feed(grammar.start(), data)
    return state is not None and grammar.complete(state)


def test_grammar_agrees_with_python_json():
    grammar = JsonGrammar(object_only=False, max_whitespace=None)
    rng = random.Random(0)
    for doc in VALID:
        assert python_accepts(doc) and grammar_accepts(grammar, doc), doc
        for k in range(len(doc) + 1):  # every prefix of a valid document can still become one
            assert grammar.feed(grammar.start(), doc[:k]) is not None, (doc, k)
        for _ in range(600):
            data = mutated_text(doc, rng, MUTATIONS)
            assert grammar_accepts(grammar, data) == python_accepts(data), data


def test_object_only_and_the_whitespace_cap():
    grammar = JsonGrammar(object_only=True, max_whitespace=4)
    assert grammar_accepts(grammar, b' {"a": 1} ') and not grammar_accepts(grammar, b'[1]')
    assert grammar.feed(grammar.start(), b"1") is None and grammar.feed(grammar.start(), b'"a"') is None
    assert grammar.feed(grammar.start(), b"{    ") is not None and grammar.feed(grammar.start(), b"{     ") is None
    assert grammar.feed(grammar.start(), b'{"a    b": 1}') is not None  # inside strings spaces are content
    assert not grammar.complete(grammar.feed(grammar.start(), b'{"a": 1'))


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return tokenizer_styles(tmp_path_factory.mktemp("json-tokenizers"))


@pytest.mark.parametrize("kind", ["byte-level", "jamba16", "jamba2"])
def test_token_bytes_join_to_decode(tokenizers, kind):
    tokenizer = tokenizers[kind]
    table = tokenizer.token_bytes()
    assert len(table) == tokenizer.vocab_size
    assert all(table[i] is None for i in tokenizer.all_special_ids)
    usable = [i for i, b in enumerate(table) if b]
    whole = [i for i in usable if _utf8(table[i])]  # tokens of whole characters: any sequence of them is text
    rng = random.Random(1)
    checked = 0
    for trial in range(400):
        ids = [rng.choice(whole if trial % 2 else usable) for _ in range(rng.randint(1, 12))]
        text = _utf8(b"".join(table[i] for i in ids))
        if text is None:  # bytes of broken characters: decoders replace them in their own ways
            continue
        decoded = tokenizer.decode(ids)
        assert text == decoded or (text.startswith(" ") and text[1:] == decoded), (ids, text, decoded)
        checked += 1
    assert checked >= 200


def _utf8(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


@pytest.mark.parametrize("kind", ["byte-level", "jamba16", "jamba2"])
def test_mask_equals_brute_force(tokenizers, kind):
    tokenizer = tokenizers[kind]
    vocabulary = JsonVocabulary.of(tokenizer)
    grammar, table, eos = vocabulary.grammar, vocabulary.token_bytes, tokenizer.eos_token_ids
    constraint = vocabulary.constraint(eos)
    doc = '{"name": "caf\u00e9 \\"x\\" \\u00e9\\n", "n": [-1.5e+3, 0, true, null], "o": {"k": false}}\n '.encode()
    for k in range(len(doc) + 1):
        state = grammar.feed(grammar.start(), doc[:k])
        brute = torch.tensor([bool(b) and i not in eos and grammar.feed(state, b) is not None
                              for i, b in enumerate(table)])
        brute[eos] = grammar.complete(state)
        constraint.state = state
        assert torch.equal(constraint.mask(len(table)), brute), doc[:k]
        assert torch.equal(constraint.mask(len(table)), brute)  # from the cached mask too
        assert all(constraint.allows(i) == brute[i] for i in range(0, len(table), 7))


def test_sampler_picks_only_allowed_tokens_and_leaves_other_rows_alone(tokenizers):
    tokenizer = tokenizers["byte-level"]
    vocabulary = JsonVocabulary.of(tokenizer)
    width = tokenizer.vocab_size + 3  # a model's vocabulary may be padded past the tokenizer's
    logits = torch.randn(3, width, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0, constraint=vocabulary.constraint),
              SamplingParams(temperature=0),
              SamplingParams(temperature=1.0, seed=3, constraint=vocabulary.constraint)]
    rows = [RowSampling.start(p, [1], width, [2]) for p in params]
    reference = sample_rows(logits, [RowSampling.start(SamplingParams(temperature=0), [1], width)] * 3)
    text = [b"", b""]
    for step in range(40):
        constraints = [rows[0].constraint, rows[2].constraint]
        masks = [c.mask(width) for c in constraints]
        sampled = sample_rows(logits, rows)
        if step == 0:
            assert sampled[1] == reference[1]  # the unconstrained row: its own argmax
        for j, (i, allowed) in enumerate(zip((0, 2), masks)):
            token = sampled[i][0]
            assert allowed[token]
            if i == 0:  # greedy: the best allowed token
                assert token == int(logits[0].masked_fill(~allowed, float("-inf")).argmax())
            if token != 2:
                text[j] += vocabulary.token_bytes[token]
    for data in text:
        assert vocabulary.grammar.feed(vocabulary.grammar.start(), data) is not None


# ---------------------------------------------------------------------- the engine and the server
def tiny_model(vocab_size: int, eos: list[int]) -> JambaForCausalLM:
    config = JambaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, attn_layer_period=4, attn_layer_offset=2,
        expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8, mamba_d_conv=4, pad_token_id=0,
        bos_token_id=1, eos_token_id=eos, max_position_embeddings=1024)
    torch.manual_seed(0)
    return JambaForCausalLM(config).eval()


def closing_bias(tokenizer) -> dict[int, float]:
    """A random model's strings run on for hundreds of tokens (a quote is one token in hundreds), and its objects
    may never close: this bias on the quote, the closing brace and EOS makes its documents end within a few dozen
    tokens while it still picks everything else."""
    table = tokenizer.token_bytes()
    bias = {i: {b'"': 5.0, b"}": 2.0}[b] for i, b in enumerate(table) if b in (b'"', b"}")}
    return {**bias, **{i: 5.0 for i in tokenizer.eos_token_ids}}


@pytest.mark.parametrize("kind", ["jamba16", "jamba2"])
def test_engine_gives_json_objects_with_a_sentencepiece_style_tokenizer(tokenizers, kind):
    torch.set_num_threads(1)
    tokenizer = tokenizers[kind]
    model = tiny_model(tokenizer.vocab_size, tokenizer.eos_token_ids)
    vocabulary = JsonVocabulary.of(tokenizer)
    with Engine(model, eos_token_ids=tokenizer.eos_token_ids) as engine:
        for temperature in (0.0, 1.0):
            for prompt in ("hello world", "The weather in Paris"):
                params = SamplingParams(max_tokens=200, temperature=temperature, seed=1, logit_bias=closing_bias(
                    tokenizer), constraint=vocabulary.constraint)
                events = list(engine.stream(tokenizer.encode(prompt), params))
                ids = [e.token_id for e in events if isinstance(e, TokenEvent)]
                assert events[-1].reason == "stop" and ids[-1] in tokenizer.eos_token_ids
                assert isinstance(json.loads(tokenizer.decode(ids[:-1])), dict)


@pytest.fixture(scope="module")
def json_server(tmp_path_factory):
    with tiny_server(tmp_path_factory.mktemp("json-serve") / "tiny-jamba") as (url, tokenizer, _):
        yield url, tokenizer


def test_chat_json_object_is_valid_json(json_server):
    url, tokenizer = json_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    bias = {str(i): b for i, b in closing_bias(tokenizer).items()}
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for args in ({"temperature": 0}, {"temperature": 1.0, "seed": 5}, {"temperature": 0.8, "seed": 9, "top_p": 0.9}):
        for text in ("hello world", "Paris weather as JSON", "the quick brown fox"):
            request = dict(model="tiny-jamba", messages=[{"role": "user", "content": text}], max_tokens=300,
                           response_format={"type": "json_object"}, logit_bias=bias, tools=tools, **args)
            r = client.chat.completions.create(**request)
            choice = r.choices[0]
            assert choice.finish_reason == "stop" and not choice.message.tool_calls
            assert isinstance(json.loads(choice.message.content), dict)
            if "seed" in args:  # reproducible, and streamed the same
                assert client.chat.completions.create(**request).choices[0].message.content == choice.message.content
                chunks = list(client.chat.completions.create(stream=True, **request))
                assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
                    choice.message.content
    # without the bias a random model's document is cut by max_tokens, and what came is a valid beginning
    r = client.chat.completions.create(model="tiny-jamba", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=20, temperature=0, response_format={"type": "json_object"})
    grammar = JsonGrammar()
    content = r.choices[0].message.content
    assert r.choices[0].finish_reason == "length"
    assert content.lstrip().startswith("{") and grammar.feed(grammar.start(), content.encode()) is not None


WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit", "days", "sunny"],
           "properties": {"city": {"type": "string"}, "temperature": {"type": "number"},
                          "unit": {"enum": ["celsius", "fahrenheit"]},
                          "days": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
                          "sunny": {"type": ["boolean", "null"]}}}


def test_chat_json_schema_output_is_valid_against_the_schema(json_server):
    jsonschema = pytest.importorskip("jsonschema")
    url, tokenizer = json_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    bias = {str(i): b for i, b in closing_bias(tokenizer).items()}
    bias.update({str(i): 2.0 for i, b in enumerate(tokenizer.token_bytes()) if b in (b",", b"]")})
    response_format = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER, "strict": True}}
    for args in ({"temperature": 0}, {"temperature": 1.0, "seed": 3}):
        for text in ("weather in Paris", "hello"):
            r = client.chat.completions.create(model="tiny-jamba", messages=[{"role": "user", "content": text}],
                                               max_tokens=400, response_format=response_format, logit_bias=bias,
                                               **args)
            assert r.choices[0].finish_reason == "stop"
            jsonschema.validate(json.loads(r.choices[0].message.content), WEATHER)


def test_completions_json_object(json_server):
    url, tokenizer = json_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    bias = {str(i): b for i, b in closing_bias(tokenizer).items()}
    r = client.completions.create(model="tiny-jamba", prompt="A JSON object:", max_tokens=300, temperature=0.7,
                                  seed=2, n=2, logit_bias=bias, extra_body={"response_format": {"type": "json_object"}})
    for choice in r.choices:
        assert choice.finish_reason == "stop" and isinstance(json.loads(choice.text), dict)


@pytest.mark.parametrize("response_format", [
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "a+"}}},
    {"type": "json_schema", "json_schema": {"name": "x"}}, {"type": "json_schema"},
    {"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}},
    {"type": "xml"}, {}, {"type": "json_object", "schema": {}}, {"type": 3},
])
def test_bad_response_format_is_400(json_server, response_format):
    url, _ = json_server
    body = {"model": "tiny-jamba", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "response_format": response_format}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text
    for extra in ({"ignore_eos": True}, {"min_tokens": 3}):
        r = httpx.post(url + "/v1/chat/completions", json={**body, "response_format": {"type": "json_object"},
                                                           **extra}, timeout=30)
        assert r.status_code == 400
    r = httpx.post(url + "/v1/chat/completions", json={**body, "response_format": {"type": "text"}}, timeout=30)
    assert r.status_code == 200
