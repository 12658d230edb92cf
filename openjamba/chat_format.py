"""Chat templates and assistant output: render a checkpoint's Jinja template, parse what the model writes back.

Rendering follows transformers' `apply_chat_template` (the tests compare them): the template runs in Jinja's
immutable sandbox (where reaching for an unsafe attribute is an error rather than an empty value) with
`trim_blocks` and `lstrip_blocks`, sees `messages` (keys whose value is None dropped), `tools`, `documents`,
`add_generation_prompt`, the special tokens (`bos_token`, `eos_token`, ...) and any extra keyword; it may call
`raise_exception(msg)` and `strftime_now(fmt)`, and its `tojson` keeps non-ASCII text and takes `indent`,
`separators` and `sort_keys`. Every failure is a `ChatTemplateError`.

Output parsing. Which format a checkpoint writes is read from its chat template, then its vocabulary:
- tool calls: `jamba` when `<tool_calls>` appears (Jamba 1.5-1.7 write
  `<tool_calls>[{"name", "arguments"}, ...]</tool_calls>`), else `hermes` when `<tool_call>` appears (Jamba2 and
  Reasoning 3B write one `<tool_call>{"name", "arguments"}</tool_call>` per call), else none;
- thinking: when `<think>` appears. Text inside `<think>...</think>` at the start of the output is
  `reasoning_content`; when the prompt itself ends inside `<think>` (`prompt_opens_reasoning`), the output starts in
  reasoning and the first `</think>` closes it.
Reasoning and content are stripped of surrounding whitespace. Text before the first tool-call tag is content; the
calls are read by `tool_calls.ToolCallReader` (each call's arguments as the model wrote them, streamed as they
arrive when asked); when the calls' JSON does not parse, the whole text stays content and there are no tool calls.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .tool_calls import TOOL_TAGS, ToolCallDelta, ToolCallReader, parse_tool_calls  # noqa: F401 (re-exported)

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class ChatTemplateError(ValueError):
    """A chat template that is missing, malformed, refused by the sandbox, or that raised an error itself."""


# ---------------------------------------------------------------------- rendering
def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters and ASCII-escapes text, which changes what the model reads.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _SafeNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, so a template cannot reach attributes of Python objects."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _SafeNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _SafeNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates may not set underscore names ({name!r})")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks): rendered as its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, where touching an unsafe attribute (`__class__`, `mro`...) fails at once instead of
    rendering as an empty value, so a template probing for Python internals gets an error, not silence."""

    def unsafe_undefined(self, obj, attribute):
        raise jinja2.exceptions.SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} is unsafe")


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_SafeNamespace,
                       dict=lambda *args, **kwargs: dict(*args, **kwargs))
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template has a syntax error (line {e.lineno}): {e.message}") from None


def load_chat_template(value: str, named: dict[str, str] | None = None) -> str:
    """A chat template given on the command line (vLLM's `--chat-template`): one of the checkpoint's `named`
    templates ("tool_use"), else a file's text, else the template itself written inline (it must hold a `{`). It is
    compiled here, so a syntax error or a missing file is one clear error at start rather than at the first chat."""
    if named and value in named:
        text = named[value]
    elif Path(value).is_file():
        text = Path(value).read_text(encoding="utf-8")
    elif "{" in value:
        text = value
    else:
        raise ChatTemplateError(_not_found(value, sorted(named or ())))
    compile_template(text)
    return text


def _not_found(value: str, names: list[str]) -> str:
    """Why `value` is no template, with the checkpoint's named templates: said as a missing name when it reads as
    one ("tool_use"), else as a missing file."""
    has = ", ".join(names) or "none"
    if value.replace("_", "").replace("-", "").isalnum():
        return f"the checkpoint has no chat template named {value!r} (its named templates: {has}) and there is no " \
               f"file {value!r}"
    return f"no chat template file {value!r}, nor a template written inline, nor one of the checkpoint's named " \
           f"templates ({has})"


def _plain(value: Any) -> Any:
    """JSON-like copy of what the template sees: no object with methods the sandbox does not know about."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (bool, str, int, float):  # subclasses (enums, numpy scalars) lose their extra methods
        if isinstance(value, base):
            return base(value) if base is not str else str.__str__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if callable(getattr(value, "model_dump", None)):  # pydantic request models
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _messages_for_template(messages: list[dict]) -> list[dict]:
    out = []
    for message in messages:
        if not isinstance(message, dict):
            raise ChatTemplateError(f"each chat message must be a dict with 'role' and 'content', got {message!r}")
        message = {k: v for k, v in _plain(message).items() if v is not None}
        reasoning = next((message[k] for k in ("reasoning_content", "thinking", "reasoning") if k in message), None)
        if reasoning is not None:  # templates read the reasoning under one name or another
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def select_template(tokenizer, tools: list[dict] | None = None, chat_template: str | None = None) -> str:
    """The template to render: an explicit one (or the name of one), else "tool_use" when tools are given and the
    checkpoint has it, else the default."""
    templates = getattr(tokenizer, "chat_templates", {}) or {}
    if chat_template is not None:
        return templates.get(chat_template, chat_template)
    if tools and "tool_use" in templates:
        return templates["tool_use"]
    if "default" in templates:
        return templates["default"]
    where = getattr(tokenizer, "name_or_path", "") or "this tokenizer"
    if templates:
        raise ChatTemplateError(f"{where} has several chat templates and none named 'default': {sorted(templates)}")
    raise ChatTemplateError(f"{where} has no chat template (a base model such as Jamba-v0.1): chat needs an "
                            "instruction-tuned checkpoint; plain completion (`openjamba generate`, /v1/completions) "
                            "still works")


def render_chat(tokenizer, messages: list[dict], *, tools: list[dict] | None = None,
                documents: list[dict] | None = None, add_generation_prompt: bool = True,
                continue_final_message: bool = False, chat_template: str | None = None, **template_kwargs) -> str:
    """The prompt text for `messages`, as transformers' `apply_chat_template(..., tokenize=False)` renders it.
    `continue_final_message`: the text ends right after the final message's content (no end-of-turn), so the model
    continues that message (prefill); it excludes `add_generation_prompt`."""
    source = select_template(tokenizer, tools, chat_template)
    if not messages:
        raise ChatTemplateError("no messages to render: a chat needs at least one message")
    if continue_final_message:
        if add_generation_prompt:
            raise ChatTemplateError("continue_final_message and add_generation_prompt cannot both be set")
        whole = render_chat(tokenizer, messages, tools=tools, documents=documents, add_generation_prompt=False,
                            chat_template=chat_template, **template_kwargs)
        return cut_after_final_message(whole, messages[-1].get("content"))
    if documents is not None and not all(isinstance(d, dict) for d in documents):
        raise ChatTemplateError("documents must be a list of dicts (with 'title' and 'text')")
    variables = {**getattr(tokenizer, "special_tokens", {}), **template_kwargs}
    try:
        return compile_template(source).render(
            messages=_messages_for_template(messages), tools=_plain(tools), documents=_plain(documents),
            add_generation_prompt=add_generation_prompt, **_plain(variables))
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"the chat template tried an operation the sandbox forbids: {e}") from None
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template failed: {e}") from None


def cut_after_final_message(rendered: str, content: Any) -> str:
    """`rendered` up to the end of the final message's `content`: the last place that content appears (templates
    may trim its surrounding whitespace, so it is looked for stripped), then past its trailing whitespace too where
    the template kept it. This is where transformers' `continue_final_message` cuts, so prompts equal its."""
    if not isinstance(content, str) or not content.strip():
        raise ChatTemplateError("continue_final_message needs a final message with text content to continue")
    core, body = content.strip(), content.lstrip()
    at = rendered.rfind(core)
    if at == -1:
        raise ChatTemplateError("the final message's content does not appear in the rendered chat (the template "
                                "changes it), so it cannot be continued")
    return rendered[:at + (len(body) if rendered.startswith(body, at) else len(core))]


def encode_chat(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    """Token ids of the rendered chat (no BOS added: the template writes its own special tokens)."""
    return tokenizer.encode(render_chat(tokenizer, messages, **kwargs), add_special_tokens=False)


# ---------------------------------------------------------------------- output format
@dataclass(frozen=True)
class OutputFormat:
    """How a checkpoint writes tool calls ("hermes", "jamba" or None) and whether it may think in <think> tags."""

    tool_calls: str | None = None
    thinking: bool = False


def output_format(source) -> OutputFormat:
    """The output format of a Tokenizer (its template, then its vocabulary), a template string, an OutputFormat,
    or a name: "hermes", "jamba", "hermes+think", "none"."""
    if isinstance(source, OutputFormat):
        return source
    if isinstance(source, str) and source.split("+")[0] in ("hermes", "jamba", "none", "think"):
        parts = source.split("+")
        return OutputFormat(next((p for p in parts if p in TOOL_TAGS), None), "think" in parts)
    if isinstance(source, str):
        return _format_from_text(source)
    from_template = _format_from_text(" ".join((getattr(source, "chat_templates", {}) or {}).values()))
    vocab = set(source.get_vocab()) if hasattr(source, "get_vocab") else set()
    from_vocab = OutputFormat("jamba" if "<tool_calls>" in vocab else "hermes" if "<tool_call>" in vocab else None,
                              THINK_OPEN in vocab)
    # The template says how the model was taught to call tools; the vocabulary decides only when it is silent.
    return OutputFormat(from_template.tool_calls or from_vocab.tool_calls,
                        from_template.thinking or from_vocab.thinking)


def _format_from_text(text: str) -> OutputFormat:
    tools = "jamba" if "<tool_calls>" in text else "hermes" if "<tool_call>" in text else None
    return OutputFormat(tools, THINK_OPEN in text)


def prompt_opens_reasoning(prompt: str) -> bool:
    """Whether a rendered prompt ends inside an open <think> (so the output starts in reasoning)."""
    tail = prompt.rstrip()
    return tail.endswith(THINK_OPEN)


def inside_reasoning(text: str) -> bool:
    """Whether `text` (a continued assistant message) ends inside a <think> it opened: its last <think> comes after
    its last </think>."""
    return text.rfind(THINK_OPEN) > text.rfind(THINK_CLOSE)


# ---------------------------------------------------------------------- parsing
@dataclass
class AssistantOutput:
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[dict] = field(default_factory=list)


def parse_assistant_output(text: str, tokenizer_or_template_kind, *, started_in_reasoning: bool = False
                           ) -> AssistantOutput:
    """Split generated text into content, reasoning and OpenAI-shaped tool calls."""
    parser = StreamingOutputParser(tokenizer_or_template_kind, started_in_reasoning=started_in_reasoning)
    parser.feed(text)
    return parser.finish()


def _without_partial_tag(text: str, tag: str | None) -> str:
    """`text` less a suffix that may be the start of `tag` (held back until more text shows what it is)."""
    if tag:
        for n in range(min(len(tag) - 1, len(text)), 0, -1):
            if tag.startswith(text[-n:]):
                return text[:-n]
    return text


def _split_output(text: str, fmt: OutputFormat, started_in_reasoning: bool, final: bool
                  ) -> tuple[str, str, str | None, str]:
    """(reasoning, content before any tool-call tag, tool-call text or None, all text after the reasoning).

    With `final` False, only what no continuation of `text` can change: a possible partial tag and trailing
    whitespace are left out, so each result is a prefix of the final one."""
    rest, reasoning = text, ""
    in_think = started_in_reasoning
    if not in_think and fmt.thinking:
        head = text.lstrip()
        if head.startswith(THINK_OPEN):
            in_think, rest = True, head[len(THINK_OPEN):]
        elif not final and THINK_OPEN.startswith(head):
            return "", "", None, ""  # may still become <think>
    if in_think:
        end = rest.find(THINK_CLOSE)
        if end < 0:
            return (rest if final else _without_partial_tag(rest, THINK_CLOSE)).strip(), "", None, ""
        reasoning, rest = rest[:end].strip(), rest[end + len(THINK_CLOSE):]
    tag = TOOL_TAGS[fmt.tool_calls][0] if fmt.tool_calls else None
    start = rest.find(tag) if tag else -1
    if start >= 0:
        return reasoning, rest[:start].strip(), rest[start:], rest
    body = rest if final else _without_partial_tag(rest, tag)
    return reasoning, body.strip(), None, rest


class StreamingOutputParser:
    """Incremental `parse_assistant_output`. `feed(delta)` returns the new deltas ({"reasoning_content": ...} or
    {"content": ...}) that no later text can change: text that may begin a tag, trailing whitespace and everything
    from a tool-call tag on are held back. `flush()` returns the deltas still held (at the end of generation;
    tool-call text that does not parse comes out as content), `finish()` the whole `AssistantOutput`. The deltas
    concatenated equal the one-shot parse's reasoning and content.

    With `stream_tool_calls`, the deltas also hold {"tool_call": ToolCallDelta} as each call's name and arguments
    arrive; they join to `finish().tool_calls` (same ids) whenever the tool text parses. When it turns out malformed
    (cut off by the length limit, invalid JSON), the calls already started have no end and the text comes out as
    content at `flush()`, as without streaming."""

    def __init__(self, tokenizer_or_template_kind, *, started_in_reasoning: bool = False,
                 stream_tool_calls: bool = False) -> None:
        self.format = output_format(tokenizer_or_template_kind)
        self.started_in_reasoning = started_in_reasoning
        self.stream_tool_calls = stream_tool_calls
        self.text = ""
        self.sent = {"reasoning_content": "", "content": ""}
        self.tools = ToolCallReader(self.format.tool_calls) if self.format.tool_calls else None
        self.tool_text_read = 0  # of the tool text, how much the reader has been given
        self.result: AssistantOutput | None = None

    def feed(self, delta: str) -> list[dict]:
        if self.result is not None:
            raise RuntimeError("feed() after flush() or finish(): the output is complete")
        self.text += delta
        reasoning, content, tool_text, _ = _split_output(self.text, self.format, self.started_in_reasoning,
                                                         final=False)
        return self._deltas(reasoning, content) + self._read_tools(tool_text)

    def _read_tools(self, tool_text: str | None) -> list[dict]:
        if tool_text is None or self.tools is None:
            return []
        new, self.tool_text_read = tool_text[self.tool_text_read:], len(tool_text)
        calls = self.tools.feed(new) if new else []
        return [{"tool_call": call} for call in calls] if self.stream_tool_calls else []

    def _deltas(self, reasoning: str, content: str) -> list[dict]:
        deltas = []
        for key, value in (("reasoning_content", reasoning), ("content", content)):
            sent = self.sent[key]
            if len(value) > len(sent):
                assert value.startswith(sent), "a streamed delta was revised"
                deltas.append({key: value[len(sent):]})
                self.sent[key] = value
        return deltas

    def flush(self) -> list[dict]:
        if self.result is not None:
            return []
        reasoning, content, tool_text, after = _split_output(self.text, self.format, self.started_in_reasoning,
                                                            final=True)
        tool_parts = self._read_tools(tool_text)
        calls = self.tools.finish() if tool_text is not None else None
        if tool_text is not None and calls is None:
            content = after.strip()  # malformed tool calls stay text
        self.result = AssistantOutput(content or None, reasoning or None, calls or [])
        return tool_parts + self._deltas(reasoning, content)

    def finish(self) -> AssistantOutput:
        self.flush()
        return self.result
