"""Sharing (access.md §1): the access table, the share commands, watchers, persistence.

The session core runs with the real command table and a task.Clock (the harness of
test_service), the event commands wired to a real L{EventHub}; no image.  What
needs the image (evaluate by a writer, a reader's inspect) is in
tests/e2e/test_e2e_sharing.py.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted

from stui_twisted.access import sharing
from stui_twisted.dispatch.commands import build_commands
from stui_twisted.dispatch.dispatcher import Dispatcher
from stui_twisted.dispatch.interfaces import ConnectionContext
from stui_twisted.events.commands import build_event_commands
from stui_twisted.events.hub import EventHub
from stui_twisted.protocol.errors import StuiError
from tests.unit import test_service


class Pushed:
    """A connection that records the events pushed to it."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def sendEvent(self, data: bytes) -> None:  # noqa: N802
        self.events.append(json.loads(data))

    def names(self) -> list[tuple[str, dict]]:
        return [(e["event"], e["data"]) for e in self.events]


made = test_service.make  # the harness fixture of test_service (its core, its clock)


@pytest.fixture
def make(made):
    """C{made}, with the event hub and its commands wired as tap.py wires them."""

    async def factory(**overrides):
        harness = await made(**overrides)
        harness.service.events = EventHub(harness.clock, str(harness.data_dir))
        harness.dispatcher.register_all(
            build_event_commands(harness.service, harness.service.events)
        )
        return harness

    return factory


def connect() -> ConnectionContext:
    """A conversation whose pushed events are kept (in C{.connection.events})."""
    context = ConnectionContext(transport="tcp", peer="test")
    context.connection = Pushed()
    return context


async def _shared(h, access="read"):
    """Alice's session, shared with bob; the connections of alice and bob."""
    alice, bob = connect(), connect()
    sid = (await h.ok(alice, "create_session", client_id="alice"))["session_id"]
    await h.ok(alice, "share_session", client_id="alice", **{"with": "bob", "access": access})
    return sid, alice, bob


# -- the table --------------------------------------------------------------------------


def _every_command():
    dispatcher = Dispatcher(clock=None)
    commands = build_commands(_Unused(), dispatcher)
    commands += build_event_commands(_Unused(), None)
    return {command.name: command for command in commands}


class _Unused:
    """A service the command table is built over but never called."""


def test_every_command_that_names_a_session_is_in_the_access_table():
    commands = _every_command()
    naming = {
        name
        for name, command in commands.items()
        if any(param.name == "session_id" for param in command.params)
    }
    # unsubscribe only ends the caller's own subscription: nothing to decide
    assert naming - {"unsubscribe"} <= sharing.SESSION_COMMANDS
    assert sharing.OWNER_COMMANDS <= set(commands)
    # the table names no command that does not exist (get_evaluation and
    # send_input come with the rest of the events contract, events.md §4-§5)
    assert sharing.SESSION_COMMANDS - set(commands) <= {"get_evaluation", "send_input"}


@pytest.mark.parametrize("command", sorted(sharing.SESSION_COMMANDS))
def test_the_access_decision_for_every_command(command):
    shares = {"rita": "read", "will": "write"}

    def decide(client_id):
        return sharing.decide("s_x", "olga", shares, client_id, command)

    assert decide("olga") == decide(None) == "owner"
    for client_id, allowed in (
        ("rita", sharing.READ_COMMANDS),
        ("will", sharing.WRITE_COMMANDS),
    ):
        if command in allowed:
            assert decide(client_id) == shares[client_id]
        else:
            with pytest.raises(StuiError) as raised:
                decide(client_id)
            error = raised.value
            assert error.error_type == "PermissionDenied"
            assert error.details == {"access": shares[client_id], "command": command}
            assert command in error.message
    with pytest.raises(StuiError) as raised:
        decide("nobody")
    assert raised.value.error_type == "SessionNotFound"
    assert raised.value.message == sharing.session_not_found("s_x").message


def test_the_table_is_access_md():
    reader = {
        "restore_session",
        "get_session_info",
        "get_context_summary",
        "complete",
        "inspect",
        "subscribe",
        "get_events",
        "get_evaluation",
    }
    assert sharing.READ_COMMANDS == reader
    writer_adds = {
        "evaluate",
        "interrupt",
        "send_input",
        "update_session_state",
        "clear_context",
        "save_context",
        "load_context",
    }
    assert reader | writer_adds | sharing.DEBUG_COMMANDS <= sharing.WRITE_COMMANDS
    assert not sharing.WRITE_COMMANDS & {"close_session", "share_session", "unshare_session"}
    assert not sharing.READ_COMMANDS & (sharing.DEBUG_COMMANDS | sharing.BROWSE_COMMANDS)


def test_stored_shares_are_read_strictly():
    stored = [
        {"client_id": "bob", "access": "read"},
        {"client_id": "eve", "access": "admin"},
        {"client_id": 5, "access": "write"},
        "carol",
        {"client_id": "dan", "access": "write"},
    ]
    assert sharing.shares_from(stored) == {"bob": "read", "dan": "write"}
    assert sharing.shares_from(None) == {}
    assert sharing.shares_list({"dan": "write", "bob": "read"}) == [
        {"client_id": "bob", "access": "read"},
        {"client_id": "dan", "access": "write"},
    ]


@pytest.mark.parametrize(
    "expression", ["x", "p.x", "rows[0]", "d['k']", "m[-1].y", " x ", "a.b.c[2]['q']"]
)
def test_a_reader_may_inspect_what_an_expression_names(expression):
    sharing.check_reader_expression(expression)


@pytest.mark.parametrize(
    "expression",
    [
        "x.clear()",
        "x.clear() or x",
        "__import__('os').system('true')",
        "(y := 1)",
        "x[f()]",
        "x[0:2]",
        "[x]",
        "1",
        "x +",
        "lambda: 0",
        "rows[i]",
    ],
)
def test_a_readers_inspect_expression_that_computes_is_refused(expression):
    with pytest.raises(StuiError) as raised:
        sharing.check_reader_expression(expression)
    error = raised.value
    assert error.error_type == "PermissionDenied"
    assert error.details == {"access": "read", "command": "inspect", "parameter": "expression"}


# -- the commands ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_reader_sees_the_session_but_changes_nothing(make):
    h = await make()
    sid, alice, bob = await _shared(h)
    info = await h.ok(bob, "get_session_info", session_id=sid, client_id="bob")
    assert info["client_id"] == "alice" and "shares" not in info  # the owner's view only
    owner_view = await h.ok(alice, "get_session_info", client_id="alice")
    assert owner_view["shares"] == [{"client_id": "bob", "access": "read"}]
    await h.ok(bob, "get_context_summary", session_id=sid, client_id="bob")
    restored = await h.ok(bob, "restore_session", session_id=sid, client_id="bob")
    assert restored["client_id"] == "alice"
    assert bob.current_session_id == sid and alice.current_session_id == sid
    for command, extra in (
        ("update_session_state", {"state_data": {"x": 1}}),
        ("clear_context", {}),
        ("save_context", {}),
        ("close_session", {}),
        ("share_session", {"with": "carol", "access": "read"}),
        ("unshare_session", {"with": "bob"}),
    ):
        refused = await h.error(bob, command, client_id="bob", **extra)  # the current session
        assert refused["error_type"] == "PermissionDenied", refused
        assert refused["details"] == {"access": "read", "command": command}
    assert (await h.ok(alice, "get_session_info", client_id="alice"))["state"] == "active"
    computing = await h.error(bob, "inspect", client_id="bob", expression="x.clear() or x")
    assert computing["details"]["parameter"] == "expression"  # refused before the image
    listed = await h.ok(bob, "list_client_sessions", client_id="bob")
    assert listed["session_count"] == 0  # attaching does not make bob an owner


@pytest_twisted.ensureDeferred
async def test_a_writer_changes_the_session_but_never_closes_or_shares_it(make):
    h = await make()
    sid, alice, bob = await _shared(h, "write")
    await h.ok(bob, "update_session_state", session_id=sid, client_id="bob", state_data={"b": 2})
    assert (await h.ok(alice, "restore_session", session_id=sid))["session_state"] == {"b": 2}
    for command, extra in (
        ("close_session", {}),
        ("share_session", {"with": "carol", "access": "read"}),
        ("unshare_session", {"with": "bob"}),
    ):
        refused = await h.error(bob, command, session_id=sid, client_id="bob", **extra)
        assert refused["details"] == {"access": "write", "command": command}
        assert "owner" in refused["error"]


@pytest_twisted.ensureDeferred
async def test_without_a_share_a_session_does_not_exist(make):
    h = await make()
    sid, _alice, _bob = await _shared(h)
    carol = connect()
    hidden = await h.error(carol, "get_session_info", session_id=sid, client_id="carol")
    none = await h.error(carol, "get_session_info", session_id="s_" + "A" * 22, client_id="carol")
    assert hidden["error_type"] == none["error_type"] == "SessionNotFound"
    assert hidden["error"].replace(sid, "X") == none["error"].replace("s_" + "A" * 22, "X")
    sharing_it = await h.error(
        carol,
        "share_session",
        session_id=sid,
        client_id="carol",
        **{"with": "carol"},
        access="read",
    )
    assert sharing_it["error_type"] == "SessionNotFound"


@pytest_twisted.ensureDeferred
async def test_share_parameters_are_checked(make):
    h = await make()
    sid, alice, _bob = await _shared(h)

    async def share(**parameters):
        return await h.error(alice, "share_session", client_id="alice", **parameters)

    itself = await share(**{"with": "alice"}, access="read")
    assert itself["error_type"] == "InvalidRequest" and itself["details"]["parameter"] == "with"
    malformed = await share(**{"with": "no spaces"}, access="read")
    assert malformed["error_type"] == "ClientNotAllowed"
    assert malformed["details"]["parameter"] == "with" and "'with'" in malformed["error"]
    bad_access = await share(**{"with": "carol"}, access="admin")
    assert bad_access["error_type"] == "InvalidRequest"
    assert bad_access["details"]["parameter"] == "access"
    missing = await share(access="read")
    assert missing["details"]["parameter"] == "with"
    unshare_bad = await h.error(alice, "unshare_session", client_id="alice", **{"with": "a b"})
    assert unshare_bad["error_type"] == "ClientNotAllowed"


@pytest_twisted.ensureDeferred
async def test_changing_access_replaces_the_share_and_unsharing_is_at_once(make):
    h = await make()
    sid, alice, bob = await _shared(h)
    replaced = await h.ok(
        alice, "share_session", client_id="alice", **{"with": "bob"}, access="WRITE"
    )
    assert replaced == {"session_id": sid, "shares": [{"client_id": "bob", "access": "write"}]}
    both = await h.ok(alice, "share_session", client_id="alice", **{"with": "carol"}, access="read")
    assert [s["client_id"] for s in both["shares"]] == ["bob", "carol"]
    await h.ok(bob, "restore_session", session_id=sid, client_id="bob")
    await h.ok(bob, "update_session_state", client_id="bob", state_data={"w": 1})
    unshared = await h.ok(alice, "unshare_session", client_id="alice", **{"with": "bob"})
    assert unshared["shares"] == [{"client_id": "carol", "access": "read"}]
    gone = await h.error(bob, "get_session_info", client_id="bob")  # still its current session
    assert gone["error_type"] == "SessionNotFound"
    again = await h.ok(alice, "unshare_session", client_id="alice", **{"with": "bob"})
    assert again["shares"] == unshared["shares"]  # unsharing twice changes nothing


@pytest_twisted.ensureDeferred
async def test_list_shared_sessions_lists_what_others_shared_with_the_caller(make):
    h = await make()
    sid, alice, bob = await _shared(h)
    own = (await h.ok(bob, "create_session", client_id="bob"))["session_id"]
    await h.ok(bob, "share_session", client_id="bob", **{"with": "alice"}, access="write")
    listed = await h.ok(bob, "list_shared_sessions", client_id="bob")
    assert listed["client_id"] == "bob"
    assert [(s["session_id"], s["owner"], s["access"]) for s in listed["sessions"]] == [
        (sid, "alice", "read")
    ]
    assert listed["sessions"][0]["is_active"] is True
    theirs = await h.ok(alice, "list_shared_sessions", client_id="alice")
    assert [(s["session_id"], s["owner"], s["access"]) for s in theirs["sessions"]] == [
        (own, "bob", "write")
    ]
    await h.ok(alice, "close_session", session_id=sid, client_id="alice")
    assert (await h.ok(bob, "list_shared_sessions", client_id="bob"))["sessions"] == []
    anonymous = await h.error(connect(), "list_shared_sessions")
    assert anonymous["details"]["parameter"] == "client_id"


@pytest_twisted.ensureDeferred
async def test_a_shared_session_counts_against_its_owner_only(make):
    h = await make(max_sessions_per_client=1)
    sid, _alice, bob = await _shared(h)
    await h.ok(bob, "restore_session", session_id=sid, client_id="bob")
    await h.ok(bob, "create_session", client_id="bob")  # bob's one session is his own
    refused = await h.error(connect(), "create_session", client_id="alice")
    assert refused["error_type"] == "SessionLimitExceeded"


@pytest_twisted.ensureDeferred
async def test_shares_survive_a_restart_with_and_without_the_index(make, tmp_path):
    h = await make(durability="always")
    sid, alice, _bob = await _shared(h)
    await h.ok(alice, "share_session", client_id="alice", **{"with": "carol"}, access="write")
    await h.ok(alice, "unshare_session", client_id="alice", **{"with": "carol"})
    await h.stop()
    for attempt in ("index", "files"):
        if attempt == "files":
            (tmp_path / "data" / "index.json").unlink()
        again = await make(durability="always")
        bob = connect()
        listed = await again.ok(bob, "list_shared_sessions", client_id="bob")
        assert [s["session_id"] for s in listed["sessions"]] == [sid], attempt
        info = await again.ok(bob, "get_session_info", session_id=sid, client_id="bob")
        assert info["client_id"] == "alice"
        hidden = await again.error(bob, "get_session_info", session_id=sid, client_id="carol")
        assert hidden["error_type"] == "SessionNotFound", attempt
        owner = await again.ok(connect(), "get_session_info", session_id=sid)
        assert owner["shares"] == [{"client_id": "bob", "access": "read"}]
        await again.stop()


# -- watchers ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_watchers_join_and_leave_once_per_principal(make):
    h = await make()
    sid, alice, bob = await _shared(h)
    await h.ok(alice, "subscribe", client_id="alice")
    assert alice.connection.events == []  # the owner subscribing is no watcher
    await h.ok(bob, "subscribe", session_id=sid, client_id="bob")
    second = connect()
    await h.ok(second, "subscribe", session_id=sid, client_id="bob")
    await h.ok(bob, "subscribe", session_id=sid, client_id="bob")  # again: nothing new
    joined = ("watcher_joined", {"client_id": "bob", "access": "read"})
    assert alice.connection.names() == [joined]
    await h.ok(bob, "unsubscribe", session_id=sid)
    assert alice.connection.names() == [joined]  # bob still watches on another connection
    h.service.events.connection_closed(second)
    left = ("watcher_left", {"client_id": "bob", "access": "read"})
    assert alice.connection.names() == [joined, left]


@pytest_twisted.ensureDeferred
async def test_unsharing_ends_the_watchers_subscription_at_once(make):
    h = await make()
    sid, alice, bob = await _shared(h)
    await h.ok(alice, "subscribe", client_id="alice")
    await h.ok(bob, "subscribe", session_id=sid, client_id="bob")
    await h.ok(alice, "share_session", client_id="alice", **{"with": "bob"}, access="write")
    await h.ok(alice, "unshare_session", client_id="alice", **{"with": "bob"})
    left = ("watcher_left", {"client_id": "bob", "access": "write"})
    assert alice.connection.names()[-1] == left
    assert bob.connection.names()[-1] == left  # the watcher's last event of the stream
    seen = len(bob.connection.events)
    await h.ok(alice, "update_session_state", client_id="alice", state_data={"secret": 1})
    assert alice.connection.events[-1]["event"] == "state_updated"
    assert len(bob.connection.events) == seen  # nothing more reaches bob
    assert h.service.events.subscribers(sid) == 1
    refused = await h.error(bob, "get_events", session_id=sid, client_id="bob", since=0)
    assert refused["error_type"] == "SessionNotFound"


@pytest_twisted.ensureDeferred
async def test_without_auth_a_request_without_client_id_acts_as_the_owner(make):
    """Auth off: client ids are claims (docs/security.md); no claim is the owner, as before."""
    h = await make()
    sid, _alice, _bob = await _shared(h)
    anyone = connect()
    shared = await h.ok(anyone, "share_session", session_id=sid, **{"with": "dan"}, access="read")
    assert [s["client_id"] for s in shared["shares"]] == ["bob", "dan"]
    claim = await h.error(anyone, "close_session", session_id=sid, client_id="bob")
    assert claim["error_type"] == "PermissionDenied"


@pytest_twisted.ensureDeferred
async def test_an_older_copy_of_the_context_keeps_the_shares_as_they_are(make):
    """load_context and close without saving replace the context, not who may use it."""
    h = await make()
    sid, alice, bob = await _shared(h, "write")
    await h.ok(alice, "save_context", client_id="alice")  # saved while bob has write
    await h.ok(alice, "unshare_session", client_id="alice", **{"with": "bob"})
    await h.ok(alice, "share_session", client_id="alice", **{"with": "carol"}, access="read")
    await h.ok(alice, "load_context", client_id="alice")
    refused = await h.error(bob, "get_session_info", session_id=sid, client_id="bob")
    assert refused["error_type"] == "SessionNotFound"  # the old copy brings no share back
    info = await h.ok(alice, "get_session_info", client_id="alice")
    assert info["shares"] == [{"client_id": "carol", "access": "read"}]
    closed = await h.ok(alice, "close_session", client_id="alice", save_state=False)
    assert closed["closed"] is True
    listed = await h.ok(connect(), "list_shared_sessions", client_id="bob")
    assert listed["sessions"] == []
    assert h.service.sessions[sid].shares == {"carol": "read"}
