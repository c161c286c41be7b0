"""The Dockerfile and compose file cannot be run here (no Docker engine), so what they
say is checked against the code: the command they start exists and parses, every
variable they set is a real setting, and the image runs the same start command we
run natively in the e2e tests."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from app.cli import build_parser
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def _json_array(instruction: str) -> list[str]:
    match = re.search(rf"^{instruction} (\[.*\])$", _dockerfile(), re.M)
    assert match, f"{instruction} must be in exec (JSON array) form"
    return list(yaml.safe_load(match.group(1)))


def test_dockerfile_starts_a_real_command() -> None:
    entrypoint = _json_array("ENTRYPOINT")
    cmd = _json_array("CMD")
    assert entrypoint == ["clopos-hydrator"]  # the console script of pyproject.toml
    assert 'clopos-hydrator = "app.cli:main"' in (ROOT / "pyproject.toml").read_text()
    args = build_parser().parse_args(cmd)
    # A container must listen on every interface to be reachable through its port.
    assert (args.command, args.host, args.port) == ("serve", "0.0.0.0", 8000)  # noqa: S104
    assert "EXPOSE 8000" in _dockerfile()
    assert "USER hydrator" in _dockerfile()  # not root


def test_dockerfile_env_names_are_settings() -> None:
    fields = {name.upper() for name in Settings.model_fields}
    env_block = re.findall(r"^\s+(?:ENV\s+)?([A-Z_]+)=", _dockerfile(), re.M)
    app_vars = [v for v in env_block if v not in ("PATH", "PYTHONUNBUFFERED")]
    assert app_vars, "the image sets DATABASE_URL to its volume"
    assert set(app_vars) <= fields


def test_compose_file_matches_the_service() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service = compose["services"]["hydrator"]
    args = build_parser().parse_args(service["command"])
    assert args.command == "serve"
    assert service["ports"] == [f"{args.port}:{args.port}"]
    fields = {name.upper() for name in Settings.model_fields}
    assert set(service["environment"]) <= fields
    # The volume holds the SQLite file the DATABASE_URL points at.
    mount = service["volumes"][0].split(":")[1]
    assert service["environment"]["DATABASE_URL"] == f"sqlite:///{mount}/hydrator.db"
    # Grace period above the service's own shutdown grace (20 s) plus connection drain.
    grace = int(service["stop_grace_period"].rstrip("s"))
    assert grace > Settings.model_fields["shutdown_grace_seconds"].default + 5


def test_env_example_lists_every_setting() -> None:
    text = (ROOT / ".env.example").read_text()
    listed = set(re.findall(r"^([A-Z_]+)=", text, re.M))
    fields = {name.upper() for name in Settings.model_fields}
    assert listed == fields, (fields - listed, listed - fields)
