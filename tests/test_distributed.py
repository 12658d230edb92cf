"""torchrun with 2 CPU processes (gloo, FSDP2) against one process on the same global batch.

One process with 2 accumulation steps sees exactly the micro-batches the 2 ranks see, so the losses must agree to
float tolerance (only the order of the gradient reduction differs). The MoE model is used on purpose: its aux
loss is per micro-batch, so this also checks that ranks take the right slices of the global batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from openjamba import JambaForCausalLM
from openjamba.train import train
from openjamba.train.metrics import read_metrics

from .train_helpers import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def records(out) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}


def assert_same_curve(got: dict[int, dict], expected: dict[int, dict]) -> None:
    assert got.keys() == expected.keys()
    for step, record in expected.items():
        for key in ("loss", "ce", "aux", "grad_norm", "val_loss"):
            if key in record:
                assert got[step][key] == pytest.approx(record[key], rel=1e-5, abs=1e-6), (step, key)


def test_two_gloo_processes_train_like_one_and_checkpoints_reshard(prepared_data, tmp_path):
    single = tiny_config(prepared_data, tmp_path / "one", steps=6, save_every=3, eval_every=3, grad_accum=2)
    one = train(single)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({**single.to_dict(), "out": str(tmp_path / "two"), "grad_accum": 1}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "openjamba", "train", "--recipe", str(recipe)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.count("step 1/6") == 1  # rank 0 alone reports
    assert "2 rank(s) x 1 micro-batch(es) of 2" in run.stdout
    two = tmp_path / "two"
    assert_same_curve(records(two), records(tmp_path / "one"))

    shards = sorted(p.name for p in (two / "checkpoints" / "step-000003").iterdir())
    assert {"__0_0.distcp", "__1_0.distcp", "rng-0.pt", "rng-1.pt", "trainer.json"} <= set(shards)

    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(JambaForCausalLM.from_pretrained(two / "model")(ids).logits,
                                   JambaForCausalLM.from_pretrained(one.model_dir)(ids).logits, atol=1e-5, rtol=1e-5)

    # A checkpoint written by 2 ranks resumes in 1 process (DCP reshards) and continues the 2-rank curve.
    train(tiny_config(prepared_data, tmp_path / "resharded", steps=6, save_every=3, eval_every=3, grad_accum=2),
          resume=two / "checkpoints" / "step-000003")
    expected = {s: r for s, r in records(two).items() if s > 3}
    assert_same_curve(records(tmp_path / "resharded"), expected)
