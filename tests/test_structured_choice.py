"""vLLM's structured outputs `choice` and `json` (and the older guided_choice / guided_json): the choice grammar
against a plain reference, its token masks against brute force, and live requests through the `openai` client."""

from __future__ import annotations

import json
import random

import httpx
import openai
import pytest
import torch

from openjamba.serve.choice import ChoiceGrammar
from openjamba.serve.engine import Engine, TokenEvent
from openjamba.serve.json_mode import JsonVocabulary
from openjamba.serve.sampling import SamplingParams

from .serve_helpers import tiny_server
from .test_json_mode import WEATHER, closing_bias, tiny_model
from .tokenizer_fixtures import tokenizer_styles

CHOICES = ["positive", "negative", "yes", "yes!", "y", "caf\u00e9 \u2615", "neutral"]


# ---------------------------------------------------------------------- the grammar
def test_grammar_agrees_with_the_plain_reference():
    grammar = ChoiceGrammar(CHOICES)
    encoded = [c.encode() for c in CHOICES]
    prefixes = {c[:k] for c in encoded for k in range(len(c) + 1)}
    rng = random.Random(0)
    probes = set(prefixes) | {p + bytes([b]) for p in prefixes for b in range(256)}
    probes |= {bytes(rng.randrange(256) for _ in range(rng.randint(1, 6))) for _ in range(500)}
    probes |= {c + c for c in encoded}
    for data in probes:
        state = grammar.feed(grammar.start(), data)
        assert (state is not None) == (data in prefixes), data
        if state is not None:
            assert grammar.complete(state) == (data in encoded), data
            assert not grammar.in_string_body(state)
    assert grammar.complete(grammar.feed(grammar.start(), b"yes"))  # a choice that is a prefix of another
    assert grammar.feed(grammar.start(), b"yes!!") is None  # nothing after the longest
    assert not grammar.complete(grammar.start())


@pytest.mark.parametrize("choices", [[], [""], ["a", ""], ["a", 3], None])
def test_grammar_refuses_empty_and_non_string_choices(choices):
    with pytest.raises(ValueError):
        ChoiceGrammar(choices)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return tokenizer_styles(tmp_path_factory.mktemp("choice-tokenizers"))


@pytest.mark.parametrize("kind", ["byte-level", "jamba16", "jamba2"])
def test_mask_equals_brute_force(tokenizers, kind):
    """JsonVocabulary's mask over the choice grammar: a token iff its bytes continue a choice, the end tokens iff
    a whole choice is written, special and added tokens never."""
    tokenizer = tokenizers[kind]
    vocabulary = JsonVocabulary.of(tokenizer)
    grammar, table = ChoiceGrammar(CHOICES), vocabulary.token_bytes
    eos = list(tokenizer.eos_token_ids or [2])  # the byte-level fixture names none: its <eos> (2)
    constraint = vocabulary.constraint(eos, grammar=grammar)
    for data in sorted({c.encode()[:k] for c in CHOICES for k in range(len(c.encode()) + 1)}):
        state = grammar.feed(grammar.start(), data)
        brute = torch.tensor([bool(b) and i not in eos and grammar.feed(state, b) is not None
                              for i, b in enumerate(table)])
        brute[eos] = grammar.complete(state)
        constraint.state = state
        assert torch.equal(constraint.mask(len(table)), brute), data
        assert not constraint.mask(len(table))[[i for i in tokenizer.all_special_ids if i not in eos]].any()
        assert all(constraint.allows(i) == brute[i] for i in range(len(table)))


@pytest.mark.parametrize("kind", ["jamba16", "jamba2"])
def test_engine_writes_one_choice_with_a_sentencepiece_style_tokenizer(tokenizers, kind):
    torch.set_num_threads(1)
    tokenizer = tokenizers[kind]
    model = tiny_model(tokenizer.vocab_size, tokenizer.eos_token_ids)
    vocabulary = JsonVocabulary.of(tokenizer)
    grammar = ChoiceGrammar(CHOICES)
    with Engine(model, eos_token_ids=tokenizer.eos_token_ids) as engine:
        for temperature, seed in ((0.0, 0), (1.0, 1), (1.0, 2), (1.5, 3)):
            params = SamplingParams(max_tokens=40, temperature=temperature, seed=seed,
                                    constraint=lambda ends: vocabulary.constraint(ends, grammar=grammar))
            events = list(engine.stream(tokenizer.encode("Is it good?"), params))
            ids = [e.token_id for e in events if isinstance(e, TokenEvent)]
            assert events[-1].reason == "stop" and ids[-1] in tokenizer.eos_token_ids
            assert tokenizer.decode(ids[:-1]) in CHOICES


# ---------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with tiny_server(tmp_path_factory.mktemp("choice-serve") / "tiny-jamba") as (url, tokenizer, _):
        yield url, tokenizer


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.mark.parametrize("extra", [{"structured_outputs": {"choice": CHOICES}}, {"guided_choice": CHOICES},
                                   {"structured_outputs": {"choice": CHOICES, "json": None, "regex": None}}])
def test_every_reply_is_one_of_the_choices(server, extra):
    url, _ = server
    client = _client(url)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    seen = set()
    for args in ({"temperature": 0}, *({"temperature": 1.5, "seed": s} for s in range(4))):
        chat = dict(model="tiny-jamba", messages=[{"role": "user", "content": "Is it good?"}], max_tokens=40,
                    tools=tools, extra_body=extra, **args)
        r = client.chat.completions.create(n=2, **chat)
        for choice in r.choices:
            assert choice.finish_reason == "stop" and not choice.message.tool_calls
            assert choice.message.content in CHOICES
            seen.add(choice.message.content)
        chunks = list(client.chat.completions.create(stream=True, **chat))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        text = dict(model="tiny-jamba", prompt=["Sentiment:", "Answer"], max_tokens=40, extra_body=extra, **args)
        r = client.completions.create(**text)
        assert all(c.text in CHOICES and c.finish_reason == "stop" for c in r.choices)
        seen.update(c.text for c in r.choices)
        chunks = list(client.completions.create(stream=True, **text))
        streamed = {i: "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i)
                    for i in range(2)}
        assert streamed == {c.index: c.text for c in r.choices}
    assert len(seen) > 1  # sampling reaches more than one choice


def test_max_tokens_may_cut_a_choice(server):
    url, _ = server
    r = _client(url).completions.create(model="tiny-jamba", prompt="x", max_tokens=1, temperature=0,
                                        extra_body={"guided_choice": ["a long answer of several tokens"]})
    assert r.choices[0].finish_reason == "length"
    assert "a long answer of several tokens".startswith(r.choices[0].text)


def test_json_is_the_json_schema_response_format(server):
    url, tokenizer = server
    client = _client(url)
    bias = {str(i): b for i, b in closing_bias(tokenizer).items()}
    bias.update({str(i): 2.0 for i, b in enumerate(tokenizer.token_bytes()) if b in (b",", b"]")})
    base = dict(model="tiny-jamba", messages=[{"role": "user", "content": "weather in Paris"}], max_tokens=400,
                logit_bias=bias, temperature=1.0, seed=3)
    reference = client.chat.completions.create(
        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER}}, **base)
    assert reference.choices[0].finish_reason == "stop"
    for extra in ({"structured_outputs": {"json": WEATHER}}, {"structured_outputs": {"json": json.dumps(WEATHER)}},
                  {"guided_json": WEATHER}, {"guided_json": json.dumps(WEATHER)}):
        r = client.chat.completions.create(extra_body=extra, **base)
        assert r.choices[0].message.content == reference.choices[0].message.content, extra
        assert r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="tiny-jamba", prompt="JSON:", max_tokens=400, logit_bias=bias, seed=3,
                                  extra_body={"guided_json": WEATHER})
    assert r.choices[0].finish_reason == "stop" and set(json.loads(r.choices[0].text)) >= set(WEATHER["required"])


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
BAD = [
    ({"structured_outputs": {"choice": []}}, "choice"),
    ({"structured_outputs": {"choice": ["a", ""]}}, "non-empty"),
    ({"structured_outputs": {"choice": ["a", 1]}}, "non-empty string"),
    ({"structured_outputs": {"choice": "a"}}, "list"),
    ({"structured_outputs": {"regex": "a+"}}, "regex: not supported"),
    ({"structured_outputs": {"grammar": "root ::= x"}}, "grammar: not supported"),
    ({"structured_outputs": {"json_object": True}}, "json_object: not supported"),
    ({"structured_outputs": {"choice": ["a"], "json": {}}}, "exactly one"),
    ({"structured_outputs": {}}, "exactly one"),
    ({"structured_outputs": {"json": "not json"}}, "JSON schema"),
    ({"structured_outputs": {"json": [1]}}, "JSON schema"),
    ({"structured_outputs": {"json": {"type": "string", "pattern": "a"}}}, "pattern"),
    ({"guided_choice": []}, "choice"),
    ({"guided_choice": ["a", 2]}, "guided_choice"),
    ({"guided_json": 3}, "guided_json"),
    ({"guided_regex": "a+"}, "not supported"),
    ({"guided_grammar": "root ::= x"}, "not supported"),
    ({"guided_choice": ["a"], "guided_json": {}}, "guided_choice and guided_json cannot be combined"),
    ({"guided_choice": ["a"], "structured_outputs": {"choice": ["b"]}}, "structured_outputs and guided_choice"),
    ({"guided_choice": ["a"], "response_format": {"type": "json_object"}}, "response_format and guided_choice"),
    ({"structured_outputs": {"json": {}}, "response_format": {"type": "json_schema",
                                                              "json_schema": {"schema": {}}}}, "cannot be combined"),
    ({"guided_choice": ["a"], "ignore_eos": True}, "guided_choice"),
    ({"structured_outputs": {"choice": ["a"]}, "min_tokens": 2}, "structured_outputs.choice"),
]


@pytest.mark.parametrize(("extra", "words"), BAD)
def test_bad_structured_outputs_are_400(server, extra, words):
    url, _ = server
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                       ("/v1/completions", {"prompt": "hi"})):
        r = httpx.post(url + path, json={"model": "tiny-jamba", "max_tokens": 2, **body, **extra}, timeout=30)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and words in error["message"], error


def test_forced_tool_call_and_a_choice_is_400(server):
    url, _ = server
    body = {"model": "tiny-jamba", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "tools": [TOOL], "tool_choice": "required", "guided_choice": ["a"]}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    assert "guided_choice" in r.json()["error"]["message"]
    ok = {"model": "tiny-jamba", "prompt": "hi", "max_tokens": 5, "response_format": {"type": "text"}}
    for extra in ({"guided_choice": ["ab"]}, {"structured_outputs": {"choice": ["ab"]}}):
        r = httpx.post(url + "/v1/completions", json={**ok, **extra}, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "ab"
