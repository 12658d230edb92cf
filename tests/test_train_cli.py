"""`openjamba prepare` and `openjamba train` from the command line: flags, recipes, overrides and error messages."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from openjamba import JambaForCausalLM
from openjamba.cli import main
from openjamba.train.config import TrainConfig, add_arguments, config_from_args, load_recipe, parse_set

from .train_helpers import TINY_MODEL, write_corpus

pytestmark = pytest.mark.usefixtures("one_thread")


def parse(argv: list[str]) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_prepare_then_train_from_the_command_line(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "text", files=6, functions=10)
    (corpus / "bad.txt").write_bytes(b"\xff\xfe")
    main(["prepare", str(corpus), "--out", str(tmp_path / "data"), "--vocab-size", "300"])
    out = capsys.readouterr().out
    assert "6 files" in out and "skipped 1 non-UTF-8 files" in out and "vocabulary 300" in out

    sets = [arg for k, v in TINY_MODEL.items() for arg in ("--set", f"{k}={json.dumps(v)}")]
    main(["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--steps", "4",
          "--batch-size", "2", "--seq-len", "32", "--log-every", "2", "--eval-every", "2", "--save-every", "2",
          *sets])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(lines) == 2 and lines[0].startswith("step 2/4 (50.0%) | loss ")
    for field in ("| lr ", "| tok/s ", "| eta ", "| val ", "| aux "):
        assert field in lines[0]
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4] and all("loss" in r and "val_loss" in r for r in records)
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (run / "model").iterdir()}
    assert f"model: {run / 'model'}" in out

    main(["train", "--out", str(run), "--resume", "--steps", "6"])  # everything else comes from the checkpoint
    out = capsys.readouterr().out
    assert "resumed from" in out and "step 6/6" in out
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6]


def test_optional_flags_with_a_default_accept_none():
    assert parse([]).mqar_power_a == 0.01
    assert parse(["--mqar-power-a", "none"]).mqar_power_a is None  # uniform query placement
    assert parse(["--mqar-power-a", "0.2"]).mqar_power_a == 0.2
    with pytest.raises(SystemExit):
        parse(["--mqar-power-a", "often"])


def test_defaults_then_recipe_then_flags(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('preset = "tiny"\nsteps = 50\nlr = 1e-3\n[model]\nhidden_size = 64\nnum_experts = 8\n')
    cfg = parse(["--recipe", str(recipe), "--steps", "7", "--set", "num_experts=2", "--set", "eos_token_id=[2, 5]",
                 "--compile"])
    assert (cfg.preset, cfg.steps, cfg.lr, cfg.batch_size, cfg.compile) == ("tiny", 7, 1e-3, 16, True)
    assert cfg.model == {"hidden_size": 64, "num_experts": 2, "eos_token_id": [2, 5]}
    json_recipe = tmp_path / "recipe.json"
    json_recipe.write_text(json.dumps({"seq_len": 64, "model": {"attn_layer_period": 4}}))
    assert parse(["--recipe", str(json_recipe)]).seq_len == 64


@pytest.mark.parametrize(("content", "suffix", "message"), [
    ('stepz = 3', ".toml", "unknown field.*stepz"),
    ('[model]\nhidden = 3', ".toml", "unknown model field.*hidden"),
    ('steps = ', ".toml", "not valid TOML"),
    ('{"steps": ', ".json", "not valid JSON"),
])
def test_bad_recipes_name_the_problem(tmp_path, content, suffix, message):
    recipe = tmp_path / f"recipe{suffix}"
    recipe.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_recipe(recipe)


def test_set_syntax():
    assert parse_set(["hidden_size=256", "sliding_window=null", "hidden_act=silu"]) == {
        "hidden_size": 256, "sliding_window": None, "hidden_act": "silu"}
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        parse_set(["hidden_size"])
    with pytest.raises(ValueError, match="unknown model field.*hiden_size"):
        parse_set(["hiden_size=3"])


@pytest.mark.parametrize(("argv", "message"), [
    ([], "no training data"),
    (["--data", "x", "--preset", "tiny", "--config", "c.json"], "choose one model source"),
    (["--data", "x", "--steps", "0"], "steps must be at least 1"),
    (["--data", "{data}", "--batch-size", "3", "--grad-accum", "2"], "divisible"),
    (["--data", "{data}", "--set", "vocab_size=50"], "beyond the model's vocabulary"),
    (["--data", "{tmp}"], "not a prepared data directory"),
    (["--out", "{tmp}", "--resume"], "no checkpoint to resume"),
])
def test_train_errors_are_one_clear_line(argv, message, prepared_data, tmp_path, capsys):
    argv = [a.format(data=prepared_data, tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit, match=message):
        main(["train", "--out", str(tmp_path / "run"), *argv])


def test_prepare_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="openjamba prepare: error: the corpus is empty"):
        main(["prepare", str(tmp_path / "empty"), "--out", str(tmp_path / "data")])
    with pytest.raises(SystemExit, match="no such file or directory"):
        main(["prepare", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "data")])


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    """The README's main job, shortened: stdlib corpus -> training -> samples -> exported model (about a minute)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-m", "openjamba", "quickstart", "--out", str(tmp_path), "--steps", "20",
                          "--sample-tokens", "10"], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "== 3/3 samples" in run.stdout and "--- prompt 'def '" in run.stdout
    assert (tmp_path / "loss.png").is_file() and f"loss curve: {tmp_path / 'loss.png'}" in run.stdout
    assert JambaForCausalLM.from_pretrained(tmp_path / "model").config.num_hidden_layers == 4
