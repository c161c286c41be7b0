"""The whole pipeline, with the real service process and the sandbox over loopback."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.conftest import Clopos
from tests.e2e.service import WEBHOOK_SECRET, ServiceProcess, log_events, wait_until

HEADERS = {"X-Webhook-Token": WEBHOOK_SECRET, "Content-Type": "application/json"}


def delivered(paths: list[Path]) -> list[dict[str, Any]]:
    """Bodies the log sink emitted, across every run of the service."""
    return [event["body"] for path in paths for event in log_events(path, "sink.log.order")]


def delivered_ids(paths: list[Path]) -> set[int]:
    return {body["order_id"] for body in delivered(paths)}


async def post_many(url: str, order_ids: list[int], concurrency: int = 16) -> dict[int, int]:
    """POST one notification per order id; return order id -> status (0 = no answer)."""
    statuses: dict[int, int] = {}
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=10) as client:

        async def one(order_id: int) -> None:
            async with gate:
                try:
                    response = await client.post(
                        f"{url}/webhooks/clopos",
                        headers=HEADERS,
                        json={"event": "order.updated", "data": {"id": order_id}},
                    )
                    statuses[order_id] = response.status_code
                except httpx.TransportError:
                    statuses[order_id] = 0

        await asyncio.gather(*(one(i) for i in order_ids))
    return statuses


def test_kill_9_mid_burst_loses_nothing(make_service: Any, clopos: Clopos, tmp_path: Path) -> None:
    # Slow Clopos down so a good part of the burst is still queued when the process dies.
    clopos.state.latency_seconds = 0.05
    first: ServiceProcess = make_service("run1.log")
    order_ids = list(range(1001, 1201))

    async def burst_then_kill() -> dict[int, int]:
        task = asyncio.create_task(post_many(first.url, order_ids, concurrency=8))
        # Kill once about half of the notifications have been acknowledged.
        while len(log_events(first.log_path, "webhook.accepted")) < 100 and not task.done():
            await asyncio.sleep(0.01)
        first.kill(signal.SIGKILL)
        return await task

    statuses = asyncio.run(burst_then_kill())
    acked = {order_id for order_id, status in statuses.items() if status == 202}
    assert len(acked) >= 100
    assert all(status in (202, 0) for status in statuses.values()), statuses
    before = delivered_ids([first.log_path])
    assert acked - before, "the kill came too late to test anything"

    second: ServiceProcess = make_service("run2.log")
    logs = [first.log_path, second.log_path]
    assert wait_until(lambda: acked <= delivered_ids(logs), timeout=90), (
        f"lost after kill -9: {sorted(acked - delivered_ids(logs))[:20]}"
    )
    # Every delivered body carries the receipt, as fetched from Clopos.
    assert all("receipt" in body["order"] for body in delivered(logs))
    assert clopos.state.rate_limited() == 0


def test_storm_for_one_order_is_coalesced_and_newest_wins(
    make_service: Any, clopos: Clopos
) -> None:
    clopos.state.latency_seconds = 0.4  # the first fetch is in flight during the storm
    service: ServiceProcess = make_service()

    async def storm() -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            body = {"data": {"id": 1001}}
            url = f"{service.url}/webhooks/clopos"
            first = await client.post(url, headers=HEADERS, json=body)
            assert first.status_code == 202
            await asyncio.sleep(0.1)
            clopos.state.update_order(1001, status="DELIVERED")  # the newest state
            answers = await asyncio.gather(
                *(client.post(url, headers=HEADERS, json=body) for _ in range(19))
            )
            assert {a.status_code for a in answers} == {202}

    asyncio.run(storm())
    logs = [service.log_path]
    assert wait_until(
        lambda: any(b["order"]["status"] == "DELIVERED" for b in delivered(logs)), timeout=30
    ), service.tail()
    time.sleep(1.0)  # any extra fetch would have happened by now
    fetches = clopos.state.count("/open-api/v2/orders/1001")
    assert 1 <= fetches <= 2, fetches
    bodies = [b for b in delivered(logs) if b["order_id"] == 1001]
    assert bodies[-1]["order"]["status"] == "DELIVERED"
    # Every notification was covered by one of the (at most two) fetches; a fetch that
    # found the state already delivered delivers nothing new.
    fetches_logged = [
        e for e in log_events(service.log_path, "hydration.finished") if e["order_id"] == 1001
    ]
    assert sum(e["notifications"] for e in fetches_logged) == 20
    assert len(fetches_logged) == fetches


def test_faults_and_short_tokens_still_deliver_everything_without_429(
    make_service: Any, clopos: Clopos
) -> None:
    state = clopos.state
    state.token_ttl_seconds = 8  # refreshed every ~7 s: short, yet under the auth floor
    state.inject("500", count=3)
    state.inject("504", count=2)
    state.inject("success_false", count=2)
    service: ServiceProcess = make_service(CLOPOS_RATE_LIMIT_PER_MINUTE="300")
    order_ids = list(range(1001, 1041))

    async def send_in_waves() -> None:
        for start in range(0, len(order_ids), 10):
            statuses = await post_many(service.url, order_ids[start : start + 10])
            assert set(statuses.values()) == {202}
            await asyncio.sleep(3.0)  # the waves span more than one token lifetime

    asyncio.run(send_in_waves())
    logs = [service.log_path]
    assert wait_until(lambda: set(order_ids) <= delivered_ids(logs), timeout=60), service.tail()
    assert state.rate_limited() == 0
    assert state.auth_calls() >= 2  # tokens expired and were renewed
    assert state.count("/open-api/v2/orders", status=500) >= 1


def test_hostile_requests_get_4xx_and_never_reach_clopos(make_service: Any, clopos: Clopos) -> None:
    service: ServiceProcess = make_service()
    url = f"{service.url}/webhooks/clopos"
    good = json.dumps({"data": {"id": 1001}}).encode()
    now = str(int(time.time()))
    deep = ("[" * 20_000 + "]" * 20_000).encode()
    deep_obj = b'{"data":' + b'{"a":' * 20_000 + b"1" + b"}" * 20_000 + b"}"
    cases: list[tuple[str, dict[str, str], bytes, str]] = [
        ("no token", {}, good, ""),
        ("wrong token", {"X-Webhook-Token": "wrong"}, good, ""),
        ("wrong query token", {}, good, "?token=wrong"),
        (
            "forged signature",
            {"webhook-id": "m1", "webhook-timestamp": now, "webhook-signature": "v1,Zm9yZ2Vk"},
            good,
            "",
        ),
        (
            "stale signature",
            {
                "webhook-id": "m2",
                "webhook-timestamp": str(int(time.time()) - 3600),
                "webhook-signature": "v1,Zm9yZ2Vk",
            },
            good,
            "",
        ),
        ("not json", HEADERS, b"order 1001 changed", ""),
        ("truncated", HEADERS, good[:-3], ""),
        ("an array", HEADERS, b"[1001]", ""),
        ("no id", HEADERS, b'{"data": {"name": "x"}}', ""),
        ("object id", HEADERS, b'{"data": {"id": {"$gt": 1}}}', ""),
        ("negative id", HEADERS, b'{"data": {"id": -5}}', ""),
        ("zero id", HEADERS, b'{"id": 0}', ""),
        ("400-digit id", HEADERS, b'{"id": ' + b"9" * 400 + b"}", ""),
        ("float id", HEADERS, b'{"id": 1001.5}', ""),
        ("bool id", HEADERS, b'{"id": true}', ""),
        ("bad venue", HEADERS, b'{"data": {"id": 1001, "venue_id": "1; DROP"}}', ""),
        ("2 MB body", HEADERS, b'{"id": 1001, "pad": "' + b"x" * 2_000_000 + b'"}', ""),
        ("deep array", HEADERS, deep, ""),
        ("deep object", HEADERS, deep_obj, ""),
        ("invalid utf-8", HEADERS, b'{"id": "\xff\xfe"}', ""),
    ]
    with httpx.Client(timeout=10) as client:
        for name, headers, body, query in cases:
            response = client.post(url + query, headers=headers, content=body)
            assert 400 <= response.status_code < 500, (name, response.status_code, response.text)
            assert response.json()["message"], name
        # An unknown brand is a 401 to a stranger (no probing of brand names), and a
        # 404 only to a caller holding the secret.
        stranger = client.post(f"{url}/nope", content=good)
        assert stranger.status_code == 401, stranger.text
        insider = client.post(f"{url}/nope", headers=HEADERS, content=good)
        assert insider.status_code == 404, insider.text
        # A replayed signed message: a valid signature, sent twice.
        from app.signing import sign

        ts = int(time.time())
        headers = {
            "webhook-id": "msg-replay",
            "webhook-timestamp": str(ts),
            "webhook-signature": sign([WEBHOOK_SECRET], "msg-replay", ts, good),
        }
        assert client.post(url, headers=headers, content=good).status_code == 202
        replay = client.post(url, headers=headers, content=good)
        assert replay.status_code == 409, replay.text
    assert service.proc is not None
    assert service.proc.poll() is None  # still alive
    time.sleep(1.0)
    # Only the one valid signed notification reached Clopos, and only for its order.
    order_calls = [c for c in clopos.state.calls if c.path.startswith("/open-api/v2/orders")]
    assert {c.path for c in order_calls} <= {"/open-api/v2/orders/1001"}
    assert len(order_calls) == 1  # the one valid signed notification was fetched
    # A malformed optional idempotency header is ignored, not a reason to refuse.
    odd = httpx.post(url, headers={**HEADERS, "Idempotency-Key": "has spaces"}, content=good)
    assert odd.status_code == 202, odd.text
