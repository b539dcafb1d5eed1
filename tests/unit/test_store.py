"""SessionStore against a real thread pool and a temp directory."""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import stat

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.python.failure import Failure

from stui_twisted.storage import durable, index
from stui_twisted.storage import store as store_module
from stui_twisted.storage.errors import RecordTooLarge, StorageFailure
from stui_twisted.storage.pathcodec import decode_client_dir, encode_client_dir
from stui_twisted.storage.store import (
    SessionFileCorrupt,
    SessionFileMissing,
    SessionStore,
    WriteResult,
)
from tests.helpers import make_session

pytestmark = pytest.mark.timeout(30)

DEFERRED_TIMEOUT = 20


def the_reactor():
    from twisted.internet import reactor

    return reactor


def within_time_limit(deferred: defer.Deferred) -> defer.Deferred:
    """C{deferred}, failing with TimeoutError instead of hanging."""
    return deferred.addTimeout(DEFERRED_TIMEOUT, the_reactor())


async def opened_store(data_dir, **options) -> SessionStore:
    session_store = SessionStore(data_dir, reactor=the_reactor(), **options)
    await within_time_limit(session_store.open())
    return session_store


@pytest_twisted.async_yield_fixture
async def store(tmp_path):
    session_store = await opened_store(tmp_path / "data")
    yield session_store
    await within_time_limit(session_store.close())


def main_path(session_store: SessionStore, session: dict) -> str:
    return os.path.join(
        session_store.sessions_dir,
        encode_client_dir(session["client_id"]),
        session["session_id"] + ".json",
    )


def quarantined_files(session_store: SessionStore) -> list[str]:
    return sorted(os.listdir(session_store.quarantine_dir))


def all_paths(root) -> list[str]:
    found = []
    for directory, dirnames, filenames in os.walk(root):
        found.extend(os.path.join(directory, name) for name in dirnames + filenames)
    return found


# ---------------------------------------------------------------------- round trip and format


@pytest_twisted.ensureDeferred
async def test_round_trip_and_envelope(store):
    session = make_session(payload={"unicode": "héllo ☃", "nested": [1, 2.5, None, True]})
    result = await within_time_limit(store.write(session))
    assert isinstance(result, WriteResult)
    assert await within_time_limit(store.read("alice", session["session_id"])) == session

    with open(main_path(store, session), "rb") as handle:
        data = handle.read()
    assert result.size_bytes == len(data)
    assert result.checksum == "sha256:" + hashlib.sha256(data).hexdigest()
    assert result.saved_at.endswith("Z") and len(result.saved_at) == 24

    document = json.loads(data)
    assert set(document) == {"format", "version", "saved_at", "mac", "session"}
    assert document["format"] == "stui-session" and document["version"] == 1
    assert document["saved_at"] == result.saved_at
    # the MAC is exactly what the design says: HMAC-SHA256 over canonical JSON without "mac"
    with open(store.secret_key_path, "rb") as handle:
        secret_key = handle.read()
    unsigned = {key: value for key, value in document.items() if key != "mac"}
    canonical = json.dumps(unsigned, sort_keys=True, separators=(",", ":")).encode()
    expected = hmac.new(secret_key, canonical, hashlib.sha256).hexdigest()
    assert document["mac"] == "hmac-sha256:" + expected


@pytest_twisted.ensureDeferred
async def test_modes_of_directories_and_files(store):
    session = make_session()
    await within_time_limit(store.write(session))
    await within_time_limit(store.write(session))
    await within_time_limit(store.write_index([session]))
    await within_time_limit(store.write_shared({"x": 1}))
    with open(store.secret_key_path, "rb") as handle:
        assert len(handle.read()) == 32
    for path in [store.data_dir, *all_paths(store.data_dir)]:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        expected = 0o700 if os.path.isdir(path) else 0o600
        assert mode == expected, (path, oct(mode))


@pytest_twisted.ensureDeferred
async def test_secret_key_survives_reopen_and_bad_key_refuses_to_open(tmp_path):
    data_dir = tmp_path / "data"
    first = await opened_store(data_dir)
    session = make_session()
    await within_time_limit(first.write(session))
    await within_time_limit(first.close())
    second = await opened_store(data_dir)
    assert await within_time_limit(second.read("alice", session["session_id"])) == session
    await within_time_limit(second.close())

    (data_dir / "secret.key").write_bytes(b"short")
    third = SessionStore(data_dir, reactor=the_reactor())
    with pytest.raises(StorageFailure, match="secret.key"):
        await within_time_limit(third.open())


def test_constructor_touches_nothing(tmp_path):
    SessionStore(tmp_path / "data", reactor=the_reactor())
    assert not (tmp_path / "data").exists()


@pytest_twisted.ensureDeferred
async def test_backup_keeps_previous_version(store):
    session = make_session()
    await within_time_limit(store.write(session))
    assert not os.path.exists(main_path(store, session) + ".bak")
    second = dict(session, session_state={"n": 2})
    await within_time_limit(store.write(second))
    with open(main_path(store, session) + ".bak", "rb") as handle:
        assert json.load(handle)["session"] == session
    with open(main_path(store, session), "rb") as handle:
        assert json.load(handle)["session"] == second


# ---------------------------------------------------------------------- recovery


def truncate(path):
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)


def edit_payload(path):
    with open(path, "rb") as handle:
        document = json.load(handle)
    document["session"]["state"] = "closed"
    with open(path, "w") as handle:
        json.dump(document, handle)


def forge_mac(path):
    with open(path, "rb") as handle:
        document = json.load(handle)
    document["mac"] = "hmac-sha256:" + "0" * 64
    with open(path, "w") as handle:
        json.dump(document, handle)


def replace_with_garbage(path):
    with open(path, "wb") as handle:
        handle.write(b"\x00\xffnot json at all")


DAMAGES = [truncate, edit_payload, forge_mac, replace_with_garbage]


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda damage: damage.__name__)
@pytest_twisted.ensureDeferred
async def test_bad_main_file_is_quarantined_and_restored_from_backup(store, damage):
    older = make_session()
    newer = dict(older, session_state={"n": 2})
    await within_time_limit(store.write(older))
    await within_time_limit(store.write(newer))
    damage(main_path(store, older))

    assert await within_time_limit(store.read("alice", older["session_id"])) == older
    assert len(quarantined_files(store)) == 1
    assert store.statistics()["quarantined"] == 1
    # the backup was written back as the main file: a second read needs no recovery
    with open(main_path(store, older), "rb") as handle:
        assert json.load(handle)["session"] == older
    assert await within_time_limit(store.read("alice", older["session_id"])) == older
    assert len(quarantined_files(store)) == 1


@pytest_twisted.ensureDeferred
async def test_missing_main_file_is_restored_from_backup(store):
    older = make_session()
    await within_time_limit(store.write(older))
    await within_time_limit(store.write(dict(older, session_state={"n": 2})))
    os.unlink(main_path(store, older))
    assert await within_time_limit(store.read("alice", older["session_id"])) == older
    assert os.path.exists(main_path(store, older))
    assert quarantined_files(store) == []


@pytest_twisted.ensureDeferred
async def test_both_copies_bad_is_corrupt_and_both_quarantined(store):
    session = make_session()
    await within_time_limit(store.write(session))
    await within_time_limit(store.write(session))
    path = main_path(store, session)
    truncate(path)
    forge_mac(path + ".bak")
    with pytest.raises(SessionFileCorrupt) as caught:
        await within_time_limit(store.read("alice", session["session_id"]))
    assert isinstance(caught.value, StorageFailure)
    assert set(caught.value.reasons) == {"main", "backup"}
    assert len(quarantined_files(store)) == 2
    assert not os.path.exists(path) and not os.path.exists(path + ".bak")
    assert store.statistics()["quarantined"] == 2


@pytest_twisted.ensureDeferred
async def test_missing_session_is_session_file_missing(store):
    with pytest.raises(SessionFileMissing) as caught:
        await within_time_limit(store.read("alice", "s_" + "Z" * 22))
    assert isinstance(caught.value, KeyError)


@pytest_twisted.ensureDeferred
async def test_file_moved_to_another_sessions_path_is_refused(store):
    victim = make_session("bob", 1)
    await within_time_limit(store.write(victim))
    intruder = make_session("mallory", 2)
    await within_time_limit(store.write(intruder))
    os.replace(main_path(store, intruder), main_path(store, victim))
    with pytest.raises(SessionFileCorrupt, match="another session"):
        await within_time_limit(store.read("bob", victim["session_id"]))


# ---------------------------------------------------------------------- paths


HOSTILE_CLIENT_IDS = [
    "../../etc",
    "a/b",
    "..",
    ".",
    "/abs",
    "/etc/passwd",
    "C:\\windows",
    "ünïcødé ☃ 客户",
    "Alice",
    "alice",
    "-rf",
    "x" * 150,
]


@pytest_twisted.ensureDeferred
async def test_hostile_client_ids_stay_inside_sessions_dir(store, tmp_path):
    for number, client_id in enumerate(HOSTILE_CLIENT_IDS, 1):
        session = make_session(client_id, number)
        await within_time_limit(store.write(session))
        assert await within_time_limit(store.read(client_id, session["session_id"])) == session
    sessions_dir = os.path.realpath(store.sessions_dir)
    for path in all_paths(tmp_path):
        real = os.path.realpath(path)
        if real.startswith(sessions_dir + os.sep):
            continue
        assert os.path.dirname(real) in {os.path.realpath(store.data_dir), str(tmp_path)}, path
    client_dirs = os.listdir(store.sessions_dir)
    assert len(client_dirs) == len(HOSTILE_CLIENT_IDS)
    assert len({name.lower() for name in client_dirs}) == len(client_dirs)  # case-safe
    assert sorted(decode_client_dir(name) for name in client_dirs) == sorted(HOSTILE_CLIENT_IDS)


@pytest.mark.parametrize("client_id", ["", "a\x00b", "x" * 151, "\ud800", None, 42], ids=repr)
@pytest_twisted.ensureDeferred
async def test_unencodable_client_ids_are_refused(store, client_id):
    with pytest.raises(ValueError):
        await within_time_limit(store.write(make_session(client_id)))
    with pytest.raises(ValueError):
        await within_time_limit(store.read(client_id, "s_" + "A" * 22))
    assert os.listdir(store.sessions_dir) == []


@pytest.mark.parametrize(
    "session_id",
    ["../../x", "s_short", "s_" + "A" * 63, "s_abc/def_ghijklmnop", "x_" + "A" * 22, "", None],
    ids=repr,
)
@pytest_twisted.ensureDeferred
async def test_invalid_session_ids_are_refused(store, session_id):
    with pytest.raises(ValueError):
        await within_time_limit(store.write(make_session(session_id=session_id)))
    with pytest.raises(ValueError):
        await within_time_limit(store.delete("alice", session_id))
    assert os.listdir(store.sessions_dir) == []


def test_client_dir_codec_round_trips_and_rejects_non_canonical_names():
    for client_id in HOSTILE_CLIENT_IDS:
        name = encode_client_dir(client_id)
        assert name.startswith("c-") and set(name[2:]) <= set("abcdefghijklmnopqrstuvwxyz234567")
        assert len(name) <= 255
        assert decode_client_dir(name) == client_id
    assert decode_client_dir("..") is None
    assert decode_client_dir("c-MFRGG") is None  # upper case is not canonical
    assert decode_client_dir("c-mfrgg===") is None


# ---------------------------------------------------------------------- coalescing, groups


@pytest_twisted.ensureDeferred
async def test_concurrent_writes_of_one_session_coalesce(store, monkeypatch):
    session = make_session()
    target = main_path(store, session)
    replaced = []
    real_replace = os.replace

    def counting_replace(source, destination):
        if os.fspath(destination) == target:
            replaced.append(destination)
        return real_replace(source, destination)

    monkeypatch.setattr(os, "replace", counting_replace)
    writes = [store.write(dict(session, session_state={"n": n})) for n in range(50)]
    assert store.statistics()["pending_writes"] == 2  # one running, one coalesced
    results = await within_time_limit(defer.gatherResults(writes))
    assert all(isinstance(result, WriteResult) for result in results)
    assert len(replaced) < 50
    assert len(replaced) == 2
    assert results[0] != results[-1] and results[1] == results[-1]
    final = await within_time_limit(store.read("alice", session["session_id"]))
    assert final["session_state"] == {"n": 49}
    assert store.statistics()["pending_writes"] == 0


@pytest_twisted.ensureDeferred
async def test_write_snapshot_is_taken_at_call_time(store):
    session = make_session()
    written = store.write(session)
    session["session_state"] = {"changed": "after the call"}
    await within_time_limit(written)
    assert (await within_time_limit(store.read("alice", session["session_id"])))[
        "session_state"
    ] == {"n": 1}


@pytest_twisted.ensureDeferred
async def test_write_many_one_job_and_one_fsync_per_directory(tmp_path, monkeypatch):
    # the per-session files' path (first writes would go to the group journal:
    # tests/unit/test_store_journal.py)
    store = await opened_store(tmp_path / "data", journal_min_group=1000)
    sessions = [make_session(f"client-{number % 7}", number) for number in range(100)]
    await within_time_limit(store.write_many(sessions))  # creates the client dirs

    synced = []
    real_fsync_dir = durable.fsync_dir

    def counting_fsync_dir(path):
        synced.append(path)
        real_fsync_dir(path)

    monkeypatch.setattr(durable, "fsync_dir", counting_fsync_dir)
    updated = [dict(session, state="closed") for session in sessions]
    results = await within_time_limit(store.write_many(updated))
    assert set(results) == {session["session_id"] for session in sessions}
    assert all(isinstance(result, WriteResult) for result in results.values())
    assert sorted(synced) == sorted({os.path.dirname(main_path(store, s)) for s in sessions})
    for session in updated[:5]:
        read = await within_time_limit(store.read(session["client_id"], session["session_id"]))
        assert read["state"] == "closed"
    assert store.statistics()["files"] == 100
    await within_time_limit(store.close())


@pytest_twisted.ensureDeferred
async def test_write_many_finishes_a_group_with_a_few_deferreds_not_one_per_session(
    store, monkeypatch
):
    """Issue 21: a group of hundreds of sessions is answered by one callback chain.

    One Deferred per session (and a DeferredList over them) made finishing
    a 400-session flush a 2-3 ms turn of the reactor thread.
    """
    sessions = [make_session(f"client-{number % 7}", number) for number in range(200)]
    made = []
    real_init = defer.Deferred.__init__

    def counting_init(self, *args, **kwargs):
        made.append(1)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(defer.Deferred, "__init__", counting_init)
    results = await within_time_limit(store.write_many(sessions))
    monkeypatch.undo()
    assert set(results) == {session["session_id"] for session in sessions}
    assert all(isinstance(result, WriteResult) for result in results.values())
    assert len(made) < 20, f"{len(made)} Deferreds for one group of 200"


@pytest_twisted.ensureDeferred
async def test_write_many_reports_each_failure_and_keeps_order_with_single_writes(tmp_path):
    small_store = await opened_store(tmp_path / "data", max_session_bytes=4000)
    try:
        busy = make_session("alice", 1)
        first_write = small_store.write(busy)  # running while write_many is called
        batch = [
            dict(busy, session_state={"n": "from the batch"}),
            make_session("bob", 2),
            make_session("bob", 3, blob="x" * 5000),
            make_session("bob", session_id="../evil"),
        ]
        results = await within_time_limit(small_store.write_many(batch))
        await within_time_limit(first_write)
        assert isinstance(results[busy["session_id"]], WriteResult)
        assert isinstance(results["s_" + "0" * 21 + "2"], WriteResult)
        too_large = results["s_" + "0" * 21 + "3"]
        assert isinstance(too_large, Failure) and too_large.check(RecordTooLarge)
        assert isinstance(results["../evil"], Failure) and results["../evil"].check(ValueError)
        read = await within_time_limit(small_store.read("alice", busy["session_id"]))
        assert read["session_state"] == {"n": "from the batch"}
    finally:
        await within_time_limit(small_store.close())


# ---------------------------------------------------------------------- failures


@pytest_twisted.ensureDeferred
async def test_no_space_fails_with_storage_failure_and_keeps_old_file(store, monkeypatch):
    session = make_session()
    await within_time_limit(store.write(session))
    real_replace = os.replace

    def disk_full(source, destination):
        if os.fspath(destination).startswith(store.sessions_dir):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(destination))
        return real_replace(source, destination)

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(StorageFailure) as caught:
        await within_time_limit(store.write(dict(session, session_state={"n": 2})))
    assert "ENOSPC" in str(caught.value) and store.sessions_dir in str(caught.value)
    assert caught.value.errno == errno.ENOSPC
    assert store.statistics()["write_errors"] == 1
    monkeypatch.setattr(os, "replace", real_replace)
    assert await within_time_limit(store.read("alice", session["session_id"])) == session
    leftovers = [name for name in os.listdir(os.path.dirname(main_path(store, session)))]
    assert sorted(leftovers) == [session["session_id"] + ".json"]  # no temp files left


@pytest_twisted.ensureDeferred
async def test_read_only_directory_fails_with_storage_failure(store):
    session = make_session()
    await within_time_limit(store.write(session))
    client_dir = os.path.dirname(main_path(store, session))
    if os.geteuid() == 0:
        # root ignores directory modes: make the client directory a file instead
        os.rename(client_dir, client_dir + ".moved")
        with open(client_dir, "wb") as handle:
            handle.write(b"in the way")
        expected = "ENOTDIR|EEXIST"
    else:
        os.chmod(client_dir, 0o500)
        expected = "EACCES"
    try:
        with pytest.raises(StorageFailure, match=expected):
            await within_time_limit(store.write(dict(session, session_state={"n": 2})))
        assert store.statistics()["write_errors"] == 1
    finally:
        if os.geteuid() == 0:
            os.unlink(client_dir)
            os.rename(client_dir + ".moved", client_dir)
        else:
            os.chmod(client_dir, 0o700)
    assert await within_time_limit(store.read("alice", session["session_id"])) == session


@pytest_twisted.ensureDeferred
async def test_state_too_large_is_refused_before_touching_disk(tmp_path):
    small_store = await opened_store(tmp_path / "data", max_session_bytes=2000)
    try:
        session = make_session(blob="x" * 2000)
        with pytest.raises(RecordTooLarge) as caught:
            await within_time_limit(small_store.write(session))
        assert caught.value.max_bytes == 2000
        assert caught.value.size_bytes > 2000
        assert str(caught.value) == (
            f"{session['session_id']} would take {caught.value.size_bytes} bytes on disk,"
            " more than max_session_bytes (2000)"
        )
        assert os.listdir(small_store.sessions_dir) == []
        fitting = make_session(blob="x" * 100)
        result = await within_time_limit(small_store.write(fitting))
        assert result.size_bytes <= 2000
    finally:
        await within_time_limit(small_store.close())


@pytest_twisted.ensureDeferred
async def test_exact_size_limit(tmp_path):
    probe_store = await opened_store(tmp_path / "probe")
    session = make_session(blob="x" * 500)
    size = (await within_time_limit(probe_store.write(session))).size_bytes
    await within_time_limit(probe_store.close())
    exact_store = await opened_store(tmp_path / "exact", max_session_bytes=size)
    try:
        assert (await within_time_limit(exact_store.write(session))).size_bytes == size
        with pytest.raises(RecordTooLarge):
            await within_time_limit(exact_store.write(dict(session, blob="x" * 501)))
    finally:
        await within_time_limit(exact_store.close())


# ---------------------------------------------------------------------- index


def backdate(path, seconds=3600):
    status = os.stat(path)
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns - seconds * 1_000_000_000))


def by_session_id(metas):
    return {meta["session_id"]: meta for meta in metas}


@pytest_twisted.ensureDeferred
async def test_load_index_without_index_scans_every_file(store):
    sessions = [make_session(f"client-{number % 3}", number) for number in range(10)]
    await within_time_limit(store.write_many(sessions))
    metas = by_session_id(await within_time_limit(store.load_index()))
    assert set(metas) == {session["session_id"] for session in sessions}
    meta = metas[sessions[0]["session_id"]]
    assert {key: meta[key] for key in store_module.META_KEYS} == {
        key: sessions[0][key] for key in store_module.META_KEYS
    }
    assert meta["size_bytes"] == os.path.getsize(main_path(store, sessions[0]))
    assert "session_state" not in meta


@pytest_twisted.ensureDeferred
async def test_load_index_uses_index_and_reconciles(store):
    kept, changed, vanished, unindexed = (make_session("alice", n) for n in range(1, 5))
    await within_time_limit(store.write_many([kept, changed, vanished]))
    # the index says "closed" for kept: proof that its meta came from the index, not the file
    await within_time_limit(store.write_index([dict(kept, state="closed"), changed, vanished]))
    for session in (kept, changed, vanished):
        backdate(main_path(store, session))
    await within_time_limit(store.write(dict(changed, state="expired")))  # newer than index
    await within_time_limit(store.write(unindexed))  # not in the index
    await within_time_limit(store.delete("alice", vanished["session_id"]))

    metas = by_session_id(await within_time_limit(store.load_index()))
    assert set(metas) == {kept["session_id"], changed["session_id"], unindexed["session_id"]}
    assert metas[kept["session_id"]]["state"] == "closed"
    assert metas[changed["session_id"]]["state"] == "expired"
    assert metas[unindexed["session_id"]]["state"] == "active"
    assert store.statistics()["files"] == 3


@pytest_twisted.ensureDeferred
async def test_corrupt_index_is_quarantined_and_everything_scanned(store):
    sessions = [make_session("alice", number) for number in range(3)]
    await within_time_limit(store.write_many(sessions))
    await within_time_limit(store.write_index(sessions))
    edit = json.loads(open(store.index_path).read())
    edit["sessions"] = []
    with open(store.index_path, "w") as handle:
        json.dump(edit, handle)
    metas = await within_time_limit(store.load_index())
    assert len(metas) == 3
    assert not os.path.exists(store.index_path)
    assert len(quarantined_files(store)) == 1


@pytest_twisted.ensureDeferred
async def test_load_index_recovers_and_skips_bad_files(store):
    recoverable, lost = make_session("alice", 1), make_session("alice", 2)
    for session in (recoverable, lost, recoverable, lost):
        await within_time_limit(store.write(session))
    truncate(main_path(store, recoverable))
    truncate(main_path(store, lost))
    truncate(main_path(store, lost) + ".bak")
    metas = by_session_id(await within_time_limit(store.load_index()))
    assert set(metas) == {recoverable["session_id"]}
    assert len(quarantined_files(store)) == 3


# ---------------------------------------------------------------------- shared, delete, stats


@pytest_twisted.ensureDeferred
async def test_shared_bindings_round_trip_and_recover(store):
    assert await within_time_limit(store.read_shared()) == {}
    await within_time_limit(store.write_shared({"team": {"x": [1, 2]}}))
    await within_time_limit(store.write_shared({"team": {"x": [1, 2, 3]}}))
    assert await within_time_limit(store.read_shared()) == {"team": {"x": [1, 2, 3]}}
    with open(store.shared_path, "rb") as handle:
        document = json.load(handle)
    assert document["format"] == "stui-shared" and "mac" in document
    forge_mac(store.shared_path)
    assert await within_time_limit(store.read_shared()) == {"team": {"x": [1, 2]}}
    assert len(quarantined_files(store)) == 1


@pytest_twisted.ensureDeferred
async def test_delete_removes_file_and_backup_after_queued_writes(store):
    session = make_session()
    await within_time_limit(store.write(session))
    late_write = store.write(dict(session, session_state={"n": 2}))
    deleted = store.delete("alice", session["session_id"])
    await within_time_limit(defer.gatherResults([late_write, deleted]))
    path = main_path(store, session)
    assert not os.path.exists(path) and not os.path.exists(path + ".bak")
    with pytest.raises(SessionFileMissing):
        await within_time_limit(store.read("alice", session["session_id"]))
    await within_time_limit(store.delete("alice", session["session_id"]))  # idempotent
    await within_time_limit(store.delete("nobody", session["session_id"]))


@pytest_twisted.ensureDeferred
async def test_statistics_counters(store):
    assert store.statistics() == {
        "files": 0,
        "bytes": 0,
        "pending_writes": 0,
        "last_flush_at": None,
        "write_errors": 0,
        "quarantined": 0,
        "journal_records_pending": 0,
        "journals_on_disk": 0,
    }
    first, second = make_session("alice", 1), make_session("bob", 2)
    writing = store.write(first)
    assert store.statistics()["pending_writes"] == 1
    first_result = await within_time_limit(writing)
    second_result = await within_time_limit(store.write(second))
    statistics = store.statistics()
    assert statistics["files"] == 2
    assert statistics["bytes"] == first_result.size_bytes + second_result.size_bytes
    assert statistics["last_flush_at"] == second_result.saved_at
    assert statistics["pending_writes"] == 0
    await within_time_limit(store.delete("bob", second["session_id"]))
    assert store.statistics()["files"] == 1
    assert store.statistics()["bytes"] == first_result.size_bytes


@pytest_twisted.ensureDeferred
async def test_verify_all_reports_every_file(store):
    good, bad = make_session("alice", 1), make_session("alice", 2)
    await within_time_limit(store.write_many([good, bad]))
    await within_time_limit(store.write(good))
    await within_time_limit(store.write_index([good, bad]))
    edit_payload(main_path(store, bad))
    report = await within_time_limit(store.verify_all())
    rows = {row["path"]: row for row in report}
    bad_path = os.path.relpath(main_path(store, bad), store.data_dir)
    assert rows[bad_path]["ok"] is False and "MAC" in rows[bad_path]["reason"]
    assert rows[bad_path]["session_id"] == bad["session_id"]
    assert rows["index.json"]["ok"] is True and rows["index.json"]["kind"] == "index"
    assert sum(row["ok"] for row in report) == len(report) - 1
    assert [row["kind"] for row in report].count("backup") == 1
    assert quarantined_files(store) == []  # verification moves nothing


@pytest_twisted.ensureDeferred
async def test_close_waits_for_pending_writes_then_refuses_work(tmp_path):
    session_store = await opened_store(tmp_path / "data")
    writes = [session_store.write(make_session("alice", n)) for n in range(20)]
    await within_time_limit(session_store.close())
    assert all(write.called for write in writes)
    assert (
        len(os.listdir(os.path.join(session_store.sessions_dir, encode_client_dir("alice")))) == 20
    )
    with pytest.raises(StorageFailure, match="not open"):
        await within_time_limit(session_store.write(make_session()))


@pytest_twisted.ensureDeferred
async def test_quarantine_recovery_and_write_errors_are_logged(store, monkeypatch):
    from twisted.logger import Logger

    events = []
    monkeypatch.setattr(store, "log", Logger(observer=events.append, namespace="test"))
    session = make_session()
    await within_time_limit(store.write(session))
    await within_time_limit(store.write(session))
    truncate(main_path(store, session))
    await within_time_limit(store.read("alice", session["session_id"]))

    def disk_full(source, destination):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(destination))

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(StorageFailure):
        await within_time_limit(store.write(session))
    formats = [event["log_format"] for event in events]
    assert any(text.startswith("quarantined") for text in formats)
    assert any(text.startswith("recovered") for text in formats)
    assert any(text.startswith("write of") for text in formats)


@pytest_twisted.ensureDeferred
async def test_load_index_removes_only_stale_temp_files(store):
    session = make_session()
    await within_time_limit(store.write(session))
    client_dir = os.path.dirname(main_path(store, session))
    stale = os.path.join(client_dir, f".{session['session_id']}.json.tmp-0123456789ab")
    fresh = os.path.join(client_dir, f".{session['session_id']}.json.tmp-ba9876543210")
    for path in (stale, fresh):
        with open(path, "wb") as handle:
            handle.write(b'{"half a wri')
    backdate(stale, seconds=2 * index.STALE_TEMP_SECONDS)
    report = await within_time_limit(store.verify_all())
    assert sorted(row["kind"] for row in report if not row["ok"]) == ["temp", "temp"]
    await within_time_limit(store.load_index())
    assert not os.path.exists(stale) and os.path.exists(fresh)


@pytest_twisted.ensureDeferred
async def test_corrupt_session_is_no_longer_counted(store):
    session = make_session()
    await within_time_limit(store.write(session))
    replace_with_garbage(main_path(store, session))
    with pytest.raises(SessionFileCorrupt):
        await within_time_limit(store.read("alice", session["session_id"]))
    assert store.statistics()["files"] == 0 and store.statistics()["bytes"] == 0


@pytest_twisted.ensureDeferred
async def test_permission_denied_on_temp_file_fails_cleanly(store, monkeypatch):
    session = make_session()
    await within_time_limit(store.write(session))
    real_open = os.open

    def read_only_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and os.fspath(path).startswith(store.sessions_dir):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_open)
    results = await within_time_limit(
        store.write_many([dict(session, state="closed"), make_session("bob", 2)])
    )
    monkeypatch.setattr(os, "open", real_open)
    for result in results.values():
        assert isinstance(result, Failure) and result.check(StorageFailure)
        assert "EACCES" in str(result.value)
    assert store.statistics()["write_errors"] == 2
    assert await within_time_limit(store.read("alice", session["session_id"])) == session


@pytest_twisted.ensureDeferred
async def test_given_threadpool_is_used_and_left_running(tmp_path):
    from twisted.python.threadpool import ThreadPool

    pool = ThreadPool(minthreads=1, maxthreads=2, name="test-store-pool")
    pool.start()
    try:
        session_store = SessionStore(tmp_path / "data", reactor=the_reactor(), threadpool=pool)
        await within_time_limit(session_store.open())
        sessions = [make_session("alice", number) for number in range(10)]
        results = await within_time_limit(session_store.write_many(sessions))
        assert all(isinstance(result, WriteResult) for result in results.values())
        await within_time_limit(session_store.close())
        assert pool.started and pool.joined is False
    finally:
        pool.stop()


@pytest_twisted.ensureDeferred
async def test_read_after_write_sees_the_write(store):
    session = make_session()
    await within_time_limit(store.write(session))
    store.write(dict(session, session_state={"n": 2}))
    read = await within_time_limit(store.read("alice", session["session_id"]))
    assert read["session_state"] == {"n": 2}


@pytest_twisted.ensureDeferred
async def test_loose_secret_key_mode_is_tightened(tmp_path):
    first = await opened_store(tmp_path / "data")
    await within_time_limit(first.close())
    os.chmod(first.secret_key_path, 0o644)
    second = await opened_store(tmp_path / "data")
    try:
        assert stat.S_IMODE(os.stat(second.secret_key_path).st_mode) == 0o600
    finally:
        await within_time_limit(second.close())


@pytest_twisted.ensureDeferred
async def test_the_saved_copy_is_its_own_sealed_file_read_verified_and_deleted(tmp_path):
    """save_context's copy (issue 12.6): beside the session file, never taken for it."""
    session_store = await opened_store(tmp_path / "data")
    try:
        saved, later = make_session("alice", 1), make_session("alice", 1, session_state={"n": 2})
        stamp = "2026-12-01T10:00:00.123Z"
        result = await within_time_limit(
            session_store.write(saved, saved_at=stamp, saved_copy=True)
        )
        assert result.saved_at == stamp
        await within_time_limit(session_store.write(later))
        document, saved_at = await within_time_limit(
            session_store.read_saved("alice", saved["session_id"])
        )
        assert document["session_state"] == {"n": 1} and saved_at == stamp
        assert (await within_time_limit(session_store.read("alice", saved["session_id"])))[
            "session_state"
        ] == {"n": 2}
        copy_path = main_path(session_store, saved)[: -len(".json")] + ".saved.json"
        assert os.path.exists(copy_path)
        report = {row["path"]: row for row in await within_time_limit(session_store.verify_all())}
        assert report[os.path.relpath(copy_path, session_store.data_dir)]["ok"] is True
        assert report[os.path.relpath(copy_path, session_store.data_dir)]["kind"] == "saved"
        # Put in the session file's place, the copy fails verification (another format).
        main = main_path(session_store, saved)
        with open(main, "rb") as original:
            kept = original.read()
        with open(copy_path, "rb") as copy, open(main, "wb") as swapped:
            swapped.write(copy.read())
        report = {row["path"]: row for row in await within_time_limit(session_store.verify_all())}
        assert report[os.path.relpath(main, session_store.data_dir)]["ok"] is False
        with open(main, "wb") as restored:
            restored.write(kept)
        await within_time_limit(session_store.write_index([later]))
        assert [m["session_id"] for m in await within_time_limit(session_store.load_index())] == [
            saved["session_id"]
        ]
        await within_time_limit(session_store.delete("alice", saved["session_id"]))
        assert not os.path.exists(copy_path)
        with pytest.raises(KeyError):
            await within_time_limit(session_store.read_saved("alice", saved["session_id"]))
    finally:
        await within_time_limit(session_store.close())


def test_the_storage_layer_raises_only_its_own_errors():
    """No storage module imports the wire's errors: the service maps at its edge."""
    import ast
    import pathlib

    import stui_twisted.storage

    for module in pathlib.Path(stui_twisted.storage.__file__).parent.glob("*.py"):
        tree = ast.parse(module.read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)} | {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        }
        assert "stui_twisted.protocol.errors" not in imported, module.name


@pytest_twisted.ensureDeferred
async def test_write_observers_hear_each_write_and_write_many_when_it_finishes(tmp_path):
    small_store = await opened_store(tmp_path / "data", max_session_bytes=4000)
    heard = []
    try:
        small_store.addWriteObserver(lambda *event: heard.append(event))
        small_store.addWriteObserver(lambda *event: 1 / 0)  # logged, changes nothing
        written = small_store.write(make_session())
        assert heard == []  # not before the write is on disk
        assert isinstance(await within_time_limit(written), WriteResult)
        await within_time_limit(small_store.write_many([make_session("bob", 2)]))
        with pytest.raises(RecordTooLarge):
            await within_time_limit(small_store.write(make_session(blob="x" * 5000)))
        await within_time_limit(small_store.write_shared({}))  # not a session write
        assert [(kind, ok) for kind, _, ok in heard] == [
            ("single", True),
            ("batch", True),
            ("single", False),
        ]
        assert all(seconds >= 0 for _, seconds, _ in heard)
    finally:
        await within_time_limit(small_store.close())


class _ReactorAtFixedTime:
    """The running reactor (threads, callFromThread), with C{seconds()} from a fixed clock."""

    def __init__(self, seconds: float) -> None:
        self.now = seconds

    def seconds(self) -> float:
        return self.now

    def __getattr__(self, name):
        return getattr(the_reactor(), name)


@pytest_twisted.ensureDeferred
async def test_the_store_reads_time_only_from_its_reactor(tmp_path):
    reactor = _ReactorAtFixedTime(1_800_000_000.25)  # a month after the wall clock here
    clocked = SessionStore(tmp_path / "data", reactor=reactor)
    await within_time_limit(clocked.open())
    try:
        session = make_session()
        await within_time_limit(clocked.write(session))
        result = await within_time_limit(clocked.write(session))
        assert result.saved_at == "2027-01-15T08:00:00.250Z"
        await within_time_limit(clocked.write_index([session]))
        with open(clocked.index_path) as handle:
            assert json.load(handle)["saved_at_ns"] == int(reactor.now * 1_000_000_000)
        truncate(main_path(clocked, session))
        assert await within_time_limit(clocked.read("alice", session["session_id"])) == session
        assert quarantined_files(clocked)[0].startswith("20270115T080000-")
        # a temp file made now is an hour old by the store's clock: load_index removes it
        stale = os.path.join(os.path.dirname(main_path(clocked, session)), ".x.json.tmp-ab")
        open(stale, "wb").close()
        await within_time_limit(clocked.load_index())
        assert not os.path.exists(stale)
    finally:
        await within_time_limit(clocked.close())


def test_session_ids_have_the_one_shape_the_server_makes():
    from stui_twisted.sessions.model import new_session_id
    from stui_twisted.storage.pathcodec import check_session_id

    made = new_session_id()
    assert check_session_id(made) == made
    for wrong in ("s_" + "a" * 21, "s_" + "a" * 23, "s_" + "a" * 30, "s_" + "a" * 14):
        with pytest.raises(ValueError, match="22 URL-safe"):
            check_session_id(wrong)
