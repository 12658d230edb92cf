"""Training never loses or silently ignores anything (issue 12, items 1-7): resumed settings take effect, a run is
never replaced unasked, exports and checkpoints are atomic, one process per run directory, a full disk is one
clear line with nothing partial left behind, and a torn metrics line or another working directory do not block
a resume."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from openjamba.cli import main
from openjamba.files import OutOfSpace, remove_abandoned_builds, write_atomic
from openjamba.hf import save_pretrained
from openjamba.train import checkpoint as ckpt
from openjamba.train.metrics import read_metrics
from openjamba.train.rundir import run_lock
from openjamba.train.trainer import lr_factor, train

from .conftest import random_model
from .train_helpers import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def records(out: Path) -> list[dict]:
    return read_metrics(out / "metrics.jsonl")


def test_resumed_settings_take_effect(prepared_data, tmp_path):
    """--lr, the schedule, --weight-decay, --beta1 and --grad-clip given on resume are the ones used."""
    out = tmp_path / "run"
    train(tiny_config(prepared_data, out, steps=4, lr=3e-3, warmup_steps=2))
    cfg = tiny_config(prepared_data, out, steps=8, lr=1e-3, warmup_steps=1, min_lr_ratio=0.5, weight_decay=0.01,
                      beta1=0.8, save_every=0)
    train(cfg, resume=out)
    lrs = {r["step"]: r["lr"] for r in records(out)}
    for step in (5, 6, 7, 8):  # the lr logged at step s is the one step s used: schedule position s - 1
        assert lrs[step] == pytest.approx(1e-3 * lr_factor(step - 1, 1, 8, 0.5), rel=1e-9)
    scheduler = ckpt.read_trainer_state(ckpt.resolve(out))["scheduler"]
    assert scheduler["base_lrs"] == [1e-3, 1e-3]


def test_resuming_a_finished_run_says_how_to_train_on(prepared_data, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_config(prepared_data, out, steps=2, save_every=0))
    capsys.readouterr()
    train(tiny_config(prepared_data, out, steps=2, save_every=0), resume=out)
    assert "already reached its 2 steps; --steps N (more than 2) trains it on" in capsys.readouterr().out


def test_resume_refuses_what_cannot_change_with_the_reason(prepared_data, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_config(prepared_data, out, steps=4))
    for changed, reason in (({"batch_size": 2}, "different batch_size"), ({"seq_len": 16}, "different seq_len"),
                            ({"steps": 3}, "beyond --steps 3"), ({"model": {"hidden_size": 64}}, "model config")):
        with pytest.raises(ValueError, match=reason):
            train(tiny_config(prepared_data, out, **{"steps": 6, **changed}), resume=out)


def test_a_new_run_never_replaces_a_finished_one(prepared_data, tmp_path, capsys):
    """Even with its checkpoints pruned away, a run's model and metrics are refused unless --overwrite."""
    out = tmp_path / "run"
    train(tiny_config(prepared_data, out, steps=2, save_every=0, eval_every=0))
    for path in ckpt.list_checkpoints(ckpt.checkpoint_root(out)):
        shutil.rmtree(path)
    weights = (out / "model" / "model.safetensors").read_bytes()
    metrics = (out / "metrics.jsonl").read_text()
    with pytest.raises(FileExistsError, match=r"already holds a run \(model/, metrics.jsonl, loss.png\).*--overwrite"):
        train(tiny_config(prepared_data, out, steps=2, seed=1))
    assert (out / "model" / "model.safetensors").read_bytes() == weights
    assert (out / "metrics.jsonl").read_text() == metrics
    train(tiny_config(prepared_data, out, steps=2, seed=1, save_every=0, eval_every=0), overwrite=True)
    assert (out / "model" / "model.safetensors").read_bytes() != weights


def test_quickstart_refuses_an_existing_run_before_doing_any_work(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_bytes(b"precious")
    with pytest.raises(SystemExit, match="already holds a run .*--resume --steps N.*--overwrite"):
        main(["quickstart", "--out", str(tmp_path), "--steps", "2"])
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == b"precious"
    assert not (tmp_path / "data").exists()


def test_export_keeps_the_previous_model_whole_until_the_new_one_is_complete(tmp_path, monkeypatch):
    """A failure (a kill, a full disk) while writing the new weights leaves the old directory untouched."""
    from openjamba.files import building_dir

    target = tmp_path / "model"
    save_pretrained(random_model(), target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    assert stat.S_IMODE((target / "model.safetensors").stat().st_mode) == 0o666 & ~_umask()

    def dies(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("openjamba.hf.save_file", dies)
    with pytest.raises(KeyboardInterrupt):
        with building_dir(target) as tmp:
            save_pretrained(random_model(seed=1), tmp)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no hidden leftovers


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_write_atomic_cleans_up_and_sets_normal_permissions(tmp_path):
    file = tmp_path / "a.txt"
    write_atomic(file, "one")

    def fails(tmp):
        tmp.write_text("partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        write_atomic(file, fails)
    assert file.read_text() == "one" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_abandoned_builds_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / f".data.tmp-{dead}").mkdir()
    (tmp_path / f".data.tmp-{os.getpid()}").mkdir()  # a live process's build stays
    remove_abandoned_builds(tmp_path / "data")
    assert [p.name for p in tmp_path.iterdir()] == [f".data.tmp-{os.getpid()}"]


def test_a_second_process_on_the_same_run_gets_one_line_with_the_holders_pid(prepared_data, tmp_path, capsys):
    out = tmp_path / "run"
    with run_lock(out):  # flock locks belong to an open file: a second open, even in this process, is refused
        with pytest.raises(SystemExit) as err:
            main(["train", "--data", str(prepared_data), "--out", str(out), "--steps", "2"])
        assert str(err.value) == (f"openjamba train: error: {out} is in use by another openjamba process "
                                  f"(pid {os.getpid()}); wait for it to finish or choose another --out")
    assert not (out / "metrics.jsonl").exists()


def test_out_of_space_while_checkpointing_is_one_line_and_keeps_latest(prepared_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = tiny_config(prepared_data, out, steps=4, save_every=2, eval_every=0)
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if "step-000004" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos 704 vs 598") from OSError(
                errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OutOfSpace, match=r"^no space left on device writing .*step-000004.tmp \(about .* MiB "
                                         r"needed, .* MiB free\)$"):
        train(cfg)
    root = ckpt.checkpoint_root(out)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000002"]
    assert ckpt.resolve(out).name == "step-000002"


def test_resume_removes_partial_checkpoints_first(prepared_data, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(prepared_data, out, steps=2, save_every=0, eval_every=0))
    partial = ckpt.checkpoint_root(out) / "step-000003.tmp"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"x" * 100)
    train(tiny_config(prepared_data, out, steps=3, save_every=0, eval_every=0), resume=out)
    assert sorted(p.name for p in ckpt.checkpoint_root(out).iterdir()) == ["latest", "step-000002", "step-000003"]


def test_a_torn_metrics_line_does_not_block_resume(prepared_data, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(prepared_data, out, steps=2, save_every=2, eval_every=0))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 4.')  # killed mid-append
    train(tiny_config(prepared_data, out, steps=3, save_every=0, eval_every=0), resume=out)
    assert [r["step"] for r in records(out)] == [1, 2, 3]
    (out / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not a JSON record"):
        read_metrics(out / "metrics.jsonl")


def test_a_run_resumes_from_another_working_directory(prepared_data, tmp_path, monkeypatch, capsys):
    """Relative --data and --out are stored absolute, so `--resume RUN` works from anywhere."""
    shutil.copytree(prepared_data, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    sets = ["--set", "hidden_size=32", "--set", "num_hidden_layers=2", "--set", "attn_layer_offset=1",
            "--set", "attn_layer_period=2", "--set", "num_experts=1", "--set", "num_experts_per_tok=1"]
    main(["train", "--data", "data", "--out", "run", "--steps", "2", "--batch-size", "2", "--seq-len", "16",
          "--eval-every", "0", "--threads", "1", *sets])
    saved = ckpt.read_trainer_state(ckpt.resolve(tmp_path / "run"))["train_config"]
    assert saved["data"] == str(tmp_path / "data") and saved["out"] == str(tmp_path / "run")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    main(["train", "--resume", str(tmp_path / "run"), "--steps", "3"])
    assert "step 3/3" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3


@pytest.fixture
def small_disk(tmp_path):
    """A 2.2 MB tmpfs: room for one tiny checkpoint, not two (needs root; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2200k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_disk(prepared_data, small_disk, capsys):
    out = small_disk / "run"
    argv = ["train", "--data", str(prepared_data), "--out", str(out), "--steps", "4", "--save-every", "2",
            "--eval-every", "0", "--batch-size", "4", "--seq-len", "32",
            *[a for k, v in tiny_config(prepared_data, out).model.items() for a in ("--set", f"{k}={json.dumps(v)}")]]
    for attempt in (argv, ["train", "--out", str(out), "--resume"]):  # the resume meets the still-full disk
        with pytest.raises(SystemExit) as err:
            main(attempt)
        assert str(err.value).startswith("openjamba train: error: no space left on device writing ")
        assert "\n" not in str(err.value)
        assert sorted(p.name for p in ckpt.checkpoint_root(out).iterdir()) == ["latest", "step-000002"]
        assert ckpt.resolve(out).name == "step-000002"
