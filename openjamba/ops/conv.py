"""Causal depthwise conv1d over a token-major sequence, with a carried-in window, and its one-token step.

The window holds the last (kernel - 1) inputs of the previous chunk, so a sequence fed in chunks of any length
(down to one token while decoding) gives exactly the result of one pass over the whole sequence.
`causal_conv1d_update` is the decoding step: one token, the window updated in place, in a handful of tensor ops
(a decode step is bound by per-op overhead, so fewer ops beat a compiled kernel call here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    window: torch.Tensor | None = None,
    silu: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y_t = act(bias + sum_k weight[:, k] * x_{t-K+1+k}).

    x: (batch, length, channels); weight: (channels, K); window: (batch, K-1, channels) or None for zeros.
    Returns y (batch, length, channels) and the new window (batch, K-1, channels).
    """
    batch, length, channels = x.shape
    kernel = weight.shape[-1]
    if window is None:
        window = x.new_zeros(batch, kernel - 1, channels)
    padded = torch.cat([window.to(x.dtype), x], dim=1)  # (batch, K-1+length, channels)
    y = padded[:, 0:length] * weight[:, 0]
    for k in range(1, kernel):  # K is tiny (4): a loop over taps, not over tokens
        y = y + padded[:, k : k + length] * weight[:, k]
    if bias is not None:
        y = y + bias
    if silu:
        y = F.silu(y)
    return y, padded[:, length:]


def causal_conv1d_update(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    window: torch.Tensor,
    silu: bool = True,
) -> torch.Tensor:
    """One decoding step of `causal_conv1d_ref`: x (batch, channels) is the new input and window (batch, K-1,
    channels) the previous K-1 inputs; the window is shifted by one and x appended, in place. Returns y (batch,
    channels), what `causal_conv1d_ref` gives for a length-1 sequence (up to the order of the tap sum)."""
    padded = torch.cat([window.to(x.dtype), x.unsqueeze(1)], dim=1)  # (batch, K, channels)
    y = (padded * weight.t()).sum(1)  # weight (channels, K) -> (K, channels), broadcast over the batch
    if bias is not None:
        y = y + bias
    window.copy_(padded[:, 1:])
    return F.silu(y) if silu else y
