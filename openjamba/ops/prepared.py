"""Decode steps bound to a layer's weights once and kept between tokens, and how a kept step knows it is still
valid. Binding a quantized Mamba+MLP layer's one-call step (`ops.prepare_mamba_layer_step`) checks every weight
and builds the kernel's argument structures, which on a 3B model cost about as much per token as the call's own
small ops; a bound step holds raw pointers, so it is kept only while the layer holds the same tensors
(`ModuleSnapshot`, checked per layer; `ModelStamp`, checked once per token for a whole model's layers)."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from itertools import chain
from typing import Any

import torch
from torch import nn

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
