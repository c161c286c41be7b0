"""Shared fixtures. ``store`` runs a test against every store backend (the contract)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.store.base import Store
from app.store.sqlite import SqliteStore

# Add "postgresql" here (and a branch in make_store) when that backend exists.
STORE_BACKENDS = ["sqlite"]


def make_store(backend: str, tmp_path: Path) -> Store:
    if backend == "sqlite":
        return SqliteStore(tmp_path / "store.db")
    raise ValueError(f"unknown store backend {backend!r}")


@pytest.fixture(params=STORE_BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    instance = make_store(request.param, tmp_path)
    await instance.open()
    try:
        yield instance
    finally:
        await instance.close()
