"""End to end on the PostgreSQL store: a real ``twistd -n stui --store=postgresql:...``.

- A session with ``x = 41`` and a class instance, written under ``always``, survives
  ``kill -9`` of the server: after a restart on the same database, restore brings both
  back.
- A row forged in the database (valid JSON, bad MAC) is quarantined at start-up and
  never unpickled: its pickle would create a marker file, and none appears.
"""

from __future__ import annotations

import base64
import json
import pickle

import psycopg
import pytest

from tests.serverproc import pg_node_flags

pytestmark = pytest.mark.timeout(180)


def start_pg_server(start_server, workdir, dsn):
    return start_server(
        workdir,
        f"--store=postgresql:{dsn}",
        f"--secret-file={workdir / 'node' / 'secret.key'}",
        "--durability=always",
        zmq=False,
    )


def session_rows(dsn):
    with psycopg.connect(dsn) as connection:
        return connection.execute(
            "SELECT client_id, session_id, document FROM sessions ORDER BY session_id"
        ).fetchall()


def test_kill9_then_restart_restores_the_workspace_from_postgresql(tmp_path, start_server, pg_dsn):
    server = start_pg_server(start_server, tmp_path, pg_dsn)
    client = server.tcp_client(timeout=30)
    session_id = client.result("create_session", client_id="alice")["session_id"]
    code = "class Point:\n    def __init__(self, x):\n        self.x = x\nx = 41\np = Point(x + 1)"
    assert client.result("evaluate", session_id=session_id, code=code)["has_error"] is False
    client.close()
    # under always the reply came after the commit: the row is there now
    assert [(row[0], row[1]) for row in session_rows(pg_dsn)] == [("alice", session_id)]
    assert not (server.data_dir / "sessions").exists()  # nothing went to files
    server.process.kill()  # SIGKILL: no flush, no clean shutdown
    server.process.wait(30)

    server.start()
    client = server.tcp_client(timeout=30)
    restored = client.result("restore_session", client_id="alice", session_id=session_id)
    assert {"x", "p"} <= set(restored["restored_bindings"]), restored
    result = client.result("evaluate", session_id=session_id, code="(x, p.x, type(p).__name__)")
    assert result["result"] == "(41, 42, 'Point')", result
    client.close()


class _Marker:
    """Unpickling this would create C{path}: proof that a forged pickle ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _bindings_with_x(value):
    """The stored bindings dict (the one that holds C{x}) inside a session document."""
    if isinstance(value, dict):
        if isinstance(value.get("bindings"), dict) and "x" in value["bindings"]:
            return value["bindings"]
        for item in value.values():
            found = _bindings_with_x(item)
            if found is not None:
                return found
    return None


def test_forged_row_is_quarantined_and_never_unpickled(tmp_path, start_server, pg_dsn):
    server = start_pg_server(start_server, tmp_path, pg_dsn)
    client = server.tcp_client(timeout=30)
    session_id = client.result("create_session", client_id="alice")["session_id"]
    assert client.result("evaluate", session_id=session_id, code="x = 41")["has_error"] is False
    client.close()
    server.stop()

    # Forge: x becomes a pickle that would create a marker file when unpickled.
    marker = tmp_path / "forged-pickle-ran"
    (_client_id, _sid, document) = session_rows(pg_dsn)[0]
    envelope = json.loads(bytes(document))
    bindings = _bindings_with_x(envelope["session"])
    assert bindings is not None, envelope["session"]
    evil = base64.b64encode(pickle.dumps(_Marker(str(marker)))).decode()
    bindings["x"] = {"encoding": "pickle", "data": evil, "type": "int", "repr": "41"}
    forged = json.dumps(envelope).encode()
    with psycopg.connect(pg_dsn) as connection:
        connection.execute(
            "UPDATE sessions SET document = %s WHERE session_id = %s", (forged, session_id)
        )

    server.start()
    client = server.tcp_client(timeout=30)
    reply = client.call("restore_session", client_id="alice", session_id=session_id)
    assert reply["status"] == "error", reply
    client.close()
    assert not marker.exists()
    assert session_rows(pg_dsn) == []
    with psycopg.connect(pg_dsn) as connection:
        rows = connection.execute(
            "SELECT source, client_id, session_id, document, reason FROM quarantine"
        ).fetchall()
    assert [(r[0], r[1], r[2], bytes(r[3])) for r in rows] == [
        ("sessions", "alice", session_id, forged)
    ]
    assert "MAC mismatch" in rows[0][4]
    assert "quarantined sessions row" in server.log_text()


def test_always_kill9_loses_no_acknowledged_update_on_postgresql(tmp_path, pg_dsn):
    """KILL9_CYCLES × SIGKILL mid-stream with durability=always on PostgreSQL: stored ≥ acknowledged."""
    import random
    import time

    from benchmarks.killloop import create_counter_session, kill_cycle, stored_counter
    from tests.helpers import KILL9_CYCLES
    from tests.serverproc import ServerProcess

    rng = random.Random(int(time.time()))
    server = ServerProcess(
        tmp_path,
        f"--store=postgresql:{pg_dsn}",
        f"--secret-file={tmp_path / 'node' / 'secret.key'}",
        "--durability=always",
        image=False,
        zmq=False,
    ).start()
    outcomes = []
    try:
        session_id = create_counter_session(server, "crash")
        stored = 0
        for _ in range(KILL9_CYCLES):
            cycle = kill_cycle(server, session_id, "crash", stored, rng.uniform(0.02, 0.25))
            server.start()
            stored = stored_counter(server, session_id, "crash")
            outcomes.append(cycle.outcome(stored))
    finally:
        server.kill()
    assert sum(o["acks"] for o in outcomes) >= KILL9_CYCLES, outcomes  # the stream really ran
    for number, o in enumerate(outcomes):
        assert not o["errors"], (number, o)
        assert o["stored"] >= o["acked"], f"cycle {number}: acknowledged {o['acked']}: {o}"
        assert o["stored"] <= max(o["sent"], o["start"]), f"cycle {number}: never sent: {o}"


def test_batch_flushes_reach_postgresql_before_a_kill9(tmp_path, start_server, pg_dsn):
    """Under batch, an update is in the database one flush later; kill -9 keeps it."""
    import time

    server = start_server(
        tmp_path,
        f"--store=postgresql:{pg_dsn}",
        f"--secret-file={tmp_path / 'node' / 'secret.key'}",
        "--durability=batch",
        "--flush-interval=0.1",
        image=False,
        zmq=False,
    )
    client = server.tcp_client(timeout=30)
    ids = [client.result("create_session", client_id=f"c{n}")["session_id"] for n in range(3)]
    for number, session_id in enumerate(ids):
        client.result("update_session_state", session_id=session_id, state_data={"n": number})
    client.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        states = []
        for _client_id, _sid, document in session_rows(pg_dsn):
            states.append(json.loads(bytes(document))["session"].get("session_state"))
        if len(states) == 3 and all(state for state in states):
            break
        time.sleep(0.05)
    assert sorted(state["n"] for state in states) == [0, 1, 2], states
    server.process.kill()
    server.process.wait(30)
    server.start()
    client = server.tcp_client(timeout=30)
    for number, session_id in enumerate(ids):
        restored = client.result("restore_session", client_id=f"c{number}", session_id=session_id)
        assert restored["session_state"] == {"n": number}, restored
    client.close()


def test_admin_migrate_copies_every_session_verified_and_is_idempotent(tmp_path, pg_dsn):
    """stui-admin migrate: file data directory -> PostgreSQL; a bad file is not copied."""
    import os
    import subprocess
    import sys

    from tests.serverproc import REPO_ROOT

    data_dir = tmp_path / "stui-data"
    script = """
import sys
from twisted.internet import task
from stui_twisted.storage.store import SessionStore
from tests.unit.test_store_backends import make_session

async def main(reactor):
    store = SessionStore(sys.argv[1], reactor=reactor)
    await store.open()
    for number, client in ((1, "alice"), (2, "bob"), (3, "bob")):
        await store.write(make_session(client, number))
    await store.write(make_session("alice", 1, session_state={"saved": 1}), saved_copy=True)
    await store.write_shared({"team": {"encoding": "json", "value": 7}})
    await store.close()

task.react(main)
"""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    subprocess.run([sys.executable, "-c", script, str(data_dir)], check=True, env=env, timeout=60)
    bad = next((data_dir / "sessions").glob("*/s_*3.json"))
    bad.write_bytes(bad.read_bytes().replace(b'"n":3', b'"n":4'))

    def migrate():
        return subprocess.run(
            [sys.executable, "-m", "stui_twisted.ops.admin", "migrate"]
            + [f"--from=file:{data_dir}", f"--to=postgresql:{pg_dsn}", "--node-id=a"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    # the tampered file fails its MAC in the source store: quarantined there, as the
    # server would, named on stderr, never copied
    result = migrate()
    assert result.returncode == 0, result.stderr
    assert "copied 2 sessions, 1 saved copies and 1 shared namespace" in result.stdout
    assert "MAC mismatch" in result.stderr and bad.name in result.stderr
    assert not bad.exists()
    again = migrate()  # idempotent: the same sessions again, nothing doubled
    assert again.returncode == 0, again.stderr
    assert "copied 2 sessions, 1 saved copies and 1 shared namespace" in again.stdout
    rows = session_rows(pg_dsn)
    assert [(r[0], r[1][-1]) for r in rows] == [("alice", "1"), ("bob", "2")]
    with psycopg.connect(pg_dsn) as connection:
        saved = connection.execute("SELECT session_id FROM saved_copies").fetchall()
        shared = connection.execute("SELECT node_id FROM shared").fetchall()
    assert [s[0][-1] for s in saved] == ["1"] and shared == [("a",)]
    # the rows verify with the data directory's key: the store reads them back
    for _client_id, _sid, document in rows:
        assert json.loads(bytes(document))["format"] == "stui-session"


def test_second_node_answers_elsewhere_then_takes_over_after_kill9(tmp_path, start_server, pg_dsn):
    """Two nodes, one database: A is killed with kill -9 holding a session; B sends
    clients to A while A's lease is fresh, then serves the session with x and the
    instance back once the lease has run out."""
    import time

    def node(name):
        # a lease lives 3 s: fresh for at least 2 s after the kill
        lease = (f"--advertise={name}.example:7555", "--lease-interval=1", "--durability=always")
        flags = pg_node_flags(pg_dsn, tmp_path / "secret.key", name, *lease)
        return start_server(tmp_path / name, *flags, zmq=False)

    a, b = node("a"), node("b")
    client = a.tcp_client(timeout=30)
    ping = client.result("ping")
    assert ping["node"] == {"node_id": "a", "advertise": "a.example:7555"}, ping
    assert ping["message"] == "pong" and "image" in ping  # the old fields stay
    session_id = client.result("create_session", client_id="alice")["session_id"]
    code = "class Point:\n    def __init__(self, x):\n        self.x = x\nx = 41\np = Point(x + 1)"
    assert client.result("evaluate", session_id=session_id, code=code)["has_error"] is False
    client.close()

    other = b.tcp_client(timeout=30)
    # B sees A's session (created after B started) in its lists and statistics
    listed = other.result("list_client_sessions", client_id="alice")["sessions"]
    assert [s["session_id"] for s in listed] == [session_id], listed
    assert other.result("get_session_statistics")["active_sessions"] == 1

    a.process.kill()  # SIGKILL: A's lease stays in the database until it runs out
    killed_at = time.monotonic()
    a.process.wait(30)
    reply = other.call("restore_session", client_id="alice", session_id=session_id)
    assert reply["status"] == "error" and reply["error_type"] == "SessionElsewhere", reply
    assert reply["details"]["node_id"] == "a", reply
    assert reply["details"]["advertise"] == "a.example:7555", reply
    assert time.monotonic() - killed_at < 2.0  # within the lease's fresh window

    deadline = time.monotonic() + 30
    while reply["status"] == "error" and time.monotonic() < deadline:
        assert reply["error_type"] == "SessionElsewhere", reply
        time.sleep(0.1)
        reply = other.call("restore_session", client_id="alice", session_id=session_id)
    assert reply["status"] == "success", reply
    assert {"x", "p"} <= set(reply["result"]["restored_bindings"]), reply
    result = other.result("evaluate", session_id=session_id, code="(x, p.x, type(p).__name__)")
    assert result["result"] == "(41, 42, 'Point')", result
    assert "took over session" in b.log_text()
    other.close()


def lease_rows(dsn):
    with psycopg.connect(dsn) as connection:
        return connection.execute("SELECT session_id, node_id FROM leases").fetchall()


def test_clean_shutdown_and_close_give_the_lease_up_at_once(tmp_path, start_server, pg_dsn):
    """SIGTERM of A gives its leases up: B serves A's session at once, not after the
    lease (3 × 5 s) ran out; close_session on B gives B's lease up."""
    import time

    def node(name):
        flags = pg_node_flags(pg_dsn, tmp_path / "secret.key", name, "--durability=batch")
        return start_server(tmp_path / name, *flags, image=False, zmq=False)

    a, b = node("a"), node("b")
    client = a.tcp_client(timeout=30)
    session_id = client.result("create_session", client_id="alice")["session_id"]
    client.result("update_session_state", session_id=session_id, state_data={"n": 7})
    client.close()
    deadline = time.monotonic() + 10
    while not lease_rows(pg_dsn) and time.monotonic() < deadline:
        time.sleep(0.05)  # under batch, the row and its lease come with the next flush
    other = b.tcp_client(timeout=30)
    reply = other.call("restore_session", client_id="alice", session_id=session_id)
    assert reply["error_type"] == "SessionElsewhere", reply
    assert reply["details"] == {"session_id": session_id, "node_id": "a", "advertise": None}
    assert a.stop() == 0  # the final flush, then the leases are given up
    assert lease_rows(pg_dsn) == []
    restored = other.result("restore_session", client_id="alice", session_id=session_id)
    assert restored["session_state"] == {"n": 7}, restored
    assert lease_rows(pg_dsn) == [(session_id, "b")]
    other.result("close_session", session_id=session_id)
    assert lease_rows(pg_dsn) == []
    reply = other.call("restore_session", client_id="alice", session_id=session_id)
    assert reply["error_type"] == "SessionClosed", reply
    assert lease_rows(pg_dsn) == []  # no lease is taken for a session that ended
    other.close()


def test_a_node_that_lost_its_lease_sends_clients_to_the_new_holder(tmp_path, start_server, pg_dsn):
    """A stalls past its lease (simulated in the database); B takes the session over. A's
    late update is refused, never written over B's, and A then names B as the holder."""
    import time

    def node(name):
        lease = (f"--advertise={name}.example:7555", "--lease-interval=0.5", "--durability=always")
        flags = pg_node_flags(pg_dsn, tmp_path / "secret.key", name, *lease)
        return start_server(tmp_path / name, *flags, image=False, zmq=False)

    a, b = node("a"), node("b")
    on_a, on_b = a.tcp_client(timeout=30), b.tcp_client(timeout=30)
    session_id = on_a.result("create_session", client_id="alice")["session_id"]
    on_a.result("update_session_state", session_id=session_id, state_data={"n": 1})
    with psycopg.connect(pg_dsn) as connection:  # as if A had missed three renewals
        connection.execute("UPDATE leases SET expires_at = now() - interval '1 second'")
    restored = on_b.result("restore_session", client_id="alice", session_id=session_id)
    assert restored["session_state"] == {"n": 1}, restored
    on_b.result("update_session_state", session_id=session_id, state_data={"n": 2})

    late = on_a.call("update_session_state", session_id=session_id, state_data={"n": 99})
    assert late["status"] == "error", late
    assert late["error_type"] in ("StorageError", "SessionElsewhere"), late
    deadline = time.monotonic() + 10
    while late["error_type"] != "SessionElsewhere" and time.monotonic() < deadline:
        time.sleep(0.1)  # A's next renewal finds the lease gone
        late = on_a.call("restore_session", client_id="alice", session_id=session_id)
    assert late["error_type"] == "SessionElsewhere", late
    assert late["details"]["node_id"] == "b" and late["details"]["advertise"] == "b.example:7555"
    again = on_b.result("restore_session", client_id="alice", session_id=session_id)
    assert again["session_state"] == {"n": 2}, again
    assert "lost the lease" in a.log_text() or "another node holds the lease" in a.log_text()
    on_a.close()
    on_b.close()
