"""End to end: live events on TCP, ZeroMQ DEALER and REQ long-poll; the log survives a restart."""

from __future__ import annotations

import json
import time

import pytest
import zmq

pytestmark = [pytest.mark.e2e, pytest.mark.image]


class EventClient:
    """A line client that keeps event lines apart from replies."""

    def __init__(self, line_client) -> None:
        self.client = line_client
        self.events: list[dict] = []
        self._ids = 0

    def call(self, command: str, **parameters) -> dict:
        self._ids += 1
        request_id = f"e-{self._ids}"
        message = {"id": request_id, "command": command, "parameters": parameters}
        self.client.send_raw(json.dumps(message).encode() + b"\n")
        while True:
            message = json.loads(self.client.read_line())
            if "event" in message:
                assert "status" not in message
                self.events.append(message)
                continue
            assert message["id"] == request_id, message
            return message

    def result(self, command: str, **parameters) -> dict:
        reply = self.call(command, **parameters)
        assert reply["status"] == "success", reply
        return reply["result"]

    def wait_event(self, name: str, timeout: float = 15.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event["event"] == name:
                    self.events.remove(event)
                    return event
            assert time.monotonic() < deadline, f"no {name} event within {timeout} s"
            self.client.sock.settimeout(max(0.05, deadline - time.monotonic()))
            message = json.loads(self.client.read_line())
            assert "event" in message, message
            self.events.append(message)


def _names(events):
    return [(event["seq"], event["event"]) for event in events]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server (with its image) for the tests that neither restart it nor kill its
    image; each makes sessions of its own. A subscriber's pending events are bounded
    at 1 MiB (8 MiB by default), so one that stops reading overflows soon."""
    from tests.serverproc import ServerProcess

    server = ServerProcess(tmp_path_factory.mktemp("events"), "--event-pending-bytes=1048576")
    yield server.start()
    server.kill()


@pytest.mark.timeout(120)
def test_a_subscriber_sees_another_clients_evaluation_on_tcp_and_dealer(server):
    alice = EventClient(server.tcp_client(timeout=30))
    session_id = alice.result("create_session", client_id="alice")["session_id"]
    bob = EventClient(server.tcp_client(timeout=30))
    subscribed = bob.result("subscribe", session_id=session_id, client_id="alice")
    assert subscribed["last_seq"] == 0 and subscribed["replayed"] == 0

    context = zmq.Context.instance()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVTIMEO, 15000)
    dealer.connect(server.zmq_url)
    request = {"id": "d1", "command": "subscribe", "parameters": {"session_id": session_id}}
    dealer.send(json.dumps(request).encode())
    reply = json.loads(dealer.recv())
    assert reply["status"] == "success", reply

    result = alice.result("evaluate", code="print('hi'); 6 * 7")
    assert result["result"] == "42"
    assert alice.events == []  # a connection that never subscribed gets no event line

    started = bob.wait_event("evaluation_started")
    output = bob.wait_event("output")
    finished = bob.wait_event("evaluation_finished")
    assert started["session_id"] == session_id and started["stream"] == "session"
    assert started["data"]["code"] == "print('hi'); 6 * 7"
    assert started["data"]["by"] == "alice"
    assert output["data"] == {"history_index": 1, "name": "stdout", "text": "hi\n"}
    assert (started["seq"], output["seq"], finished["seq"]) == (1, 2, 3)
    assert finished["data"]["ok"] is True and finished["data"]["result"] == "42"
    assert finished["data"]["history_index"] == result["history_index"]

    pushed = [json.loads(dealer.recv()) for _ in range(3)]
    assert _names(pushed) == [(1, "evaluation_started"), (2, "output"), (3, "evaluation_finished")]
    dealer.close()


@pytest.mark.timeout(120)
def test_req_long_polls_and_the_log_replays_with_the_same_seqs_after_a_restart(
    tmp_path, start_server
):
    server = start_server(tmp_path, "--durability=always")
    alice = EventClient(server.tcp_client(timeout=30))
    session_id = alice.result("create_session", client_id="alice")["session_id"]

    context = zmq.Context.instance()
    req = context.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.setsockopt(zmq.RCVTIMEO, 20000)
    req.connect(server.zmq_url)
    subscribe = {"id": "r0", "command": "subscribe", "parameters": {"session_id": session_id}}
    req.send(json.dumps(subscribe).encode())
    subscribed = json.loads(req.recv())
    assert subscribed["result"]["pushed"] is False  # a REQ socket is never pushed to
    commands = alice.result("describe")["commands"]
    assert {"subscribe", "unsubscribe", "get_events"} <= set(commands)
    poll = {
        "id": "r1",
        "command": "get_events",
        "parameters": {"session_id": session_id, "since": 0, "wait": 10},
    }
    req.send(json.dumps(poll).encode())
    time.sleep(0.2)  # the poll is waiting on the server
    alice.result("evaluate", code="x = 1")
    reply = json.loads(req.recv())
    assert reply["id"] == "r1" and reply["status"] == "success", reply
    assert reply["result"]["events"][0]["event"] == "evaluation_started"
    alice.result("evaluate", code="x + 1")
    before = alice.result("get_events", session_id=session_id, since=0)
    assert _names(before["events"]) == [
        (1, "evaluation_started"),
        (2, "evaluation_finished"),
        (3, "evaluation_started"),
        (4, "evaluation_finished"),
    ]
    req.close()

    # A hard kill: under `always` the events were on disk before the replies.
    server.kill()
    server.start()
    again = EventClient(server.tcp_client(timeout=30))
    after = again.result("get_events", session_id=session_id, since=0, client_id="alice")
    assert after["events"] == before["events"]
    replay = again.result("subscribe", session_id=session_id, since=2, client_id="alice")
    assert (replay["replayed"], replay["last_seq"], replay["truncated"]) == (2, 4, False)
    assert _names([again.wait_event("evaluation_started")]) == [(3, "evaluation_started")]
    assert _names([again.wait_event("evaluation_finished")]) == [(4, "evaluation_finished")]
    again.result("evaluate", session_id=session_id, client_id="alice", code="x + 2")
    assert again.wait_event("evaluation_started")["seq"] == 5  # numbering continues
    assert again.wait_event("evaluation_finished")["seq"] == 6


@pytest.mark.timeout(120)
def test_state_changes_close_and_image_restarts_reach_subscribers(tmp_path, start_server):
    import os
    import signal

    server = start_server(tmp_path)
    alice = EventClient(server.tcp_client(timeout=30))
    session_id = alice.result("create_session", client_id="alice")["session_id"]
    watcher = EventClient(server.tcp_client(timeout=30))
    watcher.result("subscribe", session_id=session_id)
    team = watcher.result("subscribe", session_id="team")
    assert team["stream"] == "team" and team["session_id"] is None

    alice.result("update_session_state", state_data={"tab": 2})
    state = watcher.wait_event("state_updated")
    assert state["data"]["parts"] == ["state_data"] and state["data"]["by"] == "alice"

    alice.result("evaluate", code="shared.answer = 42\nshared.gone = 1\ndel shared.gone")
    changed = watcher.wait_event("shared_changed")
    assert changed["stream"] == "team" and "session_id" not in changed
    assert changed["data"] == {"names": ["answer"], "by": "alice"}
    alice.result("evaluate", code="del shared.answer")
    assert watcher.wait_event("shared_changed")["data"] == {"names": ["answer"], "by": "alice"}
    old_pid = alice.result("ping")["image"]["pid"]
    os.kill(old_pid, signal.SIGKILL)
    restarted = watcher.wait_event("image_restarted", timeout=30)
    assert restarted["stream"] == "team" and "session_id" not in restarted
    assert restarted["data"]["pid"] not in (None, old_pid)

    alice.result("close_session")
    closed = watcher.wait_event("session_closed")
    assert closed["data"] == {"by": "alice"} and closed["seq"] == state["seq"] + 5


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.timeout(180)
def test_a_subscriber_that_stops_reading_gets_a_dropped_marker_and_costs_bounded_memory(server):
    import socket

    from tests.serverproc import LineClient

    alice = EventClient(server.tcp_client(timeout=60))
    session_id = alice.result("create_session", client_id="alice")["session_id"]
    alice.result("evaluate", code="chunk = 'x' * 60000")
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", server.tcp_port))
    slow = EventClient(LineClient(raw, timeout=60))
    slow.result("subscribe", session_id=session_id)
    rss_before = _rss_bytes(server.process.pid)
    # 600 evaluations, each output and finished event carries ~60 KB: ~72 MB the slow one never
    # reads.  The server's RSS moves by tens of MB without any subscriber (output
    # buffers, allocator), so the bound is the contract's 64 MiB, below what it unread.
    worst = 0.0
    for _ in range(600):
        started = time.monotonic()
        alice.result("evaluate", code="print(chunk)")
        worst = max(worst, time.monotonic() - started)
    growth = _rss_bytes(server.process.pid) - rss_before
    assert growth < 64 * 1024 * 1024, f"server RSS grew by {growth} bytes"
    assert worst < 5.0  # the writer was never held up by the reader

    # Read everything, in order: what was written before the queue filled, the
    # marker, then the newer events up to the last one; no duplicate.
    received = list(slow.events)
    slow.events.clear()
    last = alice.result("get_events", session_id=session_id, since=0, limit=1)["last_seq"]
    while not received or received[-1].get("seq") != last:
        received.append(json.loads(slow.client.read_line()))
    kinds = [m["event"] for m in received]
    assert kinds.count("dropped") >= 1
    at = kinds.index("dropped")
    marker = received[at]
    assert marker["session_id"] == session_id and marker["stream"] == "session"
    seqs = [m["seq"] for m in received if m["event"] != "dropped"]
    assert seqs == sorted(set(seqs))
    assert all(m["seq"] < marker["from_seq"] for m in received[:at])
    assert all(m.get("seq", 10**9) > marker["to_seq"] for m in received[at + 1 :])
    caught_up = slow.result(
        "get_events", session_id=session_id, since=marker["from_seq"] - 1, limit=5
    )
    # The 4 MiB log kept only the newest ~70 of the 60 KB events: it says so.
    first = caught_up["first_seq"]
    assert caught_up["events"][0]["seq"] == max(marker["from_seq"], first)
    assert caught_up["truncated"] is (marker["from_seq"] < first)
    assert last - first < 300  # about 35 evaluations' started, output and finished events
