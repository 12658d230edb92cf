"""The engine's K/V bound (`kv_cache_bytes`, `openjamba serve --kv-cache-memory`): requests wait rather than pass it,
rows preempted as the batch grows resume from their exact state, and a request that could never fit is a 400."""

from __future__ import annotations

import httpx
import pytest
import torch

from openjamba import JambaForCausalLM
from openjamba.serve.engine import Engine, SamplingParams
from openjamba.serve.kv_budget import KVBudget
from openjamba.tokenizer import load_tokenizer

from .conftest import random_model
from .serve_helpers import build_checkpoint, running_server
from .test_engine import Collector, prompts_of, solo_generate

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def model():
    return random_model()


def bytes_for(model, tokens: int) -> int:
    """The budget of `tokens` tokens of the batch's grid, in bytes."""
    return tokens * KVBudget(model, 1 << 30).bytes_per_token


def run_watched(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]):
    """Submit all before the loop starts (so the schedule is the same on every run), checking after every iteration
    that the K/V held and the grid in flight are within the budget. (tokens per request, largest K/V seen)."""
    budget, peak = engine.kv_budget, [0]

    def check() -> None:
        held = engine.kv_cache_bytes()
        rows, columns = engine._grid()
        assert held <= budget.max_bytes and (rows == 0 or rows * columns <= budget.tokens), (held, rows, columns)
        peak[0] = max(peak[0], held)

    engine.add_step_listener(check)
    sink = Collector()
    ids = [engine.submit(p, sp, sink) for p, sp in zip(prompts, params)]
    with engine:
        sink.wait(ids)
        stats = engine.stats()
    assert stats["running"] == stats["prefilling"] == stats["waiting"] == 0
    assert stats["batch_cache_bytes"] == stats["kv_cache_bytes"] == 0 and engine._batch is None
    assert all(sink.finish[i].reason == "length" for i in ids)
    return [sink.tokens[i] for i in ids], peak[0], stats


# Two requests are admitted together (2 x (40 + 1) <= 100 tokens); as they grow a column a step, the grid passes the
# bound after 9 steps, so the later one must be preempted, and resumes once the first has finished (40 + 23 <= 100).
LENGTHS, TOKENS = [40, 6, 13, 3, 25, 9], 100


def test_mixed_requests_within_a_small_budget_equal_each_alone(model):
    prompts = prompts_of(LENGTHS, model.config.vocab_size, seed=21)
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    engine = Engine(model, prefill_chunk=16, kv_cache_bytes=bytes_for(model, TOKENS))
    tokens, peak, stats = run_watched(engine, prompts, [greedy] * len(prompts))
    assert stats["preemptions_total"] > 0 and 0 < peak <= stats["kv_cache_max_bytes"]
    for prompt, got in zip(prompts, tokens):
        assert got == solo_generate(model, prompt, MAX_TOKENS, chunk=16)


def test_seeded_sampling_is_the_same_with_and_without_preemption(model):
    prompts = prompts_of(LENGTHS, model.config.vocab_size, seed=22)
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, top_k=30, seed=7 + i, ignore_eos=True)
              for i in range(len(prompts))]
    bounded, _, stats = run_watched(Engine(model, kv_cache_bytes=bytes_for(model, TOKENS)), prompts, params)
    unbounded, _, _ = run_watched(Engine(model, kv_cache_bytes=bytes_for(model, 10**6)), prompts, params)
    assert stats["preemptions_total"] > 0 and bounded == unbounded


@pytest.mark.parametrize("reuse", [True, False])
def test_a_preempted_request_whose_state_was_not_kept_rereads_its_tokens(model, monkeypatch, reuse):
    """With reuse, from the prompt's stored state and the output re-read; without, from nothing."""
    prompts = prompts_of(LENGTHS[:2], model.config.vocab_size, seed=23)
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    engine = Engine(model, reuse=reuse, kv_cache_bytes=bytes_for(model, TOKENS))
    monkeypatch.setattr(engine, "_state_of", lambda cache, row: None)
    tokens, _, stats = run_watched(engine, prompts, [greedy] * len(prompts))
    assert stats["preemptions_total"] > 0
    for prompt, got in zip(prompts, tokens):
        assert got == solo_generate(model, prompt, MAX_TOKENS, chunk=512)


def test_a_request_that_could_never_fit_is_refused_and_one_that_just_fits_runs(model):
    engine = Engine(model, kv_cache_bytes=bytes_for(model, 50))
    with pytest.raises(ValueError, match="K/V cache bound of 50 tokens"):
        engine.submit(list(range(3, 33)), SamplingParams(max_tokens=22), print)  # 30 + 21 > 50
    with pytest.raises(ValueError, match="K/V cache bound"):
        engine.submit(list(range(3, 53)), SamplingParams(max_tokens=1), print)  # its prompt's cache: 50 + 1
    prompt = prompts_of([30], model.config.vocab_size, seed=24)[0]
    greedy = SamplingParams(max_tokens=21, temperature=0, ignore_eos=True)
    assert run_watched(engine, [prompt], [greedy])[0][0] == solo_generate(model, prompt, 21, chunk=512)


def test_the_server_answers_a_request_over_the_bound_with_a_400_and_counts_preemptions(tmp_path):
    checkpoint = build_checkpoint(tmp_path / "tiny-jamba")
    tiny = JambaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(checkpoint)
    from openjamba.serve.api import ServerConfig, create_app
    from openjamba.serve.templating import ChatFormat

    engine = Engine(tiny, kv_cache_bytes=bytes_for(tiny, 64), eos_token_ids=tokenizer.eos_token_ids)
    config = ServerConfig(model_name="tiny-jamba", max_context=1024, vocab_size=tiny.config.vocab_size)
    with engine, running_server(create_app(engine, tokenizer, config, ChatFormat.of(tokenizer))) as url:
        r = httpx.post(url + "/v1/completions", json={"model": "tiny-jamba", "prompt": "hello world", "max_tokens": 80})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and "K/V cache bound of 64 tokens" in error["message"]
        # without max_tokens a chat gets the rest of what the bound holds, not of the context (then a 400)
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                          "ignore_eos": True}, timeout=60)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] == 64 + 1
        text = httpx.get(url + "/metrics").text
    assert "# TYPE openjamba_preemptions_total counter\nopenjamba_preemptions_total 0" in text
    assert f"openjamba_kv_cache_max_bytes {bytes_for(tiny, 64)}" in text


def test_the_flag_and_its_default_on_cuda(monkeypatch, capsys):
    from openjamba.cli import build_parser
    from openjamba.serve.kv_budget import default_kv_cache_bytes

    parse = build_parser().parse_args
    assert parse(["serve", "--model", "m"]).kv_cache_memory == "auto"
    assert parse(["serve", "--model", "m", "--kv-cache-memory", "16GiB"]).kv_cache_memory == 16 * 2**30
    assert parse(["serve", "--model", "m", "--kv-cache-memory-bytes", "2e9"]).kv_cache_memory == 2 * 10**9
    assert parse(["serve", "--model", "m", "--kv-cache-memory", "none"]).kv_cache_memory is None
    with pytest.raises(SystemExit):
        parse(["serve", "--model", "m", "--kv-cache-memory", "lots"])
    assert "--kv-cache-memory" in capsys.readouterr().err
    assert default_kv_cache_bytes("cpu", 2**30) is None  # the host's memory: the operator's to bound
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20 * 2**30, 80 * 2**30))
    assert default_kv_cache_bytes("cuda", 2**30) == int(0.8 * 20 * 2**30) - 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**30, 80 * 2**30))
    assert default_kv_cache_bytes("cuda:0", 2**30) is None  # nothing left: unbounded, with a warning


def test_a_preempted_request_cancelled_while_it_waits_leaves_nothing(model):
    prompts = prompts_of(LENGTHS[:2], model.config.vocab_size, seed=25)
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    engine = Engine(model, kv_cache_bytes=bytes_for(model, TOKENS))
    cancelled: list[int] = []

    def cancel_the_preempted() -> None:
        if engine.stats()["preemptions_total"] and not cancelled:
            cancelled.append(engine._waiting[0].id)
            engine.cancel(cancelled[0])

    engine.add_step_listener(cancel_the_preempted)
    sink = Collector()
    ids = [engine.submit(p, greedy, sink) for p in prompts]
    with engine:
        sink.wait(ids)
        stats = engine.stats()
    assert cancelled == [ids[1]] and sink.finish[ids[1]].reason == "cancelled"
    assert 0 < sink.finish[ids[1]].completion_tokens < MAX_TOKENS
    assert sink.tokens[ids[0]] == solo_generate(model, prompts[0], MAX_TOKENS, chunk=512)
    assert stats["running"] == stats["waiting"] == stats["kv_cache_bytes"] == 0


def test_serve_refuses_a_bound_that_holds_no_request_and_warns_below_the_context(model, caplog):
    from openjamba.serve.server import check_kv_bound

    with pytest.raises(SystemExit, match="holds? 1 tokens .* give a size with its unit"):
        check_kv_bound(KVBudget(model, bytes_for(model, 1)), 1024)  # `--kv-cache-memory 20` is 20 bytes, as vLLM's
    check_kv_bound(KVBudget(model, bytes_for(model, 2048)), 1024)
    assert not caplog.records
    check_kv_bound(KVBudget(model, bytes_for(model, 512)), 1024)
    assert "holds 512 tokens of K/V, less than the context (1,024)" in caplog.text
