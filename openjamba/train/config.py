"""Training configuration: one dataclass, filled from defaults < recipe file < command line.

Every field of `TrainConfig` is also a command-line flag (`lr` -> `--lr`, `grad_accum` -> `--grad-accum`), so a
recipe file and the command line speak the same language. The model's architecture is a preset, a config.json
or the checkpoint given to `init_from`, changed field by field by the recipe's `model` table and by
`--set FIELD=VALUE` (any `JambaConfig` field; VALUE is read as JSON when it parses, else as a string).

A recipe is a JSON or TOML file with trainer fields at the top level and model fields under `model`:

    preset = "tiny"
    steps = 2000
    lr = 1e-3
    [model]
    attn_layer_period = 4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import JambaConfig, get_preset
from ..runtime import parse_device

# What a run trains on: generated MQAR (synthetic/mqar.py) or prepared token shards (train/sources.py); the
# ablation runs them in this order, recall first.
TASKS = ("mqar", "lm")


@dataclass
class TrainConfig:
    """Everything that defines a training run. Help texts double as the CLI's (see `add_arguments`)."""

    task: str = field(default="lm", metadata={"help": "lm: language modelling on --data; mqar: generated "
                                                       "multi-query associative recall (the --mqar-* fields)"})
    data: str | None = field(default=None, metadata={"help": "prepared data directory (openjamba prepare)"})
    mqar_vocab_size: int = field(default=8192, metadata={"help": "MQAR: tokens (keys below half, values above)"})
    mqar_kv_pairs: int = field(default=16, metadata={"help": "MQAR: key-value pairs per sequence"})
    mqar_queries: int | None = field(default=None, metadata={"help": "MQAR: queries per sequence (default: "
                                                                     "every key once)"})
    mqar_power_a: float | None = field(default=0.01, metadata={"help": "MQAR: power-law exponent of the query "
                                                                       "gaps (Zoology's); none: uniform"})
    out: str = field(default="runs/train", metadata={"help": "output directory: checkpoints, metrics, model"})
    preset: str | None = field(default=None, metadata={"help": "model preset (default tiny when nothing else)"})
    config: str | None = field(default=None, metadata={"help": "model config.json (instead of a preset)"})
    init_from: str | None = field(default=None, metadata={"help": "fine-tune: checkpoint directory or Hub repo id"})
    model: dict[str, Any] = field(default_factory=dict, metadata={"help": None})  # set through --set / recipe
    steps: int = field(default=1000, metadata={"help": "optimizer steps in the whole run"})
    batch_size: int = field(default=16, metadata={"help": "sequences per optimizer step, over all ranks"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per step on each rank"})
    seq_len: int = field(default=256, metadata={"help": "tokens per sequence"})
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final learning rate as a fraction of --lr"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warmup steps before the cosine decay"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (matrices and embeddings)"})
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0: off)"})
    seed: int = field(default=0, metadata={"help": "seed for initialisation and data order"})
    log_every: int = field(default=10, metadata={"help": "steps between log lines and metrics.jsonl records"})
    eval_every: int = field(default=100, metadata={"help": "steps between validation losses (0: only at the end)"})
    eval_batches: int = field(default=4, metadata={"help": "validation set size, in batches of --batch-size"})
    save_every: int = field(default=200, metadata={"help": "steps between checkpoints (0: only at the end)"})
    keep: int = field(default=2, metadata={"help": "checkpoints kept (the newest)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile each decoder layer"})
    activation_checkpointing: bool = field(default=False, metadata={"help": "recompute layer activations"})
    device: str | None = field(default=None, metadata={"help": "default: cuda if available, else cpu"})
    threads: int | None = field(default=None, metadata={"help": "CPU threads for PyTorch ops (default: one per core)"})

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose lm (prepared --data) or mqar (generated recall)")
        if self.task == "lm" and not self.data:
            raise ValueError("no training data: pass --data DIR (a directory made by `openjamba prepare`), "
                             "or --task mqar")
        sources = [name for name in ("preset", "config", "init_from") if getattr(self, name)]
        if len(sources) > 1:
            raise ValueError(f"choose one model source, got {', '.join('--' + s.replace('_', '-') for s in sources)}")
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "log_every", "keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.device is not None:
            parse_device(self.device)
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        for name in ("warmup_steps", "eval_every", "eval_batches", "save_every", "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"need lr > 0 and 0 <= min_lr_ratio <= 1, got {self.lr} and {self.min_lr_ratio}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_absolute_paths(self) -> TrainConfig:
        """A copy whose paths do not depend on the working directory: a checkpoint stores its config, and a run
        resumed from another directory must find the same data and write to the same place."""
        from ..hf import resolve_checkpoint

        paths = {name: str(Path(value).expanduser().resolve()) for name in ("data", "out", "config")
                 if (value := getattr(self, name))}
        if self.init_from:  # a Hub repo id becomes its snapshot in the Hugging Face cache
            paths["init_from"] = str(resolve_checkpoint(self.init_from).resolve())
        return dataclasses.replace(self, **paths)

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "config") -> TrainConfig:
        return cls(**_checked_fields(cls, data, origin))


def _checked_fields(cls, data: dict[str, Any], origin: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{origin}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return dict(data)


def load_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe file (JSON, or TOML by its .toml suffix) as a dict of TrainConfig fields."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no recipe file at {path}")
    text = path.read_text()
    if path.suffix == ".toml":
        try:
            import tomllib
        except ImportError as err:  # Python 3.10
            raise ValueError(f"{path}: TOML recipes need Python 3.11 or later; write the recipe as JSON") from err
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path} is not valid TOML: {err}") from err
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe must be a table/object of trainer fields")
    _checked_fields(TrainConfig, data, str(path))
    _check_model_fields(data.get("model", {}), str(path))
    return data


def _check_model_fields(model: dict[str, Any], origin: str) -> None:
    names = {f.name for f in dataclasses.fields(JambaConfig) if f.name != "extra"}
    unknown = sorted(set(model) - names)
    if unknown:
        raise ValueError(f"{origin}: unknown model field(s) {', '.join(unknown)} (fields are JambaConfig's)")


def parse_set(items: list[str]) -> dict[str, Any]:
    """`--set FIELD=VALUE` items as a dict; VALUE is JSON when it parses (4, 1e-3, true, [2, 518]), else a string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key.strip()] = value
    _check_model_fields(out, "--set")
    return out


def _none_or(kind: type):
    """Parse a flag whose field is optional but defaults to a value: `none` sets it back to None."""

    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, defaulting to 'not given' so that only what is typed overrides."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "model":
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help")
        default_text = f" (default: {f.default})" if f.default is not None else ""
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": (help_text or f.name) + default_text}
        kinds = typing.get_args(hints[f.name]) or (hints[f.name],)
        kind = next(t for t in kinds if t is not type(None))
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _none_or(kind) if type(None) in kinds and f.default is not None else kind
        parser.add_argument(flag, **kwargs)
    parser.add_argument("--recipe", help="JSON or TOML file of trainer fields, with model fields under `model`")
    parser.add_argument("--set", dest="set_model", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a model config field, e.g. --set hidden_size=256 (repeatable)")


def config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults (or `base`, a saved run's config) < the recipe < flags given on the command line."""
    data: dict[str, Any] = dict(base or {})
    if getattr(args, "recipe", None):
        recipe = load_recipe(args.recipe)
        data.update({k: v for k, v in recipe.items() if k != "model"})
        data["model"] = {**data.get("model", {}), **recipe.get("model", {})}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    data.update({k: v for k, v in vars(args).items() if k in names and k != "model"})
    data["model"] = {**data.get("model", {}), **parse_set(getattr(args, "set_model", []) or [])}
    return TrainConfig.from_dict(data)


def base_model_config(cfg: TrainConfig) -> JambaConfig:
    """The architecture before data-dependent fields: preset, config.json or init checkpoint, then overrides."""
    if cfg.init_from:
        base = JambaConfig.from_pretrained(cfg.init_from)
    elif cfg.config:
        base = JambaConfig.from_pretrained(cfg.config)
    else:
        base = get_preset(cfg.preset or "tiny")
    return base.replace(**cfg.model) if cfg.model else base
