"""The set of open client connections, shared by every transport.

It enforces C{--max-connections} over TCP/TLS connections and answers
C{connected_clients} for statistics; sessions use it to count the
connections attached to them.  ZeroMQ peers are listed but not counted
against the limit: a ZeroMQ peer can make up any number of routing
identities, and letting those fill the table would lock TCP/TLS clients out.
"""

from __future__ import annotations


class ConnectionRegistry:
    """Counts and bounds the live connections of all transports."""

    def __init__(self, max_connections: int, clock=None) -> None:
        self.max_connections = max_connections
        self.clock = clock
        """Stamps C{connected_at} of each conversation (C{list_clients}); C{None}: not stamped."""
        self._connections: set = set()
        self._limited: set = set()
        self._reserved = 0

    def admit(self) -> bool:
        """Whether one more connection may be built (reserves its place)."""
        if len(self._limited) + self._reserved >= self.max_connections:
            return False
        self._reserved += 1
        return True

    def opened(self, connection, limited: bool = True) -> None:
        """C{connection} is live; C{limited} ones took a place from L{admit}."""
        self._connections.add(connection)
        context = getattr(connection, "context", None)
        if self.clock is not None and context is not None and context.connected_at is None:
            context.connected_at = self.clock.seconds()
        if limited:
            self._reserved = max(0, self._reserved - 1)
            self._limited.add(connection)

    def closed(self, connection) -> None:
        """C{connection} is gone (its place is free again)."""
        self._connections.discard(connection)
        self._limited.discard(connection)

    @property
    def limited_count(self) -> int:
        """Open connections that count against C{max_connections}."""
        return len(self._limited)

    def __len__(self) -> int:
        return len(self._connections)

    def __iter__(self):
        return iter(list(self._connections))

    def __contains__(self, connection) -> bool:
        return connection in self._connections

    def attached_to(self, session_id: str) -> int:
        """How many connections have C{session_id} as their current session."""
        return sum(
            1
            for connection in self._connections
            if connection.context is not None
            and connection.context.current_session_id == session_id
        )
