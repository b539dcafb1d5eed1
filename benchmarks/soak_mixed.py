"""Soak: mixed traffic from 50 clients with random disconnects and 2 server restarts.

    .venv/bin/python -m benchmarks.soak_mixed --minutes 30 --clients 50

Each client owns one session and loops over a random mix of
``update_session_state`` (a counter), ``evaluate``, ``get_session_info``,
``get_context_summary`` and ``ping``; now and then it drops its connection
and comes back with ``restore_session``.  The server is restarted (SIGTERM,
same data dir) at 1/3 and 2/3 of the run.  Server + image RSS is sampled
every few seconds.  At the end every session's stored counter is compared
with the last one its client saw acknowledged: a smaller one is a lost
update.

Writes ``benchmarks/results/soak-mixed-<timestamp>.json`` and ``.png``
(memory over time, restarts marked).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time

from benchmarks.aclient import Conn
from benchmarks.common import REPO_ROOT, rss_bytes, server_pids, start_stui, wait_image_running

RESULTS = REPO_ROOT / "benchmarks" / "results"
CONNECTION_ERRORS = (OSError, ConnectionError, TimeoutError, asyncio.IncompleteReadError)


class Soak:
    """Shared state of one mixed soak: the server, counters and samples."""

    def __init__(self, clients: int, seconds: float, seed: int) -> None:
        self.clients = clients
        self.seconds = seconds
        self.rng = random.Random(seed)
        self.server = None
        self.restarting = False
        self.acked: dict[str, int] = {}
        self.sessions: dict[int, str] = {}
        self.errors: dict[str, int] = {}
        self.requests = 0
        self.disconnects = 0
        self.memory: list[tuple[float, int, int]] = []
        self.restarts: list[float] = []
        self.started = 0.0

    def count_error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    async def client(self, index: int) -> None:
        """One client: its session, a random mix of commands, random disconnects."""
        rng = random.Random(self.rng.random())
        client_id = f"soak-{index}"
        counter = 0
        while time.monotonic() - self.started < self.seconds:
            if self.restarting:
                await asyncio.sleep(0.1)
                continue
            try:
                conn = await Conn.open(self.server.tcp_port, timeout=10)
            except CONNECTION_ERRORS:
                self.count_error("connect (during restart)" if self.restarting else "connect")
                await asyncio.sleep(0.2)
                continue
            try:
                sid = self.sessions.get(index)
                if sid is None:
                    reply = await conn.call("create_session", client_id=client_id)
                    sid = reply["result"]["session_id"]
                    self.sessions[index] = sid
                    self.acked[sid] = 0
                else:
                    reply = await conn.call("restore_session", session_id=sid, client_id=client_id)
                    if reply["status"] != "success":
                        self.count_error(f"restore: {reply.get('error_type')}")
                        continue
                    counter = max(
                        counter, int((reply["result"]["session_state"] or {}).get("counter", 0))
                    )
                for _ in range(rng.randint(20, 400)):
                    if time.monotonic() - self.started >= self.seconds:
                        break
                    choice = rng.random()
                    if choice < 0.4:
                        counter += 1
                        reply = await conn.call(
                            "update_session_state",
                            session_id=sid,
                            state_data={"counter": counter, "pad": "x" * rng.randint(10, 2000)},
                        )
                        if reply["status"] == "success":
                            self.acked[sid] = max(self.acked[sid], counter)
                    elif choice < 0.6:
                        reply = await conn.call(
                            "evaluate",
                            session_id=sid,
                            code=rng.choice(
                                [
                                    "1+1",
                                    "x = list(range(100))",
                                    "len(x) if 'x' in dir() else 0",
                                    "print('hi')",
                                    "y = {'a': [1, 2, 3]}",
                                ]
                            ),
                        )
                    elif choice < 0.75:
                        reply = await conn.call("get_session_info", session_id=sid)
                    elif choice < 0.85:
                        reply = await conn.call("get_context_summary", session_id=sid)
                    else:
                        reply = await conn.call("ping")
                    self.requests += 1
                    if reply["status"] != "success":
                        self.count_error(reply.get("error_type", "error"))
                    await asyncio.sleep(rng.uniform(0, 0.02))
                self.disconnects += 1
            except CONNECTION_ERRORS:
                self.count_error(
                    "connection lost (during restart)" if self.restarting else "connection lost"
                )
            finally:
                await conn.close()

    async def sample_memory(self) -> None:
        """Server + image RSS every 2 s."""
        while time.monotonic() - self.started < self.seconds:
            if not self.restarting:
                pids = server_pids(self.server)
                self.memory.append(
                    (
                        round(time.monotonic() - self.started, 1),
                        rss_bytes(pids[0]),
                        sum(rss_bytes(p) for p in pids[1:]),
                    )
                )
            await asyncio.sleep(2.0)

    async def restart_twice(self) -> None:
        """SIGTERM and restart the server at 1/3 and 2/3 of the run."""
        for fraction in (1 / 3, 2 / 3):
            await asyncio.sleep(max(0.0, self.started + self.seconds * fraction - time.monotonic()))
            self.restarting = True
            self.restarts.append(round(time.monotonic() - self.started, 1))
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, self.server.stop)
            await loop.run_in_executor(None, self.server.start, 60)
            await loop.run_in_executor(None, wait_image_running, self.server)
            self.restarting = False

    async def run(self) -> None:
        """Start the server and the clients; verify every counter at the end."""
        self.server = start_stui(
            "soak-mixed", "--max-sessions-per-client=10", "--max-connections=5000"
        )
        self.started = time.monotonic()
        try:
            await asyncio.gather(
                self.sample_memory(),
                self.restart_twice(),
                *(self.client(i) for i in range(self.clients)),
            )
            self.lost = await self.verify()
        finally:
            self.server.stop()

    async def verify(self) -> dict:
        """Stored counter vs last acknowledged, for every session."""
        conn = await Conn.open(self.server.tcp_port)
        lost = {}
        for index, sid in self.sessions.items():
            reply = await conn.call("restore_session", session_id=sid, client_id=f"soak-{index}")
            stored = int((reply.get("result", {}).get("session_state") or {}).get("counter", -1))
            if stored < self.acked[sid]:
                lost[sid] = {"acked": self.acked[sid], "stored": stored}
        await conn.close()
        return lost


def plot(summary: dict, path) -> None:
    """Memory over time with the restarts marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [m[0] / 60 for m in summary["memory"]]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(t, [m[1] / 2**20 for m in summary["memory"]], label="server RSS")
    ax.plot(t, [m[2] / 2**20 for m in summary["memory"]], label="image RSS")
    for r in summary["restarts_at_s"]:
        ax.axvline(r / 60, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("minutes (dashed: server restarts)")
    ax.set_ylabel("MiB")
    ax.set_ylim(bottom=0)
    ax.set_title(
        f"mixed soak, {summary['clients']} clients: {summary['requests']} requests, "
        f"{len(summary['lost'])} lost updates"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    """Run the soak, write JSON and PNG; exit 1 when an acknowledged update was lost."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--cpu", type=int, default=None)
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    soak = Soak(args.clients, args.minutes * 60, args.seed)
    asyncio.run(soak.run())
    summary = {
        "minutes": args.minutes,
        "clients": args.clients,
        "requests": soak.requests,
        "disconnects": soak.disconnects,
        "errors": soak.errors,
        "restarts_at_s": soak.restarts,
        "sessions": len(soak.sessions),
        "lost": soak.lost,
        "memory": soak.memory,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"soak-mixed-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(summary, indent=1))
    plot(summary, out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in summary.items() if k != "memory"}, indent=2))
    print(f"wrote {out}")
    return 1 if soak.lost else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())
