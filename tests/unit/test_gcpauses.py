"""The server's garbage-collector settings (issue 21): freeze after start-up, thresholds."""

from __future__ import annotations

import gc
import weakref

import pytest
from twisted.internet import defer

from stui_twisted.ops.gcpauses import GC_THRESHOLDS, FreezeAfterStartUp


class Payload:
    """A weak-referenceable object to follow through the freeze."""


@pytest.fixture
def collector_restored():
    """Each test starts with nothing frozen, and the collector is put back afterwards.

    The test process itself freezes its heap after collection (tests/conftest.py),
    so the count is zeroed first and the freeze redone at the end.
    """
    thresholds = gc.get_threshold()
    frozen_before = gc.get_freeze_count()
    gc.unfreeze()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)
    if frozen_before:
        gc.freeze()


class FakeSessions:
    """The one thing L{FreezeAfterStartUp} asks of the session service: C{ready()}."""

    def __init__(self) -> None:
        self.started: defer.Deferred = defer.Deferred()

    def ready(self) -> defer.Deferred:
        return self.started


def test_the_collector_is_tuned_only_once_the_session_service_is_ready(collector_restored):
    sessions = FakeSessions()
    tuning = FreezeAfterStartUp(sessions)
    tuning.startService()
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() != GC_THRESHOLDS
    loaded = [Payload()]  # e.g. the sessions start-up loaded from disk
    sessions.started.callback(None)
    assert gc.get_threshold() == GC_THRESHOLDS
    assert gc.get_freeze_count() > 1000
    # frozen: no collection walks it again
    assert not any(obj is loaded for obj in gc.get_objects())
    # and reference counting still frees a frozen object that is not in a cycle
    gone = weakref.ref(loaded[0])
    del loaded[0]
    assert gone() is None


def test_a_failed_start_leaves_the_collector_alone(collector_restored):
    sessions = FakeSessions()
    tuning = FreezeAfterStartUp(sessions)
    tuning.startService()
    sessions.started.errback(RuntimeError("cannot open the data directory"))
    assert tuning.done.called and tuning.done.result is None  # handled, logged
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() != GC_THRESHOLDS
