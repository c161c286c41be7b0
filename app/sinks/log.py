"""The ``log`` sink: one structured log event per snapshot (``sink.log.order``).

Useful to try the service, and as a tap beside an HTTP sink. The order is logged as
parsed JSON, so a JSON log pipeline can index its fields.
"""

from __future__ import annotations

import json

from app.logs import LOG_SINK_LOGGER, get_logger
from app.store.base import Delivery

log = get_logger(LOG_SINK_LOGGER)


class LogSink:
    kind = "log"
    timeout_seconds = 5.0

    def __init__(self, name: str, *, concurrency: int = 4) -> None:
        self.name = name
        self.concurrency = concurrency

    async def deliver(self, delivery: Delivery) -> None:
        log.info(
            "sink.log.order",
            sink=self.name,
            webhook_id=delivery.snapshot_key,
            version=delivery.version,
            body=json.loads(delivery.body),
        )

    async def aclose(self) -> None:
        return None
