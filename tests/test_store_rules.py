"""The queue's decisions (app/store/rules.py), tested without any database.

The store contract suite (tests/test_store_contract.py) shows each backend applies them;
here each rule's cases are spelled out on plain values.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from app.store import rules, sql
from app.store.base import Notification

NOW = 1_700_000_000.0
WAITING = rules.JobState(
    status="pending",
    venue_id="v1",
    generation=3,
    force_generation=0,
    attempts=0,
    not_found_attempts=0,
    retry_at=NOW + 50,  # due later (e.g. a notice that came in ahead of time)
    pending_since=NOW - 10,
    last_error=None,
)


def notice(**extra: Any) -> Notification:
    return Notification(brand="b", order_id=1, received_at=NOW, **extra)


# --- on_notice --------------------------------------------------------------------------------


def test_a_notice_coalesces_into_a_waiting_job_and_makes_it_due() -> None:
    patch = rules.on_notice(WAITING, notice())
    assert patch.coalesced
    assert (patch.status, patch.generation, patch.retry_at) == ("pending", 4, NOW)
    assert patch.pending_since == NOW - 10, "the oldest waiting notice sets the age"
    assert patch.venue_id == "v1", "a notice without a venue keeps the known one"
    assert rules.on_notice(WAITING, notice(venue_id="v2")).venue_id == "v2"


def test_a_notice_does_not_cut_a_failure_backoff_short_but_an_operator_does() -> None:
    failing = replace(WAITING, attempts=2, not_found_attempts=1, last_error="503")
    plain = rules.on_notice(failing, notice())
    assert (plain.retry_at, plain.attempts, plain.not_found_attempts) == (NOW + 50, 2, 1)
    for source in ("admin", "replay"):
        operator = rules.on_notice(failing, notice(source=source))
        assert (operator.retry_at, operator.attempts, operator.not_found_attempts) == (NOW, 0, 0)


def test_a_notice_during_a_fetch_only_moves_the_generation() -> None:
    running = replace(WAITING, status="running", attempts=1)
    patch = rules.on_notice(running, notice())
    assert patch.coalesced
    assert (patch.status, patch.generation, patch.retry_at, patch.attempts) == (
        "running",
        4,
        NOW + 50,
        1,
    )
    forced = rules.on_notice(running, notice(force=True))
    assert forced.force_generation == 4, "a force asked during a fetch outlives it"


@pytest.mark.parametrize("status", ["done", "dead"])
def test_a_notice_revives_finished_work_starting_over(status: str) -> None:
    finished = replace(
        WAITING, status=status, attempts=3, not_found_attempts=2, last_error="x", pending_since=None
    )
    patch = rules.on_notice(finished, notice())
    assert not patch.coalesced
    assert (patch.status, patch.attempts, patch.not_found_attempts, patch.last_error) == (
        "pending",
        0,
        0,
        None,
    )
    assert (patch.retry_at, patch.pending_since) == (NOW, NOW)


def test_patch_columns_bind_every_column_of_the_update() -> None:
    columns = rules.on_notice(WAITING, notice(force=True)).columns()
    assert set(columns) == {
        "status",
        "venue_id",
        "generation",
        "force_generation",
        "attempts",
        "not_found_attempts",
        "retry_at",
        "pending_since",
        "last_error",
    }
    assert columns["force_generation"] == columns["generation"] == 4


# --- fetched_state and requeued ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "forced", "seen_before", "outcome"),
    [
        ("new", False, False, "stored"),
        ("latest", False, True, "unchanged"),
        ("older", False, True, "stale"),  # a state the order already moved past
        ("latest", True, True, "stored"),  # forced: delivered though unchanged
        ("older", True, True, "stored"),  # forced: gets through whatever it fetched
    ],
)
def test_states_are_compared_by_content(
    key: str, forced: bool, seen_before: bool, outcome: str
) -> None:
    assert (
        rules.fetched_state(key=key, latest_key="latest", forced=forced, seen_before=seen_before)
        == outcome
    )


def test_the_first_state_of_an_order_is_stored() -> None:
    assert rules.fetched_state(key="k", latest_key=None, forced=False, seen_before=False) == (
        "stored"
    )


def test_a_job_is_requeued_only_when_notices_arrived_during_its_fetch() -> None:
    assert rules.requeued(generation=5, claimed_generation=4)
    assert not rules.requeued(generation=4, claimed_generation=4)


# --- leases -----------------------------------------------------------------------------------


def test_running_work_is_abandoned_at_the_lost_lease_limit() -> None:
    assert not rules.abandoned(status="running", lost_leases=1, max_lost_leases=3)
    assert rules.abandoned(status="running", lost_leases=2, max_lost_leases=3)
    assert not rules.abandoned(status="pending", lost_leases=9, max_lost_leases=3), (
        "waiting work lost nothing"
    )
    assert rules.abandoned(status="running", lost_leases=0, max_lost_leases=1)
    assert "3 times in a row" in rules.lease_lost_error(2)


# --- deliveries -------------------------------------------------------------------------------


def test_an_older_version_is_overtaken_by_any_newer_attempt() -> None:
    assert rules.overtaken(1, 2)
    assert not rules.overtaken(2, 2), "the same version again is not backwards"
    assert not rules.overtaken(3, 2)
    assert not rules.overtaken(1, None), "nothing attempted yet"


@pytest.mark.parametrize(
    ("kind", "mode", "exists", "overtaken", "action"),
    [
        ("delivery", "auto", True, False, "redeliver"),
        ("delivery", "deliver", True, False, "redeliver"),
        ("delivery", "auto", True, True, "supersede"),
        ("delivery", "deliver", True, True, "supersede"),
        ("delivery", "auto", False, False, "rehydrate"),  # the delivery was pruned
        ("delivery", "hydrate", True, False, "rehydrate"),
        ("hydration", "auto", False, False, "rehydrate"),
        ("hydration", "deliver", False, False, "rehydrate"),
    ],
)
def test_replay_actions(kind: str, mode: Any, exists: bool, overtaken: bool, action: str) -> None:
    assert (
        rules.replay_action(kind=kind, mode=mode, delivery_exists=exists, overtaken=overtaken)
        == action
    )


def test_a_fetched_state_an_honest_stamp_proves_older_is_stale() -> None:
    """A lagging read of a state never stored: older than a trustworthy stamp."""
    common = {"key": "s2", "latest_key": "s3", "forced": False, "seen_before": False}
    older = rules.fetched_state(**common, updated_at=10, latest_updated_at=20, latest_read_at=21)
    assert older == "stale"
    # The stored stamp lay in the future when it was read: it orders nothing.
    ahead = rules.fetched_state(**common, updated_at=10, latest_updated_at=999, latest_read_at=21)
    assert ahead == "stored"
    # Equal stamps (whole seconds) and missing stamps prove nothing: content decides.
    assert rules.fetched_state(
        **common, updated_at=20, latest_updated_at=20, latest_read_at=21
    ) == ("stored")
    assert rules.fetched_state(**common) == "stored"
    assert (
        rules.fetched_state(
            **{**common, "forced": True}, updated_at=10, latest_updated_at=20, latest_read_at=21
        )
        == "stored"
    )


def test_a_notice_updates_only_what_it_changed() -> None:
    """The SQLite store sets only these columns (sql.update_job_on_notice): every column
    a patch carries must be one it may set, and an unchanged one must not be listed."""
    job = replace(WAITING, retry_at=NOW - 5)  # due already: the notice moves nothing else
    patch = rules.on_notice(job, notice())
    assert set(patch.columns()) == sql.JOB_NOTICE_COLUMNS
    assert patch.changes(job) == {"generation": 4}
    done = replace(job, status="done", attempts=2, last_error="x")
    assert rules.on_notice(done, notice()).changes(done) == {
        "status": "pending",
        "generation": 4,
        "attempts": 0,
        "retry_at": NOW,
        "last_error": None,
    }
    statement = sql.update_job_on_notice(("generation",))
    assert statement == (
        "UPDATE hydration_jobs SET generation = :generation, updated_at = :now WHERE id = :id"
    )
    with pytest.raises(ValueError, match="not a column"):
        sql.update_job_on_notice(("generation = 1; DROP TABLE jobs; --",))
