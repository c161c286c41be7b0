"""Brands whose credentials Clopos rejected: paused, probed, resumed.

A paused brand's jobs stay in the store (claims skip the brand) instead of burning
attempts and Clopos's per-IP failure budget; every ``probe_seconds`` one auth call
tells whether the credentials work again. /readyz and /metrics report the pauses.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from app.errors import CloposError
from app.logs import get_logger

log = get_logger("app.pauses")


class Authenticator(Protocol):
    async def authenticate(self) -> None: ...


@dataclass
class BrandPause:
    since: float
    reason: str
    next_probe: float


class BrandPauses:
    def __init__(self, probe_seconds: float, *, clock: Callable[[], float] = time.time) -> None:
        self._probe_seconds = probe_seconds
        self._clock = clock
        self._paused: dict[str, BrandPause] = {}

    def __contains__(self, brand: object) -> bool:
        return brand in self._paused

    def get(self, brand: str) -> BrandPause | None:
        return self._paused.get(brand)

    def brands(self) -> frozenset[str]:
        return frozenset(self._paused)

    def pause(self, brand: str, exc: CloposError) -> None:
        """Called when Clopos rejects a brand's credentials (idempotent)."""
        if brand in self._paused:
            return
        now = self._clock()
        self._paused[brand] = BrandPause(
            since=now,
            reason=f"credentials_rejected: {exc.describe()}",
            next_probe=now + self._probe_seconds,
        )
        log.error("brand.paused", brand=brand, reason="credentials_rejected", error=exc.describe())

    async def probe_due(self, clients: dict[str, Authenticator]) -> list[str]:
        """Try to authenticate every paused brand whose probe is due; return the resumed."""
        resumed = []
        for brand, pause in list(self._paused.items()):
            now = self._clock()
            if now < pause.next_probe:
                continue
            try:
                await clients[brand].authenticate()
            except CloposError as exc:
                pause.next_probe = now + self._probe_seconds
                log.warning("brand.still_paused", brand=brand, error=exc.describe())
                continue
            del self._paused[brand]
            log.info("brand.resumed", brand=brand, paused_s=round(now - pause.since, 1))
            resumed.append(brand)
        return resumed
