"""Idle and dead TCP/TLS connections do not hold their slot forever.

- Every connection, with or without auth, is closed after ``idle_timeout``
  seconds (``--connection-idle-timeout``, default 600) without a request and
  with none in flight; before it authenticates (auth on) the shorter
  ``unauthenticated_idle_timeout`` applies.
- TCP keepalive is on for every accepted connection (TCP and TLS), so a peer
  that vanished without a FIN is noticed by the kernel.
"""

from __future__ import annotations

import os
import socket
import time

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.internet.testing import StringTransport

from stui_twisted.transports.connections import ConnectionRegistry
from stui_twisted.transports.linejson import (
    KEEPALIVE_IDLE,
    KEEPALIVE_INTERVAL,
    KEEPALIVE_PROBES,
    LineJSONFactory,
    _socket_of,
)
from stui_twisted.transports.tls import server_endpoint
from tests.helpers import NullImageService, make_dispatcher
from tests.serverproc import ServerProcess, make_self_signed


class FakeAuth:
    enabled = True

    def principal_for_token(self, token):
        return None


def connect(factory):
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_an_idle_connection_is_closed_after_idle_timeout_without_auth():
    clock = task.Clock()
    factory = LineJSONFactory(make_dispatcher(), idle_timeout=600, clock=clock)
    protocol, transport = connect(factory)
    clock.advance(599)
    protocol.dataReceived(b'{"command": "ping"}\n')  # a request restarts the timer
    clock.advance(599)
    assert not transport.disconnecting
    clock.advance(2)
    assert transport.disconnecting


def test_a_request_in_flight_is_not_idleness():
    clock = task.Clock()
    slow = defer.Deferred()

    class Service(NullImageService):
        async def handle(self, name, call):
            await slow
            return {}

    factory = LineJSONFactory(make_dispatcher(service=Service()), idle_timeout=10, clock=clock)
    protocol, transport = connect(factory)
    protocol.dataReceived(b'{"id": 1, "command": "get_session_statistics"}\n')
    clock.advance(100)  # an evaluation may run for minutes
    assert not transport.disconnecting
    slow.callback(None)
    assert b'"id":1' in transport.value().replace(b" ", b"")
    clock.advance(9)  # the reply restarted the timer
    assert not transport.disconnecting
    clock.advance(2)
    assert transport.disconnecting


def test_unauthenticated_timeout_first_then_the_idle_timeout():
    clock = task.Clock()
    factory = LineJSONFactory(
        make_dispatcher(auth=FakeAuth()),
        unauthenticated_idle_timeout=5,
        idle_timeout=50,
        clock=clock,
    )
    protocol, transport = connect(factory)
    assert protocol.timeOut == 5
    # as if authenticate succeeded: the reply sees a principal on the context
    protocol.context.principal = "alice"
    protocol.dataReceived(b'{"command": "ping"}\n')
    assert protocol.timeOut == 50
    clock.advance(49)
    assert not transport.disconnecting
    clock.advance(2)
    assert transport.disconnecting


# -- keepalive on real sockets ------------------------------------------------------------


async def _accepted(registry: ConnectionRegistry, timeout: float = 10.0):
    from twisted.internet import reactor

    deadline = time.monotonic() + timeout
    while not len(registry):
        assert time.monotonic() < deadline, "the connection was never accepted"
        await task.deferLater(reactor, 0.01, lambda: None)
    (protocol,) = list(registry)
    return protocol


def _assert_keepalive(sock: socket.socket) -> None:
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    if hasattr(socket, "TCP_KEEPIDLE"):
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == KEEPALIVE_INTERVAL
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == KEEPALIVE_PROBES


@pytest.mark.parametrize("kind", ["tcp", "tls"])
@pytest_twisted.ensureDeferred
async def test_accepted_connections_have_tcp_keepalive(tmp_path, kind):
    from twisted.internet import reactor

    registry = ConnectionRegistry(10)
    factory = LineJSONFactory(make_dispatcher(), transport_name=kind, registry=registry)
    if kind == "tls":
        key, cert = make_self_signed(tmp_path)
        description = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    else:
        description = "tcp:0:interface=127.0.0.1"
    port = await server_endpoint(reactor, description).listen(factory)
    client = socket.create_connection(("127.0.0.1", port.getHost().port), 10)
    try:
        protocol = await _accepted(registry)
        _assert_keepalive(_socket_of(protocol.transport))
    finally:
        client.close()
        await port.stopListening()
        for protocol in registry:
            protocol.transport.abortConnection()


def _tcp_timer(local_port: int, remote_port: int) -> str:
    """The timer column of /proc/net/tcp for one connection ('02' = keepalive)."""
    with open("/proc/net/tcp") as table:
        next(table)
        for row in table:
            fields = row.split()
            local, remote, timer = fields[1], fields[2], fields[5]
            if (
                int(local.split(":")[1], 16) == local_port
                and int(remote.split(":")[1], 16) == remote_port
            ):
                return timer.split(":")[0]
    raise AssertionError(f"no connection {local_port} -> {remote_port} in /proc/net/tcp")


@pytest.mark.e2e
def test_a_real_server_arms_keepalive_and_closes_idle_connections(tmp_path):
    if not os.path.exists("/proc/net/tcp"):
        pytest.skip("needs Linux /proc/net/tcp")
    with ServerProcess(tmp_path, "--connection-idle-timeout=1.5", zmq=False, image=False) as proc:
        idle = proc.tcp_client(timeout=10)
        busy = proc.tcp_client(timeout=10)
        busy.result("ping")
        assert _tcp_timer(proc.tcp_port, idle.sock.getsockname()[1]) == "02"
        started = time.monotonic()
        # the busy client sends a request every 0.3 s and stays; the idle one is closed
        while time.monotonic() - started < 3:
            busy.result("ping")
            time.sleep(0.3)
        idle.sock.settimeout(5)
        assert idle.sock.recv(1) == b""
        assert busy.result("ping")["message"] == "pong"
        assert "idle for 1.5 s (connection_idle_timeout)" in proc.log_text()
        idle.close()
        busy.close()
