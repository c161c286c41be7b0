"""Two things an operator reads, checked against a real service process: the attempt
number of each 404 retry in the log (it said `attempt: 1` five times while `dlq list`
showed 5 tries), and the poll watermark in `status`'s text (it was only in --json)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.service import ADMIN_TOKEN, ServiceProcess, log_events, notify, wait_until
from tests.e2e.test_cli import cli, remote

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def test_each_404_retry_logs_its_own_attempt_number(make_service: Any) -> None:
    service: ServiceProcess = make_service(
        NOT_FOUND_MAX_ATTEMPTS="3", NOT_FOUND_RETRY_SECONDS="0.2"
    )
    notify(service, 99999)

    def letters() -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = httpx.get(
            f"{service.url}/admin/dead-letters", headers=ADMIN
        ).json()["items"]
        return items

    assert wait_until(lambda: letters(), timeout=30), service.tail()
    tries = [
        e["attempt"]
        for e in log_events(service.log_path, "hydration.finished")
        if e.get("order_id") == 99999
    ]
    assert tries == [1, 2, 3], tries
    assert letters()[0]["attempts"] == 3


def test_status_text_shows_each_brands_poll_watermark(make_service: Any, tmp_path: Path) -> None:
    service: ServiceProcess = make_service(POLL_INTERVAL_SECONDS="1")

    def polled() -> bool:
        status = httpx.get(f"{service.url}/admin/status", headers=ADMIN).json()
        return bool(status["brands"]["sandbox"]["poll"]["watermark"])

    assert wait_until(polled, timeout=20), service.tail()
    watermark = httpx.get(f"{service.url}/admin/status", headers=ADMIN).json()["brands"]["sandbox"][
        "poll"
    ]["watermark"]
    result = cli(tmp_path, "status", *remote(service), env={"ADMIN_TOKEN": ADMIN_TOKEN})
    assert result.returncode == 0, result.stderr
    lines = [" ".join(line.split()) for line in result.stdout.splitlines()]
    assert "brand credentials budget left / per min poll watermark" in lines, result.stdout
    row = next(line for line in lines if line.startswith("sandbox "))
    assert re.search(rf"{re.escape(watermark)}$", row), (row, watermark)


def test_status_text_says_when_polling_is_off(make_service: Any, tmp_path: Path) -> None:
    service: ServiceProcess = make_service()  # POLL_INTERVAL_SECONDS=0 in the e2e env
    result = cli(tmp_path, "status", *remote(service), env={"ADMIN_TOKEN": ADMIN_TOKEN})
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("sandbox "))
    assert row.split()[-1] == "off", row


def test_an_online_backup_restores_into_a_working_service(
    make_service: Any, tmp_path: Path
) -> None:
    """docs/operations.md's backup and restore, as written there: `backup` while the
    service runs, then a service started on the copy has the same dead letters."""
    service: ServiceProcess = make_service(NOT_FOUND_MAX_ATTEMPTS="1")
    notify(service, 99999)

    def letters(svc: ServiceProcess) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = httpx.get(
            f"{svc.url}/admin/dead-letters", headers=ADMIN
        ).json()["items"]
        return items

    assert wait_until(lambda: letters(service), timeout=20), service.tail()
    copy = tmp_path / "backup" / "hydrator-backup.db"
    copy.parent.mkdir()
    env = {"DATABASE_URL": service.env["DATABASE_URL"]}
    result = cli(tmp_path, "backup", str(copy), env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("backed up "), result.stdout
    again = cli(tmp_path, "backup", str(copy), env=env)  # never overwrites
    assert again.returncode == 1
    assert again.stderr.strip().endswith("exists: a backup never overwrites a file")

    restored: ServiceProcess = make_service("restored.log", DATABASE_URL=f"sqlite:///{copy}")
    assert [(d["order_id"], d["reason"]) for d in letters(restored)] == [(99999, "not_found")]
