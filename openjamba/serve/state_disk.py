"""The state store's disk tier (`--state-dir`): conversation states that survive a restart.

Which states: the engine persists the state at the end of each finished output (`StateStore.put(persist=True)`),
the one a chat's next turn extends, and only when it covers at least `min_tokens` tokens: a short prefix is
re-read in well under a second, while a prompt's own state and its intermediate boundaries are superseded by the
output's end state within the same request (writing them too would double the disk traffic for no restart gain).

Each state is one safetensors file (never pickle): the tensors of `RowState.to_dict`, and in the JSON metadata the
token ids and a fingerprint of the model config, so a directory written for another model is ignored (with a
warning), never loaded. Files are written whole as NAME.partial and renamed, so a crash leaves no torn
.safetensors file; leftover .partial files are ignored and deleted on start, and a file that does not parse is
skipped. The oldest files (by last use) are deleted beyond the byte bound.

The engine never waits on the disk: `offer` puts the state on a bounded queue (a full queue drops the write, counted
in `dropped`) and a writer thread serialises it. On start only the files' headers are read (the index: token
sequence -> file), in a `SortedKeys` like the memory store's, so a lookup costs a few binary searches with thousands
of files. A hit (a longer prefix than memory has) reads that one file in the engine's thread: a read of the state's
bytes in place of a prefill of its tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.torch import save_file

from ..cache import RowState
from .state_store import SortedKeys

log = logging.getLogger(__name__)

META_KEY = "openjamba_state"
SUFFIX = ".safetensors"


def fingerprint(config_dict: dict, extra: str = "") -> str:
    """A short hash of the model config (and e.g. the tokenizer's identity): states are exact only for these."""
    text = json.dumps(config_dict, sort_keys=True, default=str) + "\0" + extra
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tokenizer_identity(checkpoint: Path) -> str:
    """A hash of the checkpoint's tokenizer files: the same config with another tokenizer gives other token ids."""
    digest = hashlib.sha256()
    for path in sorted(Path(checkpoint).glob("tokenizer*")) + sorted(Path(checkpoint).glob("*.model")):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


class DiskTier:
    def __init__(self, directory: Path | str, max_bytes: int, model, *, min_tokens: int = 256, queue_size: int = 8,
                 fingerprint_extra: str = "", writer=None) -> None:
        """`writer(path, tensors, metadata)`: how a file is written (default safetensors' save_file; tests slow it)."""
        if max_bytes < 0:
            raise ValueError(f"--state-dir-size must be >= 0, got {max_bytes} bytes")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.model = model
        self.min_tokens = min_tokens
        self.fingerprint = fingerprint(model.config.to_dict(), fingerprint_extra)
        self.written = self.dropped = self.loaded = 0
        self._write = writer or (lambda path, tensors, meta: save_file(tensors, str(path), metadata=meta))
        self._files: OrderedDict[tuple[int, ...], tuple[Path, int]] = OrderedDict()  # oldest use first
        self._keys = SortedKeys()
        self._bytes = 0
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._scan()
        self._thread = threading.Thread(target=self._writer, name="openjamba-state-writer", daemon=True)
        self._thread.start()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._files)

    # ------------------------------------------------------------------ the index
    def _scan(self) -> None:
        """Index the directory's files (headers only), oldest use first; skip foreign, damaged and partial ones."""
        foreign = damaged = 0
        for partial in self.directory.glob("*.partial"):
            partial.unlink(missing_ok=True)  # a write a crash interrupted
        found = []
        for path in self.directory.glob("*" + SUFFIX):
            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = json.loads((f.metadata() or {})[META_KEY])
                stat = path.stat()
            except Exception:  # noqa: BLE001 - a truncated or foreign file: never loaded
                damaged += 1
                continue
            if meta.get("fingerprint") != self.fingerprint:
                foreign += 1
                continue
            found.append((stat.st_mtime, tuple(int(t) for t in meta["tokens"]), path, stat.st_size))
        for _, key, path, size in sorted(found, key=lambda f: f[0]):
            self._index(key, path, size)
        if foreign:
            log.warning("%s: ignoring %d state files of another model config or tokenizer", self.directory, foreign)
        if damaged:
            log.warning("%s: ignoring %d state files that do not parse (truncated?)", self.directory, damaged)
        self._evict()

    def _index(self, key: tuple[int, ...], path: Path, size: int) -> None:
        with self._lock:
            self._unindex(key)
            self._files[key] = (path, size)
            self._keys.add(key)
            self._bytes += size

    def _unindex(self, key: tuple[int, ...]) -> Path | None:
        entry = self._files.pop(key, None)
        if entry is None:
            return None
        self._keys.remove(key)
        self._bytes -= entry[1]
        return entry[0]

    def _evict(self) -> None:
        """Delete the least recently used files beyond the byte bound."""
        while True:
            with self._lock:
                if self._bytes <= self.max_bytes or not self._files:
                    return
                path = self._unindex(next(iter(self._files)))
            path.unlink(missing_ok=True)

    def lookup(self, key: tuple[int, ...], query: np.ndarray) -> tuple[tuple[int, ...] | None, int]:
        """(the longest indexed prefix of the query, the longest common prefix with any indexed sequence)."""
        with self._lock:
            return self._keys.longest_prefix(key, query, lambda k: True), self._keys.shared(key, query)

    def load(self, key: tuple[int, ...]) -> RowState | None:
        """The state stored for `key` (None, and dropped from the index, if its file is gone or does not fit)."""
        with self._lock:
            entry = self._files.get(key)
            if entry is None:
                return None
            self._files.move_to_end(key)
        path = entry[0]
        try:
            tensors = {}
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    tensors[name] = f.get_tensor(name)
            state = RowState.from_dict(tensors, self.model)
            if state.length != len(key) or state.logits is None:
                raise ValueError(f"covers {state.length} tokens, not {len(key)}")
            os.utime(path)  # recently used: the last to be evicted, also after a restart
        except Exception as err:  # noqa: BLE001 - the request prefills instead
            log.warning("cannot load the state file %s (%s): ignoring it", path, err)
            with self._lock:
                self._unindex(key)
            return None
        self.loaded += 1
        return state

    # ------------------------------------------------------------------ writing
    def offer(self, key: tuple[int, ...], state: RowState) -> None:
        """Queue `state` for writing unless it is short or already on disk; never blocks (a full queue drops it)."""
        if len(key) < self.min_tokens or state.logits is None or key in self._files:
            return
        try:
            self._queue.put_nowait((key, state))
        except queue.Full:
            self.dropped += 1

    def _writer(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._save(*item)
            except Exception as err:  # noqa: BLE001 - a full disk must not stop the writer or the engine
                log.warning("cannot write a state to %s: %s", self.directory, err)
            finally:
                self._queue.task_done()

    def _save(self, key: tuple[int, ...], state: RowState) -> None:
        name = hashlib.sha256(np.asarray(key, dtype=np.int64).tobytes()).hexdigest()[:32] + SUFFIX
        path = self.directory / name
        partial = path.with_name(name + ".partial")
        meta = {META_KEY: json.dumps({"fingerprint": self.fingerprint, "tokens": list(key)})}
        self._write(partial, state.to_dict(), meta)
        os.replace(partial, path)  # whole or absent: a crash leaves at most a .partial
        self._index(key, path, path.stat().st_size)
        self.written += 1
        self._evict()

    def flush(self) -> None:
        """Wait until every queued state is written (tests; `close` does this too)."""
        self._queue.join()

    def close(self) -> None:
        """Write what is queued, then stop the writer."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
