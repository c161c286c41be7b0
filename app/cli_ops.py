"""Operator commands of the CLI: ``status``, ``dlq ...``, ``hydrate``, ``send-test``.

``status`` and ``dlq`` talk to a running instance through its admin API (so they work
the same against SQLite or PostgreSQL, locally or through a port-forward);
``hydrate`` fetches one order from Clopos directly and prints its snapshot;
``send-test`` posts a signed notification to a running instance.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from typing import Any

import httpx

from app import ids
from app.errors import CloposError, ConfigError
from app.logs import configure_logging
from app.settings import Config, load_settings

DEFAULT_URL = "http://127.0.0.1:8000"


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _admin_token(args: argparse.Namespace) -> str:
    token = args.token or os.environ.get("ADMIN_TOKEN")
    if not token:
        try:
            secret = load_settings(require_webhook_secret=False).settings.admin_token
        except ConfigError:
            secret = None
        token = secret.get_secret_value() if secret is not None else None
    if not token:
        raise ConfigError("ADMIN_TOKEN", "needed to talk to the admin API (or pass --token)")
    return token


def _admin(args: argparse.Namespace, method: str, path: str, **kwargs: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {_admin_token(args)}"}
    try:
        response = httpx.request(
            method, f"{args.url.rstrip('/')}/admin{path}", headers=headers, timeout=30, **kwargs
        )
    except httpx.TransportError as exc:
        raise SystemExit(f"clopos-hydrator: cannot reach {args.url}: {exc}") from exc
    if response.status_code >= 400:
        try:
            message = response.json().get("message", response.text)
        except ValueError:
            message = response.text
        raise SystemExit(f"clopos-hydrator: {response.status_code}: {message}")
    return response


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _age(seconds: float | None) -> str:
    if not seconds:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def cmd_status(args: argparse.Namespace) -> int:
    data = _admin(args, "GET", "/status").json()
    if args.json:
        _out(json.dumps(data, indent=2))
        return 0
    queue_rows = [
        [name, str(q["pending"]), str(q["running"]), _age(q["oldest_pending_age"])]
        for name, q in data["queues"].items()
    ]
    _out(_table(queue_rows, ["queue", "waiting", "in flight", "oldest"]))
    _out("")
    brand_rows = []
    for name, brand in data["brands"].items():
        budget = brand["budget"] or {}
        remaining = budget.get("remaining")
        brand_rows.append(
            [
                name,
                brand["credentials"]
                + (f" ({brand['paused_reason']})" if brand["paused_reason"] else ""),
                f"{remaining if remaining is not None else '-'} / {budget.get('limit', '-')}",
                _poll_text(brand.get("poll")),
            ]
        )
    _out(_table(brand_rows, ["brand", "credentials", "budget left / per min", "poll watermark"]))
    _out("")
    sink_rows = [
        [n, s["kind"], s["circuit"], str(s["in_flight"])] for n, s in data["sinks"].items()
    ]
    _out(_table(sink_rows, ["sink", "kind", "circuit", "in flight"]))
    _out("")
    dead = data["dead_letters"]
    _out("dead letters: " + (", ".join(f"{k}={v}" for k, v in dead.items()) if dead else "none"))
    if data.get("store_error"):
        _out(f"STORE ERROR: {data['store_error']}")
    return 0


def _poll_text(poll: dict[str, Any] | None) -> str:
    """The poller's position of a brand: its watermark, and what the last cycle did."""
    if poll is None:
        return "off"
    text = poll.get("watermark") or "none yet"
    if poll.get("last_outcome") and poll["last_outcome"] != "ok":
        text += f" (last cycle: {poll['last_outcome']})"
    return str(text)


def _filter_params(args: argparse.Namespace) -> dict[str, str]:
    keys = ("brand", "sink", "reason", "kind")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None)}


def cmd_dlq_list(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {**_filter_params(args), "limit": args.limit}
    if args.after:
        params["after_id"] = args.after
    data = _admin(args, "GET", "/dead-letters", params=params).json()
    if args.json:
        _out(json.dumps(data, indent=2))
        return 0
    rows = [
        [
            str(d["id"]),
            d["kind"],
            d["brand"],
            str(d["order_id"]),
            d["sink"] or "-",
            d["reason"],
            str(d["attempts"]),
            d["created_at"],
            d["last_error"][:60],
        ]
        for d in data["items"]
    ]
    headers = ["id", "kind", "brand", "order", "sink", "reason", "tries", "at", "last error"]
    _out(_table(rows, headers))
    more = f"; next page: --after {data['next_cursor']}" if data["next_cursor"] else ""
    _out(f"{len(rows)} of {data['total']}{more}")
    return 0


def cmd_dlq_show(args: argparse.Namespace) -> int:
    _out(json.dumps(_admin(args, "GET", f"/dead-letters/{args.id}").json(), indent=2))
    return 0


def cmd_dlq_replay(args: argparse.Namespace) -> int:
    params = {"mode": args.mode}
    if args.id is not None:
        data = _admin(args, "POST", f"/dead-letters/{args.id}/replay", params=params).json()
    else:
        filt = _filter_params(args)
        if not filt and not args.all:
            raise SystemExit("clopos-hydrator: give an id, a filter, or --all")
        data = _admin(args, "POST", "/dead-letters/replay", params={**params, **filt}).json()
    _out(f"replayed {data['replayed']}")
    return 0


def cmd_dlq_purge(args: argparse.Namespace) -> int:
    if args.id is not None:
        _admin(args, "DELETE", f"/dead-letters/{args.id}")
        _out("purged 1")
        return 0
    filt = _filter_params(args)
    if not filt and not args.all:
        raise SystemExit("clopos-hydrator: give an id, a filter, or --all")
    params = {**filt, **({"all": "true"} if args.all else {})}
    _out(f"purged {_admin(args, 'DELETE', '/dead-letters', params=params).json()['purged']}")
    return 0


def cmd_hydrate(args: argparse.Namespace) -> int:
    if args.sandbox:
        from app.cli import SANDBOX_BRAND

        # The simulated Clopos of a running `clopos-hydrator sandbox`, with its own brand.
        base = f"{args.url.rstrip('/')}/sandbox/open-api"
        config = load_settings(require_webhook_secret=False, clopos_base_url=base, **SANDBOX_BRAND)
    else:
        config = load_settings(require_webhook_secret=False)
    settings = config.settings
    # stdout is the snapshot alone (pipe it to jq); logs go to stderr, through the redactor.
    configure_logging(
        fmt=settings.log_format, level=settings.log_level, secrets=config.secret_values()
    )
    return asyncio.run(_hydrate(config, args.order_id, args.brand, args.venue))


async def _hydrate(config: Config, order_id: int, brand: str | None, venue: str | None) -> int:
    from app.clopos.budget import LocalRateBudget
    from app.clopos.client import CloposClient
    from app.http_client import make_http_client
    from app.snapshot import build_body, snapshot_key

    name = brand or config.default_brand
    if name is None:
        raise ConfigError(
            "CLOPOS_BRAND", "no brand configured (set the CLOPOS_* credentials, or --brand)"
        )
    if name not in config.brands:
        raise ConfigError("CLOPOS_BRAND", f"brand {name!r} is not configured")
    settings = config.settings
    http = make_http_client(timeout=settings.clopos_timeout_seconds, max_connections=4)
    try:
        client = CloposClient(
            config.brands[name],
            base_url=settings.clopos_base_url,
            http=http,
            budget=LocalRateBudget(settings.clopos_rate_limit_per_minute),
        )
        order = await client.get_order(order_id, venue)
    except CloposError as exc:
        sys.stderr.write(f"clopos-hydrator: {exc.describe()}\n")
        return 1
    finally:
        await http.aclose()
    now = time.time()
    body = build_body(
        key=snapshot_key(name, order_id, order),
        brand=name,
        order_id=order_id,
        order=order,
        notification_ids=[],
        received_at=now,
        hydrated_at=now,
    )
    _out(json.dumps(json.loads(body), indent=2, ensure_ascii=False))
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    from pathlib import Path

    from app.store import sqlite_path
    from app.store.backup import backup_sqlite

    url = load_settings(require_webhook_secret=False).settings.database_url
    if not url.startswith("sqlite:"):
        raise ConfigError(
            "DATABASE_URL", "backup copies a SQLite store (use pg_dump for PostgreSQL)"
        )
    source = sqlite_path(url)
    dest = Path(args.dest)
    try:
        pages = backup_sqlite(source, dest)
    except FileExistsError as exc:
        raise SystemExit(f"clopos-hydrator: {exc}") from exc
    _out(f"backed up {source.resolve()} to {dest.resolve()} ({pages} pages)")
    return 0


def cmd_send_test(args: argparse.Namespace) -> int:
    from app.signing import sign

    secret = args.secret or os.environ.get("WEBHOOK_SECRET")
    if not secret:
        try:
            config = load_settings()
            secret = config.webhook_secret_for(args.brand or config.default_brand or "")
        except ConfigError:
            secret = None
    if not secret:
        raise ConfigError("WEBHOOK_SECRET", "needed to sign the test notification (or --secret)")
    data: dict[str, Any] = {"id": args.order_id}
    if args.venue:
        data["venue_id"] = int(args.venue)
    body = json.dumps({"event": "order.updated", "data": data, "test": True}).encode()
    msg_id = f"msg_test_{uuid.uuid4().hex}"
    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign([secret], msg_id, timestamp, body),
    }
    path = "/webhooks/clopos" + (f"/{args.brand}" if args.brand else "")
    try:
        response = httpx.post(
            args.url.rstrip("/") + path, content=body, headers=headers, timeout=15
        )
    except httpx.TransportError as exc:
        raise SystemExit(f"clopos-hydrator: cannot reach {args.url}: {exc}") from exc
    _out(f"{response.status_code} {response.text}")
    return 0 if response.status_code == 202 else 1


def _order_id(text: str) -> int:
    """An order id argument, valid by the one definition every door uses (app/ids.py)."""
    order_id = ids.parse_order_id(text)
    if order_id is None:
        raise argparse.ArgumentTypeError(f"not an order id (1 to 18 digits): {text!r}")
    return order_id


def _venue_id(text: str) -> str:
    """A venue id argument, as the canonical string sent in x-venue."""
    venue = ids.parse_venue_id(text)
    if venue is None:
        raise argparse.ArgumentTypeError(f"not a venue id (1 to 18 digits): {text!r}")
    return venue


def add_command(commands: Any, name: str, *, help: str) -> argparse.ArgumentParser:
    """A subcommand whose own --help opens with the line shown in its parent's list."""
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=help, description=help[0].upper() + help[1:] + "."
    )
    return parser


def add_commands(commands: Any) -> None:
    """Register the operator commands on the top-level subparsers."""

    def remote(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--url",
            default=os.environ.get("HYDRATOR_URL", DEFAULT_URL),
            help=f"base URL of a running instance (default $HYDRATOR_URL or {DEFAULT_URL})",
        )
        parser.add_argument("--token", help="admin token (default $ADMIN_TOKEN)")

    def filters(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--brand", help="only this brand")
        parser.add_argument("--sink", help="only this sink")
        parser.add_argument("--reason", help="only this reason (e.g. not_found, gave_up, http_410)")
        parser.add_argument("--kind", choices=["hydration", "delivery"], help="only this kind")

    status = add_command(
        commands, "status", help="backlog, dead letters, brands and sinks at a glance"
    )
    remote(status)
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    status.set_defaults(func=cmd_status)

    dlq = add_command(commands, "dlq", help="inspect, replay or purge dead letters")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    listing = add_command(dlq_commands, "list", help="list dead letters (newest last)")
    remote(listing)
    filters(listing)
    listing.add_argument("--limit", type=int, default=50, help="page size (default 50)")
    listing.add_argument("--after", type=int, help="cursor from the previous page")
    listing.add_argument("--json", action="store_true", help="print the raw JSON")
    listing.set_defaults(func=cmd_dlq_list)
    show = add_command(dlq_commands, "show", help="show one dead letter")
    remote(show)
    show.add_argument("id", type=int, help="the dead letter's id (from 'dlq list')")
    show.set_defaults(func=cmd_dlq_show)
    replay = add_command(dlq_commands, "replay", help="replay one dead letter, or many by filter")
    remote(replay)
    filters(replay)
    replay.add_argument("id", type=int, nargs="?", help="a dead letter id (else use filters)")
    replay.add_argument(
        "--mode",
        choices=["auto", "hydrate", "deliver"],
        default="auto",
        help="auto: hydration letters re-fetch, delivery letters re-send (default); "
        "hydrate: always fetch the order afresh",
    )
    replay.add_argument("--all", action="store_true", help="replay every dead letter")
    replay.set_defaults(func=cmd_dlq_replay)
    purge = add_command(dlq_commands, "purge", help="delete one dead letter, or many by filter")
    remote(purge)
    filters(purge)
    purge.add_argument("id", type=int, nargs="?", help="a dead letter id (else use filters)")
    purge.add_argument("--all", action="store_true", help="purge every dead letter")
    purge.set_defaults(func=cmd_dlq_purge)

    hydrate = add_command(
        commands,
        "hydrate",
        help="fetch one order from Clopos now and print its snapshot (no delivery)",
    )
    hydrate.add_argument("order_id", type=_order_id, help="the Clopos order id")
    hydrate.add_argument("--brand", help="brand (default: the CLOPOS_BRAND brand)")
    hydrate.add_argument("--venue", type=_venue_id, help="venue id, sent as x-venue")
    hydrate.add_argument(
        "--sandbox",
        action="store_true",
        help="fetch as the sandbox brand from the simulated Clopos of a running sandbox",
    )
    hydrate.add_argument(
        "--url",
        default=os.environ.get("HYDRATOR_URL", DEFAULT_URL),
        help=f"with --sandbox: the sandbox's base URL (default $HYDRATOR_URL or {DEFAULT_URL})",
    )
    hydrate.set_defaults(func=cmd_hydrate)

    backup = add_command(
        commands,
        "backup",
        help="copy the SQLite store (DATABASE_URL) to a new file, while the service runs",
    )
    backup.add_argument("dest", help="the new file to write (never overwritten)")
    backup.set_defaults(func=cmd_backup)

    send = add_command(
        commands, "send-test", help="post a signed test notification to a running instance"
    )
    send.add_argument("order_id", type=_order_id, help="the order id to put in the notification")
    send.add_argument(
        "--url",
        default=os.environ.get("HYDRATOR_URL", DEFAULT_URL),
        help=f"base URL of a running instance (default $HYDRATOR_URL or {DEFAULT_URL})",
    )
    send.add_argument("--brand", help="post to /webhooks/clopos/{brand}")
    send.add_argument("--venue", type=_venue_id, help="venue_id to put beside the order id")
    send.add_argument("--secret", help="webhook secret (default $WEBHOOK_SECRET)")
    send.set_defaults(func=cmd_send_test)
