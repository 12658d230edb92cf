"""The serving batch's sampler (serve/sampling.py): one pass for rows with their own settings and random streams."""

from __future__ import annotations

import pytest
import torch

from openjamba.serve.sampling import RowSampling, SamplingParams, sample_rows


def _row(temperature=1.0, top_k=0, top_p=1.0, seed=0, logprobs=None) -> RowSampling:
    gen = torch.Generator().manual_seed(seed) if temperature > 0 else None
    return RowSampling(temperature, top_k, top_p, gen, logprobs)


def _logits(rows: int, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_rows_take_the_argmax_and_logprobs_only_where_asked():
    logits = _logits(3)
    out = sample_rows(logits, [_row(0), _row(0, logprobs=3), _row(0)])
    assert [t for t, _, _ in out] == logits.argmax(-1).tolist()
    assert out[0][1:] == (None, None) and out[2][1:] == (None, None)
    expected = torch.log_softmax(logits[1], -1)
    assert abs(out[1][1] - float(expected.max())) < 1e-6
    assert [i for i, _ in out[1][2]] == expected.topk(3).indices.tolist()


def test_a_seeded_row_samples_the_same_tokens_whatever_its_batch_mates():
    logits = _logits(4, seed=1)
    alone = sample_rows(logits[:1], [_row(0.8, 10, 0.9, seed=5)])[0][0]
    seeded = [_row(0.8, 10, 0.9, seed=5), _row(1.3, seed=6), _row(0), _row(0.5, 3, seed=7, logprobs=2)]
    mixed = sample_rows(logits, seeded)
    assert mixed[0][0] == alone
    # the streams advance one number per token: a sequence of draws is reproducible too
    a = [_row(1.0, 0, 0.95, seed=9)]
    b = [_row(1.0, 0, 0.95, seed=9), _row(2.0, seed=1)]
    seq_a = [sample_rows(logits[:1], a)[0][0] for _ in range(20)]
    seq_b = [sample_rows(logits[:2], b)[0][0] for _ in range(20)]
    assert seq_a == seq_b


def test_filters_follow_generate_and_frequencies_follow_the_filtered_distribution():
    """Each row's draws stay inside its top-k / top-p set and follow its tempered distribution."""
    vocab = 12
    logits = _logits(3, vocab, seed=2)
    rows = [_row(0.7, 4, 1.0, seed=1), _row(1.0, 0, 0.6, seed=2), _row(1.5, 0, 1.0, seed=3)]
    draws = torch.tensor([[t for t, _, _ in sample_rows(logits, rows)] for _ in range(1500)])  # (n, 3)
    assert set(draws[:, 0].tolist()) <= set(logits[0].topk(4).indices.tolist())
    probs = (logits[1] / 1.0).softmax(-1)
    sorted_p, order = probs.sort(descending=True)
    keep = order[(sorted_p.cumsum(0) - sorted_p) < 0.6]  # generate.sample_next's top-p set
    assert set(draws[:, 1].tolist()) <= set(keep.tolist())
    expected = (logits[2] / 1.5).softmax(-1)
    freq = torch.bincount(draws[:, 2], minlength=vocab).float() / len(draws)
    assert (freq - expected).abs().max() < 0.05  # 1,500 draws: standard error below 0.013
    expected0 = torch.zeros(vocab)
    top = logits[0].topk(4).indices
    expected0[top] = (logits[0][top] / 0.7).softmax(-1)
    freq0 = torch.bincount(draws[:, 0], minlength=vocab).float() / len(draws)
    assert (freq0 - expected0).abs().max() < 0.05


def test_a_top_p_set_wider_than_the_candidates_falls_back_to_the_whole_vocabulary(monkeypatch):
    """With few candidates looked at first, a row whose top-p set reaches past them is filtered over the whole
    sorted vocabulary: the same draws as with candidates enough for every row."""
    import openjamba.serve.sampling as sampling

    logits = torch.randn(2, 64, generator=torch.Generator().manual_seed(3)) * 0.1  # flat: top-p 0.9 needs ~55
    def draws():
        rows = [_row(1.0, 0, 0.9, seed=4), _row(1.0, 5, 0.5, seed=5)]
        return [[t for t, _, _ in sample_rows(logits, rows)] for _ in range(30)]
    wide = draws()
    monkeypatch.setattr(sampling, "CANDIDATES", 8)
    assert draws() == wide


def test_a_seeded_row_does_not_depend_on_a_batch_mate_with_a_wider_window(monkeypatch):
    """A filtered row's candidate window is set by its own top-k: a batch-mate whose top-k widens its own window
    (top-k 9 over a window of 3) leaves the row's draws as they are alone, inside the window and past it."""
    import openjamba.serve.sampling as sampling

    monkeypatch.setattr(sampling, "CANDIDATES", 3)
    logits = _logits(2, 12, seed=7) * 0.3  # flat: a top-p set of 0.95 reaches past 3 candidates
    single = [_row(1.0, 0, 0.95, seed=8)]
    alone = [sample_rows(logits[:1], single)[0][0] for _ in range(30)]
    mates = [_row(1.0, 0, 0.95, seed=8), _row(1.0, 9, 1.0, seed=9)]
    assert alone == [sample_rows(logits, mates)[0][0] for _ in range(30)]
    assert len(set(alone)) > 3


def _penalised_row(prompt, temperature=0.0, seed=0, logprobs=None, **settings) -> RowSampling:
    return RowSampling.start(SamplingParams(temperature=temperature, seed=seed, logprobs=logprobs, **settings),
                             prompt, 50)


def adjusted_by_formula(logits, prompt, output, presence=0.0, frequency=0.0, repetition=1.0, bias=None):
    """The adjusted logits written out element by element (the module docstring's order)."""
    x = logits.double().clone()
    for token, value in (bias or {}).items():
        x[token] += value
    for token in set(prompt) | set(output):
        x[token] = x[token] / repetition if x[token] > 0 else x[token] * repetition
    for token in set(output):
        x[token] -= output.count(token) * frequency + presence
    return x


def test_penalties_and_logit_bias_follow_their_formulas_step_after_step():
    """Greedy rows with penalties pick the argmax of the adjusted logits, counting their own tokens as they go; a row
    without penalties beside them is untouched; logprobs stay those of the model's own distribution."""
    logits = _logits(3, seed=4)
    prompt = logits[0].topk(3).indices.tolist()  # the strongest tokens are in the prompt: the penalty bites
    settings = dict(presence=0.5, frequency=0.7, repetition=1.6, bias={7: 2.5, 11: -4.0})
    rows = [_penalised_row(prompt, presence_penalty=0.5, frequency_penalty=0.7, repetition_penalty=1.6,
                           logit_bias={7: 2.5, 11: -4.0}, logprobs=1),
            _penalised_row([1, 2]),
            _penalised_row(prompt, repetition_penalty=0.8)]
    assert rows[1].penalties is None
    outputs: list[list[int]] = [[], [], []]
    for step in range(12):
        step_logits = logits + 0.05 * step  # the same distribution shifted: only penalties change the choice
        got = sample_rows(step_logits, rows)
        expected0 = adjusted_by_formula(step_logits[0], prompt, outputs[0], **settings)
        assert got[0][0] == int(expected0.argmax())
        assert abs(got[0][1] - float(torch.log_softmax(step_logits[0], -1)[got[0][0]])) < 1e-5  # raw logprob
        assert got[1][0] == int(step_logits[1].argmax())
        assert got[2][0] == int(adjusted_by_formula(step_logits[2], prompt, outputs[2], repetition=0.8).argmax())
        for out, g in zip(outputs, got):
            out.append(g[0])
    assert len(set(outputs[0])) > 3  # the penalties moved the greedy choice around
    assert rows[0].penalties.counts.sum() == 12 and rows[0].penalties.counts[outputs[0][0]] >= 1


def test_logit_bias_forces_or_bans_a_token_for_sampled_rows_too():
    logits = _logits(2, seed=5)
    banned = int(logits[1].argmax())
    rows = [_penalised_row([3], temperature=1.0, seed=1, logit_bias={9: 100.0}),
            _penalised_row([3], temperature=0.0, logit_bias={banned: -100.0})]
    for _ in range(20):
        forced, other = (t for t, _, _ in sample_rows(logits, rows))
        assert forced == 9 and other != banned


def test_min_p_keeps_the_tokens_within_min_p_of_the_most_likely_and_follows_their_distribution():
    vocab = 12
    logits = _logits(2, vocab, seed=6)
    rows = [_penalised_row([0], temperature=0.9, seed=2, min_p=0.2), _penalised_row([0], temperature=1.0, seed=3)]
    draws = torch.tensor([[t for t, _, _ in sample_rows(logits, rows)] for _ in range(1500)])
    probs = (logits[0] / 0.9).softmax(-1)
    kept = probs >= 0.2 * probs.max()
    assert 1 < int(kept.sum()) < vocab  # the filter keeps some and drops some
    expected = torch.where(kept, probs, torch.zeros(())) / probs[kept].sum()
    freq = torch.bincount(draws[:, 0], minlength=vocab).float() / len(draws)
    assert set(draws[:, 0].tolist()) <= set(kept.nonzero()[:, 0].tolist())
    assert (freq - expected).abs().max() < 0.05
    assert len(set(draws[:, 1].tolist())) > int(kept.sum())  # its batch-mate without min_p is not filtered


def test_sampling_params_reject_bad_settings_by_name():
    for settings, match in [
        (dict(min_p=1.5), "min_p"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=-3), "frequency_penalty"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(logit_bias={50: 1.0}), "vocabulary"),
        (dict(logit_bias={3: 101.0}), r"\[-100, 100\]"),
        (dict(top_k=-1), "top_k"),
    ]:
        with pytest.raises(ValueError, match=match):
            SamplingParams(**settings).check(50)
    SamplingParams(min_p=0.1, repetition_penalty=1.1, logit_bias={49: -100.0}).check(50)
