"""Pure pieces: the retry policy and the snapshot id/body."""

from __future__ import annotations

import json
import random
from typing import Any

from app.retry import RetryPolicy
from app.snapshot import build_body, parse_clopos_time, snapshot_key


def test_backoff_is_bounded_jittered_and_grows() -> None:
    policy = RetryPolicy(base=2, cap=600)
    rng = random.Random(7)
    first = [policy.backoff(1, rng) for _ in range(200)]
    late = [policy.backoff(12, rng) for _ in range(200)]
    assert all(0.2 <= d <= 2 for d in first)
    assert all(0.2 <= d <= 600 for d in late)
    assert max(late) > 100  # grew to the cap's range
    assert len({round(d, 3) for d in first}) > 100  # jittered, not a fixed ladder


def test_retry_after_is_a_floor_and_age_ends_in_dead_letter() -> None:
    policy = RetryPolicy(base=1, cap=60, give_up_after=3600)
    decision = policy.on_failure(attempt=1, age=0, retry_after=45, rng=random.Random(1))
    assert decision.action == "retry"
    assert decision.delay >= 45
    # At the give-up age any further wait ends it (a fixed seed: with full jitter the
    # delay may be under a second, which is what made age=3599 flaky).
    for seed in range(50):
        late = policy.on_failure(attempt=30, age=3600, rng=random.Random(seed))
        assert (late.action, late.reason) == ("dead_letter", "gave_up")
    # Well before it, with the cap at 60 s, the work is retried.
    assert policy.on_failure(attempt=30, age=3500, rng=random.Random(1)).action == "retry"


def test_not_found_is_retried_a_few_times_over_minutes() -> None:
    policy = RetryPolicy(not_found_attempts=5, not_found_base=30)
    delays = [policy.on_not_found(not_found_attempt=n).delay for n in range(1, 5)]
    assert 15 <= delays[0] <= 30
    assert sum(delays) < 15 * 60
    last = policy.on_not_found(not_found_attempt=5)
    assert (last.action, last.reason) == ("dead_letter", "not_found")


def test_snapshot_key_depends_on_content_only() -> None:
    order = {"id": 5, "status": "PENDING", "receipt": None, "b": [1, 2]}
    same = {"b": [1, 2], "receipt": None, "status": "PENDING", "id": 5}
    assert snapshot_key("x", 5, order) == snapshot_key("x", 5, same)
    assert snapshot_key("x", 5, order) != snapshot_key("x", 5, {**order, "status": "RECEIVED"})
    assert snapshot_key("x", 5, order) != snapshot_key("y", 5, order)
    assert snapshot_key("x", 5, order).startswith("snap_")


def test_body_keeps_the_order_verbatim() -> None:
    order = {"id": 5, "receipt": {"id": 9, "status": 2}, "x_unknown": {"deep": [1, "é"]}}
    body = json.loads(
        build_body(
            key="snap_1",
            brand="b",
            order_id=5,
            order=order,
            notification_ids=[3, 4],
            received_at=0,
            hydrated_at=1.5,
        )
    )
    assert body["order"] == order
    assert body["type"] == "order.hydrated"
    assert body["received_at"] == "1970-01-01T00:00:00.000Z"
    assert body["hydrated_at"] == "1970-01-01T00:00:01.500Z"


def test_both_clopos_time_formats_parse() -> None:
    a = parse_clopos_time("2026-02-02T17:46:02.000000Z")
    b = parse_clopos_time("2026-02-02 17:46:02")
    assert a == b
    assert a is not None
    assert parse_clopos_time("yesterday") is None
    assert parse_clopos_time(None) is None


def test_body_says_which_read_produced_it_and_the_id_does_not_depend_on_it() -> None:
    order = {"id": 5, "receipt": None, "updated_at": "2026-02-02T17:46:02.000000Z"}
    common: dict[str, Any] = {
        "key": snapshot_key("b", 5, order),
        "brand": "b",
        "order_id": 5,
        "order": order,
        "notification_ids": [],
        "received_at": 0,
        "hydrated_at": 1,
    }
    detail = json.loads(build_body(**common))
    listed = json.loads(build_body(**common, hydrated_from="order_list"))
    assert (detail["hydrated_from"], listed["hydrated_from"]) == ("order", "order_list")
    assert detail["id"] == listed["id"]
