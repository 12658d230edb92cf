"""Faults that need a real process: SIGKILL, SIGINT and SIGTERM at chosen points, and a file-size limit.

A child runs `openjamba` with one function replaced by one that announces the point (a marker file) and waits,
so the signal lands exactly there. Whatever happens, a previous complete output stays intact, and no partial
output survives (SIGKILL leaves no chance to clean up: the next run removes what the dead process left).
"""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .train_helpers import write_corpus

REPO = Path(__file__).resolve().parent.parent

# The child restores Python's SIGINT handler: a test run started in the background of a shell without job control
# hands its children SIGINT ignored, and Python then leaves it ignored.
CHILD = """
import signal, sys, time
from pathlib import Path
import {module} as target

signal.signal(signal.SIGINT, signal.default_int_handler)

marker = Path(sys.argv[1])
real = target.{function}

def wait_here(*args, **kwargs):
    marker.write_text("at the chosen point")
    while True:
        time.sleep(0.1)

target.{function} = wait_here
from openjamba.cli import main
main(sys.argv[2:])
"""


def child(module: str, function: str, marker: Path, argv: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", CHILD.format(module=module, function=function), str(marker),
                             *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for(marker: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the child ended early: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the child never reached the chosen point")
        time.sleep(0.05)


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "openjamba", *argv], env=env, capture_output=True, text=True,
                          timeout=300, **kwargs)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("process-faults")
    corpus = write_corpus(root / "text", files=4, functions=10)
    from openjamba.train import prepare

    prepare([corpus], root / "data", vocab_size=300, progress=False)
    return root, corpus


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT", "SIGTERM"])
def test_prepare_stopped_at_the_shard_writing_keeps_the_previous_data(prepared, how, tmp_path):
    root, corpus = prepared
    before = digest(root / "data")
    marker = tmp_path / "marker"
    proc = child("openjamba.train.data", "_write_shards", marker,
                 ["prepare", str(corpus), "--out", str(root / "data"), "--vocab-size", "300"])
    wait_for(marker, proc)
    proc.send_signal(getattr(signal, how))
    _, err = proc.communicate(timeout=60)
    assert digest(root / "data") == before
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".data.")]
    if how == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL and len(leftovers) == 1
        again = run_cli("prepare", str(corpus), "--out", str(root / "data"), "--vocab-size", "300")
        assert again.returncode == 0, again.stderr
        assert not [p.name for p in root.iterdir() if p.name.startswith(".data.")]  # the dead build is removed
    else:
        assert proc.returncode == 128 + getattr(signal, how) and err.strip() == "openjamba prepare: interrupted", err
        assert leftovers == []


def test_a_file_size_limit_during_prepare_is_one_line_and_leaves_nothing(prepared, tmp_path):
    _, corpus = prepared

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))

    out = run_cli("prepare", str(corpus), "--out", str(tmp_path / "data"), "--vocab-size", "300",
                  preexec_fn=limit)
    assert out.returncode == 1
    assert out.stderr.startswith("openjamba prepare: error: ") and len(out.stderr.strip().splitlines()) == 1
    assert "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_sigkill_while_exporting_the_model_keeps_the_previous_export(prepared, tmp_path):
    """The export is written beside model/ and swapped in: a kill while writing weights leaves model/ whole."""
    root, _ = prepared
    run = tmp_path / "run"
    tiny = ["--set", "hidden_size=32", "--set", "num_hidden_layers=2", "--set", "attn_layer_period=2",
            "--set", "attn_layer_offset=1", "--set", "num_experts=1", "--batch-size", "2", "--seq-len", "16",
            "--eval-every", "0", "--threads", "1"]
    first = run_cli("train", "--data", str(root / "data"), "--out", str(run), "--steps", "2", *tiny)
    assert first.returncode == 0, first.stderr
    before = digest(run / "model")
    marker = tmp_path / "marker"
    proc = child("openjamba.hf", "save_file", marker, ["train", "--out", str(run), "--resume", "--steps", "3"])
    wait_for(marker, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert digest(run / "model") == before
    again = run_cli("train", "--out", str(run), "--resume", "--steps", "3")
    assert again.returncode == 0, again.stderr
    assert digest(run / "model") != before
    assert not [p.name for p in run.iterdir() if p.name.startswith(".model.")]
