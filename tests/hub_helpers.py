"""A Hugging Face Hub cache built on disk, laid out as huggingface_hub lays it out, so that repo ids resolve with
no network: `models--OWNER--NAME/refs/main` holds a commit hash, `snapshots/HASH/FILE` links to `blobs/SHA256`."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_repo(cache: Path, repo_id: str, write: Callable[[Path], object]) -> Path:
    """`write(directory)` fills a checkpoint directory; its files become the cached snapshot of `repo_id` at
    `main`. Returns the snapshot directory."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    write(snapshot)
    (repo / "blobs").mkdir()
    for file in sorted(p for p in snapshot.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        file.replace(blob)
        file.symlink_to(Path(*[".."] * (len(file.relative_to(repo).parts) - 1), "blobs", blob.name))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def use_hub_cache(monkeypatch, cache: Path) -> None:
    """Point huggingface_hub at `cache`, offline (it reads both settings once, at import, into `constants`)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
