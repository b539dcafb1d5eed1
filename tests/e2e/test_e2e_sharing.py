"""End to end with auth on: alice shares a session with bob (access.md §1).

One real C{twistd -n stui} with a password file and the live image for the module;
the last test restarts it.  Bob reads and watches, is refused what a reader may not
do (on TCP and on ZeroMQ), evaluates once given write (the history says C{by:
bob}), and is cut off at once by unsharing; the shares survive the restart.
"""

from __future__ import annotations

import pytest

from tests.e2e.test_e2e_events import EventClient
from tests.helpers import write_users
from tests.serverproc import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.image]

PASSWORDS = {"alice": "alice-pw-1", "bob": "bob-pw-2"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sharing")
    users = workdir / "users"
    write_users(users, **PASSWORDS)
    proc = ServerProcess(workdir, f"--auth-file={users}", "--durability=always").start()
    yield proc
    proc.kill()


def login(server, user: str) -> EventClient:
    """A TCP connection authenticated as C{user}."""
    client = EventClient(server.tcp_client(timeout=30))
    client.result("authenticate", username=user, password=PASSWORDS[user])
    return client


def zmq_call(server, user: str, command: str, **parameters) -> dict:
    """One ZeroMQ request of C{user}, authenticated by a token."""
    token = server.zmq_request(
        {
            "id": "a",
            "command": "authenticate",
            "parameters": {"username": user, "password": PASSWORDS[user]},
        }
    )["result"]["token"]
    return server.zmq_request(
        {"id": "b", "command": command, "parameters": parameters, "token": token}
    )


def share(alice, session_id, access):
    return alice.result("share_session", session_id=session_id, access=access, **{"with": "bob"})


@pytest.mark.timeout(180)
def test_bob_reads_and_watches_then_writes_then_is_cut_off(server):
    alice, bob = login(server, "alice"), login(server, "bob")
    session_id = alice.result("create_session")["session_id"]
    alice.result("evaluate", code="x = [1, 2]; y = {'k': 3}")
    selected = alice.result("inspect", expression="x")["object_id"]
    alice.result("subscribe")
    assert share(alice, session_id, "read")["shares"] == [{"client_id": "bob", "access": "read"}]

    # read: attach, look, watch live
    restored = bob.result("restore_session", session_id=session_id)
    assert restored["client_id"] == "alice"
    assert [entry["by"] for entry in restored["workspace_context"]["history"]] == ["alice"]
    assert "shares" not in bob.result("get_session_info")  # the owner's view only
    subscribed = bob.result("subscribe")
    assert subscribed["session_id"] == session_id
    joined = alice.wait_event("watcher_joined")
    assert joined["data"] == {"client_id": "bob", "access": "read"}
    alice.result("evaluate", code="x.append(len(x))")
    finished = bob.wait_event("evaluation_finished")
    assert finished["data"]["by"] == "alice" and finished["data"]["ok"] is True
    bob.result("complete", code="x.app")
    assert bob.result("inspect", expression="y")["session_id"] == session_id

    # read: refused what changes the session, on TCP and on ZeroMQ
    denied = bob.call("evaluate", code="x.clear()")
    assert denied["error_type"] == "PermissionDenied", denied
    assert denied["details"] == {"access": "read", "command": "evaluate"}
    over_zmq = zmq_call(server, "bob", "evaluate", session_id=session_id, code="1")
    assert over_zmq["error_type"] == "PermissionDenied"
    assert zmq_call(server, "bob", "get_context_summary", session_id=session_id)["status"] == (
        "success"
    )
    assert bob.call("close_session")["error_type"] == "PermissionDenied"
    computing = bob.call("inspect", expression="x.clear() or x")  # inspect evaluates
    assert computing["error_type"] == "PermissionDenied", computing

    # the reader's inspect left the session's inspector state alone
    state = alice.result("restore_session", session_id=session_id)["inspector_state"]
    assert state["selected_object"] == selected and state["history"] == [selected]

    # write: bob evaluates, and the history says so
    share(alice, session_id, "write")
    assert bob.result("evaluate", code="x.append('bob')")["result"] is None
    history = alice.result("restore_session", session_id=session_id)["workspace_context"]["history"]
    assert [entry["by"] for entry in history] == ["alice", "alice", "bob"]
    assert alice.result("evaluate", code="x")["result"] == "[1, 2, 2, 'bob']"
    assert bob.call("share_session", access="read", **{"with": "bob"})["error_type"] == (
        "PermissionDenied"
    )

    # unshare: at once
    alice.events.clear()
    assert alice.result("unshare_session", session_id=session_id, **{"with": "bob"})["shares"] == []
    left = alice.wait_event("watcher_left")
    assert left["data"] == {"client_id": "bob", "access": "write"}
    gone = bob.call("get_session_info")  # still bob's current session
    assert gone["error_type"] == "SessionNotFound", gone
    assert bob.call("evaluate", code="1")["error_type"] == "SessionNotFound"
    assert bob.result("list_shared_sessions")["sessions"] == []
    alice.client.close()
    bob.client.close()


@pytest.mark.timeout(180)
def test_shares_survive_a_restart(server):
    alice = login(server, "alice")
    session_id = alice.result("create_session")["session_id"]
    share(alice, session_id, "read")
    alice.client.close()
    assert server.stop() == 0
    server.start()

    bob = login(server, "bob")
    listed = bob.result("list_shared_sessions")["sessions"]
    assert [(s["session_id"], s["owner"], s["access"]) for s in listed] == [
        (session_id, "alice", "read")
    ]
    assert bob.result("restore_session", session_id=session_id)["client_id"] == "alice"
    assert bob.call("evaluate", code="1")["error_type"] == "PermissionDenied"
    alice = login(server, "alice")
    info = alice.result("get_session_info", session_id=session_id)
    assert info["shares"] == [{"client_id": "bob", "access": "read"}]
    alice.client.close()
    bob.client.close()
