"""The storage layer's own errors: what a caller of the store can be told went wrong.

The storage layer raises only these (and C{ValueError} for ids that cannot name a
file, C{KeyError} via L{SessionFileMissing}); the session service maps them to wire
errors at its edge (C{StorageFailure} to C{StorageError}, L{RecordTooLarge} to
C{StateTooLarge}).
"""

from __future__ import annotations

import errno

__all__ = [
    "LeaseHeld",
    "RecordTooLarge",
    "SessionFileCorrupt",
    "SessionFileMissing",
    "StorageFailure",
    "storage_failure",
]


class StorageFailure(Exception):
    """A session file could not be written or read durably (maps to StorageError).

    @ivar path: the file concerned, when one is known.
    @ivar errno: the OS error number, when an OS error caused it.
    """

    path: str | None = None
    errno: int | None = None


class SessionFileMissing(KeyError):
    """Neither a session's file nor its backup exists."""

    def __init__(self, client_id: str, session_id: str) -> None:
        super().__init__(session_id)
        self.client_id = client_id
        self.session_id = session_id

    def __str__(self) -> str:
        return f"no file for session {self.session_id!r} of client {self.client_id!r}"


class SessionFileCorrupt(StorageFailure):
    """A file and its backup both failed verification; both are now in quarantine.

    @ivar path: the main file's path.
    @ivar reasons: why each copy was refused, e.g. C{{"main": "MAC mismatch"}}.
    @ivar quarantined: where the bad copies were moved.
    """

    def __init__(self, path: str, reasons: dict[str, str], quarantined: list[str]) -> None:
        detail = "; ".join(f"{which}: {why}" for which, why in reasons.items())
        super().__init__(f"{path} and its backup are unreadable ({detail})")
        self.path = path
        self.reasons = reasons
        self.quarantined = quarantined


class LeaseHeld(Exception):
    """Another node holds a fresh lease on the session (maps to SessionElsewhere).

    @ivar session_id: the session.
    @ivar node_id: the node that holds it.
    @ivar advertise: the C{HOST:PORT} that node advertises, or C{None}.
    """

    def __init__(self, session_id: str, node_id: str, advertise: str | None) -> None:
        where = f" at {advertise}" if advertise else ""
        super().__init__(f"session {session_id!r} is served by node {node_id!r}{where}")
        self.session_id = session_id
        self.node_id = node_id
        self.advertise = advertise


class RecordTooLarge(Exception):
    """A record would take more than the store's size limit on disk; nothing was written.

    @ivar size_bytes: the size its file would have.
    @ivar max_bytes: the limit (the store's C{max_session_bytes}).
    @ivar name: what the record is (a session id, or a file name).
    """

    def __init__(self, size_bytes: int, max_bytes: int, name: str = "the record") -> None:
        super().__init__(
            f"{name} would take {size_bytes} bytes on disk, more than"
            f" max_session_bytes ({max_bytes})"
        )
        self.size_bytes = size_bytes
        self.max_bytes = max_bytes
        self.name = name


def storage_failure(action: str, path: str, error: OSError) -> StorageFailure:
    """A StorageFailure naming the path and errno of C{error}."""
    code = errno.errorcode.get(error.errno or 0, str(error.errno))
    failure = StorageFailure(
        f"could not {action} {error.filename or path}: [{code}] {error.strerror or error}"
    )
    failure.path = error.filename or path
    failure.errno = error.errno
    return failure
