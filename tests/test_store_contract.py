"""The store contract: what every backend must do, written against the port only.

Runs once per backend in ``conftest.STORE_BACKENDS``. Time is driven explicitly
(``now=`` arguments), never by sleeping.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import pytest

from app.errors import StoreError
from app.store.base import (
    DEFAULT_MAX_LOST_LEASES,
    LEASE_LOST,
    CompleteResult,
    DeadLetterFilter,
    Delivery,
    HydrationJob,
    KnownState,
    ListedState,
    NewSnapshot,
    Notification,
    PruneResult,
    QueueStats,
    ReplayMode,
    Store,
    TenantSpend,
    VenueBacklog,
)

T0 = 1_700_000_000.0
LEASE = 60.0
BRAND = "acme"


def notice(order_id: int, at: float = T0, brand: str = BRAND, **extra: Any) -> Notification:
    return Notification(brand=brand, order_id=order_id, received_at=at, **extra)


def snap(key: str, at: float = T0, updated: float | None = None) -> NewSnapshot:
    body = f'{{"key":"{key}"}}'.encode()
    return NewSnapshot(key=key, body=body, order_updated_at=updated, hydrated_at=at)


async def claim(store: Store, now: float = T0, limit: int = 10, **extra: Any) -> list[HydrationJob]:
    return await store.claim_hydrations(limit=limit, now=now, lease_seconds=LEASE, **extra)


async def claim_one(store: Store, now: float = T0, **extra: Any) -> HydrationJob:
    jobs = await claim(store, now, **extra)
    assert len(jobs) == 1, jobs
    return jobs[0]


async def hydrate(
    store: Store,
    order_id: int,
    key: str,
    now: float = T0,
    sinks: tuple[str, ...] = ("http",),
    updated: float | None = None,
    brand: str = BRAND,
    **extra: Any,
) -> CompleteResult:
    """One notice, one fetch, one completion."""
    await store.enqueue(notice(order_id, now, brand=brand, **extra))
    job = await claim_one(store, now)
    return await store.complete_hydration(job, snap(key, now, updated), list(sinks), now=now)


async def deliveries(store: Store, sink: str = "http", now: float = T0) -> list[Delivery]:
    return await store.claim_deliveries(sink=sink, limit=10, now=now, lease_seconds=LEASE)


# --- ingest -------------------------------------------------------------------------------


async def test_enqueue_creates_a_job_due_when_received(store: Store) -> None:
    result = await store.enqueue(notice(7, venue_id="v1"))
    assert not result.duplicate
    assert not result.coalesced
    assert result.notification_id is not None

    assert await claim(store, now=T0 - 1) == []
    job = await claim_one(store, now=T0)
    assert (job.id, job.brand, job.order_id, job.venue_id) == (result.job_id, BRAND, 7, "v1")
    assert (job.attempts, job.not_found_attempts, job.force) == (0, 0, False)
    assert job.notification_ids == (result.notification_id,)
    assert job.first_received_at == T0
    assert job.created_at == T0
    assert await claim(store, now=T0 + 1) == [], "a leased job is not handed out twice"


async def test_duplicate_is_dropped_and_reports_the_first_signed_at(store: Store) -> None:
    first = await store.enqueue(notice(7, dedup_key="msg-1", signed_at=111))
    again = await store.enqueue(notice(7, T0 + 5, dedup_key="msg-1", signed_at=222))
    assert again.duplicate
    assert again.notification_id is None
    assert again.job_id == first.job_id
    assert again.previous_signed_at == 111

    other_brand = await store.enqueue(notice(7, brand="other", dedup_key="msg-1"))
    assert not other_brand.duplicate, "dedup keys are per brand"
    without_key = [await store.enqueue(notice(8)) for _ in range(2)]
    assert not any(r.duplicate for r in without_key)

    jobs = {job.order_id: job for job in await claim(store, now=T0 + 10) if job.brand == BRAND}
    assert jobs[7].notification_ids == (first.notification_id,)
    assert len(jobs[8].notification_ids) == 2


async def test_a_dedup_key_reused_for_another_order_is_not_a_duplicate(store: Store) -> None:
    first = await store.enqueue(notice(7, dedup_key="msg-1", signed_at=111))
    other_order = await store.enqueue(notice(8, T0 + 1, dedup_key="msg-1", signed_at=111))
    assert not other_order.duplicate, "same id, another order: a new notice, not a repeat"
    assert other_order.notification_id is not None
    assert other_order.job_id != first.job_id

    # Repeats are still caught, and the replay evidence is per (brand, key, order).
    repeat = await store.enqueue(notice(8, T0 + 2, dedup_key="msg-1", signed_at=222))
    assert (repeat.duplicate, repeat.job_id, repeat.previous_signed_at) == (
        True,
        other_order.job_id,
        111,
    )
    assert (await store.enqueue(notice(7, T0 + 3, dedup_key="msg-1"))).duplicate

    jobs = {job.order_id: job for job in await claim(store, now=T0 + 10)}
    assert jobs[7].notification_ids == (first.notification_id,)
    assert jobs[8].notification_ids == (other_order.notification_id,)


async def test_notices_for_a_waiting_order_coalesce_into_one_fetch(store: Store) -> None:
    results = [await store.enqueue(notice(7, T0 + i)) for i in range(10)]
    await store.enqueue(notice(8, T0 + 3))
    assert [r.coalesced for r in results] == [False] + [True] * 9
    assert len({r.job_id for r in results}) == 1

    jobs = {job.order_id: job for job in await claim(store, now=T0 + 20)}
    assert set(jobs) == {7, 8}
    assert jobs[7].notification_ids == tuple(r.notification_id for r in results)
    assert jobs[7].first_received_at == T0


async def test_latest_venue_is_kept_for_the_fetch(store: Store) -> None:
    await store.enqueue(notice(7, venue_id="v1"))
    await store.enqueue(notice(7, T0 + 1, venue_id="v2"))
    await store.enqueue(notice(7, T0 + 2))  # no venue: keep the known one
    assert (await claim_one(store, now=T0 + 3)).venue_id == "v2"


# --- hydration queue ----------------------------------------------------------------------


async def test_claims_oldest_first_within_limit_and_skip_excluded_brands(store: Store) -> None:
    await store.enqueue(notice(1, T0 + 2))
    await store.enqueue(notice(2, T0))
    await store.enqueue(notice(3, T0 + 1, brand="paused"))
    await store.enqueue(notice(4, T0 + 1))

    first = await claim(store, now=T0 + 5, limit=2, exclude_brands=frozenset({"paused"}))
    assert [job.order_id for job in first] == [2, 4]
    rest = await claim(store, now=T0 + 5, exclude_brands=frozenset({"paused"}))
    assert [job.order_id for job in rest] == [1]
    assert [job.brand for job in await claim(store, now=T0 + 5)] == ["paused"]


async def test_notice_during_a_fetch_causes_exactly_one_more_fetch(store: Store) -> None:
    await store.enqueue(notice(7))
    job = await claim_one(store)
    late = [await store.enqueue(notice(7, T0 + i)) for i in (1, 2, 3)]
    assert all(r.coalesced for r in late)
    assert await claim(store, now=T0 + 4) == [], "one fetch in flight per order"

    done = await store.complete_hydration(job, snap("a", T0 + 5), ["http"], now=T0 + 5)
    assert (done.outcome, done.requeued) == ("stored", True)

    again = await claim_one(store, now=T0 + 5)
    assert again.id == job.id
    assert again.notification_ids == tuple(r.notification_id for r in late)
    assert again.first_received_at == T0 + 1
    final = await store.complete_hydration(again, snap("b", T0 + 6), ["http"], now=T0 + 6)
    assert (final.outcome, final.requeued, final.version) == ("stored", False, 2)
    assert await claim(store, now=T0 + 1000) == []


async def test_expired_lease_is_reclaimed_and_the_old_holder_loses(store: Store) -> None:
    await store.enqueue(notice(7))
    old = await claim_one(store, now=T0)
    assert await claim(store, now=T0 + LEASE - 1) == []
    new = await claim_one(store, now=T0 + LEASE + 1)
    assert new.id == old.id
    assert new.lease_token != old.lease_token

    lost = await store.complete_hydration(old, snap("a"), ["http"], now=T0 + 62)
    assert lost.outcome == "lost_lease"
    assert not await store.retry_hydration(old, retry_at=T0 + 100, error="x")
    assert not await store.release_hydration(old)
    assert not await store.dead_letter_hydration(old, reason="gave_up", error="x", now=T0 + 62)
    assert (await store.list_dead_letters(DeadLetterFilter())).total == 0
    assert await deliveries(store, now=T0 + 62) == []

    won = await store.complete_hydration(new, snap("a"), ["http"], now=T0 + 63)
    assert won.outcome == "stored"


async def test_attempts_count_at_claim_so_a_lost_lease_counts(store: Store) -> None:
    await store.enqueue(notice(7))
    await claim_one(store)  # its worker dies: nothing is recorded
    again = await claim_one(store, now=T0 + LEASE + 1)
    assert again.attempts == 1, "the attempt that lost its lease counts"
    assert await store.retry_hydration(
        again, retry_at=T0 + LEASE + 2, error="429", count_attempt=False
    )
    third = await claim_one(store, now=T0 + LEASE + 2)
    assert third.attempts == 1, "a 429 gives its attempt back; the lost one stays"
    assert await store.release_hydration(third)
    assert (await claim_one(store, now=T0 + LEASE + 3)).attempts == 1, "so does a release"


async def test_a_job_whose_lease_keeps_running_out_ends_in_a_dead_letter(store: Store) -> None:
    """A job that crashes the process (or outlives its lease) every time must not be
    retried forever: the third lost lease in a row ends it in a dead letter."""
    await store.enqueue(notice(7))
    at = T0
    for _ in range(DEFAULT_MAX_LOST_LEASES):
        await claim_one(store, now=at)  # and the worker vanishes
        at += LEASE + 1
    assert await claim(store, now=at) == [], "not tried again"
    (letter,) = (await store.list_dead_letters(DeadLetterFilter())).items
    assert (letter.kind, letter.reason, letter.order_id) == ("hydration", LEASE_LOST, 7)
    assert letter.attempts == DEFAULT_MAX_LOST_LEASES
    assert (await store.stats(now=at)).hydration == QueueStats(0, 0, None)

    await store.enqueue(notice(7, at))  # revives like any dead job, starting over
    assert (await claim_one(store, now=at)).attempts == 0


async def test_a_recorded_outcome_ends_a_run_of_lost_leases(store: Store) -> None:
    await store.enqueue(notice(7))
    at = T0
    for _ in range(2 * DEFAULT_MAX_LOST_LEASES):
        job = await claim_one(store, now=at)
        if job.attempts % 2:  # every other attempt records its failure
            assert await store.retry_hydration(job, retry_at=at, error="503")
        at += LEASE + 1
    assert (await store.list_dead_letters(DeadLetterFilter())).total == 0


async def test_running_work_extends_its_lease(store: Store) -> None:
    await store.enqueue(notice(7))
    job = await claim_one(store)
    assert await store.extend_hydration_lease(job, now=T0 + 50, lease_seconds=LEASE)
    assert await claim(store, now=T0 + LEASE + 1) == [], "the extended lease holds"
    thief = await claim_one(store, now=T0 + 50 + LEASE + 1)
    assert not await store.extend_hydration_lease(job, now=T0 + 112, lease_seconds=LEASE)
    assert await store.extend_hydration_lease(thief, now=T0 + 112, lease_seconds=LEASE)

    await hydrate(store, 8, "a")
    (delivery,) = await deliveries(store)
    assert await store.extend_delivery_lease(delivery, now=T0 + 50, lease_seconds=LEASE)
    assert await deliveries(store, now=T0 + LEASE + 1) == []
    (taken,) = await deliveries(store, now=T0 + 50 + LEASE + 1)
    assert taken.attempts == 1
    assert not await store.extend_delivery_lease(delivery, now=T0 + 112, lease_seconds=LEASE)


async def test_a_delivery_whose_lease_keeps_running_out_ends_in_a_dead_letter(
    store: Store,
) -> None:
    await hydrate(store, 7, "v1")
    at = T0
    for _ in range(DEFAULT_MAX_LOST_LEASES):
        (delivery,) = await deliveries(store, now=at)
        at += LEASE + 1
    assert await deliveries(store, now=at) == []
    (letter,) = (await store.list_dead_letters(DeadLetterFilter())).items
    assert (letter.kind, letter.reason, letter.sink) == ("delivery", LEASE_LOST, "http")
    assert (letter.attempts, letter.delivery_id) == (DEFAULT_MAX_LOST_LEASES, delivery.id)
    assert not await store.complete_delivery(delivery, now=at), "the last holder lost it"

    assert await store.replay_dead_letter(letter.id, now=at)
    (again,) = await deliveries(store, now=at)
    assert again.attempts == 0


async def test_unchanged_state_is_not_delivered_again(store: Store) -> None:
    first = await hydrate(store, 7, "a")
    assert (first.outcome, first.version, first.deliveries) == ("stored", 1, 1)
    same = await hydrate(store, 7, "a", now=T0 + 10)
    assert (same.outcome, same.snapshot_id, same.version) == ("unchanged", first.snapshot_id, 1)
    assert same.deliveries == 0
    assert [d.version for d in await deliveries(store, now=T0 + 10)] == [1]


async def test_forced_hydration_delivers_even_when_unchanged(store: Store) -> None:
    await hydrate(store, 7, "a")
    forced = await hydrate(store, 7, "a", now=T0 + 10, force=True)
    assert (forced.outcome, forced.version, forced.deliveries) == ("stored", 2, 1)
    plain = await hydrate(store, 7, "a", now=T0 + 20)
    assert plain.outcome == "unchanged", "force applies to one fetch only"


async def test_force_arriving_during_a_fetch_survives_it(store: Store) -> None:
    await store.enqueue(notice(7))
    job = await claim_one(store)
    await store.enqueue(notice(7, T0 + 1, force=True))
    first = await store.complete_hydration(job, snap("a"), ["http"], now=T0 + 2)
    assert (first.outcome, first.requeued) == ("stored", True)

    again = await claim_one(store, now=T0 + 2)
    assert again.force
    forced = await store.complete_hydration(again, snap("a"), ["http"], now=T0 + 3)
    assert (forced.outcome, forced.version) == ("stored", 2)


async def test_a_state_the_order_already_moved_past_is_stale(store: Store) -> None:
    await hydrate(store, 7, "old", updated=T0 - 50)
    await hydrate(store, 7, "new", now=T0 + 1, updated=T0 - 10)
    stale = await hydrate(store, 7, "old", now=T0 + 5, updated=T0 - 50)
    assert (stale.outcome, stale.deliveries, stale.version) == ("stale", 0, 2)
    assert await store.latest_snapshot_body(BRAND, 7) == b'{"key":"new"}'
    newer = await hydrate(store, 7, "newer", now=T0 + 6, updated=T0 - 5)
    assert (newer.outcome, newer.version) == ("stored", 3)


async def test_a_lagging_read_of_a_state_never_stored_is_stale(store: Store) -> None:
    """s1 and then s3 are stored; a read lagging behind returns s2, stamped between them
    and never stored. Content alone cannot tell it is older, an honest stamp can: it is
    stale, not a version 3 that a sink would receive after s3 (never backwards)."""
    await hydrate(store, 7, "s1", updated=T0 - 30)
    await hydrate(store, 7, "s3", now=T0 + 1, updated=T0)
    lagging = await hydrate(store, 7, "s2", now=T0 + 2, updated=T0 - 15)
    assert (lagging.outcome, lagging.deliveries, lagging.version) == ("stale", 0, 2)
    assert await store.latest_snapshot_body(BRAND, 7) == b'{"key":"s3"}'
    # Two states of one second are told apart by content: the second one is stored.
    same_second = await hydrate(store, 7, "s4", now=T0 + 3, updated=T0)
    assert (same_second.outcome, same_second.version) == ("stored", 3)


async def test_a_future_updated_at_does_not_freeze_the_order(store: Store) -> None:
    """Issue 8 item 3: Clopos stamped a state a day ahead; later real changes carry
    honest (earlier) stamps and must still be stored and delivered."""
    await hydrate(store, 7, "ahead", updated=T0 + 86_400)
    later = await hydrate(store, 7, "changed", now=T0 + 10, updated=T0 + 5)
    assert (later.outcome, later.version, later.deliveries) == ("stored", 2, 1)
    again = await hydrate(store, 7, "changed again", now=T0 + 20, updated=T0 + 15)
    assert (again.outcome, again.version) == ("stored", 3)
    assert await store.known_states(BRAND, [7]) == {7: KnownState("changed again", T0 + 15)}


async def test_a_forced_hydration_gets_through_whatever_it_fetched(store: Store) -> None:
    await hydrate(store, 7, "a", updated=T0 + 86_400)
    await hydrate(store, 7, "b", now=T0 + 1, updated=T0 + 86_401)
    forced = await hydrate(store, 7, "a", now=T0 + 2, updated=T0 + 86_400, force=True)
    assert (forced.outcome, forced.version, forced.deliveries) == ("stored", 3, 1)
    assert await store.latest_snapshot_body(BRAND, 7) == b'{"key":"a"}'


async def test_completion_without_sinks_stores_the_snapshot(store: Store) -> None:
    result = await hydrate(store, 7, "a", sinks=())
    assert (result.outcome, result.deliveries) == ("stored", 0)
    assert await store.latest_snapshot_body(BRAND, 7) == b'{"key":"a"}'


async def test_retry_waits_until_retry_at_and_counts_attempts(store: Store) -> None:
    await store.enqueue(notice(7))
    job = await claim_one(store)
    assert await store.retry_hydration(job, retry_at=T0 + 10, error="503")
    assert await claim(store, now=T0 + 9) == []
    job = await claim_one(store, now=T0 + 10)
    assert (job.attempts, job.not_found_attempts) == (1, 0)

    assert await store.retry_hydration(job, retry_at=T0 + 20, error="404", not_found=True)
    job = await claim_one(store, now=T0 + 20)
    assert (job.attempts, job.not_found_attempts) == (1, 1)

    assert await store.retry_hydration(job, retry_at=T0 + 30, error="429", count_attempt=False)
    job = await claim_one(store, now=T0 + 30)
    assert (job.attempts, job.not_found_attempts) == (1, 1)

    assert await store.release_hydration(job)
    released = await claim_one(store, now=T0 + 30)
    assert (released.id, released.attempts) == (job.id, 1), "release is not an attempt"


async def test_notice_does_not_cut_a_failure_backoff_short(store: Store) -> None:
    await store.enqueue(notice(7))
    job = await claim_one(store)
    await store.retry_hydration(job, retry_at=T0 + 100, error="503")
    assert (await store.enqueue(notice(7, T0 + 20))).coalesced
    assert await claim(store, now=T0 + 21) == []
    retried = await claim_one(store, now=T0 + 100)
    assert len(retried.notification_ids) == 2


async def test_notice_during_a_fetch_that_dead_letters_is_not_lost(store: Store) -> None:
    first = await store.enqueue(notice(7))
    job = await claim_one(store)
    assert await store.retry_hydration(job, retry_at=T0 + 1, error="404", not_found=True)
    job = await claim_one(store, now=T0 + 1)
    late = await store.enqueue(notice(7, T0 + 2))  # arrives while the fetch is in flight
    assert late.coalesced
    assert await store.dead_letter_hydration(job, reason="not_found", error="404", now=T0 + 3)

    (letter,) = (await store.list_dead_letters(DeadLetterFilter())).items
    assert (letter.reason, letter.attempts, letter.order_id) == ("not_found", 2, 7)
    again = await claim_one(store, now=T0 + 3)  # due at once, not waiting for a next notice
    assert again.id == job.id
    assert (again.attempts, again.not_found_attempts, again.force) == (0, 0, False)
    assert late.notification_id in again.notification_ids
    assert first.notification_id in again.notification_ids
    assert again.first_received_at == T0 + 2, "its age starts at the uncovered notice"


async def test_notice_during_a_retried_fetch_is_covered_by_the_retry(store: Store) -> None:
    await store.enqueue(notice(7))
    job = await claim_one(store)
    late = await store.enqueue(notice(7, T0 + 1))
    assert await store.retry_hydration(job, retry_at=T0 + 50, error="503")
    assert await claim(store, now=T0 + 49) == [], "an ordinary notice keeps the backoff"
    retried = await claim_one(store, now=T0 + 50)
    assert late.notification_id in retried.notification_ids
    assert retried.attempts == 1


async def test_admin_notice_cuts_a_failure_backoff_short(store: Store) -> None:
    await store.enqueue(notice(7))
    job = await claim_one(store)
    await store.retry_hydration(job, retry_at=T0 + 10, error="503")
    job = await claim_one(store, now=T0 + 10)
    await store.retry_hydration(job, retry_at=T0 + 86_400, error="503")

    admin = await store.enqueue(notice(7, T0 + 20, source="admin", force=True))
    assert admin.coalesced
    job = await claim_one(store, now=T0 + 20)
    assert (job.attempts, job.not_found_attempts, job.force) == (0, 0, True)


async def test_admin_notice_during_a_failing_fetch_cuts_its_backoff_short(store: Store) -> None:
    await store.enqueue(notice(7))
    job = await claim_one(store)
    await store.retry_hydration(job, retry_at=T0 + 1, error="503")
    job = await claim_one(store, now=T0 + 1)
    await store.enqueue(notice(7, T0 + 2, source="admin", force=True))
    assert await store.retry_hydration(job, retry_at=T0 + 86_400, error="503")

    again = await claim_one(store, now=T0 + 3)
    assert (again.attempts, again.force) == (0, True)


async def test_force_does_not_survive_a_dead_letter(store: Store) -> None:
    await hydrate(store, 7, "a")
    await store.enqueue(notice(7, T0 + 1, source="admin", force=True))
    forced = await claim_one(store, now=T0 + 1)
    assert forced.force
    assert await store.dead_letter_hydration(forced, reason="rejected", error="400", now=T0 + 2)

    plain = await hydrate(store, 7, "a", now=T0 + 3)
    assert (plain.outcome, plain.deliveries) == ("unchanged", 0), "no re-delivery"


async def test_force_asked_during_a_dead_lettered_fetch_survives_it(store: Store) -> None:
    await hydrate(store, 7, "a")
    await store.enqueue(notice(7, T0 + 1))
    job = await claim_one(store, now=T0 + 1)
    await store.enqueue(notice(7, T0 + 2, source="admin", force=True))
    assert await store.dead_letter_hydration(job, reason="rejected", error="400", now=T0 + 3)

    again = await claim_one(store, now=T0 + 3)
    assert again.force
    result = await store.complete_hydration(again, snap("a"), ["http"], now=T0 + 4)
    assert (result.outcome, result.version) == ("stored", 2)


async def test_notices_are_all_covered_when_a_requeued_fetch_is_unchanged(store: Store) -> None:
    await hydrate(store, 7, "a")
    await store.enqueue(notice(7, T0 + 1))
    job = await claim_one(store, now=T0 + 1)
    late = await store.enqueue(notice(7, T0 + 2))
    first = await store.complete_hydration(job, snap("a"), ["http"], now=T0 + 3)
    assert (first.outcome, first.requeued) == ("unchanged", True)

    again = await claim_one(store, now=T0 + 3)
    assert again.notification_ids == (late.notification_id,)
    second = await store.complete_hydration(again, snap("a"), ["http"], now=T0 + 4)
    assert (second.outcome, second.requeued) == ("unchanged", False)
    assert await claim(store, now=T0 + 1000) == []

    newest = await store.enqueue(notice(7, T0 + 5))
    assert (await claim_one(store, now=T0 + 5)).notification_ids == (newest.notification_id,)


async def test_dead_lettered_job_revives_on_the_next_notice(store: Store) -> None:
    await store.enqueue(notice(7))
    job = await claim_one(store)
    assert await store.dead_letter_hydration(job, reason="rejected", error="400", now=T0 + 1)
    assert await claim(store, now=T0 + 1000) == []
    (letter,) = (await store.list_dead_letters(DeadLetterFilter())).items
    assert (letter.kind, letter.reason, letter.last_error, letter.attempts) == (
        "hydration",
        "rejected",
        "400",
        1,
    )
    assert (letter.brand, letter.order_id, letter.sink, letter.job_id) == (BRAND, 7, None, job.id)

    revived = await store.enqueue(notice(7, T0 + 500))
    assert not revived.coalesced
    job = await claim_one(store, now=T0 + 500)
    assert (job.attempts, job.force) == (0, False)
    assert job.first_received_at == T0 + 500, "a revived job does not inherit the dead one's age"


# --- delivery queue -----------------------------------------------------------------------


async def test_delivery_carries_the_snapshot(store: Store) -> None:
    stored = await hydrate(store, 7, "snap_a", sinks=("http", "log"))
    (delivery,) = await deliveries(store, "http")
    assert (delivery.sink, delivery.brand, delivery.order_id, delivery.version) == (
        "http",
        BRAND,
        7,
        1,
    )
    assert delivery.snapshot_id == stored.snapshot_id
    assert (delivery.snapshot_key, delivery.body) == ("snap_a", b'{"key":"snap_a"}')
    assert (delivery.attempts, delivery.first_received_at, delivery.created_at) == (0, T0, T0)
    assert await deliveries(store, "http", now=T0 + 1) == [], "leased"
    assert [d.sink for d in await deliveries(store, "log")] == ["log"]
    assert await store.complete_delivery(delivery, now=T0 + 2)
    assert await deliveries(store, "http", now=T0 + 1000) == []


TRACE_A = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TRACE_B = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def test_traceparents_travel_from_the_notices_to_their_fetch_and_deliveries(
    store: Store,
) -> None:
    await store.enqueue(notice(7, traceparent=TRACE_A))
    await store.enqueue(notice(7, T0 + 1))  # the poller's, or tracing off: none
    await store.enqueue(notice(7, T0 + 2, traceparent=TRACE_B))
    job = await claim_one(store, T0 + 3)
    assert job.traceparents == (TRACE_A, TRACE_B)  # oldest first, the missing one left out
    await store.complete_hydration(job, snap("snap_a", T0 + 3), ["http"], now=T0 + 3)
    (delivery,) = await deliveries(store, "http", now=T0 + 4)
    assert delivery.traceparents == (TRACE_A, TRACE_B)
    await store.enqueue(notice(8))
    assert (await claim_one(store, T0 + 5)).traceparents == ()


async def test_newer_snapshot_supersedes_an_undelivered_older_one(store: Store) -> None:
    await hydrate(store, 7, "v1")
    await hydrate(store, 7, "v2", now=T0 + 1)
    claimed = await deliveries(store, now=T0 + 2)
    assert [d.version for d in claimed] == [2]
    assert await store.complete_delivery(claimed[0], now=T0 + 3)
    assert await deliveries(store, now=T0 + 1000) == [], "v1 is never sent"


async def test_one_delivery_in_flight_per_sink_and_order(store: Store) -> None:
    await hydrate(store, 7, "v1", sinks=("http", "log"))
    (first,) = await deliveries(store, "http")
    await hydrate(store, 7, "v2", now=T0 + 1, sinks=("http", "log"))
    await hydrate(store, 8, "other", now=T0 + 1, sinks=("http",))

    blocked = await deliveries(store, "http", now=T0 + 2)
    assert [(d.order_id, d.version) for d in blocked] == [(8, 1)], "order 7 waits for v1"
    log = await deliveries(store, "log", now=T0 + 2)
    assert [(d.order_id, d.version) for d in log] == [(7, 2)], "sinks are independent"

    assert await store.complete_delivery(first, now=T0 + 3)
    after = await deliveries(store, "http", now=T0 + 3)
    assert [(d.order_id, d.version) for d in after] == [(7, 2)]


async def test_sink_never_receives_an_older_version_after_a_newer_one(store: Store) -> None:
    await hydrate(store, 7, "v1")
    (v1,) = await deliveries(store)
    assert await store.dead_letter_delivery(v1, reason="rejected", error="400", now=T0 + 1)
    await hydrate(store, 7, "v2", now=T0 + 2)
    (v2,) = await deliveries(store, now=T0 + 2)
    assert await store.complete_delivery(v2, now=T0 + 3)

    # v2's delivery resolved v1's letter: nothing is left to replay backwards.
    assert (await store.list_dead_letters(DeadLetterFilter())).total == 0
    assert await deliveries(store, now=T0 + 5) == [], "v1 after v2 would go backwards"


async def test_two_due_versions_of_an_order_go_out_one_at_a_time_in_order(store: Store) -> None:
    await hydrate(store, 7, "v1")
    (v1,) = await deliveries(store)
    await store.dead_letter_delivery(v1, reason="rejected", error="400", now=T0 + 1)
    await hydrate(store, 7, "v2", now=T0 + 2)
    (letter,) = (await store.list_dead_letters(DeadLetterFilter())).items
    await store.replay_dead_letter(letter.id, mode="deliver", now=T0 + 2)

    received: list[int] = []
    for step in range(4):
        batch = await deliveries(store, now=T0 + 3 + step)
        assert len(batch) <= 1, "at most one per (sink, order) in a batch"
        for delivery in batch:
            received.append(delivery.version)
            assert await store.complete_delivery(delivery, now=T0 + 3 + step)
    assert received == sorted(received)
    assert received[-1] == 2


async def test_expired_delivery_lease_is_reclaimed_and_the_old_holder_loses(
    store: Store,
) -> None:
    await hydrate(store, 7, "v1")
    (old,) = await deliveries(store, now=T0)
    assert await deliveries(store, now=T0 + LEASE - 1) == []
    (new,) = await deliveries(store, now=T0 + LEASE + 1)
    assert new.id == old.id
    assert new.lease_token != old.lease_token
    assert not await store.complete_delivery(old, now=T0 + 62)
    assert not await store.retry_delivery(old, retry_at=T0 + 70, error="x")
    assert not await store.release_delivery(old)
    assert not await store.dead_letter_delivery(old, reason="x", error="x", now=T0 + 62)
    assert await store.complete_delivery(new, now=T0 + 63)


async def test_delivery_retry_and_release(store: Store) -> None:
    await hydrate(store, 7, "v1")
    (delivery,) = await deliveries(store)
    assert await store.retry_delivery(delivery, retry_at=T0 + 10, error="503")
    assert await deliveries(store, now=T0 + 9) == []
    (delivery,) = await deliveries(store, now=T0 + 10)
    assert delivery.attempts == 1
    assert await store.retry_delivery(delivery, retry_at=T0 + 20, error="429", count_attempt=False)
    (delivery,) = await deliveries(store, now=T0 + 20)
    assert delivery.attempts == 1
    assert await store.release_delivery(delivery)
    (delivery,) = await deliveries(store, now=T0 + 20)
    assert delivery.attempts == 1


# --- dead letters -------------------------------------------------------------------------


async def make_letters(store: Store) -> None:
    """Hydration letters for acme orders 1-3 (not_found), delivery letters for beta 4-5."""
    for order_id in (1, 2, 3):
        await store.enqueue(notice(order_id))
        job = await claim_one(store)
        await store.dead_letter_hydration(job, reason="not_found", error="404", now=T0 + 1)
    for order_id in (4, 5):
        await hydrate(store, order_id, f"k{order_id}", brand="beta")
        (delivery,) = await deliveries(store)
        await store.dead_letter_delivery(delivery, reason="rejected", error="400", now=T0 + 2)


async def test_dead_letters_are_listed_filtered_and_paginated(store: Store) -> None:
    await make_letters(store)
    everything = await store.list_dead_letters(DeadLetterFilter())
    assert everything.total == 5
    assert everything.next_cursor is None
    ids = [letter.id for letter in everything.items]
    assert ids == sorted(ids)

    by = store.list_dead_letters
    assert (await by(DeadLetterFilter(brand="beta"))).total == 2
    assert (await by(DeadLetterFilter(sink="http"))).total == 2
    assert (await by(DeadLetterFilter(reason="not_found"))).total == 3
    assert (await by(DeadLetterFilter(kind="delivery", reason="not_found"))).total == 0
    (delivery_letter, _) = (await by(DeadLetterFilter(kind="delivery"))).items
    assert (delivery_letter.sink, delivery_letter.snapshot_key) == ("http", "k4")
    assert delivery_letter.delivery_id is not None
    assert delivery_letter.attempts == 1

    page1 = await by(DeadLetterFilter(), limit=2)
    assert [x.id for x in page1.items] == ids[:2]
    assert page1.total == 5
    page2 = await by(DeadLetterFilter(), limit=2, after_id=page1.next_cursor)
    page3 = await by(DeadLetterFilter(), limit=2, after_id=page2.next_cursor)
    assert [x.id for x in page2.items + page3.items] == ids[2:]
    assert page3.next_cursor is None

    assert await store.get_dead_letter(ids[0]) == everything.items[0]
    assert await store.get_dead_letter(max(ids) + 100) is None


async def test_a_later_hydration_success_resolves_the_orders_letters(store: Store) -> None:
    async def dead_letter(order_id: int, at: float) -> None:
        await store.enqueue(notice(order_id, at))
        job = await claim_one(store, now=at)
        assert await store.dead_letter_hydration(job, reason="gave_up", error="503", now=at)

    await hydrate(store, 2, "b")
    await hydrate(store, 3, "old")
    await hydrate(store, 3, "c", now=T0 + 0.5)
    for order_id in (1, 2, 3, 4):
        await dead_letter(order_id, T0 + 1)
    # A success of each kind: stored (1), unchanged (2), stale (3). Order 4 stays failed.
    outcomes = [
        (await hydrate(store, 1, "a", now=T0 + 2)).outcome,
        (await hydrate(store, 2, "b", now=T0 + 3)).outcome,
        (await hydrate(store, 3, "old", now=T0 + 4)).outcome,
    ]
    assert outcomes == ["stored", "unchanged", "stale"]
    (left,) = (await store.list_dead_letters(DeadLetterFilter())).items
    assert left.order_id == 4


async def test_a_later_delivery_resolves_older_delivery_letters_of_that_sink(
    store: Store,
) -> None:
    await hydrate(store, 7, "v1", sinks=("http", "log"))
    await hydrate(store, 8, "other", sinks=("http",))
    for sink in ("http", "log"):
        for delivery in await deliveries(store, sink):
            await store.dead_letter_delivery(delivery, reason="rejected", error="400", now=T0)
    await hydrate(store, 7, "v2", now=T0 + 1, sinks=("http", "log"))
    (v2,) = await deliveries(store, "http", now=T0 + 1)
    assert await store.complete_delivery(v2, now=T0 + 2)

    left = (await store.list_dead_letters(DeadLetterFilter())).items
    assert sorted((x.sink, x.order_id) for x in left) == [("http", 8), ("log", 7)], (
        "only http's letter of order 7 is resolved"
    )


async def test_an_older_delivery_does_not_resolve_a_newer_letter(store: Store) -> None:
    await hydrate(store, 7, "v1")
    (v1,) = await deliveries(store)
    await store.dead_letter_delivery(v1, reason="rejected", error="400", now=T0 + 1)
    await hydrate(store, 7, "v2", now=T0 + 2)
    (v2,) = await deliveries(store, now=T0 + 2)
    await store.dead_letter_delivery(v2, reason="rejected", error="400", now=T0 + 3)
    v1_letter = next(
        x
        for x in (await store.list_dead_letters(DeadLetterFilter())).items
        if x.delivery_id == v1.id
    )
    # v2 was attempted: replaying v1 supersedes it instead of sending it (never backwards).
    assert await store.replay_dead_letter(v1_letter.id, now=T0 + 4)
    assert await deliveries(store, now=T0 + 4) == []

    (left,) = (await store.list_dead_letters(DeadLetterFilter())).items
    assert left.delivery_id == v2.id, "v2 was never delivered: its letter stands"
    assert await store.replay_dead_letter(left.id, now=T0 + 5)
    (again,) = await deliveries(store, now=T0 + 5)
    assert again.version == 2
    assert await store.complete_delivery(again, now=T0 + 6)
    assert (await store.list_dead_letters(DeadLetterFilter())).total == 0


async def test_an_older_version_is_never_sent_after_a_newer_one_was_attempted(
    store: Store,
) -> None:
    """v1 times out (outcome unknown), v2 is sent and its answer is late too: v1 is
    superseded, although no newer version is known to be delivered."""
    await hydrate(store, 7, "v1")
    (v1,) = await deliveries(store)
    await hydrate(store, 7, "v2", now=T0 + 1)  # while v1 is on the wire
    assert await store.retry_delivery(v1, retry_at=T0 + 2, error="timeout")
    (v2,) = await deliveries(store, now=T0 + 2)
    assert v2.version == 2, "the newest waiting version goes first"
    assert await store.retry_delivery(v2, retry_at=T0 + 50, error="timeout")

    sent = [d.version for d in await deliveries(store, now=T0 + 10)]
    sent += [d.version for d in await deliveries(store, now=T0 + 60)]
    assert sent == [2], "v1 after an attempted v2 could land after it"
    assert (await store.stats(now=T0 + 60)).deliveries["http"].pending == 0


async def test_a_lost_lease_on_an_older_version_is_not_resent_after_a_newer_one(
    store: Store,
) -> None:
    await hydrate(store, 7, "v1")
    (v1,) = await deliveries(store)
    await hydrate(store, 7, "v2", now=T0 + 1)
    # v1's sender vanished (its lease runs out); v1 is claimed again, then v2.
    (again,) = await deliveries(store, now=T0 + LEASE + 1)
    assert again.version == 1, "the same version again is not backwards"
    assert await store.retry_delivery(again, retry_at=T0 + LEASE + 100, error="timeout")
    (v2,) = await deliveries(store, now=T0 + LEASE + 2)
    assert v2.version == 2
    assert not await store.complete_delivery(v1, now=T0 + LEASE + 3), "old lease is void"
    await store.release_delivery(v2)
    versions = [d.version for d in await deliveries(store, now=T0 + LEASE + 200)]
    assert versions == [2]


@pytest.mark.parametrize("mode", ["auto", "deliver"])
async def test_replaying_an_older_letter_after_a_newer_attempt_sends_nothing(
    store: Store, mode: ReplayMode
) -> None:
    await hydrate(store, 7, "v1")
    (v1,) = await deliveries(store)
    await hydrate(store, 7, "v2", now=T0 + 1)
    await store.dead_letter_delivery(v1, reason="gave_up", error="timeout", now=T0 + 2)
    (v2,) = await deliveries(store, now=T0 + 2)
    assert await store.retry_delivery(v2, retry_at=T0 + 1000, error="timeout")

    (letter,) = (await store.list_dead_letters(DeadLetterFilter())).items
    assert await store.replay_dead_letter(letter.id, mode=mode, now=T0 + 3)
    assert await store.get_dead_letter(letter.id) is None
    assert await deliveries(store, now=T0 + 3) == [], "v1 is superseded"
    assert await claim(store, now=T0 + 3) == [], "and no re-fetch either"
    assert [d.version for d in await deliveries(store, now=T0 + 1000)] == [2]


async def test_prune_never_lets_an_old_delivery_letter_go_out_over_a_newer_state(
    store: Store,
) -> None:
    await hydrate(store, 7, "v1")
    (v1,) = await deliveries(store)
    await store.dead_letter_delivery(v1, reason="rejected", error="400", now=T0 + 1)
    await hydrate(store, 7, "v2", now=T0 + 2)
    (v2,) = await deliveries(store, now=T0 + 2)
    assert await store.complete_delivery(v2, now=T0 + 3)

    await store.prune(older_than=T0 + 10_000)
    for letter in (await store.list_dead_letters(DeadLetterFilter())).items:
        await store.replay_dead_letter(letter.id, mode="deliver", now=T0 + 10_000)
    assert await deliveries(store, now=T0 + 10_001) == [], "v1 after v2 would go backwards"


async def test_prune_keeps_the_delivered_version_an_older_retry_waits_behind(
    store: Store,
) -> None:
    """Issue 8 item 6: a short retention removed a delivered v2 while v1 waited in its
    backoff, and v1 then went out."""
    await hydrate(store, 7, "v1")
    (v1,) = await deliveries(store)
    await hydrate(store, 7, "v2", now=T0 + 1)  # while v1 is on the wire
    assert await store.retry_delivery(v1, retry_at=T0 + 500, error="timeout")
    (v2,) = await deliveries(store, now=T0 + 2)
    assert await store.complete_delivery(v2, now=T0 + 3)

    await store.prune(older_than=T0 + 400)
    assert await deliveries(store, now=T0 + 600) == [], "v1 after v2 would go backwards"


async def test_prune_keeps_the_newest_attempted_version_while_an_older_letter_exists(
    store: Store,
) -> None:
    await hydrate(store, 7, "v1")
    (v1,) = await deliveries(store)
    assert await store.dead_letter_delivery(v1, reason="rejected", error="400", now=T0 + 1)
    await hydrate(store, 7, "v2", now=T0 + 2)
    (v2,) = await deliveries(store, now=T0 + 2)
    # v2's outcome is unknown (it timed out at the end), and its letter is purged.
    assert await store.dead_letter_delivery(v2, reason="gave_up", error="timeout", now=T0 + 3)
    v2_letter = next(
        x
        for x in (await store.list_dead_letters(DeadLetterFilter())).items
        if x.delivery_id == v2.id
    )
    assert await store.purge_dead_letter(v2_letter.id)

    await store.prune(older_than=T0 + 10_000)
    (v1_letter,) = (await store.list_dead_letters(DeadLetterFilter())).items
    assert await store.replay_dead_letter(v1_letter.id, mode="deliver", now=T0 + 10_000)
    assert await deliveries(store, now=T0 + 10_001) == [], "v2 was attempted: v1 stays back"

    # Once nothing older can go out, the attempted version is pruned like any other.
    assert (await store.prune(older_than=T0 + 20_000)).deliveries == 2


async def test_an_absurd_id_raises_store_error(store: Store) -> None:
    absurd = 2**70  # more than any backend's integer holds
    with pytest.raises(StoreError):
        await store.get_dead_letter(absurd)
    with pytest.raises(StoreError):
        await store.replay_dead_letter(absurd, now=T0)
    with pytest.raises(StoreError):
        await store.purge_dead_letter(absurd)
    await store.ping()  # and the store carries on


async def test_replaying_a_hydration_letter_forces_a_fresh_fetch(store: Store) -> None:
    await hydrate(store, 1, "same")
    await store.enqueue(notice(1, T0 + 1))
    job = await claim_one(store, now=T0 + 1)
    await store.retry_hydration(job, retry_at=T0 + 2, error="503")
    job = await claim_one(store, now=T0 + 2)
    await store.dead_letter_hydration(job, reason="gave_up", error="503", now=T0 + 3)
    (letter,) = (await store.list_dead_letters(DeadLetterFilter())).items
    assert letter.attempts == 2

    assert await store.replay_dead_letter(letter.id, now=T0 + 10)
    assert await store.get_dead_letter(letter.id) is None
    assert not await store.replay_dead_letter(letter.id, now=T0 + 10)
    job = await claim_one(store, now=T0 + 10)
    assert (job.force, job.attempts) == (True, 0)
    result = await store.complete_hydration(job, snap("same"), ["http"], now=T0 + 11)
    assert (result.outcome, result.version) == ("stored", 2), "forced: delivered though unchanged"


async def test_replaying_a_delivery_letter_redelivers_its_snapshot(store: Store) -> None:
    await hydrate(store, 4, "k4")
    (delivery,) = await deliveries(store)
    await store.retry_delivery(delivery, retry_at=T0 + 1, error="503")
    (delivery,) = await deliveries(store, now=T0 + 1)
    await store.dead_letter_delivery(delivery, reason="gave_up", error="503", now=T0 + 2)
    assert await deliveries(store, now=T0 + 1000) == []
    (letter,) = (await store.list_dead_letters(DeadLetterFilter())).items
    assert letter.attempts == 2

    assert await store.replay_dead_letter(letter.id, now=T0 + 100)
    (again,) = await deliveries(store, now=T0 + 100)
    assert (again.id, again.attempts, again.body) == (delivery.id, 0, delivery.body)
    assert await claim(store, now=T0 + 100) == [], "no re-fetch for a re-delivery"


async def test_replay_modes_choose_between_refetch_and_redelivery(store: Store) -> None:
    await make_letters(store)
    letters = (await store.list_dead_letters(DeadLetterFilter())).items
    hydration_letter, delivery_letter = letters[0], letters[3]

    assert await store.replay_dead_letter(delivery_letter.id, mode="hydrate", now=T0 + 10)
    job = await claim_one(store, now=T0 + 10)
    assert (job.brand, job.order_id, job.force) == ("beta", 4, True)
    assert await deliveries(store, now=T0 + 10) == [], "hydrate mode does not resend"

    assert await store.replay_dead_letter(hydration_letter.id, mode="deliver", now=T0 + 10)
    job = await claim_one(store, now=T0 + 10)
    assert (job.order_id, job.force) == (hydration_letter.order_id, True)


async def test_replay_many_and_purge(store: Store) -> None:
    await make_letters(store)
    replayed = await store.replay_dead_letters(
        DeadLetterFilter(kind="hydration"), now=T0 + 10, limit=2
    )
    assert replayed == 2
    assert len(await claim(store, now=T0 + 10)) == 2
    assert (await store.list_dead_letters(DeadLetterFilter())).total == 3

    first = (await store.list_dead_letters(DeadLetterFilter())).items[0]
    assert await store.purge_dead_letter(first.id)
    assert not await store.purge_dead_letter(first.id)
    assert await store.purge_dead_letters(DeadLetterFilter(brand="beta")) == 2
    assert (await store.list_dead_letters(DeadLetterFilter())).total == 0
    assert await claim(store, now=T0 + 11) == [], "purging does not re-queue anything"


# --- upkeep and observation ---------------------------------------------------------------


async def test_prune_removes_finished_work_and_keeps_live_work(store: Store) -> None:
    # Finished: order 1 fetched twice, both versions delivered.
    for version, key in enumerate(("a", "b"), start=1):
        await hydrate(store, 1, key, now=T0 + version)
        (delivery,) = await deliveries(store, now=T0 + version)
        await store.complete_delivery(delivery, now=T0 + version)
    # Live: a waiting notice (2), an undelivered snapshot (3), a dead letter (4),
    # and an order with delivered history that is being fetched again (5).
    await hydrate(store, 3, "c")
    await hydrate(store, 4, "d", sinks=("log",))
    (dead,) = await deliveries(store, "log")
    await store.dead_letter_delivery(dead, reason="rejected", error="400", now=T0)
    for version, key in enumerate(("e1", "e2"), start=1):
        await hydrate(store, 5, key, now=T0 + version, sinks=("log",))
        (delivery,) = await deliveries(store, "log", now=T0 + version)
        await store.complete_delivery(delivery, now=T0 + version)
    await store.enqueue(notice(5, T0 + 5))
    await store.enqueue(notice(2))

    assert (await store.prune(older_than=T0 - 1)).total == 0, "nothing is old enough yet"
    result = await store.prune(older_than=T0 + 10_000)
    # Deliveries: 1 and 5 (two each). Notices: all but the two waiting ones. Jobs: the
    # finished 1, 3 and 4. Snapshots: both of 1 (its job is gone) and 5's older one.
    assert result == PruneResult(jobs=3, notifications=6, snapshots=3, deliveries=4)

    assert await store.latest_snapshot_body(BRAND, 1) is None
    jobs = await claim(store, now=T0 + 10_000)
    assert sorted(job.order_id for job in jobs) == [2, 5]
    (undelivered,) = await deliveries(store, now=T0 + 10_000)
    assert undelivered.order_id == 3
    (letter,) = (await store.list_dead_letters(DeadLetterFilter())).items
    assert await store.replay_dead_letter(letter.id, now=T0 + 10_000)
    (redelivery,) = await deliveries(store, "log", now=T0 + 10_000)
    assert redelivery.order_id == 4

    # Order 5 kept its newest snapshot: the same state is recognised as unchanged.
    assert await store.latest_snapshot_body(BRAND, 5) == b'{"key":"e2"}'
    job5 = next(job for job in jobs if job.order_id == 5)
    same = await store.complete_hydration(job5, snap("e2"), ["log"], now=T0 + 10_001)
    assert (same.outcome, same.version) == ("unchanged", 2)


async def test_an_order_pruned_away_starts_over_cleanly(store: Store) -> None:
    await hydrate(store, 1, "a")
    (delivery,) = await deliveries(store)
    await store.complete_delivery(delivery, now=T0)
    assert (await store.prune(older_than=T0 + 100)).jobs == 1
    again = await hydrate(store, 1, "a", now=T0 + 200)
    assert again.outcome == "stored"
    (delivery,) = await deliveries(store, now=T0 + 200)
    assert delivery.order_id == 1


async def test_stats_count_queues_ages_and_dead_letters(store: Store) -> None:
    empty = await store.stats(now=T0)
    assert empty.hydration == QueueStats(pending=0, running=0, oldest_pending_age=None)
    assert empty.deliveries == {}
    assert empty.dead_letters == {}

    await hydrate(store, 3, "c", now=T0, sinks=("http", "log"))
    await store.enqueue(notice(4, T0 + 1))
    job = await claim_one(store, now=T0 + 1)
    await store.dead_letter_hydration(job, reason="not_found", error="404", now=T0 + 2)
    (delivery,) = await deliveries(store, "log", now=T0 + 2)
    await store.dead_letter_delivery(delivery, reason="rejected", error="400", now=T0 + 2)
    await store.enqueue(notice(1, T0 + 10))
    await claim_one(store, now=T0 + 10)  # order 1 is now in flight
    await store.enqueue(notice(2, T0 + 20))

    stats = await store.stats(now=T0 + 100)
    assert stats.hydration == QueueStats(pending=1, running=1, oldest_pending_age=90)
    assert stats.deliveries == {
        "http": QueueStats(pending=1, running=0, oldest_pending_age=100),
    }
    assert stats.dead_letters == {
        ("hydration", "not_found", ""): 1,
        ("delivery", "rejected", "log"): 1,
    }


async def test_stats_age_only_due_work(store: Store) -> None:
    await store.enqueue(notice(1))
    job = await claim_one(store)
    await store.retry_hydration(job, retry_at=T0 + 86_400, error="503")
    await hydrate(store, 2, "b", sinks=("http",))
    (delivery,) = await deliveries(store)
    await store.retry_delivery(delivery, retry_at=T0 + 86_400, error="503")

    backoff_only = await store.stats(now=T0 + 100)
    assert backoff_only.hydration == QueueStats(pending=1, running=0, oldest_pending_age=None)
    assert backoff_only.deliveries == {
        "http": QueueStats(pending=1, running=0, oldest_pending_age=None)
    }

    await hydrate(store, 4, "d", now=T0 + 60)  # due work: a delivery, then a notice
    await store.enqueue(notice(3, T0 + 50))
    stats = await store.stats(now=T0 + 100)
    assert stats.hydration == QueueStats(pending=2, running=0, oldest_pending_age=50)
    assert stats.deliveries["http"] == QueueStats(pending=2, running=0, oldest_pending_age=40)

    due = await store.stats(now=T0 + 86_400)  # the backoffs are over: that work ages again
    assert due.hydration.oldest_pending_age == 86_400
    assert due.deliveries["http"].oldest_pending_age == 86_400


async def test_latest_snapshot_body_and_ping(store: Store) -> None:
    assert await store.latest_snapshot_body(BRAND, 7) is None
    await hydrate(store, 7, "a")
    await hydrate(store, 7, "b", now=T0 + 1)
    assert await store.latest_snapshot_body(BRAND, 7) == b'{"key":"b"}'
    assert await store.latest_snapshot_body("other", 7) is None
    await store.ping()


# --- reconciliation poller ----------------------------------------------------------------


async def test_poll_watermark_is_per_brand_and_never_moves_backwards(store: Store) -> None:
    assert await store.get_poll_watermark(BRAND) is None
    assert await store.set_poll_watermark(BRAND, T0 + 10, now=T0) == T0 + 10
    assert await store.set_poll_watermark("other", T0 - 500, now=T0) == T0 - 500

    # An older position (a slow cycle finishing after a newer one) keeps the newer one.
    assert await store.set_poll_watermark(BRAND, T0 + 5, now=T0 + 1) == T0 + 10
    assert await store.get_poll_watermark(BRAND) == T0 + 10
    assert await store.set_poll_watermark(BRAND, T0 + 20.5, now=T0 + 2) == T0 + 20.5
    assert await store.get_poll_watermark(BRAND) == T0 + 20.5
    assert await store.get_poll_watermark("other") == T0 - 500


async def test_known_states_are_the_newest_stored_states(store: Store) -> None:
    assert await store.known_states(BRAND, []) == {}
    await hydrate(store, 1, "a", updated=T0 - 100)
    await hydrate(store, 1, "b", now=T0 + 1, updated=T0 - 50)
    await hydrate(store, 2, "c", updated=None)  # a snapshot without a usable updated_at
    await hydrate(store, 1, "x", updated=T0 - 200, brand="other")
    await store.enqueue(notice(3))  # waiting: nothing stored yet

    known = await store.known_states(BRAND, [1, 2, 3, 4])
    assert known == {
        1: KnownState("b", T0 - 50),
        2: KnownState("c", None),
        3: KnownState(),
        4: KnownState(),
    }
    assert await store.known_states("other", [1, 2]) == {
        1: KnownState("x", T0 - 200),
        2: KnownState(),
    }


async def test_known_states_ignores_an_older_state_fetched_later(store: Store) -> None:
    await hydrate(store, 1, "old", updated=T0 - 30)
    await hydrate(store, 1, "new", now=T0 + 1, updated=T0)
    result = await hydrate(store, 1, "old", now=T0 + 2, updated=T0 - 30)
    assert result.outcome == "stale"
    assert await store.known_states(BRAND, [1]) == {1: KnownState("new", T0)}


async def test_known_states_survives_the_order_being_pruned_and_revived(store: Store) -> None:
    await hydrate(store, 1, "a", updated=T0 - 10)
    delivery = (await deliveries(store))[0]
    await store.complete_delivery(delivery, now=T0)
    await store.prune(older_than=T0 + 1)
    # Pruned with its job: the order is unknown again (a poll would fetch it once more).
    assert await store.known_states(BRAND, [1]) == {1: KnownState()}
    await hydrate(store, 1, "b", now=T0 + 2, updated=T0 + 1)
    assert await store.known_states(BRAND, [1]) == {1: KnownState("b", T0 + 1)}


async def test_poll_notices_of_one_state_are_duplicates(store: Store) -> None:
    # The poller's dedup key names the order's state: a second poll of it adds nothing.
    first = await store.enqueue(notice(9, source="poller", dedup_key="poll:9:1700000000"))
    again = await store.enqueue(notice(9, T0 + 30, source="poller", dedup_key="poll:9:1700000000"))
    newer = await store.enqueue(notice(9, T0 + 60, source="poller", dedup_key="poll:9:1700000060"))
    assert not first.duplicate
    assert again.duplicate
    assert again.job_id == first.job_id
    assert not newer.duplicate
    assert newer.coalesced  # the job still waits: one fetch covers both states
    job = await claim_one(store, now=T0 + 60)
    assert len(job.notification_ids) == 2


# --- the Clopos rate budget's spend --------------------------------------------------------


async def test_budget_spend_is_read_back_per_tenant_oldest_first(store: Store) -> None:
    assert await store.budget_spend_since(0) == {}
    await store.record_budget_spend("i:a", at=T0 + 1, limit=300)
    await store.record_budget_spend("i:b", at=T0 + 2, limit=300)
    await store.record_budget_spend("i:a", at=T0 + 3, limit=60)  # Clopos said 60 meanwhile
    spent = await store.budget_spend_since(T0)
    assert spent == {
        "i:a": TenantSpend(times=(T0 + 1, T0 + 3), limit=60),
        "i:b": TenantSpend(times=(T0 + 2,), limit=300),
    }
    later = await store.budget_spend_since(T0 + 1)
    assert later == {
        "i:a": TenantSpend(times=(T0 + 3,), limit=60),
        "i:b": TenantSpend(times=(T0 + 2,), limit=300),
    }, "only calls after `since`"


async def test_budget_spend_older_than_two_minutes_is_forgotten(store: Store) -> None:
    await store.record_budget_spend("i:a", at=T0, limit=300)
    await store.record_budget_spend("i:a", at=T0 + 100, limit=300)
    assert (await store.budget_spend_since(0))["i:a"].times == (T0, T0 + 100)
    await store.record_budget_spend("i:a", at=T0 + 121, limit=300)
    assert (await store.budget_spend_since(0))["i:a"].times == (T0 + 100, T0 + 121)


# --- enqueue_many ---------------------------------------------------------------------------


async def test_enqueue_many_answers_each_notice_as_enqueue_would(store: Store) -> None:
    first = await store.enqueue(notice(5, dedup_key="seen"))
    results = await store.enqueue_many(
        [
            notice(9, T0 + 1),
            notice(5, T0 + 1, dedup_key="seen"),  # a repeat of an earlier message
            notice(8, T0 + 1, dedup_key="new"),
            notice(9, T0 + 2),  # the same order twice in one batch: one job
            notice(8, T0 + 2, dedup_key="new"),  # a repeat within the batch
        ]
    )
    assert [r.duplicate for r in results] == [False, True, False, False, True]
    assert results[1].job_id == first.job_id
    assert results[3].job_id == results[0].job_id
    assert (results[0].coalesced, results[3].coalesced) == (False, True)
    assert results[4].job_id == results[2].job_id
    jobs = {job.order_id: job for job in await claim(store, now=T0 + 5)}
    assert sorted(jobs) == [5, 8, 9]
    assert jobs[9].notification_ids == (results[0].notification_id, results[3].notification_id)
    assert jobs[8].notification_ids == (results[2].notification_id,)
    assert await store.enqueue_many([]) == []


# --- racing claimers ------------------------------------------------------------------------


async def test_racing_claimers_never_share_a_job(store: Store) -> None:
    for order_id in range(1, 41):
        await store.enqueue(notice(order_id))
    claimed: list[HydrationJob] = []
    for _ in range(10):
        batches = await asyncio.gather(*(claim(store, limit=7) for _ in range(8)))
        claimed += [job for batch in batches for job in batch]
    ids = [job.id for job in claimed]
    assert len(ids) == len(set(ids)) == 40, "every job once, none twice"


async def test_racing_claimers_never_share_a_delivery_nor_an_order(store: Store) -> None:
    for order_id in range(1, 21):
        await hydrate(store, order_id, f"k{order_id}", sinks=("http", "log"))
    for order_id in range(1, 6):  # a second version of some: still one in flight per order
        await hydrate(store, order_id, f"k{order_id}b", now=T0 + 1, sinks=("http", "log"))
    claimed: list[Delivery] = []
    for _ in range(5):
        batches = await asyncio.gather(
            *(deliveries(store, sink, now=T0 + 2) for sink in ("http", "log") for _ in range(4))
        )
        claimed += [d for batch in batches for d in batch]
    ids = [d.id for d in claimed]
    assert len(ids) == len(set(ids))
    in_flight = [(d.sink, d.order_id) for d in claimed]
    assert len(in_flight) == len(set(in_flight)) == 40, "one per (sink, order)"
    assert all(d.version == 2 for d in claimed if d.order_id <= 5), "the newest of each"


@pytest.mark.parametrize("write_first", [True, False])
async def test_a_claim_on_an_expired_lease_races_the_old_claimants_late_write(
    store: Store, write_first: bool
) -> None:
    await store.enqueue(notice(7))
    old = await claim_one(store)
    late = T0 + LEASE + 1
    write = store.complete_hydration(old, snap("a"), ["http"], now=late)
    steal = claim(store, now=late)
    if write_first:
        result, stolen = await asyncio.gather(write, steal)
    else:
        stolen, result = await asyncio.gather(steal, write)
    if result.outcome == "stored":
        assert stolen == [], "the job was done: nothing to claim"
    else:
        assert result.outcome == "lost_lease"
        assert [job.id for job in stolen] == [old.id]
    assert (result.outcome == "stored") != bool(stolen), "exactly one of them wins"

    # The same race for a delivery.
    await hydrate(store, 8, "b", now=late, sinks=("log",))
    (delivery,) = await deliveries(store, "log", now=late)
    later = late + LEASE + 1
    done_write = store.complete_delivery(delivery, now=later)
    steal_delivery = deliveries(store, "log", now=later)
    if write_first:
        completed, taken = await asyncio.gather(done_write, steal_delivery)
    else:
        taken, completed = await asyncio.gather(steal_delivery, done_write)
    assert completed != bool(taken), "delivered, or taken over: never both"


# --- list pages (app/list_hydration.py) -----------------------------------------------------


def _render(key: str, ids: tuple[int, ...], received_at: float) -> bytes:
    return f'{{"key":"{key}","ids":{list(ids)},"received_at":{received_at}}}'.encode()


def listed(order_id: int, key: str, updated: float | None = T0) -> ListedState:
    # A partial, not a closure: the SQLite store renders in its writer process.
    return ListedState(order_id, "1", key, updated, functools.partial(_render, key))


async def test_a_page_covers_only_notices_received_before_it_was_read(store: Store) -> None:
    await store.enqueue(notice(1, T0))
    await store.enqueue(notice(1, T0 + 10))  # after the read below
    [result] = await store.apply_listed(
        BRAND, [listed(1, "a")], ["http"], read_at=T0 + 5, now=T0 + 6
    )
    assert (result.outcome, result.satisfied, result.version, result.deliveries) == (
        "stored",
        1,
        1,
        1,
    )
    [delivery] = await deliveries(store, now=T0 + 6)
    assert delivery.body == b'{"key":"a","ids":[1],"received_at":1700000000.0}'
    # The later notice keeps the job due; its fetch finds the same state: nothing new.
    job = await claim_one(store, T0 + 10)
    assert job.notification_ids == (2,)
    done = await store.complete_hydration(job, snap("a", T0 + 11, T0), ["http"], now=T0 + 11)
    assert done.outcome == "unchanged"
    assert await claim(store, T0 + 100) == []


async def test_a_listed_state_equal_to_the_stored_one_delivers_nothing(store: Store) -> None:
    await hydrate(store, 1, "a", updated=T0)
    await store.enqueue(notice(1, T0 + 1))
    results = await store.apply_listed(
        BRAND, [listed(1, "a"), listed(2, "b")], ["http"], read_at=T0 + 2, now=T0 + 3
    )
    assert [(r.order_id, r.outcome, r.satisfied) for r in results] == [
        (1, "unchanged", 1),
        (2, "stored", 0),  # never seen: a job of its own, nothing waiting
    ]
    assert await claim(store, T0 + 100) == []
    sent = await deliveries(store, now=T0 + 100)
    assert [(d.order_id, d.version) for d in sent] == [(1, 1), (2, 1)]  # 1's from its fetch
    assert await store.known_states(BRAND, [2]) == {2: KnownState("b", T0)}


async def test_listed_states_never_go_backwards(store: Store) -> None:
    await hydrate(store, 1, "new", now=T0 + 10, updated=T0 + 5)
    older = await store.apply_listed(
        BRAND, [listed(1, "old", T0)], ["http"], read_at=T0 + 20, now=T0 + 21
    )
    # Same second, other content, read before the stored state was: nobody can tell.
    tied = await store.apply_listed(
        BRAND, [listed(1, "tie", T0 + 5)], ["http"], read_at=T0 + 9, now=T0 + 21
    )
    later = await store.apply_listed(
        BRAND, [listed(1, "later", T0 + 5)], ["http"], read_at=T0 + 11, now=T0 + 22
    )
    assert [older[0].outcome, tied[0].outcome, later[0].outcome] == [
        "stale",
        "ambiguous",
        "stored",
    ]
    assert await store.known_states(BRAND, [1]) == {1: KnownState("later", T0 + 5)}
    # A state the order already had ("new"), listed again later: stale, not a change.
    again = await store.apply_listed(
        BRAND, [listed(1, "new", T0 + 5)], ["http"], read_at=T0 + 30, now=T0 + 31
    )
    assert again[0].outcome == "stale"


async def test_a_stored_stamp_in_the_future_does_not_freeze_listed_changes(store: Store) -> None:
    await hydrate(store, 1, "future", now=T0 + 1, updated=T0 + 3600)  # the stamp lies
    [result] = await store.apply_listed(
        BRAND, [listed(1, "real", T0 + 10)], ["http"], read_at=T0 + 11, now=T0 + 12
    )
    assert result.outcome == "stored"


async def test_a_page_defers_orders_a_fetch_owns_and_skips_unasked_ones(store: Store) -> None:
    await hydrate(store, 3, "c", updated=T0)  # done: nothing waits
    await store.enqueue(notice(1, T0))
    job = await claim_one(store, T0)  # in flight
    await store.enqueue(notice(2, T0, force=True))  # an operator's forced fetch
    owned = await store.apply_listed(
        BRAND, [listed(1, "a"), listed(2, "b")], ["http"], read_at=T0 + 5, now=T0 + 6
    )
    assert [r.outcome for r in owned] == ["deferred", "deferred"]
    unasked = await store.apply_listed(
        BRAND,
        [listed(3, "c2", T0 + 1), listed(4, "d")],
        ["http"],
        read_at=T0 + 5,
        now=T0 + 6,
        notified_only=True,  # backlog mode: only orders with notices waiting
    )
    assert [r.outcome for r in unasked] == ["skipped", "skipped"]
    assert await store.known_states(BRAND, [4]) == {4: KnownState()}
    assert job.order_id == 1


async def test_due_work_by_venue(store: Store) -> None:
    for order_id, venue, at in [(1, None, T0), (2, None, T0 + 1), (3, "7", T0 + 2)]:
        await store.enqueue(notice(order_id, at, venue_id=venue))
    await store.enqueue(notice(4, T0 + 50))  # not due yet at T0 + 10
    groups = await store.due_by_venue(BRAND, now=T0 + 10)
    assert groups == [VenueBacklog(None, 2, T0), VenueBacklog("7", 1, T0 + 2)]
    assert await store.due_by_venue("other", now=T0 + 10) == []
