"""Clopos timestamps. Its pages disagree on the format: ``2026-02-02T17:46:02.000000Z``
and ``2025-08-18 13:44:10`` both appear. Both are read, as UTC when no zone is given."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


def parse_clopos_datetime(value: Any) -> datetime | None:
    """An aware datetime, or None for anything that is not a Clopos timestamp."""
    if not isinstance(value, str) or not value or len(value) > 64:
        return None
    text = value.strip().replace(" ", "T", 1)
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
