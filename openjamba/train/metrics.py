"""What a training run reports: one log line per interval, `metrics.jsonl`, and the loss-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..files import write_atomic
from ..plotting import pyplot, save_figure


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def format_line(record: dict[str, Any], total_steps: int) -> str:
    """`step 00120/01000 (12.0%) | loss 3.1416 | ce 3.1396 | aux 2.01 | lr 3.00e-04 | ... | eta 2m10s`."""
    width = len(str(total_steps))
    parts = [f"step {record['step']:0{width}d}/{total_steps} ({100 * record['step'] / total_steps:.1f}%)",
             f"loss {record['loss']:.4f}"]
    if record.get("aux") is not None:
        parts.append(f"ce {record['ce']:.4f} | aux {record['aux']:.3f}")
    if record.get("val_loss") is not None:
        parts.append(f"val {record['val_loss']:.4f}")
    if record.get("val_acc") is not None:
        parts.append(f"recall {record['val_acc']:.3f}")
    parts += [f"lr {record['lr']:.2e}", f"grad {record['grad_norm']:.2f}", f"tok/s {record['tok_per_s']:,.0f}",
              f"elapsed {format_duration(record['elapsed_s'])}", f"eta {format_duration(record['eta_s'])}"]
    return " | ".join(parts)


class MetricsLog:
    """Appends one JSON object per logged step to `metrics.jsonl` (rank 0 only).

    On resume, records after the checkpoint's step are dropped first: a run killed after its last checkpoint had
    logged steps that the resumed run will log again, and the file should hold one clean curve.
    """

    def __init__(self, path: Path, enabled: bool, resume_step: int | None) -> None:
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(path) if r["step"] <= resume_step] if resume_step is not None else []
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))

    def append(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl. A torn last line (the process was killed while appending it) is dropped:
    the resumed run logs that step again. A bad line anywhere else is damage worth reporting."""
    if not path.is_file():
        return []
    lines = [(number, line) for number, line in enumerate(path.read_text().splitlines(), start=1) if line.strip()]
    records = []
    for index, (number, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if index == len(lines) - 1:
                break
            raise ValueError(f"{path}:{number} is not a JSON record ({err.msg}); fix or remove that line") from None
    return records


def plot_loss(metrics_file: Path, png_file: Path, title: str = "") -> Path:
    """Training loss (and validation loss where measured) against step, as a PNG."""
    plt = pyplot()
    records = read_metrics(metrics_file)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss", linewidth=1.2)
    val = [r for r in records if r.get("val_loss") is not None]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss", markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, png_file)
