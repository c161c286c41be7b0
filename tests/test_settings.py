"""Settings: the contract's names, safe defaults, one clear line per bad value."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from app.errors import ConfigError
from app.settings import HttpSinkConfig, LogSinkConfig, load_settings

BASE_ENV = {
    "WEBHOOK_SECRET": "a-long-enough-secret",
    "CLOPOS_CLIENT_ID": "cid",
    "CLOPOS_CLIENT_SECRET": "csecret-value",
    "CLOPOS_BRAND": "brand1",
    "CLOPOS_INTEGRATOR_ID": "integ",
}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    monkeypatch.chdir(tmp_path)  # no stray .env
    for key in list(__import__("os").environ):
        if key.startswith(("CLOPOS_", "WEBHOOK_", "SINKS", "DATABASE_URL", "ADMIN_TOKEN", "LOG_")):
            monkeypatch.delenv(key)
    for key, value in BASE_ENV.items():
        monkeypatch.setenv(key, value)
    return monkeypatch


def test_defaults_follow_the_product_contract(env: pytest.MonkeyPatch) -> None:
    config = load_settings()
    s = config.settings
    assert s.clopos_base_url == "https://integrations.clopos.com/open-api"
    assert s.clopos_rate_limit_per_minute == 300
    assert s.database_url == "sqlite:///./data/hydrator.db"
    assert s.webhook_max_body_bytes == 256 * 1024
    assert s.log_format == "json"
    assert s.log_level == "info"
    assert s.webhook_order_id_paths == ["data.id", "data.order_id", "order.id", "order_id", "id"]
    assert [type(x) for x in s.sinks] == [LogSinkConfig]
    assert config.sink_names == ["log"]
    assert config.default_brand == "brand1"
    assert config.brands["brand1"].tenant == "integ:brand1"


def test_webhook_secret_is_required_unless_explicitly_waived(env: pytest.MonkeyPatch) -> None:
    env.delenv("WEBHOOK_SECRET")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert err.value.variable == "WEBHOOK_SECRET"
    env.setenv("WEBHOOK_ALLOW_UNAUTHENTICATED", "true")
    assert load_settings().settings.webhook_secret is None


def test_partial_credentials_name_the_missing_variable(env: pytest.MonkeyPatch) -> None:
    env.delenv("CLOPOS_INTEGRATOR_ID")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert err.value.variable == "CLOPOS_INTEGRATOR_ID"


def test_sinks_json_is_parsed_and_validated(env: pytest.MonkeyPatch) -> None:
    env.setenv(
        "SINKS",
        json.dumps(
            [
                {"type": "http", "url": "https://example.test/h", "secret": "whsec_c2VjcmV0"},
                {"type": "log"},
            ]
        ),
    )
    config = load_settings()
    http = config.settings.sinks[0]
    assert isinstance(http, HttpSinkConfig)
    assert http.timeout_seconds == 15.0
    assert config.sink_names == ["http", "log"]
    assert "whsec_c2VjcmV0" in config.secret_values()

    env.setenv("SINKS", json.dumps([{"type": "http", "url": "https://x.test", "secret": "nope"}]))
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert err.value.variable == "SINKS"
    assert "whsec_" in err.value.reason

    env.setenv("SINKS", "[{not json")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert err.value.variable == "SINKS"

    env.setenv("SINKS", "[]")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert err.value.variable == "SINKS"


def test_sink_names_do_not_depend_on_list_order(env: pytest.MonkeyPatch) -> None:
    """Deliveries are queued by sink name: inserting a sink must not rename the others."""
    hook = {"type": "http", "url": "https://example.test/h", "secret": "whsec_c2VjcmV0"}
    env.setenv("SINKS", json.dumps([hook, {"type": "log"}]))
    before = load_settings().sink_names
    env.setenv("SINKS", json.dumps([{"type": "log"}, hook]))
    assert sorted(load_settings().sink_names) == sorted(before) == ["http", "log"]
    env.setenv("SINKS", json.dumps([hook, hook]))  # two of a type need names
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert (err.value.variable, "'name'" in err.value.reason) == ("SINKS", True)
    env.setenv("SINKS", json.dumps([{**hook, "name": "a"}, {**hook, "name": "b"}]))
    assert load_settings().sink_names == ["a", "b"]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CLOPOS_RATE_LIMIT_PER_MINUTE", "0"),
        ("CLOPOS_RATE_LIMIT_PER_MINUTE", "many"),
        ("DATABASE_URL", "mysql://x"),
        ("LOG_FORMAT", "xml"),
        ("ADMIN_TOKEN", "short"),
        ("CLOPOS_BASE_URL", "ftp://x"),
    ],
)
def test_bad_values_name_their_variable(env: pytest.MonkeyPatch, variable: str, value: str) -> None:
    env.setenv(variable, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert err.value.variable in (variable, "settings")
    if err.value.variable == "settings":
        assert variable.split("_")[0] in str(err.value).upper()


def test_brands_file(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "brands.json"
    path.write_text(
        json.dumps(
            [
                {
                    "brand": "b2",
                    "client_id": "c2",
                    "client_secret": "s2-secret",
                    "integrator_id": "i2",
                    "webhook_secret": "b2-hook-secret",
                }
            ]
        )
    )
    env.setenv("CLOPOS_BRANDS_FILE", str(path))
    config = load_settings()
    assert sorted(config.brands) == ["b2", "brand1"]
    assert config.webhook_secret_for("b2") == "b2-hook-secret"
    assert config.webhook_secret_for("brand1") == "a-long-enough-secret"
    path.write_text("[{}]")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert err.value.variable == "CLOPOS_BRANDS_FILE"


def test_order_id_paths_accept_comma_list(env: pytest.MonkeyPatch) -> None:
    env.setenv("WEBHOOK_ORDER_ID_PATHS", "payload.order.id, id")
    assert load_settings().settings.webhook_order_id_paths == ["payload.order.id", "id"]


def test_cli_prints_one_line_for_a_config_error(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "CLOPOS_RATE_LIMIT_PER_MINUTE": "-5", "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "app", "serve"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "CLOPOS_RATE_LIMIT_PER_MINUTE" in lines[0]
    assert "Traceback" not in done.stderr
