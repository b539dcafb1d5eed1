"""The event log (bounds, seq across reopen, torn lines) and outboxes (the dropped marker)."""

from __future__ import annotations

import json
import os

import pytest_twisted
from twisted.internet import task

from stui_twisted.dispatch.interfaces import ConnectionContext
from stui_twisted.events.hub import EventHub, Outbox
from stui_twisted.events.log import EventLog


def _event(seq: int, text: str = "x") -> dict:
    return {"event": "output", "seq": seq, "data": {"text": text}}


def _filled(path, count: int, **limits) -> EventLog:
    log = EventLog(str(path), **limits)
    log.open()
    for _ in range(count):
        log.append(_event(log.next_seq()))
    return log


@pytest_twisted.ensureDeferred
async def test_seq_continues_across_reopen_and_clear(tmp_path):
    path = tmp_path / "events" / "s.log"
    log = _filled(path, 5)
    await log.close()
    reopened = EventLog(str(path))
    reopened.open()
    assert [m["seq"] for m in reopened.since(0)] == [1, 2, 3, 4, 5]
    reopened.clear()
    reopened.append(_event(reopened.next_seq()))
    await reopened.sync()  # the file is rewritten in a thread
    await reopened.close()
    third = EventLog(str(path))
    third.open()
    assert [m["seq"] for m in third.since(0)] == [6]
    assert (third.first_seq, third.last_seq) == (6, 6)
    assert third.truncated(0) and not third.truncated(5)


@pytest_twisted.ensureDeferred
async def test_count_limit_trims_and_the_file_stays_bounded(tmp_path):
    path = tmp_path / "s.log"
    log = _filled(path, 100, limit=10)
    await log.sync()
    assert [m["seq"] for m in log.since(0)] == list(range(91, 101))
    assert log.first_seq == 91 and log.truncated(89) and not log.truncated(90)
    assert len(path.read_bytes().splitlines()) <= 2 * 10 + 1
    await log.close()
    reopened = EventLog(str(path), limit=10)
    reopened.open()
    assert [m["seq"] for m in reopened.since(0)] == list(range(91, 101))
    assert reopened.next_seq() == 101


@pytest_twisted.ensureDeferred
async def test_byte_limit_trims(tmp_path):
    log = EventLog(str(tmp_path / "s.log"), max_bytes=1000)
    log.open()
    for _ in range(50):
        log.append(_event(log.next_seq(), "y" * 90))
        await log.sync()  # each compaction ends before the next append
    assert log.bytes <= 1000
    assert 0 < len(log.since(0)) < 50
    assert log.since(0)[-1]["seq"] == 50
    assert (tmp_path / "s.log").stat().st_size <= 2 * 1000 + 200


@pytest_twisted.ensureDeferred
async def test_a_torn_last_line_is_ignored_and_does_not_swallow_the_next(tmp_path):
    path = tmp_path / "s.log"
    await _filled(path, 3).close()
    with open(path, "ab") as handle:
        handle.write(b'0000abcd {"event": "out')  # a write cut short by a crash
    log = EventLog(str(path))
    log.open()
    assert [m["seq"] for m in log.since(0)] == [1, 2, 3]
    log.append(_event(log.next_seq()))
    await log.close()
    again = EventLog(str(path))
    again.open()
    assert [m["seq"] for m in again.since(0)] == [1, 2, 3, 4]


@pytest_twisted.ensureDeferred
async def test_appends_touch_the_file_only_in_a_thread(tmp_path, monkeypatch):
    import threading

    from stui_twisted.events import log as event_log

    threads_seen = []
    real_open = os.open

    def recording(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path)):
            threads_seen.append(threading.current_thread())
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(event_log.os, "open", recording)
    path = tmp_path / "events" / "s.log"
    log = _filled(path, 5)
    assert threads_seen == [] and not path.exists()  # kept in memory, no I/O here
    await log.sync()
    assert threads_seen and threading.main_thread() not in threads_seen
    assert len(path.read_bytes().splitlines()) == 5


@pytest_twisted.ensureDeferred
async def test_a_batch_sync_writes_only_the_logs_appended_to(tmp_path, monkeypatch):
    clock = task.Clock()
    hub = EventHub(clock, str(tmp_path), flush_interval=0.1)
    for n in range(50):  # idle streams in memory
        hub.event_log(f"s_idle{n}")
    busy = hub.event_log("s_busy")  # loaded (read now, as the service does in a thread)
    synced = []
    real_sync = EventLog.sync

    def counting(log):
        synced.append(log.path)
        return real_sync(log)

    monkeypatch.setattr(EventLog, "sync", counting)
    hub.publish("s_busy", "state_updated", {"parts": ["x"]})
    clock.advance(0.1)
    assert synced == [busy.path]
    await hub.sync_all()
    assert b"state_updated" in open(busy.path, "rb").read()


class SlowConnection:
    """A connection whose transport buffer is full until told otherwise."""

    def __init__(self) -> None:
        self.sent: list[dict] = []
        self.room = False

    def events_writable(self) -> bool:
        return self.room

    def sendEvent(self, data: bytes) -> None:  # noqa: N802
        self.sent.append(json.loads(data))


def test_a_slow_subscriber_is_cut_over_to_a_dropped_marker(tmp_path):
    hub = EventHub(task.Clock(), str(tmp_path), pending_events=5, pending_bytes=10**6)
    slow, fast = SlowConnection(), SlowConnection()
    fast.room = True
    slow_ctx, fast_ctx = ConnectionContext("tcp", "a"), ConnectionContext("tcp", "b")
    hub.subscribe(slow_ctx, slow, "s1", None)
    hub.subscribe(fast_ctx, fast, "s1", None)
    for number in range(9):
        hub.publish("s1", "output", {"text": str(number)})
    outbox: Outbox = slow_ctx.outbox
    assert len(outbox.pending) <= 5  # bounded, whatever the subscriber does
    assert [e["seq"] for e in fast.sent] == list(range(1, 10))  # others are not held up
    slow.room = True
    outbox.drain()
    marker = slow.sent[0]
    assert marker == {
        "event": "dropped",
        "stream": "session",
        "session_id": "s1",
        "from_seq": 1,
        "to_seq": 6,
    }
    assert [e["seq"] for e in slow.sent[1:]] == list(range(7, 10))  # then the rest, no gap
    assert hub.event_log("s1").since(0)[0]["seq"] == 1  # the log still has what was dropped
    hub.publish("s1", "output", {"text": "live"})
    assert slow.sent[-1]["seq"] == 10
    # Dropped twice before draining: one marker for the whole range.
    slow.room = False
    for number in range(12):
        hub.publish("s1", "output", {"text": str(number)})
    slow.room = True
    outbox.drain()
    assert slow.sent[-1] == dict(marker, from_seq=11, to_seq=22)


def test_pending_bytes_are_bounded_and_a_closed_subscriber_is_forgotten(tmp_path):
    hub = EventHub(task.Clock(), str(tmp_path), pending_events=10**6, pending_bytes=4096)
    slow = SlowConnection()
    ctx = ConnectionContext("tcp", "a")
    hub.subscribe(ctx, slow, "s1", None)
    for _ in range(200):
        hub.publish("s1", "output", {"text": "z" * 500})
        assert ctx.outbox.bytes <= 4096 + 600
    ctx.outbox.close()
    assert hub.subscribers("s1") == 0 and ctx.outbox is None
    hub.publish("s1", "output", {"text": "after"})
    assert slow.sent == []


def test_replay_then_live_has_no_gap_and_no_duplicate(tmp_path):
    hub = EventHub(task.Clock(), str(tmp_path))
    for number in range(5):
        hub.publish("s1", "output", {"text": str(number)})
    conn = SlowConnection()
    conn.room = True
    ctx = ConnectionContext("tcp", "a")
    result = hub.subscribe(ctx, conn, "s1", 2)
    assert (result["replayed"], result["last_seq"], result["first_seq"]) == (3, 5, 1)
    hub.publish("s1", "output", {"text": "live"})
    assert [e["seq"] for e in conn.sent] == [3, 4, 5, 6]


def test_the_team_stream_names_no_session_and_keeps_the_last_thousand(tmp_path):
    hub = EventHub(task.Clock(), str(tmp_path))
    for _ in range(1005):
        message = hub.publish(None, "presence", {"client_id": "a"})
    assert "session_id" not in message and message["stream"] == "team"
    team = hub.event_log("team")
    assert (team.first_seq, team.last_seq) == (6, 1005)
    assert not (tmp_path / "events").exists()  # memory only


@pytest_twisted.ensureDeferred
async def test_compaction_runs_off_the_reactor_and_keeps_what_is_appended_meanwhile(
    tmp_path, monkeypatch
):
    import threading

    from stui_twisted.events import log as event_log

    threads_seen = []
    real_replace = event_log._replace_file

    def recording(path, data):
        threads_seen.append(threading.current_thread())
        real_replace(path, data)

    monkeypatch.setattr(event_log, "_replace_file", recording)
    path = tmp_path / "s.log"
    log = _filled(path, 21, limit=10)  # the 21st line starts a compaction
    for _ in range(5):
        log.append(_event(log.next_seq()))  # held while the file is rewritten
    synced = log.sync()
    assert not synced.called  # under "always" a reply waits for the compaction
    await synced
    assert threads_seen and threading.main_thread() not in threads_seen
    await log.close()
    reopened = EventLog(str(path), limit=10)
    reopened.open()
    assert [m["seq"] for m in reopened.since(0)] == list(range(17, 27))
