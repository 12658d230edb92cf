"""Data preparation (tokenizer, memory-mapped token shards) and the resumable batch sampler.

A prepared data directory holds:
  tokenizer.json        a byte-level BPE trained on the corpus, or the tokenizer given with --tokenizer
  meta.json             dtype, vocabulary size, special ids, token counts and shard files per split, skipped inputs
  train-00000.bin ...   raw token ids (uint16 when the vocabulary fits, else uint32): each document as
  val-00000.bin ...     BOS, its tokens, EOS (without the one the tokenizer lacks), one after another

Every document starts with BOS, as in Jamba's own pretraining data and as its tokenizer encodes any text: so the
model learns to start a document after BOS, `eval` scores each document after BOS, and a prompt encoded by the
tokenizer (which adds BOS, as transformers' does) starts where training documents start.

Shards are read with np.memmap, so a corpus larger than memory trains without loading it. Whole documents go to
the validation split with probability `val_fraction`, drawn from a fixed seed in corpus order, so the split is
reproducible and unbiased by document size; a corpus too small to give validation any document gives it the
tail of its tokens instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from ..corpus import (  # noqa: F401 - the corpus reader lives in corpus.py; these names are part of this API
    SKIPPED_DIRS,
    CorpusStats,
    DataError,
    collect_files,
    default_corpus,
    iter_files,
    read_documents,
)
from ..files import building_dir
from ..tokenizer import Tokenizer as TextTokenizer
from ..tokenizer import load_tokenizer

FORMAT = "openjamba-tokens-v1"
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>"]  # ids 0, 1, 2: JambaConfig's default pad/bos/eos ids
# Names released tokenizers use for their special tokens (Jamba's are <|pad|>, <|startoftext|>, <|endoftext|>).
SPECIAL_NAMES = {
    "pad_id": ["<pad>", "<|pad|>", "[PAD]"],
    "bos_id": ["<bos>", "<|startoftext|>", "<s>", "<|begin_of_text|>"],
    "eos_id": ["<eos>", "<|endoftext|>", "</s>", "<|end_of_text|>"],
}
SHARD_TOKENS = 1 << 28  # tokens per shard file (512 MiB as uint16)
# ---------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: Iterator[str], vocab_size: int, progress: bool = False) -> Tokenizer:
    """A byte-level BPE (GPT-2 style: any text round-trips, no unknown tokens) with <pad>, <bos>, <eos> at 0-2."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise DataError(f"--vocab-size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens), "
                        f"got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  show_progress=progress and sys.stderr.isatty(),  # else it prints blank lines
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    # Like Jamba's released tokenizer, encoding a text starts it with BOS (transformers' AutoTokenizer does the same
    # from this tokenizer.json): prompts then begin as training documents do.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", SPECIAL_TOKENS.index("<bos>"))])
    return tokenizer


def wrap_trained_tokenizer(backend: Tokenizer) -> TextTokenizer:
    """A trained tokenizer with the tokenizer_config.json transformers reads its special tokens from."""
    names = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>"}
    config = {**names, "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30,
              "clean_up_tokenization_spaces": False}
    files = {"tokenizer.json": backend.to_str().encode(),
             "tokenizer_config.json": (json.dumps(config, indent=2) + "\n").encode()}
    return TextTokenizer.from_backend(backend, special_tokens=names, eos_token_ids=[backend.token_to_id("<eos>")],
                                      files=files)


def special_ids(tokenizer: TextTokenizer) -> dict[str, int | None]:
    """pad/bos/eos ids of a tokenizer: its own when its config names them, else found by the names released
    tokenizers use (None when absent)."""
    found: dict[str, int | None] = {}
    for key, names in SPECIAL_NAMES.items():
        own = getattr(tokenizer, key.replace("_id", "_token_id"))
        by_name = (tokenizer.token_to_id(n) for n in names if tokenizer.token_to_id(n) is not None)
        found[key] = own if own is not None else next(by_name, None)
    return found


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# ---------------------------------------------------------------------- shards
class ShardWriter:
    """Appends token arrays to `{split}-00000.bin`, `{split}-00001.bin`, ..., starting a new file every `limit`."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, limit: int = SHARD_TOKENS) -> None:
        self.directory, self.split, self.dtype, self.limit = directory, split, dtype, limit
        self.shards: list[dict] = []
        self.tokens = 0
        self.documents = 0

    def write(self, ids: np.ndarray) -> None:
        self.documents += 1
        while len(ids):
            if not self.shards or self.shards[-1]["tokens"] >= self.limit:
                self.shards.append({"file": f"{self.split}-{len(self.shards):05d}.bin", "tokens": 0})
            shard = self.shards[-1]
            part, ids = ids[: self.limit - shard["tokens"]], ids[self.limit - shard["tokens"]:]
            with open(self.directory / shard["file"], "ab") as f:
                f.write(part.astype(self.dtype).tobytes())
            shard["tokens"] += len(part)
            self.tokens += len(part)

    def take_tail(self, count: int) -> np.ndarray:
        """Remove the last `count` tokens (of the last shard at most) and return them."""
        shard = self.shards[-1]
        count = min(count, shard["tokens"])
        file = self.directory / shard["file"]
        tail = np.fromfile(file, dtype=self.dtype)[shard["tokens"] - count:].copy()
        os.truncate(file, (shard["tokens"] - count) * self.dtype.itemsize)
        shard["tokens"] -= count
        self.tokens -= count
        return tail

    def summary(self) -> dict:
        return {"tokens": self.tokens, "documents": self.documents, "shards": self.shards}


def prepare(
    paths: list[str | Path] | None,
    out: str | Path,
    vocab_size: int = 4096,
    tokenizer_file: str | Path | None = None,
    val_fraction: float = 0.05,
    text_key: str = "text",
    shard_tokens: int = SHARD_TOKENS,
    progress: bool = True,
) -> dict:
    """Tokenize files, directories and JSONL (default: the standard library) into `out`; returns meta.json's dict.

    The directory is written beside `out` and moved into place when complete, so an interrupted run never leaves
    a half-written dataset behind a valid-looking meta.json.
    """
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    out = Path(out)
    sources = [str(p) for p in paths] if paths else ["<python standard library>"]
    _check_replaceable(out)
    files = collect_files(paths) if paths else default_corpus()
    if tokenizer_file is not None:
        tokenizer = load_tokenizer(tokenizer_file)
    else:
        tokenizer = wrap_trained_tokenizer(
            train_tokenizer(read_documents(files, CorpusStats(), text_key), vocab_size, progress))
    with building_dir(out) as tmp:
        meta = _write_shards(files, tokenizer, tmp, val_fraction, text_key, shard_tokens, progress)
        meta["sources"] = sources
        saved = tokenizer.save_pretrained(tmp)
        meta["tokenizer"] = "tokenizer.json" if "tokenizer.json" in saved else "tokenizer.model"
        meta["fingerprint"] = _fingerprint(tmp / meta["tokenizer"], meta)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _write_shards(files, tokenizer, directory: Path, val_fraction, text_key, shard_tokens, progress) -> dict:
    vocab = tokenizer.vocab_size
    ids = special_ids(tokenizer)
    bos, eos = [[ids[k]] if ids[k] is not None else [] for k in ("bos_id", "eos_id")]
    dtype = token_dtype(vocab)
    stats = CorpusStats()
    writers = {split: ShardWriter(directory, split, dtype, shard_tokens) for split in ("train", "val")}
    max_id = -1
    splitter = np.random.default_rng(0)
    # Small batches keep the progress bar (bytes read) close to the bytes actually tokenized.
    for batch in _batches(read_documents(files, stats, text_key, progress), 64):
        for encoded in tokenizer.encode_batch(batch, add_special_tokens=False):
            doc = np.asarray(bos + encoded + eos, np.int64)
            if len(doc) == 0:
                continue
            max_id = max(max_id, int(doc.max()))
            if max_id >= vocab:
                raise DataError(f"the tokenizer produced token id {max_id}, beyond its vocabulary of {vocab}: "
                                "its tokenizer.json is inconsistent")
            writers["val" if splitter.random() < val_fraction else "train"].write(doc)
    if writers["train"].tokens == 0:
        raise DataError(f"the corpus is empty: {len(files)} input files, {stats.files} read as text, "
                        f"{stats.documents} non-empty documents; {stats.skipped_summary()}")
    if writers["val"].tokens == 0 and val_fraction > 0:  # too few documents to route whole ones: take the tail
        writers["val"].write(writers["train"].take_tail(int(val_fraction * writers["train"].tokens)))
    return {
        "format": FORMAT, "dtype": dtype.name, "vocab_size": vocab, "max_token_id": max_id, **ids,
        "document": [name for name, part in (("bos", bos), ("text", [0]), ("eos", eos)) if part],
        "files": stats.files, "documents": stats.documents, "bytes": stats.bytes,
        "skipped": stats.skipped_counts(),
        "skipped_summary": stats.skipped_summary(),
        "splits": {split: writer.summary() for split, writer in writers.items()},
    }


def _batches(items: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _fingerprint(tokenizer_file: Path, meta: dict) -> str:
    """Identifies a prepared dataset (tokenizer and token counts), so a resume can check it trains on the same."""
    digest = hashlib.sha256(tokenizer_file.read_bytes())
    digest.update(json.dumps(meta["splits"], sort_keys=True).encode())
    return digest.hexdigest()[:16]


def _check_replaceable(target: Path) -> None:
    """`--out` may be new, empty or an earlier prepared directory; anything else is the user's and stays."""
    if target.exists() and not target.is_dir():
        raise DataError(f"--out {target} is a file; give a directory path")
    if target.is_dir() and not (target / "meta.json").is_file() and any(target.iterdir()):
        raise DataError(f"{target} exists and is not a prepared data directory; refusing to overwrite it")


# ---------------------------------------------------------------------- reading prepared data
class TokenData:
    """A prepared data directory: its meta.json, tokenizer and memory-mapped shards."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        meta_file = self.directory / "meta.json"
        if not meta_file.is_file():
            raise DataError(f"{self.directory} is not a prepared data directory (no meta.json); "
                            "create one with `openjamba prepare PATHS... --out DIR`")
        try:
            self.meta = json.loads(meta_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{meta_file} is damaged ({err}); prepare the data again") from None
        if self.meta.get("format") != FORMAT:
            raise DataError(f"{meta_file} has format {self.meta.get('format')!r}, expected {FORMAT!r}")
        dtype = np.dtype(self.meta["dtype"])
        self.shards = {
            split: [self._open_shard(s["file"], s["tokens"], dtype) for s in info["shards"] if s["tokens"] > 0]
            for split, info in self.meta["splits"].items()
        }

    def _open_shard(self, name: str, tokens: int, dtype: np.dtype) -> np.memmap:
        file = self.directory / name
        size = file.stat().st_size if file.is_file() else None
        if size != tokens * dtype.itemsize:
            found = "missing" if size is None else f"{size} bytes"
            raise DataError(f"{file} is {found}, meta.json expects {tokens * dtype.itemsize} bytes: the data "
                            "directory is incomplete or damaged; prepare it again")
        return np.memmap(file, dtype=dtype, mode="r", shape=(tokens,))

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    def tokenizer(self) -> TextTokenizer:
        return load_tokenizer(self.directory / self.meta["tokenizer"])

    def check_vocab(self, model_vocab_size: int) -> None:
        """Token ids beyond the model's embedding table would index out of range deep inside the forward."""
        if self.meta["max_token_id"] >= model_vocab_size:
            raise DataError(f"{self.directory} has token ids up to {self.meta['max_token_id']}, beyond the model's "
                            f"vocabulary of {model_vocab_size}: prepare the data with the model's tokenizer "
                            "(--tokenizer) or give the model a larger vocab_size")

    def windows(self, split: str, seq_len: int) -> Windows:
        return Windows(self.shards.get(split, []), seq_len)


class Windows:
    """The non-overlapping `seq_len`-token windows of one split, indexed 0..len-1 across its shards."""

    def __init__(self, shards: list[np.memmap], seq_len: int) -> None:
        self.shards, self.seq_len = shards, seq_len
        self.ends = np.cumsum([len(s) // seq_len for s in shards], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def get(self, indices: np.ndarray) -> torch.Tensor:
        """(len(indices), seq_len) int64 token ids."""
        rows = []
        for index in indices:
            shard = int(np.searchsorted(self.ends, index, side="right"))
            start = (int(index) - (int(self.ends[shard - 1]) if shard else 0)) * self.seq_len
            rows.append(np.asarray(self.shards[shard][start : start + self.seq_len], dtype=np.int64))
        return torch.from_numpy(np.stack(rows))


class BatchSampler:
    """Training sequences as a pure function of (seed, position): no hidden state, so a resume is exact.

    Sequence i of a run is window perm_e[i mod n] of epoch e = i div n, where perm_e is a permutation of the n
    windows seeded by (seed, e): every window once per epoch, in a fresh order each epoch. A checkpoint only needs
    the number of sequences consumed.
    """

    def __init__(self, windows: Windows, seed: int) -> None:
        if len(windows) == 0:
            raise DataError(f"the training split has fewer tokens than one sequence of {windows.seq_len}: "
                            "use a shorter --seq-len or more data")
        self.windows, self.seed = windows, seed
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.windows))
            self._perm_epoch = epoch
        return self._perm

    def get(self, start: int, count: int) -> torch.Tensor:
        """Sequences start .. start + count - 1 as a (count, seq_len) int64 tensor."""
        n = len(self.windows)
        indices = [self._permutation(i // n)[i % n] for i in range(start, start + count)]
        return self.windows.get(np.asarray(indices, dtype=np.int64))


def eval_indices(windows: Windows, count: int) -> np.ndarray:
    """`count` windows spread evenly over the validation split: a fixed, representative evaluation set."""
    n = len(windows)
    if n == 0:
        return np.empty(0, dtype=np.int64)
    return np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(np.int64))
