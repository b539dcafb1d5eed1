"""End to end: ``load_context`` goes back to the last ``save_context`` (issues 12.6, 13.16).

Under ``batch`` the session file follows every change within a flush
interval; what ``save_context`` saved is kept beside it, so ``load_context``
(``:load`` in stui-client) returns exactly that, also after a restart.
"""

from __future__ import annotations

import time

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.image]


def _wait_until_clean(client, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        summary = client.result("get_context_summary")
        if not summary["dirty"]:
            return summary
        assert time.monotonic() < deadline, summary
        time.sleep(0.05)


def test_load_context_returns_the_last_save_not_the_last_flush(tmp_path, start_server):
    server = start_server(tmp_path, "--durability=batch", "--flush-interval=0.1")
    client = server.tcp_client()
    sid = client.result("create_session", client_id="alice")["session_id"]
    client.result("evaluate", code="keep = 1")
    saved = client.result("save_context")
    # One write, one timestamp, everywhere.
    assert client.result("get_context_summary")["last_saved_at"] == saved["saved_at"]
    client.result("evaluate", code="tmp = 1\nkeep = 2")
    _wait_until_clean(client)  # the flush has written tmp and keep = 2
    loaded = client.result("load_context")
    assert loaded["saved_at"] == saved["saved_at"]
    names = {v["name"] for v in loaded["context"]["workspace_context"]["variables"]}
    assert names == {"keep"}
    assert client.result("evaluate", code="keep")["result"] == "1"
    assert client.call("evaluate", code="tmp")["error_type"] == "EvaluationError"
    # Cells keep their own numbers after going back.
    history_index = client.result("evaluate", code="keep")["history_index"]
    assert history_index == 5, history_index  # 1, 2 before the load; 3, 4 after
    client.result("evaluate", code="tmp = 3")
    _wait_until_clean(client)
    assert server.stop() == 0
    server.start()
    client = server.tcp_client()
    client.result("restore_session", session_id=sid)
    assert client.result("evaluate", code="tmp")["result"] == "3"
    again = client.result("load_context")
    assert again["saved_at"] == saved["saved_at"]
    assert client.call("evaluate", code="tmp")["error_type"] == "EvaluationError"


def test_load_context_before_any_save_names_save_context(tmp_path, start_server):
    server = start_server(tmp_path, image=False, zmq=False)
    client = server.tcp_client()
    client.result("create_session", client_id="alice")
    reply = client.call("load_context")
    assert reply["error_type"] == "InvalidRequest", reply
    assert "save_context" in reply["error"]
