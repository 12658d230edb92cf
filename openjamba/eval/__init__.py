"""Evaluation: perplexity and bits per byte, the lm-evaluation-harness adapter, MQAR synthetic recall.

`harness` needs the optional `lm_eval` package (`pip install openjamba[eval]`), so it is not imported here.
"""

from .mqar import MQARConfig, mqar_accuracy, mqar_batch
from .perplexity import PerplexityResult, document_nlls, evaluate_texts, read_texts, score_spans

__all__ = ["MQARConfig", "PerplexityResult", "document_nlls", "evaluate_texts", "mqar_accuracy", "mqar_batch",
           "read_texts", "score_spans"]
