"""Soak: hundreds of kill -9 cycles; count acknowledged updates that were lost.

    .venv/bin/python -m benchmarks.soak_kill9 --runs 500 --durability always

One data dir for the whole soak.  Each run starts ``twistd -n stui``
(``--image=no`` so a restart takes ~0.4 s), reads back the counter of one
session, checks it against the previous run's last acknowledged counter,
streams counter updates and SIGKILLs the server after a random 10–400 ms.

- ``always``: lost acknowledged updates must be 0 (exit status 1 otherwise).
- ``batch``: a loss is allowed only within one flush interval (+ margin);
  losses beyond that bound count as violations.

Writes ``benchmarks/results/soak-kill9-<policy>-<timestamp>.json`` with every
run (stored, acknowledged, lost, server RSS, start-up time) and a PNG of the
server RSS per run.  Pin it away from the latency benchmarks with ``--cpu 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO_ROOT, rss_bytes, server_tree
from benchmarks.killloop import create_counter_session, kill_cycle, stored_counter
from tests.serverproc import ServerProcess

RESULTS = REPO_ROOT / "benchmarks" / "results"
#: Under batch a kill loses what was acknowledged since the last completed
#: flush's snapshot: one interval plus that flush's own write and fsync.
BATCH_MARGIN = 0.15


def soak(runs: int, durability: str, flush_interval: float, seed: int, log_every: int = 25) -> dict:
    """Run the cycles; returns the summary and every run."""
    rng = random.Random(seed)
    workdir = Path(tempfile.mkdtemp(prefix=f"stui-soak-{durability}-"))
    tree = server_tree()
    args = [f"--durability={durability}", f"--flush-interval={flush_interval}"]
    server = ServerProcess(
        workdir, *args, image=False, zmq=False, env={"PYTHONPATH": tree} if tree else None
    )
    client_id = "soak"
    started = time.monotonic()
    server.start()
    session_id = create_counter_session(server, client_id)
    last_acked = 0
    previous = None
    records, violations, lost_total, max_lost = [], 0, 0, 0
    for run in range(runs):
        if run:
            for log in server.workdir.glob("twistd.log*"):  # twistd rotates at 1 MB: the
                log.unlink()  # port line must stay in twistd.log, where start() looks
            t0 = time.monotonic()
            server.start()
            startup = time.monotonic() - t0
        else:
            startup = 0.0
        stored = stored_counter(server, session_id, client_id)
        lost = max(0, last_acked - stored)
        allowed = (
            0
            if durability == "always" or previous is None
            else previous.acked_since(flush_interval + BATCH_MARGIN)
        )
        violation = lost > allowed
        violations += violation
        lost_total += lost
        max_lost = max(max_lost, lost)
        if run and records:
            phantom = stored > records[-1]["last_sent"]
            violations += phantom
            records[-1].update(
                stored_after_restart=stored,
                lost=lost,
                allowed_loss=allowed,
                violation=violation,
                phantom=phantom,
                lost_window_s=round(previous.lost_window(stored), 4),
            )
        if violation:
            print(
                f"run {run}: VIOLATION stored {stored} < acknowledged {last_acked} (allowed {allowed})",
                file=sys.stderr,
                flush=True,
            )
        previous = kill_cycle(
            server, session_id, client_id, stored, rng.uniform(0.01, 0.4), rss=rss_bytes
        )
        last_acked = max(previous.last_acked, stored)
        records.append(
            {
                "run": run,
                "start_counter": stored,
                "last_sent": previous.last_sent,
                "last_acked": previous.last_acked,
                "acks": previous.acks,
                "errors": previous.errors[:5],
                "server_rss": previous.server_rss,
                "startup_s": round(startup, 3),
            }
        )
        if log_every and run % log_every == 0:
            print(
                f"run {run}/{runs}: stored {stored}, acked {previous.last_acked}, "
                f"lost so far {lost_total}, rss {previous.server_rss >> 20} MiB",
                flush=True,
            )
    # the final read-back checks the last run
    server.start()
    stored = stored_counter(server, session_id, client_id)
    lost = max(0, last_acked - stored)
    allowed = 0 if durability == "always" else previous.acked_since(flush_interval + BATCH_MARGIN)
    violations += (lost > allowed) + (stored > records[-1]["last_sent"])
    lost_total += lost
    max_lost = max(max_lost, lost)
    records[-1].update(
        stored_after_restart=stored,
        lost=lost,
        allowed_loss=allowed,
        violation=lost > allowed,
        lost_window_s=round(previous.lost_window(stored), 4),
    )
    server.stop()
    windows = sorted(r.get("lost_window_s", 0.0) for r in records)
    return {
        "durability": durability,
        "lost_window_s": {
            "median": windows[len(windows) // 2],
            "p99": windows[int(len(windows) * 0.99)],
            "max": windows[-1],
        },
        "flush_interval": flush_interval,
        "runs": runs,
        "seed": seed,
        "duration_s": round(time.monotonic() - started, 1),
        "acknowledged_updates": sum(r["acks"] for r in records),
        "lost_acknowledged_updates": lost_total,
        "max_lost_in_one_run": max_lost,
        "violations": violations,
        "update_errors": sum(len(r["errors"]) for r in records),
        "final_counter": stored,
        "data_dir": str(server.data_dir),
        "records": records,
    }


def plot(summary: dict, path: Path) -> None:
    """Server RSS (at the moment of each kill) per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r["run"] for r in summary["records"]]
    rss = [r["server_rss"] / 2**20 for r in summary["records"]]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(runs, rss, lw=0.8)
    ax.set_xlabel("kill -9 run")
    ax.set_ylabel("server RSS at kill (MiB)")
    ax.set_title(
        f"kill -9 soak, durability={summary['durability']}: "
        f"{summary['lost_acknowledged_updates']} lost acknowledged updates"
    )
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    """Parse arguments, soak, write the JSON and the PNG; exit 1 on a violation."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--durability", choices=("always", "batch"), default="always")
    parser.add_argument("--flush-interval", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--cpu", type=int, default=None, help="pin the soak (and its servers) to this CPU"
    )
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    summary = soak(args.runs, args.durability, args.flush_interval, args.seed)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    out = RESULTS / f"soak-kill9-{args.durability}-{stamp}.json"
    out.write_text(json.dumps(summary, indent=1))
    plot(summary, out.with_suffix(".png"))
    brief = {k: v for k, v in summary.items() if k != "records"}
    print(json.dumps(brief, indent=2))
    print(f"wrote {out}")
    return 1 if summary["violations"] else 0


if __name__ == "__main__":
    # SIGTERM unwinds like Ctrl-C, so every server this run started is killed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())
