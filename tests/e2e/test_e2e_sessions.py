"""End to end: sessions across transports, restarts, kill -9 and damaged files."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.e2e


def zmq_call(server, sock, command, **parameters):
    sock.send(json.dumps({"command": command, "parameters": parameters}).encode())
    return json.loads(sock.recv())


@pytest.fixture
def zmq_socket():
    import zmq

    sockets = []

    def make(url):
        sock = zmq.Context.instance().socket(zmq.REQ)
        sock.setsockopt(zmq.RCVTIMEO, 15_000)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(url)
        sockets.append(sock)
        return sock

    yield make
    for sock in sockets:
        sock.close()


def test_two_transports_two_clients_and_a_restart(tmp_path, zmq_socket, start_server):
    server = start_server(tmp_path, image=False)
    alice = server.tcp_client()
    a = alice.result("create_session", client_id="alice")
    alice.result(
        "update_session_state",
        state_data={"counter": 1, "nested": {"x": [1, 2]}},
        workspace_context={"client": {"editor": "x = 1"}},
        inspector_state={"view": {"panel": "left"}},
    )
    bob_sock = zmq_socket(server.zmq_url)
    b = zmq_call(server, bob_sock, "create_session", client_id="bob")["result"]
    reply = zmq_call(server, bob_sock, "update_session_state", state_data={"bob": True})
    assert reply["status"] == "success"
    assert [
        s["session_id"] for s in alice.result("list_client_sessions", client_id="alice")["sessions"]
    ] == [a["session_id"]]
    listed = zmq_call(server, bob_sock, "list_client_sessions", client_id="bob")["result"]
    assert [s["session_id"] for s in listed["sessions"]] == [b["session_id"]]
    carol = server.tcp_client()
    assert carol.result("list_client_sessions", client_id="carol")["session_count"] == 0
    for sid in (a["session_id"], b["session_id"]):
        assert (
            carol.call("restore_session", session_id=sid, client_id="carol")["error_type"]
            == "SessionNotFound"
        )
    assert server.stop() == 0
    server.start()
    again = server.tcp_client()
    restored = again.result("restore_session", session_id=a["session_id"], client_id="alice")
    assert restored["session_state"] == {"counter": 1, "nested": {"x": [1, 2]}}
    assert restored["workspace_context"]["client"] == {"editor": "x = 1"}
    assert restored["inspector_state"]["view"] == {"panel": "left"}
    bob_again = zmq_socket(server.zmq_url)
    restored_b = zmq_call(server, bob_again, "restore_session", session_id=b["session_id"])[
        "result"
    ]
    assert restored_b["session_state"] == {"bob": True}
    stats = again.result("get_session_statistics")
    assert stats["active_sessions"] == 2 and stats["total_sessions"] == 2
    assert stats["connected_clients"] >= 2  # this TCP connection and bob's ZeroMQ peer
    info = again.result("get_session_info", session_id=a["session_id"])
    assert info["attached_connections"] == 1


def test_kill_9_after_acknowledged_update_loses_nothing_with_always(tmp_path, start_server):
    server = start_server(tmp_path, "--durability=always", image=False)
    client = server.tcp_client()
    sid = client.result("create_session", client_id="alice")["session_id"]
    for n in range(1, 21):
        client.result("update_session_state", state_data={"n": n})
    server.kill()
    server.start()
    restored = server.tcp_client().result("restore_session", session_id=sid)
    assert restored["session_state"] == {"n": 20}


@pytest.mark.parametrize("damage", ["truncate", "edit"])
def test_damaged_file_restores_from_bak_and_is_quarantined(tmp_path, damage, start_server):
    server = start_server(tmp_path, "--durability=always", image=False)
    client = server.tcp_client()
    sid = client.result("create_session", client_id="alice")["session_id"]
    client.result("update_session_state", state_data={"v": "good"})
    client.result("update_session_state", state_data={"v": "newest"})
    assert server.stop() == 0
    (path,) = list((server.data_dir / "sessions").rglob(f"{sid}.json"))
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(data.replace(b'"newest"', b'"forged"'))
    server.start()
    restored = server.tcp_client().result("restore_session", session_id=sid)
    assert restored["session_state"] == {"v": "good"}  # the previous version, from .bak
    quarantined = list((server.data_dir / "quarantine").iterdir())
    assert quarantined, "the bad file was not quarantined"
    stats = server.tcp_client().result("get_session_statistics")
    assert stats["storage"]["quarantined"] >= 1


def test_hostile_client_ids_never_leave_the_data_dir(tmp_path, start_server):
    server = start_server(tmp_path, "--durability=always", image=False)
    client = server.tcp_client()
    for client_id in ("../../etc", "a/b", "..", "/abs", "a\x00b"):
        reply = client.call("create_session", client_id=client_id)
        assert reply["error_type"] == "ClientNotAllowed", reply
    for client_id in ("a..b", "x:y@z", "A-b.c_d"):
        client.result("create_session", client_id=client_id)
    outside = [
        p
        for p in tmp_path.rglob("*")
        if p.is_file() and server.data_dir not in p.parents and p.name not in ("twistd.log",)
    ]
    assert outside == []
    for path in (server.data_dir / "sessions").iterdir():
        assert path.name.startswith("c-")
