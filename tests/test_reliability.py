"""Issue 12, items 8-15: training and scoring agree on the first token, `info` reports what a checkpoint is, the
Python API refuses what it would silently get wrong, and the small things a new user meets (a CUDA warning on a
CPU, progress frames in logs)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from openjamba import JambaForCausalLM
from openjamba.cli import main
from openjamba.corpus import CorpusStats, read_documents
from openjamba.eval.perplexity import prefix_token_id
from openjamba.tokenizer import load_tokenizer
from openjamba.train.data import TokenData

from .conftest import byte_level_tokenizer, random_model


def test_training_documents_start_with_bos_as_eval_scores_them(prepared_data):
    """prepare writes BOS text EOS; eval conditions a document on the same BOS; the trained tokenizer adds BOS to
    a prompt, in openjamba and in transformers alike."""
    data = TokenData(prepared_data)
    bos, eos = data.meta["bos_id"], data.meta["eos_id"]
    assert data.meta["document"] == ["bos", "text", "eos"]
    tokens = np.concatenate([np.asarray(s) for split in data.shards.values() for s in split])
    starts = np.flatnonzero(tokens == bos)
    assert tokens[0] == bos and len(starts) == np.count_nonzero(tokens == eos) > 1
    assert all(tokens[i - 1] == eos for i in starts[1:])  # every document after the first follows an EOS
    config = random_model(vocab_size=data.vocab_size, bos_token_id=bos, eos_token_id=eos).config
    assert prefix_token_id(config) == bos

    tokenizer = load_tokenizer(prepared_data)
    ids = tokenizer.encode("def f(x):")
    assert ids[0] == bos and ids[1:] == tokenizer.encode("def f(x):", add_special_tokens=False)
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(str(prepared_data))
    assert theirs("def f(x):").input_ids == ids
    assert (theirs.bos_token_id, theirs.eos_token_id) == (bos, eos)


def test_info_on_a_checkpoint_reports_its_own_dtype(tmp_path, capsys):
    random_model().save_pretrained(tmp_path)  # fp32
    main(["info", "--model", str(tmp_path), "--context", "1024", "--json"])
    fp32 = json.loads(capsys.readouterr().out)
    main(["info", "--model", str(tmp_path), "--context", "1024", "--json", "--dtype", "bf16"])
    bf16 = json.loads(capsys.readouterr().out)
    assert fp32["dtype"] == "fp32" and fp32["kv_cache_bytes"] == 2 * bf16["kv_cache_bytes"] > 0


def test_token_ids_outside_the_vocabulary_are_refused():
    model = random_model()
    for bad in (model.config.vocab_size, -1):
        with pytest.raises(ValueError, match=f"token id {bad} is outside the model's vocabulary"):
            model(torch.tensor([[3, bad, 4]]))
        with pytest.raises(ValueError, match="outside the model's vocabulary"):
            model.generate(torch.tensor([[3, bad]]), max_new_tokens=1)


def test_a_right_padded_mask_is_refused_by_generate():
    model = random_model()
    ids = torch.tensor([[5, 6, 7], [5, 6, 0]])
    with pytest.raises(ValueError, match="right padding.*padding_side = 'left'"):
        model.generate(ids, attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]), max_new_tokens=1)
    model.generate(torch.tensor([[5, 6, 7], [0, 5, 6]]), attention_mask=torch.tensor([[1, 1, 1], [0, 1, 1]]),
                   max_new_tokens=1)  # left padding is what generate supports


def test_non_finite_weights_are_named_at_load(tmp_path):
    model = random_model()
    with torch.no_grad():
        model.model.layers[0].mamba.D.fill_(float("nan"))
    model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"NaN or infinite values in 1 tensor\(s\) \(model.layers.0.mamba.D\)"):
        JambaForCausalLM.from_pretrained(tmp_path)
    random_model().save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        JambaForCausalLM.from_pretrained(tmp_path)


def test_lm_eval_on_a_cpu_machine_does_not_warn_about_cuda_nobody_asked_for(tmp_path, caplog, monkeypatch):
    pytest.importorskip("lm_eval")
    from openjamba.eval.harness import OpenJambaLM

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    tokenizer = byte_level_tokenizer()
    random_model(vocab_size=tokenizer.vocab_size).save_pretrained(tmp_path, tokenizer=tokenizer)
    lm = OpenJambaLM.create_from_arg_obj({"pretrained": str(tmp_path)}, {"device": "cuda:0", "batch_size": 1})
    assert str(lm.model.device) == "cpu"
    assert "CUDA" not in caplog.text


def test_progress_bars_stay_out_of_redirected_logs(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("some text\n" * 100)
    assert list(read_documents([tmp_path / "a.txt"], CorpusStats(), progress=True))
    assert "\r" not in capsys.readouterr().err  # stderr is not a terminal here: tqdm's non-TTY mode, no frames
