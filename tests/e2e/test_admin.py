"""stui-admin against data directories written by a real SessionStore and a real server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stui_twisted.events.log import log_path
from stui_twisted.ops.admin import (
    _server_data_dir,
    effective_state,
    parse_quarantine_name,
    running_servers,
)
from stui_twisted.protocol.envelope import iso_timestamp
from stui_twisted.storage.pathcodec import encode_client_dir
from tests.serverproc import REPO_ROOT, ServerProcess

pytestmark = pytest.mark.timeout(120)

NOW = time.time()


def document(number: int, client_id: str, state: str = "active", idle: float = 0.0) -> dict:
    moment = iso_timestamp(NOW - idle)
    return {
        "session_id": f"s_{number:022d}",
        "client_id": client_id,
        "state": state,
        "created_at": iso_timestamp(NOW - idle - 10),
        "last_modified": moment,
        "last_activity": moment,
        "timeout": 3600.0,
        "closed_at": moment if state == "closed" else None,
        "session_state": {"n": number},
    }


ACTIVE = document(1, "alice")
IDLE = document(2, "alice", idle=7200)  # past its timeout: expired though marked active
CLOSED = document(3, "bob", "closed")
EXPIRED = document(4, "carol@example.org", "expired", idle=9000)
DOCUMENTS = (ACTIVE, IDLE, CLOSED, EXPIRED)


STORE_SCRIPT = """
import json, sys
from twisted.internet import task
from stui_twisted.storage.store import SessionStore

async def main(reactor, data_dir, operation, payload):
    store = SessionStore(data_dir, reactor=reactor)
    await store.open()
    try:
        job = json.loads(payload)
        if operation == "write":
            for document in job["documents"]:
                await store.write(document)
            await store.write_index(job["index"])
        else:
            try:
                document = await store.read(job["client_id"], job["session_id"])
            except Exception as error:
                document = {"error": type(error).__name__}
            print(json.dumps(document))
    finally:
        await store.close()

task.react(main, sys.argv[1:])
"""


def with_store(data_dir: Path, operation: str, job: dict):
    """Run one SessionStore operation in a child process (it needs a reactor of its own)."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run(
        [sys.executable, "-c", STORE_SCRIPT, str(data_dir), operation, json.dumps(job)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout) if operation == "read" else None


@pytest.fixture(scope="module")
def written_data_dir(tmp_path_factory):
    """Four sessions (one written twice, so it has a .bak) and an index, written once per
    module by a real SessionStore (one child process, ~1 s); tests get copies."""
    path = tmp_path_factory.mktemp("admin-written") / "stui-data"
    again = dict(ACTIVE, session_state={"n": 1, "again": True})
    with_store(path, "write", {"documents": [*DOCUMENTS, again], "index": list(DOCUMENTS)})
    return path


@pytest.fixture
def data_dir(tmp_path, written_data_dir):
    """A data directory of its own for the test: a copy (modes and times kept) of
    L{written_data_dir}, which holds no path of its own."""
    path = tmp_path / "stui-data"
    shutil.copytree(written_data_dir, path, symlinks=True)
    return path


def admin(data_dir: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(
        [sys.executable, "-m", "stui_twisted.ops.admin", "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=cwd or data_dir.parent,
    )


def session_file(data_dir: Path, doc: dict) -> Path:
    return data_dir / "sessions" / encode_client_dir(doc["client_id"]) / f"{doc['session_id']}.json"


def listed(data_dir: Path, *args: str) -> dict[str, dict]:
    result = admin(data_dir, "list", "--json", *args)
    assert result.returncode == 0, result.stderr
    return {row["session_id"]: row for row in json.loads(result.stdout)}


# ------------------------------------------------------------------ list


def test_list_shows_every_session_with_client_state_activity_and_size(data_dir):
    result = admin(data_dir, "list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["SESSION_ID", "CLIENT", "STATE", "LAST_ACTIVITY", "SIZE"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {doc["session_id"] for doc in DOCUMENTS}
    assert rows[ACTIVE["session_id"]][1:4] == ["alice", "active", ACTIVE["last_activity"]]
    assert rows[IDLE["session_id"]][2] == "expired"
    assert rows[CLOSED["session_id"]][1:3] == ["bob", "closed"]
    assert rows[EXPIRED["session_id"]][1:3] == ["carol@example.org", "expired"]
    size = os.stat(session_file(data_dir, ACTIVE)).st_size
    assert rows[ACTIVE["session_id"]][4] == str(size)
    assert "4 sessions" in result.stderr


def test_list_filters_and_json(data_dir):
    rows = listed(data_dir, "--client", "alice")
    assert set(rows) == {ACTIVE["session_id"], IDLE["session_id"]}
    assert rows[IDLE["session_id"]]["state"] == "active"
    assert rows[IDLE["session_id"]]["effective_state"] == "expired"
    assert set(listed(data_dir, "--state", "expired")) == {
        IDLE["session_id"],
        EXPIRED["session_id"],
    }


def test_list_without_an_index_scans_the_files(data_dir):
    (data_dir / "index.json").unlink()
    assert set(listed(data_dir)) == {doc["session_id"] for doc in DOCUMENTS}


def test_shares_shows_which_sessions_are_shared_with_whom(tmp_path):
    path = tmp_path / "stui-data"
    pair = dict(
        ACTIVE,
        shares=[{"client_id": "dan", "access": "write"}, {"client_id": "bob", "access": "read"}],
    )
    closed = dict(CLOSED, shares=[{"client_id": "alice", "access": "read"}])
    documents = [pair, closed, IDLE]
    with_store(path, "write", {"documents": documents, "index": documents})
    table = admin(path, "shares")
    assert table.returncode == 0, table.stderr
    lines = [line.split() for line in table.stdout.splitlines()]
    assert lines == [
        ["SESSION_ID", "OWNER", "SHARED_WITH", "ACCESS", "STATE"],
        [ACTIVE["session_id"], "alice", "bob", "read", "active"],
        [ACTIVE["session_id"], "alice", "dan", "write", "active"],
        [CLOSED["session_id"], "bob", "alice", "read", "closed"],
    ]
    assert "3 shares of 2 sessions" in table.stderr
    (path / "index.json").unlink()  # the same from the session files alone
    only = admin(path, "shares", "--json", "--with", "dan")
    assert only.returncode == 0, only.stderr
    assert json.loads(only.stdout) == [
        {
            "session_id": ACTIVE["session_id"],
            "owner": "alice",
            "shared_with": "dan",
            "access": "write",
            "effective_state": "active",
        }
    ]
    owned = json.loads(admin(path, "shares", "--json", "--client", "bob").stdout)
    assert [(r["owner"], r["shared_with"]) for r in owned] == [("bob", "alice")]


def test_effective_state():
    assert (
        effective_state(
            {"state": "active", "last_activity": iso_timestamp(NOW), "timeout": 60}, NOW
        )
        == "active"
    )
    assert (
        effective_state({"state": "active", "last_activity": NOW - 61, "timeout": 60}, NOW)
        == "expired"
    )
    assert effective_state({"state": "closed"}, NOW) == "closed"


# ------------------------------------------------------------------ refusing bad data dirs


def test_a_missing_data_dir_is_refused(tmp_path):
    result = admin(tmp_path / "nope", "list")
    assert result.returncode == 2
    assert "no data directory" in result.stderr
    assert not (tmp_path / "nope").exists()


def test_a_directory_without_secret_key_is_refused_and_left_alone(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = admin(empty, "verify")
    assert result.returncode == 2
    assert "secret.key" in result.stderr
    assert list(empty.iterdir()) == []


# ------------------------------------------------------------------ verify


def test_verify_passes_on_good_files(data_dir):
    result = admin(data_dir, "verify")
    assert result.returncode == 0, result.stdout + result.stderr
    # 4 sessions + 1 backup + the index
    assert "6 files checked: 6 ok, 0 bad" in result.stderr


def test_verify_fails_and_names_a_tampered_file(data_dir):
    path = session_file(data_dir, CLOSED)
    path.write_bytes(path.read_bytes().replace(b'"bob"', b'"bot"'))
    result = admin(data_dir, "verify")
    assert result.returncode == 1
    relative = str(path.relative_to(data_dir))
    assert f"BAD   {relative}" in result.stdout
    assert "1 bad" in result.stderr
    rows = json.loads(admin(data_dir, "verify", "--json").stdout)
    bad = [row for row in rows if not row["ok"]]
    assert [row["path"] for row in bad] == [relative]
    assert bad[0]["session_id"] == CLOSED["session_id"]
    # verify moves nothing
    assert path.exists()
    assert list((data_dir / "quarantine").iterdir()) == []


def test_verify_reports_temp_files_without_failing(data_dir):
    temp = session_file(data_dir, ACTIVE).parent / ".s_0000000000000000000001.json.tmp-abcdef"
    temp.write_bytes(b"{")
    result = admin(data_dir, "verify")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "TEMP" in result.stdout
    assert "1 temporary" in result.stderr


# ------------------------------------------------------------------ quarantine


def test_quarantine_lists_files_the_store_moved_away(data_dir):
    assert admin(data_dir, "quarantine").returncode == 0
    main = session_file(data_dir, CLOSED)  # written once: no .bak to fall back on
    main.write_bytes(main.read_bytes().replace(b'"n":3', b'"n":4'))

    read = with_store(data_dir, "read", CLOSED)
    assert read == {"error": "SessionFileCorrupt"}
    result = admin(data_dir, "quarantine", "--json")
    assert result.returncode == 0, result.stderr
    [row] = json.loads(result.stdout)
    assert row["client_id"] == "bob"
    assert row["session_id"] == CLOSED["session_id"]
    assert row["original"] == str(main.relative_to(data_dir))
    assert row["size_bytes"] > 0
    assert (data_dir / "quarantine" / row["file"]).exists()
    table = admin(data_dir, "quarantine")
    assert CLOSED["session_id"] in table.stdout
    assert "1 files in" in table.stderr


def test_parse_quarantine_name():
    client_dir = encode_client_dir("carol@example.org")
    info = parse_quarantine_name(
        f"20261123T102233-0123456789ab-sessions__{client_dir}-s_abc-DEF_ghi0123456789.json.bak"
    )
    assert info["quarantined_at"] == "2026-11-23T10:22:33Z"
    assert info["client_id"] == "carol@example.org"
    assert info["session_id"] == "s_abc-DEF_ghi0123456789"
    assert info["original"] == f"sessions/{client_dir}/s_abc-DEF_ghi0123456789.json.bak"
    index = parse_quarantine_name("20261123T102233-0123456789ab-.-index.json")
    assert index["original"] == "index.json"
    assert index["session_id"] is None
    assert parse_quarantine_name("something-else")["original"] is None


# ------------------------------------------------------------------ expire and delete


def test_expire_marks_a_session_expired_now(data_dir):
    before = time.time()
    result = admin(data_dir, "expire", ACTIVE["session_id"])
    after = time.time()
    assert result.returncode == 0, result.stderr
    assert "expired session" in result.stdout
    row = listed(data_dir)[ACTIVE["session_id"]]
    assert row["state"] == "expired"

    doc = with_store(data_dir, "read", ACTIVE)
    assert doc["state"] == "expired"
    assert doc["session_state"] == {"n": 1, "again": True}  # content untouched
    # expires_at = last_activity + timeout = the moment of the expire (ACTIVE's
    # last_activity is NOW, when this module was imported, however long ago)
    assert before - NOW - 1 <= doc["timeout"] <= after - NOW + 1, doc["timeout"]
    assert admin(data_dir, "verify").returncode == 0

    again = admin(data_dir, "expire", ACTIVE["session_id"])
    assert again.returncode == 0
    assert "already expired" in again.stdout


def test_expire_refuses_closed_and_unknown_sessions(data_dir):
    closed = admin(data_dir, "expire", CLOSED["session_id"])
    assert closed.returncode == 1
    assert "closed" in closed.stderr
    unknown = admin(data_dir, "expire", "s_" + "Z" * 22)
    assert unknown.returncode == 2
    assert "no session" in unknown.stderr


def test_delete_needs_yes_then_removes_the_files(data_dir):
    main = session_file(data_dir, ACTIVE)
    backup = main.with_name(main.name + ".bak")
    assert backup.exists()
    events = Path(log_path(str(data_dir), ACTIVE["session_id"]))
    events.parent.mkdir()
    events.write_bytes(b"")  # its event log goes with it
    refused = admin(data_dir, "delete", ACTIVE["session_id"])
    assert refused.returncode == 1
    assert "--yes" in refused.stderr
    assert main.exists()

    result = admin(data_dir, "delete", ACTIVE["session_id"], "--yes")
    assert result.returncode == 0, result.stderr
    assert not main.exists() and not backup.exists() and not events.exists()
    assert ACTIVE["session_id"] not in listed(data_dir)
    assert len(listed(data_dir)) == 3
    assert admin(data_dir, "verify").returncode == 0


# ------------------------------------------------------------------ with a real server


@pytest.mark.e2e
def test_offline_operations_against_a_real_server(tmp_path):
    server = ServerProcess(tmp_path, image=False)
    with server:
        client = server.tcp_client()
        kept = client.result("create_session", client_id="alice")["session_id"]
        expired = client.result("create_session", client_id="alice")["session_id"]
        deleted = client.result("create_session", client_id="bob")["session_id"]
        client.result("update_session_state", session_id=kept, state_data={"x": 42})
        client.close()

        # While it runs: reading is fine, changing is refused.
        assert set(listed(server.data_dir)) == {kept, expired, deleted}
        refused = admin(server.data_dir, "expire", expired, cwd=tmp_path)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "stop it first" in refused.stderr
        assert admin(server.data_dir, "delete", deleted, "--yes").returncode == 1
        assert server.stop() == 0

    assert admin(server.data_dir, "verify").returncode == 0
    assert admin(server.data_dir, "expire", expired).returncode == 0
    assert admin(server.data_dir, "delete", deleted, "--yes").returncode == 0

    with server:  # starts it again on the same data dir
        client = server.tcp_client()
        assert client.result("restore_session", session_id=kept)["session_state"] == {"x": 42}
        reply = client.call("restore_session", session_id=expired)
        assert reply["error_type"] == "SessionExpired", reply
        reply = client.call("restore_session", session_id=deleted)
        assert reply["error_type"] == "SessionNotFound", reply
        client.close()
        assert server.stop() == 0


def test_server_data_dir_from_a_command_line(tmp_path):
    ini = tmp_path / "stui.ini"
    ini.write_text("[stui]\ndata_dir = /srv/stui\n")
    base = ["python", "-c", "from twisted.scripts.twistd import run", "-n", "stui"]
    assert _server_data_dir([*base, "--data-dir=d"], str(tmp_path)) == str(tmp_path / "d")
    assert _server_data_dir([*base, "--data-dir", "/abs"], "/x") == "/abs"
    assert _server_data_dir([*base, f"--config={ini}"], "/x") == "/srv/stui"
    assert _server_data_dir([*base, "-c", "stui.ini"], str(tmp_path)) == "/srv/stui"
    assert _server_data_dir([*base], str(tmp_path)) == str(tmp_path / "stui-data")
    assert _server_data_dir([*base], None) is None


def test_running_servers_finds_a_real_twistd(tmp_path):
    if not os.path.isdir("/proc"):
        pytest.skip("needs /proc")
    server = ServerProcess(tmp_path, image=False, zmq=False)
    with server:
        found = running_servers(str(server.data_dir))
        assert (server.process.pid, os.path.realpath(server.data_dir)) in found
        assert running_servers(str(tmp_path / "elsewhere")) == [
            entry for entry in running_servers(str(tmp_path / "elsewhere")) if entry[1] is None
        ]
        assert server.stop() == 0
