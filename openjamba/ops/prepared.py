"""Decode steps bound to a layer's weights once and kept between tokens (`BoundDecodeStep`, the decoder layer's
part that does it), and how a kept step knows it is still valid. Binding a quantized Mamba+MLP layer's one-call
step (`ops.prepare_mamba_layer_step`) checks every weight and builds the kernel's argument structures, which on a
3B model cost about as much per token as the call's own small ops; a bound step holds raw pointers, so it is kept
only while the layer holds the same tensors (`ModuleSnapshot`, checked per layer; `ModelStamp`, checked once per
token for a whole model's layers)."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from itertools import chain
from typing import Any

import torch
from torch import nn

from .. import ops

_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> (key, snapshot, what was built)


def kept_while_unchanged(module: nn.Module, key: Hashable, versioned: Callable[[], tuple[torch.Tensor, ...]],
                         build: Callable[[], Any], snapshot: type | None = None) -> Any:
    """`build()`'s result for `module`, built again only when `key` (e.g. device, kernels, thread count) differs
    or the module is not what it was when it was built (`snapshot`: `ModuleSnapshot` (the default) or `ModelStamp`,
    with the tensors `versioned()` gives then)."""
    kept = _KEPT.get(module)
    if kept is None or kept[0] != key or not kept[1].unchanged():
        snapshot = (snapshot or ModuleSnapshot)(module, versioned())
        kept = _KEPT[module] = (key, snapshot, build())
    return kept[2]


class BoundDecodeStep:
    """A decoder layer's one-token step bound to its weights: `ops.prepare_attention_layer_step` or
    `ops.prepare_mamba_layer_step` (one call on CPU), kept while the layer holds the same weights. A part of
    model.DecoderLayer, which supplies is_attention, self_attn or mamba, feed_forward and the two norms."""

    def _prepared_step(self, x: torch.Tensor, attn_mask):
        """The bound step for a few rows (attention: unmasked), else None. Not under autograd."""
        device = x.device
        if (torch.is_grad_enabled() or x.shape[0] > ops.fused_step_rows(device)
                or (self.is_attention and (attn_mask.mask is not None or self.training))):
            return None
        return kept_while_unchanged(self, _step_key(device), self._versioned, lambda: self._bind_step(device))

    def step_state(self, attn_mask, layer_cache) -> tuple:
        """What a bound step takes after x: the K/V cache, its column and row starts, or the Mamba state."""
        if self.is_attention:
            return layer_cache, attn_mask.past_length, attn_mask.row_starts
        return layer_cache.conv, layer_cache.ssm

    def step_weights(self) -> tuple | None:
        """The weights the bound step reads: attention ((q, k, v, o), the FFN's `step_weights()`), Mamba (the
        mixer's `step_weights()`, then the FFN's); None where the kernels cannot read them."""
        ffn = self.feed_forward.step_weights()
        mixer = self.self_attn.step_weights() if self.is_attention else self.mamba.step_weights()
        if mixer is None or ffn is None:
            return None
        if self.is_attention:
            return mixer, ffn
        in_proj, out_proj, inner = mixer
        return in_proj, out_proj, ffn, inner

    def _versioned(self) -> tuple[torch.Tensor, ...]:
        """What the bound step holds a value computed from: A = -exp(A_log). Rebound when it is updated in place."""
        return () if self.is_attention else (self.mamba.A_log,)

    def _bind_step(self, device: torch.device):
        weights = self.step_weights()
        if weights is None:
            return None
        norms = [(n.weight, n.eps) for n in (self.input_layernorm, self.pre_ff_layernorm)]
        if self.is_attention:
            heads = (self.self_attn.num_heads, self.self_attn.num_kv_heads)
            return ops.prepare_attention_layer_step(norms[0], weights[0], *heads, norms[1], weights[1], device)
        in_proj, out_proj, ffn, inner = weights
        return ops.prepare_mamba_layer_step(norms[0], in_proj, self.mamba.step_params(inner), out_proj, norms[1],
                                            ffn, device)


def prepared_model_steps(layers: nn.ModuleList, x: torch.Tensor, attn_mask) -> list:
    """Each layer's `BoundDecodeStep._prepared_step` (None where it has none), kept for all the layers together and
    checked once per token (`ModelStamp`: per layer, the checks cost ~0.5 ms of a 28-layer model's token)."""
    device = x.device
    if torch.is_grad_enabled() or x.shape[0] > ops.fused_step_rows(device):
        return [None] * len(layers)
    steps = kept_while_unchanged(layers, _step_key(device), lambda: sum((la._versioned() for la in layers), ()),
                                 lambda: [layer._bind_step(device) for layer in layers], ModelStamp)
    if attn_mask.mask is None and not any(layer.training for layer in layers):
        return steps
    return [None if layer.is_attention and (attn_mask.mask is not None or layer.training) else step
            for layer, step in zip(layers, steps)]


def _step_key(device: torch.device) -> tuple:
    """What a bound decode step was made for besides the weights: device, kernels, thread count."""
    return device, ops.backend_for(device), torch.get_num_threads()


class ModuleSnapshot:
    """What a module tree holds: each submodule, parameter and buffer slot's object, each tensor's storage, and the
    version of the `versioned` tensors. Something built from the tree that keeps raw pointers (a prepared decode
    step) stays valid while `unchanged()`: swapping a module or tensor (quantizing, load_state_dict(assign=True)),
    moving or converting one (`.to()` swaps storages) or updating a versioned tensor in place makes it false; other
    in-place updates are seen through the pointers. It keeps what it saw alive until it is replaced. Checked per
    layer and token, in C-level loops (microseconds)."""

    def __init__(self, module: nn.Module, versioned: tuple[torch.Tensor, ...] = ()) -> None:
        self.slots = [d for m in module.modules() for d in (m._modules, m._parameters, m._buffers)]
        self.objects = tuple(chain.from_iterable(map(dict.values, self.slots)))  # kept alive: ids stay theirs
        self.ids = tuple(map(id, self.objects))
        self.tensors = tuple(o for o in self.objects if isinstance(o, torch.Tensor))
        self.pointers = tuple(map(torch.Tensor.data_ptr, self.tensors))
        self.versioned, self.versions = versioned, _versions(versioned)

    def unchanged(self) -> bool:
        versions = _versions(self.versioned)
        return (versions is not None and versions == self.versions
                and tuple(map(id, chain.from_iterable(map(dict.values, self.slots)))) == self.ids
                and tuple(map(torch.Tensor.data_ptr, self.tensors)) == self.pointers)


class ModelStamp:
    """A cheaper promise than `ModuleSnapshot`'s for a whole model's layers, checked once per token: a check that
    reads every tensor of the tree costs ~15 us per layer in a decode step (each tensor's storage pointer is a few
    cache misses once the layers' weights have streamed through the caches). It is unchanged while no module,
    parameter or buffer was set or registered anywhere in the process (torch.nn.Module's global registration hooks
    count them: module swaps, quantizing, load_state_dict(assign=True), new slots), no versioned tensor was updated
    in place, each child's first tensor (a moved or converted layer's sentinel) kept its storage, and `invalidate()`
    was not called (JambaForCausalLM._apply calls it: a conversion of the whole model replaces buffers without
    those hooks). Not seen: swapping the storage of one tensor below a layer (`tensor.data = other`, `set_`,
    torch.utils.swap_tensors, `.to()` of a part below a layer): code doing so calls `invalidate()`; the bound steps
    keep the storages they read alive, so until then they read the old values, never freed memory."""

    def __init__(self, module: nn.Module, versioned: tuple[torch.Tensor, ...] = ()) -> None:
        _watch_registrations()
        self.generation = _generation[0]
        firsts = (next(chain(child.parameters(), child.buffers()), None) for child in module.children())
        self.sentinels = tuple(t for t in firsts if t is not None)  # kept alive: their pointers stay theirs
        self.pointers = tuple(map(torch.Tensor.data_ptr, self.sentinels))
        self.versioned, self.versions = versioned, _versions(versioned)

    def unchanged(self) -> bool:
        versions = _versions(self.versioned)
        return (self.generation == _generation[0] and versions is not None and versions == self.versions
                and tuple(map(torch.Tensor.data_ptr, self.sentinels)) == self.pointers)


_generation = [0]  # registrations seen, plus invalidate() calls
_watching: list = []


def invalidate(*_: Any) -> None:
    """Make every `ModelStamp` taken so far stale (a registration hook: returns None, so the value is kept)."""
    _generation[0] += 1


def _watch_registrations() -> None:
    if not _watching:
        from torch.nn.modules import module as nn_module

        _watching.extend(hook(invalidate) for hook in (nn_module.register_module_module_registration_hook,
                                                       nn_module.register_module_parameter_registration_hook,
                                                       nn_module.register_module_buffer_registration_hook))


def _versions(tensors: tuple[torch.Tensor, ...]) -> tuple[int, ...] | None:
    """The tensors' version counters; None when one has none (made under torch.inference_mode: never unchanged)."""
    return None if any(t.is_inference() for t in tensors) else tuple(t._version for t in tensors)
