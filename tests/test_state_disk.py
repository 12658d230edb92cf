"""The state store's disk tier (`--state-dir`): a restarted engine resumes a conversation from its files."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from openjamba.serve.engine import Engine
from openjamba.serve.state_disk import DiskTier

from .conftest import random_model
from .test_engine import GREEDY, prompts_of, run


@pytest.fixture(scope="module")
def model():
    return random_model()


def engine_on(model, directory, **disk) -> Engine:
    engine = Engine(model, prefill_chunk=8)
    engine.store.attach(DiskTier(directory, disk.pop("max_bytes", 1 << 30), model, min_tokens=1, **disk))
    return engine


def test_a_new_engine_on_the_same_directory_resumes_the_conversation(model, tmp_path):
    system, user1, user2 = prompts_of([30, 7, 9], model.config.vocab_size, seed=4)
    with engine_on(model, tmp_path) as engine:
        (out1,), _ = run(engine, [system + user1], GREEDY)
    assert engine.store.disk.written == 1 and len(list(tmp_path.glob("*.safetensors"))) == 1
    turn2 = system + user1 + out1 + user2
    with engine_on(model, tmp_path) as restarted:  # a restart: memory is empty, the files remain
        assert len(restarted.store) == 0 and len(restarted.store.disk) == 1
        (out2,), (fin2,) = run(restarted, [turn2], GREEDY)
        assert restarted.store.disk.loaded == 1
    assert fin2.cached_tokens == len(system + user1) + len(out1) - 1  # all of turn 1 but its last token
    with Engine(model, prefill_chunk=8, reuse=False) as plain:
        (want1,), _ = run(plain, [system + user1], GREEDY)
        (want2,), _ = run(plain, [turn2], GREEDY)
    assert (out1, out2) == (want1, want2)


def test_files_of_another_model_or_tokenizer_are_ignored(model, tmp_path, caplog):
    prompt = prompts_of([12], model.config.vocab_size, seed=1)[0]
    with engine_on(model, tmp_path) as engine:
        run(engine, [prompt], GREEDY)
    other = random_model("dense-mha-biases-tied")
    with caplog.at_level(logging.WARNING):
        assert len(DiskTier(tmp_path, 1 << 30, other)) == 0
        assert len(DiskTier(tmp_path, 1 << 30, model, fingerprint_extra="another tokenizer")) == 0
    assert "another model config" in caplog.text
    tier = DiskTier(tmp_path, 1 << 30, model)
    assert len(tier) == 1  # still there for its own model
    tier.close()


def test_the_bound_deletes_the_least_recently_used_files(model, tmp_path):
    prompts = prompts_of([10, 11, 12, 13], model.config.vocab_size, seed=2)
    with engine_on(model, tmp_path) as engine:
        run(engine, [prompts[0]], GREEDY)
        engine.store.disk.flush()
        size = engine.store.disk.nbytes
    with engine_on(model, tmp_path, max_bytes=int(size * 2.5)) as engine:
        for prompt in prompts[1:]:
            run(engine, [prompt], GREEDY)
            engine.store.disk.flush()
        disk = engine.store.disk
        assert len(disk) == 2 and disk.nbytes <= disk.max_bytes
        kept = {len(key) for key in disk._files}
    assert kept == {12 + 7, 13 + 7}  # the two newest outputs (prompt + output but its last token)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_partial_and_truncated_files_are_ignored(model, tmp_path):
    prompts = prompts_of([10, 11], model.config.vocab_size, seed=3)
    with engine_on(model, tmp_path) as engine:
        run(engine, prompts, GREEDY)
    good, other = sorted(tmp_path.glob("*.safetensors"))
    other.write_bytes(other.read_bytes()[:-100])  # a torn file (as a write without the rename would leave)
    (tmp_path / "x.safetensors.partial").write_bytes(good.read_bytes()[:50])
    tier = DiskTier(tmp_path, 1 << 30, model)
    assert len(tier) == 1 and not list(tmp_path.glob("*.partial"))
    tier.close()


def test_a_slow_disk_never_delays_the_engine_and_stop_flushes(model, tmp_path):
    """The writer blocks until released: the engine serves every request meanwhile (a full queue drops writes), and
    stop waits for the writes already queued."""
    release, started = threading.Event(), threading.Event()

    def slow_write(path, tensors, meta):
        started.set()
        release.wait(10)
        from safetensors.torch import save_file
        save_file(tensors, str(path), metadata=meta)

    prompts = prompts_of([10, 11, 12, 13], model.config.vocab_size, seed=5)
    engine = engine_on(model, tmp_path, writer=slow_write, queue_size=1)
    with engine:
        begin = time.monotonic()
        run(engine, [prompts[0]], GREEDY)
        assert started.wait(5)  # the writer holds the first state
        for prompt in prompts[1:]:
            run(engine, [prompt], GREEDY)
        served = time.monotonic() - begin
        assert not list(tmp_path.glob("*.safetensors"))
        disk = engine.store.disk
        assert disk.dropped == 2  # one in the writer, one queued, the others dropped
        release.set()
    assert served < 5  # not waiting for the writer (which waits up to 10 s)
    assert disk.written == 2 and len(list(tmp_path.glob("*.safetensors"))) == 2


def test_the_longest_prefix_among_memory_and_disk_wins(model, tmp_path):
    system, user1, user2 = prompts_of([20, 6, 6], model.config.vocab_size, seed=6)
    with engine_on(model, tmp_path) as engine:
        (out1,), _ = run(engine, [system + user1], GREEDY)
    turn1 = system + user1 + out1[:-1]  # what the file covers
    with Engine(model) as memory_only:
        run(memory_only, [system], GREEDY)
        short = memory_only.export_state(system)  # a shorter prefix than the file's
    with engine_on(model, tmp_path) as restarted:
        store = restarted.store
        restarted.import_state(system, short)
        assert store.disk.loaded == 0
        assert store.lookup(system + user2).length == len(system)  # the file does not extend this one
        found = store.lookup(turn1 + user2)
        assert found.length == len(turn1) and store.disk.loaded == 1  # the file's state is longer: loaded
        assert store.get(turn1) is found.state  # and kept in memory: the next lookup needs no disk
        assert store.lookup(turn1 + user2).state is found.state and store.disk.loaded == 1


def test_serve_flags_attach_the_disk_tier(tmp_path):
    from openjamba.cli import build_parser
    from openjamba.serve.server import load

    from .serve_helpers import build_checkpoint

    checkpoint = build_checkpoint(tmp_path / "tiny-jamba")
    args = build_parser().parse_args(["serve", "--model", str(checkpoint), "--threads", "1",
                                      "--state-dir", str(tmp_path / "states"), "--state-dir-size", "0.5"])
    _, _, engine = load(args)
    assert engine.store.disk is not None and engine.store.disk.max_bytes == 2**29
    engine.stop()
    args = build_parser().parse_args(["serve", "--model", str(checkpoint), "--threads", "1"])
    assert load(args)[2].store.disk is None
