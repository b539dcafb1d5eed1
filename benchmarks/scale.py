"""Scale: 1,000 connections, 10,000 idle sessions, a session with 1 MB of bindings.

- 1,000 concurrent TCP connections, each sending C{pings} pings one after the
  other, all connections at once; errors (refused, closed, timed out, error
  replies) and latency, beside the same load on the Twisted floor server.
- 10,000 sessions created (batch durability), then idle: RSS of the server
  and its image, beside the same processes' RSS before the first session.
- ``restore_session`` of a session holding ~1 MB of bindings: warm (in
  memory, re-materialized in the image on each restore) interleaved with the
  restore of an empty session, and cold (first restore after a restart, body
  read from disk);
- ``evaluate('1+1')`` and a tiny ``update_session_state`` in that session,
  beside the same requests in an empty session (per-request cost that grows
  with the session's size).

Standalone: ``python -m benchmarks.scale [--connections N] [--sessions N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from benchmarks.aclient import Conn
from benchmarks.common import (
    FloorServer,
    Series,
    compare,
    interleaved,
    pin_to_cpu,
    rss_bytes,
    server_pids,
    start_stui,
    tcp_client,
    timed_call,
    wait_image_running,
)

BIG_BINDINGS = "data = {f'k{i:05d}': 'v' * 90 for i in range(10_000)}"


async def _many_connections(port: int, connections: int, pings: int, label: str) -> dict:
    """Open C{connections} at once, each pings C{pings} times; latency and errors."""
    series = Series(label)
    errors: dict[str, int] = {}

    def error(kind: str) -> None:
        errors[kind] = errors.get(kind, 0) + 1
        series.errors += 1

    async def one(index: int) -> None:
        try:
            conn = await Conn.open(port, timeout=60)
        except (OSError, TimeoutError) as exc:
            error(f"connect: {type(exc).__name__}")
            return
        try:
            await conn.call("ping", timeout=60)  # warm-up
            for _ in range(pings):
                elapsed, reply = await conn.timed("ping")
                if reply.get("status") == "success":
                    series.samples.append(elapsed)
                else:
                    error(reply.get("error_type", "error reply"))
        except (OSError, TimeoutError, ConnectionError) as exc:
            error(f"during pings: {type(exc).__name__}")
        finally:
            await conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(connections)))
    wall = time.perf_counter() - started
    return {"series": series, "errors_by_kind": errors, "wall_s": round(wall, 2)}


def connections_benchmark(connections: int, pings: int) -> tuple[list[dict], dict]:
    """stui and the floor under the same 1,000-connection ping load."""
    server = start_stui(
        "scale-conns", f"--max-connections={connections * 2}", image=True, zmq=False
    )
    floor = FloorServer().start()
    try:
        stui = asyncio.run(
            _many_connections(
                server.tcp_port, connections, pings, f"stui ping, {connections} connections"
            )
        )
        ref = asyncio.run(
            _many_connections(
                floor.tcp_port, connections, pings, f"floor ping, {connections} connections"
            )
        )
        server_rss = sum(rss_bytes(pid) for pid in server_pids(server))
    finally:
        server.kill()
        floor.stop()
    row = compare(
        f"ping, {connections} concurrent connections × {pings}",
        stui["series"],
        ref["series"],
        target="0 errors",
        errors_by_kind=stui["errors_by_kind"],
        reference_errors_by_kind=ref["errors_by_kind"],
        wall_s=stui["wall_s"],
        reference_wall_s=ref["wall_s"],
        server_rss_bytes=server_rss,
    )
    return [row], {stui["series"].name: stui["series"], ref["series"].name: ref["series"]}


async def _create_sessions(
    port: int, sessions: int, connections: int = 16, depth: int = 8
) -> Series:
    """Create C{sessions} sessions over C{connections} connections, C{depth} in flight on each."""
    conns = [await Conn.open(port) for _ in range(connections)]
    series = Series("create_session (10k run)")
    counter = iter(range(sessions))

    async def worker(conn: Conn) -> None:
        for i in counter:
            elapsed, reply = await conn.timed("create_session", client_id=f"idle-{i % 1000}")
            if reply.get("status") == "success":
                series.samples.append(elapsed)
            else:
                series.errors += 1

    await asyncio.gather(*(worker(c) for c in conns for _ in range(depth)))
    for conn in conns:
        await conn.close()
    return series


def idle_sessions_benchmark(sessions: int, probes: int = 500) -> tuple[list[dict], dict]:
    """RSS of server + image before and after C{sessions} idle sessions."""
    server = start_stui(
        "scale-idle",
        "--max-sessions-per-client=100000",
        "--create-rate-limit=100000000",
        "--max-connections=5000",
        image=True,
        zmq=False,
    )

    def sequential_creates(client, label: str) -> Series:
        series = Series(label)
        for i in range(probes + 50):
            elapsed, reply = timed_call(
                client, "create_session", client_id=f"probe-{label[:5]}-{i % 50}"
            )
            if reply.get("status") != "success":
                series.errors += 1
            elif i >= 50:
                series.samples.append(elapsed)
        return series

    try:
        probe = tcp_client(server.tcp_port)
        probe.result("ping")
        time.sleep(1.0)
        pids = server_pids(server)
        empty = sequential_creates(probe, "create_session, few sessions on the server")
        before = {pid: rss_bytes(pid) for pid in pids}  # with the probes' few sessions
        started = time.perf_counter()
        created = asyncio.run(_create_sessions(server.tcp_port, sessions))
        create_wall = time.perf_counter() - started
        time.sleep(3.0)  # batch flushes, then idle
        stats = probe.result("get_session_statistics")
        after = {pid: rss_bytes(pid) for pid in pids}
        full = sequential_creates(probe, f"create_session, {sessions} sessions on the server")
        probe.close()
    finally:
        server.kill()
    total_before, total_after = sum(before.values()), sum(after.values())
    row = {
        "name": f"{sessions} idle sessions: RSS of server + image",
        "measured_label": f"after {sessions} sessions",
        "reference_label": "same processes before the first session",
        "rss_before_bytes": before,
        "rss_after_bytes": after,
        "total_before_mib": round(total_before / 2**20, 1),
        "total_after_mib": round(total_after / 2**20, 1),
        "per_session_bytes": round((total_after - total_before) / max(1, sessions)),
        "sessions_created": len(created.samples),
        "create_errors": created.errors,
        "create_per_s": round(len(created.samples) / create_wall, 1),
        "create_latency": created.summary(),
        "active_sessions": stats.get("active_sessions"),
        "storage": stats.get("storage"),
        "target": "total ≤ 300 MB",
    }
    growth = compare(
        f"create_session (sequential, batch) with {sessions} sessions vs few",
        full,
        empty,
        note="create_session counts the client's active sessions by scanning every session",
    )
    return [row, growth], {created.name: created, empty.name: empty, full.name: full}


def big_restore_benchmark(requests: int, warmup: int, cold_runs: int) -> tuple[list[dict], dict]:
    """Restore a ~1 MB-bindings session (warm and cold) beside an empty session."""
    server = start_stui("scale-big", "--max-sessions-per-client=100", image=True, zmq=False)
    rows, series = [], {}
    try:
        client = tcp_client(server.tcp_port)
        big = client.result("create_session", client_id="big")["session_id"]
        client.result("evaluate", session_id=big, code=BIG_BINDINGS)
        saved = client.result("save_context", session_id=big)
        small = client.result("create_session", client_id="big")["session_id"]
        client.result("save_context", session_id=small)

        def restorer(sid: str):
            def one() -> float:
                elapsed, reply = timed_call(
                    client, "restore_session", session_id=sid, client_id="big"
                )
                if reply.get("status") != "success":
                    raise ValueError(reply)
                return elapsed

            return one

        warm = interleaved(
            {
                "restore 1 MB bindings (warm)": restorer(big),
                "restore empty session (warm)": restorer(small),
            },
            requests,
            warmup,
        )
        series.update(warm)
        rows.append(
            compare(
                "restore_session, ~1 MB of bindings, warm",
                warm["restore 1 MB bindings (warm)"],
                warm["restore empty session (warm)"],
                file_bytes=saved.get("size_bytes"),
            )
        )

        def evaluator(sid: str):
            def one() -> float:
                elapsed, reply = timed_call(client, "evaluate", session_id=sid, code="1+1")
                if reply.get("status") != "success":
                    raise ValueError(reply)
                return elapsed

            return one

        def updater(sid: str):
            def one() -> float:
                elapsed, reply = timed_call(
                    client, "update_session_state", session_id=sid, state_data={"n": 1}
                )
                if reply.get("status") != "success":
                    raise ValueError(reply)
                return elapsed

            return one

        # Per-request cost that grows with the session: evaluate and a tiny
        # update in the 1 MB session, beside the same in the empty one.
        grow = interleaved(
            {
                "evaluate 1+1 in 1 MB session": evaluator(big),
                "evaluate 1+1 in empty session": evaluator(small),
                "tiny update in 1 MB session": updater(big),
                "tiny update in empty session": updater(small),
            },
            requests,
            warmup,
        )
        series.update(grow)
        rows.append(
            compare(
                "evaluate('1+1') in a session with ~1 MB of bindings",
                grow["evaluate 1+1 in 1 MB session"],
                grow["evaluate 1+1 in empty session"],
            )
        )
        rows.append(
            compare(
                "update_session_state (tiny) in a session with ~1 MB of bindings",
                grow["tiny update in 1 MB session"],
                grow["tiny update in empty session"],
            )
        )
        client.close()
        cold_big, cold_small = (
            Series("restore 1 MB bindings (cold, after restart)"),
            Series("restore empty (cold)"),
        )
        for run in range(cold_runs):
            server.stop()
            server.start(timeout=60)
            wait_image_running(server)
            client = tcp_client(server.tcp_port)
            order = ((big, cold_big), (small, cold_small))
            for sid, s in order if run % 2 else reversed(order):
                elapsed, reply = timed_call(
                    client, "restore_session", session_id=sid, client_id="big"
                )
                if (
                    reply.get("status") == "success"
                    and reply["result"]["restored_bindings"]
                    or sid == small
                ):
                    s.samples.append(elapsed)
                else:
                    s.errors += 1
            client.close()
        series.update({cold_big.name: cold_big, cold_small.name: cold_small})
        rows.append(
            compare(
                "restore_session, ~1 MB of bindings, cold (first after restart)",
                cold_big,
                cold_small,
                note=f"{cold_runs} restarts",
            )
        )
    finally:
        server.kill()
    return rows, series


def run(
    connections: int = 1000,
    pings: int = 10,
    sessions: int = 10_000,
    requests: int = 1000,
    warmup: int = 50,
    cold_runs: int = 5,
) -> dict:
    """All three scale figures."""
    pin_to_cpu()
    rows, series = [], {}
    for part in (
        lambda: connections_benchmark(connections, pings),
        lambda: idle_sessions_benchmark(sessions),
        lambda: big_restore_benchmark(requests, warmup, cold_runs),
    ):
        r, s = part()
        rows.extend(r)
        series.update(s)
    return {"rows": rows, "series": series}


def main() -> None:
    """Print the rows as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--pings", type=int, default=10)
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args()
    result = run(args.connections, args.pings, args.sessions, args.requests)
    print(json.dumps(result["rows"], indent=1))


if __name__ == "__main__":
    main()
