"""Tool calls in assistant output, read as the model writes them.

Two formats (the chat template says which, `chat_format.output_format`):
- "hermes" (Jamba2, Jamba Reasoning 3B): one `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` per call;
  text between the blocks is ignored;
- "jamba" (Jamba 1.5-1.7): one `<tool_calls>[{"name": ..., "arguments": {...}}, ...]</tool_calls>` (a single
  object instead of the list is one call); text after the block is ignored.

`ToolCallReader` scans the JSON character by character (nesting, strings and their escapes, the keys of each call
object), so it knows where a call's name and arguments begin and end while they are still arriving, and a closing
tag inside a string is text, not the end of the call. The same reader gives both the streamed deltas and the final
calls, so the streamed arguments of a call always join to the final `arguments` string, for any split of the text.

A call's `arguments` is the text the model wrote for its "arguments" value (or "parameters"), exactly: an object
or list as written (whitespace inside kept), a string value decoded (some models write the JSON as a string), null
or a missing value "{}". A call whose name is not a string, a block that is not valid JSON (json.loads checks each
one), a missing closing tag before the next block, or text that ends inside the JSON makes the whole tool text
malformed: `finish()` gives None and the caller keeps the text as content. A last call whose closing tag is missing
or cut short (the model stopped, or the length limit came, just after its JSON) is still a call.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

TOOL_TAGS = {"hermes": ("<tool_call>", "</tool_call>"), "jamba": ("<tool_calls>", "</tool_calls>")}

_SPACE = " \t\n\r"  # JSON's whitespace (json.loads allows no other)
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
_LITERALS = ("true", "false", "null", "NaN", "Infinity", "-Infinity")  # json.loads accepts the last three too
_HEX = set("0123456789abcdefABCDEF")
_ARGUMENT_KEYS = ("arguments", "parameters")


@dataclass
class ToolCallDelta:
    """One step of a call as it streams: its start (`id` and `name` set, once the name is complete), a fragment of
    its arguments, or its end (`done`: the arguments are complete)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""
    done: bool = False


@dataclass
class _Call:
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")
    name: str | None = None
    args: tuple[int, int | None] | None = None  # where its arguments value starts (and ends) in the tool text
    sent: str = ""  # arguments already streamed
    arguments: str | None = None  # the final arguments, once the call's object closed


class ToolCallReader:
    """Incremental reader of tool-call text (starting at the first opening tag). `feed(text)` returns the new
    `ToolCallDelta`s; `finish()` the calls in OpenAI's shape, or None when the text is malformed. Streamed
    arguments are the final arguments' prefix at every step: those of a container value as its characters arrive
    (held until the name is known when they come first), any other value's once it is complete."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.open_tag, self.close_tag = TOOL_TAGS[kind]
        self.text = ""
        self.pos = 0  # the next character to scan
        self.mode = "tag"  # tag (before a block), value (in its JSON), after (before its closing tag), done, failed
        self.stack: list[list[str]] = []  # open containers: [kind "{" or "[", what comes next]
        self.string: list | None = None  # the string being read: [start, escape state, is a key]
        self.scalar: int | None = None  # start of the number or literal being read
        self.call_level = 0  # how many containers enclose a call object: 0 ({...}), 1 ([{...}, ...])
        self.key: str | None = None  # the call object's key whose value is being read
        self.field: str | None = None  # "name" or "args" while that value of the current call is being read
        self.value_start = 0  # where the block's JSON starts
        self.field_start = 0  # where the value of `field` starts
        self.blocks: list[tuple[int, int]] = []  # each block's JSON, for json.loads to confirm
        self.calls: list[_Call] = []

    # ------------------------------------------------------------------ public
    def feed(self, text: str) -> list[ToolCallDelta]:
        self.text += text
        self.deltas: list[ToolCallDelta] = []
        self._scan()
        self._stream_arguments()
        return self.deltas

    def finish(self) -> list[dict] | None:
        """The calls ({"id", "type", "function": {"name", "arguments"}}), or None when the text is malformed."""
        if self.mode not in ("after", "tag", "done") or not self.calls:
            return None
        for start, end in self.blocks:
            try:
                json.loads(self.text[start:end])
            except ValueError:  # the scanner is strict; this is a second opinion, not the usual path
                return None
        return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.calls]

    # ------------------------------------------------------------------ scanning
    def _scan(self) -> None:
        text = self.text
        while self.pos < len(text):
            if self.mode == "tag":
                start = text.find(self.open_tag, self.pos)
                if start < 0:
                    return
                self.pos, self.mode = start + len(self.open_tag), "value"
            elif self.mode == "after":
                if not self._close_block():
                    return
            elif self.mode == "value":
                if not self._step(text[self.pos]):
                    self.mode = "failed"
            else:  # done or failed: the rest is ignored
                return

    def _close_block(self) -> bool:
        """Past the whitespace after a block's JSON, its closing tag; False while it may still be arriving."""
        rest = self.text[self.pos:]
        stripped = rest.lstrip(_SPACE)
        self.pos += len(rest) - len(stripped)
        if stripped.startswith(self.close_tag):
            self.pos += len(self.close_tag)
            self.mode = "tag" if self.kind == "hermes" else "done"
            return True
        if not self.close_tag.startswith(stripped):
            self.mode = "failed"
        return False

    def _step(self, ch: str) -> bool:
        """Scan one character of a block's JSON (advancing `pos`, except for the one that ends a scalar, which is
        scanned again); False when it cannot continue valid JSON."""
        if self.string is not None:
            return self._string_step(ch)
        if self.scalar is not None:
            if ch.isalnum() or ch in "+-.":
                self.pos += 1
                return True
            token = self.text[self.scalar:self.pos]
            if not (_NUMBER.fullmatch(token) or token in _LITERALS):
                return False
            self.scalar = None
            self._end_value(self.pos)
            return True
        self.pos += 1
        if ch in _SPACE:
            return True
        if not self.stack:
            return self._begin_value(ch)
        frame = self.stack[-1]
        state = frame[1]
        if state == "colon":
            frame[1] = "value"
            return ch == ":"
        if ch in "}]" and (state in ("first", "comma")) and ch == ("}" if frame[0] == "{" else "]"):
            self.stack.pop()
            self._end_value(self.pos)
            return True
        if state == "comma":
            frame[1] = "key" if frame[0] == "{" else "value"
            return ch == ","
        if frame[0] == "{" and state in ("first", "key"):
            if ch != '"':
                return False
            frame[1] = "colon"
            self.string = [self.pos - 1, 0, True]
            return True
        frame[1] = "comma"  # once this value ends
        return self._begin_value(ch)

    def _begin_value(self, ch: str) -> bool:
        """A value starts at `pos - 1` with `ch`, inside `len(stack)` containers."""
        start, level = self.pos - 1, len(self.stack)
        if level == 0:  # a block's JSON: a call object, or (jamba) a list of them
            self.value_start = start
            if ch == "[" and self.kind == "jamba":
                self.call_level = 1
            elif ch == "{":
                self.call_level = 0
            else:
                return False
        elif level == self.call_level and ch != "{":  # a list's element must be a call object
            return False
        elif level == self.call_level + 1:  # a value in a call object
            self._begin_field(start)
        if ch in "{[":
            self.stack.append([ch, "first"])
            if ch == "{" and level == self.call_level:
                self.calls.append(_Call())
                self.key = None
        elif ch == '"':
            self.string = [start, 0, False]
        elif ch.isalnum() or ch == "-":
            self.scalar = start
        else:
            return False
        return True

    def _string_step(self, ch: str) -> bool:
        """One character inside a string: escapes (\\uXXXX's four hex digits counted down) and its end."""
        self.pos += 1
        escape = self.string[1]
        if escape == 1:  # after a backslash
            self.string[1] = 5 if ch == "u" else 0
            return ch in '"\\/bfnrtu'
        if escape > 1:
            self.string[1] = escape - 1 if escape > 2 else 0
            return ch in _HEX
        if ch == "\\":
            self.string[1] = 1
        elif ch == '"':
            start, _, is_key = self.string
            self.string = None
            if is_key:
                if len(self.stack) == self.call_level + 1:
                    self.key = json.loads(self.text[start:self.pos])
            else:
                self._end_value(self.pos)
        elif ch < " ":  # json.loads refuses raw control characters in strings
            return False
        return True

    def _end_value(self, end: int) -> None:
        """A value (or a container, just popped) ended at `end`, inside `len(stack)` containers."""
        level = len(self.stack)
        if level == self.call_level + 1 and self.field:
            self._end_field(end)
        elif level == self.call_level:
            self._end_call()
        if level == 0 and self.mode != "failed":
            self.blocks.append((self.value_start, end))
            self.mode = "after"

    # ------------------------------------------------------------------ the call being read
    def _begin_field(self, start: int) -> None:
        call = self.calls[-1]
        self.field = None
        if self.key == "name" and call.name is None:
            self.field = "name"
        elif self.key in _ARGUMENT_KEYS and call.args is None:  # the first of them; a later one is ignored
            self.field, call.args = "args", (start, None)
        self.field_start = start

    def _end_field(self, end: int) -> None:
        call = self.calls[-1]
        if self.field == "name":
            token = self.text[self.field_start:end]
            if not token.startswith('"'):
                self.mode = "failed"  # a call's name must be a string
                return
            call.name = json.loads(token)
            self.deltas.append(ToolCallDelta(len(self.calls) - 1, call.id, call.name))
        else:
            call.args = (call.args[0], end)
        self.field = None

    def _end_call(self) -> None:
        call = self.calls[-1]
        if call.name is None:
            self.mode = "failed"
            return
        call.arguments = self._arguments(call)
        self._send(call, call.arguments)
        self.deltas.append(ToolCallDelta(len(self.calls) - 1, done=True))

    def _arguments(self, call: _Call) -> str:
        if call.args is None:
            return "{}"
        value = self.text[call.args[0]:call.args[1]]
        if value.startswith('"'):
            return json.loads(value)
        return "{}" if value == "null" else value

    # ------------------------------------------------------------------ streaming
    def _stream_arguments(self) -> None:
        """Send the arguments of the call being read as far as they have arrived (an object or list only: any other
        value is known once it is complete)."""
        if not self.calls or self.mode == "failed":
            return
        call = self.calls[-1]
        if call.name is None or call.args is None or call.arguments is not None:
            return
        start, end = call.args
        if self.text[start] in "{[":  # only the new characters are sliced: arguments may be long
            fragment = self.text[start + len(call.sent):self.pos if end is None else end]
            if fragment:
                call.sent += fragment
                self.deltas.append(ToolCallDelta(len(self.calls) - 1, arguments=fragment))

    def _send(self, call: _Call, arguments: str) -> None:
        """The rest of a call's final `arguments` after what was streamed (a prefix of them by construction)."""
        if len(arguments) > len(call.sent):
            assert arguments.startswith(call.sent), "streamed arguments were revised"
            self.deltas.append(ToolCallDelta(self.calls.index(call), arguments=arguments[len(call.sent):]))
            call.sent = arguments


def parse_tool_calls(text: str, kind: str) -> list[dict] | None:
    """Tool calls in `text` (which starts at the first opening tag), or None when it is malformed."""
    reader = ToolCallReader(kind)
    reader.feed(text)
    return reader.finish()
