"""`openjamba run-batch`: OpenAI Batch files through the server's handlers in process, against a live server's bodies
(tiny random model, tokenizer and chat template built here); per-request failures, input errors, resume, Ctrl-C,
stdin and stdout."""

from __future__ import annotations

import io
import json
import math
import shutil
import sys
from pathlib import Path

import httpx
import pytest
import torch

from openjamba.cli import main
from openjamba.serve import batch

from .serve_helpers import tiny_server

VOLATILE = {"id", "created", "created_at"}  # fresh per reply: ids and timestamps


def line(custom_id: str, url: str, body: dict, **fields) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body, **fields}


def chat(text: str, **body) -> dict:
    return {"messages": [{"role": "user", "content": text}], **body}


# Prompts that are no prefix of one another, so that which request's state the store holds first (the order they
# finish in) cannot change another's cached_tokens.
MIXED = [
    line("chat-greedy", "/v1/chat/completions", chat("hello world", max_tokens=8, temperature=0)),
    line("chat-n2", "/v1/chat/completions", chat("Paris is the capital", max_tokens=6, n=2, temperature=0.9,
                                                  seed=7)),
    line("chat-logprobs", "/v1/chat/completions", chat("the quick brown fox", max_tokens=5, temperature=0,
                                                        logprobs=True, top_logprobs=2)),
    line("cmpl-stop", "/v1/completions", {"prompt": "The quick brown", "max_tokens": 12, "temperature": 0,
                                          "stop": ["e", "o"]}),
    line("cmpl-logprobs", "/v1/completions", {"prompt": "weather city temperature", "max_tokens": 6,
                                              "temperature": 0, "logprobs": 2}),
    line("cmpl-two", "/v1/completions", {"prompt": ["user assistant", "think answer"], "max_tokens": 5,
                                         "temperature": 0, "model": "tiny"}),
    line("responses", "/v1/responses", {"input": "question tool", "max_output_tokens": 6, "temperature": 0}),
    line("messages", "/v1/messages", {"model": "tiny", "max_tokens": 6, "temperature": 0,
                                      "messages": [{"role": "user", "content": "lazy dog small test"}]}),
]
FAILING = [
    line("zero-tokens", "/v1/completions", {"prompt": "hello", "max_tokens": 0}),
    line("streamed", "/v1/chat/completions", chat("hello", stream=True)),
    line("other-model", "/v1/chat/completions", chat("hello", model="gpt-4o")),
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(checkpoint directory, the live server's URL): the checkpoint `openjamba serve`'s app serves, named "tiny"."""
    directory = tmp_path_factory.mktemp("batch") / "tiny"
    with tiny_server(directory) as (url, _, _):
        yield directory, url


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def write_input(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def run(model: Path, input_file, output_file, *extra: str) -> int:
    """`openjamba run-batch` in process: its exit status."""
    try:
        main(["run-batch", "--model", str(model), "-i", str(input_file), "-o", str(output_file), "--threads", "1",
              *extra])
    except SystemExit as err:
        return err.code if isinstance(err.code, int) else 1
    return 0


def results(path: Path) -> dict[str, dict]:
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    by_id = {x["custom_id"]: x for x in lines}
    assert len(by_id) == len(lines), "a custom_id written twice"
    return by_id


def stable(value):
    """A body without its ids and timestamps, and with the prompt tokens reused from the state store counted as
    prompt tokens: which requests find a state there (the chat template's opening, stored by the first chat request
    the engine reads) depends on the order the engine reads them in, concurrent here and one at a time there."""
    if isinstance(value, dict):
        value = dict(value)
        if isinstance(usage := value.get("usage"), dict):
            usage = {k: v for k, v in usage.items() if k not in ("prompt_tokens_details", "input_tokens_details")}
            if "cache_read_input_tokens" in usage:  # Anthropic's input_tokens leave the reused ones out
                usage["input_tokens"] += usage.pop("cache_read_input_tokens")
            value["usage"] = usage
        return {k: stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def assert_same(got, want, where: str = "body") -> None:
    """Equal, floats (logprobs) to 1e-4: a batched step rounds differently in the last bits."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), f"{where}: {got} != {want}"
        for key in want:
            assert_same(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: {got} != {want}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert isinstance(got, float) and math.isclose(got, want, abs_tol=1e-4), f"{where}: {got} != {want}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def test_bodies_are_the_servers(served, tmp_path, capsys):
    model, url = served
    out = tmp_path / "out.jsonl"
    assert run(model, write_input(tmp_path / "in.jsonl", MIXED + FAILING), out) == 0
    got = results(out)
    assert set(got) == {x["custom_id"] for x in MIXED + FAILING}
    with httpx.Client(base_url=url, timeout=60) as client:
        for request in MIXED:
            result = got[request["custom_id"]]
            assert result["id"].startswith("batch_req_") and result["error"] is None
            assert result["response"]["status_code"] == 200, result
            want = client.post(request["url"], json=request["body"])
            assert want.status_code == 200
            assert_same(stable(result["response"]["body"]), stable(want.json()), request["custom_id"])
        for request in FAILING[::2]:  # the server's own 400s, word for word
            want = client.post(request["url"], json=request["body"])
            assert want.status_code == 400
            assert got[request["custom_id"]]["response"]["body"] == want.json()
    streamed = got["streamed"]
    assert streamed["error"] is None and streamed["response"]["status_code"] == 400
    assert streamed["response"]["body"]["error"]["message"] == "stream is not supported in a batch"
    assert "8 ok, 3 failed of 11 requests" in capsys.readouterr().err


def test_bodies_are_the_bytes_the_app_sends(served, tmp_path):
    """The body in a result line is the app's response bytes, embedded as they are."""
    model, _ = served
    out = tmp_path / "out.jsonl"
    assert run(model, write_input(tmp_path / "in.jsonl", FAILING[:1]), out) == 0
    text = out.read_text()
    assert text.endswith('"body":{"error":{"message":"max_tokens: must be at least 1","type":"invalid_request_error",'
                         '"param":"max_tokens","code":null}}},"error":null}\n')


@pytest.mark.parametrize("text, message", [
    ('{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}\nnot json\n', "line 2: not JSON"),
    ('[1, 2]\n', "line 1: not a JSON object"),
    ('{"method": "POST", "url": "/v1/completions", "body": {}}\n', "line 1: custom_id (a non-empty string) is missing"),
    ('{"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {}}\n', "line 1: method 'GET'"),
    ('{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {}}\n',
     "line 1: url '/v1/embeddings' is not supported"),
    ('{"custom_id": "a", "method": "POST", "url": "/v1/completions"}\n', "line 1: body (the request"),
    ('{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}\n\n'
     '{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n',
     "line 3: custom_id 'a' repeats line 1"),
])
def test_input_errors_stop_before_the_model_loads(tmp_path, capsys, text, message):
    source = tmp_path / "in.jsonl"
    source.write_text(text)
    out = tmp_path / "out.jsonl"
    assert run(tmp_path / "no-such-model", source, out) == 2  # the model would fail to load: never reached
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"openjamba run-batch: error: {source} {message}"), err
    assert len(err.splitlines()) == 1 and not out.exists()


def test_resume_runs_only_the_missing_and_repairs_a_torn_line(served, tmp_path, capsys):
    model, _ = served
    requests = MIXED[:4] + FAILING[:1]
    source = write_input(tmp_path / "in.jsonl", requests)
    out = tmp_path / "out.jsonl"
    assert run(model, source, out) == 0
    lines = out.read_bytes().splitlines(keepends=True)
    kept = lines[0] + lines[1]
    out.write_bytes(kept + lines[2][:40])  # a crash while the third line was being written
    capsys.readouterr()
    assert run(model, source, out) == 0
    err = capsys.readouterr().err
    assert "resuming: 2 of 5 done" in err and "cut short" in err and "of 3 requests" in err
    assert out.read_bytes().startswith(kept)
    assert set(results(out)) == {x["custom_id"] for x in requests}
    assert run(model, source, out) == 0  # all done: nothing runs, the model is not even loaded
    assert "nothing to run" in capsys.readouterr().err
    assert set(results(out)) == {x["custom_id"] for x in requests}


def test_resume_refuses_another_batchs_output(served, tmp_path, capsys):
    model, _ = served
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"custom_id": "elsewhere", "response": None, "error": None}) + "\n")
    assert run(model, write_input(tmp_path / "in.jsonl", MIXED[:1]), out) == 2
    assert "custom_id 'elsewhere' is not in" in capsys.readouterr().err


def test_ctrl_c_keeps_every_finished_line(served, tmp_path, monkeypatch, capsys):
    """An interrupt after the third result: exit 130, every line written whole (the third, and any request that
    finished while the others were being cancelled); the rerun completes the file."""
    model, _ = served
    source = write_input(tmp_path / "in.jsonl", MIXED)
    out = tmp_path / "out.jsonl"
    add = batch.Tally.add

    def interrupted(self, status, body):
        add(self, status, body)
        if self.ok + self.failed == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(batch.Tally, "add", interrupted)
    assert run(model, source, out) == 130
    kept = len(results(out))
    assert 3 <= kept < len(MIXED) and out.read_bytes().endswith(b"\n")
    assert "openjamba run-batch: interrupted" in capsys.readouterr().err
    monkeypatch.undo()
    assert run(model, source, out) == 0
    assert f"resuming: {kept} of {len(MIXED)} done" in capsys.readouterr().err
    assert set(results(out)) == {x["custom_id"] for x in MIXED}


def test_stdin_and_stdout(served, tmp_path, monkeypatch, capsysbinary):
    model, _ = served
    data = "".join(json.dumps(x) + "\n" for x in MIXED[3:5] + FAILING[:1]).encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    assert run(model, "-", "-") == 0
    captured = capsysbinary.readouterr()
    lines = [json.loads(x) for x in captured.out.splitlines()]
    assert sorted(x["custom_id"] for x in lines) == ["cmpl-logprobs", "cmpl-stop", "zero-tokens"]
    assert b"2 ok, 1 failed of 3 requests" in captured.err


def test_no_template_warning_only_when_a_request_needs_the_template(served, tmp_path, caplog):
    """A checkpoint without a chat template runs a completions batch without a word about templates; a batch with a
    chat request is warned at start, and that request fails with the server's 400."""
    model = tmp_path / "plain"
    shutil.copytree(served[0], model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    assert run(model, write_input(tmp_path / "a.jsonl", MIXED[3:5]), tmp_path / "a.out") == 0
    assert "no chat template" not in caplog.text
    assert run(model, write_input(tmp_path / "b.jsonl", MIXED[:1] + MIXED[3:4]), tmp_path / "b.out") == 0
    assert "has no chat template" in caplog.text
    assert results(tmp_path / "b.out")["chat-greedy"]["response"]["status_code"] == 400


def test_a_closed_pipe_stops_the_run_at_once(served, tmp_path, monkeypatch, capsys):
    """`run-batch -o - | head -1`: the first write that fails stops the run (exit 1, no traceback) rather than
    answering every other request into a closed pipe."""
    model, _ = served
    requests = [line(f"r{i}", "/v1/completions", {"prompt": f"hello {i}", "max_tokens": 2}) for i in range(40)]
    answered = []
    answer = batch.answer

    async def counted(app, request):
        answered.append(request.custom_id)
        return await answer(app, request)

    class ClosedPipe(io.RawIOBase):
        def writable(self):
            return True

        def write(self, data):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            return 1

    monkeypatch.setattr(batch, "answer", counted)
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BufferedWriter(ClosedPipe())))
    monkeypatch.setattr("os.dup2", lambda *_: None)  # main's quiet exit points fd 1 at /dev/null: not pytest's
    assert run(model, write_input(tmp_path / "in.jsonl", requests), "-", "--max-running", "1") == 1
    assert len(answered) <= 4  # the window (2 x --max-running) and the one that found the pipe closed
    assert "Traceback" not in capsys.readouterr().err

def test_an_output_that_is_no_file_is_not_read_for_resume(served, tmp_path):
    """A named pipe (as /dev/stdout, /dev/full: not a file of results) is written, never read: reading it would
    wait for a writer (or, /dev/full, read zeros until memory runs out)."""
    import os
    import threading

    model, _ = served
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    assert run(model, write_input(tmp_path / "in.jsonl", MIXED[3:5]), fifo) == 0
    reader.join(timeout=30)
    assert sorted(json.loads(x)["custom_id"] for x in got[0].splitlines()) == ["cmpl-logprobs", "cmpl-stop"]

def test_an_output_it_cannot_write_stops_before_the_model_loads(tmp_path, capsys):
    source = write_input(tmp_path / "in.jsonl", MIXED[:1])
    for out in (tmp_path / "missing" / "out.jsonl", tmp_path):
        assert run(tmp_path / "no-such-model", source, out) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"openjamba run-batch: error: cannot write {out}: "), err
        assert len(err.splitlines()) == 1



def test_a_warning_every_request_causes_is_shown_once(served, tmp_path, caplog, capsys):
    """The ignored-fields warning of a field every body sets: one line naming the first request, the repeats
    counted in the summary, not a line per request."""
    model, _ = served
    requests = [line(f"r{i}", "/v1/completions", {"prompt": "hello", "max_tokens": 1, "metadata": {"i": i}})
                for i in range(12)]
    assert run(model, write_input(tmp_path / "in.jsonl", requests), tmp_path / "out.jsonl", "--max-running", "1") == 0
    shown = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(shown) == 1 and "{'metadata'} (custom_id 'r" in shown[0], shown
    assert "11 repeated warnings not shown" in capsys.readouterr().err


def test_requests_for_another_model_are_named_before_the_run(served, tmp_path, capsys):
    model, _ = served
    requests = [line(f"r{i}", "/v1/completions", {"prompt": "hello", "max_tokens": 1, "model": name})
                for i, name in enumerate(["gpt-4o-mini", "gpt-4o-mini", "tiny", None])]
    assert run(model, write_input(tmp_path / "in.jsonl", requests), tmp_path / "out.jsonl") == 0
    err = capsys.readouterr().err
    assert "warning: 2 of 4 requests name a model other than 'tiny', which fail with model_not_found: " \
           "'gpt-4o-mini' (2)" in err
    assert err.index("warning: 2 of 4") < err.index("requests to run")  # said before the model loads


def test_the_checked_input_shares_one_url_and_model_pair_among_its_lines():
    """check_input holds a value per line of a file of any size: the pairs are shared, not one per line."""
    requests = [line(f"r{i}", "/v1/completions", {"model": "tiny"}) for i in range(100)]
    known = batch.check_input(io.BytesIO("".join(json.dumps(x) + "\n" for x in requests).encode()), "in")
    assert len(known) == 100 and len({id(pair) for pair in known.values()}) == 1
    assert known["r7"] == ("/v1/completions", "tiny")


def test_ctrl_c_again_while_stopping_still_stops_the_engine(served, tmp_path, monkeypatch, capsys):
    """A second Ctrl-C while the run stops (here: as the engine is told to stop) does not cut that stop short, which
    left the engine's thread computing as Python exited (a C++ abort, exit 134); the summary is still written."""
    import os
    import signal

    from openjamba.serve.engine import Engine

    model, _ = served
    engines = []
    stop, add = Engine.stop, batch.Tally.add

    def interrupted(self, status, body):
        add(self, status, body)
        raise KeyboardInterrupt

    def stop_interrupted(self):
        engines.append(self)
        os.kill(os.getpid(), signal.SIGINT)
        stop(self)

    monkeypatch.setattr(batch.Tally, "add", interrupted)
    monkeypatch.setattr(Engine, "stop", stop_interrupted)
    try:
        assert run(model, write_input(tmp_path / "in.jsonl", MIXED), tmp_path / "out.jsonl") == 130
        assert engines and not engines[0].is_running() and engines[0]._thread is None
        assert "ok, 0 failed of" in capsys.readouterr().err
    finally:
        for engine in engines:
            stop(engine)


def test_vllm_engine_flags_work_as_on_serve(served, tmp_path, capsys):
    """vLLM's run-batch takes its serve flags: an agreeing --tool-call-parser runs, a disagreeing one is refused
    (exit 2, naming run-batch) before the model loads, and --seed makes unseeded sampling repeat."""
    model, _ = served
    sampled = [line(f"s{i}", "/v1/completions", {"prompt": "hello", "max_tokens": 6, "temperature": 1.0})
               for i in range(2)]
    source = write_input(tmp_path / "in.jsonl", sampled)
    texts = []
    for name in ("a", "b"):
        assert run(model, source, tmp_path / f"{name}.out", "--seed", "3", "--tool-call-parser", "hermes",
                   "--max-running", "1") == 0
        by_id = results(tmp_path / f"{name}.out")
        texts.append({custom_id: x["response"]["body"]["choices"][0]["text"] for custom_id, x in by_id.items()})
    assert texts[0] == texts[1]
    capsys.readouterr()
    assert run(model, source, tmp_path / "c.out", "--tool-call-parser", "jamba") == 2
    assert "openjamba run-batch: error: --tool-call-parser jamba" in capsys.readouterr().err
