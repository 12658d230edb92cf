"""Perplexity and bits-per-byte: sliding-window scoring of long texts, shared with the lm-eval adapter.

Three layers, each usable alone:
  score_spans        log p of the last n tokens of each token span, batched with right padding (a causal model:
                     trailing pads cannot change earlier positions), logits only where something is scored
  document_nlls      each document's total NLL, long ones in sliding windows of `context_length` tokens that
                     advance by `stride`, so a token is scored with at least context_length - stride + 1 tokens
                     of context (all of it when the document fits)
  evaluate_texts     texts -> tokens -> document_nlls, plus the UTF-8 bytes that turn NLL into bits per byte

`document_nlls` takes any iterable of token-id arrays, so other sources (memory-mapped token shards, say) plug in
without touching the scoring; `openjamba.corpus.read_corpus` turns files, directories and JSONL into texts for
`evaluate_texts`, by the same rules as `prepare`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

Span = tuple[Sequence[int], int]  # (tokens, n): the model reads tokens[:-1] and is scored on the last n tokens


# ---------------------------------------------------------------------- scoring token spans
@torch.no_grad()
def _score_batch(model, spans: Sequence[Span], pad_id: int) -> list[tuple[float, bool]]:
    """One right-padded forward; returns (sum of log-probs of the scored tokens, all of them greedy) per span."""
    lengths = [len(tokens) - 1 for tokens, _ in spans]  # model inputs per row
    width = max(lengths)
    first_scored = [length - n for length, (_, n) in zip(lengths, spans)]  # position predicting the first target
    keep = width - min(first_scored)  # logits only from the earliest scored position on
    offset = width - keep
    inputs = torch.full((len(spans), width), pad_id, dtype=torch.long)
    targets = torch.full((len(spans), keep), -100, dtype=torch.long)
    for row, ((tokens, n), length) in enumerate(zip(spans, lengths)):
        tokens = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
        inputs[row, :length] = tokens[:-1]
        targets[row, length - n - offset:length - offset] = tokens[-n:]
    device = model.device
    logits = model(inputs.to(device), logits_to_keep=keep).logits  # (B, keep, V)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    targets = targets.to(device)
    scored = targets != -100
    picked = logprobs.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)  # (B, keep)
    sums = torch.where(scored, picked, 0.0).sum(-1).tolist()
    greedy = ((logprobs.argmax(-1) == targets) | ~scored).all(-1).tolist()
    return list(zip(sums, greedy))


def score_spans(
    model, spans: Sequence[Span], batch_size: int = 8, pad_id: int | None = None, progress: tqdm | None = None
) -> list[tuple[float, bool]]:
    """(log p(last n tokens | the tokens before them), whether argmax decoding gives them) for each span.

    Spans are sorted by length so a batch carries little padding; results come back in the given order.
    `progress`, when given, advances by one per span.
    """
    if any(n < 1 or len(tokens) < n + 1 for tokens, n in spans):
        raise ValueError("each span needs at least one scored token and one token before it")
    pad = pad_id if pad_id is not None else (model.config.pad_token_id or 0)
    order = sorted(range(len(spans)), key=lambda i: -len(spans[i][0]))
    results: list[tuple[float, bool]] = [(0.0, True)] * len(spans)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        for i, result in zip(chunk, _score_batch(model, [spans[i] for i in chunk], pad)):
            results[i] = result
        if progress is not None:
            progress.update(len(chunk))
    return results


# ---------------------------------------------------------------------- documents in sliding windows
def rolling_windows(num_tokens: int, context_length: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(start, stop, n) over seq = [prefix] + tokens: the span seq[start:stop] scores its last n tokens.

    Every token is scored exactly once. The first window scores all it holds; each later one scores the next
    `stride` tokens after as much preceding context as fits in `context_length` inputs. With stride ==
    context_length this is lm-eval's `loglikelihood_rolling` convention (disjoint windows).
    """
    if not 1 <= stride <= context_length:
        raise ValueError(f"stride must be in [1, context_length={context_length}], got {stride}")
    done = 0
    while done < num_tokens:
        n = min(context_length if done == 0 else stride, num_tokens - done)
        end = done + n  # seq index of the last target
        yield max(0, end - context_length), end + 1, n
        done = end


def document_nlls(
    model,
    documents: Iterable[Sequence[int] | np.ndarray],
    prefix_token_id: int,
    context_length: int = 2048,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool | tqdm = False,
    total_tokens: int | None = None,
) -> list[tuple[float, int]]:
    """(NLL in nats, tokens scored) per document; every token is scored, the first one after `prefix_token_id`.

    Documents are scored independently (no context crosses a document boundary); windows of different documents
    share batches. `stride` defaults to half the context. `progress=True` shows a bar in tokens (or pass one).
    """
    stride = stride or default_stride(context_length)
    bar = progress if isinstance(progress, tqdm) else tqdm(
        total=total_tokens, unit="tok", unit_scale=True, desc="scoring",
        disable=None if progress else True)  # None: no bar into a non-terminal (a redirected log)
    results: list[tuple[float, int]] = []
    pending: list[tuple[int, Span]] = []

    def flush() -> None:
        scores = score_spans(model, [span for _, span in pending], batch_size)
        for (doc, _), (logprob, _) in zip(pending, scores):
            nll, count = results[doc]
            results[doc] = (nll - logprob, count)
        bar.update(sum(span[1] for _, span in pending))
        pending.clear()

    for doc, tokens in enumerate(documents):
        seq = np.concatenate([[prefix_token_id], np.asarray(tokens, dtype=np.int64)])
        results.append((0.0, len(seq) - 1))
        for start, stop, n in rolling_windows(len(seq) - 1, context_length, stride):
            pending.append((doc, (seq[start:stop], n)))
            if len(pending) == batch_size:
                flush()
    if pending:
        flush()
    if bar is not progress:
        bar.close()
    return results


def default_stride(context_length: int) -> int:
    """Half the context: each token is scored after at least half a window of context, at twice the cost of
    disjoint windows (stride = context_length, lm-eval's choice)."""
    return max(1, context_length // 2)


def prefix_token_id(config) -> int:
    """The token a document is scored after: BOS, else the first EOS (lm-eval's choice too)."""
    if config.bos_token_id is not None:
        return config.bos_token_id
    if config.eos_token_ids:
        return config.eos_token_ids[0]
    raise ValueError("the config has neither bos_token_id nor eos_token_id: nothing to condition the first token on")


# ---------------------------------------------------------------------- texts
@dataclass
class PerplexityResult:
    nll: float  # total negative log-likelihood, nats
    tokens: int
    bytes: int | None  # UTF-8 bytes of the scored text; None when scoring bare token ids
    documents: int
    context_length: int
    stride: int
    seconds: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")

    @property
    def bits_per_token(self) -> float:
        return self.nll / math.log(2) / self.tokens if self.tokens else float("nan")

    @property
    def bits_per_byte(self) -> float | None:
        """Tokenizer-independent: comparable across vocabularies, unlike perplexity."""
        return self.nll / math.log(2) / self.bytes if self.bytes else None

    def to_dict(self) -> dict:
        return {**asdict(self), "perplexity": self.perplexity, "bits_per_token": self.bits_per_token,
                "bits_per_byte": self.bits_per_byte}

    def summary(self) -> str:
        bpb = f"{self.bits_per_byte:.4f}" if self.bits_per_byte is not None else "n/a"
        size = f"{self.tokens:,} tokens" + (f", {self.bytes:,} bytes" if self.bytes is not None else "")
        rate = self.tokens / self.seconds if self.seconds > 0 else float("inf")
        return (f"perplexity {self.perplexity:.4f} | bits/byte {bpb} | bits/token {self.bits_per_token:.4f} | "
                f"{size}, {self.documents:,} documents | context {self.context_length}, stride {self.stride} | "
                f"{self.seconds:.1f} s, {rate:,.0f} tok/s")


def evaluate_texts(
    model,
    tokenizer,
    texts: Iterable[str],
    context_length: int = 2048,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity and bits per byte of a model on texts, each scored as its own document after the BOS token.

    Texts are tokenized without special tokens (the prefix is added here, whatever the tokenizer's post-processor
    would do); empty texts are skipped. Bits per byte divide by the UTF-8 size of the original texts.
    """
    stride = stride or default_stride(context_length)
    started = time.perf_counter()
    documents, num_bytes = [], 0
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if ids:
            documents.append(ids)
            num_bytes += len(text.encode("utf-8"))
    nlls = document_nlls(model, documents, prefix_token_id(model.config), context_length, stride, batch_size,
                         progress=progress, total_tokens=sum(map(len, documents)))
    return PerplexityResult(
        nll=sum(nll for nll, _ in nlls), tokens=sum(n for _, n in nlls), bytes=num_bytes, documents=len(nlls),
        context_length=context_length, stride=stride, seconds=time.perf_counter() - started)
