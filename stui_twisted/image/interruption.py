"""Stopping pure-Python code on another thread, safely.

L{StopGuard} raises an L{EvaluationStopped} subclass inside the
worker thread with C{PyThreadState_SetAsyncExc}, but only while that thread is
inside user code (between L{StopGuard.arm} and L{StopGuard.disarm}),
and at most once; C{disarm} clears an exception that was set but not yet
delivered, so it can never land in the worker's own bookkeeping afterwards.
Code blocked in C (C{time.sleep}, a socket read) only sees the exception when
it returns to Python: the supervisor kills the image for those.

While the worker waits for a coroutine on the image's event loop (a cell that
C{await}s at top level), L{StopGuard.cancelling} replaces the injected
exception with a cancel callback: the stop cancels that coroutine's task only,
and the worker raises the stop reason when its wait ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading


class EvaluationStopped(BaseException):
    """Base of the exceptions injected into a worker thread (never user-visible)."""


class InterruptRequested(EvaluationStopped):
    """The client asked to C{interrupt} the evaluation."""


class TimeLimitReached(EvaluationStopped):
    """The evaluation ran past its time limit."""


def _set_async_exception(thread_id: int, exception_type: type[BaseException] | None) -> int:
    target = ctypes.py_object(exception_type) if exception_type is not None else None
    return ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), target)


class _Withdrawn(BaseException):
    """Takes the place of an undelivered stop in L{StopGuard.disarm}; caught there."""


def _withdraw_async_exception() -> None:
    """Drop this thread's undelivered stop, if any, and CPython's signal of it.

    C{PyThreadState_SetAsyncExc(id, NULL)} clears the thread's pending
    exception but I{sets} the interpreter-wide "async exception pending" flag,
    which only the delivery of an exception clears: every thread of the image
    then takes the eval-breaker path at each check (loops run slower), and on
    CPython 3.11 a thread with a tracer (the session debugger) that enters a
    function spins there forever.  So the pending stop is replaced by a marker
    that is delivered, and caught, right here.
    """
    try:
        if _set_async_exception(threading.get_ident(), _Withdrawn) == 1:
            while True:  # delivered at the next eval-breaker check
                pass
    except _Withdrawn:
        return


class StopGuard:
    """Arms one task's user code for asynchronous stopping.

    @ivar stop_reason: the L{EvaluationStopped} subclass requested, or None.
    @ivar timeout: the task's time limit in seconds (for messages), or None.
    """

    def __init__(self, timeout: float | None = None) -> None:
        self.timeout = timeout
        self.stop_reason: type[EvaluationStopped] | None = None
        self._lock = threading.Lock()
        self._armed_thread: int | None = None
        self._cancel = None

    def arm(self) -> None:
        """Called on the worker thread right before user code runs."""
        with self._lock:
            if self.stop_reason is not None:
                raise self.stop_reason()
            self._armed_thread = threading.get_ident()

    def disarm(self) -> None:
        """Called on the worker thread after user code; idempotent."""
        with self._lock:
            thread_id, self._armed_thread = self._armed_thread, None
            if thread_id is not None and self.stop_reason is not None:
                if thread_id == threading.get_ident():
                    _withdraw_async_exception()
                else:
                    _set_async_exception(thread_id, None)

    def request_stop(self, reason: type[EvaluationStopped]) -> None:
        """Ask the task to stop (from any thread); only the first request counts."""
        with self._lock:
            if self.stop_reason is not None:
                return
            self.stop_reason = reason
            if self._armed_thread is not None:
                _set_async_exception(self._armed_thread, reason)
            cancel = self._cancel
        if cancel is not None:
            cancel()

    def cancelling(self, cancel) -> _Cancelling:
        """A context for the armed worker's wait for a coroutine: inside, a
        stop calls C{cancel()} (once) instead of raising in the thread; on
        leaving, the stop reason is raised if a stop was requested."""
        return _Cancelling(self, cancel)


class _Cancelling:
    def __init__(self, guard: StopGuard, cancel) -> None:
        self._guard = guard
        self._cancel = cancel
        self._thread: int | None = None

    def __enter__(self) -> None:
        guard = self._guard
        with guard._lock:
            if guard.stop_reason is not None:
                raise guard.stop_reason()
            self._thread, guard._armed_thread = guard._armed_thread, None
            guard._cancel = self._cancel

    def __exit__(self, *exc_info) -> None:
        guard = self._guard
        with guard._lock:
            guard._cancel = None
            guard._armed_thread = self._thread
            if guard.stop_reason is not None:
                raise guard.stop_reason() from None


class NoGuard:
    """A guard for callers that never stop the code (tests, direct use)."""

    timeout = None
    stop_reason = None

    def arm(self) -> None:
        """Nothing to arm."""

    def disarm(self) -> None:
        """Nothing to disarm."""

    def cancelling(self, cancel) -> contextlib.nullcontext:
        """Nothing to cancel."""
        return contextlib.nullcontext()
