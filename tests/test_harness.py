"""lm-evaluation-harness adapter: offline tasks over local JSONL; the harness's scores must equal log-probabilities
computed here directly from the model's logits, and lm_eval's own command line (`python -m openjamba.eval.harness`)
must find the model."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from openjamba.eval.harness import OpenJambaLM  # noqa: E402
from openjamba.eval.perplexity import evaluate_texts  # noqa: E402

from .conftest import byte_level_tokenizer, random_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MAX_LENGTH = 24  # small, so the long rolling document needs several windows
MAX_GEN_TOKS = 8
MC_DOCS = [
    {"question": "the quick brown", "choices": ["fox", "dog", "hello there"], "answer": 0},
    {"question": "hello", "choices": ["world", "there", "lazy dog jumps"], "answer": 1},
    {"question": "over the lazy", "choices": ["dog", "fox"], "answer": 0},
    {"question": "jumps over the lazy dog and the quick brown fox says", "choices": ["hello", "world"], "answer": 1},
]
PPL_DOCS = [{"text": "the quick brown fox jumps over the lazy dog. " * 4 + "héllo wörld!"}, {"text": "hello there"}]
GEN_DOCS = [{"prompt": p, "target": "fox"} for p in ("the quick brown", "hello", "over the lazy dog, the",
                                                     "jumps over the lazy dog and the quick")]


# ---------------------------------------------------------------------- references straight from the model
def continuation_logprob(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """log p(continuation | context) and whether argmax decoding reproduces it, from one unpadded forward."""
    tokens = context + continuation
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([tokens[:-1]])).logits[0].float(), -1)
    rows = logprobs[-len(continuation):]
    target = torch.tensor(continuation)
    return rows[torch.arange(len(continuation)), target].sum().item(), bool((rows.argmax(-1) == target).all())


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def greedy_text(model, tokenizer, prompt: str, until: list[str]) -> str:
    """Greedy decoding by full forwards (no cache, no padding), stopped at EOS, cut at the first stop string."""
    ids, new = encode(tokenizer, prompt), []
    with torch.no_grad():
        for _ in range(MAX_GEN_TOKS):
            token = model(torch.tensor([ids + new])).logits[0, -1].argmax().item()
            if token in model.config.eos_token_ids:
                break
            new.append(token)
    text = tokenizer.decode(new, skip_special_tokens=True)
    cuts = [text.find(s) for s in until if s in text]
    return text[:min(cuts)] if cuts else text


# ---------------------------------------------------------------------- fixtures: model, checkpoint, tasks
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    tokenizer = byte_level_tokenizer()
    model = random_model(vocab_size=tokenizer.vocab_size)
    model.save_pretrained(root / "ckpt", tokenizer=tokenizer)
    # a stop string the model really produces: the first letter inside any greedy continuation
    uncut = [greedy_text(model, tokenizer, d["prompt"], []) for d in GEN_DOCS]
    stop = next(c for text in uncut for c in text[1:] if c.isascii() and c.isalnum())
    until = [stop, "\n\n"]
    tasks = root / "tasks"
    tasks.mkdir()
    common = {"test_split": "test", "metadata": {"version": 1.0}}
    configs = {
        "ojtest_mc": ({"output_type": "multiple_choice", "doc_to_text": "Q: {{question}}\nA:",
                       "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
                       "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}, MC_DOCS),
        "ojtest_ppl": ({"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                        "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity",
                                                                 "bits_per_byte")]}, PPL_DOCS),
        "ojtest_gen": ({"output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{target}}",
                        "generation_kwargs": {"until": until, "max_gen_toks": MAX_GEN_TOKS, "do_sample": False},
                        "metric_list": [{"metric": "exact_match", "aggregation": "mean",
                                         "higher_is_better": True}]}, GEN_DOCS),
    }
    for name, (config, docs) in configs.items():
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        dataset = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)},
                                                              "cache_dir": str(root / "hf-cache")}}
        (tasks / f"{name}.yaml").write_text(json.dumps({"task": name, **dataset, **common, **config}))  # JSON is YAML
    return dict(root=root, tokenizer=tokenizer, model=model, tasks=tasks, until=until, uncut=uncut)


@pytest.fixture(scope="module")
def evaluated(env):
    lm = OpenJambaLM(model=env["model"], tokenizer=env["tokenizer"], batch_size=3, max_length=MAX_LENGTH,
                     max_gen_toks=64)
    return lm_eval.simple_evaluate(
        model=lm, tasks=["ojtest_mc", "ojtest_ppl", "ojtest_gen"], bootstrap_iters=0, log_samples=True,
        task_manager=TaskManager(include_path=str(env["tasks"]), include_defaults=False))


def samples(evaluated, task: str) -> list[dict]:
    return sorted(evaluated["samples"][task], key=lambda s: s["doc_id"])


# ---------------------------------------------------------------------- in-process: scores equal the model's
def test_multiple_choice_logprobs_and_accuracy_equal_direct_scores(env, evaluated):
    model, tokenizer = env["model"], env["tokenizer"]
    correct = []
    for doc, sample in zip(MC_DOCS, samples(evaluated, "ojtest_mc")):
        context = f"Q: {doc['question']}\nA:"
        expected = []
        for choice in doc["choices"]:  # lm-eval's split: tokens of context + continuation beyond the context's
            context_ids = encode(tokenizer, context)
            expected.append(continuation_logprob(model, context_ids,
                                                 encode(tokenizer, context + " " + choice)[len(context_ids):]))
        got = sample["filtered_resps"]
        assert [g[0] for g in got] == pytest.approx([e[0] for e in expected], abs=1e-4)
        assert [bool(g[1]) for g in got] == [e[1] for e in expected]
        correct.append(max(range(len(expected)), key=lambda i: expected[i][0]) == doc["answer"])
    assert evaluated["results"]["ojtest_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))


def test_rolling_loglikelihood_equals_lm_eval_windows_scored_directly(env, evaluated):
    model, tokenizer = env["model"], env["tokenizer"]
    prefix = model.config.bos_token_id
    expected = []
    for doc in PPL_DOCS:
        tokens = encode(tokenizer, doc["text"])
        windows = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, prefix, MAX_LENGTH, 1)]
        expected.append(sum(continuation_logprob(model, list(ctx), list(pred))[0] for ctx, pred in windows))
    assert len(encode(tokenizer, PPL_DOCS[0]["text"])) > 2 * MAX_LENGTH  # several windows
    got = [s["filtered_resps"][0] for s in samples(evaluated, "ojtest_ppl")]
    got = [g[0] if isinstance(g, (tuple, list)) else g for g in got]
    assert got == pytest.approx(expected, abs=1e-3)
    nbytes = sum(len(d["text"].encode("utf-8")) for d in PPL_DOCS)
    bpb = -sum(expected) / nbytes / math.log(2)
    assert evaluated["results"]["ojtest_ppl"]["bits_per_byte,none"] == pytest.approx(bpb, rel=1e-5)
    # and `openjamba eval` with the same (disjoint) windows gives the same bits per byte
    ours = evaluate_texts(model, tokenizer, [d["text"] for d in PPL_DOCS], MAX_LENGTH, MAX_LENGTH, progress=False)
    assert ours.bits_per_byte == pytest.approx(bpb, rel=1e-5)


def test_generation_equals_unpadded_greedy_decoding_cut_at_stop_strings(env, evaluated):
    model, tokenizer, until = env["model"], env["tokenizer"], env["until"]
    expected = [greedy_text(model, tokenizer, d["prompt"], until) for d in GEN_DOCS]
    assert any(e != u for e, u in zip(expected, env["uncut"]))  # the stop string did cut something
    got = [s["filtered_resps"][0] for s in samples(evaluated, "ojtest_gen")]
    assert got == expected  # batch of 3 with prompts of unequal lengths: left padding leaks nothing
    exact = sum(e == d["target"] for e, d in zip(expected, GEN_DOCS)) / len(GEN_DOCS)
    assert evaluated["results"]["ojtest_gen"]["exact_match,none"] == pytest.approx(exact)


def test_generate_until_kwargs_aliases_and_empty_context(env):
    from lm_eval.api.instance import Instance

    lm = OpenJambaLM(model=env["model"], tokenizer=env["tokenizer"], batch_size=2)
    request = [Instance("generate_until", {}, ("", {"until": "\n\n", "max_new_tokens": 3}), 0),
               Instance("generate_until", {}, ("hello", {"max_gen_toks": 2, "temperature": 0.0}), 1)]
    first, second = lm.generate_until(request, disable_tqdm=True)
    bos = env["model"].config.bos_token_id
    out = env["model"].generate(torch.tensor([[bos]]), max_new_tokens=3)[0, 1:].tolist()
    assert first == lm._decode_generation(out).split("\n\n")[0]
    assert len(env["tokenizer"].encode(second, add_special_tokens=False)) <= 2


# ---------------------------------------------------------------------- construction and registration
def test_model_args_win_over_cli_defaults_and_cuda_falls_back_to_cpu(env):
    lm = OpenJambaLM.create_from_arg_string(
        f"pretrained={env['root'] / 'ckpt'},dtype=float32,batch_size=2,max_length=64",
        {"batch_size": 1, "max_batch_size": None, "device": "cuda:0" if not torch.cuda.is_available() else "cpu"})
    assert (lm.batch_size, lm.max_length, lm.model.dtype, lm.device.type) == (2, 64, torch.float32, "cpu")
    assert lm.tok_encode("hello") == encode(env["tokenizer"], "hello")
    bos = OpenJambaLM(model=env["model"], tokenizer=env["tokenizer"], add_bos_token="True")
    assert bos.tok_encode("hello") == [env["model"].config.bos_token_id, *encode(env["tokenizer"], "hello")]


def test_registered_as_openjamba_without_hiding_lm_eval_models():
    from lm_eval.api.registry import get_model

    assert get_model("openjamba") is OpenJambaLM
    assert get_model("dummy").__name__ == "DummyLM"  # lm_eval's own models are still there


# ---------------------------------------------------------------------- lm_eval's command line, in a fresh interpreter
def test_lm_eval_cli_runs_openjamba(env, tmp_path):
    """`python -m openjamba.eval.harness --model openjamba ...` (lm_eval's CLI with the model registered) on a local
    task, in a fresh interpreter that has this checkout first on the path."""
    run_env = {**os.environ, "PYTHONPATH": str(REPO), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(
        [sys.executable, "-m", "openjamba.eval.harness", "--model", "openjamba",
         "--model_args", f"pretrained={env['root'] / 'ckpt'},dtype=float32",
         "--tasks", "ojtest_mc", "--include_path", str(env["tasks"]), "--batch_size", "2", "--device", "cpu",
         "--output_path", str(tmp_path / "results")],
        env=run_env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(next((tmp_path / "results").rglob("results_*.json")).read_text())
    model, tokenizer = env["model"], env["tokenizer"]
    correct = 0
    for doc in MC_DOCS:
        context = encode(tokenizer, f"Q: {doc['question']}\nA:")
        scores = [continuation_logprob(model, context, encode(tokenizer, f"Q: {doc['question']}\nA: {c}")
                                       [len(context):])[0] for c in doc["choices"]]
        correct += scores.index(max(scores)) == doc["answer"]
    assert results["results"]["ojtest_mc"]["acc,none"] == pytest.approx(correct / len(MC_DOCS))


def test_lm_eval_cli_names_a_bad_checkpoint_in_one_line(env, tmp_path, monkeypatch):
    from openjamba.eval.harness import main

    monkeypatch.setattr(sys, "argv", ["harness"])  # main() replaces it with lm_eval's arguments
    with pytest.raises(SystemExit) as exit_:
        main(["--model", "openjamba", "--model_args", f"pretrained={tmp_path / 'missing'}", "--tasks", "ojtest_mc",
              "--include_path", str(env["tasks"]), "--device", "cpu"])
    assert exit_.value.code == (f"python -m openjamba.eval.harness: error: {tmp_path / 'missing'} is not a directory "
                                "(expected a checkpoint directory with config.json)")


def test_wheels_declare_the_lm_eval_entry_point_and_install_no_startup_hook(tmp_path):
    """Both wheels pip builds (regular and editable) build from pyproject.toml alone, carry no .pth file, and
    declare the model in lm_eval's "lm_eval.models" entry-point group, which resolves to OpenJambaLM."""
    import importlib.metadata

    pytest.importorskip("setuptools.build_meta")
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", "runs"))
    (tmp_path / "dist").mkdir()
    built = []
    for hook in ("build_wheel", "build_editable"):  # one process per hook, as pip does
        script = f"import sys; from setuptools import build_meta; print('WHEEL', build_meta.{hook}(sys.argv[1]))"
        out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "dist")], cwd=source,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        built.append(tmp_path / "dist" / next(line for line in out.stdout.splitlines()
                                              if line.startswith("WHEEL ")).split()[1])
    wheel, editable = built
    for path in (wheel, editable):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            assert not any(name.endswith(".pth") and "openjamba" in name and "__editable__" not in name
                           for name in names), names
            entry_points = archive.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt")))
            assert '[lm_eval.models]\nopenjamba = openjamba.eval.harness:OpenJambaLM' in entry_points.decode()
    with zipfile.ZipFile(wheel) as archive:
        assert "openjamba/eval/harness.py" in archive.namelist()
        assert not any(name.startswith("openjamba_lm_eval") for name in archive.namelist())
    point = importlib.metadata.EntryPoint("openjamba", "openjamba.eval.harness:OpenJambaLM", "lm_eval.models")
    assert point.load() is OpenJambaLM
