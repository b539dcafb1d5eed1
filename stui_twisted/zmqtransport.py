"""ZeroMQ transport: a ROUTER socket (via txzmq) speaking one JSON object per frame.

This is the only module that knows txzmq.  Both REQ clients (frames
``[identity, b"", payload]``) and DEALER clients (``[identity, payload]`` or
``[identity, b"", payload]``) work: every request gets exactly one reply that
mirrors the envelope frames it came with.  Each peer identity is one
:class:`ZmqPeer` conversation with its own current session.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import zmq
from twisted.application import service
from twisted.logger import Logger
from txzmq import ZmqEndpoint, ZmqEndpointType, ZmqFactory
from txzmq.router_dealer import ZmqRouterConnection
from zope.interface import implementer

from stui_twisted.envelope import RequestError
from stui_twisted.interfaces import ConnectionContext, IClientConnection


@implementer(IClientConnection)
class ZmqPeer:
    """One ZeroMQ peer identity, seen as a client conversation."""

    def __init__(self, router: _StuiRouter, identity: bytes) -> None:
        self._router = router
        self.identity = identity
        self.context = ConnectionContext(transport="zmq", peer=identity.hex()[:32] or "-")
        self.last_seen = time.monotonic()
        self.envelope: list[bytes] = []

    def sendReply(self, data: bytes) -> None:  # noqa: N802
        self.sendFrames(self.envelope, data)

    def sendFrames(self, envelope: list[bytes], data: bytes) -> None:  # noqa: N802
        self._router.send_to(self.identity, envelope, data)

    sendEvent = sendReply

    def close(self) -> None:
        """ZeroMQ has no per-peer connection to close; forget the peer instead."""
        self._router.forget(self.identity)


class _StuiRouter(ZmqRouterConnection):
    log = Logger()

    def __init__(self, factory, endpoint, adapter: ZmqRouterService) -> None:
        self.adapter = adapter
        super().__init__(factory, endpoint)

    def gotMessage(self, sender_id: bytes, *frames: bytes) -> None:  # noqa: N802
        self.adapter.message_received(sender_id, list(frames))

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
    """

    log = Logger()
    max_peers = 10_000
    peer_idle_seconds = 24 * 3600.0

    def __init__(
        self, url: str, dispatcher, *, max_message_bytes: int, registry=None
    ) -> None:
        self.url = url
        self.dispatcher = dispatcher
        self.max_message_bytes = max_message_bytes
        self.registry = registry
        self._factory: ZmqFactory | None = None
        self._router: _StuiRouter | None = None
        self._peers: OrderedDict[bytes, ZmqPeer] = OrderedDict()

    @property
    def bound_endpoints(self) -> list[str]:
        """The addresses actually bound (resolves C{tcp://127.0.0.1:*})."""
        if self._router is None:
            return []
        return [self._router.socket.getsockopt_string(zmq.LAST_ENDPOINT)]

    def startService(self) -> None:  # noqa: N802
        self._factory = ZmqFactory()
        self._factory.registerForShutdown = False
        endpoint = ZmqEndpoint(ZmqEndpointType.bind, self.url)
        self._router = _StuiRouter(self._factory, endpoint, self)
        self._router.socket.setsockopt(zmq.MAXMSGSIZE, 2 * self.max_message_bytes)
        self._router.socket.setsockopt(zmq.LINGER, 1000)
        super().startService()
        self.log.info("zmq listening on {url}", url=", ".join(self.bound_endpoints))

    def stopService(self) -> None:  # noqa: N802
        super().stopService()
        for identity in list(self._peers):
            self.forget(identity)
        if self._factory is not None:
            self._factory.shutdown()
        self._factory = None
        self._router = None

    # -- peers ------------------------------------------------------------

    def peer(self, identity: bytes) -> ZmqPeer:
        """The conversation of C{identity}, created on first contact (bounded LRU)."""
        peer = self._peers.get(identity)
        if peer is None:
            peer = ZmqPeer(self._router, identity)
            self._peers[identity] = peer
            if self.registry is not None:
                self.registry.opened(peer)
            self.log.info("{conn} first request", conn=peer.context.label)
            self._prune()
        else:
            self._peers.move_to_end(identity)
        peer.last_seen = time.monotonic()
        return peer

    def forget(self, identity: bytes) -> None:
        peer = self._peers.pop(identity, None)
        if peer is not None and self.registry is not None:
            self.registry.closed(peer)

    def _prune(self) -> None:
        now = time.monotonic()
        while self._peers:
            identity, oldest = next(iter(self._peers.items()))
            if len(self._peers) > self.max_peers or now - oldest.last_seen > self.peer_idle_seconds:
                self.forget(identity)
            else:
                break

    # -- messages ---------------------------------------------------------

    def message_received(self, identity: bytes, frames: list[bytes]) -> None:
        peer = self.peer(identity)
        if not frames:
            return
        envelope, payload = frames[:-1], frames[-1]
        if any(frame for frame in envelope) or len(envelope) > 1:
            # Not [payload] or [b"", payload]: answer on the frames we got anyway.
            error = RequestError(
                f"expected one payload frame (optionally after an empty delimiter), got {len(frames)} frames"
            )
            peer.sendFrames(envelope, self.dispatcher.reject(peer.context, error))
            return
        if len(payload) > self.max_message_bytes:
            peer.sendFrames(
                envelope,
                self.dispatcher.too_large(peer.context, len(payload), self.max_message_bytes),
            )
            return
        reply = self.dispatcher.dispatch(peer.context, payload)
        reply.addCallback(lambda data: peer.sendFrames(envelope, data))
