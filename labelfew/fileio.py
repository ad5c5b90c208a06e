"""Files and folders of a run: atomic writes, the stage folder (its lock, its data, free space).

A killed writer never leaves a partial file under the final name; a full disk is one line that
names the folder; a stage folder is used by one run at a time, and `--restart` deletes only a
run made from the same data (or asks first).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from labelfew.errors import UserError
from labelfew.locks import lock_stage_folder


def _read_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# Read once at import: os.umask can only be read by setting it, which is not safe once threads run.
_UMASK = _read_umask()


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Calls `write(temporary_path)` then fsyncs and renames the file to `path`.

    The temporary file lives in the same folder (so the rename is atomic) and is removed
    if `write` fails.

    Raises:
        UserError: the folder cannot be created or written.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:  # permission, a file where a folder should be, read-only file system
        if is_disk_full(error, path.parent):
            raise disk_full_error(path.parent, what=path.name) from None
        raise UserError(
            f"{path.parent}: not writable ({error.strerror}); choose another output folder (--out)"
        ) from None
    os.close(handle)
    try:
        write(Path(temporary))
        with open(temporary, "rb+") as stream:
            os.fsync(stream.fileno())
        os.chmod(temporary, _final_mode(path))
        os.replace(temporary, path)
    except BaseException as error:
        # Asked before the unlink, which frees the space the partial file took.
        full = isinstance(error, Exception) and is_disk_full(error, path.parent)
        Path(temporary).unlink(missing_ok=True)
        if full:
            raise disk_full_error(path.parent, what=path.name) from None
        raise
    _fsync_folder(path.parent)


def _final_mode(path: Path) -> int:
    """The permissions `path` gets: those of the file it replaces, else 0o666 minus the umask.

    `mkstemp` creates its file readable by the owner only; without this, every artifact and CSV
    would be unreadable by the other users of a shared run folder.
    """
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        return 0o666 & ~_UMASK


def prepare_folder(folder: Path) -> Path:
    """Creates `folder` (and parents) and checks that files can be created in it.

    Called before a long run starts, so that an unwritable output folder fails in the first
    second, not after hours of training.

    Raises:
        UserError: the folder cannot be created or written.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(
            f"{folder}: cannot create the folder ({error.strerror}); choose another output folder (--out)"
        ) from None
    try:
        handle, probe = tempfile.mkstemp(prefix=".write-check.", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise UserError(
            f"{folder}: not writable ({error.strerror}); choose another output folder (--out)"
        ) from None
    return folder


def prepare_stage_folder(folder: Path, restart: bool, source: Path | None = None) -> Path:
    """Readies a training stage's folder: writable, locked for this run, and with `restart` the old
    training log cleared; main process only (the lock is the whole run's, whatever its processes).

    Args:
        folder: the stage folder (`runs/NAME/pretrain`).
        restart: the run starts over; refused when the folder holds a run made from other data
            than `source` (asked first on a terminal), since `--restart` deletes that run.
        source: the data the run is made from, recorded in the folder; None records nothing and
            checks nothing.

    Raises:
        UserError: the folder cannot be written, another run uses it, or `restart` would delete
            a run of other data.
    """
    prepare_folder(folder)  # fails now, not at the first checkpoint, if nothing can be written there
    lock_stage_folder(folder)
    if source is not None:
        source = Path(source).resolve()
        if restart:
            _check_restart(folder, source)
        atomic_write_json(folder / SOURCE_FILE, {"data": str(source)})
    if restart:
        (folder / "log.jsonl").unlink(missing_ok=True)
    return folder


def default_run_folder(data: Path, root: Path = Path("runs")) -> Path:
    """`runs/<folder name>-<first 8 hex digits of the sha256 of its absolute path>`.

    The folder name alone made two data sets in folders of one name (`a/train`, `b/train`) share
    a run, and `--restart` of one then deleted the other's.
    """
    absolute = Path(data).resolve()
    digest = hashlib.sha256(os.fsencode(str(absolute))).hexdigest()[:8]
    return root / f"{absolute.name or 'data'}-{digest}"


SOURCE_FILE = ".source.json"
"""In a stage folder: the absolute path of the data its run was made from (`--restart` reads it)."""


def _check_restart(folder: Path, source: Path) -> None:
    """Lets `--restart` delete the run in `folder` only when it was made from `source`, or when the
    user says so at a terminal.

    Raises:
        UserError: the run there was made from other data (or data not recorded) and nobody
            confirmed.
    """
    try:
        recorded: str | None = json.loads((folder / SOURCE_FILE).read_text(encoding="utf-8"))["data"]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = None
    if recorded == str(source) or not _holds_a_run(folder):
        return
    made_from = f"made from {recorded}" if recorded else "whose data is not recorded (an older labelfew's)"
    if _interactive() and _confirm(
        f"{folder} holds a run {made_from}, not {source}; delete it and start over?"
    ):
        return
    raise UserError(
        f"{folder}: holds a run {made_from}, not {source}, and --restart would delete it; choose another "
        f"--out, or delete {folder} yourself to start over"
    )


def _holds_a_run(folder: Path) -> bool:
    """Whether `folder` holds anything a run made (files other than its hidden ones and its log)."""
    return any(not entry.name.startswith(".") and entry.name != "log.jsonl" for entry in folder.iterdir())


def _interactive() -> bool:
    return sys.stdin.isatty() and sys.stderr.isatty()


def _confirm(question: str) -> bool:
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def _fsync_folder(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def atomic_write_text(path: Path, text: str) -> None:
    """Writes UTF-8 text atomically."""

    def write(temporary: Path) -> None:
        temporary.write_text(text, encoding="utf-8")

    atomic_write(path, write)


def atomic_write_json(path: Path, value: Any) -> None:
    """Writes indented JSON atomically."""
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=False, default=str) + "\n")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# A full disk -------------------------------------------------------------------------------------

_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DISK_FULL_TEXTS = ("no space left on device", "storagefull", "os error 28", "disk quota exceeded")
_WRITE_FAILED_TEXTS = ("file write failed", "inline_container", "unexpected pos")
"""torch.save's zip writer reports a full disk only as "[enforce fail at inline_container.cc:…]
PytorchStreamWriter failed writing file …: file write failed" (or "unexpected pos")."""


def free_bytes(folder: Path) -> int | None:
    """Free bytes on the disk holding `folder` (its nearest existing parent); None when unknown."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def is_disk_full(error: BaseException, folder: Path, needed: int | None = None) -> bool:
    """Whether `error`, raised while writing into `folder`, means its disk is full.

    An OSError says so with its errno and safetensors with its message; torch's writer says only
    that the write failed, which counts as a full disk when the folder has less space left than
    `needed` (1 MiB when not given). Call it before removing the partial file, which frees space.
    """
    for cause in (error, error.__cause__, error.__context__):
        if isinstance(cause, OSError) and cause.errno in _DISK_FULL_ERRNOS:
            return True
    text = str(error).lower()
    if any(phrase in text for phrase in _DISK_FULL_TEXTS):
        return True
    if isinstance(error, RuntimeError) and any(phrase in text for phrase in _WRITE_FAILED_TEXTS):
        free = free_bytes(folder)
        return free is not None and free < max(needed or 0, 1 << 20)
    return False


def disk_full_error(folder: Path, what: str, needed: int | None = None) -> UserError:
    """The one line for a write into `folder` that ran out of space: how much `what` needs, what to do.

    A training stage resumes from its newest complete checkpoint, which the failed write left
    intact, so rerunning once space is freed loses at most the steps since then.
    """
    free = free_bytes(folder)
    left = f"{size_text(free)} left" if free is not None else "no space left"
    need = f", {what} needs about {size_text(needed)}" if needed else f" while writing {what}"
    return UserError(f"{folder}: the disk holding it is full ({left}{need}); {DISK_FULL_HINT}")


DISK_FULL_HINT = (
    "free some space and rerun the same command (a training run resumes from its last checkpoint)"
)


def require_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuses to start a long run whose first checkpoint (or artifact) would not fit on the disk.

    Raises:
        UserError: less than `needed` bytes are free on the disk holding `folder`.
    """
    free = free_bytes(folder)
    if free is not None and free < needed:
        raise UserError(
            f"{folder}: the disk holding it has {size_text(free)} free but {what} needs about "
            f"{size_text(needed)}; free some space or choose another output folder (--out)"
        )


def size_text(size: int | None) -> str:
    """A byte count for people: '312 MB', '1.4 GB' (powers of 1000, as `df -H`)."""
    value = float(size or 0)
    for unit in ("bytes", "kB", "MB", "GB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit in ("bytes", "kB") or value >= 10 else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"
