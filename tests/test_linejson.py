"""The line-JSON protocol over an in-memory transport: framing and flow control."""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.internet.testing import StringTransport

from stui_twisted.linejson import LineJSONFactory
from tests.helpers import NullImageService, make_dispatcher


def connect(dispatcher=None, **factory_args):
    factory = LineJSONFactory(dispatcher or make_dispatcher(), **factory_args)
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def replies(transport: StringTransport) -> list[dict]:
    return [json.loads(line) for line in transport.value().splitlines() if line.strip()]


def test_each_line_gets_a_reply_and_pipelining_works():
    protocol, transport = connect()
    protocol.dataReceived(
        b'{"id":1,"command":"ping"}\n{"id":2,"command":"describe"}\r\n{"id":3,"command":"ping"}\n'
    )
    assert [r["id"] for r in replies(transport)] == [1, 2, 3]


def test_whitespace_lines_are_ignored():
    protocol, transport = connect()
    protocol.dataReceived(b"\n   \r\n\t\n")
    assert transport.value() == b""
    protocol.dataReceived(b'{"id":1,"command":"ping"}\n')
    assert len(replies(transport)) == 1


def test_bad_input_leaves_the_connection_usable():
    protocol, transport = connect()
    protocol.dataReceived(b"not json\n[]\n\xff\xfe\n{\"command\": 5}\n{\"id\":9,\"command\":\"ping\"}\n")
    got = replies(transport)
    assert [r["status"] for r in got] == ["error"] * 4 + ["success"]
    assert not transport.disconnecting


def test_over_long_line_gets_message_too_large_then_close():
    protocol, transport = connect(max_message_bytes=1024)
    protocol.dataReceived(b'{"command":"ping","x":"' + b"a" * 2000)
    (reply,) = replies(transport)
    assert reply["error_type"] == "MessageTooLarge"
    assert reply["id"] is None
    assert reply["details"]["max_message_bytes"] == 1024
    assert transport.disconnecting


def test_slow_request_does_not_hold_back_fast_ones():
    slow = defer.Deferred()

    class Service(NullImageService):
        async def handle(self, name, call):
            if name == "evaluate":
                await slow
                return {"slow": True}
            return {}

    protocol, transport = connect(make_dispatcher(service=Service()))
    protocol.dataReceived(
        b'{"id":"slow","command":"evaluate","parameters":{"code":"x"}}\n{"id":"fast","command":"ping"}\n'
    )
    assert [r["id"] for r in replies(transport)] == ["fast"]
    slow.callback(None)
    assert [r["id"] for r in replies(transport)] == ["fast", "slow"]


def test_reading_pauses_while_too_many_requests_are_pending():
    gate = defer.Deferred()

    class Service(NullImageService):
        async def handle(self, name, call):
            await gate
            return {}

    protocol, transport = connect(make_dispatcher(service=Service()), max_pending=4)
    lines = b"".join(b'{"command":"get_session_statistics"}\n' for _ in range(10))
    protocol.dataReceived(lines)
    assert transport.producerState == "paused"
    gate.callback(None)
    assert transport.producerState == "producing"
    assert len(replies(transport)) == 10


def test_full_write_buffer_pauses_reading():
    protocol, transport = connect()
    assert transport.producer is protocol
    protocol.pauseProducing()  # the transport says its buffer is full
    assert transport.producerState == "paused"
    protocol.resumeProducing()
    assert transport.producerState == "producing"
