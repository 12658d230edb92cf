"""Server-sent events of streamed responses, as bytes.

A streamed token becomes one chunk, `{"id": ..., "object": ..., "created": ..., "model": ..., "choices": [{"index":
i, "text" or "delta": ..., "logprobs": ..., "finish_reason": ...}]}`. All of it but the choice's index, value,
logprobs and finish reason is the same in every chunk of a response, so `ChunkFormat` serializes it once and a
token's chunk costs one JSON string encoding (the C encoder `json.dumps` itself calls) and one format: on a
two-core machine the event loop's time per token is taken from the model's compute threads. The bytes are those
`sse(chunk)` gives for the dict (tests/test_sse.py holds them to it).
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring_ascii as json_string  # what json.dumps uses (ensure_ascii)
from typing import Any

SEPARATORS = (",", ":")


def dumps(value: Any) -> str:
    return json.dumps(value, separators=SEPARATORS)


def sse(data: dict | str) -> bytes:
    """One event: `data: JSON` (or a literal such as `[DONE]`) and the blank line that ends it."""
    return f"data: {data if isinstance(data, str) else dumps(data)}\n\n".encode()


class ChunkFormat:
    """The chunks of one streamed response: `head` (the fields before "choices") and the name of the choice's
    value ("text" for completions, "delta" for chat) serialized once."""

    def __init__(self, head: dict, key: str) -> None:
        fields = dumps(head)[1:-1]
        self._start = f'data: {{{fields}{"," if fields else ""}"choices":[{{"index":'
        self._key = f",{json_string(key)}:"

    def event(self, index: int, value: str, logprobs: Any = None, reason: str | None = None) -> bytes:
        """The event of choice `index` with `value` already JSON (`text_json`, `delta_json`)."""
        logprobs = "null" if logprobs is None else dumps(logprobs)
        reason = "null" if reason is None else json_string(reason)
        return (f'{self._start}{index}{self._key}{value},"logprobs":{logprobs},'
                f'"finish_reason":{reason}}}]}}\n\n').encode()


def text_json(text: str) -> str:
    return json_string(text)


def delta_json(delta: dict) -> str:
    """A chat delta as JSON; a delta of one text field (most tokens' {"content": ...}) without `json.dumps`."""
    if len(delta) == 1:
        (key, value), = delta.items()
        if type(value) is str and type(key) is str:
            return f"{{{json_string(key)}:{json_string(value)}}}"
    return dumps(delta)
