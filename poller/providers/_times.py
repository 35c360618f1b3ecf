"""Timestamps as providers send them (RFC 3339 strings), as the whole epoch seconds a Snapshot holds."""

from __future__ import annotations

import math
from datetime import UTC, datetime

from poller.domain.snapshot import InvalidSnapshotError
from poller.providers._http import excerpt


def rfc3339_seconds(name: str, value: object) -> int | None:
    """An optional RFC 3339 time as epoch seconds: None for null, else as `rfc3339_required`."""
    return None if value is None else rfc3339_required(name, value)


def rfc3339_required(name: str, value: object) -> int:
    """An RFC 3339 time (any number of fractional digits, `Z` or an offset) as epoch seconds, rounded down.

    InvalidSnapshotError for anything that is not a date and a time; one without an offset is read as
    UTC. The range is checked by the snapshot.
    """
    if not isinstance(value, str):
        raise InvalidSnapshotError(name, f"expected an RFC 3339 time, got {type(value).__name__}")
    text = value.strip()
    if len(text) < 19 or text[10] not in "Tt ":  # a date alone is not a time
        raise InvalidSnapshotError(name, f"{excerpt(value, 40)!r} is not an RFC 3339 time")
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidSnapshotError(name, f"{excerpt(value, 40)!r} is not an RFC 3339 time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return math.floor(when.timestamp())
