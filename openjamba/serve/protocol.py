"""OpenAI API request schemas (pydantic) and the response shapes the server builds.

Requests are validated strictly from the raw JSON body (`parse_request`): a wrong type is a 400, never a silent
coercion (`"max_tokens": "5"` is an error, as at OpenAI). Fields OpenAI defines but this server cannot honour
(best_of, suffix) are accepted only at their neutral values, so a client never gets
output that silently ignores what it asked for. Unknown extra fields are ignored, as OpenAI's own server and vLLM do,
so newer clients keep working, and named in one warning per request in the server's log, as vLLM does
(`ignored_fields`).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

MAX_N = 16  # choices per request
MAX_STOP = 16  # stop strings per request
MAX_LOGPROBS = 20  # OpenAI's own limit on top logprobs
RESERVED_TEMPLATE_VARIABLES = frozenset({"messages", "tools", "documents", "add_generation_prompt", "chat_template"})
log = logging.getLogger("openjamba.serve")


def check_template_variables(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """Extra chat-template variables (a request's `chat_template_kwargs`, `--default-chat-template-kwargs`): names
    that are identifiers and not the ones the server itself sets."""
    for name in value or {}:
        if not name.isidentifier() or name in RESERVED_TEMPLATE_VARIABLES:
            raise ValueError(f"{name!r} cannot be set: a template variable name other than "
                             f"{', '.join(sorted(RESERVED_TEMPLATE_VARIABLES))}")
    return value


def check_continuation(value: bool, info: ValidationInfo) -> bool:
    """`continue_final_message` (validated after `messages` and `add_generation_prompt`): the final message is an
    assistant message with text and no tool calls, and no generation prompt follows it (vLLM refuses both)."""
    if not value:
        return value
    if info.data.get("add_generation_prompt", True):
        raise ValueError("cannot be used with add_generation_prompt, which is true unless set to false")
    messages = info.data.get("messages")
    if not messages:  # absent or already refused
        return value
    last = messages[-1]
    text = last.content if isinstance(last.content, str) else "".join(part.text or "" for part in last.content or [])
    if last.role != "assistant" or last.tool_calls or not text.strip():
        raise ValueError("the final message must be an assistant message with text content (no tool_calls): the "
                         "text the model continues")
    return value


class RequestError(ValueError):
    """An invalid request: becomes a 400 (or `status`) with OpenAI's error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    # of a model with extra="allow": the extra fields it reads (None: all, as a chat message's go to the template)
    USED_EXTRAS: ClassVar[frozenset[str] | None] = None
    ACCEPTED: ClassVar[frozenset[str]] = frozenset()  # extra fields ignored by design, not named as ignored


class StreamOptions(_Request):
    include_usage: bool = False


Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class _Sampling(_Request):
    """Fields shared by both endpoints."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)  # vLLM's extension; 0 or -1 = off
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)  # vLLM's extension; 0 = off
    seed: int | None = None
    stop: str | list[str] | None = Field(default=None, validate_default=True)
    include_stop_str_in_output: bool = False  # vLLM's: the stop string that ended a choice stays in its text
    skip_special_tokens: bool = True  # vLLM's: false keeps special tokens in the text (EOS never)
    truncate_prompt_tokens: int | None = None  # vLLM's: a longer prompt keeps its last ones; -1 the context
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)  # vLLM's extension; 1 = off
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None  # token id (text) -> bias
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension, for benchmarks
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(default=None, max_length=MAX_STOP)  # vLLM's
    min_tokens: int = Field(default=0, ge=0)  # vLLM's: no EOS or stop token before this many
    response_format: dict[str, Any] | None = None  # {"type": "text" | "json_object" | "json_schema", ...}
    structured_outputs: dict[str, Any] | None = None  # vLLM's: {"choice": [str, ...]} or {"json": schema}
    guided_choice: list[str] | None = None  # vLLM's older spelling of structured_outputs.choice
    guided_json: dict[str, Any] | str | None = None  # ... and of structured_outputs.json
    guided_regex: Any = None  # vLLM's, refused (not implemented here) rather than ignored
    guided_grammar: Any = None

    @field_validator("max_tokens")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("must be at least 1")
        return value

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _truncation(cls, value: int | None) -> int | None:
        if value is not None and value < 1 and value != -1:
            raise ValueError("must be at least 1, or -1 for the model's context length")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"keys must be token ids written as decimal strings, got {key!r}")
        return value

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        kind = value.get("type")
        if kind not in ("text", "json_object", "json_schema"):
            raise ValueError(f'type must be "text", "json_object" or "json_schema", got {kind!r}')
        fields = {"type", "json_schema"} if kind == "json_schema" else {"type"}
        if set(value) != fields:
            raise ValueError(f"a {kind} response_format has the fields {sorted(fields)}, got {sorted(value)}")
        if kind == "json_schema":
            spec = value["json_schema"]
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise ValueError('json_schema must be an object with a "schema" object')
            unknown = set(spec) - {"name", "schema", "strict", "description"}
            if unknown:
                raise ValueError(f"json_schema: unknown fields {sorted(unknown)}")
            if not isinstance(spec.get("name", ""), str) or spec.get("strict") not in (None, True, False):
                raise ValueError("json_schema: name must be a string and strict a boolean")
        return value

    @field_validator("structured_outputs")
    @classmethod
    def _structured_outputs(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """Exactly one of the keys this server implements (a key set to null counts as absent, as vLLM's
        StructuredOutputsParams dumps them); every other key (regex, grammar, json_object, ...) is refused, never
        ignored."""
        if value is None:
            return None
        given = {key: v for key, v in value.items() if v is not None}
        unknown = sorted(set(given) - {"choice", "json"})
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not supported by this server (it supports choice and json)")
        if len(given) != 1:
            raise ValueError("give exactly one of choice and json")
        if "choice" in given:
            return {"choice": _choices(given["choice"], "choice ")}
        return {"json": _schema(given["json"], "json ")}

    @field_validator("guided_choice")
    @classmethod
    def _guided_choice(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else _choices(value, "")

    @field_validator("guided_json")
    @classmethod
    def _guided_json(cls, value: dict[str, Any] | str | None) -> dict[str, Any] | None:
        return None if value is None else _schema(value, "")

    @field_validator("guided_regex", "guided_grammar")
    @classmethod
    def _not_implemented(cls, value: Any) -> None:
        if value is not None:
            raise ValueError("not supported by this server (it supports guided_choice and guided_json)")

    @model_validator(mode="after")
    def _stream_options(self) -> _Sampling:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        given = [name for name in ("response_format", "structured_outputs", "guided_choice", "guided_json")
                 if getattr(self, name) not in (None, {"type": "text"})]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} cannot be combined: give one output constraint")
        if self.json_mode and (self.ignore_eos or self.min_tokens):
            raise ValueError(f"ignore_eos and min_tokens cannot be used with {self.output_constraint[0]} (the "
                             "output ends on EOS once it is complete)")
        return self

    @property
    def json_mode(self) -> bool:
        """Whether the output is constrained to plain content (no tool-call or reasoning parsing): a json_object or
        json_schema response_format, or a structured output (structured_outputs, guided_choice, guided_json)."""
        return self.output_constraint is not None

    @property
    def output_constraint(self) -> tuple[str, str, Any] | None:
        """(the field that asks for it, "json_object" | "json" | "choice", the schema or the choices), or None."""
        if self.response_format is not None and self.response_format["type"] != "text":
            kind = self.response_format["type"]
            schema = self.json_schema
            return ("response_format", "json", schema) if kind == "json_schema" else ("response_format", kind, None)
        if self.structured_outputs is not None:
            (kind, value), = self.structured_outputs.items()
            return f"structured_outputs.{kind}", kind, value
        if self.guided_choice is not None:
            return "guided_choice", "choice", self.guided_choice
        if self.guided_json is not None:
            return "guided_json", "json", self.guided_json
        return None

    @property
    def json_schema(self) -> dict[str, Any] | None:
        """The schema of a json_schema response_format (None for any other)."""
        if self.response_format is None or self.response_format["type"] != "json_schema":
            return None
        return self.response_format["json_schema"]["schema"]


def _choices(value: Any, what: str) -> list[str]:
    """A choice constraint's strings: a non-empty list of non-empty strings (`what`: the key named in errors)."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{what}must be a non-empty list of strings")
    if any(not isinstance(c, str) or not c for c in value):
        raise ValueError("every choice must be a non-empty string")
    return value


def _schema(value: Any, what: str) -> dict[str, Any]:
    """A json constraint's schema: an object, or a JSON string of one (`what`: the key named in errors)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError(f"{what}must be a JSON schema (an object) or a JSON string of one") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what}must be a JSON schema (an object) or a JSON string of one")
    return value


class CompletionRequest(_Sampling):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    prompt_logprobs: int | None = None  # vLLM's extension, refused: `echo` with `logprobs` gives them in OpenAI's shape

    @field_validator("prompt_logprobs")
    @classmethod
    def _refused(cls, value: int | None) -> None:
        if value is not None:
            raise ValueError("not supported by this server; echo with logprobs gives the prompt's logprobs")

    @model_validator(mode="after")
    def _completion_checks(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be empty")
        if self.best_of not in (None, 1, self.n):
            raise ValueError("best_of other than n is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of texts or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class FunctionCall(_Request):
    model_config = ConfigDict(strict=True, extra="allow")
    name: str
    arguments: str | dict[str, Any] = ""


class ToolCall(_Request):
    model_config = ConfigDict(strict=True, extra="allow")
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ContentPart(_Request):
    type: str
    text: str | None = None


class ChatMessage(_Request):
    model_config = ConfigDict(strict=True, extra="allow")  # template-specific fields (e.g. documents) pass through
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates expect it: text content, tool-call arguments as JSON objects."""
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            for part in self.content:
                if part.type != "text" or part.text is None:
                    raise RequestError(f"content part type {part.type!r} is not supported (text only)", "messages")
            message["content"] = "".join(part.text for part in self.content)
        if self.role == "developer":
            message["role"] = "system"
        return message


class FunctionDef(_Request):
    model_config = ConfigDict(strict=True, extra="allow")
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolDef(_Request):
    type: Literal["function"]
    function: FunctionDef


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    documents: list[dict[str, Any]] | None = None  # Jamba's grounded generation (the template's `documents`)
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's: more variables for the chat template
    add_generation_prompt: bool = True  # vLLM's: false renders the conversation without the assistant's opening
    continue_final_message: bool = False  # vLLM's: the model continues the final (assistant) message: prefill

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_variables(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return check_template_variables(value)

    @field_validator("continue_final_message")
    @classmethod
    def _continuable(cls, value: bool, info: ValidationInfo) -> bool:
        return check_continuation(value, info)

    @model_validator(mode="after")
    def _chat_checks(self) -> ChatCompletionRequest:
        if self.max_completion_tokens is not None:
            if self.max_completion_tokens < 1:
                raise ValueError("max_completion_tokens: must be at least 1")
            self.max_tokens = self.max_completion_tokens
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def forced_tool(self) -> tuple[bool, str | None]:
        """(whether tool_choice forces a call, the function it names or None for any of the tools); a
        RequestError for a tool_choice that cannot be honoured (malformed, naming no given tool, without tools,
        or with a JSON response_format or ignore_eos/min_tokens, which a forced call's end rules out)."""
        choice = self.tool_choice
        if choice is None or choice in ("none", "auto"):
            return False, None
        name = None
        if isinstance(choice, dict):
            function = choice.get("function")
            if (set(choice) != {"type", "function"} or choice["type"] != "function" or not isinstance(function, dict)
                    or set(function) != {"name"} or not isinstance(function["name"], str)):
                raise RequestError('tool_choice: a named tool_choice is {"type": "function", "function": '
                                   '{"name": NAME}}', param="tool_choice")
            name = function["name"]
        if not self.tools:
            # said without the chat shape of `choice`, which /v1/responses and /v1/messages requests did not send
            raise RequestError("tool_choice: a forced tool call needs tools, and the request has none",
                               param="tool_choice")
        if name is not None and name not in {t.function.name for t in self.tools}:
            raise RequestError(f"tool_choice: {name!r} is not among the request's tools", param="tool_choice")
        if self.json_mode:
            raise RequestError(f"tool_choice: a forced tool call cannot be combined with {self.output_constraint[0]}",
                               param="tool_choice")
        if self.ignore_eos or self.min_tokens:
            raise RequestError("tool_choice: ignore_eos and min_tokens cannot be used with a forced tool call (it "
                               "ends once the call is complete)", param="tool_choice")
        return True, name


class TokenizeRequest(_Request):
    """vLLM's /tokenize: a text, or chat messages rendered by the checkpoint's template."""

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    @field_validator("continue_final_message")
    @classmethod
    def _continuable(cls, value: bool, info: ValidationInfo) -> bool:
        return check_continuation(value, info)

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


def parse_request(body: bytes, schema: type[_Request]) -> Any:
    """The validated request, or RequestError naming the first offending field (as OpenAI's `param`). Fields it
    ignores are named in a warning (vLLM's), so a client learns that an option it set had no effect."""
    try:
        request = schema.model_validate_json(body, strict=True)
        if ignored := ignored_fields(request, json.loads(body)):
            log.warning("The following fields were present in the request but ignored: {%s}",
                        ", ".join(map(repr, sorted(ignored))))
        return request
    except ValidationError as err:
        first = err.errors()[0]
        if first["type"] == "json_invalid":
            raise RequestError(f"the body is not valid JSON: {first['msg']}", code="invalid_json") from None
        if first["type"] == "json_type":
            raise RequestError("the body must be a JSON object") from None
        first = _closest(err.errors())
        location = ".".join(str(p) for p in first["loc"] if not _is_union_tag(p))
        message = first["msg"].removeprefix("Value error, ")
        raise RequestError(f"{location}: {message}" if location else message, param=location or None) from None


def ignored_fields(model: BaseModel, data: Any, at: str = "") -> list[str]:
    """The keys of the JSON object `data` that `model`, validated from it, ignored (dotted paths, nested models and
    lists of them walked alongside their JSON): fields it does not define, and of a model with extra="allow" the
    extras it does not read (`USED_EXTRAS`); not those it accepts and ignores by design (`ACCEPTED`)."""
    if not isinstance(data, dict):
        return []
    fields = type(model).model_fields
    names = {field.alias or name: name for name, field in fields.items()}
    used = getattr(model, "USED_EXTRAS", None) if model.model_extra is not None else frozenset()
    out = []
    for key, value in data.items():
        if key not in names:
            if used is not None and key not in used and key not in getattr(model, "ACCEPTED", ()):
                out.append(at + key)
            continue
        inner = getattr(model, names[key])
        if isinstance(inner, BaseModel):
            out += ignored_fields(inner, value, f"{at}{key}.")
        elif isinstance(inner, list) and inner and isinstance(inner[0], BaseModel) and isinstance(value, list):
            out += [x for i, (m, d) in enumerate(zip(inner, value)) for x in ignored_fields(m, d, f"{at}{key}.{i}.")]
    return out


def translated_chat_request(body: dict[str, Any], renamed: dict[str, str]) -> ChatCompletionRequest:
    """The chat request another API's request translates into (/v1/responses, /v1/messages), its None fields
    left out; a field the chat request refuses is named as that API calls it (`renamed`: chat field -> its name)."""
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError as err:
        first = _closest(err.errors())
        location = ".".join(str(x) for x in first["loc"] if not _is_union_tag(x))
        location = renamed.get(location.split(".")[0], location)
        raise RequestError(f"{location}: {first['msg'].removeprefix('Value error, ')}", param=location) from None


def _closest(errors: list[dict]) -> dict:
    """The error to report: of the first field's, the one that got furthest in. A value no member of a union takes
    has an error per member, the first for the simplest (`system: Input should be a valid string` for a list of
    blocks); the deepest names what is wrong inside the shape the client meant (`system.0.type`)."""
    field = errors[0]["loc"][:1]
    return max((e for e in errors if e["loc"][:1] == field), key=lambda e: len(e["loc"]))


def _is_union_tag(part: Any) -> bool:
    """pydantic names the union member tried (`str`, `list[int]`) in an error's location; OpenAI's param does not."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part or part[0].isupper())


# ---------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def model_card(name: str, created: int, max_model_len: int) -> dict:
    """OpenAI's model object, with vLLM's `max_model_len` (clients size their prompts by it)."""
    return {"id": name, "object": "model", "created": created, "owned_by": "openjamba", "max_model_len": max_model_len}
