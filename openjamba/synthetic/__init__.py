"""Synthetic tasks, generated on the fly and scored exactly: what both the trainer (`--task mqar`) and the
architecture ablation use, so neither `train/` nor `eval/` owns them.

`mqar`: multi-query associative recall (Zoology), which separates models that can look things up in their
context from fixed-state recurrences.
"""

from .mqar import IGNORE_INDEX, MQARConfig, answer_hits, mqar_accuracy, mqar_batch

__all__ = ["IGNORE_INDEX", "MQARConfig", "answer_hits", "mqar_accuracy", "mqar_batch"]
