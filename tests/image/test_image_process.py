"""The image child process for real: spawned, evaluated in, interrupted and killed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import pytest_twisted
from twisted.internet import defer

from stui_twisted.image.supervisor import ImageSupervisor, StaleGeneration
from tests.helpers import START_PROCESSES, failure_of, process_alive, reactor_sleep

pytestmark = pytest.mark.image


def _reactor():
    from twisted.internet import reactor

    return reactor


sleep = reactor_sleep


async def wait_until(predicate, timeout: float = 5.0, step: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await sleep(step)


@pytest.fixture
def supervisor():
    image = ImageSupervisor(_reactor(), kill_grace=0.5, restart_delay=0.1)
    image.startService()
    pytest_twisted.blockon(image.whenRunning())
    yield image
    pytest_twisted.blockon(image.stopService())
    assert image.status()["status"] == "stopped"


@pytest.mark.timeout(20)
@pytest_twisted.ensureDeferred
async def test_evaluate_result_and_status(supervisor):
    assert (await supervisor.evaluate("s_a", "x = 41 + 1"))["result"] is None
    result = await supervisor.evaluate("s_a", "x")
    assert result["result"] == "42"
    assert result["object_id"] == "obj_1"
    assert result["has_error"] is False
    status = supervisor.status()
    assert status["status"] == "running"
    assert isinstance(status["pid"], int) and status["pid"] != os.getpid()
    assert status["started_at"].endswith("Z") and len(status["started_at"]) == 24
    assert status["restarts"] == 0
    error = await failure_of(supervisor.evaluate("s_a", "y = 1\nraise ValueError('bad')"))
    assert error.error_type == "EvaluationError"
    assert error.details["message"] == "bad"
    assert error.details["bindings_changed"]["y"]["value"] == 1


@pytest.mark.timeout(20)
@pytest_twisted.ensureDeferred
async def test_inspect_items_and_child_by_id(supervisor):
    described = await supervisor.inspect("s_a", expression='[1, {"a": 2}]')
    assert described["class_name"] == "list"
    assert [item["object_id"] is None for item in described["items"]] == [True, False]
    child_id = described["items"][1]["object_id"]
    child = await supervisor.inspect("s_a", object_id=child_id)
    assert child["class_name"] == "dict"
    assert child["items"] == [{"key": "a", "type": "int", "repr": "2", "object_id": None}]
    missing = await failure_of(supervisor.inspect("s_a", object_id="obj_404"))
    assert missing.error_type == "ObjectNotFound"


@pytest.mark.timeout(20)
@pytest_twisted.ensureDeferred
async def test_sessions_are_isolated_and_share_shared(supervisor):
    await supervisor.evaluate("s_a", "x = 1")
    error = await failure_of(supervisor.evaluate("s_b", "x"))
    assert error.details["exception_type"] == "NameError"
    changed = await supervisor.evaluate("s_a", 'shared.team = "ok"')
    assert changed["shared_changed"]["team"]["value"] == "ok"
    assert (await supervisor.evaluate("s_b", "shared.team"))["result"] == "'ok'"
    completion = await supervisor.complete("s_b", "shared.te")
    assert completion == {"matches": ["team"], "cursor_start": 7, "cursor_end": 9}


@pytest.mark.timeout(20)
@pytest_twisted.ensureDeferred
async def test_spinning_session_does_not_delay_others_and_interrupt_stops_it(supervisor):
    await supervisor.evaluate("s_a", "kept = 'still here'")
    spinning = supervisor.evaluate("s_a", "while True: pass", timeout=15)
    await sleep(0.2)
    latencies = []
    for _ in range(5):
        started = time.perf_counter()
        assert (await supervisor.evaluate("s_b", "1+1"))["result"] == "2"
        latencies.append(time.perf_counter() - started)
    assert max(latencies) < 0.1, latencies
    started = time.perf_counter()
    assert await supervisor.interrupt("s_a") is True
    error = await failure_of(spinning)
    interrupt_latency = time.perf_counter() - started
    assert error.error_type == "Interrupted"
    assert interrupt_latency < 1.0
    assert (await supervisor.evaluate("s_a", "kept"))["result"] == "'still here'"
    assert await supervisor.interrupt("s_a") is False
    assert supervisor.status()["restarts"] == 0


@pytest.mark.timeout(20)
@pytest_twisted.ensureDeferred
async def test_time_limit(supervisor):
    started = time.perf_counter()
    error = await failure_of(supervisor.evaluate("s_a", "while True: pass", timeout=0.3))
    assert error.error_type == "Timeout"
    assert time.perf_counter() - started < 1.3
    assert (await supervisor.evaluate("s_a", "2 * 21"))["result"] == "42"
    assert supervisor.status()["restarts"] == 0


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_image_death_fails_in_flight_restarts_and_sessions_rematerialize(supervisor):
    restarted = []
    supervisor.addRestartObserver(lambda: restarted.append(supervisor.status()["pid"]))
    stored = (await supervisor.evaluate("s_a", "x = [1, 2]\nt = (3, 4)"))["bindings_changed"]
    listed = await supervisor.evaluate("s_a", "x")
    old_pid = supervisor.status()["pid"]
    sleeper = supervisor.evaluate("s_b", "import time\ntime.sleep(30)")
    await sleep(0.1)
    died_at = time.perf_counter()
    crash = await failure_of(supervisor.evaluate("s_c", "import os\nos._exit(1)"))
    assert crash.error_type == "ImageRestarted"
    assert (await failure_of(sleeper)).error_type == "ImageRestarted"
    await wait_until(lambda: restarted)
    restart_time = time.perf_counter() - died_at
    assert restart_time < 1.0 + 0.5
    status = supervisor.status()
    assert status["status"] == "running"
    assert status["pid"] != old_pid and restarted == [status["pid"]]
    assert status["restarts"] == 1
    outcome = await supervisor.materialize(
        "s_a", stored, listed["registry_added"], listed["next_object_id"]
    )
    assert sorted(outcome["restored"]) == ["t", "x"]
    assert outcome["registry_live"] == [listed["object_id"]]
    assert (await supervisor.evaluate("s_a", "t"))["result"] == "(3, 4)"
    child = await supervisor.inspect("s_a", object_id=listed["object_id"])
    assert child["string_representation"] == "[1, 2]"


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_interrupting_code_stuck_in_c_restarts_the_image(supervisor):
    restarted = []
    supervisor.addRestartObserver(lambda: restarted.append(True))
    stuck = supervisor.evaluate("s_a", "import time\ntime.sleep(1000)")
    bystander = supervisor.evaluate("s_b", "import time\ntime.sleep(1000)")
    await sleep(0.2)
    started = time.perf_counter()
    assert await supervisor.interrupt("s_a") is True
    assert (await failure_of(stuck)).error_type == "Interrupted"
    assert time.perf_counter() - started < supervisor.kill_grace + 1.0
    assert (await failure_of(bystander)).error_type == "ImageRestarted"
    await wait_until(lambda: restarted)
    assert (await supervisor.evaluate("s_a", "1"))["result"] == "1"


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_time_limit_on_code_stuck_in_c_restarts_the_image(supervisor):
    error = await failure_of(
        supervisor.evaluate("s_a", "import time\ntime.sleep(1000)", timeout=0.3)
    )
    assert error.error_type == "Timeout"
    await wait_until(
        lambda: supervisor.status()["status"] == "running" and supervisor.status()["restarts"] == 1
    )


@pytest.mark.timeout(20)
@pytest_twisted.ensureDeferred
async def test_output_capture_is_isolated_between_concurrent_sessions(supervisor):
    code = "import time\nfor i in range(20):\n    print('{tag}', i)\n    time.sleep(0.005)"
    outputs = await defer.gatherResults(
        [supervisor.evaluate(session, code.format(tag=session)) for session in ("s_a", "s_b")]
    )
    for session, result in zip(("s_a", "s_b"), outputs, strict=True):
        assert result["output"] == "".join(f"{session} {i}\n" for i in range(20))


@pytest.mark.timeout(20)
@pytest_twisted.ensureDeferred
async def test_writes_to_the_childs_fds_do_not_corrupt_the_channel(supervisor):
    result = await supervisor.evaluate(
        "s_a",
        "import os, sys\nos.write(1, b'raw\\n' * 1000)\nsys.__stdout__.write('x' * 100000)\n'fine'",
    )
    assert result["result"] == "'fine'"
    assert (await supervisor.evaluate("s_a", "1"))["result"] == "1"


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_multi_megabyte_payloads_cross_amp(supervisor):
    code = "big = 'x' * 3_000_000\n# " + "padding " * 100_000 + "\nlen(big)"
    result = await supervisor.evaluate("s_a", code)
    assert result["result"] == "3000000"
    assert len(result["bindings_changed"]["big"]["value"]) == 3_000_000
    shown = await supervisor.evaluate("s_a", "big")
    # The payload crosses whole, but a result is clipped in the image (1 MiB).
    assert len(shown["result"]) <= 1024 * 1024
    assert shown["result"].endswith("... [3000000 characters in all]")
    outcome = await supervisor.materialize("s_b", result["bindings_changed"], {}, 1)
    assert outcome["restored"] == ["_", "big"]
    assert (await supervisor.evaluate("s_b", "len(big)"))["result"] == "3000000"
    snapshot = await supervisor.snapshot("s_b")
    assert len(snapshot["bindings"]["big"]["value"]) == 3_000_000


@pytest.mark.timeout(20)
@pytest_twisted.ensureDeferred
async def test_snapshot_clear_drop_and_shared_materialize(supervisor):
    await supervisor.evaluate("s_a", "import socket\nsock = socket.socket()\nn = 5")
    snapshot = await supervisor.snapshot("s_a")
    assert snapshot["bindings"]["sock"]["encoding"] == "unrestorable"
    assert snapshot["bindings"]["n"]["value"] == 5
    assert {v["name"] for v in snapshot["variables"]} == {"socket", "sock", "n"}
    assert await supervisor.clear("s_a", ["variables"]) == {"cleared": ["variables"]}
    assert (await failure_of(supervisor.evaluate("s_a", "n"))).error_type == "EvaluationError"
    assert (await supervisor.drop_session("s_a")) == {"dropped": True}
    outcome = await supervisor.materialize_shared(
        {"team": {"encoding": "json", "value": "ok", "type": "str", "repr": "'ok'"}}
    )
    assert outcome == {"restored": ["team"], "unrestorable": [], "registry_live": []}
    assert (await supervisor.evaluate("s_b", "shared.team"))["result"] == "'ok'"


@pytest.mark.timeout(20)
@pytest_twisted.ensureDeferred
async def test_stop_service_fails_in_flight_and_does_not_restart():
    image = ImageSupervisor(_reactor(), kill_grace=0.5)
    image.startService()
    assert (await image.evaluate("s_a", "1"))["result"] == "1"
    pending = image.evaluate("s_a", "import time\ntime.sleep(1000)")
    await sleep(0.1)
    await image.stopService()
    assert (await failure_of(pending)).error_type == "ImageRestarted"
    await sleep(0.3)
    assert image.status() == {"status": "stopped", "pid": None, "started_at": None, "restarts": 0}
    assert (await failure_of(image.evaluate("s_a", "1"))).error_type == "InternalError"


def test_chunked_json_splits_under_the_amp_value_limit_and_reassembles():
    from twisted.protocols import amp

    from stui_twisted.image.amp_commands import ChunkedJSON

    argument = ChunkedJSON()
    value = {"text": "é" * 100_000, "numbers": list(range(10_000))}
    box = amp.AmpBox()
    argument.toBox(b"payload", box, {"payload": value}, None)
    assert len(box) > 3
    assert all(len(chunk) <= amp.MAX_VALUE_LENGTH for chunk in box.values())
    assert set(box) == {f"payload.{index}".encode() for index in range(len(box))}
    decoded = {}
    argument.fromBox(b"payload", box, decoded, None)
    assert decoded == {"payload": value}
    with pytest.raises(KeyError):
        argument.fromBox(b"missing", amp.AmpBox(), {}, None)
    optional = {}
    ChunkedJSON(optional=True).fromBox(b"missing", amp.AmpBox(), optional, None)
    assert optional == {"missing": None}


@pytest.mark.timeout(20)
@pytest_twisted.ensureDeferred
async def test_an_image_that_cannot_start_fails_requests_and_retries(tmp_path):
    image = ImageSupervisor(_reactor(), python=str(tmp_path / "no-such-python"), restart_delay=0.05)
    image.startService()
    try:
        error = await failure_of(image.evaluate("s_a", "1"))
        assert error.error_type == "ImageRestarted"
        assert image.status()["status"] == "restarting"
    finally:
        await image.stopService()
    assert image.status()["status"] == "stopped"


def _count_channel_bytes(supervisor) -> list[int]:
    """Count the bytes the current image sends back on its AMP channel (fd 4)."""
    image = supervisor._image
    received = [0]
    original = image.childDataReceived

    def counting(child_fd, data):
        if child_fd == 4:
            received[0] += len(data)
        original(child_fd, data)

    image.childDataReceived = counting
    return received


def _peak_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_big_values_are_clipped_before_they_leave_the_image(supervisor):
    received = _count_channel_bytes(supervisor)
    shown = await supervisor.evaluate("s_a", "s = 'a' * 200_000_000\ns", mode="display")
    assert len(shown["display"]) <= 1024 * 1024 and len(shown["result"]) <= 1024 * 1024
    assert shown["bindings_changed"]["s"]["encoding"] == "unrestorable"
    assert received[0] < 3 * 1024 * 1024, received[0]  # result + display, not 200 MB
    received[0] = 0
    error = await failure_of(
        supervisor.evaluate("s_a", "raise ValueError('b' * (50 * 1024 * 1024))")
    )
    assert error.error_type == "EvaluationError"
    assert received[0] < 128 * 1024, received[0]  # not 150 MB with the message three times
    everything = repr((error.message, error.details))
    assert len(re.findall("b{5000,}", everything)) == 1
    assert error.details["message"].startswith("b" * 60_000)


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_a_binding_over_the_limit_costs_little_memory_and_later_cells_stay_fast(supervisor):
    size = 64 * 1024 * 1024
    await supervisor.evaluate("s_a", "small = bytearray(10)\nlen(small)")
    pid = supervisor.status()["pid"]
    before = _peak_rss_bytes(pid)
    created = await supervisor.evaluate("s_a", f"x = bytearray({size})")
    stored = created["bindings_changed"]["x"]
    assert stored["encoding"] == "unrestorable" and stored["reason"].startswith("too large")
    timings = []
    for code in ("len(x)", "x[0] = 1", "x[:3]", "len(small)"):
        started = time.perf_counter()
        result = await supervisor.evaluate("s_a", code)
        timings.append(time.perf_counter() - started)
        if code != "x[0] = 1":  # that one changes x's summary repr
            assert "x" not in result["bindings_changed"]
    # No repr (4 characters a byte), pickle, base64 or JSON of the value was built:
    # the image grew by about the value itself.
    growth = _peak_rss_bytes(pid) - before
    assert growth < 1.5 * size, growth / size
    # A cell mentioning x costs about what one that does not mention it costs.
    assert max(timings[:3]) < max(0.25, 5 * timings[3]), timings


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_cells_are_named_by_the_history_index_the_server_gives(supervisor):
    for session, body in (("s_a", "return 1 / 0"), ("s_b", "raise KeyError('b')")):
        await supervisor.evaluate(session, f"def f():\n    {body}\n", cell_index=2)
    for session, body in (("s_a", "return 1 / 0"), ("s_b", "raise KeyError('b')")):
        error = await failure_of(supervisor.evaluate(session, "f()", cell_index=7))
        lines = error.details["traceback"]
        assert '  File "<cell 7>", line 1, in <module>' in lines
        assert '  File "<cell 2>", line 2, in f' in lines
        assert f"    {body}" in lines  # each session's own cell 2, though both have one
        assert error.details["line"] == 1


async def test_image_death_is_noticed_while_processes_it_started_live(supervisor, tmp_path):
    """The image's exit, not the end of its pipes, is its death (issue 13.1)."""
    pidfile = tmp_path / "background.pid"
    await supervisor.evaluate("s_a", START_PROCESSES.format(pidfile=pidfile))
    pids = json.loads(
        (await supervisor.evaluate("s_a", "import json; json.dumps(pids)", "display"))["display"]
    )
    await wait_until(lambda: pidfile.exists() and pidfile.read_text().strip())
    pids.append(int(pidfile.read_text()))
    assert all(process_alive(pid) for pid in pids)
    old_pid = supervisor.status()["pid"]
    sleeper = supervisor.evaluate("s_b", "import time\ntime.sleep(30)")
    await sleep(0.1)
    died_at = time.monotonic()
    crash = await failure_of(supervisor.evaluate("s_c", "import os\nos._exit(3)"))
    assert crash.error_type == "ImageRestarted"
    assert (await failure_of(sleeper)).error_type == "ImageRestarted"
    assert time.monotonic() - died_at < 1.0
    await wait_until(lambda: supervisor.status()["status"] == "running", timeout=5)
    assert supervisor.status()["pid"] != old_pid
    await wait_until(lambda: not any(process_alive(pid) for pid in pids), timeout=5)
    assert (await supervisor.evaluate("s_a", "1 + 1", "display"))["display"] == "2"


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_lone_surrogates_cross_the_image_pipe(supervisor):
    broken = await failure_of(supervisor.evaluate("s_a", "z = 'ok\ud800'"))
    assert broken.error_type == "EvaluationError"  # Python source cannot hold it; not InternalError
    assert "surrogate" in broken.message
    result = await supervisor.evaluate("s_a", "y = 'ok' + chr(0xd800)\nprint(y)\ny", mode="display")
    assert result["display"] == "ok\ud800" and result["output"] == "ok\ud800\n"
    assert result["bindings_changed"]["y"] == {
        "encoding": "json",
        "value": "ok\ud800",
        "type": "str",
        "repr": "'ok\\ud800'",
    }
    snapshot = await supervisor.snapshot("s_a")
    assert snapshot["bindings"]["y"]["value"] == "ok\ud800"
    await supervisor.materialize("s_b", snapshot["bindings"], {}, 1)
    assert (await supervisor.evaluate("s_b", "y == 'ok' + chr(0xd800)"))["result"] == "True"


async def test_stopping_the_image_does_not_wait_for_processes_it_started(supervisor):
    await supervisor.evaluate("s_a", "import os\nos.system('sleep 75 &')")
    started = time.monotonic()
    await supervisor.stopService()
    assert time.monotonic() - started < supervisor.kill_grace + 1.0
    assert supervisor.status()["status"] == "stopped"


def test_the_image_leads_its_own_process_group_and_keeps_its_pipes():
    """The child's start-up step, run in a fresh interpreter with pipes on fds 3 and 4."""
    probe = (
        "import os\n"
        "r, w = os.pipe()\n"
        "os.dup2(r, 3); os.dup2(w, 4)\n"
        "assert os.getpgrp() != os.getpid()\n"
        "from stui_twisted.image.child import _own_process_group\n"
        "_own_process_group()\n"
        "print(os.getpgrp() == os.getpid(), os.getsid(0) == os.getpid(),"
        " os.get_inheritable(3), os.get_inheritable(4))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=20)
    assert out.stdout.split() == ["True", "True", "False", "False"], out.stderr


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_a_request_for_an_older_image_generation_is_not_sent(supervisor):
    """A namespace built in one image is never used from the next (issue 12.1)."""
    generation = await supervisor.current_generation()
    await supervisor.evaluate("s_a", "x = 1", generation=generation)
    crash = await failure_of(supervisor.evaluate("s_a", "import os\nos._exit(1)"))
    assert crash.error_type == "ImageRestarted"
    stale = await failure_of(supervisor.evaluate("s_a", "x = 2", generation=generation))
    assert stale.error_type == "ImageRestarted"
    assert isinstance(stale, StaleGeneration)
    assert await supervisor.current_generation() == generation + 1
    fresh = await supervisor.evaluate("s_a", "'x' in dir()", generation=generation + 1)
    assert fresh["result"] == "False"
