"""The trainer in one process: learning, exact resume, checkpoints, non-finite losses and the exported model."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from openjamba import JambaForCausalLM, load_tokenizer
from openjamba.train import DataError, NonFiniteLoss, prepare, train
from openjamba.train import checkpoint as ckpt
from openjamba.train.distributed import DistEnv
from openjamba.train.metrics import read_metrics
from openjamba.train.trainer import Trainer, lr_factor

from .train_helpers import DENSE_MODEL, DROPOUT_MODEL, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl")}


@pytest.fixture(scope="module")
def straight(prepared_data, tmp_path_factory):
    """An uninterrupted 8-step run with checkpoints at steps 4 and 8: the oracle for every resume."""
    out = tmp_path_factory.mktemp("straight")
    torch.set_num_threads(1)
    result = train(tiny_config(prepared_data, out, model=DROPOUT_MODEL))
    return out, result


def test_loss_falls_when_overfitting_a_small_batch(tmp_path):
    rng = random.Random(0)
    (tmp_path / "one.txt").write_text(" ".join(str(rng.randint(0, 999)) for _ in range(200)))
    prepare([tmp_path / "one.txt"], tmp_path / "data", vocab_size=300, val_fraction=0.0, progress=False)
    result = train(tiny_config(tmp_path / "data", tmp_path / "run", steps=60, batch_size=8, lr=1e-2,
                               warmup_steps=5, eval_every=0, save_every=0, log_every=5))
    curve = losses(tmp_path / "run")
    assert curve[5] > 4.0  # near ln(300) = 5.7 before it has learnt anything
    assert curve[60] < 0.3 * curve[5], curve
    assert result.val_loss is None  # no validation split


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(s, warmup=10, total=100, min_ratio=0.1) for s in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[100] == pytest.approx(0.1)


def test_resume_continues_the_loss_curve_exactly(straight, prepared_data, tmp_path):
    out, result = straight
    expected = losses(out)
    assert sorted(expected) == list(range(1, 9))
    resumed = train(tiny_config(prepared_data, tmp_path, model=DROPOUT_MODEL),
                    resume=out / "checkpoints" / "step-000004")
    got = losses(tmp_path)
    assert sorted(got) == [5, 6, 7, 8]
    assert [got[s] for s in got] == [expected[s] for s in got]  # bitwise: same ops, same state, same data
    assert resumed.val_loss == result.val_loss


def test_a_crash_while_saving_leaves_the_previous_checkpoint_as_latest(straight, prepared_data, tmp_path,
                                                                       monkeypatch):
    real_save, calls = ckpt.dcp.save, []

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        real_save(*args, **kwargs)  # the files are written ...
        if len(calls) == 2:
            raise OSError("disk full")  # ... but the save dies before it completes

    monkeypatch.setattr(ckpt.dcp, "save", crash_on_second)
    with pytest.raises(OSError, match="disk full"):
        train(tiny_config(prepared_data, tmp_path, model=DROPOUT_MODEL, save_every=2))
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-000002"
    assert not (root / "step-000004.tmp").exists() and not (root / "step-000004").exists()  # nothing partial
    monkeypatch.setattr(ckpt.dcp, "save", real_save)
    train(tiny_config(prepared_data, tmp_path, model=DROPOUT_MODEL, save_every=2), resume=tmp_path)
    assert losses(tmp_path) == losses(straight[0])
    assert not list(root.glob("*.tmp"))


def test_checkpoints_keep_the_newest_k(prepared_data, tmp_path):
    train(tiny_config(prepared_data, tmp_path, steps=5, save_every=1, keep=2, eval_every=0))
    root = tmp_path / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-000004", "step-000005"]
    assert ckpt.resolve(tmp_path) == root / "step-000005"
    state = json.loads((root / "step-000005" / "trainer.json").read_text())
    assert state["step"] == 5 and state["samples"] == 5 * 4 and state["scheduler"]["last_epoch"] == 5


def test_gradient_accumulation_matches_one_big_batch(prepared_data, tmp_path):
    """Dense model: the MoE aux loss is per micro-batch, so only a dense model makes the two equal."""
    one = train(tiny_config(prepared_data, tmp_path / "one", model=DENSE_MODEL, steps=4, save_every=0))
    two = train(tiny_config(prepared_data, tmp_path / "two", model=DENSE_MODEL, steps=4, save_every=0,
                            grad_accum=2))
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert a.keys() == b.keys()
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6)
    assert two.val_loss == pytest.approx(one.val_loss, rel=1e-5)


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(prepared_data, tmp_path):
    cfg = tiny_config(prepared_data, tmp_path, lr=1e6, warmup_steps=0, grad_clip=0, save_every=1)
    with pytest.raises(NonFiniteLoss, match=r"non-finite .* at step 2 .* Last good checkpoint: .*step-000001"):
        train(cfg)
    assert ckpt.resolve(tmp_path).name == "step-000001"
    assert not (tmp_path / "model").exists()


def test_export_reloads_in_openjamba_and_transformers_with_the_same_logits(straight, prepared_data):
    transformers = pytest.importorskip("transformers")
    out, result = straight
    ours = JambaForCausalLM.from_pretrained(result.model_dir)
    assert load_tokenizer(result.model_dir).get_vocab() == load_tokenizer(prepared_data).get_vocab()
    trainer = Trainer(tiny_config(prepared_data, out, model=DROPOUT_MODEL), DistEnv(), resume=result.checkpoint_dir)
    ids = torch.randint(3, ours.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trainer.model.eval()(ids).logits
        assert torch.equal(ours(ids).logits, expected)
        hf = transformers.JambaForCausalLM.from_pretrained(result.model_dir).eval()
        torch.testing.assert_close(hf(ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_resume_refuses_a_different_run(straight, prepared_data, tmp_path):
    out, _ = straight
    with pytest.raises(ValueError, match="different seed"):
        train(tiny_config(prepared_data, tmp_path, model=DROPOUT_MODEL, seed=1), resume=out)
    with pytest.raises(ValueError, match="model config differs"):
        train(tiny_config(prepared_data, tmp_path, model={**DENSE_MODEL}), resume=out)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(tiny_config(prepared_data, tmp_path), resume=tmp_path / "nothing")
    shutil.copytree(out / "checkpoints", tmp_path / "checkpoints")
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_config(prepared_data, tmp_path))


def test_data_beyond_the_model_vocabulary_is_refused(prepared_data, tmp_path):
    with pytest.raises(DataError, match="beyond the model's vocabulary of 64"):
        train(tiny_config(prepared_data, tmp_path, model={**DENSE_MODEL, "vocab_size": 64}))


def test_fine_tuning_starts_from_the_given_checkpoint(straight, prepared_data, tmp_path):
    out, result = straight
    tuned = train(tiny_config(prepared_data, tmp_path / "a", model={"router_aux_loss_coef": 0.01},
                              init_from=str(result.model_dir), steps=2, lr=1e-9, warmup_steps=0, save_every=0))
    # with a negligible learning rate, fine-tuning evaluates the exported model: its validation loss
    assert tuned.val_loss == pytest.approx(result.val_loss, rel=1e-4)
    assert JambaForCausalLM.from_pretrained(tuned.model_dir).config.router_aux_loss_coef == 0.01
    with pytest.raises(ValueError, match="changes the architecture"):
        train(tiny_config(prepared_data, tmp_path / "b", model={"hidden_size": 64}, init_from=str(result.model_dir)))


def test_activation_checkpointing_trains_identically(prepared_data, tmp_path):
    train(tiny_config(prepared_data, tmp_path / "plain", steps=3, save_every=0, eval_every=0))
    train(tiny_config(prepared_data, tmp_path / "ac", steps=3, save_every=0, eval_every=0,
                      activation_checkpointing=True))
    plain, ac = losses(tmp_path / "plain"), losses(tmp_path / "ac")
    assert plain.keys() == ac.keys() and all(ac[s] == pytest.approx(plain[s], rel=1e-6) for s in plain)


@pytest.mark.slow
def test_compiled_layers_train_like_eager_ones(prepared_data, tmp_path):
    """torch.compile per decoder layer (needs a C++ compiler on CPU; about a minute of compilation)."""
    train(tiny_config(prepared_data, tmp_path / "eager", steps=3, save_every=0, eval_every=0))
    train(tiny_config(prepared_data, tmp_path / "compiled", steps=3, save_every=0, eval_every=0, compile=True))
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert all(compiled[s] == pytest.approx(eager[s], rel=1e-4) for s in eager)
