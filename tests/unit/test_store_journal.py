"""The group journal (storage/journal.py): first writes of a write_many as one file per call.

Synchronous "threads" (L{SyncPool}) and a clock (L{SyncReactor}), so compaction runs
only when the test advances time or a bound forces it.  A crash is a second store
opened on the same directory while the first was never closed.
"""

from __future__ import annotations

import hashlib
import os

import pytest

from stui_twisted.storage import journal
from stui_twisted.storage.errors import SessionFileMissing
from stui_twisted.storage.pathcodec import encode_client_dir
from stui_twisted.storage.store import SessionStore, WriteResult
from tests.helpers import SyncPool, SyncReactor, make_session

DELAY = 0.1


def opened(data_dir, clock=None, **options) -> SessionStore:
    store = SessionStore(
        data_dir,
        reactor=clock or SyncReactor(),
        threadpool=SyncPool(),
        journal_compact_delay=DELAY,
        **options,
    )
    store.open()
    return store


def result_of(deferred):
    """The result of a Deferred that has fired (all work here is synchronous)."""
    outcome = []
    deferred.addBoth(outcome.append)
    assert outcome, "the Deferred has not fired"
    if hasattr(outcome[0], "raiseException"):
        outcome[0].raiseException()
    return outcome[0]


def file_of(store: SessionStore, session: dict) -> str:
    client_dir = encode_client_dir(session["client_id"])
    return os.path.join(store.sessions_dir, client_dir, session["session_id"] + ".json")


def journals(store: SessionStore) -> list[str]:
    return sorted(os.listdir(store.journal_dir))


@pytest.fixture
def clock():
    return SyncReactor()


@pytest.fixture
def sessions():
    return [make_session(f"client-{n % 3}", n) for n in range(10)]


def test_first_writes_go_to_one_journal_and_replay_after_a_crash(tmp_path, clock, sessions):
    store = opened(tmp_path, clock)
    results = result_of(store.write_many(sessions))
    assert journals(store) == ["1.jnl"]
    assert not any(os.path.exists(file_of(store, s)) for s in sessions)
    assert store.statistics()["journal_records_pending"] == 10
    assert store.statistics()["journals_on_disk"] == 1

    restarted = opened(tmp_path)  # the first store is never closed: a crash
    metas = result_of(restarted.load_index())
    assert {m["session_id"] for m in metas} == {s["session_id"] for s in sessions}
    assert journals(restarted) == []
    for session in sessions:
        with open(file_of(restarted, session), "rb") as handle:  # exactly the journaled bytes
            checksum = "sha256:" + hashlib.sha256(handle.read()).hexdigest()
        assert results[session["session_id"]].checksum == checksum
        assert result_of(restarted.read(session["client_id"], session["session_id"])) == session


def test_a_few_first_writes_are_files_as_before(tmp_path, clock, sessions):
    store = opened(tmp_path, clock)
    result_of(store.write_many(sessions[: journal.MIN_GROUP - 1]))
    assert journals(store) == []
    assert all(os.path.exists(file_of(store, s)) for s in sessions[: journal.MIN_GROUP - 1])


def test_read_of_a_journaled_session_before_compaction(tmp_path, clock, sessions):
    store = opened(tmp_path, clock)
    result_of(store.write_many(sessions))
    assert result_of(store.read("client-1", sessions[1]["session_id"])) == sessions[1]
    assert not os.path.exists(file_of(store, sessions[1]))


def test_compaction_once_idle_writes_the_files_and_retires_the_journal(tmp_path, clock, sessions):
    store = opened(tmp_path, clock)
    result_of(store.write_many(sessions))
    clock.advance(DELAY / 2)
    assert journals(store) == ["1.jnl"]
    clock.advance(DELAY)
    assert journals(store) == []
    assert all(os.path.exists(file_of(store, s)) for s in sessions)
    assert store.statistics()["journal_records_pending"] == 0
    assert store.statistics()["journals_on_disk"] == 0
    assert result_of(store.read("client-2", sessions[2]["session_id"])) == sessions[2]


def test_a_newer_direct_write_wins_over_the_record(tmp_path, clock, sessions):
    store = opened(tmp_path, clock)
    result_of(store.write_many(sessions))
    newer = dict(sessions[0], session_state={"n": "newer"})
    result_of(store.write(newer))  # has a record already: its own file
    assert store.statistics()["journal_records_pending"] == 9
    assert result_of(store.read("client-0", newer["session_id"])) == newer

    restarted = opened(tmp_path)  # crash: the journal (with the old record) is still there
    assert journals(restarted) == ["1.jnl"]
    result_of(restarted.load_index())
    assert result_of(restarted.read("client-0", newer["session_id"])) == newer
    # and in the running store, compaction skips it too
    clock.advance(2 * DELAY)
    assert result_of(store.read("client-0", newer["session_id"])) == newer


def test_a_deleted_session_is_not_resurrected_by_replay(tmp_path, clock, sessions):
    store = opened(tmp_path, clock)
    result_of(store.write_many(sessions))
    result_of(store.delete("client-0", sessions[0]["session_id"]))
    assert journals(store) == []  # compacted first, then deleted
    with pytest.raises(SessionFileMissing):
        result_of(store.read("client-0", sessions[0]["session_id"]))

    restarted = opened(tmp_path)
    metas = result_of(restarted.load_index())
    assert sessions[0]["session_id"] not in {m["session_id"] for m in metas}
    assert len(metas) == 9


def test_a_torn_journal_is_quarantined_at_start_up(tmp_path, clock, sessions):
    store = opened(tmp_path, clock)
    result_of(store.write_many(sessions))
    path = os.path.join(store.journal_dir, "1.jnl")
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) - 40)
    restarted = opened(tmp_path)
    rows = result_of(restarted.verify_all())
    assert [(r["path"], r["ok"]) for r in rows if r["kind"] == "journal"] == [
        (os.path.join("journal", "1.jnl"), False)
    ]
    assert result_of(restarted.load_index()) == []
    assert journals(restarted) == []
    quarantined = os.listdir(restarted.quarantine_dir)
    assert len(quarantined) == 1 and quarantined[0].endswith("-journal-1.jnl")
    assert restarted.statistics()["quarantined"] == 1


def test_the_backlog_bound_forces_compaction(tmp_path, clock):
    store = opened(tmp_path, clock, journal_max_records=15)
    first = [make_session("a", n) for n in range(10)]
    second = [make_session("b", n) for n in range(10, 20)]
    result_of(store.write_many(first))
    assert store.statistics()["journal_records_pending"] == 10
    result_of(store.write_many(second))  # 20 > 15: compacted at once, no time passed
    assert store.statistics()["journal_records_pending"] == 0
    assert journals(store) == []
    assert all(os.path.exists(file_of(store, s)) for s in first + second)


def test_a_group_write_defers_compaction(tmp_path, clock, sessions):
    store = opened(tmp_path, clock)
    result_of(store.write_many(sessions))
    for _ in range(5):  # a large flush every half delay: never idle long enough
        clock.advance(DELAY / 2)
        result_of(store.write_many([dict(s, state="closed") for s in sessions[1:9]]))
    assert journals(store) == ["1.jnl"]
    assert store.statistics()["journal_records_pending"] == 2  # 8 superseded by files
    clock.advance(DELAY)
    assert journals(store) == []


def test_a_small_flush_does_not_defer_compaction(tmp_path, clock, sessions):
    store = opened(tmp_path, clock)
    result_of(store.write_many(sessions))
    for _ in range(3):
        clock.advance(DELAY / 2)
        result_of(store.write_many([dict(sessions[0], state="closed")]))
    assert journals(store) == []


def test_close_compacts_and_seq_continues_after_restart(tmp_path, clock, sessions):
    store = opened(tmp_path, clock)
    result_of(store.write_many(sessions[:8]))
    result_of(store.close())
    assert journals(store) == []
    assert all(os.path.exists(file_of(store, s)) for s in sessions[:8])

    result_of(store.open())
    more = [make_session("c", n) for n in range(100, 110)]
    result_of(store.write_many(more))
    restarted = opened(tmp_path)  # crash with 2.jnl on disk
    assert journals(restarted) == ["2.jnl"]
    result_of(restarted.load_index())
    result_of(restarted.write_many([make_session("d", n) for n in range(200, 210)]))
    assert journals(restarted) == ["3.jnl"]


def test_write_results_are_the_records_and_verify(tmp_path, clock, sessions):
    store = opened(tmp_path, clock)
    results = result_of(store.write_many(sessions))
    assert all(isinstance(r, WriteResult) for r in results.values())
    rows = [r for r in result_of(store.verify_all()) if r["kind"] == "journal"]
    assert [(r["path"], r["ok"]) for r in rows] == [(os.path.join("journal", "1.jnl"), True)]


def test_start_up_removes_old_temp_files_of_journal_writes(tmp_path, clock):
    store = opened(tmp_path, clock)
    old, young = (os.path.join(store.journal_dir, f".{n}.jnl.tmp-abc") for n in (1, 2))
    for path in (old, young):
        with open(path, "wb") as handle:
            handle.write(b"torn")
    os.utime(old, (clock.seconds() - 7200, clock.seconds() - 7200))
    os.utime(young, (clock.seconds(), clock.seconds()))
    result_of(store.load_index())
    assert journals(store) == [os.path.basename(young)]
