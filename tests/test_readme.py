"""Every command in the README runs as written (issue 12, item 9).

Each `openjamba ...` line of the README's shell blocks is read from the README itself, so a command added or
changed there is tested without editing this file:
- every one must parse with the real command-line parser (a renamed or removed flag fails here);
- the ones that finish on their own run on tiny settings, in a directory laid out as the README assumes
  (data/stdlib, runs/small, DIR, path/to/Jamba-v0.1 ... made tiny, and a Hugging Face cache holding the Hub repo
  ids the README names): each command keeps its own flags and values,
  and only size flags are appended (the last occurrence of a flag wins), so a combination that cannot work as
  written (the ablation example once could not) fails here.
"""

from __future__ import annotations

import re
import shlex
import shutil
import textwrap
from pathlib import Path

import pytest

from openjamba.cli import build_parser, main

from .conftest import random_model
from .hub_helpers import fake_hub_repo, use_hub_cache
from .train_helpers import write_corpus

README = Path(__file__).resolve().parent.parent / "README.md"

# Appended to each verb's command (later flags win): tiny sizes, nothing else changed.
TINY = {
    "info": [],
    "generate": ["--max-new-tokens", "3"],
    "eval": ["--batch-size", "2"],
    "prepare": ["--vocab-size", "300"],
    "quantize": [],
    "train": ["--steps", "2", "--batch-size", "2", "--grad-accum", "1", "--seq-len", "16", "--eval-every", "0",
              "--eval-batches", "1", "--save-every", "0", "--threads", "1"],
    "run-batch": ["--threads", "1"],
    "bench": ["--contexts", "16,32", "--batch-sizes", "1", "--decode-tokens", "2", "--repeats", "1", "--threads", "1"],
}
# Commands that do not run here, each with the reason and where they are exercised instead.
NOT_RUN = {
    "chat": "interactive, and needs a chat template: tests/test_chat*.py run it",
    "serve": "a long-running server: tests/test_serve*.py start and stop it",
    "bench-serve": "minutes of load generation: its smoke test runs it",
    "quickstart": "minutes on the standard library: test_train_cli runs it end to end",
    "ablate": "minutes of training: test_ablate runs the smoke settings",
}
SLOW_VERBS = {"bench"}  # worker processes per cell: under the slow marker
LARGE_PRESETS = {"jamba-v0.1", "gpu-1b", "cpu-bench", "jamba-1.5-mini", "jamba-1.5-large", "jamba-reasoning-3b"}


def readme_commands() -> list[list[str]]:
    """The `openjamba` commands of the README's bash blocks (continuations joined, comments and pipes dropped;
    `torchrun ... -m openjamba` counts as openjamba)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "|" in words:
                words = words[words.index("|") + 1:]
            if "openjamba" in words and words[0] in ("openjamba", "torchrun"):
                commands.append(words[words.index("openjamba") + 1:])
    return commands


# A default the docs state for a flag: "`--flag` (default N", "`--flag MB`, default N".
STATED_DEFAULT = re.compile(r"`(--[a-z0-9-]+)(?: [A-Za-z]+)?`[^`\n]{0,40}?default (\d+(?:\.\d+)?)")


def test_defaults_the_docs_state_are_the_parsers():
    """Each number the README or docs/ give as a flag's default is that flag's default in some verb's parser, or
    (for a default resolved later, e.g. chat's temperature) the one its --help states."""
    import argparse

    verbs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    actions = {}  # flag -> the actions of every verb that has it
    for parser in verbs.values():
        for action in parser._actions:
            for flag in action.option_strings:
                actions.setdefault(flag, []).append(action)
    stated = [(doc.name, *m) for doc in [README, *sorted((README.parent / "docs").glob("*.md"))]
              for m in STATED_DEFAULT.findall(doc.read_text())]
    assert len(stated) >= 8
    for doc, flag, value in stated:
        assert flag in actions, f"{doc} states a default for {flag}, which no verb has"
        ok = any((isinstance(a.default, (int, float)) and float(a.default) == float(value))
                 or re.search(rf"default {re.escape(value)}\b", a.help or "") for a in actions[flag])
        assert ok, f"{doc}: {flag} default {value}, parsers: {[(a.default, a.help) for a in actions[flag]]}"


def test_the_readme_has_commands_for_every_main_verb():
    verbs = {argv[0] for argv in readme_commands()}
    assert {"info", "generate", "eval", "prepare", "train", "bench"} <= verbs


@pytest.mark.parametrize("argv", readme_commands(), ids=" ".join)
def test_every_readme_command_parses(argv, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # `--device cuda` is checked when parsed
    build_parser().parse_args(argv)  # a usage error exits: a README flag that no longer exists fails here


@pytest.fixture(scope="module")
def readme_world(tmp_path_factory):
    """The directory the README's commands assume, in tiny form."""
    root = tmp_path_factory.mktemp("readme")
    write_corpus(root / "docs", files=3, functions=8)
    (root / "notes.txt").write_text("notes about the project\n" * 20)
    (root / "chat.jsonl").write_text('{"text": "hello there"}\n{"text": "general kenobi"}\n')
    shutil.copytree(root / "docs", root / "corpus")
    (root / "notes").mkdir()
    (root / "notes" / "n.md").write_text("# a note\nwith some text\n")
    from openjamba.train import prepare

    prepare([root / "docs"], root / "data" / "stdlib", vocab_size=300, progress=False)
    from openjamba.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(root / "data" / "stdlib")
    model = random_model(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
    for place in ("DIR", "path/to/Jamba-v0.1", "path/to/checkpoint"):
        model.save_pretrained(root / place, tokenizer=tokenizer)
    for repo in sorted(set(re.findall(r"--model (ai21labs/[\w.-]+)", README.read_text()))):
        fake_hub_repo(root / "hf-cache", repo, lambda snapshot: model.save_pretrained(snapshot, tokenizer=tokenizer))
    (root / "requests.jsonl").write_text('{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": '
                                         '{"prompt": "def", "max_tokens": 3}}\n')
    for name in ("valid.jsonl", "data/valid.jsonl"):
        (root / name).write_text('{"text": "def alpha(beta):\\n    return beta"}\n{"text": "import os"}\n')
    return root


def tiny(argv: list[str]) -> list[str]:
    verb = argv[0]
    argv = ["tiny" if arg in LARGE_PRESETS and verb != "info" else arg for arg in argv]
    if verb == "prepare" and not any(not a.startswith("-") for a in argv[1:argv.index("--out")]):
        argv = [verb, "docs", *argv[1:]]  # the default corpus is the whole standard library: a tiny one instead
    if verb == "train" and "--init-from" not in argv and "--resume" not in argv and "--set" in argv:
        argv = [*argv, "--set", "hidden_size=32", "--set", "intermediate_size=48"]  # a preset's shape, smaller
    return [*argv, *TINY.get(verb, [])]


def runnable(argv: list[str]) -> bool:
    return argv[0] not in NOT_RUN and "--tasks" not in argv and not ("--device" in argv and "cuda" in argv)


def _run_in_order(verbs_wanted, readme_world, monkeypatch, capsys):
    monkeypatch.chdir(readme_world)
    use_hub_cache(monkeypatch, readme_world / "hf-cache")
    ran = 0
    for argv in readme_commands():
        if argv[0] in verbs_wanted and runnable(argv):
            main(tiny(argv))
            capsys.readouterr()
            ran += 1
    return ran


def test_readme_commands_run_on_tiny_settings(readme_world, monkeypatch, capsys, one_thread):
    """In README order, so `train --resume` continues the run an earlier line started."""
    ran = _run_in_order(set(TINY) - SLOW_VERBS, readme_world, monkeypatch, capsys)
    assert ran >= 10
    assert (readme_world / "runs" / "small" / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_readme_bench_commands_run_on_tiny_settings(readme_world, monkeypatch, capsys):
    assert _run_in_order(SLOW_VERBS, readme_world, monkeypatch, capsys) >= 3


def test_every_verb_in_the_readme_is_run_or_has_a_reason():
    for argv in readme_commands():
        assert argv[0] in TINY or argv[0] in NOT_RUN, f"README command {argv} is neither run nor explained here"


def test_readme_recipes_train_as_written(readme_world, monkeypatch, capsys, one_thread):
    recipes = [textwrap.dedent(block) for block in re.findall(r"```toml\n(.*?)```", README.read_text(), flags=re.S)]
    assert recipes
    monkeypatch.chdir(readme_world)
    for i, recipe in enumerate(recipes):
        Path(f"recipe-{i}.toml").write_text(recipe)
        main(["train", "--recipe", f"recipe-{i}.toml", "--data", "data/stdlib", "--out", f"runs/recipe-{i}",
              *TINY["train"]])
        assert Path(f"runs/recipe-{i}/model/config.json").is_file()
