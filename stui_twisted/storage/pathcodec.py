"""Safe file names for client ids and session ids.

A client id becomes one directory name under C{DATA/sessions/}: C{c-} followed by
the lowercase RFC 4648 base32 of its UTF-8 bytes, without padding.  The encoding is

- filesystem-safe: only C{a-z}, C{2-7} and C{-}; never C{/}, C{.}, NUL or C{..};
- reversible: L{decode_client_dir} gives the client id back;
- case-safe: two different ids never map to names that differ only by letter case,
  so a case-insensitive filesystem cannot merge two clients' directories.

Ids that cannot be encoded (not a string, empty, containing NUL, lone surrogates, or so
long that the directory name would pass the usual 255-byte limit) are refused with
L{ValueError} before any path is built.  Session ids are never encoded, only
validated: C{s_} followed by 22 URL-safe base64 characters
(L{stui_twisted.protocol.ids.SESSION_ID_PATTERN}, the one definition).
"""

from __future__ import annotations

import base64
import binascii
import re

from stui_twisted.protocol.ids import is_session_id

CLIENT_DIR_PREFIX = "c-"

#: Largest client id, in UTF-8 bytes, whose directory name stays under 255 bytes
#: (base32 makes 8 characters of every 5 bytes: 150 bytes -> 240 characters).
MAX_CLIENT_ID_BYTES = 150

_CLIENT_DIR_PATTERN = re.compile(r"c-[a-z2-7]{2,240}")


def encode_client_dir(client_id: str) -> str:
    """The directory name for C{client_id}.

    @raise ValueError: C{client_id} is not a non-empty string without NUL that fits.
    """
    if not isinstance(client_id, str):
        raise ValueError(f"client id must be a string, not {type(client_id).__name__}")
    if not client_id:
        raise ValueError("client id must not be empty")
    if "\x00" in client_id:
        raise ValueError("client id must not contain NUL")
    try:
        raw = client_id.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"client id is not valid Unicode text: {exc.reason}") from exc
    if len(raw) > MAX_CLIENT_ID_BYTES:
        raise ValueError(
            f"client id is {len(raw)} bytes in UTF-8, longer than {MAX_CLIENT_ID_BYTES}"
        )
    encoded = base64.b32encode(raw).decode("ascii").rstrip("=").lower()
    return CLIENT_DIR_PREFIX + encoded


def decode_client_dir(name: str) -> str | None:
    """The client id whose directory is C{name}, or None if no client id encodes to it.

    Only canonical names are accepted (the output of L{encode_client_dir}), so one
    client id has exactly one directory.
    """
    if not _CLIENT_DIR_PATTERN.fullmatch(name):
        return None
    body = name[len(CLIENT_DIR_PREFIX) :].upper()
    body += "=" * (-len(body) % 8)
    try:
        client_id = base64.b32decode(body).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    try:
        if encode_client_dir(client_id) != name:
            return None
    except ValueError:
        return None
    return client_id


def is_valid_session_id(session_id: object) -> bool:
    """Whether C{session_id} has the shape the server makes (and is safe in a path)."""
    return is_session_id(session_id)


def check_session_id(session_id: object) -> str:
    """C{session_id}, if it is valid.

    @raise ValueError: it is not C{s_} plus 22 URL-safe base64 characters.
    """
    if not is_valid_session_id(session_id):
        raise ValueError(
            f"session id {session_id!r} is not 's_' plus 22 URL-safe base64 characters"
        )
    return session_id  # type: ignore[return-value]
