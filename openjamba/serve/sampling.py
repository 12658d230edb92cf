"""Sampling a serving batch in one pass: every row with its own temperature, top-k, top-p and random stream.

Greedy rows take one argmax together. Sampled rows are filtered together (temperature, then top-k, then top-p, as
`generate.sample_next` does for one setting) with their parameters as tensors, and each draws its token by the
inverse of its own cumulative distribution at one uniform number from its own `torch.Generator` (on the host): a
seeded request consumes one number of its own stream per token, so its tokens do not depend on its batch-mates.
Logprobs (of the model's distribution, before temperature and filtering) are computed only for the rows asking.
The result is read back to the host once: token ids, and the logprobs of the rows that asked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops

CANDIDATES = 256  # logits per row the top-k / top-p filters look at first


@dataclass
class RowSampling:
    """One row's settings: temperature 0 is greedy, top_k 0 and top_p 1 are off, logprobs None asks for none."""

    temperature: float
    top_k: int
    top_p: float
    generator: torch.Generator | None
    logprobs: int | None


Sampled = tuple[int, float | None, list[tuple[int, float]] | None]  # token, its logprob, the top alternatives


def sample_rows(logits: torch.Tensor, rows: list[RowSampling]) -> list[Sampled]:
    """One (token, logprob, top logprobs) per row of logits (B, V)."""
    tokens = ops.argmax(logits)
    drawn = [i for i, row in enumerate(rows) if row.temperature > 0]
    if drawn:
        index = torch.tensor(drawn, device=logits.device)
        tokens = tokens.index_put((index,), _draw(logits.index_select(0, index), [rows[i] for i in drawn]))
    asking = [i for i, row in enumerate(rows) if row.logprobs is not None]
    if not asking:
        return [(token, None, None) for token in tokens.tolist()]
    index = torch.tensor(asking, device=logits.device)
    logprobs = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)  # (A, V)
    chosen = logprobs.gather(1, tokens.index_select(0, index)[:, None])[:, 0]
    k = min(max(rows[i].logprobs for i in asking), logprobs.shape[1])
    top_values, top_ids = logprobs.topk(k, dim=-1)
    token_list, chosen, top_values, top_ids = tokens.tolist(), chosen.tolist(), top_values.tolist(), top_ids.tolist()
    out: list[Sampled] = [(token, None, None) for token in token_list]
    for a, i in enumerate(asking):
        n = rows[i].logprobs
        out[i] = (token_list[i], chosen[a], list(zip(top_ids[a][:n], top_values[a][:n])))
    return out


def _draw(logits: torch.Tensor, rows: list[RowSampling]) -> torch.Tensor:
    """Tokens (S,) drawn from logits (S, V) of rows that sample, each filtered with its own settings."""
    vocab, device = logits.shape[1], logits.device
    temperature = torch.tensor([row.temperature for row in rows], dtype=torch.float32, device=device)
    scaled = logits.float() / temperature[:, None]
    uniform = torch.stack([torch.rand((), generator=row.generator) for row in rows]).to(device)  # one per row
    plain = [i for i, row in enumerate(rows) if row.top_k in (0, vocab) and row.top_p >= 1]
    if len(plain) == len(rows):
        return _invert(scaled.softmax(-1), uniform)
    tokens = torch.empty(len(rows), dtype=torch.long, device=device)
    if plain:
        index = torch.tensor(plain, device=device)
        tokens[index] = _invert(scaled[index].softmax(-1), uniform[index])
    filtered = sorted(set(range(len(rows))) - set(plain))
    index = torch.tensor(filtered, device=device)
    tokens[index] = _filtered(scaled[index], [rows[i] for i in filtered], uniform[index])
    return tokens


def _filtered(scaled: torch.Tensor, rows: list[RowSampling], uniform: torch.Tensor,
              candidates: int = CANDIDATES) -> torch.Tensor:
    """Top-k then top-p, as `generate.sample_next`, over the best `candidates` logits of each row (a full sort of the
    vocabulary costs ~1 ms a row on one CPU thread), or over all of them when a row's top-p set reaches further."""
    vocab, device = scaled.shape[1], scaled.device
    top_k = [row.top_k if 0 < row.top_k < vocab else vocab for row in rows]
    width = min(vocab, max(candidates, *top_k))
    values, order = scaled.topk(width, dim=-1) if width < vocab else scaled.sort(dim=-1, descending=True)
    kth = values.gather(1, (torch.tensor(top_k, device=device).clamp(max=width) - 1)[:, None])
    values = values.masked_fill(values < kth, float("-inf"))  # ties with the k-th largest are kept
    # Normalised over each row's whole top-k set: its window, or the whole vocabulary when top-k is off.
    limited = torch.tensor([k < vocab for k in top_k], device=device)
    total = torch.where(limited, values.logsumexp(-1), scaled.logsumexp(-1))
    probs = (values - total[:, None]).exp()
    cumulative = probs.cumsum(-1)
    top_p = torch.tensor([row.top_p for row in rows], dtype=torch.float32, device=device)
    if width < vocab and bool(((cumulative[:, -1] < top_p) & ~limited).any()):  # a top-p set beyond the window
        return _filtered(scaled, rows, uniform, vocab)
    drop = cumulative - probs >= top_p[:, None]  # keep the smallest prefix reaching top_p
    picked = _invert(values.masked_fill(drop, float("-inf")).softmax(-1), uniform)
    return order.gather(1, picked[:, None])[:, 0]


def _invert(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Per row the first index whose cumulative probability exceeds uniform * total: a draw from probs (R, N)."""
    last = probs.shape[1] - 1
    cumulative = probs.cumsum(-1)
    picked = torch.searchsorted(cumulative, (uniform * cumulative[:, -1])[:, None], right=True)[:, 0].clamp_(max=last)
    # A token of probability zero is never picked: step back over a run of them (rounding at the tail).
    at = cumulative.gather(1, picked[:, None])
    return torch.where(probs.gather(1, picked[:, None])[:, 0] > 0, picked, (cumulative < at).sum(-1).clamp_(max=last))
