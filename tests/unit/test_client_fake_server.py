"""stui-client against a fake line-JSON server running in a thread.

:class:`FakeStuiServer` is a small ``socketserver`` that speaks enough of the
protocol (sessions, evaluate, interrupt, complete, inspect, auth) for the client; it
can drop every connection and come back on the same port to play a server restart.
The REPL itself is driven in a pseudo-terminal with pexpect.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import socket
import socketserver
import sys
import threading
import traceback
from pathlib import Path

import pexpect
import pytest

from stui_twisted.client.__main__ import main
from stui_twisted.client.session import CredentialSource, RequestLost, StuiClient
from stui_twisted.client.state import ClientState
from stui_twisted.client.transport import ConnectionLost, parse_server_url
from tests.helpers import wait_for_signal_keys

pytestmark = pytest.mark.timeout(30)

REPO_ROOT = Path(__file__).resolve().parents[2]
SPIN_FOREVER = "while True: pass"


def success(request, **result):
    return {"id": request.get("id"), "status": "success", "result": result}


def failure(request, error_type, error, **details):
    return {
        "id": request.get("id"),
        "status": "error",
        "error": error,
        "error_type": error_type,
        "details": details,
    }


class FakeSession:
    def __init__(self, session_id, client_id):
        self.session_id = session_id
        self.client_id = client_id
        self.namespace: dict = {}
        self.closed = False
        self.expired = False
        self.interrupt = threading.Event()

    def record(self):
        return {"session_id": self.session_id, "client_id": self.client_id, "is_active": True}


class FakeStuiServer:
    """Enough of a stui server for the client, with knobs for the tests."""

    def __init__(self, *, users: dict[str, str] | None = None):
        self.users = users or {}
        self.sessions: dict[str, FakeSession] = {}
        self.requests: list[dict] = []
        self.drop_on_command: set[str] = set()
        self.session_limit: int | None = None
        self.lock = threading.Lock()
        self.connections: set[socket.socket] = set()
        self.port = 0
        self._server: socketserver.ThreadingTCPServer | None = None

    # -- lifecycle -----------------------------------------------------------------

    def start(self):
        fake = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                fake._serve_connection(self.connection, self.rfile)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    def stop(self):
        """Stop listening and drop every connection, like a killed server."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self.lock:
            for conn in list(self.connections):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self.connections.clear()
        for session in self.sessions.values():
            session.interrupt.set()

    @property
    def url(self):
        return f"tcp://127.0.0.1:{self.port}"

    def commands(self):
        return [request.get("command") for request in self.requests]

    # -- protocol ------------------------------------------------------------------

    def _serve_connection(self, conn, rfile):
        with self.lock:
            self.connections.add(conn)
        context = {"authenticated": not self.users, "send_lock": threading.Lock(), "conn": conn}
        try:
            for line in rfile:
                if not line.strip():
                    continue
                request = json.loads(line)
                self.requests.append(request)
                if request.get("command") in self.drop_on_command:
                    self.drop_on_command.discard(request["command"])
                    conn.shutdown(socket.SHUT_RDWR)
                    return
                if request.get("command") == "evaluate" and context["authenticated"]:
                    # Evaluations run beside the connection so that later requests
                    # (interrupt) are answered first: replies come out of order.
                    threading.Thread(
                        target=lambda r=request: self._send(
                            conn, context, self._answer(r, context)
                        ),
                        daemon=True,
                    ).start()
                    continue
                self._send(conn, context, self._answer(request, context))
        except OSError:
            return
        finally:
            with self.lock:
                self.connections.discard(conn)

    def _send(self, conn, context, reply):
        with context["send_lock"], contextlib.suppress(OSError):
            conn.sendall(json.dumps(reply).encode() + b"\n")

    def _answer(self, request, context):
        command = request.get("command")
        params = request.get("parameters") or {}
        if command == "ping":
            return success(request, message="pong", server="fake-stui", uptime=1.0)
        if command == "authenticate":
            if self.users.get(params.get("username")) == params.get("password"):
                context["authenticated"] = True
                return success(
                    request, authenticated=True, client_id=params["username"], token="t0k"
                )
            return failure(request, "AuthenticationFailed", "wrong user name or password")
        if not context["authenticated"]:
            return failure(request, "AuthenticationRequired", "authenticate first")
        if command == "create_session":
            mine = [s for s in self.sessions.values() if s.client_id == params["client_id"]]
            if self.session_limit is not None and len(mine) >= self.session_limit:
                return failure(
                    request, "SessionLimitExceeded", "too many sessions; close one first"
                )
            session = FakeSession(f"s_{len(self.sessions) + 1}", params["client_id"])
            self.sessions[session.session_id] = session
            return success(request, **session.record(), capabilities=["evaluate"])
        if command == "list_client_sessions":
            mine = [
                s.record() for s in self.sessions.values() if s.client_id == params["client_id"]
            ]
            return success(
                request, client_id=params["client_id"], session_count=len(mine), sessions=mine
            )
        session = self.sessions.get(params.get("session_id"))
        if session is None:
            return failure(request, "SessionNotFound", "no such session")
        if session.closed:
            return failure(request, "SessionClosed", "session was closed")
        if session.expired:
            return failure(request, "SessionExpired", "session expired")
        if command == "restore_session":
            names = sorted(k for k in session.namespace if not k.startswith("_"))
            return success(
                request, **session.record(), restored_bindings=names, unrestorable_bindings=[]
            )
        if command == "evaluate":
            return self._evaluate(request, session, params.get("code", ""))
        if command == "interrupt":
            session.interrupt.set()
            return success(request, session_id=session.session_id, interrupted=True)
        if command == "complete":
            code = params["code"][: params.get("cursor_pos", len(params["code"]))]
            word = code.split()[-1] if code.split() else ""
            names = sorted(n for n in session.namespace if n.startswith(word))
            return success(
                request, matches=names, cursor_start=len(code) - len(word), cursor_end=len(code)
            )
        if command == "get_session_info":
            return success(request, **session.record(), variable_count=len(session.namespace))
        if command == "close_session":
            session.closed = True
            return success(request, session_id=session.session_id, closed=True, saved=True)
        if command == "inspect":
            value = eval(params["expression"], session.namespace)  # noqa: S307 - test fake
            return success(
                request,
                session_id=session.session_id,
                object_id="obj_1",
                class_name=type(value).__name__,
                string_representation=repr(value),
                size=None,
                attributes=[],
                items=[],
                truncated=False,
            )
        return failure(request, "UnknownCommand", f"unknown command {command!r}")

    def _evaluate(self, request, session, code):
        if code.strip() == SPIN_FOREVER:
            session.interrupt.clear()
            if session.interrupt.wait(10):
                return failure(request, "Interrupted", "evaluation interrupted")
            return failure(request, "Timeout", "evaluation timed out")
        output = io.StringIO()
        try:
            tree = ast.parse(code)
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            with contextlib.redirect_stdout(output):
                exec(compile(tree, "<input>", "exec"), session.namespace)  # noqa: S102
                value = (
                    eval(compile(ast.Expression(last.value), "<input>", "eval"), session.namespace)  # noqa: S307
                    if last
                    else None
                )
        except Exception as error:
            return failure(
                request,
                "EvaluationError",
                f"{type(error).__name__}: {error}",
                exception_type=type(error).__name__,
                message=str(error),
                traceback=traceback.format_exception(error),
                output=output.getvalue(),
            )
        return success(
            request,
            session_id=session.session_id,
            result=None if value is None else repr(value),
            output=output.getvalue(),
            has_error=False,
        )


@pytest.fixture
def fake_server():
    server = FakeStuiServer().start()
    yield server
    server.stop()


@pytest.fixture
def state_dir(tmp_path):
    return tmp_path / "state"


def make_client(server, state_dir, **options):
    notes: list[str] = []
    client = StuiClient(
        parse_server_url(server.url),
        client_id="alice",
        state=ClientState(state_dir),
        notify=notes.append,
        reconnect_total_seconds=options.pop("reconnect_total_seconds", 5.0),
        **options,
    )
    client.notes = notes
    return client


# -- the protocol client ---------------------------------------------------------


def test_creates_a_session_then_restores_it_next_time(fake_server, state_dir):
    first = make_client(fake_server, state_dir)
    first.connect()
    assert "New session s_1 created" in first.open_session()
    create = [r for r in fake_server.requests if r["command"] == "create_session"][0]
    assert create["parameters"]["client_id"] == "alice"
    assert set(create["parameters"]["client_info"]) == {"platform", "version", "capabilities"}
    assert first.evaluate("x = 6 * 7")["status"] == "success"
    first.close()

    second = make_client(fake_server, state_dir)
    second.connect()
    message = second.open_session()
    assert "Session s_1 restored" in message and "x" in message
    assert second.evaluate("x")["result"]["result"] == "42"
    ids = [r["id"] for r in fake_server.requests]
    assert all(isinstance(i, int) for i in ids)
    second.close()


def test_a_gone_session_is_replaced_and_the_user_told(fake_server, state_dir):
    client = make_client(fake_server, state_dir)
    client.connect()
    client.open_session()
    fake_server.sessions["s_1"].expired = True
    client.close()

    again = make_client(fake_server, state_dir)
    again.connect()
    message = again.open_session()
    assert "Previous session s_1 has expired" in message
    assert "New session s_2 created" in message
    assert ClientState(state_dir).last_session(fake_server.url, "alice") == "s_2"


def test_new_forces_a_session_and_session_restores_a_given_one(fake_server, state_dir):
    client = make_client(fake_server, state_dir)
    client.connect()
    client.open_session()
    assert "s_2" in client.open_session(force_new=True)
    assert "Session s_1 restored" in client.open_session(session_id="s_1")


def test_replies_are_matched_by_id_when_out_of_order(fake_server, state_dir):
    client = make_client(fake_server, state_dir)
    client.connect()
    client.open_session()
    # A stale reply to a request nobody waits for arrives first and is dropped.
    client._unwanted_ids.add(client._last_request_id + 2)
    stray = {"id": client._last_request_id + 2, "status": "success", "result": {}}
    original_send = client.transport.send

    def send_then_inject(message):
        original_send(message)
        client.transport._buffer += json.dumps(stray).encode() + b"\n"

    client.transport.send = send_then_inject
    reply = client.call("ping")
    assert reply["result"]["message"] == "pong"


def test_authenticates_when_asked(state_dir):
    server = FakeStuiServer(users={"alice": "secret"}).start()
    try:
        client = make_client(
            server,
            state_dir,
            credentials=CredentialSource("alice", "secret", interactive=False),
            client_id_explicit=False,
        )
        client.connect()
        client.open_session()
        assert server.commands()[:3] == ["create_session", "authenticate", "create_session"]
        assert client.authenticated and client.token == "t0k"
    finally:
        server.stop()


def test_reconnects_and_restores_after_a_server_restart(fake_server, state_dir):
    client = make_client(fake_server, state_dir)
    client.connect()
    client.open_session()
    client.evaluate("x = 1")
    fake_server.stop()
    fake_server.start()
    reply = client.evaluate("x + 1")
    assert reply["result"]["result"] == "2"
    assert any("reconnecting" in note for note in client.notes)
    assert any("Reconnected" in note and "s_1 restored" in note for note in client.notes)
    assert fake_server.commands()[-2:] == ["restore_session", "evaluate"]


def test_the_idle_watcher_check_reconnects_without_a_command(fake_server, state_dir):
    client = make_client(fake_server, state_dir)
    client.connect()
    client.open_session()
    fake_server.stop()
    fake_server.start()
    client.check_idle_connection()
    assert fake_server.commands()[-1] == "restore_session"
    assert client.transport is not None


def test_an_evaluation_lost_in_flight_is_reported_not_repeated(fake_server, state_dir):
    client = make_client(fake_server, state_dir)
    client.connect()
    client.open_session()
    fake_server.drop_on_command.add("evaluate")
    with pytest.raises(RequestLost):
        client.evaluate("x = 1")
    assert fake_server.commands().count("evaluate") == 1
    assert client.evaluate("2 + 2")["result"]["result"] == "4"


def test_reconnecting_gives_up_after_the_budget(fake_server, state_dir):
    client = make_client(fake_server, state_dir, reconnect_total_seconds=0.7)
    client.connect()
    client.open_session()
    fake_server.stop()
    with pytest.raises(ConnectionLost, match="could not reconnect"):
        client.evaluate("1")


# -- the command line: --eval ------------------------------------------------------


def run_main(argv, capsys):
    status = main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_eval_prints_the_result_and_exits_zero(fake_server, state_dir, capsys):
    status, out, err = run_main(
        [
            fake_server.url,
            "--state-dir",
            str(state_dir),
            "--client-id",
            "alice",
            "-e",
            "print('hi'); 6 * 7",
        ],
        capsys,
    )
    assert (status, out) == (0, "hi\n42\n")


def test_eval_error_is_readable_and_exits_one(fake_server, state_dir, capsys):
    status, out, err = run_main(
        [fake_server.url, "--state-dir", str(state_dir), "--eval", "1/0"], capsys
    )
    assert status == 1
    assert err.rstrip().endswith("ZeroDivisionError: division by zero")


def test_eval_json_prints_raw_replies(fake_server, state_dir, capsys):
    status, out, err = run_main(
        [fake_server.url, "--state-dir", str(state_dir), "--json", "-e", "x = 2", "-e", "x * 3"],
        capsys,
    )
    replies = [json.loads(line) for line in out.splitlines()]
    assert status == 0
    assert [r["status"] for r in replies] == ["success", "success"]
    assert replies[1]["result"]["result"] == "6"


def test_session_limit_lists_the_sessions_and_hints_at_session(fake_server, state_dir, capsys):
    fake_server.session_limit = 1
    base = [fake_server.url, "--state-dir", str(state_dir), "--client-id", "alice"]
    assert run_main([*base, "-e", "1"], capsys)[0] == 0
    status, out, err = run_main([*base, "--new", "-e", "1"], capsys)
    assert status == 2
    assert "SessionLimitExceeded" in err and "s_1" in err and "--session ID" in err


def test_connection_and_usage_errors_exit_two(state_dir, capsys):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    status, out, err = run_main([f"tcp://127.0.0.1:{free_port}", "-e", "1"], capsys)
    assert status == 2 and "cannot connect" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["http://nowhere:1", "-e", "1"])
    assert exit_info.value.code == 2


# -- the REPL in a pseudo-terminal ---------------------------------------------------


def spawn_client(server, state_dir, *extra):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1")
    child = pexpect.spawn(
        sys.executable,
        [
            "-m",
            "stui_twisted.client",
            server.url,
            "--state-dir",
            str(state_dir),
            "--client-id",
            "alice",
            *extra,
        ],
        env=env,
        cwd=str(REPO_ROOT),
        encoding="utf-8",
        timeout=10,
        dimensions=(40, 120),
    )
    return child


def send_line(child, text):
    child.send(text + "\r")


def test_repl_evaluates_quits_and_restores(fake_server, state_dir):
    child = spawn_client(fake_server, state_dir)
    child.expect("New session s_1 created")
    child.expect(">>>")
    send_line(child, "x = 6 * 7")
    child.expect(">>>")
    send_line(child, ":quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    child = spawn_client(fake_server, state_dir)
    child.expect("Session s_1 restored")
    child.expect(">>>")
    send_line(child, "x")
    child.expect("42")
    child.expect(">>>")
    child.sendcontrol("d")
    child.expect(pexpect.EOF)


def test_repl_ctrl_c_interrupts_a_running_evaluation(fake_server, state_dir):
    child = spawn_client(fake_server, state_dir)
    child.expect(">>>")
    send_line(child, SPIN_FOREVER)
    while "evaluate" not in fake_server.commands():
        child.expect([pexpect.TIMEOUT], timeout=0.05)
    wait_for_signal_keys(child)
    child.sendintr()
    child.expect("Interrupted: evaluation interrupted")
    child.expect(">>>")
    assert "interrupt" in fake_server.commands()
    send_line(child, "2 + 1234")
    child.expect("1236")
    child.expect(">>>")
    child.sendcontrol("d")
    child.expect(pexpect.EOF)


def test_repl_multi_line_input_meta_commands_and_errors(fake_server, state_dir):
    child = spawn_client(fake_server, state_dir)
    child.expect(">>>")
    send_line(child, "def square(n):")
    child.expect(r"\.\.\.")
    send_line(child, "return n * n")
    child.expect(r"\.\.\.")
    send_line(child, "")
    child.expect(">>>")
    send_line(child, "square(7)")
    child.expect("49")
    child.expect(">>>")
    send_line(child, "1/0")
    child.expect("ZeroDivisionError: division by zero")
    child.expect(">>>")
    send_line(child, ":inspect [1, 2]")
    child.expect("list obj_1")
    child.expect(">>>")
    send_line(child, ":sessions")
    child.expect(r"\* s_1")
    child.expect(">>>")
    send_line(child, ":nope")
    child.expect("Unknown meta-command :nope")
    child.expect(">>>")
    child.send("abc")
    child.sendintr()  # Ctrl-C at the prompt clears the line
    child.expect(">>>")
    send_line(child, ":close")
    child.expect("Session s_1 closed")
    child.expect(">>>")
    send_line(child, "3 * 3333")
    child.expect("New session s_2 created")
    child.expect("9999")
    child.expect(">>>")
    send_line(child, ":quit")
    child.expect(pexpect.EOF)
    history = (state_dir / "history").read_text()
    assert "def square(n):" in history and "square(7)" in history


def test_repl_reconnects_by_itself_after_a_server_restart(fake_server, state_dir):
    child = spawn_client(fake_server, state_dir)
    child.expect(">>>")
    send_line(child, "y = 5")
    child.expect(">>>")
    fake_server.stop()
    fake_server.start()
    child.expect("Reconnected to")
    child.expect("Session s_1 restored")
    send_line(child, "y * 2222")
    child.expect("11110")
    child.expect(">>>")
    send_line(child, ":quit")
    child.expect(pexpect.EOF)


def test_repl_completes_names_with_the_server(fake_server, state_dir):
    child = spawn_client(fake_server, state_dir)
    child.expect(">>>")
    send_line(child, "unusual_name = 31337")
    child.expect(">>>")
    child.send("unusual_n\t")
    child.expect("unusual_name")
    send_line(child, "")
    child.expect("31337")
    assert "complete" in fake_server.commands()
    send_line(child, ":quit")
    child.expect(pexpect.EOF)
