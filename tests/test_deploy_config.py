"""What the Dockerfile, .dockerignore, the lock and the compose file say, checked against
the code without an engine: commands exist and parse, variables are real settings, the
lock pins what pyproject.toml asks for. `make container-check` builds and runs the image
for real (Compose v2 validates the compose file there); tests/e2e/test_image_command.py
runs the image's command natively."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.cli import build_parser
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {name.upper() for name in Settings.model_fields}


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def _json_array(instruction: str) -> list[str]:
    text = _dockerfile().replace("\\\n", " ")
    match = re.search(rf"^{instruction}\b.*?(\[.*\])\s*$", text, re.M)
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


def test_the_health_check_is_a_real_command_that_follows_the_port() -> None:
    check = _json_array("HEALTHCHECK")
    assert check[0] == "clopos-hydrator"
    args = build_parser().parse_args(check[1:])
    assert args.command == "healthcheck"
    assert args.url is None  # no fixed port: it reads the serving command line
    from app.healthcheck import serving_url

    assert serving_url(["/opt/venv/bin/clopos-hydrator", "serve", "--port", "9000"]) == (
        "http://127.0.0.1:9000"
    )
    assert serving_url(["python", "-m", "app", "sandbox", "--host", "::", "--port", "81"]) == (
        "http://[::1]:81"
    )


def test_dockerfile_env_names_are_settings() -> None:
    env_block = re.findall(r"^\s+(?:ENV\s+)?([A-Z_]+)=", _dockerfile(), re.M)
    pip_and_python = ("PATH", "PYTHONUNBUFFERED", "PIP_NO_CACHE_DIR")
    pip_and_python += ("PIP_DISABLE_PIP_VERSION_CHECK", "PIP_INDEX_URL")
    app_vars = [v for v in env_block if v not in pip_and_python]
    assert app_vars, "the image sets DATABASE_URL to its volume"
    assert set(app_vars) <= SETTINGS


def test_dockerfile_builds_in_a_locked_down_network_from_the_lock() -> None:
    text = _dockerfile()
    assert len(re.findall(r"^FROM ", text, re.M)) == 2  # build stage, runtime stage
    args = dict(re.findall(r"^ARG (\w+)=?(.*)$", text, re.M))
    assert args["BASE_IMAGE"] == "python:3.11-slim"
    assert args["PIP_INDEX_URL"] == "https://pypi.org/simple"  # public default only
    assert args["EXTRA_CA_PEM"] == ""
    assert not text.startswith("# syntax=")  # that would pull a frontend image
    # Dependencies from the lock, hash-checked, before the code is copied.
    assert text.index("COPY requirements.lock") < text.index("COPY app")
    assert "--require-hashes" in text
    assert "-r /tmp/requirements.lock" in text
    assert "--no-deps" in text  # the project adds nothing unlocked


def _lock(name: str) -> dict[str, str]:
    text = (ROOT / name).read_text()
    pins = dict(re.findall(r"^([a-z0-9][a-z0-9._-]*)==([^ \\;]+)", text, re.M | re.I))
    # every pin carries hashes
    blocks = re.split(r"\n(?=[a-z0-9])", text, flags=re.I)
    for block in blocks:
        if "==" in block.split("\n")[0]:
            assert "--hash=sha256:" in block, block
    return {re.sub(r"[-_.]+", "-", k).lower(): v for k, v in pins.items()}


def _requirement_name(requirement: str) -> str:
    name = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert name
    return re.sub(r"[-_.]+", "-", name.group(0)).lower()


def test_the_lock_pins_every_runtime_dependency_and_no_dev_tool() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _lock("requirements.lock")
    for requirement in project["dependencies"]:
        assert _requirement_name(requirement) in pins, f"run `make lock`: {requirement}"
    for dev in project["optional-dependencies"]["dev"]:
        name = _requirement_name(dev)
        if name not in ("types-jsonschema",):
            assert name not in pins or name in {
                _requirement_name(r) for r in project["dependencies"]
            }, f"dev tool {name} in the image"
    # uvicorn without [standard]: only the extras the server uses (the speed ones).
    assert "httptools" in pins
    assert "uvloop" in pins
    for unused in ("websockets", "watchfiles", "pytest", "mypy", "ruff"):
        assert unused not in pins
    assert set(_lock("requirements-build.lock")) == {"setuptools"}


def _ignored(patterns: list[str], path: str) -> bool:
    """Docker's .dockerignore rule, enough for these patterns: the last matching line
    wins, a match on a parent directory excludes everything below it."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw.lstrip("!").removeprefix("**/")
        hit = any(
            fnmatch.fnmatch(c, pattern) or fnmatch.fnmatch(c.split("/")[-1], pattern)
            for c in candidates
        )
        if hit:
            ignored = not negate
    return ignored


@pytest.mark.parametrize(
    ("path", "ignored"),
    [
        (".venv/bin/python", True),
        (".git/HEAD", True),
        (".env", True),
        ("data/hydrator.db", True),
        ("hydrator.db-wal", True),
        ("app/__pycache__/cli.cpython-311.pyc", True),
        (".env.example", False),
        ("app/cli.py", False),
        ("pyproject.toml", False),
        ("README.md", False),
        ("requirements.lock", False),
        ("requirements-build.lock", False),
    ],
)
def test_dockerignore_keeps_secrets_history_and_data_out(path: str, ignored: bool) -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert _ignored(patterns, path) is ignored


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def _interpolated(value: str) -> str:
    """Compose's ${VAR:-default} with nothing set: the default."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def test_compose_services_run_real_commands() -> None:
    services = {k: v for k, v in _compose()["services"].items() if k != "postgres"}
    assert set(services) >= {"hydrator", "sandbox", "replica"}
    for name, service in services.items():
        args = build_parser().parse_args(service["command"])
        assert args.command == ("sandbox" if name == "sandbox" else "serve")
        # Published where it listens (host:port:port) and on loopback only by default:
        # /metrics, /readyz and /admin are not for every interface.
        for port in service["ports"]:
            host, _outer, inner = _interpolated(port).split(":")
            assert (host, int(inner)) == ("127.0.0.1", args.port), port
        assert "healthcheck" not in service  # the image's, which follows the port
    assert services["sandbox"]["profiles"] == ["sandbox"]
    assert "profiles" not in services["hydrator"]


def test_compose_postgres_profile_runs_two_replicas_on_its_database() -> None:
    services = _compose()["services"]
    postgres, replica = services["postgres"], services["replica"]
    assert postgres["profiles"] == replica["profiles"] == ["postgres"]
    assert replica["deploy"]["replicas"] == 2
    assert replica["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    # Only the store is set here (to this profile's database); the rest comes from .env.
    assert set(replica["environment"]) == {"DATABASE_URL", "PGPASSWORD"}
    user, database = (
        postgres["environment"]["POSTGRES_USER"],
        postgres["environment"]["POSTGRES_DB"],
    )
    assert replica["environment"]["DATABASE_URL"] == f"postgresql://{user}@postgres:5432/{database}"
    assert replica["env_file"] == [{"path": ".env", "required": False}]
    # One host port per replica.
    host, ports, inner = _interpolated(replica["ports"][0]).split(":")
    low, high = (int(p) for p in ports.split("-"))
    assert (host, high - low + 1, inner) == ("127.0.0.1", 2, "8000")


def test_compose_does_not_override_the_env_file() -> None:
    hydrator = _compose()["services"]["hydrator"]
    # An `environment:` entry beats .env silently (DATABASE_URL, LOG_FORMAT did).
    assert "environment" not in hydrator
    assert hydrator["env_file"] == [{"path": ".env", "required": False}]  # Compose 2.24+
    # Every variable the file interpolates is either a setting or documented for compose.
    text = (ROOT / "docker-compose.yml").read_text()
    used = set(re.findall(r"\$\{([A-Z_]+)", text))
    example = (ROOT / ".env.example").read_text()
    assert all(name in SETTINGS or f"{name}=" in example for name in used), used
    # The volume holds the SQLite file of the image's DATABASE_URL.
    mount = hydrator["volumes"][0].split(":")[1]
    assert f"DATABASE_URL=sqlite:///{mount}/hydrator.db" in _dockerfile()
    # Grace period above the service's own shutdown grace (20 s) plus connection drain.
    grace = int(hydrator["stop_grace_period"].rstrip("s"))
    assert grace > Settings.model_fields["shutdown_grace_seconds"].default + 5
    # A configuration error (exit 2) must not restart the container forever.
    assert re.fullmatch(r"on-failure:\d+", hydrator["restart"])


def test_compose_states_the_version_it_needs() -> None:
    head = (ROOT / "docker-compose.yml").read_text().split("services:")[0]
    assert "Compose v2.24 or later" in head
    assert "Compose v2.24 or later" in (ROOT / "README.md").read_text()


def test_env_example_lists_every_setting() -> None:
    text = (ROOT / ".env.example").read_text()
    listed = set(re.findall(r"^([A-Z_]+)=", text, re.M))
    assert listed == SETTINGS, (SETTINGS - listed, listed - SETTINGS)


def test_compose_requires_no_variable_outside_its_profile() -> None:
    """Compose interpolates every service before it applies profiles, so a required
    variable (``${X:?…}``) of the postgres profile broke a plain ``docker compose up``
    (SQLite) for anyone without it in .env (docker/compose#11977)."""
    text = (ROOT / "docker-compose.yml").read_text()
    required = re.findall(r"\$\{([A-Z_]+):?\?", text)
    assert required == [], f"required variables break the default profile: {required}"
