"""The benchmark's report: worker cells merged into rows, ratios against the compared models (or, for a
--quantize list, against the first weight format), utilisation, and the printed tables and plot."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from ..info import human_bytes
from .measure import processor_label


def row_key(row: dict[str, Any]) -> tuple:
    """What names a row: implementation, context, batch, and the weight format when a run compares several."""
    return row["impl"], row["context"], row["batch"], row.get("weights")


def row_label(row: dict[str, Any]) -> str:
    return f"{row['impl']} {row['weights']}" if "weights" in row else row["impl"]


def merge_cells(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (impl, context, batch[, weights]), the phase groups' figures side by side."""
    rows: dict[tuple, dict[str, Any]] = {}
    for cell in results:
        key = row_key(cell)
        row = rows.setdefault(key, {"impl": key[0], "context": key[1], "batch": key[2],
                                    **({"weights": key[3]} if key[3] else {})})
        for field, value in cell.items():
            if field == "error":
                row.setdefault("errors", []).append(f"{'+'.join(cell['phases'])}: {value}")
            elif field != "phases":
                row[field] = value
    return list(rows.values())


def ratios(rows: list[dict[str, Any]], compare: tuple[str, ...]) -> list[dict[str, Any]]:
    """For each compared implementation and cell: its time over ours (speed-up) and our memory over its memory."""
    ours = {(r["context"], r["batch"]): r for r in rows if r["impl"] == "openjamba"}
    return [{"versus": row["impl"], "context": row["context"], "batch": row["batch"],
             **_speedups(ours[(row["context"], row["batch"])], row)}
            for row in rows if row["impl"] != "openjamba" and (row["context"], row["batch"]) in ours]


def format_ratios(rows: list[dict[str, Any]], weights: list[str]) -> list[dict[str, Any]]:
    """For each weight format after the first, per cell: the first format's time over its own (its speed-up) and
    its model memory over the first's; for decode also each interleaved round's speed-up (min/median/max and the
    list), whose spread shows whether the memory rate moved between the formats' turns of a round."""
    first = {(r["context"], r["batch"]): r for r in rows if r.get("weights") == weights[0]}
    out = []
    for row in rows:
        base = first.get((row["context"], row["batch"]))
        if row.get("weights") in (None, weights[0]) or base is None:
            continue
        entry: dict[str, Any] = {"weights": row["weights"], "versus": weights[0], "context": row["context"],
                                 "batch": row["batch"], **_speedups(row, base)}
        if "model_mem_bytes" in row and "model_mem_bytes" in base:
            entry["model_mem_ratio"] = row["model_mem_bytes"] / base["model_mem_bytes"]
        if "decode_round_ms" in row and "decode_round_ms" in base:
            rounds = [b / r for b, r in zip(base["decode_round_ms"], row["decode_round_ms"])]
            entry["decode_round_speedups"] = rounds
            entry["decode_speedup_rounds"] = {"min": min(rounds), "median": statistics.median(rounds),
                                              "max": max(rounds)}
        out.append(entry)
    return out


def _speedups(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, float]:
    """Their time over ours per phase (speed-up) and our memory over theirs, for the fields both rows have."""
    entry = {}
    for field in ("prefill_s", "decode_ms", "train_s"):
        if field in theirs and field in ours:
            entry[f"{field.split('_')[0]}_speedup"] = theirs[field] / ours[field]
    for field in ("peak_mem_bytes", "added_mem_bytes", "train_peak_mem_bytes", "train_added_mem_bytes", "cache_bytes"):
        if field in theirs and field in ours:
            entry[f"{field.replace('_bytes', '')}_ratio"] = ours[field] / theirs[field]
    return entry


def utilisation(rows: list[dict[str, Any]], matmul_flops_s: float) -> list[dict[str, Any]]:
    """MFU of prefill and training (over the machine's matmul rate); decode bandwidth utilisation: the bytes a
    decode step reads (active weights + cache) per second of it, over the worker's own measured read bandwidth."""
    out = []
    for r in rows:
        entry = {"impl": r["impl"], "context": r["context"], "batch": r["batch"],
                 **({"weights": r["weights"]} if "weights" in r else {}),
                 **{f"{k.split('_')[0]}_mfu": r[k] / matmul_flops_s for k in ("prefill_flops_s", "train_flops_s")
                    if k in r}}
        if all(k in r for k in ("decode_read_bytes", "decode_ms", "read_bytes_s")):
            entry["decode_bw"] = r["decode_read_bytes"] / (r["decode_ms"] / 1e3) / r["read_bytes_s"]
            entry["decode_floor_ms"] = r["decode_read_bytes"] / r["read_bytes_s"] * 1e3
        out.append(entry)
    return out


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "bytes":
        return human_bytes(value)
    if kind == "pct":
        return f"{100 * value:.0f}%"
    if kind == "x":
        return f"{value:.2f}x"
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def format_bench_report(report: dict[str, Any]) -> str:
    """The report as the tables `openjamba bench` prints."""
    m = report["machine"]
    lines = [f"openjamba bench: {report['model']} on {processor_label(m)} ({m['device']}, {m['threads']} threads, "
             f"{report['dtype']}{', K/V ' + report['kv_dtype'] if report.get('kv_dtype') else ''}"
             f"{', weights ' + report['quantize'] if report.get('quantize') else ''}); "
             f"matmul {m['matmul_flops_s'] / 1e9:,.0f} GFLOP/s"]
    read = [p for r in report["rows"] for p in r.get("read_bytes_s_probes", [r.get("read_bytes_s")]) if p]
    if read:
        lines[0] += (f"; memory read {min(read) / 1e9:,.0f}-{max(read) / 1e9:,.0f} GB/s (probed between decode "
                     "rounds; decode floor = bytes read per token / the run's median probe; decode BW = floor / "
                     "decode time)")
    if report.get("formats"):
        lines.append(f"weight formats {', '.join(report['formats'])}: one process per cell builds every format's "
                     "model; decode interleaved round by round (each round a read probe, then every format's share "
                     "of tokens, order rotated); model mem = resident growth while that model was built. Load and "
                     "prefill peaks are not per format in one process: measure them with one --quantize value")
    if {report.get("quantize"), *(report.get("formats") or ())} & {"int8", "int4"}:
        lines.append("MFU is over the fp32 matmul rate above: int8/int4 products run as integer dot products and "
                     "can pass 100%")
    mfu = {row_key(u): u for u in report["utilisation"]}
    columns = [("prefill tok/s", "prefill_tok_s", "n"), ("prefill MFU", "prefill_mfu", "pct"),
               ("decode ms/tok", "decode_ms", "n"), ("decode floor", "decode_floor_ms", "n"),
               ("decode BW", "decode_bw", "pct"), ("train tok/s", "train_tok_s", "n"),
               ("train MFU", "train_mfu", "pct"), ("model mem", "model_mem_bytes", "bytes"),
               ("load peak", "load_peak_mem_bytes", "bytes"),
               ("peak mem", "peak_mem_bytes", "bytes"), ("train peak", "train_peak_mem_bytes", "bytes"),
               ("cache", "cache_bytes", "bytes")]
    rows = [{**r, **mfu.get(row_key(r), {})} for r in report["rows"]]
    columns = [c for c in columns if any(c[1] in r for r in rows)]
    header = f"{'model':<16}{'context':>9}{'batch':>6}" + "".join(f"{c[0]:>15}" for c in columns)
    lines += ["", header]
    for r in rows:
        lines.append(f"{row_label(r):<16}{r['context']:>9}{r['batch']:>6}"
                     + "".join(f"{_fmt(r.get(c[1]), c[2]):>15}" for c in columns))
        lines += [f"    error {e}" for e in r.get("errors", [])]
    if report["ratios"]:
        keys = [k for k in ("prefill_speedup", "decode_speedup", "train_speedup", "peak_mem_ratio", "added_mem_ratio",
                            "train_peak_mem_ratio", "train_added_mem_ratio", "cache_ratio")
                if any(k in r for r in report["ratios"])]
        lines += ["", "openjamba vs " + "/".join(sorted({r["versus"] for r in report["ratios"]}))
                  + " (speedup = their time / ours; memory ratio = ours / theirs; added = peak - loaded model)",
                  f"{'versus':<16}{'context':>9}{'batch':>6}" + "".join(f"{k:>22}" for k in keys)]
        for r in report["ratios"]:
            lines.append(f"{r['versus']:<16}{r['context']:>9}{r['batch']:>6}"
                         + "".join(f"{_fmt(r.get(k), 'x'):>22}" for k in keys))
    if report.get("format_ratios"):
        lines += ["", f"weight formats vs {report['formats'][0]}, in one process (speedup = {report['formats'][0]}'s "
                  "time / theirs; decode rounds: each round's speed-up, min / median / max)",
                  f"{'weights':<16}{'context':>9}{'batch':>6}{'prefill_speedup':>22}{'decode_speedup':>22}"
                  f"{'decode rounds':>26}{'model_mem_ratio':>22}"]
        for r in report["format_ratios"]:
            spread = r.get("decode_speedup_rounds")
            spread = "/".join(f"{spread[k]:.2f}" for k in ("min", "median", "max")) + "x" if spread else "-"
            lines.append(f"{r['weights']:<16}{r['context']:>9}{r['batch']:>6}{_fmt(r.get('prefill_speedup'), 'x'):>22}"
                         f"{_fmt(r.get('decode_speedup'), 'x'):>22}{spread:>26}"
                         f"{_fmt(r.get('model_mem_ratio'), 'x'):>22}")
    scan_rows = [r for r in report["rows"] if "scan_fwd_ns" in r]
    if scan_rows:
        lines += ["", "selective scan alone at one Mamba layer's shape (ns per batch*channel*step*state element); "
                  "model share = scan time x Mamba layers / prefill time"]
        for r in scan_rows:
            share = r["scan_fwd_model_s"] / r["prefill_s"] if "prefill_s" in r else None
            lines.append(f"  {row_label(r)} context {r['context']} batch {r['batch']}: {r['scan_backend']} forward "
                         f"{r['scan_fwd_ns']:.2f} ns, backward {r['scan_bwd_ns']:.2f} ns; "
                         f"{_fmt(share, 'pct')} of prefill")
    prof_rows = [r for r in report["rows"] if "profile_total_s" in r]
    if prof_rows:
        lines += ["", "profiled prefill (share of wall time): matmul / attention / selective scan"]
        for r in prof_rows:
            t = r["profile_total_s"]
            lines.append(f"  {row_label(r)} context {r['context']} batch {r['batch']}: "
                         f"{_fmt(r['profile_matmul_s'] / t, 'pct')} / {_fmt(r['profile_attention_s'] / t, 'pct')} / "
                         f"{_fmt(r['profile_scan_s'] / t, 'pct')} of {t:.2f} s")
    return "\n".join(lines)


def plot_bench_report(report: dict[str, Any], file: str | Path) -> Path:
    """Throughput and memory against context length, one line per (implementation[, weights], batch), as the
    paper's figures."""
    from ..plotting import pyplot, save_figure

    plt = pyplot()
    panels = [("prefill_tok_s", "prefill tokens/s"), ("decode_tok_s", "decode tokens/s"),
              ("peak_mem_bytes", "peak memory (GiB)"), ("cache_bytes", "cache (GiB)")]
    panels = [p for p in panels if any(p[0] in r for r in report["rows"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    series: dict[tuple[str, int], list[dict]] = {}
    for r in report["rows"]:
        series.setdefault((row_label(r), r["batch"]), []).append(r)
    for ax, (field, title) in zip(axes[0], panels):
        for (impl, batch), rows in series.items():
            points = sorted((r["context"], r[field]) for r in rows if field in r)
            if not points:
                continue
            xs, ys = zip(*points)
            if field.endswith("bytes"):
                ys = [y / 2**30 for y in ys]
            ax.plot(xs, ys, marker="o", label=f"{impl} (batch {batch})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"openjamba bench: {report['model']} ({processor_label(report['machine'])})",
                 fontsize=9)
    return save_figure(fig, file, dpi=110)
