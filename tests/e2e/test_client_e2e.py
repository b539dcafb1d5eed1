"""stui-client against a real ``twistd -n stui``, driven in a pseudo-terminal.

These are the issue's acceptance checks: evaluate ``x = 6 * 7``, quit, start again
and ``x`` is 42; Ctrl-C stops ``while True: pass``; ``--eval '1/0'`` fails readably;
the client reconnects and restores by itself when the server is killed and started
again.  Plus ZeroMQ, verified TLS and password authentication with ``--eval``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from stui_twisted.access.passwd import hash_password, write_atomically
from tests.helpers import wait_for_signal_keys
from tests.serverproc import REPO_ROOT, ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.image, pytest.mark.timeout(90)]

CLIENT_TIMEOUT = 10


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def supports_evaluate(proc: ServerProcess) -> bool:
    """The capability check: does this server's ``describe`` list ``evaluate``?"""
    client = proc.tcp_client()
    try:
        reply = client.call("describe")
    finally:
        client.close()
    return reply.get("status") == "success" and "evaluate" in (
        reply["result"].get("commands") or {}
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    proc = ServerProcess(
        tmp_path_factory.mktemp("client-e2e"), f"--tcp=tcp:{port}:interface=127.0.0.1", tls=True
    ).start()
    if not supports_evaluate(proc):
        proc.kill()
        pytest.skip("this server's describe does not list evaluate yet")
    yield proc
    proc.kill()


@pytest.fixture
def state_dir(tmp_path):
    return tmp_path / "client-state"


def client_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO_ROOT), TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1")


def client_args(url: str, state_dir, *extra: str) -> list[str]:
    # One client id per test (from its tmp dir) keeps each under max_sessions_per_client.
    client_id = "--client-id=" + Path(state_dir).parent.name.replace("[", "-").replace("]", "")
    if "--user" in extra:
        client_id = "--client-id=alice"
    return ["-m", "stui_twisted.client", url, "--state-dir", str(state_dir), client_id, *extra]


def spawn_repl(url: str, state_dir, *extra: str) -> pexpect.spawn:
    return pexpect.spawn(
        sys.executable,
        client_args(url, state_dir, *extra),
        env=client_env(),
        cwd=str(REPO_ROOT),
        encoding="utf-8",
        timeout=CLIENT_TIMEOUT,
        dimensions=(40, 120),
    )


def run_eval(url: str, state_dir, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *client_args(url, state_dir, *extra)],
        env=client_env(),
        cwd=str(REPO_ROOT),
        capture_output=True,
        text=True,
        timeout=30,
    )


def tcp_url(proc: ServerProcess) -> str:
    return f"tcp://127.0.0.1:{proc.tcp_port}"


def submit(child: pexpect.spawn, text: str) -> None:
    child.send(text + "\r")


def quit_repl(child: pexpect.spawn) -> None:
    submit(child, ":quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_quit_and_start_again_restores_x(server, state_dir):
    child = spawn_repl(tcp_url(server), state_dir)
    child.expect("New session s_")
    child.expect(">>>")
    submit(child, "x = 6 * 7")
    child.expect(">>>")
    quit_repl(child)

    child = spawn_repl(tcp_url(server), state_dir)
    child.expect(r"Session s_\S+ restored")
    child.expect(">>>")
    submit(child, "x")
    child.expect("42")
    child.expect(">>>")
    quit_repl(child)


def test_ctrl_c_stops_an_endless_loop_and_the_prompt_returns(server, state_dir):
    child = spawn_repl(tcp_url(server), state_dir, "--new")
    child.expect(">>>")
    submit(child, "while True: pass")
    wait_for_signal_keys(child)
    child.expect([pexpect.TIMEOUT], timeout=0.5)  # let the evaluation start
    child.sendintr()
    child.expect("Interrupted")
    child.expect(">>>")
    submit(child, "7 * 191")
    child.expect("1337")
    child.expect(">>>")
    quit_repl(child)


def test_eval_of_a_failing_expression_exits_non_zero(server, state_dir):
    completed = run_eval(tcp_url(server), state_dir, "--eval", "1/0")
    assert completed.returncode == 1
    assert completed.stderr.rstrip().endswith("ZeroDivisionError: division by zero")
    completed = run_eval(tcp_url(server), state_dir, "--eval", "6 * 7")
    assert (completed.returncode, completed.stdout) == (0, "42\n")


def test_meta_commands_against_the_server(server, state_dir):
    child = spawn_repl(tcp_url(server), state_dir, "--new")
    child.expect(">>>")
    submit(child, "data = [10, 20]")
    child.expect(">>>")
    submit(child, ":inspect data")
    child.expect("list")
    child.expect(">>>")
    submit(child, ":info")
    child.expect("session_id")
    child.expect(">>>")
    submit(child, ":save")
    child.expect("Saved at")
    child.expect(">>>")
    submit(child, ":sessions")
    child.expect(r"\* s_")
    child.expect(">>>")
    submit(child, ":clear variables")
    child.expect("Cleared")
    child.expect(">>>")
    submit(child, ":load")
    child.expect("Loaded")
    child.expect(">>>")
    quit_repl(child)


def test_eval_over_zmq_and_verified_tls(server, state_dir):
    zmq_url = server.zmq_url.replace("tcp://", "zmq://")
    completed = run_eval(zmq_url, state_dir, "--eval", "6 * 7")
    assert (completed.returncode, completed.stdout) == (0, "42\n"), completed.stderr
    tls_url = f"tls://localhost:{server.tls_port}"
    completed = run_eval(tls_url, state_dir, "--cafile", str(server.cert_path), "--eval", "6 * 7")
    assert (completed.returncode, completed.stdout) == (0, "42\n"), completed.stderr
    completed = run_eval(tls_url, state_dir, "--eval", "6 * 7")  # system trust: refused
    assert completed.returncode == 2
    assert "not trusted" in completed.stderr


def test_the_client_reconnects_after_the_server_is_killed_and_restarted(
    tmp_path, state_dir, start_server
):
    port = free_port()
    proc = start_server(tmp_path / "server", f"--tcp=tcp:{port}:interface=127.0.0.1", zmq=False)
    child = spawn_repl(tcp_url(proc), state_dir)
    child.expect(">>>")
    submit(child, "y = 5")
    child.expect(">>>")
    submit(child, ":save")
    child.expect("Saved at")
    child.expect(">>>")
    proc.kill()
    child.expect("reconnecting")
    proc.start()
    child.expect("Reconnected to", timeout=20)
    child.expect("restored")
    submit(child, "y * 2222")
    child.expect("11110")
    child.expect(">>>")
    quit_repl(child)


def test_password_authentication_with_eval(tmp_path, state_dir, monkeypatch, start_server):
    users = tmp_path / "users"
    write_atomically(str(users), [f"alice:{hash_password('s3cret', n=2**4)}"])
    proc = start_server(tmp_path / "server", f"--auth-file={users}", zmq=True)
    monkeypatch.setenv("STUI_PASSWORD", "s3cret")
    completed = run_eval(tcp_url(proc), state_dir, "--user", "alice", "--eval", "6 * 7")
    assert (completed.returncode, completed.stdout) == (0, "42\n"), completed.stderr
    zmq_url = proc.zmq_url.replace("tcp://", "zmq://")
    completed = run_eval(zmq_url, state_dir, "--user", "alice", "--eval", "6 * 7")
    assert (completed.returncode, completed.stdout) == (0, "42\n"), completed.stderr
    monkeypatch.setenv("STUI_PASSWORD", "wrong")
    completed = run_eval(tcp_url(proc), state_dir, "--user", "alice", "--eval", "6 * 7")
    assert completed.returncode == 2
    assert "AuthenticationFailed" in completed.stderr
    monkeypatch.delenv("STUI_PASSWORD")
    completed = run_eval(tcp_url(proc), state_dir, "--eval", "1")
    assert completed.returncode == 2
    assert "--user" in completed.stderr
    child = spawn_repl(tcp_url(proc), state_dir, "--client-id=alice")
    child.expect("username: ")
    child.sendline("alice")
    child.expect("password for alice: ")
    child.sendline("s3cret")
    child.expect("Session s_\\S+ restored")
    child.expect(">>>")
    submit(child, "6 * 7")
    child.expect("42")
    child.expect(">>>")
    quit_repl(child)


def test_watch_and_live_lines_follow_a_session(server, tmp_path, state_dir):
    """--watch (ZeroMQ) prints another terminal's evaluations; the REPL (TCP) shows
    others' as live lines."""
    url = tcp_url(server)
    child = spawn_repl(url, state_dir, "--new")
    child.expect(r"New session (s_\S+) created")
    session_id = child.match.group(1)
    child.expect(">>>")
    # over ZeroMQ: a DEALER that sends no empty delimiter frame is pushed events
    zmq_url = server.zmq_url.replace("tcp://", "zmq://")
    watcher = spawn_repl(zmq_url, tmp_path / "watch-state", "--watch", session_id)
    watcher.expect(f"Watching session {session_id} read-only")
    watcher.expect("live from seq")
    submit(child, "6 * 7")
    child.expect("42")
    child.expect(">>>")
    watcher.expect(r"#1\] >>> 6 \* 7")
    watcher.expect(r"#1\] = 42")
    completed = run_eval(url, tmp_path / "other-state", "--session", session_id, "-e", "1 + 1")
    assert (completed.returncode, completed.stdout) == (0, "2\n"), completed.stderr
    child.expect(r"#2\] >>> 1 \+ 1")  # somebody else's evaluation, above the prompt
    child.expect(r"#2\] = 2")
    watcher.expect(r"#2\] = 2")
    submit(child, ":close")
    child.expect("closed")
    watcher.expect("The session was closed.")
    watcher.expect(pexpect.EOF)
    watcher.close()
    assert watcher.exitstatus == 0
    quit_repl(child)
