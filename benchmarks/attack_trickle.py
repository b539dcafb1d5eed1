"""Attack: many clients trickle small segments onto long unfinished lines.

Each attacker connection first sends the start of a request line of
``--partial-mib`` MiB (no newline), then keeps adding ``--segment``-byte
segments, one per connection every ``--interval`` seconds (TCP_NODELAY, so
each segment is its own read on the server).  A server that re-scans its
whole buffer on every read (Twisted's ``LineReceiver``) spends
O(line length) per segment; one that scans only new bytes spends O(segment).

Meanwhile another client (in this process; the attackers run in a child
process so they do not share its GIL) pings the server and the ping latency
percentiles are reported, before and during the attack::

    .venv/bin/python -m benchmarks.attack_trickle                # 40 attackers, 5 MiB lines
    STUI_BENCH_TREE=/tmp/old-tree .venv/bin/python -m benchmarks.attack_trickle   # another tree

(``STUI_BENCH_TREE``: run the server from another source tree, e.g.
``git archive <commit> stui_twisted twisted tests | tar -x -C /tmp/old-tree``.)
The numbers are in docs/security.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from benchmarks.common import percentile, start_stui, tcp_client


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """Resident set size of C{pid} (Linux /proc; no psutil needed)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def vmhwm_mib(pid: int) -> float:
    """Peak resident set size of C{pid} since it started (C{VmHWM})."""
    return rss_mib(pid, "VmHWM")


ATTACKER = r"""
import signal, socket, sys, time
port, count, partial, segment, interval, seconds = (
    int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]),
    float(sys.argv[5]), float(sys.argv[6]))
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(True))  # the measurement is over
socks = []
head = b'{"id": 1, "command": "ping", "parameters": {"pad": "'
for _ in range(count):
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(head + b"x" * (partial - len(head)))
    socks.append(sock)
print("ready", flush=True)
piece = b"y" * segment
sent = 0
end = time.monotonic() + seconds
while not stop and time.monotonic() < end:
    started = time.monotonic()
    for sock in socks:
        sock.sendall(piece)
        sent += 1
    time.sleep(max(0.0, interval - (time.monotonic() - started)))
print(sent, flush=True)
"""


def ping_latencies(client, seconds: float, limit: int = 2000) -> list[float]:
    latencies = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(latencies) < limit:
        started = time.perf_counter()
        reply = client.call("ping")
        latencies.append((time.perf_counter() - started) * 1000)
        assert reply["status"] == "success", reply
        time.sleep(0.002)
    return sorted(latencies)


def summary(latencies: list[float]) -> dict:
    return {
        "count": len(latencies),
        "p50_ms": round(percentile(latencies, 0.50), 2),
        "p99_ms": round(percentile(latencies, 0.99), 2),
        "max_ms": round(latencies[-1], 2),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attackers", type=int, default=40)
    parser.add_argument("--partial-mib", type=float, default=5.0)
    parser.add_argument("--segment", type=int, default=100, help="bytes per trickled segment")
    parser.add_argument(
        "--interval", type=float, default=0.01, help="s between segments per connection"
    )
    parser.add_argument("--seconds", type=float, default=15.0, help="length of the trickle")
    args = parser.parse_args(argv)

    server = start_stui("trickle", image=False, zmq=False)
    try:
        client = tcp_client(server.tcp_port)
        baseline = summary(ping_latencies(client, 3.0))
        before = rss_mib(server.process.pid)
        partial = int(args.partial_mib * 1024 * 1024)
        attacker = subprocess.Popen(
            [
                sys.executable,
                "-c",
                ATTACKER,
                str(server.tcp_port),
                str(args.attackers),
                str(partial),
                str(args.segment),
                str(args.interval),
                str(args.seconds),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            built = time.monotonic()
            assert attacker.stdout.readline().strip() == "ready"
            build_s = time.monotonic() - built
            time.sleep(1.0)  # let the trickle get going
            during = summary(ping_latencies(client, args.seconds - 3))
            rss = rss_mib(server.process.pid)
            peak = vmhwm_mib(server.process.pid)
            segments = int(attacker.communicate(timeout=args.seconds + 120)[0].strip() or 0)
        finally:
            attacker.kill()
            attacker.wait(10)
        time.sleep(2.0)  # the attackers' connections are closed: is their memory back?
        client.call("ping")
        after = rss_mib(server.process.pid)
        client.close()
    finally:
        server.kill()
    result = {
        "attack": "trickle",
        "attackers": args.attackers,
        "partial_mib": args.partial_mib,
        "segment_bytes": args.segment,
        "interval_s": args.interval,
        "segments_sent": segments,
        "seconds_to_send_the_partial_lines": round(build_s, 2),
        "server_rss_mib_before": round(before, 1),
        "server_rss_mib_during": round(rss, 1),
        "server_rss_mib_after_close": round(after, 1),
        "server_vmhwm_mib": round(peak, 1),
        "ping_before": baseline,
        "ping_during": during,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
