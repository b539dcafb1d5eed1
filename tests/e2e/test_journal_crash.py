"""kill -9 while new sessions are only in the group journal (storage/journal.py).

Under C{batch}, a flush that creates many sessions writes them as one journal file;
the server reports them clean once that file is durable, and compacts them into
their own files later.  Killed in between, the restarted server must have every
one of them (replayed from the journal at start-up).
"""

from __future__ import annotations

import time

import pytest

from stui_twisted.tap import JOURNAL_COMPACT_DELAY_VARIABLE

pytestmark = pytest.mark.timeout(60)

SESSIONS = 24  # 4 per client (at most 5 each)


def test_sessions_only_in_a_journal_survive_kill9(tmp_path, start_server):
    flags = ("--durability=batch", "--flush-interval=0.3")
    # compaction waits 1,000 s of quiet: the kill comes before it
    env = {JOURNAL_COMPACT_DELAY_VARIABLE: "1000"}
    server = start_server(tmp_path, *flags, image=False, zmq=False, env=env)
    client = server.tcp_client()
    created = {}
    for number in range(SESSIONS):
        sid = client.result("create_session", client_id=f"c{number % 6}")["session_id"]
        client.result("update_session_state", session_id=sid, state_data={"n": number})
        created[sid] = number
    deadline = time.monotonic() + 10
    for sid in created:
        while client.result("get_context_summary", session_id=sid)["dirty"]:
            assert time.monotonic() < deadline, f"{sid} stayed dirty for 10 s"
            time.sleep(0.02)
    journals = sorted(p.name for p in (server.data_dir / "journal").iterdir())
    on_disk = {p.stem for p in (server.data_dir / "sessions").rglob("s_*.json")}
    assert journals, "no journal: the test did not exercise it"
    assert len(on_disk) < SESSIONS, "every session has its file: nothing left to replay"
    server.kill()  # SIGKILL

    restarted = start_server(tmp_path, *flags, image=False, zmq=False, env=env)
    client = restarted.tcp_client()
    for sid, number in created.items():
        restored = client.result("restore_session", session_id=sid)
        assert restored["session_state"] == {"n": number}, (sid, restored)
    assert list((restarted.data_dir / "journal").iterdir()) == []
    assert "replayed" in restarted.log_text()
