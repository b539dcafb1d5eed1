"""Resource-exhaustion attacks on a real server: file descriptors and sessions.

    .venv/bin/python -m benchmarks.exhaustion [--connections 1200] [--soft 512 --hard 1024]
                                              [--sessions 3000 --max-sessions-total 1000]

1. **File descriptors** (issue 13, item 12): the server is started under a low
   ``RLIMIT_NOFILE`` (soft/hard), flooded with idle TCP connections, and its
   image is killed (``os._exit(3)`` via ``evaluate``) while they are held.
   Reported: the limit the server raised itself to, connections held / told
   why and closed / closed silently, ping latency of an old client during the
   flood, and how long the image took to be running again.
2. **Sessions under invented client ids** (item 14): ``create_session`` as fast
   as one pipelined connection can send, each under a new client id, against
   ``--max-sessions-total``.  Reported: created, refused with
   ``details.scope == "server"``, the rate, and the server's RSS.

Writes ``results/exhaustion-<timestamp>.json`` and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import time
from pathlib import Path

from benchmarks.common import tcp_client, wait_image_running, workdir
from tests.serverproc import ServerProcess

RESULTS = Path(__file__).resolve().parent / "results"


def rss_bytes(pid: int) -> int:
    """VmRSS of C{pid} from /proc (Linux), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _limited(soft: int, hard: int):
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return preexec


def fd_flood(connections: int, soft: int, hard: int) -> dict:
    server = ServerProcess(workdir("fd"), zmq=False, preexec_fn=_limited(soft, hard))
    server.start(timeout=60)
    wait_image_running(server)
    flood: list[socket.socket] = []
    try:
        client = tcp_client(server.tcp_port)
        session = client.result("create_session", client_id="bench-fd")["session_id"]
        client.result("evaluate", code="x = 7")
        for _ in range(connections):
            flood.append(socket.create_connection(("127.0.0.1", server.tcp_port), 30))
        held = told = closed = 0
        for sock in flood:
            sock.settimeout(0.5)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                held += 1  # admitted: an idle connection gets nothing
                continue
            if (
                data
                and json.loads(data.splitlines()[0])["details"].get("reason") == "file_descriptors"
            ):
                told += 1
            else:
                closed += 1
        pings = []
        for _ in range(50):
            started = time.perf_counter()
            client.result("ping")
            pings.append((time.perf_counter() - started) * 1000)
        before = client.result("ping")["image"]["pid"]
        killed_at = time.monotonic()
        client.call("evaluate", code="import os; os._exit(3)")
        respawned = None
        while time.monotonic() - killed_at < 60:
            image = client.result("ping")["image"]
            if image["status"] == "running" and image["pid"] != before:
                respawned = time.monotonic() - killed_at
                break
            time.sleep(0.02)
        client.result("restore_session", session_id=session)
        restored = client.result("evaluate", code="x")["result"]
        raised = [line for line in server.log_text().splitlines() if "open files:" in line]
        refusal_logged = "refusing new connections" in server.log_text()
        client.close()
        pings.sort()
        return {
            "rlimit_given": [soft, hard],
            "startup_log": raised[0].split("] ", 1)[-1] if raised else None,
            "connections_opened": connections,
            "held": held,
            "refused_with_reply": told,
            "refused_closed": closed,
            "refusal_logged": refusal_logged,
            "ping_ms_p50": round(pings[len(pings) // 2], 2),
            "ping_ms_max": round(pings[-1], 2),
            "image_respawn_s": None if respawned is None else round(respawned, 3),
            "restored_x": restored,
        }
    finally:
        for sock in flood:
            sock.close()
        server.kill()


def session_flood(sessions: int, cap: int) -> dict:
    server = ServerProcess(
        workdir("sessions"),
        f"--max-sessions-total={cap}",
        "--durability=none",
        "--create-rate-limit=1000000",
        image=False,
        zmq=False,
    )
    server.start(timeout=60)
    try:
        client = tcp_client(server.tcp_port, timeout=120)
        started = time.monotonic()
        batch = b"".join(
            json.dumps(
                {"id": n, "command": "create_session", "parameters": {"client_id": f"inv-{n}"}}
            ).encode()
            + b"\n"
            for n in range(sessions)
        )
        client.send_raw(batch)
        created = refused = other = 0
        for _ in range(sessions):
            reply = client.read_reply()
            if reply["status"] == "success":
                created += 1
            elif reply.get("details", {}).get("scope") == "server":
                refused += 1
            else:
                other += 1
        elapsed = time.monotonic() - started
        client.close()
        return {
            "attempts": sessions,
            "max_sessions_total": cap,
            "created": created,
            "refused_scope_server": refused,
            "other_errors": other,
            "seconds": round(elapsed, 3),
            "attempts_per_s": round(sessions / elapsed),
            "server_rss_mib": round(rss_bytes(server.process.pid) / 2**20, 1),
        }
    finally:
        server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1200)
    parser.add_argument("--soft", type=int, default=512)
    parser.add_argument("--hard", type=int, default=1024)
    parser.add_argument("--sessions", type=int, default=3000)
    parser.add_argument("--max-sessions-total", type=int, default=1000)
    args = parser.parse_args()
    results = {
        "fd_flood": fd_flood(args.connections, args.soft, args.hard),
        "session_flood": session_flood(args.sessions, args.max_sessions_total),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"exhaustion-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
