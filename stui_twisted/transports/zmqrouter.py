"""ZeroMQ transport: a ROUTER socket (via txzmq) speaking one JSON object per frame.

This is the only module that knows txzmq.  Both REQ clients (frames
C{[identity, b"", payload]}) and DEALER clients (C{[identity, payload]} or
C{[identity, b"", payload]}) work: every request gets exactly one reply that
mirrors the envelope frames it came with.  Each peer identity is one
L{ZmqPeer} conversation with its own current session.

A routing identity is chosen by the peer, so it proves nothing: under
authentication every request carries its token (see the dispatcher), and the
"peer" that brute-force limits key on is the sender's IP address, read from
libzmq's C{Peer-Address} message property (ZeroMQ >= 4.1, tcp:// only).
Messages without one (ipc://, inproc://) all share one peer key,
L{UNKNOWN_PEER}, so together they get one failure budget.
"""

from __future__ import annotations

from collections import OrderedDict

import zmq
from twisted.application import service
from twisted.logger import Logger
from txzmq import ZmqEndpoint, ZmqEndpointType, ZmqFactory
from txzmq.router_dealer import ZmqRouterConnection
from zope.interface import implementer

from stui_twisted.dispatch.interfaces import ConnectionContext, IClientConnection
from stui_twisted.protocol.envelope import RequestError

UNKNOWN_PEER = "zmq:no-peer-address"


def peer_address(frame: zmq.Frame) -> str:
    """The sender's IP address of a received frame, or L{UNKNOWN_PEER}."""
    try:
        address = frame.get("Peer-Address")
    except (zmq.ZMQError, AttributeError, TypeError):
        return UNKNOWN_PEER
    if isinstance(address, bytes):
        address = address.decode("ascii", "replace")
    return address or UNKNOWN_PEER


@implementer(IClientConnection)
class ZmqPeer:
    """One ZeroMQ peer identity, seen as a client conversation."""

    def __init__(self, router: _StuiRouter, identity: bytes) -> None:
        self._router = router
        self.identity = identity
        self.context = ConnectionContext(transport="zmq", peer=UNKNOWN_PEER)
        self.context.connection = self
        self.last_seen = 0.0
        self.in_flight = 0  # requests received and not yet answered
        self.envelope: list[bytes] = []

    @property
    def anonymous(self) -> bool:
        """Whether forgetting this peer loses nothing: no current session, no principal."""
        return self.context.current_session_id is None and self.context.principal is None

    def sendReply(self, data: bytes) -> None:  # noqa: N802
        self.sendFrames(self.envelope, data)

    def sendFrames(self, envelope: list[bytes], data: bytes) -> None:  # noqa: N802
        self._router.send_to(self.identity, envelope, data)

    def sendEvent(self, data: bytes) -> None:  # noqa: N802
        # A DEALER peer: its requests came without envelope frames (accepts_events).
        self._router.send_to(self.identity, [], data)

    def accepts_events(self) -> bool:
        """Only a DEALER takes unsolicited messages; a REQ (empty delimiter) does not.

        A REQ socket would take a pushed event for the reply it waits for, so a
        peer whose last request came with the empty delimiter frame is sent none.
        """
        return not self.envelope

    def close(self) -> None:
        """ZeroMQ has no per-peer connection to close; forget the peer instead."""
        self._router.forget(self.identity)


# Plain ints: pyzmq's flag enums cost a Python-level enum operation per use,
# and the read loop below runs them on every message.
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_SNDMORE = int(zmq.NOBLOCK | zmq.SNDMORE)
# The backend's send: pyzmq's Socket.send only adds DRAFT-socket options we do not use.
_send_frame = zmq.backend.Socket.send


class _StuiRouter(ZmqRouterConnection):
    log = Logger()

    def __init__(self, factory, endpoint, adapter: ZmqRouterService) -> None:
        self.adapter = adapter
        self._peer_address = UNKNOWN_PEER
        self._reading = False
        super().__init__(factory, endpoint)

    def doRead(self) -> None:  # noqa: N802 - overrides txzmq's reader
        """Read and answer every message waiting on the socket.

        txzmq's loop, minus per-message overhead: integer socket options
        instead of enum arithmetic, and no log-context wrapper per message (a
        failure is logged here instead).  Replies sent while this loop runs
        need no extra scheduled read (see L{send}): the loop checks C{EVENTS}
        again after every message, which is what ZeroMQ's edge-triggered
        descriptor requires after a send.
        """
        if self.read_scheduled is not None:
            if not self.read_scheduled.called:
                self.read_scheduled.cancel()
            self.read_scheduled = None
        socket = self.socket
        self._reading = True
        try:
            while self.factory is not None and socket.get(_EVENTS) & _POLLIN:
                try:
                    message = self._readMultipart()
                except zmq.Again:
                    continue
                try:
                    self.messageReceived(message)
                except Exception:
                    self.log.failure("zmq message not handled")
        finally:
            self._reading = False

    def _readMultipart(self):  # noqa: N802 - overrides txzmq's reader
        """Read one multipart message, noting the sender's address (Peer-Address).

        Same contract as txzmq's method (a list of frame bytes, or
        C{zmq.ZMQError} EAGAIN); it receives without copying so the frame's
        metadata can be read.  C{doRead} hands the result to
        C{messageReceived} right away, so the noted address belongs to it.
        """
        socket = self.socket
        while True:
            frame = socket.recv(_NOBLOCK, copy=False)
            self.recv_parts.append(frame.bytes)
            if not frame.more:
                self._peer_address = peer_address(frame)
                result, self.recv_parts = self.recv_parts, []
                return result

    def send(self, message: list[bytes]) -> None:
        """Send one multipart message (txzmq's contract, integer flags).

        A send outside L{doRead} (a reply that waited for the image) schedules
        one read, as txzmq does: ZeroMQ may not signal the descriptor again
        for messages that arrived while we were sending.
        """
        socket = self.socket
        for part in message[:-1]:
            _send_frame(socket, part, _NOBLOCK_SNDMORE)
        _send_frame(socket, message[-1], _NOBLOCK)
        if not self._reading and self.read_scheduled is None and self.factory is not None:
            self.read_scheduled = self.factory.reactor.callLater(0, self.doRead)

    def messageReceived(self, message: list[bytes]) -> None:  # noqa: N802
        """[identity, *frames] from the ROUTER: hand them to the adapter."""
        self.adapter.message_received(message[0], message[1:], self._peer_address)

    def send_to(self, identity: bytes, envelope: list[bytes], data: bytes) -> None:
        try:
            self.send([identity, *envelope, data])
        except zmq.ZMQError as exc:
            self.log.warn(
                "zmq reply to {peer} dropped: {error}", peer=identity.hex()[:32], error=exc
            )

    def forget(self, identity: bytes) -> None:
        self.adapter.forget(identity)


class ZmqRouterService(service.Service):
    """Binds the ROUTER socket in C{startService} and closes it in C{stopService}.

    The ZeroMQ context and socket are made in C{startService}, never earlier,
    because C{twistd} forks after building the service tree.

    Peers are kept in two least-recently-used tables.  Identities are free to
    make, so I{anonymous} peers (no current session, no principal) are capped
    at L{max_anonymous_peers} and the least recently used idle one is
    forgotten beyond it: forgetting one loses nothing.  A peer with a current
    session is forgotten only after L{peer_idle_seconds} without a request,
    never to make room; at most L{max_attached_peers} of them are kept, and
    while that table is full of peers younger than that, a further peer does
    not keep the session it creates or restores as its current one (logged).
    A peer with a request in flight is never forgotten.

    @param clock: an C{IReactorTime} for idle times; default the reactor.
    """

    log = Logger()
    max_anonymous_peers = 10_000
    max_attached_peers = 100_000
    peer_idle_seconds = 24 * 3600.0
    table_full_warning_interval = 60.0

    def __init__(
        self, url: str, dispatcher, *, max_message_bytes: int, registry=None, clock=None
    ) -> None:
        self.url = url
        self.dispatcher = dispatcher
        self.max_message_bytes = max_message_bytes
        self.registry = registry
        self._clock = clock
        self._factory: ZmqFactory | None = None
        self._router: _StuiRouter | None = None
        self._anonymous: OrderedDict[bytes, ZmqPeer] = OrderedDict()
        self._attached: OrderedDict[bytes, ZmqPeer] = OrderedDict()
        self._next_full_warning = 0.0

    @property
    def bound_endpoints(self) -> list[str]:
        """The addresses actually bound (resolves C{tcp://127.0.0.1:*})."""
        if self._router is None:
            return []
        return [self._router.socket.getsockopt_string(zmq.LAST_ENDPOINT)]

    def privilegedStartService(self) -> None:  # noqa: N802
        """Bind now, like the stream listeners (see L{stui_twisted.tap.ServerRoot}).

        twistd calls this after it forked, so the context is still made after
        the fork; a port in use fails start-up before any thread exists.
        """
        super().privilegedStartService()
        self._factory = ZmqFactory()
        self._factory.registerForShutdown = False
        # The socket is made without an endpoint and bound only after its
        # options are set: libzmq copies a socket's options into a listener
        # when it binds, so ZMQ_MAXMSGSIZE set after the bind would not apply
        # to the peers it accepts (they could send frames of any size).
        self._router = _StuiRouter(self._factory, None, self)
        self._router.socket.setsockopt(zmq.MAXMSGSIZE, 2 * self.max_message_bytes)
        self._router.socket.setsockopt(zmq.LINGER, 1000)
        try:
            self._router.addEndpoints([ZmqEndpoint(ZmqEndpointType.bind, self.url)])
        except BaseException:
            # The socket is already registered with the reactor: take it back.
            self._factory.shutdown()
            self._factory = None
            self._router = None
            raise

    def startService(self) -> None:  # noqa: N802
        if self._router is None:  # not started through privilegedStartService
            self.privilegedStartService()
        super().startService()
        self.log.info("zmq listening on {url}", url=", ".join(self.bound_endpoints))

    def stopService(self) -> None:  # noqa: N802
        super().stopService()
        for identity in [*self._anonymous, *self._attached]:
            self.forget(identity)
        if self._factory is not None:
            self._factory.shutdown()
        self._factory = None
        self._router = None

    # -- peers ------------------------------------------------------------

    def _now(self) -> float:
        clock = self._clock
        if clock is None:
            # lazily (importing it installs it), and once: this runs for every message
            from twisted.internet import reactor as clock

            self._clock = clock
        return clock.seconds()

    @property
    def peer_count(self) -> int:
        """How many peer identities are remembered (both tables)."""
        return len(self._anonymous) + len(self._attached)

    def peer(self, identity: bytes) -> ZmqPeer:
        """The conversation of C{identity}, created on first contact; marks it used."""
        now = self._now()
        peer = self._attached.get(identity)
        if peer is not None:
            self._attached.move_to_end(identity)
        else:
            peer = self._anonymous.get(identity)
            if peer is not None:
                self._anonymous.move_to_end(identity)
            else:
                peer = ZmqPeer(self._router, identity)
                peer.last_seen = now
                self._anonymous[identity] = peer
                if self.registry is not None:
                    # Peers are listed (statistics) but not counted against
                    # --max-connections: identities are free to make.
                    self.registry.opened(peer, limited=False)
                self.log.info(
                    "{conn} first request from identity {identity}",
                    conn=peer.context.label,
                    identity=identity.hex()[:32] or "-",
                )
                self._prune(now)
        peer.last_seen = now
        return peer

    def forget(self, identity: bytes) -> None:
        peer = self._anonymous.pop(identity, None) or self._attached.pop(identity, None)
        if peer is not None and peer.context.outbox is not None:
            peer.context.outbox.close()  # its subscriptions end with it
        if peer is not None and self.registry is not None:
            self.registry.closed(peer)

    def _answered(self, peer: ZmqPeer) -> None:
        """A request of C{peer} was answered: file it by what it holds now."""
        peer.in_flight -= 1
        identity = peer.identity
        if peer.anonymous:
            if self._attached.get(identity) is peer:
                # Its session was closed: it may be forgotten like any anonymous peer.
                del self._attached[identity]
                self._anonymous[identity] = peer
                self._prune(self._now())
            return
        if self._anonymous.get(identity) is not peer:
            return  # already attached, or forgotten (shutdown)
        if len(self._attached) >= self.max_attached_peers:
            self._prune(self._now())
        if len(self._attached) >= self.max_attached_peers:
            self._table_full(peer)
            return
        del self._anonymous[identity]
        self._attached[identity] = peer

    def _table_full(self, peer: ZmqPeer) -> None:
        """No room for another peer with a current session: C{peer} keeps none."""
        peer.context.current_session_id = None
        now = self._now()
        if now >= self._next_full_warning:
            self._next_full_warning = now + self.table_full_warning_interval
            self.log.warn(
                "zmq: {count} peers already have a current session (max_attached_peers); "
                "{conn} keeps no current session and must pass session_id",
                count=len(self._attached),
                conn=peer.context.label,
            )

    def _prune(self, now: float) -> None:
        """Forget peers idle past L{peer_idle_seconds}, and anonymous ones over the cap."""
        horizon = now - self.peer_idle_seconds
        for table in (self._attached, self._anonymous):
            while table:
                identity, oldest = next(iter(table.items()))
                if oldest.last_seen >= horizon or oldest.in_flight:
                    break
                self.forget(identity)
        table = self._anonymous
        skipped = 0
        while len(table) > self.max_anonymous_peers and skipped < len(table):
            identity, oldest = next(iter(table.items()))
            if oldest.in_flight:
                # Not idle: its reply is still to come.  Keep it (as recently used).
                table.move_to_end(identity)
                skipped += 1
            else:
                self.forget(identity)

    # -- messages ---------------------------------------------------------

    def message_received(
        self, identity: bytes, frames: list[bytes], address: str = UNKNOWN_PEER
    ) -> None:
        """Answer one message from C{identity}: exactly one reply, always.

        @param address: the sender's IP address (L{peer_address}); it becomes the
            peer's C{context.peer} for this request (rate limits, logs).
        """
        peer = self.peer(identity)
        peer.context.peer = address
        if not frames:
            return
        peer.in_flight += 1  # until answered: a peer waiting for a reply is not idle
        peer.envelope = frames[:-1]  # REQ or DEALER: decides whether events are pushed
        try:
            envelope, reply = self._reply_to(peer, frames)
        except BaseException:
            self._answered(peer)
            raise
        if isinstance(reply, bytes):
            try:
                peer.sendFrames(envelope, reply)
            finally:
                self._answered(peer)
        else:
            reply.addCallback(lambda data: peer.sendFrames(envelope, data))
            reply.addBoth(lambda result: (self._answered(peer), result)[1])

    def _reply_to(self, peer: ZmqPeer, frames: list[bytes]):
        """(envelope, the reply: bytes or a Deferred of bytes) for one message."""
        envelope, payload = frames[:-1], frames[-1]
        if len(envelope) > 1 or (envelope and envelope[0]):
            # Not [payload] or [b"", payload]: answer on the frames we got anyway.
            error = RequestError(
                f"expected one payload frame (optionally after an empty delimiter), got {len(frames)} frames"
            )
            return envelope, self.dispatcher.reject(peer.context, error)
        if len(payload) > self.max_message_bytes:
            size, limit = len(payload), self.max_message_bytes
            return envelope, self.dispatcher.too_large(peer.context, size, limit)
        return envelope, self.dispatcher.answer(peer.context, payload)
