"""Perplexity / bits per byte: windows cover every token once, scores equal direct log-softmax sums of the model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from openjamba.cli import main
from openjamba.corpus import CorpusStats, DataError, read_corpus
from openjamba.eval.perplexity import (
    document_nlls,
    evaluate_texts,
    prefix_token_id,
    rolling_windows,
    score_spans,
)

from .conftest import byte_level_tokenizer, random_model

TEXTS = ["the quick brown fox jumps over the lazy dog, héllo wörld ✓ " * 3, "hello there!", "", "dog fox\nthe end"]


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return random_model(vocab_size=tokenizer.vocab_size)


def direct_nll(model, seq: list[int]) -> float:
    """-sum log p(seq[1:] | seq[:-1]) from one unpadded forward: the oracle when the sequence fits."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([seq[:-1]])).logits[0].float(), -1)
    return -logprobs[torch.arange(len(seq) - 1), torch.tensor(seq[1:])].sum().item()


def last_token_nll(model, seq: list[int]) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([seq[:-1]])).logits[0, -1].float()
    return -torch.log_softmax(logits, -1)[seq[-1]].item()


@pytest.mark.parametrize("num_tokens,context,stride", [(1, 4, 2), (10, 4, 1), (10, 4, 4), (23, 8, 3), (8, 8, 5),
                                                       (50, 7, 7)])
def test_windows_score_every_token_once_with_the_most_context_that_fits(num_tokens, context, stride):
    windows = list(rolling_windows(num_tokens, context, stride))
    scored = [t for start, stop, n in windows for t in range(stop - n, stop)]  # seq indices of the targets
    assert scored == list(range(1, num_tokens + 1))  # [prefix] + tokens: every token once, in order
    for start, stop, n in windows:
        assert stop - 1 - start <= context  # model inputs seq[start:stop-1]
        first_target = stop - n
        assert first_target - start >= min(first_target, context - stride + 1)  # context of the first scored
    assert windows[-1][1] - 1 - windows[-1][0] == min(num_tokens, context)  # the last window is full


@pytest.mark.parametrize("num_tokens,context,stride", [(23, 8, 3), (30, 6, 6), (9, 16, 4), (17, 5, 1)])
def test_windows_match_lm_eval_rolling_windows(num_tokens, context, stride):
    lm_utils = pytest.importorskip("lm_eval.utils")
    tokens = list(range(100, 100 + num_tokens))
    seq = [7, *tokens]
    ours = [(seq[start:stop - 1], seq[stop - n:stop]) for start, stop, n in rolling_windows(num_tokens, context,
                                                                                          stride)]
    theirs = list(lm_utils.get_rolling_token_windows(tokens, 7, context, context - stride + 1))
    assert ours == [(list(a), list(b)) for a, b in theirs]


def test_documents_that_fit_equal_one_forward_each_even_when_batched(model):
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, 97, (n,), generator=gen).tolist() for n in (5, 17, 1, 11)]
    prefix = prefix_token_id(model.config)
    nlls = document_nlls(model, docs, prefix, context_length=32, batch_size=3)  # right-padded batches
    for doc, (nll, count) in zip(docs, nlls):
        assert count == len(doc)
        assert nll == pytest.approx(direct_nll(model, [prefix, *doc]), rel=1e-5, abs=1e-4)


def test_stride_one_scores_each_token_after_exactly_its_last_context_tokens(model):
    """The brute-force oracle: token j is predicted from seq[max(0, j - L):j], one forward per token."""
    context = 6
    doc = torch.randint(3, 97, (19,), generator=torch.Generator().manual_seed(2)).tolist()
    seq = [prefix_token_id(model.config), *doc]
    expected = sum(last_token_nll(model, seq[max(0, j - context):j + 1]) for j in range(1, len(seq)))
    (nll, count), = document_nlls(model, [doc], seq[0], context_length=context, stride=1, batch_size=4)
    assert count == len(doc)
    assert nll == pytest.approx(expected, rel=1e-5)


def test_score_spans_reports_greedy_and_rejects_empty_spans(model):
    tokens = [1, 40, 41, 42]
    with torch.no_grad():
        argmax = model(torch.tensor([tokens])).logits[0, -1].argmax().item()
    (lp_greedy, greedy), (_, not_greedy) = score_spans(
        model, [(tokens + [argmax], 1), (tokens + [(argmax + 1) % 97], 1)])
    assert greedy and not not_greedy
    assert lp_greedy == pytest.approx(-last_token_nll(model, tokens + [argmax]), abs=1e-4)
    with pytest.raises(ValueError, match="scored token"):
        score_spans(model, [([5], 1)])


def test_evaluate_texts_bits_per_byte_and_perplexity(model, tokenizer):
    result = evaluate_texts(model, tokenizer, TEXTS, context_length=64, stride=32, batch_size=2, progress=False)
    prefix = prefix_token_id(model.config)
    docs = [tokenizer.encode(t, add_special_tokens=False) for t in TEXTS if t]
    assert max(map(len, docs)) > 64  # the long text needs several windows; the others fit in one
    nll = sum(direct_nll(model, [prefix, *d]) for d in docs if len(d) <= 64)
    (long_nll, _), = document_nlls(model, [d for d in docs if len(d) > 64], prefix, 64, 32)
    nbytes = sum(len(t.encode("utf-8")) for t in TEXTS)
    assert nbytes > sum(map(len, TEXTS))  # multi-byte characters count as bytes, not characters
    assert result.documents == 3 and result.tokens == sum(map(len, docs)) and result.bytes == nbytes
    assert result.nll == pytest.approx(nll + long_nll, rel=1e-5)
    assert result.bits_per_byte == pytest.approx(result.nll / math.log(2) / nbytes)
    assert result.perplexity == pytest.approx(math.exp(result.nll / result.tokens))
    assert "bits/byte" in result.summary()


def test_eval_reads_its_inputs_as_prepare_does(tmp_path):
    """One corpus reader (openjamba.corpus) for both verbs: every file of a directory (a .py too), JSONL lines
    from the text field, hidden entries skipped, bad lines and non-UTF-8 files skipped and counted."""
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text('{"text": "line one"}\n\n{"text": "line two", "id": 3}\n{"x": 1}\n')
    (tmp_path / "sub" / "c.py").write_text("print(1)")
    (tmp_path / "weights.bin").write_bytes(b"\x00\xff")  # not UTF-8: skipped and counted
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "d.txt").write_text("hidden")
    stats = CorpusStats()
    assert list(read_corpus([tmp_path], stats)) == ["first document", "line one", "line two", "print(1)"]
    assert stats.skipped_summary() == (f"skipped 1 non-UTF-8 files (e.g. {tmp_path / 'weights.bin'}), 1 bad JSONL "
                                       f"lines (e.g. {tmp_path / 'sub' / 'b.jsonl'}:4: no string field 'text')")
    assert list(read_corpus([tmp_path / "sub" / "b.jsonl"], CorpusStats(), text_key="x")) == []
    with pytest.raises(DataError, match="no such file"):
        list(read_corpus([tmp_path / "missing.txt"], CorpusStats()))


def test_cli_eval_prints_json_and_a_human_line(tmp_path, capsys, model, tokenizer):
    model.save_pretrained(tmp_path / "ckpt", tokenizer=tokenizer)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "one.txt").write_text(TEXTS[0])
    (tmp_path / "data" / "rest.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[1:]))
    args = ["eval", "--model", str(tmp_path / "ckpt"), str(tmp_path / "data"), "--context-length", "48",
            "--stride", "16", "--batch-size", "3"]
    main([*args, "--json", "--output", str(tmp_path / "report.json")])
    report = json.loads(capsys.readouterr().out)
    expected = evaluate_texts(model, tokenizer, TEXTS, 48, 16, progress=False)
    assert report["perplexity"]["nll"] == pytest.approx(expected.nll, rel=1e-5)
    assert report["perplexity"]["bits_per_byte"] == pytest.approx(expected.bits_per_byte, rel=1e-5)
    assert json.loads((tmp_path / "report.json").read_text())["perplexity"]["tokens"] == expected.tokens
    assert report["perplexity"]["skipped"] == {"non_utf8": 0, "unreadable": 0, "bad_jsonl_lines": 0}
    main(args)
    assert capsys.readouterr().out.startswith(f"perplexity {expected.perplexity:.4f} | bits/byte")
    (tmp_path / "data" / "weights.bin").write_bytes(b"\x00\xff")  # skipped, and said so in both forms
    main(args)
    assert capsys.readouterr().out.splitlines()[1].startswith("skipped 1 non-UTF-8 files")
    main([*args, "--json"])
    assert json.loads(capsys.readouterr().out)["perplexity"]["skipped"]["non_utf8"] == 1  # counts, as prepare's
    with pytest.raises(SystemExit, match="--tasks"):
        main(["eval", "--model", str(tmp_path / "ckpt")])
