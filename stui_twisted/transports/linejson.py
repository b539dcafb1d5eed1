"""Line-JSON transport: one JSON request per line over TCP or TLS.

L{LineJSONProtocol} frames bytes into lines and hands each line to the
shared L{stui_twisted.dispatch.dispatcher.Dispatcher}; replies are written as
they complete, so a slow evaluation never holds back later fast requests.

Framing scans each received byte once: the unfinished line is kept as a list
of the chunks read so far (none holds a newline), and only newly read bytes
are searched for the delimiter.  A client trickling a long line in small
pieces therefore costs CPU in proportion to what it sends, not to the square
of it (Twisted's C{LineReceiver} re-scans its whole buffer on every read).

Memory is bounded per connection and server-wide:

- reading pauses while more than C{max_pending} requests are in flight, or
  while the transport's write buffer is full because the client is not
  reading its replies;
- a line over C{max_message_bytes} gets C{MessageTooLarge} and a close;
- the unfinished input of all connections together is bounded by one shared
  L{InputBudget} (C{max_partial_input_bytes}): past it, the connection
  holding the most gets C{MessageTooLarge} and is closed.

Fairness keeps one client from starving the others: a connection that has
spent C{turn_budget} seconds of reactor time on its lines in one go stops
reading until the next reactor iteration, so other connections' requests run
between its batches.

End of input (the client half-closed: TCP FIN, or a TLS close_notify) is not
the end of the conversation: the server still answers every line it has
read, including requests that are still running, and closes the connection
once the last reply is written (L{LineJSONProtocol.readConnectionLost}).
An unfinished last line (no newline before end of input) is handled as a line.

Connections that say nothing are closed: without a request for
C{idle_timeout} seconds (and none in flight) a connection is closed; while it
has not authenticated (auth on), the shorter C{unauthenticated_idle_timeout}
applies.  TCP keepalive is on for every accepted connection, so the kernel
notices a peer that vanished without a FIN.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import socket
import time
from collections import deque

from twisted.internet import interfaces
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from stui_twisted.dispatch.interfaces import ConnectionContext, IClientConnection
from stui_twisted.protocol.errors import StuiError

MiB = 1024 * 1024

# TCP keepalive on accepted connections: first probe after this many idle
# seconds, then one every KEEPALIVE_INTERVAL, and the peer is given up after
# KEEPALIVE_PROBES unanswered probes (about two minutes for a vanished peer).
KEEPALIVE_IDLE = 60
KEEPALIVE_INTERVAL = 15
KEEPALIVE_PROBES = 4


def _load_malloc_trim():
    """glibc's C{malloc_trim}, or None (another C library)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_malloc_trim = _load_malloc_trim()


class InputBudget:
    """The server-wide budget of buffered, unfinished request input.

    Every line-JSON connection (TCP and TLS share one budget) reports how many
    bytes of input it holds that are not yet handed to the dispatcher: its
    unfinished line plus anything read while it was paused.  When the total
    goes over C{limit}, the connection holding the most is told
    (L{LineJSONProtocol.over_budget}) and its share is dropped at once, until
    the total fits again.

    Unfinished lines arrive as many 64 KiB reads, which glibc serves from its
    heap and keeps after they are freed.  So once C{TRIM_AFTER} bytes of
    unfinished input have been let go (lines finished, connections closed or
    refused), or C{TRIM_QUIET} bytes when hardly any input is left held,
    C{malloc_trim} hands the free memory back to the system: the server's
    size goes back down after an attack instead of staying at its peak.  Its
    cost is in proportion to what was freed (about 10 ms for 256 MiB), so an
    attacker pays for it by sending that much.
    """

    TRIM_AFTER = 16 * MiB
    TRIM_QUIET = MiB

    def __init__(self, limit: int, trim=_malloc_trim) -> None:
        self.limit = limit
        self.total = 0
        self._held: dict = {}
        self._freed = 0
        self._trim = trim

    def update(self, connection, size: int) -> None:
        """C{connection} now holds C{size} bytes of unfinished input."""
        before = self._held.pop(connection, 0)
        self.total += size - before
        self._freed += max(0, before - size)
        if size:
            self._held[connection] = size
        while self.total > self.limit and self._held:
            victim = max(self._held, key=self._held.__getitem__)
            held = self._held.pop(victim)
            self.total -= held
            self._freed += held
            victim.over_budget(held, self.limit)
        if self._freed >= self.TRIM_AFTER or (
            self._freed >= self.TRIM_QUIET and self.total < self.TRIM_QUIET
        ):
            self._freed = 0
            if self._trim is not None:
                self._trim(0)

    def held_by(self, connection) -> int:
        return self._held.get(connection, 0)


def _socket_of(transport) -> socket.socket | None:
    """The socket under C{transport} (TLS wraps the TCP transport)."""
    for _ in range(4):
        if transport is None:
            return None
        handle = getattr(transport, "getHandle", None)
        if handle is not None:
            sock = handle()
            if isinstance(sock, socket.socket):
                return sock
        transport = getattr(transport, "transport", None)
    return None


def enable_keepalive(transport) -> bool:
    """Turn TCP keepalive on for the connection of C{transport}; whether it could."""
    sock = _socket_of(transport)
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
        ("TCP_KEEPCNT", KEEPALIVE_PROBES),
    ):
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
    return True


@implementer(IClientConnection, interfaces.IPushProducer, interfaces.IHalfCloseableProtocol)
class LineJSONProtocol(Protocol, TimeoutMixin):
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
        self._authenticating = False
        # framing: the unfinished line (chunks without a delimiter) and the
        # data read but not framed yet (reading is paused): (bytes, offset)
        self._partial: list[bytes] = []
        self._partial_size = 0
        self._unread: deque[tuple[bytes, int]] = deque()
        self._unread_size = 0
        self._accounted = 0
        self._framing = False
        self._input_ended = False
        self._producing = False
        self.bytes_scanned = 0  # bytes searched for the delimiter (stays linear)
        self.callLater = factory.clock.callLater if factory.clock is not None else self.callLater

    # -- connection lifecycle ---------------------------------------------

    def connectionMade(self) -> None:  # noqa: N802
        peer = self.transport.getPeer()
        # The host alone (no port) is the peer: it is what brute-force limits key on.
        host = str(getattr(peer, "host", peer))
        self.context = ConnectionContext(transport=self.factory.transport_name, peer=host)
        self.context.connection = self
        self.factory.connection_opened(self)
        self.transport.registerProducer(self, True)
        self._producing = True
        enable_keepalive(self.transport)
        if self.factory.auth_required():
            self._authenticating = True
            self.setTimeout(self.factory.unauthenticated_idle_timeout)
        else:
            self.setTimeout(self.factory.idle_timeout)
        self.log.info(
            "{conn} connected from port {port}",
            conn=self.context.label,
            port=getattr(peer, "port", "?"),
        )

    def connectionLost(self, reason) -> None:  # noqa: N802
        self.setTimeout(None)
        self._release_input()
        self.factory.connection_closed(self)
        if self.context is not None and self.context.outbox is not None:
            self.context.outbox.close()  # its subscriptions end with it
        self.log.info(
            "{conn} disconnected ({why})",
            conn=self.context.label if self.context else "?",
            why=reason.getErrorMessage(),
        )

    @property
    def input_ended(self) -> bool:
        """Whether the client will send nothing more (it half-closed, or is gone)."""
        return self._input_ended or self._closing

    def readConnectionLost(self) -> None:  # noqa: N802
        """The client will send nothing more: answer what it sent, then close."""
        if self._input_ended:
            return
        self._input_ended = True
        self.log.debug("{conn} end of input", conn=self.context.label)
        self._frame()

    def writeConnectionLost(self) -> None:  # noqa: N802
        """Our write side is shut: nothing more can be answered."""
        self._disconnect()

    def timeoutConnection(self) -> None:  # noqa: N802
        if self._pending:
            # A request in flight is activity: wait for its reply.  (The fired
            # timer is gone, so this starts a new one; resetTimeout would not.)
            self.setTimeout(self.timeOut)
            return
        if self._authenticating:
            self.log.info("{conn} closed: not authenticated in time", conn=self.context.label)
        else:
            self.log.info(
                "{conn} closed: idle for {seconds} s (connection_idle_timeout)",
                conn=self.context.label,
                seconds=self.factory.idle_timeout,
            )
        self._disconnect()

    def _disconnect(self) -> None:
        """Stop reading, write what is queued, then close (TCP and TLS alike)."""
        self._closing = True
        self._release_input()
        if self.transport is None:
            return
        # TLS does not send close_notify (and so never closes) while a
        # producer is registered: unregister first.
        if self._producing:
            self._producing = False
            self.transport.unregisterProducer()
        self.transport.loseConnection()

    # -- framing ----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        # Each call is one turn: a read from the socket.
        self._turn_started = None
        if self._closing or not data:
            return
        if (
            data[-1] == 10  # b"\n"
            and not (self._unread or self._partial or self._framing or self._pause_reasons)
            and data.find(b"\n") == len(data) - 1
        ):
            self._one_line(data)
            return
        self._unread.append((data, 0))
        self._unread_size += len(data)
        self._frame()

    def _one_line(self, data: bytes) -> None:
        """A read that is exactly one whole line, nothing held before it (the usual case).

        What L{_frame} does for it, without queueing the read first: nothing
        is held, so the input budget has nothing to hear.
        """
        self.bytes_scanned += len(data)
        if len(data) - 1 > self.MAX_LENGTH:
            self._too_long(len(data) - 1)
        else:
            self._framing = True
            try:
                self.lineReceived(data[:-1])
            finally:
                self._framing = False
        if self._unread or self._partial or self._accounted:
            # Input that arrived while the line was answered (re-entrant
            # dataReceived) waits for the loop the general path runs.
            self._frame()
            return
        self._maybe_finish()

    def _frame(self) -> None:
        """Hand every complete line to the dispatcher while not paused."""
        if self._framing:
            return  # a reply that came back at once; the outer loop goes on
        self._framing = True
        try:
            while not self._closing and not self._pause_reasons:
                if self._unread:
                    self._frame_next()
                elif self._input_ended and self._partial:
                    line = self._take_partial(b"")
                    if len(line) > self.MAX_LENGTH:
                        self._too_long(len(line))
                    else:
                        self.lineReceived(line)
                else:
                    break
        finally:
            self._framing = False
        self._account()
        self._maybe_finish()

    def _frame_next(self) -> None:
        """Frame one line (or store the rest of a chunk as the unfinished line)."""
        data, start = self._unread[0]
        end = data.find(b"\n", start)
        if end < 0:
            self.bytes_scanned += len(data) - start
            self._unread.popleft()
            self._unread_size -= len(data) - start
            piece = data[start:] if start else data
            self._partial.append(piece)
            self._partial_size += len(piece)
            if self._partial_size > self.MAX_LENGTH:
                self._too_long(self._partial_size)
            return
        self.bytes_scanned += end + 1 - start
        self._unread_size -= end + 1 - start
        if end + 1 < len(data):
            self._unread[0] = (data, end + 1)
        else:
            self._unread.popleft()
        line = self._take_partial(data[start:end])
        if len(line) > self.MAX_LENGTH:
            self._too_long(len(line))
            return
        self.lineReceived(line)

    def _take_partial(self, tail: bytes) -> bytes:
        if not self._partial:
            return tail
        self._partial.append(tail)
        line = b"".join(self._partial)
        self._partial = []
        self._partial_size = 0
        return line

    def _account(self) -> None:
        """Tell the server-wide budget how much unfinished input we hold."""
        size = self._partial_size + self._unread_size
        if size != self._accounted:
            self._accounted = size
            self.factory.input_budget.update(self, size)

    def _release_input(self) -> None:
        self._partial = []
        self._partial_size = 0
        self._unread.clear()
        self._unread_size = 0
        if self._accounted:
            self._accounted = 0
            self.factory.input_budget.update(self, 0)

    def _maybe_finish(self) -> None:
        """After end of input: close once every line is answered."""
        if (
            self._input_ended
            and not self._closing
            and not self._framing
            and self._pending == 0
            and not self._unread
            and not self._partial
        ):
            self.log.debug("{conn} answered everything after end of input", conn=self.context.label)
            self._disconnect()

    def lineReceived(self, line: bytes) -> None:  # noqa: N802
        if self._closing:
            return
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line or line.isspace():  # the same ASCII whitespace bytes.strip removes
            return
        self.resetTimeout()
        self._take_turn()
        self._pending += 1
        if self._pending >= self.factory.max_pending:
            self._pause("pending")
        reply = self.factory.dispatcher.answer(self.context, line)
        if isinstance(reply, bytes):
            self._replied(reply, timer_reset=True)
        else:
            reply.addCallback(self._replied)

    def _too_long(self, size: int) -> None:
        if self._closing:
            return
        self._closing = True
        self.sendReply(self.factory.dispatcher.too_large(self.context, size, self.MAX_LENGTH))
        self.log.info("{conn} closed: line over max_message_bytes", conn=self.context.label)
        self._disconnect()

    def over_budget(self, size: int, limit: int) -> None:
        """The server-wide input budget is spent and we hold the most: close."""
        self._accounted = 0  # the budget already dropped our share
        self._release_input()
        if self._closing:
            return
        error = StuiError(
            "MessageTooLarge",
            f"the server's buffer for unfinished request lines is full "
            f"(max_partial_input_bytes={limit}) and this connection held the most of it "
            f"({size} bytes without a newline); closing it",
            size=size,
            max_partial_input_bytes=limit,
            scope="server",
        )
        self.sendReply(self.factory.dispatcher.reject(self.context, error))
        self.log.warn(
            "{conn} closed: {size} bytes of unfinished input, the most while "
            "max_partial_input_bytes ({limit}) was exceeded",
            conn=self.context.label,
            size=size,
            limit=limit,
        )
        self._disconnect()

    def _take_turn(self) -> None:
        """Yield to other connections once this one used up its turn.

        Nothing is scheduled while a turn is within budget: a client sending
        one request at a time costs no timer per request.
        """
        now = time.perf_counter()
        if self._turn_started is None:
            self._turn_started = now
        elif (
            now - self._turn_started > self.factory.turn_budget
            and "turn" not in self._pause_reasons
        ):
            self._pause("turn")
            self.callLater(0, self._end_turn)

    def _end_turn(self) -> None:
        self._turn_started = None
        self._unpause("turn")

    def _replied(self, data: bytes, timer_reset: bool = False) -> None:
        """A reply is ready: send it.

        @param timer_reset: the idle timer was reset in this same call (a reply
            given at once), so it is not reset again.
        """
        self._pending -= 1
        if self._authenticating and self.context.principal is not None:
            self._authenticating = False
            self.setTimeout(self.factory.idle_timeout)
        elif not timer_reset:
            self.resetTimeout()
        if self._pending < self.factory.max_pending // 2 or self._pending == 0:
            self._unpause("pending")
        self.sendReply(data)
        self._maybe_finish()

    # -- IClientConnection --------------------------------------------------

    def sendReply(self, data: bytes) -> None:  # noqa: N802
        if self.transport is not None and self.connected:
            self.transport.writeSequence((data, b"\n"))

    sendEvent = sendReply

    def events_writable(self) -> bool:
        """Whether an event may be written now (the transport's buffer is not full)."""
        return self.connected and not self._closing and "writing" not in self._pause_reasons

    def close(self) -> None:
        """Read no further request, send what is queued, then disconnect."""
        self._disconnect()

    # -- flow control -----------------------------------------------------

    def _pause(self, reason: str) -> None:
        if not self._pause_reasons and not self._input_ended and self.connected:
            self.transport.pauseProducing()
        self._pause_reasons.add(reason)

    def _unpause(self, reason: str) -> None:
        if reason in self._pause_reasons:
            self._pause_reasons.discard(reason)
            if not self._pause_reasons and self.connected and not self._closing:
                if not self._input_ended:
                    # After end of input the socket has nothing more to read;
                    # resuming it would only report the end again.
                    self.transport.resumeProducing()
                self._turn_started = None
                self._frame()  # the lines read while paused

    def pauseProducing(self) -> None:  # noqa: N802
        """The transport's write buffer is full: stop reading new requests."""
        self._pause("writing")

    def resumeProducing(self) -> None:  # noqa: N802
        """The client drained its replies: read requests again."""
        self._unpause("writing")
        if self.context is not None and self.context.outbox is not None:
            self.context.outbox.drain()  # the events that waited for room

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
        idle_timeout: float = 600.0,
        input_budget: InputBudget | None = None,
        registry=None,
        turn_budget: float = 0.005,
        clock=None,
    ) -> None:
        self.dispatcher = dispatcher
        self.transport_name = transport_name
        self.max_message_bytes = max_message_bytes
        self.max_pending = max_pending
        self.unauthenticated_idle_timeout = unauthenticated_idle_timeout
        self.idle_timeout = idle_timeout
        # shared by the TCP and TLS factories of one server (see tap.build_server)
        self.input_budget = input_budget if input_budget is not None else InputBudget(256 * MiB)
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
