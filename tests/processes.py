"""The processes a test started, seen through /proc (Linux): the service's children
(its store writer, a wrapped command) and whether one has exited."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path


def child_pids(pid: int) -> list[int]:
    """The children of every thread of ``pid`` (none once it has gone)."""
    children: list[int] = []
    for tasks in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(FileNotFoundError):  # a thread that has just ended
            children += [int(child) for child in tasks.read_text().split()]
    return children


def open_files(pid: int) -> dict[int, str]:
    """What each descriptor of ``pid`` refers to (a path, or e.g. "socket:[123]")."""
    files = {}
    for link in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile
            files[int(link.name)] = os.readlink(link)
    return files


def exited(pid: int, *, within: float) -> bool:
    """Whether ``pid`` has exited (a zombie counts: it runs nothing) within the time."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.02)
    return False
