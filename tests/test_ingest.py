"""The webhook's 202 body, written from a template (app/ingest.py) instead of a JSON
encoder: it must say exactly what the documented ``Accepted`` model says."""

from __future__ import annotations

import json

import pytest

from app.ingest import Accepted, accepted_body
from app.store.base import EnqueueResult

RESULTS = [
    EnqueueResult(notification_id=1, job_id=1),
    EnqueueResult(notification_id=2**62, job_id=9, coalesced=True),
    EnqueueResult(notification_id=None, job_id=3, duplicate=True, previous_signed_at=5),
]


@pytest.mark.parametrize("result", RESULTS)
@pytest.mark.parametrize("brand", ["acme", "Acme.Grill-2_b"])  # BRANDS allows [A-Za-z0-9_.-]
def test_the_202_body_is_the_accepted_model(brand: str, result: EnqueueResult) -> None:
    body = accepted_body(brand, 9_007_199_254_740_993, result)
    document = json.loads(body)
    assert document == {
        "accepted": True,
        "brand": brand,
        "order_id": 9_007_199_254_740_993,
        "notification_id": result.notification_id,
        "duplicate": result.duplicate,
        "coalesced": result.coalesced,
    }
    assert Accepted.model_validate(document).model_dump() == document
