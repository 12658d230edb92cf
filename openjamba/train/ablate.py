"""`openjamba ablate`: the paper's architecture ablation (Sec. 6) at laptop scale, through the normal trainer.

Variants: attention-only, Mamba-only, and Jamba hybrids with 1 attention layer in 4 (a:m = 1:3) or in 8 (1:7),
each hybrid with and without MoE. All have the same depth and width; the dense variants are brought to equal
total parameters by choosing each one's MLP width (`intermediate_size`): attention and Mamba mixers differ in
size, so a model with more attention layers gets wider MLPs. The MoE variants follow the paper's layout (MoE in
every other layer, top-2 of `num_experts`) with the MLP/expert width chosen so that the parameters a token touches
match the reference: equal *active* parameters (about 2/3 of the dense width, since a top-2 MoE layer runs two
experts), more total ones. Every variant of a task trains on the same
sequences (same seed, steps, batch and length: equal tokens).

Tasks: `mqar` trains on multi-query associative recall and reports recall accuracy at the training length and at
other lengths (key-value pairs scaled with the length, as in Zoology); `lm` trains on a prepared corpus (by default
the standard library, `openjamba prepare`) and reports the validation loss. Output in `--out`: one trainer run
directory per (task, variant) with its metrics.jsonl, `results.json`, `results.md` (the table) and the plots
`loss_curves.png` and `recall_vs_seq_len.png`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import JambaConfig
from ..info import count_parameters
from ..plotting import pyplot, save_figure
from ..synthetic.mqar import MQARConfig, mqar_accuracy, mqar_batch
from .config import TASKS
from .metrics import format_duration, read_metrics

# name: (attention layers in every `period` layers, or "all"/None; MoE)
VARIANTS: dict[str, tuple[int | str | None, bool]] = {
    "attention": ("all", False),
    "mamba": (None, False),
    "hybrid-1:3": (4, False),
    "hybrid-1:7": (8, False),
    "hybrid-1:3-moe": (4, True),
    "hybrid-1:7-moe": (8, True),
}
REFERENCE_VARIANT = "hybrid-1:7"  # the dense variants match its parameter count (Jamba's own ratio)


@dataclass
class AblationSettings:
    """One ablation. `DEFAULT` is sized for one CPU thread (docs/ablations.md has its run); `SMOKE` is the tests'
    toy version."""

    out: str = "runs/ablate"
    variants: tuple[str, ...] = tuple(VARIANTS)
    tasks: tuple[str, ...] = TASKS
    seed: int = 0
    threads: int | None = 1
    # the model: every variant has this depth and width
    hidden_size: int = 64
    num_layers: int = 8
    num_heads: int = 4
    intermediate_size: int = 128  # of the reference variant; the others' is chosen to match its parameters
    mamba_d_state: int = 8
    num_experts: int = 4
    # the optimisation, shared by both tasks
    batch_size: int = 16  # smaller batches, more updates: MQAR's recall sets in sooner for equal tokens
    lr: float = 3e-3
    warmup_steps: int = 30
    # MQAR
    mqar_steps: int = 1200
    mqar_seq_len: int = 64
    mqar_kv_pairs: int = 8
    mqar_vocab_size: int = 256
    mqar_eval_seq_lens: tuple[int, ...] = (16, 32, 64, 128, 256)
    mqar_eval_examples: int = 256
    # language modelling
    lm_steps: int = 250
    lm_seq_len: int = 128
    lm_data: str | None = None  # a prepared directory; default: prepare the standard library into OUT/data
    lm_vocab_size: int = 1024
    lm_eval_batches: int = 8

    def validate(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ValueError(f"unknown variant(s) {', '.join(unknown) or '(none given)'}; choose from "
                             f"{', '.join(VARIANTS)}")
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ValueError(f"unknown task(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(TASKS)}")
        for name in ("mqar_steps", "lm_steps", "batch_size", "hidden_size", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_layers % 8:
            raise ValueError(f"num_layers must be a multiple of 8 so that a 1:7 hybrid exists, got {self.num_layers}")
        for length in (self.mqar_seq_len, *self.mqar_eval_seq_lens):
            self.mqar_task(length).validate()

    def mqar_task(self, seq_len: int) -> MQARConfig:
        """The MQAR task at a length: key-value pairs in proportion to the length, as trained at mqar_seq_len."""
        pairs = max(1, round(self.mqar_kv_pairs * seq_len / self.mqar_seq_len))
        return MQARConfig(vocab_size=self.mqar_vocab_size, seq_len=seq_len, num_kv_pairs=pairs)


DEFAULT = AblationSettings()
SMOKE = AblationSettings(out="runs/ablate-smoke", hidden_size=16, num_heads=2, intermediate_size=32, mamba_d_state=4,
                         batch_size=4, warmup_steps=2, mqar_steps=4, mqar_seq_len=32, mqar_kv_pairs=4,
                         mqar_vocab_size=64, mqar_eval_seq_lens=(16, 32), mqar_eval_examples=16, lm_steps=4,
                         lm_seq_len=32, lm_vocab_size=300, lm_eval_batches=1)


# ---------------------------------------------------------------------- the variants' architectures
def _layout(name: str, settings: AblationSettings) -> dict[str, Any]:
    """Layer-plan fields of a variant (transformers' rule: layer i is attention when i % period == offset)."""
    attention, moe = VARIANTS[name]
    n = settings.num_layers
    if attention == "all":
        plan = {"attn_layer_period": 1, "attn_layer_offset": 0}
    elif attention is None:
        plan = {"attn_layer_period": n + 1, "attn_layer_offset": n}  # i < n never equals n: no attention layer
    else:
        plan = {"attn_layer_period": attention, "attn_layer_offset": attention // 2}  # Jamba: layer 4 of 8
    if moe:
        plan.update(num_experts=settings.num_experts, num_experts_per_tok=2, expert_layer_period=2,
                    expert_layer_offset=1)
    else:
        plan.update(num_experts=1, num_experts_per_tok=1)
    return plan


def _base_fields(settings: AblationSettings, vocab_size: int) -> dict[str, Any]:
    return dict(vocab_size=vocab_size, hidden_size=settings.hidden_size, num_hidden_layers=settings.num_layers,
                num_attention_heads=settings.num_heads, num_key_value_heads=settings.num_heads,
                intermediate_size=settings.intermediate_size, mamba_d_state=settings.mamba_d_state,
                tie_word_embeddings=False, max_position_embeddings=1 << 20)


def variant_configs(settings: AblationSettings, vocab_size: int) -> dict[str, JambaConfig]:
    """Each requested variant's JambaConfig, its MLP width chosen so that its total (dense variants) or active
    (MoE variants) parameters match the reference variant's."""
    base = _base_fields(settings, vocab_size)
    target = count_parameters(JambaConfig(**base, **_layout(REFERENCE_VARIANT, settings)))["total"]
    configs: dict[str, JambaConfig] = {}
    for name in settings.variants:
        config = JambaConfig(**base, **_layout(name, settings))
        configs[name] = _equal_parameters(config, target, "active" if VARIANTS[name][1] else "total")
    return configs


def _equal_parameters(config: JambaConfig, target: int, kind: str) -> JambaConfig:
    """The config with the MLP width whose `kind` ("total" or "active") parameter count is closest to `target`.

    The count is linear in the width (3 H parameters per unit per dense MLP or active expert), so one step of
    the line is exact.
    """
    count = count_parameters(config)[kind]
    per_unit = count_parameters(config.replace(intermediate_size=config.intermediate_size + 1))[kind] - count
    width = max(1, config.intermediate_size + round((target - count) / per_unit))
    return config.replace(intermediate_size=width)


# ---------------------------------------------------------------------- running
def run_ablation(settings: AblationSettings, log=print) -> dict[str, Any]:
    """Train every (task, variant), evaluate, and write results.json, results.md and the plots into settings.out."""
    from .config import TrainConfig

    settings.validate()
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    start = time.perf_counter()  # the wall time includes preparing the corpus
    lm_data = _lm_data(settings, out, log) if "lm" in settings.tasks else None
    jobs = [(task, name) for task in settings.tasks for name in settings.variants]
    results: dict[str, Any] = {"settings": _jsonable(settings), "runs": []}
    for done, (task, name) in enumerate(jobs):
        vocab = settings.mqar_vocab_size if task == "mqar" else json.loads((lm_data / "meta.json").read_text())[
            "vocab_size"]
        config = variant_configs(settings, vocab)[name]
        run_dir = out / task / name.replace(":", "-")
        shutil.rmtree(run_dir, ignore_errors=True)  # an ablation always trains from scratch
        elapsed = time.perf_counter() - start
        eta = f", eta {format_duration(elapsed / done * (len(jobs) - done))}" if done else ""
        counts = count_parameters(config)
        log(f"== ablate [{done + 1}/{len(jobs)}] {task} {name}: {counts['total'] / 1e3:.1f}K parameters "
            f"({counts['active'] / 1e3:.1f}K active), intermediate_size {config.intermediate_size}, "
            f"[{' '.join(config.layer_plan())}] (elapsed {format_duration(elapsed)}{eta})")
        cfg = TrainConfig(**_train_fields(settings, task, config, run_dir, lm_data))
        record = _train_and_measure(cfg, settings, task, name, config)
        record["run_dir"] = str(run_dir.relative_to(out))  # relative to results.json: the folder can move
        results["runs"].append(record)
        log(f"== ablate [{done + 1}/{len(jobs)}] {task} {name} done in {format_duration(record['train_s'])}: "
            + ", ".join(f"{k} {record[k]:.4g}" for k in ("val_loss", "recall") if record.get(k) is not None))
    results["wall_s"] = time.perf_counter() - start
    write_outputs(results, out)
    log(f"== ablate finished in {format_duration(results['wall_s'])}: {out / 'results.md'}, "
        f"{out / 'loss_curves.png'}" + (f", {out / 'recall_vs_seq_len.png'}" if "mqar" in settings.tasks else ""))
    return results


def _lm_data(settings: AblationSettings, out: Path, log) -> Path:
    if settings.lm_data:
        return Path(settings.lm_data)
    from .data import prepare

    data = out / "data"
    if (data / "meta.json").is_file() and json.loads((data / "meta.json").read_text())["vocab_size"] == \
            settings.lm_vocab_size:
        log(f"== ablate: reusing the prepared corpus in {data}")
        return data
    log(f"== ablate: preparing the default corpus (the standard library, vocabulary {settings.lm_vocab_size}) "
        f"-> {data}")
    prepare(None, data, vocab_size=settings.lm_vocab_size, progress=False)
    return data


def _train_fields(settings: AblationSettings, task: str, config: JambaConfig, run_dir: Path,
                  lm_data: Path | None) -> dict[str, Any]:
    """TrainConfig fields of one run. The model is given field by field; for LM the vocabulary and special ids
    still come from the data, for MQAR from the generator."""
    model = {k: v for k, v in config.to_dict().items()
             if k in {f.name for f in dataclasses.fields(JambaConfig)} - {"extra", "vocab_size", "pad_token_id",
                                                                          "bos_token_id", "eos_token_id"}}
    steps = settings.mqar_steps if task == "mqar" else settings.lm_steps
    fields: dict[str, Any] = dict(
        task=task, out=str(run_dir), preset="tiny", model=model, steps=steps, batch_size=settings.batch_size,
        lr=settings.lr, warmup_steps=min(settings.warmup_steps, steps - 1), seed=settings.seed,
        log_every=max(1, steps // 20), eval_every=max(1, steps // 5), save_every=0, keep=1,
        threads=settings.threads, device="cpu" if not torch.cuda.is_available() else None)
    if task == "mqar":
        fields.update(seq_len=settings.mqar_seq_len, mqar_vocab_size=settings.mqar_vocab_size,
                      mqar_kv_pairs=settings.mqar_kv_pairs, eval_batches=max(1, 256 // settings.batch_size))
    else:
        fields.update(data=str(lm_data), seq_len=settings.lm_seq_len, eval_batches=settings.lm_eval_batches)
    return fields


def _train_and_measure(cfg, settings: AblationSettings, task: str, name: str, config: JambaConfig) -> dict:
    from ..model import JambaForCausalLM
    from .trainer import train

    result = train(cfg)
    metrics = read_metrics(result.metrics_file)
    last = metrics[-1]
    counts = count_parameters(config)
    record: dict[str, Any] = {
        "task": task, "variant": name, "params": counts["total"], "active_params": counts["active"],
        "intermediate_size": config.intermediate_size, "layer_plan": config.layer_plan(), "steps": result.step,
        "tokens": last["tokens"], "train_s": last["elapsed_s"], "tok_per_s": _train_throughput(metrics),
        "val_loss": result.val_loss, "final_train_loss": last["loss"],
    }
    if task == "mqar":
        record["recall"] = result.val_acc
        model = JambaForCausalLM.from_pretrained(result.model_dir, dtype=torch.float32)
        record["recall_by_seq_len"] = {}
        for length in settings.mqar_eval_seq_lens:
            ids, labels = mqar_batch(settings.mqar_eval_examples, settings.mqar_task(length),
                                     seed=[settings.seed, 2, length])
            record["recall_by_seq_len"][str(length)] = mqar_accuracy(model, ids, labels)
    return record


def _train_throughput(metrics: list[dict[str, Any]]) -> float:
    """Median tokens/s over the logged intervals without a validation pass (those include evaluation time)."""
    rates = sorted(r["tok_per_s"] for r in metrics if r.get("val_loss") is None) or \
        sorted(r["tok_per_s"] for r in metrics)
    return rates[len(rates) // 2]


def _jsonable(settings: AblationSettings) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()}


# ---------------------------------------------------------------------- outputs
def results_table(results: dict[str, Any]) -> str:
    """The markdown table: one row per variant, MQAR and LM columns side by side."""
    settings = results["settings"]
    lengths = settings["mqar_eval_seq_lens"] if "mqar" in settings["tasks"] else []
    by = {(r["task"], r["variant"]): r for r in results["runs"]}
    header = ["variant", "params (active)"]
    if "mqar" in settings["tasks"]:
        header += [f"recall @{n}" for n in lengths] + ["MQAR tok/s"]
    if "lm" in settings["tasks"]:
        header += ["LM params (active)", "LM val loss", "LM tok/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in settings["variants"]:
        row = [name]
        mqar, lm = by.get(("mqar", name)), by.get(("lm", name))
        first = mqar or lm
        row.append(f"{first['params'] / 1e3:.1f}K ({first['active_params'] / 1e3:.1f}K)")
        if mqar:
            row += [f"{mqar['recall_by_seq_len'][str(n)]:.3f}" for n in lengths] + [f"{mqar['tok_per_s']:,.0f}"]
        if lm:
            row += [f"{lm['params'] / 1e3:.1f}K ({lm['active_params'] / 1e3:.1f}K)",
                    f"{lm['val_loss']:.4f}" if lm["val_loss"] is not None else "-", f"{lm['tok_per_s']:,.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(results: dict[str, Any], out: Path) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    settings = results["settings"]
    notes = []
    if "mqar" in settings["tasks"]:
        notes.append(f"MQAR: trained at length {settings['mqar_seq_len']} with {settings['mqar_kv_pairs']} key-value "
                     f"pairs for {settings['mqar_steps']} steps x {settings['batch_size']}; evaluated with pairs in "
                     "proportion to the length.")
    if "lm" in settings["tasks"]:
        notes.append(f"LM: {settings['lm_steps']} steps x {settings['batch_size']} x {settings['lm_seq_len']} tokens.")
    notes.append(f"Wall time {format_duration(results['wall_s'])}.")
    (out / "results.md").write_text(results_table(results) + "\n" + " ".join(notes) + "\n")
    plot_loss_curves(results, out / "loss_curves.png")
    if "mqar" in settings["tasks"]:
        plot_recall(results, out / "recall_vs_seq_len.png")


def plot_loss_curves(results: dict[str, Any], png: Path) -> Path:
    """Training loss against tokens per variant, one panel per task (validation points marked)."""
    plt = pyplot()
    tasks = results["settings"]["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), dpi=90, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for run in (r for r in results["runs"] if r["task"] == task):
            records = read_metrics(png.parent / run["run_dir"] / "metrics.jsonl")
            line, = ax.plot([r["tokens"] for r in records], [r["loss"] for r in records], label=run["variant"],
                            linewidth=1.2)
            val = [r for r in records if r.get("val_loss") is not None]
            ax.plot([r["tokens"] for r in val], [r["val_loss"] for r in val], "o", color=line.get_color(),
                    markersize=3)
        ax.set_title(f"{task}: training loss (dots: validation)")
        ax.set_xlabel("tokens")
        ax.set_ylabel("loss (nats/token)" if task == "lm" else "loss on the answers (nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, png)


def plot_recall(results: dict[str, Any], png: Path) -> Path:
    """MQAR recall accuracy against sequence length per variant (the trained length marked)."""
    plt = pyplot()
    settings = results["settings"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=90)
    for run in (r for r in results["runs"] if r["task"] == "mqar"):
        lengths = sorted(int(n) for n in run["recall_by_seq_len"])
        ax.plot(lengths, [run["recall_by_seq_len"][str(n)] for n in lengths], "o-", label=run["variant"])
    ax.axvline(settings["mqar_seq_len"], color="gray", linestyle=":", linewidth=1, label="trained length")
    ax.axhline(2 / settings["mqar_vocab_size"], color="black", linestyle="--", linewidth=0.8, label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(settings["mqar_eval_seq_lens"]), [str(n) for n in settings["mqar_eval_seq_lens"]])
    ax.set_xlabel(f"sequence length (key-value pairs = length x {settings['mqar_kv_pairs']}/"
                  f"{settings['mqar_seq_len']})")
    ax.set_ylabel("recall accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("MQAR recall")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, png)
