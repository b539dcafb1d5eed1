"""The session debugger against a real server and image (debugger.md)."""

from __future__ import annotations

import json
import time

import pytest

from tests.e2e.test_e2e_events import EventClient
from tests.serverproc import ServerProcess

DEFINE = "def f(x):\n    y = x + 1\n    z = y * 2\n    return z\n"


def send(client, command: str, request_id: str, **parameters) -> None:
    message = {"id": request_id, "command": command, "parameters": parameters}
    client.send_raw(json.dumps(message).encode() + b"\n")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One real server for the module (each test makes its own sessions)."""
    server = ServerProcess(tmp_path_factory.mktemp("debugger")).start()
    yield server
    server.kill()


def wait_paused(driver, session_id: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = driver.result("debug_state", session_id=session_id)
        if state["paused"]:
            return state
        time.sleep(0.05)
    raise AssertionError(f"session {session_id} never paused")


def test_breakpoint_pauses_one_session_step_evaluate_continue_restart(server):
    runner, driver, other = server.tcp_client(), server.tcp_client(), server.tcp_client()
    a = driver.result("create_session", client_id="alice")["session_id"]
    b = other.result("create_session", client_id="bob")["session_id"]
    driver.result("evaluate", session_id=a, code=DEFINE)
    other.result("evaluate", session_id=b, code=DEFINE)
    bp = driver.result("set_breakpoint", session_id=a, function="f")
    assert bp["breakpoint_id"] == "bp_1" and bp["verified"] is True

    send(runner, "evaluate", "paused-eval", session_id=a, code="f(10)")
    state = wait_paused(driver, a)
    assert state["reason"] == "breakpoint" and state["breakpoint_id"] == "bp_1"
    # session B runs normally, even calling the same function
    assert other.result("evaluate", session_id=b, code="f(1)")["result"] == "4"

    frames = driver.result("debug_stack", session_id=a)["frames"]
    assert [(f["function"], f["line"]) for f in frames][:2] == [("f", 2), ("<module>", 1)]
    assert frames[0]["code_line"] == "y = x + 1"
    variables = driver.result("debug_locals", session_id=a)["variables"]
    assert [(v["name"], v["repr"]) for v in variables] == [("x", "10")]
    inspected = driver.result("inspect", session_id=a, object_id=variables[0]["object_id"])
    assert "10" in json.dumps(inspected)

    stepped = driver.result("debug_step", session_id=a, mode="over")
    assert stepped["paused_at"]["line"] == 3 and stepped["paused_at"]["code_line"] == "z = y * 2"
    assert driver.result("debug_evaluate", session_id=a, code="y")["result"] == "11"
    driver.result("debug_evaluate", session_id=a, code="y = 100")
    assert driver.result("debug_continue", session_id=a)["resumed"] is True
    reply = runner.read_reply()
    assert reply["id"] == "paused-eval" and reply["status"] == "success", reply
    assert reply["result"]["result"] == "200"
    not_paused = driver.call("debug_stack", session_id=a)
    assert not_paused["status"] == "error"
    assert not_paused["details"]["paused"] is False

    # the breakpoint is saved with the session and hits again after a restart
    for client in (runner, driver, other):
        client.close()
    server.stop()
    server.start()
    runner, driver = server.tcp_client(), server.tcp_client()
    listed = driver.result("list_breakpoints", session_id=a)["breakpoints"]
    assert [(x["breakpoint_id"], x["function"]) for x in listed] == [("bp_1", "f")]
    send(runner, "evaluate", "again", session_id=a, code="f(2)")
    assert wait_paused(driver, a)["breakpoint_id"] == "bp_1"
    # interrupt ends a paused evaluation
    assert driver.result("interrupt", session_id=a)["interrupted"] is True
    reply = runner.read_reply()
    assert reply["id"] == "again" and reply["error_type"] == "Interrupted", reply
    assert driver.result("remove_breakpoint", session_id=a, breakpoint_id="bp_1")["removed"]
    assert driver.result("evaluate", session_id=a, code="f(2)")["result"] == "6"


def test_post_mortem_shows_the_failing_frame(server):
    client = server.tcp_client()
    s = client.result("create_session", client_id="alice")["session_id"]
    client.result("evaluate", session_id=s, code="def g(n):\n    q = n * 5\n    return q / 0\n")
    failed = client.call("evaluate", session_id=s, code="g(3)")
    assert failed["error_type"] == "EvaluationError"
    state = client.result("debug_post_mortem", session_id=s)
    assert state["reason"] == "exception" and state["frame"]["function"] == "g"
    variables = client.result("debug_locals", session_id=s)["variables"]
    assert {v["name"]: v["repr"] for v in variables} == {"n": "3", "q": "15"}
    assert client.result("debug_evaluate", session_id=s, code="q + n")["result"] == "18"
    bad = client.call("debug_evaluate", session_id=s, code="x = p n")  # a syntax error
    assert (bad["error_type"], bad["details"]["exception_type"]) == (
        "EvaluationError",
        "SyntaxError",
    ), bad
    assert client.result("debug_continue", session_id=s)["resumed"] is True
    assert client.call("debug_locals", session_id=s)["details"]["paused"] is False


def test_pause_and_resume_events_time_limit_and_activity(server):
    """debug_paused / debug_resumed reach a subscriber; a pause left alone for longer
    than the time limit plus the kill grace is not killed as stuck; debugger
    commands are session activity."""
    runner, driver = server.tcp_client(), server.tcp_client()
    watcher = EventClient(server.tcp_client())
    s = driver.result("create_session", client_id="alice")["session_id"]
    watcher.result("subscribe", session_id=s, client_id="alice")
    driver.result("evaluate", session_id=s, code=DEFINE)
    driver.result("set_breakpoint", session_id=s, function="f")
    send(runner, "evaluate", "limited", session_id=s, code="f(1)", timeout=1)
    paused = watcher.wait_event("debug_paused")["data"]
    frame = paused.pop("frame")
    assert paused == {"history_index": 2, "reason": "breakpoint", "breakpoint_id": "bp_1"}
    assert frame["file"].startswith("<cell 1|")
    assert (frame["function"], frame["line"], frame["code_line"]) == ("f", 2, "y = x + 1")
    # 1 s time limit + 2 s kill grace: nothing is sent for longer than both
    time.sleep(4.0)
    before = driver.result("get_session_info", session_id=s)["last_activity"]
    time.sleep(1.1)
    stepped = driver.result("debug_step", session_id=s, mode="over")
    after = driver.result("get_session_info", session_id=s)["last_activity"]
    assert after > before
    assert stepped["paused_at"]["line"] == 3
    resumed = watcher.wait_event("debug_resumed")["data"]
    assert resumed == {"history_index": 2, "action": "step", "mode": "over"}
    paused = watcher.wait_event("debug_paused")["data"]
    assert (paused["reason"], paused["breakpoint_id"], paused["frame"]["line"]) == ("step", None, 3)
    driver.result("debug_continue", session_id=s)
    reply = runner.read_reply()
    assert reply["id"] == "limited" and reply["status"] == "success", reply
    assert reply["result"]["result"] == "4"
    resumed = watcher.wait_event("debug_resumed")
    watcher.wait_event("evaluation_finished")  # of the definition
    finished = watcher.wait_event("evaluation_finished")
    assert finished["data"]["history_index"] == 2
    assert resumed["data"] == {"history_index": 2, "action": "continue", "mode": None}
    assert resumed["seq"] < finished["seq"]
    # post-mortem: paused on the exception of the failed evaluation, then left
    driver.result("remove_breakpoint", session_id=s, breakpoint_id="bp_1")
    failed = driver.call("evaluate", session_id=s, code="f(None)")
    driver.result("debug_post_mortem", session_id=s)
    paused = watcher.wait_event("debug_paused")["data"]
    assert (paused["history_index"], paused["reason"]) == (
        failed["details"]["history_index"],
        "exception",
    )
    assert paused["frame"]["function"] == "f"
    driver.result("debug_continue", session_id=s)
    assert watcher.wait_event("debug_resumed")["data"]["action"] == "continue"


def format_a(client, request_type: str, params: dict, request_id: str) -> None:
    message = {
        "id": request_id,
        "version": "1.0.0",
        "timestamp": "2026-12-01T10:00:00Z",
        "payload": {"type": "Request", "data": {"request_type": request_type, "params": params}},
    }
    client.send_raw(json.dumps(message).encode() + b"\n")


def format_a_data(client, request_type: str, params: dict, request_id: str) -> dict:
    format_a(client, request_type, params, request_id)
    reply = client.read_reply()
    assert reply["id"] == request_id, reply
    body = reply["payload"]["data"]
    assert body["response_type"] != "Error", body
    return body["data"]


def test_format_a_debug(server):
    runner, driver = server.tcp_client(), server.tcp_client()
    s = driver.result("create_session", client_id="alice")["session_id"]
    index = driver.result("evaluate", session_id=s, code=DEFINE)["history_index"]
    placed = format_a_data(
        driver,
        "Debug",
        {"operation": {"SetBreakpoint": {"file": f"cell:{index}", "line": 3}}, "context": s},
        "a-1",
    )
    assert placed["breakpoint_id"] == "bp_1" and "bp_1" in placed["result"]
    send(runner, "evaluate", "paused", session_id=s, code="f(4)")
    wait_paused(driver, s)
    stack = format_a_data(driver, "Debug", {"operation": "GetStackTrace", "context": s}, "a-2")
    assert stack["debug_info"]["current_line"] == "3"
    assert stack["debug_info"]["current_method"] == "f"
    local_vars = format_a_data(driver, "Debug", {"operation": "GetLocalVars", "context": s}, "a-3")
    assert local_vars["debug_info"]["local_vars"] == {"x": "4", "y": "5"}
    format_a_data(driver, "Debug", {"operation": "Continue", "context": s}, "a-4")
    reply = runner.read_reply()
    assert reply["id"] == "paused" and reply["result"]["result"] == "10", reply
    removed = format_a_data(
        driver,
        "Debug",
        {"operation": {"RemoveBreakpoint": {"file": f"cell:{index}", "line": 3}}, "context": s},
        "a-5",
    )
    assert removed["removed"] is True


def test_an_image_death_while_paused_ends_the_evaluation_with_image_restarted(server):
    import os
    import signal

    runner, driver = server.tcp_client(), server.tcp_client()
    s = driver.result("create_session", client_id="alice")["session_id"]
    driver.result("evaluate", session_id=s, code=DEFINE)
    driver.result("set_breakpoint", session_id=s, function="f")
    send(runner, "evaluate", "doomed", session_id=s, code="f(1)")
    wait_paused(driver, s)
    os.kill(driver.result("ping")["image"]["pid"], signal.SIGKILL)
    reply = runner.read_reply()
    assert reply["id"] == "doomed" and reply["error_type"] == "ImageRestarted", reply
    # the breakpoint is restored into the new image and hits again
    send(runner, "evaluate", "again", session_id=s, code="f(2)")
    assert wait_paused(driver, s)["breakpoint_id"] == "bp_1"
    driver.result("debug_continue", session_id=s)
    assert runner.read_reply()["result"]["result"] == "6"
