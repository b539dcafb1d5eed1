"""benchmarks/attacks.py keeps working: one cheap attack, end to end, in a few seconds."""

from __future__ import annotations

import json
import time

import pytest

from benchmarks import attacks

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(60)
def test_one_cheap_attack_runs_and_reports_its_measured_fields(tmp_path):
    started = time.monotonic()
    report = attacks.main(["--only", "deep-nesting", "--depth", "150", "--out", str(tmp_path)])
    assert time.monotonic() - started < 20
    (result,) = report["results"]
    assert result["item"] == 10 and result["attack"] == "deep-nesting"
    assert "error" not in result, result.get("traceback")
    memory = result["memory"]
    assert 0 < memory["before"] <= memory["peak"] and memory["after"] > 0, memory
    ping = result["ping"]
    assert ping["count"] > 0 and ping["errors"] == 0, ping
    assert 0 < ping["p50_ms"] <= ping["p99_ms"], ping
    by_depth = result["outcome"]["by_depth"]
    assert by_depth[150]["update"] == "InvalidRequest" and by_depth[150]["max_depth"] == 100
    assert result["verdict"] == "holds"
    written = json.loads(next(tmp_path.glob("attacks-*.json")).read_text())
    assert written["results"][0]["outcome"]["by_depth"]["150"]["restore_after"] == "success"
    table = next(tmp_path.glob("attacks-*.md")).read_text()
    assert "| 10 | deep-nesting |" in table


def test_every_issue_item_has_an_attack():
    assert sorted({item for item, _ in attacks.ATTACKS.values()}) == list(range(1, 17))
