"""The storage layer's errors: what a caller of the store can be told went wrong."""

from __future__ import annotations

import errno

from stui_twisted.protocol.errors import StorageFailure

__all__ = [
    "SessionFileCorrupt",
    "SessionFileMissing",
    "StorageFailure",
    "storage_failure",
]


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


def storage_failure(action: str, path: str, error: OSError) -> StorageFailure:
    """A StorageFailure naming the path and errno of C{error}."""
    code = errno.errorcode.get(error.errno or 0, str(error.errno))
    failure = StorageFailure(
        f"could not {action} {error.filename or path}: [{code}] {error.strerror or error}"
    )
    failure.path = error.filename or path
    failure.errno = error.errno
    return failure
