"""The stage folder's lock: one run at a time, the holder named, a dead holder's lock taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from labelfew import fileio, locks
from labelfew.errors import UserError

HOLD = (
    "import sys; from pathlib import Path; from labelfew import locks; "
    "locks.lock_stage_folder(Path(sys.argv[1])); print('locked', flush=True); sys.stdin.read()"
)


@pytest.fixture(autouse=True)
def _released() -> Iterator[None]:
    yield
    locks.release_locks()


def _holder(folder: Path) -> subprocess.Popen[str]:
    """Another process that holds `folder`'s lock until its stdin closes (or it is killed)."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert process.stdout is not None and process.stdout.readline() == "locked\n"
    return process


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _write_record(folder: Path, pid: int, host: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    record = {"pid": pid, "host": host, "started": "2026-12-05 10:00:00", "command": "labelfew pretrain data"}
    (folder / locks.LOCK_FILE).write_text(json.dumps(record))


def test_a_second_run_is_refused_naming_the_first_and_a_killed_ones_lock_is_taken_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "run" / "pretrain"
    folder.mkdir(parents=True)
    first = _holder(folder)
    try:
        with pytest.raises(UserError) as caught:
            fileio.prepare_stage_folder(folder, restart=False)
        message = str(caught.value)
        assert (
            f"pretrain: in use by another labelfew run (pid {first.pid} on {socket.gethostname()}" in message
        )
        assert "wait for it to finish or choose another --out" in message and "\n" not in message
    finally:
        first.send_signal(signal.SIGKILL)  # no clean-up: the record stays, the kernel drops the lock
        first.wait()
    assert json.loads((folder / locks.LOCK_FILE).read_text())["pid"] == first.pid
    fileio.prepare_stage_folder(folder, restart=False)
    notice = capsys.readouterr().err
    assert (
        f"taking over the lock of a run that stopped (pid {first.pid}" in notice and notice.count("\n") == 1
    )
    assert json.loads((folder / locks.LOCK_FILE).read_text())["pid"] == os.getpid()
    locks.release_locks()
    assert not (folder / locks.LOCK_FILE).exists()


def test_a_released_lock_is_free_for_the_next_run(tmp_path: Path) -> None:
    folder = tmp_path / "pretrain"
    folder.mkdir()
    first = _holder(folder)
    first.communicate("")  # the holder exits normally: atexit releases and deletes its lock
    assert first.returncode == 0 and not (folder / locks.LOCK_FILE).exists()
    locks.lock_stage_folder(folder)
    locks.lock_stage_folder(folder)  # the same process again: still its own
    second = subprocess.run([sys.executable, "-c", HOLD, str(folder)], input="", capture_output=True, text=True,
                            check=False)  # fmt: skip
    assert second.returncode == 1 and f"pid {os.getpid()}" in second.stderr


def test_taking_a_stage_folder_releases_the_one_this_process_held(tmp_path: Path) -> None:
    for name in ("pretrain", "finetune-labels"):
        (tmp_path / name).mkdir()
    locks.lock_stage_folder(tmp_path / "pretrain")
    locks.lock_stage_folder(tmp_path / "finetune-labels")  # the previous stage of this process is done
    assert not (tmp_path / "pretrain" / locks.LOCK_FILE).exists()
    assert (tmp_path / "finetune-labels" / locks.LOCK_FILE).exists()


def test_a_lock_of_another_host_is_refused_with_what_to_delete(tmp_path: Path) -> None:
    _write_record(tmp_path, pid=_dead_pid(), host="elsewhere")
    with pytest.raises(
        UserError, match=r"in use by a run on another host \(pid \d+ on elsewhere.*delete .*\.lock"
    ):
        locks.lock_stage_folder(tmp_path)


def test_without_record_locks_the_pid_says_whether_the_holder_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(locks, "fcntl", None)  # a file system (or OS) without POSIX record locks
    _write_record(tmp_path, pid=os.getppid(), host=socket.gethostname())
    with pytest.raises(UserError, match=f"in use by another labelfew run \\(pid {os.getppid()} "):
        locks.lock_stage_folder(tmp_path)
    dead = _dead_pid()
    _write_record(tmp_path, pid=dead, host=socket.gethostname())
    locks.lock_stage_folder(tmp_path)
    assert f"taking over the lock of a run that stopped (pid {dead} " in capsys.readouterr().err
