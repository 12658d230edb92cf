"""The hybrid cache: K/V for the attention layers, a conv window and an SSM state for the Mamba layers.

A Mamba layer's state is a constant size whatever the context length (conv window (B, K-1, inner) in the model
dtype, SSM state (B, inner, N) in fp32); only the few attention layers hold per-token K/V. That asymmetry is
Jamba's memory advantage, and `nbytes()` makes it visible.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .model import JambaForCausalLM


class MambaState:
    def __init__(self, batch: int, inner: int, state_size: int, kernel: int, dtype: torch.dtype, device) -> None:
        self.conv = torch.zeros(batch, kernel - 1, inner, dtype=dtype, device=device)
        self.ssm = torch.zeros(batch, inner, state_size, dtype=torch.float32, device=device)

    def update(self, conv: torch.Tensor, ssm: torch.Tensor) -> None:
        self.conv.copy_(conv)
        self.ssm.copy_(ssm)

    def tensors(self) -> list[torch.Tensor]:
        return [self.conv, self.ssm]

    def reorder(self, index: torch.Tensor) -> None:
        self.conv = self.conv.index_select(0, index.to(self.conv.device))
        self.ssm = self.ssm.index_select(0, index.to(self.ssm.device))


class KVCache:
    """K/V of one attention layer, (B, kv_heads, capacity, head_dim); grows by doubling unless `static`."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, capacity: int, static: bool, dtype, device) -> None:
        self.static = static
        self.k = torch.zeros(batch, kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def append(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        if end > self.k.shape[2]:
            if self.static:
                raise ValueError(f"cache is full: {end} tokens exceed its max_length of {self.k.shape[2]}")
            self._grow(max(end, 2 * self.k.shape[2]))
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def _grow(self, capacity: int) -> None:
        extra = capacity - self.k.shape[2]
        pad = self.k.new_zeros(*self.k.shape[:2], extra, self.k.shape[3])
        self.k = torch.cat([self.k, pad], dim=2)
        self.v = torch.cat([self.v, pad], dim=2)

    def tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v]

    def reorder(self, index: torch.Tensor) -> None:
        self.k = self.k.index_select(0, index.to(self.k.device))
        self.v = self.v.index_select(0, index.to(self.v.device))


class HybridCache:
    """Per-layer state for continuing a sequence: `layers[i]` is a KVCache or a MambaState."""

    def __init__(
        self, model: JambaForCausalLM, batch_size: int, max_length: int | None = None, dtype: torch.dtype | None = None,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        config = model.config
        self.batch_size = batch_size
        self.max_length = max_length
        self.seq_len = 0
        self.key_mask: torch.Tensor | None = None  # (B, tokens) bools, only once padding has been seen
        self.layers: list[KVCache | MambaState] = []
        for layer in model.model.layers:
            param = next(layer.parameters())
            layer_dtype = dtype or param.dtype
            if layer.is_attention:
                capacity = max_length if max_length is not None else 256
                self.layers.append(KVCache(
                    batch_size, config.num_key_value_heads, config.head_dim, capacity, max_length is not None,
                    kv_dtype or layer_dtype, param.device,
                ))
            else:
                self.layers.append(MambaState(
                    batch_size, config.mamba_inner_size, config.mamba_d_state, config.mamba_d_conv,
                    layer_dtype, param.device,
                ))

    def advance(self, length: int) -> None:
        self.seq_len += length

    def extend_key_mask(self, token_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
        """Record which of the next `length` tokens are real; returns validity of all keys so far, or None."""
        if self.max_length is not None and self.seq_len + length > self.max_length:
            raise ValueError(
                f"cache is full: {self.seq_len} cached + {length} new tokens exceed its max_length of {self.max_length}"
            )
        if token_mask is None and self.key_mask is None:
            return None
        if token_mask is None:
            token_mask = torch.ones(self.batch_size, length, dtype=torch.bool, device=self.key_mask.device)
        if self.key_mask is None:
            self.key_mask = torch.ones(self.batch_size, self.seq_len, dtype=torch.bool, device=token_mask.device)
        self.key_mask = torch.cat([self.key_mask[:, : self.seq_len], token_mask], dim=1)
        return self.key_mask

    def nbytes(self) -> int:
        """Bytes held by the cache (K/V counted at their allocated capacity)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())

    def kv_nbytes(self) -> int:
        return sum(t.nbytes for layer in self.layers if isinstance(layer, KVCache) for t in layer.tensors())

    def mamba_nbytes(self) -> int:
        return sum(t.nbytes for layer in self.layers if isinstance(layer, MambaState) for t in layer.tensors())

    def reorder(self, index: torch.Tensor | list[int]) -> None:
        """Keep/reorder batch rows (beam search, dropping finished rows): row i becomes old row index[i]."""
        index = torch.as_tensor(index, dtype=torch.long)
        for layer in self.layers:
            layer.reorder(index)
        if self.key_mask is not None:
            self.key_mask = self.key_mask.index_select(0, index.to(self.key_mask.device))
        self.batch_size = int(index.numel())
