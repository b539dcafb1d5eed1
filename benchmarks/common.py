"""Shared helpers of the benchmarks: CPU pinning, servers, clients, statistics.

The client pins itself to CPU 0 *before* it starts any server, so the
``twistd`` child, its image child and the floor servers inherit the same
single-CPU affinity (what ``taskset -c 0`` would give them); each server's
affinity is read back and recorded so a result says how it was measured.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.serverproc import LineClient, ServerProcess  # noqa: E402

PIN_CPU = 0


def pin_to_cpu(cpu: int = PIN_CPU) -> set[int]:
    """Pin this process (and every child it starts later) to C{cpu}."""
    os.sched_setaffinity(0, {cpu})
    return os.sched_getaffinity(0)


def affinity_of(pid: int) -> list[int]:
    """The CPUs C{pid} may run on (to record that a server really is pinned)."""
    try:
        return sorted(os.sched_getaffinity(pid))
    except OSError:
        return []


def workdir(prefix: str) -> Path:
    """A fresh temporary directory for one server's data and log."""
    return Path(tempfile.mkdtemp(prefix=f"stui-bench-{prefix}-"))


# -- statistics ---------------------------------------------------------------


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, int(round(fraction * len(sorted_values) + 0.5)) - 1))
    return sorted_values[rank]


@dataclass
class Series:
    """Latencies (seconds) of one measured operation, summarised in microseconds."""

    name: str
    samples: list[float] = field(default_factory=list)
    errors: int = 0

    def summary(self) -> dict:
        """Count, median, p90, p99, max and mean in microseconds."""
        values = sorted(self.samples)
        if not values:
            return {"n": 0, "errors": self.errors}
        return {
            "n": len(values),
            "errors": self.errors,
            "median_us": round(statistics.median(values) * 1e6, 1),
            "p90_us": round(percentile(values, 0.90) * 1e6, 1),
            "p99_us": round(percentile(values, 0.99) * 1e6, 1),
            "max_us": round(values[-1] * 1e6, 1),
            "mean_us": round(statistics.fmean(values) * 1e6, 1),
        }


def ratio(measured: dict, reference: dict, key: str) -> float | None:
    """C{measured[key] / reference[key]}, rounded, or None when either is missing."""
    try:
        return round(measured[key] / reference[key], 3)
    except (KeyError, ZeroDivisionError, TypeError):
        return None


def compare(name: str, measured: Series, reference: Series, **extra) -> dict:
    """One result row: a figure beside its reference and their ratios."""
    m, r = measured.summary(), reference.summary()
    row = {
        "name": name,
        "measured_label": measured.name,
        "reference_label": reference.name,
        "measured": m,
        "reference": r,
        "median_ratio": ratio(m, r, "median_us"),
        "p99_ratio": ratio(m, r, "p99_us"),
    }
    row.update(extra)
    return row


# -- servers ------------------------------------------------------------------


def server_tree() -> str | None:
    """The source tree the servers run from: C{$STUI_BENCH_TREE}, else this checkout."""
    return os.environ.get("STUI_BENCH_TREE") or None


def snapshot_head(destination: Path, revision: str = "HEAD") -> tuple[Path, str]:
    """Export the committed C{revision} (C{HEAD}) to C{destination} (a stable tree to benchmark).

    Others edit the working tree while benchmarks run; a half-saved module
    would make a server fail mid-run.  Returns (tree, commit).
    """
    commit = subprocess.run(
        ["git", "rev-parse", revision], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    destination.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "archive", "--format=tar", commit, "stui_twisted", "twisted", "tests"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(destination)], input=archive, check=True)
    return destination, commit


def start_stui(name: str, *args: str, image: bool = True, zmq: bool = True) -> ServerProcess:
    """Start a real C{twistd -n stui} (inheriting this process's CPU pinning)."""
    tree = server_tree()
    env = {"PYTHONPATH": tree} if tree else None
    server = ServerProcess(workdir(name), *args, image=image, zmq=zmq, env=env)
    server.start(timeout=60)
    if image:
        wait_image_running(server)
    return server


def wait_image_running(server: ServerProcess, timeout: float = 30.0) -> dict:
    """Poll C{ping} until the image reports C{running}.

    C{ServerProcess.start} returns once the image process is spawned; the
    image then still imports and warms up for a few hundred milliseconds, and
    the first request that needs it would wait for that and be mis-timed.
    """
    client = tcp_client(server.tcp_port)
    try:
        deadline = time.monotonic() + timeout
        while True:
            image = client.result("ping")["image"]
            if image.get("status") == "running" or time.monotonic() > deadline:
                return image
            time.sleep(0.02)
    finally:
        client.close()


def server_pids(server: ServerProcess) -> list[int]:
    """The twistd pid and its children (the image)."""
    import psutil

    root = psutil.Process(server.process.pid)
    return [root.pid] + [child.pid for child in root.children(recursive=True)]


def rss_bytes(pid: int) -> int:
    """Resident set size of C{pid} in bytes (0 when it is gone)."""
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


class FloorServer:
    """The floor servers of L{benchmarks.floor} in a child process."""

    def __init__(self, *args: str) -> None:
        self.process: subprocess.Popen | None = None
        self.tcp_port: int | None = None
        self.zmq_url: str | None = None
        self.args = args
        """C{("pyzmq",)}: the bare pyzmq echo (only C{zmq_url})."""

    def start(self, timeout: float = 30.0) -> FloorServer:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO_ROOT)
        if self.args:
            self.tcp_port = 0  # the pyzmq echo has no TCP floor
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.floor", *self.args],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            cwd=REPO_ROOT,
            env=env,
            text=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (self.tcp_port is None or self.zmq_url is None):
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError("floor server exited before it was listening")
            kind, _, value = line.strip().partition(" ")
            if kind == "tcp":
                self.tcp_port = int(value)
            elif kind in ("zmq", "pyzmq"):
                self.zmq_url = value
        if self.tcp_port is None or self.zmq_url is None:
            self.stop()
            raise RuntimeError("floor server did not report its ports in time")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


# -- blocking clients ---------------------------------------------------------


def tcp_client(port: int, timeout: float = 30.0) -> LineClient:
    """A blocking line-JSON client with Nagle off (every request is one small write)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return LineClient(sock, timeout)


def timed_call(client: LineClient, command: str, **params) -> tuple[float, dict]:
    """(seconds, reply) of one request/reply round trip."""
    message = json.dumps({"id": 1, "command": command, "parameters": params}).encode() + b"\n"
    started = time.perf_counter()
    client.send_raw(message)
    line = client.read_line()
    elapsed = time.perf_counter() - started
    return elapsed, json.loads(line)


def runner(client: LineClient, command: str, **params):
    """A runner for L{interleaved}: one timed C{command} round trip, ValueError on an error."""

    def one() -> float:
        elapsed, reply = timed_call(client, command, **params)
        if reply.get("status") != "success":
            raise ValueError(reply)
        return elapsed

    return one


def time_requests(
    client: LineClient, series: Series, command: str, params_for, count: int, warmup: int
) -> list[dict]:
    """C{warmup + count} requests, C{params_for(i)} each; the last C{count} timed into
    C{series} (a failed one counts in C{series.errors}); answers the results."""
    results = []
    for i in range(warmup + count):
        try:
            elapsed, reply = timed_call(client, command, **params_for(i))
        except ValueError:  # not JSON
            series.errors += 1
            continue
        if reply.get("status") != "success" or "result" not in reply:
            series.errors += 1
            continue
        results.append(reply["result"])
        if i >= warmup:
            series.samples.append(elapsed)
    return results


class ZmqClient:
    """A blocking pyzmq REQ client."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        import zmq

        self._zmq = zmq
        self.context = zmq.Context.instance()
        self.socket = self.context.socket(zmq.REQ)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVTIMEO, int(timeout * 1000))
        self.socket.connect(url)

    def timed(self, payload: bytes) -> tuple[float, bytes]:
        """(seconds, reply frame) of one round trip."""
        started = time.perf_counter()
        self.socket.send(payload)
        reply = self.socket.recv()
        return time.perf_counter() - started, reply

    def call(self, command: str, **params) -> dict:
        """One request, decoded reply."""
        message = json.dumps({"id": 1, "command": command, "parameters": params}).encode()
        return json.loads(self.timed(message)[1])

    def close(self) -> None:
        self.socket.close()


def interleaved(runners: dict, total: int, warmup: int, rounds: int = 10) -> dict[str, Series]:
    """Run each C{runners[name]()} (one timed round trip → seconds) in alternating blocks.

    Alternating blocks of C{total/rounds} requests spread slow drift (page
    cache, CPU frequency, other tenants) over every series alike, so the ratio
    of two series measured here is fair.
    """
    series = {name: Series(name) for name in runners}
    for run in runners.values():
        for _ in range(warmup):
            run()
    block = max(1, total // rounds)
    for _ in range(rounds):
        for name, run in runners.items():
            samples = series[name].samples
            for _ in range(block):
                try:
                    samples.append(run())
                except (OSError, ValueError, AssertionError, KeyError):
                    series[name].errors += 1
    return series
