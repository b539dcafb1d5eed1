"""How authentication, TLS options and connection limits are wired into the server."""

from __future__ import annotations

import json

import pytest
from twisted.internet import task
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from stui_twisted.dispatch.interfaces import ConnectionContext
from stui_twisted.settings import Settings
from stui_twisted.transports.connections import ConnectionRegistry
from stui_twisted.transports.linejson import LineJSONFactory
from stui_twisted.transports.tls import TLSConfigError, server_endpoint
from tests.helpers import NullImageService, dispatch, make_dispatcher, write_users


class FakeAuth:
    """Auth on, with two fixed tokens."""

    enabled = True
    tokens = {"tok-alice": "alice", "tok-bob": "bob"}

    def check_token(self, token):
        return self.tokens.get(token)


class EchoService(NullImageService):
    """Handlers that report who they act as."""

    async def handle(self, name, call):
        return {"acting": call.client_id, "params_client_id": call.params.get("client_id")}


@pytest.fixture
def guarded():
    return make_dispatcher(service=EchoService(), auth=FakeAuth())


def test_token_acts_for_that_request_only(guarded):
    ctx = ConnectionContext("tcp", "127.0.0.1")
    reply = dispatch(guarded, {"command": "get_session_info", "token": "tok-bob"}, ctx)
    assert reply["result"]["acting"] == "bob"
    assert ctx.principal is None  # the connection is not authenticated by it
    assert dispatch(guarded, {"command": "get_session_info"}, ctx)["error_type"] == (
        "AuthenticationRequired"
    )


def test_token_wins_over_the_connection_principal(guarded):
    ctx = ConnectionContext("tcp", "127.0.0.1", principal="alice")
    assert dispatch(guarded, {"command": "get_session_info"}, ctx)["result"]["acting"] == "alice"
    reply = dispatch(guarded, {"command": "get_session_info", "token": "tok-bob"}, ctx)
    assert reply["result"]["acting"] == "bob"
    bad = dispatch(guarded, {"command": "get_session_info", "token": "nope"}, ctx)
    assert bad["error_type"] == "AuthenticationRequired"


def test_zmq_ignores_the_context_principal(guarded):
    ctx = ConnectionContext("zmq", "127.0.0.1", principal="alice")
    assert dispatch(guarded, {"command": "get_session_info"}, ctx)["error_type"] == (
        "AuthenticationRequired"
    )
    reply = dispatch(guarded, {"command": "get_session_info", "token": "tok-alice"}, ctx)
    assert reply["result"]["acting"] == "alice"


def test_client_id_defaults_to_the_principal_and_must_match_it(guarded):
    ctx = ConnectionContext("tcp", "127.0.0.1", principal="alice")
    created = dispatch(guarded, {"command": "create_session"}, ctx)
    assert created["result"]["params_client_id"] == "alice"
    listed = dispatch(guarded, {"command": "list_client_sessions", "client_id": "bob"}, ctx)
    assert listed["error_type"] == "PermissionDenied"
    aliased = dispatch(guarded, {"command": "create_session", "client_id": "bob"}, ctx)
    assert aliased["error_type"] == "PermissionDenied"


def test_max_connections_refuses_tcp_but_not_zmq_peers():
    registry = ConnectionRegistry(2)
    factory = LineJSONFactory(make_dispatcher(), registry=registry)
    protocols = []
    for _ in range(2):
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        protocols.append(protocol)
    assert factory.buildProtocol(None) is None
    registry.opened(object(), limited=False)  # a ZeroMQ peer
    assert registry.limited_count == 2 and len(registry) == 3
    protocols[0].transport.loseConnection()
    protocols[0].connectionLost(Failure(ConnectionDone()))
    assert factory.buildProtocol(None) is not None


def test_unauthenticated_connection_closed_after_idle_timeout():
    clock = task.Clock()
    factory = LineJSONFactory(
        make_dispatcher(auth=FakeAuth()), unauthenticated_idle_timeout=5, clock=clock
    )
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    clock.advance(4)
    protocol.dataReceived(b'{"command": "ping"}\n')
    clock.advance(4)
    assert not transport.disconnecting
    clock.advance(1.5)
    assert transport.disconnecting


def test_no_unauthenticated_timeout_without_auth():
    # (the longer idle_timeout, 600 s by default, still applies: test_idle_keepalive.py)
    clock = task.Clock()
    factory = LineJSONFactory(make_dispatcher(), unauthenticated_idle_timeout=5, clock=clock)
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    clock.advance(100)
    assert not transport.disconnecting


def test_line_peer_is_the_host_without_port():
    factory = LineJSONFactory(make_dispatcher())
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(StringTransport())
    assert protocol.context.peer == "192.168.1.1"  # StringTransport's default peer


# -- TLS options --------------------------------------------------------------------


def test_plain_descriptions_go_to_strports():
    endpoint = server_endpoint(task.Clock(), "tcp:0:interface=127.0.0.1")
    assert type(endpoint).__name__ == "TCP4ServerEndpoint"


@pytest.mark.parametrize(
    "extra, words",
    [
        (":caCertsDir=/no/such/dir", "cannot read caCertsDir /no/such/dir"),
        (":caCertsDir={empty}", "has no CA certificates"),
        (":caCertsDir={cas}:sslmethod=TLSv1_METHOD", "'sslmethod' is not supported"),
    ],
)
def test_ca_certs_dir_errors_name_the_problem(tmp_path, extra, words):
    from tests.serverproc import make_self_signed

    key, cert = make_self_signed(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "cas").mkdir()
    (tmp_path / "cas" / "ca.pem").write_bytes(cert.read_bytes())
    description = f"ssl:0:privateKey={key}:certKey={cert}" + extra.format(
        empty=tmp_path / "empty", cas=tmp_path / "cas"
    )
    with pytest.raises(TLSConfigError, match=words):
        server_endpoint(task.Clock(), description)


def test_ca_certs_dir_builds_a_verifying_endpoint(tmp_path):
    from tests.serverproc import make_self_signed

    key, cert = make_self_signed(tmp_path)
    (tmp_path / "cas").mkdir()
    (tmp_path / "cas" / "ca.pem").write_bytes(cert.read_bytes() * 2)
    endpoint = server_endpoint(
        task.Clock(),
        f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}:caCertsDir={tmp_path / 'cas'}",
    )
    assert isinstance(endpoint, SSL4ServerEndpoint)
    options = endpoint._sslContextFactory
    assert options.verify and options.requireCertificate


# -- build_server ---------------------------------------------------------------------


def test_build_server_loads_the_auth_file_and_starts_auth_before_listeners(tmp_path):
    from twisted.internet import reactor

    from stui_twisted.tap import build_server

    users = tmp_path / "users"
    write_users(users, alice="pw")
    settings = Settings(data_dir=str(tmp_path / "d"), auth_file=str(users), image_enabled=False)
    root, _ = build_server(settings, reactor)
    names = [child.name for child in root]
    assert names.index("auth") < names.index("tcp")
    assert root.getServiceNamed("auth").has_user("alice")


def test_build_server_exits_clearly_on_an_unreadable_auth_file(tmp_path):
    from twisted.internet import reactor

    from stui_twisted.tap import build_server

    missing = tmp_path / "missing"
    settings = Settings(data_dir=str(tmp_path / "d"), auth_file=str(missing), image_enabled=False)
    with pytest.raises(SystemExit) as raised:
        build_server(settings, reactor)
    assert "--auth-file" in str(raised.value.code) and str(missing) in str(raised.value.code)


def test_authenticate_result_is_json(guarded):
    # describe must still work for anyone and say auth is on
    reply = dispatch(guarded, {"command": "describe"})
    assert reply["result"]["auth_required"] is True
    assert json.dumps(reply)
