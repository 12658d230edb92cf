"""`openjamba serve`: the official openai client against a live server (real engine, tiny random model, a tokenizer
and chat template built here). Greedy outputs are checked against `generate`, the one-request oracle."""

from __future__ import annotations

import json
import random
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from openjamba import JambaForCausalLM
from openjamba.serve.api import ServerConfig, create_app
from openjamba.serve.engine import Engine, FinishEvent, TokenEvent
from openjamba.serve.templating import ChatFormat
from openjamba.tokenizer import load_tokenizer

from .serve_helpers import build_checkpoint, running_server, serve_process, wait_for
from .test_sampling import adjusted_by_formula

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module", autouse=True)
def one_thread_here():
    """One thread: the engine's many small steps are far faster and steadier so on a busy two-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-jamba")


@pytest.fixture(scope="module")
def model(checkpoint):
    return JambaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return load_tokenizer(checkpoint)


def make_app(model, tokenizer, chat=True, api_key=None, sampling_defaults=None, allowed_origins=(), **engine_kwargs):
    engine = Engine(model, max_context=1024, eos_token_ids=tokenizer.eos_token_ids, **engine_kwargs)
    engine.start()
    config = ServerConfig(model_name="tiny-jamba", max_context=1024, vocab_size=model.config.vocab_size,
                          api_key=api_key, sampling_defaults=sampling_defaults or {},
                          allowed_origins=list(allowed_origins))
    return engine, create_app(engine, tokenizer, config, ChatFormat.of(tokenizer) if chat else None)


@pytest.fixture(scope="module")
def server(model, tokenizer):
    engine, app = make_app(model, tokenizer)
    with running_server(app) as url:
        yield engine, url
    engine.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="none", max_retries=0, timeout=60)


def test_health_is_503_once_the_engine_has_stopped(model, tokenizer):
    engine, app = make_app(model, tokenizer)
    with running_server(app) as url:
        assert httpx.get(url + "/health").status_code == 200
        engine.stop()
        response = httpx.get(url + "/health")
    assert response.status_code == 503 and response.json() == {"status": "the engine has stopped"}


def greedy(model, ids: list[int], n: int) -> list[int]:
    """The oracle: `generate`'s greedy continuation, EOS ignored."""
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, eos_token_id=[])
    return out[0, len(ids):].tolist()


def test_models_health_metrics(server, client):
    engine, url = server
    assert [m.id for m in client.models.list().data] == ["tiny-jamba"]
    assert client.models.list().data[0].max_model_len == 1024  # vLLM's field: the server's --max-context
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    client.completions.create(model="tiny-jamba", prompt="hello", max_tokens=2)
    text = httpx.get(url + "/metrics").text
    for name in ("openjamba_requests_running", "openjamba_requests_waiting", "openjamba_generation_tokens_total",
                 "openjamba_prompt_tokens_cached_total", "openjamba_queue_time_seconds_count"):
        assert f"\n{name} " in "\n" + text, name
    generated = next(float(line.split()[1]) for line in text.splitlines()
                     if line.startswith("openjamba_generation_tokens_total "))
    assert generated >= 2
    steps = next(float(line.split()[1]) for line in text.splitlines()
                 if line.startswith("openjamba_engine_decode_step_seconds_count "))
    assert steps >= 1 and 'openjamba_engine_decode_step_seconds_bucket{le="+Inf"} ' in text
    for name in ("openjamba_engine_time_to_first_token_seconds", "openjamba_engine_request_seconds"):
        count = next(float(line.split()[1]) for line in text.splitlines() if line.startswith(name + "_count "))
        assert count >= 1 and f'{name}_bucket{{le="600.0"}} ' in text, name


def test_completion_equals_generate(model, tokenizer, client):
    prompt = "The quick brown fox"
    ids = tokenizer.encode(prompt)
    r = client.completions.create(model="tiny-jamba", prompt=prompt, max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    expected = greedy(model, ids, 8)
    assert r.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 8)
    assert r.usage.prompt_tokens_details.cached_tokens >= 0


def test_completion_prompt_forms_n_and_echo(model, tokenizer, client):
    ids_a, ids_b = tokenizer.encode("hello world"), tokenizer.encode("Paris is")
    want_a = tokenizer.decode(greedy(model, ids_a, 4), skip_special_tokens=True)
    want_b = tokenizer.decode(greedy(model, ids_b, 4), skip_special_tokens=True)
    args = dict(model="tiny-jamba", max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    r = client.completions.create(prompt=["hello world", "Paris is"], **args)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [want_a, want_b]
    r = client.completions.create(prompt=ids_a, **args)
    assert r.choices[0].text == want_a
    r = client.completions.create(prompt=[ids_a, ids_b], n=2, **args)
    assert sorted((c.index, c.text) for c in r.choices) == [(0, want_a), (1, want_a), (2, want_b), (3, want_b)]
    assert r.usage.prompt_tokens == len(ids_a) + len(ids_b) and r.usage.completion_tokens == 16
    r = client.completions.create(prompt="hello world", echo=True, **args)
    assert r.choices[0].text == tokenizer.decode(ids_a) + want_a


def test_completion_logprobs_match_the_model(model, tokenizer, client):
    ids = tokenizer.encode("hello world")
    r = client.completions.create(model="tiny-jamba", prompt=ids, max_tokens=3, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
    first = int(logits.argmax())
    assert lp.tokens[0] == tokenizer.token_text(first)  # the text it adds, leading space kept
    assert lp.token_logprobs[0] == pytest.approx(float(logits[first]), abs=1e-4)
    assert len(lp.top_logprobs[0]) <= 2 and max(lp.top_logprobs[0].values()) == pytest.approx(
        float(logits.max()), abs=1e-4)


def test_streaming_completion_equals_non_streaming(client):
    args = dict(model="tiny-jamba", prompt="The quick brown", max_tokens=10, temperature=0,
                extra_body={"ignore_eos": True})
    whole = client.completions.create(**args).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_sse_ends_with_done(server):
    body = {"model": "tiny-jamba", "prompt": "hi", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server[1] + "/v1/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    json.loads(events[0][6:])


def test_chat_equals_generate_and_reuses_state(model, tokenizer, client):
    ids = ChatFormat(tokenizer).encode(MESSAGES)
    out = greedy(model, ids, 6)
    r = client.chat.completions.create(model="tiny-jamba", messages=MESSAGES, max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    message = r.choices[0].message
    assert message.role == "assistant"
    assert message.content == tokenizer.decode(out).strip()
    assert r.usage.prompt_tokens == len(ids)
    again = client.chat.completions.create(model="tiny-jamba", messages=MESSAGES, max_tokens=6, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert again.choices[0].message.content == message.content
    assert again.usage.prompt_tokens_details.cached_tokens >= len(ids) - 1  # the whole prompt's state was stored


def test_shared_system_prompt_is_reused_across_conversations(tokenizer, client):
    system = {"role": "system", "content": "You answer questions about the weather in Paris, briefly."}
    args = dict(model="tiny-jamba", max_tokens=1)
    client.chat.completions.create(messages=[system, {"role": "user", "content": "hello"}], **args)
    other = client.chat.completions.create(messages=[system, {"role": "user", "content": "the temperature?"}], **args)
    head = ChatFormat(tokenizer).encode([system], add_generation_prompt=False)
    assert other.usage.prompt_tokens_details.cached_tokens >= len(head)


def test_chat_streaming(client):
    args = dict(model="tiny-jamba", messages=MESSAGES, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**args).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="tiny-jamba", messages=MESSAGES, max_tokens=3, temperature=0,
                                       logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-5) for t in content)  # greedy = top


def test_seed_reproducible_and_n_choices(client):
    args = dict(model="tiny-jamba", prompt="hello", max_tokens=8, temperature=1.0, seed=7,
                extra_body={"ignore_eos": True})
    a, b = client.completions.create(**args), client.completions.create(**args)
    assert a.choices[0].text == b.choices[0].text
    r = client.completions.create(n=3, **args)
    assert len(r.choices) == 3 and r.choices[0].text == a.choices[0].text  # choice i uses seed + i


def test_penalties_logit_bias_and_min_p_are_applied(model, tokenizer, client):
    """OpenAI's presence/frequency penalties and logit_bias, vLLM's repetition_penalty and min_p, through the
    official client: the greedy text equals the formulas applied over full forwards of prompt + output."""
    ids = tokenizer.encode("The quick brown fox")
    settings = dict(presence=0.8, frequency=0.6, repetition=1.4, bias={ids[0]: 2.0})
    r = client.completions.create(model="tiny-jamba", prompt=ids, max_tokens=8, temperature=0, presence_penalty=0.8,
                                  frequency_penalty=0.6, logit_bias={str(ids[0]): 2.0},
                                  extra_body={"ignore_eos": True, "repetition_penalty": 1.4})
    out: list[int] = []
    with torch.no_grad():
        for _ in range(8):
            logits = model(torch.tensor([ids + out])).logits[0, -1]
            out.append(int(adjusted_by_formula(logits, ids, out, **settings).argmax()))
    assert r.choices[0].text == tokenizer.decode(out, skip_special_tokens=True)
    assert out != greedy(model, ids, 8)
    forced = ids[1]
    r = client.chat.completions.create(model="tiny-jamba", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=4, temperature=1.0, seed=3, logit_bias={str(forced): 100},
                                       extra_body={"ignore_eos": True, "min_p": 0.5})
    assert r.choices[0].message.content == tokenizer.decode([forced] * 4, skip_special_tokens=True).strip()


def test_generation_config_defaults_fill_what_a_request_leaves_out(model, tokenizer):
    ids = tokenizer.encode("The quick brown fox")
    engine, app = make_app(model, tokenizer, sampling_defaults={"temperature": 0.0, "repetition_penalty": 0.3})
    try:
        with running_server(app) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
            args = dict(model="tiny-jamba", prompt=ids, max_tokens=6)
            defaulted = client.completions.create(extra_body={"ignore_eos": True}, **args).choices[0].text
            plain = client.completions.create(extra_body={"ignore_eos": True, "repetition_penalty": 1.0},
                                              **args).choices[0].text
    finally:
        engine.stop()
    out: list[int] = []
    with torch.no_grad():
        for _ in range(6):
            logits = model(torch.tensor([ids + out])).logits[0, -1]
            out.append(int(adjusted_by_formula(logits, ids, out, repetition=0.3).argmax()))
    assert defaulted == tokenizer.decode(out, skip_special_tokens=True)
    assert plain == tokenizer.decode(greedy(model, ids, 6), skip_special_tokens=True) != defaulted


def test_model_retrieve_tokenize_and_detokenize(server, client, tokenizer):
    url = server[1]
    assert client.models.retrieve("tiny-jamba").id == "tiny-jamba"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    r = httpx.post(url + "/tokenize", json={"prompt": "hello world"}).json()
    assert r["tokens"] == tokenizer.encode("hello world") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 1024
    messages = [{"role": "user", "content": "hi"}]
    r = httpx.post(url + "/tokenize", json={"messages": messages}).json()
    assert r["tokens"] == ChatFormat(tokenizer).encode(messages)
    assert httpx.post(url + "/detokenize", json={"tokens": r["tokens"]}).json() == {
        "prompt": tokenizer.decode(r["tokens"], skip_special_tokens=False)}
    for route, body in [("/tokenize", {"prompt": "a", "messages": messages}), ("/tokenize", {}),
                        ("/detokenize", {"tokens": [99999]}), ("/detokenize", {"tokens": "abc"})]:
        r = httpx.post(url + route, json=body)
        assert r.status_code == 400 and "error" in r.json(), (route, body)


def test_chat_template_kwargs_reach_the_template(tokenizer, client):
    messages = [{"role": "user", "content": "hi"}]
    args = dict(model="tiny-jamba", messages=messages, max_tokens=1)
    plain = client.chat.completions.create(**args).usage.prompt_tokens
    off = client.chat.completions.create(extra_body={"chat_template_kwargs": {"enable_thinking": False}}, **args)
    expected = ChatFormat(tokenizer).encode(messages, template_kwargs={"enable_thinking": False})
    assert off.usage.prompt_tokens == len(expected) > plain == len(ChatFormat(tokenizer).encode(messages))
    with pytest.raises(openai.BadRequestError, match="chat_template_kwargs"):
        client.chat.completions.create(extra_body={"chat_template_kwargs": {"messages": []}}, **args)


def test_stop_token_ids_and_min_tokens_through_the_client(model, tokenizer, client):
    ids = tokenizer.encode("The quick brown fox")
    first = greedy(model, ids, 1)[0]
    args = dict(model="tiny-jamba", prompt=ids, max_tokens=5, temperature=0)
    r = client.completions.create(extra_body={"ignore_eos": True, "stop_token_ids": [first]}, **args)
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("stop", 1)
    r = client.completions.create(extra_body={"ignore_eos": True, "stop_token_ids": [first], "min_tokens": 5}, **args)
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("length", 5)


def test_stop_string_ends_the_choice(client):
    args = dict(model="tiny-jamba", prompt="The quick brown", max_tokens=12, temperature=0,
                extra_body={"ignore_eos": True})
    full = client.completions.create(**args).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    if not stop.strip():
        pytest.skip("the greedy text has no usable stop string")
    r = client.completions.create(stop=[stop], **args)
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, stop=stop, **args))
    assert streamed == r.choices[0].text


@pytest.mark.parametrize("body, param", [
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": "hi", "model": "gpt-4"}, "model"),
    ({"prompt": [[]]}, None),
    ({"prompt": [99999]}, "prompt"),
    ({"prompt": "hi " * 600, "max_tokens": 10}, "prompt"),
    ({"prompt": "hi", "max_tokens": 1023}, "prompt"),
    ({"prompt": "hi", "n": 0}, "n"),
    ({"prompt": "hi", "presence_penalty": 2.5}, "presence_penalty"),
    ({"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "hi", "min_p": 1.5}, "min_p"),
    ({"prompt": "hi", "logit_bias": {"hi": 1}}, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"3": 101}}, "logit_bias.3"),
    ({"prompt": "hi", "logit_bias": {"99999": 1}}, None),
    ({"prompt": "hi", "max_tokens": 2, "min_tokens": 3}, None),
    ({"prompt": "hi", "stop_token_ids": [99999]}, None),
])
def test_invalid_completions_are_400(server, client, body, param):
    r = httpx.post(server[1] + "/v1/completions", json={"model": "tiny-jamba", **body}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert "Traceback" not in r.text
    if param is not None:
        assert error["param"] == param
    assert client.completions.create(model="tiny-jamba", prompt="hi", max_tokens=1).choices  # still serving


def test_bad_json_and_bad_chat_are_400(server):
    url = server[1]
    for raw in (b"{not json", b"[1, 2]", b""):
        r = httpx.post(url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "error" in r.json()
    for body in ({"messages": []}, {"messages": [{"role": "wizard", "content": "x"}]},
                 {"messages": MESSAGES, "logprobs": "yes"}, {"messages": MESSAGES, "top_logprobs": 2}):
        r = httpx.post(url + "/v1/chat/completions", json=body)
        assert r.status_code == 400, body
    r = httpx.get(url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_api_key(model, tokenizer):
    engine, app = make_app(model, tokenizer, api_key="sekrit")
    try:
        with running_server(app) as url:
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
            assert httpx.get(url + "/v1/models").status_code == 401
            good = openai.OpenAI(base_url=url + "/v1", api_key="sekrit", max_retries=0)
            assert good.completions.create(model="tiny-jamba", prompt="hi", max_tokens=1).choices
            assert httpx.get(url + "/health").status_code == 200  # probes need no key
    finally:
        engine.stop()


def test_cors_only_for_the_allowed_origins(model, tokenizer, server):
    preflight = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    plain = httpx.options(server[1] + "/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in plain.headers  # no --allowed-origins: no CORS
    engine, app = make_app(model, tokenizer, allowed_origins=["http://localhost:3000"])
    try:
        with running_server(app) as url:
            r = httpx.options(url + "/v1/chat/completions", headers=preflight)
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
            deleting = {**preflight, "Access-Control-Request-Method": "DELETE"}  # DELETE /v1/responses/{id}
            assert httpx.options(url + "/v1/responses/resp_1", headers=deleting).status_code == 200
            r = httpx.get(url + "/v1/models", headers={"Origin": "http://localhost:3000"})
            assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
            other = httpx.get(url + "/v1/models", headers={"Origin": "http://evil.example"})
            assert "access-control-allow-origin" not in other.headers
    finally:
        engine.stop()


def test_checkpoint_without_chat_template(model, tokenizer):
    engine, app = make_app(model, tokenizer, chat=False)
    try:
        with running_server(app) as url:
            c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.BadRequestError, match="no chat template"):
                c.chat.completions.create(model="tiny-jamba", messages=MESSAGES)
            assert c.completions.create(model="tiny-jamba", prompt="hi", max_tokens=2).choices[0].text is not None
    finally:
        engine.stop()


def test_full_queue_is_429_with_retry_after(model, tokenizer):
    engine, app = make_app(model, tokenizer, max_running=1, max_waiting=1)
    try:
        with running_server(app) as url:
            long = {"model": "tiny-jamba", "prompt": "hi", "max_tokens": 500, "stream": True,
                    "ignore_eos": True}
            with httpx.stream("POST", url + "/v1/completions", json=long, timeout=60) as first:
                lines = first.iter_lines()  # held: a dropped iterator closes the connection
                next(lines)
                assert wait_for(lambda: engine.stats()["running"] == 1)
                with httpx.stream("POST", url + "/v1/completions", json=long, timeout=60) as second:
                    assert wait_for(lambda: engine.stats()["waiting"] == 1)
                    r = httpx.post(url + "/v1/completions", json={**long, "stream": False}, timeout=60)
                    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
                    assert r.json()["error"]["code"] == "rate_limit_exceeded"
                    assert second.status_code == 200
            assert wait_for(lambda: engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0)
    finally:
        engine.stop()


def test_client_disconnect_frees_its_row(server):
    engine, url = server
    body = {"model": "tiny-jamba", "prompt": "hello", "max_tokens": 800, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert engine.stats()["running"] == 1
    assert wait_for(lambda: engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0)
    assert engine.stats()["generated_tokens_total"] < 10_000


def test_16_concurrent_greedy_requests_equal_their_solo_outputs(client):
    prompts = [f"hello world {i} " * (1 + i % 3) for i in range(16)]
    args = dict(model="tiny-jamba", max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    solo = [client.completions.create(prompt=p, **args).choices[0].text for p in prompts]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda p: client.completions.create(prompt=p, **args).choices[0].text, prompts))
    assert together == solo


def test_reuse_on_and_off_give_identical_outputs(model, tokenizer, server, client):
    engine, app = make_app(model, tokenizer, reuse=False)
    try:
        with running_server(app) as url:
            off = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            messages, cached = list(MESSAGES), []
            for turn in ("what is the weather", "and in Paris"):
                messages.append({"role": "user", "content": turn})
                args = dict(model="tiny-jamba", messages=messages, max_tokens=5, temperature=0,
                            extra_body={"ignore_eos": True})
                a, b = client.chat.completions.create(**args), off.chat.completions.create(**args)
                assert a.choices[0].message.content == b.choices[0].message.content
                assert b.usage.prompt_tokens_details.cached_tokens == 0
                cached.append(a.usage.prompt_tokens_details.cached_tokens)
                messages.append({"role": "assistant", "content": a.choices[0].message.content})
            assert cached[-1] > len(ChatFormat(tokenizer).encode(MESSAGES)) // 2  # the history was not re-read
    finally:
        engine.stop()


def _load(url: str, requests: int, clients: int, seed: int = 0) -> list[int]:
    """`requests` random completions from `clients` threads; returns the HTTP statuses."""
    rng = random.Random(seed)
    bodies = [{"model": "tiny-jamba", "prompt": [rng.randrange(3, 300) for _ in range(rng.randint(1, 60))],
               "max_tokens": rng.randint(1, 6), "temperature": rng.choice([0, 0.8]),
               "stream": rng.random() < 0.3} for _ in range(requests)]
    with httpx.Client(timeout=120) as http, ThreadPoolExecutor(clients) as pool:
        return list(pool.map(lambda b: http.post(url + "/v1/completions", json=b).status_code, bodies))


def test_load_200_requests_from_32_clients_leaves_nothing_behind(model, tokenizer):
    engine, app = make_app(model, tokenizer, max_running=16, max_waiting=256, store_bytes=1 << 20)
    try:
        with running_server(app) as url:
            assert set(_load(url, 200, 32, seed=1)) == {200}
            assert wait_for(lambda: engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0)
            stats = engine.stats()
            assert stats["requests_finished_total"] == 200
            assert stats["batch_cache_bytes"] == 0 and stats["store_bytes"] <= 1 << 20
    finally:
        engine.stop()


# ---------------------------------------------------------------------- tool calls
class ScriptedEngine:
    """Follows the Engine contract but emits a fixed token sequence: the tiny random model never writes a tool
    call, so this drives the server's tool-call path end to end (HTTP, parsing, streaming) with a known output."""

    kv_budget = None

    def __init__(self, script: list[int]) -> None:
        self.script, self.next_id = script, 0

    def submit(self, prompt, params, on_event):
        rid, self.next_id = self.next_id, self.next_id + 1

        def run():
            for t in self.script:
                on_event(TokenEvent(rid, t, None, None))
            on_event(FinishEvent(rid, "stop", len(prompt), len(self.script), 0, None))
        threading.Thread(target=run, daemon=True).start()
        return rid

    def cancel(self, request_id):
        pass

    def is_running(self):
        return True

    def stats(self):
        return {"running": 0, "waiting": 0}


def test_tool_calls_and_reasoning(tokenizer):
    text = ('<think>the user wants weather</think>Let me check.\n<tool_call>{"name": "get_weather", '
            '"arguments": {"city": "Paris"}}</tool_call>')
    script = tokenizer.encode(text, add_special_tokens=False) + tokenizer.eos_token_ids[:1]
    config = ServerConfig(model_name="tiny-jamba", max_context=1024, vocab_size=tokenizer.vocab_size)
    app = create_app(ScriptedEngine(script), tokenizer, config, ChatFormat(tokenizer))
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    with running_server(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        args = dict(model="tiny-jamba", messages=[{"role": "user", "content": "weather in Paris?"}], tools=tools)
        r = c.chat.completions.create(tool_choice="auto", **args)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content == "Let me check."
        assert choice.message.model_extra["reasoning_content"] == "the user wants weather"
        call = choice.message.tool_calls[0]
        assert call.type == "function" and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris"}

        chunks = list(c.chat.completions.create(stream=True, **args))
        deltas = [ch.choices[0].delta for ch in chunks]
        assert "".join(d.content or "" for d in deltas) == "Let me check."
        assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == "the user wants weather"
        calls = [tc for d in deltas for tc in (d.tool_calls or [])]  # the start, then fragments of the arguments
        assert calls[0].function.name == "get_weather" and calls[0].id and {tc.index for tc in calls} == {0}
        assert "".join(tc.function.arguments for tc in calls) == call.function.arguments
        assert len(calls) > 2 and chunks[-1].choices[0].finish_reason == "tool_calls"

        r = c.chat.completions.create(tool_choice="none", **args)  # no tool calls: the markup stays text
        assert r.choices[0].finish_reason == "stop" and "<tool_call>" in r.choices[0].message.content


STREAMED_CALLS = [
    'On it.\n<tool_call>{"arguments": {"path": "a}.txt", "text": "<tool_call>{\\"x\\": [1]}</tool_call>"}, '
    '"name": "write"}</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", '
    '"days": [1, {"n": null}]}}\n</tool_call>',
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"',  # cut: the text is content
]


@pytest.mark.parametrize("text", STREAMED_CALLS)
def test_tool_calls_stream_as_they_are_written(tokenizer, text):
    """Streamed chat deltas and Responses events, one token at a time, assemble (by the SDK's own accumulators) to
    the non-streamed reply: the same content, calls, names, arguments, finish reason; one id per call throughout."""
    script = tokenizer.encode(text, add_special_tokens=False) + tokenizer.eos_token_ids[:1]
    config = ServerConfig(model_name="tiny-jamba", max_context=1024, vocab_size=tokenizer.vocab_size)
    app = create_app(ScriptedEngine(script), tokenizer, config, ChatFormat(tokenizer))
    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
             for n in ("write", "get_weather")]
    with running_server(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        args = dict(model="tiny-jamba", messages=[{"role": "user", "content": "go"}], tools=tools)
        whole = c.chat.completions.create(**args).choices[0]
        state = ChatCompletionStreamState()
        chunks = list(c.chat.completions.create(stream=True, **args))
        for chunk in chunks:
            state.handle_chunk(chunk)
        streamed = state.get_final_completion().choices[0]
        assert streamed.finish_reason == whole.finish_reason
        assert (streamed.message.content or "") == (whole.message.content or "")
        shape = [(t.function.name, t.function.arguments) for t in whole.message.tool_calls or []]
        got = [(t.function.name, t.function.arguments) for t in streamed.message.tool_calls or []]
        if not shape:  # a cut call: started as it came, then the whole text came as content (as not streamed)
            assert got == [("get_weather", '{"city": "Paris"')] and whole.finish_reason == "stop"
        else:
            assert got == shape
        if shape:
            assert whole.finish_reason == "tool_calls" and len(shape) == 2
            assert json.loads(shape[0][1])["text"] == '<tool_call>{"x": [1]}</tool_call>'
            fragments = [t for ch in chunks for t in (ch.choices[0].delta.tool_calls if ch.choices else None) or []]
            assert len(fragments) > 6 and [t.id for t in fragments if t.id] == [
                t.id for t in streamed.message.tool_calls]
        else:
            assert whole.message.content == text
        # the Responses API: function_call items added, their arguments streamed, closed
        request = dict(model="tiny-jamba", input="go", tools=[{"type": "function", **t["function"]} for t in tools])
        plain = c.responses.create(**request)
        events = list(c.responses.create(stream=True, **request))
        final = events[-1].response
        summary = [(i.type, getattr(i, "name", None), getattr(i, "arguments", None)) for i in final.output]
        kept = [x for x, i in zip(summary, final.output) if i.type != "function_call" or i.status != "incomplete"]
        assert kept == [(i.type, getattr(i, "name", None), getattr(i, "arguments", None)) for i in plain.output]
        assert final.output_text == plain.output_text
        if not shape:  # the cut call: its item closed as incomplete, the text a message after it
            assert [(i.type, i.status) for i in final.output] == [("function_call", "incomplete"),
                                                                    ("message", "completed")]
        for item in (i for i in final.output if i.type == "function_call"):
            mine = [e for e in events if item.id in (getattr(e, "item_id", None),
                                                     getattr(getattr(e, "item", None), "id", None))]
            assert "".join(e.delta for e in mine if e.type == "response.function_call_arguments.delta") == \
                item.arguments
            ends = ["response.function_call_arguments.done"] * (item.status == "completed")
            assert [e.type for e in mine][-1 - len(ends):] == ends + ["response.output_item.done"]
            assert mine[0].type == "response.output_item.added" and mine[0].item.name == item.name
        assert [e.sequence_number for e in events] == list(range(len(events)))
        with c.responses.stream(**request) as responses_stream:  # the SDK's accumulator: arguments joined by item
            for _ in responses_stream:
                pass
            snapshot = responses_stream.get_final_response()
        assert [(i.type, getattr(i, "arguments", None)) for i in snapshot.output] == [(t, a) for t, _, a in summary]
        raw = httpx.post(url + "/v1/responses", json={**request, "stream": True}, timeout=60).text
        lines = [line[6:] for line in raw.split("\n") if line.startswith("data: ") and line != "data: [DONE]"]
        assert [TypeAdapter(ResponseStreamEvent).validate_json(line).type for line in lines] == [e.type for e in events]


# ---------------------------------------------------------------------- the command and the benchmark
def test_serve_command(checkpoint):
    """`openjamba serve` as a user runs it: a subprocess on a free port, stopped by the test."""
    proc, port = serve_process(checkpoint, "--api-key", "k", "--max-running", "4", "--log-level", "warning")
    try:
        assert proc.poll() is None
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["tiny-jamba"]
        assert c.chat.completions.create(model="tiny-jamba", messages=MESSAGES, max_tokens=3).choices
        c.close()  # no keep-alive connection for the server to wait on at shutdown
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "openjamba serve: tiny-jamba on http://127.0.0.1" in out


def test_serve_command_ends_streams_in_order_when_stopped(checkpoint):
    """SIGTERM while a stream runs: with --shutdown-timeout 0 the engine aborts it at once, and the client gets its
    last chunk (finish_reason "abort") and [DONE] before the server exits cleanly, instead of a dropped connection."""
    proc, port = serve_process(checkpoint, "--log-level", "warning", "--shutdown-timeout", "0")
    try:
        assert proc.poll() is None
        counted = httpx.post(f"http://127.0.0.1:{port}/tokenize", json={"prompt": "a"}, timeout=10).json()
        body = {"model": "tiny-jamba", "prompt": "a", "max_tokens": counted["max_model_len"] - counted["count"],
                "ignore_eos": True, "stream": True}  # longer than the test: it ends by the abort
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
    assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "abort"
    assert proc.returncode == 0 and "Traceback" not in out, out


def test_bench_serve_smoke(model):
    from openjamba.bench.serve import format_serve_report, run_serve_bench

    report = run_serve_bench(model, "tiny", streams=(1, 2), prefix=16, suffix=4, output=4, history=48, new=4,
                             long_prompt=40, prefill_chunk=16)
    rows = report["streams"]
    assert [(r["streams"], r["reuse"]) for r in rows] == [(1, True), (2, True), (1, False), (2, False)]
    assert all(r["output_tok_s"] > 0 and r["ttft_p50_ms"] > 0 for r in rows)
    assert rows[1]["cached_tokens"] >= 2 * 16 and rows[3]["cached_tokens"] == 0  # the shared prefix, reuse on only
    chat = report["chat"]
    assert chat["reuse_cached_tokens"] >= 48 and chat["no_reuse_cached_tokens"] == 0
    assert report["interference"]["gaps_during_prefill"] > 0
    assert set(report["targets"]) == {"chat_ttft_reuse", "interference_gap"}  # no 16-stream run here
    assert "targets:" in format_serve_report(report)
    json.dumps(report)
    sampled = run_serve_bench(model, "tiny", phases=("streams",), streams=(2,), prefix=16, suffix=4, output=4,
                              prefill_chunk=16, temperature=0.8, top_p=0.9)
    assert all(r["output_tok_s"] > 0 for r in sampled["streams"])
    assert "(sampled at temperature 0.8, top-p 0.9)" in format_serve_report(sampled)


# ---------------------------------------------------------------------- incremental decoding
@pytest.mark.parametrize("kind", ["byte-level BPE", "jamba 1.6 sentencepiece", "jamba2 tokenizer.json"])
def test_text_decoded_a_few_tokens_at_a_time_equals_decoding_everything_again(kind, tmp_path):
    """Choice decodes only the tokens since the last complete text (after an anchor token): the text streamed
    equals what decoding all ids again for every token gives (random ids: byte fallback and skipped special tokens
    included, where bytes that are no UTF-8 decode differently without context) and, for real text, its decode."""
    from openjamba.serve.api import Choice

    from .conftest import byte_level_tokenizer
    from .serve_helpers import CORPUS
    from .tokenizer_fixtures import write_jamba2, write_jamba16

    if kind == "byte-level BPE":
        tok = byte_level_tokenizer(CORPUS, vocab_size=400)
    else:
        tok = load_tokenizer((write_jamba16 if "1.6" in kind else write_jamba2)(tmp_path / "t"))
    rng = random.Random(0)
    for _ in range(60):
        ids = [rng.randrange(tok.vocab_size) for _k in range(rng.randrange(1, 40))]
        for skip in (True, False):
            def decode(x, skip=skip):
                return tok.decode(x, skip_special_tokens=skip)
            choice = Choice(0, 0, decode, [], frozenset(), anchor=tok.anchor_token())
            streamed = "".join(choice.add(TokenEvent(0, t, None, None)) for t in ids)
            streamed += choice.finish(FinishEvent(0, "length", 1, len(ids), 0))
            former, emitted = "", 0  # every token: all ids decoded again, the text sent unless it ends mid-character
            for k in range(1, len(ids) + 1):
                if not (full := decode(ids[:k])).endswith("\ufffd"):
                    former, emitted = former + full[emitted:], len(full)
            assert streamed == former + decode(ids)[emitted:], ids
            assert choice.text == decode(ids)
    for text in CORPUS[:4] + ["héllo wörld — 東京 ☃ 🎉 don't stop .  ,x", "a\n\nb  c"]:
        ids = tok.encode(text, add_special_tokens=False)
        choice = Choice(0, 0, tok.decode, [], frozenset(), anchor=tok.anchor_token())
        assert "".join(choice.add(TokenEvent(0, t, None, None)) for t in ids) == tok.decode(ids), text


def test_periodic_stats_line_and_logger(caplog):
    """The engine's log line reports the work since the last one and stays quiet while the server idles."""
    import logging
    import time

    from openjamba.serve.metrics import StatsLogger, stats_line

    idle = dict(running=0, prefilling=0, waiting=0, prompt_tokens_total=100, cached_prompt_tokens_total=60,
                generated_tokens_total=500, batch_cache_bytes=0, store_bytes=3 * 2**20, preemptions_total=4,
                kv_cache_bytes=0, kv_cache_max_bytes=0)
    busy = {**idle, "running": 2, "waiting": 1, "prompt_tokens_total": 300, "cached_prompt_tokens_total": 160,
            "generated_tokens_total": 900, "batch_cache_bytes": 2**19, "kv_cache_bytes": 2**18}
    assert stats_line(idle, idle, 10.0) is None
    assert stats_line(idle, busy, 10.0) == ("engine: 2 running, 0 prefilling, 1 waiting; prompt 10.0 tokens/s read, "
                                            "100 of 200 reused; generation 40.0 tokens/s; batch 0.5 MiB (K/V 0.2 "
                                            "MiB), stored states 3.0 MiB")
    bounded = {**busy, "preemptions_total": 7, "kv_cache_max_bytes": 2**21}
    assert stats_line(idle, bounded, 10.0) == ("engine: 2 running, 0 prefilling, 1 waiting, 3 preempted; prompt "
                                               "10.0 tokens/s read, 100 of 200 reused; generation 40.0 tokens/s; "
                                               "batch 0.5 MiB (K/V 0.2 of 2.0 MiB), stored states 3.0 MiB")
    readings = iter([idle, idle, busy])
    with caplog.at_level(logging.INFO, logger="openjamba.serve"):
        logger = StatsLogger(lambda: next(readings, busy), interval=0.01).start()
        deadline = time.monotonic() + 10
        while not any("engine: 2 running" in r.message for r in caplog.records) and time.monotonic() < deadline:
            time.sleep(0.01)
        logger.stop()
    lines = [r.message for r in caplog.records if r.message.startswith("engine:")]
    assert lines and lines[0].startswith("engine: 2 running") and "generation" in lines[0]
