"""Training: data preparation, the trainer, checkpoints and distributed runs. See `openjamba prepare|train`.

The names below are imported on first use, so that `openjamba info` or `generate` do not pay for loading the
distributed-checkpoint machinery.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "TrainConfig": "config", "DataError": "data", "TokenData": "data", "prepare": "data",
    "NonFiniteLoss": "trainer", "TrainingInterrupted": "trainer", "TrainResult": "trainer", "train": "trainer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
