"""The rules for a state read from a list page, as pure functions every backend applies.

"A read after the notice satisfies it" (product.md): a page of ``GET /v2/orders`` with
the receipt embedded carries, for each order on it, a state at least as new as any that
was notified before the page was read. What stays to decide is how the listed state
compares with the newest one stored, by content first, then by when each was read, and
by clock only where the clock can be trusted ("orders are compared by content, not by
clock": stamps have whole seconds and may lie in the future):

- the same content (snapshot id) as the newest stored state: **unchanged**;
- the content of an older stored state of the order: **stale** (the list lagging);
- an ``updated_at`` older than the stored state's, when that stamp was not ahead of our
  clock when it was read (then it is a lie, and trusting it would freeze the order):
  **stale**, the list lagging behind a fetch;
- from a read that was not made after the stored state was read, with a stamp that does
  not say it is newer: **ambiguous**; two states of one second tell their order only by
  when they were read, and a fetch made now will tell;
- otherwise the listed state is newer: **stored**.
"""

from __future__ import annotations

from typing import Literal

from app.store.rules import stamp_says_older

Judgement = Literal["stored", "unchanged", "stale", "ambiguous"]


def judge_listed(
    *,
    key: str,
    updated_at: float | None,
    read_at: float,
    last_key: str | None,
    last_updated_at: float | None,
    last_read_at: float | None,
    seen_before: bool = False,
) -> Judgement:
    """How a listed state compares with the order's newest stored one.

    ``last_read_at`` is when the stored state was read: its ``hydrated_at``, taken after
    its read returned, so a list read sent later was certainly made after it.
    ``seen_before``: an older stored snapshot of the order has this content.
    """
    if last_key is None:
        return "stored"
    if key == last_key:
        return "unchanged"
    if seen_before:
        return "stale"
    if stamp_says_older(updated_at, last_updated_at, last_read_at):
        return "stale"
    if updated_at is not None and last_updated_at is not None and updated_at > last_updated_at:
        return "stored"
    if last_read_at is not None and read_at <= last_read_at:
        return "ambiguous"
    return "stored"


def covers(received_at: float, read_at: float) -> bool:
    """Whether a read satisfies a notice: only one received before the read was sent."""
    return received_at < read_at
