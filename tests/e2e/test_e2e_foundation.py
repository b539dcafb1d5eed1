"""End to end: a real ``twistd -n stui`` driven by socket, ssl and pyzmq clients."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time

import pytest

from tests.serverproc import ServerProcess, twistd_command

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("e2e"), tls=True, image=False).start()
    yield proc
    proc.kill()


def test_tcp_ping(server):
    client = server.tcp_client()
    reply = client.call("ping")
    assert reply["status"] == "success"
    assert reply["result"]["message"] == "pong"
    client.close()


def test_the_running_server_froze_its_start_up_heap_and_set_the_gc_thresholds(server):
    """Issue 21: full collections walked every object (40-136 ms create maxima).

    The line is the server's own C{gc.get_freeze_count()} and C{gc.get_threshold()},
    read back after start-up (docs/performance.md, "Garbage collection pauses").
    """
    from stui_twisted.ops.gcpauses import GC_THRESHOLDS

    pattern = (
        r"garbage collector: froze (\d+) start-up objects .*, thresholds \((\d+), (\d+), (\d+)\)"
    )
    deadline = time.monotonic() + 20
    while (found := re.search(pattern, server.log_text())) is None:
        assert time.monotonic() < deadline, server.log_text()
        time.sleep(0.05)
    assert int(found[1]) > 10_000  # the modules and the service tree, at least
    assert tuple(int(value) for value in found.groups()[1:]) == GC_THRESHOLDS


def test_tls_ping_with_host_name_verification(server):
    client = server.tls_client(hostname="localhost")
    assert client.call("ping")["result"]["message"] == "pong"
    client.close()


def test_tls_refuses_a_wrong_host_name(server):
    import ssl

    with pytest.raises(ssl.SSLCertVerificationError):
        server.tls_client(hostname="not-the-server.example")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_openssl_s_client_gets_the_pong(server):
    proc = subprocess.Popen(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{server.tls_port}", "-quiet"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        proc.stdin.write(b'{"id":1,"command":"ping"}\n')
        proc.stdin.flush()
        first = _readline_within(proc.stdout, 20)
    finally:
        proc.kill()
        proc.wait(10)
    assert json.loads(first)["result"]["message"] == "pong"


def _readline_within(stream, seconds: float) -> bytes:
    import threading

    lines: list[bytes] = []
    reader = threading.Thread(target=lambda: lines.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(seconds)
    assert lines, f"no line within {seconds} s"
    return lines[0]


@pytest.mark.parametrize("socket_type", ["REQ", "DEALER"])
def test_zmq_req_and_dealer_get_the_pong(server, socket_type):
    reply = server.zmq_request({"id": socket_type, "command": "ping"}, socket_type)
    assert reply["id"] == socket_type
    assert reply["result"]["message"] == "pong"


def test_zmq_malformed_frame_still_gets_exactly_one_reply(server):
    import zmq

    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.zmq_url)
    for payload in (b"not json", b"[]", b'{"command": 5}'):
        sock.send(payload)
        assert json.loads(sock.recv())["error_type"] == "InvalidRequest"
    sock.send(b'{"id": 2, "command": "ping"}')
    assert json.loads(sock.recv())["id"] == 2
    sock.close()


def test_zmq_dealer_without_delimiter_frame(server):
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.zmq_url)
    sock.send(b'{"id": "bare", "command": "ping"}')
    frames = sock.recv_multipart()
    assert len(frames) == 1
    assert json.loads(frames[0])["id"] == "bare"
    sock.close()


def test_nine_mib_line_gets_message_too_large_then_close(server):
    client = server.tcp_client()
    client.send_raw(b'{"command":"ping","pad":"' + b"x" * (9 * 1024 * 1024) + b'"}\n')
    reply = client.read_reply()
    assert reply["error_type"] == "MessageTooLarge"
    with pytest.raises(ConnectionError):
        while True:
            client.read_line()


def test_nine_mib_zmq_frame_gets_message_too_large(server):
    reply = server.zmq_request({"command": "ping", "pad": "x" * (9 * 1024 * 1024)})
    assert reply["error_type"] == "MessageTooLarge"


def test_pipelined_requests_are_all_answered(server):
    client = server.tcp_client()
    client.send_raw(b"".join(b'{"id":%d,"command":"ping"}\n' % i for i in range(200)))
    ids = {client.read_reply()["id"] for _ in range(200)}
    assert ids == set(range(200))


def test_zmq_pipelined_requests_that_wait_and_that_do_not_are_all_answered(tmp_path):
    """Replies sent inside the read loop and after a thread-pool write both keep reading.

    Under C{always} a C{create_session} reply waits for an fsync in the thread
    pool and is sent outside the read loop; pings are answered inside it.
    Four DEALERs pipeline both kinds at once; every request gets its reply.
    """
    import zmq

    proc = ServerProcess(tmp_path, "--durability=always", image=False).start()
    sockets = []
    try:
        for number in range(4):
            sock = zmq.Context.instance().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(proc.zmq_url)
            sockets.append(sock)
            for index in range(50):
                command = "create_session" if index % 2 else "ping"
                request = {
                    "id": f"{number}-{index}",
                    "command": command,
                    "client_id": f"c{number}-{index}",
                }
                sock.send_multipart([b"", json.dumps(request).encode()])
        poller = zmq.Poller()
        for sock in sockets:
            poller.register(sock, zmq.POLLIN)
        replies: dict = {}
        deadline = time.monotonic() + 30
        while len(replies) < 200 and time.monotonic() < deadline:
            for sock, _ in poller.poll(500):
                reply = json.loads(sock.recv_multipart()[-1])
                replies[reply["id"]] = reply
        assert len(replies) == 200, f"{200 - len(replies)} requests unanswered"
        failed = [reply for reply in replies.values() if reply["status"] != "success"]
        assert not failed, failed[:3]
    finally:
        for sock in sockets:
            sock.close()
        proc.kill()


def test_sigterm_exits_cleanly(tmp_path):
    proc = ServerProcess(tmp_path, image=False).start()
    assert proc.tcp_client().call("ping")["status"] == "success"
    status = proc.stop()
    assert status == 0, proc.log_text()
    assert "Traceback" not in proc.log_text()
    assert "session service stopped" in proc.log_text()


def test_daemon_mode_answers_and_stops_on_sigterm(tmp_path):
    """twistd without -n forks; ZeroMQ and threads must be made after the fork."""
    import os
    import re

    pidfile = tmp_path / "stui.pid"
    logfile = tmp_path / "stui.log"
    env = dict(
        os.environ,
        PYTHONPATH=str(
            ServerProcess(tmp_path).__class__.__module__
            and __import__("tests.serverproc").serverproc.REPO_ROOT
        ),
    )
    subprocess.run(
        [
            *twistd_command(),
            f"--pidfile={pidfile}",
            f"--logfile={logfile}",
            "stui",
            "--tcp=tcp:0:interface=127.0.0.1",
            "--zmq=tcp://127.0.0.1:*",
            f"--data-dir={tmp_path / 'data'}",
            "--image=no",
        ],
        cwd=tmp_path,
        env=env,
        check=True,
        timeout=30,
    )
    deadline = time.monotonic() + 30
    text = ""
    while time.monotonic() < deadline:
        text = logfile.read_text() if logfile.exists() else ""
        if "session service ready" in text and "zmq listening" in text:
            break
        time.sleep(0.05)
    tcp_port = int(re.search(r"tcp listening on [\d.]+:(\d+)", text).group(1))
    zmq_url = re.search(r"zmq listening on (tcp://[\d.]+:\d+)", text).group(1)
    proc = ServerProcess(tmp_path / "client")
    proc.tcp_port, proc.zmq_url = tcp_port, zmq_url
    assert proc.tcp_client().call("ping")["result"]["message"] == "pong"
    assert proc.zmq_request({"command": "ping"})["result"]["message"] == "pong"
    pid = int(pidfile.read_text())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and pidfile.exists():
        time.sleep(0.05)
    assert not pidfile.exists(), "the daemon did not stop (pidfile still there)"
    assert "Traceback" not in logfile.read_text()
