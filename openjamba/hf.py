"""The one Hugging Face <-> openjamba converter, used by loading, saving and the parity tests.

Tensor names are Hugging Face's (`model.layers.{i}.mamba.in_proj.weight`, ...). The only difference is the MoE
experts: openjamba keeps each layer's experts fused (`experts.gate_up_proj` (E, 2I, H), gate rows first, and
`experts.down_proj` (E, H, I), as transformers 5.x does in memory), while checkpoints on disk use one tensor per
expert (`experts.{j}.gate_proj.weight`, `up_proj`, `down_proj`): the layout of the published ai21labs checkpoints,
which transformers 4.4x-5.x all load. Both layouts are accepted when loading; saving writes the per-expert one.

Loading checks every tensor name and shape against the config before allocating anything, reports all problems
in one message, builds the model on the meta device and fills it shard by shard, so peak memory is about one copy
of the weights. Only safetensors are read: pickle files are refused, never unpickled.
"""

from __future__ import annotations

import json
import mmap
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import JambaConfig
from .files import write_atomic

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_PER_EXPERT = re.compile(r"^(model\.layers\.\d+\.feed_forward\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as it is; the message says everything that is wrong."""


@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor goes: a parameter, or a slice of a fused expert parameter."""

    param: str
    expert: int | None = None
    rows: tuple[int, int] | None = None  # row range inside the expert's matrix (gate or up half of gate_up)

    def view(self, param: torch.Tensor) -> torch.Tensor:
        if self.expert is None:
            return param
        return param[self.expert] if self.rows is None else param[self.expert, self.rows[0] : self.rows[1]]


def checkpoint_target(name: str, config: JambaConfig) -> Target:
    """Map a checkpoint tensor name to its place in openjamba's state dict."""
    match = _PER_EXPERT.match(name)
    if not match:
        return Target(name)
    prefix, expert, proj = match.group(1), int(match.group(2)), match.group(3)
    I = config.intermediate_size
    if proj == "down_proj":
        return Target(f"{prefix}.down_proj", expert)
    return Target(f"{prefix}.gate_up_proj", expert, (0, I) if proj == "gate_proj" else (I, 2 * I))


def hf_named_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's tensors under their checkpoint names, experts split per expert (views, not copies)."""
    config = model.config
    I = config.intermediate_size
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: transformers writes only the embedding
        if name.endswith("experts.gate_up_proj"):
            prefix = name[: -len(".gate_up_proj")]
            for j in range(tensor.shape[0]):
                yield f"{prefix}.{j}.gate_proj.weight", tensor[j, :I]
                yield f"{prefix}.{j}.up_proj.weight", tensor[j, I:]
        elif name.endswith("experts.down_proj"):
            prefix = name[: -len(".down_proj")]
            for j in range(tensor.shape[0]):
                yield f"{prefix}.{j}.down_proj.weight", tensor[j]
        else:
            yield name, tensor


# ---------------------------------------------------------------------- reading a checkpoint directory
def find_weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (single file or sharded with an index)."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index: {err}") from err
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise CheckpointError(f"{index.name} lists shard files that do not exist: {', '.join(missing)}")
        return [path / f for f in files]
    if single.is_file():
        return [single]
    loose = sorted(path.glob("*.safetensors"))
    if loose:
        return loose
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{path} holds only pickle-format weights ({', '.join(pickles)}). openjamba loads safetensors only and "
            "never unpickles weights (a pickle file can run arbitrary code). Convert them with a tool you trust, "
            "e.g. transformers' `model.save_pretrained(dir, safe_serialization=True)`."
        )
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file, located by its header."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


def read_safetensors_header(file: Path) -> dict[str, TensorEntry]:
    """Parse and check a safetensors header (format: u64 length, JSON, data) without reading the data."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 2 or 8 + length > size:
            raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupted?): "
                                  f"header length {length} does not fit a file of {size} bytes")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupted?): "
                                  f"its header is not valid JSON ({err})") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupted?)")
    header.pop("__metadata__", None)
    data_start, entries, data_end = 8 + length, {}, 0
    for name, info in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{file}: bad header entry for {name!r} ({err}); the file is corrupted") from err
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise CheckpointError(f"{file}: header entry {name!r} has {end - begin} bytes for shape {list(shape)} "
                                  f"{info['dtype']}; the file is corrupted")
        entries[name] = TensorEntry(file, dtype, shape, data_start + begin, end - begin)
        data_end = max(data_end, end)
    if data_start + data_end != size:
        raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupted?): the header "
                              f"describes {data_start + data_end} bytes, the file has {size}")
    return entries


def read_headers(files: list[Path]) -> dict[str, TensorEntry]:
    """name -> TensorEntry for every tensor of every shard, reading only the headers."""
    entries: dict[str, TensorEntry] = {}
    for file in files:
        for name, entry in read_safetensors_header(file).items():
            if name in entries:
                raise CheckpointError(f"tensor {name} appears in both {entries[name].file.name} and {file.name}")
            entries[name] = entry
    return entries


def copy_from_file(entries: list[tuple[TensorEntry, torch.Tensor]]) -> None:
    """Copy tensors of one file straight from a memory map into their destinations: no intermediate copy."""
    file = entries[0][0].file
    with open(file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mapped:
        for entry, dest in entries:
            if entry.nbytes:
                source = torch.frombuffer(mapped, dtype=entry.dtype, count=entry.nbytes // entry.dtype.itemsize,
                                          offset=entry.offset).view(entry.shape)
                dest.copy_(source)
                del source  # the map cannot close while a tensor still points into it


def check_tensors(
    entries: dict[str, TensorEntry], expected: dict[str, torch.Size], config: JambaConfig
) -> dict[str, Target]:
    """Match checkpoint tensors to parameters; raise one CheckpointError listing everything that does not fit."""
    unexpected, mismatched, targets = [], [], {}
    covered: dict[str, set] = {name: set() for name in expected}
    for name, entry in sorted(entries.items()):
        shape = entry.shape
        target = checkpoint_target(name, config)
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied weights: the embedding is the head
        if target.param not in expected or (target.expert is not None and target.expert >= config.num_experts):
            unexpected.append(name)
            continue
        want = tuple(target.view(torch.empty(expected[target.param], device="meta")).shape)
        if shape != want:
            mismatched.append(f"{name}: checkpoint {list(shape)}, config expects {list(want)}")
            continue
        targets[name] = target
        covered[target.param].add((target.expert, target.rows[0] if target.rows else None))
    missing = []
    for param, parts in covered.items():
        if (None, None) in parts:
            continue
        if param.endswith("experts.gate_up_proj") or param.endswith("experts.down_proj"):
            prefix = param.rsplit(".", 1)[0]
            projs = ("gate_proj", "up_proj") if param.endswith("gate_up_proj") else ("down_proj",)
            starts = (0, config.intermediate_size) if len(projs) == 2 else (None,)
            for j in range(config.num_experts):
                for proj, start in zip(projs, starts):
                    if (j, start) not in parts:
                        missing.append(f"{prefix}.{j}.{proj}.weight")
        else:
            missing.append(param)
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): " + ", ".join(missing))
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): " + ", ".join(unexpected))
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): " + "; ".join(mismatched))
    if problems:
        hint = " (does config.json match these weights?)" if mismatched or (missing and unexpected) else ""
        raise CheckpointError("checkpoint does not fit the model" + hint + ":\n  " + "\n  ".join(problems))
    return targets


def _default_dtype(entries, config: JambaConfig) -> torch.dtype:
    stored = config.extra.get("dtype") or config.extra.get("torch_dtype")
    if isinstance(stored, str) and hasattr(torch, stored) and isinstance(getattr(torch, stored), torch.dtype):
        return getattr(torch, stored)
    floats = [e.dtype for e in entries.values() if e.dtype.is_floating_point]
    return max(set(floats), key=floats.count) if floats else torch.float32


def load_pretrained(
    path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device | None = None
):
    """Load a local Hugging Face Jamba checkpoint directory. See the module docstring."""
    from .model import JambaForCausalLM

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory (expected a checkpoint directory with config.json)")
    config = JambaConfig.from_pretrained(path)
    files = find_weight_files(path)
    entries = read_headers(files)
    with torch.device("meta"):
        model = JambaForCausalLM(config)
    expected = {name: tensor.shape for name, tensor in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    targets = check_tensors(entries, expected, config)

    dtype = dtype or _default_dtype(entries, config)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if dtype in (torch.bfloat16, torch.float16) and device.type == "cpu":
        warnings.warn(f"loading in {dtype} on CPU: half-precision matmuls are very slow on most CPUs; "
                      "pass dtype=torch.float32 for speed", stacklevel=2)
    model = model.to(dtype).to_empty(device=device)  # dtype first: converting on meta allocates nothing
    model.tie_weights()
    params = model.state_dict(keep_vars=True)
    by_file: dict[Path, list] = {}
    for name, target in targets.items():
        by_file.setdefault(entries[name].file, []).append((entries[name], target.view(params[target.param])))
    with torch.no_grad():
        for file_entries in by_file.values():
            copy_from_file(file_entries)
    model.eval()
    return model


# ---------------------------------------------------------------------- writing a checkpoint directory
def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot parse size {size!r} (examples: 5GB, 500MB, 1000000)")
    units = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    return int(float(match.group(1)) * units[(match.group(2) or "B").lower()])


def plan_shards(named: list[tuple[str, torch.Tensor]], max_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    shards, current, size = [], [], 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, tensor))
        size += nbytes
    if current:
        shards.append(current)
    return shards


def save_pretrained(model, path: str | Path, max_shard_size: int | str = "5GB", tokenizer=None) -> None:
    """Write config.json and safetensors shards (per-expert layout), plus the tokenizer's files when given."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    named = list(hf_named_tensors(model))
    shards = plan_shards(named, parse_size(max_shard_size))
    weight_map, total, written = {}, 0, set()
    for k, shard in enumerate(shards, start=1):
        file = "model.safetensors" if len(shards) == 1 else f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in shard}
        write_atomic(path / file, lambda tmp, t=tensors: save_file(t, tmp, metadata={"format": "pt"}))
        written.add(file)
        for name, t in tensors.items():
            weight_map[name] = file
            total += t.numel() * t.element_size()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        write_atomic(path / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
        written.add("model.safetensors.index.json")
    # Shards of an earlier save that the new one does not use: removed only now that the new set is complete.
    for stale in list(path.glob("model*.safetensors")) + list(path.glob("model.safetensors.index.json")):
        if stale.name not in written:
            stale.unlink()
    model.config.save_pretrained(path, dtype=str(model.dtype).removeprefix("torch."))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
