"""`openjamba bench-serve --url`: the streams phase over HTTP against a live `openjamba` app (tiny model)."""

from __future__ import annotations

import json

import pytest

from openjamba.bench.http_serve import HttpBenchError, format_http_report, run_http_bench
from openjamba.cli import main

from .serve_helpers import free_port, tiny_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with tiny_server(tmp_path_factory.mktemp("http-bench") / "tiny-jamba") as (url, _, _):
        yield url + "/v1"


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_streams_over_http(server, endpoint):
    report = run_http_bench(server, endpoint=endpoint, streams=(1, 2), prefix=12, suffix=4, output=6, seed=3)
    assert report["model"] == "tiny-jamba"  # the first of GET /v1/models
    rows = report["streams"]
    assert [r["streams"] for r in rows] == [1, 2]
    for row in rows:
        # ignore_eos honoured: every stream made all its tokens, as usage says; a chunk carries one token or, where
        # a token ends inside a UTF-8 character (random byte-level tokens), the text waits for the next one
        assert row["completion_tokens"] == 6 * row["streams"]
        assert row["streams"] <= row["chunks"] <= row["completion_tokens"]
        assert row["min_completion_tokens"] == 6 and row["usage_reported"]
        assert row["ttft_p50_ms"] > 0 and row["output_tok_s"] > 0 and row["itl_p50_ms"] > 0
        assert row["prompt_tokens"] >= row["streams"] * 16  # 16 words: at least a token each
    assert set(rows[0]) >= {"streams", "reuse", "output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
                            "itl_p99_ms", "cached_tokens"}  # the in-process rows' fields: --plot draws both
    assert json.loads(json.dumps(report)) == report
    table = format_http_report(report)
    assert "over HTTP: tiny-jamba" in table and len(table.splitlines()) >= 7


def test_same_seed_same_prompts(server):
    a = run_http_bench(server, streams=(1,), prefix=8, suffix=3, output=2, seed=5)
    b = run_http_bench(server, streams=(1,), prefix=8, suffix=3, output=2, seed=5)
    assert a["streams"][0]["prompt_tokens"] == b["streams"][0]["prompt_tokens"]
    assert "whole prompts cached" in format_http_report(b)  # the server stored them the first time


def test_chat_second_turn_over_http(server):
    report = run_http_bench(server, phases=("chat",), history=60, new=4, seed=1)
    c = report["chat"]
    assert "streams" not in report and json.loads(json.dumps(report)) == report
    assert c["second_prompt_tokens"] > c["first_prompt_tokens"] >= 60
    assert c["second_cached_tokens"] >= c["first_prompt_tokens"] // 2  # openjamba resumed from turn one's state
    assert c["first_ttft_ms"] > 0 and c["second_ttft_ms"] > 0
    assert "chat second turn after a 60-word first turn" in format_http_report(report)


def test_bad_model_and_unreachable_url_are_one_clear_error(server):
    with pytest.raises(HttpBenchError, match="HTTP 404.*no-such-model|no-such-model.*HTTP 404|HTTP 4"):
        run_http_bench(server, model="no-such-model", streams=(1,), prefix=4, suffix=2, output=2)
    with pytest.raises(HttpBenchError, match="cannot reach"):
        run_http_bench(f"http://127.0.0.1:{free_port()}/v1", streams=(1,), prefix=4, suffix=2, output=2)


def test_cli_over_http_with_plot(server, tmp_path, capsys):
    main(["bench-serve", "--url", server, "--streams", "1,2", "--prefix-tokens", "8", "--suffix-tokens", "2",
          "--output-tokens", "3", "--plot", str(tmp_path / "http.png")])
    out = capsys.readouterr().out.splitlines()
    assert json.loads(out[-1])["streams"][1]["completion_tokens"] == 6
    assert (tmp_path / "http.png").stat().st_size > 0


@pytest.mark.parametrize("argv, message, code", [
    (["--streams", "1"], "cannot reach", 1),  # a failure, not a bad command line
    (["--phases", "streams,interference"], "the streams and chat phases run", 2),
    (["--preset", "tiny"], "--preset is for the in-process mode", 2),
])
def test_cli_errors_are_one_line(argv, message, code, capsys):
    """One `openjamba bench-serve: error:` line; flags that do not go together exit 2, as argparse's errors do."""
    with pytest.raises(SystemExit) as err:
        main(["bench-serve", "--url", f"http://127.0.0.1:{free_port()}/v1", *argv])
    if code == 1:  # SystemExit with the message: exit status 1
        assert isinstance(err.value.code, str)
        said = err.value.code
    else:
        assert err.value.code == 2
        said = capsys.readouterr().err
    assert message in said and said.startswith("openjamba bench-serve: error:") and said.count("\n") <= 1


@pytest.mark.parametrize("argv, message", [
    (["--phases", "streams"], "one of --preset, --model or --url is required"),
    (["--preset", "tiny", "--phases", "streams,warp"], "--phases: unknown phase(s) warp; choose from"),
])
def test_cli_usage_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        main(["bench-serve", *argv])
    said = capsys.readouterr().err
    assert err.value.code == 2 and said.startswith(f"openjamba bench-serve: error: {message}") and said.count("\n") == 1
