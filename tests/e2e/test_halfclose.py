"""A client that ends its input (half-closes) still gets every reply, over TCP and TLS.

``printf '...\\n' | nc -q1 127.0.0.1 7555`` sends its line, then shuts down its
sending side (TCP FIN) and waits for the answer.  The server must answer every
line it read, including requests still running when the input ended (here an
``evaluate`` that sleeps), and only then close.  Each client is run 20 times
against one real server; every run must get every reply.  The command-line
clients' 20 runs go :data:`CONCURRENT` at a time, each on its own session (so
their evaluations do not queue behind each other): ``nc -q1`` only quits one
second after its input ends, whatever the server does, and 20 of those in a
row were the slowest test of the suite.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.serverproc import ServerProcess

pytestmark = pytest.mark.e2e

RUNS = 20
CONCURRENT = 5
# Still running when the client's end of input arrives (sent right after the lines).
SLOW_CODE = "import time; time.sleep(0.1); 'slept'"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("halfclose"), tls=True, zmq=False)
    proc.start()
    client = proc.tcp_client()
    proc.session_ids = [
        client.result("create_session", client_id=f"halfclose-{run}")["session_id"]
        for run in range(RUNS)
    ]
    proc.session_id = proc.session_ids[0]
    client.close()
    yield proc
    proc.kill()


def requests(session_id: str) -> bytes:
    """A slow evaluate first, then two fast commands (the operations.md one-liner's)."""
    lines = [
        {
            "id": "slow",
            "command": "evaluate",
            "parameters": {"session_id": session_id, "code": SLOW_CODE},
        },
        {"id": "ping", "command": "ping"},
        {"id": "stats", "command": "get_session_statistics"},
    ]
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def check_replies(output: bytes) -> None:
    replies = {}
    for line in output.splitlines():
        if line.strip():
            reply = json.loads(line)
            replies[reply["id"]] = reply
    assert set(replies) == {"slow", "ping", "stats"}, output
    assert replies["slow"]["status"] == "success", replies["slow"]
    assert replies["slow"]["result"]["result"] == "'slept'"
    assert replies["ping"]["result"]["message"] == "pong"
    assert replies["stats"]["status"] == "success"


def read_to_end(sock: socket.socket, timeout: float = 15.0) -> bytes:
    """Everything the server sends until it closes (bounded by C{timeout})."""
    sock.settimeout(timeout)
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def test_python_client_that_shuts_down_writing_gets_every_reply(server):
    for _ in range(RUNS):
        with socket.create_connection(("127.0.0.1", server.tcp_port), 10) as sock:
            sock.sendall(requests(server.session_id))
            sock.shutdown(socket.SHUT_WR)
            started = time.monotonic()
            check_replies(read_to_end(sock))
            # the server closed once the last reply was written, not much later
            assert time.monotonic() - started < 10


def test_an_unfinished_last_line_is_answered_at_end_of_input(server):
    with socket.create_connection(("127.0.0.1", server.tcp_port), 10) as sock:
        sock.sendall(b'{"id": 1, "command": "ping"}')  # no newline
        sock.shutdown(socket.SHUT_WR)
        (line,) = read_to_end(sock).splitlines()
    assert json.loads(line)["result"]["message"] == "pong"


TOOLS = {
    "nc -q1": ["nc", "-q1", "127.0.0.1", "{port}"],
    "nc -N": ["nc", "-N", "127.0.0.1", "{port}"],
    # socat waits only 0.5 s (-t) for the answer after its input ends; the
    # evaluate sleeps 0.1 s, so give socat's own give-up timer room (a loaded machine).
    "socat -": ["socat", "-t10", "-", "TCP:127.0.0.1:{port}"],
    "socat - OPENSSL": ["socat", "-t10", "-", "OPENSSL:127.0.0.1:{tls_port},cafile={cafile}"],
}


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_command_line_clients_get_every_reply(server, tool):
    argv = TOOLS[tool]
    if shutil.which(argv[0]) is None:
        pytest.skip(f"{argv[0]} is not installed (apt-get install netcat-openbsd socat)")
    argv = [
        part.format(port=server.tcp_port, tls_port=server.tls_port, cafile=server.cert_path)
        for part in argv
    ]

    def run(session_id: str) -> bytes:
        done = subprocess.run(argv, input=requests(session_id), capture_output=True, timeout=20)
        return done.stdout

    with ThreadPoolExecutor(CONCURRENT) as pool:
        outputs = list(pool.map(run, server.session_ids))
    assert len(outputs) == RUNS
    for output in outputs:
        check_replies(output)


# -- TLS ------------------------------------------------------------------------------


class TLSClient:
    """A TLS client over a plain socket, so that it can half-close the way it likes."""

    def __init__(self, server: ServerProcess) -> None:
        context = ssl.create_default_context(cafile=str(server.cert_path))
        self.sock = socket.create_connection(("127.0.0.1", server.tls_port), 10)
        self.sock.settimeout(15)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._receive()
        self._flush()

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def _receive(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            self.incoming.write_eof()
            return False
        self.incoming.write(data)
        return True

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self._flush()

    def read_to_end(self) -> bytes:
        """Application data until the server's close_notify or TCP close."""
        chunks = []
        while True:
            try:
                chunk = self.tls.read(65536)
                if not chunk:  # the server's close_notify
                    return b"".join(chunks)
                chunks.append(chunk)
                continue
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b"".join(chunks)
            if not self._receive():
                try:
                    chunks.append(self.tls.read(65536))
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError, ssl.SSLWantReadError):
                    pass
                return b"".join(chunks)

    def close(self) -> None:
        self.sock.close()


def test_tls_client_that_shuts_down_tcp_writing_gets_every_reply(server):
    """End of input as a TCP FIN under TLS (no close_notify)."""
    for _ in range(RUNS):
        client = TLSClient(server)
        try:
            client.send(requests(server.session_id))
            client.sock.shutdown(socket.SHUT_WR)
            check_replies(client.read_to_end())
        finally:
            client.close()


def test_tls_close_notify_is_end_of_input_not_an_abort(server):
    """The client's close_notify: the server answers what it read, then closes cleanly."""
    for _ in range(RUNS):
        client = TLSClient(server)
        try:
            client.send(requests(server.session_id))
            try:
                client.tls.unwrap()  # writes close_notify, then wants the server's
            except ssl.SSLWantReadError:
                pass
            client._flush()
            output = client.read_to_end()
        finally:
            client.close()
        check_replies(output)
