"""Writing files so that no reader ever sees half of one, and hashing them.

An output is written under a temporary name beside its target (`.NAME.<pid>-<random>.partial`: the
same folder, so the rename never crosses file systems, and a unique name, so two writers of one
target cannot mix their bytes), flushed to the disk (fsync), and renamed into place only when
complete. On any failure, Ctrl-C included, the temporary is removed and the target is left as it
was. A writer killed outright (SIGKILL, a power cut) cannot remove its temporary: the next write of
the same target removes the temporaries whose writing process no longer runs, so a half-written
model does not hold its gigabytes until someone finds the hidden file.

The bottom layer: the standard library only.
"""

from __future__ import annotations

import glob
import hashlib
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

_CHUNK = 1 << 20  # hashing reads 1 MiB at a time: memory stays small for model files


def partial_name(target: Path) -> Path:
    """A fresh temporary name beside `target`, for a file or folder that becomes `target` when
    complete; the temporaries of `target` that killed writers left behind are removed first."""
    remove_stale_partials(target)
    return target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.partial")


def remove_stale_partials(target: Path) -> list[Path]:
    """Remove the temporaries of `target` whose writer is no longer running (killed before it could
    clean up), and return them. A temporary whose process id is alive, or that is not named as this
    module names them, is left alone: it may be another writer's, still at work."""
    removed = []
    for partial in target.parent.glob(f".{glob.escape(target.name)}.*.partial"):
        writer = partial.name[len(target.name) + 2 : -len(".partial")].split("-", 1)[0]
        if not writer.isdigit() or _running(int(writer)):
            continue
        if partial.is_dir() and not partial.is_symlink():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)
        removed.append(partial)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


@contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path for writers that take a file name (gguf-py's GGUFWriter, torch.save, ...);
    when the block ends without an error the file there is fsynced and renamed to `target`."""
    target = Path(target)
    partial = partial_name(target)
    try:
        yield partial
        move_into_place(partial, target)
    finally:
        partial.unlink(missing_ok=True)


@contextmanager
def atomic_open(target: str | os.PathLike[str], mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """A new file opened for writing ("wb" or "w" with an encoding) that becomes `target` when the
    block ends without an error."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a new file: mode 'w' or 'wb', not {mode!r}")
    with atomic_path(target) as partial:
        with open(partial, mode.replace("w", "x"), encoding=encoding) as file:
            yield file


@contextmanager
def atomic_folder(target: str | os.PathLike[str], *, replace: bool = False) -> Iterator[Path]:
    """A new, empty temporary folder that becomes `target` when the block ends without an error.

    An existing `target` must be an empty folder, which is replaced; with replace=True any
    existing folder is (a re-run overwrites its earlier result)."""
    target = Path(target)
    partial = partial_name(target)
    partial.mkdir()
    try:
        yield partial
        for folder, _, names in os.walk(partial):
            for name in names:
                _fsync(Path(folder) / name)
            _fsync_folder(Path(folder))
        if target.is_dir():
            if replace:
                shutil.rmtree(target)
            else:
                target.rmdir()  # OSError if it is not empty: nothing is ever silently deleted
        os.replace(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    _fsync_folder(target.parent)


def move_into_place(finished: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Flush a complete file or folder written under another name in the same file system (a
    resumable download, a finished work folder) to the disk and rename it to `target`, replacing
    a file or an empty folder there."""
    _fsync(Path(finished))
    os.replace(finished, target)
    _fsync_folder(Path(target).parent)


@contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock, shared with other processes through the file `path`, while the block runs:
    a second process waits at the same lock until the first is done (a crash releases it too).

    The holder deletes the lock file before it lets go; a waiter that then gets the lock of the deleted
    file sees that `path` is no longer that file and locks it again. POSIX flock; on other systems the
    block runs unlocked."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if os.name != "posix":
            break
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        if os.name == "posix":  # elsewhere an open file cannot be deleted
            path.unlink(missing_ok=True)
        os.close(fd)  # releases the lock


def sha256_digest(path: str | os.PathLike[str]) -> Any:  # hashlib's sha256 object, which hashlib does not name
    """The sha256 hash object of a file's bytes, read in blocks; update() continues it (a resumed download)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(_CHUNK):
            digest.update(block)
    return digest


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The hex sha256 of a file's bytes, read in blocks."""
    return sha256_digest(path).hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(path: Path) -> None:
    """Make a rename inside `path` durable; only POSIX can open a folder to fsync it."""
    if os.name == "posix":
        _fsync(path)
