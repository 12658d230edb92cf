"""One checkpoint's chat format for the server and the terminal chat: render turns to token ids, split output.

A thin adapter over `openjamba.chat_format` so both front ends render and parse the same way: it knows whether
the generation prompt already opened a `<think>` block, and drops tool-call parsing when a client asks for none.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..chat_format import (
    THINK_CLOSE,
    THINK_OPEN,
    TOOL_TAGS,
    AssistantOutput,
    ChatTemplateError,
    StreamingOutputParser,
    encode_chat,
    inside_reasoning,
    output_format,
    prompt_opens_reasoning,
)


class PromptIds(list):
    """A rendered chat's token ids; `continued`: when the prompt continues its final message (prefill), that
    message's text, which says whether the output starts inside reasoning it opened. Slicing keeps it."""

    continued: str | None = None

    def __getitem__(self, index):
        got = super().__getitem__(index)
        if isinstance(index, slice):
            got = PromptIds(got)
            got.continued = self.continued
        return got


class ChatFormat:
    error = ChatTemplateError

    def __init__(self, tokenizer, template_kwargs: dict[str, Any] | None = None) -> None:
        """`template_kwargs`: template variables every rendering gets unless it sets them itself (vLLM's
        `--default-chat-template-kwargs`, e.g. {"enable_thinking": false})."""
        self.tokenizer = tokenizer
        self.format = output_format(tokenizer)
        self.default_kwargs = dict(template_kwargs or {})

    @classmethod
    def of(cls, tokenizer, template_kwargs: dict[str, Any] | None = None) -> ChatFormat | None:
        """The chat format, or None when the checkpoint has no chat template (completion only)."""
        return cls(tokenizer, template_kwargs) if getattr(tokenizer, "chat_template", None) else None

    def encode(self, messages: list[dict[str, Any]], tools: list[dict] | None = None,
               documents: list[dict] | None = None, add_generation_prompt: bool = True,
               template_kwargs: dict[str, Any] | None = None, continue_final_message: bool = False) -> PromptIds:
        """`template_kwargs`: more variables for the template (vLLM's `chat_template_kwargs`);
        `continue_final_message`: the prompt ends inside the final message, which the model continues."""
        kwargs = {"documents": documents} if documents else {}
        ids = PromptIds(encode_chat(self.tokenizer, messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                    continue_final_message=continue_final_message, **kwargs,
                                    **{**self.default_kwargs, **(template_kwargs or {})}))
        if continue_final_message:
            ids.continued = messages[-1]["content"]
        return ids

    def system_prefix(self, messages: list[dict[str, Any]], prompt_ids: list[int],
                      template_kwargs: dict[str, Any] | None = None) -> list[int]:
        """[the length of the leading system message(s) in `prompt_ids`] when they render as its prefix, else []:
        the engine keeps the state there, so other conversations with the same system prompt start from it."""
        count = next((i for i, m in enumerate(messages) if m.get("role") != "system"), len(messages))
        if count == 0 or count == len(messages):
            return []
        try:
            head = self.encode(messages[:count], add_generation_prompt=False, template_kwargs=template_kwargs)
        except ChatTemplateError:  # some templates insist on a user turn
            return []
        return [len(head)] if 0 < len(head) < len(prompt_ids) and prompt_ids[:len(head)] == head else []

    def skipped_ids(self) -> frozenset[int]:
        """The special tokens a reply's text leaves out (vLLM's skip_special_tokens, on by default): all but the
        output format's own tags (`<think>`, the tool-call tags), which the parsers must read even where a
        checkpoint made them special tokens."""
        if not hasattr(self, "_skipped"):
            tags = {THINK_OPEN, THINK_CLOSE} if self.format.thinking else set()
            tags.update(TOOL_TAGS.get(self.format.tool_calls, ()))
            special = getattr(self.tokenizer, "all_special_ids", [])
            self._skipped = frozenset(i for i in special if self.tokenizer.decode([i]) not in tags)
        return self._skipped

    def stream_parser(self, prompt_ids: list[int], tools: bool = True, plain: bool = False,
                      stream_tool_calls: bool = False) -> StreamingOutputParser:
        """An incremental parser: `feed(delta)` and `flush()` give content/reasoning deltas (and, with
        `stream_tool_calls`, tool-call deltas), `finish()` the whole output with its tool calls. `plain`: all of the
        output is content (JSON mode: no reasoning, no tool calls)."""
        if plain:
            return StreamingOutputParser(dataclasses.replace(self.format, tool_calls=None, thinking=False))
        kind = self.format if tools else dataclasses.replace(self.format, tool_calls=None)
        return StreamingOutputParser(kind, started_in_reasoning=self.opens_reasoning(prompt_ids),
                                     stream_tool_calls=stream_tool_calls)

    def opens_reasoning(self, prompt_ids: list[int]) -> bool:
        """Whether the output starts inside a `<think>` block that the prompt opened: the generation prompt's, or
        the continued final message's own."""
        continued = getattr(prompt_ids, "continued", None)
        if continued is not None:
            return self.format.thinking and inside_reasoning(continued)
        tail = self.tokenizer.decode(prompt_ids[-16:], skip_special_tokens=False)
        return self.format.thinking and prompt_opens_reasoning(tail)

    def parse(self, text: str, prompt_ids: list[int], tools: bool = True, plain: bool = False) -> AssistantOutput:
        """content, reasoning_content and (when `tools`) tool_calls in OpenAI's shape; `plain` as `stream_parser`."""
        parser = self.stream_parser(prompt_ids, tools, plain)
        parser.feed(text)
        return parser.finish()
