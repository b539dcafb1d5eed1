"""The server process's garbage-collector settings (issue 21, docs/performance.md).

CPython's cyclic collector stops every thread while it runs, and a full
(generation 2) collection walks every tracked object the process holds: at
5,000 sessions that took 40-136 ms, the maxima of C{create_session} under
C{batch} (C{benchmarks/create_batch.py}; "Garbage collection pauses (issue
21)" in docs/performance.md).  Once start-up is done (the index loaded, the
image started) L{FreezeAfterStartUp} does two things, once, and logs them:

- C{gc.collect(1)} (the young generations: under a millisecond) then
  C{gc.freeze()}: what exists then (the modules, the service tree, the
  sessions loaded from disk) moves to the permanent generation, which no
  later collection walks.  A frozen object is still freed by reference
  counting; only one that is, or later becomes, part of a garbage I{cycle}
  is never freed.  That is bounded: nothing is frozen after start-up, so at
  worst the start-up heap itself stays, which a running server holds anyway
  (docs/performance.md has the memory check: a full collection at this
  point found 3-48 unreachable objects, and took 72-507 ms with 10,000
  sessions on disk, which is why it is not run).
- L{GC_THRESHOLDS}: a full collection only after 100 generation-1
  collections instead of 10 (the interpreter still waits, too, until the
  objects promoted since the last one are a quarter of the long-lived ones).
"""

from __future__ import annotations

import gc
import time

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

log = Logger()

GC_THRESHOLDS = (700, 10, 100)
"""C{gc.set_threshold} of the server: CPython's (700, 10, 10) with full
collections ten times rarer.  Measured (docs/performance.md, issue 21): the
third value at 100 took the two full collections out of a 5,000-create storm;
a larger first value (10,000) only moved the pause into generation 1 (one
50 ms collection), so it stays at 700."""


def tune_collector() -> dict:
    """Collect, freeze what is alive, set L{GC_THRESHOLDS}; returns what was done.

    It runs on the reactor thread once, at start-up.

    @return: C{collected} (what the young generations held unreachable),
        C{frozen} (objects now in the permanent generation),
        C{collect_ms} (the collection and freeze) and C{thresholds}.
    """
    started = time.perf_counter()
    collected = gc.collect(1)
    gc.freeze()
    elapsed = time.perf_counter() - started
    gc.set_threshold(*GC_THRESHOLDS)
    done = {
        "collected": collected,
        "frozen": gc.get_freeze_count(),
        "collect_ms": round(elapsed * 1e3, 1),
        "thresholds": gc.get_threshold(),
    }
    log.info(
        "garbage collector: froze {frozen} start-up objects ({collect_ms} ms,"
        " {collected} unreachable young objects collected first),"
        " thresholds {thresholds}",
        **done,
    )
    return done


class FreezeAfterStartUp(service.Service):
    """Runs L{tune_collector} once the session service is ready.

    @param sessions: the L{stui_twisted.sessions.service.SessionService};
        it must be started before this service (C{tap.makeService} adds
        this one last).
    """

    def __init__(self, sessions) -> None:
        self.sessions = sessions
        self.done: defer.Deferred | None = None

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self.done = defer.ensureDeferred(self.sessions.ready())
        self.done.addCallbacks(lambda _: tune_collector(), self._not_started)

    def _not_started(self, failure) -> None:
        # the session service has logged why; a server that did not start
        # serves nothing, so its collector is left as the interpreter set it
        log.info(
            "garbage collector not tuned: the session service did not start ({why})",
            why=failure.getErrorMessage(),
        )
