"""`openjamba bench`: every cell measured in its own process, ratios against the compared models, table, JSON, plot.

Timings are not asserted (performance targets live in docs/benchmarks.md, measured by the command itself); these
tests check that the measurements exist, are consistent, and that failures become error cells instead of crashes.
"""

from __future__ import annotations

import importlib.util
import json
import time

import pytest
import torch

from openjamba.argtypes import parse_count
from openjamba.bench import PeakMemory, launch_worker, plan_cells, ratios, run_bench
from openjamba.bench.report import format_ratios
from openjamba.cli import main
from openjamba.config import get_preset

HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def test_cli_bench_measures_all_models_and_writes_plot(tmp_path, capsys):
    compare = ["--compare", "attention-only"] + (["--compare", "transformers"] if HAVE_TRANSFORMERS else [])
    plot = tmp_path / "bench.png"
    main(["bench", "--preset", "tiny", "--contexts", "48", "--phases", "prefill,decode,scan", "--decode-tokens", "3",
          "--repeats", "1", "--threads", "1", "--plot", str(plot), *compare])
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    impls = {row["impl"]: row for row in report["rows"]}
    assert set(impls) == {"openjamba", "attention-only"} | ({"transformers"} if HAVE_TRANSFORMERS else set())
    for impl, row in impls.items():
        assert "errors" not in row, row
        assert row["prefill_tok_s"] > 0 and row["decode_ms"] > 0 and row["peak_mem_bytes"] > 0, impl
    ours, attention_only = impls["openjamba"], impls["attention-only"]
    # The hybrid caches K/V for 1 layer in 8; its twin for all 8. Both caches were sized for 48 + 3 tokens.
    config = get_preset("tiny")
    kv_per_layer = 2 * config.num_key_value_heads * config.head_dim * 4 * (48 + 3)
    assert attention_only["cache_bytes"] == 8 * kv_per_layer
    assert ours["cache_bytes"] < attention_only["cache_bytes"]
    assert ours["scan_fwd_ns"] > 0 and "scan_fwd_ns" not in attention_only  # no Mamba layer, no scan
    assert {r["versus"] for r in report["ratios"]} == set(impls) - {"openjamba"}
    assert report["machine"]["matmul_flops_s"] > 0
    assert 0 < report["utilisation"][0]["prefill_mfu"] < 1.5
    assert ours["read_bytes_s"] > 0 and ours["decode_read_bytes"] > ours["cache_bytes"] // 2
    assert report["utilisation"][0]["decode_bw"] > 0 and "decode BW" in out
    assert "prefill tok/s" in out and "openjamba vs" in out
    assert plot.stat().st_size > 10_000


@pytest.mark.parametrize("tied", [False, True])
def test_decode_weight_bytes_are_the_active_parameters(tied):
    """A decode step reads the active parameters (top-k experts) but only one row of an untied embedding."""
    from openjamba.bench.measure import decode_weight_bytes
    from openjamba.info import count_parameters
    from openjamba.model import JambaForCausalLM

    config = get_preset("tiny", tie_word_embeddings=tied)
    model = JambaForCausalLM(config)
    unread_rows = 0 if tied else (config.vocab_size - 1) * config.hidden_size
    assert config.num_experts > config.num_experts_per_tok
    assert decode_weight_bytes(model, config) == 4 * (count_parameters(config)["active"] - unread_rows)


def test_training_phase_runs_in_its_own_worker():
    cells = plan_cells(["openjamba", "transformers"], [64, 128], [1], ["prefill", "train", "scan", "profile"])
    assert len(cells) == 12
    assert {tuple(c["phases"]) for c in cells} == {("prefill", "scan"), ("train",), ("profile",)}
    report = run_bench(get_preset("tiny"), "tiny", contexts=(40,), phases=("train",), threads=1, repeats=1,
                       progress=False)
    row = report["rows"][0]
    assert row["train_tok_s"] > 0 and row["train_peak_mem_bytes"] > row["model_mem_bytes"] > 0
    assert report["utilisation"][0]["train_mfu"] > 0


def test_kv_dtype_halves_our_cache():
    config = get_preset("tiny")
    cache = {}
    for kv_dtype in (None, "bf16"):
        report = run_bench(config, "tiny", contexts=(40,), phases=("prefill", "decode"), kv_dtype=kv_dtype, threads=1,
                           repeats=1, decode_tokens=2, progress=False)
        assert report["kv_dtype"] == kv_dtype and "errors" not in report["rows"][0]
        cache[kv_dtype] = report["rows"][0]["cache_bytes"]
    kv_fp32 = 2 * config.num_key_value_heads * config.head_dim * 4 * (40 + 2)  # one attention layer
    assert cache[None] - cache["bf16"] == kv_fp32 // 2
    with pytest.raises(ValueError, match="kv_dtype"):
        run_bench(config, "tiny", contexts=(40,), kv_dtype="int3", progress=False)


def test_ratios_are_their_time_over_ours_and_our_memory_over_theirs():
    rows = [dict(impl="openjamba", context=8, batch=1, prefill_s=1.0, decode_ms=2.0, peak_mem_bytes=100),
            dict(impl="transformers", context=8, batch=1, prefill_s=5.0, decode_ms=3.0, peak_mem_bytes=400)]
    (entry,) = ratios(rows, ("transformers",))
    assert entry == dict(versus="transformers", context=8, batch=1, prefill_speedup=5.0, decode_speedup=1.5,
                         peak_mem_ratio=0.25)


def test_a_failing_cell_becomes_an_error_not_a_crash():
    result = launch_worker({"impl": "openjamba", "device": "cpu", "bogus": True}, timeout_s=120)
    assert "error" in result and "exit code" in result["error"]
    assert "timed out" in launch_worker({"impl": "openjamba"}, timeout_s=0.01)["error"]


def test_peak_memory_sees_a_short_lived_allocation():
    with PeakMemory(torch.device("cpu")) as peak:
        start = peak.peak
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        time.sleep(0.05)
        del block
    assert peak.peak - start >= 60 * 2**20


@pytest.mark.parametrize("text,value", [("8192", 8192), ("8K", 8192), ("256k", 262144)])
def test_context_lengths_accept_k_suffix(text, value):
    assert parse_count(text) == value


def test_bad_phase_and_compare_are_clear_errors():
    with pytest.raises(ValueError, match="unknown phase 'fast'"):
        run_bench(get_preset("tiny"), "tiny", phases=("fast",), progress=False)
    with pytest.raises(ValueError, match="unknown --compare 'mixtral'"):
        run_bench(get_preset("tiny"), "tiny", compare=("mixtral",), progress=False)


def test_worker_progress_reaches_the_callback():
    spec = dict(impl="openjamba", config=get_preset("tiny").to_dict(), model_dir=None, seed=0, device="cpu",
                dtype="fp32", threads=1, decode_tokens=2, prefill_chunk=16, repeats=1, context=40, batch=1,
                phases=["prefill", "decode"])
    seen: list[str] = []
    result = launch_worker(spec, timeout_s=300, on_progress=seen.append)
    assert result["prefill_tok_s"] > 0 and result["decode_ms"] > 0
    assert "prefill" in seen and any(line.startswith("decode") for line in seen)
    assert len(result["read_bytes_s_probes"]) == 2  # one probe before each round: 2 tokens, 2 rounds


def test_a_quantize_list_measures_every_format_in_one_worker_interleaved():
    """`--quantize none,int8,int4`: one row per format from ONE worker (they share its read probes), ratios against
    the first format, and each format decodes exactly the tokens its own one-format run decodes (same seed, same
    weights), so interleaving the models' decode steps left each model's cache alone."""
    from openjamba.bench import format_bench_report

    config = get_preset("tiny")
    common = dict(contexts=(40,), phases=("prefill", "decode"), threads=1, repeats=1, decode_tokens=5, progress=False)
    report = run_bench(config, "tiny", quantize="none,int8,int4", **common)
    rows = {row["weights"]: row for row in report["rows"]}
    assert list(rows) == report["formats"] == ["fp32", "int8", "int4"] and report["quantize"] == "none,int8,int4"
    probes = rows["fp32"]["read_bytes_s_probes"]
    assert len(probes) == 5  # min(8 rounds, 5 tokens): one probe per round, shared by the three formats
    for row in rows.values():
        assert "errors" not in row, row
        assert row["read_bytes_s_probes"] == probes and len(row["decode_round_ms"]) == 5
        assert row["decode_ms"] > 0 and row["prefill_tok_s"] > 0 and row["model_mem_bytes"] > 0
        assert "load_peak_mem_bytes" not in row and "peak_mem_bytes" not in row  # not one format's in one process
    assert rows["int4"]["decode_read_bytes"] < rows["int8"]["decode_read_bytes"] < rows["fp32"]["decode_read_bytes"]
    ratios_by = {r["weights"]: r for r in report["format_ratios"]}
    assert set(ratios_by) == {"int8", "int4"}
    for weights, entry in ratios_by.items():
        assert entry["versus"] == "fp32"
        assert entry["decode_speedup"] == pytest.approx(rows["fp32"]["decode_ms"] / rows[weights]["decode_ms"])
        spread = entry["decode_speedup_rounds"]
        assert 0 < spread["min"] <= spread["median"] <= spread["max"]
        assert spread["min"] == min(f / q for f, q in zip(rows["fp32"]["decode_round_ms"],
                                                          rows[weights]["decode_round_ms"]))
    table = format_bench_report(report)
    assert "openjamba int8" in table and "weight formats vs fp32" in table and "load peak" not in table
    assert "can pass 100%" in table  # the quantized rows' MFU is over the fp32 matmul rate
    for quantize, weights in ((None, "fp32"), ("int8", "int8")):
        alone = run_bench(config, "tiny", quantize=quantize, **common)["rows"][0]
        assert "weights" not in alone and "load_peak_mem_bytes" in alone
        assert alone["decode_ids"] == rows[weights]["decode_ids"], weights
        assert len(alone["decode_ids"][0]) == 5


def test_interleaved_rounds_rotate_the_formats_after_each_probe():
    spec = dict(impl="openjamba", config=get_preset("tiny").to_dict(), model_dir=None, seed=0, device="cpu",
                dtype="fp32", threads=1, decode_tokens=3, prefill_chunk=16, repeats=1, context=24, batch=1,
                phases=["decode"], quantize=None, formats=["none", "int8", "int4"])
    seen: list[str] = []
    result = launch_worker(spec, timeout_s=300, on_progress=seen.append)
    assert [r["decode_ms"] > 0 for r in result["formats"]] == [True] * 3
    after_probe = [seen[i + 1].split(":")[0] for i, line in enumerate(seen) if line == "memory read bandwidth"]
    assert after_probe == ["none", "int8", "int4"]
    assert {"building the none model", "int8: prefill", "int4: decode (2/3 tokens)"} <= set(seen)


def test_format_ratios_are_the_first_formats_time_over_each():
    rows = [dict(impl="openjamba", context=8, batch=1, weights="fp32", decode_ms=4.0, decode_round_ms=[4.0, 6.0, 4.0],
                 model_mem_bytes=400),
            dict(impl="openjamba", context=8, batch=1, weights="int8", decode_ms=1.0, decode_round_ms=[1.0, 1.0, 2.0],
                 model_mem_bytes=100)]
    (entry,) = format_ratios(rows, ["fp32", "int8"])
    assert entry == dict(weights="int8", versus="fp32", context=8, batch=1, decode_speedup=4.0, model_mem_ratio=0.25,
                         decode_round_speedups=[4.0, 6.0, 2.0],
                         decode_speedup_rounds={"min": 2.0, "median": 4.0, "max": 6.0})


@pytest.mark.parametrize("kwargs,message", [
    (dict(quantize="none,int2"), "unknown quantization 'int2' in 'none,int2'"),
    (dict(quantize="int8,none,int8"), "names 'int8' twice"),
    (dict(quantize="none,int8", compare=("attention-only",)), "give --quantize one format"),
    (dict(quantize="none,int4", phases=("decode", "train")), "phase 'train' runs each model in its own process"),
])
def test_bad_quantize_lists_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        run_bench(get_preset("tiny"), "tiny", progress=False, **kwargs)


def test_processor_label_names_the_vector_instructions():
    """Report headers say which vector instructions the CPU has: the kernels' speed depends on it."""
    from openjamba.bench.measure import processor_label

    assert processor_label({"cpu": "AMD EPYC", "cpu_isa": "AVX2"}) == "AMD EPYC, AVX2"
    assert processor_label({"cpu": "AMD EPYC"}) == "AMD EPYC"  # a report written before the field existed
    assert processor_label({"cpu": "AMD EPYC", "cpu_isa": "AVX2", "gpu": "NVIDIA H200"}) == "NVIDIA H200"
