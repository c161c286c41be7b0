"""The SQLite writer as a thread of the service, for a host that gives it less than two
CPUs (``SQLITE_WRITER=auto``; read ``app/store/sqlite_writer.py`` first).

Why keep a thread beside the process: the process buys a second core at about 10 us of
CPU per operation for the wire. Where there is no second core to buy (a container
limited to one CPU, say) the wire is pure cost. Measured with the service pinned to one
CPU, side by side: 0.70x the bare endpoint's throughput with a writer thread, 0.61x
with the process, and 0.180 against 0.210 CPU ms per request (docs/performance.md,
step 15).

Same batches (:func:`~app.store.sqlite_writer.run_batch`), same promises. The
differences: nothing is pickled, so an operation's arguments and result are the
caller's own objects, not copies (the store's operations take and return plain values;
an operation passed to ``SqliteStore.run`` must not return a cursor or a row, which
belong to the writer's connection, nor keep its arguments); an operation's log lines
are written directly by the thread; and the writer ends with the service's process
whatever kills it.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from pathlib import Path
from typing import Any, NamedTuple

from app.store.sqlite_writer import (
    Batch,
    GroupCommitWriter,
    Operation,
    _resolve,
    _store_error,
    connect,
    migrate,
    run_batch,
)


class _Local(NamedTuple):
    """One operation, as the thread takes it (a :class:`~app.store.sqlite_writer.Runnable`)."""

    key: int
    name: str
    fn: Operation[Any]
    args: tuple[Any, ...]
    savepoint: bool

    def load(self) -> tuple[Operation[Any], tuple[Any, ...]]:
        return self.fn, self.args


_STOP = None  # put last by stop(): the thread runs what came before, then ends
# How long stop() waits for a thread that has said its last word to return (it blocks
# the loop, but the thread has only its return left).
_JOIN_SECONDS = 1.0


class ThreadWriter(GroupCommitWriter):
    """The writer as a daemon thread: a process that dies without stop() still exits,
    and SQLite's WAL undoes a transaction it interrupted."""

    kind = "thread"

    def __init__(self, path: Path, *, batch_limit: int = 256) -> None:
        super().__init__(path, batch_limit=batch_limit)
        self._queue: queue.SimpleQueue[_Local | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None  # what ended the thread, if anything did

    async def _launch(self, loop: asyncio.AbstractEventLoop) -> None:
        thread = threading.Thread(target=self._main, args=(loop,), name="store-writer", daemon=True)
        try:
            thread.start()
        except RuntimeError as exc:  # "can't start new thread": out of threads or memory
            raise _store_error(f"{self.path}: cannot start the store writer: {exc}", exc) from exc
        self._thread = thread

    def _launched(self) -> bool:
        return self._thread is not None

    def _ask_to_stop(self) -> None:
        self._queue.put(_STOP)  # submit() runs on this loop too: nothing can follow it

    async def _wait_ended(self) -> None:
        """The thread's last word, then the thread itself, which has only to return by
        then (so no writer thread outlives stop(), even for an instant)."""
        assert self._gone is not None
        await asyncio.shield(self._gone)
        if self._thread is not None:
            self._thread.join(_JOIN_SECONDS)

    def _post(
        self, key: int, name: str, fn: Operation[Any], args: tuple[Any, ...], savepoint: bool
    ) -> None:
        self._queue.put(_Local(key, name, fn, args, savepoint))

    def _ended_by_error(self) -> bool:
        return self._error is not None

    async def _crash_details(self) -> dict[str, Any]:
        return {"error": repr(self._error), "exc_info": self._error}

    # --- the thread -------------------------------------------------------------------------

    def _main(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            conn = connect(self.path)
            try:
                applied = migrate(conn)
            except BaseException:
                conn.close()
                raise
        # Every reason to fail reaches start(), which would otherwise wait for ever.
        except BaseException as exc:  # noqa: BLE001
            error = _store_error(f"{self.path}: {exc!r}", exc)
            self._call(loop, _resolve, self._ready, error)
            self._call(loop, self._lost)
            return
        self._call(loop, self._serve, applied)
        try:
            self._serve_batches(loop, conn)
        # What escapes run_batch is no operation's error (those are caught): a
        # BaseException, a bug. The writer is gone; store.writer_crashed says why.
        except BaseException as exc:  # noqa: BLE001
            self._error = exc
        finally:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
            self._call(loop, self._lost)

    def _serve_batches(self, loop: asyncio.AbstractEventLoop, conn: sqlite3.Connection) -> None:
        while True:
            batch, stop = self._take()
            if batch:
                answer: Batch = run_batch(conn, batch)
                self._call(loop, self._answer, answer)  # one wake-up of the loop per batch
            if stop:
                return

    def _take(self) -> tuple[list[_Local], bool]:
        """Block for one item, then take what else is queued, up to the batch limit."""
        item = self._queue.get()
        batch: list[_Local] = []
        while item is not _STOP:
            batch.append(item)
            if len(batch) >= self.batch_limit:
                return batch, False
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return batch, False
        return batch, True

    @staticmethod
    def _call(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            loop.call_soon_threadsafe(fn, *args)
