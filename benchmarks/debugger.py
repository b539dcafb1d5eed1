"""The debugger's cost (debugger.md §5): ``python -m benchmarks.debugger``.

Times, inside the image (the cell measures itself with ``time.perf_counter``), a
CPU-bound loop of plain bytecode and one of function calls, in three cases: no
breakpoint (the session runs with no tracer), one breakpoint on a function the
loop never calls (the session's thread is traced: every call event is looked at),
and another session while the first has that breakpoint (it is never traced).
Prints the median of ``--repeat`` runs per case in milliseconds, as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile

from tests.serverproc import ServerProcess

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


def measure(client, session_id: str, code: str, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        client.result("evaluate", session_id=session_id, code=code, timeout=120)
        times.append(
            float(client.result("evaluate", session_id=session_id, code="elapsed")["result"])
        )
    return round(statistics.median(times), 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        server = ServerProcess(workdir).start()
        try:
            client = server.tcp_client(timeout=300)
            a = client.result("create_session", client_id="bench")["session_id"]
            b = client.result("create_session", client_id="bench")["session_id"]
            for session_id in (a, b):
                client.result("evaluate", session_id=session_id, code=SETUP)
            results = {}
            for name, code in LOOPS.items():
                results[name] = {
                    "no_breakpoint": measure(client, a, code, options.repeat),
                    "other_session_no_breakpoint": measure(client, b, code, options.repeat),
                }
            client.result("set_breakpoint", session_id=a, function="never")
            for name, code in LOOPS.items():
                results[name]["unrelated_breakpoint"] = measure(client, a, code, options.repeat)
                results[name]["other_session"] = measure(client, b, code, options.repeat)
            client.result("remove_breakpoint", session_id=a, breakpoint_id="bp_1")
            for name, code in LOOPS.items():  # the reference again: load drifts here
                results[name]["no_breakpoint_after"] = measure(client, a, code, options.repeat)
            print(json.dumps(results, indent=2))
        finally:
            server.kill()


if __name__ == "__main__":
    main()
