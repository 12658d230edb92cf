"""`--model owner/name` and `from_pretrained("owner/name")`: a Hub repo id resolves to its snapshot in the Hugging
Face cache (here a cache built on disk, offline: no test reaches the Hub), a local directory always wins, only
safetensors and tokenizer files are ever asked for, and each Hub failure is one actionable line."""

from __future__ import annotations

import argparse
import fnmatch
from pathlib import Path

import pytest
import torch

from openjamba import JambaForCausalLM, load_tokenizer
from openjamba.argtypes import resolve_model_flag
from openjamba.cli import build_parser, main
from openjamba.hf import HUB_FILES, CheckpointError, resolve_checkpoint
from openjamba.serve.server import served_model_name

from .hub_helpers import fake_hub_repo, use_hub_cache
from .test_cli import checkpoint_with_tokenizer

REPO = "owner/tiny-jamba"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """(cache, snapshot, a plain directory holding the same checkpoint)."""
    root = tmp_path_factory.mktemp("hub")
    checkpoint_with_tokenizer(root / "plain")
    snapshot = fake_hub_repo(root / "cache", REPO, checkpoint_with_tokenizer)
    return root / "cache", snapshot, root / "plain"


@pytest.fixture
def offline_hub(hub, monkeypatch):
    use_hub_cache(monkeypatch, hub[0])
    return hub


def test_a_repo_id_resolves_to_its_cached_snapshot(offline_hub, capsys):
    cache, snapshot, plain = offline_hub
    assert resolve_checkpoint(REPO) == snapshot
    assert f"openjamba: {REPO} from the Hugging Face cache {cache} (HF_HUB_OFFLINE is set)" in capsys.readouterr().err
    assert resolve_checkpoint(plain) == plain and resolve_checkpoint(str(plain)) == plain
    assert resolve_checkpoint("no-such-dir") == Path("no-such-dir")  # not repo-shaped: the loader's own error
    # a path that names a directory, not the repo: `./owner/name`, or the Path the command line made of it
    assert resolve_checkpoint(f"./{REPO}") == resolve_checkpoint(Path(REPO)) == Path(REPO)
    with pytest.raises(FileNotFoundError, match="no tokenizer at owner/tiny-jamba"):
        load_tokenizer(Path(REPO))
    with pytest.raises(SystemExit, match="owner/tiny-jamba"):
        main(["generate", "--model", f"./{REPO}", "--prompt", "x"])  # it used to load the cached repo


def test_generate_from_a_repo_id_equals_the_directory(offline_hub, capsys):
    cache, snapshot, plain = offline_hub
    outputs = []
    for model in (REPO, str(plain)):
        main(["generate", "--model", model, "--prompt", "def f(", "--max-new-tokens", "6", "--temperature", "0"])
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and len(outputs[0]) > len("def f(")


def test_the_python_api_takes_a_repo_id(offline_hub):
    cache, snapshot, plain = offline_hub
    model = JambaForCausalLM.from_pretrained(REPO, dtype=torch.float32)
    reference = JambaForCausalLM.from_pretrained(plain, dtype=torch.float32)
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    tokenizer = load_tokenizer(REPO)
    assert tokenizer.get_vocab() == load_tokenizer(plain).get_vocab()
    assert tokenizer.encode("def f(x):") == load_tokenizer(plain).encode("def f(x):")


def test_serve_names_the_model_by_its_repo_id(offline_hub, tmp_path):
    cache, snapshot, plain = offline_hub
    args = build_parser().parse_args(["serve", "--model", REPO])
    resolve_model_flag(args)
    assert args.model == snapshot and served_model_name(args) == REPO
    resolve_model_flag(args)  # once per command: a second call changes nothing
    assert args.model_id == REPO
    args = build_parser().parse_args(["serve", "--model", str(plain)])
    resolve_model_flag(args)
    assert served_model_name(args) == "plain"
    args = build_parser().parse_args(["serve", "--model", REPO, "--served-model-name", "jamba"])
    resolve_model_flag(args)
    assert served_model_name(args) == "jamba"
    assert served_model_name(argparse.Namespace(model=plain, served_model_name=None)) == "plain"  # load() unused


def test_a_repo_missing_offline_is_one_line(offline_hub, capsys):
    with pytest.raises(SystemExit) as err:
        main(["generate", "--model", "owner/missing", "--prompt", "x"])
    message = str(err.value.code)
    assert message.startswith("openjamba generate: error: owner/missing is not a local directory")
    assert "HF_HUB_OFFLINE" in message and "hf download owner/missing" in message and "\n" not in message
    with pytest.raises(SystemExit, match=r"at revision 'v2'\).*`hf download owner/tiny-jamba --revision v2`"):
        main(["generate", "--model", REPO, "--revision", "v2", "--prompt", "x"])  # a revision not in the cache


@pytest.fixture
def recorded(monkeypatch, tmp_path):
    """snapshot_download replaced: records its arguments and returns a directory holding `answer`'s files, or
    raises `answer` when it is an exception."""
    import huggingface_hub

    calls, answer = [], {"value": None}

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        if isinstance(answer["value"], BaseException):
            raise answer["value"]
        found = tmp_path / "snapshot"
        found.mkdir(exist_ok=True)
        for name in answer["value"] or ["config.json", "model.safetensors"]:
            (found / name).write_text("{}")
        return str(found)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls, answer


def test_only_safetensors_and_tokenizer_files_are_asked_for(recorded, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls, _ = recorded
    resolve_checkpoint("ai21labs/AI21-Jamba-Reasoning-3B", revision="v1.0")
    assert "openjamba: fetching ai21labs/AI21-Jamba-Reasoning-3B (v1.0) from the Hugging Face Hub into " \
        in capsys.readouterr().err
    (repo, kwargs), = calls
    assert repo == "ai21labs/AI21-Jamba-Reasoning-3B" and kwargs["revision"] == "v1.0"
    patterns = kwargs["allow_patterns"]
    assert patterns == HUB_FILES

    def fetched(name):
        return any(fnmatch.fnmatch(name, p) for p in patterns)

    for name in ("pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "model.pt", "weights.pth", "model.ckpt",
                 "pytorch_model.bin.index.json", "optimizer.pkl", "README.md", "original/consolidated.00.pth"):
        assert not fetched(name), name
    for name in ("config.json", "generation_config.json", "model.safetensors", "model-00001-of-00004.safetensors",
                 "model.safetensors.index.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                 "special_tokens_map.json", "chat_template.jinja", "additional_chat_templates/tool_use.jinja"):
        assert fetched(name), name


def hub_error(cls, message: str) -> Exception:
    """A huggingface_hub HTTP error without an HTTP response (its constructor wants one; the type is what counts)."""
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    return err


def test_hub_failures_are_one_actionable_line(recorded):
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError

    _, answer = recorded
    answer["value"] = hub_error(RepositoryNotFoundError, "404 Client Error")
    with pytest.raises(CheckpointError, match=r"^owner/x is not a local directory, and the Hugging Face Hub has no "
                                              r"model repo owner/x \(or it is private: log in with `hf auth login`"):
        resolve_checkpoint("owner/x")
    answer["value"] = hub_error(GatedRepoError, "403 Client Error")
    with pytest.raises(CheckpointError, match=r"^owner/x is gated on the Hugging Face Hub: accept its licence on "
                                              r"https://huggingface.co/owner/x, then log in with `hf auth login` or "
                                              r"set HF_TOKEN$"):
        resolve_checkpoint("owner/x")
    answer["value"] = ["config.json", "tokenizer.json"]  # a repo with .bin weights only: none of them fetched
    with pytest.raises(CheckpointError, match="owner/x has no safetensors weights on the Hub: openjamba loads only "
                                              "safetensors"):
        resolve_checkpoint("owner/x")


def test_a_local_directory_shaped_like_a_repo_id_is_a_directory(recorded, hub, tmp_path, monkeypatch, capsys):
    calls, _ = recorded
    monkeypatch.chdir(tmp_path)
    checkpoint_with_tokenizer(tmp_path / "owner" / "tiny-jamba")
    assert resolve_checkpoint(REPO) == Path(REPO)
    main(["generate", "--model", REPO, "--prompt", "def f(", "--max-new-tokens", "6", "--temperature", "0"])
    here = capsys.readouterr().out
    main(["generate", "--model", str(hub[2]), "--prompt", "def f(", "--max-new-tokens", "6", "--temperature", "0"])
    assert calls == [] and here == capsys.readouterr().out


def test_train_init_from_takes_a_repo_id(offline_hub):
    from openjamba.train import TrainConfig

    cfg = TrainConfig(init_from=REPO, data="d", out="o").with_absolute_paths()
    assert cfg.init_from == str(offline_hub[1])


def test_info_fetches_the_config_alone(recorded):
    calls, _ = recorded
    args = build_parser().parse_args(["info", "--model", "owner/other"])
    resolve_model_flag(args)
    assert calls[-1][1]["allow_patterns"] == ["config.json"]


def test_info_names_a_repo_by_its_id(offline_hub, capsys):
    import json

    main(["info", "--model", REPO, "--context", "1024", "--json"])
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["model"] == REPO


def test_loop_cpu_takes_a_repo_id(offline_hub, monkeypatch, capsys):
    """`python -m openjamba.bench.loop_cpu --model REPO_ID` resolves the id once, before starting its servers, which
    then load the snapshot directory; an id that is not there is one line (exit 2) and starts none."""
    import sys

    from openjamba.bench import loop_cpu

    started = []

    def start_server(tree, args, profile):
        started.append(args.model)
        raise SystemExit(0)

    monkeypatch.setattr(loop_cpu, "start_server", start_server)
    monkeypatch.setattr(sys, "argv", ["loop_cpu", "--model", REPO])
    with pytest.raises(SystemExit):
        loop_cpu.main()
    assert started == [offline_hub[1]]
    monkeypatch.setattr(sys, "argv", ["loop_cpu", "--model", "owner/missing"])
    with pytest.raises(SystemExit) as err:
        loop_cpu.main()
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.value.code == 2 and started == [offline_hub[1]]
    assert message.startswith("loop_cpu: error: --model: owner/missing is not a local directory")
