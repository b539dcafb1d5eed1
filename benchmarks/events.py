"""Live events' cost (events.md §6): ``python -m benchmarks.events``.

Four figures, each beside a reference measured in the same run:

- ``evaluate('1+1')`` round trips, in short alternating blocks, on a server of
  a commit before live events (``--reference``, default C{69285b4}), of the
  commit this branch started from (``--baseline``, default the merge base with
  C{main}), and of this
  tree's C{HEAD} with 0 subscribers and with 1 subscriber (a child process
  that reads every event of the session, on another CPU than the server's);
- fan-out: 100 TCP connections subscribed to one session; per evaluation, the
  time from sending C{evaluate} until C{evaluation_finished} reached the first
  and the 100th subscriber (medians over ``--fanout-rounds``);
- 1,000 idle subscribers: the server's RSS before, with 1,000 idle connections,
  and with each of them subscribed to a session;
- a print loop writing 10 MB in one evaluation (100,000 lines of 99
  characters, with one subscriber reading): another client's ``ping``
  p50/p99 (from a child process) and the server's RSS growth (``VmHWM`` after
  minus ``VmRSS`` before), on the reference commit and on C{HEAD}, and ping
  while nothing runs.

Servers run from committed trees (``git archive``), so edits to the working tree
do not change them mid-run.  The client pins itself to CPU 0 first, so every
server and child inherits it (L{benchmarks.common}).  Writes
``benchmarks/results/events-<stamp>.json`` and ``.md``.  About 3-5 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.attacks import Pinger, status_mib
from benchmarks.common import (
    Series,
    affinity_of,
    interleaved,
    pin_to_cpu,
    snapshot_head,
    tcp_client,
    timed_call,
    wait_image_running,
    workdir,
)
from tests.serverproc import ServerProcess

RESULTS = Path(__file__).resolve().parent / "results"
PARTS = ("evaluate", "fanout", "idle", "print")
MiB = 1024 * 1024
PRINT_LOOP = "for i in range(100_000):\n    print('x' * 99)"  # 10,000,000 characters

SUBSCRIBER = r"""
import json, select, socket, sys
port, session_id = int(sys.argv[1]), sys.argv[2]
sock = socket.create_connection(("127.0.0.1", port), 30)
request = {"id": "s", "command": "subscribe",
           "parameters": {"session_id": session_id, "client_id": "bench"}}
sock.sendall(json.dumps(request).encode() + b"\n")
buffer, events, answered = b"", 0, False
while True:
    ready = select.select([sock, sys.stdin], [], [], 30)[0]
    if sys.stdin in ready or not ready:
        break
    chunk = sock.recv(1 << 20)
    if not chunk:
        break
    buffer += chunk
    *lines, buffer = buffer.split(b"\n")
    for line in lines:
        if b'"event"' in line[:12]:
            events += 1
        elif not answered:
            answered = True
            print("ready", flush=True)
print(json.dumps({"events": events}), flush=True)
"""


def subscriber_cpus() -> set[int]:
    """Where a subscriber (another client) runs: off the server's CPU when there is room."""
    others = set(range(os.cpu_count() or 1)) - os.sched_getaffinity(0)
    return others or os.sched_getaffinity(0)


class Subscriber:
    """A child process subscribed to one session, reading (and counting) its events.

    It is another client: it runs on L{subscriber_cpus}, so the CPU it spends
    reading is not taken from the server's.
    """

    def __init__(self, port: int, session_id: str) -> None:
        cpus = subscriber_cpus()
        self.process = subprocess.Popen(
            [sys.executable, "-c", SUBSCRIBER, str(port), session_id],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: os.sched_setaffinity(0, cpus),
        )
        if self.process.stdout.readline().strip() != "ready":
            self.process.kill()
            raise RuntimeError("the subscriber did not subscribe")

    def stop(self) -> int:
        """How many events it read."""
        self.process.stdin.close()
        self.process.stdin = None
        out = self.process.communicate(timeout=60)[0]
        return json.loads(out.strip().splitlines()[-1])["events"]


def start(tree: Path, name: str, *args: str) -> ServerProcess:
    server = ServerProcess(workdir(name), *args, zmq=False, env={"PYTHONPATH": str(tree)})
    server.start(timeout=60)
    wait_image_running(server)
    return server


def session_of(client) -> str:
    return client.result("create_session", client_id="bench")["session_id"]


def evaluate_runner(client, session_id: str):
    def run() -> float:
        elapsed, reply = timed_call(client, "evaluate", session_id=session_id, code="1+1")
        assert reply["status"] == "success", reply
        return elapsed

    return run


# -- the figures ------------------------------------------------------------------


def evaluate_overhead(trees: dict[str, Path], head: Path, total: int, warmup: int) -> dict:
    """C{trees}: label -> tree of the references (the first is the one ratios are to)."""
    servers = [start(tree, "events-ref") for tree in trees.values()]
    new = start(head, "events-head")
    subscriber = None
    try:
        runners = {}
        for label, server in zip(trees, servers, strict=True):
            client = tcp_client(server.tcp_port)
            runners[label] = evaluate_runner(client, session_of(client))
        new_client = tcp_client(new.tcp_port)
        bare, watched = session_of(new_client), session_of(new_client)
        subscriber = Subscriber(new.tcp_port, watched)
        runners["HEAD, 0 subscribers"] = evaluate_runner(new_client, bare)
        runners["HEAD, 1 subscriber"] = evaluate_runner(new_client, watched)
        # Many short alternating blocks: the machine's load drifts by the second.
        series = interleaved(runners, total, warmup, rounds=max(10, total // 30))
        events = subscriber.stop()
        subscriber = None
        summary = {name: s.summary() for name, s in series.items()}
        reference_median = summary[next(iter(trees))]["median_us"]
        for row in summary.values():
            row["median_vs_reference"] = round(row["median_us"] / reference_median, 3)
        return {
            "series": summary,
            "events_the_subscriber_read": events,
            "server_cpus": affinity_of(new.process.pid),
            "subscriber_cpus": sorted(subscriber_cpus()),
        }
    finally:
        if subscriber is not None:
            subscriber.process.kill()
        for server in [*servers, new]:
            server.kill()


def fan_out(head: Path, subscribers: int, rounds: int) -> dict:
    server = start(head, "events-fanout", "--max-connections=2000")
    sockets: list[socket.socket] = []
    try:
        client = tcp_client(server.tcp_port)
        session_id = session_of(client)
        selector = selectors.DefaultSelector()
        for number in range(subscribers):
            sock = tcp_client(server.tcp_port).sock
            sockets.append(sock)
            request = {"id": 1, "command": "subscribe", "parameters": {"session_id": session_id}}
            sock.sendall(json.dumps(request).encode() + b"\n")
            assert b'"success"' in sock.recv(65536)
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, number)
        first, last, replies = Series("first subscriber"), Series("100th subscriber"), []
        for _ in range(rounds + 3):  # the first 3 warm up
            buffers = [b""] * subscribers
            got: dict[int, float] = {}
            message = {"id": 1, "command": "evaluate", "parameters": {"code": "1+1"}}
            sent = time.perf_counter()
            client.send_raw(json.dumps(message).encode() + b"\n")
            deadline = time.monotonic() + 30
            while len(got) < subscribers and time.monotonic() < deadline:
                for key, _mask in selector.select(1.0):
                    data = key.fileobj.recv(65536)
                    buffers[key.data] += data
                    if key.data not in got and b"evaluation_finished" in buffers[key.data]:
                        got[key.data] = time.perf_counter() - sent
            replied = client.read_line()
            assert b'"success"' in replied and len(got) == subscribers, (len(got), replied)
            times = sorted(got.values())
            first.samples.append(times[0])
            last.samples.append(times[-1])
            replies.append(times[-1] - times[0])
        first.samples, last.samples = first.samples[3:], last.samples[3:]
        f, la = first.summary(), last.summary()
        return {
            "subscribers": subscribers,
            "rounds": rounds,
            "first": f,
            "last": la,
            "last_vs_first_median": round(la["median_us"] / f["median_us"], 2),
            "spread_median_us": round(sorted(replies[3:])[len(replies[3:]) // 2] * 1e6, 1),
        }
    finally:
        for sock in sockets:
            sock.close()
        server.kill()


def idle_subscribers(head: Path, count: int) -> dict:
    server = start(head, "events-idle", f"--max-connections={count + 100}")
    sockets: list[socket.socket] = []
    try:
        client = tcp_client(server.tcp_port)
        session_id = session_of(client)
        client.result("evaluate", code="1+1")
        time.sleep(1.0)
        before = status_mib(server.process.pid)["VmRSS"]
        for _ in range(count):
            sockets.append(tcp_client(server.tcp_port).sock)
        client.result("ping")
        time.sleep(1.0)
        connected = status_mib(server.process.pid)["VmRSS"]
        request = json.dumps(
            {"id": 1, "command": "subscribe", "parameters": {"session_id": session_id}}
        ).encode()
        for sock in sockets:
            sock.sendall(request + b"\n")
        for sock in sockets:
            assert b'"success"' in sock.recv(65536)
        time.sleep(1.0)
        subscribed = status_mib(server.process.pid)["VmRSS"]
        return {
            "subscribers": count,
            "rss_mib_before": before,
            "rss_mib_connected": connected,
            "rss_mib_subscribed": subscribed,
            "subscriptions_add_mib": round(subscribed - connected, 1),
            "connections_and_subscriptions_add_mib": round(subscribed - before, 1),
        }
    finally:
        for sock in sockets:
            sock.close()
        server.kill()


def print_loop(tree: Path, name: str, repeat: int, subscribe: bool) -> dict:
    server = start(tree, name)
    subscriber = None
    try:
        client = tcp_client(server.tcp_port, timeout=300)
        session_id = session_of(client)
        client.result("evaluate", code="1+1")
        idle_pinger = Pinger(server.tcp_port, seconds=2.0)
        time.sleep(2.0)
        idle = idle_pinger.stop()
        if subscribe:
            subscriber = Subscriber(server.tcp_port, session_id)
        time.sleep(0.5)
        before = status_mib(server.process.pid)
        pinger = Pinger(server.tcp_port)
        took = []
        for _ in range(repeat):
            started = time.perf_counter()
            reply = client.result("evaluate", code=PRINT_LOOP, timeout=120)
            took.append(round(time.perf_counter() - started, 3))
            assert reply["output"].endswith("more characters]\n")
        ping = pinger.stop()
        after = status_mib(server.process.pid)
        events = subscriber.stop() if subscriber is not None else None
        subscriber = None
        logged = client.call("get_events", since=0, limit=1000).get("result") or {}
        return {
            "evaluations": repeat,
            "seconds_each": took,
            "ping_idle": idle,
            "ping_during": ping,
            "rss_mib_before": before["VmRSS"],
            "hwm_mib_after": after["VmHWM"],
            "rss_growth_mib": round(after["VmHWM"] - before["VmRSS"], 1),
            "events_the_subscriber_read": events,
            "output_events_in_log": sum(e["event"] == "output" for e in logged["events"])
            if "events" in logged
            else None,
        }
    finally:
        if subscriber is not None:
            subscriber.process.kill()
        server.kill()


# -- the report ---------------------------------------------------------------------


def markdown(report: dict) -> str:
    lines = [
        f"# Events benchmark {report['stamp']} (HEAD {report['head'][:7]}, "
        f"reference {report['reference'][:7]})",
    ]
    if "evaluate" in report:
        lines += [
            "",
            "| evaluate('1+1') | n | median µs | p99 µs | median vs reference |",
            "|---|---|---|---|---|",
        ]
        for name, row in report["evaluate"]["series"].items():
            lines.append(
                f"| {name} | {row['n']} | {row['median_us']} | {row['p99_us']} | "
                f"{row['median_vs_reference']} |"
            )
    if "fan_out" in report:
        lines += fan_out_lines(report["fan_out"])
    if "idle" in report:
        lines += idle_lines(report["idle"])
    if "print_loop" in report:
        lines += print_loop_lines(report["print_loop"])
    return "\n".join(lines) + "\n"


def fan_out_lines(fan: dict) -> list[str]:
    return [
        "",
        f"Fan-out to {fan['subscribers']} subscribers ({fan['rounds']} evaluations): "
        f"evaluation_finished reached the first after {fan['first']['median_us']} µs "
        f"(median), the last after {fan['last']['median_us']} µs: "
        f"{fan['last_vs_first_median']}x.",
    ]


def idle_lines(idle: dict) -> list[str]:
    return [
        "",
        f"{idle['subscribers']} idle subscribers: RSS {idle['rss_mib_before']} MiB → "
        f"{idle['rss_mib_connected']} MiB connected → {idle['rss_mib_subscribed']} MiB "
        f"subscribed (+{idle['connections_and_subscriptions_add_mib']} MiB in all, "
        f"+{idle['subscriptions_add_mib']} MiB for the subscriptions).",
    ]


def print_loop_lines(rows: dict) -> list[str]:
    lines = [
        "",
        "| 10 MB print loop | ping p50 ms | ping p99 ms | idle ping p99 ms | RSS growth MiB | s per evaluation |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['ping_during'].get('p50_ms')} | {row['ping_during'].get('p99_ms')} | "
            f"{row['ping_idle'].get('p99_ms')} | {row['rss_growth_mib']} | {row['seconds_each']} |"
        )
    return lines


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", default="69285b4", help="a commit before live events")
    parser.add_argument(
        "--baseline",
        default="merge-base",
        help="the commit this branch started from (default: git merge-base main HEAD; 0: none)",
    )
    parser.add_argument("--requests", type=int, default=1500, help="per evaluate series")
    parser.add_argument("--fanout", type=int, default=100)
    parser.add_argument("--fanout-rounds", type=int, default=30)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--print-repeat", type=int, default=3)
    parser.add_argument(
        "--only", action="append", choices=PARTS, help="run only this part (repeatable)"
    )
    args = parser.parse_args(argv)
    parts = args.only or PARTS
    cpus = sorted(pin_to_cpu())
    scratch = Path(tempfile.mkdtemp(prefix="stui-bench-events-trees-"))
    head, head_commit = snapshot_head(scratch / "head")
    reference, reference_commit = snapshot_head(scratch / "reference", args.reference)
    trees = {f"pre-events {reference_commit[:7]}": reference}
    if args.baseline != "0":
        revision = args.baseline
        if revision == "merge-base":
            revision = subprocess.run(
                ["git", "merge-base", "main", "HEAD"], capture_output=True, text=True, check=True
            ).stdout.strip()
        baseline, baseline_commit = snapshot_head(scratch / "baseline", revision)
        trees[f"baseline {baseline_commit[:7]}, 0 subscribers"] = baseline
    report = {
        "stamp": time.strftime("%Y%m%dT%H%M%S"),
        "head": head_commit,
        "reference": reference_commit,
        "client_cpus": cpus,
        "arguments": vars(args),
    }
    if "evaluate" in parts:
        report["evaluate"] = evaluate_overhead(trees, head, args.requests, 100)
    if "fanout" in parts:
        report["fan_out"] = fan_out(head, args.fanout, args.fanout_rounds)
    if "idle" in parts:
        report["idle"] = idle_subscribers(head, args.idle)
    if "print" in parts:
        report["print_loop"] = {
            f"pre-events {reference_commit[:7]}": print_loop(
                reference, "events-print-ref", args.print_repeat, False
            ),
            "HEAD, 1 subscriber": print_loop(head, "events-print-head", args.print_repeat, True),
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    base = RESULTS / f"events-{report['stamp']}"
    base.with_suffix(".json").write_text(json.dumps(report, indent=1))
    base.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
