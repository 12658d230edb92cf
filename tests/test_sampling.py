"""The serving batch's sampler (serve/sampling.py): one pass for rows with their own settings and random streams."""

from __future__ import annotations

import torch

from openjamba.serve.sampling import RowSampling, sample_rows


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
