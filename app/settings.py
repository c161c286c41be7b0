"""Configuration: one ``Settings`` object, built once at start-up and passed in.

Names are the contract of ``shared/product.md``; every variable is listed in
``.env.example``. Nothing here runs at import time: call :func:`load_settings`.
A wrong or missing value raises :class:`~app.errors.ConfigError` naming the
variable, which the CLI prints as one line (no traceback).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.errors import ConfigError
from app.signing import secret_key

DEFAULT_ORDER_ID_PATHS = ("data.id", "data.order_id", "order.id", "order_id", "id")


class BrandConfig(BaseModel):
    """Credentials of one Clopos brand, and the secret its notifications are signed with."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    brand: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.\-]+$")
    client_id: str = Field(min_length=1)
    client_secret: SecretStr
    integrator_id: str = Field(min_length=1)
    # Per-brand webhook secret; falls back to WEBHOOK_SECRET when absent.
    webhook_secret: SecretStr | None = None

    @field_validator("webhook_secret")
    @classmethod
    def _usable_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            secret_key(value.get_secret_value())
        return value

    @property
    def tenant(self) -> str:
        """The key Clopos's tier-3 budget is enforced on."""
        return f"{self.integrator_id}:{self.brand}"


class HttpSinkConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["http"]
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.\-]+$")
    url: str = Field(pattern=r"^https?://")
    # One secret, or several during a rotation (all are used to sign).
    secret: SecretStr | list[SecretStr]
    headers: dict[str, str] = Field(default_factory=dict)
    timeout_seconds: float = Field(default=15.0, gt=0, le=300)
    concurrency: int = Field(default=4, ge=1, le=256)
    # Circuit breaker: this many consecutive failures open it; it probes the sink after 1 s,
    # then 2 s, 4 s ... while probes fail, never waiting more than cooldown_seconds between two.
    breaker_failures: int = Field(default=5, ge=1)
    breaker_cooldown_seconds: float = Field(default=30.0, gt=0)

    @property
    def secrets(self) -> list[SecretStr]:
        return self.secret if isinstance(self.secret, list) else [self.secret]

    @field_validator("secret")
    @classmethod
    def _whsec(cls, value: SecretStr | list[SecretStr]) -> SecretStr | list[SecretStr]:
        for secret in value if isinstance(value, list) else [value]:
            if not secret.get_secret_value().startswith("whsec_"):
                raise ValueError("each http sink secret must start with 'whsec_'")
            secret_key(secret.get_secret_value())  # ValueError names the problem
        if isinstance(value, list) and not value:
            raise ValueError("at least one secret is required")
        return value


class LogSinkConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["log"]
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.\-]+$")
    concurrency: int = Field(default=4, ge=1, le=256)


SinkConfig = Annotated[HttpSinkConfig | LogSinkConfig, Field(discriminator="type")]


def sink_name(sink: HttpSinkConfig | LogSinkConfig) -> str:
    """A sink's name: its ``name``, else its type. Deliveries are queued by this name,
    so it must never depend on the sink's position in the list."""
    return sink.name or sink.type


def _default_sinks() -> list[HttpSinkConfig | LogSinkConfig]:
    return [LogSinkConfig(type="log")]


SqliteWriter = Literal["auto", "process", "thread"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        # `ADMIN_TOKEN=` (as in .env.example, or `${VAR:-}` in compose) means unset.
        env_ignore_empty=True,
    )

    # --- Clopos ---
    clopos_base_url: str = Field(
        default="https://integrations.clopos.com/open-api", pattern=r"^https?://"
    )
    clopos_client_id: str | None = None
    clopos_client_secret: SecretStr | None = None
    clopos_brand: str | None = None
    clopos_integrator_id: str | None = None
    clopos_brands_file: Path | None = None
    clopos_rate_limit_per_minute: int = Field(default=300, ge=1, le=100_000)
    # Clopos's own gateway gives up at 8 s (504); allow a little more for the network.
    clopos_timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    clopos_max_connections: int = Field(default=64, ge=1, le=1024)

    # --- Inbound webhooks ---
    webhook_secret: SecretStr | None = None
    webhook_allow_unauthenticated: bool = False
    webhook_max_body_bytes: int = Field(default=256 * 1024, ge=1024, le=16 * 1024 * 1024)
    webhook_timestamp_tolerance_seconds: int = Field(default=300, ge=1, le=3600)
    webhook_order_id_paths: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_ORDER_ID_PATHS)
    )

    # --- HTTP listener (app/http_server.py) ---
    # Request line plus headers; larger is a 431 (h11's default cap is 16 KiB too).
    http_max_header_bytes: int = Field(default=16 * 1024, ge=1024, le=1024 * 1024)
    # A request (head and body) must be fully received within this, else 408 and closed.
    http_request_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    # Open connections; one more is answered 503 and closed.
    http_max_connections: int = Field(default=1000, ge=1, le=100_000)
    # Set to serve /metrics, /readyz and /admin/* on their own listener (they name the
    # brands): the public port then serves only /webhooks/* and /healthz.
    ops_port: int | None = Field(default=None, ge=1, le=65535)
    ops_host: str = Field(default="127.0.0.1", min_length=1)

    # --- Store ---
    database_url: str = "sqlite:///./data/hydrator.db"
    # Where SQLite's single writer runs: a process of its own, a thread, or "auto" (a
    # process when this process may use two CPUs or more; app/store/writer_thread.py).
    sqlite_writer: SqliteWriter = "auto"
    retention_hours: float = Field(default=168.0, gt=0)

    # --- Sinks ---
    sinks: list[SinkConfig] = Field(default_factory=_default_sinks)

    # --- Workers and retries ---
    hydration_concurrency: int = Field(default=8, ge=1, le=256)
    # A claimed item whose worker stops renewing it (a crash) is claimed again after this.
    # A fetch waits at most half of it for the tenant budget (then it is put back as
    # rate-limited).
    lease_seconds: float = Field(default=120.0, ge=5)
    # Running work renews its lease every third of it; claims that end with nothing
    # recorded (a crash, a hung worker) this many times in a row end in a dead letter.
    max_lost_leases: int = Field(default=3, ge=1, le=100)
    retry_base_seconds: float = Field(default=2.0, gt=0)
    retry_max_seconds: float = Field(default=600.0, gt=0)
    retry_give_up_seconds: float = Field(default=86_400.0, gt=0)
    not_found_max_attempts: int = Field(default=5, ge=1)
    not_found_retry_seconds: float = Field(default=30.0, gt=0)
    paused_brand_retry_seconds: float = Field(default=300.0, gt=0)
    shutdown_grace_seconds: float = Field(default=20.0, ge=0)

    # --- Reconciliation poller ---
    # Seconds between two polls of GET /v2/orders per brand; 0 turns polling off.
    poll_interval_seconds: float = Field(default=30.0, ge=0, le=3600)
    # Orders per list call (Clopos documents 100 as the safe maximum).
    poll_page_size: int = Field(default=100, ge=1, le=100)
    # List calls one cycle of one brand may make while working through a backlog.
    poll_max_pages: int = Field(default=10, ge=1, le=1000)
    # How far back the very first poll of a brand looks (later ones resume at the watermark).
    poll_lookback_seconds: float = Field(default=900.0, ge=0, le=30 * 86_400)
    poll_slack_seconds: float = Field(default=60.0, ge=1, le=3600)

    # --- Hydration from list pages (app/list_hydration.py, app/backlog.py) ---
    # A list page (receipt embedded) hydrates every order on it, no detail call each.
    hydrate_from_list: bool = True
    # Backlog mode: when a brand's due jobs exceed what this many seconds of its budget
    # can fetch one by one, read recent changes with list calls instead.
    backlog_horizon_seconds: float = Field(default=10.0, gt=0, le=3600)
    # List calls one backlog cycle of one brand may make (across its venues).
    backlog_max_pages: int = Field(default=10, ge=1, le=1000)
    # Seconds read below the oldest due notice's arrival (a notice may trail its change).
    backlog_slack_seconds: float = Field(default=10.0, ge=0, le=3600)

    # --- Operations ---
    admin_token: SecretStr | None = None
    ready_max_backlog: int = Field(default=10_000, ge=1)
    ready_max_oldest_seconds: float = Field(default=600.0, gt=0)
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("webhook_order_id_paths", mode="before")
    @classmethod
    def _paths(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            items = json.loads(text) if text.startswith("[") else text.split(",")
            value = [str(item).strip() for item in items if str(item).strip()]
        if not value:
            raise ValueError("at least one path is required")
        return value

    @field_validator("poll_interval_seconds")
    @classmethod
    def _poll_interval(cls, value: float) -> float:
        if 0 < value < 1:
            # Sub-second polling would spend a large share of the tenant budget on lists.
            raise ValueError("must be 0 (polling off) or at least 1")
        return value

    @field_validator("admin_token")
    @classmethod
    def _admin_token_strength(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters")
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret_strength(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            if len(value.get_secret_value()) < 8:
                raise ValueError("must be at least 8 characters")
            secret_key(value.get_secret_value())  # a whsec_ secret must be valid base64
        return value

    @model_validator(mode="after")
    def _checks(self) -> Settings:
        if not self.database_url.startswith(("sqlite://", "postgresql://", "postgres://")):
            raise ValueError("DATABASE_URL must start with sqlite:// or postgresql://")
        if self.retry_max_seconds < self.retry_base_seconds:
            raise ValueError("RETRY_MAX_SECONDS must be >= RETRY_BASE_SECONDS")
        return self

    # --- Derived views ---

    def default_brand(self) -> BrandConfig | None:
        """The brand given by the four CLOPOS_* variables, when any is set."""
        fields = {
            "CLOPOS_CLIENT_ID": self.clopos_client_id,
            "CLOPOS_CLIENT_SECRET": self.clopos_client_secret,
            "CLOPOS_BRAND": self.clopos_brand,
            "CLOPOS_INTEGRATOR_ID": self.clopos_integrator_id,
        }
        if not any(fields.values()):
            return None
        missing = [name for name, value in fields.items() if not value]
        if missing:
            raise ConfigError(missing[0], "required when any CLOPOS_* credential is set")
        assert self.clopos_client_secret is not None
        return BrandConfig(
            brand=str(self.clopos_brand),
            client_id=str(self.clopos_client_id),
            client_secret=self.clopos_client_secret,
            integrator_id=str(self.clopos_integrator_id),
        )


def load_brands_file(path: Path) -> list[BrandConfig]:
    """Read ``CLOPOS_BRANDS_FILE``: a JSON list of brand objects (or ``{"brands": [...]}``)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError("CLOPOS_BRANDS_FILE", f"cannot read {path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError("CLOPOS_BRANDS_FILE", f"{path} is not JSON: {exc.msg}") from exc
    if isinstance(raw, dict):
        raw = raw.get("brands")
    if not isinstance(raw, list) or not raw:
        raise ConfigError("CLOPOS_BRANDS_FILE", "must hold a non-empty JSON list of brands")
    brands: list[BrandConfig] = []
    for index, item in enumerate(raw):
        try:
            brands.append(BrandConfig.model_validate(item))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ConfigError(
                "CLOPOS_BRANDS_FILE", f"brand #{index} field {where}: {first['msg']}"
            ) from exc
    names = [b.brand for b in brands]
    if len(set(names)) != len(names):
        raise ConfigError("CLOPOS_BRANDS_FILE", "a brand is listed twice")
    return brands


class Config:
    """Settings plus what is derived from them once: the brands and sink names.

    Built by :func:`load_settings`; this is what the rest of the code receives.
    """

    def __init__(self, settings: Settings, brands: list[BrandConfig]) -> None:
        self.settings = settings
        self.brands: dict[str, BrandConfig] = {b.brand: b for b in brands}
        # The brand served at POST /webhooks/clopos (no brand in the path).
        self.default_brand: str | None = brands[0].brand if brands else None
        self.sink_names: list[str] = [sink_name(s) for s in settings.sinks]

    def webhook_secret_for(self, brand: str) -> str | None:
        config = self.brands.get(brand)
        if config is not None and config.webhook_secret is not None:
            return config.webhook_secret.get_secret_value()
        secret = self.settings.webhook_secret
        return secret.get_secret_value() if secret is not None else None

    def secret_values(self) -> list[str]:
        """Every secret string, for the log redactor."""
        s = self.settings
        values: list[str | None] = [
            s.clopos_client_secret.get_secret_value() if s.clopos_client_secret else None,
            s.webhook_secret.get_secret_value() if s.webhook_secret else None,
            s.admin_token.get_secret_value() if s.admin_token else None,
        ]
        for brand in self.brands.values():
            values.append(brand.client_secret.get_secret_value())
            if brand.webhook_secret is not None:
                values.append(brand.webhook_secret.get_secret_value())
        for sink in s.sinks:
            if isinstance(sink, HttpSinkConfig):
                values.extend(secret.get_secret_value() for secret in sink.secrets)
        return [v for v in values if v]


def _first_error(exc: ValidationError) -> ConfigError:
    first = exc.errors()[0]
    loc = [str(p) for p in first["loc"]]
    variable = loc[0].upper() if loc else "settings"
    detail = ".".join(loc[1:])
    reason = first["msg"] + (f" (at {detail})" if detail else "")
    return ConfigError(variable, reason)


def _decoding_error(exc: ValueError) -> ConfigError:
    """pydantic-settings says 'error parsing value for field "sinks" ...': name the variable."""
    text = str(exc).splitlines()[0]
    field = re.search(r'field "([a-z_]+)"', text)
    if field is None:
        return ConfigError("settings", text)
    return ConfigError(field.group(1).upper(), "is not valid JSON")


def load_settings(*, require_webhook_secret: bool = True, **overrides: Any) -> Config:
    """Build the configuration from the environment (and ``.env``), or raise ConfigError.

    ``require_webhook_secret=False`` is for commands that receive no webhooks (``hydrate``
    only fetches): they must not ask for a secret they never use.
    """
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise _first_error(exc) from exc
    except (json.JSONDecodeError, ValueError) as exc:  # pydantic-settings JSON decoding
        raise _decoding_error(exc) from exc
    brands: list[BrandConfig] = []
    default = settings.default_brand()
    if default is not None:
        brands.append(default)
    if settings.clopos_brands_file is not None:
        for brand in load_brands_file(settings.clopos_brands_file):
            if default is not None and brand.brand == default.brand:
                raise ConfigError(
                    "CLOPOS_BRANDS_FILE", f"brand {brand.brand!r} is also CLOPOS_BRAND"
                )
            brands.append(brand)
    if (
        require_webhook_secret
        and settings.webhook_secret is None
        and not settings.webhook_allow_unauthenticated
    ):
        per_brand = brands and all(b.webhook_secret is not None for b in brands)
        if not per_brand:
            raise ConfigError(
                "WEBHOOK_SECRET",
                "required (or set WEBHOOK_ALLOW_UNAUTHENTICATED=true to accept unsigned webhooks)",
            )
    if not settings.sinks:
        raise ConfigError("SINKS", 'at least one sink is required (e.g. [{"type":"log"}])')
    names = [sink_name(s) for s in settings.sinks]
    if len(set(names)) != len(names):
        raise ConfigError(
            "SINKS", "two sinks share a name: give each sink of the same type a distinct 'name'"
        )
    return Config(settings, brands)
