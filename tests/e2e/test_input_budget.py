"""Unfinished request lines are bounded server-wide (``--max-partial-input-bytes``).

Against a real server with a small budget (8 MiB): the connection holding the
largest unfinished line is answered ``MessageTooLarge`` and closed, the other
connections go on; many connections that each hold several MiB without a
newline cannot grow the server's memory past the budget, and the memory comes
back once they are gone (the budget calls ``malloc_trim``: glibc keeps freed
64 KiB reads otherwise).
"""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from tests.serverproc import ServerProcess

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
BUDGET = 8 * MiB


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line")


@pytest.fixture
def server(tmp_path):
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs Linux /proc")
    proc = ServerProcess(
        tmp_path,
        f"--max-partial-input-bytes={BUDGET}",
        f"--max-message-bytes={16 * MiB}",
        zmq=False,
        image=False,
    ).start()
    yield proc
    proc.kill()


def line_start(name: str) -> bytes:
    """The beginning of a valid ping whose padding parameter is still being sent."""
    return b'{"id": "%s", "command": "ping", "parameters": {"pad": "' % name.encode()


def connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.tcp_port), 10)
    sock.settimeout(15)
    return sock


def read_line(sock: socket.socket) -> dict:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    return json.loads(data)


def test_the_largest_unfinished_line_is_refused_and_the_others_go_on(server):
    small = {}
    for name in ("a", "b", "c"):
        sock = connect(server)
        sock.sendall(line_start(name) + b"x" * MiB)
        small[name] = sock
    time.sleep(0.5)  # let the server read them (3 MiB + a little, under the budget)
    big = connect(server)
    # Just under the budget first; then one small segment crosses it, so the
    # server closes a connection with nothing unread (no reset that could
    # swallow the reply) and the largest, this one, is the one refused.
    big.sendall(line_start("big") + b"y" * (5 * MiB - 1024))
    time.sleep(0.5)
    big.sendall(b"y" * 2048)
    reply = read_line(big)
    assert reply["error_type"] == "MessageTooLarge", reply
    assert reply["details"]["scope"] == "server"
    assert reply["details"]["max_partial_input_bytes"] == BUDGET
    assert reply["details"]["size"] > 5 * MiB - 1024
    assert big.recv(1) == b""  # and closed
    big.close()

    for name, sock in small.items():
        sock.sendall(b'"}}\n')
        reply = read_line(sock)
        assert reply["id"] == name and reply["status"] == "success", reply
        sock.close()
    other = server.tcp_client()
    assert other.result("ping")["message"] == "pong"
    other.close()
    assert "max_partial_input_bytes" in server.log_text()


def test_many_unfinished_lines_cannot_grow_memory_past_the_budget(server):
    pid = server.process.pid
    warm = server.tcp_client()
    warm.result("ping")
    before = rss_mib(pid)
    peak = before
    holders = []
    chunk = b"z" * (256 * 1024)
    for index in range(40):  # 40 x 4 MiB = 160 MiB offered, 20 x the budget
        sock = connect(server)
        sock.settimeout(5)
        try:
            sock.sendall(line_start(str(index)))
            for _ in range(16):
                sock.sendall(chunk)
        except OSError:
            pass  # refused and closed while sending: that is the point
        holders.append(sock)
        peak = max(peak, rss_mib(pid))
    time.sleep(0.5)
    peak = max(peak, rss_mib(pid))
    assert warm.result("ping")["message"] == "pong"  # the server stays responsive
    for sock in holders:
        sock.close()
    deadline = time.monotonic() + 10
    after = rss_mib(pid)
    while after - before > 4 and time.monotonic() < deadline:
        time.sleep(0.2)
        after = rss_mib(pid)
    print(
        f"\n40 x 4 MiB unfinished lines, budget {BUDGET // MiB} MiB: server RSS "
        f"{before:.1f} -> peak {peak:.1f} MiB (+{peak - before:.1f}), "
        f"after closing {after:.1f} MiB"
    )
    assert peak - before < 3 * BUDGET / MiB, f"RSS grew {peak - before:.1f} MiB"
    assert after - before < 4, f"RSS stayed {after - before:.1f} MiB up after the close"
    warm.close()
