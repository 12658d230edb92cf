"""Evaluation of a trained model: perplexity and bits per byte, and the lm-evaluation-harness adapter.

MQAR, the synthetic recall task, lives in `openjamba.synthetic`; the architecture ablation, which trains models
before measuring them, in `openjamba.train.ablate`.

`harness` needs the optional `lm_eval` package (`pip install openjamba[eval]`), so it is not imported here.
"""

from .perplexity import PerplexityResult, document_nlls, evaluate_texts, score_spans

__all__ = ["PerplexityResult", "document_nlls", "evaluate_texts", "score_spans"]
