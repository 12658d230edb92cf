"""Shared pieces of the training tests: a small synthetic Python corpus and a tiny model/run configuration."""

from __future__ import annotations

import random
from pathlib import Path

from openjamba.train import TrainConfig

from .conftest import BASE

# The conftest's tiny architecture (4 layers, hidden 32, 4 experts, attention at layer 2); vocabulary and special
# ids come from the prepared data.
TINY_MODEL = {k: v for k, v in BASE.items() if k not in ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")}
DENSE_MODEL = {**TINY_MODEL, "num_experts": 1, "num_experts_per_tok": 1}
# With attention dropout a step draws from the global RNG, so an exact resume must also restore the RNG state.
DROPOUT_MODEL = {**TINY_MODEL, "attention_dropout": 0.1}


def write_corpus(root: Path, files: int = 12, functions: int = 40, seed: int = 0) -> Path:
    """Python-like text files with enough variety that a model cannot memorise them in a few steps."""
    rng = random.Random(seed)
    names = ["alpha", "beta", "gamma", "delta", "value", "items", "count", "total", "result", "index"]
    root.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        lines = [f'"""Module {f}: generated for tests."""', "import os", ""]
        for i in range(functions):
            a, b = rng.sample(names, 2)
            lines += [f"def {a}_{i}({a}, {b}={rng.randint(0, 99)}):",
                      f"    if {a} > {b}:",
                      f"        return {a} * {rng.randint(2, 9)} - {b}",
                      f"    return [{b} for {b} in range({a})]", ""]
        (root / f"module_{f:02d}.py").write_text("\n".join(lines))
    return root


def tiny_config(data: Path, out: Path, **overrides) -> TrainConfig:
    """A run of the tiny model that takes well under a second per few steps on a CPU."""
    fields = dict(data=str(data), out=str(out), model=dict(TINY_MODEL), steps=8, batch_size=4, seq_len=32,
                  lr=3e-3, warmup_steps=2, log_every=1, eval_every=4, eval_batches=1, save_every=4, keep=3)
    fields.update(overrides)
    return TrainConfig(**fields)
