"""Generation: chunked prefill into a hybrid cache, then one token at a time, with greedy or sampled decoding.

The inference core is `prefill` (a prompt into a cache) and `decode_step` (one token per row); `generate`, the
benchmark and the serving engine (serve/engine.py) are built on them.

Only last-position logits are computed, and a long prompt is prefilled in chunks, so memory stays bounded by
the weights, the attention K/V and one chunk's activations whatever the prompt length.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Protocol

import torch

from . import ops


class Streamer(Protocol):
    """transformers-compatible streamer: `put` gets the prompt (B, T) first, then each step's tokens (B,)."""

    def put(self, tokens: torch.Tensor) -> None: ...

    def end(self) -> None: ...


class TextStreamer:
    """Prints decoded text as it is generated (batch size 1), like transformers' TextStreamer: `decode_kwargs`
    go to `tokenizer.decode` (`skip_special_tokens=True` leaves out an ending `<eos>`)."""

    def __init__(self, tokenizer, skip_prompt: bool = True, stream=None, **decode_kwargs) -> None:
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.stream = stream or sys.stdout
        self.decode_kwargs = decode_kwargs
        self.ids: list[int] = []
        self.printed = 0
        self.seen_prompt = False

    def put(self, tokens: torch.Tensor) -> None:
        if tokens.dim() > 1 and tokens.shape[0] > 1:
            raise ValueError("TextStreamer supports batch size 1 only")
        if not self.seen_prompt:
            self.seen_prompt = True
            if self.skip_prompt:
                return
        self.ids.extend(tokens.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, **self.decode_kwargs)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return
        self.stream.write(text[self.printed:])
        self.stream.flush()
        self.printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, **self.decode_kwargs)
        self.stream.write(text[self.printed:] + "\n")
        self.stream.flush()
        self.ids, self.printed, self.seen_prompt = [], 0, False


def sample_next(
    logits: torch.Tensor,
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    min_p: float | None = None,
) -> torch.Tensor:
    """logits (B, V) -> next tokens (B,). Greedy, or `filter_logits` then sampling."""
    if not do_sample:
        return ops.argmax(logits)
    probs = filter_logits(logits, temperature, top_k, top_p, min_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, min_p: float | None = None) -> torch.Tensor:
    """transformers' sampling warpers in their order: temperature, top-k, top-p, then min-p (tokens less likely
    than min_p times the most likely one dropped); dropped tokens' logits are -inf."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        logits = _top_p(logits, top_p)
    if min_p is not None and min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return logits


def _top_p(logits: torch.Tensor, top_p: float, window: int = 256) -> torch.Tensor:
    """The smallest set of each row's largest logits whose probability reaches top_p kept, the rest -inf; looked for
    among the `window` largest first (sorting 65,536 logits costs ~6 ms a row on one CPU thread, their top 256
    ~0.2 ms), among all of them when a row's set reaches further."""
    vocab = logits.shape[-1]
    width = min(window, vocab)
    values, order = logits.topk(width, dim=-1) if width < vocab else logits.sort(dim=-1, descending=True)
    probs = (values - logits.logsumexp(-1, keepdim=True)).exp()
    cumulative = probs.cumsum(-1)
    if width < vocab and bool((cumulative[:, -1] < top_p).any()):
        return _top_p(logits, top_p, vocab)
    kept = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, cumulative - probs < top_p)
    return logits.masked_fill(~kept, float("-inf"))


def penalise_repeats(logits: torch.Tensor, sequences: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition_penalty: the logits (B, V) of the tokens in each row's sequence (B, T) so far
    divided by `penalty` where positive, multiplied where negative (a new tensor). Ids of V or more (left padding,
    marked so by the caller) are left out."""
    vocab = logits.shape[1]
    ids = sequences.clamp(max=vocab)
    widened = torch.nn.functional.pad(logits, (0, 1))  # (B, V + 1): column V takes the marked ids
    seen = widened.gather(1, ids)
    return widened.scatter(1, ids, torch.where(seen < 0, seen * penalty, seen / penalty))[:, :vocab]


def _check_args(input_ids, max_new_tokens, do_sample, temperature, top_k, top_p, prefill_chunk_size, min_p,
                repetition_penalty) -> None:
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError(f"input_ids must be a (batch, length) integer tensor, got {tuple(input_ids.shape)} "
                         f"{input_ids.dtype}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty: give at least one prompt token (e.g. the BOS token)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if min_p is not None and not 0 <= min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    if repetition_penalty is not None and not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if prefill_chunk_size < 1:
        raise ValueError(f"prefill_chunk_size must be >= 1, got {prefill_chunk_size}")


def check_left_padded(attention_mask: torch.Tensor | None) -> None:
    """Generation continues from each row's last position, so padding must come first (left padding): with
    right padding the model would continue from a pad token and give wrong results without any error."""
    if attention_mask is None or attention_mask.shape[1] < 2:
        return
    mask = attention_mask.to(torch.int8)
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError("attention_mask has padding after real tokens (right padding); generation needs left "
                         "padding: pad at the start of each row (transformers: tokenizer.padding_side = 'left')")


@torch.no_grad()
def prefill(
    model,
    input_ids: torch.Tensor,
    cache,
    chunk_size: int = 2048,
    attention_mask: torch.Tensor | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Run the prompt (B, T) into `cache` `chunk_size` tokens at a time; the last position's logits (B, V).

    Chunks bound the activations to one chunk's whatever the prompt length, and only the last position's logits
    are computed. `attention_mask` (B, T) marks left padding (0). `on_progress(tokens_done)` is called after
    each chunk.
    """
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty: give at least one prompt token (e.g. the BOS token)")
    if chunk_size < 1:
        raise ValueError(f"prefill chunk size must be >= 1, got {chunk_size}")
    device, length = model.device, input_ids.shape[1]
    for start in range(0, length, chunk_size):
        chunk = slice(start, start + chunk_size)
        mask = attention_mask[:, chunk].to(device) if attention_mask is not None else None
        logits = model(input_ids[:, chunk].to(device), attention_mask=mask, cache=cache, logits_to_keep=1).logits
        if on_progress is not None:
            on_progress(min(start + chunk_size, length))
    return logits[:, -1]


@torch.no_grad()
def decode_step(model, tokens: torch.Tensor, cache) -> torch.Tensor:
    """Feed one token per row (B,) into `cache`; the next-token logits (B, V). Rows may differ in length."""
    return model(tokens[:, None].to(model.device), cache=cache, logits_to_keep=1).logits[:, -1]


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    prefill_chunk_size: int = 2048,
    streamer: Streamer | None = None,
    should_stop: Callable[[torch.Tensor], torch.Tensor] | None = None,
    kv_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Prompt plus up to `max_new_tokens` new tokens per row, (B, T + new), like transformers' generate.

    `attention_mask` marks left padding (0) in a batch of prompts of unequal length. Each row stops at its own
    EOS (`eos_token_id`, default the config's; pass [] to never stop early) and is then filled with
    `pad_token_id` (default the config's, else the EOS id) until every row is done. `should_stop`, called after
    each step with the new tokens so far (B, n), returns a (B,) bool: rows where it is True finish as at EOS
    (stop strings, for instance, which only the caller's tokenizer can see). `kv_dtype` stores the attention K/V
    narrower than the model (see `make_cache`): torch.bfloat16 halves a long context's cache. `min_p` and
    `repetition_penalty` (over each row's prompt, left padding excluded, and new tokens) are transformers'.
    """
    _check_args(input_ids, max_new_tokens, do_sample, temperature, top_k, top_p, prefill_chunk_size, min_p,
                repetition_penalty)
    config = model.config
    eos = config.eos_token_ids if eos_token_id is None else (
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    pad = pad_token_id if pad_token_id is not None else (
        config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0))
    device = model.device
    input_ids = input_ids.to(device)
    batch, prompt_len = input_ids.shape
    if streamer is not None:
        streamer.put(input_ids.cpu())
    if max_new_tokens == 0:
        if streamer is not None:
            streamer.end()
        return input_ids

    check_left_padded(attention_mask)
    cache = model.make_cache(batch, max_length=prompt_len + max_new_tokens, kv_dtype=kv_dtype)
    logits = prefill(model, input_ids, cache, prefill_chunk_size, attention_mask)

    eos_tensor = torch.tensor(eos, device=device, dtype=torch.long)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    new_tokens = []
    penalised = repetition_penalty is not None and repetition_penalty != 1.0
    if penalised:  # the ids the penalty counts: left padding marked with the vocabulary's size
        counted = input_ids if attention_mask is None else input_ids.masked_fill(
            attention_mask.to(device) == 0, config.vocab_size)
    for step in range(max_new_tokens):
        if penalised:
            logits = penalise_repeats(logits, torch.cat([counted, *(t[:, None] for t in new_tokens)], 1),
                                      repetition_penalty)
        next_tokens = sample_next(logits, do_sample, temperature, top_k, top_p, generator, min_p)
        next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad))
        new_tokens.append(next_tokens)
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        if eos:
            unfinished &= ~torch.isin(next_tokens, eos_tensor)
        if should_stop is not None:
            unfinished &= ~should_stop(torch.stack(new_tokens, dim=1)).to(device)
        if not bool(unfinished.any()) or step == max_new_tokens - 1:
            break
        logits = decode_step(model, next_tokens, cache)
    if streamer is not None:
        streamer.end()
    return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)
