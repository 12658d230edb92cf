"""Loading and saving checkpoint directories, and every way a checkpoint can be bad."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from openjamba import JambaForCausalLM
from openjamba.hf import FP32_PARAMS, CheckpointError

from .conftest import random_model


@pytest.fixture
def saved(tmp_path):
    model = random_model()
    model.save_pretrained(tmp_path)
    return model, tmp_path


@pytest.fixture
def sharded(saved, tmp_path_factory):
    """The same model saved in several 10 KB shards with an index."""
    path = tmp_path_factory.mktemp("shards")
    saved[0].save_pretrained(path, max_shard_size="10KB")
    return path


def rewrite(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@torch.no_grad()
def test_round_trip_single_and_sharded(saved, tmp_path_factory):
    model, path = saved
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    assert torch.equal(JambaForCausalLM.from_pretrained(path)(ids).logits, model(ids).logits)
    sharded = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(sharded, max_shard_size="10KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert not (sharded / "model.safetensors").exists()
    assert torch.equal(JambaForCausalLM.from_pretrained(sharded)(ids).logits, model(ids).logits)


def test_per_expert_layout_on_disk(saved):
    _, path = saved
    keys = load_file(path / "model.safetensors").keys()
    assert "model.layers.1.feed_forward.experts.3.gate_proj.weight" in keys
    assert not any(k.endswith("gate_up_proj") for k in keys)


def test_dtype_and_device_arguments(saved):
    _, path = saved
    with pytest.warns(UserWarning, match="slow"):
        model = JambaForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if not n.endswith(FP32_PARAMS))
    assert JambaForCausalLM.from_pretrained(path, device="cpu").device.type == "cpu"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_ssm_dynamics_stay_fp32_at_a_16_bit_load_dtype(tmp_path, dtype):
    """A_log, D and the dt bias keep their exact fp32 checkpoint values; the rest is cast; the model still runs and
    agrees with fp32 as closely as test_model's bf16 check asks (a dense model: a top-k routing flip under
    rounding would make the comparison chaotic)."""
    model = random_model("dense-mha-biases-tied")
    model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="slow"):
        narrow = JambaForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    reference = dict(model.named_parameters())
    kept = {n: p for n, p in narrow.named_parameters() if n.endswith(FP32_PARAMS)}
    assert len(kept) == 3 * len(model.config.mamba_layer_indices)
    for name, param in kept.items():
        assert param.dtype == torch.float32 and torch.equal(param, reference[name]), name
    assert narrow.dtype == dtype
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    ref = model(ids).logits
    assert (narrow(ids).logits.float() - ref).abs().max() < 0.1 * ref.abs().max()
    assert narrow.generate(ids, max_new_tokens=3, eos_token_id=[]).shape == (1, 15)


def test_missing_unexpected_and_misshaped_tensors_are_all_named(saved):
    _, path = saved

    def damage(t):
        del t["model.layers.0.mamba.A_log"]
        del t["model.layers.1.feed_forward.experts.2.up_proj.weight"]
        t["model.layers.0.mamba.extra_thing"] = torch.zeros(3)
        t["model.layers.2.self_attn.q_proj.weight"] = torch.zeros(5, 5)

    rewrite(path, damage)
    with pytest.raises(CheckpointError) as err:
        JambaForCausalLM.from_pretrained(path)
    message = str(err.value)
    for name in ("model.layers.0.mamba.A_log", "model.layers.1.feed_forward.experts.2.up_proj.weight",
                 "model.layers.0.mamba.extra_thing", "model.layers.2.self_attn.q_proj.weight"):
        assert name in message


def test_config_that_does_not_match_the_weights(saved):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 64
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config"):
        JambaForCausalLM.from_pretrained(path)


def test_truncated_safetensors(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        JambaForCausalLM.from_pretrained(path)


def test_corrupted_header(saved):
    _, path = saved
    data = bytearray((path / "model.safetensors").read_bytes())
    data[8:20] = b"#" * 12
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        JambaForCausalLM.from_pretrained(path)


def test_every_unreadable_shard_is_named_at_once(sharded):
    path = sharded
    broken = sorted(path.glob("model-*.safetensors"))[:2]
    for file in broken:
        file.write_bytes(file.read_bytes()[:-7])
    with pytest.raises(CheckpointError) as err:
        JambaForCausalLM.from_pretrained(path)
    assert all(f"{file} is not a readable safetensors file" in str(err.value) for file in broken)


def test_pickle_only_directory_is_refused_without_unpickling(saved, monkeypatch):
    model, path = saved
    (path / "model.safetensors").unlink()
    with open(path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"weights": 1}, f)

    def forbidden(*args, **kwargs):
        raise AssertionError("a pickle file was opened for unpickling")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    with pytest.raises(CheckpointError, match="pickle"):
        JambaForCausalLM.from_pretrained(path)


def test_missing_shard_and_bad_index(sharded):
    path = sharded
    next(path.glob("model-00002-of-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="do not exist"):
        JambaForCausalLM.from_pretrained(path)
    (path / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="index"):
        JambaForCausalLM.from_pretrained(path)


def test_empty_or_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        JambaForCausalLM.from_pretrained(tmp_path)
    random_model().config.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        JambaForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        JambaForCausalLM.from_pretrained(tmp_path / "nope")


def test_tied_checkpoint_without_lm_head(tmp_path):
    model = random_model("dense-mha-biases-tied")
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    loaded = JambaForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.randint(0, model.config.vocab_size, (1, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


PEAK_RSS_SCRIPT = """
import sys, threading, time, torch
from openjamba import JambaForCausalLM

def anon_kb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

JambaForCausalLM.from_pretrained(sys.argv[2])  # warm-up: pays torch's one-time lazy imports (meta tensors)
peak, done = [0], [False]
def sample():
    while not done[0]:
        peak[0] = max(peak[0], anon_kb())
        time.sleep(0.0005)

base = anon_kb()
thread = threading.Thread(target=sample)
thread.start()
model = JambaForCausalLM.from_pretrained(sys.argv[1])
done[0] = True
thread.join()
peak[0] = max(peak[0], anon_kb())
print((peak[0] - base) * 1024)
"""


def test_loading_peaks_at_about_one_copy_of_the_weights(tmp_path):
    """Built on meta and filled in place: loading holds the weights once, plus one tensor in flight."""
    import subprocess
    import sys

    config = random_model().config.replace(hidden_size=512, intermediate_size=1024, num_attention_heads=4,
                                           vocab_size=8192, num_hidden_layers=8)
    model = JambaForCausalLM(config)
    model.save_pretrained(tmp_path / "big")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    random_model().save_pretrained(tmp_path / "small")
    out = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(tmp_path / "big"), str(tmp_path / "small")],
                         capture_output=True, text=True, check=True)
    peak = int(out.stdout.split()[-1])
    assert weights > 50e6
    assert peak < 1.1 * weights, (peak, weights)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_load_reports_progress_only_when_asked(sharded, monkeypatch, capsys, quantize):
    """Every weight byte is counted once (the bar reaches 100%); a load under the bar's delay, or one not asked to
    report, prints nothing."""
    from openjamba import hf

    JambaForCausalLM.from_pretrained(sharded, quantize=quantize, progress=True)
    assert capsys.readouterr().err == ""  # a small model loads within the delay
    monkeypatch.setattr(hf, "LOAD_PROGRESS_DELAY", 0.0)
    JambaForCausalLM.from_pretrained(sharded, quantize=quantize)
    assert capsys.readouterr().err == ""
    JambaForCausalLM.from_pretrained(sharded, quantize=quantize, progress=True)
    last = capsys.readouterr().err.rstrip("\n").split("\r")[-1]
    assert last.startswith(f"loading {sharded.name}: 100%|"), last
