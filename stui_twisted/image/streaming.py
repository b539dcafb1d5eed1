"""A running evaluation's output, sent to the server while the code runs (events.md §1).

The evaluation's L{BoundedTextBuffer<stui_twisted.image.capture.BoundedTextBuffer>}
hands every part it keeps to an L{OutputStream} (from the session's worker
thread, or the image loop's thread), which coalesces them: a chunk goes out
at most every L{INTERVAL} seconds, or as soon as L{MAX_CHUNK} characters wait.
Chunks are sent from the child's reactor, one at a time: the next waits for
the server's answer, so a server that reads slowly holds the stream back
instead of filling a pipe.  What waits meanwhile is bounded by the buffer:
only what the evaluation keeps (at most C{MAX_OUTPUT_CHARS}) is streamed, so
a 10 MB print loop streams its first MiB and the truncation note, as its
reply's C{output} shows.  L{close} runs on the reactor just before the
evaluation's reply is sent and sends what is left: the server has every
chunk before the reply.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from twisted.internet import error
from twisted.logger import Logger
from twisted.python.failure import Failure

INTERVAL = 0.05
"""Seconds between two chunks (at most), unless L{MAX_CHUNK} characters wait."""
MAX_CHUNK = 64 * 1024
"""Characters in one chunk (at most)."""
FIRST_DELAY = 0.01
"""Seconds the first write after a pause waits for more (C{print} writes the text,
then the newline: they go out as one chunk)."""

log = Logger()


class OutputStream:
    """Coalesces one evaluation's output into chunks for the server.

    @param reactor: the child's reactor (C{callFromThread}, C{callLater}, C{seconds}).
    @param send: C{send(history_index, pieces)} sends one chunk (C{pieces} is a
        list of C{[name, text]}, C{name} C{"stdout"} or C{"stderr"}) and answers
        a Deferred that fires when the server has taken it.
    """

    def __init__(
        self,
        reactor,
        send: Callable,
        *,
        interval: float = INTERVAL,
        max_chunk: int = MAX_CHUNK,
        first_delay: float = FIRST_DELAY,
    ) -> None:
        self._reactor = reactor
        self._send = send
        self.interval = interval
        self.first_delay = first_delay
        self.max_chunk = max_chunk
        self.history_index: int | None = None
        """The history index the evaluation gets (set by the workspace before it runs)."""
        self._lock = threading.Lock()
        self._pieces: list[tuple[str, list[str]]] = []  # (name, parts), names alternate
        self._chars = 0
        self._woken = False  # a wake-up is queued or a flush is due: writes need not ask
        self._full = False  # MAX_CHUNK characters wait: the wake-up flushes at once
        self._timer = None
        self._in_flight = False
        self._last_sent = float("-inf")
        self._closed = False

    # -- any thread --

    def write(self, name: str, text: str) -> None:
        """Take C{text} written to C{name} (C{"stdout"}/C{"stderr"})."""
        if not text:
            return
        with self._lock:
            if self._closed:
                return
            if self._pieces and self._pieces[-1][0] == name:
                self._pieces[-1][1].append(text)
            else:
                self._pieces.append((name, [text]))
            self._chars += len(text)
            wake = not self._woken
            if self._chars >= self.max_chunk and not self._full:
                self._full = wake = True
            self._woken = True
        if wake:
            self._reactor.callFromThread(self._wake)

    # -- the reactor --

    def _wake(self) -> None:
        if self._closed or self._in_flight:
            return  # the answer of the chunk in flight schedules the next one
        with self._lock:
            full = self._full
        if full:
            self._flush()
        elif self._timer is None:
            since = self._reactor.seconds() - self._last_sent
            delay = min(self.interval, max(self.first_delay, self.interval - since))
            self._timer = self._reactor.callLater(delay, self._flush)

    def _take(self) -> list[list[str]]:
        """Up to L{max_chunk} characters of what waits, as C{[name, text]} pieces."""
        taken: list[list[str]] = []
        room = self.max_chunk
        with self._lock:
            while self._pieces and room > 0:
                name, parts = self._pieces[0]
                text = "".join(parts)
                if len(text) > room:
                    parts[:] = [text[room:]]
                    text = text[:room]
                else:
                    self._pieces.pop(0)
                taken.append([name, text])
                room -= len(text)
                self._chars -= len(text)
            self._full = self._chars >= self.max_chunk
            self._woken = bool(self._pieces)
        return taken

    def _flush(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._closed or self._in_flight:
            return
        pieces = self._take()
        if not pieces:
            return
        self._in_flight = True
        self._last_sent = self._reactor.seconds()
        self._send(self.history_index, pieces).addBoth(self._sent)

    def _sent(self, outcome) -> None:
        self._in_flight = False
        if isinstance(outcome, Failure):
            self._lost(outcome)
        if self._closed:
            return
        with self._lock:
            waiting = bool(self._pieces)
        if waiting:
            self._wake()

    def _lost(self, failure: Failure) -> None:
        if not failure.check(error.ConnectionDone, error.ConnectionLost):
            log.failure("an output chunk was not taken by the server", failure)

    def flush_soon(self) -> None:
        """Any thread: what was written so far goes out on the reactor's next turn.

        The evaluation's thread calls it before it asks the reactor to send
        something else about the evaluation (C{input()}'s request, a
        C{debug_paused}): C{callFromThread} keeps the order, so the server has the
        output printed before it, and its events come in the order they happened.
        """
        self._reactor.callFromThread(self._send_waiting)

    def close(self) -> None:
        """The evaluation ended: send everything left now (before its reply)."""
        with self._lock:
            self._closed = True
        self._send_waiting()

    def _send_waiting(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        # What is in flight is ahead of these on the pipe: order is kept.
        while pieces := self._take():
            self._send(self.history_index, pieces).addErrback(self._lost)
