from __future__ import annotations

import io

import pytest
import torch

from openjamba.generate import TextStreamer, filter_logits, prefill, sample_next

from .conftest import left_padded_batch, random_model


@torch.no_grad()
def test_greedy_matches_step_by_step_argmax_of_full_forward():
    model = random_model()
    ids = torch.randint(3, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, max_new_tokens=10, eos_token_id=[], prefill_chunk_size=4)
    seq = ids
    for _ in range(10):
        seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


@torch.no_grad()
def test_chunked_prefill_gives_the_full_forward_last_logits_and_reports_progress():
    model = random_model()
    ids = torch.randint(3, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    full = model(ids).logits[:, -1]
    done: list[int] = []
    cache = model.make_cache(2, max_length=11)
    logits = prefill(model, ids, cache, chunk_size=4, on_progress=done.append)
    torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)
    assert done == [4, 8, 11]
    with pytest.raises(ValueError, match="chunk size"):
        prefill(model, ids, model.make_cache(2, max_length=11), chunk_size=0)


@torch.no_grad()
def test_left_padded_batch_generates_what_each_prompt_generates_alone(config_name):
    model = random_model(config_name)
    ids, mask, rows = left_padded_batch([7, 2, 5], model.config.vocab_size, seed=1)
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    for i, row in enumerate(rows):
        alone = model.generate(row[None], max_new_tokens=8, eos_token_id=[])
        assert torch.equal(batched[i, -(len(row) + 8):], alone[0])


@torch.no_grad()
def test_rows_stop_independently_at_eos():
    model = random_model()
    ids = torch.randint(3, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(2))
    free = model.generate(ids, max_new_tokens=6, eos_token_id=[])
    eos = int(free[0, 5 + 2])  # row 0's third new token becomes "EOS"
    out = model.generate(ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    row0 = out[0, 5:].tolist()
    stop = row0.index(eos)
    assert all(t == 0 for t in row0[stop + 1:])
    assert stop <= 2
    if eos not in free[1, 5:].tolist():
        assert torch.equal(out[1], free[1])  # the other row is unaffected


@torch.no_grad()
def test_generation_stops_when_all_rows_finished():
    model = random_model()
    ids = torch.randint(3, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(3))
    first = int(model.generate(ids, max_new_tokens=1, eos_token_id=[])[0, -1])
    out = model.generate(ids, max_new_tokens=20, eos_token_id=first)
    assert out.shape == (1, 6)


@torch.no_grad()
def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = random_model()
    ids = torch.randint(3, model.config.vocab_size, (2, 4), generator=torch.Generator().manual_seed(4))

    def sample(seed, **kw):
        return model.generate(ids, max_new_tokens=12, do_sample=True, eos_token_id=[],
                              generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(sample(7, temperature=0.7, top_p=0.9), sample(7, temperature=0.7, top_p=0.9))
    assert not torch.equal(sample(7, temperature=2.0), sample(8, temperature=2.0))
    assert torch.equal(sample(9, top_k=1), model.generate(ids, max_new_tokens=12, eos_token_id=[]))


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(sample_next(logits, True, top_p=0.75, generator=torch.Generator().manual_seed(s)))
             for s in range(200)}
    assert draws == {0, 1}


def test_filters_keep_what_transformers_warpers_keep():
    """filter_logits against transformers' own warpers, chained in generate's order, on the same logits."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(2)) * 2
    for temperature, top_k, top_p, min_p in [(0.7, None, None, 0.1), (1.3, 50, 0.9, 0.05), (1.0, None, 0.8, None),
                                             (0.5, 20, None, 0.3)]:
        warpers = [TemperatureLogitsWarper(temperature)]
        warpers += [TopKLogitsWarper(top_k)] if top_k else []
        warpers += [TopPLogitsWarper(top_p)] if top_p else []
        warpers += [MinPLogitsWarper(min_p)] if min_p else []
        expected = logits.clone()
        for warp in warpers:
            expected = warp(None, expected)
        got = filter_logits(logits, temperature, top_k, top_p, min_p)
        assert torch.equal(got.isinf(), expected.isinf())
        torch.testing.assert_close(got[~got.isinf()], expected[~expected.isinf()])


def test_top_p_looked_for_in_a_window_keeps_what_a_full_sort_keeps():
    from openjamba.generate import _top_p

    logits = torch.randn(6, 400, generator=torch.Generator().manual_seed(4)) * torch.tensor([[0.2], [1], [3]] * 2)
    for top_p in (0.3, 0.9, 0.99):
        full = _top_p(logits, top_p, window=400)
        for window in (8, 64, 256):  # flat rows reach past small windows: those are sorted in full
            assert torch.equal(_top_p(logits, top_p, window=window).isinf(), full.isinf())


def test_streamer_prints_the_new_text():
    class Tok:
        def decode(self, ids):
            return "".join(chr(ord("a") + i % 26) for i in ids)

    model = random_model()
    ids = torch.randint(3, model.config.vocab_size, (1, 4), generator=torch.Generator().manual_seed(5))
    sink = io.StringIO()
    out = model.generate(ids, max_new_tokens=7, eos_token_id=[], streamer=TextStreamer(Tok(), stream=sink))
    assert sink.getvalue() == Tok().decode(out[0, 4:].tolist()) + "\n"


def test_streamer_passes_its_decode_arguments():
    """`openjamba generate` and quickstart's samples stream with skip_special_tokens=True: no trailing <eos>."""
    class Tok:
        def decode(self, ids, skip_special_tokens=False):
            return "".join("" if i == 0 and skip_special_tokens else "<eos>" if i == 0 else chr(96 + i) for i in ids)

    for skip, expected in ((False, "ab<eos>\n"), (True, "ab\n")):
        sink = io.StringIO()
        streamer = TextStreamer(Tok(), stream=sink, skip_special_tokens=skip)
        for step in ([3, 4], [1], [2], [0]):  # the prompt, then one token per step
            streamer.put(torch.tensor([step]))
        streamer.end()
        assert sink.getvalue() == expected


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(do_sample=True, top_p=1.5), "top_p"),
    (dict(do_sample=True, top_k=0), "top_k"),
])
def test_bad_arguments_are_clear_errors(kwargs, match):
    model = random_model()
    with pytest.raises(ValueError, match=match):
        model.generate(torch.ones(1, 3, dtype=torch.long), **kwargs)
    with pytest.raises(ValueError, match="input_ids"):
        model.generate(torch.ones(3, dtype=torch.long))


@torch.no_grad()
def test_should_stop_finishes_its_rows_and_stops_early():
    """Row 0 is told to stop after its 2nd new token: it is padded from then on, row 1 is unaffected; once every
    row is stopped, no further step runs."""
    model = random_model()
    ids = torch.randint(3, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
    free = model.generate(ids, max_new_tokens=6, eos_token_id=[], pad_token_id=0)
    calls = []

    def stop_row0_after_two(new: torch.Tensor) -> torch.Tensor:
        calls.append(new.shape[1])
        return torch.tensor([new.shape[1] >= 2, False])

    out = model.generate(ids, max_new_tokens=6, eos_token_id=[], pad_token_id=0, should_stop=stop_row0_after_two)
    assert torch.equal(out[0, :7], free[0, :7]) and out[0, 7:].eq(0).all()
    assert torch.equal(out[1], free[1])
    assert calls == [1, 2, 3, 4, 5, 6]
    everyone = model.generate(ids, max_new_tokens=6, eos_token_id=[], should_stop=lambda new: new[:, 0] >= 0)
    assert everyone.shape == (2, 6)  # one new token, then both rows were done
