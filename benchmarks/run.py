"""Run every benchmark; write JSON, a markdown table and a latency-distribution PNG.

    .venv/bin/python -m benchmarks.run --quick     # ~5 min, 1,000 requests per figure
    .venv/bin/python -m benchmarks.run --full      # ~7 min, the published numbers (≥ 5,000 per figure)
    .venv/bin/python -m benchmarks.run --full --snapshot   # benchmark the committed HEAD

Outputs ``benchmarks/results/<timestamp>.json``, ``<timestamp>.md`` and
``<timestamp>.png``.  The client pins itself to CPU 0 before starting any
server, so every server (and its image child, and the Jupyter kernel)
inherits CPU 0 — the affinity actually seen is recorded in the JSON.
``--snapshot`` exports ``git HEAD`` to a temporary tree and runs the servers
from it, so edits in progress in the working tree cannot break a run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO_ROOT, Series, pin_to_cpu, snapshot_head

RESULTS = REPO_ROOT / "benchmarks" / "results"


def machine() -> dict:
    """What the numbers were measured on."""
    import zmq

    import twisted

    model = "?"
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "loadavg_at_start": os.getloadavg(),
    }


def git_commit() -> str:
    """The checkout's HEAD (the servers' code when --snapshot is not given, plus local edits)."""
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()


def fmt_us(value) -> str:
    """Microseconds as a short human figure."""
    if value is None:
        return "–"
    return f"{value / 1000:.2f} ms" if value >= 1000 else f"{value:.0f} µs"


def markdown(result: dict) -> str:
    """The results as markdown tables."""
    lines = [f"# Benchmark run {result['stamp']} ({result['mode']})", ""]
    m = result["machine"]
    lines += [
        f"Machine: {m['nproc']} CPUs, {m['cpu_model']}, Linux {m['kernel']}, Python {m['python']}, "
        f"Twisted {m['twisted']}, pyzmq {m['pyzmq']} (libzmq {m['libzmq']}); load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}.",
        f"Server code: commit `{result['commit']}`{' (snapshot)' if result['snapshot'] else ' + working tree'}. "
        f"Command: `{result['command']}`. Client, servers, image and kernel pinned to CPU 0.",
        "",
        "| figure | measured: median / p99 | reference | reference: median / p99 | ratio median / p99 | n | errors | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        if "measured" not in row:
            continue
        me, re_ = row["measured"], row["reference"]
        lines.append(
            f"| {row['name']} | {fmt_us(me.get('median_us'))} / {fmt_us(me.get('p99_us'))} | {row['reference_label']} "
            f"| {fmt_us(re_.get('median_us'))} / {fmt_us(re_.get('p99_us'))} | "
            f"{row.get('median_ratio')}× / {row.get('p99_ratio')}× | {me.get('n')} | {me.get('errors')} | {row.get('target', '')} |"
        )
    idle = [r for r in result["rows"] if "total_after_mib" in r]
    for row in idle:
        lines += [
            "",
            f"**{row['name']}**: {row['total_after_mib']} MiB after "
            f"(reference, before the first session: {row['total_before_mib']} MiB); "
            f"{row['per_session_bytes']} bytes per session; {row['sessions_created']} created at "
            f"{row['create_per_s']}/s with {row['create_errors']} errors. Target: {row['target']}.",
        ]
    if result.get("throughput"):
        lines += [
            "",
            "| concurrent sessions | evaluate/s | evaluate median / p99 | ping/s (same connections) | ping median / p99 |",
            "|---|---|---|---|---|",
        ]
        for t in result["throughput"]:
            lines.append(
                f"| {t['sessions']} | {t['evaluate_per_s']} | {fmt_us(t['evaluate'].get('median_us'))} / "
                f"{fmt_us(t['evaluate'].get('p99_us'))} | {t['ping_per_s']} | {fmt_us(t['ping'].get('median_us'))} / "
                f"{fmt_us(t['ping'].get('p99_us'))} |"
            )
    return "\n".join(lines) + "\n"


def plot(series: dict[str, Series], groups: list[tuple[str, list[str]]], path: Path) -> None:
    """Latency CDFs (log x), one panel per figure and its reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(t, [n for n in names if n in series and series[n].samples]) for t, names in groups]
    groups = [g for g in groups if g[1]]
    cols = 2
    rows = (len(groups) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(12, 3.2 * rows), squeeze=False)
    for ax, (title, names) in zip(axes.flat, groups, strict=False):
        for name in names:
            values = sorted(v * 1e6 for v in series[name].samples)
            n = len(values)
            ax.plot(values, [(i + 1) / n for i in range(n)], label=f"{name} (n={n})", lw=1.2)
        ax.set_xscale("log")
        ax.set_xlabel("latency (µs, log)")
        ax.set_ylabel("fraction ≤ x")
        ax.axhline(0.99, color="grey", lw=0.5, ls="--")
        ax.axhline(0.5, color="grey", lw=0.5, ls=":")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
    for ax in list(axes.flat)[len(groups) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    """Run the selected benchmarks and write the three result files."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick", action="store_true", help="1,000 requests per figure, 2,000 idle sessions"
    )
    mode.add_argument(
        "--full", action="store_true", help="≥ 5,000 requests per figure, 10,000 idle sessions"
    )
    parser.add_argument(
        "--snapshot",
        action="store_true",
        help="run the servers from git HEAD, not the working tree",
    )
    parser.add_argument(
        "--only", action="append", choices=("ping", "sessions", "evaluate", "scale")
    )
    args = parser.parse_args()
    full = args.full
    requests = 5000 if full else 1000
    pin_to_cpu()
    commit = git_commit()
    if args.snapshot:
        tree, commit = snapshot_head(Path(tempfile.mkdtemp(prefix="stui-bench-tree-")))
        os.environ["STUI_BENCH_TREE"] = str(tree)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    result = {
        "stamp": stamp,
        "mode": "full" if full else "quick",
        "command": " ".join([".venv/bin/python -m benchmarks.run", *sys.argv[1:]]),
        "commit": commit,
        "snapshot": bool(args.snapshot),
        "machine": machine(),
        "rows": [],
        "throughput": [],
        "parts": {},
    }
    series: dict[str, Series] = {}
    only = set(args.only or ("ping", "sessions", "evaluate", "scale"))
    if "ping" in only:
        from benchmarks import ping

        started = time.monotonic()
        part = ping.run(requests, warmup=500)
        result["rows"] += part["rows"]
        result["parts"]["ping"] = {
            "pinning": part["pinning"],
            "seconds": round(time.monotonic() - started, 1),
        }
        series.update(part["series"])
    if "sessions" in only:
        from benchmarks import sessions

        started = time.monotonic()
        part = sessions.run(requests, warmup=200)
        result["rows"] += part["rows"]
        result["parts"]["sessions"] = {"seconds": round(time.monotonic() - started, 1)}
        series.update(part["series"])
    if "evaluate" in only:
        from benchmarks import evaluate

        started = time.monotonic()
        part = evaluate.run(requests, warmup=300, throughput_requests=requests)
        result["rows"] += part["rows"]
        result["throughput"] = part["throughput"]
        result["parts"]["evaluate"] = {
            "info": part["info"],
            "seconds": round(time.monotonic() - started, 1),
        }
        series.update(part["series"])
    if "scale" in only:
        from benchmarks import scale

        started = time.monotonic()
        part = scale.run(
            connections=1000,
            pings=10 if full else 5,
            sessions=10_000 if full else 2000,
            requests=requests if full else 300,
            warmup=50,
            cold_runs=5 if full else 2,
        )
        result["rows"] += part["rows"]
        result["parts"]["scale"] = {"seconds": round(time.monotonic() - started, 1)}
        series.update(part["series"])
    result["machine"]["loadavg_at_end"] = os.getloadavg()
    result["series_summaries"] = {name: s.summary() for name, s in series.items()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    base = RESULTS / stamp
    base.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    base.with_suffix(".md").write_text(markdown(result))
    plot(
        series,
        [
            (
                "ping over TCP vs Twisted LineReceiver floor",
                ["stui ping (TCP)", "Twisted LineReceiver floor"],
            ),
            (
                "ping over ZeroMQ vs txzmq ROUTER echo",
                ["stui ping (ZeroMQ)", "txzmq ROUTER echo floor", "pyzmq ROUTER echo (limit)"],
            ),
            (
                "evaluate('1+1') vs ipykernel",
                [
                    "stui evaluate (TCP)",
                    "stui evaluate (ZeroMQ)",
                    "ipykernel execute_request → idle",
                    "stui evaluate, 8 concurrent sessions (TCP)",
                    "stui evaluate, 8 concurrent sessions (ZeroMQ)",
                ],
            ),
            (
                "sessions, batch",
                [
                    f"batch: {n}"
                    for n in (
                        "ping",
                        "create_session",
                        "restore_session",
                        "update 1 KiB",
                        "update 100 KiB",
                    )
                ],
            ),
            (
                "sessions, always",
                [
                    f"always: {n}"
                    for n in (
                        "ping",
                        "create_session",
                        "update 1 KiB",
                        "save_context (100 KiB)",
                        "raw durable write 1 KiB",
                    )
                ],
            ),
            ("1,000 connections", ["stui ping, 1000 connections", "floor ping, 1000 connections"]),
        ],
        base.with_suffix(".png"),
    )
    print(markdown(result))
    print(f"wrote {base}.json, .md, .png")
    return 0


if __name__ == "__main__":
    # SIGTERM unwinds like Ctrl-C, so every server this run started is killed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())
