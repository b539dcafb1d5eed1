"""Every attack of issue 13, rerun against real servers, with its measured outcome.

One entry point for the hostile-user review of issue 13: each attack starts its own
``twistd -n stui`` (loopback, ephemeral ports, a fresh data dir), runs the attack,
and reports

- the server's RSS before the attack, its peak (``VmHWM`` from ``/proc/PID/status``,
  the high-water mark since start) and its RSS after the attack (``VmRSS``);
- another client's ``ping`` latency p50/p99 during the attack (that client runs in a
  child process, so it does not share this process's GIL with the attacker);
- the attack's own outcome (for item 1 the time until ``ImageRestarted``, for item 9
  the exit status, ...) and a verdict: ``holds`` when the fix's promise was kept.

::

    .venv/bin/python -m benchmarks.attacks                      # every attack (~2-3 min)
    .venv/bin/python -m benchmarks.attacks --only image-death --only zmq-frame
    .venv/bin/python -m benchmarks.attacks --full               # 30,000 peers, 600 s idle (~15 min)
    STUI_BENCH_TREE=/tmp/old-tree .venv/bin/python -m benchmarks.attacks --only partial-lines

The defaults are the sizes the issue reported (400 MB frames and values, 150 x 7.5 MiB
unfinished lines, 1,000 connections under ``ulimit -n 1024``, 3,000 sessions, 15 s of
trickling and of stdout flooding), except where that takes long: 10,500 one-shot ZeroMQ
peers (just past the 10,000 cap; ``--full``: 30,000) and a 3 s idle timeout with 100
connections (``--full``: the default 600 s with 1,000).  Each size has its own flag
(``--frame-mib``, ``--value-mib``, ``--nofile-soft``, ...; ``--help`` lists them), so a
reader short of memory or time can scale down.  The whole run takes about 2-3 minutes
on 2 cores and needs about 1 GB of free memory.  Every loop is bounded in count and in
time.  Items 3 and 4 reuse ``benchmarks.attack_partial`` and ``benchmarks.attack_trickle``;
items 5 and 6 reuse the helpers of ``benchmarks.attack_image_values``
(``benchmarks.exhaustion`` measures items 12 and 14 in more detail: held, told and
silently closed connections).  Item 15 runs only as root with ``/usr/bin/python3.11``
(as ``tests/e2e/test_privsep.py``), else it is skipped.  Results go to
``benchmarks/results/attacks-<stamp>.json`` and ``.md``; the figures quoted in
docs/security.md and docs/reliability.md come from one such run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pwd
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from benchmarks import attack_partial, attack_trickle
from benchmarks.attack_image_values import _timed
from benchmarks.common import percentile, server_tree, tcp_client, wait_image_running, workdir
from tests.helpers import START_PROCESSES
from tests.serverproc import REPO_ROOT, ServerProcess

MiB = 1024 * 1024
RESULTS = Path(__file__).resolve().parent / "results"

# -- measuring ------------------------------------------------------------------------


def status_mib(pid: int) -> dict[str, float]:
    """C{VmRSS} and C{VmHWM} of C{pid} in MiB (empty when the process is gone)."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    fields[name] = round(int(value.split()[0]) / 1024, 1)
    except FileNotFoundError:
        pass
    return fields


PINGER = r"""
import json, select, socket, sys, time
port, seconds, limit, pause = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
sock = socket.create_connection(("127.0.0.1", port), 30)
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
sock.settimeout(30)
buffer, latencies, errors, error = b"", [], 0, None
print("ready", flush=True)
end = time.monotonic() + seconds
while time.monotonic() < end and len(latencies) < limit:
    if select.select([sys.stdin], [], [], 0)[0]:
        break  # the attack is over (a line or EOF on stdin)
    started = time.perf_counter()
    try:
        sock.sendall(b'{"id": 1, "command": "ping"}\n')
        while b"\n" not in buffer:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            buffer += chunk
    except OSError as exc:
        errors, error = errors + 1, repr(exc)
        break
    line, _, buffer = buffer.partition(b"\n")
    latencies.append((time.perf_counter() - started) * 1000)
    if b'"success"' not in line:
        errors += 1
    time.sleep(pause)
print(json.dumps({"latencies_ms": latencies, "errors": errors, "error": error}), flush=True)
"""


class Pinger:
    """Another client pinging the server from a child process until L{stop}.

    Bounded: at most C{limit} pings and C{seconds} seconds, whatever the attack does.
    """

    def __init__(self, port: int, seconds: float = 120.0, limit: int = 20_000) -> None:
        self.seconds = seconds
        self.result: dict | None = None
        self.process = subprocess.Popen(
            [sys.executable, "-c", PINGER, str(port), str(seconds), str(limit), "0.005"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.process.stdout.readline().strip()
        if line != "ready":
            self.process.kill()
            raise RuntimeError(f"pinger did not start: {line!r}")

    def stop(self) -> dict:
        if self.result is not None:
            return self.result
        try:
            self.process.stdin.write("stop\n")
            self.process.stdin.close()
        except OSError:
            pass  # the pinger has ended already (its time or count bound)
        self.process.stdin = None  # so communicate() does not flush it again
        try:
            out = self.process.communicate(timeout=self.seconds + 40)[0]
        except subprocess.TimeoutExpired:
            self.process.kill()
            return {"count": 0, "errors": 1, "error": "pinger hung"}
        data = json.loads(out.strip().splitlines()[-1])
        values = sorted(data["latencies_ms"])
        result = {"count": len(values), "errors": data["errors"]}
        if data["error"]:
            result["error"] = data["error"]
        if values:
            result.update(
                p50_ms=round(percentile(values, 0.50), 2),
                p99_ms=round(percentile(values, 0.99), 2),
                max_ms=round(values[-1], 2),
            )
        self.result = result
        return result


def start_server(
    name: str,
    *args: str,
    image: bool = True,
    zmq: bool = False,
    preexec_fn=None,
    directory: Path | None = None,
) -> ServerProcess:
    """A real C{twistd -n stui} (from C{$STUI_BENCH_TREE} when set), image warmed up."""
    tree = server_tree()
    env = {"PYTHONPATH": tree} if tree else None
    extra = {"preexec_fn": preexec_fn} if preexec_fn is not None else {}
    server = ServerProcess(
        directory or workdir(name), *args, image=image, zmq=zmq, env=env, **extra
    )
    server.start(timeout=60)
    if image:
        wait_image_running(server)
    return server


class Run:
    """One attack against one server: memory before/peak/after and another client's pings."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.pid = server.process.pid
        self.before = status_mib(self.pid)
        try:
            self.pinger = Pinger(server.tcp_port)
        except BaseException:
            server.kill()
            raise
        self.ping: dict | None = None
        self.peak: dict | None = None

    def end_attack(self, settle: float = 1.0) -> None:
        """Stop pinging, note the peak; the RSS "after" is read C{settle} s later."""
        self.ping = self.pinger.stop()
        self.peak = status_mib(self.pid)
        time.sleep(settle)
        self.after = status_mib(self.pid)

    def memory(self) -> dict:
        if self.ping is None:
            self.end_attack()
        return {
            "before": self.before.get("VmRSS"),
            "peak": self.after.get("VmHWM", self.peak.get("VmHWM")),  # a high-water mark
            "after": self.after.get("VmRSS"),
        }

    def close(self) -> None:
        """Kill the server whatever happened; then the pinger (it ends with its connection)."""
        self.server.kill()
        if self.pinger.process.poll() is None:
            self.pinger.process.kill()
            self.pinger.process.wait(10)


def rpc(client, command: str, **params) -> dict:
    """One request; the reply whatever its status."""
    return client.call(command, **params)


def wait_for(predicate, timeout: float, step: float = 0.02):
    """Poll C{predicate} until truthy or C{timeout}; its last value."""
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(step)
        value = predicate()
    return value


def value_of(reply: dict):
    """The C{result} string of an C{evaluate} reply, else its error type."""
    if reply.get("status") == "success":
        return reply["result"]["result"]
    return reply.get("error_type")


def image_pid(client) -> int | None:
    return client.result("ping")["image"].get("pid")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _open_idle(port: int, count: int, seconds: float) -> list[socket.socket]:
    """Up to C{count} connections that send nothing (bounded by C{seconds})."""
    socks, deadline = [], time.monotonic() + seconds
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        try:
            socks.append(socket.create_connection(("127.0.0.1", port), 5))
        except OSError:
            break
    return socks


def _closed_by_server(socks: list[socket.socket], wait: float) -> int:
    """How many of C{socks} the server answered with an error line or closed, within C{wait}."""
    closed, pending = 0, list(socks)
    deadline = time.monotonic() + wait
    while pending and time.monotonic() < deadline:
        readable = select.select(pending, [], [], max(0.0, deadline - time.monotonic()))[0]
        for sock in readable:
            pending.remove(sock)
            closed += 1
    return closed


# -- the attacks ----------------------------------------------------------------------

#: how long item 1 waits for the in-flight replies (the fix promises 1 s)
DEATH_WAIT = 20.0


def _reply_within(client, seconds: float) -> dict:
    """The next reply on C{client}, or an error saying none came within C{seconds}."""
    client.sock.settimeout(seconds)
    try:
        return client.read_reply()
    except TimeoutError:
        return {"status": "error", "error_type": f"no reply within {seconds:g} s"}


def attack_image_death(args) -> dict:
    """Item 1: the image dies while processes it started hold its pipes."""
    server = start_server("image-death")
    run = Run(server)
    pids: list[int] = []
    try:
        a, b, c = (tcp_client(server.tcp_port, timeout=150) for _ in range(3))
        for name, client in (("a", a), ("b", b), ("c", c)):
            client.result("create_session", client_id=name)
        pidfile = server.workdir / "background.pid"
        a.result("evaluate", code=START_PROCESSES.format(pidfile=pidfile))
        pids = json.loads(a.result("evaluate", code="pids")["result"])
        wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 5)
        pids.append(int(pidfile.read_text()))
        started_alive = sum(_alive(pid) for pid in pids)
        old_pid = image_pid(a)
        b.send_raw(
            json.dumps(
                {
                    "id": "sleep",
                    "command": "evaluate",
                    "parameters": {"code": "import time\ntime.sleep(30)"},
                }
            ).encode()
            + b"\n"
        )
        time.sleep(0.2)
        died = time.monotonic()
        c.send_raw(
            json.dumps(
                {
                    "id": "die",
                    "command": "evaluate",
                    "parameters": {"code": "import os\nos._exit(3)"},
                }
            ).encode()
            + b"\n"
        )
        # Bounded: before the fix no reply came until a Timeout after 40-120 s.
        crash = _reply_within(c, DEATH_WAIT)
        crash_s = time.monotonic() - died
        sleeper = _reply_within(b, DEATH_WAIT)
        sleeper_s = time.monotonic() - died
        running = wait_for(
            lambda: (
                image_pid(a) not in (None, old_pid)
                and a.result("ping")["image"]["status"] == "running"
            ),
            15,
        )
        running_s = time.monotonic() - died
        all_dead = wait_for(lambda: not any(_alive(pid) for pid in pids), 5)
        second: list[int] = []
        if running:
            a.sock.settimeout(DEATH_WAIT)
            after = a.call("evaluate", code="1 + 1")
            # SIGTERM while the new image again has processes of its own holding its pipes.
            again = server.workdir / "again.pid"
            a.result("evaluate", code=START_PROCESSES.format(pidfile=again))
            second = json.loads(a.result("evaluate", code="pids")["result"])
            wait_for(lambda: again.exists() and again.read_text().strip(), 5)
            second.append(int(again.read_text()))
            pids.extend(second)
        else:
            after = {"status": "error", "error_type": "no new image"}
        run.end_attack()
        for client in (a, b, c):
            client.close()
        stopped = time.monotonic()
        try:
            status = server.stop(timeout=60)
        except AssertionError:  # ignored SIGTERM for 60 s (killed)
            status = None
        stop_s = time.monotonic() - stopped
        second_dead = wait_for(lambda: not any(_alive(pid) for pid in second), 5)
        outcome = {
            "processes_started_by_user_code": started_alive,
            "in_flight_error_types": [crash.get("error_type"), sleeper.get("error_type")],
            "seconds_to_image_restarted": round(max(crash_s, sleeper_s), 3),
            "seconds_until_a_new_image_runs": round(running_s, 3) if running else None,
            "started_processes_killed": bool(all_dead),
            "evaluate_after": value_of(after),
            "sigterm_seconds": round(stop_s, 2),
            "started_processes_killed_by_sigterm": bool(second_dead),
            "exit_status": status,
        }
        holds = (
            outcome["in_flight_error_types"] == ["ImageRestarted", "ImageRestarted"]
            and max(crash_s, sleeper_s) < 1.0
            and bool(running)
            and bool(all_dead)
            and stop_s < 10
            and status == 0
            and bool(second_dead)
        )
        return {
            "memory": run.memory(),
            "ping": run.ping,
            "outcome": outcome,
            "holds": holds,
            "summary": f"in-flight replies {outcome['in_flight_error_types']} after "
            f"{max(crash_s, sleeper_s) * 1000:.0f} ms, new image: "
            f"{f'after {running_s:.2f} s' if running else 'none'}, "
            f"{started_alive} started processes killed: {bool(all_dead)}, "
            f"SIGTERM {stop_s:.2f} s, exit {status}",
        }
    finally:
        run.close()
        for pid in pids:  # ours; left only if the fix does not hold
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def attack_zmq_frame(args) -> dict:
    """Item 2: one ZeroMQ frame far over the limit from an unauthenticated peer."""
    import zmq

    server = start_server("zmq-frame", image=False, zmq=True)
    run = Run(server)
    try:
        for n in range(20):  # warm up the ZeroMQ path
            server.zmq_request({"id": n, "command": "ping"})
        hwm_before = status_mib(run.pid)["VmHWM"]
        frame = b"x" * (args.frame_mib * MiB)
        # Its own context (I/O thread), so pushing the frame does not delay our other ping.
        hog_context = zmq.Context()
        hog = hog_context.socket(zmq.DEALER)
        hog.setsockopt(zmq.LINGER, 0)
        hog.setsockopt(zmq.SNDTIMEO, 60_000)
        hog.connect(server.zmq_url)
        try:
            hog.send_multipart([b"", frame])
            del frame
            time.sleep(0.05)  # libzmq is pushing the frame now
            asked = time.monotonic()
            other = server.zmq_request({"id": "other", "command": "ping"})
            other_ms = (time.monotonic() - asked) * 1000
            time.sleep(1.5)
            reply = hog.poll(500) and hog.recv_multipart()
        finally:
            hog.close()
            hog_context.term()
        after_ok = server.zmq_request({"id": "after", "command": "ping"})["status"] == "success"
        run.end_attack()
        rise = round(run.peak["VmHWM"] - hwm_before, 1)
        outcome = {
            "frame_mib": args.frame_mib,
            "max_message_bytes_mib": 8,
            "libzmq_frame_limit_mib": 16,
            "peak_rise_mib": rise,
            "frame_reached_the_server": bool(reply),
            "zmq_ping_during_ms": round(other_ms, 1),
            "zmq_ping_after_ok": after_ok and other["status"] == "success",
        }
        holds = rise < 8 and not reply and after_ok
        return {
            "memory": run.memory(),
            "ping": run.ping,
            "outcome": outcome,
            "holds": holds,
            "summary": f"{args.frame_mib} MiB frame: server peak +{rise} MiB, "
            f"dropped by libzmq: {not reply}",
        }
    finally:
        run.close()


def attack_partial_lines(args) -> dict:
    """Item 3: many connections each hold a long unfinished line (attack_partial.py)."""
    result = attack_partial.main(
        [f"--connections={args.partial_connections}", f"--line-mib={args.partial_line_mib}"]
    )
    rss = result["server_rss_mib"]
    outcome = {
        k: result[k]
        for k in (
            "connections",
            "line_mib",
            "budget_mib",
            "offered_mib",
            "refused_by_the_server",
            "seconds_to_send",
        )
    }
    holds = (
        rss["peak_vmhwm"] < result["budget_mib"] + 128 and rss["after_close"] < rss["before"] + 32
    )
    return {
        "memory": {"before": rss["before"], "peak": rss["peak_vmhwm"], "after": rss["after_close"]},
        "ping": result["ping_while_held"],
        "outcome": outcome,
        "holds": holds,
        "summary": f"{result['offered_mib']} MiB offered, "
        f"{result['refused_by_the_server']} connections refused, "
        f"RSS back to {rss['after_close']} MiB after close",
    }


def attack_trickle_lines(args) -> dict:
    """Item 4: trickled segments onto long unfinished lines (attack_trickle.py)."""
    result = attack_trickle.main(
        [f"--attackers={args.trickle_attackers}", f"--seconds={args.trickle_seconds}"]
    )
    during = result["ping_during"]
    outcome = {k: result[k] for k in ("attackers", "partial_mib", "segment_bytes", "segments_sent")}
    outcome["ping_before_attack"] = result["ping_before"]
    outcome["server_rss_mib_during"] = result["server_rss_mib_during"]
    return {
        "memory": {
            "before": result["server_rss_mib_before"],
            "peak": result["server_vmhwm_mib"],
            "after": result["server_rss_mib_after_close"],
        },
        "ping": during,
        "outcome": outcome,
        "holds": during["p99_ms"] < 50,
        "summary": f"{result['segments_sent']} segments of {result['segment_bytes']} B "
        f"onto {result['attackers']} x {result['partial_mib']} MiB lines; others' ping p99 "
        f"{during['p99_ms']} ms (no attack: {result['ping_before']['p99_ms']} ms)",
    }


def _image_value_attack(name: str, setup: list[str], cells: list[tuple[str, dict]]) -> dict:
    server = start_server(f"values-{name}")
    run = Run(server)
    try:
        client = tcp_client(server.tcp_port, timeout=300)
        client.result("create_session", client_id="attacker")
        for code in setup:
            client.result("evaluate", code=code)
        image = client.result("ping")["image"]["pid"]
        image_before = status_mib(image)
        runs = []
        for code, extra in cells:
            seconds, size, reply = _timed(client, code, **extra)
            runs.append(
                {
                    "code": code[:40],
                    "seconds": round(seconds, 4),
                    "reply_bytes": size,
                    "status": reply["status"],
                    "error_type": reply.get("error_type"),
                }
            )
        image_peak = status_mib(image)
        run.end_attack()
        client.close()
        return {
            "run": run,
            "runs": runs,
            "image_peak_rise_mib": round(image_peak["VmHWM"] - image_before["VmRSS"], 1),
        }
    finally:
        run.close()


def attack_big_display(args) -> dict:
    """Item 5: C{display} of a huge string."""
    size = args.value_mib * MiB
    got = _image_value_attack("display", [], [(f"s = 'a' * {size}\ns", {"mode": "display"})])
    run, cell = got["run"], got["runs"][0]
    rise = round(run.peak["VmHWM"] - run.before["VmRSS"], 1)
    outcome = {
        "value_mib": args.value_mib,
        "reply_bytes": cell["reply_bytes"],
        "server_peak_rise_mib": rise,
        "image_peak_rise_mib": got["image_peak_rise_mib"],
        "seconds": cell["seconds"],
    }
    return {
        "memory": run.memory(),
        "ping": run.ping,
        "outcome": outcome,
        "holds": cell["reply_bytes"] < 4 * MiB and rise < 32,
        "summary": f"{args.value_mib} MiB str shown: reply {cell['reply_bytes'] / MiB:.2f} MiB,"
        f" server peak +{rise} MiB, image peak +{got['image_peak_rise_mib']} MiB",
    }


def attack_big_exception(args) -> dict:
    """Item 5: an exception with a huge message."""
    size = args.exception_mib * MiB
    got = _image_value_attack("exception", [], [(f"raise ValueError('b' * {size})", {})])
    run, cell = got["run"], got["runs"][0]
    rise = round(run.peak["VmHWM"] - run.before["VmRSS"], 1)
    outcome = {
        "message_mib": args.exception_mib,
        "reply_bytes": cell["reply_bytes"],
        "error_type": cell["error_type"],
        "server_peak_rise_mib": rise,
        "image_peak_rise_mib": got["image_peak_rise_mib"],
    }
    return {
        "memory": run.memory(),
        "ping": run.ping,
        "outcome": outcome,
        "holds": cell["reply_bytes"] < MiB and rise < 32,
        "summary": f"{args.exception_mib} MiB message: reply {cell['reply_bytes'] / 1024:.0f} KiB,"
        f" server peak +{rise} MiB",
    }


def attack_big_binding(args) -> dict:
    """Item 6: a huge binding, then cells that mention it."""
    size, n = args.value_mib * MiB, 3
    got = _image_value_attack(
        "binding",
        ["small = bytearray(10)"],
        [(f"x = bytearray({size})", {})]
        + [("len(x)", {}), ("x[:3]", {})] * n
        + [("len(small)", {})] * n,
    )
    run, runs = got["run"], got["runs"]
    mentioning = sorted(r["seconds"] for r in runs[1 : 1 + 2 * n])
    plain = sorted(r["seconds"] for r in runs[1 + 2 * n :])
    outcome = {
        "value_mib": args.value_mib,
        "median_cell_mentioning_x_ms": round(mentioning[len(mentioning) // 2] * 1000, 1),
        "median_cell_not_mentioning_x_ms": round(plain[len(plain) // 2] * 1000, 1),
        "image_peak_rise_mib": got["image_peak_rise_mib"],
        "image_peak_over_value": round(got["image_peak_rise_mib"] / args.value_mib, 2),
    }
    holds = (
        outcome["median_cell_mentioning_x_ms"] < 100
        and got["image_peak_rise_mib"] < 1.5 * args.value_mib + 32
    )
    return {
        "memory": run.memory(),
        "ping": run.ping,
        "outcome": outcome,
        "holds": holds,
        "summary": f"x = bytearray({args.value_mib} MiB): a cell mentioning x "
        f"{outcome['median_cell_mentioning_x_ms']} ms, image peak "
        f"{outcome['image_peak_over_value']} x the value",
    }


def attack_zmq_peers(args) -> dict:
    """Item 7: one-shot peers under fresh identities, then the peer with a session asks."""
    import zmq

    server = start_server("zmq-peers", image=False, zmq=True)
    run = Run(server)
    context = zmq.Context.instance()
    keeper = context.socket(zmq.DEALER)
    keeper.setsockopt(zmq.LINGER, 0)
    keeper.setsockopt(zmq.RCVTIMEO, 30_000)
    keeper.setsockopt(zmq.ROUTING_ID, b"the-peer-with-a-session")
    keeper.connect(server.zmq_url)
    try:

        def ask(command: str, **params) -> dict:
            keeper.send_multipart(
                [b"", json.dumps({"id": 1, "command": command, "parameters": params}).encode()]
            )
            return json.loads(keeper.recv_multipart()[-1])

        session_id = ask("create_session", client_id="keeper")["result"]["session_id"]
        made, answered, deadline = 0, 0, time.monotonic() + args.peer_seconds
        ping = json.dumps({"id": 1, "command": "ping"}).encode()
        started = time.monotonic()
        while made < args.peers and time.monotonic() < deadline:
            batch = []
            for _ in range(min(200, args.peers - made)):
                sock = context.socket(zmq.DEALER)  # a fresh, random identity
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(server.zmq_url)
                sock.send_multipart([b"", ping])
                batch.append(sock)
            made += len(batch)
            for sock in batch:
                if sock.poll(10_000):
                    sock.recv_multipart()
                    answered += 1
                sock.close()
        peers_s = time.monotonic() - started
        info = ask("get_session_info")
        run.end_attack()
        kept = info["status"] == "success" and info["result"]["session_id"] == session_id
        outcome = {
            "one_shot_peers": made,
            "answered": answered,
            "seconds": round(peers_s, 1),
            "anonymous_peer_cap": 10_000,
            "peer_kept_its_current_session": kept,
            "reply_without_session_id": info.get("error_type") or "success",
        }
        return {
            "memory": run.memory(),
            "ping": run.ping,
            "outcome": outcome,
            "holds": kept and made > 10_000,
            "summary": f"{made} one-shot peers ({peers_s:.0f} s); the peer kept its "
            f"current session: {kept}",
        }
    finally:
        keeper.close()
        run.close()


FLOOD = """
import os, threading, time
def flood():
    line = b'flood ' * 20 + b'\\n'
    end = time.monotonic() + {seconds}
    while time.monotonic() < end:
        os.write(1, line * 50)
threading.Thread(target=flood, daemon=True).start()
"""


def attack_stdout_flood(args) -> dict:
    """Item 8: a user thread writes to fd 1 as fast as it can."""
    server = start_server("stdout-flood")
    run = Run(server)
    try:
        client = tcp_client(server.tcp_port)
        client.result("create_session", client_id="alice")
        before = server.log_path.stat().st_size
        client.result("evaluate", code=FLOOD.format(seconds=args.flood_seconds))
        time.sleep(args.flood_seconds + 1.0)
        pong = client.result("ping")["message"] == "pong"
        run.end_attack()
        grown = server.log_path.stat().st_size - before
        dropped = server.log_text().count("dropped")
        client.close()
        # 100 lines (64 KiB at most) per second are logged, plus one 'dropped' line.
        bound = (args.flood_seconds + 3) * (64 * 1024 + 1024)
        outcome = {
            "flood_seconds": args.flood_seconds,
            "log_growth_bytes": grown,
            "log_growth_kib_per_s": round(grown / 1024 / (args.flood_seconds + 1), 1),
            "dropped_notices": dropped,
            "server_answered": pong,
        }
        return {
            "memory": run.memory(),
            "ping": run.ping,
            "outcome": outcome,
            "holds": grown < bound and dropped > 0 and pong,
            "summary": f"log grew {grown / 1024:.0f} KiB in {args.flood_seconds} s of "
            f"flooding, {dropped} 'dropped' notices",
        }
    finally:
        run.close()


def attack_batch_disk_full(args) -> dict:
    """Item 9: under batch the disk fails, then SIGTERM."""
    from stui_twisted.storage.pathcodec import encode_client_dir

    options = ("--durability=batch", "--flush-interval=0.2")
    server = start_server("batch-disk", *options, image=False)
    run = Run(server)
    aside = None
    try:
        client = tcp_client(server.tcp_port)
        session_id = client.result("create_session", client_id="disk")["session_id"]

        def update(counter: int) -> dict:
            return rpc(
                client,
                "update_session_state",
                session_id=session_id,
                state_data={"counter": counter},
            )

        counter = 0
        for counter in range(1, 16):
            assert update(counter)["status"] == "success"
        time.sleep(0.6)  # flushed
        client_dir = server.data_dir / "sessions" / encode_client_dir("disk")
        aside = client_dir.with_name(client_dir.name + ".aside")
        client_dir.rename(aside)
        client_dir.write_text("not a directory: every write below it fails, even as root\n")
        acknowledged, refused, last_acknowledged = 0, 0, counter
        deadline = time.monotonic() + 10
        failed = False
        while time.monotonic() < deadline and acknowledged + refused < 500:
            counter += 1
            reply = update(counter)
            if reply["status"] == "success":
                acknowledged += 1
                last_acknowledged = counter
            elif reply.get("error_type") == "StorageError":
                refused += 1
            log = server.log_text()
            if not failed and ("could not be written" in log or "batch flush failed" in log):
                failed = True
                window = acknowledged
            if failed and refused >= 15:
                break
            time.sleep(0.01)
        run.end_attack()
        client.close()
        status = server.stop(timeout=60)
        log = server.log_text()
        names_it = "final flush FAILED" in log and session_id in log
        false_claim = "every dirty session was flushed" in log
        said = [line[-300:] for line in log.splitlines() if "final flush FAILED" in line]
        client_dir.unlink()
        aside.rename(client_dir)
        aside = None
        server.start(timeout=60)
        again = tcp_client(server.tcp_port)
        stored = again.result("restore_session", session_id=session_id)
        stored_counter = (stored.get("session_state") or {}).get("counter")
        again.close()
        server.kill()
        outcome = {
            "acknowledged_after_the_disk_failed": acknowledged,
            "acknowledged_before_the_first_failed_flush": window if failed else None,
            "storage_errors": refused,
            "last_acknowledged": last_acknowledged,
            "counter_after_restart": stored_counter,
            "exit_status": status,
            "log_names_the_unwritten_session": names_it,
            "log_claims_everything_flushed": false_claim,
            "acknowledged_then_lost": (
                last_acknowledged - stored_counter if isinstance(stored_counter, int) else None
            ),
            "log_line": said[0] if said else None,
        }
        holds = (
            failed
            and status != 0
            and names_it
            and not false_claim
            and acknowledged == window
            and refused > 0
        )
        return {
            "memory": run.memory(),
            "ping": run.ping,
            "outcome": outcome,
            "holds": holds,
            "summary": f"{window if failed else '?'} change(s) acknowledged in the batch window "
            f"before the first failed flush, then {refused} of {refused} StorageError; exit "
            f"{status}; log names the unwritten session: {names_it}; after restart counter "
            f"{stored_counter}, last acknowledged {last_acknowledged}",
        }
    finally:
        if aside is not None and aside.exists():
            (aside.with_name(aside.name[: -len(".aside")])).unlink(missing_ok=True)
            aside.rename(aside.with_name(aside.name[: -len(".aside")]))
        run.close()


def attack_deep_nesting(args) -> dict:
    """Item 10: state_data nested hundreds of levels deep, then restore_session."""
    server = start_server("nesting", image=False)
    run = Run(server)
    try:
        client = tcp_client(server.tcp_port)
        session_id = client.result("create_session", client_id="deep")["session_id"]
        replies = {}
        for depth in (100, args.depth, 970):
            body = "[" * depth + "]" * depth
            line = (
                '{"id": "d%d", "command": "update_session_state", "parameters": '
                '{"session_id": "%s", "state_data": %s}}\n' % (depth, session_id, body)
            )
            client.send_raw(line.encode())
            reply = client.read_reply()
            restore = rpc(client, "restore_session", session_id=session_id)
            replies[depth] = {
                "update": reply.get("error_type") or "success",
                "max_depth": (reply.get("details") or {}).get("max_depth"),
                "restore_after": restore.get("error_type") or "success",
            }
        run.end_attack()
        client.close()
        holds = (
            replies[100]["update"] == "success"
            and all(r["update"] == "InvalidRequest" for d, r in replies.items() if d > 100)
            and all(r["restore_after"] == "success" for r in replies.values())
        )
        return {
            "memory": run.memory(),
            "ping": run.ping,
            "outcome": {"by_depth": replies},
            "holds": holds,
            "summary": "; ".join(
                f"depth {d}: {r['update']}, restore {r['restore_after']}"
                for d, r in replies.items()
            ),
        }
    finally:
        run.close()


def attack_lone_surrogates(args) -> dict:
    """Item 11: lone surrogates in code and in a binding, saved, restarted, restored."""
    server = start_server("surrogates")
    run = Run(server)
    try:
        client = tcp_client(server.tcp_port)
        session_id = client.result("create_session", client_id="sur")["session_id"]
        in_code = rpc(client, "evaluate", code="z = 'ok\ud800'")
        binding = rpc(client, "evaluate", code="y = 'ok' + chr(0xd800)\ny")
        saved = rpc(client, "save_context")
        saved_again = rpc(client, "save_context")
        run.end_attack()
        client.close()
        server.stop(timeout=60)
        server.start(timeout=60)
        wait_image_running(server)
        again = tcp_client(server.tcp_port)
        restored = rpc(again, "restore_session", session_id=session_id)
        same = rpc(again, "evaluate", code="y == 'ok' + chr(0xd800)")
        again.close()
        server.kill()
        outcome = {
            "code_with_a_lone_surrogate": in_code.get("error_type") or "success",
            "binding_with_a_lone_surrogate": binding.get("error_type") or "success",
            "save_context": saved.get("error_type") or "success",
            "later_save_context": saved_again.get("error_type") or "success",
            "restore_after_restart": restored.get("error_type") or "success",
            "binding_equal_after_restart": value_of(same),
        }
        holds = (
            outcome["code_with_a_lone_surrogate"] == "EvaluationError"
            and outcome["binding_with_a_lone_surrogate"] == "success"
            and outcome["save_context"] == outcome["later_save_context"] == "success"
            and outcome["restore_after_restart"] == "success"
            and outcome["binding_equal_after_restart"] == "True"
        )
        return {
            "memory": run.memory(),
            "ping": run.ping,
            "outcome": outcome,
            "holds": holds,
            "summary": ", ".join(f"{k}: {v}" for k, v in outcome.items()),
        }
    finally:
        run.close()


def attack_fd_exhaustion(args) -> dict:
    """Item 12: a low fd limit, a flood of idle connections, then the image dies."""
    soft, hard = args.nofile_soft, args.nofile_hard
    own_hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if own_hard != resource.RLIM_INFINITY and own_hard < max(hard, args.fd_connections + 64):
        return {"skipped": f"this process's hard RLIMIT_NOFILE {own_hard} is below {hard}"}
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard, args.fd_connections + 64), own_hard))

    def lower_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    server = start_server("fd", preexec_fn=lower_limit)
    run = Run(server)
    socks: list[socket.socket] = []
    try:
        client = tcp_client(server.tcp_port, timeout=30)
        client.result("create_session", client_id="fd")
        client.result("evaluate", code="x = 42")
        with open(f"/proc/{run.pid}/limits") as limits:
            line = next(entry for entry in limits if entry.startswith("Max open files"))
        raised_to = int(line.split()[3])
        socks = _open_idle(server.tcp_port, args.fd_connections, 60)
        refused = _closed_by_server(socks, 3.0)
        old_pid = image_pid(client)
        died = time.monotonic()
        crash = rpc(client, "evaluate", code="import os\nos._exit(3)")
        running = wait_for(
            lambda: (
                image_pid(client) not in (None, old_pid)
                and client.result("ping")["image"]["status"] == "running"
            ),
            15,
            0.05,
        )
        respawn_s = time.monotonic() - died
        x = rpc(client, "evaluate", code="x")
        run.end_attack()
        client.close()
        outcome = {
            "soft_hard_at_start": [soft, hard],
            "soft_limit_raised_to": raised_to,
            "connections_opened": len(socks),
            "refused_by_the_server": refused,
            "held": len(socks) - refused,
            "dying_evaluate": crash.get("error_type") or "success",
            "image_respawned": bool(running),
            "seconds_to_respawn": round(respawn_s, 2) if running else None,
            "x_after_respawn": value_of(x),
        }
        holds = bool(running) and value_of(x) == "42" and raised_to == hard
        return {
            "memory": run.memory(),
            "ping": run.ping,
            "outcome": outcome,
            "holds": holds,
            "summary": f"ulimit -n {soft} (hard {hard}): limit raised to {raised_to}, "
            f"{len(socks) - refused} of {len(socks)} connections held; the image "
            f"respawned: {bool(running)} in {respawn_s:.2f} s, x = "
            f"{outcome['x_after_respawn']}",
        }
    finally:
        for sock in socks:
            sock.close()
        run.close()


def attack_idle_connections(args) -> dict:
    """Item 13: idle connections take every slot (auth off)."""
    timeout, cap = args.idle_timeout, args.idle_connections
    server = start_server(
        "idle", f"--connection-idle-timeout={timeout}", f"--max-connections={cap}", image=False
    )
    run = Run(server)  # its pinger holds one slot, and stays busy
    socks: list[socket.socket] = []
    try:
        first_opened = time.monotonic()
        socks = _open_idle(server.tcp_port, cap, 30)
        opened_s = time.monotonic() - first_opened
        time.sleep(0.3)

        def newcomer() -> bool:
            try:
                client = tcp_client(server.tcp_port, timeout=2)
                try:
                    return client.call("ping")["status"] == "success"
                finally:
                    client.close()
            except (OSError, ValueError):
                return False

        locked_out = not newcomer()
        admitted = wait_for(newcomer, timeout + 15, 0.1)
        admitted_s = time.monotonic() - first_opened  # the first idle one is the oldest
        closed = _closed_by_server(socks, 2.0)
        run.end_attack()
        outcome = {
            "max_connections": cap,
            "idle_connections": len(socks),
            "connection_idle_timeout_s": timeout,
            "seconds_to_open_them": round(opened_s, 2),
            "newcomer_locked_out_at_first": locked_out,
            "newcomer_admitted": bool(admitted),
            "seconds_from_the_first_idle_connection_until_admitted": round(admitted_s, 1)
            if admitted
            else None,
            "idle_connections_closed_by_the_server": closed,
        }
        holds = locked_out and bool(admitted) and admitted_s < timeout + 5
        return {
            "memory": run.memory(),
            "ping": run.ping,
            "outcome": outcome,
            "holds": holds,
            "summary": f"{len(socks)} idle connections: a newcomer locked out first, "
            f"admitted {admitted_s:.1f} s after the first idle one opened "
            f"(idle timeout {timeout} s); "
            f"{closed} idle ones closed",
        }
    finally:
        for sock in socks:
            sock.close()
        run.close()


def attack_session_flood(args) -> dict:
    """Item 14: sessions under invented client ids, past a server-wide cap."""
    cap, extra = args.max_sessions_total, 200
    try:
        server = start_server("sessions", f"--max-sessions-total={cap}", image=False)
    except RuntimeError as exc:
        return {"skipped": f"--max-sessions-total not understood by this tree: {str(exc)[-200:]}"}
    run = Run(server)
    try:
        client = tcp_client(server.tcp_port, timeout=60)
        created, refused, scopes, other = 0, 0, set(), set()
        total, started = cap + extra, time.monotonic()
        for first in range(0, total, 50):
            batch = range(first, min(total, first + 50))
            client.send_raw(
                b"".join(
                    json.dumps(
                        {
                            "id": i,
                            "command": "create_session",
                            "parameters": {"client_id": f"invented-{i}"},
                        }
                    ).encode()
                    + b"\n"
                    for i in batch
                )
            )
            for _ in batch:
                reply = client.read_reply()
                if reply["status"] == "success":
                    created += 1
                elif reply.get("error_type") == "SessionLimitExceeded":
                    refused += 1
                    scopes.add((reply.get("details") or {}).get("scope"))
                else:
                    other.add(reply.get("error_type"))
        seconds = time.monotonic() - started
        run.end_attack()
        client.close()
        outcome = {
            "max_sessions_total": cap,
            "attempted": total,
            "created": created,
            "session_limit_exceeded": refused,
            "scopes": sorted(map(str, scopes)),
            "other_errors": sorted(map(str, other)),
            "seconds": round(seconds, 2),
        }
        holds = created == cap and refused == extra and scopes == {"server"}
        return {
            "memory": run.memory(),
            "ping": run.ping,
            "outcome": outcome,
            "holds": holds,
            "summary": f"{total} create_session under invented ids in {seconds:.1f} s: "
            f"{created} created, {refused} SessionLimitExceeded (scope "
            f"{'/'.join(outcome['scopes'])})",
        }
    finally:
        run.close()


def attack_privilege_separation(args) -> dict:
    """Item 15: user code reads DATA/secret.key and signals the server, with --image-user."""
    from tests.e2e.test_privsep import IMAGE_USER, SYSTEM_PYTHON, _image_user_can_run_the_image

    reason = _image_user_can_run_the_image()
    if reason:
        return {"skipped": reason}
    directory = Path(tempfile.mkdtemp(prefix="stui-bench-privsep-", dir="/tmp"))
    directory.chmod(0o755)
    server = start_server(
        "privsep",
        f"--image-user={IMAGE_USER}",
        f"--image-python={SYSTEM_PYTHON}",
        directory=directory,
    )
    run = Run(server)
    try:
        client = tcp_client(server.tcp_port)
        client.result("create_session", client_id="alice")
        key = server.data_dir / "secret.key"
        uid = client.result("evaluate", code="import os\nos.getuid()")["result"]
        read = rpc(client, "evaluate", code=f"open({str(key)!r}).read()")
        listed = rpc(client, "evaluate", code=f"os.listdir({str(server.data_dir)!r})")
        kill = rpc(client, "evaluate", code="os.kill(os.getppid(), 9)")
        alive = client.result("ping")["message"] == "pong" and server.process.poll() is None
        run.end_attack()
        client.close()

        def denied(reply: dict) -> bool:
            return "PermissionError" in (reply.get("error") or "")

        outcome = {
            "image_uid": int(uid),
            "image_user": IMAGE_USER,
            "read_secret_key": "PermissionError" if denied(read) else "read",
            "list_data_dir": "PermissionError" if denied(listed) else "listed",
            "kill_server": "PermissionError" if denied(kill) else "sent",
            "server_alive": alive,
        }
        holds = denied(read) and denied(listed) and denied(kill) and alive
        return {
            "memory": run.memory(),
            "ping": run.ping,
            "outcome": outcome,
            "holds": holds,
            "summary": f"as {IMAGE_USER}: read secret.key, list the data dir, "
            f"os.kill(server): PermissionError x{denied(read) + denied(listed) + denied(kill)}"
            f"; server alive: {alive}",
        }
    finally:
        run.close()
        shutil.rmtree(directory, ignore_errors=True)


def attack_timestamps(args) -> dict:
    """Item 16: one write, one timestamp: save_context, get_context_summary, load_context."""
    server = start_server("timestamps")
    run = Run(server)
    try:
        client = tcp_client(server.tcp_port)
        client.result("create_session", client_id="ts")
        client.result("evaluate", code="x = 1")
        saved = client.result("save_context")["saved_at"]
        summary = client.result("get_context_summary")["last_saved_at"]
        loaded = client.result("load_context")["saved_at"]
        run.end_attack()
        client.close()
        outcome = {
            "save_context.saved_at": saved,
            "get_context_summary.last_saved_at": summary,
            "load_context.saved_at": loaded,
        }
        holds = saved == summary == loaded
        return {
            "memory": run.memory(),
            "ping": run.ping,
            "outcome": outcome,
            "holds": holds,
            "summary": f"all three equal: {holds} ({saved})",
        }
    finally:
        run.close()


#: name -> (issue 13 item, function)
ATTACKS = {
    "image-death": (1, attack_image_death),
    "zmq-frame": (2, attack_zmq_frame),
    "partial-lines": (3, attack_partial_lines),
    "trickle": (4, attack_trickle_lines),
    "big-display": (5, attack_big_display),
    "big-exception": (5, attack_big_exception),
    "big-binding": (6, attack_big_binding),
    "zmq-peers": (7, attack_zmq_peers),
    "stdout-flood": (8, attack_stdout_flood),
    "batch-disk-full": (9, attack_batch_disk_full),
    "deep-nesting": (10, attack_deep_nesting),
    "lone-surrogates": (11, attack_lone_surrogates),
    "fd-exhaustion": (12, attack_fd_exhaustion),
    "idle-connections": (13, attack_idle_connections),
    "session-flood": (14, attack_session_flood),
    "privilege-separation": (15, attack_privilege_separation),
    "timestamps": (16, attack_timestamps),
}

#: scaled default, and the issue's original size (--full)
SCALES = {
    "frame_mib": (400, 400),
    "partial_connections": (150, 150),
    "partial_line_mib": (7.5, 7.5),
    "trickle_attackers": (40, 40),
    "trickle_seconds": (15.0, 15.0),
    "value_mib": (400, 400),
    "exception_mib": (50, 50),
    "peers": (10_500, 30_000),
    "peer_seconds": (90.0, 600.0),
    "flood_seconds": (15.0, 15.0),
    "depth": (500, 500),
    "nofile_soft": (1024, 1024),
    "nofile_hard": (1024, 1024),
    "fd_connections": (1000, 1000),
    "idle_timeout": (3.0, 600.0),
    "idle_connections": (100, 1000),
    "max_sessions_total": (3000, 3000),
}


def run_one(name: str, args) -> dict:
    item, function = ATTACKS[name]
    started = time.monotonic()
    try:
        result = function(args)
    except Exception as exc:  # reported as a failed measurement, the other attacks still run
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    result = {
        "attack": name,
        "item": item,
        "seconds": round(time.monotonic() - started, 1),
        **result,
    }
    if "holds" in result:
        result["verdict"] = "holds" if result["holds"] else "DOES NOT HOLD"
    elif "skipped" in result:
        result["verdict"] = "skipped"
    else:
        result["verdict"] = "error"
    return result


def _cell(value) -> str:
    return "–" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def markdown(report: dict) -> str:
    lines = [
        f"# Issue 13 attacks, {report['stamp']} (commit {report['commit']})",
        "",
        f"`{report['command']}` on {report['machine']}; server RSS in MiB "
        "(peak = VmHWM since start); another client's ping in ms.",
        "",
        "| # | attack | RSS before / peak / after | others' ping p50 / p99 (n) | outcome | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        memory = r.get("memory") or {}
        ping = r.get("ping") or {}
        mem = " / ".join(_cell(memory.get(k)) for k in ("before", "peak", "after"))
        pings = (
            f"{ping['p50_ms']} / {ping['p99_ms']} ({ping['count']})" if "p50_ms" in ping else "–"
        )
        text = r.get("summary") or r.get("skipped") or r.get("error", "")
        lines.append(f"| {r['item']} | {r['attack']} | {mem} | {pings} | {text} | {r['verdict']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", action="append", choices=sorted(ATTACKS), help="run only this attack (repeatable)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the results")
    parser.add_argument(
        "--full",
        action="store_true",
        help="also the slow sizes: 30,000 ZeroMQ peers, a 600 s idle timeout with 1,000 connections",
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    for key, (scaled, _full) in SCALES.items():
        parser.add_argument(
            "--" + key.replace("_", "-"),
            type=type(scaled),
            default=None,
            help=f"default {scaled}, --full {_full}",
        )
    args = parser.parse_args(argv)
    for key, (scaled, full) in SCALES.items():
        if getattr(args, key) is None:
            setattr(args, key, full if args.full else scaled)
    names = args.only or list(ATTACKS)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True
    ).stdout.strip()
    stamp = time.strftime("%Y%m%dT%H%M%S")
    report = {
        "stamp": stamp,
        "commit": commit,
        "tree": server_tree() or str(REPO_ROOT),
        "command": " ".join(
            ["python -m benchmarks.attacks", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, uid {os.geteuid()} "
        f"({pwd.getpwuid(os.geteuid()).pw_name})",
        "scale": {key: getattr(args, key) for key in SCALES},
        "results": [],
    }
    started = time.monotonic()
    for name in names:
        print(f"-- {name} (item {ATTACKS[name][0]})", flush=True)
        result = run_one(name, args)
        print(
            f"   {result['verdict']}: {result.get('summary') or result.get('skipped') or result.get('error')}"
            f" [{result['seconds']} s]",
            flush=True,
        )
        report["results"].append(result)
    report["total_seconds"] = round(time.monotonic() - started, 1)
    if not args.no_write:
        args.out.mkdir(parents=True, exist_ok=True)
        base = args.out / f"attacks-{stamp}"
        base.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        base.with_suffix(".md").write_text(markdown(report))
        print("written", base.with_suffix(".json"), base.with_suffix(".md"))
    return report


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    main()
