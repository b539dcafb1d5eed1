"""What the core may do to a client connection, whatever its transport.

Transports (line-JSON over TCP/TLS, ZeroMQ) only frame bytes.  Each implements
L{IClientConnection}; the dispatcher and the session service see nothing
else of them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from zope.interface import Attribute, Interface

_connection_numbers = itertools.count(1)


class IClientConnection(Interface):
    """One client conversation: a TCP/TLS connection or one ZeroMQ peer identity."""

    context = Attribute("The L{ConnectionContext} of this conversation.")

    def sendReply(data: bytes) -> None:  # noqa: N802,N805
        """Send one encoded reply (without framing) to the client."""

    def sendEvent(data: bytes) -> None:  # noqa: N802,N805
        """Push one encoded event (without framing) to the client (events.md)."""

    def close() -> None:  # noqa: N805
        """End the conversation (a no-op for ZeroMQ peers)."""


@dataclass
class ConnectionContext:
    """Per-conversation state the core keeps: current session and principal.

    @ivar transport: C{"tcp"}, C{"tls"} or C{"zmq"}.
    @ivar peer: printable address of the peer, for logs and rate limits.
    @ivar current_session_id: the session last created or restored here.
    @ivar principal: the authenticated client id, when auth is on and done.
    """

    transport: str
    peer: str
    connection_id: int = field(default_factory=lambda: next(_connection_numbers))
    current_session_id: str | None = None
    principal: str | None = None
    connection: Any = field(default=None, repr=False, compare=False)
    """The L{IClientConnection} itself (events are pushed to it)."""
    outbox: Any = field(default=None, repr=False, compare=False)
    """Its L{stui_twisted.events.hub.Outbox} once it subscribed to a stream."""
    connected_at: float | None = None
    """When the conversation began (set by the connection registry)."""
    last_command: str | None = None
    last_activity: float | None = None
    """The name and receipt time of its last request to a known command (C{list_clients})."""
    last_client_id: str | None = None
    """The principal its last authenticated request acted as (ZeroMQ keeps none otherwise)."""

    @property
    def label(self) -> str:
        """A short name for logs, e.g. C{tcp#3 127.0.0.1:50312}."""
        return f"{self.transport}#{self.connection_id} {self.peer}"
