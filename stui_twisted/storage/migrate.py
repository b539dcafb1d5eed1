"""Copy every session from one store to another (C{stui-admin migrate}).

Works through L{ISessionStore} only: each session is read from the source (so its
MAC is verified there: a bad file is reported, never copied), written to the target
with its original C{saved_at}, and read back from the target (verified again by its
MAC) and compared.  Saved copies of C{save_context} and the shared namespace come
along.  Writes are upserts, so running it again is harmless: it copies the same
sessions again and reports the same counts.
"""

from __future__ import annotations

from typing import Any

from stui_twisted.storage.errors import SessionFileCorrupt, SessionFileMissing, StorageFailure


class MigrationMismatch(StorageFailure):
    """A session read back from the target differs from what was written."""


async def migrate_sessions(source: Any, target: Any) -> dict[str, Any]:
    """Copy everything in C{source} to C{target} (both open).

    @return: counts {C{sessions}, C{saved_copies}, C{shared} (0/1), C{unreadable}}
        and C{unreadable_sessions} (ids with the reason).
    """
    counts: dict[str, Any] = {"sessions": 0, "saved_copies": 0, "shared": 0, "unreadable": 0}
    unreadable: list[dict] = []
    for meta in await source.load_index():
        client_id, session_id = meta["client_id"], meta["session_id"]
        try:
            session = await source.read(client_id, session_id)
        except (SessionFileMissing, SessionFileCorrupt) as exc:
            counts["unreadable"] += 1
            unreadable.append({"session_id": session_id, "reason": str(exc)})
            continue
        await target.write(session, saved_at=meta.get("saved_at"))
        await _check_copy(await target.read(client_id, session_id), session, session_id)
        counts["sessions"] += 1
        try:
            saved, saved_at = await source.read_saved(client_id, session_id)
        except SessionFileMissing:
            continue  # nothing saved with save_context
        await target.write(saved, saved_at=saved_at, saved_copy=True)
        copied, _ = await target.read_saved(client_id, session_id)
        await _check_copy(copied, saved, session_id + " (saved copy)")
        counts["saved_copies"] += 1
    shared = await source.read_shared()
    if shared:
        await target.write_shared(shared)
        await _check_copy(await target.read_shared(), shared, "shared namespace")
        counts["shared"] = 1
    counts["unreadable_sessions"] = unreadable
    return counts


async def _check_copy(copied: Any, original: Any, what: str) -> None:
    if copied != original:
        raise MigrationMismatch(f"{what}: the copy read back from the target differs")
