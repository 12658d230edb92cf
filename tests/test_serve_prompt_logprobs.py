"""Prompt logprobs (`SamplingParams.prompt_logprobs`; `/v1/completions` with echo and logprobs), against one plain
float32 forward of the whole prompt, and lm-eval's `local-completions` model scoring against a live server against
openjamba's own in-process lm-eval adapter."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from openjamba import JambaForCausalLM
from openjamba.serve.api import ServerConfig, create_app
from openjamba.serve.engine import Engine, FinishEvent, SamplingParams, TokenEvent
from openjamba.tokenizer import load_tokenizer

from .serve_helpers import build_checkpoint, running_server
from .test_engine import Collector

TOLERANCE = 1e-4  # chunked prefill through the cache vs one forward of the whole prompt, float32 (seen: ~1e-6)
K = 3
PAIRS = [("hello world, this is", " a small test"), ("The quick brown fox", " jumps over the lazy dog."),
         ("Paris is the capital", " of France."), ("user assistant", " system")]


@pytest.fixture(scope="module", autouse=True)
def one_thread_here():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("scoring") / "tiny-jamba", chat_template=False)


@pytest.fixture(scope="module")
def model(checkpoint):
    return JambaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return load_tokenizer(checkpoint)


def reference(model, prompt: list[int]) -> torch.Tensor:
    """log_softmax of one plain forward of the whole prompt (T, V), float32: row i predicts prompt[i + 1]."""
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)


def check_against(expected: torch.Tensor, prompt: list[int], scored, k: int = K) -> None:
    assert len(scored) == len(prompt) - 1
    for i, (logprob, top) in enumerate(scored):
        row = expected[i]
        assert logprob == pytest.approx(float(row[prompt[i + 1]]), abs=TOLERANCE)
        values, ids = row.topk(k)
        assert [t for t, _ in top] == ids.tolist()  # the random model's top logprobs are far apart (no near ties)
        assert [v for _, v in top] == pytest.approx(values.tolist(), abs=TOLERANCE)


def score(engine: Engine, prompt: list[int], k: int = K) -> tuple[list, TokenEvent, FinishEvent]:
    """Submit one prompt asking for prompt logprobs; (its prompt logprobs, its first token event, its finish)."""
    sink, firsts = Collector(), []

    def on_event(event):
        if isinstance(event, TokenEvent) and not firsts:
            firsts.append(event)
        sink(event)
    request = engine.submit(prompt, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=k), on_event)
    sink.wait([request])
    return firsts[0].prompt_logprobs, firsts[0], sink.finish[request]


def test_prompt_logprobs_equal_one_forward_chunked_and_with_reuse(model):
    """Every prompt position, in one chunk or many (prefill_chunk 8 < 37 tokens), and still all of them when reuse
    has stored a state the prompt extends (no state reuse for such a request; the first token is the same)."""
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, model.config.vocab_size, (37,), generator=gen).tolist()
    expected = reference(model, prompt)
    with Engine(model, prefill_chunk=8) as engine:
        sink = Collector()
        sink.wait([engine.submit(prompt[:20], SamplingParams(max_tokens=1, temperature=0), sink)])  # stores [:20]
        chunked, first, finish = score(engine, prompt)
        assert finish.cached_tokens == 0 and engine.stats()["running"] == 0
        # An ordinary request for the same prompt resumes from a stored state and agrees on the first token.
        plain = engine.submit(prompt, SamplingParams(max_tokens=1, temperature=0), sink)
        sink.wait([plain])
        assert sink.finish[plain].cached_tokens >= 20 and sink.tokens[plain] == [first.token_id]
    check_against(expected, prompt, chunked)
    with Engine(model, prefill_chunk=512, reuse=False) as engine:
        whole, _, _ = score(engine, prompt)
    check_against(expected, prompt, whole)
    for (a, top_a), (b, top_b) in zip(whole, chunked):
        assert a == pytest.approx(b, abs=TOLERANCE) and [t for t, _ in top_a] == [t for t, _ in top_b]


def test_prompt_logprobs_edge_cases(model):
    """One prompt token: nothing to score; k = 0: no alternatives; a bad k is refused at submit."""
    with Engine(model, prefill_chunk=16) as engine:
        scored, first, _ = score(engine, [5])
        assert scored == [] and first.token_id is not None
        scored, _, _ = score(engine, [5, 6, 7, 8], k=0)
        assert len(scored) == 3 and all(top == [] for _, top in scored)
        with pytest.raises(ValueError, match="prompt_logprobs"):
            engine.submit([5, 6], SamplingParams(prompt_logprobs=-1), lambda e: None)
        assert engine.stats()["running"] == 0


def test_prompt_logprobs_request_admitted_with_others_is_prefilled_alone(model):
    """Fresh prompts arriving together share one left-padded forward (`_prefill_together`); one asking for prompt
    logprobs among them is prefilled on its own, with every position's logits."""
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=gen).tolist() for n in (9, 14, 11)]
    engine, sink = Engine(model, reuse=False), Collector()
    firsts = {}

    def on_event(event):
        if isinstance(event, TokenEvent):
            firsts.setdefault(event.request_id, event)
        sink(event)
    ids = [engine.submit(prompts[0], SamplingParams(max_tokens=2, temperature=0), on_event),
           engine.submit(prompts[1], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=K), on_event),
           engine.submit(prompts[2], SamplingParams(max_tokens=2, temperature=0), on_event)]
    with engine:
        sink.wait(ids)
    check_against(reference(model, prompts[1]), prompts[1], firsts[ids[1]].prompt_logprobs)
    assert firsts[ids[0]].prompt_logprobs is None and firsts[ids[2]].prompt_logprobs is None


# ---------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def server(model, tokenizer):
    engine = Engine(model, max_context=1024, prefill_chunk=16, eos_token_ids=tokenizer.eos_token_ids)
    engine.start()
    config = ServerConfig(model_name="tiny-jamba", max_context=1024, vocab_size=model.config.vocab_size)
    with running_server(create_app(engine, tokenizer, config)) as url:
        yield url
    engine.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=60)


def test_echo_with_logprobs_scores_the_prompt(model, tokenizer, client):
    """The echoed prompt's tokens come first: the first without a logprob, the others as one forward gives them,
    their offsets into the echoed text; then the generated token, as without echo."""
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)
    args = dict(model="tiny-jamba", prompt=ids, max_tokens=1, temperature=0, logprobs=2,
                extra_body={"ignore_eos": True})
    r = client.completions.create(echo=True, **args).choices[0]
    plain = client.completions.create(**args).choices[0]
    lp, echo = r.logprobs, tokenizer.decode(ids)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = reference(model, ids)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(float(expected[i - 1, ids[i]]), abs=TOLERANCE)
        values, top = expected[i - 1].topk(2)
        assert lp.top_logprobs[i] == pytest.approx(
            {tokenizer.token_text(t): v for t, v in zip(top.tolist(), values.tolist())}, abs=TOLERANCE)
    assert r.text == echo + plain.text and "".join(lp.tokens[:len(ids)]) == echo
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(ids) + 1)]
    assert (lp.tokens[-1], lp.top_logprobs[-1]) == (plain.logprobs.tokens[0], plain.logprobs.top_logprobs[0])
    assert lp.token_logprobs[-1] == pytest.approx(plain.logprobs.token_logprobs[0], abs=TOLERANCE)

    streamed = [c.choices[0] for c in client.completions.create(echo=True, stream=True, **args) if c.choices]
    assert "".join(c.text for c in streamed) == r.text
    joined = {key: sum((getattr(c.logprobs, key) for c in streamed if c.logprobs), []) for key in
              ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    assert joined == {key: pytest.approx(getattr(lp, key), abs=TOLERANCE) for key in joined}


@pytest.fixture(scope="module")
def bos_served(model, checkpoint):
    """A server whose tokenizer puts BOS before every text prompt (as Jamba's do)."""
    from tokenizers import processors

    tokenizer = load_tokenizer(checkpoint)
    tokenizer.backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    assert tokenizer.add_bos_token
    engine = Engine(model, max_context=1024, eos_token_ids=tokenizer.eos_token_ids)
    engine.start()
    config = ServerConfig(model_name="tiny-jamba", max_context=1024, vocab_size=model.config.vocab_size)
    with running_server(create_app(engine, tokenizer, config)) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60), tokenizer
    engine.stop()


def test_echo_of_a_text_prompt_is_the_text_sent(bos_served):
    """A text prompt is echoed as sent, with and without logprobs, streamed or not (as OpenAI and vLLM echo it):
    the BOS the tokenizer put before it is listed among the logprobs' tokens but takes no room in the text. Token
    ids are echoed decoded with their special tokens."""
    bos_client, tokenizer = bos_served
    prompt = "hello world"
    args = dict(model="tiny-jamba", prompt=prompt, max_tokens=2, temperature=0, extra_body={"ignore_eos": True})
    plain = bos_client.completions.create(**args).choices[0].text
    for logprobs in (None, 1):
        r = bos_client.completions.create(echo=True, logprobs=logprobs, **args).choices[0]
        streamed = [c.choices[0].text for c in bos_client.completions.create(echo=True, logprobs=logprobs,
                                                                              stream=True, **args) if c.choices]
        assert r.text == "".join(streamed) == prompt + plain, logprobs
    lp = r.logprobs
    assert lp.tokens[0] == "<bos>" and lp.text_offset[:2] == [0, 0] and lp.text_offset[-2] == len(prompt)
    assert all(r.text[at:].startswith(token) for token, at in zip(lp.tokens[1:], lp.text_offset[1:]))
    ids = tokenizer.encode(prompt)
    by_ids = bos_client.completions.create(echo=True, **{**args, "prompt": ids}).choices[0].text
    assert by_ids == tokenizer.decode(ids, skip_special_tokens=False) + plain and by_ids.startswith("<bos>")


def test_vllm_prompt_logprobs_field_is_refused_not_ignored(server):
    r = httpx.post(server + "/v1/completions", json={"prompt": "hi", "max_tokens": 1, "prompt_logprobs": 1},
                   timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"
    assert "echo with logprobs" in r.json()["error"]["message"]


def scored_pairs(model, tokenizer) -> list:
    """lm-eval loglikelihood requests: PAIRS, and one continuation the model's greedy choice (is_greedy true)."""
    from lm_eval.api.instance import Instance

    context = "Paris is the"
    ids = tokenizer.encode(context, add_special_tokens=False)
    greedy = model.generate(torch.tensor([ids]), max_new_tokens=3, eos_token_id=[])[0, len(ids):].tolist()
    pairs = [*PAIRS, (context, tokenizer.decode(greedy))]
    assert tokenizer.encode(context + pairs[-1][1], add_special_tokens=False) == ids + greedy  # tokenized alike
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def in_process(model, tokenizer, requests) -> list[tuple[float, bool]]:
    """The oracle: openjamba's own lm-eval adapter on the same model (`eval/harness.py`)."""
    from openjamba.eval.harness import OpenJambaLM

    return OpenJambaLM(model=model, tokenizer=tokenizer).loglikelihood(requests, disable_tqdm=True)


def assert_same_scores(got: list[tuple[float, bool]], want: list[tuple[float, bool]]) -> None:
    assert [g for _, g in got] == [g for _, g in want] and any(g for _, g in want) and not all(g for _, g in want)
    assert [s for s, _ in got] == pytest.approx([s for s, _ in want], abs=TOLERANCE)


def test_lm_eval_local_completions_scores_as_the_in_process_adapter(model, tokenizer, checkpoint, server):
    """lm-eval's `local-completions` model (tokenized requests, the checkpoint's tokenizer through transformers)
    scoring against the server gives the in-process adapter's log-likelihoods and is_greedy."""
    pytest.importorskip("tenacity")  # LocalCompletionsAPI retries with it (lm_eval[api])
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    requests = scored_pairs(model, tokenizer)
    lm = LocalCompletionsAPI(base_url=server + "/v1/completions", model="tiny-jamba", tokenizer=str(checkpoint),
                             tokenizer_backend="huggingface", tokenized_requests=True, num_concurrent=1,
                             max_retries=1)
    assert_same_scores(lm.loglikelihood(requests, disable_tqdm=True), in_process(model, tokenizer, requests))


def test_lm_eval_payload_scores_as_the_in_process_adapter(model, tokenizer, server):
    """The body lm-eval's local-completions model sends for a batch of loglikelihood requests (its own
    `_create_payload`), parsed by its own `parse_logprobs`, equals the in-process adapter (no tenacity needed)."""
    from types import SimpleNamespace

    from lm_eval.models.openai_completions import LocalCompletionsAPI

    requests = scored_pairs(model, tokenizer)
    contexts = [tokenizer.encode(r.args[0], add_special_tokens=False) for r in requests]
    inputs = [tokenizer.encode(r.args[0] + r.args[1], add_special_tokens=False) for r in requests]
    body = LocalCompletionsAPI._create_payload(SimpleNamespace(model="tiny-jamba"), inputs, generate=False)
    r = httpx.post(server + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    got = LocalCompletionsAPI.parse_logprobs(r.json(), tokens=inputs, ctxlens=[len(c) for c in contexts])
    assert_same_scores(got, in_process(model, tokenizer, requests))


def test_skipped_special_tokens_take_no_room_in_the_offsets(bos_served):
    """An output special token (a BOS forced by logit_bias) that skip_special_tokens leaves out of the text is
    listed among the logprobs' tokens at the offset where the text stands, not past its end; kept in the text
    (skip_special_tokens false), it takes its room."""
    bos_client, tokenizer = bos_served
    bos = tokenizer.encode("x")[0]
    assert bos in tokenizer.all_special_ids
    args = dict(model="tiny-jamba", prompt="hello world", max_tokens=3, temperature=0, logprobs=1,
                logit_bias={str(bos): 100})
    skipped = bos_client.completions.create(extra_body={"ignore_eos": True}, **args).choices[0]
    assert skipped.text == "" and skipped.logprobs.tokens == ["<bos>"] * 3
    assert skipped.logprobs.text_offset == [0, 0, 0]
    kept = bos_client.completions.create(extra_body={"ignore_eos": True, "skip_special_tokens": False},
                                         **args).choices[0]
    assert kept.text == "<bos>" * 3 and kept.logprobs.text_offset == [0, 5, 10]
