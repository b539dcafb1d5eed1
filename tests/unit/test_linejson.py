"""The line-JSON protocol over an in-memory transport: framing and flow control."""

from __future__ import annotations

import json
import time

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from stui_twisted.transports.linejson import InputBudget, LineJSONFactory
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
    protocol.dataReceived(b'not json\n[]\n\xff\xfe\n{"command": 5}\n{"id":9,"command":"ping"}\n')
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


# -- framing cost: each byte is scanned once ------------------------------------------


def test_a_trickled_line_is_scanned_once_not_once_per_read():
    protocol, transport = connect(max_message_bytes=16 * 1024 * 1024)
    head, piece, tail = (
        b'{"id": 1, "command": "ping", "parameters": {"pad": "',
        b"x" * 100,
        b'"}}\n',
    )
    protocol.dataReceived(head)
    for _ in range(20_000):  # a 2 MB line in 100-byte reads
        protocol.dataReceived(piece)
    protocol.dataReceived(tail)
    assert replies(transport)[0]["id"] == 1
    sent = len(head) + 20_000 * len(piece) + len(tail)
    # every byte searched for the newline exactly once (LineReceiver: once per read)
    assert protocol.bytes_scanned <= sent


def test_trickling_costs_linear_time():
    """2 MiB in 100-byte reads: milliseconds, not the seconds a rescan per read costs."""
    protocol, transport = connect(max_message_bytes=16 * 1024 * 1024)
    piece = b"x" * 100
    started = time.perf_counter()
    for _ in range(21_000):
        protocol.dataReceived(piece)
    elapsed = time.perf_counter() - started
    protocol.dataReceived(b"\n")
    assert replies(transport)[0]["error_type"] == "InvalidRequest"
    # linear: ~0.05 s here; re-scanning and copying the buffer per read: > 10 s
    assert elapsed < 2.0, f"21,000 small reads onto one line took {elapsed:.2f} s"


def test_many_lines_in_one_read_and_lines_split_across_reads():
    protocol, transport = connect(turn_budget=60.0)  # no yielding in this test
    stream = b"".join(b'{"id": %d, "command": "ping"}\n' % i for i in range(200))
    for start in range(0, len(stream), 7):
        protocol.dataReceived(stream[start : start + 7])
    protocol.dataReceived(stream)
    assert [r["id"] for r in replies(transport)] == list(range(200)) * 2


# -- the server-wide budget for unfinished lines --------------------------------------


def test_over_the_input_budget_the_largest_unfinished_line_is_closed():
    trims = []
    budget = InputBudget(10_000, trim=trims.append)
    budget.TRIM_AFTER, budget.TRIM_QUIET = 100_000, 8_000  # scaled down like the budget
    connections = [connect(input_budget=budget) for _ in range(3)]
    (a, ta), (b, tb), (c, tc) = connections
    a.dataReceived(b'{"command": "ping", "x": "' + b"a" * 2000)
    b.dataReceived(b'{"command": "ping", "x": "' + b"b" * 5000)
    assert budget.total == 2026 + 5026
    c.dataReceived(b'{"command": "ping", "x": "' + b"c" * 3000)  # over: b holds the most
    (reply,) = replies(tb)
    assert reply["error_type"] == "MessageTooLarge"
    assert reply["details"] == {"size": 5026, "max_partial_input_bytes": 10_000, "scope": "server"}
    assert tb.disconnecting and not ta.disconnecting and not tc.disconnecting
    assert budget.total == 2026 + 3026 and budget.held_by(b) == 0
    a.dataReceived(b'"}\n')
    assert replies(ta)[0]["status"] == "success"
    assert budget.total == 3026
    for protocol, _transport in connections:
        protocol.connectionLost(Failure(ConnectionDone()))
    assert budget.total == 0
    assert trims == [0]  # 10 KB let go and nothing left held: memory handed back once


def test_input_held_while_paused_counts_against_the_budget():
    gate = defer.Deferred()

    class Service(NullImageService):
        async def handle(self, name, call):
            await gate
            return {}

    budget = InputBudget(1 << 20)
    protocol, transport = connect(
        make_dispatcher(service=Service()), max_pending=1, input_budget=budget
    )
    data = b'{"command": "get_session_statistics"}\n' * 50
    protocol.dataReceived(data)
    assert transport.producerState == "paused"
    assert budget.total == len(data) - len(data) // 50  # all but the line in flight
    gate.callback(None)
    assert len(replies(transport)) == 50 and budget.total == 0


# -- end of input (half-close) ---------------------------------------------------------


def test_end_of_input_answers_everything_read_then_closes():
    gate = defer.Deferred()

    class Service(NullImageService):
        async def handle(self, name, call):
            await gate
            return {}

    protocol, transport = connect(make_dispatcher(service=Service()), max_pending=1)
    protocol.dataReceived(b'{"id": 1, "command": "get_session_statistics"}\n' * 3)
    protocol.dataReceived(b'{"id": 2, "command": "ping"}')  # no newline before the end
    protocol.readConnectionLost()
    assert not transport.disconnecting  # three requests are still to be answered
    gate.callback(None)
    assert sorted(r["id"] for r in replies(transport)) == [1, 1, 1, 2]  # match by id
    assert transport.disconnecting
    assert transport.producer is None  # unregistered first: TLS closes only then


def test_end_of_input_with_nothing_pending_closes_at_once():
    protocol, transport = connect()
    protocol.dataReceived(b'{"id": 1, "command": "ping"}\n')
    protocol.readConnectionLost()
    assert [r["id"] for r in replies(transport)] == [1]
    assert transport.disconnecting
