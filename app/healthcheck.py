"""``clopos-hydrator healthcheck``: the container's liveness probe, on the port in use.

A health check wired to a fixed port reports ``serve --port 9000`` unhealthy. This one
reads the command line of the serving process (PID 1 in a container, or ``--pid``),
parses it with the CLI's own parser, and asks ``/healthz`` on that host and port. It
uses the standard library only: it runs every few seconds and must start fast.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from pathlib import Path

SERVING_COMMANDS = ("serve", "sandbox")
# Where a server bound to every interface is reached from inside its own network.
LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}  # noqa: S104


def _command_line(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def serving_url(argv: list[str]) -> str:
    """The base URL a ``serve``/``sandbox`` command line listens on."""
    from app.cli import build_parser

    for index, word in enumerate(argv):
        if word in SERVING_COMMANDS:
            args, _ = build_parser().parse_known_args(argv[index:])
            host = LOOPBACK.get(args.host, args.host)
            if ":" in host and not host.startswith("["):
                host = f"[{host}]"
            return f"http://{host}:{args.port}"
    raise ValueError("not a serve or sandbox command line: " + " ".join(argv))


def cmd_healthcheck(args: argparse.Namespace) -> int:
    try:
        url = args.url or serving_url(_command_line(args.pid))
    except (OSError, ValueError) as exc:
        print(f"clopos-hydrator: healthcheck: {exc}", file=sys.stderr)
        return 1
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/healthz", timeout=args.timeout) as answer:  # noqa: S310
            healthy = bool(answer.status == 200)
    except (OSError, urllib.error.URLError) as exc:
        print(f"clopos-hydrator: healthcheck: {url}: {exc}", file=sys.stderr)
        return 1
    return 0 if healthy else 1


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from app.cli_ops import add_command as add

    parser = add(
        commands,
        "healthcheck",
        help="exit 0 if the local service answers /healthz (the container's health check)",
    )
    parser.add_argument(
        "--pid",
        type=int,
        default=1,
        help="process whose serve/sandbox command line gives host and port (default 1)",
    )
    parser.add_argument("--url", help="check this base URL instead of reading a command line")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    parser.set_defaults(func=cmd_healthcheck)
