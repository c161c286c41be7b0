"""The alerting rules and dashboard in deploy/, checked with the real tools and docs.

``promtool`` comes from Debian's ``prometheus`` package; ``make test`` installs it when
it is missing and it can (as root, with apt-get). Where it cannot, the promtool tests
skip and say why; the checks that need no promtool still run.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "clopos-hydrator.json"
GUIDE = ROOT / "docs" / "operations.md"
METRIC = re.compile(r"\bclopos_hydrator_[a-z0-9_]+\b")

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not found: install Debian's `prometheus` package "
    "(make test does so when run as root with apt-get)",
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=RULES.parent, capture_output=True, text=True, timeout=60
    )


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def rule_expressions() -> list[str]:
    return [str(rule["expr"]) for rule in alert_rules()]


def dashboard_expressions() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets, variables, annotations."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "definition") and isinstance(value, str):
                    found.append(value)
                elif key == "query" and isinstance(value, str | dict):
                    walk({"expr": value} if isinstance(value, str) else value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(json.loads(DASHBOARD.read_text()))
    return found


def referenced_metrics() -> set[str]:
    """Every clopos_hydrator_* series named by the rules and the dashboard."""
    names: set[str] = set()
    for expression in rule_expressions() + dashboard_expressions():
        names.update(METRIC.findall(expression))
    return names


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@needs_promtool
def test_the_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


@needs_promtool
def test_the_rules_pass_their_unit_tests_over_synthetic_series() -> None:
    result = promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_rule_has_a_firing_and_a_quiet_unit_test() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - firing == set(), "rules never shown to fire"
    assert names - quiet == set(), "rules never shown to stay quiet"


def test_the_issue_s_alerts_are_all_there() -> None:
    names = {rule["alert"] for rule in alert_rules()}
    assert {
        "CloposHydratorBacklogTooOld",
        "CloposHydratorDeadLettersGrowing",
        "CloposHydratorBrandPaused",
        "CloposHydratorCloposRateLimited",
        "CloposHydratorSinkCircuitOpen",
        "CloposHydratorPollerStalled",
        "CloposHydratorNotReady",
    } <= names


def test_every_rule_links_to_its_section_of_the_operator_guide() -> None:
    anchors = {
        github_anchor(line.lstrip("#"))
        for line in GUIDE.read_text().splitlines()
        if line.startswith("#")
    }
    for rule in alert_rules():
        link = rule["annotations"]["runbook_url"]
        path, _, anchor = link.partition("#")
        assert path == "docs/operations.md", link
        assert anchor in anchors, f"{rule['alert']}: no heading for #{anchor} in {GUIDE.name}"
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]


def test_the_dashboard_is_grafana_json_with_queries() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"]
    assert dashboard["title"]
    assert all(panel["targets"] for panel in dashboard["panels"])
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    # The metrics a reader of this dashboard needs are all on it.
    for needed in ("queue_oldest_age_seconds", "dead_letters", "upstream_requests_total"):
        assert f"clopos_hydrator_{needed}" in referenced_metrics()
