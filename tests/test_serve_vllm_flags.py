"""vLLM's serve flags (serve/vllm_flags.py): a `vllm serve` command line runs under `openjamba serve`, each flag
doing what it says or refused with one line (exit 2) before the model loads."""

from __future__ import annotations

import signal

import httpx
import pytest
import torch

from openjamba.cli import build_parser

from .serve_helpers import build_checkpoint, serve_process

REASONING_3B = ["--mamba-ssm-cache-dtype", "float32", "--reasoning-parser", "deepseek_r1", "--enable-auto-tool-choice",
                "--tool-call-parser", "hermes", "--max-model-len", "1024", "--gpu-memory-utilization", "0.9",
                "--max-num-batched-tokens", "64", "--enable-prefix-caching", "--seed", "0", "--trust-remote-code"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("vllm") / "tiny-jamba")  # ChatML, Hermes tool calls, <think>


def parse(*argv: str):
    return build_parser().parse_args(["serve", "--model", "m", *argv])


def test_the_reasoning_3b_flags_parse_to_their_meanings():
    args = parse(*REASONING_3B, "--tensor-parallel-size", "1")
    assert (args.tool_call_parser, args.reasoning_parser, args.enable_auto_tool_choice) == ("hermes", "deepseek_r1",
                                                                                            True)
    assert (args.max_context, args.gpu_memory_utilization, args.max_num_batched_tokens) == (1024, 0.9, 64)
    assert args.seed == 0 and not args.no_reuse and args.prefill_chunk is None
    assert parse("--no-enable-prefix-caching").no_reuse
    assert parse("--mamba-ssm-cache-dtype", "auto").mamba_ssm_cache_dtype == "auto"


@pytest.mark.parametrize("argv, says", [
    (["--tool-call-parser", "llama3_json"], "hermes (<tool_call>) and jamba (<tool_calls>) formats only"),
    (["--reasoning-parser", "granite"], "<think></think>"),
    (["--mamba-ssm-cache-dtype", "bfloat16"], "always float32"),
    (["--tensor-parallel-size", "2"], "one device"),
    (["--quantization", "experts_int8"], "--quantize int8"),
    (["--gpu-memory-utilization", "1.5"], "(0, 1]"),
])
def test_a_value_openjamba_cannot_honour_is_one_line(argv, says, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(*argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and says in err and err.count("\n") == 1, err


def test_gpu_memory_utilization_is_the_share_of_free_cuda_memory(monkeypatch, capsys):
    from openjamba.serve.kv_budget import default_kv_cache_bytes
    from openjamba.serve.vllm_flags import check_before_loading

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20 * 2**30, 80 * 2**30))
    assert default_kv_cache_bytes("cuda", 2**30, 0.5) == 10 * 2**30 - 2**30
    assert default_kv_cache_bytes("cuda", 2**30) == int(0.8 * 20 * 2**30) - 2**30
    assert default_kv_cache_bytes("cpu", 0, 0.9) is None
    check_before_loading(parse("--gpu-memory-utilization", "0.9"))  # with auto: fine
    with pytest.raises(SystemExit) as exit_:  # a fixed bound leaves it nothing to do: refused, not ignored
        check_before_loading(parse("--gpu-memory-utilization", "0.9", "--kv-cache-memory", "1GB"))
    assert exit_.value.code == 2 and "no effect with --kv-cache-memory" in capsys.readouterr().err
    check_before_loading(parse("--max-num-batched-tokens", "8", "--max-running", "8"))
    with pytest.raises(SystemExit) as exit_:  # fewer tokens a step than decoding rows: refused, as at vLLM
        check_before_loading(parse("--max-num-batched-tokens", "4", "--max-running", "8"))
    assert exit_.value.code == 2 and "must be at least --max-running (8)" in capsys.readouterr().err


def test_max_num_batched_tokens_is_the_engines_step_budget(checkpoint):
    from openjamba.serve.server import load

    for argv, budget, chunk in ((["--max-num-batched-tokens", "64"], 64, 64),
                                (["--max-num-batched-tokens", "64", "--prefill-chunk", "16"], 64, 16),
                                ([], 512, 512)):
        args = build_parser().parse_args(["serve", "--model", str(checkpoint), "--device", "cpu", *argv])
        _, _, engine = load(args)
        assert (engine.step_token_budget, engine.prefill_chunk) == (budget, chunk)
        assert engine.prefill_tokens(8) == min(chunk, budget - 8)


def test_parser_names_are_checked_against_the_chat_template(checkpoint, tmp_path, capsys):
    from openjamba.serve.vllm_flags import check_chat_format
    from openjamba.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(checkpoint)
    assert check_chat_format(parse(), tokenizer) is None
    note = check_chat_format(parse("--tool-call-parser", "hermes", "--reasoning-parser", "deepseek_r1"), tokenizer)
    assert "openjamba reads the tool-call format (hermes) and reasoning (<think>) from the chat template" in note
    with pytest.raises(SystemExit) as exit_:
        check_chat_format(parse("--tool-call-parser", "jamba"), tokenizer)
    assert exit_.value.code == 2 and "writes the hermes format" in capsys.readouterr().err
    plain = load_tokenizer(build_checkpoint(tmp_path / "plain", chat_template="{{ messages[0].content }}"))
    for argv, says in ((["--reasoning-parser", "deepseek_r1"], "no <think> reasoning"),
                       (["--enable-auto-tool-choice"], "no tool-call format")):
        with pytest.raises(SystemExit):
            check_chat_format(parse(*argv), plain)
        assert says in capsys.readouterr().err


def test_seed_makes_unseeded_requests_repeat_on_a_fresh_server():
    import random

    from openjamba.serve.sampling import RowSampling, SamplingParams

    def first_draws(seeds) -> list[float]:
        return [RowSampling.start(SamplingParams(temperature=1.0), [1], 10, seeds=seeds).generator.initial_seed()
                for _ in range(3)]

    once = first_draws(random.Random(0))
    assert first_draws(random.Random(0)) == once and len(set(once)) == 3  # one stream, a seed per request
    assert first_draws(None) != once  # without --seed: at random
    seeded = SamplingParams(temperature=1.0, seed=7)
    assert RowSampling.start(seeded, [1], 10, seeds=random.Random(0)).generator.initial_seed() == 7


def test_serve_seed_reaches_the_engine(monkeypatch):
    """`serve --seed S` loads the engine with its seed stream (Engine(seed=S)); without it, none."""
    from openjamba.serve import server

    seen = []

    def load(args, **engine_kwargs):
        seen.append(engine_kwargs["seed"])
        raise SystemExit(0)

    monkeypatch.setattr(server, "load", load)
    for argv, want in ((["--seed", "5"], 5), ([], None)):
        with pytest.raises(SystemExit):
            server.serve(parse("--port", "0", *argv))
        assert seen[-1] == want


def test_the_reasoning_3b_command_line_serves(checkpoint):
    proc, port = serve_process(checkpoint, *REASONING_3B)
    try:
        assert proc.poll() is None
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60, json={
            "model": "tiny-jamba", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3})
        assert reply.status_code == 200 and reply.json()["choices"], reply.text
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in out, out
    assert "openjamba reads the tool-call format (hermes) and reasoning (<think>) from the chat template" in out
    assert "--gpu-memory-utilization has no effect on cpu" in out


def test_a_mismatched_parser_is_refused_before_the_model_loads(checkpoint):
    proc, _ = serve_process(checkpoint, "--tool-call-parser", "jamba")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and out.count("\n") == 1, out
    assert "--tool-call-parser jamba: the chat template of this checkpoint writes the hermes format" in out


def test_serve_takes_the_model_as_vllm_serve_does(capsys):
    """`vllm serve MODEL ...` runs as `openjamba serve MODEL ...`: the positional is --model; neither, or both
    naming different checkpoints, is one line and exit 2."""
    from openjamba.serve.vllm_flags import check_before_loading

    args = build_parser().parse_args(["serve", "ai21labs/AI21-Jamba-Reasoning-3B", "--seed", "0"])
    assert args.model == "ai21labs/AI21-Jamba-Reasoning-3B" and args.seed == 0
    check_before_loading(args)
    check_before_loading(build_parser().parse_args(["serve", "m", "--model", "m"]))
    for argv, says in ((["serve"], "required: MODEL or --model"), (["serve", "m", "--model", "n"], "different"),
                       (["serve", "--model", "n", "m"], "different")):
        with pytest.raises(SystemExit) as exit_:
            check_before_loading(build_parser().parse_args(argv))
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and says in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit):  # run-batch, as vLLM's, names it with --model only
        build_parser().parse_args(["run-batch", "-i", "in.jsonl", "-o", "out.jsonl", "m"])
