"""Writing files so that a crash, a kill or a full disk never leaves a half-written result behind.

Every output openjamba writes (checkpoints, exported models, prepared data, reports) goes through these helpers:
a file is written beside its target, flushed to disk and renamed over it; a directory is built beside its target
and swapped in. A reader therefore sees the old complete version or the new complete one, never a mixture.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a full disk, a quota, a file-size limit


class OutOfSpace(OSError):
    """A write failed for lack of space; the message names the path and how many bytes were needed."""

    def __str__(self) -> str:
        return self.strerror


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(file: str | Path, data: str | bytes | Callable[[Path], object]) -> Path:
    """Write `data` (text, bytes, or a function that writes the file it is given) to `file` atomically.

    The file gets the usual permissions (0666 less the umask), like any file the user creates: some writers
    (safetensors) create private 0600 files, which would make an exported model unreadable to others.
    """
    file = Path(file)
    tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
    try:
        if callable(data):
            data(tmp)
        else:
            with open(tmp, "w" if isinstance(data, str) else "wb") as f:
                f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, file)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(file.parent)
    return file


def fsync_tree(root: Path) -> None:
    """Flush every file under `root`, then the directories, so a following rename publishes complete data."""
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(root)


def temporary_sibling(target: Path, tag: str = "tmp") -> Path:
    """A hidden name beside `target` for building it: same filesystem, so the final rename is atomic."""
    return target.with_name(f".{target.name}.{tag}-{os.getpid()}")


def replace_dir(new: Path, target: Path) -> None:
    """Move the complete directory `new` to `target`, replacing what is there; the old one is removed last.

    Between the two renames a kill leaves both versions complete on disk (the old one under a hidden name).
    """
    fsync_tree(new)
    if target.exists():
        old = temporary_sibling(target, "old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(new, target)
        fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)
        fsync_dir(target.parent)


@contextlib.contextmanager
def building_dir(target: Path) -> Iterator[Path]:
    """A fresh hidden directory beside `target`, swapped into place when the block completes and removed when
    it fails (by an exception or Ctrl-C), so that no partial output is ever left under either name."""
    remove_abandoned_builds(target)
    tmp = temporary_sibling(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_abandoned_builds(target: Path) -> None:
    """Delete what killed processes (SIGKILL leaves no chance to clean up) left beside `target`: their hidden
    build directories, and a replaced old version once `target` itself is in place."""
    for tag in ("tmp", "old"):
        for path in target.parent.glob(f".{target.name}.{tag}-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)) and (tag == "tmp" or target.exists()):
                shutil.rmtree(path, ignore_errors=True)


def is_out_of_space(err: BaseException) -> bool:
    """Whether `err`, or an error it was raised from, is a full disk (libraries often wrap the OSError)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in NO_SPACE:
            return True
        if isinstance(err, OutOfSpace):
            return True
        err = err.__cause__ or err.__context__
    return False


def ran_out_of_space(err: BaseException, path: Path, needed: int) -> bool:
    """Whether a failed write of `needed` bytes under `path` was for lack of space: some writers (torch.save's zip
    writer) lose the errno and report only an inconsistent file position, so the free space decides then."""
    if is_out_of_space(err):
        return True
    try:
        return shutil.disk_usage(_existing(path)).free < needed
    except OSError:
        return False


def out_of_space(path: Path, needed: int | None) -> OutOfSpace:
    """The one-line error for a write that ran out of space, with what it needed and what is free."""
    need = f"about {needed / 2**20:.1f} MiB needed" if needed is not None else "size unknown"
    free = ""
    with contextlib.suppress(OSError):
        free = f", {shutil.disk_usage(_existing(path)).free / 2**20:.1f} MiB free"
    return OutOfSpace(errno.ENOSPC, f"no space left on device writing {path} ({need}{free})")


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
