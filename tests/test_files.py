"""slim.runtime.files: an output appears complete or not at all, flushed to the disk first, and
a failed write leaves the target as it was with no temporary behind."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slim.runtime import files


class Boom(Exception):
    pass


def test_atomic_path_renames_the_finished_file_into_place(tmp_path: Path) -> None:
    target = tmp_path / "model.gguf"
    target.write_bytes(b"old")
    with files.atomic_path(target) as partial:
        assert partial.parent == tmp_path and partial.name.startswith(".model.gguf.")
        assert partial.name.endswith(".partial")
        partial.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # nothing is visible before the block ends
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_a_failed_write_leaves_the_target_untouched_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "index.json"
    target.write_text("kept")
    with pytest.raises(Boom):
        with files.atomic_open(target, "w", encoding="utf-8") as file:
            file.write("half of it")
            raise Boom
    with pytest.raises(Boom):
        with files.atomic_path(target) as partial:
            partial.write_bytes(b"half")
            raise Boom
    assert target.read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json"]


def test_an_interrupted_write_leaves_no_target(tmp_path: Path) -> None:
    target = tmp_path / "new.bin"
    with pytest.raises(KeyboardInterrupt):
        with files.atomic_open(target) as file:
            file.write(b"x" * 1000)
            raise KeyboardInterrupt
    assert not list(tmp_path.iterdir())


def test_the_file_is_fsynced_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync " + Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    target = tmp_path / "out.bin"
    with files.atomic_open(target) as file:
        file.write(b"data")
        partial_name = Path(file.name).name
    assert events == [f"fsync {partial_name}", "rename", f"fsync {tmp_path.name}"]
    assert target.read_bytes() == b"data"


def test_atomic_open_takes_only_write_modes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode 'w' or 'wb'"):
        with files.atomic_open(tmp_path / "x", "ab"):
            pass


def test_atomic_folder_replaces_an_empty_folder_and_refuses_a_full_one(tmp_path: Path) -> None:
    target = tmp_path / "hf"
    target.mkdir()
    with files.atomic_folder(target) as partial:
        (partial / "config.json").write_text("{}")
        (partial / "sub").mkdir()
        (partial / "sub" / "weights").write_bytes(b"w")
    assert (target / "config.json").read_text() == "{}" and (target / "sub" / "weights").read_bytes() == b"w"

    with pytest.raises(OSError):
        with files.atomic_folder(target) as partial:
            (partial / "config.json").write_text("second")
    assert (target / "config.json").read_text() == "{}"  # a full folder is never silently replaced

    with files.atomic_folder(target, replace=True) as partial:
        (partial / "config.json").write_text("third")
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_a_failed_folder_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(Boom):
        with files.atomic_folder(tmp_path / "out") as partial:
            (partial / "model.safetensors").write_bytes(b"half")
            raise Boom
    assert not list(tmp_path.iterdir())


def test_two_writers_of_one_target_do_not_share_a_temporary(tmp_path: Path) -> None:
    target = tmp_path / "entry.npz"
    with files.atomic_open(target) as first, files.atomic_open(target) as second:
        assert first.name != second.name
        first.write(b"first")
        second.write(b"second")
    assert target.read_bytes() == b"first"  # the writer that finished last wins, whole


def test_move_into_place_keeps_the_bytes(tmp_path: Path) -> None:
    finished = tmp_path / ".downloads" / "abc.part"
    finished.parent.mkdir()
    finished.write_bytes(b"gguf")
    files.move_into_place(finished, tmp_path / "model.gguf")
    assert (tmp_path / "model.gguf").read_bytes() == b"gguf" and not finished.exists()


def test_file_sha256_and_a_digest_that_continues(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    data = os.urandom(3 << 20 | 123)  # several read blocks and a partial one
    path.write_bytes(data)
    assert files.file_sha256(path) == hashlib.sha256(data).hexdigest()
    digest = files.sha256_digest(path)
    digest.update(b"more")
    assert digest.hexdigest() == hashlib.sha256(data + b"more").hexdigest()


def test_a_killed_writers_temporaries_are_removed_by_the_next_write(tmp_path: Path) -> None:
    """SIGKILL leaves a temporary behind (file or folder); the next write of that target removes the
    ones whose process has ended, and never a running writer's or a file it did not name."""
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    target = tmp_path / "model.gguf"
    stale_file = tmp_path / f".model.gguf.{ended.pid}-0badf00d.partial"
    stale_file.write_bytes(b"half a model")
    stale_folder = tmp_path / f".model.gguf.{ended.pid}-deadbeef.partial"
    (stale_folder / "sub").mkdir(parents=True)
    (stale_folder / "sub" / "weights").write_bytes(b"w")
    running = tmp_path / f".model.gguf.{os.getpid()}-12345678.partial"  # a writer still at work
    running.write_bytes(b"being written")
    foreign = tmp_path / ".model.gguf.notes.partial"  # not a name this module makes
    foreign.write_bytes(b"someone's")
    other_target = tmp_path / f".other.gguf.{ended.pid}-0badf00d.partial"
    other_target.write_bytes(b"another target's")
    with files.atomic_path(target) as partial:
        assert not stale_file.exists() and not stale_folder.exists()
        partial.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["model.gguf", running.name, foreign.name, other_target.name]
    )
