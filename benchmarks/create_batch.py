"""``create_session`` p99 under ``batch``, 5,000 back to back, file store (issue 21).

One server per round, everything pinned to CPU 0 (as L{benchmarks.sessions}):
200 creates of warm-up, then N creates back to back on one connection
(50 client ids, as in L{benchmarks.sessions}), then how long after the
last reply until every created session is on disk, in its file or a group
journal's record (the loss window C{batch} promises is one flush interval), and
until each has its own file (the journal compacted).  A C{ping} series on the same
server is the reference.

Several source trees can be compared in one run: each C{--tree} (default:
this checkout) gets a fresh server per round, the trees alternating, so
drift on the shared machine hits them alike::

    python -m benchmarks.create_batch --tree /tmp/base --tree . --rounds 3

A tree given as C{PATH@noflush} runs with C{--flush-interval=1000}: no
flush during the storm, the reference for what the flushes cost (its
"on disk" time is then the final flush at shutdown, not measured);
C{PATH@journal} is for a tree that writes no per-session files during the
storm (the group-file prototype of docs/performance.md, issue 21:
C{results/profiles/issue21-journal-prototype.patch.txt}), so nothing is
waited for either.

With C{--profile DIR} the server of the last round of each tree is
recorded with py-spy (raw collapsed stacks, all threads).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import Series, pin_to_cpu, start_stui, tcp_client, timed_call


def _session_files(data_dir: Path) -> int:
    return len(_session_ids(data_dir))


def _session_ids(data_dir: Path) -> set[str]:
    ids = set()
    for _root, _dirs, files in os.walk(data_dir / "sessions"):
        ids.update(
            f[: -len(".json")] for f in files if f.endswith(".json") and not f.startswith(".")
        )
    return ids


def _durable_sessions(data_dir: Path, parsed: dict[str, set[str]]) -> int:
    """Sessions durable on disk: in their own file, or a record of a group journal.

    The journals (storage/journal.py: a header line, then one sealed session file
    per line) are listed before the session files, so a journal compacted and
    removed in between still has its files counted; C{parsed} caches them by name.
    """
    journaled: set[str] = set()
    for name in sorted(os.listdir(data_dir / "journal")) if (data_dir / "journal").is_dir() else []:
        if not name.endswith(".jnl"):
            continue
        if name not in parsed:
            try:
                lines = (data_dir / "journal" / name).read_bytes().split(b"\n")[1:-1]
            except FileNotFoundError:
                continue
            parsed[name] = {json.loads(line)["session"]["session_id"] for line in lines}
        journaled |= parsed[name]
    return len(journaled | _session_ids(data_dir))


def one_round(tree: str, requests: int, warmup: int, profile: Path | None) -> dict:
    """One fresh server from C{tree}: ping, then the create storm; figures in µs."""
    path, _, variant = tree.partition("@")
    os.environ["STUI_BENCH_TREE"] = os.path.abspath(path)
    extra = ["--flush-interval=1000"] if variant == "noflush" else []
    if variant == "journal":  # a prototype tree that writes no per-session files
        extra = ["--flush-interval=0.1"]
    server = start_stui(
        "create-batch",
        *extra,
        "--durability=batch",
        "--max-sessions-per-client=1000000",
        "--create-rate-limit=1000000",
        image=True,
        zmq=False,
    )
    spy = None
    try:
        client = tcp_client(server.tcp_port)
        ping, create = Series("ping"), Series("create_session [batch]")
        for i in range(warmup + 2000):
            elapsed, _ = timed_call(client, "ping")
            if i >= warmup:
                ping.samples.append(elapsed)
        for i in range(warmup):
            timed_call(client, "create_session", client_id=f"warm-{i % 50}")
        if profile is not None:
            profile.parent.mkdir(parents=True, exist_ok=True)
            spy = subprocess.Popen(
                [
                    shutil.which("py-spy")
                    or os.path.join(os.path.dirname(sys.executable), "py-spy"),
                    "record",
                    "-p",
                    str(server.process.pid),
                    "-r",
                    "500",
                    "--nonblocking",
                    "--threads",
                    "--format",
                    "raw",
                    "-o",
                    str(profile),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                # the sampler on the other CPU, so it does not take the measured one
                preexec_fn=lambda: os.sched_setaffinity(0, {1}),
            )
            time.sleep(1.0)
        for i in range(requests):
            elapsed, reply = timed_call(client, "create_session", client_id=f"bench-{i % 50}")
            if reply.get("status") != "success":
                create.errors += 1
            else:
                create.samples.append(elapsed)
        last_reply = time.perf_counter()
        expected = warmup + requests - create.errors
        patience = 0 if extra else 30
        parsed: dict[str, set[str]] = {}
        while (
            _durable_sessions(server.data_dir, parsed) < expected
            and time.perf_counter() - last_reply < patience
        ):
            time.sleep(0.005)
        on_disk_ms = (time.perf_counter() - last_reply) * 1e3
        # and until each has its own file (a group journal compacted; the same above without one)
        while (
            _session_files(server.data_dir) < expected
            and time.perf_counter() - last_reply < patience
        ):
            time.sleep(0.02)
        files_ms = (time.perf_counter() - last_reply) * 1e3
        if spy is not None:
            spy.send_signal(2)
            spy.wait(30)
        client.close()
    finally:
        server.kill()
    return {
        "tree": tree,
        "ping": ping.summary(),
        "create": create.summary(),
        "all_on_disk_ms_after_last_reply": round(on_disk_ms, 1),
        "all_in_own_files_ms_after_last_reply": round(files_ms, 1),
        "files_expected": expected,
        "files_found": _session_files(server.data_dir),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tree", action="append", help="source tree of the server (repeatable)")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--profile", type=Path, help="directory for py-spy raw profiles")
    parser.add_argument("--json", type=Path, help="write every round here")
    args = parser.parse_args()
    pin_to_cpu()
    trees = args.tree or ["."]
    rounds = []
    for r in range(args.rounds):
        for t, tree in enumerate(trees):
            profile = None
            if args.profile is not None and r == args.rounds - 1:
                profile = args.profile / f"create-batch-tree{t}.raw"
            result = one_round(tree, args.requests, args.warmup, profile)
            rounds.append(result)
            c, p = result["create"], result["ping"]
            print(
                f"round {r} tree {tree}: create median {c['median_us']} us p99 {c['p99_us']} us"
                f" max {c['max_us']} us err {c['errors']} | ping median {p['median_us']} us"
                f" p99 {p['p99_us']} us | p99/ping-median {c['p99_us'] / p['median_us']:.1f}"
                f" | on disk {result['all_on_disk_ms_after_last_reply']} ms after"
                f" (own files {result['all_in_own_files_ms_after_last_reply']} ms)"
                f" ({result['files_found']}/{result['files_expected']})",
                flush=True,
            )
    if args.json is not None:
        args.json.write_text(json.dumps(rounds, indent=1))


if __name__ == "__main__":
    main()
