"""Shared fixtures. ``store`` runs a test against every store backend (the contract)."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from app.store.base import Store
from app.store.postgres import PostgresStore
from app.store.sqlite import SqliteStore
from tests.pg import PgServer, build_template, start_server, stop_server

# "sqlite-thread": the SQLite store with its writer as a thread (SQLITE_WRITER=thread), which
# a host with fewer than two CPUs gets; "sqlite" runs it as a process on this 2-CPU machine.
STORE_BACKENDS = ["sqlite", "sqlite-thread", "postgresql"]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One PostgreSQL server for the run (started on first use), with a migrated template."""
    with tempfile.TemporaryDirectory(prefix="hydrator-pg-") as workdir:
        server = start_server(Path(workdir))
        try:
            build_template(server)
            yield server
        finally:
            stop_server(server)


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """A libpq URL of a fresh, migrated database of its own for this test."""
    name = pg_server.create_database()
    try:
        yield pg_server.url(name)
    finally:
        pg_server.drop_database(name)


def make_store(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Store:
    if backend == "sqlite":
        return SqliteStore(tmp_path / "store.db", writer="process")
    if backend == "sqlite-thread":
        return SqliteStore(tmp_path / "store.db", writer="thread")
    if backend == "postgresql":
        # The contract drives time through ``now=``, leases included.
        return PostgresStore(request.getfixturevalue("pg_url"), lease_clock="caller")
    raise ValueError(f"unknown store backend {backend!r}")


@pytest.fixture(params=STORE_BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    instance = make_store(request.param, tmp_path, request)
    await instance.open()
    try:
        yield instance
    finally:
        await instance.close()
