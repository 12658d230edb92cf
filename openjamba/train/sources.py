"""Where the trainer's sequences come from: prepared token shards (`--task lm`) or generated MQAR (`--task mqar`).

A source hands out (input_ids, labels) pairs as a pure function of (seed, position), so a resumed run continues
on exactly the sequences it would have seen, and a fixed validation set. Language modelling trains on every next
token (labels are the inputs); MQAR labels are -100 except at the answers, so the loss is recall alone and the
validation pass also counts recall accuracy.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

import numpy as np
import torch

from ..synthetic.mqar import MQARConfig, mqar_batch
from ..tokenizer import Tokenizer
from .config import TASKS, TrainConfig
from .data import BatchSampler, TokenData, eval_indices

Batch = tuple[torch.Tensor, torch.Tensor]  # (input_ids, labels), each (count, seq_len) int64


class TokenSource:
    """Language modelling on a prepared data directory (`openjamba prepare`): labels are the inputs."""

    reports_accuracy = False

    def __init__(self, cfg: TrainConfig) -> None:
        self.data = TokenData(cfg.data)
        self.sampler = BatchSampler(self.data.windows("train", cfg.seq_len), cfg.seed)
        self.val_windows = self.data.windows("val", cfg.seq_len)
        self.val_indices = eval_indices(self.val_windows, cfg.eval_batches * cfg.batch_size)
        self.vocab_size, self.fingerprint = self.data.vocab_size, self.data.fingerprint
        meta = self.data.meta
        self.special_ids = {"pad_token_id": meta.get("pad_id"), "bos_token_id": meta.get("bos_id"),
                            "eos_token_id": meta.get("eos_id")}

    def tokenizer(self) -> Tokenizer | None:
        return self.data.tokenizer()

    def check_vocab(self, model_vocab_size: int) -> None:
        self.data.check_vocab(model_vocab_size)

    def train_batch(self, start: int, count: int) -> Batch:
        ids = self.sampler.get(start, count)
        return ids, ids

    @property
    def val_size(self) -> int:
        return len(self.val_indices)

    def val_batch(self, positions: np.ndarray) -> Batch:
        ids = self.val_windows.get(self.val_indices[positions])
        return ids, ids

    def describe(self, seq_len: int) -> str:
        return (f"data: {self.data.directory} ({self.data.meta['splits']['train']['tokens']:,} train tokens, "
                f"{len(self.sampler.windows):,} sequences of {seq_len}); {self.val_size} validation sequences")


class MQARSource:
    """Multi-query associative recall, generated on the fly: sequence i of a run comes from chunk i // CHUNK,
    generated with the seed (seed, 0, chunk), so any position is reproducible without state; the validation set
    is generated from (seed, 1) and never overlaps the training stream's seeds."""

    reports_accuracy = True
    CHUNK = 64  # sequences generated per call: numpy's set-up cost is paid once per chunk, not per sequence

    def __init__(self, cfg: TrainConfig) -> None:
        self.config = mqar_config(cfg)
        self.config.validate()
        self.seed = cfg.seed
        self.vocab_size = self.config.vocab_size
        self.special_ids: dict[str, int | None] = {"pad_token_id": 0, "bos_token_id": None, "eos_token_id": None}
        digest = hashlib.sha256(json.dumps({"task": "mqar", **asdict(self.config)}, sort_keys=True).encode())
        self.fingerprint = digest.hexdigest()[:16]
        self._val = mqar_batch(max(1, cfg.eval_batches * cfg.batch_size), self.config, seed=[cfg.seed, 1])
        self._chunk_index, self._chunk = -1, (torch.empty(0), torch.empty(0))

    def tokenizer(self) -> Tokenizer | None:
        return None  # synthetic tokens: the exported model has no tokenizer

    def check_vocab(self, model_vocab_size: int) -> None:
        if model_vocab_size < self.vocab_size:
            raise ValueError(f"the model's vocab_size {model_vocab_size} is smaller than --mqar-vocab-size "
                             f"{self.vocab_size}")

    def _chunk_rows(self, chunk: int) -> Batch:
        if chunk != self._chunk_index:
            self._chunk = mqar_batch(self.CHUNK, self.config, seed=[self.seed, 0, chunk])
            self._chunk_index = chunk
        return self._chunk

    def train_batch(self, start: int, count: int) -> Batch:
        ids, labels = [], []
        for i in range(start, start + count):
            chunk_ids, chunk_labels = self._chunk_rows(i // self.CHUNK)
            ids.append(chunk_ids[i % self.CHUNK])
            labels.append(chunk_labels[i % self.CHUNK])
        return torch.stack(ids), torch.stack(labels)

    @property
    def val_size(self) -> int:
        return len(self._val[0])

    def val_batch(self, positions: np.ndarray) -> Batch:
        index = torch.from_numpy(np.asarray(positions, dtype=np.int64))
        return self._val[0][index], self._val[1][index]

    def describe(self, seq_len: int) -> str:
        c = self.config
        return (f"data: MQAR (vocabulary {c.vocab_size}, {c.num_kv_pairs} key-value pairs, {c.queries} queries, "
                f"sequences of {seq_len}, generated); {self.val_size} validation sequences")


DataSource = TokenSource | MQARSource


def mqar_config(cfg: TrainConfig) -> MQARConfig:
    """The generator settings of an MQAR run: the --mqar-* fields, with the run's --seq-len."""
    return MQARConfig(vocab_size=cfg.mqar_vocab_size, seq_len=cfg.seq_len, num_kv_pairs=cfg.mqar_kv_pairs,
                      num_queries=cfg.mqar_queries, power_a=cfg.mqar_power_a)


def make_source(cfg: TrainConfig) -> DataSource:
    if cfg.task == "mqar":
        return MQARSource(cfg)
    if cfg.task == "lm":
        return TokenSource(cfg)
    raise ValueError(f"unknown task {cfg.task!r}; choose from {', '.join(TASKS)}")
