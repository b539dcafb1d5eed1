"""The one ISO-8601 format of the server: UTC, milliseconds, C{Z} (protocol.md section 2).

Every timestamp the server shows or stores (replies, session records, file
envelopes, the admin tool, metrics) goes through L{iso_timestamp} and is read
back with L{parse_iso_timestamp}.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime

__all__ = ["iso_timestamp", "parse_iso_timestamp"]

_second_prefix: tuple[int, str] = (-1, "")


def iso_timestamp(seconds: float | None = None) -> str:
    """ISO-8601 UTC with milliseconds and C{Z}, e.g. C{2026-11-23T10:30:00.123Z}.

    Every reply carries one, so the C{strftime} part is formatted once per second.
    Call it with a time read from the caller's clock; without one it reads the
    wall clock (kept for reply encoding, whose callers pass C{now} when they have one).
    """
    global _second_prefix
    if seconds is None:
        seconds = time.time()
    whole = math.floor(seconds)
    millis = min(999_999, round((seconds - whole) * 1_000_000)) // 1000
    prefix = _second_prefix  # one read: another thread may replace it meanwhile
    if prefix[0] != whole:
        moment = datetime.fromtimestamp(whole, UTC)
        prefix = _second_prefix = (whole, moment.strftime("%Y-%m-%dT%H:%M:%S."))
    return f"{prefix[1]}{millis:03d}Z"


def parse_iso_timestamp(text: str) -> float:
    """Seconds since the epoch for a timestamp written by L{iso_timestamp}."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
