"""The one JSON codec of the server: the compact encoders and the canonical form.

- L{COMPACT}: replies on the wire (UTF-8 text, no NaN or Infinity);
- L{COMPACT_ASCII}: the same, ASCII only (how sizes of stored sessions are measured);
- L{COMPACT_ALLOW_NAN}: compact, NaN allowed, for values crossing to the image
  child (Python values may hold NaN; they never reach a client as such);
- L{canonical_json}: sorted keys, compact, ASCII: the bytes a file's MAC covers.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["COMPACT", "COMPACT_ALLOW_NAN", "COMPACT_ASCII", "canonical_json"]

SEPARATORS = (",", ":")

COMPACT = json.JSONEncoder(ensure_ascii=False, separators=SEPARATORS, allow_nan=False)
COMPACT_ASCII = json.JSONEncoder(ensure_ascii=True, separators=SEPARATORS, allow_nan=False)
COMPACT_ALLOW_NAN = json.JSONEncoder(ensure_ascii=False, separators=SEPARATORS)

_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=SEPARATORS, ensure_ascii=True, allow_nan=False
)
_CANONICAL_ALLOW_NAN = json.JSONEncoder(sort_keys=True, separators=SEPARATORS, ensure_ascii=True)


def canonical_json(value: Any, *, allow_nan: bool = False) -> bytes:
    """The canonical JSON of C{value}: sorted keys, compact separators, ASCII.

    @param allow_nan: accept NaN and infinities (only to re-serialize what was
        read back, so that such a file fails its MAC check, not the parse).
    """
    encoder = _CANONICAL_ALLOW_NAN if allow_nan else _CANONICAL
    return encoder.encode(value).encode("ascii")
