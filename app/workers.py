"""A leased-work loop shared by the hydration and delivery workers.

One loop per queue: claim as many items as there are free slots, run each in its
own task, and wait for a wake-up (new work) or a short poll (retries coming due,
work from other replicas). While an item runs, its lease is extended every
``heartbeat_seconds`` (a third of the lease), so work slower than its lease (a slow
Clopos, a slow sink) is not taken over by a second claim. On stop: claim nothing more,
give in-flight items a grace period, then cancel them; a cancelled item is *released*
back to the store under ``asyncio.shield`` so its outcome is never lost to cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import structlog

from app.errors import StoreError
from app.logs import get_logger

T = TypeVar("T")
log = get_logger("app.workers")


class WorkLoop(Generic[T]):
    def __init__(
        self,
        name: str,
        *,
        claim: Callable[[int], Awaitable[list[T]]],
        process: Callable[[T], Awaitable[None]],
        release: Callable[[T], Awaitable[object]],
        crashed: Callable[[T, Exception], Awaitable[object]],
        concurrency: int,
        poll_seconds: float = 1.0,
        admit: Callable[[int], tuple[float, int]] | None = None,
        idle: Callable[[], None] | None = None,
        extend: Callable[[T], Awaitable[bool]] | None = None,
        heartbeat_seconds: float = 0.0,
    ) -> None:
        """``release`` gives an item back untouched (shutdown); ``crashed`` records that
        processing raised something unexpected (a bug), so the item ends visibly instead
        of being retried forever; ``admit(free)`` returns (seconds to wait, how many to
        claim now): the hook a circuit breaker uses to hold a sink's loop, or let a
        single trial through; ``idle()`` is told when a claim found nothing;
        ``extend(item)`` renews an item's lease (False: the lease is gone), every
        ``heartbeat_seconds`` while the item runs."""
        self.name = name
        self._claim = claim
        self._process = process
        self._release = release
        self._crashed = crashed
        self._concurrency = concurrency
        self._poll = poll_seconds
        self._admit = admit
        self._idle = idle
        self._extend = extend
        self._heartbeat = heartbeat_seconds
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()
        self.alive = False

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Claim and dispatch until stopped. Store outages are waited out, not fatal."""
        self.alive = True
        failures = 0
        try:
            while not self._stopping.is_set():
                # Cleared before looking for work, so a wake() that arrives while we
                # claim is not lost: the next sleep returns at once.
                self._wake.clear()
                free = self._concurrency - len(self._inflight)
                wait, free = self._admit(free) if self._admit and free > 0 else (0.0, free)
                if free <= 0:
                    await self._sleep(wait if wait > 0 else self._poll)
                    continue
                try:
                    items = await self._claim(free)
                    failures = 0
                except StoreError as exc:
                    failures += 1
                    log.error("worker.claim_failed", worker=self.name, error=str(exc))
                    await self._sleep(min(30.0, 0.5 * 2**failures))
                    continue
                if self._stopping.is_set():  # stop() arrived during the claim
                    await asyncio.gather(*(self._give_back(item) for item in items))
                    break
                for item in items:
                    task = asyncio.create_task(self._run_one(item), name=f"{self.name}-item")
                    self._inflight.add(task)
                    task.add_done_callback(self._done)
                if not items:
                    if self._idle is not None:
                        self._idle()
                    await self._sleep(self._poll)
        finally:
            self.alive = False
            self._stopped.set()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._wake.set()  # a slot is free

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)

    async def _give_back(self, item: T) -> None:
        with contextlib.suppress(StoreError):
            # Shielded: a cancellation must not lose the write that makes the item due.
            await asyncio.shield(self._release(item))
            log.warning("worker.released", worker=self.name)

    async def _keep_lease(self, item: T) -> None:
        """Extend the item's lease until cancelled, or until it turns out to be lost."""
        assert self._extend is not None
        while True:
            await asyncio.sleep(self._heartbeat)
            try:
                if not await self._extend(item):
                    # Someone else holds it now; the item's own write will say lost_lease.
                    log.warning("worker.lease_lost", worker=self.name)
                    return
            except StoreError as exc:  # try again next beat; the lease may still hold
                log.error("worker.lease_extend_failed", worker=self.name, error=str(exc))

    async def _run_one(self, item: T) -> None:
        structlog.contextvars.clear_contextvars()
        heartbeat: asyncio.Task[None] | None = None
        if self._extend is not None and self._heartbeat > 0:
            heartbeat = asyncio.create_task(self._keep_lease(item), name=f"{self.name}-lease")
        try:
            await self._process(item)
        except asyncio.CancelledError:
            # Shutdown past the grace period: give the item back so it is due at once.
            await self._give_back(item)
            raise
        except StoreError as exc:
            # The lease will expire and the item will be claimed again: nothing is lost.
            log.error("worker.store_error", worker=self.name, error=str(exc))
        except Exception as exc:
            # Supervisor boundary: a bug in one item must not kill the loop, nor make it
            # retry that item forever. It ends in a dead letter an operator can replay.
            log.exception("worker.item_crashed", worker=self.name)
            with contextlib.suppress(StoreError):
                await asyncio.shield(self._crashed(item, exc))
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeat

    async def stop(self, grace: float) -> None:
        """Stop claiming, let in-flight work finish for ``grace`` s, then cancel it."""
        self._stopping.set()
        self._wake.set()
        if self.alive:
            # A claim may be in flight: what it returns is given back by run().
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), timeout=max(grace, 1.0))
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=grace)
        for task in list(self._inflight):
            task.cancel()
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
