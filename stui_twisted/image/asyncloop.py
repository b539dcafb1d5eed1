"""The image's one asyncio event loop, for cells that C{await} at top level.

A cell compiled with C{ast.PyCF_ALLOW_TOP_LEVEL_AWAIT} whose code is a
coroutine runs on L{ImageLoop}: one loop per image, in a daemon thread of
its own, started on first use and running as long as the image.  The
session's worker thread submits the coroutine
(C{asyncio.run_coroutine_threadsafe}) and waits for it, so a task the cell
creates (C{asyncio.create_task}) keeps running after the cell and is there in
the next one, in any session.

Output: the coroutine runs with an L{OutputSink} in a context variable
(which tasks it creates inherit), so what it prints goes to the evaluation's
output.  After the evaluation, the sink is closed: what a background task
prints then is dropped and counted on the session (the next evaluation's
output starts with a one-line note of it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import threading
import weakref
from typing import Any

#: The sink of the evaluation whose coroutine (or a task it made) is running.
current_sink: contextvars.ContextVar[OutputSink | None] = contextvars.ContextVar(
    "stui_output_sink", default=None
)


class OutputSink:
    """Where one evaluation's asynchronous output goes: its buffer while it
    runs, then nowhere (counted in C{dropped}, a callable taking the count).

    C{tasks} (a C{WeakSet} of the session's) gets every task made under this
    sink, so the session's tasks can be cancelled when it is dropped.
    """

    def __init__(self, buffer, dropped, tasks: weakref.WeakSet | None = None) -> None:
        self._buffer = buffer
        self._dropped = dropped
        self.tasks = tasks
        self._lock = threading.Lock()
        self._open = True

    def write(self, text: str, name: str = "stdout") -> None:
        with self._lock:
            if self._open:
                self._buffer.write(text, name)
                return
        self._dropped(len(text))

    def close(self) -> None:
        """No more output goes to the evaluation (it has answered)."""
        with self._lock:
            self._open = False


class AwaitedCell:
    """A cell's coroutine running as a task on the image's loop.

    Unlike C{asyncio.run_coroutine_threadsafe}'s future, L{result} waits for
    the task itself to end, also after L{cancel}: a coroutine that does not
    give up (it blocks the loop, or swallows the cancellation) keeps its
    evaluation running, and the supervisor handles it like code stuck in C.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, coroutine, sink: OutputSink) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._task: asyncio.Task | None = None
        self._cancel_requested = False
        self._finished = threading.Event()
        loop.call_soon_threadsafe(self._start, coroutine, sink)

    def _start(self, coroutine, sink: OutputSink) -> None:
        context = contextvars.copy_context()
        context.run(current_sink.set, sink)
        task = self._loop.create_task(coroutine, context=context)
        task.add_done_callback(lambda _: self._finished.set())
        with self._lock:
            self._task = task
            cancel = self._cancel_requested
        if cancel:
            task.cancel()

    def cancel(self) -> None:
        """Cancel the task (from any thread; before it started too)."""
        with self._lock:
            self._cancel_requested = True
            task = self._task
        if task is not None:
            self._loop.call_soon_threadsafe(task.cancel)

    def result(self) -> Any:
        """Wait for the task to end; its value, or its exception raised
        (C{asyncio.CancelledError} when it was cancelled)."""
        self._finished.wait()
        return self._task.result()


class ImageLoop:
    """One asyncio event loop running forever in its own daemon thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                loop.set_task_factory(_session_task)
                started = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(started.set)
                    loop.run_forever()

                self._thread = threading.Thread(target=run, name="asyncio loop", daemon=True)
                self._thread.start()
                started.wait()
                self._loop = loop
            return self._loop

    def submit(self, coroutine, sink: OutputSink) -> AwaitedCell:
        """Run C{coroutine} as a task on the loop with C{sink} as its output."""
        return AwaitedCell(self._running_loop(), coroutine, sink)

    def cancel_soon(self, tasks: weakref.WeakSet) -> None:
        """Cancel the unfinished tasks of C{tasks} (a session's; from any thread).

        The set is only touched on the loop's thread, where tasks are added to it.
        """
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(_cancel_all, tasks)

    def tasks(self) -> set[asyncio.Task]:
        """The loop's unfinished tasks (for tests and diagnostics)."""
        loop = self._loop
        if loop is None:
            return set()
        future = asyncio.run_coroutine_threadsafe(_all_tasks(), loop)
        return future.result(timeout=5)

    def close(self) -> None:
        """Stop the loop and its thread (tests; the image process just exits)."""
        with self._lock:
            loop, self._loop = self._loop, None
            thread, self._thread = self._thread, None
        if loop is None:
            return

        async def cancel_all() -> None:
            tasks = await _all_tasks()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        # a task that ignores its cancellation does not hold the loop up longer
        concurrent.futures.wait([asyncio.run_coroutine_threadsafe(cancel_all(), loop)], 5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        if not thread.is_alive():
            loop.close()


def _session_task(loop, coroutine, context=None) -> asyncio.Task:
    """The loop's task factory: a task, recorded as its session's (see L{OutputSink})."""
    task = asyncio.Task(coroutine, loop=loop, context=context)
    sink = context.get(current_sink) if context is not None else current_sink.get()
    if sink is not None and sink.tasks is not None:
        sink.tasks.add(task)
    return task


def _cancel_all(tasks: weakref.WeakSet) -> None:
    for task in list(tasks):
        task.cancel()


async def _all_tasks() -> set[asyncio.Task]:
    return {task for task in asyncio.all_tasks() if task is not asyncio.current_task()}
