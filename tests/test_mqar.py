"""MQAR: the generator's sequences are answerable from their context alone; accuracy counts argmax answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from openjamba.model import causal_lm_loss
from openjamba.synthetic.mqar import IGNORE_INDEX, MQARConfig, mqar_accuracy, mqar_batch

from .conftest import random_model

SMALL = dict(vocab_size=64, seq_len=48, num_kv_pairs=6)


@pytest.mark.parametrize("overrides", [{}, {"num_queries": 3}, {"power_a": None, "random_filler": False},
                                       {"num_kv_pairs": 1, "seq_len": 4}])
def test_every_answer_is_the_value_paired_with_the_query_key_earlier(overrides):
    config = MQARConfig(**{**SMALL, **overrides})
    inputs, labels = mqar_batch(200, config, seed=3)
    assert inputs.shape == labels.shape == (200, config.seq_len)
    assert inputs.dtype == labels.dtype == torch.int64
    pairs = 2 * config.num_kv_pairs
    key_low, key_high = config.key_range
    value_low, value_high = config.value_range
    assert key_high <= value_low  # disjoint ranges
    for row, row_labels in zip(inputs.tolist(), labels.tolist()):
        keys, values = row[0:pairs:2], row[1:pairs:2]
        assert len(set(keys)) == len(keys) and all(key_low <= k < key_high for k in keys)
        assert all(value_low <= v < value_high for v in values)
        answers = [t for t, label in enumerate(row_labels) if label != IGNORE_INDEX]
        assert len(answers) == config.queries and min(answers) > pairs
        asked = [row[t - 1] for t in answers]
        assert len(set(asked)) == len(asked)  # each queried key is asked once
        for t in answers:
            assert row_labels[t] == row[t] == values[keys.index(row[t - 1])]
        query_tokens = {t for a in answers for t in (a - 1, a)}
        filler = [row[t] for t in range(pairs, config.seq_len) if t not in query_tokens]
        assert not set(filler) & set(range(key_low, key_high))  # filler never poses a query
        if not config.random_filler:
            assert set(filler) <= {0}


def test_deterministic_for_a_seed_and_different_across_seeds():
    first, second = mqar_batch(16, seed=5, **SMALL), mqar_batch(16, seed=5, **SMALL)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], mqar_batch(16, seed=6, **SMALL)[0])
    big = mqar_batch(5, seed=5, vocab_size=8192, seq_len=512, num_kv_pairs=64)[0]
    assert big.shape == (5, 512) and int(big.max()) < 8192


def test_power_law_puts_queries_closer_to_the_pairs_than_uniform():
    def mean_answer_position(power_a):
        _, labels = mqar_batch(500, seed=0, power_a=power_a, **SMALL)
        return (labels != IGNORE_INDEX).nonzero()[:, 1].float().mean().item()

    assert mean_answer_position(0.01) < mean_answer_position(None) - 2


@pytest.mark.parametrize("bad", [dict(num_queries=7), dict(seq_len=20), dict(vocab_size=12), dict(power_a=0.0),
                                 dict(num_kv_pairs=0)])
def test_invalid_configs_are_refused(bad):
    with pytest.raises(ValueError):
        mqar_batch(2, **{**SMALL, **bad})


class RecallOracle(torch.nn.Module):
    """Predicts the value after any key seen in the pairs: perfect recall, computed from the inputs alone."""

    def __init__(self, config: MQARConfig, wrong_rows: int = 0) -> None:
        super().__init__()
        self.config, self.wrong_rows = config, wrong_rows
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def forward(self, input_ids: torch.Tensor):
        batch, length = input_ids.shape
        pairs = 2 * self.config.num_kv_pairs
        keys, values = input_ids[:, 0:pairs:2], input_ids[:, 1:pairs:2]
        match = input_ids[:, :, None] == keys[:, None, :]  # (B, T, pairs)
        predicted = torch.where(match.any(-1), torch.gather(values, 1, match.int().argmax(-1)), 0)
        predicted[:self.wrong_rows] = self.config.value_range[0] - 1  # a key token: never an answer
        return type("Output", (), {"logits": torch.nn.functional.one_hot(predicted, self.config.vocab_size).float()})


def test_accuracy_of_an_oracle_and_of_a_half_wrong_oracle():
    config = MQARConfig(**SMALL)
    inputs, labels = mqar_batch(10, config, seed=1)
    oracle = RecallOracle(config).train()
    assert mqar_accuracy(oracle, inputs, labels, batch_size=3) == 1.0
    assert oracle.training  # mode restored
    assert mqar_accuracy(RecallOracle(config, wrong_rows=5), inputs, labels, batch_size=10) == 0.5


def test_accuracy_and_loss_of_a_jamba_model_match_a_direct_computation():
    config = MQARConfig(vocab_size=97, seq_len=32, num_kv_pairs=4)
    inputs, labels = mqar_batch(6, config, seed=2)
    model = random_model(vocab_size=97)
    correct = total = 0
    for row in range(inputs.shape[0]):
        logits = model(inputs[row:row + 1]).logits[0]
        for t in (labels[row] != IGNORE_INDEX).nonzero()[:, 0].tolist():
            correct += int(logits[t - 1].argmax() == inputs[row, t])
            total += 1
    assert total == 6 * config.queries
    assert mqar_accuracy(model, inputs, labels, batch_size=4) == pytest.approx(correct / total)

    logits = model(inputs).logits
    asked = (labels != IGNORE_INDEX).nonzero()
    manual = -torch.log_softmax(logits.float(), -1)[asked[:, 0], asked[:, 1] - 1, inputs[asked[:, 0], asked[:, 1]]]
    assert causal_lm_loss(logits, labels).item() == pytest.approx(manual.mean().item(), rel=1e-5)
    assert np.isfinite(model(inputs, labels=labels).loss.item())
