"""The store-level cases that apply to both stores, run against each: file and PostgreSQL.

The PostgreSQL store runs against the test session's throwaway cluster (conftest
C{pg_cluster}), one fresh database per test.
"""

from __future__ import annotations

import hashlib
import json
import os

import psycopg
import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from stui_twisted.storage.errors import RecordTooLarge
from stui_twisted.storage.interface import ISessionStore
from stui_twisted.storage.pathcodec import encode_client_dir
from stui_twisted.storage.postgres import PostgresSessionStore
from stui_twisted.storage.store import (
    SessionFileCorrupt,
    SessionFileMissing,
    SessionStore,
    WriteResult,
)
from tests.helpers import make_session

pytestmark = pytest.mark.timeout(60)

DEFERRED_TIMEOUT = 30


def the_reactor():
    from twisted.internet import reactor

    return reactor


def within_time_limit(deferred: defer.Deferred) -> defer.Deferred:
    return deferred.addTimeout(DEFERRED_TIMEOUT, the_reactor())


class FileBackend:
    name = "file"

    def __init__(self, tmp_path, request) -> None:
        self.data_dir = tmp_path / "data"

    def make(self, **options):
        return SessionStore(self.data_dir, reactor=the_reactor(), **options)

    def stored_bytes(self, store, session) -> bytes:
        with open(self._path(store, session), "rb") as handle:
            return handle.read()

    def forge(self, store, session, data: bytes) -> None:
        path = self._path(store, session)
        with open(path, "wb") as handle:
            handle.write(data)
        if os.path.exists(path + ".bak"):
            os.unlink(path + ".bak")

    def quarantined(self, store) -> list[bytes]:
        found = []
        for name in sorted(os.listdir(store.quarantine_dir)):
            with open(os.path.join(store.quarantine_dir, name), "rb") as handle:
                found.append(handle.read())
        return found

    def _path(self, store, session) -> str:
        return os.path.join(
            store.sessions_dir,
            encode_client_dir(session["client_id"]),
            session["session_id"] + ".json",
        )


class PostgresBackend:
    name = "postgresql"

    def __init__(self, tmp_path, request) -> None:
        self.dsn = request.getfixturevalue("pg_dsn")
        self.secret_file = str(tmp_path / "node" / "secret.key")

    def make(self, **options):
        return PostgresSessionStore(
            self.dsn, reactor=the_reactor(), secret_file=self.secret_file, **options
        )

    def stored_bytes(self, store, session) -> bytes:
        with psycopg.connect(self.dsn) as connection:
            row = connection.execute(
                "SELECT document FROM sessions WHERE client_id = %s AND session_id = %s",
                (session["client_id"], session["session_id"]),
            ).fetchone()
        return bytes(row[0])

    def forge(self, store, session, data: bytes) -> None:
        with psycopg.connect(self.dsn) as connection:
            connection.execute(
                "UPDATE sessions SET document = %s WHERE client_id = %s AND session_id = %s",
                (data, session["client_id"], session["session_id"]),
            )

    def quarantined(self, store) -> list[bytes]:
        with psycopg.connect(self.dsn) as connection:
            rows = connection.execute("SELECT document FROM quarantine ORDER BY id").fetchall()
        return [bytes(row[0]) for row in rows]


@pytest.fixture(params=[FileBackend, PostgresBackend], ids=["file", "postgresql"])
def backend(request, tmp_path):
    return request.param(tmp_path, request)


@pytest_twisted.async_yield_fixture
async def store(backend):
    session_store = backend.make()
    session_store.check()
    await within_time_limit(session_store.open())
    yield session_store
    await within_time_limit(session_store.close())


def test_both_stores_provide_the_interface(backend):
    assert verifyObject(ISessionStore, backend.make())


@pytest_twisted.ensureDeferred
async def test_round_trip_is_the_sealed_envelope(store, backend):
    session = make_session(payload={"unicode": "héllo ☃", "nested": [1, 2.5, None, True]})
    result = await within_time_limit(store.write(session))
    assert isinstance(result, WriteResult)
    assert await within_time_limit(store.read("alice", session["session_id"])) == session
    data = backend.stored_bytes(store, session)
    assert result.size_bytes == len(data)
    assert result.checksum == "sha256:" + hashlib.sha256(data).hexdigest()
    document = json.loads(data)
    assert document["format"] == "stui-session" and document["mac"].startswith("hmac-sha256:")
    assert document["saved_at"] == result.saved_at
    assert store.statistics()["files"] == 1
    assert store.statistics()["bytes"] == len(data)


@pytest_twisted.ensureDeferred
async def test_missing_session_is_a_key_error(store):
    with pytest.raises(SessionFileMissing) as caught:
        await within_time_limit(store.read("alice", make_session(number=9)["session_id"]))
    assert isinstance(caught.value, KeyError)


@pytest_twisted.ensureDeferred
async def test_writes_of_one_session_apply_in_call_order(store):
    writes = [store.write(make_session(session_state={"n": n})) for n in range(20)]
    await within_time_limit(defer.gatherResults(writes))
    read = await within_time_limit(store.read("alice", make_session()["session_id"]))
    assert read["session_state"] == {"n": 19}


@pytest_twisted.ensureDeferred
async def test_saved_copy_is_separate_from_the_session(store):
    session = make_session(session_state={"v": "live"})
    saved = make_session(session_state={"v": "saved"})
    await within_time_limit(store.write(session))
    await within_time_limit(
        store.write(saved, saved_at="2026-11-23T11:00:00.000Z", saved_copy=True)
    )
    read, saved_at = await within_time_limit(store.read_saved("alice", session["session_id"]))
    assert read == saved and saved_at == "2026-11-23T11:00:00.000Z"
    assert await within_time_limit(store.read("alice", session["session_id"])) == session
    with pytest.raises(SessionFileMissing):
        await within_time_limit(store.read_saved("alice", make_session(number=2)["session_id"]))


@pytest_twisted.ensureDeferred
async def test_write_many_reports_each_session(store):
    good = [make_session(number=n) for n in range(1, 6)]
    bad = make_session(number=7, client_id="")
    snapshot = store.snapshot(make_session(number=8))
    results = await within_time_limit(store.write_many([*good, bad, snapshot]))
    for session in [*good, make_session(number=8)]:
        assert isinstance(results[session["session_id"]], WriteResult)
        assert await within_time_limit(store.read("alice", session["session_id"])) == session
    assert isinstance(results[bad["session_id"]], Failure)
    assert store.statistics()["files"] == 6


@pytest_twisted.ensureDeferred
async def test_too_large_is_refused_before_any_io(backend):
    store = backend.make(max_session_bytes=1000)
    store.check()
    await within_time_limit(store.open())
    try:
        with pytest.raises(RecordTooLarge) as caught:
            await within_time_limit(store.write(make_session(blob="x" * 2000)))
        assert caught.value.max_bytes == 1000 and caught.value.size_bytes > 2000
        with pytest.raises(RecordTooLarge):
            store.snapshot(make_session(blob="x" * 2000))
    finally:
        await within_time_limit(store.close())


@pytest_twisted.ensureDeferred
async def test_delete_removes_session_and_saved_copy(store):
    session = make_session()
    await within_time_limit(store.write(session))
    await within_time_limit(store.write(session, saved_copy=True))
    await within_time_limit(store.delete("alice", session["session_id"]))
    with pytest.raises(SessionFileMissing):
        await within_time_limit(store.read("alice", session["session_id"]))
    with pytest.raises(SessionFileMissing):
        await within_time_limit(store.read_saved("alice", session["session_id"]))
    await within_time_limit(store.delete("alice", session["session_id"]))  # missing is fine
    assert store.statistics()["files"] == 0


@pytest_twisted.ensureDeferred
async def test_shared_bindings_round_trip(store):
    assert await within_time_limit(store.read_shared()) == {}
    await within_time_limit(store.write_shared({"team": {"pickle": "abc"}}))
    assert await within_time_limit(store.read_shared()) == {"team": {"pickle": "abc"}}


@pytest_twisted.ensureDeferred
async def test_load_index_after_reopen(backend):
    first = backend.make()
    first.check()
    await within_time_limit(first.open())
    sessions = [make_session(number=n, client_id=c) for n, c in ((1, "alice"), (2, "bob"))]
    sessions[0]["shares"] = [{"client_id": "bob", "access": "read"}]  # access.md §1
    for session in sessions:
        await within_time_limit(first.write(session))
    await within_time_limit(first.write_index(sessions))
    await within_time_limit(first.close())

    second = backend.make()
    second.check()
    await within_time_limit(second.open())
    try:
        metas = await within_time_limit(second.load_index())
        by_id = {meta["session_id"]: meta for meta in metas}
        assert set(by_id) == {s["session_id"] for s in sessions}
        for session in sessions:
            meta = by_id[session["session_id"]]
            assert meta["client_id"] == session["client_id"] and meta["state"] == "active"
            assert meta["shares"] == session["shares"]  # access is decided from the index
            assert meta["size_bytes"] == len(backend.stored_bytes(second, session))
        assert second.statistics()["files"] == 2
    finally:
        await within_time_limit(second.close())


@pytest_twisted.ensureDeferred
async def test_forged_document_is_quarantined_not_loaded(store, backend):
    session = make_session(session_state={"bindings": {"x": "pickle-of-41"}})
    await within_time_limit(store.write(session))
    data = backend.stored_bytes(store, session)
    forged = data.replace(b"pickle-of-41", b"pickle-of-66")
    assert forged != data
    backend.forge(store, session, forged)
    with pytest.raises(SessionFileCorrupt) as caught:
        await within_time_limit(store.read("alice", session["session_id"]))
    assert "MAC mismatch" in str(caught.value)
    assert backend.quarantined(store) == [forged]  # kept, byte for byte
    assert store.statistics()["quarantined"] == 1
    with pytest.raises(SessionFileMissing):  # gone from the live sessions
        await within_time_limit(store.read("alice", session["session_id"]))


@pytest_twisted.ensureDeferred
async def test_forged_document_is_quarantined_by_load_index(store, backend):
    good, bad = make_session(number=1), make_session(number=2)
    await within_time_limit(store.write_many([good, bad]))
    forged = backend.stored_bytes(store, bad).replace(b'"n":2', b'"n":3')
    backend.forge(store, bad, forged)
    metas = await within_time_limit(store.load_index())
    assert [meta["session_id"] for meta in metas] == [good["session_id"]]
    assert backend.quarantined(store) == [forged]


@pytest_twisted.ensureDeferred
async def test_metrics_show_the_postgresql_pool(store, backend):
    from types import SimpleNamespace

    from stui_twisted.ops.metrics import ServerCollector

    await within_time_limit(store.write_many([make_session(number=n) for n in (1, 2, 3)]))
    collector = ServerCollector(SimpleNamespace(store=store), connections=object())
    values = {family.name: family.samples[0].value for family in collector._storage()}
    assert values["stui_storage_files"] == 3
    if backend.name == "postgresql":
        assert values["stui_storage_pool_size"] == 4
        assert values["stui_storage_pool_in_use"] == 0
        assert values["stui_storage_transactions"] == 1  # three sessions, one transaction
        assert values["stui_storage_transaction_seconds"] > 0
    else:
        assert "stui_storage_pool_size" not in values


@pytest_twisted.ensureDeferred
async def test_postgresql_store_reconnects_after_its_connections_are_cut(pg_dsn, tmp_path):
    """The server ends every connection of the store (a restart, a failover): the next
    operations reconnect instead of failing forever."""
    store = PostgresSessionStore(
        pg_dsn, reactor=the_reactor(), secret_file=str(tmp_path / "k"), pool_size=1
    )
    store.check()
    await within_time_limit(store.open())
    try:
        session = make_session()
        await within_time_limit(store.write(session))
        with psycopg.connect(pg_dsn, autocommit=True) as connection:
            ended = connection.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchone()[0]
        assert ended == 1
        changed = make_session(session_state={"n": 2})
        await within_time_limit(store.write(changed))
        assert await within_time_limit(store.read("alice", session["session_id"])) == changed
    finally:
        await within_time_limit(store.close())


def test_postgresql_schema_is_created_once_and_a_newer_one_is_refused(pg_dsn, tmp_path):
    from stui_twisted.storage import pg_schema
    from stui_twisted.storage.errors import StorageFailure

    store = PostgresSessionStore(pg_dsn, reactor=the_reactor(), secret_file=str(tmp_path / "k"))
    store.check()
    store.check()  # a second start-up finds the schema current and changes nothing
    with psycopg.connect(pg_dsn, autocommit=True) as connection:
        versions = connection.execute(
            "SELECT version FROM schema_version ORDER BY version"
        ).fetchall()
        assert versions == [(version,) for version in sorted(pg_schema.MIGRATIONS)]
        tables = {
            row[0]
            for row in connection.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            )
        }
        assert {
            "sessions",
            "saved_copies",
            "shared",
            "quarantine",
            "leases",
            "schema_version",
        } <= tables
        connection.execute("INSERT INTO schema_version (version) VALUES (%s)", (999,))
    with pytest.raises(StorageFailure, match="schema is version 999, newer than"):
        store.check()


def test_postgresql_store_that_cannot_connect_fails_start_up_without_the_password(tmp_path):
    from stui_twisted.storage.errors import StorageFailure

    store = PostgresSessionStore(
        f"host={tmp_path} dbname=nothing password=sekrit",
        reactor=the_reactor(),
        secret_file=str(tmp_path / "k"),
    )
    with pytest.raises(StorageFailure) as caught:
        store.check()
    assert "sekrit" not in str(caught.value) and "dbname=nothing" in str(caught.value)
