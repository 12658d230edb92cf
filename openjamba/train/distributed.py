"""Distributed training on PyTorch's own engine: torchrun, FSDP2 (`fully_shard`) and gloo/nccl collectives.

A run is distributed when torchrun started it (WORLD_SIZE > 1). Each decoder layer becomes one FSDP unit and the
root (embeddings, final norm, LM head) another, as torchtitan does: parameters are sharded across ranks, gathered
one layer at a time in forward and backward, and gradients reduce-scattered. On GPU the gathered parameters are
bf16 with fp32 gradient reduction (the sharded master weights and AdamW state stay fp32); on CPU everything is
fp32 over gloo, which is how the tests check that 2 processes train exactly like 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..runtime import default_device


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: rank, world size and device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str | None = None) -> DistEnv:
    """Join the process group when launched by torchrun (nccl on GPU, gloo on CPU); pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    wanted = device or default_device()
    if world_size <= 1:
        return DistEnv(device=torch.device(wanted))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if wanted.startswith("cuda"):
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=dev if backend == "nccl" else None)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard_model(model: nn.Module, env: DistEnv) -> nn.Module:
    """FSDP2 over the decoder layers, then the root. bf16 parameters with fp32 reduction on GPU, fp32 on CPU."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if env.device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    layers = model.model.layers
    for i, layer in enumerate(layers):
        # The last layer's parameters are needed again right away by the backward: keep them gathered.
        fully_shard(layer, mp_policy=policy, reshard_after_forward=i < len(layers) - 1)
    fully_shard(model, mp_policy=policy)
    return model


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum floats over ranks (identity on one process): one collective for all of a step's statistics."""
    if not env.distributed:
        return list(values)
    device = env.device if env.device.type == "cuda" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()

