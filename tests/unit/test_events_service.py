"""The session service's event logs: clear_context part events, retention, reading in a thread."""

from __future__ import annotations

import threading

import pytest_twisted

from stui_twisted.events.commands import build_event_commands
from stui_twisted.events.hub import EventHub
from stui_twisted.events.log import EventLog, log_path
from tests.unit.test_service import Harness


async def _harness(data_dir, **overrides) -> Harness:
    h = await Harness(data_dir, **overrides).start()
    h.service.events = EventHub(h.clock, str(data_dir))
    h.dispatcher.register_all(build_event_commands(h.service, h.service.events))
    return h


@pytest_twisted.ensureDeferred
async def test_clear_context_events_empties_the_log_and_seq_keeps_counting(tmp_path):
    h = await _harness(tmp_path / "data")
    conn = h.connection()
    await h.ok(conn, "create_session", client_id="alice")
    for number in range(3):
        await h.ok(conn, "update_session_state", state_data={"n": number})
    assert (await h.ok(conn, "get_events", since=0))["last_seq"] == 3
    cleared = await h.ok(conn, "clear_context", parts=["events"])
    assert cleared["cleared"] == ["events"]
    after = await h.ok(conn, "get_events", since=0)
    # Only the state_updated event that says so is left; numbering went on.
    assert [(e["seq"], e["event"], e["data"]["parts"]) for e in after["events"]] == [
        (4, "state_updated", ["events"])
    ]
    assert (after["first_seq"], after["truncated"]) == (4, True)
    everything = await h.ok(conn, "clear_context")  # "all" includes events
    assert everything["cleared"][-1] == "events"
    assert [e["seq"] for e in (await h.ok(conn, "get_events", since=0))["events"]] == [5]
    await h.stop()


@pytest_twisted.ensureDeferred
async def test_retention_deletes_the_event_log_with_the_session(tmp_path):
    h = await _harness(tmp_path / "data", retention_days=1, cleanup_interval=3600)
    conn = h.connection()
    old = await h.ok(conn, "create_session", client_id="alice", timeout=60)
    await h.ok(conn, "update_session_state", state_data={"n": 1})
    path = log_path(str(h.data_dir), old["session_id"])
    await h.service.cleanup()
    await h.service.events.sync(old["session_id"])  # written within the flush interval
    with open(path, "rb") as handle:
        assert b"state_updated" in handle.read()
    h.clock.advance(2 * 24 * 3600)
    await h.service.cleanup()
    assert old["session_id"] not in h.service.sessions
    assert not (h.data_dir / "events").exists() or not any((h.data_dir / "events").iterdir())
    await h.stop()


@pytest_twisted.ensureDeferred
async def test_a_restored_sessions_log_is_first_read_off_the_reactor_thread(tmp_path, monkeypatch):
    h = await _harness(tmp_path / "data")
    conn = h.connection()
    session_id = (await h.ok(conn, "create_session", client_id="alice"))["session_id"]
    await h.ok(conn, "update_session_state", state_data={"n": 1})
    await h.stop()

    readers = []
    real_read = EventLog.read

    def recording_read(log):
        readers.append(threading.current_thread())
        return real_read(log)

    monkeypatch.setattr(EventLog, "read", recording_read)
    again = await _harness(tmp_path / "data")
    other = again.connection()
    events = await again.ok(other, "get_events", session_id=session_id, since=0)
    assert [e["event"] for e in events["events"]] == ["state_updated"]
    assert readers and threading.main_thread() not in readers
    await again.ok(other, "update_session_state", session_id=session_id, state_data={"n": 2})
    events = await again.ok(other, "get_events", session_id=session_id, since=0)
    assert [e["seq"] for e in events["events"]] == [1, 2]
    await again.stop()
