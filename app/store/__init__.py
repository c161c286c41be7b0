"""The durable store: the port (:mod:`app.store.base`) and the backend a URL chooses.

``open_store`` only builds the store; nothing touches the disk until ``await
store.open()`` (which also applies pending migrations).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote

from app.errors import ConfigError
from app.store.base import Store
from app.store.lock import DatabaseLock

if TYPE_CHECKING:
    from app.settings import SqliteWriter

SQLITE_PREFIX = "sqlite:///"
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def sqlite_path(database_url: str) -> Path:
    """The file of a ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db`` URL."""
    if not database_url.startswith(SQLITE_PREFIX):
        raise ConfigError(
            "DATABASE_URL",
            "a SQLite URL has the form sqlite:///relative/path.db or sqlite:////absolute/path.db",
        )
    raw = database_url[len(SQLITE_PREFIX) :]
    if "?" in raw or "#" in raw:
        raise ConfigError("DATABASE_URL", "a SQLite URL takes no query or fragment")
    path = unquote(raw)
    if not path or path.endswith("/"):
        raise ConfigError("DATABASE_URL", "the SQLite URL names no file")
    if path == ":memory:":
        # Ack means durable: an in-memory database loses every accepted notification.
        raise ConfigError("DATABASE_URL", "an in-memory SQLite database is not durable")
    return Path(path)


def hold_database(database_url: str) -> DatabaseLock | None:
    """Take the one-process lock of a SQLite database now, for the life of the process
    (the CLI does, before anything else touches the file). None for other backends.
    Raises :class:`~app.errors.StoreInUseError` when another process holds it."""
    if not database_url.startswith("sqlite:"):
        return None
    return DatabaseLock(sqlite_path(database_url))


def postgres_conninfo(database_url: str) -> str:
    """Check a libpq URL (``postgresql://user:pw@host:port/db``, or a Unix-socket
    directory as ``postgresql://user@/db?host=/run/postgresql``) without connecting."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(database_url)
    except psycopg.Error as error:
        raise ConfigError("DATABASE_URL", f"not a usable PostgreSQL URL: {error}") from None
    # libpq parses a port lazily (at connect time); say it now, at start-up.
    for port in str(params.get("port") or "").split(","):
        if port and not port.isdigit():
            raise ConfigError("DATABASE_URL", f"the port {port!r} is not a number")
    return database_url


def open_store(database_url: str, *, sqlite_writer: SqliteWriter = "auto") -> Store:
    """Build the store for ``database_url`` (not yet opened). ``sqlite_writer``: see
    ``SQLITE_WRITER`` (a PostgreSQL store has no writer of its own)."""
    if database_url.startswith(POSTGRES_SCHEMES):
        from app.store.postgres import PostgresStore

        return PostgresStore(postgres_conninfo(database_url))
    if database_url.startswith("sqlite:"):
        from app.store.sqlite import SqliteStore

        return SqliteStore(sqlite_path(database_url), writer=sqlite_writer)
    raise ConfigError("DATABASE_URL", "must start with sqlite:/// or postgresql://")


__all__ = ["Store", "hold_database", "open_store", "postgres_conninfo", "sqlite_path"]
