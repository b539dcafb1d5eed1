"""Function breakpoints by entry hook, not by tracing (debugger.md §5, image/debugger.py)."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import traceback

import pytest

from stui_twisted.image import debugger
from stui_twisted.image.workspace import Image

pytestmark = pytest.mark.skipif(not debugger.HOOKS_SUPPORTED, reason="entry hooks: CPython 3.11")

SETUP = "def f(x):\n    y = x + 1\n    return y * 2\ndef never():\n    return 0\n"


@pytest.fixture
def workspace():
    workspace = Image().session("s_hooks")
    workspace.evaluate(SETUP, cell_index=1)
    return workspace


def test_an_unrelated_breakpoint_leaves_the_cell_untraced(workspace):
    workspace.debugger.set_breakpoint({"function": "never"})
    traced = workspace.evaluate("import sys\nsys.gettrace() is None and f(1)")
    assert traced["result"] == "4"
    never = workspace.namespace["never"]
    assert debugger._entry_hook not in never.__code__.co_consts  # given back after the run


def test_a_false_condition_turns_the_tracer_off_again(workspace):
    workspace.debugger.set_breakpoint({"function": "f", "condition": "x > 100"})
    traced = workspace.evaluate("import sys\nf(1) == 4 and sys.gettrace() is None")
    assert traced["result"] == "True"
    assert workspace.debugger.breakpoints["bp_1"]["hits"] == 0


def test_a_cell_line_inside_a_function_leaves_other_cells_untraced(workspace):
    workspace.debugger.set_breakpoint({"file": "cell:1", "line": 3})  # in f of SETUP
    traced = workspace.evaluate("import sys\nsys.gettrace() is None and never() == 0")
    assert traced["result"] == "True"


CELL = (
    "class Counter:\n"
    "    def count(self, n):\n"
    "        total = 0\n"
    "        for i in range(n):\n"
    "            total += i\n"
    "        def inner():\n"
    "            return total\n"
    "        return inner()\n"
)


def test_a_cell_line_in_a_method_stops_at_every_pass_and_in_a_nested_function(workspace):
    index = 5
    workspace.evaluate(CELL, cell_index=index)
    workspace.debugger.set_breakpoint({"file": f"cell:{index}", "line": 5})
    workspace.debugger.set_breakpoint({"file": f"cell:{index}", "line": 7})
    outcome = {}
    code = "Counter().count(3)"
    runner = threading.Thread(target=lambda: outcome.update(workspace.evaluate(code)))
    runner.start()
    stops = []
    for _ in range(4):
        state = wait_paused(workspace)
        names = {
            v["name"]: v["repr"] for v in workspace.debugger.command("locals", {})["variables"]
        }
        stops.append((state["frame"]["function"], state["frame"]["line"], names.get("i")))
        workspace.debugger.command("continue", {})
    runner.join(10)
    assert stops == [("count", 5, "0"), ("count", 5, "1"), ("count", 5, "2"), ("inner", 7, None)]
    assert outcome["result"] == "3"


def wait_paused(workspace, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = workspace.debugger.state()
        if state["paused"]:
            return state
        time.sleep(0.01)
    raise AssertionError("never paused")


def test_a_hooked_function_stops_its_sessions_thread_only(workspace):
    events = []
    debugger.event_sink = lambda session_id, event, data: events.append((event, data))
    try:
        workspace.debugger.set_breakpoint({"function": "f"})
        outcome = {}
        runner = threading.Thread(
            target=lambda: outcome.update(workspace.evaluate("f(10)", cell_index=7))
        )
        runner.start()
        state = wait_paused(workspace)
        assert (state["frame"]["function"], state["frame"]["line"]) == ("f", 2)
        # the same function called on another thread meanwhile does not stop
        assert workspace.namespace["f"](1) == 4
        assert workspace.debugger.command("locals", {})["variables"][0]["repr"] == "10"
        workspace.debugger.command("continue", {})
        runner.join(10)
        assert outcome["result"] == "22"
    finally:
        debugger.event_sink = None
    assert [event for event, _ in events] == ["debug_paused", "debug_resumed"]
    assert events[0][1]["history_index"] == 7 and events[0][1]["breakpoint_id"] == "bp_1"
    assert events[1][1] == {"history_index": 7, "action": "continue", "mode": None}


def test_steps_into_and_out_of_a_call_from_a_hooked_function(workspace):
    workspace.evaluate("def g(n):\n    m = f(n)\n    return m + 1\n")
    workspace.debugger.set_breakpoint({"function": "g"})
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(workspace.evaluate("g(1)")))
    runner.start()
    assert wait_paused(workspace)["frame"]["function"] == "g"

    def step(mode):
        workspace.debugger.command("step", {"mode": mode})
        deadline = time.monotonic() + 10
        while workspace.debugger.state()["paused"] is False and runner.is_alive():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        return workspace.debugger.state().get("frame")

    frame = step("into")
    assert (frame["function"], frame["line"]) == ("f", 2)
    frame = step("out")
    assert frame["function"] == "g"
    workspace.debugger.command("continue", {})
    runner.join(10)
    assert outcome["result"] == "5"


def test_an_interrupt_ends_a_paused_evaluation_and_says_so(workspace):
    from stui_twisted.image.interruption import InterruptRequested, StopGuard
    from stui_twisted.protocol.errors import StuiError

    events = []
    debugger.event_sink = lambda session_id, event, data: events.append((event, data))
    guard = StopGuard()
    errors = []

    def evaluate():
        try:
            workspace.evaluate("f(10)", guard=guard, cell_index=3)
        except StuiError as error:
            errors.append(error.error_type)

    try:
        workspace.debugger.set_breakpoint({"function": "f"})
        runner = threading.Thread(target=evaluate)
        runner.start()
        wait_paused(workspace)
        guard.request_stop(InterruptRequested)
        runner.join(10)
    finally:
        debugger.event_sink = None
    assert errors == ["Interrupted"]
    assert workspace.debugger.state()["paused"] is False
    assert events[-1] == (
        "debug_resumed",
        {"history_index": 3, "action": "interrupt", "mode": None},
    )


def _loops(a, b=2):
    try:
        for i in range(a):
            if i:
                b += i
        raise ValueError(b)
    except ValueError as error:
        return error.args[0]


def _generator(n):
    yield from range(n)
    try:
        yield 1 / 0
    finally:
        yield "finally"


def _closure():
    x = 5

    def inner(y):
        return x + y

    return inner


async def _coroutine():
    await asyncio.sleep(0)
    return 3


def _one_line():
    return [i * 2 for i in range(3)]


def _raises():
    value = 1
    return value / 0


@pytest.mark.parametrize(
    ("function", "call"),
    [
        (_loops, lambda f: f(5)),
        (_generator, lambda f: list(itertools.islice(f(3), 4))),
        (_closure(), lambda f: f(2)),
        (_coroutine, lambda f: asyncio.run(f())),
        (_one_line, lambda f: f()),
    ],
)
def test_hooked_code_behaves_like_the_original(function, call):
    expected = call(function)
    entered = []

    class Recorder:
        def _entered(self, frame):
            entered.append(frame.f_code.co_name)

    debugger._RUNNING[threading.get_ident()] = Recorder()
    original = function.__code__
    try:
        assert debugger._hook(function) is not None
        assert call(function) == expected
    finally:
        debugger._unhook(function)
        del debugger._RUNNING[threading.get_ident()]
    assert entered and set(entered) == {original.co_name}
    assert function.__code__ is original


def test_a_hooked_function_reports_its_own_lines_in_a_traceback():
    debugger._hook(_raises)
    try:
        with pytest.raises(ZeroDivisionError) as caught:
            _raises()
    finally:
        debugger._unhook(_raises)
    last = traceback.extract_tb(caught.value.__traceback__)[-1]
    assert (last.name, last.line) == ("_raises", "return value / 0")
