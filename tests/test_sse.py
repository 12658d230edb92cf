"""The streamed chunks' fast serialization gives the bytes of `sse(dict)` (json.dumps of the whole chunk)."""

from __future__ import annotations

import json

import pytest

from openjamba.serve.sse import ChunkFormat, delta_json, sse, text_json

TEXTS = ["", "plain", " Paris", 'say "hi"', "back\\slash", "tab\there\nnew\rline", "\x00\x01\x1f\x7f", "é", "日本語",
         "🙂 emoji", "\ud800", "\u2028\u2029", "</script>", "{\"a\": [1, 2]}"]
LOGPROBS = [None, {"tokens": ["a"], "token_logprobs": [-0.5], "top_logprobs": [{"a": -0.5, "b": -1.25}],
                   "text_offset": [3]},
            {"content": [{"token": "é", "logprob": float("-inf"), "bytes": [195, 169], "top_logprobs": []}]}]
HEAD = {"id": "cmpl-0f", "object": "text_completion", "created": 1700000000, "model": 'my "model" é'}


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("logprobs", LOGPROBS)
@pytest.mark.parametrize("reason", [None, "stop", "length", "tool_calls"])
def test_completion_chunk_matches_json_dumps(text, logprobs, reason):
    expected = sse({**HEAD, "choices": [{"index": 3, "text": text, "logprobs": logprobs, "finish_reason": reason}]})
    assert ChunkFormat(HEAD, "text").event(3, text_json(text), logprobs, reason) == expected


DELTAS = [{}, {"role": "assistant", "content": ""}, {"reasoning_content": "think \"hard\"\n"},
          {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                           "function": {"name": "get_weather", "arguments": ""}}]},
          {"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\": \"Par"}}]}] + \
         [{"content": text} for text in TEXTS]


@pytest.mark.parametrize("delta", DELTAS)
@pytest.mark.parametrize("logprobs", LOGPROBS)
@pytest.mark.parametrize("reason", [None, "stop"])
def test_chat_chunk_matches_json_dumps(delta, logprobs, reason):
    head = {**HEAD, "object": "chat.completion.chunk"}
    expected = sse({**head, "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]})
    assert ChunkFormat(head, "delta").event(0, delta_json(delta), logprobs, reason) == expected


def test_usage_and_done_events():
    usage = {**HEAD, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
    assert sse(usage) == f"data: {json.dumps(usage, separators=(',', ':'))}\n\n".encode()
    assert sse("[DONE]") == b"data: [DONE]\n\n"
