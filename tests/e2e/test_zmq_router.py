"""The ZeroMQ ROUTER adapter on a real socket and the real reactor.

ZeroMQ's descriptor is edge-triggered: a send can consume the notification of
a message that arrived meanwhile, and nothing wakes the reactor for it again.
These tests pin down that a reply sent outside the read loop (one that waited)
still leads to reading what is queued.
"""

from __future__ import annotations

import json
import time

import pytest
import pytest_twisted
import zmq
from twisted.internet import defer, task

from stui_twisted.transports.zmqrouter import ZmqRouterService


def _reactor():
    from twisted.internet import reactor

    return reactor


class HeldDispatcher:
    """Answers C{hold} with a Deferred the test fires, anything else at once."""

    def __init__(self) -> None:
        self.held: list[defer.Deferred] = []
        self.seen: list[str] = []

    def answer(self, context, data: bytes):
        request = json.loads(data)
        self.seen.append(request["id"])
        reply = json.dumps({"id": request["id"], "status": "success"}).encode()
        if request["command"] == "hold":
            held = defer.Deferred()
            self.held.append(held)
            return held.addCallback(lambda _: reply)
        return reply


async def _until(condition, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await task.deferLater(_reactor(), 0.01, lambda: None)


@pytest.fixture
def router():
    dispatcher = HeldDispatcher()
    service = ZmqRouterService("tcp://127.0.0.1:*", dispatcher, max_message_bytes=1 << 20)
    service.startService()
    yield service, dispatcher
    service.stopService()


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_a_reply_sent_after_waiting_still_reads_what_arrived_meanwhile(router):
    service, dispatcher = router
    client = zmq.Context.instance().socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    client.connect(service.bound_endpoints[0])
    try:
        for attempt in range(20):
            held_id, quick_id = f"held-{attempt}", f"quick-{attempt}"
            client.send_multipart([b"", json.dumps({"id": held_id, "command": "hold"}).encode()])
            await _until(lambda held=held_id: held in dispatcher.seen)
            # The next request reaches the server's queue while the reactor is
            # busy (no poll in between); then the held reply is sent, outside
            # the read loop.
            client.send_multipart([b"", json.dumps({"id": quick_id, "command": "ping"}).encode()])
            time.sleep(0.02)
            dispatcher.held.pop().callback(None)
            replies = []
            deadline = time.monotonic() + 5
            while len(replies) < 2 and time.monotonic() < deadline:
                if client.poll(0):
                    replies.append(json.loads(client.recv_multipart()[-1])["id"])
                else:
                    await task.deferLater(_reactor(), 0.005, lambda: None)
            assert sorted(replies) == sorted([held_id, quick_id]), f"attempt {attempt}: {replies}"
    finally:
        client.close()


# -- the peer tables (task.Clock, no socket) -------------------------------------------


class SessionDispatcher:
    """C{create_session} makes a current session, C{close_session} ends it, C{hold} waits."""

    def __init__(self) -> None:
        self.held: list[defer.Deferred] = []
        self.current: dict[str, str | None] = {}

    def answer(self, context, data: bytes):
        request = json.loads(data)
        command = request["command"]
        if command == "create_session":
            context.current_session_id = f"s_{request['id']}"
        elif command == "close_session":
            context.current_session_id = None
        self.current[request["id"]] = context.current_session_id
        reply = json.dumps({"id": request["id"], "status": "success"}).encode()
        if command == "hold":
            held = defer.Deferred()
            self.held.append(held)
            return held.addCallback(lambda _: reply)
        return reply


class RecordingRouter:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send_to(self, identity, envelope, data) -> None:
        self.sent.append(identity)

    def forget(self, identity) -> None:
        raise AssertionError("not used by these tests")


@pytest.fixture
def tables():
    clock = task.Clock()
    clock.advance(1_790_000_000)  # like the reactor's clock: far from 0
    dispatcher = SessionDispatcher()
    service = ZmqRouterService("tcp://127.0.0.1:*", dispatcher, max_message_bytes=4096, clock=clock)
    service._router = RecordingRouter()

    def send(identity: bytes, command: str, request_id: str) -> str | None:
        """One request; returns the current session the dispatcher saw for it."""
        payload = json.dumps({"id": request_id, "command": command}).encode()
        service.message_received(identity, [b"", payload], "127.0.0.1")
        return dispatcher.current.get(request_id)

    return service, clock, dispatcher, send


def test_one_shot_anonymous_peers_do_not_evict_a_peer_with_a_current_session(tables):
    service, clock, _, send = tables
    assert send(b"alice", "create_session", "a1") == "s_a1"
    clock.advance(15)
    for n in range(3 * service.max_anonymous_peers):  # one-shot pings, fresh identities
        send(b"oneshot-%d" % n, "ping", f"p{n}")
        if n % 1000 == 0:
            clock.advance(1)
    # The table is bounded: anonymous peers were forgotten, least recently used first.
    assert service.peer_count <= service.max_anonymous_peers + 1
    assert b"oneshot-0" not in service._anonymous
    assert b"oneshot-%d" % (3 * service.max_anonymous_peers - 1) in service._anonymous
    # ... but alice (idle 45 s) still has her conversation.
    assert send(b"alice", "ping", "a2") == "s_a1"


def test_a_peer_with_a_current_session_is_forgotten_after_a_day_idle(tables):
    service, clock, _, send = tables
    send(b"alice", "create_session", "a1")
    clock.advance(service.peer_idle_seconds - 1)
    send(b"someone", "ping", "p1")
    assert send(b"alice", "ping", "a2") == "s_a1"  # used again just before the day ends
    clock.advance(service.peer_idle_seconds + 1)
    send(b"someone-else", "ping", "p2")  # a new peer prunes the idle ones
    assert b"alice" not in service._attached and b"someone" not in service._anonymous
    assert send(b"alice", "ping", "a3") is None  # a new conversation


def test_closing_the_session_makes_the_peer_anonymous_again(tables):
    service, _, _, send = tables
    send(b"alice", "create_session", "a1")
    assert b"alice" in service._attached
    send(b"alice", "close_session", "a2")
    assert b"alice" in service._anonymous and b"alice" not in service._attached
    for n in range(service.max_anonymous_peers):
        send(b"oneshot-%d" % n, "ping", f"p{n}")
    assert b"alice" not in service._anonymous  # nothing to lose: evicted like the rest


def test_a_peer_waiting_for_its_reply_is_not_evicted(tables):
    service, _, dispatcher, send = tables
    send(b"slow", "hold", "h1")
    for n in range(2 * service.max_anonymous_peers):
        send(b"oneshot-%d" % n, "ping", f"p{n}")
    assert b"slow" in service._anonymous  # in flight: not idle
    assert service.peer_count <= service.max_anonymous_peers + 1
    dispatcher.held.pop().callback(None)
    assert service._anonymous[b"slow"].in_flight == 0
    assert service._router.sent.count(b"slow") == 1


def test_when_the_attached_table_is_full_a_new_session_is_not_kept_as_current(tables):
    service, _, _, send = tables
    service.max_attached_peers = 3
    for n in range(3):
        send(b"user-%d" % n, "create_session", f"c{n}")
    send(b"late", "create_session", "c3")
    assert sorted(service._attached) == [b"user-0", b"user-1", b"user-2"]
    assert send(b"late", "ping", "c4") is None  # it must name its session
    assert send(b"user-0", "ping", "c5") == "s_c0"  # nobody was evicted to make room


# -- the frame limit, on a real server ------------------------------------------------


def _status_kib(pid: int, field: str) -> int:
    """A C{/proc/PID/status} memory field (C{VmRSS}, C{VmHWM}), in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} line")


@pytest.mark.e2e
@pytest.mark.timeout(90)
def test_a_frame_over_the_limit_is_refused_by_libzmq_before_it_is_buffered(tmp_path, start_server):
    """1 MiB limit (2 x 512 KiB), a 64 MiB frame: the server never holds it.

    libzmq checks a frame's size from its header when C{ZMQ_MAXMSGSIZE} is
    set before the socket binds, and disconnects the sender; set after the
    bind (as it was) it did not apply to accepted connections and the whole
    frame was read into the server's memory.
    """
    import os

    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs Linux /proc")
    limit = 512 * 1024
    server = start_server(tmp_path, f"--max-message-bytes={limit}", image=False)
    pid = server.process.pid
    for n in range(20):  # warm up: imports, buffers, the first peers
        assert server.zmq_request({"id": n, "command": "ping"})["status"] == "success"
    peak_before = _status_kib(pid, "VmHWM")
    rss_before = _status_kib(pid, "VmRSS")

    hog = zmq.Context.instance().socket(zmq.DEALER)
    hog.setsockopt(zmq.LINGER, 0)
    hog.setsockopt(zmq.SNDTIMEO, 30_000)
    hog.connect(server.zmq_url)
    try:
        hog.send_multipart([b"", b"x" * (64 << 20)])
        # While (or after) the hog sends, another client is answered.
        started = time.monotonic()
        assert server.zmq_request({"id": "other", "command": "ping"})["status"] == "success"
        other_latency = time.monotonic() - started
        time.sleep(1.0)  # the hog's frame has been pushed by now (or refused)
        hog_reply = hog.poll(500) and hog.recv_multipart()
    finally:
        hog.close()
    assert server.zmq_request({"id": "after", "command": "ping"})["status"] == "success"
    peak_growth = _status_kib(pid, "VmHWM") - peak_before
    rss_growth = _status_kib(pid, "VmRSS") - rss_before
    print(
        f"64 MiB frame, 1 MiB limit: server peak RSS +{peak_growth} KiB, "
        f"RSS +{rss_growth} KiB, other client's ping {other_latency * 1000:.1f} ms"
    )
    assert peak_growth < 8 * 1024, f"peak RSS grew by {peak_growth} KiB"
    assert rss_growth < 8 * 1024, f"RSS grew by {rss_growth} KiB"
    assert not hog_reply, "the frame reached the server (libzmq should have dropped it)"
