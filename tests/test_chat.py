"""`openjamba chat`: multi-turn memory on the engine's state store, /save and /load, and piped use."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from openjamba import JambaForCausalLM
from openjamba.serve.chat import Conversation, Output
from openjamba.serve.engine import Engine, SamplingParams
from openjamba.serve.templating import ChatFormat
from openjamba.tokenizer import load_tokenizer

from .serve_helpers import build_checkpoint

ROOT = Path(__file__).resolve().parents[1]
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("chat") / "tiny-jamba")


@pytest.fixture(scope="module")
def parts(checkpoint):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model = JambaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(checkpoint)
    yield model, tokenizer, ChatFormat(tokenizer)
    torch.set_num_threads(before)


def conversation(parts, reuse: bool = True, system: str | None = "Be brief.") -> tuple[Engine, Conversation]:
    model, tokenizer, chat = parts
    engine = Engine(model, max_running=1, max_waiting=1, reuse=reuse, eos_token_ids=tokenizer.eos_token_ids)
    engine.start()
    return engine, Conversation(engine, tokenizer, chat, GREEDY, system)


def quiet() -> Output:
    return Output(io.StringIO(), show_thinking=False, tty=False)


def test_turns_prefill_only_new_tokens_and_match_no_reuse(parts):
    engine, talk = conversation(parts)
    engine_off, talk_off = conversation(parts, reuse=False)
    try:
        for turn, text in enumerate(["hello world", "what is the weather", "and in Paris"]):
            out, out_off = quiet(), quiet()
            figures = talk.reply(text, out)
            figures_off = talk_off.reply(text, out_off)
            assert out.stream.getvalue() == out_off.stream.getvalue()  # identical replies, reuse or not
            assert figures_off["cached_tokens"] == 0
            if turn:
                # the whole history before this turn's user message was stored: only the new tokens are read
                history = talk.chat.encode(talk.messages[:-2], add_generation_prompt=False)
                assert figures["cached_tokens"] >= len(history)
        assert talk.messages == talk_off.messages and len(talk.messages) == 7
    finally:
        engine.stop()
        engine_off.stop()


def test_retry_undo_and_set(parts):
    """/retry sends the last user turn again from the state stored after its prompt (every prompt token reused; a
    greedy reply is the same), /undo drops the last exchange, /set changes a setting and refuses a bad one."""
    from openjamba.serve.chat import EXIT, _command

    engine, talk = conversation(parts)
    try:
        talk.reply("hello world", quiet())
        second = quiet()
        talk.reply("and in Paris", second)
        assert _command("/retry", talk, {}, interactive=False) == "and in Paris" and len(talk.messages) == 3
        again = quiet()
        figures = talk.reply("and in Paris", again)
        assert figures["cached_tokens"] == figures["prompt_tokens"]  # the reply starts at once
        assert again.stream.getvalue() == second.stream.getvalue()
        assert _command("/undo", talk, {}, interactive=False) is None and len(talk.messages) == 3
        assert _command("/undo", talk, {}, interactive=False) is None and len(talk.messages) == 1  # the system
        assert _command("/undo", talk, {}, interactive=False) is None
        assert _command("/set temperature 0.5", talk, {}, interactive=False) is None
        assert talk.params.temperature == 0.5
        for bad in ("/set top_p 0", "/set top_p high", "/set colour blue"):
            _command(bad, talk, {}, interactive=False)
            assert talk.params.top_p == GREEDY.top_p
        assert _command("/exit", talk, {}, interactive=False) is EXIT
    finally:
        engine.stop()


def test_system_command_replaces_the_system_message(parts):
    """/system TEXT puts a new system message first and keeps the exchanges; the next prompt renders it; /system
    off removes it."""
    from openjamba.serve.chat import _command

    engine, talk = conversation(parts)
    try:
        talk.reply("hello world", quiet())
        assert _command("/system Answer in French.", talk, {}, interactive=False) is None
        assert talk.messages[0] == {"role": "system", "content": "Answer in French."} and len(talk.messages) == 3
        figures = talk.reply("and in Paris", quiet())
        assert "Answer in French." in talk.tokenizer.decode(talk.history_tokens())
        assert figures["cached_tokens"] == 0  # the history renders differently from its start: read again once
        assert talk.reply("thanks", quiet())["cached_tokens"] > figures["prompt_tokens"]  # and then reused
        _command("/system off", talk, {}, interactive=False)
        assert [m["role"] for m in talk.messages] == ["user", "assistant"] * 3 and talk.system is None
        talk.reset()
        assert talk.messages == []
    finally:
        engine.stop()


def test_default_chat_template_kwargs(parts, checkpoint):
    """--default-chat-template-kwargs reaches every rendering unless the call sets the variable itself; a bad
    value is one clear error."""
    from openjamba.cli import build_parser
    from openjamba.serve.server import load

    _, tokenizer, chat = parts
    off = ChatFormat(tokenizer, {"enable_thinking": False})
    user = [{"role": "user", "content": "hi"}]
    assert tokenizer.decode(off.encode(user)).endswith("<think>\n\n</think>\n\n")
    assert off.encode(user, template_kwargs={"enable_thinking": True}) == chat.encode(user)
    with pytest.raises(SystemExit, match="2"):  # argparse: not a JSON object
        build_parser().parse_args(["serve", "--model", str(checkpoint), "--default-chat-template-kwargs", "[1]"])
    args = build_parser().parse_args(["serve", "--model", str(checkpoint), "--default-chat-template-kwargs",
                                      '{"messages": []}'])
    with pytest.raises(SystemExit, match="--default-chat-template-kwargs: 'messages' cannot be set"):
        load(args)


def test_save_and_load_continue_without_rereading(parts, tmp_path):
    model, _, _ = parts
    config = model.config.to_dict()
    engine, talk = conversation(parts)
    try:
        talk.reply("hello world", quiet())
        covered = talk.save(tmp_path / "talk.safetensors", config)
        assert covered == len(talk.history_tokens())
        expected = quiet()
        talk.reply("and in Paris", expected)
    finally:
        engine.stop()

    engine, fresh = conversation(parts, system=None)  # a new session: an empty store
    try:
        assert fresh.load(tmp_path / "talk.safetensors", config) == covered
        assert fresh.system == "Be brief." and len(fresh.messages) == 3
        got = quiet()
        figures = fresh.reply("and in Paris", got)
        assert got.stream.getvalue() == expected.stream.getvalue()
        assert figures["cached_tokens"] >= covered  # the history came from the file, not a prefill
    finally:
        engine.stop()


def test_load_rejects_another_model_and_other_files(parts, tmp_path):
    model, _, _ = parts
    engine, talk = conversation(parts)
    try:
        talk.reply("hello", quiet())
        path = tmp_path / "talk.safetensors"
        talk.save(path, model.config.to_dict())
        other = {**model.config.to_dict(), "hidden_size": 64}
        with pytest.raises(ValueError, match="different model.*hidden_size"):
            talk.load(path, other)
        from safetensors.torch import save_file
        save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
        with pytest.raises(ValueError, match="not a conversation"):
            talk.load(tmp_path / "other.safetensors", model.config.to_dict())
        (tmp_path / "notes.txt").write_text("not safetensors at all")
        with pytest.raises(ValueError, match="not a conversation"):  # (was a SafetensorError that ended the chat)
            talk.load(tmp_path / "notes.txt", model.config.to_dict())
        talk.reset()
        assert talk.messages == [{"role": "system", "content": "Be brief."}]
    finally:
        engine.stop()


def test_thinking_hidden_or_shown():
    parts = [{"reasoning_content": "let me see"}, {"content": "Hi."}]
    for show, tty, want in ((False, False, "Hi.\n"), (True, False, "let me seeHi.\n")):
        out = Output(io.StringIO(), show_thinking=show, tty=tty)
        for part in parts:
            out.part(part)
        out.end()
        assert out.stream.getvalue() == want
    out = Output(io.StringIO(), show_thinking=True, tty=True)
    out.part(parts[0])
    assert "\033[2m" in out.stream.getvalue()  # dimmed on a terminal


def test_cli_with_piped_stdin(checkpoint, tmp_path):
    """The real command: piped turns, /save then /load in a second process, no prompts or colours."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "openjamba", "chat", "--model", str(checkpoint), "--temperature", "0",
           "--max-tokens", "4", "--verbose", "--threads", "1"]
    saved = tmp_path / "c.safetensors"
    first = subprocess.run(cmd, input=f"hello world\n/save {saved}\n", capture_output=True, text=True, env=env,
                           timeout=120)
    assert first.returncode == 0, first.stderr
    assert "\033[" not in first.stdout and ">>>" not in first.stdout and saved.is_file()
    assert first.stdout.count("\n") == 1  # one reply line (a random reply may hold \x1e, a line break to splitlines)
    second = subprocess.run(cmd, input=f"/load {saved}\nand in Paris\n", capture_output=True, text=True, env=env,
                            timeout=120)
    assert second.returncode == 0, second.stderr
    assert "loaded 2 messages" in second.stderr
    reused = [line for line in second.stderr.splitlines() if line.startswith("[prompt")]
    assert reused and int(reused[0].split(",")[1].split()[0]) > 0  # "[prompt N tokens, M reused; ..."


def test_chat_refuses_a_checkpoint_without_template(tmp_path):
    from openjamba.cli import build_parser

    bare = build_checkpoint(tmp_path / "bare", chat_template=False)
    args = build_parser().parse_args(["chat", "--model", str(bare)])
    with pytest.raises(SystemExit, match="no chat template.*--chat-template"):
        args.func(args)


def test_chat_template_flag_gives_a_base_model_a_chat_format(tmp_path):
    """--chat-template as a file (the real command, piped), inline, or a checkpoint's named template; a missing
    file or a syntax error is one clear error at start."""
    from openjamba.cli import build_parser
    from openjamba.serve.server import load

    from .serve_helpers import CHAT_TEMPLATE

    bare = build_checkpoint(tmp_path / "bare", chat_template=False)
    template = tmp_path / "chatml.jinja"
    template.write_text(CHAT_TEMPLATE)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "openjamba", "chat", "--model", str(bare), "--chat-template",
                          str(template), "--temperature", "0", "--max-tokens", "3", "--threads", "1"],
                         input="hello world\n", capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("\n") == 1  # one reply

    def loaded(*flags):
        args = build_parser().parse_args(["serve", "--model", str(bare), "--threads", "1", *flags])
        before = torch.get_num_threads()
        try:
            return load(args)[1]
        finally:
            torch.set_num_threads(before)  # load() leaves its caller's thread with one

    expected = ChatFormat(load_tokenizer(build_checkpoint(tmp_path / "chatml"))).encode([{"role": "user",
                                                                                         "content": "hi"}])
    for flag in (str(template), CHAT_TEMPLATE):  # a file, or the template itself
        assert ChatFormat(loaded("--chat-template", flag)).encode([{"role": "user", "content": "hi"}]) == expected
    assert ChatFormat.of(loaded()) is None
    with pytest.raises(SystemExit, match="--chat-template: no chat template file"):
        loaded("--chat-template", str(tmp_path / "missing.jinja"))
    with pytest.raises(SystemExit, match="--chat-template: .*syntax error"):
        loaded("--chat-template", "{% for m in messages %}{{ m.content }}")


@pytest.mark.parametrize("verb", ["serve", "chat"])
def test_chat_template_flag_naming_a_template_the_checkpoint_lacks(tmp_path, capsys, verb):
    """--chat-template tool_use on a checkpoint without named templates: one line saying it has none."""
    from openjamba.cli import main

    bare = build_checkpoint(tmp_path / "bare", chat_template=False)
    with pytest.raises(SystemExit) as err:
        main([verb, "--model", str(bare), "--chat-template", "tool_use", "--threads", "1"]
             + (["--port", "0"] if verb == "serve" else []))
    assert err.value.code == (f"openjamba {verb}: error: --chat-template: the checkpoint has no chat template named "
                              "'tool_use' (its named templates: none) and there is no file 'tool_use'")


def test_chat_template_flag_takes_a_named_template():
    from openjamba.chat_format import ChatTemplateError, load_chat_template

    named = {"default": "{{ messages[0].content }}", "tool_use": "{{ tools | tojson }}"}
    assert load_chat_template("tool_use", named) == named["tool_use"]
    with pytest.raises(ChatTemplateError, match="named templates: default, tool_use"):
        load_chat_template("rag", named)


def test_join_lines_continues_after_a_backslash_and_inside_a_block():
    from openjamba.serve.chat import join_lines

    def more(*lines):
        rest = iter(lines)
        return lambda: next(rest)

    assert join_lines("hello", more()) == "hello"
    assert join_lines("one \\", more("two\\", "three")) == "one \ntwo\nthree"
    assert join_lines('"""', more("def f():", "    return 1", '"""')) == "def f():\n    return 1"
    assert join_lines('"""first', more("second", 'third"""')) == "first\nsecond\nthird"
    assert join_lines('  """one line"""', more()) == "one line"
    assert join_lines('say """hi"""', more()) == 'say """hi"""'  # only a first line that starts with it opens one


def test_api_key_from_the_environment(checkpoint, monkeypatch):
    from openjamba.cli import build_parser

    monkeypatch.setenv("OPENJAMBA_API_KEY", "from-env")
    assert build_parser().parse_args(["serve", "--model", str(checkpoint)]).api_key == "from-env"
    assert build_parser().parse_args(["serve", "--model", str(checkpoint), "--api-key", "flag"]).api_key == "flag"
    monkeypatch.delenv("OPENJAMBA_API_KEY")
    assert build_parser().parse_args(["serve", "--model", str(checkpoint)]).api_key is None


@pytest.mark.parametrize("flag, value", [("--top-p", "0"), ("--repetition-penalty", "0"), ("--min-p", "2")])
def test_chat_refuses_a_bad_sampling_flag_by_name(checkpoint, flag, value):
    from openjamba.cli import build_parser

    args = build_parser().parse_args(["chat", "--model", str(checkpoint), flag, value, "--threads", "1"])
    with pytest.raises(SystemExit, match=flag[2:]):
        args.func(args)


def test_chat_takes_sampling_defaults_from_generation_config(tmp_path, monkeypatch, capsys):
    """The checkpoint's generation_config.json sets what the flags leave out; a flag wins; `--generation-config
    none` keeps the built-in defaults; a bad value is one clear error."""
    import io
    import json

    from openjamba.cli import build_parser

    model_dir = build_checkpoint(tmp_path / "tiny-jamba")
    config = {"eos_token_id": 2, "do_sample": True, "temperature": 0.0, "top_p": 0.9, "repetition_penalty": 1.2}
    (model_dir / "generation_config.json").write_text(json.dumps(config))

    def sampling_line(*flags: str) -> str:
        monkeypatch.setattr(sys, "stdin", io.StringIO(""))
        args = build_parser().parse_args(["chat", "--model", str(model_dir), "--verbose", "--threads", "1", *flags])
        args.func(args)
        return next(line for line in capsys.readouterr().err.splitlines() if line.startswith("[sampling"))

    assert sampling_line() == "[sampling: temperature 0.0, top_p 0.9, repetition_penalty 1.2]"
    assert sampling_line("--top-p", "0.5") == "[sampling: temperature 0.0, top_p 0.5, repetition_penalty 1.2]"
    assert sampling_line("--generation-config", "none") == "[sampling: temperature 0.7]"
    (model_dir / "generation_config.json").write_text(json.dumps({**config, "top_p": "high"}))
    with pytest.raises(SystemExit, match="top_p must be a number"):
        sampling_line()


def test_session_file_follows_the_conversation_and_resumes_it(checkpoint, tmp_path):
    """--session: written after every turn (atomically), resumed by the next run without re-reading the history,
    removed by /reset."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    session = tmp_path / "talk.safetensors"
    cmd = [sys.executable, "-m", "openjamba", "chat", "--model", str(checkpoint), "--temperature", "0",
           "--max-tokens", "4", "--verbose", "--threads", "1", "--session", str(session)]
    first = subprocess.run(cmd, input="hello world\n", capture_output=True, text=True, env=env, timeout=120)
    assert first.returncode == 0, first.stderr
    assert session.is_file() and not list(tmp_path.glob("*.partial"))
    second = subprocess.run(cmd, input="and in Paris\n/reset\n", capture_output=True, text=True, env=env,
                            timeout=120)
    assert second.returncode == 0, second.stderr
    assert "loaded 2 messages" in second.stderr
    reused = [line for line in second.stderr.splitlines() if line.startswith("[prompt")]
    assert reused and int(reused[0].split(",")[1].split()[0]) > 0  # the first run's history was not re-read
    assert not session.exists()  # /reset cleared it


def test_session_needs_state_reuse(checkpoint, tmp_path):
    from openjamba.cli import build_parser

    args = build_parser().parse_args(["chat", "--model", str(checkpoint), "--session", str(tmp_path / "s"),
                                      "--no-reuse"])
    with pytest.raises(SystemExit, match="--no-reuse"):
        args.func(args)


def test_a_session_file_that_cannot_be_resumed_stops_the_chat_untouched(checkpoint, tmp_path, monkeypatch):
    """Going on with a fresh conversation would overwrite the file after the first turn."""
    from openjamba.cli import build_parser

    session = tmp_path / "other-model.safetensors"
    session.write_bytes(b"a conversation of another model, or not one at all")
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    args = build_parser().parse_args(["chat", "--model", str(checkpoint), "--session", str(session),
                                      "--threads", "1", "--max-tokens", "2"])
    with pytest.raises(SystemExit, match="cannot resume --session"):
        args.func(args)
    assert session.read_bytes() == b"a conversation of another model, or not one at all"


def test_retry_with_nothing_to_retry_says_so(capsys):
    from openjamba.serve.chat import _command

    class Empty:
        def undo(self):
            return None

    for verb in ("/retry", "/undo"):
        assert _command(verb, Empty(), {}, interactive=True) is None
        assert capsys.readouterr().out == f"(nothing to {verb[1:]})\n"
