"""Line-JSON transport: one JSON request per line over TCP or TLS.

:class:`LineJSONProtocol` frames bytes into lines and hands each line to the
shared :class:`~stui_twisted.dispatcher.Dispatcher`; replies are written as
they complete, so a slow evaluation never holds back later fast requests.

Flow control keeps memory bounded per connection: reading pauses while more
than ``max_pending`` requests are in flight, or while the transport's write
buffer is full because the client is not reading its replies.
"""

from __future__ import annotations

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

    # -- connection lifecycle ---------------------------------------------

    def connectionMade(self) -> None:  # noqa: N802
        peer = self.transport.getPeer()
        address = f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"
        self.context = ConnectionContext(transport=self.factory.transport_name, peer=address)
        self.factory.connection_opened(self)
        self.transport.registerProducer(self, True)
        if self.factory.auth_required():
            self.setTimeout(self.factory.unauthenticated_idle_timeout)
        self.log.info("{conn} connected", conn=self.context.label)

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

    def lineReceived(self, line: bytes) -> None:  # noqa: N802
        if self._closing:
            return
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line.strip():
            return
        self._pending += 1
        if self._pending >= self.factory.max_pending:
            self._pause("pending")
        reply = self.factory.dispatcher.dispatch(self.context, line)
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

    def _replied(self, data: bytes) -> None:
        self._pending -= 1
        if self.factory.auth_required() and self.context.principal is not None:
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
        self.transport.loseConnection()

    # -- flow control -----------------------------------------------------

    def _pause(self, reason: str) -> None:
        if not self._pause_reasons:
            LineReceiver.pauseProducing(self)
        self._pause_reasons.add(reason)

    def _unpause(self, reason: str) -> None:
        if reason in self._pause_reasons:
            self._pause_reasons.discard(reason)
            if not self._pause_reasons and self.connected:
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
    ) -> None:
        self.dispatcher = dispatcher
        self.transport_name = transport_name
        self.max_message_bytes = max_message_bytes
        self.max_pending = max_pending
        self.unauthenticated_idle_timeout = unauthenticated_idle_timeout
        self.registry = registry

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
        return self.dispatcher.auth.enabled

    def connection_opened(self, protocol: LineJSONProtocol) -> None:
        if self.registry is not None:
            self.registry.opened(protocol)

    def connection_closed(self, protocol: LineJSONProtocol) -> None:
        if self.registry is not None:
            self.registry.closed(protocol)
