"""SessionService rules with task.Clock time and a real SessionStore in a temp dir."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.application import service
from twisted.internet import defer, reactor, task

from stui_twisted.dispatch.commands import build_commands
from stui_twisted.dispatch.dispatcher import Dispatcher
from stui_twisted.dispatch.interfaces import ConnectionContext
from stui_twisted.settings import Settings
from stui_twisted.storage.store import SessionStore
from stui_twisted.tap import build_session_core
from stui_twisted.transports.connections import ConnectionRegistry
from tests.helpers import SilentImageObservers

START = 1_790_000_000.0


class Harness:
    """One session core as tap.py builds it (service, cleanup and flush timers),
    with the real command table, driven by a task.Clock."""

    def __init__(self, data_dir, **overrides) -> None:
        self.data_dir = data_dir
        self.settings = Settings(data_dir=str(data_dir), image_enabled=False, **overrides)
        self.clock = task.Clock()
        self.clock.advance(START)

    async def start(self) -> Harness:
        self.store = SessionStore(
            str(self.data_dir), reactor=reactor, max_session_bytes=self.settings.max_session_bytes
        )
        self.core, self.service = build_session_core(
            self.settings, self.clock, self.store, connections=ConnectionRegistry(100)
        )
        self.dispatcher = Dispatcher(clock=self.clock)
        self.dispatcher.register_all(build_commands(self.service, self.dispatcher))
        self.core.startService()
        await self.service.ready()
        return self

    async def stop(self) -> None:
        await self.core.stopService()

    def connection(self) -> ConnectionContext:
        return ConnectionContext(transport="tcp", peer="test")

    async def call(self, ctx, command, **parameters) -> dict:
        data = json.dumps({"id": 1, "command": command, "parameters": parameters}).encode()
        return json.loads(await self.dispatcher.dispatch(ctx, data))

    async def ok(self, ctx, command, **parameters) -> dict:
        reply = await self.call(ctx, command, **parameters)
        assert reply["status"] == "success", reply
        return reply["result"]

    async def error(self, ctx, command, **parameters) -> dict:
        reply = await self.call(ctx, command, **parameters)
        assert reply["status"] == "error", reply
        return reply


@pytest.fixture
def make(tmp_path):
    started = []

    async def factory(**overrides) -> Harness:
        harness = await Harness(tmp_path / "data", **overrides).start()
        started.append(harness)
        return harness

    yield factory
    for harness in started:
        if harness.core.running:
            pytest_twisted.blockon(harness.core.stopService())


@pytest_twisted.ensureDeferred
async def test_create_returns_the_record_and_becomes_current(make):
    h = await make()
    conn = h.connection()
    created = await h.ok(conn, "create_session", client_id="alice", client_info={"platform": "tty"})
    assert created["session_id"].startswith("s_") and len(created["session_id"]) == 24
    assert created["client_id"] == "alice"
    assert created["is_active"] is True and created["is_expired"] is False
    assert created["timeout"] == 3600
    assert created["time_until_expiry"] == 3600
    assert "evaluate" in created["capabilities"]
    info = await h.ok(conn, "get_session_info")
    assert info["session_id"] == created["session_id"]
    assert info["attached_connections"] == 0  # contexts here are not registered connections


@pytest_twisted.ensureDeferred
async def test_no_current_session_answers_no_session(make):
    h = await make()
    reply = await h.error(h.connection(), "get_session_info")
    assert reply["error_type"] == "NoSession"


@pytest_twisted.ensureDeferred
async def test_clients_are_isolated(make):
    h = await make()
    alice, bob = h.connection(), h.connection()
    sid = (await h.ok(alice, "create_session", client_id="alice"))["session_id"]
    await h.ok(bob, "create_session", client_id="bob")
    stolen = await h.error(bob, "restore_session", session_id=sid, client_id="bob")
    made_up = await h.error(bob, "restore_session", session_id="s_" + "A" * 22, client_id="bob")
    assert stolen["error_type"] == made_up["error_type"] == "SessionNotFound"
    assert stolen["error"].replace(sid, "X") == made_up["error"].replace("s_" + "A" * 22, "X")
    listed = await h.ok(bob, "list_client_sessions", client_id="bob")
    assert [s["client_id"] for s in listed["sessions"]] == ["bob"]
    carol = await h.ok(h.connection(), "list_client_sessions", client_id="carol")
    assert carol["session_count"] == 0


@pytest_twisted.ensureDeferred
async def test_update_replaces_or_merges(make):
    h = await make()
    conn = h.connection()
    await h.ok(conn, "create_session", client_id="alice")
    await h.ok(conn, "update_session_state", state_data={"a": 1, "b": {"c": 2}})
    merged = await h.ok(
        conn, "update_session_state", state_data={"b": {"c": None, "d": 3}, "e": [1]}, merge=True
    )
    assert merged["session_state"] == {"a": 1, "b": {"d": 3}, "e": [1]}
    assert merged["update_successful"] is True
    replaced = await h.ok(conn, "update_session_state", state_data=[1, 2])
    assert replaced["session_state"] == [1, 2]
    await h.ok(conn, "update_session_state", workspace_context={"client": {"editor": "x = 1"}})
    await h.ok(conn, "update_session_state", inspector_state={"layout": "wide"})
    await h.ok(conn, "update_session_state", inspector_state={"zoom": 2}, merge=True)
    restored = await h.ok(conn, "restore_session", session_id=conn.current_session_id)
    assert restored["workspace_context"]["client"] == {"editor": "x = 1"}
    assert restored["inspector_state"]["view"] == {"layout": "wide", "zoom": 2}
    assert restored["session_state"] == [1, 2]


def _nested(depth: int) -> str:
    """JSON text of objects nested C{depth} levels deep (built as text: no recursion)."""
    return '{"a":' * depth + "1" + "}" * depth


def _depth(value) -> int:
    depth = 0
    while isinstance(value, dict):
        value, depth = value["a"], depth + 1
    return depth


@pytest_twisted.ensureDeferred
async def test_client_json_nested_too_deep_is_refused_and_what_is_kept_reads_back(make):
    h = await make()
    conn = h.connection()
    sid = (await h.ok(conn, "create_session", client_id="alice"))["session_id"]

    async def raw(command: str, parameters: str) -> dict:
        data = f'{{"id":1,"command":"{command}","parameters":{parameters}}}'.encode()
        return json.loads(await h.dispatcher.dispatch(conn, data))

    deep = _nested(500)
    for command, parameters, name in (
        ("update_session_state", f'{{"state_data":{deep}}}', "state_data"),
        ("update_session_state", f'{{"state_data":{{"x":[{deep}]}},"merge":true}}', "state_data"),
        (
            "update_session_state",
            f'{{"workspace_context":{{"client":{deep}}}}}',
            "workspace_context",
        ),
        ("update_session_state", f'{{"inspector_state":{deep}}}', "inspector_state"),
        ("create_session", f'{{"client_id":"alice","client_info":{deep}}}', "client_info"),
        ("update_session_state", f'{{"state_data":{_nested(101)}}}', "state_data"),
    ):
        reply = await raw(command, parameters)
        assert reply["error_type"] == "InvalidRequest", reply
        assert reply["details"] == {"parameter": name, "max_depth": 100}
        assert "more than 100 levels" in reply["error"]
    # The limit itself is accepted, kept, merged into and read back.
    assert (await raw("update_session_state", f'{{"state_data":{_nested(100)}}}'))[
        "status"
    ] == "success"
    merged = await raw("update_session_state", '{"state_data":{"a":{"b":2}},"merge":true}')
    assert merged["status"] == "success", merged
    restored = await h.ok(conn, "restore_session", session_id=sid)
    assert _depth(restored["session_state"]) == 100
    assert restored["session_state"]["a"]["b"] == 2


def test_session_data_is_copied_and_merged_without_recursion():
    from stui_twisted.sessions.model import Session, merge_patch

    deep: dict | int = 1
    for _ in range(20_000):  # e.g. a session file written before the depth limit existed
        deep = {"a": deep}
    session = Session(
        "s_x", "alice", START, 60.0, START, START, session_state=deep, inspector_view=deep
    )
    context = session.context()
    assert _depth(context["session_state"]) == 20_000
    assert (
        context["session_state"] is not deep
        and context["inspector_state"]["view"]["a"] is not deep["a"]
    )
    patched = merge_patch(deep, {"a": {"a": {"b": [1]}}})
    assert patched["a"]["a"]["b"] == [1] and _depth(patched) == 20_000
    assert "b" not in deep["a"]["a"]  # the input is untouched
    assert merge_patch(
        {"a": 1, "b": {"c": 1, "d": 2}}, {"b": {"c": None, "e": [1]}, "a": None}
    ) == {"b": {"d": 2, "e": [1]}}
    assert merge_patch({"a": [1]}, {"a": {"x": 1}}) == {"a": {"x": 1}}


@pytest_twisted.ensureDeferred
async def test_update_needs_something_to_update(make):
    h = await make()
    conn = h.connection()
    await h.ok(conn, "create_session", client_id="alice")
    reply = await h.error(conn, "update_session_state")
    assert reply["error_type"] == "InvalidRequest"
    assert "state_data" in reply["error"]


@pytest_twisted.ensureDeferred
async def test_a_write_the_store_refuses_as_too_large_is_answered_state_too_large(make):
    # The store counts the envelope too, so it can refuse what the service let
    # through; its RecordTooLarge becomes StateTooLarge at the service's edge.
    h = await make(durability="always")
    conn = h.connection()
    await h.ok(conn, "create_session", client_id="alice")
    h.store.max_session_bytes = 1500
    reply = await h.error(conn, "update_session_state", state_data={"big": "x" * 2000})
    assert reply["error_type"] == "StateTooLarge"
    assert reply["details"]["max_session_bytes"] == 1500
    assert reply["details"]["size_bytes"] > 1500
    assert reply["error"] == (
        f"{conn.current_session_id} would take {reply['details']['size_bytes']} bytes on"
        " disk, more than max_session_bytes (1500)"
    )
    h.store.max_session_bytes = h.settings.max_session_bytes
    restored = await h.ok(conn, "restore_session", session_id=conn.current_session_id)
    assert restored["session_state"] == {}


@pytest_twisted.ensureDeferred
async def test_state_too_large_is_refused_and_nothing_changes(make):
    h = await make(max_session_bytes=4096)
    conn = h.connection()
    await h.ok(conn, "create_session", client_id="alice")
    await h.ok(conn, "update_session_state", state_data={"keep": True})
    reply = await h.error(conn, "update_session_state", state_data={"big": "x" * 10_000})
    assert reply["error_type"] == "StateTooLarge"
    assert reply["details"]["max_session_bytes"] == 4096
    restored = await h.ok(conn, "restore_session", session_id=conn.current_session_id)
    assert restored["session_state"] == {"keep": True}


@pytest_twisted.ensureDeferred
async def test_idle_expiry_and_which_commands_refresh_activity(make):
    h = await make()
    conn = h.connection()
    await h.ok(conn, "create_session", client_id="alice", timeout=100)
    h.clock.advance(60)
    await h.ok(conn, "get_session_info")  # does not refresh
    h.clock.advance(30)
    info = await h.ok(conn, "get_session_info")
    assert info["time_until_expiry"] == pytest.approx(10)
    await h.ok(conn, "update_session_state", state_data={})  # refreshes
    h.clock.advance(99)
    assert (await h.ok(conn, "get_session_info"))["is_active"] is True
    h.clock.advance(2)
    reply = await h.error(conn, "update_session_state", state_data={})
    assert reply["error_type"] == "SessionExpired"
    listed = await h.ok(conn, "list_client_sessions", client_id="alice", include_inactive=True)
    assert listed["sessions"][0]["is_expired"] is True
    assert (await h.ok(conn, "list_client_sessions", client_id="alice"))["session_count"] == 0


@pytest_twisted.ensureDeferred
async def test_timeout_parameter_bounds(make):
    h = await make()
    reply = await h.error(h.connection(), "create_session", client_id="a", timeout=10**9)
    assert reply["details"]["parameter"] == "timeout"


@pytest_twisted.ensureDeferred
async def test_create_rate_limit_with_retry_after(make):
    h = await make(create_rate_limit=3, max_sessions_per_client=100)
    conn = h.connection()
    for _ in range(3):
        await h.ok(conn, "create_session", client_id="alice")
    h.clock.advance(20)
    reply = await h.error(conn, "create_session", client_id="alice")
    assert reply["error_type"] == "RateLimited"
    assert reply["details"]["retry_after"] == pytest.approx(40)
    await h.ok(conn, "create_session", client_id="bob")  # per client
    h.clock.advance(40)
    await h.ok(conn, "create_session", client_id="alice")


@pytest_twisted.ensureDeferred
async def test_session_limit_per_client(make):
    h = await make(max_sessions_per_client=2)
    conn = h.connection()
    first = await h.ok(conn, "create_session", client_id="alice")
    await h.ok(conn, "create_session", client_id="alice")
    reply = await h.error(conn, "create_session", client_id="alice")
    assert reply["error_type"] == "SessionLimitExceeded"
    await h.ok(conn, "close_session", session_id=first["session_id"])
    await h.ok(conn, "create_session", client_id="alice")


@pytest.mark.parametrize("client_id", ["../../etc", "a/b", "", "-x", "x" * 129, "bad id", "é"])
@pytest_twisted.ensureDeferred
async def test_malformed_client_ids_are_refused(make, client_id):
    h = await make()
    reply = await h.error(h.connection(), "create_session", client_id=client_id)
    assert reply["error_type"] == "ClientNotAllowed"
    assert reply["details"]["parameter"] == "client_id"


@pytest_twisted.ensureDeferred
async def test_allow_and_deny_lists(make):
    h = await make(allow_clients=("team-*",), deny_clients=("team-banned",))
    conn = h.connection()
    await h.ok(conn, "create_session", client_id="team-alice")
    assert (await h.error(conn, "create_session", client_id="alice"))[
        "error_type"
    ] == "ClientNotAllowed"
    denied = await h.error(conn, "create_session", client_id="team-banned")
    assert "deny list" in denied["error"]


@pytest_twisted.ensureDeferred
async def test_close_session_is_final(make):
    h = await make()
    conn = h.connection()
    sid = (await h.ok(conn, "create_session", client_id="alice"))["session_id"]
    closed = await h.ok(conn, "close_session")
    assert closed == {"session_id": sid, "closed": True, "saved": True}
    assert conn.current_session_id is None
    reply = await h.error(h.connection(), "restore_session", session_id=sid)
    assert reply["error_type"] == "SessionClosed"


@pytest_twisted.ensureDeferred
async def test_close_without_saving_keeps_the_last_saved_state(make):
    h = await make(durability="none")
    conn = h.connection()
    sid = (await h.ok(conn, "create_session", client_id="alice"))["session_id"]
    await h.ok(conn, "update_session_state", state_data={"v": 1})
    await h.ok(conn, "save_context")
    await h.ok(conn, "update_session_state", state_data={"v": 2})
    assert (await h.ok(conn, "close_session", save_state=False))["saved"] is False
    document = await h.store.read("alice", sid)
    assert document["session_state"] == {"v": 1}
    assert document["state"] == "closed"


@pytest_twisted.ensureDeferred
async def test_save_and_load_context(make):
    h = await make(durability="none")
    conn = h.connection()
    sid = (await h.ok(conn, "create_session", client_id="alice"))["session_id"]
    await h.ok(conn, "update_session_state", state_data={"v": 1})
    saved = await h.ok(conn, "save_context")
    assert saved["saved"] is True and saved["checksum"].startswith("sha256:")
    assert saved["size_bytes"] > 0
    summary = await h.ok(conn, "get_context_summary")
    assert summary["dirty"] is False and summary["last_saved_at"]
    await h.ok(conn, "update_session_state", state_data={"v": 2})
    assert (await h.ok(conn, "get_context_summary"))["dirty"] is True
    loaded = await h.ok(conn, "load_context")
    assert loaded["context"]["session_state"] == {"v": 1}
    assert loaded["session_id"] == sid
    assert (await h.ok(conn, "restore_session", session_id=sid))["session_state"] == {"v": 1}


@pytest_twisted.ensureDeferred
async def test_clear_context_parts(make):
    h = await make()
    conn = h.connection()
    await h.ok(conn, "create_session", client_id="alice")
    await h.ok(conn, "update_session_state", state_data={"v": 1}, inspector_state={"x": 1})
    cleared = await h.ok(conn, "clear_context", parts=["inspector"])
    assert cleared["cleared"] == ["inspector"]
    restored = await h.ok(conn, "restore_session", session_id=conn.current_session_id)
    assert restored["session_state"] == {"v": 1}
    assert restored["inspector_state"]["view"] == {}
    assert (await h.ok(conn, "clear_context"))["cleared"] == [
        "variables",
        "history",
        "registry",
        "inspector",
        "state",
        "events",
    ]
    bad = await h.error(conn, "clear_context", parts=["everything"])
    assert "everything" in bad["error"]


@pytest_twisted.ensureDeferred
async def test_statistics_count_sessions_and_storage(make):
    h = await make()
    conn = h.connection()
    a = await h.ok(conn, "create_session", client_id="alice", timeout=10)
    await h.ok(conn, "create_session", client_id="bob")
    c = await h.ok(conn, "create_session", client_id="carol")
    await h.ok(conn, "close_session", session_id=c["session_id"])
    h.clock.advance(11)
    stats = await h.ok(conn, "get_session_statistics")
    assert stats["total_sessions"] == 3
    assert stats["active_sessions"] == 1
    assert stats["expired_sessions"] == 1
    assert stats["closed_sessions"] == 1
    assert stats["active_clients"] == 1
    assert set(stats["storage"]) >= {
        "files",
        "bytes",
        "pending_writes",
        "last_flush_at",
        "write_errors",
        "quarantined",
    }
    assert a["session_id"]


@pytest_twisted.ensureDeferred
async def test_always_durability_writes_before_the_reply(make):
    h = await make(durability="always")
    conn = h.connection()
    sid = (await h.ok(conn, "create_session", client_id="alice"))["session_id"]
    await h.ok(conn, "update_session_state", state_data={"n": 7})
    assert (await h.store.read("alice", sid))["session_state"] == {"n": 7}


@pytest_twisted.ensureDeferred
async def test_batch_durability_flushes_on_the_flush_loop(make):
    h = await make(durability="batch", flush_interval=0.5)
    conn = h.connection()
    sid = (await h.ok(conn, "create_session", client_id="alice"))["session_id"]
    await h.ok(conn, "update_session_state", state_data={"n": 1})
    assert sid in h.service.writer.dirty
    h.clock.advance(0.5)  # the flush loop runs on the injected clock
    await _settle()
    assert sid not in h.service.writer.dirty
    assert (await h.store.read("alice", sid))["session_state"] == {"n": 1}


@pytest_twisted.ensureDeferred
async def test_a_sliced_flush_serves_requests_between_slices_and_writes_the_latest(
    make, monkeypatch
):
    """With a zero slice every session yields: changes made meanwhile are what is written."""
    from stui_twisted.sessions import persistence

    monkeypatch.setattr(persistence, "FLUSH_SLICE_SECONDS", 0.0)
    h = await make(durability="batch", flush_interval=0.5)
    conn = h.connection()
    sids = []
    for n in range(3):
        sids.append((await h.ok(conn, "create_session", client_id=f"c{n}"))["session_id"])
    flushing = defer.ensureDeferred(h.service.flush())
    assert not flushing.called  # waiting for the next reactor turn after one session
    # Between slices: change the first session, close the third.
    await h.ok(
        conn, "update_session_state", session_id=sids[0], client_id="c0", state_data={"late": True}
    )
    await h.ok(conn, "close_session", session_id=sids[2], client_id="c2")
    for _ in range(10):
        h.clock.advance(0)
        await _settle()
        if flushing.called:
            break
    assert flushing.called
    assert (await h.store.read("c0", sids[0]))["session_state"] == {"late": True}
    assert (await h.store.read("c1", sids[1]))["client_id"] == "c1"
    assert sids[0] not in h.service.writer.dirty and sids[1] not in h.service.writer.dirty


@pytest.mark.timeout(20)
@pytest_twisted.ensureDeferred
async def test_a_sliced_flush_finishes_although_nobody_advances_the_clock(make, monkeypatch):
    """The suite's hang (issue 12.4): the flush yielded on the injected clock.

    A flush that serializes for longer than a slice yields for a reactor turn.
    It used to schedule that turn on the service's clock, a C{task.Clock}
    here that nothing advances, so a flush slowed by a loaded machine (or a
    slow failure log) never finished, and neither did the shutdown waiting
    for it.  With a zero slice every session yields.
    """
    from stui_twisted.sessions import persistence

    monkeypatch.setattr(persistence, "FLUSH_SLICE_SECONDS", 0.0)
    h = await make(durability="batch", flush_interval=0.5)
    conn = h.connection()
    for n in range(3):
        await h.ok(conn, "create_session", client_id=f"c{n}")
    assert len(h.service.writer.dirty) == 3
    await h.service.flush()
    assert not h.service.writer.dirty
    await h.stop()


@pytest_twisted.ensureDeferred
async def test_a_session_that_cannot_be_serialized_stays_dirty_and_the_rest_is_written(
    make, monkeypatch
):
    h = await make(durability="batch", flush_interval=0.5)
    conn = h.connection()
    bad = (await h.ok(conn, "create_session", client_id="bad"))["session_id"]
    good = (await h.ok(conn, "create_session", client_id="good"))["session_id"]
    real_snapshot = h.store.snapshot

    def snapshot(document):
        if document["session_id"] == bad:
            raise ValueError("cannot encode this one")
        return real_snapshot(document)

    monkeypatch.setattr(h.store, "snapshot", snapshot)
    await h.service.flush()
    assert bad in h.service.writer.dirty and good not in h.service.writer.dirty
    assert h.service.writer.degraded
    assert (await h.store.read("good", good))["client_id"] == "good"
    monkeypatch.setattr(h.store, "snapshot", real_snapshot)
    await h.service.flush()
    assert bad not in h.service.writer.dirty and not h.service.writer.degraded
    assert (await h.store.read("bad", bad))["client_id"] == "bad"


@pytest_twisted.ensureDeferred
async def test_failed_write_answers_storage_error_and_acknowledges_nothing(make, monkeypatch):
    from twisted.internet import defer

    from stui_twisted.storage.errors import StorageFailure

    h = await make(durability="always")
    conn = h.connection()
    sid = (await h.ok(conn, "create_session", client_id="alice"))["session_id"]
    await h.ok(conn, "update_session_state", state_data={"n": 1})
    monkeypatch.setattr(
        h.store, "write", lambda doc, **options: defer.fail(StorageFailure("disk full (ENOSPC)"))
    )
    reply = await h.error(conn, "update_session_state", state_data={"n": 2})
    assert reply["error_type"] == "StorageError"
    assert "nothing was acknowledged" in reply["error"]
    assert (await h.ok(conn, "get_session_info"))["session_id"] == sid  # reads still work
    monkeypatch.undo()
    restored = await h.ok(conn, "restore_session", session_id=sid)
    assert restored["session_state"] == {"n": 1}


@pytest_twisted.ensureDeferred
async def test_retention_deletes_old_files_of_ended_sessions(make):
    h = await make(retention_days=1, cleanup_interval=3600)
    conn = h.connection()
    old = await h.ok(conn, "create_session", client_id="alice", timeout=60)
    await h.ok(conn, "create_session", client_id="alice")
    path = h.data_dir / "sessions"
    await h.service.cleanup()
    files = sorted(p.name for p in path.rglob("*.json"))
    assert f"{old['session_id']}.json" in files
    h.clock.advance(2 * 24 * 3600)  # old expired > 1 day ago; kept also expired (3600 s)
    await h.service.cleanup()
    files = sorted(p.name for p in path.rglob("*.json"))
    assert f"{old['session_id']}.json" not in files
    assert old["session_id"] not in h.service.sessions


@pytest_twisted.ensureDeferred
async def test_cleanup_loop_survives_a_failing_step(make, monkeypatch):
    h = await make(cleanup_interval=10)
    conn = h.connection()
    await h.ok(conn, "create_session", client_id="alice", timeout=5)
    calls = []

    def broken_index(metas):
        calls.append(len(metas))
        raise OSError("index disk on fire")

    monkeypatch.setattr(h.store, "write_index", broken_index)
    h.clock.advance(10)  # first run: expiry works although the index step fails
    await _settle()
    assert calls
    assert h.service.sessions[conn.current_session_id].state == "expired"
    h.clock.advance(10)
    await _settle()
    assert len(calls) == 2  # the timer goes on


async def _settle():
    from twisted.internet import defer

    for _ in range(5):
        d = defer.Deferred()
        reactor.callLater(0.01, d.callback, None)
        await d


@pytest_twisted.ensureDeferred
async def test_sessions_survive_a_service_restart(make, tmp_path):
    h = await make(durability="batch")
    conn = h.connection()
    sid = (await h.ok(conn, "create_session", client_id="alice"))["session_id"]
    await h.ok(
        conn,
        "update_session_state",
        state_data={"k": [1, 2]},
        workspace_context={"client": {"editor": "print(1)"}},
        inspector_state={"view": {"tab": 2}},
    )
    closed = (await h.ok(conn, "create_session", client_id="alice"))["session_id"]
    await h.ok(conn, "close_session", session_id=closed)
    await h.stop()

    again = await make(durability="batch")
    conn2 = again.connection()
    restored = await again.ok(conn2, "restore_session", session_id=sid, client_id="alice")
    assert restored["session_state"] == {"k": [1, 2]}
    assert restored["workspace_context"]["client"] == {"editor": "print(1)"}
    assert restored["inspector_state"]["view"] == {"tab": 2}
    assert (await again.error(conn2, "restore_session", session_id=closed))[
        "error_type"
    ] == "SessionClosed"
    stats = await again.ok(conn2, "get_session_statistics")
    assert stats["active_sessions"] == 1 and stats["closed_sessions"] == 1


def test_encoded_size_matches_a_full_encoding_and_follows_replaced_bindings():
    from stui_twisted.sessions.model import Session

    session = Session("s_" + "a" * 22, "alice", 0.0, 10.0, 0.0, 0.0)
    for bindings in (
        {},
        {"x": {"encoding": "json", "value": "é" * 100, "type": "str", "repr": "'é'"}},
        {
            f"b{i}": {"encoding": "json", "value": i, "type": "int", "repr": str(i)}
            for i in range(50)
        },
    ):
        session.bindings = bindings
        session.history = [{"index": 1, "code": "ü = 1"}]
        exact = len(json.dumps(session.to_document(), separators=(",", ":"), ensure_ascii=True))
        assert session.encoded_size() == exact
    session.bindings["b3"] = {
        "encoding": "json",
        "value": "longer" * 100,
        "type": "str",
        "repr": "'…'",
    }
    exact = len(json.dumps(session.to_document(), separators=(",", ":"), ensure_ascii=True))
    assert session.encoded_size() == exact
    # Registry and history: added, replaced, evicted, emptied.
    for n in range(5):
        session.registry[f"obj_{n}"] = {"class_name": "int", "repr": str(n) * n}
        session.history.append({"index": n + 2, "code": f"x{n} = 'ü' * {n}", "result": None})
        session.history = session.history[-3:]
        exact = len(json.dumps(session.to_document(), separators=(",", ":"), ensure_ascii=True))
        assert session.encoded_size() == exact
    session.registry["obj_1"] = {"class_name": "str", "repr": "replaced" * 9}
    del session.registry["obj_0"]
    exact = len(json.dumps(session.to_document(), separators=(",", ":"), ensure_ascii=True))
    assert session.encoded_size() == exact
    session.registry, session.history = {}, []
    exact = len(json.dumps(session.to_document(), separators=(",", ":"), ensure_ascii=True))
    assert session.encoded_size() == exact


def test_encoded_size_formats_no_timestamp_and_measures_every_year(monkeypatch):
    """The size accounting runs on every evaluation: it measures the four
    timestamps of the document instead of formatting them (issue 21)."""
    from stui_twisted.sessions import model
    from stui_twisted.sessions.model import Session

    def exact(session):
        return len(json.dumps(session.to_document(), separators=(",", ":"), ensure_ascii=True))

    sessions = [
        Session("s_" + "c" * 22, "carol", 1_764_590_400.25, 10.0, 1_764_590_401.5, 1_764_590_402.0),
        Session("s_" + "d" * 22, "dave", -31_000_000_000.0, 10.0, -30_610_224_000.0, 0.0),
    ]
    sessions[0].closed_at, sessions[0].state = 1_764_590_403.0, "closed"
    expected = [exact(session) for session in sessions]

    def formatting(seconds):
        raise AssertionError(f"encoded_size formatted the timestamp {seconds}")

    monkeypatch.setattr(model, "iso_timestamp", formatting)
    assert [session.encoded_size() for session in sessions[:1]] == expected[:1]
    monkeypatch.undo()  # a year of three digits is measured by formatting it
    assert [session.encoded_size() for session in sessions] == expected


@pytest_twisted.ensureDeferred
async def test_batch_flush_loop_survives_a_failing_flush(make, monkeypatch):
    from twisted.internet import defer

    h = await make(durability="batch", flush_interval=0.5)
    conn = h.connection()
    sid = (await h.ok(conn, "create_session", client_id="alice"))["session_id"]
    real_write_many = h.store.write_many
    monkeypatch.setattr(h.store, "write_many", lambda docs: defer.fail(RuntimeError("boom")))
    h.clock.advance(0.5)
    await _settle()
    monkeypatch.setattr(h.store, "write_many", real_write_many)
    assert sid in h.service.writer.dirty  # the failed group stays dirty
    h.clock.advance(0.5)
    await _settle()
    assert sid not in h.service.writer.dirty
    assert (await h.store.read("alice", sid))["client_id"] == "alice"


def test_largest_bindings_are_demoted_until_the_session_fits():
    from stui_twisted.sessions.live import LiveSessions
    from stui_twisted.sessions.model import Session

    settings = Settings(max_session_bytes=6000, image_enabled=False)
    live = LiveSessions(view=None, image=None, settings=settings, clock=task.Clock())

    session = Session("s_" + "a" * 22, "alice", 0.0, 10.0, 0.0, 0.0)
    session.bindings = {
        "big": {"encoding": "json", "value": "x" * 4000, "type": "str", "repr": "'x'"},
        "mid": {"encoding": "pickle", "data": "y" * 3000, "type": "T", "repr": "T()"},
        "small": {"encoding": "json", "value": 1, "type": "int", "repr": "1"},
    }
    session.variables = [{"name": n, "restorable": True} for n in session.bindings]
    live.fit_bindings(session)
    assert session.bindings["big"]["encoding"] == "unrestorable"
    assert "too large" in session.bindings["big"]["reason"]
    assert session.bindings["mid"]["encoding"] == "pickle"  # fits once big is gone
    assert session.bindings["small"]["value"] == 1
    assert [v["restorable"] for v in session.variables] == [False, True, True]
    assert session.encoded_size() <= 6000


def test_encoded_size_stays_exact_through_random_registry_and_history_changes():
    import random

    from stui_twisted.sessions.model import Session

    rng = random.Random(11)
    session = Session("s_" + "b" * 22, "bob", 0.0, 10.0, 0.0, 0.0)
    counter = 0
    for step in range(400):
        counter += 1
        action = rng.choice(["append", "append", "append", "evict", "replace", "clear", "reload"])
        entry = {"repr": "v" * rng.randrange(30), "n": counter}
        if action == "append":
            session.registry[f"obj_{counter}"] = entry
            session.history.append(dict(entry, code="é" * rng.randrange(5)))
            del session.history[:-20]
        elif action == "evict" and session.registry:
            del session.registry[next(iter(session.registry))]
            session.history = session.history[1:]
        elif action == "replace" and session.registry:
            name = rng.choice(list(session.registry))
            session.registry[name] = entry
            if session.history:
                session.history[rng.randrange(len(session.history))] = entry
        elif action == "clear":
            session.registry.clear() if rng.random() < 0.5 else session.history.clear()
        elif action == "reload":  # as load_context does: equal content, new objects
            session.registry = json.loads(json.dumps(session.registry))
            session.history = json.loads(json.dumps(session.history))
        exact = len(json.dumps(session.to_document(), separators=(",", ":"), ensure_ascii=True))
        assert session.encoded_size() == exact, (step, action)


def test_part_size_compares_no_member_deeply_when_entries_are_added_and_evicted():
    """1,000 registry entries alike in content (the same repr of another list
    each time) were compared member by member, deeply, on every evaluation."""
    from stui_twisted.sessions.model import PartSize

    compared = []

    class Entry(dict):
        def __eq__(self, other):
            compared.append(1)
            return dict.__eq__(self, other)

        __hash__ = None

    def entry():
        return Entry(type="list", repr="[1, 2]", live=True, binding=None)

    registry = {f"obj_{n}": entry() for n in range(1000)}
    history = [entry() for _ in range(100)]
    registry_size, history_size = PartSize(), PartSize()
    registry_size.measure(registry), history_size.measure(history)
    for n in range(1000, 1020):
        registry[f"obj_{n}"] = entry()
        del registry[next(iter(registry))]
        history.append(entry())
        del history[:-100]
        compared.clear()
        assert (
            registry_size.measure(registry) == len(json.dumps(registry, separators=(",", ":"))) - 2
        )
        assert history_size.measure(history) == len(json.dumps(history, separators=(",", ":"))) - 2
        assert len(compared) <= 2, len(compared)


@pytest_twisted.ensureDeferred
async def test_session_limit_per_client_says_its_scope(make):
    h = await make(max_sessions_per_client=1)
    conn = h.connection()
    await h.ok(conn, "create_session", client_id="alice")
    reply = await h.error(conn, "create_session", client_id="alice")
    assert reply["error_type"] == "SessionLimitExceeded"
    assert reply["details"]["scope"] == "client"


@pytest_twisted.ensureDeferred
async def test_server_wide_session_cap_whatever_the_client_ids(make):
    """Invented client ids cannot get past max_sessions_total; ended sessions free places."""
    h = await make(max_sessions_total=3, max_sessions_per_client=5, default_timeout=100)
    conn = h.connection()
    first = await h.ok(conn, "create_session", client_id="c1")
    await h.ok(conn, "create_session", client_id="c2")
    await h.ok(conn, "create_session", client_id="c3")
    reply = await h.error(conn, "create_session", client_id="c4")
    assert reply["error_type"] == "SessionLimitExceeded"
    assert reply["details"] == {"active_sessions": 3, "max_sessions_total": 3, "scope": "server"}
    await h.ok(conn, "close_session", session_id=first["session_id"])
    fourth = await h.ok(conn, "create_session", client_id="c4")
    assert (await h.error(conn, "create_session", client_id="c5"))["details"]["scope"] == "server"
    # an idle session marked expired by the cleanup run frees its place too
    h.clock.advance(50)
    await h.ok(conn, "update_session_state", session_id=fourth["session_id"], state_data={"a": 1})
    h.clock.advance(60)  # c2 and c3 have been idle for 110 s, c4 for 60 s
    await h.service.cleanup()
    await h.ok(conn, "create_session", client_id="c5")
    await h.ok(conn, "create_session", client_id="c6")
    assert (await h.error(conn, "create_session", client_id="c7"))["details"]["scope"] == "server"


def test_max_sessions_total_option_and_ini_key(tmp_path):
    from stui_twisted.tap import Options

    assert Settings().max_sessions_total == 100_000
    ini = tmp_path / "stui.ini"
    ini.write_text("[stui]\nmax_sessions_total = 7\n")
    options = Options()
    options.parseOptions([f"--config={ini}"])
    assert options.settings.max_sessions_total == 7
    options = Options()
    options.parseOptions([f"--config={ini}", "--max-sessions-total=9"])
    assert options.settings.max_sessions_total == 9


# -- issue 14: the protocol-free service, the live component, the session core -------


@pytest_twisted.ensureDeferred
async def test_the_service_takes_typed_arguments_and_answers_domain_objects(make):
    from stui_twisted.protocol.errors import StuiError
    from stui_twisted.sessions.live import LiveSessions
    from stui_twisted.sessions.model import Session
    from stui_twisted.sessions.results import RestoreResult, SessionStatistics

    h = await make()
    conn = h.connection()
    session = await h.service.create_session(
        client_id="alice", timeout=60, client_info={"platform": "tty"}, connection=conn
    )
    assert isinstance(session, Session)
    assert (session.client_id, session.timeout, session.client_info) == (
        "alice",
        60.0,
        {"platform": "tty"},
    )
    assert session.created_at == START  # read from the injected clock
    assert conn.current_session_id == session.session_id
    other = h.connection()
    restored = await h.service.restore_session(
        session_id=session.session_id, client_id="alice", connection=other
    )
    assert isinstance(restored, RestoreResult) and restored.session is session
    assert other.current_session_id == session.session_id
    stats = await h.service.get_session_statistics()
    assert isinstance(stats, SessionStatistics) and (stats.total, stats.active) == (1, 1)
    with pytest.raises(StuiError) as caught:
        await h.service.get_session_info(session_id=None, client_id="bob", connection=other)
    assert caught.value.error_type == "SessionNotFound"
    # the live-image part is a component the service owns, not a base class
    assert isinstance(h.service.live, LiveSessions)
    assert not isinstance(h.service, LiveSessions)


class _ScriptedImage:
    """An image that answers every evaluation with one scripted outcome."""

    live_generation = 1

    def __init__(self, outcome: dict) -> None:
        self.outcome = outcome
        self.observers = []
        self.evaluated = []
        self.rebuilt = []

    def addRestartObserver(self, observer):  # noqa: N802
        self.observers.append(observer)

    def addOutputObserver(self, observer):  # noqa: N802
        pass

    def addDebugObserver(self, observer):  # noqa: N802
        pass  # the scripted image never pauses

    def current_generation(self):
        return defer.succeed(self.live_generation)

    def evaluate(self, session_id, code, mode, timeout, *, generation, cell_index):
        self.evaluated.append((session_id, code, generation, cell_index))
        return defer.succeed(dict(self.outcome))

    def materialize_shared(self, bindings, *, generation):
        self.rebuilt.append(("shared", sorted(bindings), generation))
        return defer.succeed({"unrestorable": []})

    def materialize(self, session_id, bindings, registry, next_object_id, *, generation):
        self.rebuilt.append((session_id, sorted(bindings), generation))
        return defer.succeed({"restored": sorted(bindings), "unrestorable": []})


class _View:
    """A SessionsView: the three members LiveSessions may use of its service."""

    def __init__(self, sessions) -> None:
        from stui_twisted.sessions.results import SharedNamespace

        self.shared = SharedNamespace()
        self.sessions = sessions
        self.changes = []

    def live_sessions(self):
        return [s for s in self.sessions if s.materialized]

    async def changed(self, session, action):
        self.changes.append((session.session_id, action))


@pytest_twisted.ensureDeferred
async def test_live_sessions_works_through_its_small_view_of_the_service():
    from stui_twisted.sessions.live import LiveSessions
    from stui_twisted.sessions.model import Session
    from stui_twisted.sessions.results import EvaluationOutcome

    clock = task.Clock()
    clock.advance(START)
    session = Session("s_" + "c" * 22, "alice", 0.0, 60.0, 0.0, 0.0)
    view = _View([session])
    image = _ScriptedImage(
        {
            "result": "2",
            "result_type": "int",
            "output": "",
            "execution_time": 0.5,
            "bindings_changed": {"x": {"encoding": "json", "value": 2, "type": "int"}},
            "shared_changed": {"team": {"encoding": "json", "value": "ok", "type": "str"}},
            "variables": [{"name": "x", "type": "int", "repr": "2"}],
        }
    )
    live = LiveSessions(view, image, Settings(image_enabled=True), clock)
    assert image.observers == [live.image_restarted]
    outcome = await live.evaluate(session, "x = 2", "execute", None)
    assert isinstance(outcome, EvaluationOutcome)
    assert (outcome.result, outcome.history_index) == ("2", 1)
    assert view.changes == [(session.session_id, "record the evaluation")]
    assert session.bindings["x"]["value"] == 2
    assert view.shared.dirty and view.shared.bindings["team"]["value"] == "ok"
    assert session.history[0]["timestamp"].startswith("2026-09-21T")  # the injected clock
    # a restarted image rebuilds what the view says was live
    image.live_generation = 2
    await image.observers[0]()
    assert session.image_generation == 2
    assert image.rebuilt == [("shared", ["team"], 2), (session.session_id, ["x"], 2)]


@pytest_twisted.ensureDeferred
async def test_an_evaluation_in_a_live_session_takes_no_lock_and_asks_no_generation():
    """The session is live in the running image and nobody rebuilds it: the
    evaluation goes straight to the image (issue 21: a Deferred lock and a
    generation Deferred per evaluation); while its lock is held it waits."""
    from stui_twisted.sessions.live import LiveSessions
    from stui_twisted.sessions.model import Session

    session = Session("s_" + "e" * 22, "alice", 0.0, 60.0, 0.0, 0.0)
    image = _ScriptedImage({"result": "2", "result_type": "int", "output": ""})
    live = LiveSessions(_View([session]), image, Settings(image_enabled=True), task.Clock())
    await live.evaluate(session, "1+1", "execute", None)  # made live in generation 1
    asked = []
    image.current_generation = lambda: asked.append(1) or defer.succeed(image.live_generation)
    await live.evaluate(session, "1+1", "execute", None)
    assert asked == [] and session.session_id not in live._image_locks
    lock = live._image_lock(session.session_id)
    await lock.acquire()  # a rebuild holds it: the next evaluation waits for it
    waiting = defer.ensureDeferred(live.evaluate(session, "1+1", "execute", None))
    assert not waiting.called and len(image.evaluated) == 2
    live._release_image_lock(session.session_id, lock)
    await waiting
    assert asked == [1] and len(image.evaluated) == 3
    image.live_generation = 2  # a new image: made live there first
    await live.evaluate(session, "1+1", "execute", None)
    assert session.image_generation == 2 and image.evaluated[-1][2] == 2


class _RecordingImage(SilentImageObservers, service.Service):
    """An image service that records when it is stopped."""

    live_generation = None

    def __init__(self, events) -> None:
        self.events = events

    def status(self):
        return {"status": "running", "pid": None, "started_at": None}

    def stopService(self):  # noqa: N802
        self.events.append("image stopped")
        return super().stopService()


@pytest_twisted.ensureDeferred
async def test_the_session_core_stops_timers_then_flushes_then_stops_the_image(tmp_path):
    """The image outlives the final flush, however long that flush takes."""
    events = []
    settings = Settings(data_dir=str(tmp_path / "data"), durability="batch", flush_interval=5)
    clock = task.Clock()
    clock.advance(START)
    store = SessionStore(settings.data_dir, reactor=reactor)
    core, sessions = build_session_core(settings, clock, store, _RecordingImage(events))
    assert [child.name for child in core] == ["image", "sessions", "cleanup", "flush"]
    core.startService()
    await sessions.ready()
    conn = ConnectionContext(transport="tcp", peer="test")
    await sessions.create_session(client_id="alice", timeout=None, client_info={}, connection=conn)
    held = defer.Deferred()
    real_write_many = store.write_many

    def slow_write_many(snapshots):
        events.append("flush started")
        return held.addCallback(lambda _: real_write_many(snapshots))

    store.write_many = slow_write_many
    stopping = core.stopService()
    assert events == ["flush started"]  # the timers stopped, the flush runs, the image waits
    assert not stopping.called
    held.callback(None)
    await stopping
    assert events == ["flush started", "image stopped"]
    assert sessions.unwritten_at_shutdown == []


@pytest_twisted.ensureDeferred
async def test_the_cleanup_timer_does_nothing_before_the_index_is_loaded(tmp_path, monkeypatch):
    """TimerService runs its call at once; the first cleanup must not write an empty index."""
    first = await Harness(tmp_path / "data").start()
    await first.ok(first.connection(), "create_session", client_id="alice")
    await first.stop()
    written = []
    real_write_index = SessionStore.write_index

    def spy(self, metas):
        written.append(len(metas))
        return real_write_index(self, metas)

    monkeypatch.setattr(SessionStore, "write_index", spy)
    second = await Harness(tmp_path / "data", cleanup_interval=10).start()
    assert written == []  # the start-up run saw a service not yet ready
    second.clock.advance(10)
    await _settle()
    assert written == [1]
    await second.stop()


def test_client_connections_offer_only_what_the_core_uses():
    """IClientConnection is sendReply, sendEvent (events.md) and close; both transports provide it."""
    from zope.interface.verify import verifyClass

    from stui_twisted.dispatch.interfaces import IClientConnection
    from stui_twisted.transports.linejson import LineJSONProtocol
    from stui_twisted.transports.zmqrouter import ZmqPeer

    assert sorted(IClientConnection.names()) == ["close", "context", "sendEvent", "sendReply"]
    for transport in (LineJSONProtocol, ZmqPeer):
        assert verifyClass(IClientConnection, transport)


def _import_graph(root) -> dict[str, set[str]]:
    """Module -> the package modules it imports (function-level too; not TYPE_CHECKING)."""
    import ast

    modules = {}
    for path in root.rglob("*.py"):
        name = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        typing_only = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for child in node.body
            for inner in ast.walk(child)
        }
        targets = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_no_import_cycles():
    """tap.py assembles the tree and nothing imports it back (ops.metrics used to)."""
    import pathlib

    import stui_twisted

    graph = _import_graph(pathlib.Path(stui_twisted.__file__).parent)
    assert not [m for m, imported in graph.items() if "stui_twisted.tap" in imported]
    done: set[str] = set()

    def cycle_from(module, path):
        for imported in sorted(graph[module]):
            if imported in path:
                return path[path.index(imported) :] + [imported]
            if imported not in done:
                found = cycle_from(imported, path + [imported])
                if found:
                    return found
        done.add(module)
        return None

    for module in sorted(graph):
        assert cycle_from(module, [module]) is None
