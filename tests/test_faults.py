"""The fault suite: every CLI verb against bad checkpoints, bad configs, bad data and bad arguments.

Each case must exit non-zero with at most a few lines on stderr and no traceback, create none of the outputs it
was asked for, and leave every existing file byte for byte as it was. Most cases call `cli.main` in-process (the
point is the message and the file system); the cases where a real process is the point (signals at chosen
moments, a file-size limit) run one subprocess each and live in test_faults_process.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from openjamba.cli import build_parser, main

from .conftest import byte_level_tokenizer, random_model

MAX_STDERR_LINES = 8


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` with a digest of its bytes (and every directory): what no failed run may change."""
    out = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        out[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


def fails_cleanly(argv: list[str], root: Path, capsys, outputs: tuple[Path, ...] = ()) -> str:
    """Run `openjamba argv`; check the exit, the message and the file system; return the message."""
    before = snapshot(root)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    code = exit_info.value.code
    message = captured.err + (code + "\n" if isinstance(code, str) else "")
    assert code not in (0, None), f"{argv} exited 0"
    assert "Traceback" not in message, message
    assert 0 < len(message.strip().splitlines()) <= MAX_STDERR_LINES, message
    assert snapshot(root) == before, f"{argv} changed files it was not asked to write"
    for output in outputs:
        assert not output.exists(), f"{argv} left {output} behind"
    return message


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A good checkpoint, a family of broken ones, bad configs and bad data, all under one root."""
    root = tmp_path_factory.mktemp("faults")
    tokenizer = byte_level_tokenizer()
    good = root / "good"
    random_model(vocab_size=tokenizer.vocab_size).save_pretrained(good, tokenizer=tokenizer)
    config = json.loads((good / "config.json").read_text())
    weights = (good / "model.safetensors").read_bytes()

    def variant(name: str, config_text: str | None = None, weights_bytes: bytes | None = None,
                drop: tuple[str, ...] = ()) -> Path:
        path = root / "bad" / name
        shutil.copytree(good, path)
        if config_text is not None:
            (path / "config.json").write_text(config_text)
        if weights_bytes is not None:
            (path / "model.safetensors").write_bytes(weights_bytes)
        for file in drop:
            (path / file).unlink()
        return path

    (root / "bad").mkdir()
    (root / "bad" / "empty-dir").mkdir()
    bad = {
        "missing-dir": root / "bad" / "does-not-exist",
        "empty-dir": root / "bad" / "empty-dir",
        "config-is-a-list": variant("config-is-a-list", config_text="[1, 2]"),
        "config-not-json": variant("config-not-json", config_text="{not json"),
        "config-lacks-hidden-size": variant("config-lacks-hidden-size", config_text=json.dumps(
            {k: v for k, v in config.items() if k != "hidden_size"})),
        "wrong-hidden-size": variant("wrong-hidden-size", config_text=json.dumps({**config, "hidden_size": 64})),
        "truncated-weights": variant("truncated-weights", weights_bytes=weights[: len(weights) // 2]),
        "garbage-weights": variant("garbage-weights", weights_bytes=b"\x07" * 1000),
        "no-weights": variant("no-weights", drop=("model.safetensors",)),
    }
    texts = root / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 4)
    (root / "empty.txt").write_text("")
    (root / "binary").mkdir()
    (root / "binary" / "blob.bin").write_bytes(b"\xff\xfe\x00" * 10)
    (root / "a-file").write_text("not a directory")
    (root / "recipe-list.json").write_text("[1]")
    (root / "recipe-bad.toml").write_text("steps = = 3")
    data = root / "data"
    from openjamba.train import prepare

    prepare([texts], data, vocab_size=300, val_fraction=0.2, progress=False)
    torn = root / "torn-data"
    shutil.copytree(data, torn)
    (torn / "meta.json").write_text((data / "meta.json").read_text()[:50])
    short = root / "short-shard-data"
    shutil.copytree(data, short)
    shard = short / "train-00000.bin"
    shard.write_bytes(shard.read_bytes()[:10])
    return {"root": root, "good": good, "bad": bad, "texts": texts, "data": data, "torn-data": torn,
            "short-shard-data": short}


TINY_TRAIN = ["--steps", "1", "--batch-size", "2", "--seq-len", "8", "--eval-every", "0", "--threads", "1"]


def bad_checkpoint_commands(model: Path, world) -> dict[str, list[str]]:
    """Every verb that takes a checkpoint, run on `model`; the verbs others add (chat, serve, quantize) are
    included when this build has them."""
    out = world["root"] / "out"
    commands = {
        "info": ["info", "--model", str(model)],
        "generate": ["generate", "--model", str(model), "--prompt", "hi", "--max-new-tokens", "2"],
        "eval": ["eval", "--model", str(model), str(world["texts"])],
        "bench": ["bench", "--model", str(model), "--contexts", "16", "--phases", "prefill", "--repeats", "1"],
        "train": ["train", "--init-from", str(model), "--data", str(world["data"]), "--out", str(out), *TINY_TRAIN],
    }
    verbs = set(build_parser()._subparsers._group_actions[0].choices)
    if "chat" in verbs:
        commands["chat"] = ["chat", "--model", str(model)]
    if "quantize" in verbs:
        commands["quantize"] = ["quantize", "--model", str(model), "--out", str(out / "q"), "--quantize", "int8"]
    if "serve" in verbs:
        commands["serve"] = ["serve", "--model", str(model), "--port", "0"]
    if "bench-serve" in verbs:
        commands["bench-serve"] = ["bench-serve", "--model", str(model), "--phases", "streams", "--streams", "1",
                                   "--output-tokens", "1", "--prefix-tokens", "4", "--suffix-tokens", "4"]
    return commands


BAD = ["missing-dir", "empty-dir", "config-is-a-list", "config-not-json", "config-lacks-hidden-size",
       "wrong-hidden-size", "truncated-weights", "garbage-weights", "no-weights"]


@pytest.mark.parametrize("bad", BAD)
def test_every_verb_on_a_bad_checkpoint(world, bad, capsys, one_thread):
    for verb, argv in bad_checkpoint_commands(world["bad"][bad], world).items():
        if verb == "info" and bad == "no-weights":
            continue  # info plans memory from a config.json alone; it checks weights only when there are some
        message = fails_cleanly(argv, world["root"], capsys, outputs=(world["root"] / "out",))
        assert f"openjamba {verb}: error:" in message, message


def test_bad_checkpoint_messages_name_the_problem(world, capsys):
    def message(bad):
        return fails_cleanly(["info", "--model", str(world["bad"][bad])], world["root"], capsys)

    assert "config.json must hold a JSON object of config fields, found a list" in message("config-is-a-list")
    assert "config.json lacks hidden_size" in message("config-lacks-hidden-size")
    mismatch = fails_cleanly(["generate", "--model", str(world["bad"]["wrong-hidden-size"]), "--prompt", "x"],
                             world["root"], capsys)
    assert "shape mismatches" in mismatch and "missing tensors" not in mismatch  # each tensor named once
    assert "... and" in mismatch and len(mismatch) < 2000


BAD_ARGUMENTS = {
    "generate --max-new-tokens -5": ["generate", "--max-new-tokens", "-5"],
    "generate --top-k 0": ["generate", "--top-k", "0"],
    "generate --top-p 0": ["generate", "--top-p", "0"],
    "generate --temperature -1": ["generate", "--temperature", "-1"],
    "generate --device tpu": ["generate", "--device", "tpu"],
    "generate --kv-dtype int3": ["generate", "--kv-dtype", "int3"],
    "info --dtype int4": ["info", "--dtype", "int4"],
    "info --context -5": ["info", "--context", "-5"],
    "info --batch 0": ["info", "--batch", "0"],
    "eval --context-length 0": ["eval", "--context-length", "0"],
    "eval --device tpu": ["eval", "--device", "tpu"],
    "bench --device tpu": ["bench", "--device", "tpu"],
    "train --set hidden_size=abc": ["train", "--set", "hidden_size=abc"],
    "train --device tpu": ["train", "--device", "tpu"],
    "train --steps 0": ["train", "--steps", "0"],
    "train --lr -1": ["train", "--lr", "-1"],
    "prepare --out FILE": ["prepare", "--out", "{a-file}"],
    "prepare --vocab-size 10": ["prepare", "--vocab-size", "10", "--out", "{out}"],
    "prepare --val-fraction 2": ["prepare", "--val-fraction", "2", "--out", "{out}"],
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments(world, case, capsys):
    verb, *rest = BAD_ARGUMENTS[case]
    needs = {"generate": ["--model", str(world["good"]), "--prompt", "hi"], "info": ["--model", str(world["good"])],
             "eval": ["--model", str(world["good"]), str(world["texts"])],
             "bench": ["--model", str(world["good"]), "--contexts", "16"],
             "train": ["--data", str(world["data"]), "--out", str(world["root"] / "out"), *TINY_TRAIN[:-2]],
             "prepare": [str(world["texts"])]}[verb]
    rest = [arg.format(**{"a-file": world["root"] / "a-file", "out": world["root"] / "out"}) for arg in rest]
    fails_cleanly([verb, *needs, *rest], world["root"], capsys, outputs=(world["root"] / "out",))


def test_generate_checks_its_arguments_before_printing_the_prompt(world, capsys):
    fails_cleanly(["generate", "--model", str(world["good"]), "--prompt", "PROMPT", "--kv-dtype", "int3"],
                  world["root"], capsys)
    assert "PROMPT" not in capsys.readouterr().out


BAD_DATA = {
    "train on a directory that is not prepared": ["train", "--data", "{texts}"],
    "train on a damaged meta.json": ["train", "--data", "{torn-data}"],
    "train on a truncated shard": ["train", "--data", "{short-shard-data}"],
    "train on a missing directory": ["train", "--data", "{root}/nowhere"],
    "train with a recipe that is a list": ["train", "--data", "{data}", "--recipe", "{root}/recipe-list.json"],
    "train with a broken TOML recipe": ["train", "--data", "{data}", "--recipe", "{root}/recipe-bad.toml"],
    "train with a config.json that is a list": ["train", "--data", "{data}", "--config",
                                                "{bad}/config-is-a-list/config.json"],
    "train resuming nothing": ["train", "--data", "{data}", "--resume", "{root}/nowhere"],
    "eval an empty file": ["eval", "--model", "{good}", "{root}/empty.txt", "--json"],
    "eval a directory of binary files": ["eval", "--model", "{good}", "{root}/binary"],
    "eval a missing file": ["eval", "--model", "{good}", "{root}/nowhere.txt"],
    "prepare a missing path": ["prepare", "{root}/nowhere", "--out", "{out}"],
    "prepare binary files only": ["prepare", "{root}/binary", "--out", "{out}"],
    "prepare into a directory that is not a prepared one": ["prepare", "{texts}", "--out", "{bad}/no-weights"],
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_and_configs(world, case, capsys, one_thread):
    fields = {"texts": world["texts"], "data": world["data"], "good": world["good"], "root": world["root"],
              "bad": world["root"] / "bad", "out": world["root"] / "out", "torn-data": world["torn-data"],
              "short-shard-data": world["short-shard-data"]}
    argv = [arg.format(**fields) for arg in BAD_DATA[case]]
    if argv[0] == "train":
        argv += ["--out", str(world["root"] / "out"), *TINY_TRAIN]
    message = fails_cleanly(argv, world["root"], capsys, outputs=(world["root"] / "out",))
    if "eval an empty file" in case:
        assert "nothing to score" in message and "NaN" not in message


def test_debug_shows_the_traceback(world, capsys, monkeypatch):
    argv = ["info", "--model", str(world["bad"]["config-is-a-list"])]
    with pytest.raises(ValueError, match="found a list"):
        main(["--debug", *argv])
    monkeypatch.setenv("OPENJAMBA_DEBUG", "1")
    with pytest.raises(ValueError, match="found a list"):
        main(argv)


def test_bench_exits_non_zero_when_a_cell_fails(world, capsys, monkeypatch):
    """The table and JSON still print (the cells that worked are results), then one error line and exit 1."""
    import openjamba.bench

    report = {"model": "x", "machine": {}, "dtype": "fp32", "kv_dtype": None, "prefill_chunk": 16,
              "decode_tokens": 2, "ratios": [], "utilisation": [],
              "rows": [{"impl": "openjamba", "context": 16, "batch": 1, "errors": ["prefill: worker died"]}]}
    monkeypatch.setattr(openjamba.bench, "run_bench", lambda *args, **kwargs: report)
    monkeypatch.setattr(openjamba.bench, "format_bench_report", lambda report: "table")
    message = fails_cleanly(["bench", "--model", str(world["good"]), "--contexts", "16"], world["root"], capsys)
    assert "1 cell(s) failed, e.g. prefill: worker died" in message
