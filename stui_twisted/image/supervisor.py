"""Server side of the live image: spawn, talk to, watch and restart the child.

(One spawned process, its pipes and its requests: L{stui_twisted.image.process}.)

L{ImageSupervisor} is a Twisted service.  C{startService} spawns
C{python -m stui_twisted.image.child} with AMP on extra pipes (the child reads
fd 3 and writes fd 4; its fds 1/2 are only logged), so user output can never
corrupt the channel.  Every public method returns a Deferred that fires with a
plain dict or fails with a L{stui_twisted.protocol.errors.StuiError}.

Rules it enforces:

- one session task (evaluate, materialize, inspect of an expression) at a time
  per session, so a task's clock starts when it is sent;
- a task that has not ended C{kill_grace} seconds after its interrupt or time
  limit is stuck in C: the image is killed, that task answers
  C{Interrupted}/C{Timeout} and every other in-flight request
  C{ImageRestarted};
- when the image dies for any reason it is logged, in-flight requests fail
  with C{ImageRestarted} and a new image starts after C{restart_delay}; once
  it is ready the restart observers run (they re-materialize sessions).

Nothing is created in C{__init__}: twistd forks after constructing services.
Pickled bindings are only ever unpickled in the child.

Why one module of about 700 lines: the lifecycle (spawn, ready, death, restart,
stop), the per-session lanes and watchdogs and the public API are one state
machine over the same image and request state; splitting them would spread that
state over modules that must change together.
"""

from __future__ import annotations

import os
import sys

from twisted.application import service
from twisted.internet import defer, error
from twisted.logger import Logger

import stui_twisted
from stui_twisted.image import amp_commands as commands
from stui_twisted.image import leftovers
from stui_twisted.image.privileges import ImageAccount, lookup
from stui_twisted.image.process import (
    ImageProcess,
    Request,
    StaleGeneration,
    reply_value,
)
from stui_twisted.protocol.envelope import iso_timestamp
from stui_twisted.protocol.errors import StuiError

MiB = 1024 * 1024
CHILD_MODULE = "stui_twisted.image.child"
STARTUP_TIMEOUT = 30.0
MAX_RESTART_DELAY = 30.0
SESSION_TASK_DEFAULT_TIMEOUT = 30.0
EVALUATION_MODES = ("execute", "display")
#: While a session is paused in the debugger its evaluation is not stuck: the
#: stuck-kill watchdog waits this long (a resume re-arms the full delay).
PAUSED_WATCHDOG_DELAY = 24 * 3600.0


def _package_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(stui_twisted.__file__)))


class ImageSupervisor(service.Service):
    """Runs user code in a supervised child process and restarts it when it dies.

    @param reactor: provides IReactorProcess and IReactorTime.
    @param python: the interpreter that runs the child.
    @param max_binding_bytes: above this a stored binding is "too large".
    @param restart_delay: seconds between a death and the new spawn.
    @param kill_grace: seconds an interrupted/timed-out task, or a SIGTERMed
        image, gets before the image is killed.
    @param user: run the image as this OS user (see L{stui_twisted.image.privileges}).
    """

    log = Logger()
    python_version: str | None = None
    """The Python version the image runs (from its first ping), e.g. C{"3.11.7"}."""

    def __init__(
        self,
        reactor,
        *,
        python: str = sys.executable,
        max_binding_bytes: int = 8 * MiB,
        restart_delay: float = 0.2,
        kill_grace: float = 2.0,
        user: str | None = None,
        state_dir: str | None = None,
    ) -> None:
        self._reactor = reactor
        self.python = python
        self.account: ImageAccount | None = lookup(user) if user else None
        self.state_dir = state_dir
        """Where the running image's group is recorded (see L{leftovers}); None: nowhere."""
        """The OS account the image runs as (None: the server's own)."""
        self.max_binding_bytes = max_binding_bytes
        self.restart_delay = restart_delay
        self.kill_grace = kill_grace
        self._image: ImageProcess | None = None
        self._state = "stopped"
        self._restarts = 0
        self._generation = 0
        self._stopping = False
        self._restart_call = None
        self._startup_watchdog = None
        self._failed_starts = 0
        self._ready_waiters: list[defer.Deferred] = []
        self._stop_waiters: list[defer.Deferred] = []
        self._restart_observers: list = []
        self._debug_observers: list = []
        self._output_observers: list = []
        self._lanes: dict[str, defer.DeferredLock] = {}
        self._running_tasks: dict[str, Request] = {}
        self.input_handler = None
        """C{handler(session_id, cell_index, prompt, password)} answers a cell's
        C{input()}: a Deferred of C{{text}} or C{{eof}} (L{input_requested})."""

    # -- lifecycle --

    def startService(self) -> None:
        super().startService()
        if self.state_dir is not None:
            killed = leftovers.kill_leftovers(self.state_dir)
            if killed:
                self.log.warn(
                    "killed {count} processes a previous image left behind (pids {pids})",
                    count=len(killed),
                    pids=killed,
                )
        self._stopping = False
        self._spawn(restarting=False)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        self._stopping = True
        if self._restart_call is not None and self._restart_call.active():
            self._restart_call.cancel()
        self._restart_call = None
        self._fail_ready_waiters("the live image is stopping")
        image = self._image
        if image is None or image.ended:
            self._state = "stopped"
            return defer.succeed(None)
        stopped = defer.Deferred()
        self._stop_waiters.append(stopped)
        image.signal("TERM")
        image.kill_timer = self._reactor.callLater(self.kill_grace, image.signal, "KILL")
        return stopped

    def addRestartObserver(self, observer) -> None:
        """Call C{observer()} (may return a Deferred) whenever a new image is
        ready after the previous one died."""
        self._restart_observers.append(observer)

    def addDebugObserver(self, observer) -> None:
        """Call C{observer(session_id, event, data)} when a session's evaluation
        pauses in the debugger or resumes (C{debug_paused} / C{debug_resumed})."""
        self._debug_observers.append(observer)

    def _debug_event(self, image: ImageProcess, session_id: str, event: str, data: dict) -> None:
        if image is not self._image:
            return  # a replaced image's last words
        # a paused evaluation is not stuck: hold the stuck-kill watchdog off
        # until it resumes (the child's own time limit is paused meanwhile)
        request = self._running_tasks.get(session_id)
        watchdog = getattr(request, "stop_watchdog", None)
        if watchdog is not None and watchdog.active():
            if event == "debug_paused":
                watchdog.reset(PAUSED_WATCHDOG_DELAY)
            elif event == "debug_resumed":
                watchdog.reset(request.watch_delay)
        for observer in list(self._debug_observers):
            observer(session_id, event, data)

    def addOutputObserver(self, observer) -> None:
        """Call C{observer(session_id, history_index, pieces)} for each chunk of
        output a running evaluation sends (C{pieces}: C{[name, text]} lists)."""
        self._output_observers.append(observer)

    def _output_written(self, session_id: str, history_index: int | None, pieces) -> None:
        for observer in list(self._output_observers):
            try:
                observer(session_id, history_index, pieces)
            except Exception:
                self.log.failure("output observer failed")

    def current_generation(self) -> defer.Deferred:
        """Fires with the generation of the running image, once one is ready.

        Each spawned image has a new generation; a namespace built in one is
        empty in the next, so callers pass it back as C{generation=} to run a
        request only in the image their session is live in.
        """
        return self._ready_image().addCallback(lambda image: image.generation)

    @property
    def live_generation(self) -> int | None:
        """The generation of the running image, or None while none is ready."""
        image = self._image
        if image is not None and image.ready and not image.ended:
            return image.generation
        return None

    def whenRunning(self) -> defer.Deferred:
        """Fires with C{status()} once an image is ready (at once if one is)."""
        return self._ready_image().addCallback(lambda image: self.status())

    def status(self) -> dict:
        """C{{status, pid, started_at, restarts}} of the current image."""
        image = self._image
        ready = image is not None and image.ready and not image.ended
        return {
            "status": self._state,
            "pid": image.pid if ready else None,
            "started_at": image.started_at_text if ready else None,
            "restarts": self._restarts,
        }

    def _spawn(self, restarting: bool) -> None:
        self._restart_call = None
        self._state = "restarting" if restarting else "starting"
        self._generation += 1
        image = ImageProcess(self, self._generation)
        environment = dict(os.environ)
        paths = [_package_root()]
        if os.path.realpath(self.python) != os.path.realpath(sys.executable):
            # Another interpreter (--image-python) finds our dependencies where we do.
            paths += [p for p in sys.path if p.endswith("site-packages")]
        existing = environment.get("PYTHONPATH")
        environment["PYTHONPATH"] = os.pathsep.join(paths + ([existing] if existing else []))
        switch: dict = {}
        if self.account is not None:
            account = self.account
            environment.update(HOME=account.home, USER=account.name, LOGNAME=account.name)
            switch = {"uid": account.uid, "gid": account.gid, "path": "/"}
        environment["PYTHONUNBUFFERED"] = "1"
        environment["STUI_IMAGE_MAX_BINDING_BYTES"] = str(self.max_binding_bytes)
        tag = environment[leftovers.TAG_VARIABLE] = leftovers.new_tag()
        self._image = image
        try:
            self._reactor.spawnProcess(
                image,
                self.python,
                [self.python, "-m", CHILD_MODULE],
                env=environment,
                childFDs={0: "w", 1: "r", 2: "r", 3: "w", 4: "r"},
                **switch,
            )
        except OSError:
            self.log.failure("could not spawn the image with {python}", python=self.python)
            self._image = None
            self._failed_starts += 1
            self._state = "restarting"
            delay = min(self.restart_delay * 2**self._failed_starts, MAX_RESTART_DELAY)
            self._restart_call = self._reactor.callLater(delay, self._spawn, restarting)
            self._fail_ready_waiters("the live image could not start")
            return
        if self.state_dir is not None:
            try:
                leftovers.remember(self.state_dir, image.pid, tag)
            except OSError as exc:
                self.log.warn("cannot record the image's process group: {error}", error=exc)
        self.log.info(
            "image started, pid {pid}{as_user}",
            pid=image.pid,
            as_user=f", as user {self.account.name}" if self.account else "",
        )
        self._startup_watchdog = self._reactor.callLater(
            STARTUP_TIMEOUT, self._startup_too_slow, image
        )
        ping = image.amp.callRemote(commands.Ping)
        ping.addCallbacks(
            self._image_ready,
            self._ping_failed,
            callbackArgs=(image, restarting),
            errbackArgs=(image,),
        )

    def _startup_too_slow(self, image: ImageProcess) -> None:
        if not image.ready and not image.ended:
            self.log.error(
                "image pid {pid} did not answer within {seconds} s; killing it",
                pid=image.pid,
                seconds=STARTUP_TIMEOUT,
            )
            image.signal("KILL")

    def _ping_failed(self, reason, image: ImageProcess) -> None:
        if not image.ended:
            self.log.failure("image pid {pid} failed its first ping", reason, pid=image.pid)
            image.signal("KILL")

    def _image_ready(self, response: dict, image: ImageProcess, restarting: bool) -> None:
        if image.ended or image is not self._image:
            return
        if self._startup_watchdog is not None and self._startup_watchdog.active():
            self._startup_watchdog.cancel()
        image.ready = True
        self.python_version = response.get("python_version") or self.python_version
        image.started_at = self._reactor.seconds()
        image.started_at_text = iso_timestamp(image.started_at)
        self._failed_starts = 0
        self._state = "running"
        self.log.info("image pid {pid} ready", pid=image.pid)
        if restarting:
            for observer in list(self._restart_observers):
                outcome = defer.maybeDeferred(observer)
                outcome.addErrback(
                    lambda reason: self.log.failure("image restart observer failed", reason)
                )
        waiters, self._ready_waiters = self._ready_waiters, []
        for waiter in waiters:
            waiter.callback(image)

    def _image_ended(self, image: ImageProcess, reason) -> None:
        exit_code = getattr(reason.value, "exitCode", None)
        exit_signal = getattr(reason.value, "signal", None)
        if self._startup_watchdog is not None and self._startup_watchdog.active():
            self._startup_watchdog.cancel()
        if image.kill_timer is not None and image.kill_timer.active():
            image.kill_timer.cancel()
        if self._stopping:
            self.log.info(
                "image pid {pid} stopped (exit status {status}, signal {signal})",
                pid=image.pid,
                status=exit_code,
                signal=exit_signal,
            )
        else:
            self.log.error(
                "image pid {pid} died (exit status {status}, signal {signal}); restarting",
                pid=image.pid,
                status=exit_code,
                signal=exit_signal,
            )
        for request in list(image.in_flight):
            request.fail(
                request.forced_error
                or StuiError(
                    "ImageRestarted",
                    "the live image died while this request ran; the session is intact, run it again",
                    pid=image.pid,
                )
            )
        if image is not self._image:
            return
        self._image = None
        if self._stopping:
            self._state = "stopped"
            waiters, self._stop_waiters = self._stop_waiters, []
            for waiter in waiters:
                waiter.callback(None)
            return
        delay = self.restart_delay
        if not image.ready:
            # Died before answering its first ping: back off, then fail the waiters.
            self._failed_starts += 1
            delay = min(self.restart_delay * 2**self._failed_starts, MAX_RESTART_DELAY)
        self._restarts += 1
        self._state = "restarting"
        self._restart_call = self._reactor.callLater(delay, self._spawn, True)
        if not image.ready:
            self._fail_ready_waiters("the live image could not start")

    def _fail_ready_waiters(self, message: str) -> None:
        waiters, self._ready_waiters = self._ready_waiters, []
        for waiter in waiters:
            waiter.errback(StuiError("ImageRestarted", message))

    def _ready_image(self) -> defer.Deferred:
        image = self._image
        if image is not None and image.ready and not image.ended:
            return defer.succeed(image)
        if self._stopping or self._state == "stopped":
            return defer.fail(StuiError("InternalError", "the live image is not running"))
        waiter = defer.Deferred()
        self._ready_waiters.append(waiter)
        return waiter

    def input_requested(self, session_id: str, cell_index, prompt: str, password: bool):
        """A cell of the image called C{input()}: C{{text}} once a client answers,
        or C{{eof}} at once when nobody can (see L{input_handler})."""
        if self.input_handler is None or session_id not in self._running_tasks:
            return {"eof": "input() cannot be answered: no evaluation of this session is running"}
        answer = defer.maybeDeferred(self.input_handler, session_id, cell_index, prompt, password)

        def failed(reason):
            self.log.failure("answering input() failed", reason)
            return {"eof": "input() cannot be answered: the server failed (see its log)"}

        return answer.addErrback(failed)

    # -- sending --

    def _send(self, image: ImageProcess, command, description: str, **arguments) -> Request:
        request = Request(image, description)
        if image.ended:
            request.fail(
                StuiError("ImageRestarted", "the live image died before this request was sent")
            )
            return request
        image.in_flight.add(request)
        try:
            answer = image.amp.callRemote(command, **arguments)
        except Exception as exc:  # noqa: BLE001 - an unencodable argument fails only this request
            self.log.failure("could not send {what} to the image", what=description)
            request.fail(
                StuiError("InternalError", f"could not send {description} to the image: {exc}")
            )
        else:
            answer.addBoth(request.answer)
        return request

    def _check_generation(self, image: ImageProcess, expected: int | None) -> None:
        if image is not self._image or image.ended:
            raise StuiError(
                "ImageRestarted",
                "the live image restarted while this request waited; the session is intact, run it again",
            )
        if expected is not None and image.generation != expected:
            raise StaleGeneration(
                "ImageRestarted",
                "the live image was replaced before this request was sent; the session is "
                "rebuilt in the new image first, run it again",
            )

    async def _call(self, command, description: str, expected_generation=None, **arguments):
        image = await self._ready_image()
        self._check_generation(image, expected_generation)
        response = await self._send(image, command, description, **arguments).result
        return reply_value(response["reply"]) if "reply" in response else response

    async def _session_task(
        self,
        lane_id: str,
        command,
        description: str,
        timeout,
        expected_generation=None,
        **arguments,
    ):
        """One task on the session's worker, serialized per session and watched.

        With C{expected_generation}, the task runs only in that image: a
        namespace built in one image is never used from another.
        """
        image = await self._ready_image()
        lane = self._lanes.setdefault(lane_id, defer.DeferredLock())
        await lane.acquire()
        try:
            self._check_generation(image, expected_generation)
            request = self._send(
                image,
                command,
                description,
                timeout=None if timeout is None else float(timeout),
                **arguments,
            )
            self._running_tasks[lane_id] = request
            if timeout:
                request.watch_delay = timeout + self.kill_grace
                request.stop_watchdog = self._reactor.callLater(
                    timeout + self.kill_grace,
                    self._kill_stuck,
                    request,
                    StuiError(
                        "Timeout",
                        f"the evaluation ran past its time limit of {timeout:g} s and did not stop; "
                        "the image was restarted",
                        timeout=timeout,
                    ),
                )
            try:
                response = await request.result
            finally:
                if request.stop_watchdog is not None and request.stop_watchdog.active():
                    request.stop_watchdog.cancel()
                if self._running_tasks.get(lane_id) is request:
                    del self._running_tasks[lane_id]
            return reply_value(response["reply"])
        finally:
            lane.release()
            if not lane.locked and not lane.waiting:
                self._lanes.pop(lane_id, None)

    def _kill_stuck(self, request: Request, stuck_error: StuiError) -> None:
        if request.settled or request.image.ended or request.forced_error is not None:
            return
        self.log.warn(
            "{what} did not stop within {grace} s (stuck outside Python); killing image pid {pid}",
            what=request.description,
            grace=self.kill_grace,
            pid=request.image.pid,
        )
        request.forced_error = stuck_error
        request.image.signal("KILL")

    # -- the API --

    def evaluate(
        self,
        session_id: str,
        code: str,
        mode: str = "execute",
        timeout: float | None = 30.0,
        *,
        generation: int | None = None,
        cell_index: int | None = None,
    ) -> defer.Deferred:
        """Run C{code} as a REPL cell in the session (see module docstring for the result)."""
        if mode not in EVALUATION_MODES:
            return defer.fail(
                StuiError(
                    "InvalidRequest",
                    f"parameter 'mode' must be one of {', '.join(EVALUATION_MODES)}, not {mode!r}",
                    parameter="mode",
                )
            )
        return defer.ensureDeferred(
            self._session_task(
                session_id,
                commands.Evaluate,
                f"evaluation in session {session_id}",
                timeout,
                expected_generation=generation,
                session_id=session_id,
                code=code,
                mode=mode,
                cell_index=cell_index,
            )
        )

    def interrupt(self, session_id: str) -> defer.Deferred:
        """Stop the session's running evaluation; fires with whether one was running."""
        request = self._running_tasks.get(session_id)
        if request is None or request.settled:
            return defer.succeed(False)
        sent = request.image.amp.callRemote(commands.Interrupt, session_id=session_id)
        sent.addErrback(
            lambda reason: (
                None
                if reason.check(error.ConnectionDone, error.ConnectionLost)
                else self.log.failure("interrupt failed", reason)
            )
        )
        if request.forced_error is None:
            self._reactor.callLater(
                self.kill_grace,
                self._kill_stuck,
                request,
                StuiError(
                    "Interrupted",
                    "the evaluation was interrupted; it was stuck, so the image was restarted",
                ),
            )
        return defer.succeed(True)

    def materialize(
        self,
        session_id: str,
        bindings: dict,
        registry: dict,
        next_object_id: int,
        timeout: float | None = SESSION_TASK_DEFAULT_TIMEOUT,
        *,
        generation: int | None = None,
    ) -> defer.Deferred:
        """(Re)build the session's namespace; fires with C{{restored, unrestorable, registry_live}}."""
        return defer.ensureDeferred(
            self._session_task(
                session_id,
                commands.Materialize,
                f"materialize of session {session_id}",
                timeout,
                expected_generation=generation,
                session_id=session_id,
                bindings=bindings or {},
                registry=registry or {},
                next_object_id=int(next_object_id),
            )
        )

    def materialize_shared(
        self, bindings: dict, *, generation: int | None = None
    ) -> defer.Deferred:
        """(Re)build the image-wide C{shared} object; same result shape as materialize."""
        return defer.ensureDeferred(
            self._call(
                commands.MaterializeShared,
                "materialize of shared",
                expected_generation=generation,
                bindings=bindings or {},
            )
        )

    def inspect(
        self,
        session_id: str,
        object_id: str | None = None,
        expression: str | None = None,
        limit: int = 100,
        timeout: float | None = SESSION_TASK_DEFAULT_TIMEOUT,
        *,
        generation: int | None = None,
    ) -> defer.Deferred:
        """Describe a registry object or an expression's value."""
        if object_id is None and expression is None:
            return defer.fail(
                StuiError(
                    "InvalidRequest",
                    "parameter 'object_id' or 'expression' is required",
                    parameter="object_id",
                )
            )
        if expression is not None:
            return defer.ensureDeferred(
                self._session_task(
                    session_id,
                    commands.Inspect,
                    f"inspection in session {session_id}",
                    timeout,
                    expected_generation=generation,
                    session_id=session_id,
                    expression=expression,
                    limit=int(limit),
                )
            )
        return defer.ensureDeferred(
            self._call(
                commands.Inspect,
                "inspection",
                expected_generation=generation,
                session_id=session_id,
                object_id=object_id,
                limit=int(limit),
            )
        )

    def complete(
        self,
        session_id: str,
        code: str,
        cursor_pos: int | None = None,
        *,
        generation: int | None = None,
    ) -> defer.Deferred:
        """Completion C{{matches, cursor_start, cursor_end}} at C{cursor_pos} (default: end)."""
        position = len(code) if cursor_pos is None else int(cursor_pos)
        return defer.ensureDeferred(
            self._call(
                commands.Complete,
                "completion",
                expected_generation=generation,
                session_id=session_id,
                code=code,
                cursor_pos=position,
            )
        )

    def browse(
        self, session_id: str, operation: str, arguments: dict, *, generation: int | None = None
    ) -> defer.Deferred:
        """A browse-tool operation in the session's namespace (L{stui_twisted.image.browse})."""
        return defer.ensureDeferred(
            self._call(
                commands.Browse,
                operation,
                expected_generation=generation,
                session_id=session_id,
                operation=operation,
                arguments=arguments,
            )
        )

    def debug(
        self, session_id: str, operation: str, arguments: dict, *, generation: int | None = None
    ) -> defer.Deferred:
        """A debugger operation (L{stui_twisted.image.debugger}), sent beside the
        session's lane (its worker may be the paused thread).  While the answer
        says the session is paused, the stuck-kill watchdog of its running
        evaluation is held off; a resume re-arms it with the full delay."""
        return defer.ensureDeferred(
            self._call(
                commands.Debug,
                f"debug {operation}",
                expected_generation=generation,
                session_id=session_id,
                operation=operation,
                arguments=arguments,
            )
        ).addCallback(self._debug_watchdog, session_id, operation)

    def _debug_watchdog(self, result, session_id: str, operation: str):
        request = self._running_tasks.get(session_id)
        watchdog = getattr(request, "stop_watchdog", None)
        if watchdog is not None and watchdog.active():
            if operation in ("continue", "step"):
                watchdog.reset(request.watch_delay)
            elif isinstance(result, dict) and result.get("paused", True):
                watchdog.reset(PAUSED_WATCHDOG_DELAY)
        return result

    def snapshot(self, session_id: str, *, generation: int | None = None) -> defer.Deferred:
        """Every binding of the session re-serialized: C{{bindings, variables}}."""
        return defer.ensureDeferred(
            self._call(
                commands.Snapshot,
                "snapshot",
                expected_generation=generation,
                session_id=session_id,
            )
        )

    def clear(self, session_id: str, parts, *, generation: int | None = None) -> defer.Deferred:
        """Forget C{variables} and/or C{registry}; fires with C{{cleared}}."""
        return defer.ensureDeferred(
            self._call(
                commands.Clear,
                "clear",
                expected_generation=generation,
                session_id=session_id,
                parts=list(parts),
            )
        )

    def drop_session(self, session_id: str) -> defer.Deferred:
        """Forget everything about the session; fires with C{{dropped}}."""
        return defer.ensureDeferred(self._call(commands.DropSession, "drop", session_id=session_id))
