"""``ping`` latency over TCP and ZeroMQ, each beside its floor from the same run.

TCP: stui's ``ping`` vs :class:`benchmarks.floor.JsonEcho` (a bare Twisted
LineReceiver that json-decodes and -encodes each line).  ZeroMQ: stui's
``ping`` vs a bare txzmq ROUTER echo, and a bare pyzmq ROUTER echo (no
reactor: the limit) in the same blocks.  Requests alternate in blocks between
the server and its floor (see :func:`benchmarks.common.interleaved`).

Standalone: ``python -m benchmarks.ping [--requests N]``.
"""

from __future__ import annotations

import argparse
import json

from benchmarks.common import (
    FloorServer,
    Series,
    ZmqClient,
    affinity_of,
    compare,
    interleaved,
    pin_to_cpu,
    start_stui,
    tcp_client,
    timed_call,
)

PING = json.dumps({"id": 1, "command": "ping", "parameters": {}}).encode()


def run(requests: int = 5000, warmup: int = 500) -> dict:
    """Measure; returns {"rows": [...], "series": {...}, "pinning": {...}}."""
    pin_to_cpu()
    server = start_stui("ping", image=True)
    floor = FloorServer().start()
    bare = FloorServer("pyzmq").start()
    try:
        stui_tcp = tcp_client(server.tcp_port)
        floor_tcp = tcp_client(floor.tcp_port)

        def tcp_runner(client):
            def one() -> float:
                elapsed, reply = timed_call(client, "ping")
                if reply.get("status") != "success":
                    raise ValueError(reply)
                return elapsed

            return one

        tcp = interleaved(
            {
                "stui ping (TCP)": tcp_runner(stui_tcp),
                "Twisted LineReceiver floor": tcp_runner(floor_tcp),
            },
            requests,
            warmup,
        )
        stui_zmq = ZmqClient(server.zmq_url)
        floor_zmq = ZmqClient(floor.zmq_url)
        bare_zmq = ZmqClient(bare.zmq_url)

        def zmq_runner(client, check: bool):
            def one() -> float:
                elapsed, reply = client.timed(PING)
                if check and b'"success"' not in reply:
                    raise ValueError(reply)
                return elapsed

            return one

        zmq = interleaved(
            {
                "stui ping (ZeroMQ)": zmq_runner(stui_zmq, True),
                "txzmq ROUTER echo floor": zmq_runner(floor_zmq, False),
                "pyzmq ROUTER echo (limit)": zmq_runner(bare_zmq, False),
            },
            requests,
            warmup,
        )
        pinning = {
            "client": sorted(affinity_of(0)),
            "stui": affinity_of(server.process.pid),
            "floor": affinity_of(floor.process.pid),
            "pyzmq echo": affinity_of(bare.process.pid),
        }
        for client in (stui_tcp, floor_tcp, stui_zmq, floor_zmq, bare_zmq):
            client.close()
    finally:
        server.kill()
        floor.stop()
        bare.stop()
    series: dict[str, Series] = {**tcp, **zmq}
    rows = [
        compare(
            "ping over TCP",
            tcp["stui ping (TCP)"],
            tcp["Twisted LineReceiver floor"],
            target="median ≤ 1.1× floor",
        ),
        compare(
            "ping over ZeroMQ",
            zmq["stui ping (ZeroMQ)"],
            zmq["txzmq ROUTER echo floor"],
            target="median ≤ 0.9× floor",
        ),
        compare(
            "ping over ZeroMQ, vs the limit",
            zmq["stui ping (ZeroMQ)"],
            zmq["pyzmq ROUTER echo (limit)"],
        ),
        compare(
            "txzmq ROUTER echo vs the limit",
            zmq["txzmq ROUTER echo floor"],
            zmq["pyzmq ROUTER echo (limit)"],
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
