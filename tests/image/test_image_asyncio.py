"""Top-level ``await`` in a real image child: one event loop for the image's life (issue 19.1)."""

from __future__ import annotations

import re
import time

import pytest
import pytest_twisted

from stui_twisted.image.supervisor import ImageSupervisor
from stui_twisted.image.workspace import Image
from tests.helpers import failure_of, reactor_sleep

pytestmark = pytest.mark.image

POLLER = """
import asyncio
ticks = 0
async def poll():
    global ticks
    while True:
        ticks += 1
        await asyncio.sleep(0.01)
"""


def _reactor():
    from twisted.internet import reactor

    return reactor


sleep = reactor_sleep


async def ticks_advance(supervisor, session_id: str, timeout: float = 5.0) -> None:
    """The background poller of C{session_id} is seen to progress (bounded wait)."""
    first = int((await supervisor.evaluate(session_id, "ticks"))["result"])
    deadline = time.monotonic() + timeout
    while int((await supervisor.evaluate(session_id, "ticks"))["result"]) <= first:
        assert time.monotonic() < deadline, "the background task did not progress"
        await sleep(0.05)


@pytest.fixture
def supervisor():
    image = ImageSupervisor(_reactor(), kill_grace=0.5, restart_delay=0.1)
    image.startService()
    pytest_twisted.blockon(image.whenRunning())
    yield image
    pytest_twisted.blockon(image.stopService())


@pytest.mark.timeout(20)
@pytest_twisted.ensureDeferred
async def test_top_level_await_then_a_value(supervisor):
    result = await supervisor.evaluate("s_a", "import asyncio\nawait asyncio.sleep(0.1)\n6 * 7")
    assert result["result"] == "42"
    awaited_last = await supervisor.evaluate("s_a", "await asyncio.sleep(0.01, result='done')")
    assert awaited_last["result"] == "'done'"


@pytest.mark.timeout(20)
@pytest_twisted.ensureDeferred
async def test_async_for_and_async_with_at_top_level(supervisor):
    code = (
        "import asyncio, contextlib\n"
        "async def count(n):\n"
        "    for i in range(n):\n"
        "        await asyncio.sleep(0)\n"
        "        yield i\n"
        "@contextlib.asynccontextmanager\n"
        "async def opened():\n"
        "    yield 'open'\n"
        "seen = []\n"
        "async for i in count(3):\n"
        "    seen.append(i)\n"
        "async with opened() as state:\n"
        "    print(state)\n"
        "seen"
    )
    result = await supervisor.evaluate("s_a", code)
    assert result["result"] == "[0, 1, 2]"
    assert result["output"] == "open\n"


@pytest.mark.timeout(20)
@pytest_twisted.ensureDeferred
async def test_a_task_created_in_one_cell_progresses_in_later_ones(supervisor):
    await supervisor.evaluate("s_a", POLLER)
    # No await in the cell: it still runs on the loop, as create_task needs one.
    created = await supervisor.evaluate("s_a", "t = asyncio.create_task(poll())")
    (task_binding,) = [entry for entry in created["variables"] if entry["name"] == "t"]
    assert task_binding["restorable"] is False
    await ticks_advance(supervisor, "s_a")
    assert (await supervisor.evaluate("s_a", "t.done()"))["result"] == "False"


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_interrupt_cancels_the_awaited_coroutine_only(supervisor):
    await supervisor.evaluate("s_bg", POLLER + "t = asyncio.create_task(poll())")
    await supervisor.evaluate("s_a", "import asyncio\nawait asyncio.sleep(0)")
    waiting = supervisor.evaluate("s_a", "print('before')\nawait asyncio.sleep(30)", timeout=60)
    await sleep(0.3)
    started = time.perf_counter()
    assert await supervisor.interrupt("s_a") is True
    error = await failure_of(waiting)
    assert time.perf_counter() - started < 1.0
    assert error.error_type == "Interrupted"
    assert error.details["output"] == "before\n"
    assert "restarted" not in error.message
    # the other session's task, on the same loop, still runs; nothing restarted
    await ticks_advance(supervisor, "s_bg")
    assert (await supervisor.evaluate("s_a", "await asyncio.sleep(0.01, result=1)"))[
        "result"
    ] == "1"
    assert supervisor.status()["restarts"] == 0


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_time_limit_cancels_the_awaited_coroutine_only(supervisor):
    await supervisor.evaluate("s_a", POLLER + "t = asyncio.create_task(poll())")
    started = time.perf_counter()
    error = await failure_of(supervisor.evaluate("s_a", "await asyncio.sleep(30)", timeout=0.3))
    assert error.error_type == "Timeout"
    assert time.perf_counter() - started < 1.3
    await ticks_advance(supervisor, "s_a")
    assert (await supervisor.evaluate("s_a", "t.done()"))["result"] == "False"
    assert supervisor.status()["restarts"] == 0


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_a_coroutine_blocking_the_loop_is_handled_like_a_c_loop(supervisor):
    await supervisor.evaluate("s_a", "import asyncio\nasync def spin():\n    while True: pass")
    spinning = supervisor.evaluate("s_a", "await spin()", timeout=60)
    await sleep(0.3)
    assert await supervisor.interrupt("s_a") is True
    error = await failure_of(spinning)
    assert error.error_type == "Interrupted"
    assert "restarted" in error.message
    await supervisor.whenRunning()
    # a new image, with a loop that runs again
    again = await supervisor.evaluate("s_a", "import asyncio\nawait asyncio.sleep(0, result=2)")
    assert again["result"] == "2"


def test_dropping_a_session_cancels_its_tasks_only():
    image = Image()
    try:
        kept = image.session("s_kept")
        dropped = image.session("s_dropped")
        kept.evaluate(POLLER + "t = asyncio.create_task(poll())")
        dropped.evaluate(POLLER + "t = asyncio.create_task(poll())\nawait asyncio.sleep(0)")
        dropped_task = dropped.namespace["t"]
        assert image.drop_session("s_dropped") is True
        deadline = time.monotonic() + 5
        while not dropped_task.done():
            assert time.monotonic() < deadline, "the dropped session's task still runs"
            time.sleep(0.01)
        assert dropped_task.cancelled()
        assert not kept.namespace["t"].done()
        assert image.loop.tasks() == {kept.namespace["t"]}
    finally:
        image.loop.close()


def test_background_output_after_the_cell_is_dropped_and_counted_in_the_next_output():
    image = Image()
    try:
        workspace = image.session("s_out")
        first = workspace.evaluate(
            "import asyncio\n"
            "async def chatter():\n"
            "    for _ in range(3):\n"
            "        print('0123456789')\n"
            "        await asyncio.sleep(0.05)\n"
            "t = asyncio.create_task(chatter())\n"
            "await asyncio.sleep(0)"
        )
        deadline = time.monotonic() + 5
        while not workspace.namespace["t"].done():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        later = workspace.evaluate("print('mine')")
        lines = later["output"].splitlines()
        assert lines[-1] == "mine"
        # what the task printed while its cell ran is in that cell's output; the rest is counted
        note = re.fullmatch(
            r"\[(\d+) characters printed by background tasks outside any evaluation"
            r" were dropped\]",
            lines[0],
        )
        assert note is not None, lines
        assert int(note.group(1)) >= 11
        assert int(note.group(1)) + len(first["output"]) == 33
        assert workspace.evaluate("1")["output"] == ""
    finally:
        image.loop.close()
