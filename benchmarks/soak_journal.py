"""Soak: kill -9 during bursts of ``create_session`` under ``batch`` (the group journal).

    .venv/bin/python -m benchmarks.soak_journal --runs 40 --cpu 1

One data dir for the whole soak, ``--image=no``.  Each run starts the server,
checks that every session created in earlier runs whose ``create_session`` was
acknowledged more than one flush interval (+ margin) before its kill is there
(``list_client_sessions``), then creates sessions in bursts of 20-120 with pauses
of 0-300 ms (so the kill lands in journal writes, in compactions and in the
removal of compacted journals alike) and SIGKILLs the server after a random
50-900 ms.  A session acknowledged within the window before a kill may be lost
(``batch``); one acknowledged earlier and missing is a violation (exit status 1).

Writes ``benchmarks/results/soak-journal-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import REPO_ROOT, server_tree
from benchmarks.soak_kill9 import BATCH_MARGIN
from tests.serverproc import LineClient, ServerProcess

RESULTS = REPO_ROOT / "benchmarks" / "results"
CLIENTS = 8


def _creating(port: int, rng: random.Random, acked: list[tuple[float, str, str]]) -> None:
    """Bursts of creates until the connection dies (the kill)."""
    try:
        client = LineClient(socket.create_connection(("127.0.0.1", port), timeout=15))
        while True:
            for _ in range(rng.randint(20, 120)):
                client_id = f"j{rng.randrange(CLIENTS)}"
                reply = client.call("create_session", client_id=client_id)
                if reply.get("status") == "success":
                    acked.append((time.monotonic(), client_id, reply["result"]["session_id"]))
            time.sleep(rng.uniform(0, 0.3))
    except (OSError, ValueError, ConnectionError):
        return


def _present(server: ServerProcess) -> set[str]:
    client = server.tcp_client(timeout=30)
    try:
        found = set()
        for number in range(CLIENTS):
            listed = client.result(
                "list_client_sessions", client_id=f"j{number}", include_inactive=True
            )
            found.update(s["session_id"] for s in listed["sessions"])
        return found
    finally:
        client.close()


def soak(runs: int, flush_interval: float, seed: int) -> dict:
    rng = random.Random(seed)
    workdir = Path(tempfile.mkdtemp(prefix="soak-journal-"))
    must_exist: dict[str, float] = {}  # session id -> seconds before its kill it was acked
    runs_out, violations, lost_in_window, created = [], 0, 0, 0
    may_be_lost: set[str] = set()
    last_ages: dict[str, float] = {}
    seen_missing: set[str] = set()
    tree = server_tree()
    env = {"PYTHONPATH": tree} if tree else None
    for run in range(runs):
        for log in workdir.glob("twistd.log*"):  # twistd rotates at 1 MB: the port line
            log.unlink()  # must stay in twistd.log, where ServerProcess looks for it
        server = ServerProcess(
            workdir,
            "--durability=batch",
            f"--flush-interval={flush_interval}",
            "--max-sessions-per-client=1000000",
            "--create-rate-limit=1000000",
            image=False,
            zmq=False,
            env=env,
        ).start()
        present = _present(server)
        missing = [sid for sid in must_exist if sid not in present and sid not in seen_missing]
        seen_missing.update(missing)
        lost = len(set(may_be_lost) - present)
        if runs_out:  # the previous run's loss window: its oldest lost acknowledgement
            ages = [age for sid, age in last_ages.items() if sid not in present]
            runs_out[-1]["loss_window_s"] = round(max(ages, default=0.0), 4)
        violations += len(missing)
        lost_in_window += lost
        acked: list[tuple[float, str, str]] = []
        thread = threading.Thread(
            target=_creating, args=(server.tcp_port, random.Random(rng.random()), acked)
        )
        thread.start()
        kill_after = rng.uniform(0.05, 0.9)
        time.sleep(kill_after)
        killed_at = time.monotonic()
        server.process.kill()
        server.process.wait(10)
        thread.join(15)
        left = sorted(os.listdir(server.data_dir / "journal"))
        journals = len(left)
        bound = flush_interval + BATCH_MARGIN
        may_be_lost = {sid for at, _, sid in acked if killed_at - at <= bound}
        last_ages = {sid: killed_at - at for at, _, sid in acked}
        for at, _, sid in acked:
            if killed_at - at > bound:
                must_exist[sid] = killed_at - at
        created += len(acked)
        runs_out.append(
            {
                "run": run,
                "kill_after_s": round(kill_after, 3),
                "created": len(acked),
                "journals_left": left,
                "missing_beyond_window": missing,
                "lost_within_window": lost,
            }
        )
        print(
            f"run {run}: kill after {kill_after * 1e3:.0f} ms, {len(acked)} created,"
            f" {journals} journals left; the run before: {len(missing)} missing beyond the"
            f" window, {lost} lost within it",
            flush=True,
        )
    server = ServerProcess(workdir, "--durability=batch", image=False, zmq=False, env=env).start()
    try:
        present = _present(server)
    finally:
        server.kill()
    final_missing = [sid for sid in must_exist if sid not in present]
    if runs_out:
        ages = [age for sid, age in last_ages.items() if sid not in present]
        runs_out[-1]["loss_window_s"] = round(max(ages, default=0.0), 4)
    windows = sorted(run["loss_window_s"] for run in runs_out)
    violations += len(set(final_missing) - seen_missing)
    lost_in_window += len(set(may_be_lost) - present)
    return {
        "runs": runs,
        "seed": seed,
        "flush_interval": flush_interval,
        "created_acknowledged": created,
        "lost_within_window": lost_in_window,
        "violations": violations,
        "final_missing": final_missing,
        "loss_window_median_s": windows[len(windows) // 2] if windows else None,
        "loss_window_max_s": windows[-1] if windows else None,
        "every_run": runs_out,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--flush-interval", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--cpu", type=int, help="pin the soak (and its servers) to this CPU")
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    summary = soak(args.runs, args.flush_interval, args.seed)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    path = RESULTS / f"soak-journal-{stamp}.json"
    path.write_text(json.dumps(summary, indent=1))
    print(
        f"{summary['created_acknowledged']} creates acknowledged, {summary['lost_within_window']}"
        f" lost within one interval + {BATCH_MARGIN} s of a kill, {summary['violations']}"
        f" missing beyond it; loss window median {summary['loss_window_median_s']} s,"
        f" max {summary['loss_window_max_s']} s; {path}"
    )
    return 1 if summary["violations"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
