"""Atomic writes: a failing or killed writer leaves neither a partial file nor a temporary one."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from labelfew import fileio, locks
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


# The default run folder and --restart (issue 22, item 3) -----------------------------------------


def test_the_default_run_folder_is_unique_to_the_data_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a" / "train").mkdir(parents=True)
    (tmp_path / "b" / "train").mkdir(parents=True)
    first = fileio.default_run_folder(tmp_path / "a" / "train")
    second = fileio.default_run_folder(tmp_path / "b" / "train")
    assert first != second
    digest = hashlib.sha256(str((tmp_path / "a" / "train").resolve()).encode()).hexdigest()[:8]
    assert first == Path("runs") / f"train-{digest}"
    monkeypatch.chdir(tmp_path / "a")
    assert fileio.default_run_folder(Path("train")) == first  # the same data, however it is named


def _finished_run(stage: Path, source: Path) -> None:
    fileio.prepare_stage_folder(stage, restart=False, source=source)
    (stage / "backbone.safetensors").write_bytes(b"weights")
    (stage / "log.jsonl").write_text("{}\n")
    locks.release_locks()


def test_restart_deletes_only_a_run_made_from_the_same_data(tmp_path: Path) -> None:
    stage, data, other = tmp_path / "run" / "pretrain", tmp_path / "a" / "train", tmp_path / "b" / "train"
    _finished_run(stage, data)
    with pytest.raises(
        UserError, match=r"pretrain: holds a run made from .*a/train, not .*b/train.*another --out"
    ):
        fileio.prepare_stage_folder(stage, restart=True, source=other)
    assert (stage / "backbone.safetensors").read_bytes() == b"weights"  # nothing deleted
    assert (stage / "log.jsonl").is_file()
    locks.release_locks()
    fileio.prepare_stage_folder(stage, restart=True, source=tmp_path / "a" / ".." / "a" / "train")
    assert not (stage / "log.jsonl").exists()  # the same data: restarted
    locks.release_locks()


def test_restart_of_a_run_whose_data_is_not_recorded_is_refused(tmp_path: Path) -> None:
    stage = tmp_path / "run" / "pretrain"
    stage.mkdir(parents=True)
    (stage / "backbone.safetensors").write_bytes(b"an older labelfew's run")
    with pytest.raises(UserError, match="whose data is not recorded"):
        fileio.prepare_stage_folder(stage, restart=True, source=tmp_path / "data")
    locks.release_locks()
    fileio.prepare_stage_folder(tmp_path / "empty" / "pretrain", restart=True, source=tmp_path / "data")
    locks.release_locks()  # nothing there to delete: no question


@pytest.mark.parametrize(("answer", "allowed"), [("y\n", True), ("\n", False), ("no\n", False)])
def test_restart_of_another_datas_run_asks_at_a_terminal(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    answer: str,
    allowed: bool,
) -> None:
    stage = tmp_path / "run" / "pretrain"
    _finished_run(stage, tmp_path / "a")
    monkeypatch.setattr(fileio, "_interactive", lambda: True)
    monkeypatch.setattr("sys.stdin", io.StringIO(answer))
    if allowed:
        fileio.prepare_stage_folder(stage, restart=True, source=tmp_path / "b")
        assert json.loads((stage / fileio.SOURCE_FILE).read_text())["data"] == str(tmp_path / "b")
    else:
        with pytest.raises(UserError, match="--restart would delete it"):
            fileio.prepare_stage_folder(stage, restart=True, source=tmp_path / "b")
        assert json.loads((stage / fileio.SOURCE_FILE).read_text())["data"] == str(tmp_path / "a")
    assert "delete it and start over? [y/N]" in capsys.readouterr().err
    locks.release_locks()


# A full disk (item 6) ----------------------------------------------------------------------------


def _disk_full_writer(temporary: Path) -> None:
    temporary.write_bytes(b"the first part")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_is_one_line_naming_the_folder_and_keeps_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "out" / "run.json"
    atomic_write_text(target, "complete version 1")
    with pytest.raises(UserError) as caught:
        atomic_write(target, _disk_full_writer)
    message = str(caught.value)
    assert message.startswith(f"{target.parent}: the disk holding it is full")
    assert "run.json" in message and "rerun the same command" in message and "\n" not in message
    assert target.read_text() == "complete version 1"
    assert os.listdir(target.parent) == ["run.json"]  # the partial temporary is gone


def test_torch_s_write_failure_counts_as_a_full_disk_only_when_space_is_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    error = RuntimeError(
        "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: file write failed"
    )
    monkeypatch.setattr(fileio, "free_bytes", lambda folder: 5_000_000)
    assert fileio.is_disk_full(error, tmp_path, needed=10_000_000)
    assert not fileio.is_disk_full(error, tmp_path, needed=1000)  # 5 MB free: not the disk
    assert not fileio.is_disk_full(RuntimeError("shape mismatch"), tmp_path, needed=10_000_000)
    assert fileio.is_disk_full(Exception('IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'), tmp_path)  # fmt: skip


def test_require_free_space_refuses_before_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda path: usage._replace(free=2_500_000))
    fileio.require_free_space(tmp_path, 2_000_000, "a checkpoint")
    with pytest.raises(
        UserError, match=r"has 2.5 MB free but a checkpoint needs about 3.0 MB; free some space"
    ):
        fileio.require_free_space(tmp_path / "not" / "yet", 3_000_000, "a checkpoint")


@pytest.mark.parametrize(("size", "text"), [(0, "0 bytes"), (999, "999 bytes"), (12_345, "12 kB"), (2_500_000, "2.5 MB"),
                                            (312_000_000, "312 MB"), (1_400_000_000, "1.4 GB"), (3 * 10**12, "3.0 TB")])  # fmt: skip
def test_size_text(size: int, text: str) -> None:
    assert fileio.size_text(size) == text
