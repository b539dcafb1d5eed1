"""One durable session: its record, its context, and how it becomes a file.

A L{Session} holds everything protocol.md section 5 returns on
C{restore_session}: client state, workspace (variables, history, client
part), inspector state, object registry, and the stored bindings that let the
image rebuild the session's namespace.  It knows nothing about files or the
network; L{stui_twisted.sessions.service} decides when it is written.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from itertools import compress
from operator import is_not
from typing import Any

from stui_twisted.access.sharing import shares_from, shares_list
from stui_twisted.protocol.envelope import whole_seconds
from stui_twisted.protocol.jsoncodec import COMPACT_ASCII
from stui_twisted.protocol.timefmt import iso_length, iso_timestamp, parse_iso_timestamp

_ASCII_JSON = COMPACT_ASCII

ACTIVE, CLOSED, EXPIRED = "active", "closed", "expired"


def new_session_id() -> str:
    """A fresh, unguessable session id: C{s_} + 22 url-safe chars (132 random bits)."""
    return "s_" + secrets.token_urlsafe(17)[:22]


def json_copy(value: Any) -> Any:
    """A deep copy of a JSON value (dicts, lists, scalars), made without recursion.

    Client data may be nested as deep as the JSON parser allows; a recursive
    copy (C{copy.deepcopy}) would fail on it with RecursionError.
    """
    if not isinstance(value, dict | list):
        return value
    root: Any = {} if isinstance(value, dict) else []
    stack = [(value, root)]
    while stack:
        source, target = stack.pop()
        if isinstance(source, dict):
            for key, item in source.items():
                if isinstance(item, dict | list):
                    child: Any = {} if isinstance(item, dict) else []
                    stack.append((item, child))
                    item = child
                target[key] = item
        else:
            for item in source:
                if isinstance(item, dict | list):
                    child = {} if isinstance(item, dict) else []
                    stack.append((item, child))
                    item = child
                target.append(item)
    return root


def merge_patch(target: Any, patch: Any) -> Any:
    """Apply an RFC 7396 JSON merge patch and return the result (inputs untouched).

    Iterative, like L{json_copy}: no depth of client data makes it fail.
    """
    if not isinstance(patch, dict):
        return json_copy(patch)
    result = json_copy(target) if isinstance(target, dict) else {}
    stack = [(result, patch)]
    while stack:
        into, changes = stack.pop()
        for key, value in changes.items():
            if value is None:
                into.pop(key, None)
            elif isinstance(value, dict):
                current = into.get(key)
                if not isinstance(current, dict):
                    current = into[key] = {}
                stack.append((current, value))
            else:
                into[key] = json_copy(value)
    return result


def _time(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    return parse_iso_timestamp(value)


def _iso(value: float | None) -> str | None:
    return None if value is None else iso_timestamp(value)


_STAND_INS: dict[int, str] = {}


def _iso_stand_in(value: float | None) -> str | None:
    """A string as long as C{_iso(value)}, made without formatting the time.

    The encoded length of a document is the same with it (a timestamp needs
    no JSON escapes), so L{Session.encoded_size} formats no timestamps.
    """
    if value is None:
        return None
    length = iso_length(value)
    stand_in = _STAND_INS.get(length)
    if stand_in is None:
        stand_in = _STAND_INS[length] = "0" * length
    return stand_in


_NOT_FOUND = object()


class PartSize:
    """The encoded length of a growing list or dict, updated by what changed.

    Registry and history change by appending at the end, dropping from the
    front and (registry) replacing a few entries.  C-level list operations
    find those changes in O(n) without Python-level work per member, and only
    new or replaced members are encoded.  Anything else (the part cleared or
    rebuilt) is measured again in full.

    A size is reused only for the very same object, so the result is exact.
    (Bindings keep a per-name cache instead, L{_members_size}: any one of them
    may be replaced or deleted, and demotion needs each one's size.)
    """

    __slots__ = ("_keys", "_values", "_sizes", "_total")

    def __init__(self) -> None:
        self._keys: list | None = None
        self._values: list = []
        self._sizes: list[int] = []
        self._total = 0

    def measure(self, part: list | dict) -> int:
        """Length of C{part}'s members as JSON, with commas, without brackets."""
        if isinstance(part, dict):
            keys, values = list(part), list(part.values())
        else:
            keys, values = None, list(part)
        old = self._values
        if (
            keys != self._keys
            or len(values) != len(old)
            # Shifted (appended and evicted) unless its ends are the same
            # objects: comparing by value would compare every member deeply
            # when they are alike (1,000 registry entries of the same repr).
            or (values and (values[0] is not old[0] or values[-1] is not old[-1]))
            or values != old
        ):
            self._refresh(keys, values)
        return self._total + len(values) - 1 if values else 0

    def _refresh(self, keys: list | None, values: list) -> None:
        old_keys, old_values, old_sizes = self._keys, self._values, self._sizes
        # Align the new members with the old ones: by key for a dict, by
        # identity for a list (the first new member's place among the old
        # ones; found by value, alike members were compared deeply).
        if keys is not None and old_keys is not None:
            old_order, order = old_keys, keys
            try:
                drop = old_order.index(order[0]) if order else len(old_order)
            except ValueError:
                drop = len(old_order)
        else:
            old_order, order = old_values, values
            first = values[0] if values else _NOT_FOUND
            drop = next(
                (index for index, value in enumerate(old_values) if value is first),
                len(old_values),
            )
        keep = len(old_order) - drop
        if keep and old_order[drop:] == order[:keep]:
            sizes = old_sizes[drop:]
            total = self._total - sum(old_sizes[:drop])
            # Kept members replaced by other objects (found at C speed; only
            # when some differ: the list comparison skips identical members
            # quickly, and equal ones encode to the same length).
            if old_values[drop:] != values[:keep]:
                for index in compress(range(keep), map(is_not, old_values[drop:], values[:keep])):
                    size = self._size_of(keys, values, index)
                    total += size - sizes[index]
                    sizes[index] = size
        else:
            keep, sizes, total = 0, [], 0
        for index in range(keep, len(values)):
            size = self._size_of(keys, values, index)
            sizes.append(size)
            total += size
        self._keys, self._values, self._sizes, self._total = keys, values, sizes, total

    @staticmethod
    def _size_of(keys: list | None, values: list, index: int) -> int:
        if keys is None:
            return len(_ASCII_JSON.encode(values[index]))
        return len(_ASCII_JSON.encode({keys[index]: values[index]})) - 2


@dataclass(slots=True)
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
    breakpoints: list = field(default_factory=list)
    shares: dict = field(default_factory=dict)
    """client id -> C{read} or C{write}: whom the owner shared the session with (access.md).

    Part of the meta, so the index has it and access is decided without reading the file."""
    # bookkeeping, not persisted
    loaded: bool = True
    dirty: bool = False
    size_bytes: int = 0
    last_saved_at: str | None = None
    """The C{saved_at} of the last write of the session file (as its envelope has it)."""
    materialized: bool = False
    image_generation: int | None = None
    """The image generation the namespace was built in (live only while it runs)."""
    version: int = 0
    """Counts content changes, so a write knows whether it caught the latest."""
    binding_sizes: dict = field(default_factory=dict, repr=False)
    """name -> (stored binding, its encoded size): bindings are re-encoded only when replaced."""
    registry_size: PartSize = field(default_factory=PartSize, repr=False)
    """The registry's encoded size, kept up to date by what changed."""
    history_size: PartSize = field(default_factory=PartSize, repr=False)
    """The history's encoded size, kept up to date by what changed."""

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
            "timeout": whole_seconds(self.timeout),
            "expires_at": iso_timestamp(expires),
            "time_until_expiry": math.floor(max(0.0, expires - now)) if active else 0,
            "is_active": active,
            "is_expired": self.is_expired(now),
            "state": EXPIRED if self.is_expired(now) else self.state,
        }

    def workspace_context(self) -> dict:
        return {
            "variables": json_copy(self.variables),
            "history": json_copy(self.history),
            "client": json_copy(self.client_workspace),
        }

    def inspector_state(self) -> dict:
        return {
            "selected_object": self.inspector_selected,
            "history": list(self.inspector_history),
            "view": json_copy(self.inspector_view),
        }

    def context(self) -> dict:
        """The four context parts a client restores."""
        return {
            "session_state": json_copy(self.session_state),
            "workspace_context": self.workspace_context(),
            "inspector_state": self.inspector_state(),
            "object_registry": json_copy(self.registry),
        }

    def meta(self, stamp=_iso) -> dict:
        """What the store's index keeps: ids, owner, state and times.

        @param stamp: how a time becomes its text (L{_iso}; the size
            accounting passes L{_iso_stand_in}).
        """
        return {
            "session_id": self.session_id,
            "client_id": self.client_id,
            "state": self.state,
            "created_at": stamp(self.created_at),
            "last_modified": stamp(self.last_modified),
            "last_activity": stamp(self.last_activity),
            "timeout": self.timeout,
            "closed_at": stamp(self.closed_at),
            "shares": shares_list(self.shares),
        }

    # -- files ------------------------------------------------------------

    def encoded_size(self) -> int:
        """About how many bytes the session file's C{session} part takes.

        Measured as the store writes it (ASCII JSON), but the parts that grow
        -- stored bindings, registry entries, history entries -- are encoded
        only when they were added or replaced since the last call: a session
        holding megabytes of bindings, or a full registry and history, is not
        re-encoded on every request.  Its timestamps are measured, not
        formatted (L{_iso_stand_in}).
        """
        document = self.to_document(stamp=_iso_stand_in)
        bindings = document.pop("bindings")
        registry = document.pop("object_registry")
        history = document["workspace_context"]["history"]
        document["workspace_context"]["history"] = []
        size = (
            len(_ASCII_JSON.encode(document)) + len(',"bindings":{}') + len(',"object_registry":{}')
        )
        size += _members_size(self.binding_sizes, bindings)
        size += self.registry_size.measure(registry)
        size += self.history_size.measure(history)
        return size

    def to_document(self, stamp=_iso) -> dict:
        """The C{session} object of the session file (JSON-able).

        @param stamp: how a time becomes its text (see L{meta}).
        """
        document = self.meta(stamp)
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
                "breakpoints": self.breakpoints,
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
            shares=shares_from(meta.get("shares")),
            loaded=False,
        )

    def load_document(self, document: dict, *, shares: bool = True) -> None:
        """Fill the context from a session file's C{session} object.

        @param shares: take the shares from C{document} too.  False when an
            older copy replaces the context (C{load_context}, closing without
            saving): whom the session is shared with is not part of its context,
            and an old copy must neither bring back a share taken away since
            nor drop one given since.

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
        self.breakpoints = document.get("breakpoints") or []
        if shares and "shares" in document:
            self.shares = shares_from(document["shares"])
        for key in ("last_activity", "last_modified"):
            stored = _time(document.get(key))
            if stored is not None and stored > getattr(self, key):
                setattr(self, key, stored)
        self.loaded = True


def _members_size(cache: dict, members: dict) -> int:
    """Encoded length of C{members}' C{"name":value} pairs and their commas.

    C{cache} maps a name to (value, length) and is refreshed for values that
    are not the same object as last time; names gone from C{members} leave it.
    """
    size = 0
    for name, value in members.items():
        known = cache.get(name)
        if known is None or known[0] is not value:
            known = (value, len(_ASCII_JSON.encode({name: value})) - 2)
            cache[name] = known
        size += known[1] + 1
    if len(cache) > len(members):
        for name in [name for name in cache if name not in members]:
            del cache[name]
    return size - 1 if members else 0
