"""An exclusive lock on a folder, held by the one process that writes into it.

`codetr train` holds `OUT/.lock` for the whole run, so a second `codetr train` on the same --out stops with
one line instead of interleaving its log and checkpoints with the first one's. The grid tools build on the
same lock (a grid's runs, the grid folder itself).

Three properties matter:
- The OS drops the lock when the holder dies, even by SIGKILL (flock), so a killed run never stays locked.
- Forked children do not keep it. A flock belongs to the open file, which fork shares with the child, so a
  DataLoader worker would hold a killed trainer's lock for seconds; each child closes its copy at once.
- A run folder's lock is re-entrant within a process: a grid worker holds it and then trains into the folder.
"""
from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import IO, Any

from codetr.errors import ConfigError

# Locks this process holds: resolved lock-file path -> [open file, how many holders].
_HELD: dict[Path, list[Any]] = {}


def _close_in_forked_child() -> None:
    for handle, _ in _HELD.values():
        handle.close()  # the child's copy only: the parent's lock stays (flock ends when all copies close)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_forked_child)


class LockBusy(ConfigError):
    """Another process holds the lock."""


def _try_flock(handle: IO, path: Path) -> bool:
    """Take an exclusive flock without waiting; False if another process holds it. One clear error where the
    filesystem has no locks (some network filesystems)."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as error:
        raise ConfigError(f"{path}: file locks (flock) do not work on this filesystem ({error.strerror}); "
                          "put the folder on a local or flock-enabled filesystem") from None
    return True


def is_locked(directory: Path, name: str = ".lock") -> bool:
    """Whether some process (this one included) holds `directory/name` right now."""
    lock_file = Path(directory) / name
    if lock_file.resolve() in _HELD:
        return True
    if not lock_file.exists():
        return False
    with open(lock_file, "a") as handle:
        if not _try_flock(handle, lock_file):
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def holder_pid(directory: Path, name: str = ".lock") -> str:
    """The pid the current (or last) holder wrote into the lock file, or '?'."""
    try:
        return (Path(directory) / name).read_text().strip() or "?"
    except OSError:
        return "?"


class FolderLock:
    """Hold `directory/<name>` exclusively: `with FolderLock(dir): ...` or `acquire()` / `release()`.

    Raises LockBusy with `busy_message` when another process holds it after `retry_s` seconds (a short retry
    lets a concurrent `is_locked` probe, which takes the lock for an instant, pass).
    """

    name = ".lock"
    busy_message = "is being written by another process (pid {pid}); wait for it, or choose another --out"
    reentrant = False  # a second hold by the same process is refused like another process's

    def __init__(self, directory: Path, retry_s: float = 3.0):
        self.directory = Path(directory)
        self.path = self.directory / self.name
        self.retry_s = retry_s
        self.held = False

    def acquire(self) -> "FolderLock":
        if self.held:
            return self
        key = self.path.resolve()
        if self.reentrant and key in _HELD:  # this process holds it already (a grid worker training its own run)
            _HELD[key][1] += 1
            self.held = True
            return self
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "a+")
        except OSError as error:  # --out is a file, under a file, or in a folder we may not write
            raise ConfigError(f"{self.directory}: cannot write there ({error.strerror}); expected a writable "
                              "folder (it is created if missing)") from None
        deadline = time.monotonic() + self.retry_s
        while not _try_flock(handle, self.path):
            if time.monotonic() > deadline:
                handle.close()
                raise LockBusy(f"{self.directory} {self.busy_message.format(pid=holder_pid(self.directory, self.name))}")
            time.sleep(0.1)
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        _HELD[key] = [handle, 1]
        self.held = True
        return self

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        key = self.path.resolve()
        entry = _HELD.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[key]
            fcntl.flock(entry[0], fcntl.LOCK_UN)
            entry[0].close()

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


class RunFolderLock(FolderLock):
    """Held by `codetr train` (and a grid worker) on its output folder."""

    name = ".lock"
    reentrant = True
    busy_message = ("is being trained into by another process (pid {pid}); wait for it to finish, "
                    "or choose another --out")
