"""Prompt logprobs: a prompt's prefill chunk run with every position's logits, scored against the prompt's own tokens.

A request with `SamplingParams.prompt_logprobs = k` (vLLM's name; what `/v1/completions` with echo and logprobs
asks for, and what lm-eval's `local-completions` model scores with) gets, for every prompt token after the first,
its logprob under the model given the tokens before it and the model's k most likely tokens there: the
`log_softmax` of the raw logits in float32, as `sampling.sample_rows` computes a generated token's.

Only (chosen logprob, top k) leave each chunk: the chunk's (T, V) logits live until the chunk is scored, and their
float32 log-softmax is taken `ROWS` positions at a time, so no (T, V) tensor of the whole prompt is ever made.
"""

from __future__ import annotations

import torch

ROWS = 64  # positions per float32 log-softmax: bounds its transient to ROWS x V floats

PromptLogprob = tuple[float, list[tuple[int, float]]]  # the prompt token's logprob, the top (id, logprob) there


@torch.no_grad()
def prefill_scored(model, ids: torch.Tensor, targets: list[int], cache, k: int,
                   out: list[PromptLogprob]) -> torch.Tensor:
    """Run one prompt chunk `ids` (1, T) into `cache` with all T positions' logits; append to `out` one entry per
    position that has a next prompt token (`targets`: the T tokens after each position, or T - 1 when the chunk
    ends the prompt). Returns the last position's logits (1, V), as `generate.prefill` does."""
    logits = model(ids.to(model.device), cache=cache, logits_to_keep=0).logits[0]  # (T, V)
    wanted = torch.tensor(targets, dtype=torch.long, device=logits.device)
    k = min(k, logits.shape[-1])
    for start in range(0, len(targets), ROWS):
        logprobs = torch.log_softmax(logits[start:start + ROWS].float(), dim=-1)
        chosen = logprobs.gather(1, wanted[start:start + ROWS, None])[:, 0].tolist()
        top_values, top_ids = (t.tolist() for t in logprobs.topk(k, dim=-1))
        out.extend((c, list(zip(i, v))) for c, i, v in zip(chosen, top_ids, top_values))
    return logits[-1:].clone()  # a copy: a view would keep the chunk's (T, V) logits alive in the stored state
