"""The suite's timeouts (tests/conftest.py) turn a hang into one failing test.

Each test runs pytest, with this suite's conftest and settings, on a tiny
file of hanging tests in a temporary directory, and checks that the run ends
in bounded time with exactly the hanging tests failed and the next test
passed.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

HANGING = """
import time

import pytest
import pytest_twisted
from twisted.internet import defer, task


@pytest.mark.timeout(0.5)
@pytest_twisted.ensureDeferred
async def test_a_deferred_that_never_fires():
    await defer.Deferred()


@pytest.mark.timeout(0.5)
@pytest_twisted.ensureDeferred
async def test_waiting_on_a_clock_nobody_advances():
    # The shape of the suite's real hang (issue 12.4).
    await task.deferLater(task.Clock(), 0, lambda: None)


@pytest.mark.timeout(0.5)
def test_blocking_code_in_a_plain_test():
    while True:
        time.sleep(0.05)


def test_the_next_test_still_runs():
    assert True
"""


def run_pytest(directory: Path, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "tests.conftest",
            "-c",
            str(REPO_ROOT / "pyproject.toml"),
            "--rootdir",
            str(directory),
            *args,
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


@pytest.mark.timeout(120)
def test_hanging_tests_fail_in_bounded_time_and_the_run_goes_on(tmp_path):
    path = tmp_path / "test_hanging.py"
    path.write_text(HANGING)
    started = time.monotonic()
    run = run_pytest(tmp_path, str(path))
    try:
        output, _ = run.communicate(timeout=100)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    elapsed = time.monotonic() - started
    assert run.returncode == 1, output
    assert "3 failed, 1 passed" in output, output
    assert output.count("TestTimedOut") >= 2, output  # the two that wait on the reactor
    assert "Timeout" in output  # the plain one: pytest-timeout's signal, raised in the test
    # 3 timeouts of 0.5 s, plus start-up: nowhere near the hours a hang would take.
    assert elapsed < 60, f"{elapsed:.1f} s\n{output}"


@pytest.mark.timeout(120)
def test_ctrl_c_ends_a_test_waiting_on_the_reactor(tmp_path):
    path = tmp_path / "test_waits.py"
    path.write_text(
        "import pytest, pytest_twisted\n"
        "from twisted.internet import defer\n\n"
        "@pytest.mark.timeout(90)\n"
        "@pytest_twisted.ensureDeferred\n"
        "async def test_waits():\n"
        "    print('waiting now', flush=True)\n"
        "    await defer.Deferred()\n"
    )
    run = run_pytest(tmp_path, "-s", str(path))
    try:
        deadline = time.monotonic() + 60
        line = ""
        while "waiting now" not in line:
            assert time.monotonic() < deadline, "the test never started"
            line = run.stdout.readline()
            assert line or run.poll() is None, "pytest ended early"
        time.sleep(0.5)  # it is now waiting in the reactor
        interrupted = time.monotonic()
        run.send_signal(signal.SIGINT)
        output, _ = run.communicate(timeout=30)
        assert time.monotonic() - interrupted < 15
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert "KeyboardInterrupt" in output, output
    assert run.returncode == 2, output  # pytest's "interrupted"
