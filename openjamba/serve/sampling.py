"""A request's sampling settings, and sampling a serving batch in one pass: every row with its own settings and
random stream.

Each row's logits are first adjusted where it asks (in vLLM's order): its `logit_bias` added, then the repetition
penalty over the tokens of its prompt and output (transformers' `repetition_penalty`: a positive logit divided by
it, a negative one multiplied), then OpenAI's frequency and presence penalties over its output's tokens
(logit - count * frequency - (count > 0) * presence), and its stop tokens held back until `min_tokens` are out.
Greedy rows then take one argmax together. Sampled rows are filtered together (temperature, min-p, then top-k and
top-p, as `generate.sample_next` does for one setting) with their parameters as tensors, and each draws its token
by the inverse of its own cumulative distribution at one uniform number from its own `torch.Generator` (on the
host): a seeded request consumes one number of its own stream per token, so its tokens do not depend on its
batch-mates. Logprobs are those of the model's own distribution (before any adjustment, temperature or filter:
vLLM's default) and are computed only for the rows asking. The result is read back to the host once: token ids,
and the logprobs of the rows that asked.

Once its token is picked, a row with a constraint (JSON mode, serve/json_mode.py) has it checked; only a token the
constraint rejects costs the mask of allowed tokens, and the row picks again from its adjusted logits with every other
token masked out: the argmax of those when greedy, else a draw (one more number of its stream) with its filters on
the allowed tokens. Accepting a valid draw and redrawing an invalid one from the masked distribution samples exactly
the masked distribution (p_t + P(invalid) p_t / P(valid) = p_t / P(valid)) when no top-k/top-p filter is set.
"""

from __future__ import annotations

import json
import math
import random
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import ops

CANDIDATES = 256  # logits per row the top-k / top-p filters look at first
MAX_LOGIT_BIAS = 100.0  # OpenAI's bound on a logit_bias value
GENERATION_CONFIG_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def generation_config_defaults(model_dir: Path) -> dict[str, float]:
    """The sampling defaults a checkpoint recommends in its generation_config.json, as vLLM takes them (its
    `--generation-config auto`): temperature, top_p, top_k, min_p and repetition_penalty, whatever `do_sample` says.
    A request's own values win over these. Raises ValueError for a value that is not a number."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    config = json.loads(path.read_text())
    if not isinstance(config, dict):
        raise ValueError("not a JSON object")
    found = {key: config[key] for key in GENERATION_CONFIG_KEYS if config.get(key) is not None}
    for key, value in found.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
    if "top_k" in found:
        found["top_k"] = int(found["top_k"])
    return found


@dataclass
class SamplingParams:
    """A request's settings (the engine's API). The neutral values leave a setting off: temperature 0 is greedy,
    top_k 0, top_p 1, min_p 0, the penalties 0 (repetition 1) and an empty logit_bias."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0  # tokens less likely than min_p times the most likely one are dropped (vLLM, llama.cpp)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to EOS
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS and stop_token_ids cannot be sampled before this many tokens (vLLM)
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob plus the top k alternatives
    prompt_logprobs: int | None = None  # k >= 0: each prompt token's too (serve/scoring.py; no state reuse)
    constraint: Callable[[list[int]], Any] | None = None  # (stop ids) -> a row's constraint: allows, mask, advance

    def check(self, vocab_size: int) -> None:
        """ValueError naming the first invalid setting."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be a positive number, got {self.repetition_penalty}")
        for token, bias in self.logit_bias.items():
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
                raise ValueError(f"logit_bias: token id {token!r} is not in the vocabulary (0..{vocab_size - 1})")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias: the bias of token {token} must be in [-100, 100], got {bias}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
                raise ValueError(f"{name} must be None or an integer >= 0, got {k!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids (0..{vocab_size - 1})")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an integer from 0 to max_tokens, got {self.min_tokens!r}")


@dataclass
class Penalties:
    """A row's logit adjustments (see the module's docstring) and what they need: each token's count in the output
    (dense, updated in place) and the distinct tokens of the prompt and the output, the only logits the penalties
    touch, so a step adjusts those few rather than the whole vocabulary; and the stop tokens `min_tokens` holds
    back (their logits -inf until that many tokens are out)."""

    presence: float
    frequency: float
    repetition: float
    bias_ids: torch.Tensor | None  # (N,) the logit_bias tokens
    bias_values: torch.Tensor | None  # (N,) their biases
    counts: torch.Tensor  # (V,) float32: how often each token occurs in the output so far
    seen_ids: torch.Tensor  # (S,) the distinct tokens of the prompt and the output so far
    seen: set[int]
    held: torch.Tensor | None = None  # (H,) stop tokens held back (-inf) until `min_tokens` are out
    min_tokens: int = 0
    produced: int = 0

    @classmethod
    def of(cls, params: SamplingParams, prompt: list[int], vocab_size: int,
           stop_ids: list[int]) -> Penalties | None:
        """The row's penalties (`stop_ids`: the ids that would end it, held back until `min_tokens`); None when
        every setting is neutral (the row's logits are used as they are)."""
        p = params
        if (not p.logit_bias and p.presence_penalty == 0 and p.frequency_penalty == 0 and p.repetition_penalty == 1
                and (p.min_tokens == 0 or not stop_ids)):
            return None
        bias_ids = torch.tensor(list(p.logit_bias), dtype=torch.long) if p.logit_bias else None
        bias_values = torch.tensor(list(p.logit_bias.values()), dtype=torch.float32) if p.logit_bias else None
        seen_ids = torch.tensor(prompt, dtype=torch.long).unique()
        held = torch.tensor(sorted(set(stop_ids)), dtype=torch.long) if p.min_tokens and stop_ids else None
        return cls(p.presence_penalty, p.frequency_penalty, p.repetition_penalty, bias_ids, bias_values,
                   torch.zeros(vocab_size), seen_ids, set(seen_ids.tolist()), held, p.min_tokens)

    def add(self, token: int) -> None:
        """Count a sampled token."""
        self.produced += 1
        self.counts[token] += 1
        if token not in self.seen:
            self.seen.add(token)
            self.seen_ids = torch.cat([self.seen_ids, torch.tensor([token], device=self.seen_ids.device)])

    def apply(self, row: torch.Tensor) -> None:
        """Adjust one row of logits (V,) in place."""
        if self.counts.device != row.device:  # the first step on an accelerator
            self.counts, self.seen_ids = self.counts.to(row.device), self.seen_ids.to(row.device)
            if self.bias_ids is not None:
                self.bias_ids, self.bias_values = self.bias_ids.to(row.device), self.bias_values.to(row.device)
            if self.held is not None:
                self.held = self.held.to(row.device)
        if self.bias_ids is not None:
            row.index_add_(0, self.bias_ids, self.bias_values)
        ids = self.seen_ids
        x = row[ids]
        if self.repetition != 1:
            x = torch.where(x > 0, x / self.repetition, x * self.repetition)
        if self.presence != 0 or self.frequency != 0:
            count = self.counts[ids]
            x = x - count * self.frequency - (count > 0).float() * self.presence
        row[ids] = x
        if self.held is not None and self.produced < self.min_tokens:
            row[self.held] = float("-inf")


@dataclass
class RowSampling:
    """One row's sampler: its settings as the batch needs them, its random stream and its penalties' counts."""

    temperature: float
    top_k: int
    top_p: float
    generator: torch.Generator | None
    logprobs: int | None
    min_p: float = 0.0
    penalties: Penalties | None = None
    constraint: Any = None  # e.g. json_mode.JsonConstraint

    @classmethod
    def start(cls, params: SamplingParams, prompt: list[int], vocab_size: int, stop_ids: list[int] = (),
              seeds: random.Random | None = None) -> RowSampling:
        """A request's sampler: a sampling request's generator on the host, seeded from `seed`, else from `seeds`
        (the engine's stream, vLLM's `--seed`), else at random; `stop_ids`: the tokens that would end the request
        (held back until `min_tokens`)."""
        generator = None
        if params.temperature > 0:
            generator = torch.Generator()
            if params.seed is not None:
                generator.manual_seed(params.seed)
            else:  # only an unseeded request draws from the engine's stream
                generator.manual_seed(seeds.getrandbits(63) if seeds is not None else secrets.randbits(63))
        return cls(params.temperature, params.top_k, params.top_p, generator, params.logprobs, params.min_p,
                   Penalties.of(params, prompt, vocab_size, list(stop_ids)),
                   params.constraint(list(stop_ids)) if params.constraint else None)


Sampled = tuple[int, float | None, list[tuple[int, float]] | None]  # token, its logprob, the top alternatives


def sample_rows(logits: torch.Tensor, rows: list[RowSampling]) -> list[Sampled]:
    """One (token, logprob, top logprobs) per row of logits (B, V); each penalised row counts its token."""
    raw, logits = logits, _penalised(logits, rows)
    tokens = ops.argmax(logits)
    drawn = [i for i, row in enumerate(rows) if row.temperature > 0]
    if drawn:
        index = torch.tensor(drawn, device=logits.device)
        tokens = tokens.index_put((index,), _draw(logits.index_select(0, index), [rows[i] for i in drawn]))
    asking = [i for i, row in enumerate(rows) if row.logprobs is not None]
    token_list = tokens.tolist()
    if any(row.constraint is not None for row in rows):
        tokens = _constrained(logits, rows, tokens, token_list)
    for row, token in zip(rows, token_list):
        if row.penalties is not None:
            row.penalties.add(token)
    if not asking:
        return [(token, None, None) for token in token_list]
    index = torch.tensor(asking, device=raw.device)
    logprobs = torch.log_softmax(raw.index_select(0, index).float(), dim=-1)  # (A, V)
    chosen = logprobs.gather(1, tokens.index_select(0, index)[:, None])[:, 0]
    k = min(max(rows[i].logprobs for i in asking), logprobs.shape[1])
    top_values, top_ids = logprobs.topk(k, dim=-1)
    chosen, top_values, top_ids = chosen.tolist(), top_values.tolist(), top_ids.tolist()
    out: list[Sampled] = [(token, None, None) for token in token_list]
    for a, i in enumerate(asking):
        n = rows[i].logprobs
        out[i] = (token_list[i], chosen[a], list(zip(top_ids[a][:n], top_values[a][:n])))
    return out


def _constrained(logits: torch.Tensor, rows: list[RowSampling], tokens: torch.Tensor,
                 token_list: list[int]) -> torch.Tensor:
    """Each constrained row's token made one its constraint allows (`token_list` updated in place, the tokens
    returned), and the constraint advanced by it."""
    changed = False
    for i, row in enumerate(rows):
        if row.constraint is None:
            continue
        if not row.constraint.allows(token_list[i]):
            allowed = row.constraint.mask(logits.shape[1]).to(logits.device)
            masked = logits[i:i + 1].float().masked_fill(~allowed, float("-inf"))
            if not torch.isfinite(masked).any():  # the row's adjustments ruled out every allowed token
                masked = torch.zeros_like(masked).masked_fill(~allowed, float("-inf"))
            pick = ops.argmax(masked) if row.temperature == 0 else _draw(masked, [row])
            token_list[i], changed = int(pick[0]), True
        row.constraint.advance(token_list[i])
    return torch.tensor(token_list, dtype=tokens.dtype, device=tokens.device) if changed else tokens


def _penalised(logits: torch.Tensor, rows: list[RowSampling]) -> torch.Tensor:
    """The logits (B, V) with each penalised row's adjustments applied (a new tensor; the same one when none)."""
    if all(row.penalties is None for row in rows):
        return logits
    adjusted = logits.float().clone()
    for i, row in enumerate(rows):
        if row.penalties is not None:
            row.penalties.apply(adjusted[i])
    return adjusted


def _draw(logits: torch.Tensor, rows: list[RowSampling]) -> torch.Tensor:
    """Tokens (S,) drawn from logits (S, V) of rows that sample, each filtered with its own settings: rows that keep
    every token straight from their softmax, the others by `_filtered`."""
    vocab, device = logits.shape[1], logits.device
    temperature = torch.tensor([row.temperature for row in rows], dtype=torch.float32, device=device)
    scaled = logits.float() / temperature[:, None]
    if any(row.min_p > 0 for row in rows):  # drop tokens less likely than min_p times the row's most likely one
        log_min_p = torch.tensor([row.min_p for row in rows], device=device).log()[:, None]  # -inf where off
        scaled = scaled.masked_fill(scaled < scaled.amax(-1, keepdim=True) + log_min_p, float("-inf"))
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
    chosen = [rows[i] for i in filtered]
    width = min(vocab, max(CANDIDATES, *(row.top_k for row in chosen if row.top_k < vocab)))
    tokens[index] = _filtered(scaled[index], chosen, uniform[index], width)
    return tokens


def _filtered(scaled: torch.Tensor, rows: list[RowSampling], uniform: torch.Tensor, width: int) -> torch.Tensor:
    """Top-k then top-p, as `generate.sample_next`, over each row's `width` largest logits (at least every row's
    top-k; a full sort of 65,536 logits costs ~6 ms a row on one CPU thread, their top 256 ~0.2 ms), or over the
    whole sorted vocabulary for the rows whose top-p set reaches past them. The window's width does not change a
    row's token: the largest logits come first in the same order whatever the width."""
    vocab, device = scaled.shape[1], scaled.device
    top_k = [row.top_k if 0 < row.top_k < vocab else vocab for row in rows]
    values, order = scaled.topk(width, dim=-1) if width < vocab else scaled.sort(dim=-1, descending=True)
    kth = values.gather(1, (torch.tensor(top_k, device=device).clamp(max=width) - 1)[:, None])
    values = values.masked_fill(values < kth, float("-inf"))  # ties with the k-th largest are kept
    # Normalised over each row's whole top-k set: its window, or the whole vocabulary when top-k is off.
    limited = torch.tensor([k < vocab for k in top_k], device=device)
    total = torch.where(limited, values.logsumexp(-1), scaled.logsumexp(-1))
    probs = (values - total[:, None]).exp()
    cumulative = probs.cumsum(-1)
    top_p = torch.tensor([row.top_p for row in rows], dtype=torch.float32, device=device)
    kept = probs.masked_fill(cumulative - probs >= top_p[:, None], 0.0)  # the smallest prefix reaching top_p
    picked = order.gather(1, _invert(kept, uniform)[:, None])[:, 0]
    if width < vocab:  # rows whose top-p set reaches past the window: again over the sorted vocabulary
        wider = (~limited & (cumulative[:, -1] < top_p)).nonzero()[:, 0]
        if len(wider):
            picked[wider] = _filtered(scaled[wider], [rows[i] for i in wider.tolist()], uniform[wider], vocab)
    return picked


def _invert(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Per row the first index whose cumulative probability exceeds uniform * total: a draw from probs (R, N)."""
    last = probs.shape[1] - 1
    cumulative = probs.cumsum(-1)
    picked = torch.searchsorted(cumulative, (uniform * cumulative[:, -1])[:, None], right=True)[:, 0].clamp_(max=last)
    # A token of probability zero is never picked: step back over a run of them (rounding at the tail).
    at = cumulative.gather(1, picked[:, None])
    return torch.where(probs.gather(1, picked[:, None])[:, 0] > 0, picked, (cumulative < at).sum(-1).clamp_(max=last))
