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

from stui_twisted.zmqtransport import ZmqRouterService


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
