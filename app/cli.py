"""The command line: ``clopos-hydrator <command>`` (also ``python -m app``).

Configuration errors are printed as one line naming the variable, with exit code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import uvloop

from app import cli_ops, healthcheck, tracing
from app.cli_ops import add_command
from app.errors import ConfigError, StoreError
from app.logs import configure_logging, get_logger
from app.settings import Config, load_settings
from app.store import hold_database, sqlite_path
from app.store.location import check_sqlite_location
from app.store.lock import DatabaseLock
from app.termination import remember_termination

log = get_logger("app.cli")

SANDBOX_DEFAULTS = {
    "WEBHOOK_SECRET": "sandbox-webhook-secret",
    "DATABASE_URL": "sqlite:///./data/sandbox.db",
    "ADMIN_TOKEN": "sandbox-admin-token",
}
# The brand the simulated Clopos accepts (also what `hydrate --sandbox` uses).
SANDBOX_BRAND = {
    "clopos_client_id": "sandbox-client",
    "clopos_client_secret": "sandbox-client-secret",
    "clopos_brand": "sandbox",
    "clopos_integrator_id": "sandbox-integrator",
    "clopos_brands_file": None,
}


def _config(overrides: dict[str, Any] | None = None) -> Config:
    return load_settings(**(overrides or {}))


def _setup_logging(config: Config) -> None:
    settings = config.settings
    configure_logging(
        fmt=settings.log_format,
        level=settings.log_level,
        secrets=config.secret_values(),
        trace_ids=tracing.tracing_requested(os.environ),
    )


def _require_brand(config: Config) -> None:
    if not config.brands:
        raise ConfigError(
            "CLOPOS_CLIENT_ID",
            "no brand configured: set CLOPOS_CLIENT_ID, CLOPOS_CLIENT_SECRET, CLOPOS_BRAND and "
            "CLOPOS_INTEGRATOR_ID, or CLOPOS_BRANDS_FILE",
        )


def _hold_database(config: Config) -> DatabaseLock | None:
    """One process per SQLite file: take its lock before anything touches the file, and
    keep it until the process ends (the kernel drops it then, even after kill -9). A file
    in use is refused like a bad setting: one line naming it, exit 2."""
    try:
        return hold_database(config.settings.database_url)
    except StoreError as exc:
        raise ConfigError("DATABASE_URL", str(exc)) from exc


def _check_store(config: Config) -> None:
    """An unusable SQLite location is a one-line configuration error, before anything
    starts (inside the server's start-up it was a traceback and exit 3)."""
    url = config.settings.database_url
    if url.startswith("sqlite:"):
        check_sqlite_location(sqlite_path(url))


def _run(
    config: Config,
    host: str,
    port: int,
    mount: Callable[[Any], None] | None,
    lock: DatabaseLock | None,
    public_prefixes: tuple[str, ...] = (),
) -> int:
    """Serve until stopped, then let the database go; the exit status says how the
    service stopped (143 after SIGTERM, also as PID 1)."""
    with remember_termination() as termination:
        try:
            code = _run_server(_serve(config, host, port, mount, public_prefixes))
        finally:
            if lock is not None:
                lock.release()
    return termination.exit_status(code)


async def _serve(
    config: Config,
    host: str,
    port: int,
    mount: Callable[[Any], None] | None,
    public_prefixes: tuple[str, ...] = (),
) -> int:
    from app.http_server import build_listeners
    from app.runtime import Runtime
    from app.service import create_app

    runtime = Runtime(config, tracer_provider=tracing.start_tracing(os.environ))
    app = create_app(config, runtime=runtime)
    if mount is not None:
        mount(app)
    listeners = build_listeners(
        app, host=host, port=port, settings=config.settings, public_prefixes=public_prefixes
    )
    server = listeners.main
    exit_code = 0

    def fatal(reason: str) -> None:
        nonlocal exit_code
        exit_code = 1
        log.critical("service.fatal", reason=reason)
        server.should_exit = True

    runtime.on_fatal = fatal
    tune_gc()  # now that FastAPI, uvicorn, aiohttp and the app are loaded and built
    await listeners.serve()
    if not server.started:
        return 1
    return exit_code


# How long another thread may hold the GIL while the event loop waits for it (Python's
# default is 5 ms): every socket write of the loop releases the GIL, and getting it back
# from a busy thread cost the ingest path latency and throughput. Measured when the
# store's writer was a thread; it is a process now (app/store/sqlite_writer.py), and
# the threads left (executors, an exporter) are rarely busy.
SWITCH_INTERVAL_SECONDS = 0.0005


# The garbage collector's thresholds while serving (Python's are 700, 10, 10). A young
# collection runs when the tracked objects allocated since the last one, minus those
# freed, pass the first figure. At 700 that was every few requests, so the objects of
# the requests in flight were promoted to the oldest generation, and a full collection,
# which walks every object the process holds (35-50 ms here), ran about once a second:
# the ingest p99, and a tenth of its CPU (docs/performance.md). Request objects are
# freed by reference counting; what waits for a young collection is cyclic garbage
# (an exception's traceback and frames, for one), so the figure also bounds how much
# of that piles up. 10,000, 20,000 and 50,000 measured alike (CPU per request within
# the noise, RSS flat under a load of 422s with 100 KB bodies); the smallest is kept.
GC_THRESHOLDS = (10_000, 10, 10)


def tune_gc() -> None:
    """Keep the collector off the request path: what start-up loaded and built (the
    modules, settings, the app) is frozen out of its sight (``gc.freeze``), so a full
    collection walks only what serving created; and young collections come less often."""
    gc.collect()  # not to freeze garbage for the process's lifetime
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _run_server(main: Coroutine[Any, Any, int]) -> int:
    """Run the server on uvloop, as the ``uvicorn`` command itself does: the stdlib loop
    cost the ingest path about a fifth of its throughput (docs/benchmarks.md)."""
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def cmd_serve(args: argparse.Namespace) -> int:
    config = _config()
    _setup_logging(config)
    _require_brand(config)
    _check_store(config)
    return _run(config, args.host, args.port, None, _hold_database(config))


def cmd_sandbox(args: argparse.Namespace) -> int:
    from app.sandbox import SandboxState, create_sandbox_app

    for name, value in SANDBOX_DEFAULTS.items():
        os.environ.setdefault(name, value)
    public = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"  # noqa: S104
    state = SandboxState()
    overrides = {"clopos_base_url": f"{public}/sandbox/open-api", **SANDBOX_BRAND}
    if sys.stderr.isatty():
        os.environ.setdefault("LOG_FORMAT", "console")
    config = _config(overrides)
    _setup_logging(config)
    _check_store(config)
    lock = _hold_database(config)
    if args.reset:
        _reset_store(config)  # under the lock: never the store of a sandbox still running
    secret = config.webhook_secret_for("sandbox")
    state.notify_url = f"{public}/webhooks/clopos"
    state.notify_token = secret
    _print_banner(public, secret, config)

    def mount(app: Any) -> None:
        app.mount("/sandbox", create_sandbox_app(state))

    # The simulated Clopos is called on the public port, also when OPS_PORT is set.
    return _run(config, args.host, args.port, mount, lock, ("/sandbox/",))


def _reset_store(config: Config) -> None:
    """``sandbox --reset``: start from an empty store (the simulated Clopos is in memory
    and starts afresh anyway). SQLite only: a shared database is never wiped from here."""
    url = config.settings.database_url
    if not url.startswith("sqlite:"):
        raise ConfigError("DATABASE_URL", "--reset only deletes a SQLite file")
    path = sqlite_path(url).resolve()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    print(f"sandbox: reset, deleted {path}", file=sys.stderr, flush=True)


def _store_shown(url: str) -> str:
    """The store as the banner shows it: a SQLite file by its absolute path, so a sandbox
    started from another directory says where its ./data went."""
    if url.startswith("sqlite:"):
        return f"{sqlite_path(url).resolve()}  ({url})"
    return url


def _shown(value: str | None, name: str) -> str:
    """A secret is printed only when it is the sandbox's own well-known default; one the
    operator set stays out of the terminal (and out of anything that captures it)."""
    return value if value is not None and value == SANDBOX_DEFAULTS[name] else f"${name}"


def _print_banner(public: str, secret: str | None, config: Config) -> None:
    admin = config.settings.admin_token
    admin_value = admin.get_secret_value() if admin is not None else None
    settings = config.settings
    # With OPS_PORT, health, metrics and admin are on their own listener.
    ops = public if settings.ops_port is None else f"http://{settings.ops_host}:{settings.ops_port}"
    lines = [
        "=" * 72,
        "  SANDBOX MODE: Clopos is simulated in this process. No real Clopos is called.",
        "=" * 72,
        f"  webhook (default brand 'sandbox'): POST {public}/webhooks/clopos",
        f"  health / readiness / metrics:      {ops}/healthz  {ops}/readyz  {ops}/metrics",
        f"  simulated Clopos API:              {public}/sandbox/open-api/v2/orders/1001",
        f"  sandbox control:                   {public}/sandbox/_sandbox/stats",
        f"  store:                             {_store_shown(config.settings.database_url)}",
        "",
        "  Try it (hydrated order 1001 with its receipt appears in this log):",
        f"    curl -s -X POST '{public}/webhooks/clopos' \\",
        f"      -H 'X-Webhook-Token: {_shown(secret, 'WEBHOOK_SECRET')}' "
        "-H 'Content-Type: application/json' \\",
        '      -d \'{"event":"order.updated","data":{"id":1001}}\'',
        "",
        "  Change an order in the simulated Clopos and watch the update flow through:",
        f"    curl -s -X POST '{public}/sandbox/_sandbox/orders/1002/touch'",
    ]
    if admin is not None:
        lines += [
            "",
            f"  Admin API: -H 'Authorization: Bearer {_shown(admin_value, 'ADMIN_TOKEN')}'",
            f"    e.g. GET {ops}/admin/dead-letters",
        ]
    lines.append("=" * 72)
    print("\n".join(lines), file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clopos-hydrator",
        description="Receive Clopos notifications, hydrate orders, deliver them to sinks.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = add_command(commands, "serve", help="run the service (configured from the environment)")
    serve.add_argument("--host", default="0.0.0.0", help="interface to bind (default 0.0.0.0)")  # noqa: S104
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.set_defaults(func=cmd_serve)

    sandbox = add_command(
        commands,
        "sandbox",
        help="run the service against a built-in simulated Clopos (no credentials)",
    )
    sandbox.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1)")
    sandbox.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    sandbox.add_argument(
        "--reset",
        action="store_true",
        help="delete the sandbox's SQLite store first (start from a fresh state)",
    )
    sandbox.set_defaults(func=cmd_sandbox)

    cli_ops.add_commands(commands)
    healthcheck.add_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"clopos-hydrator: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
