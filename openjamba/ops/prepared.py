"""Decode steps bound to a layer's weights once and kept between tokens, and how a kept step knows it is still
valid. Binding a quantized Mamba+MLP layer's one-call step (`ops.prepare_mamba_layer_step`) checks every weight
and builds the kernel's argument structures, which on a 3B model cost about as much per token as the call's own
small ops; a bound step holds raw pointers, so it is kept only while the layer holds the same tensors
(`ModuleSnapshot`)."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from itertools import chain
from typing import Any

import torch
from torch import nn

_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> (key, snapshot, what was built)


def kept_while_unchanged(module: nn.Module, key: Hashable, versioned: tuple[torch.Tensor, ...],
                         build: Callable[[], Any]) -> Any:
    """`build()`'s result for `module`, built again only when `key` (e.g. device, kernels, thread count) differs
    or the module is not what it was when it was built (`ModuleSnapshot`, with `versioned`)."""
    kept = _KEPT.get(module)
    if kept is None or kept[0] != key or not kept[1].unchanged():
        snapshot = ModuleSnapshot(module, versioned)
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


def _versions(tensors: tuple[torch.Tensor, ...]) -> tuple[int, ...] | None:
    """The tensors' version counters; None when one has none (made under torch.inference_mode: never unchanged)."""
    return None if any(t.is_inference() for t in tensors) else tuple(t._version for t in tensors)
