"""The SQLite writer process: ``python -m app.store.writer_process PATH FD BATCH PARENT``.

Started by :class:`app.store.sqlite_writer.GroupCommitWriter` (read its module docstring
first). It opens and migrates the database, says :class:`Ready` (or :class:`Failed`),
then, until its socket reaches end-of-file: takes every request that has arrived (up to
the batch limit), runs them in one transaction and answers with one :class:`Batch`.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import os
import resource
import signal
import socket
import sys
from collections import deque
from pathlib import Path
from typing import Any

from app.store.sqlite_writer import (
    Failed,
    Ready,
    Request,
    capture_logs,
    connect,
    frame,
    migrate,
    run_batch,
    sendable,
    unframe_requests,
)

_PR_SET_PDEATHSIG = 1
# Where the store's operations and what they are sent live (a list page's render).
_OPERATION_MODULES = ("app.store.sqlite", "app.snapshot")
_READ_SIZE = 1 << 20
_MAX_FDS = 1 << 16  # closed without /proc when the limit is higher or unlimited


class _Socket:
    """The writer's end, a blocking socket: blocking reads of whole requests, and
    reads that do not block (``MSG_DONTWAIT``) of whatever else has arrived."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        self.sock = sock
        self.buffer = bytearray()
        self.eof = False

    def send(self, message: Any) -> None:
        self.sock.sendall(frame(message))

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def wait(self) -> list[Request]:
        """Block until at least one request has arrived (empty at end-of-file)."""
        while not self.eof:
            self._read(0)
            got = unframe_requests(self.buffer)
            if got:
                return got
        return []

    def more(self) -> list[Request]:
        """What else has arrived, without blocking."""
        with contextlib.suppress(BlockingIOError):
            while not self.eof:
                self._read(socket.MSG_DONTWAIT)
        return unframe_requests(self.buffer)

    def _read(self, flags: int) -> None:
        data = self.sock.recv(_READ_SIZE, flags)
        if data:
            self.buffer += data
        else:
            self.eof = True


def _die_with_parent(parent: int) -> None:
    """SIGKILL when the service dies; and no signal of the terminal or the container
    stops this process in the middle of a batch: the service stops it (end-of-file)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the line above took effect
        os._exit(1)


def serve(path: Path, channel: _Socket, batch_limit: int) -> None:
    try:
        # The operations' modules, loaded before Ready rather than by the first
        # request's unpickling (a webhook would wait for it).
        for module in _OPERATION_MODULES:
            importlib.import_module(module)
        conn = connect(path)
        try:
            applied = migrate(conn)
        except BaseException:
            conn.close()
            raise
    except Exception as exc:  # noqa: BLE001 - every reason to fail reaches the service
        channel.send(Failed(f"{path}: {exc}"))
        return
    channel.send(Ready(applied))
    pending: deque[Request] = deque()
    try:
        while True:
            if not pending:
                pending.extend(channel.wait())
                if not pending:
                    return  # end-of-file: the service has stopped
            pending.extend(channel.more())
            batch = [pending.popleft() for _ in range(min(batch_limit, len(pending)))]
            answer = run_batch(conn, batch)
            try:
                message = frame(answer.wire())
            except Exception:  # noqa: BLE001 - a result that does not pickle: that caller's error
                message = frame(sendable(answer, batch).wire())
            channel.send_bytes(message)
    finally:
        conn.close()


def _close_inherited(keep: int) -> None:
    """Close every descriptor but stdio and the socket: uvloop's spawn passes on those
    of the service that are not close-on-exec (its pipes, say), and a writer holding a
    pipe's end keeps its reader from seeing end-of-file."""
    try:
        inherited = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:  # no /proc: every descriptor there may be
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        os.closerange(3, keep)
        os.closerange(keep + 1, limit if 0 < limit <= _MAX_FDS else _MAX_FDS)
        return
    for fd in inherited:
        if fd > 2 and fd != keep:
            with contextlib.suppress(OSError):  # listdir's own, closed already
                os.close(fd)


def main(argv: list[str]) -> int:
    path, fd, batch_limit, parent = argv
    _close_inherited(int(fd))
    _die_with_parent(int(parent))
    capture_logs()
    sock = socket.socket(fileno=int(fd))
    try:
        serve(Path(path), _Socket(sock), int(batch_limit))
    except (BrokenPipeError, ConnectionResetError):
        return 1  # the service is gone: nobody is left to answer
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
