"""What the session service answers: small domain objects, no wire shapes.

The service (L{stui_twisted.sessions.service}, L{stui_twisted.sessions.live})
returns these; the command table (L{stui_twisted.dispatch.commands}) is the one
place that turns them into reply dicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stui_twisted.sessions.model import Session


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()
"""An argument that was not given (as opposed to one given as C{None})."""


@dataclass
class SharedNamespace:
    """The image-wide C{shared} namespace as stored: its bindings, and whether they
    changed since they were last written."""

    bindings: dict = field(default_factory=dict)
    dirty: bool = False


@dataclass(frozen=True)
class Rebuilt:
    """Which stored bindings came back in the image, and which could not."""

    restored: list
    unrestorable: list


@dataclass(frozen=True)
class RestoreResult:
    """C{restore_session}: the session and what its namespace rebuild gave."""

    session: Session
    rebuilt: Rebuilt


@dataclass(frozen=True)
class SessionInfo:
    """C{get_session_info}: the session, its size and who is attached to it."""

    session: Session
    size_bytes: int
    attached_connections: int
    shares: list | None = None
    """The session's shares (C{[{client_id, access}]}) for its owner; None for anyone else."""


@dataclass(frozen=True)
class ClientSessions:
    """C{list_client_sessions}: a client's sessions, oldest first."""

    client_id: str
    sessions: list[Session]


@dataclass(frozen=True)
class SessionStatistics:
    """C{get_session_statistics}: server-wide counts at one moment."""

    total: int
    active: int
    expired: int
    closed: int
    active_clients: int
    connected_clients: int
    uptime: float
    storage: dict


@dataclass(frozen=True)
class SaveResult:
    """C{save_context}: the saved copy as written."""

    session_id: str
    saved_at: str
    size_bytes: int
    checksum: str


@dataclass(frozen=True)
class LoadResult:
    """C{load_context}: the session as reloaded, when that copy was saved, the rebuild."""

    session: Session
    saved_at: str
    rebuilt: Rebuilt


@dataclass(frozen=True)
class EvaluationStarted:
    """C{evaluate} with C{wait: false}: the evaluation started and has this index."""

    session_id: str
    history_index: int


@dataclass(frozen=True)
class EvaluationOutcome:
    """C{evaluate} that ran to the end (errors are raised, with their history index)."""

    session_id: str
    result: Any
    result_type: str | None
    object_id: str | None
    display: Any
    output: str
    execution_time: float | None
    history_index: int


@dataclass(frozen=True)
class Inspection:
    """C{inspect}: the image's view of the object (persistence delta removed)."""

    session_id: str
    view: dict


@dataclass(frozen=True)
class Completions:
    """C{complete}: the image's completions at the cursor."""

    session_id: str
    completions: dict
