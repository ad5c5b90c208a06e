"""Atomic file writes: a killed writer never leaves a partial file under the final name."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from labelfew.errors import UserError


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
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
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


def prepare_stage_folder(folder: Path, restart: bool) -> Path:
    """`prepare_folder`, and with `restart` the old training log cleared; main process only."""
    prepare_folder(folder)  # fails now, not at the first checkpoint, if nothing can be written there
    if restart:
        (folder / "log.jsonl").unlink(missing_ok=True)
    return folder


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
