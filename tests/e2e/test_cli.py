"""The command line, run as real subprocesses (``python -m app ...``) against a running service.

Each command is exercised the way an operator would use it: ``status`` and ``dlq`` through
the admin API of a live instance, ``hydrate`` against the sandbox Clopos, ``send-test`` into
a live instance (and the order then delivered), ``sandbox`` as its own process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from tests.e2e.conftest import Clopos
from tests.e2e.service import (
    ADMIN_TOKEN,
    ROOT,
    SANDBOX_CREDENTIALS,
    WEBHOOK_SECRET,
    ServiceProcess,
    log_events,
    logged,
    notify,
    wait_until,
)
from tests.servers import free_port

BASE_ENV = {
    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    "HOME": os.environ.get("HOME", "/tmp"),
    "PYTHONPATH": str(ROOT),
}
HEADERS = {"X-Webhook-Token": WEBHOOK_SECRET}


def cli(
    cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m app ARGS`` in ``cwd`` (no stray .env) with only ``env`` set."""
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        cwd=cwd,
        env={**BASE_ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def remote(service: ServiceProcess) -> list[str]:
    return ["--url", service.url]


ADMIN_ENV = {"ADMIN_TOKEN": ADMIN_TOKEN}


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The command failed with exactly one line on stderr, no traceback; return it."""
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("clopos-hydrator: "), lines[0]
    return lines[0]


def letters(service: ServiceProcess) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{service.url}/admin/dead-letters", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    items: list[dict[str, Any]] = response.json()["items"]
    return items


HELP_CASES: list[tuple[list[str], list[str]]] = [
    ([], ["serve", "sandbox", "status", "dlq", "hydrate", "send-test"]),
    (["serve"], ["--host", "--port"]),
    (["sandbox"], ["--host", "--port"]),
    (["status"], ["--url", "--token", "--json", "HYDRATOR_URL", "ADMIN_TOKEN"]),
    (["dlq"], ["list", "show", "replay", "purge"]),
    (
        ["dlq", "list"],
        ["--url", "--token", "--brand", "--sink", "--reason", "--kind", "--limit", "--after"],
    ),
    (["dlq", "show"], ["--url", "--token", "id"]),
    (["dlq", "replay"], ["id", "--mode", "auto", "hydrate", "deliver", "--all", "--reason"]),
    (["dlq", "purge"], ["id", "--all", "--brand", "--sink", "--reason", "--kind"]),
    (["hydrate"], ["order_id", "--brand", "--venue"]),
    (["send-test"], ["order_id", "--url", "--brand", "--venue", "--secret"]),
]


def test_help_at_every_level(tmp_path: Path) -> None:
    # All at once: each is an interpreter start-up, and they are independent.
    procs = [
        (
            args,
            words,
            subprocess.Popen(
                [sys.executable, "-m", "app", *args, "--help"],
                cwd=tmp_path,
                env=BASE_ENV,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
        for args, words in HELP_CASES
    ]
    for args, words, proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, (args, err)
        assert err == ""
        assert out.startswith(f"usage: {' '.join(['clopos-hydrator', *args])}"), out
        for word in words:
            assert word in out, (args, word, out)
        assert not undocumented_options(out), (args, out)


def undocumented_options(help_text: str) -> list[str]:
    """Options listed without a description (on their line or the next one)."""
    lines = help_text.splitlines()
    missing = []
    for index, line in enumerate(lines):
        stripped = line.strip()
        if not stripped.startswith("-") or len(re.split(r"\s{2,}", stripped, maxsplit=1)) == 2:
            continue
        following = lines[index + 1] if index + 1 < len(lines) else ""
        if not (following.startswith(" " * 8) and not following.strip().startswith("-")):
            missing.append(stripped)
    return missing


@pytest.mark.parametrize(
    ("args", "env", "variable"),
    [
        (["serve"], SANDBOX_CREDENTIALS, "WEBHOOK_SECRET"),
        (["serve"], {"WEBHOOK_SECRET": "long-enough", "ADMIN_TOKEN": "short"}, "ADMIN_TOKEN"),
        (["serve"], {"WEBHOOK_SECRET": "long-enough", "RETRY_BASE_SECONDS": "x"}, "RETRY_BASE"),
        (["serve"], {"WEBHOOK_SECRET": "long-enough"}, "CLOPOS_CLIENT_ID"),
        (["serve"], {"WEBHOOK_SECRET": "x" * 9, "SINKS": '[{"type": "ftp"}]'}, "SINKS"),
        (["hydrate", "1001"], {"WEBHOOK_SECRET": "long-enough"}, "CLOPOS_BRAND"),
        (["status"], {}, "ADMIN_TOKEN"),
        (["send-test", "1001"], {}, "WEBHOOK_SECRET"),
    ],
)
def test_a_configuration_error_is_one_line(
    tmp_path: Path, args: list[str], env: dict[str, str], variable: str
) -> None:
    result = cli(tmp_path, *args, env=env)
    assert result.returncode == 2
    line = one_line_error(result)
    assert line.startswith(f"clopos-hydrator: configuration error: {variable}"), line


def test_status_shows_backlog_brands_sinks_and_dead_letters(
    make_service: Any, clopos: Clopos, tmp_path: Path
) -> None:
    service: ServiceProcess = make_service(
        NOT_FOUND_MAX_ATTEMPTS="1", PAUSED_BRAND_RETRY_SECONDS="1"
    )
    notify(service, 1001)
    notify(service, 99999)
    assert wait_until(lambda: logged(service, 1001) and letters(service), timeout=10)

    result = cli(tmp_path, "status", *remote(service), env=ADMIN_ENV)
    assert result.returncode == 0, result.stderr
    lines = [" ".join(line.split()) for line in result.stdout.splitlines()]
    assert "queue waiting in flight oldest" in lines
    assert "hydration 0 0 -" in lines
    assert "delivery:log 0 0 -" in lines
    assert "brand credentials budget left / per min poll watermark" in lines
    brand = next(line for line in lines if line.startswith("sandbox "))
    assert brand.startswith("sandbox accepted ")
    assert brand.endswith("/ 300 off")  # polling is off in the e2e environment
    assert "sink kind circuit in flight" in lines
    assert "log log closed 0" in lines
    assert "dead letters: hydration/not_found=1" in lines

    as_json = cli(tmp_path, "status", "--json", "--token", ADMIN_TOKEN, *remote(service))
    data = json.loads(as_json.stdout)
    assert data["dead_letters"] == {"hydration/not_found": 1}
    assert data["brands"]["sandbox"]["credentials"] == "accepted"

    # A paused brand, and its waiting work, are visible at a glance.
    clopos.state.reject_credentials("sandbox-client")
    clopos.state.expire_tokens()
    notify(service, 1002)
    assert wait_until(lambda: httpx.get(f"{service.url}/readyz").status_code == 503, timeout=10), (
        service.tail()
    )
    paused = cli(tmp_path, "status", *remote(service), env=ADMIN_ENV).stdout
    assert "sandbox  paused (credentials_rejected" in paused
    assert any(line.split()[:2] == ["hydration", "1"] for line in paused.splitlines()), paused
    clopos.state.reject_credentials("sandbox-client", on=False)
    assert wait_until(lambda: logged(service, 1002) == 1, timeout=15), service.tail()

    wrong = cli(tmp_path, "status", "--token", "wrong-token-0123456789", *remote(service))
    assert "401" in one_line_error(wrong)
    down = cli(tmp_path, "status", "--url", f"http://127.0.0.1:{free_port()}", env=ADMIN_ENV)
    assert "cannot reach" in one_line_error(down)


def test_dlq_list_show_replay_and_purge(make_service: Any, clopos: Clopos, tmp_path: Path) -> None:
    service: ServiceProcess = make_service(NOT_FOUND_MAX_ATTEMPTS="1")
    for order_id in (99001, 99002, 99003):
        notify(service, order_id)
    assert wait_until(lambda: len(letters(service)) == 3, timeout=10), service.tail()
    by_order = {d["order_id"]: d["id"] for d in letters(service)}

    def dlq(*args: str) -> subprocess.CompletedProcess[str]:
        return cli(tmp_path, "dlq", *args, *remote(service), env=ADMIN_ENV)

    listing = dlq("list")
    assert listing.returncode == 0, listing.stderr
    rows = [line.split() for line in listing.stdout.splitlines()]
    assert " ".join(rows[0]) == "id kind brand order sink reason tries at last error"
    assert {int(r[3]) for r in rows[2:5]} == set(by_order)
    assert all(
        r[1:3] == ["hydration", "sandbox"] and r[4:7] == ["-", "not_found", "1"] for r in rows[2:5]
    )
    assert "CloposNotFound" in listing.stdout
    assert listing.stdout.splitlines()[-1] == "3 of 3"

    first_page = dlq("list", "--limit", "2").stdout.splitlines()
    cursor = sorted(by_order.values())[1]
    assert first_page[-1] == f"2 of 3; next page: --after {cursor}"
    assert dlq("list", "--after", str(cursor)).stdout.splitlines()[-1] == "1 of 3"
    assert dlq("list", "--reason", "http_410").stdout.splitlines()[-1] == "0 of 0"
    as_json = json.loads(dlq("list", "--kind", "hydration", "--json").stdout)
    assert as_json["total"] == 3
    assert len(as_json["items"]) == 3

    shown = dlq("show", str(by_order[99001]))
    assert shown.returncode == 0
    letter = json.loads(shown.stdout)
    assert letter["order_id"] == 99001
    assert letter["reason"] == "not_found"

    # replay one (auto): the order exists now, so it is fetched and delivered
    clopos.state.put_order({"id": 99001})
    replayed = dlq("replay", str(by_order[99001]))
    assert (replayed.returncode, replayed.stdout) == (0, "replayed 1\n")
    assert wait_until(lambda: logged(service, 99001) == 1, timeout=10), service.tail()

    # replay by filter, as re-hydrations: 99002 now exists, 99003 still does not
    clopos.state.put_order({"id": 99002})
    replayed = dlq("replay", "--reason", "not_found", "--mode", "hydrate")
    assert replayed.stdout == "replayed 2\n"
    assert wait_until(lambda: logged(service, 99002) == 1, timeout=10), service.tail()
    assert wait_until(lambda: [d["order_id"] for d in letters(service)] == [99003], timeout=10)
    assert "give an id, a filter, or --all" in one_line_error(dlq("replay"))

    again = letters(service)[0]["id"]
    assert dlq("purge", str(again)).stdout == "purged 1\n"
    assert "404" in one_line_error(dlq("show", str(again)))
    assert "404" in one_line_error(dlq("purge", str(again)))
    assert "give an id, a filter, or --all" in one_line_error(dlq("purge"))

    notify(service, 99004)
    assert wait_until(lambda: len(letters(service)) == 1, timeout=10)
    assert dlq("purge", "--all").stdout == "purged 1\n"
    assert letters(service) == []


def test_hydrate_prints_the_snapshot_with_its_receipt(clopos: Clopos, tmp_path: Path) -> None:
    env = {
        **SANDBOX_CREDENTIALS,
        "CLOPOS_BASE_URL": clopos.url,
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
    }
    result = cli(tmp_path, "hydrate", "1001", env=env)
    assert result.returncode == 0, result.stderr
    snapshot = json.loads(result.stdout)
    schema = json.loads((ROOT / "app/schemas/order_hydrated.json").read_text())
    jsonschema.validate(snapshot, schema)
    assert snapshot["type"] == "order.hydrated"
    assert (snapshot["brand"], snapshot["order_id"]) == ("sandbox", 1001)
    stored = clopos.state.get_order(1001)
    assert stored is not None
    # The order verbatim, unknown fields included; the receipt as the embed shapes it.
    assert snapshot["order"] == {**stored, "receipt": snapshot["order"]["receipt"]}
    assert snapshot["order"]["receipt"]["id"] == 5001
    fetches = [c for c in clopos.state.calls if c.path == "/open-api/v2/orders/1001"]
    assert len(fetches) == 1
    assert fetches[0].query.get("with[0]", "").startswith("receipt:")

    with_venue = cli(tmp_path, "hydrate", "1002", "--venue", "1", "--brand", "sandbox", env=env)
    assert json.loads(with_venue.stdout)["order"]["receipt"] is None  # 1002 has no receipt yet
    venue_call = [c for c in clopos.state.calls if c.path == "/open-api/v2/orders/1002"]
    assert venue_call[0].headers.get("x-venue") == "1"

    missing = cli(tmp_path, "hydrate", "99999", env={**env, "LOG_LEVEL": "warning"})
    assert missing.returncode == 1
    assert missing.stdout == ""
    assert "CloposNotFound" in one_line_error(missing)
    other = one_line_error(cli(tmp_path, "hydrate", "1001", "--brand", "nope", env=env))
    assert "CLOPOS_BRAND" in other


def test_send_test_is_accepted_and_the_order_delivered(make_service: Any, tmp_path: Path) -> None:
    service: ServiceProcess = make_service()
    env = {"WEBHOOK_SECRET": WEBHOOK_SECRET}
    result = cli(tmp_path, "send-test", "1003", *remote(service), env=env)
    assert result.returncode == 0, result.stderr
    status, _, body = result.stdout.strip().partition(" ")
    assert status == "202"
    answer = json.loads(body)
    assert answer["accepted"]
    assert answer["order_id"] == 1003
    assert not answer["duplicate"]
    assert wait_until(lambda: logged(service, 1003) == 1, timeout=10), service.tail()

    branded = cli(
        tmp_path,
        "send-test",
        "1004",
        "--brand",
        "sandbox",
        "--venue",
        "1",
        *remote(service),
        env=env,
    )
    assert branded.stdout.startswith("202 ")
    assert wait_until(lambda: logged(service, 1004) == 1, timeout=10), service.tail()

    forged = cli(tmp_path, "send-test", "1005", "--secret", "not-the-secret", *remote(service))
    assert forged.returncode == 1
    assert forged.stdout.startswith("401 ")
    time.sleep(0.5)
    assert logged(service, 1005) == 0


def test_sandbox_command_serves_a_working_demo(tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "sandbox.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app", "sandbox", "--port", str(port)],
            cwd=tmp_path,
            env=BASE_ENV,
            stdout=log_file,
            stderr=log_file,
        )
    url = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            try:
                return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        assert wait_until(healthy, timeout=30), log_path.read_text()
        banner = log_path.read_text()
        assert "SANDBOX MODE" in banner
        assert f"POST {url}/webhooks/clopos" in banner
        assert f"curl -s -X POST '{url}/webhooks/clopos'" in banner
        accepted = httpx.post(
            f"{url}/webhooks/clopos",
            headers={"X-Webhook-Token": "sandbox-webhook-secret"},
            json={"event": "order.updated", "data": {"id": 1001}},
        )
        assert accepted.status_code == 202

        # The poller may deliver recently changed seed orders too: look for 1001's.
        def delivered_1001() -> list[dict[str, Any]]:
            events = log_events(log_path, "sink.log.order")
            return [e["body"] for e in events if e["body"]["order_id"] == 1001]

        assert wait_until(delivered_1001, timeout=15)
        body = delivered_1001()[0]
        assert body["order"]["receipt"]["id"] == 5001
        # Touching an order in the simulated Clopos notifies the service itself.
        touched = httpx.post(f"{url}/sandbox/_sandbox/orders/1002/touch")
        assert touched.status_code < 300
        assert wait_until(
            lambda: any(
                e["body"]["order_id"] == 1002 for e in log_events(log_path, "sink.log.order")
            ),
            timeout=15,
        )
        assert httpx.get(f"{url}/readyz").status_code == 200
        status = httpx.get(
            f"{url}/admin/status", headers={"Authorization": "Bearer sandbox-admin-token"}
        )
        assert status.status_code == 200
        assert (tmp_path / "data" / "sandbox.db").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal after its graceful shutdown: 143 is a clean stop.
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
    assert log_events(log_path, "service.stopped")
