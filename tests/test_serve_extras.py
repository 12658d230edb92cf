"""vLLM's request extras for chat and completions: continuing the final assistant message (prefill, and the
Messages API's prefill), include_stop_str_in_output, skip_special_tokens, truncate_prompt_tokens. The server runs a
scripted engine (a known output, the prompt it was given recorded) over tokenizers whose `<think>` and `<tool_call>`
are special tokens; transformers' apply_chat_template is the oracle of the continued prompts."""

from __future__ import annotations

import logging

import anthropic
import httpx
import openai
import pytest

from openjamba.chat_format import render_chat
from openjamba.serve.api import ServerConfig, create_app
from openjamba.serve.templating import ChatFormat
from openjamba.tokenizer import load_tokenizer

from .serve_helpers import CHAT_TEMPLATE, running_server
from .test_serve import ScriptedEngine
from .tokenizer_fixtures import CHATML_TEMPLATE, JAMBA15_TEMPLATE, write_jamba2, write_jamba16

pytest.importorskip("google.protobuf", reason="transformers needs protobuf to read a SentencePiece model")
transformers = pytest.importorskip("transformers")

MODEL = "tiny"
USER = {"role": "user", "content": "What is 2+2?"}


class RecordingEngine(ScriptedEngine):
    """A ScriptedEngine that keeps the prompts it was given."""

    def __init__(self, script: list[int]) -> None:
        super().__init__(script)
        self.prompts: list[list[int]] = []

    def submit(self, prompt, params, on_event, **_):
        self.prompts.append(list(prompt))
        return super().submit(prompt, params, on_event)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("extras")
    return {"chatml": write_jamba2(root / "chatml", CHATML_TEMPLATE),
            "chatml-plain": write_jamba2(root / "plain", CHAT_TEMPLATE),
            "jamba15": write_jamba16(root / "jamba15", JAMBA15_TEMPLATE)}


def serve(checkpoint, text: str, **config):
    """A live server whose engine writes `text` then EOS: (the context manager giving its URL, the engine)."""
    tokenizer = load_tokenizer(checkpoint)
    script = tokenizer.encode(text, add_special_tokens=False) + tokenizer.eos_token_ids[:1]
    engine = RecordingEngine(script)
    config.setdefault("max_context", 1024)
    server_config = ServerConfig(model_name=MODEL, vocab_size=tokenizer.vocab_size, **config)
    return running_server(create_app(engine, tokenizer, server_config, ChatFormat(tokenizer))), engine


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)


# ---------------------------------------------------------------------- continue_final_message
PREFILLS = ["The answer is", "<think>\nTwo and two", "  padded with spaces  \n", "Line one.\nLine two"]


@pytest.mark.parametrize("kind", ["chatml", "chatml-plain", "jamba15"])
@pytest.mark.parametrize("prefill", PREFILLS)
def test_continued_prompt_equals_transformers(checkpoints, kind, prefill):
    ours = load_tokenizer(checkpoints[kind])
    theirs = transformers.AutoTokenizer.from_pretrained(str(checkpoints[kind]))
    for head in ([USER], [{"role": "system", "content": "Be brief."}, USER]):
        messages = head + [{"role": "assistant", "content": prefill}]
        expected = theirs.apply_chat_template(messages, tokenize=False, continue_final_message=True)
        assert render_chat(ours, messages, add_generation_prompt=False, continue_final_message=True) == expected
        ids = theirs.apply_chat_template(messages, tokenize=True, continue_final_message=True, return_dict=False)
        assert ChatFormat(ours).encode(messages, add_generation_prompt=False, continue_final_message=True) == list(ids)
        assert not expected.endswith(("<|im_end|>\n", "<|eom|>\n"))


def test_chat_continues_the_final_message(checkpoints):
    """The prompt ends inside the prefilled message; the reply is only the new text, and the <think> the prefill
    opened makes the reply start in reasoning, streamed or not."""
    checkpoint = checkpoints["chatml"]
    theirs = transformers.AutoTokenizer.from_pretrained(str(checkpoint))
    server, engine = serve(checkpoint, " four.\n</think>\n\nThe answer is 4.")
    messages = [USER, {"role": "assistant", "content": "<think>\nTwo and two"}]
    extra = {"continue_final_message": True, "add_generation_prompt": False}
    with server as url:
        c = client(url)
        r = c.chat.completions.create(model=MODEL, messages=messages, extra_body=extra)
        assert engine.prompts[-1] == list(theirs.apply_chat_template(messages, continue_final_message=True,
                                                                     tokenize=True, return_dict=False))
        assert r.usage.prompt_tokens == len(engine.prompts[-1])
        message = r.choices[0].message
        assert message.content == "The answer is 4."
        assert message.model_extra["reasoning_content"] == "four."
        chunks = list(c.chat.completions.create(model=MODEL, messages=messages, stream=True, extra_body=extra))
        deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
        assert "".join(d.content or "" for d in deltas) == "The answer is 4."
        assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == "four."
        # /tokenize renders the same prompt
        t = httpx.post(url + "/tokenize", json={"messages": messages, **extra}).json()
        assert t["tokens"] == engine.prompts[-1]
        # without the flags the final message is a closed turn and a new one starts
        c.chat.completions.create(model=MODEL, messages=messages)
        assert engine.prompts[-1] == list(theirs.apply_chat_template(messages, add_generation_prompt=True,
                                                                     tokenize=True, return_dict=False))
        # add_generation_prompt false alone: the conversation as it is, no generation prompt
        c.chat.completions.create(model=MODEL, messages=[USER], extra_body={"add_generation_prompt": False})
        assert engine.prompts[-1] == list(theirs.apply_chat_template([USER], tokenize=True, return_dict=False))


@pytest.mark.parametrize("body, words", [
    ({"continue_final_message": True}, "add_generation_prompt"),  # the generation prompt is on by default
    ({"continue_final_message": True, "add_generation_prompt": True}, "add_generation_prompt"),
    ({"continue_final_message": "yes", "add_generation_prompt": False}, "boolean"),
    ({"add_generation_prompt": 0}, "boolean"),
    ({"continue_final_message": True, "add_generation_prompt": False, "messages": [USER]}, "assistant"),
    ({"continue_final_message": True, "add_generation_prompt": False,
      "messages": [USER, {"role": "assistant", "content": " "}]}, "text content"),
    ({"continue_final_message": True, "add_generation_prompt": False, "messages": [USER, {
        "role": "assistant", "content": "x", "tool_calls": [{"type": "function", "function": {"name": "f"}}]}]},
     "tool_calls"),
])
def test_continuation_errors_name_the_field(checkpoints, body, words):
    server, _ = serve(checkpoints["chatml"], "x")
    with server as url:
        request = {"model": MODEL, "messages": [USER, {"role": "assistant", "content": "The"}], **body}
        r = httpx.post(url + "/v1/chat/completions", json=request, timeout=60)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        param = "add_generation_prompt" if "add_generation_prompt" in body and len(body) == 1 else \
            "continue_final_message"
        assert error["param"] == param and words in error["message"], error


def test_messages_api_prefill(checkpoints):
    """Anthropic's prefill: a last assistant turn is continued, the reply holds only the continuation (a thinking
    block first when the prefill opened <think>), and count_tokens counts the continued prompt."""
    checkpoint = checkpoints["chatml"]
    theirs = transformers.AutoTokenizer.from_pretrained(str(checkpoint))
    server, engine = serve(checkpoint, " four.\n</think>\n\nThe answer is 4.")
    prefill = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "<think>\nTwo and two"}]
    with server as url:
        c = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0, timeout=60)
        r = c.messages.create(model=MODEL, max_tokens=50, messages=prefill)
        assert engine.prompts[-1] == list(theirs.apply_chat_template(prefill, continue_final_message=True,
                                                                     tokenize=True, return_dict=False))
        assert [(b.type, getattr(b, "text", None) or getattr(b, "thinking", None)) for b in r.content] == [
            ("thinking", "four."), ("text", "The answer is 4.")]
        assert c.messages.count_tokens(model=MODEL, messages=prefill).input_tokens == len(engine.prompts[-1])
        events = list(c.messages.create(model=MODEL, max_tokens=50, messages=prefill, stream=True))
        texts = [e.delta.text for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta"]
        assert "".join(texts) == "The answer is 4."
        plain = [prefill[0], {"role": "assistant", "content": [{"type": "text", "text": "The answer"}]}]
        c.messages.create(model=MODEL, max_tokens=50, messages=plain)
        assert theirs.decode(engine.prompts[-1]).endswith("<|im_start|>assistant\nThe answer")
        with pytest.raises(anthropic.BadRequestError, match="trailing whitespace"):
            c.messages.create(model=MODEL, max_tokens=50, messages=[prefill[0], {"role": "assistant",
                                                                                 "content": "The "}])


def test_extras_are_not_named_as_ignored(checkpoints, caplog):
    server, _ = serve(checkpoints["chatml"], "x")
    body = {"model": MODEL, "messages": [USER, {"role": "assistant", "content": "The"}],
            "continue_final_message": True, "add_generation_prompt": False, "include_stop_str_in_output": True,
            "skip_special_tokens": False, "truncate_prompt_tokens": 100, "not_a_field": 1}
    with server as url, caplog.at_level(logging.WARNING, logger="openjamba.serve"):
        assert httpx.post(url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
    warnings = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert warnings and all("not_a_field" in w and "continue_final_message" not in w
                            and "add_generation_prompt" not in w and "include_stop" not in w
                            and "skip_special" not in w and "truncate" not in w for w in warnings)


# ---------------------------------------------------------------------- include_stop_str_in_output
def test_include_stop_str_in_output(checkpoints):
    """The stop string that ended a choice stays at the end of its text with include_stop_str_in_output (what
    followed it in the same token is still cut), streamed or not, in completions and chat; left out, it is cut."""
    server, _ = serve(checkpoints["chatml-plain"], "The answer is 4. Done and more.")
    with server as url:
        c = client(url)
        args = dict(model=MODEL, prompt="2+2?", max_tokens=40, stop=["4.", "zzz"])
        assert c.completions.create(**args).choices[0].text == "The answer is "
        kept = c.completions.create(extra_body={"include_stop_str_in_output": True}, **args).choices[0]
        assert kept.text == "The answer is 4." and kept.finish_reason == "stop"
        streamed = c.completions.create(stream=True, extra_body={"include_stop_str_in_output": True}, **args)
        assert "".join(ch.choices[0].text for ch in streamed) == "The answer is 4."
        chat = dict(model=MODEL, messages=[USER], stop="Done", extra_body={"include_stop_str_in_output": True})
        assert c.chat.completions.create(**chat).choices[0].message.content == "The answer is 4. Done"
        assert "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(stream=True, **chat)
                       if ch.choices) == "The answer is 4. Done"
        r = httpx.post(url + "/v1/completions", json={**args, "include_stop_str_in_output": 1}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "include_stop_str_in_output"


# ---------------------------------------------------------------------- skip_special_tokens
WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def test_skip_special_tokens(checkpoints):
    """Special tokens leave the text by default and stay with skip_special_tokens false, in completions and chat;
    by default chat still reads the output format's tags (<think>, <tool_call>), special tokens in this
    tokenizer, so reasoning and tool calls parse."""
    checkpoint = checkpoints["chatml"]
    tokenizer = load_tokenizer(checkpoint)
    assert {"<think>", "<tool_call>", "<|im_start|>"} <= {tokenizer.decode([i]) for i in tokenizer.all_special_ids}
    # the template's generation prompt opens <think>: the reply closes it
    text = 'hmm</think><|im_start|>Hi there<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'
    server, _ = serve(checkpoint, text)
    with server as url:
        c = client(url)
        args = dict(model=MODEL, prompt="2+2?", max_tokens=60)
        plain = c.completions.create(**args).choices[0].text
        assert plain == tokenizer.decode(tokenizer.encode(text, add_special_tokens=False), skip_special_tokens=True)
        assert "<" not in plain and "Hi there" in plain
        kept = c.completions.create(extra_body={"skip_special_tokens": False}, **args).choices[0].text
        assert kept == text
        chat = dict(model=MODEL, messages=[USER])
        message = c.chat.completions.create(**chat).choices[0].message
        assert message.model_extra["reasoning_content"] == "hmm"
        assert message.content == 'Hi there<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'
        message = c.chat.completions.create(extra_body={"skip_special_tokens": False}, **chat).choices[0].message
        assert message.content.startswith("<|im_start|>Hi there")
        choice = c.chat.completions.create(tools=WEATHER, **chat).choices[0]
        assert choice.message.content == "Hi there" and choice.finish_reason == "tool_calls"
        assert choice.message.tool_calls[0].function.name == "get_weather"
        streamed = list(c.chat.completions.create(stream=True, tools=WEATHER, **chat))
        assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == "Hi there"
        r = httpx.post(url + "/v1/chat/completions", json={**chat, "skip_special_tokens": "no"}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "skip_special_tokens"


# ---------------------------------------------------------------------- truncate_prompt_tokens
def test_truncate_prompt_tokens(checkpoints):
    """A prompt longer than truncate_prompt_tokens keeps its last ones (a chat's after the template rendered it)
    instead of a 400 for being too long; usage.prompt_tokens and an echo show what was read."""
    checkpoint = checkpoints["chatml-plain"]
    tokenizer = load_tokenizer(checkpoint)
    server, engine = serve(checkpoint, "ok", max_context=64)
    long = "hello world, this is a small test of the server. " * 8
    whole = tokenizer.encode(long)
    assert len(whole) > 64
    with server as url:
        c = client(url)
        args = dict(model=MODEL, prompt=long, max_tokens=4)
        with pytest.raises(openai.BadRequestError, match="maximum context length"):
            c.completions.create(**args)
        r = c.completions.create(extra_body={"truncate_prompt_tokens": 20}, **args)
        assert engine.prompts[-1] == whole[-20:] and r.usage.prompt_tokens == 20
        r = c.completions.create(echo=True, extra_body={"truncate_prompt_tokens": 20}, **args)
        assert r.choices[0].text == tokenizer.decode(whole[-20:]) + "ok"
        short = c.completions.create(echo=True, extra_body={"truncate_prompt_tokens": 20}, model=MODEL,
                                     prompt="hello", max_tokens=4)
        assert short.choices[0].text == "hellook" and engine.prompts[-1] == tokenizer.encode("hello")
        messages = [{"role": "system", "content": long}, USER]
        rendered = ChatFormat(tokenizer).encode(messages)
        with pytest.raises(openai.BadRequestError, match="maximum context length"):
            c.chat.completions.create(model=MODEL, messages=messages)
        r = c.chat.completions.create(model=MODEL, messages=messages, extra_body={"truncate_prompt_tokens": 30})
        assert engine.prompts[-1] == rendered[-30:] and r.usage.prompt_tokens == 30
        r = c.completions.create(extra_body={"truncate_prompt_tokens": -1}, model=MODEL, prompt="hello", max_tokens=4)
        assert engine.prompts[-1] == tokenizer.encode("hello")  # -1: vLLM's "the context length"
        with pytest.raises(openai.BadRequestError, match="maximum context length"):  # 64 kept leave none
            c.completions.create(extra_body={"truncate_prompt_tokens": -1}, **args)
        for bad in (0, -2, 65, "5", True):
            r = httpx.post(url + "/v1/completions", json={**args, "truncate_prompt_tokens": bad}, timeout=60)
            assert r.status_code == 400 and r.json()["error"]["param"] == "truncate_prompt_tokens", bad
