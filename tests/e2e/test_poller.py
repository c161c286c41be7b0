"""The reconciliation poller, end to end: the real service process polls the sandbox.

No webhook is needed for a change to reach the sinks; a webhook and a poll of the same
change deliver it once; a restart resumes at the durable watermark; and polling spends
about one list call per cycle, with no 429.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.sandbox.orders import iso
from tests.e2e.conftest import Clopos
from tests.e2e.service import (
    ADMIN_TOKEN,
    WEBHOOK_SECRET,
    ServiceProcess,
    log_events,
    notify,
    wait_until,
)

LIST_PATH = "/open-api/v2/orders"
DETAIL_PATH = "/open-api/v2/orders/"
HEADERS = {"X-Webhook-Token": WEBHOOK_SECRET, "Content-Type": "application/json"}


def deliveries(paths: list[Path]) -> list[int]:
    """Order ids the log sink delivered, in order, across runs of the service."""
    return [e["body"]["order_id"] for p in paths for e in log_events(p, "sink.log.order")]


def list_calls(clopos: Clopos) -> int:
    return sum(1 for call in clopos.state.calls if call.path == LIST_PATH)


def detail_calls(clopos: Clopos, order_id: int) -> int:
    return clopos.state.count(f"{DETAIL_PATH}{order_id}")


def poll_cycles(service: ServiceProcess) -> float:
    """clopos_hydrator_poll_cycles_total summed over outcomes, read from /metrics."""
    text = httpx.get(f"{service.url}/metrics", timeout=5).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "clopos_hydrator_poll_cycles_total"
    )


def order_events(path: Path, event: str, order_id: int) -> list[dict[str, Any]]:
    return [e for e in log_events(path, event) if e.get("order_id") == order_id]


def test_changes_reach_the_sinks_without_any_webhook(make_service: Any, clopos: Clopos) -> None:
    now = time.time()
    # Changed before the service starts: within the lookback, and before it.
    clopos.state.update_order(1100, status="DELIVERED", updated_at=iso(now - 60))
    clopos.state.update_order(1200, status="DELIVERED", updated_at=iso(now - 600))
    service: ServiceProcess = make_service(POLL_INTERVAL_SECONDS="1", POLL_LOOKBACK_SECONDS="120")
    logs = [service.log_path]

    clopos.state.update_order(1005, status="DELIVERED")  # changed while it runs, no webhook
    clopos.state.update_order(1010, status="IGNORE")
    expected = {1100, 1005, 1010}
    assert wait_until(lambda: expected <= set(deliveries(logs)), timeout=20), service.tail()

    # Steady state: polls go on, one list call each, and fetch nothing more.
    cycles_before, lists_before = poll_cycles(service), list_calls(clopos)
    time.sleep(3.5)
    cycles = poll_cycles(service) - cycles_before
    lists = list_calls(clopos) - lists_before
    assert 2 <= cycles <= 5, cycles
    assert abs(lists - cycles) <= 1, (lists, cycles)

    # Each change delivered once, straight from the list pages (no detail call); the
    # seeded orders (540 s old and more) and the one changed before the lookback were not.
    assert sorted(deliveries(logs)) == sorted(expected)
    assert all(detail_calls(clopos, order_id) == 0 for order_id in expected)
    assert clopos.state.rate_limited() == 0
    first = log_events(service.log_path, "sink.log.order")[0]["body"]
    assert "receipt" in first["order"]
    assert first["hydrated_from"] == "order_list"
    stored = log_events(service.log_path, "list_hydration.stored")
    assert {e["order_id"] for e in stored} == expected
    assert log_events(service.log_path, "poller.order_changed") == []

    ready = httpx.get(f"{service.url}/readyz", timeout=5).json()
    assert ready["checks"]["poller:sandbox"]["ok"], ready
    status = httpx.get(
        f"{service.url}/admin/status",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=5,
    ).json()
    poll = status["brands"]["sandbox"]["poll"]
    assert poll["watermark"] is not None
    assert poll["last_outcome"] == "ok"


def test_a_webhook_and_a_poll_of_one_change_deliver_it_once(
    make_service: Any, clopos: Clopos
) -> None:
    service: ServiceProcess = make_service(POLL_INTERVAL_SECONDS="2", POLL_LOOKBACK_SECONDS="60")
    logs = [service.log_path]

    # Webhook first: right after a poll, so the webhook's fetch is done before the next.
    seen = list_calls(clopos)
    assert wait_until(lambda: list_calls(clopos) > seen, timeout=10)
    clopos.state.update_order(1020, status="DELIVERED")
    answer = httpx.post(
        f"{service.url}/webhooks/clopos", headers=HEADERS, json={"data": {"id": 1020}}, timeout=5
    )
    assert answer.status_code == 202
    assert wait_until(lambda: 1020 in deliveries(logs), timeout=10), service.tail()
    polled = list_calls(clopos)
    assert wait_until(lambda: list_calls(clopos) >= polled + 2, timeout=10)
    # The polls saw the state already stored: no notice, no second fetch.
    assert order_events(service.log_path, "poller.order_changed", 1020) == []
    assert detail_calls(clopos, 1020) == 1

    # Poll first: the change is found and delivered from the page; the late webhook
    # fetches the same state, which is not delivered again.
    clopos.state.update_order(1030, status="DELIVERED")
    assert wait_until(lambda: 1030 in deliveries(logs), timeout=10), service.tail()
    assert len(order_events(service.log_path, "list_hydration.stored", 1030)) == 1
    answer = httpx.post(
        f"{service.url}/webhooks/clopos", headers=HEADERS, json={"data": {"id": 1030}}, timeout=5
    )
    assert answer.status_code == 202

    def unchanged() -> bool:
        finished = order_events(service.log_path, "hydration.finished", 1030)
        return any(e["outcome"] == "unchanged" for e in finished)

    assert wait_until(unchanged, timeout=10), service.tail()
    time.sleep(0.5)
    assert deliveries(logs).count(1020) == 1
    assert deliveries(logs).count(1030) == 1
    assert clopos.state.rate_limited() == 0


def test_a_restart_resumes_at_the_watermark_beyond_its_lookback(
    make_service: Any, clopos: Clopos
) -> None:
    now = time.time()
    clopos.state.update_order(1040, status="DELIVERED", updated_at=iso(now - 50))
    first: ServiceProcess = make_service(
        "run1.log", POLL_INTERVAL_SECONDS="1", POLL_LOOKBACK_SECONDS="60"
    )
    assert wait_until(lambda: 1040 in deliveries([first.log_path]), timeout=15), first.tail()
    first.stop()

    # Changed while the service was down, 40 s ago: after the watermark (the change of
    # 1040, 50 s ago) but before what a first poll without a watermark would look at.
    clopos.state.update_order(1050, status="DELIVERED", updated_at=iso(time.time() - 40))
    second: ServiceProcess = make_service(
        "run2.log", POLL_INTERVAL_SECONDS="1", POLL_LOOKBACK_SECONDS="0"
    )
    assert wait_until(lambda: 1050 in deliveries([second.log_path]), timeout=15), second.tail()
    time.sleep(1.5)  # another cycle or so
    assert deliveries([second.log_path]) == [1050]  # 1040 was not hydrated again
    assert deliveries([first.log_path, second.log_path]).count(1040) == 1


@pytest.mark.parametrize(
    ("from_list", "a_found_by"), [("true", "webhook"), ("false", "webhook"), ("false", "poll")]
)
def test_a_second_change_in_the_same_whole_second_is_delivered(
    make_service: Any, clopos: Clopos, from_list: str, a_found_by: str
) -> None:
    """Issue 8 item 2, against the real process: state A is fetched and delivered; state
    B gets the same ``updated_at`` second and its webhook is lost. The poller must find B
    (states compare by content, not by the clock), whether it hydrates from the list
    page or enqueues a notice per change (HYDRATE_FROM_LIST=false). When the poller
    itself found A, its notice for A is stored under a dedup key: a key naming only the
    second (``poll:<id>:<second>``) would make B's notice a duplicate of A's."""
    service: ServiceProcess = make_service(
        POLL_INTERVAL_SECONDS="1", POLL_LOOKBACK_SECONDS="60", HYDRATE_FROM_LIST=from_list
    )
    logs = [service.log_path]
    stamp = iso(time.time())
    clopos.state.update_order(1060, status="RECEIVED", note="A", updated_at=stamp)
    if a_found_by == "webhook":
        notify(service, 1060)

    def notes() -> list[str]:
        return [
            e["body"]["order"].get("note")
            for e in log_events(service.log_path, "sink.log.order")
            if e["body"]["order_id"] == 1060
        ]

    assert wait_until(lambda: "A" in notes(), timeout=15), service.tail()
    clopos.state.update_order(1060, status="DELIVERED", note="B", updated_at=stamp)  # no webhook
    assert wait_until(lambda: "B" in notes(), timeout=15), service.tail()
    time.sleep(2.5)  # more polls of the same state B deliver nothing more
    assert notes() == ["A", "B"], notes()
    assert 1060 in deliveries(logs)
    # B was found by the path under test: a list page, or a notice the poller enqueued.
    found_by = "list_hydration.stored" if from_list == "true" else "poller.order_changed"
    assert [e for e in log_events(service.log_path, found_by) if e.get("order_id") == 1060]
    assert clopos.state.rate_limited() == 0


@pytest.mark.parametrize("from_list", ["true", "false"])
def test_a_stamp_in_the_future_does_not_hide_later_changes_from_the_poller(
    make_service: Any, clopos: Clopos, from_list: str
) -> None:
    """Issue 8 item 3, poll-only: a state stamped a day ahead is stored; the real change
    after it carries an honest (earlier) stamp and no webhook. The poller compares by
    content, so it must still find and deliver that change."""
    service: ServiceProcess = make_service(
        POLL_INTERVAL_SECONDS="1", POLL_LOOKBACK_SECONDS="60", HYDRATE_FROM_LIST=from_list
    )

    def notes() -> list[str]:
        return [
            e["body"]["order"].get("note")
            for e in log_events(service.log_path, "sink.log.order")
            if e["body"]["order_id"] == 1061
        ]

    clopos.state.update_order(1061, note="ahead", updated_at=iso(time.time() + 86_400))
    assert wait_until(lambda: "ahead" in notes(), timeout=15), service.tail()
    clopos.state.update_order(1061, note="real")  # stamped now: earlier than "ahead"
    assert wait_until(lambda: "real" in notes(), timeout=15), service.tail()
    time.sleep(2.5)  # further polls of "real" deliver nothing more
    assert notes() == ["ahead", "real"], notes()
    assert clopos.state.rate_limited() == 0
