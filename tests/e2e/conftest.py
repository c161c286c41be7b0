from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.sandbox import SandboxState, create_sandbox_app
from tests.e2e.service import ServiceProcess, service_env
from tests.servers import ServerThread


@dataclass
class Clopos:
    state: SandboxState
    url: str  # base URL as CLOPOS_BASE_URL wants it (with /open-api)


@pytest.fixture
def clopos() -> Iterator[Clopos]:
    state = SandboxState(seed_orders=300)
    with ServerThread(create_sandbox_app(state)) as server:
        yield Clopos(state, f"{server.url}/open-api")


@pytest.fixture
def make_service(tmp_path: Path, clopos: Clopos) -> Iterator[type]:
    """Factory: ``make_service(**env_overrides)`` -> a started ServiceProcess (stopped after)."""
    started: list[ServiceProcess] = []
    db = tmp_path / "hydrator.db"

    def factory(log_name: str = "service.log", **extra: str) -> ServiceProcess:
        env = service_env(clopos.url, db, **extra)
        proc = ServiceProcess(env, tmp_path / log_name).start()
        started.append(proc)
        return proc

    yield factory  # type: ignore[misc]
    for proc in started:
        proc.stop()
