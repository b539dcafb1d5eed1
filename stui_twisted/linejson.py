"""Line-JSON transport: one JSON request per line over TCP or TLS.

:class:`LineJSONProtocol` frames bytes into lines and hands each line to the
shared :class:`~stui_twisted.dispatcher.Dispatcher`; replies are written as
they complete, so a slow evaluation never holds back later fast requests.

Flow control keeps memory bounded per connection: reading pauses while more
than ``max_pending`` requests are in flight, or while the transport's write
buffer is full because the client is not reading its replies.  Fairness keeps
one client from starving the others: a connection that has spent
``turn_budget`` seconds of reactor time on its lines in one go stops reading
until the next reactor iteration, so other connections' requests run between
its batches.

When authentication is on, a connection that has not authenticated is closed
after ``unauthenticated_idle_timeout`` seconds without a request (each line
restarts the timer); once it authenticates the timer is off for good.
"""

from __future__ import annotations

import time

from twisted.internet import interfaces
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from stui_twisted.interfaces import ConnectionContext, IClientConnection


@implementer(IClientConnection, interfaces.IPushProducer)
class LineJSONProtocol(LineReceiver, TimeoutMixin):
    """One TCP/TLS client connection speaking line-delimited JSON."""

    delimiter = b"\n"
    log = Logger()

    def __init__(self, factory: LineJSONFactory) -> None:
        self.factory = factory
        self.MAX_LENGTH = factory.max_message_bytes
        self.context: ConnectionContext | None = None
        self._pending = 0
        self._pause_reasons: set[str] = set()
        self._closing = False
        self._turn_started: float | None = None
        self._idle_timer_armed = False
        self.callLater = factory.clock.callLater if factory.clock is not None else self.callLater

    # -- connection lifecycle ---------------------------------------------

    def connectionMade(self) -> None:  # noqa: N802
        peer = self.transport.getPeer()
        # The host alone (no port) is the peer: it is what brute-force limits key on.
        host = str(getattr(peer, "host", peer))
        self.context = ConnectionContext(transport=self.factory.transport_name, peer=host)
        self.factory.connection_opened(self)
        self.transport.registerProducer(self, True)
        if self.factory.auth_required():
            self._idle_timer_armed = True
            self.setTimeout(self.factory.unauthenticated_idle_timeout)
        self.log.info(
            "{conn} connected from port {port}",
            conn=self.context.label,
            port=getattr(peer, "port", "?"),
        )

    def connectionLost(self, reason) -> None:  # noqa: N802
        self.setTimeout(None)
        self.factory.connection_closed(self)
        self.log.info(
            "{conn} disconnected ({why})",
            conn=self.context.label if self.context else "?",
            why=reason.getErrorMessage(),
        )

    def timeoutConnection(self) -> None:  # noqa: N802
        self.log.info("{conn} closed: not authenticated in time", conn=self.context.label)
        self.transport.loseConnection()

    # -- framing ----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        # Each call is one turn: a read from the socket, or the resume after a
        # pause (LineReceiver.resumeProducing calls this with b"").
        self._turn_started = None
        LineReceiver.dataReceived(self, data)

    def lineReceived(self, line: bytes) -> None:  # noqa: N802
        if self._closing:
            return
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line.strip():
            return
        if self._idle_timer_armed:
            self.resetTimeout()
        self._take_turn()
        self._pending += 1
        if self._pending >= self.factory.max_pending:
            self._pause("pending")
        reply = self.factory.dispatcher.answer(self.context, line)
        if isinstance(reply, bytes):
            self._replied(reply)
        else:
            reply.addCallback(self._replied)

    def lineLengthExceeded(self, line: bytes) -> None:  # noqa: N802
        if self._closing:
            return
        self._closing = True
        self.sendReply(
            self.factory.dispatcher.too_large(self.context, len(line), self.MAX_LENGTH)
        )
        self.log.info("{conn} closed: line over max_message_bytes", conn=self.context.label)
        self.transport.loseConnection()

    def _take_turn(self) -> None:
        """Yield to other connections once this one used up its turn.

        Nothing is scheduled while a turn is within budget: a client sending
        one request at a time costs no timer per request.
        """
        now = time.perf_counter()
        if self._turn_started is None:
            self._turn_started = now
        elif now - self._turn_started > self.factory.turn_budget and "turn" not in self._pause_reasons:
            self._pause("turn")
            self.callLater(0, self._end_turn)

    def _end_turn(self) -> None:
        self._turn_started = None
        self._unpause("turn")

    def _replied(self, data: bytes) -> None:
        self._pending -= 1
        if self._idle_timer_armed and self.context.principal is not None:
            self._idle_timer_armed = False
            self.setTimeout(None)
        if self._pending < self.factory.max_pending // 2 or self._pending == 0:
            self._unpause("pending")
        self.sendReply(data)

    # -- IClientConnection --------------------------------------------------

    def sendReply(self, data: bytes) -> None:  # noqa: N802
        if self.transport is not None and self.connected:
            self.transport.writeSequence((data, b"\n"))

    sendEvent = sendReply

    def close(self) -> None:
        """Read no further request, send what is queued, then disconnect."""
        self._closing = True
        self.transport.loseConnection()

    # -- flow control -----------------------------------------------------

    def _pause(self, reason: str) -> None:
        if not self._pause_reasons:
            LineReceiver.pauseProducing(self)
        self._pause_reasons.add(reason)

    def _unpause(self, reason: str) -> None:
        if reason in self._pause_reasons:
            self._pause_reasons.discard(reason)
            if not self._pause_reasons and self.connected and not self._closing:
                LineReceiver.resumeProducing(self)

    def pauseProducing(self) -> None:  # noqa: N802
        """The transport's write buffer is full: stop reading new requests."""
        self._pause("writing")

    def resumeProducing(self) -> None:  # noqa: N802
        """The client drained its replies: read requests again."""
        self._unpause("writing")

    def stopProducing(self) -> None:  # noqa: N802
        self._closing = True


class LineJSONFactory(Factory):
    """Builds L{LineJSONProtocol}s that share one dispatcher and one registry."""

    log = Logger()
    noisy = False

    def __init__(
        self,
        dispatcher,
        *,
        transport_name: str = "tcp",
        max_message_bytes: int = 8 * 1024 * 1024,
        max_pending: int = 64,
        unauthenticated_idle_timeout: float = 60.0,
        registry=None,
        turn_budget: float = 0.005,
        clock=None,
    ) -> None:
        self.dispatcher = dispatcher
        self.transport_name = transport_name
        self.max_message_bytes = max_message_bytes
        self.max_pending = max_pending
        self.unauthenticated_idle_timeout = unauthenticated_idle_timeout
        self.registry = registry
        self.turn_budget = turn_budget
        self.clock = clock

    def buildProtocol(self, addr) -> LineJSONProtocol:  # noqa: N802
        if self.registry is not None and not self.registry.admit():
            self.log.warn(
                "refusing {transport} connection from {addr}: max_connections reached",
                transport=self.transport_name,
                addr=getattr(addr, "host", addr),
            )
            return None
        return LineJSONProtocol(self)

    def auth_required(self) -> bool:
        """Whether connections must authenticate (and so get the idle timer)."""
        return self.dispatcher.auth.enabled

    def connection_opened(self, protocol: LineJSONProtocol) -> None:
        if self.registry is not None:
            self.registry.opened(protocol)

    def connection_closed(self, protocol: LineJSONProtocol) -> None:
        if self.registry is not None:
            self.registry.closed(protocol)
