"""End to end through a real server: top-level await, interrupt of it, help cells (issue 19)."""

from __future__ import annotations

import threading
import time

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.image]

POLLER = (
    "import asyncio\n"
    "ticks = 0\n"
    "async def poll():\n"
    "    global ticks\n"
    "    while True:\n"
    "        ticks += 1\n"
    "        await asyncio.sleep(0.01)\n"
    "t = asyncio.create_task(poll())\n"
)


def _ticks(client) -> int:
    return int(client.result("evaluate", code="ticks")["result"])


@pytest.mark.timeout(60)
def test_await_interrupt_and_help_over_the_wire(tmp_path, start_server):
    server = start_server(tmp_path)
    a, b, stopper = server.tcp_client(), server.tcp_client(), server.tcp_client()
    session_a = a.result("create_session", client_id="alice")["session_id"]
    b.result("create_session", client_id="bob")
    answer = a.result("evaluate", code="import asyncio\nawait asyncio.sleep(0.01)\n6 * 7")
    assert answer["result"] == "42"
    b.result("evaluate", code=POLLER)
    replies: list[dict] = []
    waiter = threading.Thread(
        target=lambda: replies.append(
            a.call("evaluate", code="await asyncio.sleep(100)", timeout=300)
        )
    )
    waiter.start()
    time.sleep(0.3)
    before = _ticks(b)
    started = time.perf_counter()
    assert stopper.call("interrupt", session_id=session_a)["result"]["interrupted"] is True
    waiter.join(5)
    assert not waiter.is_alive()
    assert time.perf_counter() - started < 2.0
    assert replies[0]["error_type"] == "Interrupted", replies
    # bob's task kept running throughout, in the same image
    deadline = time.monotonic() + 5
    while _ticks(b) <= before:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert b.result("evaluate", code="t.done()")["result"] == "False"
    described = a.result("evaluate", code="len?", mode="display")
    assert described["result_type"] == "help"
    assert "Return the number of items in a container." in described["display"]
    a.result("evaluate", code="def f(x):\n    return x + 1\n")
    assert a.result("evaluate", code="f??")["result"].endswith(
        "Source:\ndef f(x):\n    return x + 1\n"
    )
