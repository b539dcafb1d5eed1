"""The on-disk file format: the sealed JSON envelope, its HMAC, and the secret key.

Every file the store writes is one JSON object, the I{envelope}::

    {"format": "stui-session", "version": 1, "saved_at": "2026-11-23T10:30:00.123Z",
     "mac": "hmac-sha256:<hex>", "session": {...}}

(C{shared.json} has format C{stui-shared} and its payload under C{bindings};
C{index.json} has format C{stui-index}, its payload under C{sessions} and an extra
C{saved_at_ns}; the copy C{save_context} keeps has format C{stui-saved-context}.)
The MAC is HMAC-SHA256, keyed with C{secret.key}, over the canonical JSON (sorted
keys, compact separators, ASCII) of the envelope without C{mac}.

This module only turns payloads into file bytes and back, and reads or creates the
key; it knows nothing of paths, threads or durability.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stui_twisted.protocol.jsoncodec import canonical_json
from stui_twisted.protocol.timefmt import iso_timestamp
from stui_twisted.storage.errors import StorageFailure

SECRET_KEY_BYTES = 32
MAC_PREFIX = "hmac-sha256:"
FORMAT_VERSION = 1
FILE_MODE = 0o600

OPEN_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
OPEN_CREATE_FLAGS = (
    os.O_WRONLY
    | os.O_CREAT
    | os.O_EXCL
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
)


@dataclass(frozen=True)
class WriteResult:
    """What one durable write put on disk."""

    size_bytes: int
    checksum: str  # "sha256:<hex>" of the file's bytes
    saved_at: str  # ISO-8601 UTC with milliseconds and Z

    @classmethod
    def of(cls, data: bytes, saved_at: str) -> WriteResult:
        """The result of writing the file bytes C{data}."""
        return cls(len(data), "sha256:" + hashlib.sha256(data).hexdigest(), saved_at)


class BadFile(Exception):
    """A file's bytes are not a valid envelope (internal; the message is the reason)."""


@dataclass(frozen=True)
class Envelope:
    """One kind of file: its C{format} and the member holding its payload."""

    format: str
    payload_key: str


SESSION_ENVELOPE = Envelope("stui-session", "session")
SAVED_ENVELOPE = Envelope("stui-saved-context", "session")
"""What C{save_context} saved, beside the session file: a different format, so
the MAC never lets one file stand in for the other."""
SHARED_ENVELOPE = Envelope("stui-shared", "bindings")
INDEX_ENVELOPE = Envelope("stui-index", "sessions")


@functools.lru_cache(maxsize=64)
def _member_prefix(key: str) -> bytes:
    """C{"key":} in canonical JSON (the envelope's few member names, encoded once)."""
    return canonical_json(key) + b":"


def _compose(fields: dict[str, Any], payload_key: str, payload_json: bytes) -> bytes:
    """Canonical JSON of C{fields} plus C{payload_key}, splicing in pre-made payload JSON."""
    parts = []
    for key in sorted([*fields, payload_key]):
        value = payload_json if key == payload_key else canonical_json(fields[key])
        parts.append(_member_prefix(key) + value)
    return b"{" + b",".join(parts) + b"}"


def seal(
    envelope: Envelope,
    payload_json: bytes,
    secret_key: bytes,
    saved_at: str,
    extra_fields: dict[str, Any] | None = None,
) -> bytes:
    """The complete file bytes of an envelope around C{payload_json}."""
    fields = {"format": envelope.format, "version": FORMAT_VERSION, "saved_at": saved_at}
    fields.update(extra_fields or {})
    signed = _compose(fields, envelope.payload_key, payload_json)
    mac = MAC_PREFIX + hmac.digest(secret_key, signed, "sha256").hex()
    return _compose({**fields, "mac": mac}, envelope.payload_key, payload_json) + b"\n"


def unseal(data: bytes, envelope: Envelope, secret_key: bytes) -> dict[str, Any]:
    """The parsed envelope in C{data}, once its format and MAC check out.

    @raise BadFile: with the reason it was refused.
    """
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise BadFile(f"not JSON ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(document, dict):
        raise BadFile("not a JSON object")
    if document.get("format") != envelope.format:
        raise BadFile(f"format is {document.get('format')!r}, expected {envelope.format!r}")
    version = document.get("version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise BadFile(f"version is {version!r}, expected {FORMAT_VERSION}")
    mac = document.get("mac")
    if not isinstance(mac, str) or not mac.startswith(MAC_PREFIX):
        raise BadFile("no hmac-sha256 MAC")
    if envelope.payload_key not in document:
        raise BadFile(f"no {envelope.payload_key!r} member")
    unsigned = {key: value for key, value in document.items() if key != "mac"}
    try:
        signed = canonical_json(unsigned, allow_nan=True)
    except (ValueError, TypeError, RecursionError) as exc:
        raise BadFile(f"cannot re-serialize ({exc})") from None
    expected = MAC_PREFIX + hmac.new(secret_key, signed, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(mac.encode("ascii", "replace"), expected.encode("ascii")):
        raise BadFile("MAC mismatch (edited, or written with another secret.key)")
    return document


@functools.lru_cache(maxsize=16)
def envelope_overhead(envelope: Envelope, extra_items: tuple[tuple[str, Any], ...]) -> int:
    """Bytes an envelope adds around its payload (saved_at and MAC have fixed widths)."""
    return len(seal(envelope, b"", b"\0" * SECRET_KEY_BYTES, iso_timestamp(0), dict(extra_items)))


def write_all(fd: int, data: bytes) -> None:
    """Write all of C{data} to C{fd}."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def load_or_create_secret_key(
    path: str, fsync_parent: Callable[[], None], log: Callable[..., None]
) -> bytes:
    """The key in C{path}, made (0600, fsynced, then C{fsync_parent()}) if missing.

    @param log: called as C{log(level, format, **fields)} for what an operator
        should know (a new key, a mode tightened).
    @raise StorageFailure: the file holds something other than a key.
    @raise OSError: it cannot be read or created.
    """
    try:
        fd = os.open(path, OPEN_READ_FLAGS)
    except FileNotFoundError:
        key = secrets.token_bytes(SECRET_KEY_BYTES)
        try:
            fd = os.open(path, OPEN_CREATE_FLAGS, FILE_MODE)
        except FileExistsError:
            return load_or_create_secret_key(path, fsync_parent, log)  # another process made it
        try:
            os.fchmod(fd, FILE_MODE)
            write_all(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_parent()
        log("info", "created a new secret key at {path}", path=path)
        return key
    with os.fdopen(fd, "rb") as handle:
        if stat.S_IMODE(os.fstat(handle.fileno()).st_mode) & 0o077:
            os.fchmod(handle.fileno(), FILE_MODE)
            log("warn", "secret key {path} was readable by others; now 0600", path=path)
        key = handle.read(SECRET_KEY_BYTES + 1)
    if len(key) != SECRET_KEY_BYTES:
        raise StorageFailure(
            f"{path} holds {len(key)} bytes, expected {SECRET_KEY_BYTES}; refusing to"
            " start (move it away to start with a new key: existing files will then"
            " fail verification)"
        )
    return key
