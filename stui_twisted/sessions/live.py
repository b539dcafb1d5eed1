"""The live-image side of a session: materializing, evaluating, inspecting.

L{LiveSessions} is a component the
L{stui_twisted.sessions.service.SessionService} owns.  It turns the image's
replies into session changes (stored bindings, variables, registry, history,
shared namespace) and rebuilds namespaces from stored bindings when a session
is restored or the image is replaced.  It sees the service only through
L{SessionsView} (three members; and its C{events} hub and C{connections},
when they are wired), and answers domain objects
(L{stui_twisted.sessions.results}), never reply dicts.  Evaluations between
their start and their end are L{stui_twisted.sessions.evaluations}'.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from twisted.internet import defer
from twisted.logger import Logger

from stui_twisted.access.plans import PlanBook
from stui_twisted.events import hooks as event_hooks
from stui_twisted.image.supervisor import StaleGeneration
from stui_twisted.protocol.envelope import iso_timestamp
from stui_twisted.protocol.errors import StuiError, invalid_parameter
from stui_twisted.sessions.evaluations import (
    RunningEvaluation,
    RunningEvaluations,
    clip,
)
from stui_twisted.sessions.model import Session
from stui_twisted.sessions.results import (
    Completions,
    EvaluationOutcome,
    Inspection,
    Rebuilt,
    SharedNamespace,
)

MAX_RESULT_TEXT = 1024 * 1024
MAX_INSPECTOR_HISTORY = 100
REGISTRY_LIMIT = 1000  # the image keeps the same bound (image/workspace.py)
STALE_RETRIES = 3
"""How often a request is re-tried when the image was replaced before it was sent."""
#: The persistence delta the image attaches to results and errors (not for clients).
DELTA_KEYS = frozenset(
    {
        "bindings_changed",
        "bindings_removed",
        "variables",
        "registry_added",
        "shared_changed",
        "shared_removed",
        "next_object_id",
    }
)


SERVER_STOPPED = (
    "the server stopped while this evaluation ran; it did not finish (its output so far is kept)"
)


class SessionsView(Protocol):
    """What L{LiveSessions} needs from the service that owns it, and nothing more."""

    shared: SharedNamespace
    """The stored C{shared} namespace; L{LiveSessions} updates it and marks it dirty."""

    def live_sessions(self) -> Iterable[Session]:
        """The active sessions that were live in the image (rebuilt after a restart)."""

    async def changed(self, session: Session, action: str) -> None:
        """Record a content change of C{session} (durable per the policy), or raise."""


class LiveSessions:
    """evaluate / inspect / complete / interrupt, and keeping sessions in the image.

    @param view: the owning service, seen through L{SessionsView}.
    @param image: the L{ImageSupervisor}, or C{None} when the image is disabled.
    @param settings: the server's L{Settings} (limits and evaluation timeouts).
    @param clock: an C{IReactorTime}; history timestamps and durations come from it.
    @param plans: the L{PlanBook} of per-principal limits (default: the server-wide ones).
    """

    log = Logger()

    def __init__(self, view: SessionsView, image, settings, clock, plans=None) -> None:
        self.view = view
        self.plans = plans if plans is not None else PlanBook(settings)
        self.image = image
        self.settings = settings
        self.clock = clock
        self._image_locks: dict[str | None, defer.DeferredLock] = {}
        self._shared_generation: int | None = None
        self.running = RunningEvaluations(view)
        if image is not None:
            image.addRestartObserver(self.image_restarted)
            image.addOutputObserver(self.output_written)
            image.input_handler = self.running.input_requested
            image.addDebugObserver(self.debug_event)

    def now(self) -> float:
        return self.clock.seconds()

    def output_written(self, session_id: str, history_index: int | None, pieces) -> None:
        """A running evaluation wrote output: one C{output} event per piece."""
        event_hooks.output(self.view, session_id, history_index, pieces)

    # ================================================================ image glue

    def _need_image(self):
        if self.image is None:
            raise StuiError(
                "InternalError", "the live image is disabled on this server (image_enabled=false)"
            )
        return self.image

    def is_live(self, session: Session) -> bool:
        """Whether C{session}'s namespace exists in the running image."""
        return (
            self.image is not None
            and session.materialized
            and session.image_generation is not None
            and session.image_generation == self.image.live_generation
        )

    def _image_lock(self, session_id: str | None) -> defer.DeferredLock:
        """The lock under which a session's namespace is checked and (re)built.

        C{None} names the image-wide C{shared} namespace.
        """
        return self._image_locks.setdefault(session_id, defer.DeferredLock())

    def _release_image_lock(self, session_id: str | None, lock: defer.DeferredLock) -> None:
        lock.release()
        if not lock.locked and not lock.waiting:
            self._image_locks.pop(session_id, None)

    async def _ensure_materialized(self, session: Session, *, rebuild: bool = False) -> int:
        """Make C{session} live in the running image; answer that image's generation.

        Every image command on a session goes through here, so none runs in a
        namespace that is not (yet) rebuilt after an image restart, and a
        rebuild never replaces a namespace in which acknowledged work was done:
        under the session's lock a namespace is rebuilt only when the running
        image has none for it (or C{rebuild}, for C{load_context}).
        """
        image = self._need_image()
        if not rebuild and session.session_id not in self._image_locks:
            # Nobody holds or waits for the session's lock, and nothing is to be
            # rebuilt: what taking it would answer, without a Deferred lock,
            # a generation Deferred and the shared check per request.
            generation = getattr(image, "live_generation", None)
            if (
                generation is not None
                and session.materialized
                and session.image_generation == generation
                and self._shared_generation == generation
            ):
                return generation
        lock = self._image_lock(session.session_id)
        await lock.acquire()
        try:
            generation = await image.current_generation()
            await self.ensure_shared(generation)
            if rebuild or not (session.materialized and session.image_generation == generation):
                await self._materialize(session, generation)
            return generation
        finally:
            self._release_image_lock(session.session_id, lock)

    async def _materialize(self, session: Session, generation: int) -> dict:
        """Rebuild C{session}'s namespace in image C{generation} from its stored bindings."""
        image = self._need_image()
        if (
            not self.is_live(session)
            and not session.bindings
            and not session.registry
            and not session.breakpoints
        ):
            # Nothing to rebuild and nothing to replace: a session that is not
            # live has no workspace in the image, which makes an empty one on
            # first use. Skipping the round trip keeps restore_session of a
            # fresh session fast.
            session.materialized = True
            session.image_generation = generation
            session.unrestorable = []
            return {"restored": [], "unrestorable": []}
        outcome = await image.materialize(
            session.session_id,
            session.bindings,
            session.registry,
            session.next_object_id,
            generation=generation,
        )
        if session.breakpoints:  # the session's debugger breakpoints (debugger.md §1)
            await image.debug(
                session.session_id,
                "restore_breakpoints",
                {"breakpoints": session.breakpoints},
                generation=generation,
            )
        live = set(outcome.get("registry_live", ()))
        for object_id, entry in session.registry.items():
            entry["live"] = object_id in live
        session.materialized = True
        session.image_generation = generation
        unrestorable = list(outcome.get("unrestorable", ()))
        for name, binding in session.bindings.items():
            if binding.get("encoding") == "unrestorable" and name not in {
                u.get("name") for u in unrestorable
            }:
                unrestorable.append(
                    {"name": name, "type": binding.get("type"), "reason": binding.get("reason")}
                )
        session.unrestorable = unrestorable
        # A binding that did not come back is not a variable of the session
        # any more: it stays reported as unrestorable until rebound or deleted.
        gone = {u.get("name") for u in unrestorable}
        session.variables = [v for v in session.variables if v.get("name") not in gone]
        return {"restored": list(outcome.get("restored", ())), "unrestorable": unrestorable}

    async def restore(self, session: Session, *, rebuild: bool = False) -> Rebuilt:
        """Make C{session} live (rebuilt from what is stored when C{rebuild}).

        Without an image nothing is rebuilt; a session already live is attached
        as it is, so live objects that cannot be stored (sockets, lambdas) are
        not thrown away.
        """
        if self.is_live(session) and not rebuild:
            return self.rebuilt(session)
        if self.image is None:
            return Rebuilt([], list(session.unrestorable) if not rebuild else [])
        await self._ensure_materialized(session, rebuild=rebuild)
        return self.rebuilt(session)

    @staticmethod
    def rebuilt(session: Session) -> Rebuilt:
        """What of C{session}'s stored bindings is live now, and what could not be."""
        return Rebuilt([v.get("name") for v in session.variables], list(session.unrestorable))

    async def _in_image(self, session: Session, operation):
        """C{operation(generation)} with C{session} live in that image generation.

        An image replaced after the session was made live but before the
        request was sent answers L{StaleGeneration}; the session is then
        rebuilt in the new image and the request sent again (a request that
        reached an image that then died is never repeated: it answers
        C{ImageRestarted}).
        """
        for attempt in range(STALE_RETRIES):
            generation = await self._ensure_materialized(session)
            try:
                return await operation(generation)
            except StaleGeneration:
                if attempt == STALE_RETRIES - 1:
                    raise

    async def ensure_shared(self, generation: int) -> None:
        """Make the image-wide C{shared} namespace live in image C{generation}."""
        if self._shared_generation == generation:
            return
        lock = self._image_lock(None)
        await lock.acquire()
        try:
            if self._shared_generation != generation:
                if self.view.shared.bindings:
                    await self._materialize_shared(generation)
                self._shared_generation = generation
        finally:
            self._release_image_lock(None, lock)

    async def _materialize_shared(self, generation: int | None = None) -> None:
        outcome = await self._need_image().materialize_shared(
            self.view.shared.bindings, generation=generation
        )
        if outcome.get("unrestorable"):
            self.log.warn(
                "shared namespace: {count} bindings could not be restored: {names}",
                count=len(outcome["unrestorable"]),
                names=[u.get("name") for u in outcome["unrestorable"]],
            )

    async def image_restarted(self) -> None:
        """A new image replaced a dead one: bring every live session back.

        Commands that arrive meanwhile do not wait for this loop: each makes
        its own session live first (L{_ensure_materialized}), under the same
        per-session lock, so a session is rebuilt once and before any use.
        """
        if getattr(self.view, "events", None) is not None:
            pid = self.image.status()["pid"] if self.image is not None else None
            event_hooks.publish(
                self.view, None, "image_restarted", {"pid": pid, "reason": "image died"}
            )
        sessions = list(self.view.live_sessions())
        restored = 0
        for session in sessions:
            try:
                await self._ensure_materialized(session)
                restored += 1
            except Exception:
                self.log.failure("re-materializing {sid} failed", sid=session.session_id)
        self.log.info("image restart: {count} sessions re-materialized", count=restored)

    def apply_delta(self, session: Session, delta: dict, by: str | None = None) -> None:
        """Take what an image command changed in C{session} (and in C{shared}).

        A change of the image-wide C{shared} namespace is published on the team
        stream as C{shared_changed} {names, by}; C{by} evaluated (None: the owner).
        """
        changed = delta.get("bindings_changed") or {}
        removed = delta.get("bindings_removed") or ()
        for name, binding in changed.items():
            session.bindings[name] = binding
        for name in removed:
            session.bindings.pop(name, None)
        if session.unrestorable and (changed or removed):
            session.unrestorable = [
                u
                for u in session.unrestorable
                if u.get("name") not in changed and u.get("name") not in removed
            ]
        if "variables" in delta:
            self.set_variables(session, delta["variables"])
        for object_id, entry in (delta.get("registry_added") or {}).items():
            session.registry[object_id] = entry
        while len(session.registry) > REGISTRY_LIMIT:
            del session.registry[next(iter(session.registry))]
        if delta.get("next_object_id"):
            session.next_object_id = delta["next_object_id"]
        shared_changed = delta.get("shared_changed") or {}
        shared_removed = delta.get("shared_removed") or ()
        if shared_changed or shared_removed:
            self.view.shared.bindings.update(shared_changed)
            for name in shared_removed:
                self.view.shared.bindings.pop(name, None)
            self.view.shared.dirty = True
            names = sorted({*shared_changed, *shared_removed})
            event_hooks.publish(
                self.view, None, "shared_changed", {"names": names, "by": by or session.client_id}
            )
        self.fit_bindings(session)

    @staticmethod
    def set_variables(session: Session, variables: list) -> None:
        """Take the image's variable list, less what could not be restored.

        The image lists bindings it could not restore too; they are not
        variables of the session (evaluating one is a NameError) and stay in
        C{session.unrestorable} until rebound or deleted.
        """
        gone = {u.get("name") for u in session.unrestorable}
        session.variables = [v for v in variables if v.get("name") not in gone]

    def fit_bindings(self, session: Session) -> None:
        """Demote the largest bindings to unrestorable until the session fits."""
        limit = self.plans.limit(session.client_id, "max_session_bytes")
        while session.encoded_size() > limit:
            # encoded_size just refreshed session.binding_sizes for every binding.
            candidates = [
                (session.binding_sizes[name][1], name)
                for name, b in session.bindings.items()
                if b.get("encoding") in ("json", "pickle")
            ]
            if not candidates:
                break
            _, name = max(candidates)
            old = session.bindings[name]
            session.bindings[name] = {
                "encoding": "unrestorable",
                "type": old.get("type"),
                "repr": clip(old.get("repr"), 200),
                "reason": "too large: the session would exceed max_session_bytes",
            }
            for variable in session.variables:
                if variable.get("name") == name:
                    variable["restorable"] = False

    # ================================================================ for the service

    async def start(self) -> None:
        """At service start: make a stored C{shared} namespace live in the image."""
        if self.image is not None and self.view.shared.bindings:
            await self.ensure_shared(await self.image.current_generation())

    async def snapshot_into(self, session: Session) -> None:
        """Take C{session}'s live namespace into its stored bindings (for save_context)."""
        if not self.is_live(session):
            return
        try:
            snapshot = await self.image.snapshot(
                session.session_id, generation=session.image_generation
            )
        except StuiError as error:
            if error.error_type != "ImageRestarted":
                raise
            # The namespace is gone with its image: what is stored is
            # everything that was acknowledged, and that is what is saved.
            snapshot = {}
        session.bindings = snapshot.get("bindings", session.bindings)
        if "variables" in snapshot:
            self.set_variables(session, snapshot["variables"])
        self.fit_bindings(session)

    async def clear(self, session: Session, image_parts: list, forget: Callable[[], None]) -> None:
        """Clear C{image_parts} of C{session}'s live namespace, then C{forget()} them.

        Under the session's image lock: a rebuild in progress must not bring
        back what is being cleared.
        """
        if not image_parts or self.image is None:
            forget()
            return
        lock = self._image_lock(session.session_id)
        await lock.acquire()
        try:
            if self.is_live(session):
                await self.image.clear(
                    session.session_id, image_parts, generation=session.image_generation
                )
            forget()
        finally:
            self._release_image_lock(session.session_id, lock)

    def drop(self, session_id: str) -> defer.Deferred | None:
        """Forget C{session_id}'s namespace in the image (closed or expired)."""
        if self.image is None:
            return None
        return self.image.drop_session(session_id)

    def status(self) -> dict:
        """The image's status as C{ping} reports it."""
        if self.image is None:
            return {"status": "disabled", "pid": None, "started_at": None}
        return self.image.status()

    # ================================================================ image commands

    def start_evaluation(
        self,
        session: Session,
        code: str,
        mode: str,
        timeout: float | None,
        by: str | None = None,
        *,
        wait: bool = True,
        context=None,
    ) -> RunningEvaluation:
        """Start C{code} in C{session}'s namespace; its history index is assigned now.

        The evaluation runs to its end whatever happens to C{context} (the
        conversation that started it): its outcome becomes a history entry and
        an C{evaluation_finished} event.  A second evaluation of the session
        while one runs waits for it (the image runs one task per session at a
        time) and gets the next index.
        """
        image = self._need_image()
        longest = self.plans.limit(by or session.client_id, "max_eval_timeout")
        if timeout is None:
            timeout = min(self.settings.eval_timeout, longest)
        if timeout <= 0 or timeout > longest:
            raise invalid_parameter(
                "timeout",
                f"must be between 0 and {longest:g} seconds, not {timeout}",
                max_eval_timeout=longest,
            )
        if mode not in ("execute", "display"):
            raise invalid_parameter("mode", f"must be 'execute' or 'display', not {mode[:40]!r}")
        session.history_counter += 1
        run = RunningEvaluation(session, session.history_counter, code, self.now(), by, context)
        self.running.add(run)
        event_hooks.evaluation_started(self.view, session, by, run.index, code)
        run.done = defer.ensureDeferred(self._run_evaluation(run, image, mode, timeout))
        if not wait:
            run.done.addErrback(self._detached_failed, run)
        return run

    async def evaluate(self, session: Session, *arguments, **options) -> EvaluationOutcome:
        """Run C{code} in C{session}'s namespace and record it in the history
        (the arguments of L{start_evaluation}); its outcome."""
        return await self.start_evaluation(session, *arguments, **options).done

    def _detached_failed(self, failure, run: RunningEvaluation) -> None:
        """A C{wait: false} evaluation's failure: its outcome is already in the
        history and the log, so only what is not an outcome is logged."""
        if failure.check(StuiError):
            if failure.value.error_type in ("StorageError", "StateTooLarge", "InternalError"):
                self.log.warn(
                    "evaluation {index} of {sid} (wait: false): {error}",
                    index=run.index,
                    sid=run.session.session_id,
                    error=failure.value.message,
                )
        else:
            self.log.failure(
                "evaluation {index} of {sid} failed",
                failure,
                index=run.index,
                sid=run.session.session_id,
            )

    async def _run_evaluation(self, run: RunningEvaluation, image, mode, timeout):
        session, code, by, index = run.session, run.code, run.by, run.index
        try:
            try:
                outcome = await self._in_image(
                    session,
                    lambda generation: image.evaluate(
                        session.session_id,
                        code,
                        mode,
                        timeout,
                        generation=generation,
                        cell_index=index,
                    ),
                )
            except StuiError as error:
                if run.ended:
                    raise  # the server stopped meanwhile and recorded it
                if error.error_type in ("EvaluationError", "Timeout", "Interrupted"):
                    self.apply_delta(session, error.details, by)
                elif error.error_type == "ImageRestarted":
                    session.materialized = False
                self._history_entry(run, error=error)
                for key in DELTA_KEYS:
                    error.details.pop(key, None)
                error.details["history_index"] = index
                await event_hooks.evaluation_finished(self.view, session, by, index, error=error)
                await self.view.changed(session, "record the evaluation")
                raise
            if run.ended:
                raise StuiError("ImageRestarted", SERVER_STOPPED, history_index=index)
            self.apply_delta(session, outcome, by)
            self._history_entry(run, outcome=outcome)
            await event_hooks.evaluation_finished(self.view, session, by, index, outcome=outcome)
            await self.view.changed(session, "record the evaluation")
        finally:
            self.running.forget(run)
        return EvaluationOutcome(
            session_id=session.session_id,
            result=clip(outcome.get("result"), MAX_RESULT_TEXT),
            result_type=outcome.get("result_type"),
            object_id=outcome.get("object_id"),
            display=clip(outcome.get("display"), MAX_RESULT_TEXT),
            output=outcome.get("output", ""),
            execution_time=outcome.get("execution_time"),
            history_index=index,
        )

    async def stop_running(self) -> list[Session]:
        """The server is stopping: record every evaluation not ended yet as
        stopped (history entry, C{evaluation_finished}); the sessions changed."""
        changed = []
        for run in self.running.all():
            if run.ended:
                continue
            output = self.running.output_so_far(run.session.session_id, run.index)
            error = StuiError("ImageRestarted", SERVER_STOPPED, output=output)
            self._history_entry(run, error=error)
            await event_hooks.evaluation_finished(
                self.view, run.session, run.by, run.index, error=error
            )
            changed.append(run.session)
            run.answer_input({"eof": "the server is stopping"})
        return changed

    def _history_entry(self, run: RunningEvaluation, *, outcome=None, error=None) -> dict:
        """Record C{run}'s outcome in its session's history (once)."""
        run.ended = True
        session, started = run.session, run.started
        entry = {
            "index": run.index,
            "code": clip(run.code),
            "timestamp": iso_timestamp(started),
            "by": run.by or session.client_id,
        }
        if outcome is not None:
            entry.update(
                {
                    "result": clip(outcome.get("result")),
                    "result_type": outcome.get("result_type"),
                    "object_id": outcome.get("object_id"),
                    "ok": True,
                    "output": clip(outcome.get("output", "")),
                    "duration_ms": outcome.get("execution_time"),
                }
            )
        else:
            entry.update(
                {
                    "result": None,
                    "result_type": None,
                    "ok": False,
                    "output": clip(
                        error.details["output"]
                        if "output" in error.details
                        else self.running.output_so_far(session.session_id, run.index)
                    ),
                    "duration_ms": round((self.now() - started) * 1000, 3),
                    "error": {
                        "error_type": error.error_type,
                        "exception_type": error.details.get("exception_type"),
                        "message": clip(error.message, 4096),
                    },
                }
            )
        session.history.append(entry)
        del session.history[: -self.plans.limit(session.client_id, "history_limit")]
        return entry

    @staticmethod
    def check_inspect(object_id: str | None, expression: str | None, limit: int) -> None:
        """Refuse an C{inspect} that names nothing or has a negative C{limit}."""
        if object_id is None and expression is None:
            raise invalid_parameter("object_id", "or 'expression' is required")
        if limit < 0:
            raise invalid_parameter("limit", "must be 0 or more")

    async def inspect(
        self,
        session: Session,
        object_id: str | None,
        expression: str | None,
        limit: int,
        *,
        select: bool = True,
    ) -> Inspection:
        """Look inside an object of C{session}; it becomes the inspector's selection.

        @param select: False for a reader's inspection (access.md §1): the
            session's C{inspector_state} stays as it was.
        """
        self.check_inspect(object_id, expression, limit)
        image = self._need_image()
        try:
            outcome = await self._in_image(
                session,
                lambda generation: image.inspect(
                    session.session_id,
                    object_id=object_id,
                    expression=expression,
                    limit=limit,
                    generation=generation,
                ),
            )
        except StuiError as error:
            if error.error_type == "ObjectNotFound" and object_id in session.registry:
                error.details["registry_entry"] = session.registry[object_id]
            raise
        self.apply_delta(session, outcome)
        selected = outcome.get("object_id")
        if selected and select:
            session.inspector_selected = selected
            session.inspector_history.append(selected)
            del session.inspector_history[:-MAX_INSPECTOR_HISTORY]
        await self.view.changed(session, "record the inspection")
        view = {k: v for k, v in outcome.items() if k not in DELTA_KEYS}
        return Inspection(session.session_id, view)

    async def complete(self, session: Session, code: str, cursor_pos: int | None) -> Completions:
        """Completions of C{code} at C{cursor_pos} (default: its end)."""
        image = self._need_image()
        cursor = len(code) if cursor_pos is None else cursor_pos
        if cursor < 0 or cursor > len(code):
            raise invalid_parameter("cursor_pos", f"must be between 0 and {len(code)}")
        completions = await self._in_image(
            session,
            lambda generation: image.complete(
                session.session_id, code, cursor, generation=generation
            ),
        )
        return Completions(session.session_id, completions)

    async def browse(self, session: Session, operation: str, arguments: dict) -> dict:
        """The image's answer to browse tool C{operation} in C{session}'s namespace."""
        image = self._need_image()
        return await self._in_image(
            session,
            lambda generation: image.browse(
                session.session_id, operation, arguments, generation=generation
            ),
        )

    async def debug(self, session: Session, operation: str, arguments: dict) -> dict:
        """The image's answer to debugger C{operation} on C{session} (debugger.md)."""
        image = self._need_image()
        return await self._in_image(
            session,
            lambda generation: image.debug(
                session.session_id, operation, arguments, generation=generation
            ),
        )

    def debug_event(self, session_id: str, event: str, data: dict) -> None:
        """A session paused or resumed in the debugger: tell its stream."""
        event_hooks.publish(self.view, session_id, event, data)

    async def interrupt(self, session: Session) -> bool:
        """Stop C{session}'s running evaluation; whether one was running."""
        if self.image is None:
            return False
        return bool(await self.image.interrupt(session.session_id))
