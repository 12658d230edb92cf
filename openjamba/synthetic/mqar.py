"""MQAR, multi-query associative recall (Zoology, Arora et al. 2023): the synthetic task that separates models
that can look things up in their context (attention) from fixed-state recurrences (plain SSMs).

A sequence lists `num_kv_pairs` key-value pairs, then asks about `num_queries` of the keys again, each query key
followed by its value, at random places in the rest of the sequence; everything else is filler (random value
tokens, or 0), never a key token, so only the queries ask anything:

    k1 v1 k2 v2 k3 v3 k4 v4 | . . k3 v3 . k1 v1 . . . k4 v4 . .

Keys and values come from disjoint token ranges (keys [1, vocab/2), values [vocab/2, vocab)); keys are unique
within a sequence, so every answer is determined by the context. Labels follow the model's convention (aligned
with the inputs, shifted inside the loss): -100 everywhere except at the answer values, so
`model(input_ids, labels=labels).loss` trains exactly "predict the value after a query key".

Query positions follow Zoology's power law over the gaps (small `power_a` puts most queries soon after the
pairs); `power_a=None` spreads them uniformly. Generation is vectorised with numpy (no per-token Python loop).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

IGNORE_INDEX = -100
_BLOCK_ELEMENTS = 1 << 24  # rows are generated in blocks whose random matrices stay below this many elements


@dataclass(frozen=True)
class MQARConfig:
    vocab_size: int = 8192
    seq_len: int = 256
    num_kv_pairs: int = 16
    num_queries: int | None = None  # default: every key is queried once
    power_a: float | None = 0.01  # Zoology's default; None for uniformly placed queries
    random_filler: bool = True  # filler drawn from the value tokens (never a key: filler cannot pose a query), else 0

    @property
    def queries(self) -> int:
        return self.num_kv_pairs if self.num_queries is None else self.num_queries

    @property
    def key_range(self) -> tuple[int, int]:
        return 1, self.vocab_size // 2

    @property
    def value_range(self) -> tuple[int, int]:
        return self.vocab_size // 2, self.vocab_size

    @property
    def query_slots(self) -> int:
        """Two-token places (key, value) after the pairs where a query can go."""
        return (self.seq_len - 2 * self.num_kv_pairs) // 2

    def validate(self) -> None:
        low, high = self.key_range
        if self.num_kv_pairs < 1 or not 1 <= self.queries <= self.num_kv_pairs:
            raise ValueError(f"need 1 <= num_queries ({self.queries}) <= num_kv_pairs ({self.num_kv_pairs})")
        if high - low < self.num_kv_pairs:
            raise ValueError(f"vocab_size {self.vocab_size} leaves {high - low} key tokens for "
                             f"{self.num_kv_pairs} unique keys per sequence")
        if self.query_slots < self.queries:
            raise ValueError(f"seq_len {self.seq_len} is too short for {self.num_kv_pairs} pairs and "
                             f"{self.queries} queries (needs at least {2 * (self.num_kv_pairs + self.queries)})")
        if self.power_a is not None and self.power_a <= 0:
            raise ValueError(f"power_a must be > 0 (or None for uniform), got {self.power_a}")


def _random_subset(rng: np.random.Generator, rows: int, population: int, k: int,
                   log_weights: np.ndarray | None = None) -> np.ndarray:
    """(rows, k) distinct indices from range(population) per row, in random order.

    Gumbel top-k: perturbing log-weights with Gumbel noise and keeping the k largest draws k items without
    replacement with probabilities proportional to the weights (uniform when there are none).
    """
    if log_weights is None:
        scores = rng.random((rows, population))  # cheaper than Gumbel noise, and the same ranking law
    else:
        scores = rng.gumbel(size=(rows, population)) + log_weights
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)  # decreasing score: a random order
    return np.take_along_axis(top, order, axis=1)


def _generate_block(config: MQARConfig, rows: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    pairs, queries, slots = config.num_kv_pairs, config.queries, config.query_slots
    key_low, key_high = config.key_range
    keys = key_low + _random_subset(rng, rows, key_high - key_low, pairs)  # (rows, pairs), unique per row
    values = rng.integers(*config.value_range, size=(rows, pairs))
    asked = _random_subset(rng, rows, pairs, queries)  # which pairs are queried, in query order

    log_weights = None
    if config.power_a is not None:  # Zoology: p(gap g) ∝ a * g^(a-1), g = 1..slots
        log_weights = (config.power_a - 1) * np.log(np.arange(1, slots + 1))
    slot = np.sort(_random_subset(rng, rows, slots, queries, log_weights), axis=1)  # (rows, queries)

    if config.random_filler:
        inputs = rng.integers(*config.value_range, size=(rows, config.seq_len))
    else:
        inputs = np.zeros((rows, config.seq_len), dtype=np.int64)
    labels = np.full((rows, config.seq_len), IGNORE_INDEX, dtype=np.int64)
    inputs[:, 0:2 * pairs:2] = keys
    inputs[:, 1:2 * pairs:2] = values
    key_pos = 2 * pairs + 2 * slot  # (rows, queries)
    row = np.arange(rows)[:, None]
    inputs[row, key_pos] = np.take_along_axis(keys, asked, axis=1)
    inputs[row, key_pos + 1] = labels[row, key_pos + 1] = np.take_along_axis(values, asked, axis=1)
    return inputs, labels


def mqar_batch(
    num_examples: int, config: MQARConfig | None = None, seed: int = 0, **overrides
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels), each (num_examples, seq_len) int64; labels are -100 except at the answer values.

    Deterministic for a seed. Keyword overrides change fields of `config` (or of the default config), e.g.
    `mqar_batch(64, vocab_size=256, seq_len=64, num_kv_pairs=8, seed=1)`.
    """
    config = replace(config or MQARConfig(), **overrides)
    config.validate()
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_ELEMENTS // max(config.vocab_size, config.seq_len))
    parts = [_generate_block(config, min(block, num_examples - start), rng)
             for start in range(0, num_examples, block)]
    inputs = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, config.seq_len), dtype=np.int64)
    labels = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, config.seq_len), dtype=np.int64)
    return torch.from_numpy(inputs.astype(np.int64)), torch.from_numpy(labels)


def answer_hits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, answers): argmax predictions at the positions before the answers, given (batch, seq, vocab)
    logits and aligned (batch, seq) labels; shared by `mqar_accuracy` and the trainer's validation pass."""
    target = labels[:, 1:].to(logits.device)  # position t predicts token t + 1
    asked = target != IGNORE_INDEX
    predicted = logits[:, :-1].argmax(-1)
    return int((predicted == target)[asked].sum()), int(asked.sum())


@torch.no_grad()
def mqar_accuracy(model, input_ids: torch.Tensor, labels: torch.Tensor, batch_size: int = 64) -> float:
    """Fraction of answers (labels != -100) that argmax decoding predicts from the position before them.

    Runs the model in eval mode (and restores its mode), `batch_size` sequences per forward.
    """
    if input_ids.shape != labels.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} differ in shape")
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start:start + batch_size].to(model.device)
            hit, count = answer_hits(model(ids).logits, labels[start:start + batch_size])
            correct, total = correct + hit, total + count
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("labels mark no answers (all -100)")
    return correct / total
