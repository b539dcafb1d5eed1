"""The session index: load it at start-up (reconciled with the files), and verify every file.

C{DATA/index.json} holds the meta of every session, so start-up need not read every
session file: L{load_index} takes an entry from the index when its file has not
changed since the index was saved (a stat, no read), reads the file otherwise, and
drops entries whose file is gone.  L{verify_all} checks every file for the admin
tool.  Both are blocking jobs that run in one of the store's threads; they use the
store's thread-side reads (verify, recover from .bak, quarantine).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from stui_twisted.storage import durable, journal
from stui_twisted.storage.errors import SessionFileMissing, StorageFailure, storage_failure
from stui_twisted.storage.fileformat import BadFile
from stui_twisted.storage.lanes import Key, Target
from stui_twisted.storage.pathcodec import check_session_id, decode_client_dir

if TYPE_CHECKING:
    from stui_twisted.storage.store import SessionStore

#: The keys of a session dict the store reads (everything else is opaque to it).
META_KEYS = (
    "session_id",
    "client_id",
    "state",
    "created_at",
    "last_modified",
    "last_activity",
    "timeout",
    "closed_at",
    "shares",  # whom the session is shared with (access.md): decided on without a read
)

SAVED_SUFFIX = ".saved.json"
"""The file name ending of the copy C{save_context} keeps beside a session file."""

#: Session files modified later than this before the index snapshot are read again by
#: load_index (file mtimes come from a coarse kernel clock, a few ms behind the wall clock).
INDEX_MTIME_SLACK_NS = 2_000_000_000

#: load_index removes temp files of interrupted writes once they are this old (a
#: younger one may belong to a write still running).
STALE_TEMP_SECONDS = 3600


def meta_of(session: dict[str, Any]) -> dict[str, Any]:
    """The L{META_KEYS} of C{session}."""
    return {key: session.get(key) for key in META_KEYS}


def read_index_file(store: SessionStore, now: float) -> tuple[dict[Key, dict], int | None]:
    """Entries of a valid index and its snapshot time; ({}, None) without one."""
    target = store._index_target()
    try:
        document, _ = store._load_verified(store.index_path, target)
        entries = document["sessions"]
        saved_at_ns = document.get("saved_at_ns")
        if not isinstance(entries, list) or type(saved_at_ns) is not int:
            raise BadFile("sessions is not a list or saved_at_ns is not an integer")
    except FileNotFoundError:
        store._log_from_thread("info", "no session index: scanning every session file")
        return {}, None
    except BadFile as exc:
        store._quarantine(store.index_path, str(exc), now)
        return {}, None
    known: dict[Key, dict] = {}
    for entry in entries:
        if isinstance(entry, dict):
            known[(entry.get("client_id"), entry.get("session_id"))] = entry
    return known, saved_at_ns


def scan_sessions(store: SessionStore, now: float) -> dict[Key, os.stat_result | None]:
    """Every session on disk: key → stat of its main file (None: only a .bak)."""
    found: dict[Key, os.stat_result | None] = {}
    with os.scandir(store.sessions_dir) as client_dirs:
        for client_dir in client_dirs:
            client_id = decode_client_dir(client_dir.name)
            if client_id is None or not client_dir.is_dir(follow_symlinks=False):
                continue
            with os.scandir(client_dir.path) as files:
                for entry in files:
                    name = entry.name
                    if name.startswith("."):
                        remove_stale_temp(store, entry, now)
                        continue
                    if name.endswith(SAVED_SUFFIX):
                        continue  # save_context's copy, not a session of its own
                    if name.endswith(".json.bak"):
                        session_id, is_main = name[: -len(".json.bak")], False
                    elif name.endswith(".json"):
                        session_id, is_main = name[: -len(".json")], True
                    else:
                        continue
                    try:
                        check_session_id(session_id)
                    except ValueError:
                        continue
                    key = (client_id, session_id)
                    if is_main:
                        found[key] = entry.stat(follow_symlinks=False)
                    else:
                        found.setdefault(key, None)
    return found


def remove_stale_temp(store: SessionStore, entry: os.DirEntry, now: float) -> None:
    """Remove the temp file of a write interrupted long ago (never acknowledged)."""
    if ".tmp-" not in entry.name:
        return
    try:
        age_seconds = now - entry.stat(follow_symlinks=False).st_mtime
        if age_seconds < STALE_TEMP_SECONDS or not entry.is_file(follow_symlinks=False):
            return
        os.unlink(entry.path)
    except FileNotFoundError:
        return
    except OSError as exc:
        store._log_from_thread(
            "warn",
            "could not remove stale temp file {path}: {error}",
            path=entry.path,
            error=exc,
        )
        return
    store._log_from_thread(
        "info", "removed the temp file of an interrupted write: {path}", path=entry.path
    )


def load_index(store: SessionStore, now: float) -> tuple[list[dict], dict, dict]:
    """The index reconciled with the files (thread side).

    @param now: the time (Unix seconds, read on the reactor thread) that temp file
        ages are measured against and quarantined files are stamped with.
    @return: the metas, C{{key: (size, saved_at)}} and counts for the log.
    """
    known, saved_at_ns = read_index_file(store, now)
    try:
        on_disk = scan_sessions(store, now)
    except OSError as exc:
        raise storage_failure("list", store.sessions_dir, exc) from exc
    metas: list[dict] = []
    file_info: dict[Key, tuple[int, str | None]] = {}
    counts = {"from_index": 0, "from_files": 0, "dropped": 0, "unreadable": 0}
    counts["dropped"] = len(set(known) - set(on_disk))
    for key, main_stat in on_disk.items():
        entry = known.get(key)
        if (
            entry is not None
            and main_stat is not None
            and saved_at_ns is not None
            and main_stat.st_mtime_ns < saved_at_ns - INDEX_MTIME_SLACK_NS
        ):
            meta = meta_of(entry)
            meta["size_bytes"] = main_stat.st_size
            meta["saved_at"] = entry.get("saved_at")
            counts["from_index"] += 1
        else:
            target = store._session_target(*key)
            try:
                with store._file_lock(key):
                    document, size = store._read_recovering(target, now)
            except (SessionFileMissing, StorageFailure) as exc:
                counts["unreadable"] += 1
                store._log_from_thread(
                    "warn", "session file {key} skipped: {error}", key=key, error=exc
                )
                continue
            meta = meta_of(document["session"])
            meta["size_bytes"] = size
            meta["saved_at"] = document.get("saved_at")
            counts["from_files"] += 1
        metas.append(meta)
        file_info[key] = (meta["size_bytes"], meta["saved_at"])
    return metas, file_info, counts


def verify_all(store: SessionStore) -> list[dict]:
    """One row per file under the data directory: whether it verifies (thread side)."""
    report: list[dict] = []

    def check(path: str, kind: str, target: Target | None) -> None:
        row = {
            "path": os.path.relpath(path, store.data_dir),
            "kind": kind,
            "client_id": target.client_id if target else None,
            "session_id": target.session_id if target else None,
            "size_bytes": None,
            "ok": False,
            "reason": None,
        }
        try:
            row["size_bytes"] = os.stat(path, follow_symlinks=False).st_size
            if target is None:
                row["reason"] = (
                    "temp file of an interrupted write" if kind == "temp" else "unexpected file"
                )
            else:
                with store._file_lock(target.key):
                    store._load_verified(path, target)
                row["ok"] = True
        except FileNotFoundError:
            return  # removed while we looked
        except (BadFile, StorageFailure) as exc:
            row["reason"] = str(exc)
        except OSError as exc:
            row["reason"] = str(storage_failure("stat", path, exc))
        report.append(row)

    for path, kind, target in (
        (store.index_path, "index", store._index_target()),
        (store.shared_path, "shared", store._shared_target()),
        (store.shared_path + ".bak", "shared-backup", store._shared_target()),
    ):
        if os.path.lexists(path):
            check(path, kind, target)
    for client_dir in sorted(durable.listdir(store.sessions_dir)):
        client_path = os.path.join(store.sessions_dir, client_dir)
        client_id = decode_client_dir(client_dir)
        if client_id is None or not os.path.isdir(client_path):
            check(client_path, "unexpected", None)
            continue
        for name in sorted(durable.listdir(client_path)):
            path = os.path.join(client_path, name)
            session_id, kind = _classify_session_file(name)
            try:
                target = (
                    store._session_target(client_id, session_id, saved=kind == "saved")
                    if session_id
                    else None
                )
            except ValueError:
                target = None
            check(path, kind if target or kind == "temp" else "unexpected", target)
    report.extend(journal.verify_rows(store))
    return report


def _classify_session_file(name: str) -> tuple[str | None, str]:
    if name.startswith("."):
        return None, "temp"
    if name.endswith(".json.bak"):
        return name[: -len(".json.bak")], "backup"
    if name.endswith(SAVED_SUFFIX):
        return name[: -len(SAVED_SUFFIX)], "saved"
    if name.endswith(".json"):
        return name[: -len(".json")], "session"
    return None, "unexpected"
