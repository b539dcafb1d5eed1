"""``evaluate('1+1')`` round trips and throughput (issue 4), beside Jupyter.

- sequential: stui over TCP and over ZeroMQ, interleaved in blocks with an
  ipykernel ``execute_request`` round trip (``jupyter_client``
  BlockingKernelClient; the clock stops at the kernel's ``status: idle`` for
  that request, which is what a Jupyter frontend waits for);
- 8 concurrent sessions (8 connections / 8 DEALER identities, one session
  each, one evaluation in flight per session) over TCP and ZeroMQ;
- throughput with 1, 8 and 64 concurrent sessions over TCP, beside ``ping``
  throughput with the same number of connections (what the transport and
  dispatcher alone can do on this CPU).

Standalone: ``python -m benchmarks.evaluate [--requests N]``.

Several source trees can be compared in one run (issue 21), as in
L{benchmarks.create_batch}: each C{--tree} gets a fresh server per round, the
trees alternating; each round runs the sequential series (Jupyter beside it)
and then measures the CPU that server and image spend per evaluation
(C{/proc/<pid>/task/*/schedstat}, every thread)::

    python -m benchmarks.evaluate --tree /tmp/base --tree . --rounds 3 --requests 2000
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import time

from benchmarks.aclient import Conn
from benchmarks.common import (
    Series,
    ZmqClient,
    compare,
    interleaved,
    pin_to_cpu,
    server_pids,
    start_stui,
    tcp_client,
    timed_call,
)

CODE = "1+1"


class JupyterReference:
    """An ipykernel started through jupyter_client, timed per execute_request."""

    def __init__(self) -> None:
        from jupyter_client.manager import start_new_kernel

        self.manager, self.client = start_new_kernel(kernel_name="python3")

    def round_trip(self) -> float:
        """Seconds from sending execute_request to this request's status: idle."""
        started = time.perf_counter()
        msg_id = self.client.execute(CODE)
        while True:
            msg = self.client.get_iopub_msg(timeout=30)
            if (
                msg["parent_header"].get("msg_id") == msg_id
                and msg["msg_type"] == "status"
                and msg["content"]["execution_state"] == "idle"
            ):
                break
        elapsed = time.perf_counter() - started
        # the shell reply is part of the protocol too; drain it (not timed)
        self.client.get_shell_msg(timeout=30)
        return elapsed

    def pid(self) -> int | None:
        """The kernel's pid (for the record)."""
        provisioner = getattr(self.manager, "provisioner", None)
        process = getattr(provisioner, "process", None)
        return getattr(process, "pid", None)

    def stop(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


def sequential(server, requests: int, warmup: int) -> tuple[dict[str, Series], dict]:
    """stui TCP, stui ZeroMQ and Jupyter, one request at a time, interleaved."""
    tcp = tcp_client(server.tcp_port)
    sid = tcp.result("create_session", client_id="bench-seq")["session_id"]
    zmq_client = ZmqClient(server.zmq_url)
    zsid = zmq_client.call("create_session", client_id="bench-seq-zmq")["result"]["session_id"]
    zmq_payload = json.dumps(
        {"id": 1, "command": "evaluate", "parameters": {"session_id": zsid, "code": CODE}}
    ).encode()

    def over_tcp() -> float:
        elapsed, reply = timed_call(tcp, "evaluate", session_id=sid, code=CODE)
        if reply.get("status") != "success" or reply["result"]["result"] != "2":
            raise ValueError(reply)
        return elapsed

    def over_zmq() -> float:
        elapsed, reply = zmq_client.timed(zmq_payload)
        if b'"success"' not in reply:
            raise ValueError(reply)
        return elapsed

    runners = {"stui evaluate (TCP)": over_tcp, "stui evaluate (ZeroMQ)": over_zmq}
    info: dict = {}
    jupyter = None
    try:
        jupyter = JupyterReference()
        runners["ipykernel execute_request → idle"] = jupyter.round_trip
        import ipykernel

        info["ipykernel"] = ipykernel.__version__
    except Exception as exc:  # noqa: BLE001 - the reference is optional; say why it is missing
        info["jupyter_error"] = f"{type(exc).__name__}: {exc}"
    try:
        series = interleaved(runners, requests, warmup)
    finally:
        if jupyter is not None:
            jupyter.stop()
        tcp.close()
        zmq_client.close()
    return series, info


async def _tcp_workers(
    port: int, sessions: int, total: int, command: str, prefix: str
) -> tuple[Series, float]:
    """C{sessions} connections, each with its own session, C{total} calls in all."""
    conns = [await Conn.open(port) for _ in range(sessions)]
    sids = []
    for i, conn in enumerate(conns):
        reply = await conn.call("create_session", client_id=f"{prefix}-{i}")
        sids.append(reply["result"]["session_id"])
    params = (
        (lambda sid: {"session_id": sid, "code": CODE})
        if command == "evaluate"
        else (lambda sid: {})
    )
    for conn, sid in zip(conns, sids, strict=True):  # warm-up: materialize every session
        await conn.call(command, **params(sid))
    series = Series(f"{command} x{sessions}")
    per_worker = max(1, total // sessions)

    async def worker(conn: Conn, sid: str) -> None:
        for _ in range(per_worker):
            try:
                elapsed, reply = await conn.timed(command, **params(sid))
            except (TimeoutError, ConnectionError):
                series.errors += 1
                continue
            if reply.get("status") == "success":
                series.samples.append(elapsed)
            else:
                series.errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(c, s) for c, s in zip(conns, sids, strict=True)))
    wall = time.perf_counter() - started
    for conn in conns:
        await conn.close()
    return series, wall


async def _zmq_workers(url: str, sessions: int, total: int, prefix: str) -> tuple[Series, float]:
    """C{sessions} DEALER identities, each with its own session, evaluating."""
    import zmq
    import zmq.asyncio

    context = zmq.asyncio.Context.instance()
    sockets = []
    for _ in range(sessions):
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(url)
        sockets.append(sock)

    async def call(sock, command: str, **params) -> dict:
        await sock.send_multipart(
            [b"", json.dumps({"id": 1, "command": command, "parameters": params}).encode()]
        )
        frames = await asyncio.wait_for(sock.recv_multipart(), 60)
        return json.loads(frames[-1])

    sids = [
        (await call(s, "create_session", client_id=f"{prefix}-{i}"))["result"]["session_id"]
        for i, s in enumerate(sockets)
    ]
    for sock, sid in zip(sockets, sids, strict=True):
        await call(sock, "evaluate", session_id=sid, code=CODE)
    series = Series(f"evaluate x{sessions} (ZeroMQ)")
    per_worker = max(1, total // sessions)

    async def worker(sock, sid: str) -> None:
        for _ in range(per_worker):
            started = time.perf_counter()
            try:
                reply = await call(sock, "evaluate", session_id=sid, code=CODE)
            except TimeoutError:
                series.errors += 1
                continue
            if reply.get("status") == "success":
                series.samples.append(time.perf_counter() - started)
            else:
                series.errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(s, sid) for s, sid in zip(sockets, sids, strict=True)))
    wall = time.perf_counter() - started
    for sock in sockets:
        sock.close()
    return series, wall


def run(requests: int = 5000, warmup: int = 300, throughput_requests: int | None = None) -> dict:
    """Every evaluate figure with its reference; rows + series + throughput table."""
    pin_to_cpu()
    throughput_requests = throughput_requests or requests
    server = start_stui(
        "evaluate",
        "--max-sessions-per-client=1000",
        "--create-rate-limit=100000",
        "--max-connections=5000",
    )
    rows, all_series, throughput = [], {}, []
    try:
        seq, info = sequential(server, requests, warmup)
        all_series.update(seq)
        jupyter = seq.get("ipykernel execute_request → idle")
        for name, transport in (
            ("stui evaluate (TCP)", "TCP"),
            ("stui evaluate (ZeroMQ)", "ZeroMQ"),
        ):
            if jupyter is not None:
                rows.append(
                    compare(
                        f"evaluate('1+1') sequential, {transport}",
                        seq[name],
                        jupyter,
                        target="median ≤ 0.15× Jupyter",
                    )
                )
        # 8 concurrent sessions: latency under contention, TCP and ZeroMQ
        c8_tcp, _ = asyncio.run(_tcp_workers(server.tcp_port, 8, requests, "evaluate", "bench-c8"))
        c8_tcp.name = "stui evaluate, 8 concurrent sessions (TCP)"
        c8_zmq, _ = asyncio.run(_zmq_workers(server.zmq_url, 8, requests, "bench-c8z"))
        c8_zmq.name = "stui evaluate, 8 concurrent sessions (ZeroMQ)"
        all_series[c8_tcp.name] = c8_tcp
        all_series[c8_zmq.name] = c8_zmq
        rows.append(
            compare(
                "evaluate, 8 concurrent sessions, TCP (vs sequential TCP)",
                c8_tcp,
                seq["stui evaluate (TCP)"],
            )
        )
        rows.append(
            compare(
                "evaluate, 8 concurrent sessions, ZeroMQ (vs sequential ZeroMQ)",
                c8_zmq,
                seq["stui evaluate (ZeroMQ)"],
            )
        )
        for sessions in (1, 8, 64):
            ev, ev_wall = asyncio.run(
                _tcp_workers(
                    server.tcp_port, sessions, throughput_requests, "evaluate", f"bench-t{sessions}"
                )
            )
            pg, pg_wall = asyncio.run(
                _tcp_workers(
                    server.tcp_port, sessions, throughput_requests, "ping", f"bench-p{sessions}"
                )
            )
            all_series[f"evaluate throughput x{sessions}"] = ev
            throughput.append(
                {
                    "sessions": sessions,
                    "evaluate_per_s": round(len(ev.samples) / ev_wall, 1),
                    "evaluate": ev.summary(),
                    "ping_per_s": round(len(pg.samples) / pg_wall, 1),
                    "ping": pg.summary(),
                }
            )
    finally:
        server.kill()
    return {"rows": rows, "series": all_series, "throughput": throughput, "info": info}


def _cpu_ns(pid: int) -> int:
    """CPU time of every thread of C{pid} so far (ns, from schedstat)."""
    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(path) as stat:
                total += int(stat.read().split()[0])
        except OSError:
            continue  # a thread that ended meanwhile
    return total


def cpu_per_evaluation(server, requests: int, warmup: int = 300) -> dict:
    """Server and image CPU (µs) per C{evaluate('1+1')} over TCP, C{requests} back to back."""
    tcp = tcp_client(server.tcp_port)
    try:
        sid = tcp.result("create_session", client_id="bench-cpu")["session_id"]
        for _ in range(warmup):
            timed_call(tcp, "evaluate", session_id=sid, code=CODE)
        server_pid, *image_pids = server_pids(server)
        before = _cpu_ns(server_pid), sum(_cpu_ns(pid) for pid in image_pids)
        for _ in range(requests):
            timed_call(tcp, "evaluate", session_id=sid, code=CODE)
        after = _cpu_ns(server_pid), sum(_cpu_ns(pid) for pid in image_pids)
    finally:
        tcp.close()
    return {
        "server_cpu_us": round((after[0] - before[0]) / requests / 1e3, 1),
        "image_cpu_us": round((after[1] - before[1]) / requests / 1e3, 1),
    }


def compare_trees(trees: list[str], rounds: int, requests: int, warmup: int) -> list[dict]:
    """One fresh server per tree and round, the trees alternating; a row per server."""
    rows = []
    for round_number in range(rounds):
        for tree in trees:
            os.environ["STUI_BENCH_TREE"] = os.path.abspath(tree)
            server = start_stui("evaluate-ab")
            try:
                series, info = sequential(server, requests, warmup)
                cpu = cpu_per_evaluation(server, requests)
            finally:
                server.kill()
            summary = {name: s.summary() for name, s in series.items()}
            tcp, zmq_ = summary["stui evaluate (TCP)"], summary["stui evaluate (ZeroMQ)"]
            jupyter = summary.get("ipykernel execute_request → idle", {})
            row = {
                "round": round_number,
                "tree": tree,
                "tcp_median_us": tcp["median_us"],
                "tcp_p99_us": tcp["p99_us"],
                "zmq_median_us": zmq_["median_us"],
                "jupyter_median_us": jupyter.get("median_us"),
                "jupyter_p99_us": jupyter.get("p99_us"),
                "tcp_ratio": (
                    round(tcp["median_us"] / jupyter["median_us"], 3) if jupyter else None
                ),
                "errors": tcp["errors"] + zmq_["errors"],
                **cpu,
                **info,
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main() -> None:
    """Print rows and throughput (or, with C{--tree}, one row per tree and round)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--tree", action="append", help="source tree of the server (repeatable)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.tree:
        pin_to_cpu()
        compare_trees(args.tree, args.rounds, args.requests, args.warmup)
        return
    result = run(args.requests)
    for row in result["rows"]:
        m, r = row["measured"], row["reference"]
        print(
            f"{row['name']:60s} median {m.get('median_us')}us p99 {m.get('p99_us')}us err {m.get('errors')} "
            f"| {row['reference_label']}: {r.get('median_us')}us p99 {r.get('p99_us')}us ratio {row['median_ratio']}"
        )
    print(json.dumps(result["throughput"], indent=1))
    print(result["info"])


if __name__ == "__main__":
    main()
