"""The serving engine against `generate` and against itself run alone: batching, reuse, cancel, admission, errors."""

from __future__ import annotations

import platform
import threading

import pytest
import torch

from openjamba.runtime import hold_freed_memory, on_fresh_thread
from openjamba.serve.engine import (
    Engine,
    EngineFull,
    FinishEvent,
    SamplingParams,
    TokenEvent,
)

from .conftest import random_model
from .test_sampling import adjusted_by_formula

TIMEOUT = 60  # seconds any test waits for the engine (a hang fails instead of blocking the suite)


class Collector:
    """Events of many requests, in the order the engine sent them."""

    def __init__(self) -> None:
        self.order: list[tuple[str, int]] = []  # ("token" | "finish", request id) and marks added by tests
        self.tokens: dict[int, list[int]] = {}
        self.finish: dict[int, FinishEvent] = {}
        self.done = threading.Condition()

    def __call__(self, event) -> None:
        with self.done:
            if isinstance(event, TokenEvent):
                self.tokens.setdefault(event.request_id, []).append(event.token_id)
                self.order.append(("token", event.request_id))
            else:
                self.finish[event.request_id] = event
                self.order.append(("finish", event.request_id))
            self.done.notify_all()

    def wait(self, ids: list[int]) -> None:
        with self.done:
            assert self.done.wait_for(lambda: all(i in self.finish for i in ids), TIMEOUT), "engine timed out"


def run(engine: Engine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]):
    """Submit all at once; (tokens per request, finish events) in submission order."""
    sink = Collector()
    params = params if isinstance(params, list) else [params] * len(prompts)
    ids = [engine.submit(p, sp, sink) for p, sp in zip(prompts, params)]
    sink.wait(ids)
    return [sink.tokens.get(i, []) for i in ids], [sink.finish[i] for i in ids]


def prompts_of(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return random_model()


def solo_generate(model, prompt: list[int], max_tokens: int, chunk: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, eos_token_id=[], prefill_chunk_size=chunk)
    return out[0, len(prompt):].tolist()


def test_greedy_outputs_equal_generate(model):
    prompts = prompts_of([5, 23, 1, 40], model.config.vocab_size)
    with Engine(model, prefill_chunk=16) as engine:
        tokens, finishes = run(engine, prompts, GREEDY)
    for prompt, got, fin in zip(prompts, tokens, finishes):
        assert got == solo_generate(model, prompt, 8, chunk=16)
        assert (fin.reason, fin.prompt_tokens, fin.completion_tokens) == ("length", len(prompt), 8)


def test_prompts_arriving_together_are_prefilled_in_one_forward_and_equal_generate(model):
    prompts = prompts_of([4, 17, 9, 30, 1, 12], model.config.vocab_size, seed=12)
    engine = Engine(model, reuse=False)
    sink = Collector()
    ids = [engine.submit(p, GREEDY, sink) for p in prompts]  # queued before the loop starts: one iteration sees all
    shapes = []
    forward = model.forward
    model.forward = lambda input_ids, *a, **k: (shapes.append(tuple(input_ids.shape)), forward(input_ids, *a, **k))[1]
    try:
        with engine:
            sink.wait(ids)
    finally:
        del model.forward
    assert shapes[0] == (6, 30)  # every prompt in one left-padded forward
    for prompt, i in zip(prompts, ids):
        assert sink.tokens[i] == solo_generate(model, prompt, 8, chunk=512)


def test_prompts_resumed_from_stored_states_with_as_many_tokens_left_share_one_forward(model):
    """Requests extending stored states (a shared system prompt, here two of its lengths) by the same number of
    tokens are prefilled in one forward of their joined caches, and equal `generate`."""
    vocab = model.config.vocab_size
    system, more = prompts_of([20, 6], vocab, seed=18)
    suffixes = prompts_of([7, 7, 7], vocab, seed=19)
    prompts = [system + suffixes[0], system + suffixes[1], system + more + suffixes[2]]
    sink = Collector()
    shapes = []
    forward = model.forward
    model.forward = lambda input_ids, *a, **k: (shapes.append(tuple(input_ids.shape)), forward(input_ids, *a, **k))[1]
    try:
        with Engine(model) as engine:
            for stored in (system, system + more):
                sink.wait([engine.submit(stored, SamplingParams(max_tokens=1, temperature=0), sink)])
            shapes.clear()
            with engine._lock:  # all three queued before the loop looks: one iteration admits them together
                ids = [engine.submit(p, GREEDY, sink) for p in prompts]
            sink.wait(ids)
    finally:
        del model.forward
    assert shapes[0] == (3, 7)  # the three resumed prompts' 7 new tokens each, in one forward
    assert [sink.finish[i].cached_tokens for i in ids] == [20, 20, 26]
    for prompt, i in zip(prompts, ids):
        assert sink.tokens[i] == solo_generate(model, prompt, 8, chunk=512)


def test_32_concurrent_greedy_requests_equal_each_alone(model):
    prompts = prompts_of([3 + 3 * i for i in range(32)], model.config.vocab_size, seed=1)
    with Engine(model, prefill_chunk=32, reuse=False) as engine:
        together, _ = run(engine, prompts, GREEDY)
        alone = [run(engine, [p], GREEDY)[0][0] for p in prompts]
        assert engine.stats()["running"] == 0
    assert together == alone
    assert together[5] == solo_generate(model, prompts[5], 8, chunk=32)


def test_penalised_greedy_requests_equal_a_plain_loop_beside_plain_ones(model):
    """Penalties and logit_bias against their formulas over full forwards of prompt + output, with no cache."""
    prompts = prompts_of([6, 13], model.config.vocab_size, seed=3)
    settings = dict(presence=1.0, frequency=0.5, repetition=1.3, bias={5: 3.0})
    penalised = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, presence_penalty=1.0,
                               frequency_penalty=0.5, repetition_penalty=1.3, logit_bias={5: 3.0})
    with Engine(model, prefill_chunk=8) as engine:
        tokens, _ = run(engine, prompts + prompts[:1], [penalised, penalised, GREEDY])
    for prompt, got in zip(prompts, tokens):
        out: list[int] = []
        with torch.no_grad():
            for _ in range(10):
                logits = model(torch.tensor([prompt + out])).logits[0, -1]
                out.append(int(adjusted_by_formula(logits, prompt, out, **settings).argmax()))
        assert got == out
    assert tokens[2] == solo_generate(model, prompts[0], 8, chunk=8)
    assert tokens[0] != tokens[2][:len(tokens[0])]  # the penalties changed the output


def test_stop_token_ids_end_a_request_and_min_tokens_holds_them_back(model):
    prompt = prompts_of([7], model.config.vocab_size, seed=4)[0]
    first = solo_generate(model, prompt, 1, chunk=8)[0]
    stop_at_once = SamplingParams(max_tokens=6, temperature=0, stop_token_ids=[first], ignore_eos=True)
    held = SamplingParams(max_tokens=6, temperature=0, stop_token_ids=[first], ignore_eos=True, min_tokens=3)
    with Engine(model, prefill_chunk=8) as engine:
        (once, later), (fin_once, fin_later) = run(engine, [prompt, prompt], [stop_at_once, held])
    assert once == [first] and fin_once.reason == "stop"
    assert first not in later[:3] and len(later) >= 3


def test_identical_prompts_arriving_together_are_prefilled_once(model):
    """The n choices of one prompt: the first is prefilled, the others start from its stored state (every prompt
    token reused) with the same greedy output; with reuse off each is read in full."""
    prompt = prompts_of([40], model.config.vocab_size, seed=5)[0]
    for reuse in (True, False):
        with Engine(model, prefill_chunk=16, reuse=reuse) as engine:
            tokens, finishes = run(engine, [prompt] * 4, GREEDY)
        assert all(t == tokens[0] for t in tokens) and tokens[0] == solo_generate(model, prompt, 8, chunk=16)
        cached = sorted(f.cached_tokens for f in finishes)
        assert cached == ([0, 40, 40, 40] if reuse else [0, 0, 0, 0])


def test_seeded_sampling_is_reproducible_whatever_else_runs(model):
    prompts = prompts_of([6, 11, 9], model.config.vocab_size, seed=2)
    seeded = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=20, seed=1234, ignore_eos=True)
    other = SamplingParams(max_tokens=12, temperature=1.3, ignore_eos=True)
    with Engine(model) as engine:
        alone = run(engine, [prompts[0]], seeded)[0][0]
        mixed = run(engine, prompts, [seeded, other, GREEDY])[0][0]
        reseeded = run(engine, [prompts[0]], SamplingParams(**{**seeded.__dict__, "seed": 99}))[0][0]
    assert mixed == alone
    assert reseeded != alone  # the seed matters (10 tokens from 97: a collision is vanishingly unlikely)


def test_an_engine_seed_makes_unseeded_sampling_repeat_on_a_fresh_engine(model):
    """Engine(seed=S) (serve --seed): requests without a seed sample the same tokens on a fresh engine given them in
    the same order; without it, at random."""
    prompts = prompts_of([6, 9], model.config.vocab_size, seed=4)
    unseeded = SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True)

    def sampled(seed):
        with Engine(model, seed=seed) as engine:
            return [run(engine, [prompt], unseeded)[0][0] for prompt in prompts]

    first = sampled(3)
    assert sampled(3) == first
    assert sampled(None) != first and sampled(4) != first  # 20 tokens from 97: a collision is vanishingly unlikely


def test_eos_and_stop_tokens_finish_with_reason_stop(model):
    prompt = prompts_of([7], model.config.vocab_size, seed=3)[0]
    free = solo_generate(model, prompt, 12, chunk=512)
    new = [i for i in range(1, 12) if free[i] not in free[:i]]  # tokens seen for the first time there
    assert len(new) >= 2
    with Engine(model, eos_token_ids=[free[new[1]]]) as engine:
        (tokens,), (fin,) = run(engine, [prompt], SamplingParams(max_tokens=12, temperature=0))
        assert tokens == free[:new[1] + 1] and fin.reason == "stop"  # the stop token is sent, then the finish
        (tokens,), (fin,) = run(engine, [prompt], SamplingParams(max_tokens=12, temperature=0,
                                                                 stop_token_ids=[free[new[0]]], ignore_eos=True))
        assert tokens == free[:new[0] + 1] and fin.reason == "stop"


def test_reuse_on_and_off_give_identical_outputs_and_chat_turns_hit(model):
    vocab = model.config.vocab_size
    system, user1, user2, user3 = prompts_of([30, 7, 9, 5], vocab, seed=4)
    results = {}
    for reuse in (False, True):
        with Engine(model, prefill_chunk=8, reuse=reuse) as engine:
            (out1,), (fin1,) = run(engine, [system + user1], GREEDY)
            turn2 = system + user1 + out1 + user2  # the next chat turn: history + reply + new message
            (out2,), (fin2,) = run(engine, [turn2], GREEDY)
            (out3,), (fin3,) = run(engine, [system + user3], GREEDY)  # shares only the system prompt
            (out4,), (fin4,) = run(engine, [system + user2], GREEDY)  # shares it too: now stored at the boundary
            (out5,), (fin5,) = run(engine, [system + user1], GREEDY)  # the very same prompt again
            stats = engine.stats()
        results[reuse] = [out1, out2, out3, out4, out5], [fin1, fin2, fin3, fin4, fin5]
        assert stats["store_hits_total"] == (3 if reuse else 0)
        assert stats["cached_prompt_tokens_total"] == sum(f.cached_tokens for f in results[reuse][1])
    assert results[True][0] == results[False][0]
    assert all(f.cached_tokens == 0 for f in results[False][1])
    fin1, fin2, fin3, fin4, fin5 = results[True][1]
    assert fin1.cached_tokens == 0
    assert fin2.cached_tokens == len(system + user1) + 8 - 1  # all of turn 1 but its last token (not yet fed)
    assert fin3.cached_tokens == 0  # the first to share the system prompt stores the state where it departs...
    assert fin4.cached_tokens >= len(system)  # ...so the next one starts there
    assert fin5.cached_tokens == len(system + user1)  # an exact match samples from the stored logits


def test_a_state_kept_at_a_named_position_is_reused_by_the_next_conversation(model):
    system, user1, user2 = prompts_of([25, 6, 8], model.config.vocab_size, seed=11)
    with Engine(model, prefill_chunk=8) as engine:
        sink = Collector()
        first = engine.submit(system + user1, GREEDY, sink, keep_states_at=[len(system)])  # e.g. a chat's system
        sink.wait([first])
        (out2,), (fin2,) = run(engine, [system + user2], GREEDY)
        with pytest.raises(ValueError, match="keep_states_at"):
            engine.submit([3], GREEDY, sink, keep_states_at=["end"])
    with Engine(model, reuse=False) as plain:
        (alone,), _ = run(plain, [system + user2], GREEDY)
    assert fin2.cached_tokens == len(system)  # the second conversation starts after the shared system prompt
    assert out2 == alone


def test_cancel_frees_the_row_and_the_engine_goes_on(model):
    prompts = prompts_of([12, 12], model.config.vocab_size, seed=5)
    sink = Collector()
    first_token = threading.Event()

    def on_event(event):
        sink(event)
        if isinstance(event, TokenEvent) and event.request_id == long_id:
            first_token.set()

    with Engine(model, reuse=False) as engine:
        long_id = engine.submit(prompts[0], SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True),
                                on_event)
        assert first_token.wait(TIMEOUT)
        engine.cancel(long_id)
        sink.wait([long_id])
        assert sink.finish[long_id].reason == "cancelled"
        assert len(sink.tokens[long_id]) < 10_000
        stats = engine.stats()
        assert stats["running"] == 0 and stats["batch_cache_bytes"] == 0  # its row and cache are gone
        (tokens,), (fin,) = run(engine, [prompts[1]], GREEDY)  # and the engine still serves
    assert fin.reason == "length" and tokens == solo_generate(model, prompts[1], 8, chunk=512)


def test_cancel_while_waiting_and_a_full_queue(model):
    engine = Engine(model, max_waiting=2)  # not started: requests stay queued
    sink = Collector()
    a = engine.submit([3, 4], GREEDY, sink)
    engine.submit([5], GREEDY, sink)
    with pytest.raises(EngineFull) as full:
        engine.submit([6], GREEDY, sink)
    assert full.value.retry_after > 0
    assert engine.stats()["waiting"] == 2
    engine.cancel(a)
    engine.start()
    try:
        sink.wait([a, a + 1])
    finally:
        engine.stop()
    assert sink.finish[a].reason == "cancelled" and a not in sink.tokens
    assert sink.finish[a + 1].reason == "length"


def test_bad_input_is_a_value_error(model):
    engine = Engine(model, max_context=32)
    vocab = model.config.vocab_size
    for prompt, params, match in [
        ([], GREEDY, "non-empty"),
        ([3, vocab], GREEDY, "vocabulary"),
        ([3, -1], GREEDY, "vocabulary"),
        ([3] * 30, GREEDY, "exceed the context"),
        ([3], SamplingParams(max_tokens=0), "max_tokens"),
        ([3], SamplingParams(temperature=-1), "temperature"),
        ([3], SamplingParams(top_p=0), "top_p"),
        ([3], SamplingParams(logprobs=-2), "logprobs"),
        ([3], SamplingParams(logit_bias={vocab: 1.0}), "logit_bias"),
    ]:
        with pytest.raises(ValueError, match=match):
            engine.submit(prompt, params, lambda e: None)
    assert engine.stats()["waiting"] == 0


def test_long_prompt_is_prefilled_in_chunks_between_decode_steps(model):
    """A long prompt arriving while streams decode delays each of their tokens by at most one chunk, and that chunk
    is the step's token budget less the decode rows' tokens (vLLM's `max_num_batched_tokens`)."""
    vocab, chunk = model.config.vocab_size, 8
    short = prompts_of([4, 5], vocab, seed=6)
    long_prompt = prompts_of([60], vocab, seed=7)[0]
    sink = Collector()
    forward = model.forward

    def logged_forward(input_ids, *args, **kwargs):  # records each prefill chunk among the events
        if input_ids.shape[1] > 1 or kwargs.get("cache") is not None and kwargs["cache"].seq_len == 0:
            with sink.done:
                sink.order.append(("prefill", input_ids.shape[1]))
        return forward(input_ids, *args, **kwargs)

    model.forward = logged_forward
    try:
        with Engine(model, prefill_chunk=chunk, reuse=False) as engine:
            params = SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True)
            ids = [engine.submit(p, params, sink) for p in short]
            with sink.done:
                assert sink.done.wait_for(lambda: len(sink.tokens.get(ids[1], [])) >= 2, TIMEOUT)
            ids.append(engine.submit(long_prompt, GREEDY, sink))
            sink.wait(ids[2:])
            engine.cancel(ids[0])
            engine.cancel(ids[1])
            sink.wait(ids)
    finally:
        del model.forward
        assert engine.prefill_tokens(len(short)) == chunk - len(short)
    order = sink.order
    start = order.index(("prefill", chunk - len(short)))  # the long prompt's first chunk, beside 2 decode rows
    end = max(i for i, e in enumerate(order) if e == ("token", ids[2]))
    chunks = [v for k, v in order[start:end] if k == "prefill"]
    assert chunks[:-1] == [chunk - len(short)] * (len(chunks) - 1), chunks
    prefill_since_token = 0
    for kind, value in order[start:end]:
        if kind == "prefill":
            prefill_since_token += value
            assert prefill_since_token <= chunk, "a running stream waited for more than one prefill chunk"
        elif kind == "token" and value == ids[0]:
            prefill_since_token = 0
    assert sum(v for k, v in order[start:end] if k == "prefill") == len(long_prompt)  # 8 chunks, interleaved
    iterations = engine.iterations()  # the engine's own log agrees: at most one budget of prompt tokens a step
    assert all(i.prefill_tokens <= chunk for i in iterations)
    assert sum(i.prefill_tokens for i in iterations) == len(long_prompt) + sum(map(len, short))
    assert all(i.start <= i.end and i.prefill_s >= 0 and i.decode_s >= 0 for i in iterations)
    stats = engine.stats()["histograms"]
    assert stats["prefill_seconds"]["count"] == sum(1 for i in iterations if i.prefill_tokens)
    assert stats["decode_step_seconds"]["count"] == sum(1 for i in iterations if i.rows)


def test_a_prefilled_row_joins_the_batch_in_the_iteration_after_its_last_chunk(model, monkeypatch):
    """The iteration that runs a prompt's last chunk does only that chunk and the step: the new row joins the batch
    (`add_rows`) at the start of the next one, and its outputs still equal `generate`."""
    from openjamba.cache import HybridCache

    vocab, chunk = model.config.vocab_size, 8
    short, long_prompt = prompts_of([4], vocab, seed=15)[0], prompts_of([30], vocab, seed=16)[0]
    sink = Collector()
    forward, add_rows = model.forward, HybridCache.add_rows

    def logged_forward(input_ids, *args, **kwargs):
        with sink.done:
            sink.order.append(("prefill" if input_ids.shape[1] > 1 else "step", input_ids.shape[0]))
        return forward(input_ids, *args, **kwargs)

    def logged_add_rows(self, other, *args):
        with sink.done:
            sink.order.append(("add_rows", other.batch_size))
        return add_rows(self, other, *args)

    monkeypatch.setattr(model, "forward", logged_forward)
    monkeypatch.setattr(HybridCache, "add_rows", logged_add_rows)
    with Engine(model, prefill_chunk=chunk, reuse=False) as engine:
        # long enough to be still decoding when the second joins, however late the submit below runs
        first = engine.submit(short, SamplingParams(max_tokens=96, temperature=0, ignore_eos=True), sink)
        with sink.done:
            assert sink.done.wait_for(lambda: len(sink.tokens.get(first, [])) >= 2, TIMEOUT)
        second = engine.submit(long_prompt, GREEDY, sink)
        sink.wait([first, second])
    order = sink.order
    joined = order.index(("add_rows", 1))
    last_chunk = max(i for i, e in enumerate(order[:joined]) if e[0] == "prefill")
    between = [kind for kind, _ in order[last_chunk + 1:joined]]
    assert "step" in between and "prefill" not in between, order  # a step over the old batch came in between
    assert order[last_chunk + 1:joined].count(("token", second)) == 1  # its first token was sent at once
    assert sink.tokens[second] == solo_generate(model, long_prompt, 8, chunk=chunk)
    assert sink.tokens[first] == solo_generate(model, short, 96, chunk=chunk)


def test_a_request_cancelled_while_joining_leaves_no_row(model):
    """Cancelled between its last prefill chunk and its joining, a request finishes "cancelled" and never joins."""
    engine = Engine(model, prefill_chunk=64)  # driven by hand: no loop thread
    sink = Collector()
    ids = [engine.submit(p, GREEDY, sink) for p in prompts_of([5, 9], model.config.vocab_size, seed=17)]
    with torch.inference_mode():
        engine._admit()
        engine._prefill_some()
        assert engine.stats()["running"] == 2 and engine._batch is None  # both prefilled, both joining
        engine._apply_cancels({ids[0]: "cancelled"})
        engine._join()
        engine._decode()
    assert sink.finish[ids[0]].reason == "cancelled" and len(sink.tokens[ids[0]]) == 1
    assert engine._batch.batch_size == 1 and [r.id for r in engine._running] == [ids[1]]
    assert sink.tokens[ids[1]] == solo_generate(model, prompts_of([5, 9], model.config.vocab_size, seed=17)[1], 2, 64)
    engine.stop()
    assert sink.finish[ids[1]].reason == "cancelled" and engine._batch is None


def test_abort_all_finishes_every_request_with_abort_and_the_engine_goes_on(model):
    """What a server shutting down does before it closes its connections: waiting and running requests alike end
    "abort" with the tokens they have; one submitted afterwards runs as usual."""
    engine = Engine(model, prefill_chunk=64, max_running=1)  # driven by hand: one row runs, one waits
    sink = Collector()
    long = SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)
    ids = [engine.submit(p, long, sink) for p in prompts_of([5, 9], model.config.vocab_size, seed=3)]
    with torch.inference_mode():
        for _ in range(3):
            engine._admit()
            engine._join()
            engine._prefill_some()
            engine._decode()
    assert [r.id for r in engine._running] == [ids[0]] and [r.id for r in engine._waiting] == [ids[1]]
    with engine:
        engine.abort_all()
        sink.wait(ids)
        assert [sink.finish[i].reason for i in ids] == ["abort", "abort"]
        assert len(sink.tokens[ids[0]]) >= 3 and ids[1] not in sink.tokens
        after = engine.submit(prompts_of([4], model.config.vocab_size, seed=5)[0], GREEDY, sink)
        sink.wait([after])
    assert sink.finish[after].reason == "length" and len(sink.tokens[after]) == 8
    assert engine.stats()["running"] == 0 and engine._batch is None


def test_a_failing_step_finishes_its_requests_with_error_and_the_engine_goes_on(model, monkeypatch):
    from openjamba.serve import engine as engine_module

    calls = {"n": 0}
    real = engine_module.decode_step

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated failure")
        return real(*args)

    monkeypatch.setattr(engine_module, "decode_step", flaky)
    prompt = prompts_of([6], model.config.vocab_size, seed=8)[0]
    with Engine(model) as engine:
        _, (fin,) = run(engine, [prompt], GREEDY)
        assert fin.reason == "error" and fin.error == "RuntimeError: simulated failure"
        (tokens,), (fin,) = run(engine, [prompt], GREEDY)
        assert fin.reason == "length" and len(tokens) == 8
        assert engine.stats()["requests_failed_total"] == 1


def test_store_stays_within_its_bound_and_export_import_resumes_a_conversation(model):
    prompts = prompts_of([20, 25, 30, 35, 40], model.config.vocab_size, seed=9)
    with Engine(model, reuse=True) as probe:  # the size of one stored state
        run(probe, [prompts[0]], GREEDY)
        one = probe.stats()["store_bytes"] / probe.stats()["store_entries"]
    bound = int(3.5 * one)
    with Engine(model, store_bytes=bound) as engine:
        outs, _ = run(engine, prompts, GREEDY)
        stats = engine.stats()
        assert 0 < stats["store_bytes"] <= bound and stats["store_entries"] <= 4
        history = prompts[-1] + outs[-1]
        saved = engine.export_state(history)
        assert saved is not None and int(saved["length"]) == len(history)
        assert engine.export_state([1, 2, 3]) is None  # nothing stored extends to it
    follow_up = history + [5, 6, 7]
    with Engine(model) as fresh:
        fresh.import_state(history, saved)
        (resumed,), (fin,) = run(fresh, [follow_up], GREEDY)
        with pytest.raises(ValueError, match="covers"):
            fresh.import_state(history[:-1], saved)
    assert fin.cached_tokens == len(history)
    assert resumed == solo_generate(model, follow_up, 8, chunk=512)


def test_logprobs(model):
    prompt = prompts_of([9], model.config.vocab_size, seed=10)[0]
    events = []
    with Engine(model) as engine:
        done = threading.Event()
        engine.submit(prompt, SamplingParams(max_tokens=3, temperature=0, logprobs=4, ignore_eos=True),
                      lambda e: (events.append(e), isinstance(e, FinishEvent) and done.set()))
        assert done.wait(TIMEOUT)
    first = events[0]
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1], -1)
    assert first.token_id == int(expected.argmax())
    assert first.logprob == pytest.approx(float(expected.max()), abs=1e-5)
    assert [t for t, _ in first.top_logprobs] == expected.topk(4).indices.tolist()


def test_cancel_during_prefill(model):
    long_prompt = prompts_of([64], model.config.vocab_size, seed=13)[0]
    sink = Collector()
    engine = Engine(model, prefill_chunk=8, reuse=False)
    forward = model.forward

    def cancelling_forward(input_ids, *args, **kwargs):  # the client goes away after the first chunk
        engine.cancel(0)
        return forward(input_ids, *args, **kwargs)

    model.forward = cancelling_forward
    try:
        with engine:
            engine.submit(long_prompt, GREEDY, sink)
            sink.wait([0])
            stats = engine.stats()
    finally:
        del model.forward
    assert sink.finish[0].reason == "cancelled" and 0 not in sink.tokens
    assert stats["prefilling"] == stats["running"] == 0


def test_bounded_load_answers_every_request_and_leaves_nothing_behind(model):
    """120 requests of random lengths and sampling settings from 8 threads, some cancelled midway."""
    import random

    rng = random.Random(0)
    vocab = model.config.vocab_size
    sink = Collector()
    with Engine(model, max_running=8, max_waiting=200, prefill_chunk=16, store_bytes=200_000) as engine:
        submitted: list[int] = []

        def client(k: int) -> None:
            for _ in range(15):
                prompt = [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 40))]
                params = SamplingParams(max_tokens=rng.randrange(1, 12), temperature=rng.choice([0, 0.8]),
                                        seed=rng.randrange(100), logprobs=rng.choice([None, 2]))
                request_id = engine.submit(prompt, params, sink)
                submitted.append(request_id)
                if rng.random() < 0.15:
                    engine.cancel(request_id)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        sink.wait(submitted)
        stats = engine.stats()
    assert len(submitted) == 120 and set(sink.finish) == set(submitted)
    assert {f.reason for f in sink.finish.values()} <= {"length", "stop", "cancelled"}
    assert stats["running"] == stats["prefilling"] == stats["waiting"] == stats["batch_cache_bytes"] == 0
    assert 0 < stats["store_bytes"] <= 200_000


def test_a_bf16_kv_cache_serves_and_reuses(model):
    prompts = prompts_of([3, 40, 7], model.config.vocab_size, seed=14)
    with Engine(model, kv_dtype=torch.bfloat16) as engine:
        tokens, _ = run(engine, prompts, GREEDY)
        (again,), (fin,) = run(engine, [prompts[1] + tokens[1]], GREEDY)
    for prompt, got in zip(prompts, tokens):
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=8, eos_token_id=[],
                                  kv_dtype=torch.bfloat16)[0, len(prompt):].tolist()
        assert got == expected
    assert fin.cached_tokens == len(prompts[1]) + 7


def test_stop_finishes_what_is_in_flight_even_from_a_callback(model):
    sink = Collector()
    engine = Engine(model)

    def stop_at_first_token(event):
        sink(event)
        if isinstance(event, TokenEvent):
            engine.stop()  # from the engine thread itself: must not deadlock

    with engine:
        first = engine.submit([3, 4, 5], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True),
                              stop_at_first_token)
        second = engine.submit([6, 7], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True), sink)
        sink.wait([first, second])
    assert {sink.finish[first].reason, sink.finish[second].reason} == {"cancelled"}
    assert sink.finish[first].error == "the engine stopped"
    with pytest.raises(RuntimeError, match="stopped"):
        engine.submit([3], GREEDY, sink)


def test_on_fresh_thread_runs_with_its_threads_and_hands_back_result_or_error(model):
    caller = threading.current_thread()
    assert on_fresh_thread(lambda: (torch.get_num_threads(), threading.current_thread() is caller), 1) == (1, False)
    with pytest.raises(ValueError, match="inside"):
        on_fresh_thread(lambda: (_ for _ in ()).throw(ValueError("inside")))
    with pytest.raises(ValueError, match="threads"):
        Engine(model, threads=0)
    with Engine(model, threads=1) as engine:  # the loop sets its own thread count, whatever the caller's
        tokens, _ = run(engine, prompts_of([5], model.config.vocab_size, seed=40), GREEDY)
    assert tokens[0] == solo_generate(model, prompts_of([5], model.config.vocab_size, seed=40)[0], 8, chunk=512)



@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_the_loop_holds_freed_memory_with_glibc():
    """The engine's loop fixes glibc's malloc thresholds (serve/engine.py: freed prefill buffers stay in the
    process); glibc accepts both values (mallopt returns 0 for a value out of its range)."""
    assert on_fresh_thread(hold_freed_memory, 1)
