"""Reading a file back: verify it, fall back to (and restore) its backup, quarantine what fails.

Blocking functions for the store's threads; the caller holds the file's lock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from stui_twisted.storage import durable
from stui_twisted.storage.errors import SessionFileCorrupt, SessionFileMissing, storage_failure
from stui_twisted.storage.fileformat import INDEX_ENVELOPE, BadFile, unseal
from stui_twisted.storage.lanes import Target


def load_verified(path: str, target: Target, secret_key: bytes) -> tuple[dict[str, Any], int]:
    """The verified envelope in C{path} and its size.

    @raise FileNotFoundError: no such file.
    @raise BadFile: it is there but not a valid file for C{target}.
    @raise StorageFailure: it could not be read (permissions, I/O error).
    """
    try:
        data = durable.read_bytes(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise storage_failure("read", path, exc) from exc
    document = unseal(data, target.envelope, secret_key)
    payload = document[target.envelope.payload_key]
    if target.envelope is not INDEX_ENVELOPE and not isinstance(payload, dict):
        raise BadFile(f"{target.envelope.payload_key!r} is not an object")
    if target.session_id is not None and (
        payload.get("session_id") != target.session_id
        or payload.get("client_id") != target.client_id
    ):
        raise BadFile("holds another session (ids do not match its path)")
    return document, len(data)


def read_recovering(
    target: Target,
    secret_key: bytes,
    quarantine: Callable[[str, str], str],
    log: Callable[..., None],
) -> tuple[dict[str, Any], int]:
    """The verified envelope of C{target}, falling back to (and restoring) its .bak.

    @param quarantine: C{quarantine(path, reason)} moves a bad copy away and
        returns where it went.
    @param log: called as C{log(level, format, **fields)}.
    @raise SessionFileMissing: neither copy exists.
    @raise SessionFileCorrupt: no copy verifies (the bad ones are quarantined).
    @raise StorageFailure: a copy could not be read, or the backup not restored.
    """
    reasons: dict[str, str] = {}
    quarantined: list[str] = []
    try:
        return load_verified(target.path, target, secret_key)
    except FileNotFoundError:
        main_missing = True
    except BadFile as exc:
        main_missing = False
        reasons["main"] = str(exc)
        quarantined.append(quarantine(target.path, str(exc)))
    try:
        document, size = load_verified(target.backup_path, target, secret_key)
    except FileNotFoundError:
        if main_missing:
            raise SessionFileMissing(target.client_id or "", target.session_id or "") from None
        raise SessionFileCorrupt(target.path, reasons, quarantined) from None
    except BadFile as exc:
        reasons["backup"] = str(exc)
        quarantined.append(quarantine(target.backup_path, str(exc)))
        raise SessionFileCorrupt(target.path, reasons, quarantined) from None
    try:
        with open(target.backup_path, "rb") as backup:
            data = backup.read()
        durable.durable_replace(target.path, data, backup=False, sync_dir=True)
    except OSError as exc:
        raise storage_failure("restore from backup", target.path, exc) from exc
    log(
        "info",
        "recovered {path} from its backup ({problem})",
        path=target.path,
        problem=reasons.get("main", "main file missing"),
    )
    return document, size
