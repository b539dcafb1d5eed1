"""input(), getpass() and sys.stdin.readline() in the real image, answered by the server."""

from __future__ import annotations

import time

import pytest
import pytest_twisted
from twisted.internet import defer

from stui_twisted.image.supervisor import ImageSupervisor
from tests.helpers import failure_of, reactor_sleep

pytestmark = pytest.mark.image


def _reactor():
    from twisted.internet import reactor

    return reactor


class Answers:
    """An input handler: records each request and answers from a list (or never)."""

    def __init__(self) -> None:
        self.asked: list[tuple] = []
        self.answers: list = []
        self.waiting: list[defer.Deferred] = []

    def __call__(self, session_id, cell_index, prompt, password):
        self.asked.append((session_id, cell_index, prompt, password))
        if self.answers:
            return self.answers.pop(0)
        waiting = defer.Deferred()
        self.waiting.append(waiting)
        return waiting

    async def until_asked(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.asked) < count:
            assert time.monotonic() < deadline, "input() was not asked in time"
            await reactor_sleep(0.02)


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_input_getpass_and_readline_are_answered_and_a_stop_ends_the_wait():
    image = ImageSupervisor(_reactor(), kill_grace=5.0, restart_delay=0.1)
    image.startService()
    try:
        await image.whenRunning()
        pid = image.status()["pid"]
        answers = Answers()
        image.input_handler = answers
        answers.answers = [{"text": "bob\n"}, {"text": "secret"}, {"text": "a line"}]
        code = (
            "import getpass, sys\n"
            "name = input('Name? ')\n"
            "word = getpass.getpass()\n"
            "line = sys.stdin.readline()\n"
            "(name, word, line)"
        )
        result = await image.evaluate("s_in", code, cell_index=7)
        assert result["result"] == "('bob', 'secret', 'a line\\n')"
        assert result["output"] == ""  # the prompt travels in the event, not the output
        assert answers.asked == [
            ("s_in", 7, "Name? ", False),
            ("s_in", 7, "Password: ", True),
            ("s_in", 7, "", False),
        ]

        # nobody can answer: input() raises EOFError with the server's reason
        answers.answers = [{"eof": "no client is attached"}]
        code = "try:\n    input()\nexcept EOFError as e:\n    why = str(e)\nwhy"
        assert (await image.evaluate("s_in", code))["result"] == "'no client is attached'"

        # interrupt ends the wait (not the stuck-kill after kill_grace: the pid stays)
        running = image.evaluate("s_in", "input('never answered')", timeout=30)
        await answers.until_asked(5)
        assert await image.interrupt("s_in") is True
        assert (await failure_of(running)).error_type == "Interrupted"

        # the time limit keeps running while input() waits
        timed = await failure_of(image.evaluate("s_in", "input('too slow')", timeout=0.5))
        assert timed.error_type == "Timeout"
        assert image.status()["pid"] == pid and image.status()["restarts"] == 0

        # without a handler (or a running evaluation) input() sees end of file
        image.input_handler = None
        code = "try:\n    input()\nexcept EOFError as e:\n    why = str(e)\nwhy"
        assert "no evaluation" in (await image.evaluate("s_in", code))["result"]
    finally:
        await image.stopService()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_output_printed_before_input_or_a_pause_reaches_the_server_first():
    """Watchers see a loop's lines, then the input request or the pause (they came
    the other way round while the lines waited for the stream's next chunk)."""
    image = ImageSupervisor(_reactor(), kill_grace=5.0, restart_delay=0.1)
    image.startService()
    try:
        await image.whenRunning()
        order: list[str] = []
        image.addOutputObserver(
            lambda session_id, index, pieces: order.extend(text for _name, text in pieces)
        )
        image.addDebugObserver(lambda session_id, event, data: order.append(f"<{event}>\n"))
        answers = Answers()
        answers.answers = [{"text": "alice"}]
        image.input_handler = lambda *request: (order.append("<input>\n"), answers(*request))[1]
        code = "for step in range(3): print('step', step)\nname = input('your name? ')\nname"
        result = await image.evaluate("s_order", code, cell_index=1)
        assert result["result"] == "'alice'"
        assert "".join(order) == "step 0\nstep 1\nstep 2\n<input>\n"

        del order[:]
        await image.evaluate("s_order", "def f():\n    return 1", cell_index=2)
        await image.debug("s_order", "set_breakpoint", {"function": "f"})
        running = image.evaluate("s_order", "print('before'); f()", cell_index=3)
        deadline = time.monotonic() + 10
        while "<debug_paused>\n" not in order:
            assert time.monotonic() < deadline, "no debug_paused"
            await reactor_sleep(0.02)
        await image.debug("s_order", "continue", {})
        assert (await running)["result"] == "1"
        assert order[:2] == ["before\n", "<debug_paused>\n"]
    finally:
        await image.stopService()
