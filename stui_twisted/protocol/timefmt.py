"""The one ISO-8601 format of the server: UTC, milliseconds, C{Z} (protocol.md section 2).

Every timestamp the server shows or stores (replies, session records, file
envelopes, the admin tool, metrics) goes through L{iso_timestamp} and is read
back with L{parse_iso_timestamp}.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime

__all__ = ["iso_length", "iso_timestamp", "parse_iso_timestamp"]

_second_prefix: tuple[int, str] = (-1, "")
#: The last millisecond formatted: (lowest, highest, text).  Every C{seconds}
#: between two inputs that gave the same text gives that text too (the
#: formatting is monotonic), so a timestamp inside the interval is answered
#: without formatting; L{_format} checks the interval's upper end itself.
_last_millisecond: tuple[float, float, str] = (1.0, 0.0, "")


def iso_timestamp(seconds: float | None = None) -> str:
    """ISO-8601 UTC with milliseconds and C{Z}, e.g. C{2026-11-23T10:30:00.123Z}.

    Every reply carries one, so it is formatted once per millisecond (the
    C{strftime} part once per second).  Call it with a time read from the
    caller's clock; without one it reads the wall clock (kept for reply
    encoding, whose callers pass C{now} when they have one).
    """
    global _last_millisecond
    if seconds is None:
        seconds = time.time()
    lowest, highest, text = _last_millisecond  # one read: another thread may replace it
    if lowest <= seconds <= highest:
        return text
    text, whole, millis = _format(seconds)
    # The last microsecond of this millisecond, well away from the rounding
    # edge; kept only if it formats the same (then every time between does).
    highest = whole + (millis * 1000 + 999) / 1_000_000
    if _format(highest)[0] == text:
        _last_millisecond = (seconds, highest, text)
    return text


#: From 1000-01-01 to 9999-12-31 UTC (in seconds) a timestamp's year has four digits.
_FOUR_DIGIT_YEARS = (-30_610_224_000, 253_402_300_800)
#: The length of a timestamp with a four-digit year: C{2026-11-23T10:30:00.123Z}.
ISO_LENGTH = 24


def iso_length(seconds: float) -> int:
    """C{len(iso_timestamp(seconds))}, without formatting it when the year has four digits.

    The size accounting measures timestamps on every request; only their
    length counts there (they need no JSON escapes).
    """
    if _FOUR_DIGIT_YEARS[0] <= seconds < _FOUR_DIGIT_YEARS[1]:
        return ISO_LENGTH
    return len(iso_timestamp(seconds))


def _format(seconds: float) -> tuple[str, int, int]:
    """(the timestamp, its whole seconds, its milliseconds) of C{seconds}."""
    global _second_prefix
    whole = math.floor(seconds)
    millis = min(999_999, round((seconds - whole) * 1_000_000)) // 1000
    prefix = _second_prefix  # one read: another thread may replace it meanwhile
    if prefix[0] != whole:
        moment = datetime.fromtimestamp(whole, UTC)
        prefix = _second_prefix = (whole, moment.strftime("%Y-%m-%dT%H:%M:%S."))
    return f"{prefix[1]}{millis:03d}Z", whole, millis


def parse_iso_timestamp(text: str) -> float:
    """Seconds since the epoch for a timestamp written by L{iso_timestamp}."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
