"""One fake clock for the tests: time moves only when a test (or a fake sleep) moves it."""

from __future__ import annotations

import asyncio


class FakeClock:
    """Called like ``time.time``; shared by a sandbox, a client, a budget, a breaker..."""

    def __init__(self, now: float = 1_770_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        """A stand-in for ``asyncio.sleep`` that moves the clock instead of waiting."""
        self.now += seconds
        await asyncio.sleep(0)
