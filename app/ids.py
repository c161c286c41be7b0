"""What a valid Clopos order id and venue id is, defined once.

Every door through which an id enters the service uses these: the webhook body
(``app/ingest.py``), the polled order list (``app/poller.py``), the admin API
(``app/admin.py``), the command line and the Clopos client itself. An id is a positive
integer of at most 18 digits (it fits a signed 64-bit column; Clopos ids are far shorter),
given as a JSON integer or a string of ASCII digits. Nothing else: not a bool, not a
float, not ``"1001\\n"`` (a ``$`` anchor matches before a trailing newline, so only a
full match is used), not ``"²"`` (``str.isdigit`` accepts it, ``int`` does not), not
``" 1001"``.

A venue id is sent to Clopos as the ``x-venue`` header, so it is carried as its canonical
decimal string (``"0042"`` becomes ``"42"``).
"""

from __future__ import annotations

import re

MAX_ID_DIGITS = 18
MIN_ID = 1
MAX_ID = 10**MAX_ID_DIGITS - 1
# ASCII digits only (``[0-9]``, not ``\d``, which matches other scripts' digits too).
_DIGITS = re.compile(rf"[0-9]{{1,{MAX_ID_DIGITS}}}")


def parse_id(value: object) -> int | None:
    """A positive id from a JSON value or a text field; None when it is not one."""
    if isinstance(value, bool):  # True is an int to Python; never an id
        return None
    if isinstance(value, int):
        return value if MIN_ID <= value <= MAX_ID else None
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        number = int(value)
        return number if number >= MIN_ID else None
    return None


def parse_order_id(value: object) -> int | None:
    """An order id, or None."""
    return parse_id(value)


def parse_venue_id(value: object) -> str | None:
    """A venue id as its canonical string (what ``x-venue`` carries), or None."""
    number = parse_id(value)
    return None if number is None else str(number)


def is_order_id(value: object) -> bool:
    """True for an int that is a valid order id (for callers that already hold an int)."""
    return isinstance(value, int) and not isinstance(value, bool) and MIN_ID <= value <= MAX_ID
