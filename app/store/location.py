"""Can the SQLite store live where ``DATABASE_URL`` says? Checked before the service starts.

Without this check an unusable location surfaced inside the server's start-up as a
traceback and exit 3 (the store writer failing to open the file). Every such case is a
configuration error: one line naming ``DATABASE_URL`` and the reason, exit 2. The check
really tries (creates the directory, opens the file, creates and removes a file beside
it for the journal), so it holds for root, read-only mounts and foreign owners alike.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from app.errors import ConfigError

VARIABLE = "DATABASE_URL"


def _reason(exc: OSError, path: Path) -> str:
    """Words for an OSError, with the owner of the spot when it is about permissions."""
    if exc.errno in (errno.ENOTDIR, errno.EEXIST) or isinstance(exc, NotADirectoryError):
        return f"{_first_file(path)} is a file, not a directory"
    if exc.errno in (errno.EACCES, errno.EPERM):
        denied = (exc.strerror or "permission denied").lower()
        return f"{denied} for uid {os.getuid()} ({_owner(path)})"
    if exc.errno == errno.EROFS:
        return "the file system is read-only"
    return (exc.strerror or type(exc).__name__).lower()


def _first_file(path: Path) -> Path:
    """The first component of ``path`` that exists and is not a directory."""
    for parent in reversed([path, *path.parents]):
        if parent.exists() and not parent.is_dir():
            return parent
    return path


def _owner(path: Path) -> str:
    for candidate in [path, *path.parents]:
        try:
            info = candidate.stat()
        except OSError:
            continue
        return f"{candidate} is owned by uid {info.st_uid}, mode {info.st_mode & 0o777:o}"
    return "no part of the path exists"


def check_sqlite_location(path: Path) -> None:
    """Raise ConfigError(DATABASE_URL) unless the database file can be opened for writing
    at ``path`` and its directory takes new files (SQLite's -wal and -shm live there)."""
    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            VARIABLE, f"cannot create the directory {directory}: {_reason(exc, directory)}"
        ) from exc
    if path.is_dir():
        raise ConfigError(VARIABLE, f"{path} is a directory, not a database file")
    try:
        probe = tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-")  # noqa: SIM115
        probe.close()
    except OSError as exc:
        raise ConfigError(
            VARIABLE, f"cannot write in the directory {directory}: {_reason(exc, directory)}"
        ) from exc
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        reason = _reason(exc, path)
        raise ConfigError(VARIABLE, f"cannot open {path} for writing: {reason}") from exc
    os.close(fd)
