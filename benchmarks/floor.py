"""The floors: the least any Twisted line-JSON server or txzmq ROUTER server can cost.

- TCP: a bare :class:`~twisted.protocols.basic.LineReceiver` that json-decodes
  each line and json-encodes a reply (``{"id", "status", "result"}``), nothing
  else: no dispatcher, no logging, no timestamps.
- ZeroMQ: a bare txzmq ROUTER that sends every message back as it came.
- The limit under both: ``python -m benchmarks.floor pyzmq`` is a bare pyzmq
  ROUTER echo, a blocking ``recv_multipart``/``send_multipart`` loop without a
  reactor (what no Twisted server can beat).

Run as ``python -m benchmarks.floor``; it listens on ephemeral loopback ports
and prints ``tcp <port>`` and ``zmq <url>`` on stdout, then serves until
SIGTERM (``pyzmq <url>`` alone for the pyzmq echo).
"""

from __future__ import annotations

import json
import sys

from twisted.internet import endpoints, reactor
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver


class JsonEcho(LineReceiver):
    """Decode each request line as JSON and answer with one encoded JSON line."""

    delimiter = b"\n"
    MAX_LENGTH = 8 * 1024 * 1024

    def lineReceived(self, line: bytes) -> None:  # noqa: N802
        request = json.loads(line)
        reply = {"id": request.get("id"), "status": "success", "result": {"message": "pong"}}
        self.transport.writeSequence((json.dumps(reply).encode(), b"\n"))


class JsonEchoFactory(Factory):
    """Builds L{JsonEcho} protocols."""

    protocol = JsonEcho
    noisy = False


def start_zmq_echo():
    """A txzmq ROUTER on an ephemeral loopback port that echoes every message."""
    import zmq
    from txzmq import ZmqEndpoint, ZmqEndpointType, ZmqFactory
    from txzmq.router_dealer import ZmqRouterConnection

    class Echo(ZmqRouterConnection):
        """Send every message back to its sender, envelope frames included."""

        def gotMessage(self, sender_id, *frames):  # noqa: N802
            self.send([sender_id, *frames])

    factory = ZmqFactory()
    router = Echo(factory, ZmqEndpoint(ZmqEndpointType.bind, "tcp://127.0.0.1:*"))
    return router, router.socket.getsockopt_string(zmq.LAST_ENDPOINT)


def serve_pyzmq_echo() -> None:
    """A bare pyzmq ROUTER on an ephemeral loopback port, echoing until killed."""
    import zmq

    socket = zmq.Context.instance().socket(zmq.ROUTER)
    socket.bind("tcp://127.0.0.1:*")
    print(f"pyzmq {socket.getsockopt_string(zmq.LAST_ENDPOINT)}", flush=True)
    while True:
        socket.send_multipart(socket.recv_multipart(copy=False), copy=False)


def main() -> None:
    """Listen, print the ports, serve until stopped."""
    if sys.argv[1:] == ["pyzmq"]:
        serve_pyzmq_echo()
        return

    def listening(port) -> None:
        print(f"tcp {port.getHost().port}", flush=True)

    endpoint = endpoints.TCP4ServerEndpoint(reactor, 0, backlog=4096, interface="127.0.0.1")
    endpoint.listen(JsonEchoFactory()).addCallback(listening)
    _router, url = start_zmq_echo()
    print(f"zmq {url}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
    sys.exit(0)
