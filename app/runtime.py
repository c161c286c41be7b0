"""The running service: store, Clopos clients, sinks and the background loops.

Built once from the :class:`~app.settings.Config` and started by the FastAPI
lifespan (app/service.py). Routes reach it through the ``RuntimeDep`` dependency.
Background loops are supervised: if one dies of an unexpected error, the process is
asked to stop (a crashed worker behind a live HTTP endpoint would ack notifications
that nothing processes).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Annotated, TypeVar

from fastapi import Depends, Request
from opentelemetry.trace import Tracer

from app import tracing
from app.backlog import BacklogReader
from app.clopos.budget import LocalRateBudget, RateBudget
from app.clopos.client import CloposClient
from app.clopos.shared_budget import SharedRateBudget
from app.delivery import SinkDeliverer
from app.errors import StoreError
from app.http_client import HttpClient, make_http_client
from app.hydration import Hydrator
from app.list_hydration import ListHydrator
from app.logs import REDACTOR, get_logger
from app.metrics import Metrics
from app.pauses import BrandPauses
from app.poller import Poller, PollStatus
from app.retry import RetryPolicy
from app.settings import Config, HttpSinkConfig
from app.sinks.base import Sink
from app.sinks.breaker import CircuitBreaker
from app.sinks.http import HttpSink
from app.sinks.log import LogSink
from app.status import (
    BrandStatus,
    Check,
    ReadStatus,
    ServiceStatus,
    SinkStatus,
    Thresholds,
    readiness_checks,
)
from app.store import open_store
from app.store.base import (
    Delivery,
    HydrationJob,
    QueueStats,
    SharedBudgetRow,
    Store,
    WorkKind,
)
from app.store.postgres import PostgresStore
from app.workers import WorkLoop

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = get_logger("app.runtime")
PRUNE_INTERVAL_SECONDS = 3600.0
# /readyz and /metrics answer within this even when the store hangs (a locked SQLite
# file waits out its busy timeout): probes and scrapes have short timeouts of their own.
STATUS_STORE_TIMEOUT_SECONDS = 2.0
T = TypeVar("T")


def heartbeat_interval(lease_seconds: float) -> float:
    """How often running work renews its lease: three beats per lease, so one missed
    beat (a slow commit) does not lose it."""
    return lease_seconds / 3


def build_sinks(config: Config) -> list[Sink]:
    sinks: list[Sink] = []
    for name, sink_config in zip(config.sink_names, config.settings.sinks, strict=True):
        if isinstance(sink_config, HttpSinkConfig):
            sinks.append(HttpSink(name, sink_config))
        else:
            sinks.append(LogSink(name, concurrency=sink_config.concurrency))
    return sinks


def make_budget(store: Store, per_minute: int) -> RateBudget:
    """The Clopos budget: one row per tenant shared by every replica on PostgreSQL
    (Clopos counts a tenant's calls centrally); in memory for one process on SQLite."""
    if isinstance(store, PostgresStore):
        return SharedRateBudget(store, per_minute)
    # The store keeps the spend, so a restarted process knows what its last minute cost.
    return LocalRateBudget(per_minute, ledger=store)


class Runtime:
    def __init__(
        self,
        config: Config,
        *,
        store: Store | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.config = config
        # None unless tracing is on (app/tracing.py): every span site checks it first.
        self.tracer_provider = tracer_provider
        self.tracer: Tracer | None = tracing.get_tracer(tracer_provider)
        settings = config.settings
        self.store: Store = store or open_store(
            settings.database_url, sqlite_writer=settings.sqlite_writer
        )
        self.metrics = Metrics()
        self.started_at = time.time()
        self.policy = RetryPolicy(
            base=settings.retry_base_seconds,
            cap=settings.retry_max_seconds,
            give_up_after=settings.retry_give_up_seconds,
            not_found_attempts=settings.not_found_max_attempts,
            not_found_base=settings.not_found_retry_seconds,
        )
        self.http: HttpClient = make_http_client(
            timeout=settings.clopos_timeout_seconds,
            max_connections=settings.clopos_max_connections,
        )
        self.budget: RateBudget = make_budget(self.store, settings.clopos_rate_limit_per_minute)
        self.clients: dict[str, CloposClient] = {
            name: CloposClient(
                brand,
                base_url=settings.clopos_base_url,
                http=self.http,
                budget=self.budget,
                # A remembered refusal must not outlive the probe interval, or the probe of
                # a paused brand would only replay it and recovery would wait for it.
                rejected_cooldown_seconds=min(60.0, settings.paused_brand_retry_seconds),
                # Waiting for the budget must end well inside the job's lease.
                budget_wait_limit=settings.lease_seconds / 2,
                tracer=self.tracer,
            )
            for name, brand in config.brands.items()
        }
        self.paused = BrandPauses(settings.paused_brand_retry_seconds)
        self.sinks = build_sinks(config)
        self.deliverers = {
            sink.name: SinkDeliverer(
                sink,
                store=self.store,
                policy=self.policy,
                breaker=self._breaker_for(index),
                observer=self.metrics,
                tracer=self.tracer,
            )
            for index, sink in enumerate(self.sinks)
        }
        self.hydrator = Hydrator(
            store=self.store,
            fetchers=dict(self.clients),
            sinks=[s.name for s in self.sinks],
            policy=self.policy,
            paused_retry_seconds=settings.paused_brand_retry_seconds,
            on_credentials_rejected=self.paused.pause,
            observer=self.metrics,
            on_stored=self.wake_deliveries,
            tracer=self.tracer,
        )
        self.hydration_loop: WorkLoop[HydrationJob] = WorkLoop(
            "hydration",
            claim=self._claim_hydrations,
            process=self.hydrator.process,
            release=self.store.release_hydration,
            crashed=self.hydrator.crashed,
            concurrency=settings.hydration_concurrency,
            extend=self._extend_hydration,
            heartbeat_seconds=heartbeat_interval(settings.lease_seconds),
        )
        self.delivery_loops: dict[str, WorkLoop[Delivery]] = {
            name: self._delivery_loop(deliverer) for name, deliverer in self.deliverers.items()
        }
        # List hydration (HYDRATE_FROM_LIST): the poller's pages and backlog mode.
        self.from_list: ListHydrator | None = None
        if settings.hydrate_from_list:
            self.from_list = ListHydrator(
                store=self.store,
                sinks=[s.name for s in self.sinks],
                observer=self.metrics,
                on_stored=self.wake_deliveries,
            )
        self.backlog: BacklogReader | None = self._backlog()
        self.poller: Poller | None = self._poller()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self.on_fatal: Callable[[str], None] = lambda reason: None

    def _breaker_for(self, index: int) -> CircuitBreaker:
        sink_config = self.config.settings.sinks[index]
        if isinstance(sink_config, HttpSinkConfig):
            return CircuitBreaker(
                sink_config.breaker_failures, sink_config.breaker_cooldown_seconds
            )
        return CircuitBreaker(5, 30.0)

    def _poller(self) -> Poller | None:
        """The reconciliation poller, or None when POLL_INTERVAL_SECONDS=0 (or no brand)."""
        settings = self.config.settings
        if settings.poll_interval_seconds <= 0 or not self.clients:
            return None
        for brand in self.clients:  # counters start at 0, not absent
            self.metrics.poll_enqueued.labels(brand)
        return Poller(
            store=self.store,
            listers=dict(self.clients),
            interval=settings.poll_interval_seconds,
            page_size=settings.poll_page_size,
            max_pages=settings.poll_max_pages,
            lookback=settings.poll_lookback_seconds,
            slack=settings.poll_slack_seconds,
            is_paused=lambda brand: brand in self.paused,
            on_credentials_rejected=self.paused.pause,
            on_enqueued=self.wake_hydration,
            observer=self.metrics,
            tracer=self.tracer,
            from_list=self.from_list,
        )

    def _backlog(self) -> BacklogReader | None:
        """Backlog mode (app/backlog.py), or None when list hydration is off."""
        settings = self.config.settings
        if self.from_list is None or not self.clients:
            return None
        return BacklogReader(
            store=self.store,
            listers=dict(self.clients),
            from_list=self.from_list,
            per_minute=settings.clopos_rate_limit_per_minute,
            horizon=settings.backlog_horizon_seconds,
            max_pages=settings.backlog_max_pages,
            page_size=settings.poll_page_size,
            slack=settings.backlog_slack_seconds,
            is_paused=lambda brand: brand in self.paused,
            on_credentials_rejected=self.paused.pause,
            on_cycle_end=self.wake_hydration,
        )

    def _delivery_loop(self, deliverer: SinkDeliverer) -> WorkLoop[Delivery]:
        name = deliverer.sink.name
        lease = deliverer.lease_seconds(self.config.settings.lease_seconds)

        async def claim(limit: int) -> list[Delivery]:
            return await self.store.claim_deliveries(
                sink=name,
                limit=limit,
                now=time.time(),
                lease_seconds=lease,
                max_lost_leases=self.config.settings.max_lost_leases,
            )

        async def extend(delivery: Delivery) -> bool:
            return await self.store.extend_delivery_lease(
                delivery, now=time.time(), lease_seconds=lease
            )

        return WorkLoop(
            f"delivery:{name}",
            claim=claim,
            process=deliverer.process,
            release=self.store.release_delivery,
            crashed=deliverer.crashed,
            concurrency=deliverer.sink.concurrency,
            admit=deliverer.admit,
            idle=deliverer.idle,
            extend=extend,
            heartbeat_seconds=heartbeat_interval(lease),
        )

    # --- hydration ---

    async def _claim_hydrations(self, limit: int) -> list[HydrationJob]:
        return await self.store.claim_hydrations(
            limit=limit,
            now=time.time(),
            lease_seconds=self.config.settings.lease_seconds,
            # A brand in backlog mode: its due jobs wait for the list pages, which may
            # satisfy them without a call each.
            exclude_brands=self.paused.brands() | self._listing_brands(),
            max_lost_leases=self.config.settings.max_lost_leases,
        )

    async def _extend_hydration(self, job: HydrationJob) -> bool:
        return await self.store.extend_hydration_lease(
            job, now=time.time(), lease_seconds=self.config.settings.lease_seconds
        )

    def _listing_brands(self) -> frozenset[str]:
        return frozenset(self.backlog.holding) if self.backlog is not None else frozenset()

    def wake_hydration(self) -> None:
        self.hydration_loop.wake()

    def _wake_for(self, kind: WorkKind) -> None:
        if kind == "hydration":
            self.wake_hydration()
        else:
            self.wake_deliveries()

    def wake_deliveries(self) -> None:
        for loop in self.delivery_loops.values():
            loop.wake()

    # --- brand pauses ---

    async def _probe_paused_brands(self) -> None:
        """Probe paused brands as their probes come due; resume their work on success."""
        while not self._stopping:
            if await self.paused.probe_due(dict(self.clients)):
                self.wake_hydration()
            await asyncio.sleep(1.0)

    # --- upkeep ---

    async def _prune_forever(self) -> None:
        retention = self.config.settings.retention_hours * 3600
        while not self._stopping:
            try:
                result = await self.store.prune(older_than=time.time() - retention)
                if result.total:
                    log.info("store.pruned", **result.__dict__)
            except StoreError as exc:
                log.error("store.prune_failed", error=str(exc))
            await asyncio.sleep(PRUNE_INTERVAL_SECONDS)

    async def status(self) -> ServiceStatus:
        """Everything /readyz, /metrics and /admin/status show, read now, in one value."""
        now = time.time()
        (ping_error, _), (stats_error, stats) = await asyncio.gather(
            _store_read(self.store.ping()), _store_read(self.store.stats(now=now))
        )
        orphaned: tuple[str, ...] = ()
        if stats is not None:
            # Work queued under a sink name no longer in SINKS (a renamed or removed sink)
            # is never claimed: readiness names it rather than letting it wait in silence.
            orphaned = tuple(sorted(set(stats.deliveries) - set(self.deliverers)))
            # The store lists only sinks with work; show every configured sink, idle ones at 0.
            idle = QueueStats(pending=0, running=0, oldest_pending_age=None)
            deliveries = {name: stats.deliveries.get(name, idle) for name in self.deliverers}
            stats = replace(stats, deliveries=deliveries)
        settings = self.config.settings
        reading = ServiceStatus(
            at=now,
            uptime_seconds=now - self.started_at,
            store=stats,
            store_error=ping_error or stats_error,
            brands=self._brand_statuses(await self._shared_budgets()),
            sinks={
                name: SinkStatus(
                    kind=d.sink.kind,
                    circuit=d.breaker.state,
                    in_flight=self.delivery_loops[name].inflight,
                )
                for name, d in self.deliverers.items()
            },
            loops_alive=self.loops_alive(),
            orphaned_sinks=orphaned,
            unauthenticated_webhooks=(
                settings.webhook_secret is None and settings.webhook_allow_unauthenticated
            ),
        )
        limits = Thresholds(settings.ready_max_backlog, settings.ready_max_oldest_seconds)
        checks = readiness_checks(reading, limits, store_writable=ping_error is None)
        return replace(reading, checks=checks)

    async def _shared_budgets(self) -> dict[str, SharedBudgetRow]:
        """The replicas' shared budget rows (PostgreSQL); none on SQLite or when unreadable
        (the store's error is reported by the reads above)."""
        if not isinstance(self.store, PostgresStore):
            return {}
        _, rows = await _store_read(self.store.shared_budgets())
        return rows or {}

    def _brand_statuses(self, shared: dict[str, SharedBudgetRow]) -> dict[str, BrandStatus]:
        budgets = self.budget.state()
        brands = {}
        for name, client in self.clients.items():
            tenant = self.config.brands[name].tenant
            pause = self.paused.get(name)
            poll: PollStatus | None = None
            poll_check: Check | None = None
            if self.poller is not None:
                poll = replace(self.poller.status(name))  # a copy: the poller updates its own
                poll_check = Check(*self.poller.readiness(name))
            brands[name] = BrandStatus(
                tenant=tenant,
                calls_by_status=dict(client.calls_by_status),
                auth_calls=client.auth_calls,
                budget=budgets.get(tenant),
                shared_budget=shared.get(tenant),
                paused_since=pause.since if pause is not None else None,
                paused_reason=pause.reason if pause is not None else None,
                poll=poll,
                poll_check=poll_check,
                reads=ReadStatus(
                    from_list=self.from_list is not None,
                    calls=dict(client.calls_by_read),
                    orders=self.metrics.orders_hydrated_by_read(name),
                    backlog=replace(self.backlog.status(name)) if self.backlog else None,
                ),
            )
        return brands

    # --- lifecycle ---

    def loops_alive(self) -> dict[str, bool]:
        loops = {"hydration": self.hydration_loop.alive}
        loops.update({name: loop.alive for name, loop in self.delivery_loops.items()})
        if self.poller is not None:
            loops["poller"] = self.poller.alive
        if self.backlog is not None:
            loops["backlog"] = self.backlog.alive
        return loops

    async def start(self) -> None:
        REDACTOR.add(*self.config.secret_values())
        await self.store.open()
        await self.budget.restore()  # before the first call to Clopos
        self._spawn("hydration", self.hydration_loop.run())
        for name, loop in self.delivery_loops.items():
            self._spawn(f"delivery:{name}", loop.run())
        self._spawn("prune", self._prune_forever())
        # Work another replica made due (PostgreSQL) wakes our workers now, not at their
        # next poll.
        self._spawn("work-watch", self.store.watch_work(self._wake_for))
        self._spawn("brand-probe", self._probe_paused_brands())
        if self.poller is not None:
            self._spawn("poller", self.poller.run())
        if self.backlog is not None:
            self._spawn("backlog", self.backlog.run())
        settings = self.config.settings
        if settings.webhook_secret is None and settings.webhook_allow_unauthenticated:
            log.warning(
                "webhook.unauthenticated_mode",
                detail="WEBHOOK_ALLOW_UNAUTHENTICATED=true: anyone can post notifications",
            )
        log.info(
            "service.started",
            brands=sorted(self.config.brands),
            sinks=[s.name for s in self.sinks],
            store=self.config.settings.database_url.split("://")[0],
            poll_interval_s=settings.poll_interval_seconds if self.poller else None,
            hydrate_from_list=settings.hydrate_from_list,
        )

    def _spawn(self, name: str, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        task.add_done_callback(self._supervise)
        self._tasks.append(task)

    def _supervise(self, task: asyncio.Task[None]) -> None:
        if self._stopping or task.cancelled():
            return
        exc = task.exception()
        log.critical("service.loop_died", loop=task.get_name(), error=repr(exc))
        self.on_fatal(f"background loop {task.get_name()} stopped")

    async def stop(self) -> None:
        """Stop claiming, let in-flight work finish within the grace period, release the rest."""
        self._stopping = True
        if self.poller is not None:
            self.poller.stop()  # no new work while the workers drain
        if self.backlog is not None:
            self.backlog.stop()
        grace = self.config.settings.shutdown_grace_seconds
        await asyncio.gather(
            self.hydration_loop.stop(grace),
            *(loop.stop(grace) for loop in self.delivery_loops.values()),
        )
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sink in self.sinks:
            with contextlib.suppress(Exception):
                await sink.aclose()
        await self.http.aclose()
        await self.store.close()
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()  # exports the spans still buffered
        log.info("service.stopped")


async def _store_read(call: Awaitable[T]) -> tuple[str | None, T | None]:
    """(error, result) of one store call: a failed or slow read is reported, not raised."""
    try:
        async with asyncio.timeout(STATUS_STORE_TIMEOUT_SECONDS):
            return None, await call
    except StoreError as exc:
        return str(exc) or type(exc).__name__, None
    except TimeoutError:
        return f"did not answer within {STATUS_STORE_TIMEOUT_SECONDS:.0f}s", None


async def get_runtime(request: Request) -> Runtime:
    """Async on purpose: FastAPI runs a plain ``def`` dependency in a thread pool, a
    hop that showed up on the ingest hot path."""
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
