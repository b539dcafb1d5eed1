"""The image's per-session worker thread (L{SessionWorker}): when a task's time limit is armed."""

from __future__ import annotations

import queue
import threading

from twisted.internet import task

from stui_twisted.image.child import SessionWorker


class ThreadCalls:
    """A reactor for the worker: a L{task.Clock}, and C{callFromThread} calls
    kept in order for the test's thread to run (as the reactor would)."""

    def __init__(self) -> None:
        self.clock = task.Clock()
        self.calls: queue.Queue = queue.Queue()

    def callFromThread(self, f, *args):  # noqa: N802 - the reactor's name
        self.calls.put((f, args))

    def callLater(self, *args, **kwargs):  # noqa: N802 - the reactor's name
        return self.clock.callLater(*args, **kwargs)

    def seconds(self) -> float:
        return self.clock.seconds()

    def run_next(self) -> str:
        f, args = self.calls.get(timeout=10)
        f(*args)
        return f.__name__


def test_an_idle_workers_task_has_its_time_limit_armed_at_once_and_wakes_the_reactor_once():
    reactor = ThreadCalls()
    worker = SessionWorker(reactor, "s_idle")
    try:
        done = worker.submit(lambda guard: "one", 5.0)
        assert [call.getTime() for call in reactor.clock.getDelayedCalls()] == [5.0]
        assert reactor.run_next() == "_finish"  # no wake-up to arm the limit first
        assert done.result == {"ok": True, "result": "one"}
        assert reactor.calls.empty()
        assert reactor.clock.getDelayedCalls() == []  # the limit is cancelled
    finally:
        worker.stop()


def test_a_task_waiting_behind_another_gets_its_time_limit_when_it_starts():
    reactor = ThreadCalls()
    worker = SessionWorker(reactor, "s_busy")
    release = threading.Event()
    try:
        first = worker.submit(lambda guard: release.wait(10), 5.0)
        second = worker.submit(lambda guard: "two", 1.0)
        assert [call.getTime() for call in reactor.clock.getDelayedCalls()] == [5.0]
        reactor.clock.advance(3)  # the second waits meanwhile: its limit is not running
        release.set()
        assert [reactor.run_next() for _ in range(3)] == ["_finish", "_arm_timer", "_finish"]
        assert first.result == {"ok": True, "result": True}
        assert second.result == {"ok": True, "result": "two"}
        third = worker.submit(lambda guard: "three", 2.0)  # idle again
        assert [call.getTime() for call in reactor.clock.getDelayedCalls()] == [5.0]
        assert reactor.run_next() == "_finish"
        assert third.result == {"ok": True, "result": "three"}
    finally:
        worker.stop()
