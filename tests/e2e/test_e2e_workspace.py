"""End to end: a session's live workspace survives restarts, kill -9 and image crashes."""

from __future__ import annotations

import json
import threading
import time

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.image]

SETUP = (
    "import datetime, collections; d = {'n': 1}; when = datetime.date(2026, 1, 2); "
    "c = collections.Counter('aab')"
)
CHECK = "d == {'n': 1} and when == datetime.date(2026, 1, 2) and c == collections.Counter('aab')"


def evaluate(client, code, **extra):
    return client.call("evaluate", code=code, **extra)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One real server with its image for the tests that neither restart it nor kill its
    image; each of them uses client ids of its own."""
    from tests.serverproc import ServerProcess

    server = ServerProcess(tmp_path_factory.mktemp("workspace")).start()
    yield server
    server.kill()


@pytest.mark.parametrize("how", ["sigterm", "kill9"])
def test_bindings_and_history_survive_a_server_restart(tmp_path, how, start_server):
    args = ("--durability=always",) if how == "kill9" else ()
    server = start_server(tmp_path, *args)
    client = server.tcp_client()
    sid = client.result("create_session", client_id="alice")["session_id"]
    assert client.result("evaluate", code="import datetime, collections")["has_error"] is False
    client.result("evaluate", code="d = {'n': 1}; when = datetime.date(2026, 1, 2)")
    client.result("evaluate", code="c = collections.Counter('aab')")
    if how == "sigterm":
        assert server.stop() == 0
    else:
        server.kill()
    server.start()
    client = server.tcp_client()
    restored = client.result("restore_session", session_id=sid)
    assert {"d", "when", "c"} <= set(restored["restored_bindings"])
    assert restored["unrestorable_bindings"] == []
    history = restored["workspace_context"]["history"]
    assert [h["code"] for h in history] == [
        "import datetime, collections",
        "d = {'n': 1}; when = datetime.date(2026, 1, 2)",
        "c = collections.Counter('aab')",
    ]
    assert [h["index"] for h in history] == [1, 2, 3]
    assert client.result("evaluate", code=CHECK)["result"] == "True"


def test_unrestorable_binding_is_reported_and_nothing_else_is_lost(tmp_path, start_server):
    server = start_server(tmp_path)
    client = server.tcp_client()
    sid = client.result("create_session", client_id="alice")["session_id"]
    client.result("evaluate", code=SETUP)
    client.result("evaluate", code="import socket; s = socket.socket()")
    assert server.stop() == 0
    server.start()
    client = server.tcp_client()
    restored = client.result("restore_session", session_id=sid)
    unrestorable = {u["name"]: u for u in restored["unrestorable_bindings"]}
    assert set(unrestorable) == {"s"}
    assert unrestorable["s"]["type"] == "socket"
    assert unrestorable["s"]["reason"]
    assert client.result("evaluate", code=CHECK)["result"] == "True"


def test_image_crash_restores_every_session_without_client_action(tmp_path, start_server):
    server = start_server(tmp_path)
    a, b = server.tcp_client(), server.tcp_client()
    a.result("create_session", client_id="alice")
    b.result("create_session", client_id="bob")
    a.result("evaluate", code=SETUP)
    b.result("evaluate", code="y = [1, 2, 3]")
    old_pid = a.result("ping")["image"]["pid"]
    crash = evaluate(a, "import os; os._exit(1)")
    assert crash["error_type"] == "ImageRestarted"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        image = b.result("ping")["image"]
        if image["status"] == "running" and image["pid"] != old_pid:
            break
        time.sleep(0.05)
    assert image["pid"] != old_pid
    # No restore_session: the server re-materialized both sessions itself.
    assert a.result("evaluate", code=CHECK)["result"] == "True"
    assert b.result("evaluate", code="y")["result"] == "[1, 2, 3]"


def test_a_spinning_session_blocks_nobody_and_interrupt_stops_it(server):
    a, b, pinger = server.tcp_client(), server.tcp_client(), server.tcp_client()
    a.result("create_session", client_id="spinner")
    b.result("create_session", client_id="bystander")
    b.result("evaluate", code="1+1")  # warm
    replies: list[dict] = []
    spinner = threading.Thread(target=lambda: replies.append(evaluate(a, "while True: pass")))
    spinner.start()
    time.sleep(0.3)
    started = time.perf_counter()
    assert pinger.result("ping")["message"] == "pong"
    ping_ms = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    assert b.result("evaluate", code="1+1")["result"] == "2"
    eval_ms = (time.perf_counter() - started) * 1000
    assert ping_ms < 100, ping_ms
    assert eval_ms < 100, eval_ms
    stopper = server.tcp_client()
    started = time.perf_counter()
    interrupted = stopper.call("interrupt", session_id=_current(server, "spinner"))
    assert interrupted["result"]["interrupted"] is True
    spinner.join(5)
    assert not spinner.is_alive()
    assert time.perf_counter() - started < 1.0
    assert replies[0]["error_type"] == "Interrupted"
    assert a.result("evaluate", code="6 * 7")["result"] == "42"


def _current(server, client_id):
    listed = server.tcp_client().result("list_client_sessions", client_id=client_id)
    return listed["sessions"][0]["session_id"]


def test_sessions_have_private_workspaces_and_one_shared_namespace(server):
    a, b = server.tcp_client(), server.tcp_client()
    a.result("create_session", client_id="private-a")
    b.result("create_session", client_id="private-b")
    first = a.result("evaluate", code="x = 41 + 1")
    assert first["result"] is None
    got = a.result("evaluate", code="x")
    assert got["result"] == "42" and got["object_id"].startswith("obj_")
    assert b.call("evaluate", code="x")["details"]["exception_type"] == "NameError"
    a.result("evaluate", code="shared.team = 'ok'")
    assert b.result("evaluate", code="shared.team")["result"] == "'ok'"
    inspected = a.result("inspect", expression="[1, {'a': 2}]")
    child = inspected["items"][1]
    assert child["object_id"]
    deeper = a.result("inspect", object_id=child["object_id"])
    assert deeper["class_name"] == "dict"
    assert a.result("get_context_summary")["inspector"]["selected_object"] == child["object_id"]


def test_edited_pickle_is_never_unpickled(tmp_path, start_server):
    """A session file whose pickle was edited fails its MAC: .bak is used, the file quarantined."""
    server = start_server(tmp_path, "--durability=always")
    client = server.tcp_client()
    sid = client.result("create_session", client_id="alice")["session_id"]
    client.result("evaluate", code="t = (1, 2)")  # a tuple is stored as a pickle
    client.result("evaluate", code="t = (3, 4)")
    assert server.stop() == 0
    (path,) = list((server.data_dir / "sessions").rglob(f"{sid}.json"))
    document = json.loads(path.read_text())
    binding = document["session"]["bindings"]["t"]
    assert binding["encoding"] == "pickle"
    import base64
    import pickle

    class Boom:
        def __reduce__(self):
            return (eval, ("__import__('pathlib').Path('PWNED').touch()",))

    binding["data"] = base64.b64encode(pickle.dumps(Boom())).decode()
    path.write_text(json.dumps(document))
    server.start()
    client = server.tcp_client()
    client.result("restore_session", session_id=sid)
    assert client.result("evaluate", code="t")["result"] == "(1, 2)"  # from .bak
    assert not list(tmp_path.rglob("PWNED"))
    assert list((server.data_dir / "quarantine").iterdir())


def test_functions_classes_and_instances_survive_a_restart(tmp_path, start_server):
    server = start_server(tmp_path)
    client = server.tcp_client()
    sid = client.result("create_session", client_id="alice")["session_id"]
    client.result(
        "evaluate",
        code="class Point:\n    def __init__(self, x):\n        self.x = x\n"
        "def double(p):\n    return Point(p.x * 2)\n"
        "pts = [Point(1), Point(2)]",
    )
    assert server.stop() == 0
    server.start()
    client = server.tcp_client()
    restored = client.result("restore_session", session_id=sid)
    assert {"Point", "double", "pts"} <= set(restored["restored_bindings"])
    result = client.result("evaluate", code="[double(p).x for p in pts], type(pts[0]) is Point")
    assert result["result"] == "([2, 4], True)"


def test_restoring_a_live_session_keeps_objects_that_cannot_be_stored(server):
    first = server.tcp_client()
    sid = first.result("create_session", client_id="live")["session_id"]
    first.result("evaluate", code="import socket; s = socket.socket(); f = lambda: 5")
    second = server.tcp_client()
    restored = second.result("restore_session", session_id=sid)
    assert {"s", "f", "socket"} <= set(restored["restored_bindings"])
    assert restored["unrestorable_bindings"] == []
    assert second.result("evaluate", code="f(), s.fileno() >= 0")["result"] == "(5, True)"


def test_load_context_of_an_empty_save_empties_a_live_namespace(tmp_path, start_server):
    server = start_server(tmp_path, "--durability=none")
    client = server.tcp_client()
    client.result("create_session", client_id="alice")
    client.result("save_context")  # saved while empty
    client.result("evaluate", code="x = 1")
    loaded = client.result("load_context")
    assert loaded["context"]["workspace_context"]["variables"] == []
    assert client.call("evaluate", code="x")["details"]["exception_type"] == "NameError"


def test_tracebacks_name_cells_by_the_sessions_history_index_across_restarts(
    tmp_path, start_server
):
    server = start_server(tmp_path)
    client, other = server.tcp_client(), server.tcp_client()
    sid = client.result("create_session", client_id="alice")["session_id"]
    other.result("create_session", client_id="bob")
    for code in ("a = 1", "def f():\n    return 1 / 0\n"):
        client.result("evaluate", code=code)
        other.result("evaluate", code=code)  # cells of another session in the same image
    client.result("evaluate", code="b = 2")
    failed = evaluate(client, "f()")
    assert failed["details"]["history_index"] == 4
    lines = failed["details"]["traceback"]
    assert '  File "<cell 4>", line 1, in <module>' in lines, lines
    assert '  File "<cell 2>", line 2, in f' in lines, lines
    assert server.stop() == 0
    server.start()
    client = server.tcp_client()
    client.result("restore_session", session_id=sid)
    again = evaluate(client, "1 / 0")
    assert again["details"]["history_index"] == 5
    assert '  File "<cell 5>", line 1, in <module>' in again["details"]["traceback"]
    # f was restored from its stored definition: still cell 2, line 2.
    restored = evaluate(client, "f()")["details"]["traceback"]
    assert '  File "<cell 6>", line 1, in <module>' in restored, restored
    assert '  File "<cell 2>", line 2, in f' in restored, restored
    assert "    return 1 / 0" in restored


def test_lone_surrogates_in_code_and_bindings_are_kept_saved_and_restored(tmp_path, start_server):
    server = start_server(tmp_path)
    client = server.tcp_client()
    sid = client.result("create_session", client_id="alice")["session_id"]
    broken = evaluate(client, "z = 'ok\ud800'")  # sent as the JSON escape \\ud800
    assert broken["error_type"] == "EvaluationError", broken  # Python source cannot hold it
    assert broken["details"]["history_index"] == 1
    client.result("evaluate", code="y = 'ok' + chr(0xd800)")
    shown = client.result("evaluate", code="print(y)\ny", mode="display")
    assert shown["display"] == "ok\ud800" and shown["output"] == "ok\ud800\n"
    assert shown["result"] == "'ok\\ud800'"
    assert client.result("save_context")["saved"] is True
    assert server.stop() == 0
    server.start()
    client = server.tcp_client()
    restored = client.result("restore_session", session_id=sid)
    assert "y" in restored["restored_bindings"] and restored["unrestorable_bindings"] == []
    history = restored["workspace_context"]["history"]
    assert [entry["code"] for entry in history[:2]] == [
        "z = 'ok\ud800'",
        "y = 'ok' + chr(0xd800)",
    ]
    assert client.result("evaluate", code="y == 'ok' + chr(0xd800)")["result"] == "True"
    assert client.result("save_context")["saved"] is True


def test_pipelined_evaluations_name_their_cells_by_their_own_history_index(server):
    client = server.tcp_client()
    client.result("create_session", client_id="pipelined")
    client.result("evaluate", code="import time")
    codes = ["time.sleep(0.3); 1 / 0", "1 / 0", "1 / 0"]
    for number, code in enumerate(codes):
        request = {"id": f"p-{number}", "command": "evaluate", "parameters": {"code": code}}
        client.send_raw(json.dumps(request).encode() + b"\n")  # all sent before any ends
    replies = sorted((client.read_reply() for _ in codes), key=lambda reply: reply["id"])
    for reply in replies:
        index = reply["details"]["history_index"]
        assert f'  File "<cell {index}>", line 1, in <module>' in reply["details"]["traceback"], (
            reply
        )
    assert [reply["details"]["history_index"] for reply in replies] == [2, 3, 4]
