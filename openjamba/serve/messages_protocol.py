"""Anthropic's Messages API request (`POST /v1/messages`, `/v1/messages/count_tokens`) and its translation into a
chat completions request.

A Messages request is a chat request in another shape: `system` becomes a system message first; a user turn's
`tool_result` blocks become tool messages (in their place among its text), an assistant turn's `tool_use` blocks
its tool_calls and its `thinking` blocks its reasoning_content (which templates keep or drop, as for a chat
request's history); `tools` ({name, description, input_schema}) become function tools, `tool_choice` auto / any /
tool / none the chat route's "auto" / "required" / a named function / "none" (`disable_parallel_tool_use`:
parallel_tool_calls false), `stop_sequences` stop strings, `output_config.format` a json_schema response_format,
`thinking` enabled / disabled the template variable `enable_thinking` (adaptive leaves the template's default).
A last assistant turn is a prefill: the chat request continues it (`continue_final_message`), and the reply holds
only what the model added. The translated request goes through the chat route's own validation, template and
tool-call enforcement. What this server cannot honour (images, documents, server tools) is a 400; unknown
extra fields are ignored, as Anthropic's and the OpenAI routes do.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from . import protocol as p

# sampling extensions a Messages request may carry (the anthropic client's extra_body), passed to the chat request,
# which validates them
EXTENSIONS = ("seed", "min_p", "logit_bias", "repetition_penalty", "presence_penalty", "frequency_penalty",
              "stop_token_ids", "chat_template_kwargs")
BLOCK_TYPES = {"user": ("text", "tool_result"), "assistant": ("text", "tool_use", "thinking", "redacted_thinking")}


class _Block(p._Request):
    model_config = ConfigDict(strict=True, extra="ignore")
    ACCEPTED = frozenset({"cache_control", "citations"})  # (state reuse needs no cache marks)


class TextBlock(_Block):
    type: Literal["text"]
    text: str


class ToolUseBlock(_Block):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(_Block):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] = ""
    is_error: bool = False

    def text(self) -> str:
        """The result's text; an error marked so (a chat tool message has no error flag the template could read)."""
        text = self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)
        return f"Error: {text}" if self.is_error else text


class ThinkingBlock(_Block):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Block):
    type: Literal["redacted_thinking"]
    data: str


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
                  Field(discriminator="type")]


class Message(p._Request):
    role: Literal["user", "assistant"]
    content: str | list[Block]

    @model_validator(mode="before")
    @classmethod
    def _supported_blocks(cls, value: Any) -> Any:
        """A block this server cannot read (an image, a document) or one in the wrong turn is named plainly."""
        if not isinstance(value, dict) or value.get("role") not in BLOCK_TYPES or not isinstance(
                value.get("content"), list):
            return value
        allowed = BLOCK_TYPES[value["role"]]
        for block in value["content"]:
            kind = block.get("type") if isinstance(block, dict) else None
            if isinstance(kind, str) and kind not in allowed:
                raise ValueError(f"content blocks of type {kind!r} are not supported in a {value['role']} turn "
                                 f"({', '.join(allowed)} only)")
        return value


class Tool(p._Request):
    model_config = ConfigDict(strict=True, extra="ignore")
    ACCEPTED = frozenset({"cache_control", "strict", "input_examples"})
    type: str | None = None
    name: Annotated[str, Field(min_length=1)]
    description: str | None = None
    input_schema: dict[str, Any]

    @field_validator("type")
    @classmethod
    def _custom_only(cls, value: str | None) -> str | None:
        if value not in (None, "custom"):
            raise ValueError(f"the server tool {value!r} is not supported by this server (custom tools only)")
        return value


class ToolChoice(p._Request):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False

    @model_validator(mode="after")
    def _named(self) -> ToolChoice:
        if (self.type == "tool") != (self.name is not None):
            raise ValueError('a "tool" tool_choice names the tool ({"type": "tool", "name": NAME}); the others '
                             "name none")
        return self

    def for_chat(self) -> str | dict[str, Any]:
        if self.type == "tool":
            return {"type": "function", "function": {"name": self.name}}
        return {"auto": "auto", "any": "required", "none": "none"}[self.type]


class Thinking(p._Request):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(default=None, ge=1)  # accepted, not enforced: the model thinks as it does
    display: Literal["summarized", "omitted"] | None = None

    @model_validator(mode="after")
    def _budget(self) -> Thinking:
        if self.type == "enabled" and self.budget_tokens is None:
            raise ValueError('budget_tokens is required when thinking is "enabled"')
        return self


class OutputFormat(p._Request):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(p._Request):
    format: OutputFormat | None = None
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None  # accepted, not honoured (a hint)


class CountTokensRequest(p._Request):
    """What renders the prompt: `/v1/messages/count_tokens` takes exactly this."""

    model_config = ConfigDict(strict=True, extra="allow")  # the extras: EXTENSIONS, checked by the chat request
    USED_EXTRAS = frozenset(EXTENSIONS)
    model: str
    messages: Annotated[list[Message], Field(min_length=1)]
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None

    @model_validator(mode="after")
    def _prefill(self) -> CountTokensRequest:
        """A last assistant turn is a prefill, which the reply continues; as at Anthropic, its text may not end
        in whitespace."""
        last = self.messages[-1]
        if last.role == "assistant":
            text = last.content if isinstance(last.content, str) else "".join(
                b.text for b in last.content if isinstance(b, TextBlock))
            if text != text.rstrip():
                raise ValueError("messages: final assistant content cannot end with trailing whitespace")
        return self

    @property
    def prefill(self) -> bool:
        return self.messages[-1].role == "assistant"


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    stream: bool = False
    metadata: dict[str, Any] | None = None  # accepted, ignored (user_id)
    service_tier: str | None = None  # accepted, ignored
    output_config: OutputConfig | None = None


def chat_messages(req: CountTokensRequest) -> list[dict[str, Any]]:
    """The conversation as chat messages, `system` first."""
    out: list[dict[str, Any]] = []
    if req.system is not None:
        out.append({"role": "system", "content": _joined(req.system)})
    for message in req.messages:
        if isinstance(message.content, str):
            out.append({"role": message.role, "content": message.content})
        elif message.role == "user":
            out += _user_turn(message.content)
        else:
            out.append(_assistant_turn(message.content))
    return out


def _joined(content: str | list[TextBlock]) -> str:
    return content if isinstance(content, str) else "".join(block.text for block in content)


def _user_turn(blocks: list) -> list[dict[str, Any]]:
    """A user turn's blocks in order: each tool_result a tool message, the text between them a user message."""
    out: list[dict[str, Any]] = []
    texts: list[str] = []
    for block in blocks:
        if isinstance(block, ToolResultBlock):
            if texts:
                out.append({"role": "user", "content": "".join(texts)})
                texts = []
            out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": block.text()})
        else:
            texts.append(block.text)
    if texts or not out:
        out.append({"role": "user", "content": "".join(texts)})
    return out


def _assistant_turn(blocks: list) -> dict[str, Any]:
    """An assistant turn: its text, its thinking as reasoning_content (redacted thinking dropped), its calls."""
    message: dict[str, Any] = {"role": "assistant", "content": ""}
    for block in blocks:
        if isinstance(block, TextBlock):
            message["content"] += block.text
        elif isinstance(block, ThinkingBlock):
            message["reasoning_content"] = message.get("reasoning_content", "") + block.thinking
        elif isinstance(block, ToolUseBlock):
            message.setdefault("tool_calls", []).append({"id": block.id, "type": "function", "function": {
                "name": block.name, "arguments": json.dumps(block.input, ensure_ascii=False)}})
    return message


def chat_request(req: CountTokensRequest) -> p.ChatCompletionRequest:
    """The chat completions request that `req` is (a CountTokensRequest: the rendering's fields only)."""
    extra = {k: v for k, v in (req.model_extra or {}).items() if k in EXTENSIONS}
    if req.thinking is not None and req.thinking.type != "adaptive":
        kwargs = extra.get("chat_template_kwargs") or {}
        if isinstance(kwargs, dict):  # anything else is left for the chat request to refuse
            extra["chat_template_kwargs"] = {**kwargs, "enable_thinking": req.thinking.type == "enabled"}
    tools = [{"type": "function", "function": {"name": t.name, "parameters": t.input_schema,
                                               **({"description": t.description} if t.description else {})}}
             for t in req.tools or []]
    body: dict[str, Any] = {"messages": chat_messages(req), "tools": tools or None, **extra}
    if req.prefill:  # the reply continues the last assistant turn
        body.update(add_generation_prompt=False, continue_final_message=True)
    if req.tool_choice is not None:
        body["tool_choice"] = req.tool_choice.for_chat()
        if req.tool_choice.disable_parallel_tool_use:
            body["parallel_tool_calls"] = False
    if isinstance(req, MessagesRequest):
        body.update(max_tokens=req.max_tokens, stop=req.stop_sequences, temperature=req.temperature,
                    top_p=req.top_p, top_k=req.top_k)
        if req.output_config is not None and req.output_config.format is not None:  # structured output
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "output", "schema": req.output_config.format.schema_}}
    return p.translated_chat_request(body, {"stop": "stop_sequences", "response_format": "output_config.format",
                                            "continue_final_message": "messages"})
