"""Exit with the status of the signal that stopped the service, also as PID 1.

uvicorn stops gracefully on SIGTERM or SIGINT and then re-raises the signal so that the
process dies of it (status 143 or 130). In a container the service is PID 1, and the
kernel drops a signal that PID 1 has no handler for: the re-raised SIGTERM did nothing
and the process exited 0, which orchestrators read as "finished", not "stopped".

So the CLI installs handlers that remember the signal (uvicorn restores them before it
re-raises), and after the shutdown dies of the signal itself; when that is ignored
(PID 1), it exits with 128 + the signal number explicitly.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

HANDLED = (signal.SIGTERM, signal.SIGINT)


class Termination:
    """The signal that asked the service to stop, if any."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _record(self, signum: int, frame: FrameType | None) -> None:
        # Only reached once uvicorn has finished (it handles the signals while serving)
        # or before it started: either way, nothing is left to stop gracefully.
        if self.signum is None:
            self.signum = signum

    def exit_status(self, code: int) -> int:
        """``code`` when no signal came; else die of the signal, or return 128 + signum."""
        if self.signum is None:
            return code
        signal.signal(self.signum, signal.SIG_DFL)
        signal.raise_signal(self.signum)
        # Still alive: PID 1 of a PID namespace ignores a signal without a handler.
        return 128 + self.signum


@contextmanager
def remember_termination() -> Iterator[Termination]:
    """Install the remembering handlers for the duration of the block."""
    termination = Termination()
    previous = {sig: signal.signal(sig, termination._record) for sig in HANDLED}
    try:
        yield termination
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
