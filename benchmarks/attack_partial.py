"""Attack: many connections each hold a long request line without a newline.

``--connections`` connections (default 150) each send ``--line-mib`` MiB
(default 7.5, under the 8 MiB ``max_message_bytes``) of one request line and
never finish it.  Reported: the server's RSS before, at its peak, and after
the attackers closed; how many attackers the server refused
(``MessageTooLarge`` from the server-wide ``max_partial_input_bytes`` budget,
default 256 MiB); and another client's ping latency while the lines are held::

    .venv/bin/python -m benchmarks.attack_partial
    .venv/bin/python -m benchmarks.attack_partial --budget-mib 64       # a smaller budget
    STUI_BENCH_TREE=/tmp/old-tree .venv/bin/python -m benchmarks.attack_partial --budget-mib 0

(``--budget-mib 0`` passes no budget option, for trees that predate it.)
The numbers are in docs/security.md.
"""

from __future__ import annotations

import argparse
import json
import socket
import time

from benchmarks.attack_trickle import ping_latencies, rss_mib, summary, vmhwm_mib
from benchmarks.common import start_stui, tcp_client

MiB = 1024 * 1024


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=150)
    parser.add_argument("--line-mib", type=float, default=7.5)
    parser.add_argument("--budget-mib", type=int, default=256, help="0: do not pass the option")
    args = parser.parse_args(argv)

    options = [f"--max-partial-input-bytes={args.budget_mib * MiB}"] if args.budget_mib else []
    server = start_stui("partial", *options, image=False, zmq=False)
    pid = server.process.pid
    try:
        client = tcp_client(server.tcp_port)
        client.result("ping")
        before = rss_mib(pid)
        peak = before
        holders = []
        chunk = b"x" * (256 * 1024)
        head = b'{"id": 1, "command": "ping", "parameters": {"pad": "'
        started = time.monotonic()
        for _ in range(args.connections):
            sock = socket.create_connection(("127.0.0.1", server.tcp_port), 30)
            sock.settimeout(30)
            try:
                sock.sendall(head)
                for _ in range(int(args.line_mib * MiB) // len(chunk)):
                    sock.sendall(chunk)
            except OSError:
                pass  # refused by the server while sending
            holders.append(sock)
            peak = max(peak, rss_mib(pid))
        send_s = time.monotonic() - started
        during = summary(ping_latencies(client, 3.0))
        peak = max(peak, rss_mib(pid))
        refused = 0
        for sock in holders:
            sock.settimeout(0.2)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                data = None  # still held by the server
            except OSError:
                data = b""  # reset: the server closed it with input unread
            refused += data is not None and (b"MessageTooLarge" in data or data == b"")
            sock.close()
        time.sleep(2.0)
        after = rss_mib(pid)
        peak_vmhwm = vmhwm_mib(pid)
        client.result("ping")
        client.close()
    finally:
        server.kill()
    result = {
        "attack": "partial lines",
        "connections": args.connections,
        "line_mib": args.line_mib,
        "budget_mib": args.budget_mib or None,
        "offered_mib": round(args.connections * args.line_mib, 1),
        "seconds_to_send": round(send_s, 2),
        "refused_by_the_server": refused,
        "server_rss_mib": {
            "before": round(before, 1),
            "peak": round(peak, 1),
            "after_close": round(after, 1),
            "peak_vmhwm": round(peak_vmhwm, 1),
        },
        "ping_while_held": during,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
