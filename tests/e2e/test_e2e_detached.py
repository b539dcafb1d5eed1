"""End to end: evaluations that outlive their connection, and input() (events.md §4-§5).

One real server for the module; the restarts come last.
"""

from __future__ import annotations

import json
import time

import pytest
import zmq

from tests.e2e.test_e2e_events import EventClient

pytestmark = [pytest.mark.e2e, pytest.mark.image]

ASK_NAME = "name = input('Name? ')\nname.upper()"


def after_flag(path, code: str) -> str:
    """C{code} run once the test creates the file C{path} (no timing guesses)."""
    return (
        f"import os, time\nwhile not os.path.exists({str(path)!r}):\n    time.sleep(0.02)\n{code}"
    )


ASK_EOF = "try:\n    input('anyone?')\nexcept EOFError as e:\n    why = str(e)\nwhy"


class PipelinedClient(EventClient):
    """An L{EventClient} that can have several requests in flight on its connection."""

    def send(self, command: str, **parameters) -> str:
        self._ids += 1
        request_id = f"p-{self._ids}"
        message = {"id": request_id, "command": command, "parameters": parameters}
        self.client.send_raw(json.dumps(message).encode() + b"\n")
        return request_id

    def reply_to(self, request_id: str, replies: dict) -> dict:
        while request_id not in replies:
            message = json.loads(self.client.read_line())
            if "event" in message:
                self.events.append(message)
            else:
                replies[message["id"]] = message
        return replies.pop(request_id)


def until(probe, timeout: float = 20.0, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(step)


def finished_entry(client, session_id: str, index: int) -> dict:
    """Poll get_evaluation until evaluation C{index} has ended; its entry."""

    def probe():
        entry = client.result("get_evaluation", session_id=session_id, history_index=index)
        return None if entry["running"] else entry

    return until(probe)


def _zmq_socket(kind, url: str):
    sock = zmq.Context.instance().socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 20000)
    sock.connect(url)
    return sock


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.serverproc import ServerProcess

    process = ServerProcess(tmp_path_factory.mktemp("detached"))
    process.start()
    yield process
    process.kill()


@pytest.mark.timeout(120)
def test_input_round_trips_over_tcp_on_the_connection_that_waits(server):
    """wait:true and not subscribed: the same connection answers on another line."""
    alice = PipelinedClient(server.tcp_client(timeout=30))
    commands = alice.result("describe")["commands"]
    assert {"get_evaluation", "send_input"} <= set(commands)
    assert commands["evaluate"]["parameters"]["wait"]["default"] is True
    session_id = alice.result("create_session", client_id="alice")["session_id"]
    evaluation = alice.send("evaluate", code=ASK_NAME)
    replies: dict = {}

    def asked():
        probe = alice.send("get_evaluation", history_index=1)
        entry = alice.reply_to(probe, replies)["result"]
        return entry["input_requested"]

    assert until(asked) == {"prompt": "Name? ", "password": False}
    answered = alice.reply_to(alice.send("send_input", text="bob"), replies)
    assert answered["result"] == {"session_id": session_id, "history_index": 1, "accepted": True}
    result = alice.reply_to(evaluation, replies)["result"]
    assert result["result"] == "'BOB'" and result["history_index"] == 1
    assert alice.events == []  # never subscribed: no event line
    refused = alice.call("send_input", text="nobody asked")
    assert refused["error_type"] == "InvalidRequest", refused


@pytest.mark.timeout(120)
def test_input_round_trips_over_zmq_dealer_and_a_req_client_follows_with_get_events(server):
    alice = EventClient(server.tcp_client(timeout=30))
    session_id = alice.result("create_session", client_id="alice")["session_id"]
    dealer, req = (_zmq_socket(kind, server.zmq_url) for kind in (zmq.DEALER, zmq.REQ))

    def dealer_send(request_id, command, **parameters):
        parameters["session_id"] = session_id
        message = {"id": request_id, "command": command, "parameters": parameters}
        dealer.send(json.dumps(message).encode())

    def dealer_next() -> dict:
        return json.loads(dealer.recv())

    dealer_send("d1", "subscribe")
    assert dealer_next()["result"]["pushed"] is True
    code = "import getpass\nword = getpass.getpass('Secret: ')\nprint('got', len(word))\nword[::-1]"
    dealer_send("d2", "evaluate", code=code)
    seen = []
    while True:
        message = dealer_next()
        seen.append(message)
        if message.get("event") == "input_requested":
            break
    assert message["data"] == {"history_index": 1, "prompt": "Secret: ", "password": True}
    dealer_send("d3", "send_input", text="s3cret")
    replies = {}
    while "d2" not in replies or not any(m.get("event") == "evaluation_finished" for m in seen):
        message = dealer_next()
        seen.append(message)
        if "id" in message:
            replies[message["id"]] = message
    assert replies["d3"]["result"]["accepted"] is True
    assert replies["d2"]["result"]["result"] == "'terc3s'"
    assert replies["d2"]["result"]["output"] == "got 6\n"
    dealer.close()

    # a REQ client starts an evaluation without waiting and follows it with get_events
    def req_call(command, **parameters):
        parameters.setdefault("session_id", session_id)
        req.send(json.dumps({"id": command, "command": command, "parameters": parameters}).encode())
        reply = json.loads(req.recv())
        assert reply["status"] == "success", reply
        return reply["result"]

    last = req_call("get_events", since=0)["last_seq"]
    started = req_call("evaluate", code="import time\ntime.sleep(0.3)\n6 * 7", wait=False)
    assert started == {"session_id": session_id, "history_index": 2, "started": True}
    followed = []
    while not any(e["event"] == "evaluation_finished" for e in followed):
        polled = req_call("get_events", since=last, wait=10)
        assert polled["events"], "the long poll ended without an event"
        followed.extend(polled["events"])
        last = polled["events"][-1]["seq"]
    seqs = [e["seq"] for e in followed]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # no gap, no duplicate
    finished = [e for e in followed if e["event"] == "evaluation_finished"][0]
    assert finished["data"]["history_index"] == 2 and finished["data"]["result"] == "42"
    req.close()


@pytest.mark.timeout(120)
def test_input_raises_eof_when_nobody_can_answer(server):
    flag = server.workdir / "eof.flag"
    code = after_flag(flag, ASK_EOF)
    alice = EventClient(server.tcp_client(timeout=30))
    session_id = alice.result("create_session", client_id="alice")["session_id"]
    # wait:true on a connection that is gone before input() is called
    alice.client.send_raw(
        json.dumps({"id": 1, "command": "evaluate", "parameters": {"code": code}}).encode() + b"\n"
    )
    alice.client.close()
    # wait:false on a connection that is gone (it runs after the first)
    bob = EventClient(server.tcp_client(timeout=30))
    bob.result("restore_session", session_id=session_id)
    started = bob.result("evaluate", code=code, wait=False)
    assert started["history_index"] == 2
    bob.client.close()
    carol = EventClient(server.tcp_client(timeout=30))

    def bob_gone():
        info = carol.result("get_session_info", session_id=session_id)
        return info["attached_connections"] <= 1  # alice half-closed waits for her reply

    until(bob_gone)
    flag.touch()
    for index in (1, 2):
        entry = finished_entry(carol, session_id, index)
        assert entry["ok"] is True, entry  # the evaluation ran to its end, without its client
        assert "no client is attached" in entry["result"]
    events = carol.result("get_events", session_id=session_id, since=0)["events"]
    assert not [e for e in events if e["event"] == "input_requested"]


@pytest.mark.timeout(180)
def test_a_detached_evaluation_is_read_back_after_its_client_left_and_the_server_restarted(
    server,
):
    alice = EventClient(server.tcp_client(timeout=30))
    session_id = alice.result("create_session", client_id="alice")["session_id"]
    flag = server.workdir / "detached.flag"
    code = "print('step 1')\n" + after_flag(flag, "print('step 2')\n6 * 7")
    started = alice.result("evaluate", code=code, wait=False)
    assert started == {"session_id": session_id, "history_index": 1, "started": True}
    alice.client.close()

    bob = EventClient(server.tcp_client(timeout=30))
    running = bob.result("get_evaluation", session_id=session_id, history_index=1)
    assert running["running"] is True and running["code"] == code  # the reply did not wait
    flag.touch()
    assert finished_entry(bob, session_id, 1)["result"] == "42"
    # one more that is still running when the server is stopped
    stopped_code = "import time\nprint('before')\ntime.sleep(60)"
    bob.result("restore_session", session_id=session_id)
    assert bob.result("evaluate", code=stopped_code, wait=False)["history_index"] == 2
    bob.client.close()
    server.stop()
    server.start()

    carol = EventClient(server.tcp_client(timeout=30))
    log = carol.result("get_events", session_id=session_id, since=0)["events"]
    outcomes = {
        e["data"]["history_index"]: e["data"] for e in log if e["event"] == "evaluation_finished"
    }
    assert [e["data"]["history_index"] for e in log if e["event"] == "evaluation_started"] == [1, 2]
    assert outcomes[1]["ok"] is True and outcomes[1]["result"] == "42"
    assert outcomes[1]["output"] == "step 1\nstep 2\n"
    assert outcomes[2]["ok"] is False and outcomes[2]["error_type"] == "ImageRestarted"
    assert "server stopped" in outcomes[2]["error"]
    restored = carol.result("restore_session", session_id=session_id)
    history = restored["workspace_context"]["history"]
    assert [(h["index"], h["ok"]) for h in history] == [(1, True), (2, False)]
    assert history[0]["output"] == "step 1\nstep 2\n" and history[0]["result"] == "42"
    assert history[1]["error"]["error_type"] == "ImageRestarted"
    entry = carol.result("get_evaluation", history_index=2)
    assert entry["running"] is False and "server stopped" in entry["error"]["message"]
