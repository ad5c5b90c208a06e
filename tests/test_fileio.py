"""Atomic writes: a failing or killed writer leaves neither a partial file nor a temporary one."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from labelfew import fileio
from labelfew.errors import UserError
from labelfew.fileio import atomic_write, atomic_write_json, atomic_write_text, prepare_folder, sha256_file


class WriterFailed(Exception):
    pass


def _failing_writer(temporary: Path) -> None:
    temporary.write_bytes(b"half of the")
    raise WriterFailed


def test_atomic_write_writes_and_creates_parent_folders(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "out.bin"
    atomic_write(target, lambda temporary: temporary.write_bytes(b"payload"))
    assert target.read_bytes() == b"payload"
    assert sorted(os.listdir(target.parent)) == ["out.bin"]


def test_failing_first_write_leaves_no_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    with pytest.raises(WriterFailed):
        atomic_write(target, _failing_writer)
    assert not target.exists()
    assert os.listdir(tmp_path) == []


def test_failing_rewrite_keeps_the_previous_file_intact(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    atomic_write_text(target, "complete version 1")
    with pytest.raises(WriterFailed):
        atomic_write(target, _failing_writer)
    assert target.read_text() == "complete version 1"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_interrupt_during_write_also_cleans_up(tmp_path: Path) -> None:
    def interrupted(temporary: Path) -> None:
        temporary.write_bytes(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "out.bin", interrupted)
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_new_files_get_the_umask_permissions_and_rewrites_keep_theirs(tmp_path: Path) -> None:
    target = tmp_path / "shared.txt"
    atomic_write_text(target, "v1")
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~fileio._UMASK  # not mkstemp's 0o600
    target.chmod(0o640)
    atomic_write_text(target, "v2")
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert target.read_text() == "v2"


def test_a_file_where_the_folder_should_be_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(UserError, match=r"taken: not writable.*--out"):
        atomic_write_text(tmp_path / "taken" / "out.txt", "x")
    with pytest.raises(UserError, match=r"taken/run: cannot create the folder.*--out"):
        prepare_folder(tmp_path / "taken" / "run")


def test_non_writable_folder_is_a_user_error(tmp_path: Path) -> None:
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("this user (root) writes into a read-only folder, so chmod cannot deny it")
        with pytest.raises(UserError, match="locked: not writable"):
            atomic_write_text(folder / "out.txt", "x")
        with pytest.raises(UserError, match="locked: not writable"):
            prepare_folder(folder)
    finally:
        folder.chmod(0o700)


def test_prepare_folder_creates_and_leaves_nothing_behind(tmp_path: Path) -> None:
    folder = prepare_folder(tmp_path / "runs" / "new")
    assert folder.is_dir()
    assert os.listdir(folder) == []


def test_atomic_write_json_round_trips(tmp_path: Path) -> None:
    value = {"path": Path("/x/y"), "numbers": [1, 2.5], "name": "ünïcode"}
    atomic_write_json(tmp_path / "v.json", value)
    assert json.loads((tmp_path / "v.json").read_text(encoding="utf-8")) == {
        "path": "/x/y",
        "numbers": [1, 2.5],
        "name": "ünïcode",
    }


@pytest.mark.parametrize("size", [0, 5, (1 << 20) + 3])
def test_sha256_file_matches_hashlib(tmp_path: Path, size: int) -> None:
    data = bytes(index % 251 for index in range(size))
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()
