"""The one Hugging Face <-> openjamba converter, used by loading, saving and the parity tests.

Tensor names are Hugging Face's (`model.layers.{i}.mamba.in_proj.weight`, ...). The only difference is the MoE
experts: openjamba keeps each layer's experts fused (`experts.gate_up_proj` (E, 2I, H), gate rows first, and
`experts.down_proj` (E, H, I), as transformers 5.x does in memory), while checkpoints on disk use one tensor per
expert (`experts.{j}.gate_proj.weight`, `up_proj`, `down_proj`): the layout of the published ai21labs checkpoints,
which transformers 4.4x-5.x all load. Both layouts are accepted when loading; saving writes the per-expert one.

Loading checks every tensor name and shape against the config before allocating anything (reading only the
safetensors headers, through `safetensors.safe_open`), reports all problems in one message, builds the model on
the meta device and fills it shard by shard, so peak memory is about one copy of the weights plus one tensor.
Only safetensors are read: pickle files are refused, never unpickled.

At a 16-bit load dtype the tensors of the SSM dynamics (`A_log`, `D` and the dt bias) stay fp32, as the reference
implementations keep them: the mixer computes with them in fp32 anyway, and rounding `A_log` or the dt bias to
bf16 changes every step's decay.
"""

from __future__ import annotations

import json
import math
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from . import quant
from .config import JambaConfig
from .files import write_atomic
from .ops.prepared import invalidate

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Each per-expert checkpoint tensor (`experts.{j}.NAME.weight`) and where it lives in openjamba's fused expert
# parameters: (fused parameter, which block of `intermediate_size` rows of expert j's matrix, None for all of it).
EXPERT_TENSORS = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", None)}
_PER_EXPERT = re.compile(r"^(model\.layers\.\d+\.feed_forward\.experts)\.(\d+)\.(" + "|".join(EXPERT_TENSORS)
                         + r")\.weight$")
FP32_PARAMS = ("mamba.A_log", "mamba.D", "mamba.dt_proj.bias")  # kept in fp32 at a 16-bit load dtype


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
    prefix, expert, (fused, block) = match.group(1), int(match.group(2)), EXPERT_TENSORS[match.group(3)]
    I = config.intermediate_size
    return Target(f"{prefix}.{fused}", expert, None if block is None else (block * I, (block + 1) * I))


def per_expert_names(param: str, num_experts: int) -> list[str]:
    """The checkpoint names of a fused expert parameter's pieces (`...experts.gate_up_proj` -> every expert's
    gate_proj and up_proj); [] for any other parameter."""
    prefix, _, fused = param.rpartition(".")
    if not prefix.endswith(".experts"):
        return []
    return [f"{prefix}.{j}.{proj}.weight" for j in range(num_experts)
            for proj, (target, _) in EXPERT_TENSORS.items() if target == fused]


def hf_named_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's tensors under their checkpoint names, experts split per expert (views, not copies).

    A quantized weight `X.weight` is written as its format's tensors `X.qweight`, `X.scales` (and `X.zeros`).
    """
    config = model.config
    for name, value in quant.logical_state(model):
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: transformers writes only the embedding
        parts = value.items() if isinstance(value, dict) else [("weight", value)]
        for part, tensor in parts:
            pieces = per_expert_names(name, tensor.shape[0])
            for piece in pieces:
                yield piece.removesuffix(".weight") + f".{part}", checkpoint_target(piece, config).view(tensor)
            if not pieces:
                yield (name.removesuffix(".weight") + f".{part}") if part != "weight" else name, tensor


# ---------------------------------------------------------------------- a checkpoint named by a Hub repo id
# What openjamba reads from a checkpoint: the config, safetensors weights, the tokenizer and its chat templates
# (`tokenizer.CONFIG_FILES`, `tokenizer.TEMPLATE_DIR`). Pickle weights (.bin, .pt, ...) are never fetched.
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
             "chat_template.jinja", "additional_chat_templates/*.jinja"]


def is_repo_id(text: str) -> bool:
    """`owner/name` as the Hub spells repo ids (no `./`, `..`, `~` or absolute path can pass)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if text.count("/") != 1:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def resolve_checkpoint(model: str | Path, revision: str | None = None, weights: bool = True) -> Path:
    """The checkpoint directory `model` names: an existing local path as it is (a local directory always wins, as
    in transformers); else a Hugging Face Hub repo id (`owner/name`), its files fetched into (or found in) the
    Hugging Face cache (HF_HOME, HF_HUB_CACHE; HF_HUB_OFFLINE=1 uses the cached copy, HF_TOKEN opens gated repos).
    Anything else is returned as a path, for the loader's "not a directory" error; so is a `Path`, which the
    command line makes of what is not a repo id (a `Path` has lost the `./` of `./owner/name`, which names a
    directory). `weights=False` fetches only config.json (`openjamba info` plans memory from it alone)."""
    path = Path(model).expanduser()
    if path.exists() or not isinstance(model, str) or not is_repo_id(model):
        return path
    from huggingface_hub import constants, snapshot_download

    repo = str(model)
    named = repo + (f" ({revision})" if revision else "")
    print(f"openjamba: {named} from the Hugging Face cache {constants.HF_HUB_CACHE} (HF_HUB_OFFLINE is set)"
          if constants.HF_HUB_OFFLINE else f"openjamba: fetching {named} from the Hugging Face Hub into "
          f"{constants.HF_HUB_CACHE} (files already there are reused)", file=sys.stderr, flush=True)
    try:
        found = Path(snapshot_download(repo, revision=revision, allow_patterns=HUB_FILES if weights else
                                       ["config.json"]))
    except Exception as err:  # noqa: BLE001 - each Hub failure becomes one actionable line
        raise CheckpointError(_hub_error(repo, revision, err)) from err
    if weights and not any(found.glob("*.safetensors")):
        raise CheckpointError(f"{repo} has no safetensors weights on the Hub: openjamba loads only safetensors "
                              "(it never unpickles .bin/.pt files)")
    return found


def _hub_error(repo: str, revision: str | None, err: Exception) -> str:
    """One line saying why `repo` could not be had from the Hub, and what to do about it."""
    from huggingface_hub.utils import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(err, GatedRepoError):
        return (f"{repo} is gated on the Hugging Face Hub: accept its licence on https://huggingface.co/{repo}, "
                "then log in with `hf auth login` or set HF_TOKEN")
    if isinstance(err, RepositoryNotFoundError):
        return (f"{repo} is not a local directory, and the Hugging Face Hub has no model repo {repo} (or it is "
                "private: log in with `hf auth login` or set HF_TOKEN)")
    if isinstance(err, RevisionNotFoundError):
        return f"{repo} has no revision {revision!r} on the Hugging Face Hub"
    if isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        at, flag = (f" at revision {revision!r}", f" --revision {revision}") if revision else ("", "")
        return (f"{repo} is not a local directory nor (complete{at}) in the Hugging Face cache, and HF_HUB_OFFLINE "
                f"is set or the Hub is unreachable: download it first with `hf download {repo}{flag}`, or give a "
                "checkpoint directory")
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return f"cannot fetch {repo} from the Hugging Face Hub: {first}"


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
    """One tensor of a safetensors file, as its header describes it."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_headers(files: list[Path]) -> dict[str, TensorEntry]:
    """name -> TensorEntry for every tensor of every shard, reading only the headers (`safe_open` checks that
    each header is valid and covers its file exactly). Every unreadable file is named in one CheckpointError."""
    entries: dict[str, TensorEntry] = {}
    problems: list[str] = []
    for file in files:
        try:
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():
                    view = handle.get_slice(name)
                    stored = view.get_dtype()
                    if stored not in SAFETENSORS_DTYPES:
                        problems.append(f"{file}: tensor {name!r} has unsupported dtype {stored}")
                        continue
                    if name in entries:
                        problems.append(f"tensor {name} appears in both {entries[name].file.name} and {file.name}")
                        continue
                    entries[name] = TensorEntry(file, SAFETENSORS_DTYPES[stored], tuple(view.get_shape()))
        except (SafetensorError, OSError) as err:
            problems.append(f"{file} is not a readable safetensors file (truncated or corrupted?): {err}")
    if problems:
        raise CheckpointError("\n".join(problems))
    return entries


def read_tensor(handle, name: str) -> torch.Tensor:
    """The one place a checkpoint tensor is materialised (on the CPU, in its stored dtype)."""
    return handle.get_tensor(name)


def copy_from_file(file: Path, destinations: list[tuple[str, torch.Tensor]],
                   copied: Callable[[str], None] | None = None) -> None:
    """Copy the named tensors of one file into their destinations (parameters, or slices of fused ones);
    `copied(name)` after each."""
    with safe_open(file, framework="pt") as handle:
        for name, dest in destinations:
            dest.copy_(read_tensor(handle, name))
            if copied is not None:
                copied(name)


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
        covered[target.param].add((target.expert, target.rows[0] if target.rows else None))
        if shape != want:  # present with the wrong shape: reported once, as a mismatch, never also as missing
            mismatched.append(f"{name}: checkpoint {list(shape)}, config expects {list(want)}")
            continue
        targets[name] = target
    missing = []
    for param, parts in covered.items():
        if (None, None) in parts:
            continue
        pieces = per_expert_names(param, config.num_experts)
        for piece in pieces:
            target = checkpoint_target(piece, config)
            if (target.expert, target.rows[0] if target.rows else None) not in parts:
                missing.append(piece)
        if not pieces:
            missing.append(param)
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): " + _some(missing, ", "))
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): " + _some(unexpected, ", "))
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): " + _some(mismatched, "; "))
    if problems:
        hint = " (does config.json match these weights?)" if mismatched or (missing and unexpected) else ""
        raise CheckpointError("checkpoint does not fit the model" + hint + ":\n  " + "\n  ".join(problems))
    return targets


def _some(items: list[str], sep: str, shown: int = 8) -> str:
    """The first `shown` items and how many more: a wrong hidden_size mis-shapes every tensor, and a message of
    hundreds of names hides the one fact that matters."""
    more = f"{sep}... and {len(items) - shown} more" if len(items) > shown else ""
    return sep.join(items[:shown]) + more


def _default_dtype(entries, config: JambaConfig) -> torch.dtype:
    stored = config.extra.get("dtype") or config.extra.get("torch_dtype")
    if isinstance(stored, str) and hasattr(torch, stored) and isinstance(getattr(torch, stored), torch.dtype):
        return getattr(torch, stored)
    floats = [e.dtype for e in entries.values() if e.dtype.is_floating_point]
    return max(set(floats), key=floats.count) if floats else torch.float32


def keep_fp32(model: torch.nn.Module) -> torch.nn.Module:
    """Put the SSM dynamics (`FP32_PARAMS`) back in fp32 after a cast to a narrower dtype; returns the model.
    Bound decode steps are rebound (`ops.prepared.invalidate`: a storage swap is not a registration they see)."""
    for name, param in model.named_parameters():
        if name.endswith(FP32_PARAMS) and param.dtype.itemsize < 4:
            param.data = param.data.float()
            invalidate()
    return model


def check_checkpoint(path: str | Path) -> JambaConfig:
    """Everything `load_pretrained` checks before reading a weight (config, files, tensor names and shapes), at
    the cost of reading the headers: for tools that hand the directory to other processes (the benchmark)."""
    return _inspect(Path(path))[0]


def _inspect(path: Path, quantize: str | None = None):
    from .model import JambaForCausalLM

    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory (expected a checkpoint directory with config.json)")
    quant.check_method(quantize)
    config = JambaConfig.from_pretrained(path)
    files = find_weight_files(path)
    entries = read_headers(files)
    method, pieces = quantize, {}
    stored = config.extra.get("quantization_config")
    if stored is not None:  # written by `openjamba quantize`: checked as the full-precision weights it stands for
        method = _stored_method(stored, quantize)
        entries, pieces = quant_checkpoint_entries(entries)
    with torch.device("meta"):
        model = JambaForCausalLM(config)
    expected = {name: tensor.shape for name, tensor in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    return config, entries, check_tensors(entries, expected, config), model, method, pieces


LOAD_PROGRESS_DELAY = 1.0  # seconds before a load's progress bar appears: small models and tests stay quiet


def load_pretrained(
    path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
    quantize: str | None = None, group_size: int | None = None, prepare_kernels: bool = True, progress: bool = False,
    revision: str | None = None,
):
    """Load a Hugging Face Jamba checkpoint: a local directory, or a Hub repo id (`resolve_checkpoint`; `revision`
    a branch, tag or commit of it). See the module docstring.

    `quantize` ("int8" or "int4"; see `openjamba.quant`) quantizes each weight as it is read, a block of rows at a
    time, so peak memory stays near the quantized size; a checkpoint written by `openjamba quantize` loads
    quantized without it. `prepare_kernels=False` leaves the weights in the documented layout (for saving them).
    `progress`: a progress bar on stderr once a load has taken a second (the command line's verbs ask for it).
    """
    path = resolve_checkpoint(path, revision)
    config, entries, targets, model, method, pieces = _inspect(path, quantize)
    stored = config.extra.get("quantization_config") or {}
    group_size = group_size or stored.get("group_size") or quant.DEFAULT_GROUP_SIZE

    dtype = dtype or _default_dtype(entries, config)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if dtype in (torch.bfloat16, torch.float16) and device.type == "cpu":
        warnings.warn(f"loading in {dtype} on CPU: half-precision matmuls are very slow on most CPUs; "
                      "pass dtype=torch.float32 for speed", stacklevel=2)
    weights = {}
    if method is not None:  # swap in quantized layers while everything is still on the meta device
        weights = {name: quant.QuantizedWeight(_quantized_layout(name, shape, method, group_size, pieces, targets))
                   for name, shape in quant.quantized_params(model).items()}
        quant.install(model, weights, prepare=False)
    model = keep_fp32(model.to(dtype))  # dtypes first: converting on meta allocates nothing
    for weight in weights.values():
        weight.restore_scale_dtypes()
    model = model.to_empty(device=device)
    if method is None:
        model.tie_weights()
    params = model.state_dict(keep_vars=True)
    quantized = quant.quantized_weights(model)
    by_file: dict[Path, list[tuple[str, torch.Tensor]]] = {}
    to_quantize = []
    for name, target in targets.items():
        param = target.param
        if param == "model.embed_tokens.weight" and config.tie_word_embeddings and "lm_head.weight" in quantized:
            param = "lm_head.weight"  # the tied table is quantized as the LM head
        if param in quantized:
            to_quantize.append((name, target, quantized[param]))
        else:
            by_file.setdefault(entries[name].file, []).append((name, target.view(params[param])))
    report = tqdm(total=sum(entries[name].nbytes for name in targets), desc=f"loading {path.name}", unit="B",
                  unit_scale=True, delay=LOAD_PROGRESS_DELAY, disable=not progress, file=sys.stderr,
                  mininterval=0.2 if sys.stderr.isatty() else 10)  # a log gets a line every 10 s, not a stream
    with torch.no_grad():
        for file, destinations in by_file.items():
            copy_from_file(file, destinations, lambda name: report.update(entries[name].nbytes))
        for name, target, weight in to_quantize:  # one tensor at a time, a block of rows at a time
            _fill_quantized(weight, target, name, entries[name], pieces)
            report.update(entries[name].nbytes)
        _warn_non_finite(model, path)
    report.close()
    if method is not None:
        if prepare_kernels:
            quant.prepare_all(model)
        model.quantization = quant.quantization_config(method, group_size, quantized)
    model.eval()
    return model


def _warn_non_finite(model, path: Path) -> None:
    """A checkpoint with NaN/inf weights loads and then generates empty or garbage text: say so at load time.
    One flag per tensor, read back once (no synchronisation per tensor on a GPU)."""
    named = [(name, p) for name, p in model.named_parameters() if p.is_floating_point()]
    if not named:
        return
    # A NaN or inf anywhere makes the sum non-finite; a sum allocates no tensor-sized temporary (isfinite would).
    flags = torch.stack([~torch.isfinite(p.sum(dtype=torch.float32)) for _, p in named]).tolist()
    bad = [name for (name, _), flag in zip(named, flags) if flag]
    if bad:
        warnings.warn(f"{path} has NaN or infinite values in {len(bad)} tensor(s) ({_some(bad, ', ', 3)}); "
                      "the model's outputs will be meaningless", stacklevel=3)


def _stored_method(stored: dict, requested: str | None) -> str:
    method = stored.get("method") if isinstance(stored, dict) else None
    if method not in quant.METHODS:
        raise CheckpointError(f"config.json's quantization_config has method {method!r}; openjamba reads "
                              f"{', '.join(quant.METHODS)} checkpoints written by `openjamba quantize`")
    if requested is not None and requested != method:
        raise CheckpointError(f"the checkpoint is already quantized to {method}; it cannot be loaded as {requested} "
                              "(quantize the full-precision checkpoint instead)")
    return method


def quant_checkpoint_entries(entries: dict[str, TensorEntry]) -> tuple[dict[str, TensorEntry], dict[str, dict]]:
    """A quantized checkpoint's `X.qweight`/`X.scales`/`X.zeros` seen as the logical `X.weight` (N, K) entries
    that `check_tensors` checks, and X.weight -> {"qweight": (stored name, entry), ...} for each of them."""
    logical, pieces = {}, {}
    for name, entry in entries.items():
        if name.endswith((".scales", ".zeros")):
            continue
        if not name.endswith(".qweight"):
            logical[name] = entry
            continue
        if entry.dtype not in (torch.int8, torch.uint8):
            raise CheckpointError(f"{name} is {entry.dtype}; a quantized weight is int8 or uint8 (packed int4)")
        base = name.removesuffix(".qweight")
        parts = {"qweight": (name, entry)}
        for part in ("scales",) if entry.dtype == torch.int8 else ("scales", "zeros"):
            if f"{base}.{part}" not in entries:
                raise CheckpointError(f"quantized checkpoint is missing {base}.{part} (needed by {name})")
            parts[part] = (f"{base}.{part}", entries[f"{base}.{part}"])
        shape = entry.shape[:-1] + (entry.shape[-1] * (2 if entry.dtype == torch.uint8 else 1),)
        logical[f"{base}.weight"] = TensorEntry(entry.file, torch.float32, shape)
        pieces[f"{base}.weight"] = parts
    return logical, pieces


def _quantized_layout(param: str, shape, method: str, group_size: int, pieces: dict, targets: dict) -> dict:
    """Empty (meta) tensors in the format this parameter will hold: from a quantized checkpoint its own (int8 for a
    tensor quantization left in int8, the group it used), else what `quant.quantize_weight` will produce."""
    for name, target in targets.items():
        if name in pieces and (target.param == param or (param == "lm_head.weight"
                                                         and target.param == "model.embed_tokens.weight")):
            qweight, scales = pieces[name]["qweight"][1], pieces[name]["scales"][1]
            if qweight.dtype == torch.int8:
                return quant.empty_quantized(shape, "int8", device="meta")
            group = shape[-1] // scales.shape[-1]
            if quant.int4_group_size(shape[-1], shape[-2], group) != group:
                raise CheckpointError(f"{name}: int4 groups of {group} do not fit a {list(shape[-2:])} weight")
            return quant.empty_quantized(shape, "int4", group, device="meta")
    return quant.empty_quantized(shape, method, group_size, device="meta")


def _fill_quantized(weight, target: Target, name: str, entry: TensorEntry, pieces: dict) -> None:
    """Write one checkpoint tensor into a quantized parameter (an expert's half, a whole matrix): copied when the
    checkpoint is quantized, else read, quantized and dropped a block of rows at a time."""
    dests = {key: target.view(tensor) for key, tensor in weight.tensors().items()}
    if name in pieces:
        for key, dest in dests.items():
            stored, source = pieces[name].get(key, (None, None))
            if source is None or tuple(source.shape) != tuple(dest.shape) or (key == "qweight"
                                                                              and source.dtype != dest.dtype):
                found = f"{list(source.shape)} {source.dtype}" if source is not None else "missing"
                raise CheckpointError(f"{name.removesuffix('.weight')}.{key}: checkpoint {found}, expected "
                                      f"{list(dest.shape)} {dest.dtype} (does quantization_config match?)")
            copy_from_file(source.file, [(stored, dest)])
        return
    with safe_open(entry.file, framework="pt") as handle:
        if len(entry.shape) == 2:  # read a block of rows at a time
            rows = handle.get_slice(name)
            read = lambda start, stop: rows[start:stop]  # noqa: E731
        else:  # a fused (E, N, K) expert tensor: read whole
            full = read_tensor(handle, name).reshape(-1, entry.shape[-1])
            read = lambda start, stop: full[start:stop]  # noqa: E731
        quant.quantize_rows(read, entry.shape, "int8", out=dests)


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
    quantization = getattr(model, "quantization", None)
    if quantization is not None:
        model.config.extra["quantization_config"] = quantization
    model.config.save_pretrained(path, dtype=str(model.dtype).removeprefix("torch."))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
