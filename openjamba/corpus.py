"""The one corpus reader: the files, directories and JSONL that `prepare` tokenizes and `eval` scores.

Both verbs read the same inputs the same way, so a directory scored by `eval` holds exactly the documents
`prepare` would train on:
- a directory is walked recursively in sorted order, every file read, skipping hidden entries and package/cache
  folders (__pycache__, site-packages, node_modules);
- each file is one document, except `.jsonl` files: one document per line, from its `text_key` field;
- what cannot be read (unreadable files, non-UTF-8 files, bad JSONL lines) is skipped and counted in
  `CorpusStats`, never fatal, and the caller reports it; a named path that does not exist is an error.
"""

from __future__ import annotations

import json
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

SKIPPED_DIRS = {"__pycache__", "site-packages", "dist-packages", "node_modules"}
STDLIB_SKIPPED = {"test", "tests", "idle_test", "encodings"}


class DataError(ValueError):
    """Input that cannot be read, prepared or trained on; the message says what is wrong and how to fix it."""


def default_corpus() -> list[Path]:
    """The running interpreter's standard library sources: a Python corpus every installation already has.

    Without the regression test suites (which some distributions do not ship, and whose bytes are mostly
    deliberately odd strings) and the generated codec tables of `encodings`: what is left is idiomatic code.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [p for p in iter_files(stdlib, skip=SKIPPED_DIRS | STDLIB_SKIPPED) if p.suffix == ".py"]


def iter_files(root: Path, skip: set[str] = SKIPPED_DIRS) -> Iterator[Path]:
    """Files under a directory in sorted order, skipping hidden entries and package/cache folders."""
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or (entry.name in skip and entry.is_dir()):
            continue
        if entry.is_dir():
            yield from iter_files(entry, skip)
        elif entry.is_file():
            yield entry


def collect_files(paths: list[str | Path]) -> list[Path]:
    """Expand files and directories into a sorted file list; a path that does not exist is an error."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(iter_files(path))
        elif path.exists():
            files.append(path)
        else:
            raise DataError(f"no such file or directory: {path}")
    return files


@dataclass
class CorpusStats:
    """What reading the corpus found: kept documents and everything skipped, with examples for the message."""

    files: int = 0
    documents: int = 0
    bytes: int = 0
    non_utf8: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    bad_jsonl_lines: list[str] = field(default_factory=list)

    def skipped_counts(self) -> dict[str, int]:
        return {"non_utf8": len(self.non_utf8), "unreadable": len(self.unreadable),
                "bad_jsonl_lines": len(self.bad_jsonl_lines)}

    def skipped_summary(self) -> str:
        parts = []
        for label, items in (("non-UTF-8 files", self.non_utf8), ("unreadable files", self.unreadable),
                             ("bad JSONL lines", self.bad_jsonl_lines)):
            if items:
                parts.append(f"{len(items)} {label} (e.g. {items[0]})")
        return "skipped " + ", ".join(parts) if parts else "nothing skipped"


def read_documents(files: list[Path], stats: CorpusStats, text_key: str = "text", progress: bool = False
                   ) -> Iterator[str]:
    """Each text file is one document; each line of a .jsonl file is one (its `text_key` field).

    Files that cannot be read or are not UTF-8 are skipped and counted in `stats`, never fatal: a large corpus
    should not die on one stray binary file.
    """
    total = sum(p.stat().st_size for p in files if p.is_file())
    # disable=None: no bar when stderr is not a terminal, so redirected logs get no \r frames
    with tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=None if progress else True,
              file=sys.stderr) as bar:
        for path in files:
            try:
                raw = path.read_bytes()
            except OSError as err:
                stats.unreadable.append(f"{path}: {err.strerror or err}")
                continue
            bar.update(len(raw))
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                stats.non_utf8.append(str(path))
                continue
            stats.files += 1
            docs = _jsonl_documents(text, path, text_key, stats) if path.suffix == ".jsonl" else [text]
            for doc in docs:
                if doc:
                    stats.documents += 1
                    stats.bytes += len(doc.encode("utf-8"))
                    yield doc


def _jsonl_documents(text: str, path: Path, text_key: str, stats: CorpusStats) -> Iterator[str]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            stats.bad_jsonl_lines.append(f"{path}:{number}: not valid JSON")
            continue
        value = record.get(text_key) if isinstance(record, dict) else None
        if not isinstance(value, str):
            stats.bad_jsonl_lines.append(f"{path}:{number}: no string field {text_key!r}")
            continue
        yield value


def read_corpus(paths: list[str | Path], stats: CorpusStats, text_key: str = "text", progress: bool = False
                ) -> Iterator[str]:
    """The documents of files and directories (see the module docstring)."""
    return read_documents(collect_files(paths), stats, text_key, progress)
