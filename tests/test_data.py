"""Data preparation: tokenizer, shards and split, the sampler, and every bad-input case."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from openjamba.train.data import (
    BatchSampler,
    DataError,
    TokenData,
    collect_files,
    default_corpus,
    eval_indices,
    prepare,
    train_tokenizer,
)

from .train_helpers import write_corpus

TEXT = 'def héllo(wörld):\n\treturn f"{wörld!r} → 🐍"  # ünïcode, tabs\n\n\n    x = [1,2 ,3]\r\n'


def decoded_documents(data: TokenData, split: str) -> list[str]:
    """A split's token stream cut at EOS and decoded: the documents it holds (each BOS text EOS)."""
    tokens = np.concatenate([np.asarray(s) for s in data.shards[split]]) if data.shards[split] else np.empty(0)
    bos, eos = data.meta["bos_id"], data.meta["eos_id"]
    cuts = np.flatnonzero(tokens == eos)
    docs, start = [], 0
    for cut in cuts:
        assert tokens[start] == bos, "every document starts with BOS"
        docs.append(data.tokenizer().decode(tokens[start + 1:cut].tolist()))
        start = cut + 1
    assert start == len(tokens), "every document ends with EOS"
    return docs


def test_tokenizer_round_trips_text():
    tokenizer = train_tokenizer(iter([TEXT * 3, "import os\n"]), vocab_size=300)
    assert tokenizer.get_vocab_size() == 300
    for text in (TEXT, "", "    \n\t\t", "plain ascii", "字节级别"):
        assert tokenizer.decode(tokenizer.encode(text).ids) == text
    assert [tokenizer.token_to_id(t) for t in ("<pad>", "<bos>", "<eos>")] == [0, 1, 2]


def test_prepare_writes_shards_that_hold_every_document_once(tmp_path):
    corpus = write_corpus(tmp_path / "text", files=10, functions=5)
    meta = prepare([corpus], tmp_path / "data", vocab_size=300, val_fraction=0.3, progress=False)
    data = TokenData(tmp_path / "data")
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 300
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [
        "meta.json", "tokenizer.json", "tokenizer_config.json", "train-00000.bin", "val-00000.bin"]
    train, val = decoded_documents(data, "train"), decoded_documents(data, "val")
    assert train and val
    originals = sorted(p.read_text() for p in corpus.iterdir())
    assert sorted(train + val) == originals
    assert meta["splits"]["train"]["documents"] == len(train)
    assert max(int(np.max(s)) for s in data.shards["train"]) == meta["max_token_id"] < 300


def test_shards_roll_over_and_a_single_document_still_gets_a_validation_tail(tmp_path):
    (tmp_path / "one.txt").write_text("the same sentence again. " * 400)
    meta = prepare([tmp_path / "one.txt"], tmp_path / "data", vocab_size=280, val_fraction=0.1,
                   shard_tokens=500, progress=False)
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    assert len(train["shards"]) > 2 and all(s["tokens"] <= 500 for s in train["shards"])
    assert val["tokens"] > 0 and val["documents"] == 1
    data = TokenData(tmp_path / "data")
    assert sum(len(s) for s in data.shards["train"]) == train["tokens"]


def test_directories_and_jsonl_with_bad_lines(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "a.txt").write_text("first document")
    (tmp_path / "docs" / "sub" / "b.md").write_text("second document")
    (tmp_path / "docs" / ".hidden").write_text("not read")
    lines = [json.dumps({"text": "from jsonl one"}), "{broken", json.dumps({"other": 1}), "",
             json.dumps({"text": "from jsonl two"})]
    (tmp_path / "more.jsonl").write_text("\n".join(lines))
    meta = prepare([tmp_path / "docs", tmp_path / "more.jsonl"], tmp_path / "data", vocab_size=270,
                   val_fraction=0.0, progress=False)
    assert meta["files"] == 3 and meta["documents"] == 4
    assert meta["skipped"]["bad_jsonl_lines"] == 2
    assert "more.jsonl:2: not valid JSON" in meta["skipped_summary"]
    assert sorted(decoded_documents(TokenData(tmp_path / "data"), "train")) == [
        "first document", "from jsonl one", "from jsonl two", "second document"]


def test_non_utf8_and_unreadable_files_are_skipped_and_counted(tmp_path, monkeypatch):
    write_corpus(tmp_path / "text", files=3, functions=3)
    (tmp_path / "text" / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "text" / "binary.bin").write_bytes(bytes(range(256)))
    locked = tmp_path / "text" / "locked.txt"
    locked.write_text("secret")
    real_read = Path.read_bytes

    def read_bytes(self):  # as root, chmod cannot make a file unreadable: fail the read itself
        if self == locked:
            raise PermissionError(13, "Permission denied")
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    meta = prepare([tmp_path / "text"], tmp_path / "data", vocab_size=270, progress=False)
    assert meta["skipped"] == {"non_utf8": 2, "unreadable": 1, "bad_jsonl_lines": 0}
    assert meta["files"] == 3
    assert "2 non-UTF-8 files" in meta["skipped_summary"] and "Permission denied" in meta["skipped_summary"]


@pytest.mark.parametrize("case", ["empty-dir", "empty-files", "only-binary"])
def test_an_empty_corpus_is_a_clear_error(tmp_path, case):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    if case == "empty-files":
        (corpus / "a.txt").write_text("")
    elif case == "only-binary":
        (corpus / "a.bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataError, match="the corpus is empty"):
        prepare([corpus], tmp_path / "data", vocab_size=270, progress=False)
    assert not (tmp_path / "data").exists()


def test_missing_path_and_bad_options_are_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        collect_files([tmp_path / "nope"])
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(DataError, match="vocab-size"):
        prepare([tmp_path / "a.txt"], tmp_path / "data", vocab_size=100, progress=False)
    with pytest.raises(DataError, match="val-fraction"):
        prepare([tmp_path / "a.txt"], tmp_path / "data", val_fraction=1.5, progress=False)
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="refusing to overwrite"):
        prepare([tmp_path / "a.txt"], tmp_path / "precious", vocab_size=270, progress=False)
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"
    with pytest.raises(DataError, match="not a prepared data directory"):
        TokenData(tmp_path / "precious")


def test_token_ids_beyond_the_model_vocabulary_are_rejected(prepared_data):
    data = TokenData(prepared_data)
    data.check_vocab(data.vocab_size)
    with pytest.raises(DataError, match=r"token ids up to \d+, beyond the model's vocabulary of 100"):
        data.check_vocab(100)


def test_reusing_a_given_tokenizer(prepared_data, tmp_path):
    (tmp_path / "a.txt").write_text("def main():\n    pass\n" * 20)
    meta = prepare([tmp_path / "a.txt"], tmp_path / "data", tokenizer_file=prepared_data / "tokenizer.json",
                   progress=False)
    assert (tmp_path / "data" / "tokenizer.json").read_text() == (prepared_data / "tokenizer.json").read_text()
    assert (meta["pad_id"], meta["bos_id"], meta["eos_id"]) == (0, 1, 2)


def test_sampler_is_a_pure_function_of_seed_and_position(prepared_data):
    windows = TokenData(prepared_data).windows("train", 32)
    n = len(windows)
    a, b = BatchSampler(windows, seed=3), BatchSampler(windows, seed=3)
    assert np.array_equal(a.get(n - 2, 5), b.get(n - 2, 5))  # across an epoch boundary, in another instance
    assert np.array_equal(a.get(7, 3), BatchSampler(windows, seed=3).get(7, 3))
    assert not np.array_equal(a.get(0, 4), BatchSampler(windows, seed=4).get(0, 4))
    epoch = a.get(0, n)  # one epoch visits every window exactly once
    every = windows.get(np.arange(n))
    assert sorted(map(tuple, epoch.tolist())) == sorted(map(tuple, every.tolist()))
    assert len(eval_indices(windows, 10)) == 10 and eval_indices(windows, 10)[-1] == n - 1


def test_too_little_data_for_one_sequence(prepared_data):
    with pytest.raises(DataError, match="fewer tokens than one sequence"):
        BatchSampler(TokenData(prepared_data).windows("train", 10**7), seed=0)


def test_default_corpus_is_the_standard_library():
    files = default_corpus()
    names = {p.name for p in files}
    assert {"os.py", "argparse.py"} <= names
    assert all(p.suffix == ".py" and not {"site-packages", "test", "encodings"} & set(p.parts) for p in files)
