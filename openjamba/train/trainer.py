"""The training loop: one path for pretraining and fine-tuning, on a laptop CPU or on many GPUs under torchrun.

Per optimizer step each rank runs `grad_accum` micro-batches of `batch_size / (world_size * grad_accum)`
sequences, so a step always consumes `batch_size` sequences whatever the launch: micro-batch a of rank r takes
sequences (a * world_size + r) * micro .. of the step's global batch, which makes 2 processes and 1 process with
2 accumulation steps see identical micro-batches. AdamW, linear warmup then cosine decay, gradient clipping,
MoE auxiliary loss (inside the model's loss), bf16 autocast on GPU and fp32 on CPU.

Everything that decides the next step is in a checkpoint (model, optimizer, scheduler, RNGs, sequences consumed),
and the data order is a pure function of (seed, position), so a resumed run continues the loss curve exactly.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from tqdm import tqdm

from ..config import JambaConfig
from ..files import building_dir, out_of_space, ran_out_of_space
from ..hf import save_pretrained
from ..info import count_parameters
from ..model import JambaForCausalLM, causal_lm_loss
from ..synthetic.mqar import answer_hits
from ..tokenizer import load_tokenizer
from . import checkpoint, distributed
from .config import TrainConfig, base_model_config
from .data import DataError
from .distributed import DistEnv
from .metrics import MetricsLog, format_line, plot_loss
from .rundir import claim_for_new_run, run_lock
from .sources import DataSource, make_source

NOT_EVALUATED: dict[str, float | None] = {"val_loss": None, "val_acc": None}  # `Trainer.evaluate`, not run

# Fields a resumed run must share with the run it continues: they decide which sequences each step has seen. Every
# other field takes effect from the resumed step on (the model and data are checked separately in `_restore`).
RESUME_FIXED = ("seed", "batch_size", "seq_len")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class NonFiniteLoss(RuntimeError):
    """The loss or gradient became NaN/inf: the run stops without stepping, keeping the last good checkpoint."""


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM arrived: a checkpoint was saved and the run stopped."""

    def __init__(self, signum: int, checkpoint_dir: Path) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint saved to {checkpoint_dir}")
        self.signum, self.checkpoint_dir = signum, checkpoint_dir


@dataclass
class TrainResult:
    out: Path
    step: int
    model_dir: Path
    checkpoint_dir: Path
    metrics_file: Path
    loss_png: Path
    val_loss: float | None
    val_acc: float | None = None  # recall accuracy of MQAR runs


def train(cfg: TrainConfig, resume: str | Path | None = None, overwrite: bool = False) -> TrainResult:
    """Run (or, with `resume`, continue) a training run; see the module docstring.

    The run holds a lock on its output directory throughout. A fresh run refuses a directory that holds a
    previous run's outputs unless `overwrite` (which deletes them first).
    """
    cfg.validate()
    cfg = cfg.with_absolute_paths()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    env = distributed.setup(cfg.device)
    try:
        with run_lock(Path(cfg.out), enabled=env.is_main):
            return Trainer(cfg, env, resume, overwrite).run()
    finally:
        distributed.teardown()


def resume_config(resume: str | Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint that `resume` (a checkpoint, checkpoints root or run directory) names, and its run's config."""
    path = checkpoint.resolve(resume)
    if path is None:
        raise FileNotFoundError(f"no checkpoint to resume at {resume} (looked for trainer.json, "
                                f"latest and checkpoints/latest)")
    return path, checkpoint.read_trainer_state(path)["train_config"]


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1 over `warmup` steps, then cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_model_config(cfg: TrainConfig, source: DataSource) -> JambaConfig:
    """The run's architecture. From scratch, vocabulary and special ids come from the data (its tokenizer, or
    the MQAR generator's vocabulary)."""
    config = base_model_config(cfg)
    if not cfg.init_from:
        changes: dict[str, Any] = {}
        if "vocab_size" not in cfg.model:
            changes["vocab_size"] = source.vocab_size
        for key, value in source.special_ids.items():
            if key not in cfg.model and value is not None:
                changes[key] = value
        config = config.replace(**changes)
    source.check_vocab(config.vocab_size)
    return config


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices and embeddings; not norms, biases, or Mamba's A_log and D (decaying them is harmful)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and not name.endswith("A_log") else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Trainer:
    """One run: data, model (FSDP-sharded under torchrun), optimizer and schedule, restored from a checkpoint
    when resuming; `run()` trains to `cfg.steps`, then saves, exports and plots."""

    def __init__(self, cfg: TrainConfig, env: DistEnv, resume: str | Path | None = None,
                 overwrite: bool = False) -> None:
        self.cfg, self.env = cfg, env
        self.out = Path(cfg.out)
        self.ckpt_root = checkpoint.checkpoint_root(self.out)
        if cfg.batch_size % (env.world_size * cfg.grad_accum):
            raise ValueError(f"batch_size ({cfg.batch_size}) must be divisible by world size ({env.world_size}) "
                             f"x grad_accum ({cfg.grad_accum})")
        self.micro = cfg.batch_size // (env.world_size * cfg.grad_accum)
        self.source = make_source(cfg)
        self.tokenizer = self.source.tokenizer()
        self.model_config = build_model_config(cfg, self.source)
        self.model = self._build_model()
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr,
                                           betas=(cfg.beta1, cfg.beta2))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
        self.step, self.samples = 0, 0
        self.last_checkpoint: Path | None = None
        resume_path = checkpoint.resolve(resume) if resume is not None else None
        if resume is not None and resume_path is None:
            raise FileNotFoundError(f"no checkpoint to resume at {resume}")
        if env.is_main:
            checkpoint.remove_partial(self.ckpt_root)
            if resume_path is None:
                claim_for_new_run(self.out, overwrite)
        distributed.barrier(env)
        if resume_path is not None:
            self._restore(resume_path)
        self.metrics = MetricsLog(self.out / "metrics.jsonl", env.is_main, self.step if resume_path else None)
        self.stop_signal: int | None = None
        self._clock: dict[str, float] = {}  # loop start and the current logging interval, set by run()

    # ------------------------------------------------------------------ set-up
    def _build_model(self) -> torch.nn.Module:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # the same initialisation on every rank, and in every run with this seed
        if cfg.init_from:
            model = self._load_pretrained(Path(cfg.init_from))
        else:
            model = JambaForCausalLM(self.model_config)
        model.train()
        model.gradient_checkpointing = cfg.activation_checkpointing
        if cfg.compile:
            for layer in model.model.layers:
                layer.compile()
        model.to(self.env.device)
        if self.env.distributed:
            distributed.shard_model(model, self.env)
        return model

    def _load_pretrained(self, path: Path) -> JambaForCausalLM:
        """The checkpoint's weights in a model of the run's config: `--set` may change what is not a shape."""
        self._check_tokenizer(path)
        pretrained = JambaForCausalLM.from_pretrained(path, dtype=torch.float32)
        if pretrained.config == self.model_config:
            return pretrained
        with torch.device("meta"):
            model = JambaForCausalLM(self.model_config)
        try:
            model.load_state_dict(pretrained.state_dict(), assign=True)
        except RuntimeError as err:
            raise ValueError(f"--set changes the architecture of the --init-from checkpoint: {err}") from None
        model.tie_weights()
        return model

    def _check_tokenizer(self, init_dir: Path) -> None:
        if self.tokenizer is not None and any((init_dir / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
            if load_tokenizer(init_dir).get_vocab() != self.tokenizer.get_vocab():
                warnings.warn(f"the data in {self.cfg.data} was tokenized with a different tokenizer than "
                              f"{init_dir}'s; prepare it with --tokenizer {init_dir}", stacklevel=3)

    def _restore(self, path: Path) -> None:
        state = checkpoint.read_trainer_state(path)
        saved = state["train_config"]
        changed = [k for k in RESUME_FIXED if saved[k] != getattr(self.cfg, k)]
        if changed:
            raise ValueError(f"cannot resume with a different {', '.join(changed)} "
                             f"(checkpoint: {', '.join(f'{k}={saved[k]}' for k in changed)})")
        if state["model_config"] != self.model_config.to_dict():
            raise ValueError("cannot resume: the model config differs from the checkpoint's")
        if state["data_fingerprint"] != self.source.fingerprint:
            what = self.cfg.data if self.cfg.task == "lm" else "this MQAR task"
            raise DataError(f"cannot resume: {what} is not the data the checkpoint was trained on")
        if state["step"] > self.cfg.steps:
            raise ValueError(f"cannot resume: the checkpoint is at step {state['step']}, beyond --steps "
                             f"{self.cfg.steps}; pass a larger --steps")
        checkpoint.load(path, self.model, self.optimizer, self.env)
        self.scheduler.load_state_dict(state["scheduler"])
        self._apply_optimizer_settings()
        self.step, self.samples = state["step"], state["samples"]
        self.last_checkpoint = path
        changes = [f"{k} {saved[k]} -> {v}" for k, v in self.cfg.to_dict().items()
                   if k in saved and saved[k] != v and k not in ("out", "data", "config", "init_from")]
        self._print(f"resumed from {path} at step {self.step}" + (f"; changed: {', '.join(changes)}" if changes
                                                                  else ""))
        if self.step >= self.cfg.steps:  # nothing left to train: say so rather than only re-export quietly
            self._print(f"the run has already reached its {self.cfg.steps} steps; --steps N (more than "
                        f"{self.step}) trains it on")

    def _apply_optimizer_settings(self) -> None:
        """Loading the optimizer and scheduler restores the hyperparameters they were saved with; the run's
        settings replace them, so that a resumed --lr, --weight-decay or --beta1 takes effect (the schedule's
        shape, --steps and --warmup-steps, is the current config's already: its function is never saved)."""
        cfg = self.cfg
        fresh = param_groups(self.model, cfg.weight_decay)
        self.scheduler.base_lrs = [cfg.lr] * len(self.optimizer.param_groups)
        for i, (group, default) in enumerate(zip(self.optimizer.param_groups, fresh)):
            group.update(weight_decay=default["weight_decay"], betas=(cfg.beta1, cfg.beta2), initial_lr=cfg.lr,
                         lr=cfg.lr * self.scheduler.lr_lambdas[i](self.scheduler.last_epoch))
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _print(self, text: str) -> None:
        if self.env.is_main:
            tqdm.write(text, file=sys.stdout)

    def _autocast(self):
        if self.env.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()  # fp32 on CPU: bf16 matmuls are far slower than fp32 there

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, float]:
        """Forward/backward over this rank's micro-batches, check the loss, clip, step. Returns the statistics."""
        cfg, env = self.cfg, self.env
        loss_sum = torch.zeros((), device=env.device)
        aux_sum = torch.zeros((), device=env.device)
        for a in range(cfg.grad_accum):
            start = self.samples + (a * env.world_size + env.rank) * self.micro
            ids, labels = self.source.train_batch(start, self.micro)
            ids, labels = ids.to(env.device, non_blocking=True), labels.to(env.device, non_blocking=True)
            with self._autocast():
                out = self.model(ids, labels=labels)
            (out.loss / cfg.grad_accum).backward()
            loss_sum += out.loss.detach().float()
            if out.aux_loss is not None:
                aux_sum += out.aux_loss.detach().float()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        # One collective for the statistics and for whether any rank was signalled (all must stop at one step).
        signalled = [float(self.stop_signal == s) for s in STOP_SIGNALS]
        loss, aux, *signalled = distributed.all_reduce_sum(
            [loss_sum.item() / cfg.grad_accum, aux_sum.item() / cfg.grad_accum, *signalled], env)
        loss, aux = loss / env.world_size, aux / env.world_size
        grad_norm = float(grad_norm)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            where = f"{self.last_checkpoint} (step {self._checkpoint_step()})" if self.last_checkpoint else "none yet"
            raise NonFiniteLoss(f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step "
                                f"{self.step + 1} (loss {loss}, grad norm {grad_norm}); stopped without applying "
                                f"it. Last good checkpoint: {where}. Try a lower --lr or more --warmup-steps.")
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.samples += cfg.batch_size
        if self.stop_signal is None:
            self.stop_signal = next((s for s, n in zip(STOP_SIGNALS, signalled) if n > 0), None)
        has_aux = self.model_config.num_experts > 1
        coef = self.model_config.router_aux_loss_coef
        return {"loss": loss, "ce": loss - coef * aux if has_aux else loss, "aux": aux if has_aux else None,
                "lr": lr, "grad_norm": grad_norm}

    def _checkpoint_step(self) -> int:
        return int(self.last_checkpoint.name.removeprefix(checkpoint.PREFIX)) if self.last_checkpoint else 0

    @torch.no_grad()
    def evaluate(self) -> dict[str, float | None]:
        """Validation loss (mean cross-entropy over the labelled tokens of the fixed validation set, spread evenly
        over the ranks) and, for MQAR, recall accuracy from the same logits: {"val_loss": .., "val_acc": ..}."""
        usable = self.source.val_size // self.env.world_size * self.env.world_size
        if usable == 0:
            return dict(NOT_EVALUATED)
        mine = np.arange(usable)[self.env.rank::self.env.world_size]
        self.model.eval()
        total = correct = answers = 0.0
        for start in range(0, len(mine), self.micro):
            ids, labels = self.source.val_batch(mine[start : start + self.micro])
            ids, labels = ids.to(self.env.device), labels.to(self.env.device)
            with self._autocast():
                logits = self.model(ids).logits
            total += causal_lm_loss(logits, labels).item() * len(ids)
            if self.source.reports_accuracy:
                hit, count = answer_hits(logits, labels)
                correct, answers = correct + hit, answers + count
        self.model.train()
        total, correct, answers = distributed.all_reduce_sum([total, correct, answers], self.env)
        return {"val_loss": total / usable, "val_acc": correct / answers if answers else None}

    # ------------------------------------------------------------------ checkpoints and export
    def save(self) -> Path:
        if self.last_checkpoint is not None and self._checkpoint_step() == self.step and self.last_checkpoint.exists():
            return self.last_checkpoint
        state = {"step": self.step, "samples": self.samples, "scheduler": self.scheduler.state_dict(),
                 "train_config": self.cfg.to_dict(), "model_config": self.model_config.to_dict(),
                 "data_fingerprint": self.source.fingerprint, "world_size": self.env.world_size}
        self.last_checkpoint = checkpoint.save(self.ckpt_root, self.step, self.model, self.optimizer, state,
                                               self.env, self.cfg.keep)
        return self.last_checkpoint

    def export(self) -> Path:
        """The final model as a Hugging Face directory (config.json, safetensors, tokenizer.json), from rank 0."""
        target = self.out / "model"
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.env.is_main:
            with torch.device("meta"):
                plain = JambaForCausalLM(self.model_config)
            plain.load_state_dict(state, assign=True)
            plain.tie_weights()
            try:
                with building_dir(target) as tmp:  # the previous export stays whole until the new one is
                    save_pretrained(plain, tmp, tokenizer=self.tokenizer)
            except Exception as err:
                if ran_out_of_space(err, self.out, checkpoint.state_bytes(state)):
                    raise out_of_space(target, checkpoint.state_bytes(state)) from None
                raise
        distributed.barrier(self.env)
        return target

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        cfg = self.cfg
        self._print(self._describe())
        previous = self._install_signal_handlers()
        bar = tqdm(total=cfg.steps, initial=self.step, unit="step", dynamic_ncols=True, file=sys.stderr,
                   disable=not (self.env.is_main and sys.stderr.isatty()))
        self._clock = {"start": time.perf_counter(), "start_step": self.step}
        self._clock.update(interval=self._clock["start"], interval_step=self.step)
        val = dict(NOT_EVALUATED)
        try:
            while self.step < cfg.steps:
                stats = self.train_step()
                last = self.step == cfg.steps
                evaluated = last or _due(self.step, cfg.eval_every)
                val = self.evaluate() if evaluated else dict(NOT_EVALUATED)
                if last or val["val_loss"] is not None or _due(self.step, cfg.log_every):
                    self._log({**stats, **val})
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.3f}", refresh=False)
                if self.stop_signal is not None:
                    raise TrainingInterrupted(self.stop_signal, self.save())
                if last or _due(self.step, cfg.save_every):
                    self.save()
        finally:
            bar.close()
            self._restore_signal_handlers(previous)
        if val["val_loss"] is None and self.step == cfg.steps:  # resumed at the very end: nothing ran
            val = self.evaluate()
        ckpt = self.save()
        model_dir = self.export()
        png = self.out / "loss.png"
        if self.env.is_main:
            plot_loss(self.metrics.path, png, title=f"{self.out.name}: {self.model_config.num_hidden_layers} layers, "
                                                    f"{cfg.steps} steps")
        return TrainResult(self.out, self.step, model_dir, ckpt, self.metrics.path, png, val["val_loss"],
                           val["val_acc"])

    def _log(self, stats: dict[str, Any]) -> None:
        """One metrics.jsonl record and one log line, with throughput over the interval and the ETA."""
        cfg, clock, now = self.cfg, self._clock, time.perf_counter()
        per_step = (now - clock["start"]) / (self.step - clock["start_step"])
        record = {"step": self.step, **stats, "tokens": self.samples * cfg.seq_len,
                  "tok_per_s": cfg.batch_size * cfg.seq_len * (self.step - clock["interval_step"])
                  / (now - clock["interval"]),
                  "elapsed_s": now - clock["start"], "eta_s": per_step * (cfg.steps - self.step)}
        self.metrics.append({k: v for k, v in record.items() if v is not None})
        self._print(format_line(record, cfg.steps))
        clock.update(interval=now, interval_step=self.step)

    def _describe(self) -> str:
        c, cfg, env = self.model_config, self.cfg, self.env
        counts = count_parameters(c)
        return (f"model: {counts['total'] / 1e6:.2f}M parameters ({counts['active'] / 1e6:.2f}M active), "
                f"{c.num_hidden_layers} layers [{' '.join(c.layer_plan())}]\n"
                f"{self.source.describe(cfg.seq_len)}\n"
                f"run: {cfg.steps} steps x {cfg.batch_size} sequences ({env.world_size} rank(s) x {cfg.grad_accum} "
                f"micro-batch(es) of {self.micro}), lr {cfg.lr:g}, device {env.device}, out {self.out}")

    def _install_signal_handlers(self) -> dict[int, Any]:
        """SIGINT/SIGTERM finish the current step, save a checkpoint and stop; a second SIGINT stops at once."""
        def handler(signum, frame):
            self.stop_signal = signum
            signal.signal(signal.SIGINT, signal.default_int_handler)

        previous = {}
        with contextlib.suppress(ValueError):  # not the main thread (e.g. embedded): no handlers, no harm
            for signum in STOP_SIGNALS:
                previous[signum] = signal.signal(signum, handler)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict[int, Any]) -> None:
        for signum, old in previous.items():
            signal.signal(signum, old)
