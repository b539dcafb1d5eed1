"""Which envelope a request came in: the flat one or the STUI crate's Format A.

A request object with a C{payload} and no C{command} is Format A
(L{stui_twisted.protocol.format_a}); everything else is the flat envelope
(L{stui_twisted.protocol.envelope}).  This module sits above both, so neither
imports the other's parser.
"""

from __future__ import annotations

from stui_twisted.protocol import format_a
from stui_twisted.protocol.envelope import Request, decode_message, parse_flat


def parse_request(data: bytes) -> Request:
    """Parse one line/frame into a L{Request} or raise L{RequestError}."""
    message = decode_message(data)
    if "payload" in message and "command" not in message:
        return format_a.parse(message)
    return parse_flat(message)
