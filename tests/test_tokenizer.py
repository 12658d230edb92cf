"""load_tokenizer: encode/decode equal transformers' AutoTokenizer from the same files, for every released layout."""

from __future__ import annotations

import json

import pytest

from openjamba.tokenizer import Tokenizer, load_tokenizer

from .tokenizer_fixtures import write_jamba2, write_jamba16

pytest.importorskip("google.protobuf", reason="transformers needs protobuf to read a SentencePiece model")
transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world", "The quick brown fox.", " leading space", "  two  spaces  ", "", " ", "\n", "\n\nline\n",
    "tab\tand\r\nCRLF", "trailing space ", "naïve café résumé", "emoji 🤖🚀 and 中文 and עברית", "12345 2026-12-06",
    "<|bom|><|user|> hi<|eom|>", "a<|bom|>b", "a <|eom|> b", "<|startoftext|>bos in text", "x<|endoftext|>",
    "<|im_start|>user\nhi<|im_end|>\n", "<think>\nhmm</think>\n\nok", "<tool_call>{\"a\": 1}</tool_call>",
    "<tool_calls>[]</tool_calls>", "▁literal▁metaspace", "<0x41> looks like a byte", "<|bom", "<|unknown|>",
    "def add(a, b):\n    return a + b\n",
]


def _legacy_json(directory, source, post_processor=True):
    """Jamba-v0.1/1.5 layout: tokenizer.json (a legacy Llama pipeline) + LlamaTokenizer class."""
    src = load_tokenizer(source)
    state = json.loads(src.backend.to_str())
    if not post_processor:  # add_bos_token in the config is then ignored: no BOS
        state["post_processor"] = None
    state["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                               {"type": "Replace", "pattern": {"String": " "},
                                                                "content": "▁"}]}
    state["pre_tokenizer"] = None
    directory.mkdir()
    (directory / "tokenizer.json").write_text(json.dumps(state))
    config = json.loads((source / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    j16 = write_jamba16(root / "jamba16")
    return {
        "jamba16": j16,
        "jamba16-legacy": write_jamba16(root / "jamba16-legacy", legacy=True),
        "jamba16-no-bos": write_jamba16(root / "jamba16-no-bos", add_bos_token=False, add_eos_token=True),
        "jamba15-json": _legacy_json(root / "jamba15", j16),
        "jamba15-json-bare": _legacy_json(root / "jamba15-bare", j16, post_processor=False),
        "jamba2": write_jamba2(root / "jamba2"),
        "jamba2-explicit": write_jamba2(root / "jamba2-explicit", add_bos_token=False),
    }


@pytest.mark.parametrize("layout", ["jamba16", "jamba16-legacy", "jamba16-no-bos", "jamba15-json",
                                    "jamba15-json-bare", "jamba2", "jamba2-explicit"])
def test_encode_decode_equal_transformers(layouts, layout):
    ours = load_tokenizer(layouts[layout])
    theirs = transformers.AutoTokenizer.from_pretrained(str(layouts[layout]))
    assert ours.vocab_size == len(theirs)
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert ours.special_tokens.get(name) == getattr(theirs, name)
    assert [ours.bos_token_id, ours.pad_token_id] == [theirs.bos_token_id, theirs.pad_token_id]
    for text in TEXTS:
        for special in (True, False):
            ids = theirs(text, add_special_tokens=special)["input_ids"]
            assert ours.encode(text, add_special_tokens=special) == ids, (text, special)
            for skip in (False, True):
                assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    assert ours.encode_batch(TEXTS) == [theirs(t)["input_ids"] for t in TEXTS]
    assert ours.add_bos_token == (theirs("x")["input_ids"][:1] == [theirs.bos_token_id])


def test_special_tokens_and_stop_ids(layouts):
    j16, j2 = load_tokenizer(layouts["jamba16"]), load_tokenizer(layouts["jamba2"])
    assert j16.eos_token_ids == [2, 5]  # generation_config.json's list, as Jamba 1.5-1.7's [2, 518]
    assert j16.id_to_token(5) == "<|eom|>" and j16.add_bos_token
    assert j16.encode("<|bom|><|user|>", add_special_tokens=False) == [4, 7]
    im_end = j2.token_to_id("<|im_end|>")
    assert j2.eos_token_ids == [2, im_end] and j2.eos_token_id == 2
    assert j2.add_bos_token  # from the tokenizer.json post-processor (the config does not set add_bos_token)
    assert load_tokenizer(layouts["jamba2-explicit"]).add_bos_token  # a tokenizer.json overrides the config
    assert not load_tokenizer(layouts["jamba16-no-bos"]).add_bos_token


@pytest.mark.parametrize("layout", ["jamba16", "jamba2"])
def test_round_trip_of_any_text(layouts, layout):
    """Byte fallback: any text (emoji, scripts absent from the corpus) comes back; one leading space is the dummy
    prefix's and is dropped, as SentencePiece drops it (and a literal "▁" reads back as a space)."""
    tok = load_tokenizer(layouts[layout])
    for text in (t for t in TEXTS if "▁" not in t):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == (text[1:] if text.startswith(" ") else text)
    assert "<0xF0>" in [tok.id_to_token(i) for i in tok.encode("🤖")]


@pytest.mark.parametrize("layout", ["jamba16", "jamba2"])
def test_token_text_keeps_the_leading_space(layouts, layout):
    tok = load_tokenizer(layouts[layout])
    ids = tok.encode("The quick brown fox, then  two spaces.", add_special_tokens=False)
    pieces = [tok.token_text(i) for i in ids]
    assert "".join(pieces) == " " + tok.decode(ids)  # the first word's dummy-prefix space included
    assert tok.decode([ids[2]]) == pieces[2].lstrip(" ") and any(p.startswith(" ") for p in pieces[1:])


def test_token_text_of_a_byte_level_tokenizer():
    from .conftest import byte_level_tokenizer

    tok = byte_level_tokenizer()
    ids = tok.encode("hello world, hello there")
    assert "".join(tok.token_text(i) for i in ids) == "hello world, hello there"


def test_a_file_or_a_directory(layouts, tmp_path):
    by_file = load_tokenizer(layouts["jamba2"] / "tokenizer.json")
    assert by_file.eos_token_ids == load_tokenizer(layouts["jamba2"]).eos_token_ids
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="SentencePiece"):
        load_tokenizer(tmp_path)


def test_save_pretrained_round_trips(layouts, tmp_path):
    for layout in ("jamba16", "jamba2"):
        tok = load_tokenizer(layouts[layout])
        saved = tok.save_pretrained(tmp_path / layout)
        assert "tokenizer_config.json" in saved
        again = load_tokenizer(tmp_path / layout)
        assert again.get_vocab() == tok.get_vocab() and again.eos_token_ids == tok.eos_token_ids
        assert again.encode(TEXTS[11]) == tok.encode(TEXTS[11])


def test_prepare_with_a_sentencepiece_tokenizer(layouts, tmp_path):
    """`openjamba prepare --tokenizer DIR` with a Jamba 1.6-style directory: the data loads the same tokenizer."""
    from openjamba.train.data import TokenData, prepare

    (tmp_path / "a.txt").write_text("hello world\n" * 50)
    meta = prepare([tmp_path / "a.txt"], tmp_path / "data", tokenizer_file=layouts["jamba16"], progress=False,
                   val_fraction=0)
    assert meta["tokenizer"] == "tokenizer.model" and meta["bos_id"] == 1 and meta["eos_id"] == 2
    data = TokenData(tmp_path / "data")
    assert data.tokenizer().encode("hello") == load_tokenizer(layouts["jamba16"]).encode("hello")


def test_from_backend_wraps_a_trained_tokenizer():
    from .conftest import byte_level_tokenizer

    tok = byte_level_tokenizer()
    assert isinstance(tok, Tokenizer) and tok.bos_token_id is None and tok.chat_template is None
    assert tok.decode(tok.encode("hello there")) == "hello there"


def test_generate_from_a_sentencepiece_checkpoint(layouts, tmp_path, capsys):
    """A Jamba 1.6/1.7-style checkpoint (tokenizer.model only) generates from the command line, BOS first."""
    import shutil

    from openjamba.cli import main

    from .conftest import random_model

    tok = load_tokenizer(layouts["jamba16"])
    model = random_model(vocab_size=tok.vocab_size)
    model.save_pretrained(tmp_path, tokenizer=tok)
    assert not (tmp_path / "tokenizer.json").exists() and (tmp_path / "tokenizer.model").is_file()
    shutil.copy(layouts["jamba16"] / "generation_config.json", tmp_path)
    main(["generate", "--model", str(tmp_path), "--prompt", "Jamba is", "--max-new-tokens", "4", "--device", "cpu"])
    assert capsys.readouterr().out.startswith("Jamba is")
    assert load_tokenizer(tmp_path).encode("Jamba is")[0] == 1
