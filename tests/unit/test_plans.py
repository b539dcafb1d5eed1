"""Plans (access.md §2): parsing, the feature gate, per-plan limits, reloading."""

from __future__ import annotations

import os
import textwrap
from unittest import mock

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from stui_twisted.access.plans import (
    ALL_BUT_ADMIN,
    COMMAND_FEATURE,
    DEBUG_COMMANDS,
    FEATURES,
    NEVER_GATED,
    PlanBook,
    read_plans,
)
from stui_twisted.config import ConfigError
from stui_twisted.dispatch.commands import build_commands
from stui_twisted.dispatch.debug_commands import build_debug_commands
from stui_twisted.dispatch.dispatcher import Dispatcher
from stui_twisted.dispatch.interfaces import ConnectionContext
from stui_twisted.events.commands import build_event_commands
from stui_twisted.sessions.evaluations import RunningEvaluation
from stui_twisted.settings import Settings
from stui_twisted.storage.store import SessionStore
from stui_twisted.tap import build_session_core
from tests.helpers import NullImageService, dispatch
from tests.unit.test_format_a import request as format_a_request

CONTRACT = """\
[stui]
tcp = tcp:0:interface=127.0.0.1

[plans]
default = free          ; plan of a principal not listed below

[plan:free]
features = evaluate inspect complete browse events share
max_sessions_per_client = 2
max_eval_timeout = 30

[plan:pro]
features = all          ; every feature, the debugger included
max_sessions_per_client = 20

[plan:ops]
features = all admin

[principals]
alice = pro
root = ops
"""


def write(path, text: str):
    path.write_text(textwrap.dedent(text))
    return str(path)


def in_place(f, *args):
    """C{run_blocking} for tests: the read happens at once, in this thread."""
    return defer.maybeDeferred(f, *args)


def book_of(tmp_path, text=CONTRACT, **settings) -> PlanBook:
    path = write(tmp_path / "stui.ini", text)
    plans, signature = read_plans(path)
    return PlanBook(
        Settings(auth_file="users", **settings),
        path=path,
        plans=plans,
        signature=signature,
        run_blocking=in_place,
    )


# -- parsing ------------------------------------------------------------------------


def test_the_contract_example_parses(tmp_path):
    plans, _ = read_plans(write(tmp_path / "a.ini", CONTRACT))
    assert plans.default == "free"
    assert plans.plans["free"].features == {
        "evaluate",
        "inspect",
        "complete",
        "browse",
        "events",
        "share",
    }
    assert plans.plans["free"].limits == {"max_sessions_per_client": 2, "max_eval_timeout": 30.0}
    assert plans.plans["pro"].features == ALL_BUT_ADMIN
    assert "admin" not in plans.plans["pro"].features
    assert plans.plans["ops"].features == ALL_BUT_ADMIN | {"admin"}
    assert plans.plan_of("alice").name == "pro"
    assert plans.plan_of("Alice").name == "free"  # client ids are case-sensitive
    assert plans.plan_of("carol").name == "free"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[plans]\ndefault = free\n[plan:free]\nfeatures = evaluate teleport\n", "'teleport'"),
        ("[plans]\ndefault = gold\n[plan:free]\nfeatures = all\n", "default = gold"),
        ("[plans]\n[plan:free]\nfeatures = all\n", "default = PLAN"),
        ("[plan:free]\nfeatures = all\n", "[plan:free] needs a [plans] section"),
        ("[plans]\ndefault = free\n[plan:free]\nfeatures = all\n[principals]\nbob = gold\n", "bob"),
        ("[plans]\ndefault = free\n[plan:free]\nmax_sessions_per_client = 2\n", "features"),
        ("[plans]\ndefault = free\n[plan:free]\nfeatures = all\nspeed = 11\n", "'speed'"),
        (
            "[plans]\ndefault = free\n[plan:free]\nfeatures=all\nhistory_limit = 0\n",
            "history_limit",
        ),
        ("[plans]\ndefault = free\ndefault = pro\n", "not a valid INI file"),
    ],
)
def test_a_wrong_plan_file_is_refused_naming_what_is_wrong(tmp_path, text, named):
    with pytest.raises(ConfigError) as raised:
        read_plans(write(tmp_path / "bad.ini", text))
    assert named in str(raised.value)


def test_an_unknown_feature_lists_the_known_ones(tmp_path):
    with pytest.raises(ConfigError) as raised:
        read_plans(write(tmp_path / "bad.ini", "[plans]\ndefault=f\n[plan:f]\nfeatures = x\n"))
    for feature in FEATURES:
        assert feature in str(raised.value)


def test_without_plans_everyone_has_every_feature_but_admin(tmp_path):
    plans, _ = read_plans(write(tmp_path / "plain.ini", "[stui]\ntcp = none\n"))
    assert not plans.configured
    assert plans.plan_of("anyone").features == ALL_BUT_ADMIN


def test_start_up_refuses_a_wrong_plan_naming_the_config(tmp_path):
    from twisted.python import usage

    from stui_twisted.tap import Options

    path = write(tmp_path / "s.ini", "[stui]\n[plans]\ndefault = gold\n")
    with pytest.raises(usage.UsageError, match="--config: .*default = gold"):
        Options().parseOptions([f"--config={path}", f"--data-dir={tmp_path}"])


# -- the command table ---------------------------------------------------------------


def every_command() -> set[str]:
    dispatcher = Dispatcher(clock=task.Clock())
    commands = build_commands(mock.Mock(), dispatcher)
    commands += build_event_commands(mock.Mock(), mock.Mock())
    return {command.name for command in commands}


def test_every_command_is_gated_by_a_feature_or_listed_as_never_gated():
    unclassified = every_command() - set(COMMAND_FEATURE) - NEVER_GATED
    assert unclassified == set()
    assert not set(COMMAND_FEATURE) & NEVER_GATED


def test_the_debug_feature_gates_every_debugger_command():
    assert {command.name for command in build_debug_commands(mock.Mock())} == set(DEBUG_COMMANDS)
    assert all(COMMAND_FEATURE[name] == "debug" for name in DEBUG_COMMANDS)


# -- the gate in the dispatcher --------------------------------------------------------


class FakeAuth:
    enabled = True

    def check_token(self, token):
        return {"tok-root": "root"}.get(token)

    def token_expires_at(self, token):
        return 1_790_000_000.0 if self.check_token(token) else None

    def revoke_client(self, client_id):
        return 3 if client_id == "bob" else 0


def gated(book: PlanBook, auth=None, service=None) -> Dispatcher:
    auth = auth if auth is not None else FakeAuth()
    service = service or NullImageService()
    dispatcher = Dispatcher(clock=task.Clock(), auth=auth, plans=book)
    dispatcher.register_all(build_commands(service, dispatcher, auth, handlers=service))
    return dispatcher


def as_(principal: str) -> ConnectionContext:
    return ConnectionContext("tcp", "127.0.0.1", principal=principal)


def test_a_feature_outside_the_plan_is_permission_denied_naming_feature_and_plan(tmp_path):
    book = book_of(tmp_path)
    dispatcher = gated(book)
    assert dispatch(dispatcher, {"command": "evaluate", "parameters": {"code": "1"}}, as_("bob"))[
        "status"
    ] == ("success")
    denied = dispatch(dispatcher, {"command": "debug_state"}, as_("bob"))
    assert denied["error_type"] == "PermissionDenied"
    assert denied["details"]["feature"] == "debug"
    assert denied["details"]["plan"] == "free"
    assert "'debug'" in denied["error"] and "'free'" in denied["error"]
    book.check("debug_state", "alice")  # pro: no error


def test_format_a_debug_is_gated_like_the_flat_command(tmp_path):
    dispatcher = gated(book_of(tmp_path))
    message = format_a_request("Debug", {"operation": "GetStackTrace", "context": "s_1"})
    reply = dispatch(dispatcher, message, as_("bob"))
    body = reply["payload"]["data"]
    assert body["response_type"] == "Error"
    assert body["data"]["code"] == "PermissionDenied"
    assert body["data"]["details"]["feature"] == "debug"


def test_admin_needs_the_admin_feature_and_takes_another_client_id(tmp_path):
    dispatcher = gated(book_of(tmp_path))
    refused = dispatch(
        dispatcher, {"command": "revoke_tokens", "parameters": {"client_id": "bob"}}, as_("alice")
    )
    assert refused["error_type"] == "PermissionDenied"
    assert refused["details"] == {"feature": "admin", "plan": "pro", "command": "revoke_tokens"}
    # root's client_id names the principal acted on, not root
    done = dispatch(
        dispatcher, {"command": "revoke_tokens", "parameters": {"client_id": "bob"}}, as_("root")
    )
    assert done["result"] == {"revoked": 3}
    # elsewhere a client_id that is not the principal is still refused
    other = dispatch(
        dispatcher, {"command": "evaluate", "parameters": {"client_id": "bob"}}, as_("root")
    )
    assert other["error_type"] == "PermissionDenied" and other["details"] == {
        "parameter": "client_id"
    }


def test_with_auth_off_admin_is_never_granted_and_everyone_has_the_default_plan(tmp_path):
    text = "[plans]\ndefault = ops\n[plan:ops]\nfeatures = all admin\nhistory_limit = 7\n"
    book = PlanBook(Settings(), plans=read_plans(write(tmp_path / "o.ini", text))[0])
    dispatcher = Dispatcher(clock=task.Clock(), plans=book)
    service = NullImageService()
    dispatcher.register_all(build_commands(service, dispatcher, None, handlers=service))
    assert dispatch(dispatcher, {"command": "list_clients"})["error_type"] == "PermissionDenied"
    me = dispatch(dispatcher, {"command": "whoami", "parameters": {"client_id": "carol"}})
    assert me["result"]["plan"] == "ops"
    assert "admin" not in me["result"]["features"]
    assert me["result"]["authenticated"] is False
    assert me["result"]["limits"]["history_limit"] == 7


def test_whoami_and_validate_feature_access(tmp_path):
    dispatcher = gated(book_of(tmp_path))
    me = dispatch(dispatcher, {"command": "whoami", "token": "tok-root"}, as_("x"))["result"]
    assert me == {
        "client_id": "root",
        "plan": "ops",
        "features": sorted(ALL_BUT_ADMIN | {"admin"}),
        "limits": {
            "max_sessions_per_client": 5,
            "max_eval_timeout": 600.0,
            "max_session_bytes": 8 * 1024 * 1024,
            "history_limit": 100,
            "create_rate_limit": 10,
        },
        "authenticated": True,
        "token_expires_at": "2026-09-21T14:13:20.000Z",
    }
    bob = dispatch(dispatcher, {"command": "whoami"}, as_("bob"))["result"]
    assert (bob["plan"], bob["token_expires_at"]) == ("free", None)
    assert bob["limits"]["max_sessions_per_client"] == 2
    access = dispatch(
        dispatcher,
        {"command": "validate_feature_access", "parameters": {"feature": "Debug"}},
        as_("bob"),
    )["result"]
    assert access == {
        "feature": "debug",
        "access_granted": False,
        "subscription_tier": "free",
        "expires_at": None,
    }
    unknown = dispatch(
        dispatcher,
        {"command": "validate_feature_access", "parameters": {"feature": "teleport"}},
        as_("bob"),
    )
    assert unknown["error_type"] == "InvalidRequest"
    assert unknown["details"]["features"] == list(FEATURES)


# -- limits ---------------------------------------------------------------------------


def test_limits_fall_back_to_the_server_and_bytes_cannot_exceed_it(tmp_path):
    text = CONTRACT.replace("max_sessions_per_client = 20", "max_session_bytes = 999999999")
    book = book_of(tmp_path, text, max_session_bytes=4096, history_limit=9)
    assert book.limit("bob", "max_sessions_per_client") == 2
    assert book.limit("alice", "max_sessions_per_client") == 5
    assert book.limit("bob", "history_limit") == 9
    assert book.limit("alice", "max_session_bytes") == 4096


@pytest_twisted.ensureDeferred
async def test_the_owners_plan_limits_sessions_and_history(tmp_path):
    book = book_of(tmp_path, CONTRACT.replace("max_eval_timeout = 30", "history_limit = 1"))
    core, sessions = build_session_core(
        book.settings.replace(data_dir=str(tmp_path / "d"), image_enabled=False),
        task.Clock(),
        SessionStore(str(tmp_path / "d"), reactor=reactor),
        plans=book,
    )
    core.startService()
    try:
        await sessions.ready()
        for _ in range(2):
            await sessions.create_session(
                client_id="bob", timeout=None, client_info=None, connection=as_("bob")
            )
        with pytest.raises(Exception) as raised:
            await sessions.create_session(
                client_id="bob", timeout=None, client_info=None, connection=as_("bob")
            )
        assert raised.value.details["max_sessions_per_client"] == 2
        for _ in range(3):  # alice's pro plan has the server-wide limit (5)
            await sessions.create_session(
                client_id="alice", timeout=None, client_info=None, connection=as_("alice")
            )
        session = next(iter(sessions._sessions_of("bob")))
        for n in range(3):
            run = RunningEvaluation(session, n + 1, f"x = {n}", 0.0, None)
            sessions.live._history_entry(run, outcome={"result": n})
        assert len(session.history) == 1
    finally:
        await core.stopService()


# -- reloading ------------------------------------------------------------------------


def bump(path: str) -> None:
    """Make the next stat see a change even within one mtime tick."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


@pytest_twisted.ensureDeferred
async def test_a_bad_file_keeps_the_old_plans_and_is_counted_once(tmp_path):
    book = book_of(tmp_path)
    path = book.path
    assert await book.reload_if_changed() is False  # unchanged: not read
    with open(path, "a") as handle:
        handle.write("[principals]\nbob = gold\n")  # a second [principals]: not valid INI
    bump(path)
    assert await book.reload_if_changed() is False
    assert book.reload_errors == 1
    assert book.plan_for("alice").name == "pro"
    assert await book.reload_if_changed() is False  # the same bad file: not counted again
    assert book.reload_errors == 1
    write(tmp_path / "stui.ini", CONTRACT.replace("alice = pro", "alice = free\nbob = pro"))
    bump(path)
    assert await book.reload_if_changed() is True
    assert (book.plan_for("alice").name, book.plan_for("bob").name) == ("free", "pro")
    assert book.reload_errors == 1


@pytest_twisted.ensureDeferred
async def test_the_cleanup_loop_notices_a_changed_file(tmp_path):
    book = book_of(tmp_path)
    clock = task.Clock()
    settings = book.settings.replace(data_dir=str(tmp_path / "d"), image_enabled=False)
    core, sessions = build_session_core(
        settings, clock, SessionStore(str(tmp_path / "d"), reactor=reactor), plans=book
    )
    core.startService()
    try:
        await sessions.ready()
        write(
            tmp_path / "stui.ini", CONTRACT.replace("bob", "x").replace("alice = pro", "bob = pro")
        )
        bump(book.path)
        assert book.plan_for("bob").name == "free"
        clock.advance(settings.cleanup_interval - 1)
        assert book.plan_for("bob").name == "free"
        clock.advance(1)
        assert book.plan_for("bob").name == "pro"
        assert book.reloads == 1
    finally:
        await core.stopService()


@pytest_twisted.ensureDeferred
async def test_the_callers_plan_bounds_the_evaluation_time(tmp_path):
    from stui_twisted.protocol.errors import StuiError
    from stui_twisted.sessions.live import LiveSessions
    from stui_twisted.sessions.model import Session
    from tests.unit.test_service import _ScriptedImage, _View

    class TimedImage(_ScriptedImage):
        def evaluate(self, session_id, code, mode, timeout, **kwargs):
            self.timeouts.append(timeout)
            return super().evaluate(session_id, code, mode, timeout, **kwargs)

    book = book_of(tmp_path, CONTRACT.replace("max_eval_timeout = 30", "max_eval_timeout = 10"))
    session = Session("s_" + "e" * 22, "alice", 0.0, 60.0, 0.0, 0.0)
    image = TimedImage({"result": "1", "result_type": "int", "output": "", "variables": []})
    image.timeouts = []
    live = LiveSessions(_View([session]), image, book.settings, task.Clock(), plans=book)
    with pytest.raises(StuiError) as raised:
        await live.evaluate(session, "1", "execute", 11, by="bob")
    assert raised.value.details == {"parameter": "timeout", "max_eval_timeout": 10.0}
    await live.evaluate(session, "1", "execute", None, by="bob")  # the default, lowered
    await live.evaluate(session, "1", "execute", 300, by="alice")  # pro: the server's 600
    assert image.timeouts == [10.0, 300]
