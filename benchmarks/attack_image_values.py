"""Big values in the image: what a hostile cell costs the server and the image.

Issue 13, items 5 and 6.  Each attack runs against a fresh real server
(``twistd -n stui`` and its image) and reports the reply size, the wall time,
and how far the peak RSS (``VmHWM``) of the server and of the image rose
above their RSS before the attack:

- ``display``: ``s = 'a' * 400_000_000`` shown in ``display`` mode;
- ``exception``: ``raise ValueError('b' * 50 MiB)``;
- ``big binding``: ``x = bytearray(400 MiB)``, then cells that mention ``x``
  (``len(x)``, ``x[:3]``) against cells that do not (``len(small)``).

    .venv/bin/python -m benchmarks.attack_image_values [--mib 400]

Set ``STUI_BENCH_TREE`` to another checkout to measure that code instead
(e.g. the commit before the fix).  Writes ``results/attack-image-values-*.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from benchmarks.common import start_stui, tcp_client

MiB = 1024 * 1024
RESULTS = Path(__file__).resolve().parent / "results"


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _memory(pids: dict[str, int]) -> dict[str, int]:
    return {name: _status_kib(pid, "VmRSS") for name, pid in pids.items()}


def _peaks(pids: dict[str, int]) -> dict[str, int]:
    return {name: _status_kib(pid, "VmHWM") for name, pid in pids.items()}


def _read_line(sock) -> bytes:
    """One reply line, read in linear time (a reply may be hundreds of MB)."""
    parts = []
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("server closed the connection")
        newline = chunk.find(b"\n")
        if newline >= 0:
            parts.append(chunk[:newline])
            return b"".join(parts)
        parts.append(chunk)


def _timed(client, code: str, **extra) -> tuple[float, int, dict]:
    """(seconds, reply bytes, reply) of one evaluate (one request in flight at a time)."""
    client._ids += 1
    request = {"id": client._ids, "command": "evaluate", "parameters": {"code": code, **extra}}
    started = time.perf_counter()
    client.send_raw(json.dumps(request).encode() + b"\n")
    line = _read_line(client.sock)
    seconds = time.perf_counter() - started
    reply = json.loads(line)
    reply.pop("result", None)  # do not keep hundreds of MB around
    reply.pop("details", None)
    return seconds, len(line), reply


def _attack(name: str, setup: list[str], attack: list[tuple[str, dict]]) -> dict:
    server = start_stui(f"attack-{name.replace(' ', '-')}")
    try:
        client = tcp_client(server.tcp_port, timeout=300)
        client.result("create_session", client_id="attacker")
        for code in setup:
            client.result("evaluate", code=code)
        pids = {"server": server.process.pid, "image": client.result("ping")["image"]["pid"]}
        before = _memory(pids)
        runs = []
        for code, extra in attack:
            seconds, size, reply = _timed(client, code, **extra)
            runs.append(
                {
                    "code": code[:60],
                    "seconds": round(seconds, 4),
                    "reply_bytes": size,
                    "status": reply["status"],
                    "error_type": reply.get("error_type"),
                }
            )
        peaks = _peaks(pids)
        started = time.perf_counter()
        client.result("ping")
        ping_after = time.perf_counter() - started
        return {
            "attack": name,
            "runs": runs,
            "peak_rise_mib": {k: round((peaks[k] - before[k]) / 1024, 1) for k in pids},
            "rss_after_mib": {k: round(v / 1024, 1) for k, v in _memory(pids).items()},
            "ping_after_ms": round(ping_after * 1000, 2),
        }
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=400, help="size of the big string/bytearray")
    parser.add_argument("--cells", type=int, default=5, help="cells that mention the big binding")
    args = parser.parse_args()
    size = args.mib * MiB
    results = [
        _attack("display", [], [(f"s = 'a' * {size}\ns", {"mode": "display"})]),
        _attack("exception", [], [(f"raise ValueError('b' * {50 * MiB})", {})]),
        _attack(
            "big binding",
            ["small = bytearray(10)"],
            [(f"x = bytearray({size})", {})]
            + [("len(x)", {}), ("x[:3]", {})] * args.cells
            + [("len(small)", {})] * args.cells,
        ),
    ]
    binding = results[2]["runs"]
    mentioning = [run["seconds"] for run in binding[1 : 1 + 2 * args.cells]]
    plain = [run["seconds"] for run in binding[1 + 2 * args.cells :]]
    results[2]["median_cell_s"] = {
        "mentioning x": round(statistics.median(mentioning), 4),
        "not mentioning x": round(statistics.median(plain), 4),
    }
    for result in results:
        largest = max(run["reply_bytes"] for run in result["runs"])
        print(
            f"{result['attack']:12} largest reply {largest / MiB:8.2f} MiB  "
            f"peak rise server {result['peak_rise_mib']['server']:8.1f} MiB  "
            f"image {result['peak_rise_mib']['image']:8.1f} MiB  "
            f"ping after {result['ping_after_ms']} ms"
        )
    print("big binding, median cell:", results[2]["median_cell_s"])
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"attack-image-values-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps({"mib": args.mib, "results": results}, indent=2))
    print("written", out)


if __name__ == "__main__":
    main()
