"""The Responses API's request (`POST /v1/responses`) and its translation into a chat completions request.

A Responses request is a chat request in another shape: `input` items become chat messages (function_call items
an assistant turn's tool_calls, function_call_output items tool messages), `instructions` a system message first,
flat function tools the chat route's nested ones, `text.format` a response_format. The translated request goes
through the chat route's own validation, template, tool-call enforcement and JSON mode. Fields this server cannot
honour (built-in tools, images and files, background runs, reasoning effort, reusable prompts, server-side
conversations, truncation) are a 400, never silently ignored; unknown extra fields are ignored, as elsewhere.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator

from . import protocol as p

MESSAGE_ROLES = ("user", "system", "developer", "assistant")
TEXT_PARTS = ("input_text", "output_text", "text")
# vLLM-style sampling extensions a Responses request may carry (the openai client's extra_body), passed to the chat
# request, which validates them
EXTENSIONS = ("seed", "top_k", "min_p", "logit_bias", "repetition_penalty", "presence_penalty", "frequency_penalty",
              "stop", "stop_token_ids")


class ResponseTool(p._Request):
    model_config = ConfigDict(strict=True, extra="allow")
    USED_EXTRAS = frozenset()
    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("type")
    @classmethod
    def _function_only(cls, value: str) -> str:
        if value != "function":
            raise ValueError(f"the built-in tool {value!r} is not supported by this server (function tools only)")
        return value


class ResponsesRequest(p._Request):
    model_config = ConfigDict(strict=True, extra="allow")  # the extras: EXTENSIONS, checked by the chat request
    USED_EXTRAS = frozenset(EXTENSIONS)
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    tools: list[ResponseTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    stream: bool = False
    previous_response_id: str | None = None
    store: bool = True
    text: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    # defined by OpenAI, refused unless neutral
    background: Literal[False] | None = None
    truncation: Literal["disabled"] | None = None
    include: list[str] | None = Field(default=None, max_length=0)
    top_logprobs: Literal[0] | None = None
    max_tool_calls: None = None
    prompt: None = None
    conversation: None = None
    reasoning: dict[str, Any] | None = None

    @field_validator("tools")
    @classmethod
    def _named(cls, value: list[ResponseTool] | None) -> list[ResponseTool] | None:
        if any(not tool.name for tool in value or []):
            raise ValueError("a function tool needs a name")
        return value

    @field_validator("reasoning")
    @classmethod
    def _no_effort(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value and any(v is not None for v in value.values()):
            raise ValueError("reasoning settings are not supported by this server (the chat template decides "
                             "whether the model thinks; chat_template_kwargs on /v1/chat/completions sets it)")
        return value

    @field_validator("text")
    @classmethod
    def _text(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        if set(value) - {"format", "verbosity"} or value.get("verbosity") not in (None, "medium"):
            raise ValueError('text takes a "format" ({"type": "text" | "json_object" | "json_schema", ...}); '
                             "verbosity other than medium is not supported")
        fmt = value.get("format")
        if fmt is not None and not isinstance(fmt, dict):
            raise ValueError("text.format must be an object")
        return value

    def response_format(self) -> dict[str, Any] | None:
        """text.format as the chat route's response_format (its validator checks it)."""
        fmt = (self.text or {}).get("format")
        if fmt is None or fmt.get("type") != "json_schema":
            return fmt
        spec = {k: v for k, v in fmt.items() if k != "type"}
        return {"type": "json_schema", "json_schema": spec}

    def chat_tool_choice(self) -> str | dict[str, Any] | None:
        """tool_choice in the chat route's shape: {"type": "function", "name": N} -> {"type": "function",
        "function": {"name": N}}; other objects (built-in tools, allowed_tools) are refused."""
        choice = self.tool_choice
        if not isinstance(choice, dict):
            return choice
        if set(choice) != {"type", "name"} or choice["type"] != "function" or not isinstance(choice["name"], str):
            raise p.RequestError('tool_choice: a named tool_choice is {"type": "function", "name": NAME} (built-in '
                                 "tools and allowed_tools are not supported)", param="tool_choice")
        return {"type": "function", "function": {"name": choice["name"]}}

    def echo(self) -> dict[str, Any]:
        """The request's settings as a response object repeats them (OpenAI's defaults where left out)."""
        return {
            "instructions": self.instructions, "max_output_tokens": self.max_output_tokens,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "tools": [t.model_dump(exclude_none=True) for t in self.tools or []],
            "tool_choice": self.tool_choice or "auto",
            "parallel_tool_calls": True if self.parallel_tool_calls is None else self.parallel_tool_calls,
            "text": {"format": {"type": "text"}, **(self.text or {})}, "metadata": self.metadata or {},
            "user": self.user, "store": self.store, "previous_response_id": self.previous_response_id,
            "background": False, "truncation": "disabled", "reasoning": None, "service_tier": "default",
        }


def input_messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's own input as chat messages (without `instructions`)."""
    if isinstance(req.input, str):
        return [{"role": "user", "content": req.input}]
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(req.input):
        kind = item.get("type", "message" if "role" in item else None)
        where = f"input.{i}"
        if kind == "message":
            role = item.get("role")
            if role not in MESSAGE_ROLES:
                raise p.RequestError(f"{where}.role: must be one of {', '.join(MESSAGE_ROLES)}", param=f"{where}.role")
            messages.append({"role": role, "content": _text_of(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            call = {"id": _string(item, "call_id", where), "type": "function",
                    "function": {"name": _string(item, "name", where), "arguments": _string(item, "arguments", where)}}
            if messages and messages[-1]["role"] == "assistant":  # one assistant turn: its text, then its calls
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": _string(item, "call_id", where),
                             "content": output if isinstance(output, str) else _text_of(output, f"{where}.output")})
        elif kind == "reasoning":
            continue  # a past turn's thinking: chat templates drop it from the history
        else:
            raise p.RequestError(f"{where}: input items of type {kind!r} are not supported (messages, "
                                 "function_call, function_call_output and reasoning only)", param=where)
    if not messages:
        raise p.RequestError("input: at least one message is needed", param="input")
    return messages


def _text_of(content: Any, where: str) -> str:
    """A message's text: a string, or text parts joined; images, files and audio are refused."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise p.RequestError(f"{where}: must be a string or a list of text parts", param=where)
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in TEXT_PARTS or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise p.RequestError(f"{where}: content part {kind!r} is not supported (text only)", param=where)
        texts.append(part["text"])
    return "".join(texts)


def _string(item: dict, key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise p.RequestError(f"{where}.{key}: a string is required", param=f"{where}.{key}")
    return value


def chat_request(req: ResponsesRequest, messages: list[dict[str, Any]]) -> p.ChatCompletionRequest:
    """The chat completions request that `req` (with its whole conversation `messages`) is."""
    tools = [{"type": "function", "function": t.model_dump(include={"name", "description", "parameters"},
                                                            exclude_none=True)} for t in req.tools or []]
    body = {"messages": messages, "max_tokens": req.max_output_tokens, "temperature": req.temperature,
            "top_p": req.top_p, "tools": tools or None, "tool_choice": req.chat_tool_choice(),
            "parallel_tool_calls": req.parallel_tool_calls, "user": req.user,
            "response_format": req.response_format(),
            **{k: v for k, v in (req.model_extra or {}).items() if k in EXTENSIONS}}
    return p.translated_chat_request(body, {"response_format": "text.format", "max_tokens": "max_output_tokens"})
