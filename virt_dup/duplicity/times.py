"""duplicity's time strings: ``YYYYMMDDTHHMMSSZ`` (UTC), the id of a backup set."""

from __future__ import annotations

from datetime import UTC, datetime

TIME_FORMAT = "%Y%m%dT%H%M%SZ"


def format_time(moment: datetime) -> str:
    """duplicity's time string (``20240131T020000Z``, UTC) for ``--time``."""
    if moment.tzinfo is None:
        raise ValueError(f"{moment!r} has no time zone")
    return moment.astimezone(UTC).strftime(TIME_FORMAT)


def parse_time(text: str) -> datetime:
    """An aware UTC datetime from duplicity's ``20240131T020000Z``."""
    return datetime.strptime(text, TIME_FORMAT).replace(tzinfo=UTC)
