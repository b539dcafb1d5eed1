"""Trickled lines cost the server linear CPU: other clients stay fast during the attack.

40 connections each hold a 5 MiB unfinished line and add a 100-byte segment
every 10 ms (the attack of ``benchmarks/attack_trickle.py``, in a child
process so it does not share this process's GIL).  Another client's ping p99
must stay under 50 ms.  (With Twisted's ``LineReceiver``, which copies and
re-scans the whole buffer on every read, it was ~450 ms.)
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from benchmarks.attack_trickle import ATTACKER, ping_latencies, summary
from tests.serverproc import ServerProcess

pytestmark = pytest.mark.e2e


def test_trickling_attackers_leave_others_ping_p99_under_50ms(tmp_path):
    seconds = 10.0
    with ServerProcess(tmp_path, zmq=False, image=False) as server:
        client = server.tcp_client(timeout=10)
        attacker = subprocess.Popen(
            [
                sys.executable,
                "-c",
                ATTACKER,
                str(server.tcp_port),
                "40",
                str(5 * 1024 * 1024),
                "100",
                "0.01",
                str(seconds),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert attacker.stdout.readline().strip() == "ready"
            time.sleep(0.5)
            during = summary(ping_latencies(client, seconds - 3))
            attacking = attacker.poll() is None
            attacker.terminate()  # the attack lasted the whole measurement; no need to wait it out
            segments = int(attacker.communicate(timeout=seconds + 60)[0].strip() or 0)
        finally:
            attacker.kill()
            attacker.wait(10)
        client.close()
    print(f"\ntrickle: {segments} segments from 40 connections; other client's ping {during}")
    assert attacking, "the attack ended before the measurement did"
    assert segments > 10_000
    assert during["count"] >= 200
    assert during["p99_ms"] < 50, during
