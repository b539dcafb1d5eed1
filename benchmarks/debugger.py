"""The debugger's cost (debugger.md §5): ``python -m benchmarks.debugger``.

Times, inside the image (the cell measures itself with ``time.perf_counter``), a
CPU-bound loop of plain bytecode and one of function calls, and the round trip of a
trivial ``evaluate``, in these cases:

- ``no_debugger``: a server built without the debugger, i.e. this tree copied with
  the workspace running cells directly instead of through ``SessionDebugger.run``;
- ``no_breakpoint``: this build, a session without breakpoints;
- ``unrelated_breakpoint``: this build, the same session with one breakpoint on a
  function the loop never calls;
- ``unrelated_cell_line``: this build, a session with one ``cell:1`` line breakpoint
  inside that function (the line of ``return 0``);
- ``other_session``: this build, another session while the first has that breakpoint.

Both servers run at once and the cases take turns, one run each per round and in a
rotating order, so the machine's drift (other processes) spreads over all of them alike.  Prints the median of
``--repeat`` rounds per case in milliseconds and its ratio to ``no_debugger``, and the
same for the fastest round (``min_ms``, ``min_ratio``), as JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from tests.serverproc import REPO_ROOT, ServerProcess

SETUP = "import time\ndef h(i):\n    return i + 1\ndef never():\n    return 0\n"
LOOPS = {
    "bytecode_loop": (
        "t0 = time.perf_counter()\ns = 0\nfor i in range(1_000_000):\n    s += i\n"
        "elapsed = (time.perf_counter() - t0) * 1000"
    ),
    "call_loop": (
        "t0 = time.perf_counter()\nfor i in range(300_000):\n    h(i)\n"
        "elapsed = (time.perf_counter() - t0) * 1000"
    ),
}
#: The workspace's calls of the debugger, and what a build without it does instead.
DEBUGGER_CALL = re.compile(
    r"self\.debugger\.run\(\s*lambda: (self\._run_code\([^()]*\)), guard\s*\)"
)


def build_without_debugger(directory: Path) -> Path:
    """A copy of this tree whose workspace runs cells without the debugger."""
    for name in ("stui_twisted", "twisted"):
        shutil.copytree(REPO_ROOT / name, directory / name)
    workspace = directory / "stui_twisted" / "image" / "workspace.py"
    source, count = DEBUGGER_CALL.subn(r"\1", workspace.read_text())
    if count != 2:
        raise SystemExit(f"expected 2 debugger calls in workspace.py, found {count}")
    workspace.write_text(source)
    return directory


def loop_time(client, session_id: str, code: str) -> float:
    client.result("evaluate", session_id=session_id, code=code, timeout=120)
    return float(client.result("evaluate", session_id=session_id, code="elapsed")["result"])


def evaluate_latency(client, session_id: str, count: int = 20) -> float:
    """The median round trip of a trivial evaluate, in ms."""
    times = []
    for _ in range(count):
        started = time.perf_counter()
        client.result("evaluate", session_id=session_id, code="1")
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=7)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        work = Path(workdir)
        baseline_tree = build_without_debugger(work / "no-debugger")
        server = ServerProcess(work / "server").start()
        baseline = ServerProcess(work / "baseline", env={"PYTHONPATH": str(baseline_tree)})
        baseline.start()
        try:
            client = server.tcp_client(timeout=300)
            other = baseline.tcp_client(timeout=300)
            plain = other.result("create_session", client_id="bench")["session_id"]
            clean = client.result("create_session", client_id="bench")["session_id"]
            a = client.result("create_session", client_id="bench")["session_id"]
            b = client.result("create_session", client_id="bench")["session_id"]
            c = client.result("create_session", client_id="bench")["session_id"]
            for connection, session_id in (
                (other, plain),
                (client, clean),
                (client, a),
                (client, b),
                (client, c),
            ):
                connection.result("evaluate", session_id=session_id, code=SETUP)
            client.result("set_breakpoint", session_id=a, function="never")
            client.result("set_breakpoint", session_id=c, file="cell:1", line=5)
            cases = {
                "no_debugger": (other, plain),
                "no_breakpoint": (client, clean),
                "unrelated_breakpoint": (client, a),
                "unrelated_cell_line": (client, c),
                "other_session": (client, b),
            }
            samples: dict[str, dict[str, list[float]]] = {
                name: {case: [] for case in cases} for name in [*LOOPS, "evaluate_latency"]
            }
            names = list(cases)
            for round_number in range(options.repeat):
                shift = round_number % len(names)  # each case in each place of the round
                for case in names[shift:] + names[:shift]:
                    connection, session_id = cases[case]
                    for name, code in LOOPS.items():
                        samples[name][case].append(loop_time(connection, session_id, code))
                    samples["evaluate_latency"][case].append(
                        evaluate_latency(connection, session_id)
                    )
            results = {}
            for name, by_case in samples.items():
                medians = {case: statistics.median(values) for case, values in by_case.items()}
                reference = medians["no_debugger"]
                fastest = min(by_case["no_debugger"])
                results[name] = {
                    case: {
                        "ms": round(value, 2),
                        "ratio": round(value / reference, 3),
                        # the least disturbed run: load only ever adds time
                        "min_ms": round(min(by_case[case]), 2),
                        "min_ratio": round(min(by_case[case]) / fastest, 3),
                    }
                    for case, value in medians.items()
                }
            print(json.dumps(results, indent=2))
        finally:
            server.kill()
            baseline.kill()


if __name__ == "__main__":
    main()
