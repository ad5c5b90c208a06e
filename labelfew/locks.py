"""The lock of a stage folder: one run at a time writes into `runs/NAME/<stage>/`.

Two runs given one `--out` used to overwrite each other's checkpoints and artifacts silently.
The main process of a run takes the lock (`labelfew.fileio.prepare_stage_folder`) and holds it
until the command ends (`release_locks`, called by the CLI on every way out, and at exit); a
second run exits 2 naming the first, and a lock whose holder died is taken over with a notice.
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from labelfew.errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: the lock falls back to its pid check alone
    fcntl = None  # type: ignore[assignment]


LOCK_FILE = ".lock"
"""In a stage folder while a run uses it: who (`LockRecord`); a POSIX lock on it says whether they
still run (the kernel drops it when they exit, however they exit)."""


@dataclass(frozen=True)
class LockRecord:
    """The run that holds a stage folder, as written in its lock file."""

    pid: int
    host: str
    started: str
    command: str

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.started}: {self.command}"


_held: dict[Path, int] = {}  # this process's lock files and their open descriptors
_atexit_registered = False


def lock_stage_folder(folder: Path) -> None:
    """Takes `folder`'s lock for this process, until `release_locks` or the process ends.

    A process trains one stage at a time, so taking one lock releases the others it holds. The
    lock is a POSIX record lock (`fcntl.lockf`, per process: forked loader workers do not share
    it) on `.lock`, which names the holder. A lock whose holder died (SIGKILL, a crash) is taken
    over with a notice; where record locks are not supported, a pid that is not alive on this
    host says that it died.

    Raises:
        UserError: another live run holds the folder (named), or its holder ran on another host.
    """
    path = (Path(folder) / LOCK_FILE).absolute()
    if path in _held:
        return
    release_locks()
    for _ in range(5):  # the holder may release (delete) the file between our open and our lock
        descriptor = _open_lock(path)
        locked = _try_lock(descriptor)
        if locked is False:  # only a live process holds a record lock (forked children do not)
            os.close(descriptor)
            raise _in_use(folder, _read_record(path))
        if not _same_file(descriptor, path):
            os.close(descriptor)
            continue
        try:
            _take_over(folder, _read_descriptor(descriptor), record_lock=locked is True)
            record = LockRecord(
                os.getpid(), socket.gethostname(), time.strftime("%Y-%m-%d %H:%M:%S"), _command()
            )
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, json.dumps(asdict(record)).encode(), 0)
        except BaseException:
            os.close(descriptor)
            raise
        _held[path] = descriptor
        _release_at_exit()
        return
    raise _in_use(folder, _read_record(path))


def release_locks() -> None:
    """Releases (and deletes) every stage-folder lock this process holds; safe to call always."""
    for path, descriptor in list(_held.items()):
        del _held[path]
        try:
            if _same_file(descriptor, path):
                path.unlink()
        except OSError:
            pass
        os.close(descriptor)


def _open_lock(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # less the umask
    except OSError as error:
        raise UserError(
            f"{path.parent}: not writable ({error.strerror}); choose another output folder (--out)"
        ) from None


def _try_lock(descriptor: int) -> bool | None:
    """True: locked; False: another process holds it; None: this file system has no record locks."""
    if fcntl is None:
        return None
    try:
        fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        return False if error.errno in (errno.EACCES, errno.EAGAIN) else None
    return True


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(descriptor), os.stat(path))
    except OSError:
        return False


def _read_descriptor(descriptor: int) -> LockRecord | None:
    try:
        return LockRecord(**json.loads(os.pread(descriptor, 1 << 16, 0)))
    except (OSError, ValueError, TypeError):
        return None  # empty: its writer was killed between creating and writing it


def _read_record(path: Path) -> LockRecord | None:
    try:
        return LockRecord(**json.loads(path.read_bytes()))
    except (OSError, ValueError, TypeError):
        return None


def _take_over(folder: Path, previous: LockRecord | None, record_lock: bool) -> None:
    """Accepts the lock file's previous holder as gone (with a notice), or raises.

    Raises:
        UserError: the holder ran on another host (whose processes this one cannot see), or,
            without record locks, is alive on this one.
    """
    if previous is None or (previous.pid == os.getpid() and previous.host == socket.gethostname()):
        return
    if previous.host != socket.gethostname():
        raise UserError(
            f"{folder}: in use by a run on another host ({previous.describe()}); wait for it to finish, or if "
            f"it has stopped delete {folder / LOCK_FILE}"
        )
    if not record_lock and _alive(previous.pid):
        raise _in_use(folder, previous)
    print(f"{folder}: taking over the lock of a run that stopped ({previous.describe()})", file=sys.stderr)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another user's
        return True
    return True


def _in_use(folder: Path, holder: LockRecord | None) -> UserError:
    who = holder.describe() if holder is not None else "starting"
    return UserError(
        f"{folder}: in use by another labelfew run ({who}); wait for it to finish or choose another --out"
    )


def _command() -> str:
    text = " ".join(["labelfew", *sys.argv[1:]]) if sys.argv else "labelfew"
    return text if len(text) <= 200 else text[:199] + "…"


def _release_at_exit() -> None:
    global _atexit_registered
    if not _atexit_registered:
        atexit.register(release_locks)
        _atexit_registered = True
