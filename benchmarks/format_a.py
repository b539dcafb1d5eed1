"""Format A ``Ping`` against flat ``ping``, over TCP and ZeroMQ, from the same run.

The Rust client's envelope (stui-compat.md §1) is parsed and shaped by
:mod:`stui_twisted.protocol.format_a`; the target is a Format A ``Ping`` at
most 1.3× a flat ``ping`` (median).  Requests alternate in blocks between the
two (see :func:`benchmarks.common.interleaved`), on one connection each.

Standalone: ``python -m benchmarks.format_a [--requests N]``.
"""

from __future__ import annotations

import argparse
import json
import time

from benchmarks.common import (
    Series,
    ZmqClient,
    affinity_of,
    compare,
    interleaved,
    pin_to_cpu,
    start_stui,
    tcp_client,
)

FLAT = json.dumps({"id": 1, "command": "ping", "parameters": {}}).encode()
FORMAT_A = json.dumps(
    {
        "id": "550e8400-e29b-41d4-a716-446655440000",
        "version": "1.0.0",
        "timestamp": "2025-01-20T10:30:00Z",
        "payload": {"type": "Request", "data": {"request_type": "Ping", "params": {}}},
    }
).encode()


def run(requests: int = 5000, warmup: int = 500) -> dict:
    """Measure; returns {"rows": [...], "series": {...}, "pinning": {...}}."""
    pin_to_cpu()
    server = start_stui("format-a", image=True)
    try:
        flat_tcp = tcp_client(server.tcp_port)
        a_tcp = tcp_client(server.tcp_port)

        def tcp_runner(client, payload: bytes, expect: bytes):
            line = payload + b"\n"

            def one() -> float:
                started = time.perf_counter()
                client.send_raw(line)
                reply = client.read_line()
                elapsed = time.perf_counter() - started
                if expect not in reply:
                    raise ValueError(reply)
                return elapsed

            return one

        tcp = interleaved(
            {
                "Format A Ping (TCP)": tcp_runner(a_tcp, FORMAT_A, b'"status":"ready"'),
                "flat ping (TCP)": tcp_runner(flat_tcp, FLAT, b'"success"'),
            },
            requests,
            warmup,
        )
        flat_zmq = ZmqClient(server.zmq_url)
        a_zmq = ZmqClient(server.zmq_url)

        def zmq_runner(client, payload: bytes, expect: bytes):
            def one() -> float:
                elapsed, reply = client.timed(payload)
                if expect not in reply:
                    raise ValueError(reply)
                return elapsed

            return one

        zmq = interleaved(
            {
                "Format A Ping (ZeroMQ)": zmq_runner(a_zmq, FORMAT_A, b'"status":"ready"'),
                "flat ping (ZeroMQ)": zmq_runner(flat_zmq, FLAT, b'"success"'),
            },
            requests,
            warmup,
        )
        pinning = {"client": sorted(affinity_of(0)), "stui": affinity_of(server.process.pid)}
        for client in (flat_tcp, a_tcp, flat_zmq, a_zmq):
            client.close()
    finally:
        server.kill()
    series: dict[str, Series] = {**tcp, **zmq}
    rows = [
        compare(
            "Format A Ping over TCP",
            tcp["Format A Ping (TCP)"],
            tcp["flat ping (TCP)"],
            target="median ≤ 1.3× flat ping",
        ),
        compare(
            "Format A Ping over ZeroMQ",
            zmq["Format A Ping (ZeroMQ)"],
            zmq["flat ping (ZeroMQ)"],
            target="median ≤ 1.3× flat ping",
        ),
    ]
    return {"rows": rows, "series": series, "pinning": pinning}


def main() -> None:
    """Print the rows as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=5000)
    args = parser.parse_args()
    result = run(args.requests)
    print(json.dumps({"rows": result["rows"], "pinning": result["pinning"]}, indent=2))


if __name__ == "__main__":
    main()
