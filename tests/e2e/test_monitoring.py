"""Every metric the alert rules and the Grafana dashboard name is one the service exports.

Read from a real running instance's /metrics (with the poller on, so its families are
there too): a renamed or dropped metric fails here instead of silently blanking a
panel or disarming an alert.
"""

from __future__ import annotations

from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.service import ServiceProcess
from tests.test_alert_rules import referenced_metrics

SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("_count", "_sum", "_created"),
}


def exported_series_names(text: str) -> set[str]:
    """The series names a query may use: each family's name and its typed suffixes."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ()))
    return names


def test_every_metric_in_the_rules_and_dashboard_is_exported(make_service: Any) -> None:
    service: ServiceProcess = make_service(POLL_INTERVAL_SECONDS="60")
    response = httpx.get(f"{service.url}/metrics", timeout=10)
    assert response.status_code == 200
    exported = exported_series_names(response.text)
    referenced = referenced_metrics()
    assert len(referenced) >= 15  # the scan found the queries, not nothing
    assert referenced - exported == set(), "named in deploy/ but not exported"
