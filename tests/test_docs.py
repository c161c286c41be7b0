"""The operator guide backs its statements with tests: every test it names exists, and
every file it links to is in the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "operations.md"


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    }


def test_every_test_the_guide_names_exists() -> None:
    text = GUIDE.read_text()
    cited = 0
    current: Path | None = None
    # `tests/x.py::name`, `tests/x.py` alone, or `::name` (same file as the one before).
    for file, name in re.findall(r"`(tests/[\w/]+\.py)?(?:::(\w+))?`", text):
        if not file and not name:
            continue
        if file:
            current = ROOT / file
            assert current.is_file(), file
        assert current is not None, name
        if name:
            assert name in _test_names(current), f"{current.relative_to(ROOT)}::{name}"
        cited += 1
    assert cited >= 20


def test_every_section_the_issue_asks_for_is_there() -> None:
    headings = re.findall(r"^#+ (.+)$", GUIDE.read_text(), re.M)
    for wanted in (
        "Registering the URL and the secret with Clopos",
        "TLS at the proxy",
        "Exposing only the webhook route",
        "Poll-only mode",
        "Backing up and restoring the SQLite volume",
        "Moving to PostgreSQL",
        "Troubleshooting by symptom",
        "429s",
        "Dead letters",
        "A stuck backlog",
    ):
        assert wanted in headings, wanted
    readyz = GUIDE.read_text().split("### `/readyz` is 503")[1].split("###")[0]
    for check in ("store", "workers", "credentials:", "sink:", "backlog", "poller:"):
        assert f"| `{check}" in readyz, check
    assert "unconfigured_sinks" in readyz
    assert "webhook_auth" in readyz


def test_the_readme_links_the_guide_and_the_links_resolve() -> None:
    assert "(docs/operations.md)" in (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\((\.\./[^)#]+)", GUIDE.read_text()):
        assert (GUIDE.parent / target).resolve().exists(), target
