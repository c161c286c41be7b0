"""One definition of a valid order id and venue id (app/ids.py), used by every door.

Each door is checked with the same hostile values, so a door with its own, looser
definition shows up here: a ``$``-anchored regex accepts ``"1001\\n"``, ``int()`` accepts
``" 1001"`` and ``"1_001"``, ``str.isdigit`` accepts ``"²"``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from app import ids
from app.cli import build_parser
from app.clopos.budget import LocalRateBudget
from app.clopos.client import CloposClient
from app.errors import ApiError
from app.http_client import make_http_client
from app.ingest import parse_notice
from app.poller import parse_listed
from app.sandbox import SandboxState, create_sandbox_app
from tests.servers import ServerThread
from tests.test_clopos_client import BRAND

# Text that is not an id, although some parser or other accepts it.
BAD_TEXT = [
    "1001\n",
    "1001\r\n",
    " 1001",
    "1001 ",
    "1_001",
    "+1001",
    "-1001",
    "1001.0",
    "0x10",
    "\u00b2",  # superscript two: isdigit() says yes
    "\u0661\u0662",  # Arabic-Indic digits: \d and int() say yes
    "",
    "0",
    "000",
    "1" * 19,
]
BAD_VALUES: list[Any] = [*BAD_TEXT, True, False, 0, -1, 10**18, 1001.0, None, [1001], {"id": 1}]


@pytest.mark.parametrize("value", BAD_VALUES, ids=repr)
def test_not_an_id(value: Any) -> None:
    assert ids.parse_order_id(value) is None
    assert ids.parse_venue_id(value) is None


@pytest.mark.parametrize(
    ("value", "order", "venue"),
    [
        (1001, 1001, "1001"),
        ("1001", 1001, "1001"),
        ("0042", 42, "42"),
        (10**18 - 1, 10**18 - 1, None),
    ],
)
def test_an_id(value: Any, order: int, venue: str | None) -> None:
    assert ids.parse_order_id(value) == order
    assert ids.parse_venue_id(value) == (venue or str(order))


@pytest.mark.parametrize("value", BAD_TEXT, ids=repr)
def test_webhook_body_refuses_what_is_not_an_order_id(value: str) -> None:
    body = json.dumps({"data": {"id": value}}).encode()
    with pytest.raises(ApiError) as caught:
        parse_notice(body, ["data.id"])
    assert caught.value.status == 422


@pytest.mark.parametrize("value", BAD_TEXT, ids=repr)
def test_webhook_body_refuses_what_is_not_a_venue_id(value: str) -> None:
    body = json.dumps({"data": {"id": 1001, "venue_id": value}}).encode()
    with pytest.raises(ApiError) as caught:
        parse_notice(body, ["data.id"])
    assert caught.value.status == 422


def test_webhook_body_venue_is_canonical() -> None:
    notice = parse_notice(b'{"data": {"id": "0017", "venue_id": "0042"}}', ["data.id"])
    assert (notice.order_id, notice.venue_id) == (17, "42")


LISTED = {"updated_at": "2026-11-27 10:00:00"}


@pytest.mark.parametrize("value", BAD_TEXT, ids=repr)
def test_poller_skips_what_is_not_an_order_id(value: str) -> None:
    assert parse_listed({**LISTED, "id": value}) is None


@pytest.mark.parametrize("value", [*BAD_TEXT, -5, 0], ids=repr)
def test_poller_drops_what_is_not_a_venue_id(value: Any) -> None:
    listed = parse_listed({**LISTED, "id": 1001, "venue_id": value})
    assert listed is not None
    assert listed.venue_id is None  # never "5\n" in an x-venue header


def test_poller_venue_is_canonical() -> None:
    listed = parse_listed({**LISTED, "id": "1001", "venue_id": "0042"})
    assert listed is not None
    assert (listed.order_id, listed.venue_id) == (1001, "42")


@pytest.mark.parametrize("value", ["1001\n", " 1001", "1_001", "+5", "0", "1" * 19])
@pytest.mark.parametrize("command", ["hydrate", "send-test"])
def test_command_line_refuses_what_is_not_an_order_id(command: str, value: str) -> None:
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args([command, value])
    assert caught.value.code == 2


@pytest.mark.parametrize("value", ["5\n", " 5", "1_0", "0"])
@pytest.mark.parametrize("command", ["hydrate", "send-test"])
def test_command_line_refuses_what_is_not_a_venue_id(command: str, value: str) -> None:
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args([command, "1001", "--venue", value])
    assert caught.value.code == 2


def test_command_line_accepts_ids() -> None:
    args = build_parser().parse_args(["hydrate", "1001", "--venue", "0042"])
    assert (args.order_id, args.venue) == (1001, "42")


@pytest.fixture
def sandbox() -> Iterator[tuple[SandboxState, str]]:
    state = SandboxState()
    with ServerThread(create_sandbox_app(state)) as server:
        yield state, f"{server.url}/open-api"


@pytest.mark.parametrize(
    ("order_id", "venue_id"),
    [(10**18, None), (0, None), (True, None), (1001, "5\n"), (1001, "1_0"), (1001, "0")],
)
async def test_clopos_client_refuses_bad_ids_before_any_call(
    sandbox: tuple[SandboxState, str], order_id: Any, venue_id: Any
) -> None:
    state, base = sandbox
    async with make_http_client(timeout=5.0, max_connections=4) as http:
        client = CloposClient(BRAND, base_url=base, http=http, budget=LocalRateBudget(1000))
        with pytest.raises(ValueError, match="id"):
            await client.get_order(order_id, venue_id)
        with pytest.raises(ValueError, match="id"):
            await client.list_orders(venue_id=venue_id or "1_0")
    assert state.calls == []  # refused before the network
