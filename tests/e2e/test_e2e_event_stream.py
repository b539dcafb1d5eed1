"""End to end: output streams to subscribers while the cell runs (events.md §1 ``output``)."""

from __future__ import annotations

import json
import time

import pytest

from tests.e2e.test_e2e_events import EventClient
from tests.serverproc import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.image]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("event-stream"), zmq=False).start()
    yield proc
    proc.kill()


def read_events_until(client, last: str, timeout: float = 30.0) -> list[tuple[float, dict]]:
    """Event lines with the wall-clock time each arrived, up to the first C{last} event."""
    client.sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        message = json.loads(client.read_line())
        assert "event" in message, message
        seen.append((time.time(), message))
        if message["event"] == last:
            return seen
    raise AssertionError(f"no {last} event within {timeout} s: {seen}")


@pytest.mark.timeout(120)
def test_output_reaches_a_subscriber_while_the_cell_runs(server):
    alice = EventClient(server.tcp_client(timeout=30))
    session_id = alice.result("create_session", client_id="stream-alice")["session_id"]
    alice.result("evaluate", code="import sys, time")
    bob = server.tcp_client(timeout=30)
    bob.result("subscribe", session_id=session_id, client_id="stream-alice")

    code = (
        "print('one', time.time()); time.sleep(0.3)\n"
        "print('oops', file=sys.stderr); time.sleep(0.3)\n"
        "print('two'); time.sleep(0.3)\n"
        "time.time()"
    )
    request = {"id": "run", "command": "evaluate", "parameters": {"code": code}}
    alice.client.send_raw(json.dumps(request).encode() + b"\n")
    seen = read_events_until(bob, "evaluation_finished")
    reply = json.loads(alice.client.read_line())
    assert reply["status"] == "success", reply
    ended = float(reply["result"]["result"])

    names = [message["event"] for _, message in seen]
    assert names[0] == "evaluation_started" and names[-1] == "evaluation_finished"
    outputs = [(at, message) for at, message in seen if message["event"] == "output"]
    assert set(names[1:-1]) == {"output"}
    index = reply["result"]["history_index"]
    assert all(message["data"]["history_index"] == index for _, message in outputs)
    # Chunked as written (50 ms apart at most, 0.3 s between the prints): each print its own.
    texts = [(message["data"]["name"], message["data"]["text"]) for _, message in outputs]
    assert [name for name, _ in texts] == ["stdout", "stderr", "stdout"]
    assert "".join(text for _, text in texts) == reply["result"]["output"]
    seqs = [message["seq"] for _, message in seen]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    # The first chunk arrived while the cell still ran (it slept 0.6 s more after it).
    first_at, first = outputs[0]
    written = float(first["data"]["text"].split()[1])
    assert written <= first_at < ended, (written, first_at, ended)

    # Produced with or without subscribers: the log has them for anyone later.
    logged = alice.result("get_events", session_id=session_id, since=seqs[0] - 1)
    assert [m["event"] for m in logged["events"]] == names
    bob.close()
    alice.client.close()


@pytest.mark.timeout(120)
def test_a_flood_streams_what_the_reply_keeps_in_bounded_chunks(server):
    alice = EventClient(server.tcp_client(timeout=60))
    session_id = alice.result("create_session", client_id="stream-flood")["session_id"]
    before = alice.result("get_events", session_id=session_id, since=0)["last_seq"]
    started = time.monotonic()
    reply = alice.result("evaluate", code="for i in range(3000): print('x' * 999)")
    elapsed = time.monotonic() - started
    output = reply["output"]
    assert output.endswith("[output truncated: 1951424 more characters]\n")
    events = alice.result("get_events", session_id=session_id, since=before, limit=1000)["events"]
    chunks = [event["data"]["text"] for event in events if event["event"] == "output"]
    assert "".join(chunks) == output  # nothing beyond what the evaluation keeps
    assert max(map(len, chunks)) <= 64 * 1024
    # At most one chunk per 50 ms unless 64 KiB wait (plus the last, sent with the reply).
    assert len(chunks) <= len(output) // (64 * 1024) + elapsed / 0.05 + 2
    alice.client.close()


@pytest.mark.timeout(120)
def test_presence_counts_conversations_per_client_and_a_clean_stop_is_announced(
    tmp_path, start_server
):
    server = start_server(tmp_path, image=False, zmq=False)
    watcher = EventClient(server.tcp_client(timeout=30))
    assert watcher.result("subscribe", session_id="team")["stream"] == "team"
    first = EventClient(server.tcp_client(timeout=30))
    first.result("create_session", client_id="carol")
    first.result("list_client_sessions", client_id="carol")  # counted once per conversation
    second = EventClient(server.tcp_client(timeout=30))
    second.result("list_client_sessions", client_id="carol")
    second.client.close()

    seen = [watcher.wait_event("presence")["data"] for _ in range(3)]
    assert seen == [
        {"client_id": "carol", "connections": 1, "joined": True},
        {"client_id": "carol", "connections": 2, "joined": True},
        {"client_id": "carol", "connections": 1, "joined": False},
    ]
    assert server.stop() == 0
    stopping = watcher.wait_event("server_stopping")
    assert stopping["stream"] == "team" and stopping["data"] == {}
    assert "session_id" not in stopping
    # Nothing about carol leaving came before the announcement: it was sent first.
    assert [e["event"] for e in watcher.events] == []


@pytest.mark.timeout(120)
def test_get_evaluation_shows_the_output_streamed_so_far_while_it_runs(server):
    alice = EventClient(server.tcp_client(timeout=30))
    alice.result("create_session", client_id="stream-detached")
    code = "import time\nprint('halfway')\ntime.sleep(1.5)\nprint('done')"
    started = alice.result("evaluate", code=code, wait=False)
    index = started["history_index"]
    deadline = time.monotonic() + 30
    while True:
        running = alice.result("get_evaluation", history_index=index)
        if running["running"] is False or running["output"]:
            break
        assert time.monotonic() < deadline, running
        time.sleep(0.05)
    assert running["running"] is True and running["output"] == "halfway\n"
    while alice.result("get_evaluation", history_index=index)["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert alice.result("get_evaluation", history_index=index)["output"] == "halfway\ndone\n"
    alice.client.close()
