"""Real interruptions, in a subprocess: SIGKILL mid-training, and SIGTERM (which saves first), then --resume.

Each interrupted run is compared with an uninterrupted run of the same configuration: the resumed loss curve must
be the same curve.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from openjamba.train import checkpoint as ckpt
from openjamba.train import train
from openjamba.train.metrics import read_metrics

from .train_helpers import DROPOUT_MODEL, tiny_config

STEPS = 40


def launch(recipe, out, *extra) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, "-m", "openjamba", "train", "--recipe", str(recipe), "--out", str(out),
                             *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(proc: subprocess.Popen, out, step: int, timeout: float = 120) -> int:
    """Poll metrics.jsonl until the run has logged `step` (the run logs every step); return the last logged step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
        if records and records[-1]["step"] >= step:
            return records[-1]["step"]
        if proc.poll() is not None:
            pytest.fail(f"the run ended before step {step}: {proc.stderr.read()}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no step {step} within {timeout}s")


def curve(out) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(out / "metrics.jsonl")]


@pytest.fixture(scope="module")
def setup(prepared_data, tmp_path_factory):
    """A recipe for a 40-step run, and that run done without interruption (the oracle)."""
    root = tmp_path_factory.mktemp("interrupt")
    cfg = tiny_config(prepared_data, root / "straight", model=DROPOUT_MODEL, steps=STEPS, save_every=5, eval_every=20)
    recipe = root / "recipe.json"
    recipe.write_text(json.dumps({k: v for k, v in cfg.to_dict().items() if k != "out"}))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg)
    finally:
        torch.set_num_threads(before)
    return recipe, curve(root / "straight")


def test_sigkill_mid_training_resumes_from_the_last_checkpoint(setup, tmp_path):
    recipe, expected = setup
    proc = launch(recipe, tmp_path)
    wait_for_step(proc, tmp_path, 12)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = read_metrics(tmp_path / "metrics.jsonl")[-1]["step"]
    assert killed_at < STEPS
    last = ckpt.resolve(tmp_path)
    assert last is not None and 10 <= ckpt.read_trainer_state(last)["step"] <= killed_at
    resumed = launch(recipe, tmp_path, "--resume")
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert f"resumed from {last}" in stdout
    assert curve(tmp_path) == expected  # steps logged after the checkpoint by the killed run were replaced


def stop_with(signum, recipe, out) -> None:
    """Send `signum` mid-run; the run must save a checkpoint at the step it stopped at and exit 128 + signum."""
    proc = launch(recipe, out)
    wait_for_step(proc, out, 7)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr
    assert f"stopped by {signal.Signals(signum).name}" in stderr
    stopped_at = read_metrics(out / "metrics.jsonl")[-1]["step"]
    assert stopped_at < STEPS
    assert ckpt.read_trainer_state(ckpt.resolve(out))["step"] == stopped_at


def test_sigterm_saves_a_checkpoint_then_resume_finishes_the_same_run(setup, tmp_path):
    recipe, expected = setup
    stop_with(signal.SIGTERM, recipe, tmp_path)
    resumed = launch(recipe, tmp_path, "--resume")
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert curve(tmp_path) == expected


def test_sigint_saves_a_checkpoint(setup, tmp_path):
    stop_with(signal.SIGINT, setup[0], tmp_path)
