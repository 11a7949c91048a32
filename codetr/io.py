"""Atomic file writes: a reader sees either the old file or the complete new one, never a torn write.

Write to a temporary file in the same directory, fsync, then `os.replace` (atomic on POSIX and Windows).
A full disk (or quota) is a DiskFullError naming the file. `check_writable_dir` / `check_writable_file` check an
output location before any work is done, so a bad `--out` fails at once with one line instead of after the run.
"""
from __future__ import annotations

import errno
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from codetr.errors import ConfigError, DiskFullError

_NO_SPACE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically, creating missing parent folders. DiskFullError (an OSError) when the
    disk or quota is full; nothing is left behind then."""
    path = Path(path)
    try:
        _atomic_write_bytes(path, data)
    except OSError as error:
        if error.errno in _NO_SPACE and not isinstance(error, DiskFullError):
            raise DiskFullError(f"cannot write {path}: {_NO_SPACE[error.errno]}") from error
        raise


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)  # the rename itself survives a power loss only once its folder is on disk
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a platform where folders cannot be opened: the file itself is on disk already
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _nearest_existing(path: Path) -> Path:
    """`path` itself if it exists, else its closest existing ancestor (what `mkdir(parents=True)` would write in)."""
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path) and path != path.parent:  # os.path: never raises (a path under a file, EACCES)
        path = path.parent
    return path


def _folder_problem(folder: Path) -> str | None:
    """Why files cannot be written into `folder` (which may not exist yet), or None if they can."""
    base = _nearest_existing(folder)
    if not os.path.isdir(base):
        return f"{base} is not a folder"
    try:
        fd, probe = tempfile.mkstemp(dir=base, prefix=".codetr-write-check-")
    except OSError as error:
        return f"{base} is not writable ({error.strerror or type(error).__name__})"
    os.close(fd)
    os.unlink(probe)
    return None


def check_writable_dir(path: str | os.PathLike, what: str = "the output folder") -> Path:
    """Check, before any work is done, that files can be written into the folder `path`, which may not exist
    yet (it would be created with its missing parents). Returns `path` as a Path.

    Writability is probed by creating and removing a temporary file in the folder (or in its closest existing
    ancestor), so permissions, read-only mounts and ACLs are all seen, also for root. Nothing else is created.
    Raises ConfigError with one line naming `what` and `path`, e.g.
    "cannot write --out runs/x: runs/x is not a folder".
    """
    path = Path(path)
    problem = _folder_problem(path)
    if problem is not None:
        raise ConfigError(f"cannot write {what} {path}: {problem}")
    return path


def check_writable_file(path: str | os.PathLike, what: str = "the output file") -> Path:
    """Check, before any work is done, that the file `path` can be written (atomically: its folder must be
    writable; missing folders would be created). An existing folder at `path` is refused. Returns `path` as a
    Path. Raises ConfigError with one line naming `what` and `path`, e.g.
    "cannot write --out pred: it is a folder, expected a file name (e.g. pred/out.png)".
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"cannot write {what} {path}: it is a folder, expected a file name (e.g. {path / 'out.png'})")
    problem = _folder_problem(path.parent)
    if problem is not None:
        raise ConfigError(f"cannot write {what} {path}: {problem}")
    return path
