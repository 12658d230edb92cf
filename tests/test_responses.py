"""`/v1/responses` with the official openai client against a live server (tiny random model): its replies equal the
chat route's for the same conversation (greedy), streamed events parse and join to the same text, a follow-up by
`previous_response_id` reuses the stored history, forced function calls come back as function_call items."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from openjamba.serve.responses import ItemStream, assistant_message
from openjamba.tool_calls import ToolCallDelta

from .serve_helpers import tiny_server
from .test_tool_choice import WEATHER, closing_bias

MODEL = "tiny-jamba"
SCHEMA = {"type": "object", "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["unit"],
          "additionalProperties": False}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with tiny_server(tmp_path_factory.mktemp("responses") / MODEL, max_stored_responses=4) as (url, tokenizer, _):
        yield url, tokenizer, openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)


def chat_text(client, messages, **kwargs) -> tuple[str, str]:
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **kwargs)
    return r.choices[0].message.content or "", r.choices[0].finish_reason


def test_text_reply_equals_chat_and_instructions(served):
    _, _, client = served
    r = client.responses.create(model=MODEL, instructions="You are terse.", input="hello world",
                                max_output_tokens=8, temperature=0, metadata={"k": "v"})
    text, reason = chat_text(client, [{"role": "system", "content": "You are terse."},
                                      {"role": "user", "content": "hello world"}], max_tokens=8)
    assert r.object == "response" and r.id.startswith("resp_") and r.output_text == text
    assert r.status == ("incomplete" if reason == "length" else "completed")
    assert (r.incomplete_details is not None) == (reason == "length")
    assert r.instructions == "You are terse." and r.metadata == {"k": "v"} and r.max_output_tokens == 8
    (item,) = r.output
    assert item.type == "message" and item.role == "assistant" and item.content[0].type == "output_text"
    assert r.usage.output_tokens <= 8 and r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    # the same conversation as input items with content parts, a developer message for the system one
    items = [{"role": "developer", "content": [{"type": "input_text", "text": "You are terse."}]},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello "},
                                                             {"type": "input_text", "text": "world"}]}]
    again = client.responses.create(model=MODEL, input=items, max_output_tokens=8, temperature=0)
    assert again.output_text == text and again.usage.input_tokens == r.usage.input_tokens


def test_streamed_events_join_to_the_reply(served):
    _, _, client = served
    request = dict(model=MODEL, input="The quick brown fox", max_output_tokens=10, temperature=0)
    plain = client.responses.create(**request)
    events = list(client.responses.create(stream=True, **request))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed" if plain.status == "completed" else "response.incomplete"]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == plain.output_text == events[-1].response.output_text
    assert events[-4].text == deltas and events[-2].item.content[0].text == deltas
    assert events[-2].item.status == plain.status == plain.output[-1].status  # "incomplete" when cut, as in the reply
    # the SDK's stream helper parses the same events (its get_final_response wants response.completed, and a reply
    # cut by max_output_tokens ends with response.incomplete, as at OpenAI)
    with client.responses.stream(**request) as stream:
        assert "".join(e.delta for e in stream if e.type == "response.output_text.delta") == deltas
    # every event and the response validate against the SDK's pydantic types (the client itself does not validate)
    raw = httpx.post(served[0] + "/v1/responses", json={**request, "stream": True}, timeout=60).text
    lines = [line[6:] for line in raw.split("\n") if line.startswith("data: ") and line != "data: [DONE]"]
    assert [TypeAdapter(ResponseStreamEvent).validate_json(line).type for line in lines] == kinds
    Response.model_validate(httpx.post(served[0] + "/v1/responses", json=request, timeout=60).json())


def test_previous_response_id_reuses_the_history(served):
    _, _, client = served
    first = client.responses.create(model=MODEL, instructions="Be brief.", input="hello world",
                                    max_output_tokens=6, temperature=0)
    second = client.responses.create(model=MODEL, instructions="Be brief.", previous_response_id=first.id,
                                     input="Paris weather", max_output_tokens=6, temperature=0)
    assert second.previous_response_id == first.id
    # the whole history was computed by the first request: its prompt at least comes from the state store
    cached = second.usage.input_tokens_details.cached_tokens
    assert first.usage.input_tokens <= cached < second.usage.input_tokens, (cached, second.usage)
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"},
               {"role": "assistant", "content": first.output_text}, {"role": "user", "content": "Paris weather"}]
    assert second.output_text == chat_text(client, history, max_tokens=6)[0]
    assert client.responses.retrieve(second.id).output_text == second.output_text


def test_forced_function_call_and_its_output(served):
    _, tokenizer, client = served
    tools = [{"type": "function", **WEATHER}]
    bias = {"logit_bias": closing_bias(tokenizer)}
    for choice in ({"type": "function", "name": "get_weather"}, "required"):
        r = client.responses.create(model=MODEL, input="hello world", tools=tools, tool_choice=choice,
                                    max_output_tokens=200, temperature=0, extra_body=bias)
        (call,) = [i for i in r.output if i.type == "function_call"]
        assert call.name == "get_weather" and "city" in json.loads(call.arguments) and r.status == "completed"
        chat = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello world"}], max_tokens=200, temperature=0,
            tools=[{"type": "function", "function": WEATHER}], logit_bias=closing_bias(tokenizer),
            tool_choice=choice if choice == "required" else {"type": "function", "function": {"name": "get_weather"}})
        assert chat.choices[0].message.tool_calls[0].function.arguments == call.arguments
    events = list(client.responses.create(model=MODEL, input="hello world", tools=tools, tool_choice="required",
                                          max_output_tokens=200, temperature=0, extra_body=bias, stream=True))
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done.arguments == call.arguments and events[-1].response.output[-1].id == done.item_id
    assert [i.type for i in events[-1].response.output] == [i.type for i in r.output]
    # the tool's result, sent as function_call_output after the stored call, renders as the chat route's tool turn
    follow = client.responses.create(model=MODEL, previous_response_id=r.id, tools=tools, max_output_tokens=6,
                                     temperature=0, input=[{"type": "function_call_output", "call_id": call.call_id,
                                                            "output": "sunny"}])
    messages = [{"role": "user", "content": "hello world"},
                {"role": "assistant", "content": "", "tool_calls": [{"id": call.call_id, "type": "function",
                 "function": {"name": "get_weather", "arguments": call.arguments}}]},
                {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}]
    text, _ = chat_text(client, messages, max_tokens=6, tools=[{"type": "function", "function": WEATHER}])
    assert follow.output_text == text


def test_json_schema_format_is_the_chat_routes(served):
    _, tokenizer, client = served
    bias = closing_bias(tokenizer)
    r = client.responses.create(model=MODEL, input="weather", max_output_tokens=60, temperature=0,
                                text={"format": {"type": "json_schema", "name": "w", "schema": SCHEMA}},
                                extra_body={"logit_bias": bias})
    text, _ = chat_text(client, [{"role": "user", "content": "weather"}], max_tokens=60, logit_bias=bias,
                        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}})
    assert r.output_text == text and r.status == "completed" and json.loads(text)["unit"] in ("celsius", "fahrenheit")


def test_item_stream_with_reasoning_text_and_a_call():
    """Thinking, then text, then a call: a reasoning item, a message item and a function_call item, in order."""
    sequence = iter(range(100))
    stream = ItemStream(lambda kind, **fields: {"type": kind, "sequence_number": next(sequence), **fields})
    events = [e for part in ({"reasoning_content": "hm"}, {"reasoning_content": "m"}, {"content": "Hi"})
              for e in stream.part(part)]
    events += [e for d in (ToolCallDelta(0, "call_1", "f"), ToolCallDelta(0, arguments="{"),
                           ToolCallDelta(0, arguments="}"), ToolCallDelta(0, done=True))
               for e in stream.part({"tool_call": d})]
    events += stream.finish()
    parsed = [TypeAdapter(ResponseStreamEvent).validate_python(e) for e in events]
    assert [e.type for e in parsed] == [
        "response.output_item.added", "response.reasoning_text.delta", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.output_item.done", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done"]
    assert [i["type"] for i in stream.items] == ["reasoning", "message", "function_call"]
    assert stream.items[0]["content"][0]["text"] == "hmm" and parsed[3].text == "hmm"
    assert parsed[0].item.content[0].text == "" and parsed[-1].item.call_id == "call_1"
    message = assistant_message(stream.items)
    assert message == {"role": "assistant", "content": "Hi", "reasoning_content": "hmm", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"background": True}, "background"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input.0.content"),
    ({"input": [{"type": "file_search_call", "id": "x"}]}, "input.0"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input.0.arguments"),
    ({"tool_choice": {"type": "function", "name": "nope"}, "tools": [{"type": "function", "name": "f"}]},
     "tool_choice"),
    ({"tool_choice": {"type": "web_search"}}, "tool_choice"),
    ({"text": {"format": {"type": "yaml"}}}, "text.format"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"input": 5}, "input"),
])
def test_what_cannot_be_honoured_is_400(served, extra, param):
    url = served[0]
    r = httpx.post(url + "/v1/responses", json={"model": MODEL, "input": "hi", "max_output_tokens": 2, **extra})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_store_get_delete_and_404s(served):
    url, _, client = served
    r = httpx.post(url + "/v1/responses", json={"input": "hi", "previous_response_id": "resp_nope"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "previous_response_not_found"
    kept = client.responses.create(model=MODEL, input="hi", max_output_tokens=2)
    unstored = client.responses.create(model=MODEL, input="hi", max_output_tokens=2, store=False)
    assert client.responses.retrieve(kept.id).id == kept.id
    for rid in (unstored.id, "resp_nope"):
        r = httpx.get(f"{url}/v1/responses/{rid}")
        assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    client.responses.delete(kept.id)
    assert httpx.get(f"{url}/v1/responses/{kept.id}").status_code == 404
    assert httpx.delete(f"{url}/v1/responses/{kept.id}").status_code == 404
    ids = [client.responses.create(model=MODEL, input="hi", max_output_tokens=1).id for _ in range(5)]
    assert httpx.get(f"{url}/v1/responses/{ids[0]}").status_code == 404  # beyond max_stored_responses=4
    assert httpx.get(f"{url}/v1/responses/{ids[-1]}").status_code == 200
