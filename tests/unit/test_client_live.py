"""stui-client's live features against a fake server that speaks the 1.1 contracts.

L{LiveFakeServer} extends the fake of C{test_client_fake_server} with what
events.md, debugger.md and access.md add: per-session event logs with C{seq},
C{subscribe}/C{get_events} with C{since}, C{output} and C{input_requested} events
while an evaluation runs (C{input()} in the fake waits for C{send_input}), a fake
breakpoint (C{pause_here(**frame_locals)}) that emits C{debug_paused} and answers the
paused-state commands, sharing with read/write access, plans and C{whoami}.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import linecache
import queue
import sys
import threading
import time
import types

import pexpect
import pytest

from stui_twisted.client.live import (
    OwnEvaluations,
    format_event,
    unstreamed_output,
    without_streamed_output,
)
from stui_twisted.client.session import TEAM
from stui_twisted.client.state import ClientState
from tests.unit.test_client_fake_server import (
    FakeStuiServer,
    failure,
    make_client,
    run_main,
    send_line,
    spawn_client,
    success,
)

pytestmark = pytest.mark.timeout(30)

ANSWER_TIMEOUT = 10


class EventOutput(io.TextIOBase):
    """The fake's stdout while code runs: each finished line is an C{output} event."""

    def __init__(self, server, session, index):
        self.server, self.session, self.index = server, session, index
        self.captured = io.StringIO()
        self.pending = ""

    def write(self, text):
        self.captured.write(text)
        self.pending += text
        if "\n" in self.pending:
            cut = self.pending.rindex("\n") + 1
            self.publish(self.pending[:cut])
            self.pending = self.pending[cut:]
        return len(text)

    def flush(self):
        if self.pending:
            self.publish(self.pending)
            self.pending = ""

    def publish(self, text):
        data = {"history_index": self.index, "name": "stdout", "text": text}
        self.server.publish(self.session, "output", data)


class LiveFakeServer(FakeStuiServer):
    def __init__(self, **options):
        super().__init__(**options)
        self.logs: dict[str, list[dict]] = {TEAM: []}
        self.subscribers: dict[str, list] = {TEAM: []}
        self.shares: dict[str, dict[str, str]] = {}
        self.features = {"evaluate", "events", "share", "debug", "inspect", "complete"}
        self.hold_delivery: set[str] = set()  # streams whose events are logged, not sent
        self.history: dict[str, int] = {}
        self.debug_events = True  # False: like a server without debug_paused (poll debug_state)

    # -- events ----------------------------------------------------------------------

    def publish(self, session, event, data, *, deliver=True):
        if event.startswith("debug_") and not self.debug_events:
            return None
        key = TEAM if session is None else session.session_id
        log = self.logs.setdefault(key, [])
        message = {
            "event": event,
            "stream": "team" if key == TEAM else "session",
            "seq": len(log) + 1,
            "timestamp": "2026-12-01T10:30:00.000Z",
            "data": data,
        }
        if key != TEAM:
            message["session_id"] = key
        log.append(message)
        if deliver and key not in self.hold_delivery:
            for conn, context in list(self.subscribers.get(key, [])):
                self._send(conn, context, message)
        return message

    def send_dropped(self, key, from_seq, to_seq):
        marker = {"event": "dropped", "stream": "session", "session_id": key}
        marker.update(from_seq=from_seq, to_seq=to_seq)
        for conn, context in list(self.subscribers.get(key, [])):
            self._send(conn, context, marker)

    def _serve_connection(self, conn, rfile):
        try:
            super()._serve_connection(conn, rfile)
        finally:
            for subscribers in self.subscribers.values():
                subscribers[:] = [entry for entry in subscribers if entry[0] is not conn]

    # -- access ----------------------------------------------------------------------

    def access_of(self, session, client_id):
        if client_id == session.client_id:
            return "owner"
        return self.shares.get(session.session_id, {}).get(client_id)

    def _answer(self, request, context):
        command = request.get("command")
        params = request.get("parameters") or {}
        if params.get("client_id"):
            context["client_id"] = params["client_id"]
        client_id = context.get("client_id")
        gated = {"subscribe": "events", "get_events": "events", "share_session": "share"}
        gated.update(dict.fromkeys(("set_breakpoint", "debug_state", "debug_step"), "debug"))
        if command in gated and gated[command] not in self.features:
            return failure(
                request,
                "PermissionDenied",
                f"{command} needs the feature {gated[command]!r}, which plan 'free' does not have",
                feature=gated[command],
                plan="free",
            )
        if command == "whoami":
            return success(
                request,
                client_id=client_id,
                plan="free",
                features=sorted(self.features),
                limits={"max_sessions_per_client": 2},
                authenticated=False,
                token_expires_at=None,
            )
        if command == "list_shared_sessions":
            shared = [
                dict(self.sessions[sid].record(), owner=self.sessions[sid].client_id, access=a)
                for sid, shares in self.shares.items()
                for who, a in shares.items()
                if who == client_id
            ]
            return success(request, sessions=shared)
        key = params.get("session_id")
        if command in ("subscribe", "get_events", "unsubscribe") and key == TEAM:
            return self._stream_command(request, command, params, context, TEAM)
        session = self.sessions.get(key)
        if session is not None:
            access = self.access_of(session, client_id)
            if access is None:
                return failure(request, "SessionNotFound", "no such session")
            writes = {"evaluate", "send_input", "interrupt", "set_breakpoint", "debug_continue"}
            if access == "read" and command in writes:
                return failure(
                    request,
                    "PermissionDenied",
                    f"{command} needs write access; you have read access",
                    access="read",
                    command=command,
                )
            if command in ("subscribe", "get_events", "unsubscribe"):
                return self._stream_command(request, command, params, context, key)
            if command in ("share_session", "unshare_session"):
                shares = self.shares.setdefault(key, {})
                if command == "share_session":
                    shares[params["with"]] = params["access"]
                else:
                    shares.pop(params["with"], None)
                    self._unshared(session, params["with"])
                listed = [{"client_id": c, "access": a} for c, a in shares.items()]
                return success(request, session_id=key, shares=listed)
            if command == "send_input":
                if getattr(session, "input_wanted", False):
                    session.input_wanted = False
                    session.answers.put(params["text"])
                    return success(request, accepted=True)
                return failure(request, "InvalidRequest", "nothing waits for input")
            if command.startswith("debug_"):
                return self._debug(request, session, command, params)
            if command == "close_session":
                self.publish(session, "session_closed", {"by": client_id})
            if command == "evaluate":
                by = client_id or session.client_id
                return self._evaluate_live(request, session, params.get("code", ""), by)
        return super()._answer(request, context)

    def _unshared(self, session, client_id):
        """As the server: C{watcher_left} to all, then the watcher's subscriptions end."""
        subscribers = self.subscribers.get(session.session_id, [])
        if any(context.get("client_id") == client_id for _conn, context in subscribers):
            self.publish(session, "watcher_left", {"client_id": client_id, "access": "write"})
            subscribers[:] = [s for s in subscribers if s[1].get("client_id") != client_id]

    def _stream_command(self, request, command, params, context, key):
        log = self.logs.setdefault(key, [])
        subscribers = self.subscribers.setdefault(key, [])
        if command == "unsubscribe":
            subscribers[:] = [s for s in subscribers if s[1] is not context]
            return success(request, unsubscribed=True)
        since = params.get("since")
        if command == "get_events":
            events = [e for e in log if e["seq"] > since][: params.get("limit", 100)]
            return success(request, events=events, last_seq=len(log), first_seq=1, truncated=False)
        replay = [e for e in log if since is not None and e["seq"] > since]
        for message in replay:
            self._send(context["conn"], context, message)
        subscribers.append((context["conn"], context))
        session = self.sessions.get(key)
        client_id = context.get("client_id")
        if session is not None and client_id != session.client_id:
            access = self.access_of(session, client_id)
            self.publish(session, "watcher_joined", {"client_id": client_id, "access": access})
        return success(
            request,
            stream="team" if key == TEAM else "session",
            session_id=None if key == TEAM else key,
            last_seq=len(log),
            first_seq=1,
            replayed=len(replay),
            truncated=False,
        )

    # -- evaluation with events, input() and a breakpoint ------------------------------

    def _evaluate_live(self, request, session, code, by):
        index = self.history.get(session.session_id, 0) + 1
        self.history[session.session_id] = index
        filename = f"<cell {index}>"
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        self.publish(
            session, "evaluation_started", {"history_index": index, "code": code, "by": by}
        )
        session.answers = queue.SimpleQueue()
        session.commands = queue.SimpleQueue()
        output = EventOutput(self, session, index)

        def ask(prompt="", password=False):
            output.flush()  # the prompt is not output: as the server, only in the event
            session.input_wanted = True
            data = {"history_index": index, "prompt": prompt, "password": password}
            self.publish(session, "input_requested", data)
            return session.answers.get(timeout=ANSWER_TIMEOUT)

        def pause_here(**frame_locals):
            lineno = sys_frame_line()
            self._paused(session, index, filename, lineno, code, frame_locals)

        session.namespace.update(
            input=ask,
            getpass=types.SimpleNamespace(getpass=lambda prompt="Password: ": ask(prompt, True)),
            pause_here=pause_here,
        )
        value, error = None, None
        try:
            tree = ast.parse(code)
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            with contextlib.redirect_stdout(output):
                exec(compile(tree, filename, "exec"), session.namespace)  # noqa: S102 - test fake
                if last is not None:
                    expression = ast.Expression(last.value)
                    value = eval(compile(expression, filename, "eval"), session.namespace)  # noqa: S307
        except Exception as exc:  # noqa: BLE001 - reported as the evaluation's error
            error = exc
        output.flush()
        captured = output.captured.getvalue()
        if error is not None:
            reply = failure(
                request,
                "EvaluationError",
                f"{type(error).__name__}: {error}",
                exception_type=type(error).__name__,
                message=str(error),
                traceback=[],
                output=captured,
                history_index=index,
            )
        else:
            reply = success(
                request,
                session_id=session.session_id,
                result=None if value is None else repr(value),
                output=captured,
                history_index=index,
            )
        finished = {
            "history_index": index,
            "ok": error is None,
            "result": None if value is None else repr(value),
            "error_type": None if error is None else "EvaluationError",
            "error": None if error is None else f"{type(error).__name__}: {error}",
            "by": by,
        }
        self.publish(session, "evaluation_finished", finished)
        return reply

    def _paused(self, session, index, filename, lineno, code, frame_locals):
        lines = code.splitlines()
        frame = {"index": 0, "file": filename, "function": "<module>"}
        session.paused_frame = dict(frame, line=lineno, code_line=lines[lineno - 1].strip())
        session.paused_locals = frame_locals
        data = {"history_index": index, "reason": "breakpoint", "breakpoint_id": "bp_1"}
        self.publish(session, "debug_paused", dict(data, frame=session.paused_frame))
        while True:
            operation, answer = session.commands.get(timeout=ANSWER_TIMEOUT)
            if operation == "continue" or session.paused_frame["line"] >= len(lines):
                session.paused_frame = None
                answer.put({"resumed": True} if operation == "continue" else {"finished": True})
                self.publish(session, "debug_resumed", {"history_index": index})
                return
            self.publish(session, "debug_resumed", {"history_index": index})  # each resume
            line = session.paused_frame["line"] + 1
            session.paused_frame = dict(frame, line=line, code_line=lines[line - 1].strip())
            data = {"history_index": index, "reason": "step", "breakpoint_id": None}
            self.publish(session, "debug_paused", dict(data, frame=session.paused_frame))
            answer.put({"paused_at": session.paused_frame})

    def _debug(self, request, session, command, params):
        frame = getattr(session, "paused_frame", None)
        if command == "debug_state":
            if frame is None:
                return success(request, paused=False)
            return success(request, paused=True, reason="breakpoint", frame=frame)
        if frame is None:
            return failure(request, "InvalidRequest", "not paused", paused=False)
        if command == "debug_stack":
            return success(request, frames=[frame])
        if command == "debug_evaluate":
            scope = dict(session.namespace, **session.paused_locals)
            value = eval(params["code"], scope)  # noqa: S307 - test fake
            return success(request, result=repr(value), output="")
        if command in ("debug_step", "debug_continue"):
            answer: queue.SimpleQueue = queue.SimpleQueue()
            session.commands.put(("continue" if command == "debug_continue" else "step", answer))
            result = answer.get(timeout=ANSWER_TIMEOUT)
            return success(request, session_id=session.session_id, **result)
        return failure(request, "UnknownCommand", command)


def sys_frame_line():
    """The line of the cell that called C{pause_here} (two frames up)."""
    return sys._getframe(2).f_lineno


@pytest.fixture
def state_dir(tmp_path):
    return tmp_path / "state"


@pytest.fixture
def live_server():
    server = LiveFakeServer().start()
    yield server
    server.stop()


def owner_client(server, state_dir):
    """Alice (the Python API) in a new session s_1, which she owns."""
    client = make_client(server, state_dir / "alice")
    client.connect()
    client.open_session()
    return client


def quit_child(child):
    send_line(child, ":quit")
    child.expect(pexpect.EOF)


def other_client(server, state_dir, session_id, client_id="bob"):
    """A second client (the Python API) working in C{session_id}, shared with it."""
    server.shares.setdefault(session_id, {})[client_id] = "write"
    client = make_client(server, state_dir / client_id)
    client.client_id = client_id
    client.connect()
    client.open_session(session_id=session_id, remember=False)
    return client


def in_background(function, *args):
    """Run C{function} in a thread; the returned list gets its result."""
    results: list = []
    thread = threading.Thread(target=lambda: results.append(function(*args)), daemon=True)
    thread.start()
    results_thread = types.SimpleNamespace(results=results, thread=thread)
    return results_thread


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


# -- pure pieces -------------------------------------------------------------------


def test_event_lines_say_who_did_what():
    def line(event, stream="session", **data):
        return format_event({"event": event, "stream": stream, "data": data}, own_client_id="me")

    assert line("evaluation_started", history_index=4, code="x = 1\ny = 2", by="bob") == (
        "[bob #4] >>> x = 1 …"
    )
    assert line("output", history_index=4, text="a\nb\n") == "[#4] a\n[#4] b"
    assert line("evaluation_finished", history_index=4, ok=True, result="42", by="bob") == (
        "[bob #4] = 42"
    )
    assert line(
        "evaluation_finished", history_index=5, ok=False, error_type="Timeout", error="slow", by="b"
    ) == ("[b #5] failed: Timeout: slow")
    assert "answer with :input" in line("input_requested", history_index=2, prompt="n? ")
    assert line("watcher_joined", client_id="bob", access="read") == (
        "[bob] is watching this session (read access)"
    )
    assert line("presence", "team", client_id="me", joined=True, connections=1) is None
    assert line("presence", "team", client_id="bob", joined=True, connections=1) == (
        "[team] bob connected (1 connection now)"
    )
    assert line("presence", "team", client_id="bob", joined=False, connections=0) == (
        "[team] bob disconnected (0 connections now)"
    )
    assert line("image_restarted", "team", pid=7, reason="killed").startswith("[team] the image")


def test_own_evaluations_are_recognised_and_streamed_output_not_repeated():
    own = OwnEvaluations()
    own.begin("s_1")
    assert not own.claim("s_1", 3, "bob", "alice")  # somebody else's, meanwhile
    assert own.claim("s_1", 4, "alice", "alice")
    assert own.is_current("s_1", 4) and not own.is_own("s_1", 3)
    own.streamed = "step 1\n"
    assert own.end(4) == "step 1\n"
    assert own.is_own("s_1", 4)  # a late event of it is still ours
    assert unstreamed_output("step 1\nstep 2\n", "step 1\n") == "step 2\n"
    assert unstreamed_output("x" * 10, "xx… [8 more characters]") == ""


def test_output_around_an_input_prompt_is_shown_once():
    """The reply's output has no prompt (the server sends it in the event only): what
    the events did not show after the question is still printed."""
    own = OwnEvaluations()
    own.begin("s_1")
    own.claim("s_1", 1, "alice", "alice")
    own.shown("a\n")
    own.asked()
    own.shown("b")
    streamed = own.end(1)
    reply = {"status": "success", "result": {"output": "a\nbc", "result": None}}
    shown, newline = without_streamed_output(reply, streamed, own.line_open)
    assert (shown["result"]["output"], newline) == ("c", False)


def test_a_plan_refusal_is_one_clear_line():
    from stui_twisted.client.formatting import format_error

    plan = {"error_type": "PermissionDenied", "error": "no debug in free"}
    plan["details"] = {"feature": "debug", "plan": "free"}
    assert format_error(plan).startswith("Refused by your plan: 'debug' is not a feature of plan")
    access = {"error_type": "PermissionDenied", "error": "read only"}
    access["details"] = {"access": "read", "command": "evaluate"}
    assert format_error(access).startswith(
        "Refused: you have read access to this session and 'evaluate' needs more"
    )


# -- the protocol client: order, gaps, reconnection ----------------------------------


def test_events_arrive_in_order_and_a_dropped_gap_is_filled(live_server, state_dir):
    client = make_client(live_server, state_dir)
    seen = []
    client.on_event = lambda message: seen.append(message["seq"])
    client.connect()
    client.open_session()
    session = live_server.sessions["s_1"]
    client.subscribe("s_1")
    assert client.evaluate("1 + 1")["status"] == "success"
    assert seen == [1, 2]  # evaluation_started, evaluation_finished
    for n in range(3):  # 3, 4, 5: logged but lost on the way
        live_server.publish(session, "state_updated", {"parts": [n]}, deliver=False)
    live_server.send_dropped("s_1", 3, 5)
    live_server.publish(session, "state_updated", {"parts": ["after"]})  # 6
    wait_until(lambda: (client.poll_events(), seen[-1:] == [6])[1])
    assert seen == [1, 2, 3, 4, 5, 6]
    assert "get_events" in live_server.commands()


def test_after_a_reconnection_it_catches_up_from_the_last_seq(live_server, state_dir):
    client = make_client(live_server, state_dir)
    seen = []
    client.on_event = lambda message: seen.append(message["seq"])
    client.connect()
    client.open_session()
    client.subscribe("s_1")
    client.evaluate("2")
    live_server.stop()
    session = live_server.sessions["s_1"]
    live_server.publish(session, "state_updated", {"parts": ["variables"]})  # 3, while away
    live_server.start()
    client.evaluate("3")
    subscribe = [r for r in live_server.requests if r["command"] == "subscribe"][-1]
    assert subscribe["parameters"]["since"] == 2
    assert seen == [1, 2, 3, 4, 5]


# -- the REPL in a pseudo-terminal -----------------------------------------------------


def test_live_line_of_another_client_keeps_what_the_user_types(live_server, state_dir):
    child = spawn_client(live_server, state_dir)
    child.expect(">>>")
    wait_until(lambda: live_server.subscribers.get("s_1"))
    child.send("6 * ")
    child.expect(r"6 \*")
    bob = other_client(live_server, state_dir, "s_1")
    assert bob.evaluate("'from bob'")["status"] == "success"
    child.expect(r"\[bob #1\] >>> 'from bob'")
    child.expect(r"\[bob #1\] = 'from bob'")
    send_line(child, "7")
    child.expect("42")
    child.expect(">>>")
    quit_child(child)


def test_own_output_streams_and_input_is_answered(live_server, state_dir):
    child = spawn_client(live_server, state_dir)
    child.expect(">>>")
    send_line(child, "print('before'); name = input('name? '); print('hi', name); 6 * 7")
    child.expect("before")
    child.expect("name\\? ")
    send_line(child, "bob")
    child.expect("hi bob")
    child.expect("42")
    child.expect(">>>")
    transcript = child.before
    assert "before" not in transcript  # printed once, as it streamed
    send_line(child, "secret = getpass.getpass('pw: '); len(secret)")
    child.expect("pw: ")
    send_line(child, "s3cret")
    child.expect("6")
    child.expect(">>>")
    assert "s3cret" not in child.before
    sent = [r["parameters"]["text"] for r in live_server.requests if r["command"] == "send_input"]
    assert sent == ["bob", "s3cret"]
    quit_child(child)


def test_our_input_prompt_ends_when_another_client_answers_it(live_server, state_dir):
    child = spawn_client(live_server, state_dir)
    child.expect(">>>")
    send_line(child, "input('n? ') * 2")
    wait_until(lambda: getattr(live_server.sessions["s_1"], "input_wanted", False))
    child.expect("n\\? ")
    bob = other_client(live_server, state_dir, "s_1")
    assert bob.result("send_input", {"session_id": "s_1", "text": "ab"}) == {"accepted": True}
    child.expect(r"\(answered by another client\)")
    child.expect("'abab'")
    assert child.before == "\r\n"  # no empty line: the prompt's line had ended
    child.expect(">>>")
    quit_child(child)


def test_input_of_another_clients_evaluation_is_answered_with_input(live_server, state_dir):
    child = spawn_client(live_server, state_dir)
    child.expect(">>>")
    wait_until(lambda: live_server.subscribers.get("s_1"))
    bob = other_client(live_server, state_dir, "s_1")
    running = in_background(bob.evaluate, "input('for alice: ')")
    child.expect("asks for input: 'for alice: '")
    send_line(child, ":input hello")
    running.thread.join(ANSWER_TIMEOUT)
    assert running.results[0]["result"]["result"] == "'hello'"
    child.expect(r"\[bob #1\] = 'hello'")
    quit_child(child)


@pytest.mark.parametrize("debug_events", [True, False], ids=["event", "polled"])
def test_paused_mode_with_pdb_keys(live_server, state_dir, debug_events):
    live_server.debug_events = debug_events
    child = spawn_client(live_server, state_dir)
    child.expect(">>>")
    send_line(child, "if 1:")
    send_line(child, "pause_here(n=3)")
    send_line(child, "m = 6")
    send_line(child, "")
    child.expect(r"Paused \(breakpoint")
    child.expect(r"> <cell 1>\(2\)<module>\(\)")
    child.expect(r"\(Pdb\)")
    send_line(child, "p n * 14")
    child.expect("42")
    send_line(child, "w")
    child.expect(r"> <cell 1>\(2\)")
    send_line(child, "l")
    child.expect(r"   1    if 1:")
    child.expect(r"   2 ->     pause_here\(n=3\)")
    child.expect(r"   3        m = 6")
    send_line(child, "n")
    child.expect(r"> <cell 1>\(3\)<module>\(\)\s+-> m = 6\s+")
    assert "Paused" not in child.before  # the step's own resume and pause are no new pause
    child.expect(r"\(Pdb\)")
    send_line(child, "c")
    child.expect(">>>")
    send_line(child, "m")
    child.expect("6")
    child.expect(">>>")
    debug = [r["command"] for r in live_server.requests if r["command"].startswith("debug_")]
    assert ("debug_state" in debug) is not debug_events
    assert {"debug_evaluate", "debug_stack", "debug_step", "debug_continue"} <= set(debug)
    quit_child(child)


def test_a_pause_of_another_clients_evaluation_takes_over_the_prompt(live_server, state_dir):
    child = spawn_client(live_server, state_dir)
    child.expect(">>>")
    wait_until(lambda: live_server.subscribers.get("s_1"))
    child.send("x = ")  # being typed when the pause comes: kept for the >>> prompt
    child.expect("x =")
    bob = other_client(live_server, state_dir, "s_1")
    running = in_background(bob.evaluate, "pause_here(k=41)")
    child.expect(r"\[#1\] paused \(breakpoint bp_1\)")
    child.expect(r"\(Pdb\)")
    send_line(child, "p k + 1")
    child.expect("42")
    send_line(child, "c")
    running.thread.join(ANSWER_TIMEOUT)
    assert running.results[0]["status"] == "success"
    child.expect(">>>")
    send_line(child, "5")  # completes "x = 5"
    child.expect(">>>")
    send_line(child, "x * 2")
    child.expect("10")
    child.expect(">>>")
    quit_child(child)


def test_sharing_whoami_and_refusals(live_server, state_dir):
    live_server.features.discard("debug")
    child = spawn_client(live_server, state_dir)
    child.expect(">>>")
    send_line(child, ":share bob read")
    child.expect(r"Session s_1 shared with bob \(read\)\. Shares: bob \(read\)")
    child.expect(">>>")
    send_line(child, ":whoami")
    child.expect(r"plan +free")
    child.expect(">>>")
    send_line(child, ":break f")
    child.expect("Refused by your plan: 'debug' is not a feature of plan 'free'")
    child.expect(">>>")
    bob = make_client(live_server, state_dir / "bob")
    bob.client_id = "bob"
    bob.connect()
    bob.subscribe("s_1")
    child.expect(r"\[bob\] is watching this session \(read access\)")
    send_line(child, ":unshare bob")
    child.expect("no longer shared with bob. It is shared with nobody.")
    child.expect(">>>")
    quit_child(child)


def test_shared_attaches_and_a_reader_is_refused_evaluation(live_server, state_dir):
    owner_client(live_server, state_dir)
    live_server.shares["s_1"] = {"bob": "read"}
    child = spawn_client(live_server, state_dir / "bob-state", "--client-id", "bob")
    child.expect(">>>")
    send_line(child, ":shared")
    child.expect(r"1  s_1  owner alice  read access")
    child.expect(">>>")
    send_line(child, ":shared 1")
    child.expect(r"Attached to alice's session \(read access\)")
    child.expect(">>>")
    send_line(child, "1 + 1")
    child.expect("Refused: you have read access to this session and 'evaluate' needs more")
    child.expect(">>>")
    send_line(child, ":detach")
    child.expect("Session s_2 restored")
    child.expect(">>>")
    quit_child(child)


def test_commands_in_a_shared_session_name_who_acts(live_server, state_dir):
    """With auth off a request's C{client_id} is who acts (access.md §1): without it
    bob's commands in alice's session would act as her, and C{list_shared_sessions}
    is refused."""
    owner_client(live_server, state_dir)
    bob = other_client(live_server, state_dir, "s_1")
    bob.evaluate("1 + 1")
    bob.call("list_shared_sessions")
    bob.call("ping")
    assert [r["parameters"].get("client_id") for r in live_server.requests[-3:]] == ["bob"] * 3
    assert live_server.requests[-3]["command"] == "evaluate"


def test_watch_ends_when_the_share_is_taken_away(live_server, state_dir):
    alice = owner_client(live_server, state_dir)
    live_server.shares["s_1"] = {"bob": "read"}
    watcher = spawn_client(live_server, state_dir / "bob", "--client-id", "bob", "--watch", "s_1")
    watcher.expect(r"live from seq \d+")
    alice.call("unshare_session", {"session_id": "s_1", "with": "bob"})
    watcher.expect("The session is no longer shared with you.")
    watcher.expect(pexpect.EOF)
    watcher.close()
    assert watcher.exitstatus == 0


def test_an_attached_session_that_is_unshared_goes_back_to_our_own(live_server, state_dir):
    alice = owner_client(live_server, state_dir)
    live_server.shares["s_1"] = {"bob": "write"}
    child = spawn_client(live_server, state_dir / "bob-state", "--client-id", "bob")
    child.expect(">>>")
    send_line(child, ":shared 1")
    child.expect("Attached to alice's session")
    child.expect(">>>")
    wait_until(lambda: len(live_server.subscribers.get("s_1", [])) == 1)
    alice.call("unshare_session", {"session_id": "s_1", "with": "bob"})
    child.expect("Session s_1 is no longer shared with you.")
    child.expect("Session s_2 restored.")
    send_line(child, "1 + 1")
    child.expect("2")
    child.expect(">>>")
    assert "New session" not in child.before
    quit_child(child)


def attached_bob(server, state_dir):
    """Bob (the Python API) with his own s_2, remembered, attached to alice's s_1."""
    owner_client(server, state_dir)  # alice's s_1
    server.shares["s_1"] = {"bob": "write"}
    bob = make_client(server, state_dir / "bob")
    bob.client_id = "bob"
    bob.connect()
    bob.open_session()
    bob.open_session(session_id="s_1", remember=False)
    return bob


def test_an_evaluation_in_a_shared_session_gone_runs_in_our_own(live_server, state_dir):
    bob = attached_bob(live_server, state_dir)
    live_server.shares["s_1"] = {}  # unshared while bob follows no events
    assert bob.evaluate("1 + 1")["result"]["result"] == "2"
    assert bob.session_id == "s_2"
    assert bob.notes[-1] == (
        "Session s_1 is not shared with you any more (or is gone). Session s_2 restored."
    )


def test_leaving_a_shared_session_keeps_our_own_remembered(live_server, state_dir):
    bob = attached_bob(live_server, state_dir)
    bob.forget_session()  # e.g. the shared session is gone
    assert ClientState(state_dir / "bob").last_session(live_server.url, "bob") == "s_2"


def test_the_repl_shows_what_happened_while_it_was_reconnecting(live_server, state_dir):
    child = spawn_client(live_server, state_dir)
    child.expect(">>>")
    wait_until(lambda: live_server.subscribers.get("s_1"))
    live_server.stop()
    session = live_server.sessions["s_1"]
    data = {"history_index": 7, "ok": True, "result": "'while away'", "by": "bob"}
    live_server.publish(session, "evaluation_finished", data)
    live_server.start()
    child.expect("Reconnected to")
    child.expect(r"\[bob #7\] = 'while away'")
    subscribe = [r for r in live_server.requests if r["command"] == "subscribe"][-1]
    assert subscribe["parameters"]["since"] == 0
    quit_child(child)


def test_watch_follows_a_session_read_only_until_it_closes(live_server, state_dir):
    alice = owner_client(live_server, state_dir)
    alice.evaluate("print('early')")
    watcher = spawn_client(live_server, state_dir, "--watch", "s_1", "--since", "0")
    watcher.expect(r"Watching session s_1 read-only")
    watcher.expect(r"\[#1\] early")  # replayed from the log
    watcher.expect(r"live from seq \d+")
    alice.evaluate("for i in range(2): print('line', i)")
    watcher.expect(r"\[alice #2\] >>> for i in range\(2\): print\('line', i\)")
    watcher.expect(r"\[#2\] line 0")
    watcher.expect(r"\[#2\] line 1")
    alice.call("close_session")
    watcher.expect("The session was closed.")
    watcher.expect(pexpect.EOF)
    watcher.close()
    assert watcher.exitstatus == 0
    evaluations = [r for r in live_server.requests if r["command"] == "evaluate"]
    assert len(evaluations) == 2  # alice's two; the watcher evaluates nothing


def test_watch_refused_exits_two(live_server, state_dir, capsys):
    status, out, err = run_main([live_server.url, "--watch", "s_404"], capsys)
    assert status == 2 and "SessionNotFound" in err


def test_eval_streams_output_once_and_answers_input_from_stdin(
    live_server, state_dir, capsys, monkeypatch
):
    monkeypatch.setattr("sys.stdin", io.StringIO("bob\n"))
    argv = [live_server.url, "--state-dir", str(state_dir), "--client-id", "alice"]
    code = "print('a'); n = input('n? '); print('got', n); n * 2"
    status, out, err = run_main([*argv, "-e", code], capsys)
    assert (status, out, err) == (0, "a\nn? got bob\n'bobbob'\n", "")
    assert [
        r["parameters"]["text"] for r in live_server.requests if r["command"] == "send_input"
    ] == ["bob"]
    monkeypatch.setattr("sys.stdin", io.StringIO("eve\n"))
    status, out, err = run_main([*argv, "--json", "-e", "input('who? ')"], capsys)
    assert status == 0 and err == "who? "
    assert json.loads(out)["result"]["result"] == "'eve'"
