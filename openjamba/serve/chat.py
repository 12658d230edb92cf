"""`openjamba chat`: a terminal conversation on the serving engine, in process.

Each turn renders the whole conversation with the checkpoint's chat template, and the engine's state store finds
the longest prefix it has already read (the previous turn's prompt and reply), so a turn prefills only its new
tokens: the history is never re-read. `/save FILE` writes the conversation and the exact model state after it as
one safetensors file (the messages and the model config in its JSON metadata, never pickle); `/load FILE` checks
that the state belongs to this model's config and puts it back in the store, so the next turn reads only itself.
`--session FILE` resumes from FILE and rewrites it after every turn. `/retry` sends the last user turn again (the
state after its prompt is stored, so the new reply starts at once), `/undo` drops the last exchange, `/set NAME
VALUE` changes a sampling setting.

Thinking (`<think>...</think>`, Jamba Reasoning 3B and Jamba2) is hidden by default (a "thinking..." note on a
terminal) and shown with `--show-thinking` (dimmed on a terminal). With stdin or stdout not a terminal (piped),
each input line is a user turn and only the replies are written: no prompts, no colours.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import TextIO

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .engine import FinishEvent, SamplingParams

FORMAT = "openjamba-chat/1"
DIM, RESET = "\033[2m", "\033[0m"
CHAT_DEFAULTS = {"temperature": 0.7, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
HELP = ("commands: /retry  /undo  /reset  /system [TEXT|off]  /set [NAME VALUE]  /save FILE  /load FILE  /help  /exit"
        "   (Ctrl-C stops "
        'a reply, Ctrl-D exits; several lines: end each with \\ or put the text between """ and """)')
BLOCK = '"""'  # opens and closes a message of several lines, as in Ollama
EXIT = object()  # `_command`'s answer to /exit
SETTABLE = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "repetition_penalty": float,
            "presence_penalty": float, "frequency_penalty": float, "max_tokens": int, "seed": int}


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    from .server import add_engine_arguments

    add_engine_arguments(parser)
    parser.add_argument("--system", default=None, help="system message that starts the conversation")
    parser.add_argument("--max-tokens", type=int, default=2048, help="most tokens per reply (default 2048)")
    # These five default to the checkpoint's generation_config.json (--generation-config), else to CHAT_DEFAULTS.
    parser.add_argument("--temperature", type=float, default=None, help="0 for greedy decoding (default 0.7)")
    parser.add_argument("--top-p", type=float, default=None, help="default 1 (off)")
    parser.add_argument("--top-k", type=int, default=None, help="default 0 (off)")
    parser.add_argument("--min-p", type=float, default=None, help="drop tokens less likely than this times the most "
                        "likely one (default 0 = off)")
    parser.add_argument("--repetition-penalty", type=float, default=None, help="divide the positive logits of tokens "
                        "already in the conversation by this, multiply the negative ones (default 1 = off)")
    parser.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's, over the reply (default 0)")
    parser.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's, over the reply (default 0)")
    parser.add_argument("--seed", type=int, default=None, help="seed of each reply's sampling (reproducible)")
    parser.add_argument("--show-thinking", action="store_true", help="print the model's <think> reasoning "
                        "(dimmed on a terminal); hidden by default")
    parser.add_argument("--session", type=Path, default=None, metavar="FILE",
                        help="keep the conversation and its state in FILE: resumed from it at start (if it exists), "
                        "written after every turn, so a later run, or one after a crash, continues without "
                        "re-reading the history")
    parser.add_argument("--verbose", action="store_true", help="after each reply, print its prompt tokens, reused "
                        "tokens and speed to stderr")


class Conversation:
    """Messages plus the engine that holds their state; one `reply` per user turn."""

    def __init__(self, engine, tokenizer, chat, params: SamplingParams, system: str | None = None) -> None:
        self.engine, self.tokenizer, self.chat, self.params = engine, tokenizer, chat, params
        self.system = system
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def undo(self) -> str | None:
        """Drop the last exchange (a user turn and the reply to it); the user's text, or None if there is none."""
        users = [i for i, m in enumerate(self.messages) if m["role"] == "user"]
        if not users:
            return None
        text = self.messages[users[-1]]["content"]
        self.messages = self.messages[:users[-1]]
        return text

    def set_system(self, text: str | None) -> None:
        """Replace the system message (None removes it), keeping the exchanges: the next turn then re-reads the
        history once, since it renders differently."""
        self.system = text or None
        rest = [m for m in self.messages if m["role"] != "system"]
        self.messages = ([{"role": "system", "content": self.system}] if self.system else []) + rest

    def change_setting(self, name: str, value: str) -> None:
        """Change one sampling setting for the next replies (ValueError naming what is wrong)."""
        if name not in SETTABLE:
            raise ValueError(f"unknown setting {name!r}; one of {', '.join(SETTABLE)}")
        try:
            parsed = SETTABLE[name](value) if not (name == "seed" and value == "none") else None
        except ValueError:
            raise ValueError(f"{name} takes a number, got {value!r}") from None
        params = dataclasses.replace(self.params, **{name: parsed})
        params.check(self.tokenizer.vocab_size)
        self.params = params

    def history_tokens(self) -> list[int]:
        """The conversation so far as the template renders it, without the next generation prompt."""
        return self.chat.encode(self.messages, add_generation_prompt=False) if self.messages else []

    def reply(self, text: str, out: Output) -> dict:
        """Send one user turn, stream the answer to `out`; returns the turn's token counts and timing."""
        messages = self.messages + [{"role": "user", "content": text}]
        prompt = self.chat.encode(messages)
        parser = self.chat.stream_parser(prompt)
        ids: list[int] = []
        shown = ""
        start, first, finish = time.perf_counter(), None, None
        events = self.engine.stream(prompt, self.params)
        try:
            for event in events:
                if isinstance(event, FinishEvent):
                    finish = event
                    parts = parser.feed(self._new_text(ids, shown, final=True)) + parser.flush()
                else:
                    first = first or time.perf_counter()
                    if event.token_id in self.engine.eos_token_ids:
                        continue
                    ids.append(event.token_id)
                    delta = self._new_text(ids, shown)
                    shown += delta
                    parts = parser.feed(delta) if delta else []
                for part in parts:
                    out.part(part)
        except KeyboardInterrupt:
            events.close()  # cancels the request; the turn is dropped
            out.end(interrupted=True)
            raise
        finally:
            events.close()
        out.end()
        if finish is None or finish.reason == "error":
            raise RuntimeError(finish.error if finish else "the engine stopped")
        reply = parser.finish()
        assistant = {"role": "assistant", "content": reply.content or ""}
        if reply.tool_calls:
            assistant["tool_calls"] = reply.tool_calls
        self.messages = messages + [assistant]
        elapsed = time.perf_counter() - start
        self._remember()
        return dict(prompt_tokens=finish.prompt_tokens, cached_tokens=finish.cached_tokens,
                    completion_tokens=finish.completion_tokens, ttft_s=(first or time.perf_counter()) - start,
                    seconds=elapsed)

    def _remember(self) -> None:
        """Store the state after the conversation exactly as the template renders it (the reply re-rendered can
        differ from the generated tokens, e.g. its end-of-turn marker), now while the user reads and types, so
        the next turn reads only its own new tokens."""
        if self.engine.reuse and self.messages:
            self.engine.export_state(self.history_tokens())

    def _new_text(self, ids: list[int], shown: str, final: bool = False) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        if text.endswith("\ufffd") and not final:
            return ""
        return text[len(shown):]

    # ------------------------------------------------------------------ save / load
    def save(self, path: Path, config_dict: dict) -> int:
        """Write the conversation and its state; returns the number of tokens the state covers."""
        tokens = self.history_tokens()
        state = self.engine.export_state(tokens) if tokens else None
        if state is None:
            raise ValueError("no stored state to save (the conversation is empty, or state reuse is off)")
        meta = {"format": FORMAT, "messages": self.messages, "system": self.system, "tokens": tokens,
                "config": config_dict}
        partial = path.with_name(path.name + ".partial")  # written whole, then renamed: a crash leaves the old file
        save_file({k: v.contiguous() for k, v in state.items()}, str(partial),
                  metadata={"openjamba_chat": json.dumps(meta)})
        os.replace(partial, path)
        return len(tokens)

    def load(self, path: Path, config_dict: dict) -> int:
        """Restore a saved conversation and its state; returns the number of tokens it covers."""
        try:
            f = safe_open(str(path), framework="pt")
        except SafetensorError as err:  # not a safetensors file at all
            raise ValueError(f"{path} is not a conversation saved by openjamba chat ({err})") from None
        with f:
            meta = json.loads((f.metadata() or {}).get("openjamba_chat", "null") or "null")
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a conversation saved by openjamba chat")
            if meta["config"] != config_dict:
                changed = sorted(k for k in set(meta["config"]) | set(config_dict)
                                 if meta["config"].get(k) != config_dict.get(k))
                raise ValueError(f"{path} was saved with a different model (config differs in {', '.join(changed)})")
            state = {name: f.get_tensor(name) for name in f.keys()}
        messages, tokens = meta["messages"], meta["tokens"]
        if (self.chat.encode(messages, add_generation_prompt=False) if messages else []) != tokens:
            raise ValueError(f"{path} was saved with a different tokenizer or chat template")
        self.engine.import_state(tokens, state)
        self.messages, self.system = messages, meta.get("system")
        return len(tokens)


class Output:
    """Writes reply parts: content plainly, reasoning dimmed (or a note, or nothing) depending on the terminal."""

    def __init__(self, stream: TextIO, show_thinking: bool, tty: bool) -> None:
        self.stream, self.show_thinking, self.tty = stream, show_thinking, tty
        self.in_reasoning = self.noted = self.wrote = False

    def part(self, part: dict) -> None:
        if "reasoning_content" in part:
            if self.show_thinking:
                self._write(f"{DIM}{part['reasoning_content']}{RESET}" if self.tty else part["reasoning_content"])
            elif self.tty and not self.noted:
                self._write(f"{DIM}thinking...{RESET}\r")
                self.noted = True
            return
        if self.noted:  # clear the note once the answer starts
            self._write("\033[2K\r")
            self.noted = False
        self._write(part.get("content", ""))

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
        self.wrote = True

    def end(self, interrupted: bool = False) -> None:
        if self.noted:
            self._write("\033[2K\r")
        self.stream.write(" [stopped]\n" if interrupted else "\n")
        self.stream.flush()
        self.in_reasoning = self.noted = self.wrote = False


def run_chat(args: argparse.Namespace) -> None:
    from .server import load, sampling_defaults
    from .templating import ChatFormat

    if args.max_tokens < 1:
        raise SystemExit("openjamba chat: error: --max-tokens must be at least 1")
    if args.session is not None and args.no_reuse:
        raise SystemExit("openjamba chat: error: --session keeps the conversation's state, which --no-reuse drops")
    model, tokenizer, engine = load(args, require_chat=True, max_running=1, max_waiting=1)
    chat = ChatFormat(tokenizer, args.default_chat_template_kwargs)
    settings = {**CHAT_DEFAULTS, **sampling_defaults(args, model.config.vocab_size)}
    settings.update({name: getattr(args, name) for name in CHAT_DEFAULTS if getattr(args, name) is not None})
    params = SamplingParams(max_tokens=args.max_tokens, presence_penalty=args.presence_penalty,
                            frequency_penalty=args.frequency_penalty, seed=args.seed, **settings)
    try:
        params.check(model.config.vocab_size)
    except ValueError as err:
        raise SystemExit(f"openjamba chat: error: {str(err).replace('_', '-')}") from None
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    out = Output(sys.stdout, args.show_thinking, tty=sys.stdout.isatty())
    conversation = Conversation(engine, tokenizer, chat, params, args.system)
    config_dict = model.config.to_dict()
    neutral = SamplingParams()
    sampling = ", ".join(f"{name} {value}" for name, value in settings.items()
                         if name == "temperature" or value != getattr(neutral, name))
    if interactive:
        _enable_line_editing()
        reuse = "no state reuse" if args.no_reuse else "state reuse"
        print(f"openjamba chat: {getattr(args, 'model_id', args.model)} ({reuse}; {sampling}). {HELP}")
    elif args.verbose:
        print(f"[sampling: {sampling}]", file=sys.stderr)
    engine.start()
    try:
        if args.session is not None and args.session.exists():
            _resume_session(conversation, args.session, config_dict, interactive)
        for line in _lines(interactive):
            text = line.strip()
            if not text:
                continue
            before = list(conversation.messages)
            if _turn(text, conversation, out, config_dict, interactive, args.verbose) is EXIT:
                break
            if args.session is not None and conversation.messages != before:
                _keep_session(conversation, args.session, config_dict)
    finally:
        engine.stop()


def _turn(text: str, conversation: Conversation, out: Output, config_dict: dict, interactive: bool,
          verbose: bool) -> object | None:
    """One input line: a /command or a user turn (its reply streamed to `out`); EXIT to leave."""
    if text.startswith("/"):
        action = _command(text, conversation, config_dict, interactive)
        if action is EXIT or action is None:
            return action
        text = action
    try:
        figures = conversation.reply(text, out)
    except KeyboardInterrupt:
        return None
    except (ValueError, conversation.chat.error, RuntimeError) as err:  # a template or length error: drop the turn
        print(f"error: {err}", file=sys.stderr)
        return None
    if verbose:
        print(f"[prompt {figures['prompt_tokens']} tokens, {figures['cached_tokens']} reused; "
              f"first token {figures['ttft_s'] * 1000:.0f} ms; {figures['completion_tokens']} tokens in "
              f"{figures['seconds']:.2f} s]", file=sys.stderr)
    return None


def _resume_session(conversation: Conversation, path: Path, config_dict: dict, interactive: bool) -> None:
    """`--session`: a file that cannot be resumed stops the chat; going on would overwrite it after the first turn."""
    try:
        tokens = conversation.load(path, config_dict)
    except (ValueError, OSError, KeyError) as err:
        raise SystemExit(f"openjamba chat: error: cannot resume --session {path}: {err}; give another file, or "
                         "remove this one to start afresh") from None
    print(f"(loaded {len(conversation.messages)} messages; the state after {tokens} tokens is restored)",
          file=sys.stdout if interactive else sys.stderr)


def _keep_session(conversation: Conversation, path: Path, config_dict: dict) -> None:
    """`--session`: the file follows the conversation after every change (removed when it is cleared)."""
    try:
        if conversation.messages:
            conversation.save(path, config_dict)
        else:
            path.unlink(missing_ok=True)
    except (ValueError, OSError) as err:
        print(f"cannot keep the session in {path}: {err}", file=sys.stderr)


def _lines(interactive: bool):
    """Input messages: piped, one per line; on a terminal, as `join_lines` joins them."""
    if not interactive:
        yield from sys.stdin
        return
    while True:
        try:
            yield join_lines(input(">>> "), lambda: input("... "))
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()


def join_lines(first: str, read_more) -> str:
    """One message from its first line and, when that line asks for more, the lines `read_more()` returns: a line
    ending in a backslash continues on the next; a first line that starts with BLOCK opens a message that ends at the
    line ending in BLOCK (pasted code or text of several lines)."""
    if first.lstrip().startswith(BLOCK):
        text = first.lstrip()[len(BLOCK):]
        lines = []
        while not text.rstrip().endswith(BLOCK):
            lines.append(text)
            text = read_more()
        lines.append(text.rstrip()[:-len(BLOCK)])
        return "\n".join(lines).strip("\n")
    lines = [first]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(read_more())
    return "\n".join(lines)


def _command(text: str, conversation: Conversation, config_dict: dict, interactive: bool) -> str | object | None:
    """Run a /command: EXIT to leave, a user text to send (again), or None."""
    verb, _, arg = text.partition(" ")
    arg = arg.strip()
    note = (lambda msg: print(msg)) if interactive else (lambda msg: print(msg, file=sys.stderr))
    if verb in ("/exit", "/quit", "/bye"):
        return EXIT
    if verb == "/reset":
        conversation.reset()
        note("(conversation cleared)")
    elif verb in ("/retry", "/undo"):
        text = conversation.undo()
        if text is None:
            note(f"(nothing to {verb[1:]})")
        elif verb == "/retry":
            return text  # sent again: the state after its prompt is stored, so the new reply starts at once
        else:
            note(f"(removed the last exchange; {len(conversation.messages)} messages left)")
    elif verb == "/system":
        if arg:
            conversation.set_system(None if arg == "off" else arg)
            note("(system message removed)" if conversation.system is None else "(system message set)")
        else:
            note(f"(system message: {conversation.system!r}; /system TEXT sets it, /system off removes it)")
    elif verb == "/set":
        name, _, value = arg.partition(" ")
        if not value.strip():
            p = conversation.params
            note("(" + ", ".join(f"{n} {getattr(p, n)}" for n in SETTABLE) + "; /set NAME VALUE changes one)")
        else:
            try:
                conversation.change_setting(name, value.strip())
                note(f"({name} {getattr(conversation.params, name)})")
            except ValueError as err:
                note(f"cannot set: {err}")
    elif verb in ("/save", "/load") and not arg:
        note(f"usage: {verb} FILE")
    elif verb == "/save":
        try:
            tokens = conversation.save(Path(arg), config_dict)
            note(f"(saved {len(conversation.messages)} messages and the state after {tokens} tokens to {arg})")
        except (ValueError, OSError) as err:
            note(f"cannot save: {err}")
    elif verb == "/load":
        try:
            tokens = conversation.load(Path(arg), config_dict)
            note(f"(loaded {len(conversation.messages)} messages; the state after {tokens} tokens is restored)")
        except (ValueError, OSError, KeyError) as err:
            note(f"cannot load: {err}")
    elif verb == "/help":
        note(HELP)
    else:
        note(f"unknown command {verb}; {HELP}")
    return None


def _enable_line_editing() -> None:
    try:
        import readline  # noqa: F401  (input() gains history and editing)
    except ImportError:
        pass
