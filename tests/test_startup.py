"""Start-up and the command line, tested on real ``twistd`` processes.

A listener that cannot bind stops start-up at once with one log line naming
the option and the address; the CLI's own options (``--help``,
``--version``, ``--check-config``) say what they should.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.serverproc import REPO_ROOT, make_self_signed, twistd_command

pytestmark = pytest.mark.e2e


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    return env


def run_twistd(workdir: Path, twistd_args: list[str], stui_args: list[str], timeout: float = 60.0):
    """Run C{twistd TWISTD_ARGS stui STUI_ARGS} to its end; (status, seconds, output)."""
    started = time.monotonic()
    completed = subprocess.run(
        [*twistd_command(), *twistd_args, "stui", *stui_args],
        cwd=workdir,
        env=_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return completed.returncode, time.monotonic() - started, completed.stdout + completed.stderr


@pytest.fixture
def busy_port():
    """A loopback TCP port that is bound and listening (so nobody else can)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock.getsockname()[1]
    sock.close()


def _listener_args(kind: str, port: int, tmp_path: Path) -> tuple[str, list[str]]:
    """(option, the stui arguments) with the C{kind} listener on C{port}."""
    free = ["--tcp=tcp:0:interface=127.0.0.1", "--zmq=tcp://127.0.0.1:*"]
    if kind == "tcp":
        return "--tcp", [f"--tcp=tcp:{port}:interface=127.0.0.1", "--zmq=tcp://127.0.0.1:*"]
    if kind == "zmq":
        return "--zmq", ["--tcp=tcp:0:interface=127.0.0.1", f"--zmq=tcp://127.0.0.1:{port}"]
    if kind == "metrics":
        return "--metrics", [*free, f"--metrics=tcp:{port}:interface=127.0.0.1"]
    key, cert = make_self_signed(tmp_path)
    return "--tls", [*free, f"--tls=ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"]


@pytest.mark.parametrize("kind", ["tcp", "tls", "zmq", "metrics"])
def test_a_port_in_use_stops_start_up_at_once_with_one_clear_line(tmp_path, busy_port, kind):
    option, args = _listener_args(kind, busy_port, tmp_path)
    log = tmp_path / "twistd.log"
    status, seconds, output = run_twistd(
        tmp_path,
        ["-n", f"--logfile={log}", "--pidfile="],
        [*args, f"--data-dir={tmp_path / 'data'}", "--image=yes"],
        timeout=30,
    )
    text = log.read_text()
    assert status != 0, text
    assert seconds < 5, f"took {seconds:.1f} s to give up:\n{text}"
    failures = [line for line in text.splitlines() if "start-up failed" in line]
    assert len(failures) == 1, text
    assert f"{option}=" in failures[0] and f"127.0.0.1:{busy_port}" in failures[0], failures
    assert "Address already in use" in failures[0]
    assert "Traceback" not in text + output
    assert "image started" not in text  # nothing was spawned: binds come first
    assert not (tmp_path / "data").exists()  # nor was the store opened


def test_a_daemon_with_a_port_in_use_reports_it_to_its_parent(tmp_path, busy_port):
    """Without -n the waiting parent exits 1 naming the option; no pidfile is left."""
    pidfile = tmp_path / "stui.pid"
    log = tmp_path / "twistd.log"
    status, seconds, output = run_twistd(
        tmp_path,
        [f"--pidfile={pidfile}", f"--logfile={log}"],
        [
            "--tcp=tcp:0:interface=127.0.0.1",
            f"--zmq=tcp://127.0.0.1:{busy_port}",
            f"--data-dir={tmp_path / 'data'}",
            "--image=no",
        ],
        timeout=30,
    )
    assert status == 1, output
    assert seconds < 5, output
    assert f"--zmq tcp://127.0.0.1:{busy_port}: Address already in use" in output
    assert not pidfile.exists()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "start-up failed" not in log.read_text():
        time.sleep(0.05)
    assert "Traceback" not in log.read_text()
