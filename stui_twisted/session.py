"""One durable session: its record, its context, and how it becomes a file.

A :class:`Session` holds everything protocol.md section 5 returns on
``restore_session``: client state, workspace (variables, history, client
part), inspector state, object registry, and the stored bindings that let the
image rebuild the session's namespace.  It knows nothing about files or the
network; :mod:`stui_twisted.service` decides when it is written.
"""

from __future__ import annotations

import copy
import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from stui_twisted.envelope import iso_timestamp, parse_iso_timestamp

_ASCII_JSON = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=False)

ACTIVE, CLOSED, EXPIRED = "active", "closed", "expired"


def new_session_id() -> str:
    """A fresh, unguessable session id: C{s_} + 22 url-safe chars (132 random bits)."""
    return "s_" + secrets.token_urlsafe(17)[:22]


def merge_patch(target: Any, patch: Any) -> Any:
    """Apply an RFC 7396 JSON merge patch and return the result (inputs untouched)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _time(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    return parse_iso_timestamp(value)


def _iso(value: float | None) -> str | None:
    return None if value is None else iso_timestamp(value)


@dataclass
class Session:
    """A session's record and context, in memory.

    Times are seconds since the epoch (the injected clock's C{seconds()}).
    C{loaded} is False for a session known only from the index: its context
    is read from disk on first use.
    """

    session_id: str
    client_id: str
    created_at: float
    timeout: float
    last_activity: float
    last_modified: float
    state: str = ACTIVE
    closed_at: float | None = None
    client_info: dict = field(default_factory=dict)
    session_state: Any = field(default_factory=dict)
    client_workspace: dict = field(default_factory=dict)
    inspector_view: dict = field(default_factory=dict)
    inspector_selected: str | None = None
    inspector_history: list = field(default_factory=list)
    variables: list = field(default_factory=list)
    history: list = field(default_factory=list)
    history_counter: int = 0
    registry: dict = field(default_factory=dict)
    bindings: dict = field(default_factory=dict)
    next_object_id: int = 1
    unrestorable: list = field(default_factory=list)
    # bookkeeping, not persisted
    loaded: bool = True
    dirty: bool = False
    size_bytes: int = 0
    last_saved_at: float | None = None
    materialized: bool = False
    version: int = 0
    """Counts content changes, so a write knows whether it caught the latest."""
    binding_sizes: dict = field(default_factory=dict, repr=False)
    """name -> (stored binding, its encoded size): bindings are re-encoded only when replaced."""

    # -- time -------------------------------------------------------------

    def expires_at(self) -> float:
        return self.last_activity + self.timeout

    def is_expired(self, now: float) -> bool:
        return self.state == EXPIRED or (self.state == ACTIVE and now >= self.expires_at())

    def is_active(self, now: float) -> bool:
        return self.state == ACTIVE and not self.is_expired(now)

    def ended_at(self) -> float | None:
        """When the session stopped being usable (closed or expired), else None."""
        if self.state == CLOSED:
            return self.closed_at if self.closed_at is not None else self.last_modified
        if self.state == EXPIRED:
            return self.expires_at()
        return None

    # -- views ------------------------------------------------------------

    def record(self, now: float) -> dict:
        """The session record fields of protocol.md section 4."""
        expires = self.expires_at()
        active = self.is_active(now)
        return {
            "session_id": self.session_id,
            "client_id": self.client_id,
            "created_at": iso_timestamp(self.created_at),
            "last_modified": iso_timestamp(self.last_modified),
            "last_activity": iso_timestamp(self.last_activity),
            "timeout": self.timeout,
            "expires_at": iso_timestamp(expires),
            "time_until_expiry": round(max(0.0, expires - now), 3) if active else 0,
            "is_active": active,
            "is_expired": self.is_expired(now),
            "state": EXPIRED if self.is_expired(now) else self.state,
        }

    def workspace_context(self) -> dict:
        return {
            "variables": copy.deepcopy(self.variables),
            "history": copy.deepcopy(self.history),
            "client": copy.deepcopy(self.client_workspace),
        }

    def inspector_state(self) -> dict:
        return {
            "selected_object": self.inspector_selected,
            "history": list(self.inspector_history),
            "view": copy.deepcopy(self.inspector_view),
        }

    def context(self) -> dict:
        """The four context parts a client restores."""
        return {
            "session_state": copy.deepcopy(self.session_state),
            "workspace_context": self.workspace_context(),
            "inspector_state": self.inspector_state(),
            "object_registry": copy.deepcopy(self.registry),
        }

    def meta(self) -> dict:
        """What the store's index keeps: ids, owner, state and times."""
        return {
            "session_id": self.session_id,
            "client_id": self.client_id,
            "state": self.state,
            "created_at": _iso(self.created_at),
            "last_modified": _iso(self.last_modified),
            "last_activity": _iso(self.last_activity),
            "timeout": self.timeout,
            "closed_at": _iso(self.closed_at),
        }

    # -- files ------------------------------------------------------------

    def encoded_size(self) -> int:
        """About how many bytes the session file's C{session} part takes.

        Measured as the store writes it (ASCII JSON), but each stored binding
        is encoded only when it was replaced since the last call: a session
        holding megabytes of bindings is not re-encoded on every request.
        """
        document = self.to_document()
        bindings = document.pop("bindings")
        size = len(_ASCII_JSON.encode(document)) + len(',"bindings":{}')
        cache = self.binding_sizes
        for name, binding in bindings.items():
            known = cache.get(name)
            if known is None or known[0] is not binding:
                known = (binding, len(_ASCII_JSON.encode({name: binding})) - 2)
                cache[name] = known
            size += known[1] + 1
        for name in [name for name in cache if name not in bindings]:
            del cache[name]
        return size - 1 if bindings else size  # n bindings, n - 1 commas

    def to_document(self) -> dict:
        """The C{session} object of the session file (JSON-able)."""
        document = self.meta()
        document.update(
            {
                "client_info": self.client_info,
                "session_state": self.session_state,
                "workspace_context": {
                    "variables": self.variables,
                    "history": self.history,
                    "client": self.client_workspace,
                },
                "inspector_state": {
                    "selected_object": self.inspector_selected,
                    "history": self.inspector_history,
                    "view": self.inspector_view,
                },
                "object_registry": self.registry,
                "bindings": self.bindings,
                "history_counter": self.history_counter,
                "next_object_id": self.next_object_id,
            }
        )
        return document

    @classmethod
    def from_meta(cls, meta: dict) -> Session:
        """A not-yet-loaded session known only from the index."""
        return cls(
            session_id=meta["session_id"],
            client_id=meta["client_id"],
            state=meta.get("state", ACTIVE),
            created_at=_time(meta.get("created_at")) or 0.0,
            last_modified=_time(meta.get("last_modified")) or 0.0,
            last_activity=_time(meta.get("last_activity")) or 0.0,
            timeout=float(meta.get("timeout") or 0.0),
            closed_at=_time(meta.get("closed_at")),
            loaded=False,
        )

    def load_document(self, document: dict) -> None:
        """Fill the context from a session file's C{session} object.

        Times already known in memory (e.g. a newer C{last_activity} from the
        index) are kept when they are later than the file's.
        """
        workspace = document.get("workspace_context") or {}
        inspector = document.get("inspector_state") or {}
        self.client_info = document.get("client_info") or {}
        self.session_state = document.get("session_state", {})
        self.variables = workspace.get("variables") or []
        self.history = workspace.get("history") or []
        self.client_workspace = workspace.get("client") or {}
        self.inspector_selected = inspector.get("selected_object")
        self.inspector_history = inspector.get("history") or []
        self.inspector_view = inspector.get("view") or {}
        self.registry = document.get("object_registry") or {}
        self.bindings = document.get("bindings") or {}
        self.history_counter = int(
            document.get("history_counter") or (self.history[-1]["index"] if self.history else 0)
        )
        self.next_object_id = int(document.get("next_object_id") or 1)
        for key in ("last_activity", "last_modified"):
            stored = _time(document.get(key))
            if stored is not None and stored > getattr(self, key):
                setattr(self, key, stored)
        self.loaded = True
