"""One attempt of leased work (a hydration or a delivery): what it came to, and how
that is reported.

Hydration and delivery share this, so they cannot drift apart again: the same
:class:`Attempt` record, the same canonical log line (``<stage>.finished``) and metric
call, and the same rule for store writes: an outcome only counts once the store has
recorded it. A write that changes nothing means the lease was lost (another worker
claimed the item meanwhile and owns its outcome), so the attempt is ``lost_lease``,
whatever it would have been: no retry, and no dead letter, is reported that was not
written.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

from app.logs import Logger

LOST_LEASE_DETAIL = "another worker owns this work now"


@dataclass(frozen=True)
class Attempt:
    """What one attempt came to, for the canonical log line and metrics.

    Hydration outcomes: stored, unchanged, stale, retry, rate_limited, paused,
    not_found, dead_letter, lost_lease. Delivery outcomes: delivered, retry,
    dead_letter, lost_lease.
    """

    outcome: str
    detail: str = ""
    delay: float | None = None  # seconds until the retry, when one was scheduled
    reason: str | None = None  # the dead letter's reason, when outcome == "dead_letter"


LOST_LEASE = Attempt("lost_lease", LOST_LEASE_DETAIL)


def recorded(written: bool, attempt: Attempt) -> Attempt:
    """``attempt`` if the store write that records it took effect, else ``lost_lease``."""
    return attempt if written else LOST_LEASE


# (outcome, dead-letter reason, seconds the attempt took or None, latency since notice)
Report = Callable[[str, str | None, float | None, float], None]


async def observed(
    attempt: Awaitable[Attempt],
    *,
    event: str,
    log: Logger,
    report: Report,
    received_at: float,
    clock: Callable[[], float],
    fine: Collection[str],
    **fields: Any,
) -> Attempt:
    """Await one attempt, then report it once: to ``report`` (metrics) and as the
    ``event`` log line, at info for the ``fine`` outcomes and warning for the rest."""
    started = time.monotonic()
    result = await attempt
    elapsed = time.monotonic() - started
    latency = max(0.0, clock() - received_at)
    report(result.outcome, result.reason, elapsed, latency)
    (log.info if result.outcome in fine else log.warning)(
        event,
        outcome=result.outcome,
        duration_ms=round(elapsed * 1000, 1),
        retry_in_s=round(result.delay, 1) if result.delay is not None else None,
        detail=result.detail or None,
        **fields,
    )
    return result


def crash_reported(written: bool, report: Report) -> None:
    """A crashed item ended in an ``internal_error`` dead letter: count it if written."""
    if written:
        report("dead_letter", "internal_error", None, 0.0)
