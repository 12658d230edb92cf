"""Training checkpoints: atomic, exactly resumable, sharded through torch.distributed.checkpoint (DCP).

    OUT/checkpoints/
      step-000200/        one complete checkpoint
        .metadata, __0_0.distcp, ...   model and optimizer state (DCP: each rank writes its shards; a checkpoint
                                       written by N ranks loads on M, a single process included)
        rng-0.pt, ...     each rank's RNG states: torch CPU (and CUDA), numpy, python
        trainer.json      step, sequences consumed, scheduler state, the run's configs, data fingerprint
      latest              the name of the newest complete checkpoint

A checkpoint is written under `step-N.tmp` and renamed when every rank has finished, and `latest` is replaced
atomically after that, so a crash at any moment leaves `latest` naming a complete checkpoint. The same code
serves one process and many: without a process group DCP simply writes one shard.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ..files import fsync_tree, out_of_space, ran_out_of_space, write_atomic
from .distributed import DistEnv, barrier

LATEST = "latest"
PREFIX = "step-"


def checkpoint_root(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def _step_of(path: Path) -> int:
    return int(path.name[len(PREFIX):])


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=_step_of)


def resolve(path: str | Path) -> Path | None:
    """A checkpoint directory from itself, from a `checkpoints` root or from a run's output directory."""
    path = Path(path)
    if (path / "trainer.json").is_file():
        return path
    for root in (path, checkpoint_root(path)):
        pointer = root / LATEST
        if pointer.is_file():
            target = root / pointer.read_text().strip()
            if (target / "trainer.json").is_file():
                return target
    return None


def rng_state() -> dict[str, Any]:
    """Every RNG a training step could draw from, in types `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every single-process save/load that it assumes one process: that is our intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")
        yield


def save(
    root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any],
    env: DistEnv, keep: int,
) -> Path:
    """Write checkpoint `step` (a collective: every rank calls it), point `latest` at it, keep the newest `keep`."""
    final, tmp = root / f"{PREFIX}{step:06d}", root / f"{PREFIX}{step:06d}.tmp"
    model_state, optim_state = get_state_dict(model, optimizer)
    try:
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(env)
        with _quiet_single_process():
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp, no_dist=not env.distributed)
        torch.save(rng_state(), tmp / f"rng-{env.rank}.pt")
        barrier(env)
        if env.is_main:
            write_atomic(tmp / "trainer.json", json.dumps(trainer_state, indent=2) + "\n")
            fsync_tree(tmp)
    except BaseException as err:  # full disk, Ctrl-C (DCP errors are BaseExceptions): nothing partial stays
        shutil.rmtree(tmp, ignore_errors=True)
        needed = state_bytes(model_state) + state_bytes(optim_state)
        if not isinstance(err, (KeyboardInterrupt, SystemExit)) and ran_out_of_space(err, root, needed):
            raise out_of_space(tmp, needed) from None
        raise
    if env.is_main:
        if final.exists():  # the same step saved again (e.g. a signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_atomic(root / LATEST, final.name + "\n")
        _prune(root, keep, final)
    barrier(env)
    return final


def state_bytes(state: Any) -> int:
    """Bytes of the tensors in a (nested) state dict: about what its checkpoint occupies on disk."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def remove_partial(root: Path) -> None:
    """Delete leftovers of saves that were killed or ran out of space (`step-N.tmp`): they are never resumed."""
    for stale in root.glob(f"{PREFIX}*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def _prune(root: Path, keep: int, newest: Path) -> None:
    """Delete all but the newest `keep` checkpoints (never the one just written), and leftovers of crashed saves."""
    old = [p for p in list_checkpoints(root) if p != newest]
    for path in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(path, ignore_errors=True)
    remove_partial(root)


def read_trainer_state(path: Path) -> dict[str, Any]:
    """Step, data position, scheduler and configs of a checkpoint: cheap to check before loading any tensor."""
    file = path / "trainer.json"
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is damaged ({err}); resume from an earlier checkpoint "
                         f"(--resume {path.parent}/step-N)") from None


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv) -> None:
    """Restore model, optimizer and this rank's RNGs in place."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=path, no_dist=not env.distributed)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = path / f"rng-{env.rank}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than wrote the checkpoint
        set_rng_state(torch.load(rng_file, weights_only=True))
