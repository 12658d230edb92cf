"""The hybrid cache: K/V for the attention layers, a conv window and an SSM state for the Mamba layers.

A Mamba layer's state is a constant size whatever the context length (conv window (B, K-1, inner) in the model
dtype, SSM state (B, inner, N) in fp32); only the few attention layers hold per-token K/V. That asymmetry is
Jamba's memory advantage, and `nbytes()` makes it visible.

Rows of different lengths (a serving batch: requests admitted mid-flight) share one column axis for the K/V:
every row ends at column `seq_len` and a shorter row's columns before its first token are masked out in
`key_mask`. Jamba's attention sees no positions, so where a key sits does not matter, only whether it is valid;
a batch whose rows all have the same length has no `key_mask` and runs on the unmasked fast paths. Rows join with
`add_rows` and leave with `remove_rows`, and one row's exact state is copied out with `row_state` (a `RowState`)
and back into a fresh cache with `HybridCache.from_row_state`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import ops

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

    def concat_rows(self, other: MambaState) -> None:
        self.conv = torch.cat([self.conv, other.conv.to(self.conv)])
        self.ssm = torch.cat([self.ssm, other.ssm.to(self.ssm)])


class KVCache:
    """K/V of one attention layer, (B, kv_heads, capacity, head_dim); grows by doubling unless `static`."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, capacity: int, static: bool, dtype, device) -> None:
        self.static = static
        self.k = torch.zeros(batch, kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def append(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.reserve(end)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def reserve(self, end: int) -> None:
        """Room for columns up to `end` (a static cache that lacks it raises)."""
        if end > self.k.shape[2]:
            if self.static:
                raise ValueError(f"cache is full: {end} tokens exceed its max_length of {self.k.shape[2]}")
            self._grow(max(end, 2 * self.k.shape[2]))

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

    def concat_rows(self, other: KVCache, used: int, other_used: int, columns: int, limit: int | None = None) -> None:
        """Append other's rows; both sides' used columns end at `columns` (the shorter side padded on the left).
        `limit`: at most this many columns of capacity (never fewer than `columns`)."""
        capacity = max(columns, self.k.shape[2] - used + columns)  # this side's headroom is kept
        if limit is not None:
            capacity = max(columns, min(capacity, limit))
        if self.static:
            if columns > self.k.shape[2]:
                raise ValueError(f"cache is full: {columns} tokens exceed its max_length of {self.k.shape[2]}")
            capacity = self.k.shape[2]
        rows = self.k.shape[0]
        for name in ("k", "v"):
            mine, theirs = getattr(self, name), getattr(other, name)
            # Each element written once: the padding columns zeroed (a masked key must hold a finite value), the
            # used ones copied; the headroom after `columns` is written by `append` before it is ever read.
            joined = mine.new_empty(rows + theirs.shape[0], mine.shape[1], capacity, mine.shape[3])
            joined[:rows, :, :columns - used].zero_()
            joined[:rows, :, columns - used:columns] = mine[:, :, :used]
            joined[rows:, :, :columns - other_used].zero_()
            joined[rows:, :, columns - other_used:columns] = theirs[:, :, :other_used]
            setattr(self, name, joined)

    def resize(self, capacity: int, used: int) -> None:
        """Exactly `capacity` columns (at least `used`), the first `used` kept: a bounded growth or a trim."""
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_empty(*old.shape[:2], capacity, old.shape[3])
            new[:, :, :used] = old[:, :, :used]
            setattr(self, name, new)

    def drop_leading(self, columns: int) -> None:
        """Forget the first `columns` columns (masked in every row), giving their memory back."""
        self.k = self.k[:, :, columns:].contiguous()
        self.v = self.v[:, :, columns:].contiguous()


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
        # Row i's keys are columns row_starts[i]:seq_len, set by add_rows/remove_rows when rows of their own lengths
        # attend to their own keys (ops.attend_to_rows) rather than through one masked call over all columns.
        self.row_starts: list[int] | None = None
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
        if token_mask is not None:
            self.row_starts = None  # padding among the new tokens: rows are no longer one run of keys each
        else:
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

    def kv_capacity(self) -> int:
        """Columns of K/V allocated per row (every attention layer has as many), 0 for a model without attention."""
        return next((layer.k.shape[2] for layer in self.layers if isinstance(layer, KVCache)), 0)

    def resize_kv(self, capacity: int) -> None:
        """Allocate exactly `capacity` columns of K/V per row (not fewer than `seq_len`), keeping the held ones: a
        serving engine bounding its K/V grows and trims the batch with this instead of the doubling of `append`."""
        if capacity < self.seq_len:
            raise ValueError(f"resize_kv: {capacity} columns cannot hold the {self.seq_len} in use")
        for layer in self.layers:
            if isinstance(layer, KVCache) and layer.k.shape[2] != capacity:
                layer.resize(capacity, self.seq_len)

    def mamba_nbytes(self) -> int:
        return sum(t.nbytes for layer in self.layers if isinstance(layer, MambaState) for t in layer.tensors())

    def reorder(self, index: torch.Tensor | list[int]) -> None:
        """Keep/reorder batch rows (beam search, dropping finished rows): row i becomes old row index[i]."""
        index = torch.as_tensor(index, dtype=torch.long)
        self.row_starts = None
        for layer in self.layers:
            layer.reorder(index)
        if self.key_mask is not None:
            self.key_mask = self.key_mask.index_select(0, index.to(self.key_mask.device))
        self.batch_size = int(index.numel())

    # ------------------------------------------------------------------ rows joining and leaving (serving)
    def row_lengths(self) -> list[int]:
        """Tokens held by each row (its valid keys). Reads the key mask back to the host when there is one."""
        if self.key_mask is None:
            return [self.seq_len] * self.batch_size
        return self.key_mask[:, : self.seq_len].sum(1).tolist()

    def add_rows(self, other: HybridCache, max_capacity: int | None = None) -> None:
        """Append `other`'s rows after this cache's rows, each keeping its own length (a request joining a batch).

        Both sides' columns are aligned at their ends; the shorter side's missing columns are masked out. The joined
        K/V keeps this side's headroom after the last column, up to `max_capacity` columns when given.
        """
        if len(other.layers) != len(self.layers):
            raise ValueError("add_rows: the caches belong to different models")
        columns = max(self.seq_len, other.seq_len)
        if self.max_length is not None and columns > self.max_length:
            raise ValueError(f"cache is full: {columns} tokens exceed its max_length of {self.max_length}")
        for mine, theirs in zip(self.layers, other.layers):
            if isinstance(mine, KVCache):
                mine.concat_rows(theirs, self.seq_len, other.seq_len, columns, max_capacity)
            else:
                mine.concat_rows(theirs)
        if self.key_mask is None and other.key_mask is None and self.seq_len == other.seq_len:
            self.key_mask = None
        else:
            self.key_mask = torch.cat([self._key_mask_at(columns), other._key_mask_at(columns)])
        self.seq_len = columns
        self.batch_size += other.batch_size
        self._find_row_starts()

    def _key_mask_at(self, columns: int) -> torch.Tensor:
        """This cache's key validity (B, columns), padded with invalid columns on the left."""
        device = self.layers[0].tensors()[0].device
        mask = torch.zeros(self.batch_size, columns, dtype=torch.bool, device=device)
        valid = self.key_mask[:, : self.seq_len] if self.key_mask is not None else True
        mask[:, columns - self.seq_len:] = valid
        return mask

    def remove_rows(self, rows: list[int]) -> None:
        """Drop rows (finished or cancelled requests); columns no remaining row uses are freed."""
        drop = set(rows)
        self.reorder([i for i in range(self.batch_size) if i not in drop])
        if self.key_mask is not None and self.max_length is None:
            used = self.key_mask[:, : self.seq_len].any(0)  # (columns,)
            first = int(used.int().argmax()) if bool(used.any()) else self.seq_len
            if first > 0:
                for layer in self.layers:
                    if isinstance(layer, KVCache):
                        layer.drop_leading(first)
                self.key_mask = self.key_mask[:, first: self.seq_len]
                self.seq_len -= first
            if bool(self.key_mask.all()):
                self.key_mask = None  # every row has the same length again: back on the unmasked paths
        self._find_row_starts()

    def _find_row_starts(self, max_padding: float = 0.5) -> None:
        """Set `row_starts` when every row's keys are one run ending at the last column (as add_rows leaves them),
        else None (the masked path). Where the device has a one-call `attend_to_rows` (the CPU kernels) that is
        always worth it; otherwise (a loop over rows) only when more than `max_padding` of the columns are
        padding. One host sync."""
        self.row_starts = None
        if self.key_mask is None or self.batch_size == 0:
            return
        mask = self.key_mask[:, : self.seq_len]
        lengths = mask.sum(1)
        starts = self.seq_len - lengths  # (B,)
        columns = torch.arange(self.seq_len, device=mask.device)
        right_aligned = torch.equal(mask, columns[None, :] >= starts[:, None])
        one_call = hasattr(ops.backend_for(mask.device), "attend_to_rows")
        if right_aligned and (one_call or float(lengths.sum()) < (1 - max_padding) * mask.numel()):
            self.row_starts = starts.tolist()

    def row_state(self, row: int, logits: torch.Tensor | None = None) -> RowState:
        """A copy of one row's exact state: its valid K/V per attention layer, conv and SSM state per Mamba layer.

        `logits` (V,), the next-token logits after the row's last token, travel with it so that a request whose
        tokens equal the state's can start sampling without a forward.
        """
        if logits is not None and logits.dim() != 1:  # else the mistake surfaces only when the state is restored
            raise ValueError(f"row_state takes the row's own next-token logits (V,), e.g. logits[{row}] of "
                             f"prefill's (B, V); got shape {tuple(logits.shape)}")
        valid = self.key_mask[row, : self.seq_len] if self.key_mask is not None else None
        tensors = []
        for layer in self.layers:
            if isinstance(layer, KVCache):
                k, v = layer.k[row, :, : self.seq_len], layer.v[row, :, : self.seq_len]  # (kv_heads, columns, hd)
                if valid is not None:
                    k, v = k[:, valid], v[:, valid]
                tensors.append((k.clone(), v.clone()))
            else:
                tensors.append((layer.conv[row].clone(), layer.ssm[row].clone()))
        length = self.seq_len if valid is None else int(valid.sum())
        return RowState(length, tensors, logits.detach().clone() if logits is not None else None)

    @classmethod
    def from_row_state(
        cls, model: JambaForCausalLM, state: RowState, kv_dtype: torch.dtype | None = None,
        capacity: int | None = None,
    ) -> HybridCache:
        """A one-row cache holding `state` exactly, ready to continue (or to join a batch with `add_rows`)."""
        return cls.from_row_states(model, [state], kv_dtype=kv_dtype, capacity=capacity)

    @classmethod
    def from_row_states(
        cls, model: JambaForCausalLM, states: list[RowState], kv_dtype: torch.dtype | None = None,
        capacity: int | None = None,
    ) -> HybridCache:
        """A cache whose row i holds `states[i]` exactly, each row with its own length, as `add_rows` would join the
        one-row caches of `from_row_state` (the K/V right-aligned, a shorter row's first columns masked) but with
        each element written once: many stored states resumed together (requests sharing a system prompt).
        `capacity`: columns of K/V to allocate (default twice the longest state, as `KVCache.append` grows)."""
        if not states:
            raise ValueError("from_row_states needs at least one state")
        for state in {id(state): state for state in states}.values():  # a shared prefix's state: checked once
            state.check(model)
        lengths = [state.length for state in states]
        columns = max(lengths)
        capacity = 2 * columns if capacity is None else max(capacity, columns)
        cache = cls(model, 0, kv_dtype=kv_dtype)  # empty tensors of the right dtypes: every one is replaced below
        cache.batch_size = len(states)
        for i, layer in enumerate(cache.layers):
            if isinstance(layer, KVCache):
                # Copies, never views: the cache is written in place and the states may be held by a store. The
                # headroom after `columns` is written before it is read.
                for name, which in (("k", 0), ("v", 1)):
                    joined = layer.k.new_empty(len(states), layer.k.shape[1], capacity, layer.k.shape[3])
                    for row, state in enumerate(states):
                        if state.length < columns:
                            joined[row, :, : columns - state.length].zero_()  # masked keys hold a finite value
                        joined[row, :, columns - state.length: columns] = state.layers[i][which]
                    setattr(layer, name, joined)  # (B, kv_heads, capacity, hd)
            else:  # one stack per tensor, not one copy per row
                layer.conv = torch.stack([state.layers[i][0] for state in states]).to(layer.conv)
                layer.ssm = torch.stack([state.layers[i][1] for state in states]).to(layer.ssm)
        cache.seq_len = columns
        if min(lengths) < columns:
            device = cache.layers[0].tensors()[0].device
            starts = torch.tensor([columns - n for n in lengths], device=device)
            cache.key_mask = torch.arange(columns, device=device)[None, :] >= starts[:, None]  # (B, columns)
            cache._find_row_starts()
        return cache


@dataclass
class RowState:
    """One sequence's exact state after `length` tokens (a snapshot): per layer (K, V) (kv_heads, length, hd) for
    attention or (conv window, SSM state) for Mamba, and the next-token logits (V,) when known."""

    length: int
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    logits: torch.Tensor | None = None

    def nbytes(self) -> int:
        tensors = [t for pair in self.layers for t in pair] + ([self.logits] if self.logits is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: torch.device | str) -> RowState:
        """This state on `device` (itself if already there): a preempted row's state waits in host memory."""
        moved = [(a.to(device), b.to(device)) for a, b in self.layers]
        logits = self.logits.to(device) if self.logits is not None else None
        return RowState(self.length, moved, logits)

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors (safetensors-serialisable): `layers.{i}.k`/`.v` or `.conv`/`.ssm`, `logits`, `length`."""
        out = {"length": torch.tensor([self.length], dtype=torch.int64)}
        for i, (a, b) in enumerate(self.layers):
            names = ("k", "v") if a.dim() == 3 else ("conv", "ssm")
            out[f"layers.{i}.{names[0]}"], out[f"layers.{i}.{names[1]}"] = a.contiguous(), b.contiguous()
        if self.logits is not None:
            out["logits"] = self.logits.contiguous()
        return out

    @classmethod
    def from_dict(cls, tensors: dict[str, torch.Tensor], model: JambaForCausalLM) -> RowState:
        """The inverse of `to_dict`, checked against the model's layer plan and shapes (a clear ValueError if not)."""
        if "length" not in tensors or tensors["length"].numel() != 1:
            raise ValueError("state has no 'length' entry: not an openjamba state")
        layers = []
        for i, layer in enumerate(model.model.layers):
            names = ("k", "v") if layer.is_attention else ("conv", "ssm")
            keys = [f"layers.{i}.{name}" for name in names]
            missing = [key for key in keys if key not in tensors]
            if missing:
                raise ValueError(f"state lacks {', '.join(missing)}: it was saved for another model")
            layers.append((tensors[keys[0]], tensors[keys[1]]))
        state = cls(int(tensors["length"].item()), layers, tensors.get("logits"))
        state.check(model)
        return state

    def check(self, model: JambaForCausalLM) -> None:
        """ValueError unless the shapes fit the model (a state from another model or a damaged file)."""
        config = model.config
        if len(self.layers) != len(model.model.layers):
            raise ValueError(f"state has {len(self.layers)} layers; the model has {len(model.model.layers)}")
        for i, (layer, (a, b)) in enumerate(zip(model.model.layers, self.layers)):
            if layer.is_attention:
                want = [(config.num_key_value_heads, self.length, config.head_dim)] * 2
            else:
                want = [(config.mamba_d_conv - 1, config.mamba_inner_size),
                        (config.mamba_inner_size, config.mamba_d_state)]
            got = [tuple(a.shape), tuple(b.shape)]
            if got != want:
                raise ValueError(f"state layer {i} has shapes {got}; the model expects {want}")
        if self.logits is not None and tuple(self.logits.shape) != (config.vocab_size,):
            raise ValueError(f"state logits have shape {tuple(self.logits.shape)}; expected ({config.vocab_size},)")
