"""Kernels used by the Mamba mixer, each a plain PyTorch reference plus faster implementations.

The model calls only the three dispatchers below; they pick the implementation for the device.
"""

from __future__ import annotations

import torch

from .conv import causal_conv1d_ref
from .scan import selective_scan_chunked, selective_scan_ref, selective_state_update_ref

__all__ = [
    "causal_conv1d",
    "causal_conv1d_ref",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_ref",
    "selective_state_update",
    "selective_state_update_ref",
]


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Full-sequence selective scan; see `ops.scan` for the contract."""
    return selective_scan_chunked(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_final_state
    )


def selective_state_update(
    state: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """One decoding step, updating `state` in place."""
    return selective_state_update_ref(state, u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    window: torch.Tensor | None = None,
    silu: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv with a carried-in window; see `ops.conv`."""
    return causal_conv1d_ref(x, weight, bias, window, silu)
