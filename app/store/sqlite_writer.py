"""The SQLite writer: one child process (or, on a host with fewer than two CPUs, one
thread: ``app/store/writer_thread.py``) owns the connection; coroutines hand it work and
await the commit. ``SQLITE_WRITER`` chooses; ``auto`` by the CPUs the service may use.

Why one writer: SQLite allows one writer at a time, and ``sqlite3`` blocks. Serialising
every operation (reads too) on one connection keeps the event loop free and makes the
store trivially correct: no two operations ever interleave.

Why a process, not a thread: the writer's Python (binding parameters, reading rows,
the savepoints) and every return from SQLite's C code need the GIL, so a writer thread
took it from the event loop thousands of times a second. In a process of its own the
writer runs on the other core: side by side with the thread, ingest under wrk went
from 0.61x to 0.78x the bare endpoint's throughput and end-to-end capacity 1.12x
(docs/performance.md, step 14). The price: an operation must be picklable (a
module-level function ``fn(conn, *args)``, picklable arguments and result), and the
wire costs about 10 us of CPU per operation, so where the second core is not free
(a load generator on the same two cores took one, or a one-CPU limit) the service is
slower: hence the thread for a host that gives the service less than two CPUs.

Group commit: the writer takes whatever has arrived (up to ``batch_limit``
operations), runs the batch in ONE transaction with each operation in its own
SAVEPOINT, COMMITs once, and only then answers. So a caller's ``await`` returns only
when its data is durable, and a burst of N writes costs one fsync, not N.

* An operation that raises is rolled back to its savepoint and fails alone: its caller
  gets a :class:`~app.errors.StoreError` (whatever was raised, ``sqlite3.Error`` or
  e.g. an ``OverflowError`` binding an integer SQLite cannot hold, is its cause; a
  ``StoreError`` an operation raises on purpose passes as it is), the other operations
  of the batch still commit.
* If BEGIN or COMMIT fails, the whole batch is rolled back and every caller of that
  batch gets a :class:`~app.errors.StoreError`.
* An operation submitted with ``savepoint=False`` (the enqueue, the ingest hot path:
  two statements of savepoint bookkeeping cost a quarter of its time) skips the
  savepoint. If it raises before any of its writes completed, SQLite has already undone
  the failing statement, so it still fails alone; if it raises after a write, nothing
  can take back just its part, so the whole batch is rolled back as above.
* The writer process dies with its parent (``PR_SET_PDEATHSIG``): after a kill -9 of the
  service, no orphan goes on writing to the file the next service opens. SQLite's WAL
  undoes a transaction the kill interrupted. If the writer dies first, every waiting
  caller gets a StoreError and the store refuses new work (``store.writer_crashed``).

The connection runs with ``journal_mode=WAL`` and ``synchronous=FULL``: a commit
survives a process kill and a power loss.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import socket
import sqlite3
import struct
import sys
import time
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Protocol, TypeVar, cast

import structlog

from app.errors import StoreError
from app.logs import get_logger
from app.store import sql

T = TypeVar("T")
# fn(conn, *args): a module-level function, so that it pickles by reference.
Operation = Callable[..., T]

log_name = "app.store.sqlite"
log = get_logger(log_name)

BUSY_TIMEOUT_MS = 5000
PRAGMAS = (
    f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}",
    "PRAGMA synchronous = FULL",
    "PRAGMA foreign_keys = ON",
)


def connect(path: Path) -> sqlite3.Connection:
    """Open ``path`` with the durability PRAGMAs in force; creates its directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: no implicit transactions; BEGIN/COMMIT are ours.
    conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        conn.row_factory = sqlite3.Row
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"{path}: cannot use WAL journal mode (got {mode})")
        for pragma in PRAGMAS:
            conn.execute(pragma)
    except BaseException:
        conn.close()
        raise
    return conn


def split_statements(script: str) -> Iterator[str]:
    """Cut an SQL script into complete statements (comments and triggers are safe)."""
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            yield buffer
            buffer = ""
    leftover = "\n".join(
        line for line in buffer.splitlines() if line.strip() and not line.strip().startswith("--")
    )
    if leftover:
        raise StoreError(f"migration ends with an incomplete statement: {leftover[:80]!r}")


def migration_scripts() -> list[tuple[str, str]]:
    """The packaged migrations as ``(name, sql)``, in the order they apply."""
    folder = resources.files("app.store").joinpath("migrations")
    scripts = [
        (entry.name, entry.read_text(encoding="utf-8"))
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    ]
    return sorted(scripts)


def migrate(conn: sqlite3.Connection, clock: Callable[[], float] = time.time) -> list[str]:
    """Apply the migrations not yet recorded in ``schema_migrations``; each one atomically.
    Returns their names (the writer's parent process logs them)."""
    conn.execute(sql.CREATE_SCHEMA_MIGRATIONS)
    applied: list[str] = []
    for name, script in migration_scripts():
        # IMMEDIATE: a second process migrating the same file waits instead of racing.
        conn.execute("BEGIN IMMEDIATE")
        try:
            if conn.execute(sql.MIGRATION_APPLIED, {"version": name}).fetchone() is None:
                for statement in split_statements(script):
                    conn.execute(statement)
                conn.execute(sql.RECORD_MIGRATION, {"version": name, "applied_at": clock()})
                applied.append(name)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    return applied


# --- the wire between the service and its writer process ---------------------------------

# The wire costs CPU on both sides for every operation (a fifth of the writer's time
# with dataclasses on it), so it is plain: tuples, and a struct header for requests.
_FRAME = struct.Struct("!I")  # an answer: its length, then its pickle
_REQUEST = struct.Struct("!IQ?H")  # a request: body length, key, savepoint, name length


def frame(message: Any) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _FRAME.pack(len(data)) + data


def unframe(buffer: bytearray) -> Iterator[Any]:
    """Take every complete answer off the front of ``buffer``."""
    while len(buffer) >= _FRAME.size:
        (size,) = _FRAME.unpack_from(buffer)
        end = _FRAME.size + size
        if len(buffer) < end:
            return
        # Only this service and its own writer hold the two ends of the socketpair.
        message = pickle.loads(memoryview(buffer)[_FRAME.size : end])  # noqa: S301
        del buffer[:end]
        yield message


class Request(NamedTuple):
    """One operation, as sent to the writer. ``operation`` is the pickle of ``(fn,
    args)``, apart from the header: one the writer cannot load (a module it cannot
    import, say) fails its own caller, never the batch or the writer."""

    key: int
    name: str
    operation: bytes
    savepoint: bool

    def encode(self) -> bytes:
        name = self.name.encode()
        header = _REQUEST.pack(len(name) + len(self.operation), self.key, self.savepoint, len(name))
        return header + name + self.operation

    def load(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        fn, args = pickle.loads(self.operation)  # noqa: S301 - from our own service
        return fn, args


class Runnable(Protocol):
    """An operation as :func:`run_batch` takes it: a :class:`Request` off the wire, or
    the thread writer's own (``app/store/writer_thread.py``), which is never pickled."""

    @property
    def key(self) -> int: ...
    @property
    def name(self) -> str: ...
    @property
    def savepoint(self) -> bool: ...
    def load(self) -> tuple[Callable[..., Any], tuple[Any, ...]]: ...


def unframe_requests(buffer: bytearray) -> list[Request]:
    """Take every complete request off the front of ``buffer`` (in the writer)."""
    requests: list[Request] = []
    start = 0
    while len(buffer) - start >= _REQUEST.size:
        size, key, savepoint, name_size = _REQUEST.unpack_from(buffer, start)
        body = start + _REQUEST.size
        end = body + size
        if len(buffer) < end:
            break
        name = bytes(buffer[body : body + name_size]).decode()
        requests.append(Request(key, name, bytes(buffer[body + name_size : end]), savepoint))
        start = end
    del buffer[:start]
    return requests


class Outcome(NamedTuple):
    """What became of one request: its result, or its error and the error's cause
    (``__cause__`` itself does not cross a pickle; on the wire, the cause only if it
    pickles). Sent as a plain tuple."""

    key: int
    result: Any = None
    error: StoreError | None = None
    cause: BaseException | None = None

    def wire(self) -> tuple[int, Any, StoreError | None, BaseException | None]:
        return (
            self.key,
            self.result,
            self.error,
            None if self.cause is None else _plain(self.cause),
        )


@dataclass(frozen=True)
class Note:
    """A log line of the writer process, written by the service (one log configuration,
    one stream, the same redaction)."""

    level: str  # "info", "warning", "error"
    event: str
    fields: dict[str, Any] = field(default_factory=dict)
    logger: str = log_name


_PLAIN = (str, int, float, bool, type(None))
# What the operations of this batch logged (in the writer process; see capture_logs).
_captured: list[Note] = []


def capture_logs() -> None:
    """In the writer process: whatever an operation logs (``log.warning(...)`` as
    anywhere else) is kept as a :class:`Note` and sent back with its batch."""

    def capture(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> Any:
        event = str(event_dict.pop("event", ""))
        name = getattr(logger, "name", log_name)
        fields = {k: v if isinstance(v, _PLAIN) else repr(v) for k, v in event_dict.items()}
        _captured.append(Note(method, event, fields, name))
        raise structlog.DropEvent

    logging.getLogger().setLevel(logging.DEBUG)  # the service applies LOG_LEVEL
    structlog.configure(
        processors=[capture],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def _taken_notes() -> list[Note]:
    notes = list(_captured)
    _captured.clear()
    return notes


@dataclass(frozen=True)
class Ready:
    migrations: list[str]


@dataclass(frozen=True)
class Failed:
    message: str


class Batch(NamedTuple):
    committed: bool
    outcomes: list[Outcome]
    notes: list[Note]

    def wire(self) -> tuple[str, bool, list[tuple[Any, ...]], list[Note]]:
        """As sent: plain tuples, which pickle several times faster than classes."""
        return ("batch", self.committed, [o.wire() for o in self.outcomes], self.notes)


# --- the writer's side: one batch, one transaction ------------------------------------------


class _BatchAborted(Exception):
    """The savepoint machinery itself failed: the transaction can no longer be trusted."""


def _store_error(message: str, cause: BaseException) -> StoreError:
    error = StoreError(message)
    error.__cause__ = cause
    return error


def run_batch(conn: sqlite3.Connection, requests: Sequence[Runnable]) -> Batch:
    """Run ``requests`` in one transaction (in the writer, a process or a thread)."""
    notes: list[Note] = []
    try:
        conn.execute("BEGIN IMMEDIATE")
        outcomes = [_run_one(conn, request, notes) for request in requests]
        conn.execute("COMMIT")
    except (sqlite3.Error, _BatchAborted) as exc:
        return _abort(conn, requests, exc, notes)
    return Batch(True, outcomes, _taken_notes() + notes)


def _run_one(conn: sqlite3.Connection, request: Runnable, notes: list[Note]) -> Outcome:
    try:
        fn, args = request.load()
    except Exception as exc:  # noqa: BLE001 - unpickling can raise almost anything
        notes.append(Note("error", "store.op_unreadable", {"op": request.name, "error": repr(exc)}))
        error = StoreError(f"{request.name}: cannot be read by the store writer: {exc!r}")
        return Outcome(request.key, error=error)
    if request.savepoint:
        try:
            conn.execute("SAVEPOINT op")
        except sqlite3.Error as exc:
            raise _BatchAborted(f"savepoint: {exc}") from exc
    changes = conn.total_changes  # counts completed writes only, not a failed statement
    try:
        result = fn(conn, *args)
    # The writer must outlive a bug or a bad argument in one operation: that caller
    # alone gets the error, and as a StoreError (only StoreError leaves the store).
    except Exception as exc:
        if request.savepoint:
            _rollback_savepoint(conn)
        elif conn.total_changes != changes or not conn.in_transaction:
            raise _BatchAborted(f"{request.name} failed after writing: {exc!r}") from exc
        return _failed(request, exc, notes)
    if request.savepoint:
        try:
            conn.execute("RELEASE op")
        except sqlite3.Error as exc:
            raise _BatchAborted(f"release: {exc}") from exc
    return Outcome(request.key, result)


def _failed(request: Runnable, exc: Exception, notes: list[Note]) -> Outcome:
    """The caller's StoreError for an operation that raised (rolled back already)."""
    if isinstance(exc, StoreError):  # raised on purpose by the operation: already ours
        notes.append(Note("warning", "store.op_failed", {"op": request.name, "error": str(exc)}))
        return Outcome(request.key, error=exc)
    if isinstance(exc, sqlite3.Error):
        notes.append(Note("warning", "store.op_failed", {"op": request.name, "error": str(exc)}))
        return Outcome(request.key, error=StoreError(f"{request.name}: {exc}"), cause=exc)
    notes.append(Note("error", "store.op_crashed", {"op": request.name, "error": repr(exc)}))
    error = StoreError(f"{request.name}: {type(exc).__name__}: {exc}")
    return Outcome(request.key, error=error, cause=exc)


def sendable(batch: Batch, requests: list[Request]) -> Batch:
    """``batch`` with every result that cannot be pickled replaced by its caller's
    StoreError: one operation's bug must not take the writer down. (Found only after
    the commit: checking every result before it would pickle each one twice.)"""
    names = {request.key: request.name for request in requests}
    outcomes = []
    for outcome in batch.outcomes:
        try:
            pickle.dumps(outcome.wire(), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - pickling can raise almost anything
            state = "committed" if batch.committed else "not committed"
            message = f"{names.get(outcome.key)}: {state}, but its result cannot be sent back"
            outcome = Outcome(outcome.key, error=StoreError(f"{message}: {exc}"))
        outcomes.append(outcome)
    return Batch(batch.committed, outcomes, batch.notes)


def _plain(exc: BaseException) -> BaseException | None:
    """``exc`` if it survives a pickle (most built-in and sqlite3 errors do)."""
    try:
        pickle.loads(pickle.dumps(exc))  # noqa: S301 - our own bytes, just made
    except Exception:  # noqa: BLE001 - any exception type may refuse to pickle
        return None
    return exc


def _rollback_savepoint(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("ROLLBACK TO op")
        conn.execute("RELEASE op")
    except sqlite3.Error as exc:
        raise _BatchAborted(f"rollback to savepoint: {exc}") from exc


def _abort(
    conn: sqlite3.Connection, requests: Sequence[Runnable], exc: BaseException, notes: list[Note]
) -> Batch:
    notes.append(Note("error", "store.batch_failed", {"ops": len(requests), "error": str(exc)}))
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error as rollback_exc:
            notes.append(Note("error", "store.rollback_failed", {"error": str(rollback_exc)}))
    outcomes = [
        Outcome(r.key, error=StoreError(f"{r.name}: not committed: {exc}"), cause=exc)
        for r in requests
    ]
    # What the operations logged stands: it happened, even if it was not committed.
    return Batch(False, outcomes, _taken_notes() + notes)


# --- the service's side ---------------------------------------------------------------------


def _expire(future: asyncio.Future[Any], name: str, within: float) -> None:
    if not future.done():
        future.set_exception(StoreError(f"{name}: no answer within {within:g} s"))


class GroupCommitWriter(abc.ABC):
    """What the store sees of its writer, a process (:class:`ProcessWriter`) or a thread
    (:class:`app.store.writer_thread.ThreadWriter`): ``submit`` an operation, await its
    commit. ``commits`` counts committed transactions.

    Single use: started once, stopped once (a store that reopens makes a new one). Bound
    to the event loop that started it.
    """

    kind: ClassVar[str]

    def __init__(self, path: Path, *, batch_limit: int = 256) -> None:
        if batch_limit < 1:
            raise ValueError("batch_limit must be at least 1")
        self.path = path
        self.batch_limit = batch_limit
        self.commits = 0
        self._keys = itertools.count(1)
        self._waiting: dict[int, tuple[str, asyncio.Future[Any]]] = {}
        self._accepting = False
        self._started = False
        self._serving = False  # the writer said it is ready
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future[None] | None = None
        self._gone: asyncio.Future[None] | None = None
        self._crash_report: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the writer; returns once the database is open and migrated."""
        if self._started:
            raise StoreError("the store writer was already started")
        self._started = True
        loop = self._loop = asyncio.get_running_loop()
        self._ready, self._gone = loop.create_future(), loop.create_future()
        await self._launch(loop)
        try:
            await self._ready
        except BaseException:  # it failed, or the caller gave up (cancelled): no orphan
            self._stopping = True
            self._abandon()
            await self._wait_ended()
            raise
        self._serving = self._accepting = True

    @abc.abstractmethod
    async def _launch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the writer (a StoreError if it cannot be). It opens the database, then
        says so through ``_serve``, or fails through ``_ready``."""

    def _abandon(self) -> None:
        """End a writer that start() gave up on."""
        self._ask_to_stop()

    async def stop(self) -> None:
        """Refuse new work, let the writer finish what was sent, wait for it to end (a
        second call waits too)."""
        if not self._launched():
            return
        if not self._stopping:
            self._accepting = False
            self._stopping = True
            self._ask_to_stop()
        await self._wait_ended()

    @abc.abstractmethod
    def _launched(self) -> bool:
        """Whether a writer was started: there is one to stop."""

    @abc.abstractmethod
    def _ask_to_stop(self) -> None:
        """Tell the writer to end once it has run what it was sent."""

    @abc.abstractmethod
    async def _wait_ended(self) -> None:
        """Until the writer has ended (its last answer handled)."""

    @abc.abstractmethod
    def _post(
        self, key: int, name: str, fn: Operation[Any], args: tuple[Any, ...], savepoint: bool
    ) -> None:
        """Hand one operation to the writer (a StoreError if it cannot be)."""

    async def _crash_details(self) -> dict[str, Any]:
        """What ``store.writer_crashed`` says of how the writer ended."""
        return {}

    def _ended_by_error(self) -> bool:
        """Whether the writer is known to have ended on an error even if asked to stop."""
        return False

    async def exited(self) -> bool:
        """Wait until the writer has gone; True if nobody asked it to (a crash: the
        service cannot work without it)."""
        assert self._gone is not None
        await asyncio.shield(self._gone)
        return not self._stopping

    async def submit(
        self,
        name: str,
        fn: Operation[T],
        *args: Any,
        savepoint: bool = True,
        within: float | None = None,
    ) -> T:
        """Run ``fn(connection, *args)`` in the next batch; return once that batch
        committed.

        ``savepoint=False``: see the module docstring (for an operation whose failure
        after a write is not an expected outcome). ``within``: seconds after which the
        caller gets a StoreError instead of waiting on; the operation itself still runs
        (and may commit) when its turn comes.
        """
        loop = self._loop
        if not self._accepting or loop is None:
            raise StoreError(f"{name}: the store is closed")
        key = next(self._keys)
        self._post(key, name, fn, args, savepoint)
        future: asyncio.Future[Any] = loop.create_future()
        # Answers are handled on this loop, so none can arrive before this line.
        self._waiting[key] = (name, future)
        if within is None:
            return cast(T, await future)
        # A timer on the future rather than asyncio.timeout(): that one's task
        # cancellation machinery was 5% of the event loop's time on the ingest path.
        expiry = loop.call_later(within, _expire, future, name, within)
        try:
            return cast(T, await future)
        finally:
            expiry.cancel()

    # --- called on the loop when the writer has something to say --------------------------

    def _serve(self, migrations: list[str]) -> None:
        """The database is open and migrated."""
        for version in migrations:
            log.info("store.migration.applied", version=version)
        _resolve(self._ready)

    def _answer(self, batch: Batch) -> None:
        if batch.committed:
            self.commits += 1
        for note in batch.notes:
            logger = log if note.logger == log_name else get_logger(note.logger)
            try:
                getattr(logger, note.level, logger.warning)(note.event, **note.fields)
            except Exception as exc:  # noqa: BLE001 - a line that cannot be written is not a crash
                log.warning("store.note_unwritable", event_name=note.event, error=repr(exc))
        for outcome in batch.outcomes:
            waiting = self._waiting.pop(outcome.key, None)
            if waiting is None or waiting[1].done():  # the caller stopped waiting
                continue
            future = waiting[1]
            if outcome.error is None:
                future.set_result(outcome.result)
            else:
                if outcome.cause is not None:
                    outcome.error.__cause__ = outcome.cause
                future.set_exception(outcome.error)

    def _lost(self) -> None:
        """The writer has ended (asked to, or not)."""
        self._accepting = False
        crashed = self._serving and (not self._stopping or self._ended_by_error())
        _resolve(self._ready, StoreError(f"{self.path}: the store writer exited at start-up"))
        message = "the store is closed" if self._stopping else "the store writer exited"
        waiting, self._waiting = self._waiting, {}
        for name, future in waiting.values():
            if not future.done():
                future.set_exception(StoreError(f"{name}: {message}"))
        if crashed and self._loop is not None:
            self._crash_report = self._loop.create_task(self._report_crash())
        else:
            _resolve(self._gone)

    async def _report_crash(self) -> None:
        """Log the writer's end and how it ended, then let ``exited()`` return."""
        details = await self._crash_details()
        log.critical("store.writer_crashed", path=str(self.path), writer=self.kind, **details)
        _resolve(self._gone)


class ProcessWriter(GroupCommitWriter):
    """The writer as a child process (``app/store/writer_process.py``), over a socketpair."""

    kind = "process"

    def __init__(self, path: Path, *, batch_limit: int = 256) -> None:
        super().__init__(path, batch_limit=batch_limit)
        self._outbox: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self._process: asyncio.subprocess.Process | None = None

    async def _launch(self, loop: asyncio.AbstractEventLoop) -> None:
        ours, theirs = socket.socketpair()
        try:
            self._process = await asyncio.create_subprocess_exec(
                *_writer_command(self.path, theirs.fileno(), self.batch_limit),
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                env=_writer_env(),
            )
        except OSError as exc:
            ours.close()
            raise _store_error(f"{self.path}: cannot start the store writer: {exc}", exc) from exc
        finally:
            theirs.close()
        self._transport, _ = await loop.create_connection(lambda: _Channel(self), sock=ours)

    def _abandon(self) -> None:
        assert self._transport is not None
        self._transport.close()  # end-of-file: a writer that is up exits at once

    def _launched(self) -> bool:
        return self._transport is not None

    def _ask_to_stop(self) -> None:
        assert self._transport is not None
        self._flush()
        if self._transport.can_write_eof() and not self._transport.is_closing():
            self._transport.write_eof()  # the writer runs what it has, then exits

    async def _wait_ended(self) -> None:
        assert self._gone is not None
        assert self._process is not None
        await asyncio.shield(self._gone)
        await self._process.wait()

    def _post(
        self, key: int, name: str, fn: Operation[Any], args: tuple[Any, ...], savepoint: bool
    ) -> None:
        try:
            operation = pickle.dumps((fn, args), protocol=pickle.HIGHEST_PROTOCOL)
            message = Request(key, name, operation, savepoint).encode()
        except Exception as exc:  # pickling can raise almost anything
            raise _store_error(f"{name}: cannot be sent to the store writer: {exc}", exc) from exc
        if not self._outbox:  # one write per loop iteration, whatever was submitted in it
            assert self._loop is not None
            self._loop.call_soon(self._flush)
        self._outbox.append(message)

    def _flush(self) -> None:
        if self._outbox and self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"".join(self._outbox))
        self._outbox = []

    def _received(self, message: Any) -> None:
        if isinstance(message, tuple) and message[0] == "batch":
            _, committed, outcomes, notes = message
            self._answer(Batch(committed, [Outcome(*o) for o in outcomes], notes))
        elif isinstance(message, Ready):
            self._serve(message.migrations)
        elif isinstance(message, Failed):
            _resolve(self._ready, StoreError(message.message))

    async def _crash_details(self) -> dict[str, Any]:
        exit_code = None
        if self._process is not None:
            with contextlib.suppress(TimeoutError):
                exit_code = await asyncio.wait_for(self._process.wait(), _REAP_SECONDS)
        return {"exit_code": exit_code}


# How long a crashed writer's exit status is waited for (it is reaped by then).
_REAP_SECONDS = 5.0


def _resolve(future: asyncio.Future[None] | None, error: BaseException | None = None) -> None:
    if future is None or future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


class _Channel(asyncio.Protocol):
    """The service's end of the socket to its writer process."""

    def __init__(self, writer: ProcessWriter) -> None:
        self._writer = writer
        self._buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        try:
            for message in unframe(self._buffer):
                self._writer._received(message)
        except Exception as exc:  # noqa: BLE001 - a broken channel must not hang callers
            log.critical("store.writer_channel_broken", error=repr(exc))
            self._transport.close()  # connection_lost: every waiting caller gets an error

    def connection_lost(self, exc: Exception | None) -> None:
        self._writer._lost()


def _writer_command(path: Path, fd: int, batch_limit: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "app.store.writer_process",
        str(path),
        str(fd),
        str(batch_limit),
        str(os.getpid()),
    ]


def _writer_env() -> dict[str, str]:
    """The service's environment, and its import path: an operation is pickled by
    reference, so the writer must import exactly the modules the service does. Safe
    path: ``-m`` would otherwise put the working directory first, and an ``app``
    there (another checkout) would be imported instead."""
    path = [p or os.getcwd() for p in sys.path]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "PYTHONSAFEPATH": "1"}
