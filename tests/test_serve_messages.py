"""`/v1/messages` (Anthropic's Messages API) with the official anthropic client against a live server (tiny random
model): replies equal the chat route's for the same conversation (greedy), streamed events parse and join to the
same content, forced tool calls come back as tool_use blocks, tool results and thinking render through the
template as the chat route's messages do, errors have Anthropic's shape."""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import TypeAdapter

from openjamba.serve.api import ServerConfig, create_app
from openjamba.serve.messages import BlockStream
from openjamba.serve.templating import ChatFormat
from openjamba.tokenizer import load_tokenizer
from openjamba.tool_calls import ToolCallDelta

from .serve_helpers import build_checkpoint, running_server, tiny_server
from .test_serve import STREAMED_CALLS, ScriptedEngine
from .test_tool_choice import OPENS_THINKING, WEATHER, closing_bias

MODEL = "tiny-jamba"
KEY = "sekrit"
TOOL = {"name": WEATHER["name"], "description": WEATHER["description"], "input_schema": WEATHER["parameters"]}
GREEDY = {"temperature": 0.0}  # the servers' default (the anthropic client no longer sends temperature)
CHAT_TOOLS = [{"type": "function", "function": WEATHER}]


def clients(url: str) -> tuple[anthropic.Anthropic, openai.OpenAI]:
    return (anthropic.Anthropic(base_url=url, api_key=KEY, max_retries=0, timeout=60),
            openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with tiny_server(tmp_path_factory.mktemp("messages") / MODEL, api_key=KEY, sampling_defaults=GREEDY) as (
            url, tokenizer, _):
        yield (url, tokenizer, *clients(url))


def chat(client: openai.OpenAI, messages: list[dict], **kwargs):
    return client.chat.completions.create(model=MODEL, messages=messages, **kwargs)


def text_of(message) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


def shape(message, drop: tuple[str, ...] = ()) -> list[dict]:
    """A message's content blocks as plain dicts (the stream helper's blocks add a parsed_output), less `drop`."""
    return [{k: v for k, v in b.to_dict().items() if k not in ("parsed_output", *drop)} for b in message.content]


def raw_events(url: str, body: dict) -> list:
    """The streamed events as sent, each named by its `event:` line and validated by the SDK's types."""
    raw = httpx.post(url + "/v1/messages", json={**body, "stream": True}, headers={"x-api-key": KEY}, timeout=60).text
    frames = [frame.split("\n") for frame in raw.strip().split("\n\n")]
    events = [TypeAdapter(RawMessageStreamEvent).validate_json(data[6:]) for name, data in frames]
    assert [name[7:] for name, _ in frames] == [e.type for e in events]
    return events


def test_message_equals_chat_and_streams(served):
    url, _, client, oai = served
    system, user = "You are terse.", "hello world"
    r = client.messages.create(model=MODEL, max_tokens=8, system=system,
                               messages=[{"role": "user", "content": user}], metadata={"user_id": "u"})
    expected = chat(oai, [{"role": "system", "content": system}, {"role": "user", "content": user}], max_tokens=8)
    assert r.id.startswith("msg_") and r.type == "message" and r.role == "assistant" and r.model == MODEL
    assert text_of(r) == expected.choices[0].message.content and [b.type for b in r.content] in (["text"], [])
    assert r.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[expected.choices[0].finish_reason]
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == expected.usage.prompt_tokens
    assert r.usage.output_tokens == expected.usage.completion_tokens and r.usage.cache_creation_input_tokens == 0
    # the same conversation in blocks: a system of text blocks, a user turn of two text blocks
    blocks = client.messages.create(model=MODEL, max_tokens=8, system=[{"type": "text", "text": system}],
                                    messages=[{"role": "user", "content": [{"type": "text", "text": "hello "},
                                                                           {"type": "text", "text": "world"}]}])
    assert shape(blocks) == shape(r)
    request = dict(model=MODEL, max_tokens=8, system=system,
                   messages=[{"role": "user", "content": user}])
    with client.messages.stream(**request) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text_of(r) and shape(final) == shape(r) and final.stop_reason == r.stop_reason
    assert final.usage.output_tokens == r.usage.output_tokens
    events = raw_events(url, request)
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    if r.content:
        assert kinds[1:3] == ["content_block_start", "content_block_delta"] and kinds[-3] == "content_block_stop"
    Message.model_validate(httpx.post(url + "/v1/messages", json=request, headers={"x-api-key": KEY}).json())


def test_stop_sequences_and_max_tokens(served):
    _, _, client, oai = served
    messages = [{"role": "user", "content": "The quick brown fox"}]
    full = client.messages.create(model=MODEL, max_tokens=12, messages=messages,
                                  extra_body={"min_p": 0.0})
    text = text_of(full)
    stop = text[len(text) // 2: len(text) // 2 + 2]
    if not stop.strip():
        pytest.skip("the greedy text has no usable stop string")
    r = client.messages.create(model=MODEL, max_tokens=12, messages=messages, stop_sequences=[stop])
    assert (r.stop_reason, r.stop_sequence) == ("stop_sequence", stop)
    assert text_of(r) == chat(oai, messages, max_tokens=12, stop=[stop]).choices[0].message.content
    assert text.startswith(text_of(r)) and len(text_of(r)) < len(text)
    with client.messages.stream(model=MODEL, max_tokens=12, messages=messages,
                                stop_sequences=[stop]) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence, shape(final)) == ("stop_sequence", stop, shape(r))
    short = client.messages.create(model=MODEL, max_tokens=2, messages=messages)
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 2


def test_forced_tool_use_and_its_result(served):
    jsonschema = pytest.importorskip("jsonschema")
    _, tokenizer, client, oai = served
    user = {"role": "user", "content": "weather in Paris?"}
    request = dict(model=MODEL, max_tokens=200, messages=[user], tools=[TOOL],
                   extra_body={"logit_bias": closing_bias(tokenizer)})
    for choice in ({"type": "tool", "name": "get_weather"}, {"type": "any", "disable_parallel_tool_use": True}):
        r = client.messages.create(tool_choice=choice, **request)
        assert r.stop_reason == "tool_use" and [b.type for b in r.content] == ["tool_use"]
        (call,) = r.content
        assert call.id.startswith("toolu_") and call.name == "get_weather"
        jsonschema.validate(call.input, WEATHER["parameters"])
        events = list(client.messages.create(tool_choice=choice, stream=True, **request))
        joined = "".join(e.delta.partial_json for e in events if e.type == "content_block_delta")
        assert json.loads(joined) == call.input
        with client.messages.stream(tool_choice=choice, **request) as stream:
            final = stream.get_final_message()
        assert [(b.type, b.name, b.input) for b in final.content] == [("tool_use", call.name, call.input)]
        assert final.stop_reason == "tool_use"
    expected = chat(oai, [user], max_tokens=200, tools=CHAT_TOOLS, logit_bias=closing_bias(tokenizer),
                    tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert json.loads(expected.choices[0].message.tool_calls[0].function.arguments) == call.input
    # the result, sent back as a tool_result block, renders as the chat route's tool message
    result = [user, {"role": "assistant", "content": [{"type": "text", "text": "Checking."}, call.model_dump()]},
              {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                            "content": [{"type": "text", "text": "sunny"}]},
                                           {"type": "text", "text": "and tomorrow?"}]}]
    follow = client.messages.create(model=MODEL, max_tokens=6, messages=result, tools=[TOOL])
    history = [user, {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(call.input)}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"}, {"role": "user", "content": "and tomorrow?"}]
    expected = chat(oai, history, max_tokens=6, tools=CHAT_TOOLS)
    assert text_of(follow) == (expected.choices[0].message.content or "")
    counted = client.messages.count_tokens(model=MODEL, messages=result, tools=[TOOL]).input_tokens
    assert counted == expected.usage.prompt_tokens
    assert follow.usage.cache_read_input_tokens + follow.usage.input_tokens == counted


def test_count_tokens_thinking_switch_and_reuse(served):
    _, _, client, oai = served
    first = [{"role": "user", "content": "hello world"}]
    count = client.messages.count_tokens(model=MODEL, system="Be brief.", messages=first, tools=[TOOL]).input_tokens
    system = [{"role": "system", "content": "Be brief."}]
    assert count == chat(oai, system + first, max_tokens=1, tools=CHAT_TOOLS).usage.prompt_tokens
    # thinking disabled: the template's enable_thinking false (an empty think block in the generation prompt)
    off = client.messages.count_tokens(model=MODEL, messages=first, thinking={"type": "disabled"}).input_tokens
    plain = client.messages.count_tokens(model=MODEL, messages=first).input_tokens
    template_off = chat(oai, first, max_tokens=1, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert off == template_off.usage.prompt_tokens > plain
    enabled = client.messages.count_tokens(model=MODEL, messages=first, thinking={"type": "enabled",
                                                                                  "budget_tokens": 1024})
    assert enabled.input_tokens == plain
    # a second turn extending the first reads the first from the state store: cache reads
    r = client.messages.create(model=MODEL, max_tokens=6, messages=first)
    second = first + [{"role": "assistant", "content": r.content}, {"role": "user", "content": "Paris weather"}]
    again = client.messages.create(model=MODEL, max_tokens=6, messages=second)
    total = client.messages.count_tokens(model=MODEL, messages=second).input_tokens
    assert again.usage.cache_read_input_tokens >= r.usage.input_tokens + r.usage.cache_read_input_tokens
    assert again.usage.input_tokens + again.usage.cache_read_input_tokens == total


def test_streamed_usage_counts_cache_reads_from_message_start(served):
    """A streamed second turn that reuses the first's state: message_start's usage already splits the prompt into
    input tokens and cache reads, as the final message_delta does (Anthropic's input_tokens exclude cache reads)."""
    _, _, client, _ = served
    first = [{"role": "user", "content": "The quick brown fox"}]
    r = client.messages.create(model=MODEL, max_tokens=4, messages=first)
    second = first + [{"role": "assistant", "content": r.content or "..."}, {"role": "user", "content": "and?"}]
    with client.messages.stream(model=MODEL, max_tokens=4, messages=second) as stream:
        events = list(stream)
        final = stream.get_final_message()
    start = events[0].message.usage
    end = next(e for e in events if e.type == "message_delta").usage
    assert events[0].type == "message_start" and final.usage.cache_read_input_tokens > 0
    assert (start.input_tokens, start.cache_read_input_tokens) == (end.input_tokens, end.cache_read_input_tokens)
    total = client.messages.count_tokens(model=MODEL, messages=second).input_tokens
    assert start.input_tokens + start.cache_read_input_tokens == total


@pytest.mark.parametrize("body, status, kind, words", [
    ({"max_tokens": None}, 400, "invalid_request_error", "max_tokens"),  # None: left out
    ({"max_tokens": "5"}, 400, "invalid_request_error", "max_tokens"),
    ({"max_tokens": 0}, 400, "invalid_request_error", "max_tokens"),
    ({"temperature": 1.5}, 400, "invalid_request_error", "temperature"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, 400, "invalid_request_error",
     "image"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The "}]}, 400,
     "invalid_request_error", "trailing whitespace"),  # a prefill may not end in whitespace, as at Anthropic
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": []}]}, 400,
     "invalid_request_error", "messages"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, 400, "invalid_request_error", "server tool"),
    ({"tools": [TOOL], "tool_choice": {"type": "tool", "name": "nope"}}, 400, "invalid_request_error", "nope"),
    ({"tool_choice": {"type": "tool"}}, 400, "invalid_request_error", "tool_choice"),
    ({"tool_choice": {"type": "any"}}, 400, "invalid_request_error", "a forced tool call needs tools"),
    ({"system": [{"type": "image"}]}, 400, "invalid_request_error", "system.0.type"),  # not "a valid string"
    ({"thinking": {"type": "enabled"}}, 400, "invalid_request_error", "budget_tokens"),
    ({"stop_sequences": [""]}, 400, "invalid_request_error", "stop_sequences"),
    ({"max_tokens": 5000}, 400, "invalid_request_error", "context"),
    ({"model": "claude-nope"}, 404, "not_found_error", "claude-nope"),
])
def test_errors_in_anthropic_shape(served, body, status, kind, words):
    url = served[0]
    request = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], "unknown": 1}
    request = {k: v for k, v in {**request, **body}.items() if v is not None}
    r = httpx.post(url + "/v1/messages", json=request, headers={"x-api-key": KEY}, timeout=60)
    assert r.status_code == status and r.json()["type"] == "error", r.text
    assert r.json()["error"]["type"] == kind and words in r.json()["error"]["message"], r.text


def test_wrong_method_and_unknown_path_in_anthropic_shape(served):
    """Under /v1/messages a 405 (with its Allow header) and a 404 have Anthropic's error shape; elsewhere
    OpenAI's."""
    url = served[0]
    for method, path, status in (("GET", "/v1/messages", 405), ("PUT", "/v1/messages/count_tokens", 405),
                                 ("POST", "/v1/messages/batches", 404)):
        r = httpx.request(method, url + path, headers={"x-api-key": KEY}, timeout=60)
        assert r.status_code == status and r.json()["type"] == "error", r.text
        assert r.json()["error"]["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
        assert r.json()["error"]["message"] and r.headers.get("allow", "POST") == "POST"
    r = httpx.get(url + "/v1/chat/completions", timeout=60)
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error" and "allow" in r.headers


def test_keys_and_the_clients_own_errors(served):
    url, _, client, _ = served
    request = dict(model=MODEL, max_tokens=1, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(anthropic.AuthenticationError) as err:
        anthropic.Anthropic(base_url=url, api_key="wrong", max_retries=0).messages.create(**request)
    assert err.value.body["error"]["type"] == "authentication_error"
    assert httpx.post(url + "/v1/messages", json=request).status_code == 401
    bearer = httpx.post(url + "/v1/messages", json=request, headers={"Authorization": f"Bearer {KEY}"})
    assert bearer.status_code == 200 and bearer.json()["type"] == "message"
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(**{**request, "model": "claude-nope"})
    with pytest.raises(anthropic.BadRequestError, match="messages"):
        client.messages.count_tokens(model=MODEL, messages=[])


@pytest.fixture(scope="module")
def thinking_served(tmp_path_factory):
    with tiny_server(tmp_path_factory.mktemp("messages-think") / MODEL, chat_template=OPENS_THINKING,
                     added_tokens=["</think>"], api_key=KEY, sampling_defaults=GREEDY) as (url, tokenizer, _):
        yield (url, tokenizer, *clients(url))


def test_thinking_blocks(thinking_served):
    """The prompt opened <think>: the reply's reasoning is a thinking block before its text, streamed as
    thinking_delta; a thinking block passed back renders as the chat route's reasoning_content."""
    _, tokenizer, client, oai = thinking_served
    sampling = {"logit_bias": {str(tokenizer.backend.token_to_id("</think>")): 5.0}, "temperature": 1.0, "seed": 2}
    messages = [{"role": "user", "content": "hello world"}]  # (this seed thinks a little, then writes)
    request = dict(model=MODEL, max_tokens=40, messages=messages, extra_body=sampling,
                   thinking={"type": "enabled", "budget_tokens": 1024})
    r = client.messages.create(**request)
    expected = chat(oai, messages, max_tokens=40, **sampling).choices[0].message
    assert r.content[0].type == "thinking" and r.content[0].thinking == expected.reasoning_content
    assert text_of(r) == (expected.content or "")
    with client.messages.stream(**request) as stream:
        final = stream.get_final_message()
    assert shape(final) == shape(r)
    events = list(client.messages.create(stream=True, **request))
    assert "".join(e.delta.thinking for e in events if e.type == "content_block_delta"
                   and e.delta.type == "thinking_delta") == r.content[0].thinking
    history = messages + [{"role": "assistant", "content": r.content}, {"role": "user", "content": "and?"}]
    counted = client.messages.count_tokens(model=MODEL, messages=history).input_tokens
    chat_history = messages + [{"role": "assistant", "content": text_of(r),
                                "reasoning_content": r.content[0].thinking}, {"role": "user", "content": "and?"}]
    assert counted == chat(oai, chat_history, max_tokens=1).usage.prompt_tokens


def test_block_stream_with_thinking_text_and_a_call():
    stream = BlockStream()
    events = stream.parts([{"reasoning_content": "hm"}, {"reasoning_content": "m"}, {"content": "Hi"}])
    events += stream.parts([{"tool_call": d} for d in (ToolCallDelta(0, "call_1", "f"), ToolCallDelta(0, arguments="{"),
                                                       ToolCallDelta(0, arguments="}"), ToolCallDelta(0, done=True))])
    events += stream.finish()
    parsed = [TypeAdapter(RawMessageStreamEvent).validate_python(e) for e in events]
    assert [(e.type, getattr(e, "index", None)) for e in parsed] == [
        ("content_block_start", 0), ("content_block_delta", 0), ("content_block_delta", 0),
        ("content_block_stop", 0), ("content_block_start", 1), ("content_block_delta", 1), ("content_block_stop", 1),
        ("content_block_start", 2), ("content_block_delta", 2), ("content_block_delta", 2),
        ("content_block_stop", 2)]
    assert parsed[7].content_block.id == "toolu_1"


def test_structured_output(served):
    _, tokenizer, client, oai = served
    schema = {"type": "object", "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["unit"],
              "additionalProperties": False}
    bias = closing_bias(tokenizer)
    r = client.messages.create(model=MODEL, max_tokens=60, messages=[{"role": "user", "content": "weather"}],
                               output_config={"format": {"type": "json_schema", "schema": schema}},
                               extra_body={"logit_bias": bias})
    expected = chat(oai, [{"role": "user", "content": "weather"}], max_tokens=60, logit_bias=bias,
                    response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema}})
    assert text_of(r) == expected.choices[0].message.content and r.stop_reason == "end_turn"
    assert json.loads(text_of(r))["unit"] in ("celsius", "fahrenheit")


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """A server whose engine writes a given text (the random model never writes a tool call)."""
    tokenizer = load_tokenizer(build_checkpoint(tmp_path_factory.mktemp("messages-scripted") / MODEL))
    engine = ScriptedEngine([])
    config = ServerConfig(model_name=MODEL, max_context=1024, vocab_size=tokenizer.vocab_size)
    with running_server(create_app(engine, tokenizer, config, ChatFormat(tokenizer))) as url:
        yield url, tokenizer, engine


@pytest.mark.parametrize("text", [
    '<think>the user wants weather</think>Let me check.\n<tool_call>{"name": "get_weather", "arguments": '
    '{"city": "Paris"}}</tool_call>', *STREAMED_CALLS])
def test_streamed_blocks_join_to_the_reply(scripted, text):
    """Thinking, text and calls streamed one token at a time join, by the SDK's accumulator, to the non-streamed
    reply; a call whose text turns out malformed (cut short) keeps its streamed block, and its text follows."""
    url, tokenizer, engine = scripted
    engine.script = tokenizer.encode(text, add_special_tokens=False) + tokenizer.eos_token_ids[:1]
    client = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0, timeout=60)
    tools = [{"name": n, "input_schema": {"type": "object"}} for n in ("write", "get_weather")]
    request = dict(model=MODEL, max_tokens=100, messages=[{"role": "user", "content": "go"}], tools=tools)
    whole = client.messages.create(**request)
    with client.messages.stream(**request) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == whole.stop_reason
    calls = [b for b in whole.content if b.type == "tool_use"]
    if calls:
        assert whole.stop_reason == "tool_use" and shape(final, ("id",)) == shape(whole, ("id",))  # ids: new
        assert len({b.id for b in calls}) == len(calls) and all(b.id.startswith("toolu_") for b in calls)
    else:  # the cut call: its block as far as it came, then the whole text as the non-streamed reply has it
        assert whole.stop_reason == "end_turn" and shape(whole) == [{"type": "text", "text": text}]
        assert [b["type"] for b in shape(final)] == ["tool_use", "text"] and shape(final)[1:] == shape(whole)
    if text.startswith("<think>"):
        assert [b.type for b in whole.content] == ["thinking", "text", "tool_use"]
        assert whole.content[2].input == {"city": "Paris"} and whole.content[0].thinking == "the user wants weather"
    raw_events(url, request)  # every event validates, named by its event line


@pytest.mark.parametrize("path, body, ignored", [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 1, "best_of": 1, "frobnicate": 1}, "{'frobnicate'}"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "cache": 1}],
                                            "documents_extra": 1}], "max_tokens": 1, "zz": 0, "aa": None},
     "{'aa', 'messages.0.content.0.cache', 'zz'}"),  # a chat message's own extras go to the template: not ignored
    ("/v1/responses", {"input": "hi", "max_output_tokens": 1, "seed": 1, "speed": "fast"}, "{'speed'}"),
    ("/v1/messages", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "seed": 1,
                      "tools": [{**TOOL, "cache_control": {}, "colour": 1}], "betas": []},
     "{'betas', 'tools.0.colour'}"),
    ("/v1/messages", {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {}}]}],
                      "max_tokens": 1, "metadata": {}}, None),
])
def test_ignored_fields_are_named_in_one_warning(served, caplog, path, body, ignored):
    """Fields a request sets that the server ignores are named in one warning (vLLM's), and the request still
    succeeds; the ones it reads (a sampling extension passed on, a chat message's template fields) are not named;
    nor is a field a model accepts and ignores by design (a tool's cache_control, as state reuse needs no marks)."""
    url = served[0]
    with caplog.at_level("WARNING", logger="openjamba.serve"):
        r = httpx.post(url + path, json={"model": MODEL, **body}, headers={"x-api-key": KEY}, timeout=60)
    assert r.status_code == 200, r.text
    warned = [rec.getMessage() for rec in caplog.records if "ignored" in rec.getMessage()]
    assert warned == ([f"The following fields were present in the request but ignored: {ignored}"] if ignored else [])
