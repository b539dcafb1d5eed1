"""Who is connected: the team stream's C{presence} events (events.md §1).

A conversation counts for a client id from its first request that names
that client id (a C{client_id} parameter, or the principal it is
authenticated as, or a successful C{authenticate}) until it closes.  Each
change publishes C{presence} {C{client_id}, C{connections} (how many
conversations count for it now), C{joined}} on the team stream.

Bounded: a conversation counts for at most L{MAX_IDS_PER_CONVERSATION}
client ids (a client naming more is not counted for the rest), and only
well-formed client ids count (C{valid}).
"""

from __future__ import annotations

from collections.abc import Callable

MAX_IDS_PER_CONVERSATION = 16


class Presence:
    """Counts conversations per client id and publishes the changes.

    @param hub: the L{EventHub<stui_twisted.events.hub.EventHub>}; it calls
        L{closed} when a conversation it knows goes away.
    @param valid: whether a client id is well formed (C{CLIENT_ID_PATTERN.fullmatch}).
    """

    def __init__(self, hub, valid: Callable[[str], object] = bool) -> None:
        self.hub = hub
        self.valid = valid
        self.counts: dict[str, int] = {}
        self._ids: dict[int, set[str]] = {}  # connection_id -> the client ids it counts for
        hub.presence = self

    def note(self, context, client_id: str) -> None:
        """C{context} acts as C{client_id} (a client observer of the dispatcher)."""
        ids = self._ids.get(context.connection_id)
        if ids is not None and client_id in ids:
            return
        if context.connection is None or not self.valid(client_id):
            return
        if ids is None:
            ids = self._ids[context.connection_id] = set()
            self.hub.outbox_of(context, context.connection)  # it tells us when it closes
        if len(ids) >= MAX_IDS_PER_CONVERSATION:
            return
        ids.add(client_id)
        count = self.counts[client_id] = self.counts.get(client_id, 0) + 1
        self._publish(client_id, count, True)

    def closed(self, context) -> None:
        """C{context} went away: it counts for nobody any more."""
        for client_id in sorted(self._ids.pop(context.connection_id, ())):
            count = self.counts[client_id] - 1
            if count:
                self.counts[client_id] = count
            else:
                del self.counts[client_id]
            self._publish(client_id, count, False)

    def _publish(self, client_id: str, count: int, joined: bool) -> None:
        data = {"client_id": client_id, "connections": count, "joined": joined}
        self.hub.publish(None, "presence", data)
