"""One process per SQLite file: an OS lock held for the life of the process (the service;
its store writer is a child process that dies with it, app/store/sqlite_writer.py).

SQLite itself would let a second process open the file, and that process would void
the first one's leases when its store opens (app/store/sql.py, VOID_*_LEASES), so the
same work would be fetched and delivered twice. The lock makes the second process
refuse to start instead.

The lock is ``flock(LOCK_EX | LOCK_NB)`` on ``<database>.lock`` beside the database:

* The kernel drops a flock when its process dies, kill -9 included, so a crashed
  process never leaves a stale lock behind and the next start succeeds at once. The
  lock file itself stays; its presence means nothing, only the lock does.
* A separate file, not the database: SQLite locks the database with POSIX record
  locks, and where flock is emulated with record locks (NFS) the two would collide.
* Held per process, counted per path: the CLI takes it before anything touches the
  database (so the refusal is one line, before the banner), and the store takes it
  again when it opens; both share one file descriptor.

The holder writes its pid into the file, so the refusal can say who holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from pathlib import Path

from app.errors import StoreError, StoreInUseError

LOCK_SUFFIX = ".lock"

_registry_lock = threading.Lock()
# resolved lock path -> [file descriptor, holders in this process]
_held: dict[Path, list[int]] = {}


def lock_path(database: Path) -> Path:
    return database.with_name(database.name + LOCK_SUFFIX)


class DatabaseLock:
    """A hold on the one-process lock of one database file; ``release()`` ends it."""

    def __init__(self, database: Path) -> None:
        self.database = database
        self.path = lock_path(database).resolve()
        self._released = False
        with _registry_lock:
            entry = _held.get(self.path)
            if entry is None:
                _held[self.path] = [_take(self.database, self.path), 1]
            else:
                entry[1] += 1

    def release(self) -> None:
        with _registry_lock:
            if self._released:
                return
            self._released = True
            entry = _held[self.path]
            entry[1] -= 1
            if entry[1] == 0:
                del _held[self.path]
                os.close(entry[0])  # closing the descriptor drops the flock


def _in_use(database: Path, holder: str) -> StoreInUseError:
    who = f" (pid {holder})" if holder.isdigit() else ""
    return StoreInUseError(
        f"{database} is in use by another process{who}: one process per SQLite file"
    )


def _take(database: Path, path: Path) -> int:
    """Open and flock ``path`` without waiting; write our pid into it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StoreError(f"cannot create the lock file {path}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        holder = _read_holder(fd)
        os.close(fd)
        raise _in_use(database, holder) from exc
    except OSError as exc:
        os.close(fd)
        raise StoreError(f"cannot lock {path}: {exc.strerror}") from exc
    # The pid is informative only; a failure to write it must not stop the start.
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
