"""Chat templates render as transformers' apply_chat_template does; model output parses into OpenAI fields."""

from __future__ import annotations

import json

import pytest

from openjamba.chat_format import (
    AssistantOutput,
    ChatTemplateError,
    OutputFormat,
    StreamingOutputParser,
    encode_chat,
    output_format,
    parse_assistant_output,
    prompt_opens_reasoning,
    render_chat,
)
from openjamba.tokenizer import load_tokenizer

from .tokenizer_fixtures import CHATML_TEMPLATE, JAMBA15_TEMPLATE, write_jamba2, write_jamba16

pytest.importorskip("google.protobuf", reason="transformers needs protobuf to read a SentencePiece model")
transformers = pytest.importorskip("transformers")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city — «quoted», ünïcode",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}}
CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello! 🤖"}],
    "system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "  spaces  \n"}],
    "tools": [{"role": "system", "content": "You check weather."}, {"role": "user", "content": "Weather in Zürich?"},
              {"role": "assistant", "content": None, "tool_calls": [CALL]},
              {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 3}'}],
    "reasoning": [{"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4", "reasoning_content": "Two plus two is four."},
                  {"role": "user", "content": "and 3+3?"}],
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return {"chatml": write_jamba2(root / "jamba2", CHATML_TEMPLATE),
            "jamba15": write_jamba16(root / "jamba16", JAMBA15_TEMPLATE),
            "none": write_jamba16(root / "base")}


@pytest.mark.parametrize("kind", ["chatml", "jamba15"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_render_equals_transformers(checkpoints, kind, name, generation_prompt):
    ours = load_tokenizer(checkpoints[kind])
    theirs = transformers.AutoTokenizer.from_pretrained(str(checkpoints[kind]))
    messages = CONVERSATIONS[name]
    for extra in ({}, {"tools": [WEATHER]}, {"documents": [{"title": "Zürich", "text": "Cold in winter."}]}):
        expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                              **extra)
        assert render_chat(ours, messages, add_generation_prompt=generation_prompt, **extra) == expected
        ids = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                         return_dict=False, **extra)
        assert encode_chat(ours, messages, add_generation_prompt=generation_prompt, **extra) == list(ids)


def test_template_sources(tmp_path, checkpoints):
    """chat_template.jinja wins over the config; a list of named templates gives 'default', or 'tool_use' with
    tools; extra keywords reach the template."""
    d = write_jamba2(tmp_path / "named", [{"name": "default", "template": "D{{ messages[0].content }}"},
                                          {"name": "tool_use", "template": "T{{ tools[0].function.name }}"}])
    tok = load_tokenizer(d)
    assert render_chat(tok, [{"role": "user", "content": "x"}]) == "Dx"
    assert render_chat(tok, [{"role": "user", "content": "x"}], tools=[WEATHER]) == "Tget_weather"
    (d / "chat_template.jinja").write_text("J{{ flavour }}{{ eos_token }}")
    hi = [{"role": "user", "content": "hi"}]
    assert render_chat(load_tokenizer(d), hi, flavour="!") == "J!<|im_end|>"
    theirs = transformers.AutoTokenizer.from_pretrained(str(d))
    assert theirs.apply_chat_template(hi, tokenize=False, flavour="!") == "J!<|im_end|>"
    # template files replace the config's templates: no "tool_use" any more, unless a file names one
    assert render_chat(load_tokenizer(d), hi, tools=[WEATHER]) == theirs.apply_chat_template(
        hi, tools=[WEATHER], tokenize=False) == "J<|im_end|>"
    (d / "additional_chat_templates").mkdir()
    (d / "additional_chat_templates" / "tool_use.jinja").write_text("F{{ tools | length }}")
    theirs = transformers.AutoTokenizer.from_pretrained(str(d))
    assert render_chat(load_tokenizer(d), hi, tools=[WEATHER]) == "F1"
    assert theirs.apply_chat_template(hi, tools=[WEATHER], tokenize=False) == "F1"
    saved = load_tokenizer(d).save_pretrained(tmp_path / "saved")
    assert "additional_chat_templates/tool_use.jinja" in saved
    assert load_tokenizer(tmp_path / "saved").chat_templates == load_tokenizer(d).chat_templates


def test_tojson_and_helpers():
    class Tok:
        special_tokens = {"bos_token": "<s>"}
        chat_templates = {"default": "{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ strftime_now('%Y') | length }}"
                                     "{% set ns = namespace(n=1) %}{% set ns.n = ns.n + 1 %}|{{ ns.n }}"
                                     "|{{ bos_token }}"}

    out = render_chat(Tok(), [{"role": "user", "content": ""}], x={"a": "é<>&"})
    assert out == '{"a": "é<>&"}|{\n  "a": "é<>&"\n}|4|2|<s>'


def test_template_errors(checkpoints):
    base = load_tokenizer(checkpoints["none"])
    with pytest.raises(ChatTemplateError, match="no chat template.*plain completion"):
        render_chat(base, [{"role": "user", "content": "hi"}])
    jamba = load_tokenizer(checkpoints["jamba15"])
    with pytest.raises(ChatTemplateError, match="Jamba has no role narrator"):
        render_chat(jamba, [{"role": "narrator", "content": "hi"}])
    with pytest.raises(ChatTemplateError, match="syntax error"):
        render_chat(jamba, [{"role": "user", "content": "hi"}], chat_template="{% for %}")
    with pytest.raises(ChatTemplateError, match="no messages"):
        render_chat(jamba, [])
    with pytest.raises(ChatTemplateError, match="dict"):
        render_chat(jamba, ["not a message"])


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ raise_exception.__globals__ }}",
    "{% set ns = namespace() %}{% set ns._x = 1 %}",
    "{{ messages.append(1) }}",
    "{{ dict.__call__.__globals__ }}",
])
def test_sandbox_refuses_python_internals(checkpoints, template):
    tok = load_tokenizer(checkpoints["chatml"])
    with pytest.raises(ChatTemplateError):
        render_chat(tok, [{"role": "user", "content": "hi"}], chat_template=template)


# ---------------------------------------------------------------------- output parsing
def test_output_format_detection(checkpoints):
    assert output_format(load_tokenizer(checkpoints["chatml"])) == OutputFormat("hermes", True)
    assert output_format(load_tokenizer(checkpoints["jamba15"])) == OutputFormat("jamba", False)
    assert output_format(load_tokenizer(checkpoints["none"])) == OutputFormat("jamba", False)  # its vocabulary
    assert output_format("hermes+think") == OutputFormat("hermes", True)
    assert output_format("none") == OutputFormat(None, False)
    assert output_format("{{ '<tool_call>' }}") == OutputFormat("hermes", False)


def test_template_decides_over_vocabulary(tmp_path):
    """A vocabulary that still carries Jamba 1.5's <tool_calls> under a Hermes template: the template wins."""
    tok = load_tokenizer(write_jamba16(tmp_path / "mixed", CHATML_TEMPLATE))
    assert "<tool_calls>" in tok.get_vocab()
    assert output_format(tok) == OutputFormat("hermes", True)


def _calls(out: AssistantOutput) -> list[tuple[str, dict]]:
    for call in out.tool_calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in out.tool_calls]


def test_hermes_tool_calls():
    one = parse_assistant_output('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
                                 '{"city": "Zürich"}}\n</tool_call>', "hermes")
    assert one.content == "Let me check." and _calls(one) == [("get_weather", {"city": "Zürich"})]
    assert "Zürich" in one.tool_calls[0]["function"]["arguments"]  # non-ASCII kept
    two = parse_assistant_output('<tool_call>{"name": "a", "arguments": {}}</tool_call>\n'
                                 '<tool_call>{"name": "b", "arguments": {"x": [1, 2]}}</tool_call>', "hermes")
    assert two.content is None and _calls(two) == [("a", {}), ("b", {"x": [1, 2]})]
    unclosed = parse_assistant_output('<tool_call>{"name": "a", "arguments": {"k": 1}}', "hermes")
    assert _calls(unclosed) == [("a", {"k": 1})]
    bad = 'Sure <tool_call>{"name": "a", "arguments": {</tool_call>'
    assert parse_assistant_output(bad, "hermes") == AssistantOutput(bad, None, [])
    no_name = '<tool_call>{"arguments": {}}</tool_call>'
    assert parse_assistant_output(no_name, "hermes") == AssistantOutput(no_name, None, [])


def test_jamba_tool_calls():
    out = parse_assistant_output('<tool_calls>[{"name": "a", "arguments": {"q": "x"}}, '
                                 '{"name": "b", "arguments": {}}]</tool_calls>', "jamba")
    assert out.content is None and _calls(out) == [("a", {"q": "x"}), ("b", {})]
    assert parse_assistant_output("<tool_calls>[{]</tool_calls>", "jamba").content == "<tool_calls>[{]</tool_calls>"
    plain = parse_assistant_output("No tools needed.", "jamba")
    assert plain == AssistantOutput("No tools needed.", None, [])


def test_thinking_split():
    fmt = "hermes+think"
    out = parse_assistant_output("<think>\nLet me add.\n</think>\n\nThe answer is 4.", fmt)
    assert out == AssistantOutput("The answer is 4.", "Let me add.", [])
    # the prompt opened <think> (Reasoning 3B's generation prompt): the output starts inside it
    assert prompt_opens_reasoning("<|im_start|>assistant\n<think>\n")
    out = parse_assistant_output("Add them.</think>4", fmt, started_in_reasoning=True)
    assert out == AssistantOutput("4", "Add them.", [])
    unfinished = parse_assistant_output("<think>still thinking", fmt)
    assert unfinished == AssistantOutput(None, "still thinking", [])
    both = parse_assistant_output('<think>need weather</think><tool_call>{"name": "w", "arguments": {}}</tool_call>',
                                  fmt)
    assert both.reasoning_content == "need weather" and both.content is None and _calls(both) == [("w", {})]
    assert parse_assistant_output("<think>x</think>y", "hermes").content == "<think>x</think>y"  # no thinking


STREAM_CASES = [
    ("<think>\nLet me add.\n</think>\n\nThe answer is 4.", "hermes+think", False),
    ("Add them.</think>  4 ", "hermes+think", True),
    ('Checking <tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>', "hermes+think",
     False),
    ('Sure <tool_call>{"name": "a", "arguments": {</tool_call> trailing', "hermes", False),
    ('<tool_calls>[{"name": "a", "arguments": {"q": 1}}]</tool_calls>', "jamba", False),
    ("text with < and <tool and <thinking> and </ and a final <", "hermes+think", False),
    ("  <thi", "hermes+think", False),
    ("<think>never closed </thi", "hermes+think", False),
    ("emoji 🤖 and\n\nnewlines\n\n", "none", False),
    ("", "hermes+think", False),
]


@pytest.mark.parametrize("text,fmt,started", STREAM_CASES)
def test_streaming_parser_one_character_at_a_time_equals_one_shot(text, fmt, started):
    whole = parse_assistant_output(text, fmt, started_in_reasoning=started)
    parser = StreamingOutputParser(fmt, started_in_reasoning=started)
    deltas = [d for ch in text for d in parser.feed(ch)] + parser.flush()
    streamed = parser.finish()
    assert all(len(d) == 1 and next(iter(d.values())) for d in deltas)
    assert "".join(d.get("content", "") for d in deltas) == (whole.content or "")
    assert "".join(d.get("reasoning_content", "") for d in deltas) == (whole.reasoning_content or "")
    assert (streamed.content, streamed.reasoning_content, _calls(streamed)) == \
        (whole.content, whole.reasoning_content, _calls(whole))


def test_streaming_holds_back_only_possible_tags():
    parser = StreamingOutputParser("hermes+think")
    assert parser.feed("<thi") == []  # may become <think>
    assert parser.feed("nk>abc") == [{"reasoning_content": "abc"}]
    assert parser.feed(" </th") == []
    assert parser.feed("ink>Hi <") == [{"content": "Hi"}]
    assert parser.feed("b>") == [{"content": " <b>"}]
    assert parser.feed('<tool_call>{"name": "f", "arguments": {}}') == []
    assert parser.flush() == []
    assert _calls(parser.finish()) == [("f", {})]
    with pytest.raises(RuntimeError):
        parser.feed("more")
