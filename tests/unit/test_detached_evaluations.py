"""Evaluations that outlive their connection, get_evaluation and input() (events.md §4-§5).

LiveSessions with an image whose evaluations the test ends, a real EventHub
and a real ConnectionRegistry; time is a task.Clock.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, task

from stui_twisted.dispatch.interfaces import ConnectionContext
from stui_twisted.events.hub import EventHub
from stui_twisted.protocol.errors import StuiError
from stui_twisted.sessions.evaluations import NO_CLIENT
from stui_twisted.sessions.live import LiveSessions
from stui_twisted.sessions.model import Session
from stui_twisted.sessions.results import SharedNamespace
from stui_twisted.settings import Settings
from stui_twisted.transports.connections import ConnectionRegistry
from tests.helpers import SilentImageObservers

START = 1_790_000_000.0
OUTCOME = {"result": "42", "result_type": "int", "output": "hi\n", "execution_time": 1.0}


class HeldImage(SilentImageObservers):
    """An image whose evaluations end when the test says so."""

    live_generation = 1

    def __init__(self) -> None:
        self.evaluations: list[tuple[int, defer.Deferred]] = []
        self.input_handler = None

    def current_generation(self):
        return defer.succeed(self.live_generation)

    def evaluate(self, session_id, code, mode, timeout, *, generation, cell_index):
        held = defer.Deferred()
        self.evaluations.append((cell_index, held))
        return held


class View:
    """The service as LiveSessions sees it, with the event hub and the connections."""

    def __init__(self, tmp_path, clock) -> None:
        self.shared = SharedNamespace()
        self.settings = Settings(image_enabled=True)
        self.events = EventHub(clock, str(tmp_path))
        self.connections = ConnectionRegistry(10)
        self.changes: list[str] = []

    def live_sessions(self):
        return []

    async def changed(self, session, action):
        self.changes.append(action)


class Conversation:
    """An open connection (what subscribe and the registry need of one)."""

    def __init__(self) -> None:
        self.context = ConnectionContext(transport="tcp", peer="test")
        self.context.connection = self
        self.sent: list[bytes] = []

    def sendEvent(self, data: bytes) -> None:  # noqa: N802
        self.sent.append(data)


@pytest.fixture
def world(tmp_path):
    clock = task.Clock()
    clock.advance(START)
    view = View(tmp_path, clock)
    image = HeldImage()
    live = LiveSessions(view, image, view.settings, clock)
    session = Session("s_" + "d" * 22, "alice", START, 600.0, START, START)
    return live, view, image, session


def _events(view, session, name):
    return [
        e["data"] for e in view.events.event_log(session.session_id).since(0) if e["event"] == name
    ]


@pytest_twisted.ensureDeferred
async def test_two_evaluations_of_one_session_announce_and_record_two_indexes(world):
    live, view, image, session = world
    first = defer.ensureDeferred(live.evaluate(session, "a = 1", "execute", None))
    second = defer.ensureDeferred(live.evaluate(session, "b = 2", "execute", None))
    for _index, held in image.evaluations:
        held.callback(dict(OUTCOME))
    assert ((await first).history_index, (await second).history_index) == (1, 2)
    assert [d["history_index"] for d in _events(view, session, "evaluation_started")] == [1, 2]
    assert [d["history_index"] for d in _events(view, session, "evaluation_finished")] == [1, 2]


@pytest_twisted.ensureDeferred
async def test_queued_evaluations_get_their_own_index_at_start_and_detached_ones_are_recorded(
    world,
):
    live, view, image, session = world
    first = live.start_evaluation(session, "slow()", "execute", None, "bob", wait=False)
    second = live.start_evaluation(session, "6 * 7", "execute", None, "bob", wait=False)
    # each announced its own index when it started, and the image names its cell by it
    assert (first.index, second.index) == (1, 2)
    assert [d["history_index"] for d in _events(view, session, "evaluation_started")] == [1, 2]
    assert [index for index, _ in image.evaluations] == [1, 2]

    # while it runs: running, and the output so far from the log's output events
    view.events.publish(
        session.session_id, "output", {"history_index": 1, "name": "stdout", "text": "step 1\n"}
    )
    view.events.publish(
        session.session_id, "output", {"history_index": 2, "name": "stdout", "text": "other\n"}
    )
    running = live.running.evaluation(session, 1)
    assert running["running"] is True and running["output"] == "step 1\n"
    assert running["code"] == "slow()" and running["input_requested"] is None

    image.evaluations[0][1].callback(dict(OUTCOME))
    failed = StuiError("EvaluationError", "ValueError: bad", output="", exception_type="ValueError")
    image.evaluations[1][1].errback(failed)
    assert [e["index"] for e in session.history] == [1, 2]
    done = live.running.evaluation(session, 1)
    assert done["running"] is False and done["ok"] is True and done["result"] == "42"
    assert live.running.evaluation(session, 2)["error"]["error_type"] == "EvaluationError"
    finished = _events(view, session, "evaluation_finished")
    assert [(d["history_index"], d["ok"]) for d in finished] == [(1, True), (2, False)]
    assert not live.running
    with pytest.raises(StuiError) as caught:
        live.running.evaluation(session, 3)
    assert caught.value.details["parameter"] == "history_index"


@pytest_twisted.ensureDeferred
async def test_an_image_death_is_an_outcome_with_a_history_entry(world):
    live, view, image, session = world
    run = live.start_evaluation(session, "x = 1", "execute", None, wait=False)
    image.evaluations[0][1].errback(StuiError("ImageRestarted", "the live image died"))
    assert run.done.called
    entry = live.running.evaluation(session, 1)
    assert entry["ok"] is False and entry["error"]["error_type"] == "ImageRestarted"
    # the next evaluation gets the next index: no index is announced twice
    live.start_evaluation(session, "x = 2", "execute", None, wait=False)
    assert image.evaluations[1][0] == 2


@pytest_twisted.ensureDeferred
async def test_input_waits_only_when_someone_can_answer(world):
    live, view, image, session = world
    starter = Conversation()
    view.connections.opened(starter)
    live.start_evaluation(session, "input()", "execute", None, wait=False, context=starter.context)
    # the starting connection is open: input() waits, and the request is an event
    asked = live.running.input_requested(session.session_id, 1, "Name? ", False)
    assert not asked.called
    assert _events(view, session, "input_requested") == [
        {"history_index": 1, "prompt": "Name? ", "password": False}
    ]
    assert live.running.evaluation(session, 1)["input_requested"] == {
        "prompt": "Name? ",
        "password": False,
    }
    assert live.running.send_input(session, "bob") == 1
    assert asked.result == {"text": "bob"}
    with pytest.raises(StuiError) as caught:
        live.running.send_input(session, "again")  # nothing waits now
    assert caught.value.error_type == "InvalidRequest"

    # the starting connection is gone and nobody is subscribed: EOF at once
    view.connections.closed(starter)
    eof = live.running.input_requested(session.session_id, 1, "", True)
    assert eof.result == {"eof": NO_CLIENT.format(session_id=session.session_id)}
    # ... but a subscriber can answer
    watcher = Conversation()
    view.events.subscribe(watcher.context, watcher, session.session_id, None)
    asked = live.running.input_requested(session.session_id, 1, "Password: ", True)
    assert not asked.called
    # the evaluation ends while input() waits: the wait is answered, send_input refused
    image.evaluations[0][1].errback(StuiError("Interrupted", "the evaluation was interrupted"))
    assert asked.result == {"eof": "the evaluation ended"}
    with pytest.raises(StuiError):
        live.running.send_input(session, "late")


@pytest_twisted.ensureDeferred
async def test_evaluations_running_when_the_server_stops_are_recorded_as_stopped(world):
    live, view, image, session = world
    run = live.start_evaluation(session, "long()", "execute", None, wait=False)
    view.events.publish(
        session.session_id, "output", {"history_index": 1, "name": "stdout", "text": "half\n"}
    )
    assert await live.stop_running() == [session]
    entry = live.running.evaluation(session, 1)
    assert entry["running"] is False and entry["output"] == "half\n"
    assert entry["error"]["error_type"] == "ImageRestarted"
    assert "server stopped" in entry["error"]["message"]
    # the image then stops: nothing is recorded twice
    image.evaluations[0][1].errback(StuiError("ImageRestarted", "the live image died"))
    assert run.done.called and len(session.history) == 1
    assert len(_events(view, session, "evaluation_finished")) == 1
