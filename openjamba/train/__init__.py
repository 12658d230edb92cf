"""Training: data preparation, the trainer, checkpoints and distributed runs. See `openjamba prepare|train`."""

from .config import TrainConfig
from .data import DataError, TokenData, prepare
from .trainer import NonFiniteLoss, TrainingInterrupted, TrainResult, train

__all__ = ["DataError", "NonFiniteLoss", "TokenData", "TrainConfig", "TrainResult", "TrainingInterrupted", "prepare",
           "train"]
