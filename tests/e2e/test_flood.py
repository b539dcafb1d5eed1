"""Misbehaving clients against a real server: slow readers and floods stay contained.

- A client that pipelines requests but never reads its replies makes the
  server stop reading from it (flow control), so the server's memory stays
  bounded while other clients are served.
- A client flooding pipelined junk and pings as fast as it can (in another
  process, so it does not share this process's GIL) leaves another client's
  ping p99 under 50 ms: each connection gets a bounded turn per reactor
  iteration.

The measured numbers are printed (run with ``-s`` to see them).
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time

import pytest

from tests.serverproc import ServerProcess

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024


def rss_kib(pid: int) -> int:
    """The resident set size of process C{pid}, in KiB (Linux /proc)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS line")


@pytest.fixture
def server(tmp_path):
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs Linux /proc")
    proc = ServerProcess(tmp_path, tls=False, zmq=False, image=False).start()
    yield proc
    proc.kill()


def test_a_client_that_never_reads_cannot_make_the_server_buffer_without_bound(server):
    pid = server.process.pid
    warm = server.tcp_client()
    for _ in range(50):
        warm.result("ping")
    before = rss_kib(pid)

    hog = socket.create_connection(("127.0.0.1", server.tcp_port), 10)
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    hog.setblocking(False)
    line = b'{"id": 1, "command": "ping"}\n'
    chunk = line * (64 * 1024 // len(line))
    target = 50 * MiB
    sent = 0
    stalled_since = None
    peak = before
    deadline = time.monotonic() + 60
    while sent < target and time.monotonic() < deadline:
        _, writable, _ = select.select([], [hog], [], 0.2)
        if writable:
            try:
                sent += hog.send(chunk)
                stalled_since = None
                continue
            except BlockingIOError:
                pass
        stalled_since = stalled_since or time.monotonic()
        peak = max(peak, rss_kib(pid))
        if time.monotonic() - stalled_since > 3:
            break  # the server stopped reading from us: flow control works

    # Other clients are still served while the hog sits there.
    other = server.tcp_client(timeout=5)
    started = time.perf_counter()
    assert other.result("ping")["message"] == "pong"
    other_ms = (time.perf_counter() - started) * 1000
    peak = max(peak, rss_kib(pid))
    growth_mib = (peak - before) / 1024
    print(
        f"\nslow reader: sent {sent / MiB:.1f} MiB of pings before the server stopped reading; "
        f"server RSS {before / 1024:.1f} -> peak {peak / 1024:.1f} MiB (+{growth_mib:.1f}); "
        f"another client's ping took {other_ms:.1f} ms"
    )
    assert sent < target, "the server kept reading 50 MiB from a client that reads nothing"
    assert growth_mib < 64, f"server RSS grew {growth_mib:.1f} MiB for one slow reader"
    hog.close()
    other.close()
    warm.close()


FLOODER = r"""
import signal, socket, sys, threading, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(True))  # the measurement is over
sock = socket.create_connection(("127.0.0.1", port))
def drain():
    try:
        while sock.recv(1 << 20):
            pass
    except OSError:
        pass
threading.Thread(target=drain, daemon=True).start()
batch = (b'{"id": 1, "command": "ping"}\n' + b'not json at all\n' + b'{"command": 42}\n'
         + b'[[[[[[[[[[]]]]]]]]]]\n' + b'{"command": "nope", "parameters": {"x": "' + b'y' * 200
         + b'"}}\n') * 200
sent = 0
end = time.monotonic() + seconds
print("ready", flush=True)
while not stop and time.monotonic() < end:
    sock.sendall(batch)
    sent += len(batch)
print(sent, flush=True)
sock.close()
"""


def test_a_flooding_client_leaves_others_p99_ping_under_50ms(server):
    flood_seconds = 15.0
    flooder = subprocess.Popen(
        [sys.executable, "-c", FLOODER, str(server.tcp_port), str(flood_seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert flooder.stdout.readline().strip() == "ready"
        flood_started = time.monotonic()
        time.sleep(1.0)  # let the flood build up
        client = server.tcp_client(timeout=5)
        latencies = []
        deadline = time.monotonic() + flood_seconds - 3
        while len(latencies) < 1000 and time.monotonic() < deadline:
            started = time.perf_counter()
            reply = client.call("ping")
            latencies.append((time.perf_counter() - started) * 1000)
            assert reply["status"] == "success"
            time.sleep(0.002)
        flood_alive = flooder.poll() is None
        client.close()
        flooder.terminate()  # the flood lasted the whole measurement; no need to wait it out
        sent = int(flooder.communicate(timeout=flood_seconds + 30)[0].strip() or 0)
        flooded = time.monotonic() - flood_started
    finally:
        flooder.kill()
        flooder.wait(10)
    latencies.sort()
    p50 = latencies[len(latencies) // 2]
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    print(
        f"\nflood: flooder sent {sent / MiB:.0f} MiB in {flooded:.1f} s; "
        f"{len(latencies)} pings from another client: p50 {p50:.2f} ms, p99 {p99:.2f} ms, "
        f"max {latencies[-1]:.2f} ms"
    )
    assert flood_alive, "the flood ended before the measurement did"
    assert len(latencies) >= 200
    assert p99 < 50, f"p99 ping latency under flood was {p99:.1f} ms"
    log = server.log_text()
    assert "Traceback" not in log


def test_flood_reply_counts_are_exact(server):
    """Pipelined junk still gets exactly one reply per line, in order."""
    client = server.tcp_client()
    lines = []
    for i in range(2000):
        lines.append(json.dumps({"id": i, "command": "ping"}).encode())
        lines.append(b"junk " + str(i).encode())
    client.send_raw(b"\n".join(lines) + b"\n")
    replies = [client.read_reply() for _ in range(len(lines))]
    assert [r["id"] for r in replies[0::2]] == list(range(2000))
    assert all(r["error_type"] == "InvalidRequest" for r in replies[1::2])
    client.close()
