"""Random mutations of valid requests to every POST route of a live server: whatever a client sends, the answer is
a 2xx or an error in OpenAI's shape (Anthropic's on /v1/messages; never a 5xx or a traceback), and the server keeps
serving."""

from __future__ import annotations

import json
import random

import httpx
import pytest

from .serve_helpers import tiny_server

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
VALUES = [
    None, -1, 0, 1, 2, 10**12, -(10**12), 1.5, -0.5, 1e308, "x", "", " ", "\u0000", "a" * 5000, [], {}, [1, "a"],
    {"a": 1}, True, False, [[1, 2], [3]], [0], [-1], [10**9], "required", "auto", "none",
    {"type": "json_object"}, {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}},
    {"type": "json_schema", "json_schema": {"schema": {"type": "array", "items": {"$ref": "#"}}}},
    {"type": "json_schema", "json_schema": {"schema": {"anyOf": []}}},
    {"type": "json_schema", "json_schema": {"schema": {"enum": []}}},
    {"type": "json_schema", "json_schema": {"schema": {"type": "object", "properties": {"a": {"type": "integer"}},
                                                       "required": ["a", "b"]}}},
    {"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "nope"}},
    {"type": "function", "name": "get_weather"},
    [{"role": "user"}],
    [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "x"}}]}],
    [{"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function",
                                                            "function": {"name": "f", "arguments": "{bad"}}]}],
    [{"role": "tool", "content": "x"}], [{"role": "developer", "content": "x"}, {"role": "user", "content": "y"}],
    [{"role": "user", "content": [{"type": "text"}]}], [{"role": "user", "content": 5}],
    [{"role": "assistant", "content": "a", "reasoning_content": "r"}], [{"role": "function", "content": "x"}],
    [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
    [{"type": "function_call_output", "call_id": "x", "output": "y"}],
    [{"type": "function_call", "call_id": "x", "name": "f", "arguments": "{}"}],
    [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "x"}}}}}],
    [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/x"}}, "$defs": {"x": {"type": "integer"}}}}}],
    [{"type": "function", "name": "f", "parameters": {}}], [{"title": "d", "text": "t"}],
    {"type": "any"}, {"type": "tool", "name": "get_weather"}, {"type": "enabled", "budget_tokens": 10},
    [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "x", "content": [{"type": "text"}]}]}],
    [{"role": "assistant", "content": [{"type": "tool_use", "id": "x", "name": "f", "input": {}}]}],
    [{"role": "user", "content": [{"type": "image", "source": {}}]}], [{"name": "f", "input_schema": {}}],
    {"format": {"type": "json_schema", "schema": {"type": "object"}}},
]
MESSAGES = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "system": "s",
            "tools": [{"name": "get_weather", "input_schema": TOOLS[0]["function"]["parameters"]}],
            "tool_choice": {"type": "auto"}, "thinking": {"type": "disabled"}}
VALID = {
    "/v1/completions": {
        "prompt": "hello", "max_tokens": 4, "temperature": 0, "logprobs": 2, "echo": False, "stop": ["x"], "n": 1,
        "seed": 1, "top_p": 0.9, "top_k": 5, "logit_bias": {"5": 1.0}, "presence_penalty": 0.5, "stream": False,
        "response_format": {"type": "json_object"}, "min_tokens": 1, "stop_token_ids": [3]},
    "/v1/chat/completions": {
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}], "max_tokens": 4,
        "temperature": 0, "tools": TOOLS, "tool_choice": "auto", "logprobs": True, "top_logprobs": 2,
        "stream": False, "n": 1, "chat_template_kwargs": {"enable_thinking": False},
        "response_format": {"type": "text"}, "parallel_tool_calls": True, "max_completion_tokens": 4,
        "documents": None, "structured_outputs": {"choice": ["yes", "no"]}},
    "/v1/responses": {"input": "hi", "max_output_tokens": 4, "temperature": 0, "tools": TOOLS,
                      "instructions": "be brief", "stream": False, "tool_choice": "auto", "store": True},
    "/v1/messages": {**MESSAGES, "max_tokens": 4, "stop_sequences": ["x"], "temperature": 0, "stream": False,
                     "metadata": {"user_id": "u"}},
    "/v1/messages/count_tokens": MESSAGES,
    "/tokenize": {"prompt": "hello", "add_special_tokens": True},
    "/detokenize": {"tokens": [1, 2, 3]},
}
LENGTHS = ("max_tokens", "max_output_tokens", "max_completion_tokens")


def mutated(body: dict, rng: random.Random) -> dict:
    """One to three fields replaced, removed, or changed inside; sometimes streamed; lengths kept small."""
    def value():
        return json.loads(json.dumps(rng.choice(VALUES)))  # a fresh copy: later edits must not alias the table

    body = json.loads(json.dumps(body))
    for _ in range(rng.randint(1, 3)):
        key = rng.choice([*body, "model", "unknown_field"])
        roll = rng.random()
        if roll < 0.7:
            body[key] = value()
        elif roll < 0.85:
            body.pop(key, None)
        elif isinstance(body.get(key), list) and body[key]:
            body[key][0] = value()
        elif isinstance(body.get(key), dict):
            body[key][rng.choice([*body[key], "unknown"])] = value()
    if rng.random() < 0.3:
        body["stream"] = True
    for key in LENGTHS:
        if isinstance(body.get(key), int) and body[key] > 32:
            body[key] = 32
    if isinstance(body.get("n"), int) and body["n"] > 4:
        body["n"] = 4
    return body


@pytest.mark.parametrize("seed", [0, 1])
def test_mutated_requests_never_fail_the_server(tmp_path, seed):
    rng = random.Random(seed)
    statuses = set()
    with tiny_server(tmp_path / "m") as (url, _, _), httpx.Client(base_url=url, timeout=60) as client:
        for _ in range(200):
            path = rng.choice(list(VALID))
            body = {"model": "m", **mutated(VALID[path], rng)}
            if body.get("stream") is True:
                with client.stream("POST", path, json=body) as response:
                    text = "".join(response.iter_text())
            else:
                response = client.post(path, json=body)
                text = response.text
            statuses.add(response.status_code)
            assert response.status_code < 500, (path, body, text[:300])
            assert "Traceback" not in text
            if response.status_code >= 400:  # OpenAI's error shape, or Anthropic's on its routes
                answer, fields = json.loads(text), {"message", "type", "param", "code"}
                if path.startswith("/v1/messages"):
                    answer, fields = (answer if answer.pop("type") == "error" else {}), {"message", "type"}
                assert set(answer["error"]) >= fields, (path, body, text)
        assert client.get("/health").status_code == 200
    assert {200, 400} <= statuses  # both answers were exercised
