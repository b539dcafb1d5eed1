"""The image child process: an AMP responder over fds 3/4 and one worker per session.

Run as C{python -m stui_twisted.image.child} by the supervisor.  fd 3 carries
AMP requests in, fd 4 answers out; fds 1/2 are left to user code (and to this
process's log), so a C{print()} or C{os.write(1, ...)} can never corrupt the
channel.  Each session evaluates on its own daemon thread (one task at a time,
sessions in parallel); the reactor thread only moves messages, so a session
spinning in C{while True: pass} delays nobody else by more than a few GIL
switch intervals.
"""

from __future__ import annotations

import ctypes
import os
import platform
import queue
import signal
import sys
import threading

from twisted.internet import defer, threads
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

from stui_twisted.image import amp_commands as commands
from stui_twisted.image import browse
from stui_twisted.image import debugger as debugger_module
from stui_twisted.image.bindings import DEFAULT_MAX_BINDING_BYTES
from stui_twisted.image.capture import install_output_router
from stui_twisted.image.interruption import (
    EvaluationStopped,
    InterruptRequested,
    StopGuard,
    TimeLimitReached,
)
from stui_twisted.image.streaming import OutputStream
from stui_twisted.image.workspace import Image
from stui_twisted.protocol.errors import StuiError
from stui_twisted.transports.immediate import write_now

AMP_IN_FD = 3
AMP_OUT_FD = 4
SWITCH_INTERVAL = 0.001
PR_SET_PDEATHSIG = 1

log = Logger()


def ok_reply(result) -> dict:
    """The success envelope."""
    return {"ok": True, "result": result}


def error_reply(error: StuiError) -> dict:
    """The failure envelope for a StuiError."""
    return {
        "ok": False,
        "error_type": error.error_type,
        "message": error.message,
        "details": error.details,
    }


def debug_operation(debugger, operation: str, arguments: dict) -> dict:
    """One debugger command (debugger.md) on a pool thread."""
    if operation == "set_breakpoint":
        return debugger.set_breakpoint(arguments)
    if operation == "remove_breakpoint":
        return debugger.remove_breakpoint(arguments["breakpoint_id"])
    if operation == "list_breakpoints":
        return debugger.list_breakpoints()
    if operation == "restore_breakpoints":
        debugger.restore(arguments["breakpoints"])
        return debugger.list_breakpoints()
    if operation == "state":
        return debugger.state()
    if operation == "post_mortem":
        return debugger.post_mortem()
    return debugger.command(operation, arguments)


def run_to_reply(work, *args) -> dict:
    """Call C{work} and wrap its outcome in a reply envelope (never raises)."""
    try:
        return ok_reply(work(*args))
    except StuiError as error:
        return error_reply(error)
    except EvaluationStopped:
        return error_reply(StuiError("Interrupted", "the evaluation was interrupted"))
    except Exception as exc:  # noqa: BLE001 - logged and answered as InternalError
        log.failure("image task failed")
        return error_reply(
            StuiError("InternalError", f"the image failed: {type(exc).__name__}: {exc}")
        )


class _Task:
    """One queued unit of session work."""

    def __init__(self, work, timeout: float | None) -> None:
        self.work = work
        self.guard = StopGuard(timeout)
        self.timer = None
        self.armed = False
        """Its time limit was armed when it was submitted (the worker was idle)."""
        self.done = defer.Deferred()


class SessionWorker:
    """A daemon thread that runs one session's tasks in order, stoppable by guard."""

    def __init__(self, reactor, session_id: str) -> None:
        self._reactor = reactor
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._current: _Task | None = None
        self._unfinished = 0  # tasks submitted and not finished (counted on the reactor)
        self._thread = threading.Thread(target=self._run, name=f"session {session_id}", daemon=True)
        self._thread.start()

    def submit(self, work, timeout: float | None) -> defer.Deferred:
        """Queue C{work(guard)}; the Deferred fires (on the reactor) with its reply envelope."""
        task = _Task(work, timeout)
        # time spent paused in the debugger does not count toward the limit
        task.guard.pause_clock = lambda: self._reactor.callFromThread(self._pause_timer, task)
        task.guard.resume_clock = lambda: self._reactor.callFromThread(self._resume_timer, task)
        if task.guard.timeout and not self._unfinished:
            # Nothing runs or waits before it: it starts now, so its time limit
            # is armed here, not by the worker thread waking the reactor for it.
            self._arm_timer(task)
            task.armed = True
        self._unfinished += 1
        self._tasks.put(task)
        return task.done

    def interrupt(self) -> bool:
        """Stop the running task, if any; answers whether one was running."""
        task = self._current
        if task is None:
            return False
        task.guard.request_stop(InterruptRequested)
        return True

    def stop(self) -> None:
        """Interrupt the running task and let the thread end after it."""
        self.interrupt()
        self._tasks.put(None)

    def _run(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            self._current = task
            if task.guard.timeout and not task.armed:  # it waited behind another task
                self._reactor.callFromThread(self._arm_timer, task)
            try:
                reply = run_to_reply(task.work, task.guard)
            except EvaluationStopped:
                # Delivered between user code and disarm, outside run_to_reply's try.
                task.guard.disarm()
                reply = error_reply(StuiError("Interrupted", "the evaluation was interrupted"))
            self._current = None
            self._reactor.callFromThread(self._finish, task, reply)

    def _arm_timer(self, task: _Task) -> None:
        if not task.done.called:
            task.timer = self._reactor.callLater(
                task.guard.timeout, task.guard.request_stop, TimeLimitReached
            )

    def _pause_timer(self, task: _Task) -> None:
        if task.timer is not None and task.timer.active():
            task.remaining = max(0.0, task.timer.getTime() - self._reactor.seconds())
            task.timer.cancel()

    def _resume_timer(self, task: _Task) -> None:
        remaining = getattr(task, "remaining", None)
        if remaining is not None and not task.done.called:
            task.remaining = None
            task.timer = self._reactor.callLater(
                remaining, task.guard.request_stop, TimeLimitReached
            )

    def _finish(self, task: _Task, reply: dict) -> None:
        self._unfinished -= 1
        if task.timer is not None and task.timer.active():
            task.timer.cancel()
        task.done.callback(reply)


class ImageChildProtocol(commands.BoxParsingAMP):
    """Answers the supervisor's commands against one L{Image}."""

    def __init__(self, reactor, image: Image) -> None:
        super().__init__()
        self._reactor = reactor
        self._image = image
        self._workers: dict[str, SessionWorker] = {}
        image.input_source = self.read_input
        debugger_module.event_sink = self._debug_event_from_thread

    def read_input(self, session_id: str, cell, prompt: str, password: bool, guard) -> str:
        """On a session's worker thread: ask the server for a line of input.

        The thread waits for the answer; a stop (interrupt, the time limit)
        ends the wait at once and raises its reason (L{StopGuard.cancelling}).
        """
        answer: dict = {}
        done = threading.Event()

        def settle(outcome) -> None:
            answer.update(outcome)
            done.set()

        def ask() -> None:
            sent = self.callRemote(
                commands.RequestInput,
                session_id=session_id,
                cell_index=cell,
                prompt=prompt,
                password=password,
            )
            sent.addCallbacks(
                settle, lambda failure: settle({"eof": f"input(): {failure.getErrorMessage()}"})
            )

        self._reactor.callFromThread(ask)
        with guard.cancelling(done.set):
            done.wait()
        if answer.get("text") is None:
            raise EOFError(answer.get("eof") or "input() got no answer")
        return answer["text"]

    def _debug_event_from_thread(self, session_id: str, event: str, data: dict) -> None:
        """Tell the server a session paused or resumed (called on its worker thread)."""
        self._reactor.callFromThread(
            self.callRemote, commands.DebugEvent, session_id=session_id, event=event, data=data
        )

    def _worker(self, session_id: str) -> SessionWorker:
        worker = self._workers.get(session_id)
        if worker is None:
            worker = self._workers[session_id] = SessionWorker(self._reactor, session_id)
        return worker

    def _in_pool(self, work, *args) -> defer.Deferred:
        pool = self._reactor.getThreadPool()
        return threads.deferToThreadPool(
            self._reactor, pool, run_to_reply, work, *args
        ).addCallback(lambda reply: {"reply": reply})

    def _on_worker(self, session_id: str, timeout: float | None, work) -> defer.Deferred:
        return (
            self._worker(session_id)
            .submit(work, timeout)
            .addCallback(lambda reply: {"reply": reply})
        )

    @commands.Ping.responder
    def ping(self):
        return {"pid": os.getpid(), "python_version": platform.python_version()}

    @commands.Evaluate.responder
    def evaluate(self, session_id, code, mode, timeout=None, cell_index=None):
        workspace = self._image.session(session_id)
        stream = OutputStream(
            self._reactor,
            lambda history_index, pieces: self.callRemote(
                commands.OutputChunk,
                session_id=session_id,
                history_index=history_index,
                pieces=pieces,
            ),
        )

        def answer(reply: dict) -> dict:
            stream.close()  # the last output chunk goes out before the reply
            return reply

        return self._on_worker(
            session_id,
            timeout,
            lambda guard: workspace.evaluate(
                code, mode, guard=guard, cell_index=cell_index, stream=stream
            ),
        ).addCallback(answer)

    @commands.Interrupt.responder
    def interrupt(self, session_id):
        worker = self._workers.get(session_id)
        return {"interrupted": worker.interrupt() if worker is not None else False}

    @commands.Materialize.responder
    def materialize(self, session_id, bindings, registry, next_object_id, timeout=None):
        workspace = self._image.session(session_id)
        return self._on_worker(
            session_id,
            timeout,
            lambda guard: workspace.materialize(
                bindings or {}, registry or {}, next_object_id, guard=guard
            ),
        )

    @commands.MaterializeShared.responder
    def materialize_shared(self, bindings):
        return self._in_pool(self._image.materialize_shared, bindings or {})

    @commands.Inspect.responder
    def inspect(self, session_id, limit, object_id=None, expression=None, timeout=None):
        workspace = self._image.session(session_id)
        if expression is not None:
            return self._on_worker(
                session_id,
                timeout,
                lambda guard: workspace.inspect(expression=expression, limit=limit, guard=guard),
            )
        return self._in_pool(lambda: workspace.inspect(object_id=object_id, limit=limit))

    @commands.Complete.responder
    def complete(self, session_id, code, cursor_pos):
        workspace = self._image.session(session_id)
        return self._in_pool(workspace.complete, code, cursor_pos)

    @commands.Snapshot.responder
    def snapshot(self, session_id):
        return self._in_pool(self._image.session(session_id).snapshot)

    @commands.Clear.responder
    def clear(self, session_id, parts):
        return {"reply": run_to_reply(self._image.session(session_id).clear, list(parts or []))}

    @commands.DropSession.responder
    def drop_session(self, session_id):
        worker = self._workers.pop(session_id, None)
        if worker is not None:
            worker.stop()
        existed = self._image.drop_session(session_id)
        return {"reply": ok_reply({"dropped": existed or worker is not None})}

    @commands.Browse.responder
    def browse(self, session_id, operation, arguments):
        # system_info needs no session: an empty id makes no workspace.
        workspace = self._image.session(session_id) if session_id else None
        return self._in_pool(browse.run, workspace, operation, arguments or {})

    @commands.Debug.responder
    def debug(self, session_id, operation, arguments):
        workspace = self._image.session(session_id)
        return self._in_pool(debug_operation, workspace.debugger, operation, arguments or {})

    def connectionLost(self, reason):
        # The supervisor is gone (or closed our pipes): nothing here is worth keeping.
        log.info("AMP channel closed ({reason}); image exiting", reason=reason.value)
        os._exit(0)


def _die_with_parent() -> None:
    """On Linux, have the kernel kill this process if the server dies, even when
    the reactor is frozen by user code holding the GIL in C."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError) as exc:
        log.warn("cannot ask to die with the server: {error}", error=exc)
    if os.getppid() == 1:
        os._exit(0)


def _own_process_group() -> None:
    """Lead a session of our own and keep the AMP pipes to ourselves.

    The supervisor kills this process group when the image dies or is
    replaced, so whatever user code started (C{subprocess.Popen},
    C{os.system('... &')}, C{os.fork()}) dies with it; and the AMP pipes are
    closed on exec, so a program user code runs does not hold the channel.
    """
    try:
        os.setsid()
    except OSError as exc:  # already a group leader: keep the group we have
        log.warn("cannot start a session of our own: {error}", error=exc)
    for fd in (AMP_IN_FD, AMP_OUT_FD):
        os.set_inheritable(fd, False)


def main() -> None:
    """Entry point of the image process."""
    _own_process_group()
    _die_with_parent()
    quiet_amp = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
    quiet_amp.setLogLevelForNamespace("twisted.protocols.amp", LogLevel.warn)
    observer = FilteringLogObserver(textFileLogObserver(sys.__stderr__), [quiet_amp])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.setswitchinterval(SWITCH_INTERVAL)
    install_output_router()
    max_binding_bytes = int(
        os.environ.get("STUI_IMAGE_MAX_BINDING_BYTES", DEFAULT_MAX_BINDING_BYTES)
    )

    from twisted.internet import reactor, stdio

    protocol = ImageChildProtocol(reactor, Image(max_binding_bytes))

    class AMPStandardIO(stdio.StandardIO):
        """The child's end of the AMP pipes: a box leaves at once (L{write_now})."""

        def write(self, data: bytes) -> None:
            if self._writer is not None:
                write_now(self._writer, data)

    AMPStandardIO(protocol, stdin=AMP_IN_FD, stdout=AMP_OUT_FD, reactor=reactor)
    log.info("image ready, pid {pid}", pid=os.getpid())
    reactor.run(installSignalHandlers=False)


if __name__ == "__main__":
    main()
