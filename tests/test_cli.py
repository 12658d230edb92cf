from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from openjamba.cli import main
from openjamba.tokenizer import Tokenizer as TextTokenizer

from .conftest import random_model

GIB = 2**30


def test_info_json_reproduces_the_paper_memory_table(capsys):
    main(["info", "--preset", "jamba-v0.1", "--context", "262144", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert round(report["total_params"] / 1e9) == 52
    assert round(report["active_params"] / 1e9) == 12
    assert report["kv_cache_bytes"] == 4 * GIB
    assert 0 < report["mamba_state_bytes"] < 20 * 2**20
    rows = {row["model"]: row for row in report["comparison"]}
    assert rows["mixtral-8x7b"]["kv_cache_bytes"] == 32 * GIB
    assert rows["mistral-7b"]["kv_cache_bytes"] == 32 * GIB
    assert rows["llama-2-7b"]["kv_cache_bytes"] == 128 * GIB
    assert rows["jamba-v0.1 (attention-only, equal shape)"]["kv_cache_bytes"] == 32 * GIB


def test_info_table_and_model_dir(tmp_path, capsys):
    random_model().save_pretrained(tmp_path)
    main(["info", "--model", str(tmp_path), "--context", "1024", "--batch", "2"])
    out = capsys.readouterr().out
    assert "attention KV cache" in out and "Mamba state" in out


def test_a_flag_the_verb_does_not_take_is_named_by_the_verb(capsys):
    with pytest.raises(SystemExit) as err:
        main(["quantize", "--model", "m", "--out", "o", "--quantize", "int8", "--kv-dtype", "bf16"])
    assert err.value.code == 2
    assert capsys.readouterr().err == ("openjamba quantize: error: unrecognized arguments: --kv-dtype bf16 "
                                       "(see openjamba quantize --help)\n")


def test_a_shared_helpers_error_names_the_verb(tmp_path):
    checkpoint_with_tokenizer(tmp_path)
    with pytest.raises(SystemExit, match="^openjamba generate: error: unknown --dtype 'fp7'"):
        main(["generate", "--model", str(tmp_path), "--prompt", "x", "--dtype", "fp7"])


def test_engine_flags_refuse_impossible_values(capsys):
    for argv in (["serve", "--model", "m", "--threads", "0"], ["chat", "--model", "m", "--state-store", "-1"],
                 ["serve", "--model", "m", "--port", "70000"], ["chat", "--model", "m", "--max-context", "0"],
                 ["serve", "--model", "m", "--max-stored-responses", "-1"],
                 ["serve", "--model", "m", "--allowed-origins", "localhost:3000"],  # no scheme: never matches
                 ["serve", "--model", "m", "--allowed-origins", "http://a.example,http://b.example/"],
                 ["bench-serve", "--preset", "tiny", "--threads", "0"],
                 ["bench", "--preset", "tiny", "--timeout", "-1"],
                 ["bench-serve", "--preset", "tiny", "--prefix-tokens", "-1"]):  # (was an 'unexpected' RuntimeError)
        with pytest.raises(SystemExit) as err:
            main(argv)
        assert err.value.code == 2 and f"openjamba {argv[0]}: error: argument {argv[3]}" in capsys.readouterr().err


def test_a_closed_pipe_stops_quietly():
    """`openjamba info ... | head`: no error line when the reader leaves early."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([sys.executable, "-m", "openjamba", "info", "--preset", "tiny"], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert done.returncode == 1 and done.stderr == ""


def test_info_rejects_unknown_dtype(capsys):
    for flag in ("--cache-dtype", "--dtype"):  # --dtype: the older spelling of the same flag
        with pytest.raises(SystemExit) as err:
            main(["info", "--preset", "tiny", flag, "fp7"])
        assert err.value.code == 2 and "invalid choice: 'fp7'" in capsys.readouterr().err


def test_info_cache_dtype_sizes_the_cache(capsys):
    sizes = {}
    for dtype in ("bf16", "fp32"):
        main(["info", "--preset", "tiny", "--context", "1024", "--cache-dtype", dtype, "--json"])
        sizes[dtype] = json.loads(capsys.readouterr().out)["kv_cache_bytes"]
    assert sizes["fp32"] == 2 * sizes["bf16"]


def checkpoint_with_tokenizer(path) -> None:
    """A tiny random model with a byte-level BPE tokenizer trained on a line of Python."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    tokenizer.train_from_iterator(["def f(x):\n    return x\n"] * 10, trainers.BpeTrainer(
        vocab_size=97, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    model = random_model(vocab_size=tokenizer.get_vocab_size())
    model.save_pretrained(path, tokenizer=TextTokenizer.from_backend(tokenizer))


def test_generate_streams_from_a_checkpoint(tmp_path):
    checkpoint_with_tokenizer(tmp_path)
    for extra in ([], ["--kv-dtype", "bf16"]):
        out = subprocess.run(
            [sys.executable, "-m", "openjamba", "generate", "--model", str(tmp_path), "--prompt", "def f(",
             "--max-new-tokens", "5", "--seed", "0", *extra],
            capture_output=True, text=True, check=True, timeout=120)
        assert out.stdout.startswith("def f(")
        assert len(out.stdout) > len("def f(\n")


def test_generate_chooses_its_kernels_before_it_writes_the_prompt(tmp_path, monkeypatch, capsys):
    """A first run's "compiling CPU kernels" line then comes before the text instead of inside its first line."""
    checkpoint_with_tokenizer(tmp_path)
    first = []

    def backend_for(device):
        if not first:
            first.append(print("[kernels]", end=""))
        return None  # plain PyTorch ops

    monkeypatch.setattr("openjamba.ops.backend_for", backend_for)
    main(["generate", "--model", str(tmp_path), "--prompt", "def f(", "--max-new-tokens", "2"])
    assert capsys.readouterr().out.startswith("[kernels]def f(")


def test_serve_finds_its_port_in_use_before_it_loads_the_model(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit, match=f"openjamba serve: error: cannot listen on 127.0.0.1:{port}: "):
            main(["serve", "--model", str(tmp_path / "not-loaded"), "--port", str(port)])


def test_allowed_origins_are_parsed_as_a_browser_sends_them():
    from openjamba.cli import build_parser

    argv = ["serve", "--model", "x", "--allowed-origins", " http://localhost:3000, https://a.example:8443 "]
    assert build_parser().parse_args(argv).allowed_origins == ["http://localhost:3000", "https://a.example:8443"]
    assert build_parser().parse_args(["serve", "--model", "x", "--allowed-origins", "*"]).allowed_origins == ["*"]
    assert build_parser().parse_args(["serve", "--model", "x"]).allowed_origins == []


def test_serve_takes_vllm_flag_names():
    from openjamba.cli import build_parser

    args = build_parser().parse_args(["serve", "--model", "x", "--max-model-len", "4096", "--max-num-seqs", "8"])
    assert (args.max_context, args.max_running) == (4096, 8)


def test_info_counts_a_checkpoints_weights_as_it_stores_them(tmp_path, capsys):
    """Its dtype and its quantization, not bf16: the figure matches the safetensors on disk."""
    random_model().save_pretrained(tmp_path / "fp32")
    main(["quantize", "--model", str(tmp_path / "fp32"), "--out", str(tmp_path / "int4"), "--quantize", "int4"])
    for name, scheme in (("fp32", {"quantize": None, "weight_dtype": "fp32"}),
                         ("int4", {"quantize": "int4", "weight_dtype": "fp32"})):
        capsys.readouterr()
        main(["info", "--model", str(tmp_path / name), "--context", "64", "--json"])
        report = json.loads(capsys.readouterr().out)
        assert {k: report["weight_scheme"][k] for k in scheme} == scheme
        on_disk = sum(tensor_bytes(f) for f in (tmp_path / name).glob("*.safetensors"))
        assert abs(report["weight_bytes"]["total"] - on_disk) < 0.02 * on_disk


def tensor_bytes(path) -> int:
    """A safetensors file's size less its 8-byte length and JSON header."""
    with open(path, "rb") as f:
        return path.stat().st_size - 8 - int.from_bytes(f.read(8), "little")


def test_every_default_a_help_text_states_is_the_flags():
    """`(default 0.8)` in a flag's --help is its parser default (the trainer's flags: the TrainConfig field's)."""
    import argparse
    import re

    from openjamba.cli import build_parser
    from openjamba.train.config import TrainConfig

    verbs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    checked = 0
    for verb, parser in verbs.items():
        for action in parser._actions:
            stated = re.search(r"\(default:? (-?\d+(?:\.\d+)?)\)", action.help or "")
            if not stated:
                continue
            default = getattr(TrainConfig(), action.dest) if action.default == argparse.SUPPRESS else action.default
            if default is None:  # resolved later (chat's temperature from the checkpoint, else 0.7)
                continue
            default = default if isinstance(default, tuple) else (default,)
            assert [float(stated.group(1))] == [float(d) for d in default], (verb, action.option_strings, default)
            checked += 1
    assert checked >= 30


def test_describe_prepared_gives_a_small_corpus_a_readable_size():
    from openjamba.cli import describe_prepared

    split = {"tokens": 10, "shards": ["train-00000.bin"]}
    meta = {"files": 5, "documents": 5, "bytes": 48_333, "skipped_summary": "nothing skipped", "vocab_size": 300,
            "dtype": "uint16", "splits": {"train": split, "val": split}}
    assert describe_prepared(meta, "out").startswith("5 files, 5 documents, 47.20 KiB of text;")  # was "0.0 MB"


def test_a_missing_tokenizer_is_found_before_the_weights_load(tmp_path, monkeypatch):
    random_model().save_pretrained(tmp_path)  # no tokenizer files
    (tmp_path / "valid.txt").write_text("text")

    def load_model(args, device):
        raise AssertionError("the weights were loaded before the tokenizer was checked")

    monkeypatch.setattr("openjamba.cli.load_model", load_model)
    for argv in (["generate", "--model", str(tmp_path), "--prompt", "x"],
                 ["eval", "--model", str(tmp_path), str(tmp_path / "valid.txt")]):
        with pytest.raises(SystemExit, match="has no tokenizer.json or tokenizer.model"):
            main(argv)
