"""MQAR through the normal trainer (learning, exact resume, position-keyed data); `openjamba ablate` smoke run."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from openjamba.cli import main
from openjamba.info import count_parameters
from openjamba.train import DataError, TrainConfig, train
from openjamba.train.ablate import SMOKE, VARIANTS, variant_configs
from openjamba.train.metrics import read_metrics
from openjamba.train.sources import MQARSource

from .train_helpers import TINY_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")


def mqar_config(out, **overrides) -> TrainConfig:
    fields = dict(task="mqar", out=str(out), model=dict(TINY_MODEL), steps=8, batch_size=8, seq_len=16,
                  mqar_vocab_size=16, mqar_kv_pairs=2, lr=3e-3, warmup_steps=2, log_every=1, eval_every=4,
                  eval_batches=2, save_every=4, keep=3)
    fields.update(overrides)
    return TrainConfig(**fields)


def losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl")}


def test_mqar_batches_are_a_pure_function_of_seed_and_position():
    source = MQARSource(mqar_config("unused", seq_len=32, mqar_vocab_size=64, mqar_kv_pairs=4))
    ids, labels = source.train_batch(0, 150)  # crosses two generation chunks
    again_ids, again_labels = MQARSource(mqar_config("unused", seq_len=32, mqar_vocab_size=64,
                                                     mqar_kv_pairs=4)).train_batch(60, 30)
    assert torch.equal(ids[60:90], again_ids) and torch.equal(labels[60:90], again_labels)
    assert ((labels != -100).sum(1) == 4).all()  # every key queried once: labels mark exactly the answers
    val_ids, _ = source.val_batch(torch.arange(source.val_size).numpy())
    assert not any(torch.equal(v, t) for v in val_ids for t in ids)  # validation never repeats training sequences
    other_seed = MQARSource(mqar_config("unused", seq_len=32, mqar_vocab_size=64, mqar_kv_pairs=4, seed=1))
    assert not torch.equal(other_seed.train_batch(0, 8)[0], ids[:8])


def test_mqar_loss_falls_and_recall_is_logged(tmp_path):
    result = train(mqar_config(tmp_path, steps=150, batch_size=16, lr=1e-2, warmup_steps=10, log_every=10,
                               eval_every=50, save_every=0))
    curve = losses(tmp_path)
    assert curve[10] > 1.8  # about ln(8) = 2.08: 8 value tokens, nothing learnt yet
    assert curve[150] < 0.7 * curve[10], curve
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "val_acc" in r] == [50, 100, 150]
    assert result.val_acc == records[-1]["val_acc"] and 0 <= result.val_acc <= 1
    assert json.loads((result.model_dir / "config.json").read_text())["vocab_size"] == 16
    assert not (result.model_dir / "tokenizer.json").exists()  # synthetic tokens: no tokenizer to export


def test_mqar_resume_continues_the_loss_curve_exactly(tmp_path):
    straight = tmp_path / "straight"
    expected = losses(straight) if train(mqar_config(straight)) else None
    step4 = straight / "checkpoints" / "step-000004"
    resumed = tmp_path / "resumed"
    result = train(mqar_config(resumed), resume=step4)
    got = losses(resumed)
    assert sorted(got) == [5, 6, 7, 8]
    assert [got[s] for s in got] == [expected[s] for s in got]  # bitwise: same state, same generated sequences
    assert result.val_acc is not None
    with pytest.raises(DataError, match="not the data"):  # another MQAR task is other data
        train(mqar_config(tmp_path / "other", mqar_kv_pairs=3), resume=step4)


def test_variants_have_equal_parameters():
    configs = variant_configs(dataclasses.replace(SMOKE, hidden_size=64, num_heads=4, intermediate_size=128), 256)
    assert set(configs) == set(VARIANTS)
    counts = {name: count_parameters(c) for name, c in configs.items()}
    target = counts["hybrid-1:7"]["total"]
    for name, count in counts.items():
        kind = "active" if name.endswith("-moe") else "total"
        assert abs(count[kind] - target) / target < 0.01, (name, count)
    assert len(configs["attention"].attention_layer_indices) == 8 and not configs["mamba"].attention_layer_indices
    assert len(configs["hybrid-1:3"].attention_layer_indices) == 2
    assert len(configs["hybrid-1:7-moe"].attention_layer_indices) == 1
    assert configs["hybrid-1:7-moe"].num_experts > 1 and configs["hybrid-1:7"].num_experts == 1


# Attention only, no attention at all, and MoE: the extremes of the layer plans (all six are checked above).
SMOKE_VARIANTS = ("attention", "mamba", "hybrid-1:7-moe")


def test_ablate_smoke_run_writes_the_table_and_plots(prepared_data, tmp_path, capsys):
    out = tmp_path / "ablate"
    main(["ablate", "--smoke", "--out", str(out), "--lm-data", str(prepared_data), "--threads", "1",
          "--variants", ",".join(SMOKE_VARIANTS)])
    printed = capsys.readouterr().out
    assert "== ablate [1/6] mqar attention" in printed and "== ablate finished" in printed
    results = json.loads((out / "results.json").read_text())
    runs = {(r["task"], r["variant"]): r for r in results["runs"]}
    assert set(runs) == {(t, v) for t in ("mqar", "lm") for v in SMOKE_VARIANTS}
    for (task, _), run in runs.items():
        assert run["tokens"] == SMOKE.batch_size * run["steps"] * (SMOKE.mqar_seq_len if task == "mqar"
                                                                   else SMOKE.lm_seq_len)
        assert run["tok_per_s"] > 0 and run["val_loss"] > 0
        if task == "mqar":
            assert set(run["recall_by_seq_len"]) == {str(n) for n in SMOKE.mqar_eval_seq_lens}
            assert all(0 <= a <= 1 for a in run["recall_by_seq_len"].values())
    table = (out / "results.md").read_text()
    assert all(f"| {v} |" in table for v in SMOKE_VARIANTS) and "recall @32" in table and "LM val loss" in table
    for png in ("loss_curves.png", "recall_vs_seq_len.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ablate_rejects_unknown_variants_and_tasks(tmp_path):
    with pytest.raises(SystemExit, match="unknown variant.*hybrid-1:5.*choose from attention"):
        main(["ablate", "--smoke", "--out", str(tmp_path), "--variants", "attention,hybrid-1:5"])
    with pytest.raises(SystemExit, match="unknown task.*vision"):
        main(["ablate", "--smoke", "--out", str(tmp_path), "--tasks", "vision"])
    with pytest.raises(ValueError, match="unknown task"):
        TrainConfig(task="vision").validate()
