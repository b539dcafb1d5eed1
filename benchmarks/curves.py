"""Cost curves of issue 21 item 3: how four costs grow with the size of what the server holds.

    .venv/bin/python -m benchmarks.curves --quick            # every curve, fewer points/samples
    .venv/bin/python -m benchmarks.curves --only a           # one curve: a | b | c | d

- C{a}: ``restore_session`` latency against the session's bindings (1 KiB to 8 MiB),
  warm (the session is live in the image) and cold (the first restore after a restart:
  the file is read, verified and the namespace rebuilt in the image);
- C{b}: ``evaluate('1+1')`` latency against the number of live sessions (1 to 10,000,
  each created over the protocol and given a namespace in the image by one evaluation),
  in the first session and in a random one, with the RSS of server and image; the curve
  stops at the first level that would not fit in its time budget;
- C{c}: start-up time (process start to the first answered ``ping``) and RSS against
  sessions on disk (1,000, 10,000, 100,000), with the index and without it (full scan);
  the sessions are written offline by the store's own code (L{generate_sessions}: a
  L{SessionStore} in a child process, MACs and index as the server writes them);
- C{d}: event fan-out: the time from sending ``evaluate`` until C{evaluation_finished}
  reaches the first and the last of N subscribers (1 to 1,000), each on its own
  connection.

Every server is a real ``twistd -n stui`` with ``--durability batch``, pinned to CPU 0
like the other benchmarks (L{benchmarks.common.pin_to_cpu}).  For C{d} the client moves
to CPU 1 once the server runs, so reading 1,000 sockets does not compete with the
server it measures.  Each curve writes ``results/curves-<which>-<stamp>.json`` and
``.png``, and prints its markdown table; every point carries its ratio to the first
point of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import selectors
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.aclient import Conn
from benchmarks.common import (
    REPO_ROOT,
    Series,
    affinity_of,
    interleaved,
    pin_to_cpu,
    rss_bytes,
    runner,
    server_pids,
    start_stui,
    tcp_client,
    timed_call,
    wait_image_running,
    workdir,
)
from benchmarks.run import RESULTS, git_commit, machine
from tests.serverproc import ServerProcess

KIB = 1024
MIB = 1024 * KIB
BATCH = "--durability=batch"
MANY = (
    "--max-sessions-per-client=1000000",
    "--max-sessions-total=1000000",
    "--create-rate-limit=100000000",
)


# -- shared -------------------------------------------------------------------


def _ms(summary: dict, key: str = "median_us") -> float | None:
    value = summary.get(key)
    return None if value is None else round(value / 1000, 3)


def _ratios(points: list[dict], keys: tuple[str, ...]) -> None:
    """Add C{<key>_ratio}: each point's value over the first point's, same run."""
    if not points:
        return
    first = points[0]
    for point in points:
        for key in keys:
            try:
                point[f"{key}_ratio"] = round(point[key] / first[key], 2)
            except (KeyError, TypeError, ZeroDivisionError):
                point[f"{key}_ratio"] = None


def _server_rss(server: ServerProcess) -> tuple[int, int]:
    """(twistd RSS, image RSS) in bytes."""
    pids = server_pids(server)
    return rss_bytes(pids[0]), sum(rss_bytes(pid) for pid in pids[1:])


def _line(points: list[dict], x: str, y: str) -> list[tuple]:
    """(point[x], point[y]) of every point: one line of a panel."""
    return [(point[x], point[y]) for point in points]


def plot(result: dict, path: Path) -> None:
    """One panel per entry of C{result['panels']}: lines of (x, y) against a log x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = result["panels"]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for label, line in panel["lines"].items():
            xs = [x for x, y in line if y is not None]
            ys = [y for x, y in line if y is not None]
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_xscale("log", base=panel.get("log_base", 10))
        if panel.get("log_y"):
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        ax.set_xlabel(panel["x_label"])
        ax.set_ylabel(panel["y_label"])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(result["title"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(result: dict) -> str:
    """The curve's table: one row per point, the columns of C{result['columns']}."""
    columns = result["columns"]
    lines = [
        "| " + " | ".join(label for label, _key in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for point in result["points"]:
        cells = []
        for _label, key in columns:
            value = point.get(key)
            if isinstance(value, float) and key.endswith("_ratio"):
                cells.append(f"{value:.2f}×")
            elif value is None:
                cells.append("–")
            else:
                cells.append(f"{value:,}" if isinstance(value, int) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(which: str, result: dict, stamp: str) -> Path:
    """results/curves-<which>-<stamp>.json and .png; answers the JSON path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"curves-{which}-{stamp}.json"
    result["machine"] = machine()
    result["commit"] = git_commit()
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    return out


# -- (a) restore latency against session size ---------------------------------


def bindings_code(size: int) -> str:
    """A cell binding C{data} to a dict of ~C{size} bytes (100-byte entries, like scale.py)."""
    return f"data = {{f'k{{i:07d}}': 'v' * 90 for i in range({max(1, size // 100)})}}"


def restore_curve(quick: bool) -> dict:
    """Warm and cold C{restore_session} of sessions holding 1 KiB to 8 MiB of bindings."""
    sizes = [KIB, 8 * KIB, 64 * KIB, 512 * KIB, 2 * MIB, 8 * MIB]
    if not quick:
        sizes = [KIB, 4 * KIB, 16 * KIB, 64 * KIB, 256 * KIB, MIB, 2 * MIB, 4 * MIB, 8 * MIB]
    warm_requests, restarts = (60, 2) if quick else (200, 4)
    server = start_stui("curve-a", BATCH, *MANY, "--max-session-bytes=134217728", zmq=False)
    points = []
    try:
        client = tcp_client(server.tcp_port, timeout=120)
        sessions = {}
        for size in sizes:
            sid = client.result("create_session", client_id="curve-a")["session_id"]
            client.result("evaluate", session_id=sid, code=bindings_code(size))
            saved = client.result("save_context", session_id=sid)
            sessions[size] = (sid, saved.get("size_bytes"))

        warm = interleaved(
            {
                size: runner(client, "restore_session", session_id=sid, client_id="curve-a")
                for size, (sid, _) in sessions.items()
            },
            warm_requests,
            warmup=5,
        )
        client.close()
        cold = {size: Series(f"cold {size}") for size in sizes}
        for run in range(restarts):
            server.stop()
            server.start(timeout=120)
            wait_image_running(server)
            client = tcp_client(server.tcp_port, timeout=120)
            order = sizes if run % 2 == 0 else list(reversed(sizes))
            for size in order:
                elapsed, reply = timed_call(
                    client, "restore_session", session_id=sessions[size][0], client_id="curve-a"
                )
                ok = reply.get("status") == "success" and reply["result"]["restored_bindings"]
                if ok:
                    cold[size].samples.append(elapsed)
                else:
                    cold[size].errors += 1
            client.close()
    finally:
        server.kill()
    for size in sizes:
        w, c = warm[size].summary(), cold[size].summary()
        points.append(
            {
                "bindings_bytes": size,
                "bindings": f"{size // MIB} MiB" if size >= MIB else f"{size // KIB} KiB",
                "file_bytes": sessions[size][1],
                "warm": w,
                "cold": c,
                "warm_median_ms": _ms(w),
                "warm_p99_ms": _ms(w, "p99_us"),
                "cold_median_ms": _ms(c),
                "cold_max_ms": _ms(c, "max_us"),
            }
        )
    _ratios(points, ("warm_median_ms", "cold_median_ms"))
    return {
        "curve": "a",
        "title": "restore_session latency against the session's bindings (batch, CPU 0)",
        "settings": {"warm_requests": warm_requests, "restarts": restarts, "sizes": sizes},
        "points": points,
        "columns": [
            ("bindings", "bindings"),
            ("file bytes", "file_bytes"),
            ("warm median ms", "warm_median_ms"),
            ("warm ×1 KiB", "warm_median_ms_ratio"),
            ("warm p99 ms", "warm_p99_ms"),
            ("cold median ms", "cold_median_ms"),
            ("cold ×1 KiB", "cold_median_ms_ratio"),
            ("cold max ms", "cold_max_ms"),
        ],
        "panels": [
            {
                "x_label": "bindings (bytes)",
                "y_label": "restore_session, ms (median)",
                "log_base": 2,
                "log_y": True,
                "lines": {
                    "warm (live in the image)": _line(points, "bindings_bytes", "warm_median_ms"),
                    "cold (first after a restart)": _line(
                        points, "bindings_bytes", "cold_median_ms"
                    ),
                },
            }
        ],
    }


# -- (b) evaluate latency against live sessions -------------------------------


async def _add_live_sessions(port: int, first: int, count: int, sids: list[str]) -> Series:
    """Create C{count} sessions and evaluate once in each (so each has a namespace)."""
    conns = [await Conn.open(port, timeout=60) for _ in range(8)]
    series = Series("create + first evaluate")
    numbers = iter(range(first, first + count))

    async def worker(conn: Conn) -> None:
        for i in numbers:
            started = time.perf_counter()
            client_id = f"live-{i % 1000}"
            reply = await conn.call("create_session", client_id=client_id)
            if reply.get("status") != "success":
                series.errors += 1
                continue
            sid = reply["result"]["session_id"]
            reply = await conn.call("evaluate", session_id=sid, code=f"x = {i}")
            if reply.get("status") != "success":
                series.errors += 1
                continue
            sids.append(sid)
            series.samples.append(time.perf_counter() - started)

    await asyncio.gather(*(worker(c) for c in conns for _ in range(2)))
    for conn in conns:
        await conn.close()
    return series


def live_sessions_curve(quick: bool, budget: float) -> dict:
    """C{evaluate('1+1')} latency with 1 … 10,000 live sessions, as far as C{budget} allows."""
    levels = [1, 10, 100, 1000, 3000, 10_000] if not quick else [1, 10, 100, 1000, 3000]
    requests = 100 if quick else 300
    server = start_stui("curve-b", BATCH, *MANY, "--max-connections=5000", zmq=False)
    points, stopped = [], None
    started = time.monotonic()
    sids: list[str] = []
    rng = random.Random(21)

    def in_random() -> float:
        sid = rng.choice(sids)
        elapsed, reply = timed_call(probe, "evaluate", session_id=sid, code="1+1")
        if reply.get("status") != "success":
            raise ValueError(reply)
        return elapsed

    try:
        probe = tcp_client(server.tcp_port, timeout=120)
        for level in levels:
            # The last level's creation rate says whether this one fits in the budget.
            missing = level - len(sids)
            if points:
                rate = points[-1]["create_per_s"] or 1
                remaining = budget - (time.monotonic() - started)
                if missing / rate + 3 * requests * 0.01 > remaining:
                    stopped = (
                        f"{level} sessions not measured: at {rate:.0f} sessions/s they would"
                        f" take {missing / rate:.0f} s, {remaining:.0f} s of the"
                        f" {budget:.0f} s budget were left"
                    )
                    break
            t0 = time.perf_counter()
            created = asyncio.run(_add_live_sessions(server.tcp_port, len(sids), missing, sids))
            create_wall = time.perf_counter() - t0
            time.sleep(1.5)  # let the batch flush of the new sessions pass
            in_first = runner(probe, "evaluate", session_id=sids[0], code="1+1")
            measured = interleaved({"first": in_first, "random": in_random}, requests, warmup=10)
            server_rss, image_rss = _server_rss(server)
            f, r = measured["first"].summary(), measured["random"].summary()
            points.append(
                {
                    "live_sessions": len(sids),
                    "first": f,
                    "random": r,
                    "first_median_ms": _ms(f),
                    "first_p99_ms": _ms(f, "p99_us"),
                    "random_median_ms": _ms(r),
                    "random_p99_ms": _ms(r, "p99_us"),
                    "server_rss_mib": round(server_rss / MIB, 1),
                    "image_rss_mib": round(image_rss / MIB, 1),
                    "create_per_s": round(len(created.samples) / create_wall, 1)
                    if created.samples
                    else None,
                    "create_errors": created.errors,
                    "elapsed_s": round(time.monotonic() - started, 1),
                }
            )
            print(f"b: {points[-1]}", file=sys.stderr, flush=True)
        probe.close()
    finally:
        server.kill()
    _ratios(points, ("first_median_ms", "random_median_ms", "image_rss_mib"))
    return {
        "curve": "b",
        "title": "evaluate('1+1') latency against live sessions (batch, image on, CPU 0)",
        "settings": {"levels": levels, "requests": requests, "budget_s": budget},
        "stopped": stopped,
        "points": points,
        "columns": [
            ("live sessions", "live_sessions"),
            ("first session median ms", "first_median_ms"),
            ("× 1 session", "first_median_ms_ratio"),
            ("p99 ms", "first_p99_ms"),
            ("random session median ms", "random_median_ms"),
            ("× 1 session", "random_median_ms_ratio"),
            ("p99 ms", "random_p99_ms"),
            ("server RSS MiB", "server_rss_mib"),
            ("image RSS MiB", "image_rss_mib"),
            ("create+eval /s", "create_per_s"),
        ],
        "panels": [
            {
                "x_label": "live sessions",
                "y_label": "evaluate('1+1'), ms",
                "log_y": True,
                "lines": {
                    "first session, median": _line(points, "live_sessions", "first_median_ms"),
                    "random session, median": _line(points, "live_sessions", "random_median_ms"),
                    "random session, p99": _line(points, "live_sessions", "random_p99_ms"),
                },
            },
            {
                "x_label": "live sessions",
                "y_label": "RSS, MiB",
                "lines": {
                    "server": _line(points, "live_sessions", "server_rss_mib"),
                    "image": _line(points, "live_sessions", "image_rss_mib"),
                },
            },
        ],
    }


# -- (c) start-up against sessions on disk ------------------------------------

GENERATOR = """
import os, sys, time
from twisted.internet import task
from twisted.python.failure import Failure
from stui_twisted.sessions.model import Session, new_session_id
from stui_twisted.storage.store import SessionStore

# Offline generation: no crash to survive, so no fsync (the files, MACs and the index
# are otherwise exactly what the store writes).
os.fsync = lambda fd: None

async def main(reactor, data_dir, count, clients):
    store = SessionStore(data_dir, reactor=reactor)
    await store.open()
    now = time.time()
    metas = []
    try:
        for start in range(0, count, 2000):
            batch = []
            for i in range(start, min(count, start + 2000)):
                session = Session(
                    session_id=new_session_id(), client_id=f"disk-{i % clients}",
                    created_at=now, timeout=86400.0, last_activity=now, last_modified=now,
                    session_state={"n": i, "note": "x" * 200},
                )
                batch.append(session.to_document())
                metas.append(session.meta())
            outcomes = await store.write_many(batch)
            bad = [k for k, v in outcomes.items() if isinstance(v, Failure)]
            if bad:
                raise SystemExit(f"{len(bad)} writes failed, e.g. {outcomes[bad[0]]}")
        await store.write_index(metas)
    finally:
        await store.close()

task.react(main, [sys.argv[1], int(sys.argv[2]), int(sys.argv[3])])
"""


def generate_sessions(data_dir: Path, count: int, clients: int = 1000) -> float:
    """Write C{count} valid sessions (and the index) into C{data_dir}; answers seconds taken."""
    started = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    subprocess.run(
        [sys.executable, "-c", GENERATOR, str(data_dir), str(count), str(min(clients, count))],
        check=True,
        env=env,
        timeout=600,
    )
    return time.perf_counter() - started


def _timed_start(server: ServerProcess) -> tuple[float, float]:
    """(seconds to 'session service ready' in the log, seconds to the first ping)."""
    started = time.perf_counter()
    server.start(timeout=300)
    ready = time.perf_counter() - started
    client = tcp_client(server.tcp_port, timeout=60)
    client.result("ping")
    client.close()
    return ready, time.perf_counter() - started


def startup_curve(quick: bool) -> dict:
    """Start-up time and RSS with 1,000 / 10,000 / 100,000 sessions on disk."""
    counts = [1000, 10_000, 100_000]
    starts = 2 if quick else 3
    points = []
    for count in counts:
        work = workdir(f"curve-c-{count}")
        data_dir = work / "stui-data"
        generated = generate_sessions(data_dir, count)
        server = ServerProcess(work, BATCH, *MANY, zmq=False)
        with_index, without_index, without_image, rss = [], [], [], []
        try:
            for run in range(starts):
                ready, first_ping = _timed_start(server)
                with_index.append((ready, first_ping))
                if run == starts - 1:
                    wait_image_running(server)
                    time.sleep(1.0)
                    rss.append(_server_rss(server))
                server.stop(timeout=120)
            bare = ServerProcess(work, BATCH, *MANY, zmq=False, image=False)
            try:  # the store's share of start-up, without the image's own start
                for _ in range(starts):
                    without_image.append(_timed_start(bare)[1])
                    bare.stop(timeout=120)
            finally:
                bare.kill()
            (data_dir / "index.json").unlink()
            ready, first_ping = _timed_start(server)  # full scan; writes the index again
            without_index.append((ready, first_ping))
            wait_image_running(server)
            time.sleep(1.0)
            rss.append(_server_rss(server))
            loaded = tcp_client(server.tcp_port).result("get_session_statistics")
            server.stop(timeout=120)
        finally:
            server.kill()
        shutil.rmtree(work, ignore_errors=True)  # up to ~450 MB of generated sessions
        ready_times = sorted(r for r, _ in with_index)
        points.append(
            {
                "sessions_on_disk": count,
                "generated_s": round(generated, 1),
                "loaded_total": loaded.get("total_sessions", loaded.get("sessions")),
                "statistics": loaded,
                "ready_s_runs": [round(r, 3) for r, _ in with_index],
                "ready_s": round(ready_times[len(ready_times) // 2], 3),
                "first_ping_s": round(sorted(p for _, p in with_index)[len(with_index) // 2], 3),
                "no_image_first_ping_s": round(sorted(without_image)[len(without_image) // 2], 3),
                "no_index_ready_s": round(without_index[0][0], 3),
                "server_rss_mib": round(rss[0][0] / MIB, 1),
                "image_rss_mib": round(rss[0][1] / MIB, 1),
                "no_index_server_rss_mib": round(rss[1][0] / MIB, 1),
            }
        )
        print(f"c: {points[-1]}", file=sys.stderr, flush=True)
    _ratios(points, ("ready_s", "no_image_first_ping_s", "no_index_ready_s", "server_rss_mib"))
    return {
        "curve": "c",
        "title": "start-up and RSS against sessions on disk (batch, warm page cache, CPU 0)",
        "settings": {"counts": counts, "starts_with_index": starts},
        "points": points,
        "columns": [
            ("sessions on disk", "sessions_on_disk"),
            ("ready s (index)", "ready_s"),
            ("× 1,000", "ready_s_ratio"),
            ("first ping s", "first_ping_s"),
            ("first ping s, no image", "no_image_first_ping_s"),
            ("× 1,000", "no_image_first_ping_s_ratio"),
            ("ready s (no index)", "no_index_ready_s"),
            ("× 1,000", "no_index_ready_s_ratio"),
            ("server RSS MiB", "server_rss_mib"),
            ("× 1,000", "server_rss_mib_ratio"),
            ("server RSS, no index", "no_index_server_rss_mib"),
            ("image RSS MiB", "image_rss_mib"),
        ],
        "panels": [
            {
                "x_label": "sessions on disk",
                "y_label": "seconds to 'session service ready'",
                "lines": {
                    "with the index": _line(points, "sessions_on_disk", "ready_s"),
                    "no index (full scan)": _line(points, "sessions_on_disk", "no_index_ready_s"),
                    "with the index, --image=no (first ping)": _line(
                        points, "sessions_on_disk", "no_image_first_ping_s"
                    ),
                },
            },
            {
                "x_label": "sessions on disk",
                "y_label": "RSS after start-up, MiB",
                "lines": {
                    "server": _line(points, "sessions_on_disk", "server_rss_mib"),
                    "image": _line(points, "sessions_on_disk", "image_rss_mib"),
                },
            },
        ],
    }


# -- (d) event fan-out against subscribers -------------------------------------


class Subscribers:
    """N raw subscriber connections read through one selector."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.selector = selectors.DefaultSelector()
        self.buffers: dict[int, bytes] = {}
        self.socks = []

    def add(self, count: int, session_id: str, client_id: str) -> None:
        """Open C{count} more connections, each subscribed to C{session_id}."""
        new = []
        for _ in range(count):
            sock = tcp_client(self.port, timeout=60).sock
            sock.sendall(
                json.dumps(
                    {
                        "id": "s",
                        "command": "subscribe",
                        "parameters": {"session_id": session_id, "client_id": client_id},
                    }
                ).encode()
                + b"\n"
            )
            new.append(sock)
        for sock in new:
            sock.setblocking(False)
            self.buffers[sock.fileno()] = b""
            self.selector.register(sock, selectors.EVENT_READ)
            self.socks.append(sock)
        replies = self.read_until(b'"id":"s"', len(new), timeout=60)
        if len(replies) < len(new):
            raise RuntimeError(f"only {len(replies)} of {len(new)} subscribe replies")

    def read_until(self, marker: bytes, count: int, timeout: float) -> dict[int, float]:
        """Read every socket until C{count} have a line containing C{marker}: fd → time."""
        arrived: dict[int, float] = {}
        deadline = time.perf_counter() + timeout
        while len(arrived) < count and time.perf_counter() < deadline:
            for key, _ in self.selector.select(timeout=1.0):
                now = time.perf_counter()
                fd = key.fd
                try:
                    chunk = key.fileobj.recv(1 << 20)
                except BlockingIOError:
                    continue
                if not chunk:
                    raise ConnectionError("a subscriber's connection was closed")
                data = self.buffers[fd] + chunk
                *lines, self.buffers[fd] = data.split(b"\n")
                if fd not in arrived and any(marker in line for line in lines):
                    arrived[fd] = now
        return arrived

    def close(self) -> None:
        for sock in self.socks:
            self.selector.unregister(sock)
            sock.close()
        self.selector.close()


def fanout_curve(quick: bool) -> dict:
    """Time for one C{evaluation_finished} to reach the first and the last of N subscribers."""
    levels = [1, 10, 100, 300, 1000]
    trials = 15 if quick else 40
    server = start_stui("curve-d", BATCH, "--max-connections=5000", zmq=False)
    server_cpu = affinity_of(server.process.pid)
    os.sched_setaffinity(0, {1} if os.cpu_count() > 1 else {0})
    points = []
    try:
        evaluator = tcp_client(server.tcp_port, timeout=60)
        sid = evaluator.result("create_session", client_id="fan")["session_id"]
        subscribers = Subscribers(server.tcp_port)
        marker = b'"event":"evaluation_finished"'
        for level in levels:
            subscribers.add(level - len(subscribers.socks), sid, "fan")
            first, last, reply = Series("first"), Series("last"), Series("reply")
            for trial in range(trials + 3):
                message = {"id": 1, "command": "evaluate", "parameters": {}}
                message["parameters"] = {"session_id": sid, "code": "1+1"}
                sent = time.perf_counter()
                evaluator.send_raw(json.dumps(message).encode() + b"\n")
                arrived = subscribers.read_until(marker, level, timeout=60)
                evaluator.read_line()
                replied = time.perf_counter()
                if len(arrived) < level:
                    first.errors += 1
                    continue
                if trial >= 3:
                    first.samples.append(min(arrived.values()) - sent)
                    last.samples.append(max(arrived.values()) - sent)
                    reply.samples.append(replied - sent)
            f, la = first.summary(), last.summary()
            point = {
                "subscribers": level,
                "first": f,
                "last": la,
                "reply_read_after_the_events": reply.summary(),  # not a figure of its own
                "first_median_ms": _ms(f),
                "last_median_ms": _ms(la),
                "spread_median_ms": round(_ms(la) - _ms(f), 3),
                "last_p90_ms": _ms(la, "p90_us"),
                "server_rss_mib": round(_server_rss(server)[0] / MIB, 1),
            }
            points.append(point)
            print(f"d: {point}", file=sys.stderr, flush=True)
        subscribers.close()
        evaluator.close()
    finally:
        server.kill()
        pin_to_cpu()
    _ratios(points, ("first_median_ms", "last_median_ms"))
    return {
        "curve": "d",
        "title": "evaluation_finished fan-out: send of evaluate → event at first / last subscriber",
        "settings": {"levels": levels, "trials": trials, "server_cpus": server_cpu},
        "points": points,
        "columns": [
            ("subscribers", "subscribers"),
            ("first median ms", "first_median_ms"),
            ("× 1", "first_median_ms_ratio"),
            ("last median ms", "last_median_ms"),
            ("× 1", "last_median_ms_ratio"),
            ("last − first ms", "spread_median_ms"),
            ("last p90 ms", "last_p90_ms"),
        ],
        "panels": [
            {
                "x_label": "subscribers (one connection each)",
                "y_label": "evaluate sent → evaluation_finished received, ms (median)",
                "lines": {
                    "first subscriber": _line(points, "subscribers", "first_median_ms"),
                    "last subscriber": _line(points, "subscribers", "last_median_ms"),
                },
            }
        ],
    }


# -- main -----------------------------------------------------------------------


def main() -> int:
    """Run the chosen curves; write their JSON and PNG; print their tables."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices="abcd", action="append", help="one curve (repeatable)")
    parser.add_argument("--quick", action="store_true", help="fewer points and samples")
    parser.add_argument(
        "--budget", type=float, default=240.0, help="seconds curve b may spend adding sessions"
    )
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 1,000 subscribers (d)
    pinned = pin_to_cpu()
    stamp = time.strftime("%Y%m%dT%H%M%S")
    curves = {
        "a": lambda: restore_curve(args.quick),
        "b": lambda: live_sessions_curve(args.quick, args.budget),
        "c": lambda: startup_curve(args.quick),
        "d": lambda: fanout_curve(args.quick),
    }
    for which in args.only or "abcd":
        started = time.monotonic()
        result = curves[which]()
        result["client_cpus"] = sorted(pinned)
        result["quick"] = args.quick
        result["wall_s"] = round(time.monotonic() - started, 1)
        out = write(which, result, stamp)
        print(f"\n### curve {which}: {result['title']} ({result['wall_s']} s)\n")
        print(markdown(result))
        if result.get("stopped"):
            print(f"\nstopped: {result['stopped']}")
        print(f"\nwrote {out} and {out.with_suffix('.png').name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
