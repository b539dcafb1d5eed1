"""End to end with authentication and TLS: a real ``twistd -n stui`` and plain clients.

The password file is made the way an operator makes it (``python -m
stui_twisted.access.passwd FILE USER`` with the password on stdin); clients are plain
sockets, ``ssl``, ``openssl s_client`` and pyzmq, as in the user's own tools.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.serverproc import REPO_ROOT, ServerProcess, twistd_command

pytestmark = pytest.mark.e2e

PASSWORDS = {"alice": "alice-secret-1", "bob": "bob-secret-2"}


def make_auth_file(directory: Path, users: dict[str, str] = PASSWORDS) -> Path:
    """A password file made with the real command, the password read from stdin."""
    path = directory / "users"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    for user, password in users.items():
        done = subprocess.run(
            [sys.executable, "-m", "stui_twisted.access.passwd", str(path), user],
            input=password + "\n",
            text=True,
            capture_output=True,
            env=env,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
    assert (path.stat().st_mode & 0o077) == 0
    return path


def zmq_socket(server: ServerProcess, socket_type: str = "REQ", identity: bytes | None = None):
    import zmq

    sock = zmq.Context.instance().socket(zmq.REQ if socket_type == "REQ" else zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 15_000)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    sock.connect(server.zmq_url)
    return sock


def zmq_call(sock, message: dict) -> dict:
    import zmq

    if sock.type == zmq.REQ:
        sock.send(json.dumps(message).encode())
        return json.loads(sock.recv())
    sock.send_multipart([b"", json.dumps(message).encode()])
    return json.loads(sock.recv_multipart()[-1])


def login(client, user: str = "alice") -> str:
    result = client.result("authenticate", username=user, password=PASSWORDS[user])
    assert result["client_id"] == user
    return result["token"]


@pytest.fixture(scope="module")
def auth_file(tmp_path_factory) -> Path:
    return make_auth_file(tmp_path_factory.mktemp("users"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, auth_file):
    """Auth on, TCP + TLS + ZeroMQ, with the live image (evaluate needs it)."""
    proc = ServerProcess(
        tmp_path_factory.mktemp("secure"), f"--auth-file={auth_file}", tls=True, image=True
    ).start()
    yield proc
    proc.kill()


def line_clients(server):
    return {"tcp": server.tcp_client(), "tls": server.tls_client()}


# -- unauthenticated -----------------------------------------------------------------


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_line_transports_need_authentication(server, transport):
    client = line_clients(server)[transport]
    assert client.result("ping")["message"] == "pong"
    assert client.result("describe")["auth_required"] is True
    for command, params in [
        ("evaluate", {"code": "1 + 1"}),
        ("create_session", {"client_id": "alice"}),
        ("list_client_sessions", {"client_id": "alice"}),
        ("get_session_statistics", {}),
    ]:
        reply = client.call(command, **params)
        assert reply["error_type"] == "AuthenticationRequired", reply
    bad = client.call("authenticate", username="alice", password="wrong")
    assert bad["error_type"] == "AuthenticationFailed"
    assert bad["error"] == "invalid username or password"
    assert client.call("evaluate", code="1")["error_type"] == "AuthenticationRequired"
    client.close()


@pytest.mark.parametrize("socket_type", ["REQ", "DEALER"])
def test_zmq_needs_authentication(server, socket_type):
    sock = zmq_socket(server, socket_type)
    try:
        assert zmq_call(sock, {"id": 1, "command": "ping"})["status"] == "success"
        assert zmq_call(sock, {"id": 2, "command": "describe"})["result"]["auth_required"]
        for command in ("evaluate", "create_session"):
            reply = zmq_call(
                sock,
                {"id": 3, "command": command, "parameters": {"code": "1", "client_id": "alice"}},
            )
            assert reply["error_type"] == "AuthenticationRequired", reply
            assert "token" in reply["error"]
        reply = zmq_call(
            sock, {"id": 4, "command": "evaluate", "token": "made-up", "parameters": {"code": "1"}}
        )
        assert reply["error_type"] == "AuthenticationRequired"
    finally:
        sock.close()


# -- after authenticate ------------------------------------------------------------


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_line_transports_work_after_authenticate(server, transport):
    client = line_clients(server)[transport]
    token = login(client)
    # client_id defaults to the principal; naming it explicitly is fine too.
    session = client.result("create_session")
    assert session["client_id"] == "alice"
    first = client.result("evaluate", code="x = 20\nx * 2 + 2")
    assert first["result"] == "42"
    time.sleep(0.2)  # still authenticated later on the same connection
    assert client.result("evaluate", code="x + 1", client_id="alice")["result"] == "21"
    assert client.call("create_session", client_id="bob")["error_type"] == "PermissionDenied"
    client.close()

    # A new connection starts unauthenticated; a token it already holds works.
    again = line_clients(server)[transport]
    assert again.call("get_session_info", session_id=session["session_id"])["error_type"] == (
        "AuthenticationRequired"
    )
    info = again.call("get_session_info", token=token, session_id=session["session_id"])
    assert info["status"] == "success", info
    assert (
        again.call("close_session", token="junk", session_id=session["session_id"])["error_type"]
        == "AuthenticationRequired"
    )
    again.call("close_session", token=token, session_id=session["session_id"])
    again.close()


def test_zmq_token_in_each_request_and_a_forged_identity_gets_nothing(server):
    identity = b"alice-laptop-1"
    sock = zmq_socket(server, "REQ", identity)
    try:
        token = zmq_call(
            sock,
            {
                "id": 1,
                "command": "authenticate",
                "parameters": {"username": "alice", "password": PASSWORDS["alice"]},
            },
        )["result"]["token"]
        created = zmq_call(
            sock,
            {
                "id": 2,
                "command": "create_session",
                "token": token,
                "parameters": {"client_id": "alice"},
            },
        )
        assert created["status"] == "success", created
        evaluated = zmq_call(
            sock, {"id": 3, "command": "evaluate", "token": token, "parameters": {"code": "6 * 7"}}
        )
        assert evaluated["result"]["result"] == "42"
        # The same peer, without the token: refused although it authenticated before.
        bare = zmq_call(sock, {"id": 4, "command": "evaluate", "parameters": {"code": "1"}})
        assert bare["error_type"] == "AuthenticationRequired"
    finally:
        sock.close()

    # Someone who knows only the identity: a second socket with the SAME identity.
    session_id = created["result"]["session_id"]
    for kind, command in (
        ("REQ", "evaluate"),
        ("DEALER", "get_session_info"),
        ("DEALER", "list_client_sessions"),
        ("DEALER", "create_session"),
    ):
        reply = _forged_call(
            server,
            kind,
            identity,
            {
                "id": 5,
                "command": command,
                "client_id": "alice",
                "parameters": {"code": "1", "session_id": session_id},
            },
        )
        assert reply is not None, f"the forged-identity {kind} socket got no reply"
        assert reply["error_type"] == "AuthenticationRequired", (command, reply)


def _forged_call(server, kind: str, identity: bytes, message: dict) -> dict | None:
    """One request from a fresh socket that reuses C{identity}.

    libzmq refuses a duplicate identity until the previous socket's pipe is
    gone, so an unanswered attempt is retried on a new socket (bounded: 10 s).
    """
    import zmq

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        forger = zmq_socket(server, kind, identity)
        forger.setsockopt(zmq.RCVTIMEO, 1000)
        try:
            return zmq_call(forger, message)
        except zmq.Again:
            continue
        finally:
            forger.close()
    return None


# -- ownership -----------------------------------------------------------------------


def _same_answer(reply_a: dict, reply_b: dict, id_a: str, id_b: str) -> None:
    """Two error replies that differ only in the session id they echo."""
    strip = {"id", "timestamp"}
    a = {k: v for k, v in reply_a.items() if k not in strip}
    b = {k: v for k, v in reply_b.items() if k not in strip}
    assert json.loads(json.dumps(a).replace(id_a, "SID")) == json.loads(
        json.dumps(b).replace(id_b, "SID")
    )


def test_alice_cannot_see_bobs_sessions(server):
    bob = server.tcp_client()
    login(bob, "bob")
    bobs = bob.result("create_session")["session_id"]
    bob.result("evaluate", code="secret = 'bob only'")

    alice = server.tls_client()
    login(alice, "alice")
    made_up = "s_" + "A" * 22
    for command, params in [
        ("restore_session", {}),
        ("get_session_info", {}),
        ("get_context_summary", {}),
        ("evaluate", {"code": "secret"}),
        ("inspect", {"expression": "secret"}),
        ("close_session", {}),
        ("save_context", {}),
        ("update_session_state", {"state_data": {"x": 1}}),
    ]:
        real = alice.call(command, session_id=bobs, **params)
        fake = alice.call(command, session_id=made_up, **params)
        assert real["error_type"] == "SessionNotFound", (command, real)
        _same_answer(real, fake, bobs, made_up)
    denied = alice.call("list_client_sessions", client_id="bob")
    assert denied["error_type"] == "PermissionDenied"
    nobody = alice.call("list_client_sessions", client_id="no-such-user")
    _same_answer(denied, nobody, "'bob'", "'no-such-user'")
    own = alice.result("list_client_sessions")
    assert bobs not in {s["session_id"] for s in own["sessions"]}
    # Bob's session is untouched.
    assert bob.result("evaluate", code="secret")["result"] == "'bob only'"
    bob.close()
    alice.close()


# -- start-up refusals ---------------------------------------------------------------


def run_twistd(tmp_path: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(
        [
            *twistd_command(),
            "-n",
            f"--logfile={tmp_path / 'twistd.log'}",
            "--pidfile=",
            "stui",
            f"--data-dir={tmp_path / 'data'}",
            "--zmq=none",
            "--image=no",
            *args,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_public_interface_without_auth_refuses_to_start(tmp_path):
    done = run_twistd(tmp_path, "--tcp=tcp:7555:interface=0.0.0.0")
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "refusing to listen beyond loopback" in output
    assert "--auth-file" in output and "--insecure-no-auth" in output


def test_unreadable_auth_file_refuses_to_start(tmp_path):
    missing = tmp_path / "no-such-users"
    done = run_twistd(tmp_path, "--tcp=tcp:0:interface=127.0.0.1", f"--auth-file={missing}")
    assert done.returncode != 0
    assert "--auth-file" in done.stderr and str(missing) in done.stderr
    assert "Traceback" not in done.stderr


# -- brute force, idle timeout, max connections ----------------------------------------


def test_brute_force_is_rate_limited_per_peer_on_every_transport(tmp_path, auth_file):
    with ServerProcess(tmp_path, f"--auth-file={auth_file}", image=False) as proc:
        client = proc.tcp_client()
        answers = []
        for attempt in range(12):
            # Distinct names: the per-peer limit counts the usernames tried from an
            # address (repeated failures of one name are the per-username limit's).
            reply = client.call("authenticate", username=f"guess{attempt}", password="nope")
            answers.append(reply["error_type"])
        assert answers[:10] == ["AuthenticationFailed"] * 10
        assert answers[10:] == ["RateLimited"] * 2
        limited = client.call("authenticate", username="alice", password=PASSWORDS["alice"])
        assert limited["error_type"] == "RateLimited"
        assert 0 < limited["details"]["retry_after"] <= 300
        # A new connection from the same address is the same peer; so is ZeroMQ
        # from it (the per-peer key is the IP address, Peer-Address for ZeroMQ).
        other = proc.tcp_client()
        assert (
            other.call("authenticate", username="bob", password="x")["error_type"] == "RateLimited"
        )
        sock = zmq_socket(proc, "DEALER", b"fresh-identity")
        try:
            reply = zmq_call(
                sock,
                {"command": "authenticate", "parameters": {"username": "bob", "password": "x"}},
            )
            assert reply["error_type"] == "RateLimited"
        finally:
            sock.close()
        client.close()
        other.close()


def test_idle_unauthenticated_connections_are_closed(tmp_path, auth_file):
    with ServerProcess(
        tmp_path, f"--auth-file={auth_file}", "--idle-timeout=1", image=False
    ) as proc:
        started = time.monotonic()
        idle = proc.tcp_client(timeout=10)
        chatty = proc.tcp_client(timeout=10)
        authed = proc.tcp_client(timeout=10)
        login(authed)
        for _ in range(4):  # each request restarts the idle timer
            time.sleep(0.5)
            assert chatty.result("ping")["message"] == "pong"
        with pytest.raises(ConnectionError):
            idle.read_line()
        waited = time.monotonic() - started
        assert 0.9 < waited < 2.6, waited
        time.sleep(1.5)
        assert authed.result("get_session_statistics")["total_sessions"] >= 0
        time.sleep(1.5)
        with pytest.raises(ConnectionError):
            chatty.read_line()
        for client in (idle, chatty, authed):
            client.close()
        assert "not authenticated in time" in proc.log_text()


def test_max_connections(tmp_path):
    with ServerProcess(tmp_path, "--max-connections=2", image=False) as proc:
        first, second = proc.tcp_client(), proc.tcp_client()
        assert first.result("ping") and second.result("ping")
        third = proc.tcp_client()
        with pytest.raises((ConnectionError, OSError)):
            third.call("ping")
        third.close()
        # ZeroMQ peers do not take TCP places.
        assert proc.zmq_request({"command": "ping"})["status"] == "success"
        first.close()
        deadline = time.monotonic() + 5
        while True:
            again = proc.tcp_client()
            try:
                assert again.result("ping")["message"] == "pong"
                break
            except (ConnectionError, OSError):
                assert time.monotonic() < deadline, "the freed place was never reused"
                time.sleep(0.1)
            finally:
                again.close()
        second.close()
        assert "max_connections reached" in proc.log_text()


# -- TLS ---------------------------------------------------------------------------------


def test_tls_host_name_is_verified(server):
    ok = server.tls_client(hostname="localhost")
    assert ok.result("ping")["message"] == "pong"
    ok.close()
    with pytest.raises(ssl.SSLCertVerificationError):
        server.tls_client(hostname="not-the-server.example")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_openssl_s_client_gets_the_pong(server):
    line = s_client_first_line(
        [
            "-connect",
            f"127.0.0.1:{server.tls_port}",
            "-CAfile",
            str(server.cert_path),
            "-verify_hostname",
            "localhost",
            "-verify_return_error",
        ],
        b'{"id": "o-1", "command": "ping"}\n',
    )
    assert json.loads(line)["result"]["message"] == "pong"


def s_client_first_line(args: list[str], request: bytes, seconds: float = 20) -> bytes:
    """The first line C{openssl s_client -quiet} prints for C{request} (b"" if it ended)."""
    import threading

    proc = subprocess.Popen(
        ["openssl", "s_client", "-quiet", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    lines: list[bytes] = []
    try:
        proc.stdin.write(request)
        proc.stdin.flush()
        reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(seconds)
    except BrokenPipeError:
        lines.append(b"")
    finally:
        proc.kill()
        proc.wait(10)
    assert lines, f"openssl s_client printed no line within {seconds} s"
    return lines[0]


class PKI:
    """A throw-away CA, a server certificate and client certificates (cryptography)."""

    def __init__(self, directory: Path) -> None:
        from cryptography.hazmat.primitives.asymmetric import ec

        self.directory = directory
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca_cert = self._certificate("stui test CA", self.ca_key, None, ca=True)
        (directory / "client-cas").mkdir()
        self._write_cert(directory / "client-cas" / "ca.pem", self.ca_cert)
        (directory / "client-cas" / "README").write_text("not a certificate; ignored\n")

    def _certificate(self, name, key, issuer, *, ca=False, san=()):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.x509.oid import NameOID

        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        issuer_name, issuer_key = (subject, key) if issuer is None else issuer
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def _write_cert(self, path: Path, cert) -> Path:
        from cryptography.hazmat.primitives import serialization

        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    def _write_key(self, path: Path, key) -> Path:
        from cryptography.hazmat.primitives import serialization

        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return path

    def issue(self, name: str, *, signed: bool = True, server: bool = False) -> tuple[Path, Path]:
        """(cert.pem, key.pem) for C{name}, signed by the CA or self-signed."""
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import ec

        key = ec.generate_private_key(ec.SECP256R1())
        san = (
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            if server
            else []
        )
        issuer = (self.ca_cert.subject, self.ca_key) if signed else None
        cert = self._certificate(name, key, issuer, san=san)
        return (
            self._write_cert(self.directory / f"{name}.pem", cert),
            self._write_key(self.directory / f"{name}.key", key),
        )


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory):
    """TLS that requires a client certificate signed by the CA in caCertsDir."""
    workdir = tmp_path_factory.mktemp("mtls")
    pki = PKI(workdir)
    server_cert, server_key = pki.issue("server", server=True)
    tls = (
        f"--tls=ssl:0:interface=127.0.0.1:privateKey={server_key}:certKey={server_cert}"
        f":caCertsDir={workdir / 'client-cas'}"
    )
    proc = ServerProcess(workdir, tls=True, image=False, zmq=False)
    proc.extra_args.append(tls)  # the later --tls wins
    proc.cert_path = pki.directory / "client-cas" / "ca.pem"
    proc.start()
    proc.pki = pki
    yield proc
    proc.kill()


def _mtls_ping(server, cert: tuple[Path, Path] | None) -> dict:
    context = ssl.create_default_context(cafile=str(server.cert_path))
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    raw = socket.create_connection(("127.0.0.1", server.tls_port), 10)
    with context.wrap_socket(raw, server_hostname="localhost") as sock:
        sock.settimeout(10)
        sock.sendall(b'{"id": 1, "command": "ping"}\n')
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return json.loads(data)


def test_client_certificate_signed_by_the_ca_is_accepted(mtls_server):
    cert = mtls_server.pki.issue("alice-client")
    assert _mtls_ping(mtls_server, cert)["result"]["message"] == "pong"
    assert "requires client certificates" in mtls_server.log_text()


def test_no_client_certificate_is_refused(mtls_server):
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        _mtls_ping(mtls_server, None)


def test_client_certificate_from_another_ca_is_refused(mtls_server):
    rogue = mtls_server.pki.issue("mallory", signed=False)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        _mtls_ping(mtls_server, rogue)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_openssl_s_client_with_a_client_certificate(mtls_server):
    cert, key = mtls_server.pki.issue("carol-client")
    base = [
        "-connect",
        f"127.0.0.1:{mtls_server.tls_port}",
        "-CAfile",
        str(mtls_server.cert_path),
        "-verify_hostname",
        "localhost",
        "-verify_return_error",
    ]
    line = s_client_first_line(
        [*base, "-cert", str(cert), "-key", str(key)], b'{"command": "ping"}\n'
    )
    assert json.loads(line)["result"]["message"] == "pong"
    assert b"pong" not in s_client_first_line(base, b'{"command": "ping"}\n')
