"""The shape of a session id: C{s_} plus 22 URL-safe base64 characters (protocol.md).

The one definition: the session service makes ids of this shape, and the store
accepts only these as file names.
"""

from __future__ import annotations

import re

__all__ = ["SESSION_ID_PATTERN", "is_session_id"]

SESSION_ID_PATTERN = re.compile(r"s_[A-Za-z0-9_-]{22}")


def is_session_id(value: object) -> bool:
    """Whether C{value} is a string of the shape the server makes."""
    return isinstance(value, str) and SESSION_ID_PATTERN.fullmatch(value) is not None
