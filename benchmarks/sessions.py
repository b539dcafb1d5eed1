"""Session command latency over TCP for each durability policy (issue 3).

For ``always``, ``batch`` and ``none`` in turn: a fresh server, then
``create_session``, ``update_session_state`` with a 1 KiB and a 100 KiB
state, ``restore_session`` and ``save_context``, each timed over N requests
after warm-up.  References measured in the same run:

- ``ping`` on the same server and connection (the transport + dispatch floor);
- a raw durable file write of the same size in this process (temp file →
  write → fsync → rename → fsync dir: the least an ``always`` write or a
  ``save_context`` can cost on this disk).

Standalone: ``python -m benchmarks.sessions [--requests N]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from benchmarks.common import Series, compare, pin_to_cpu, start_stui, tcp_client, time_requests

POLICIES = ("always", "batch", "none")
STATE_1K = {"blob": "x" * 1000}
STATE_100K = {"blob": "x" * (100 * 1024 - 12)}


def raw_durable_write(directory: str, size: int) -> float:
    """Seconds for one temp-write-fsync-rename-fsync-dir of C{size} bytes."""
    data = b"x" * size
    path = os.path.join(directory, "file.json")
    started = time.perf_counter()
    temp = path + ".tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return time.perf_counter() - started


def measure_policy(policy: str, requests: int, warmup: int) -> dict[str, Series]:
    """Every session operation on one fresh server with C{policy}."""
    server = start_stui(
        f"sessions-{policy}",
        f"--durability={policy}",
        "--max-sessions-per-client=1000000",
        "--create-rate-limit=1000000",
        image=True,
        zmq=False,
    )
    series: dict[str, Series] = {}
    try:
        client = tcp_client(server.tcp_port)

        def timed(name: str, count: int, command: str, params_for) -> list[dict]:
            s = series.setdefault(name, Series(f"{policy}: {name}"))
            return time_requests(client, s, command, params_for, count, warmup)

        timed("ping", requests, "ping", lambda i: {})
        created = timed(
            "create_session", requests, "create_session", lambda i: {"client_id": f"bench-{i % 50}"}
        )
        ids = [(r["session_id"], r["client_id"]) for r in created]
        sid, cid = ids[-1]
        timed(
            "update 1 KiB",
            requests,
            "update_session_state",
            lambda i: {"session_id": sid, "state_data": {**STATE_1K, "n": i}},
        )
        timed(
            "update 100 KiB",
            requests,
            "update_session_state",
            lambda i: {"session_id": sid, "state_data": {**STATE_100K, "n": i}},
        )
        # Restore cycles over sessions holding 1 KiB of state (set above for one,
        # the rest are fresh): each restore also re-materializes in the image.
        timed(
            "restore_session",
            requests,
            "restore_session",
            lambda i: {"session_id": ids[i % len(ids)][0], "client_id": ids[i % len(ids)][1]},
        )
        timed("save_context (100 KiB)", requests, "save_context", lambda i: {"session_id": sid})
        client.close()
    finally:
        server.kill()
    with tempfile.TemporaryDirectory(dir=server.data_dir.parent) as scratch:
        for size, name in (
            (1024, "raw durable write 1 KiB"),
            (100 * 1024, "raw durable write 100 KiB"),
        ):
            s = series.setdefault(name, Series(name))
            for i in range(warmup + requests // 2):
                elapsed = raw_durable_write(scratch, size)
                if i >= warmup:
                    s.samples.append(elapsed)
    return series


def run(requests: int = 5000, warmup: int = 200, policies: tuple[str, ...] = POLICIES) -> dict:
    """Measure every policy; rows compare each operation with its reference."""
    pin_to_cpu()
    rows, all_series = [], {}
    for policy in policies:
        s = measure_policy(policy, requests, warmup)
        for name, series in s.items():
            all_series[f"{policy}: {name}"] = series
        for op, ref in (
            ("create_session", "ping"),
            ("update 1 KiB", "raw durable write 1 KiB" if policy == "always" else "ping"),
            ("update 100 KiB", "raw durable write 100 KiB" if policy == "always" else "ping"),
            ("restore_session", "ping"),
            ("save_context (100 KiB)", "raw durable write 100 KiB"),
        ):
            target = (
                "p99 ≤ 2 ms"
                if policy == "batch" and op in ("create_session", "restore_session")
                else None
            )
            row = compare(f"{op} [{policy}]", s[op], s[ref], policy=policy, reference_kind=ref)
            if target:
                row["target"] = target
            rows.append(row)
        rows.append(
            compare(
                f"raw durable write 1 KiB vs ping [{policy} run]",
                s["raw durable write 1 KiB"],
                s["ping"],
                policy=policy,
            )
        )
    return {"rows": rows, "series": all_series}


def main() -> None:
    """Print the rows as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--policy", choices=POLICIES, action="append")
    args = parser.parse_args()
    result = run(args.requests, policies=tuple(args.policy or POLICIES))
    for row in result["rows"]:
        m, r = row["measured"], row["reference"]
        print(
            f"{row['name']:45s} median {m.get('median_us')}us p99 {m.get('p99_us')}us  "
            f"| ref {row['reference_label']}: {r.get('median_us')}us p99 {r.get('p99_us')}us  err {m.get('errors')}"
        )


if __name__ == "__main__":
    main()
