"""What the engine keeps per request and sends back: its events (`TokenEvent`, `FinishEvent`), the log of the
loop's iterations (`Iteration`), the full-queue error, and `Request`, one request's bookkeeping from submission to
its end (queued, prefilling, decoding, preempted and resumed)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..cache import HybridCache, RowState
from .sampling import RowSampling, SamplingParams
from .scoring import PromptLogprob


def starts_with(tokens: list[int], prefix: list[int]) -> bool:
    """`tokens` begins with `prefix` (not longer): last and first ids first: long prompts that differ copy nothing."""
    n = len(prefix)
    return tokens[n - 1] == prefix[n - 1] and tokens[0] == prefix[0] and tokens[:n] == prefix


@dataclass
class TokenEvent:
    request_id: int
    token_id: int
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None
    prompt_logprobs: list[PromptLogprob] | None = None  # on a first token: prompt tokens 1.. when asked
    cached_tokens: int = 0  # prompt tokens read from the state store (known once the request is admitted)


@dataclass
class FinishEvent:
    request_id: int
    reason: str  # "stop" | "length" | "cancelled" | "abort" (Engine.abort_all) | "error"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    error: str | None = None


Event = TokenEvent | FinishEvent


@dataclass(frozen=True)
class Iteration:
    """What one iteration of the loop did and when (`time.perf_counter()` seconds): its prefill work (chunks of
    prompts, `prefill_tokens` in all) and its decode step for `rows` rows, first tokens, sampling and events
    included. The engine keeps the last `Engine.ITERATIONS_KEPT`: `Engine.iterations()`."""

    start: float
    prefill_s: float
    prefill_tokens: int
    decode_s: float
    rows: int
    end: float


class EngineFull(Exception):
    """The waiting queue is full: try again after `retry_after` seconds (a server answers 429 with Retry-After)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]
    submitted: float
    output: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    # The stored state its prompt extends, until its first chunk runs; or, once preempted (it has output then), its
    # exact state after prompt + output[:-1] until it rejoins the batch (None: it re-reads them).
    resume: RowState | None = None
    cache: HybridCache | None = None  # its own one-row cache once its first chunk has run alone
    prefilled: int = 0  # prompt tokens in `cache`
    keep_at: list[int] = field(default_factory=list)  # prompt positions to keep the state at, ascending
    logits: torch.Tensor | None = None  # (1, V) after the last prefilled token
    admitted: float | None = None  # time.monotonic() when it left the queue
    sampling: RowSampling | None = None  # its sampling settings and generator, set when admitted
    stops: frozenset[int] = frozenset()  # the ids that end it: its stop_token_ids, and EOS unless ignore_eos
    scored: list[PromptLogprob] | None = None  # its prompt logprobs so far, when it asks for them

    def length(self) -> int:
        """Tokens its row holds when it joins the batch: the prompt, and all but the last output token (the next
        step's input) when it resumes after a preemption."""
        return len(self.prompt) + max(len(self.output) - 1, 0)
