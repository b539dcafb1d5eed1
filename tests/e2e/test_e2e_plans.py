"""Plans and admin commands against a real server with auth on (access.md §2, §3).

One server for the module; each test writes the plans it needs and reloads
them with SIGHUP, on connections that stay open across the reload.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.helpers import write_users
from tests.serverproc import ServerProcess

PLANS = """\
[stui]
history_limit = 100

[plans]
default = free

[plan:free]
features = evaluate inspect complete browse events share
max_sessions_per_client = 3

[plan:pro]
features = all

[plan:ops]
features = all admin

[principals]
root = ops
{extra}
"""

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("plans")
    users = workdir / "users"
    write_users(users, bob="pw-bob", root="pw-root")
    config = workdir / "stui.ini"
    config.write_text(PLANS.format(extra=""))
    proc = ServerProcess(workdir, f"--auth-file={users}", f"--config={config}").start()
    proc.config = config
    yield proc
    proc.kill()


def reload(server, text: str, timeout: float = 20.0) -> str:
    """Write the config, send SIGHUP, wait until the server logged the outcome."""
    marks = ("plans reloaded from", "plans not reloaded")
    before = sum(server.log_text().count(mark) for mark in marks)
    server.config.write_text(text)
    server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = server.log_text()
        if sum(log.count(mark) for mark in marks) > before:
            return log
        time.sleep(0.05)
    raise AssertionError(f"no reload was logged within {timeout} s:\n{server.log_text()}")


def login(server, user: str):
    client = server.tcp_client(timeout=30)
    token = client.result("authenticate", username=user, password=f"pw-{user}")["token"]
    return client, token


def test_a_plan_change_applies_to_the_next_command_without_reconnecting(server):
    reload(server, PLANS.format(extra=""))
    bob, token = login(server, "bob")
    try:
        bob.result("create_session", timeout=600)
        denied = bob.call("debug_state")
        assert denied["error_type"] == "PermissionDenied", denied
        assert denied["details"]["feature"] == "debug"
        assert denied["details"]["plan"] == "free"
        assert "'debug'" in denied["error"] and "'free'" in denied["error"]
        # ZeroMQ is gated the same way, by the token's principal
        over_zmq = server.zmq_request(
            {"id": 1, "command": "list_breakpoints", "token": token, "parameters": {}}
        )
        assert over_zmq["error_type"] == "PermissionDenied"
        assert bob.result("whoami")["limits"]["max_sessions_per_client"] == 3

        reload(server, PLANS.format(extra="bob = pro"))
        state = bob.result("debug_state")  # same connection, no new authenticate
        assert state["paused"] is False
        me = bob.result("whoami")
        assert (me["client_id"], me["plan"], me["authenticated"]) == ("bob", "pro", True)
        assert "debug" in me["features"] and "admin" not in me["features"]
        assert me["limits"]["max_sessions_per_client"] == 5  # the server-wide default
        access = bob.call("validate_feature_access", token=token, feature="debug")["result"]
        assert access["access_granted"] is True and access["subscription_tier"] == "pro"
        assert access["expires_at"].endswith("Z")
    finally:
        bob.close()


def test_a_broken_config_keeps_the_old_plans_and_is_counted(server):
    reload(server, PLANS.format(extra="bob = pro"))
    bob, _ = login(server, "bob")
    try:
        errors = bob.result("get_session_statistics")["config_reload_errors"]
        log = reload(server, PLANS.format(extra="bob = pro").replace("share", "teleport"))
        assert "plans not reloaded, the previous ones stay in force" in log
        assert "'teleport'" in log
        assert bob.result("get_session_statistics")["config_reload_errors"] == errors + 1
        assert bob.result("whoami")["plan"] == "pro"
        bob.result("create_session", timeout=600)
        assert bob.result("debug_state")["paused"] is False
        log = reload(server, PLANS.format(extra="bob = gold"))  # an unknown plan
        assert "no [plan:gold]" in log
        assert bob.result("get_session_statistics")["config_reload_errors"] == errors + 2
        assert bob.result("whoami")["plan"] == "pro"
    finally:
        bob.close()
        reload(server, PLANS.format(extra=""))


def test_admin_commands_work_for_ops_and_are_refused_otherwise(server):
    reload(server, PLANS.format(extra=""))
    bob, bob_token = login(server, "bob")
    root, _ = login(server, "root")
    try:
        session_id = bob.result("create_session", timeout=600)["session_id"]
        bob.result("evaluate", code="1 + 1")
        for command, parameters in (
            ("list_clients", {}),
            ("list_all_sessions", {}),
            ("revoke_tokens", {"client_id": "root"}),
            ("disconnect_client", {"client_id": "root"}),
        ):
            refused = bob.call(command, **parameters)
            assert refused["error_type"] == "PermissionDenied", refused
            assert refused["details"]["feature"] == "admin"

        clients = root.result("list_clients")["clients"]
        bobs = [c for c in clients if c["client_id"] == "bob"]
        mine = [c for c in bobs if c["transport"] == "tcp"]  # (a ZeroMQ peer of bob's too)
        assert len(mine) == 1, clients
        assert mine[0]["peer"] == "127.0.0.1"
        assert mine[0]["current_session"] == session_id
        assert mine[0]["last_command"] == "disconnect_client"  # its last (refused) request
        assert mine[0]["connected_at"].endswith("Z") and mine[0]["last_activity"].endswith("Z")

        listed = root.result("list_all_sessions", client_id="bob")["sessions"]
        assert {s["owner"] for s in listed} == {"bob"}  # bob's sessions of earlier tests too
        assert session_id in {s["session_id"] for s in listed}
        everyone = root.result("list_all_sessions", include_inactive=True)["sessions"]
        assert session_id in {s["session_id"] for s in everyone}

        assert root.result("revoke_tokens", client_id="bob")["revoked"] >= 1
        after = server.zmq_request({"id": 2, "command": "whoami", "token": bob_token})
        assert after["error_type"] == "AuthenticationRequired"

        assert root.result("disconnect_client", client_id="bob") == {"disconnected": len(bobs)}
        with pytest.raises((ConnectionError, OSError)):
            bob.call("ping")
            bob.call("ping")  # a close may surface only on the second exchange
        log = server.log_text()
        assert "admin: root ran disconnect_client on bob" in log
        assert "admin: root ran revoke_tokens on bob" in log
    finally:
        bob.close()
        root.close()
