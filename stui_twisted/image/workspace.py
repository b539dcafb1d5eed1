"""The image's in-process model: session workspaces around one shared namespace.

A L{SessionWorkspace} is one session's global namespace, object registry
and last-stored form of each binding; it runs REPL cells, serializes bindings
(JSON when exact, else pickle, else an honest "unrestorable" record), inspects
and completes.  L{Image} holds the workspaces and the one C{shared}
object every session sees.  Nothing here knows about processes, threads or
Twisted (the child adds those), so tests drive it directly.

Failures are raised as L{stui_twisted.protocol.errors.StuiError} with protocol
error types; evaluation failures carry the persistence delta in their details
so bindings changed before an exception are still saved.

How values are stored and restored is in L{stui_twisted.image.bindings}, output
capture in L{stui_twisted.image.capture}.  What stays here, about 1,000 lines, is
one job: a session's namespace and the life of its cells (compile, run, delta,
inspect, complete, materialize), which share the same namespace, registry and
stored-bindings state.
"""

from __future__ import annotations

import ast
import asyncio
import builtins
import collections
import inspect as pyinspect
import itertools
import keyword
import linecache
import os
import re
import sys
import threading
import time
import traceback
import types
import weakref
from typing import Any

from stui_twisted.image.asyncloop import ImageLoop, OutputSink
from stui_twisted.image.bindings import (
    RESTORE_ORDER,
    _definition_place,
    _reason,
    _run_definition,
    _top_level_definitions,
    clip_text,
    deserialize_binding,
    display_text,
    result_text,
    safe_repr,
    serialize_binding,
    stui_error,
    type_name,
)
from stui_twisted.image.browse import object_facts
from stui_twisted.image.capture import (
    BoundedTextBuffer,
    ThreadOutputRouter,
    captured_output,
    install_output_router,
)
from stui_twisted.image.debugger import SessionDebugger
from stui_twisted.image.help import describe, help_request
from stui_twisted.image.hints import LANGUAGE, smalltalk_hint
from stui_twisted.image.interruption import (
    EvaluationStopped,
    NoGuard,
    TimeLimitReached,
)
from stui_twisted.image.userinput import answering_input
from stui_twisted.protocol.errors import StuiError

MiB = 1024 * 1024
DEFAULT_MAX_BINDING_BYTES = 8 * MiB
MAX_OUTPUT_CHARS = 1 * MiB
#: C{result} and C{display} text of one evaluation (the server's MAX_RESULT_TEXT).
MAX_RESULT_CHARS = 1 * MiB
#: An exception's own message (C{details.message}).
MAX_MESSAGE_CHARS = 64 * 1024
#: The error sentence (C{"ValueError: ..."}) and each traceback line.
MAX_ERROR_LINE_CHARS = 4096
#: Traceback frames kept: this many from each end of a longer traceback.
TRACEBACK_FRAMES_KEPT = 50
SUMMARY_REPR_CHARS = 200
INSPECT_REPR_CHARS = 2000
TOO_LARGE = "too large"

_THIS_DIRECTORY = os.path.dirname(os.path.abspath(__file__))
_PACKAGE_DIRECTORY = os.path.dirname(_THIS_DIRECTORY)
#: Where the frames between the event loop and an awaited cell's code come from.
_ASYNC_DIRECTORIES = tuple(
    os.path.dirname(os.path.abspath(module.__file__)) + os.sep for module in (asyncio,)
)
#: Compile flags of a cell: top-level C{await}, C{async for} and C{async with} allowed.
CELL_FLAGS = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
#: Names that need a running event loop: a cell that does not await but calls
#: one of these at top level (C{t = asyncio.create_task(poll())}) runs on the
#: image's loop too, as in C{python -m asyncio}.
LOOP_NAMES = frozenset(
    {"create_task", "ensure_future", "get_running_loop", "get_event_loop", "TaskGroup"}
)
CELL_SOURCES_KEPT = 500
#: Registry entries kept per session; the oldest are forgotten first (bounded memory).
REGISTRY_LIMIT = 1000
_cell_numbers = itertools.count(1)
_TRIVIAL_TYPES = (type(None), bool, int, float, complex, str, bytes)
_NOTHING = object()
#: Set to C{0} to store bindings with plain pickle only (measurements: the
#: corpus of benchmarks/bindings_corpus.py before and after, docs/reliability.md).


def is_hidden_name(name: str) -> bool:
    """Names that are part of the workspace machinery, not user bindings."""
    return name == "shared" or (name.startswith("__") and name.endswith("__"))


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            names |= _code_names(constant)
    return names


class SharedNamespace(types.SimpleNamespace):
    """The one C{shared} object all sessions of the image see (team collaboration)."""


# -- the image and its sessions -------------------------------------------------------------


class Image:
    """All session workspaces of one image process, plus the C{shared} object.

    @ivar shared: the L{SharedNamespace} bound as C{shared} in every session.
    """

    def __init__(self, max_binding_bytes: int = DEFAULT_MAX_BINDING_BYTES) -> None:
        self.max_binding_bytes = max_binding_bytes
        self.shared = SharedNamespace()
        self._shared_stored: dict[str, dict] = {}
        self._shared_lock = threading.Lock()
        self._sessions: dict[str, SessionWorkspace] = {}
        self._sessions_lock = threading.Lock()
        #: the event loop of cells that await (started on first use)
        self.loop = ImageLoop()
        #: C{source(session_id, cell, prompt, password, guard) -> text} answers
        #: C{input()} in a cell (the child sets it: it asks the server); None:
        #: C{input()} raises C{EOFError}.
        self.input_source = None

    def session(self, session_id: str) -> SessionWorkspace:
        """The workspace of C{session_id}, created empty on first use."""
        with self._sessions_lock:
            workspace = self._sessions.get(session_id)
            if workspace is None:
                workspace = self._sessions[session_id] = SessionWorkspace(self, session_id)
            return workspace

    def has_session(self, session_id: str) -> bool:
        """Whether a workspace exists for C{session_id}."""
        return session_id in self._sessions

    def drop_session(self, session_id: str) -> bool:
        """Forget a session; answers whether it existed."""
        with self._sessions_lock:
            workspace = self._sessions.pop(session_id, None)
        if workspace is None:
            return False
        workspace.cancel_tasks()
        workspace.forget_module()
        return True

    def materialize_shared(self, bindings: dict[str, dict]) -> dict:
        """Replace the C{shared} object's attributes with the stored C{bindings}."""
        restored, unrestorable = [], []
        values = {}
        for name, stored in sorted(bindings.items()):
            try:
                values[name] = deserialize_binding(stored)
            except Exception as exc:  # noqa: BLE001 - any unpickling failure is reported
                unrestorable.append(
                    {
                        "name": name,
                        "type": stored.get("type", "?"),
                        "reason": _restore_reason(stored, exc),
                    }
                )
            else:
                restored.append(name)
        with self._shared_lock:
            vars(self.shared).clear()
            vars(self.shared).update(values)
            self._shared_stored = {name: bindings[name] for name in restored}
        return {"restored": restored, "unrestorable": unrestorable, "registry_live": []}

    def shared_delta(self, before: dict[str, Any], referenced: set[str]) -> tuple[dict, list]:
        """Serialize the shared attributes a cell may have changed; (changed, removed)."""
        now = dict(vars(self.shared))
        candidates = [
            name
            for name, value in now.items()
            if name not in before or before[name] is not value or name in referenced
        ]
        changed = {}
        with self._shared_lock:
            for name in candidates:
                stored = serialize_binding(now[name], self.max_binding_bytes)
                if self._shared_stored.get(name) != stored:
                    self._shared_stored[name] = stored
                    changed[name] = stored
            removed = sorted(name for name in self._shared_stored if name not in now)
            for name in removed:
                del self._shared_stored[name]
        return changed, removed


def _restore_reason(stored: dict, exc: BaseException) -> str:
    if stored.get("encoding") == "unrestorable":
        return stored.get("reason") or "not restorable"
    return _reason(exc)


class SessionWorkspace:
    """One session's namespace, object registry and stored bindings.

    One evaluation at a time per workspace (the child gives each session one
    worker thread); registry changes are locked because inspection by id may
    run on another thread.
    """

    def __init__(self, image: Image, session_id: str) -> None:
        self.image = image
        self.session_id = session_id
        self.namespace: dict[str, Any] = self._fresh_namespace()
        self.next_object_id = 1
        self._stored: dict[str, dict] = {}
        # name -> the object its _stored form was made from (see _delta)
        self._stored_values: dict[str, Any] = {}
        self._unrestored: dict[str, dict] = {}
        self._registry: dict[str, Any] = {}
        self._registry_meta: dict[str, dict] = {}
        self._id_by_identity: dict[int, str] = {}
        self._registry_lock = threading.RLock()
        self._cell_sources: collections.deque[str] = collections.deque()
        # the history index of the last evaluation (None after a materialize:
        # load_context may take the history back)
        self._last_cell: int | None = None
        # name -> (source of the top-level def/class statement, the object it made,
        # (cell, first line) it was written at or None)
        self._definitions: dict[str, tuple[str, Any, tuple[int, int] | None]] = {}
        # characters background tasks printed after their evaluation answered
        self._background_dropped = 0
        self._background_lock = threading.Lock()
        # the asyncio tasks this session's cells made (cancelled when it is dropped)
        self._tasks: weakref.WeakSet = weakref.WeakSet()
        self.debugger = SessionDebugger(self)
        self.safe_repr = safe_repr  # what the debugger shows of a value

    @property
    def module_name(self) -> str:
        """The importable name of this workspace's module (stable across restarts)."""
        return "stui_workspace_" + re.sub(r"\W", "_", self.session_id)

    def _fresh_namespace(self) -> dict[str, Any]:
        """A new, empty namespace, registered in C{sys.modules} as this workspace.

        Inside, C{__name__} is C{"__main__"} as in any REPL.  The registration
        lets L{WorkspacePickler} refer to functions and classes defined in a
        cell by (workspace, qualified name), so an instance of a class defined
        in the session pickles like any library object.
        """
        module = types.ModuleType(self.module_name)
        module.__dict__.update(
            {"__builtins__": builtins, "__name__": "__main__", "shared": self.image.shared}
        )
        sys.modules[self.module_name] = module
        return module.__dict__

    def resolve(self, qualname: str) -> Any:
        """The object at dotted C{qualname} in the namespace, or None."""
        head, *rest = qualname.split(".")
        target = self.namespace.get(head)
        for part in rest:
            target = getattr(target, part, None)
        return target

    def cancel_tasks(self) -> None:
        """Cancel the asyncio tasks this session's cells made (soon, on the loop)."""
        self.image.loop.cancel_soon(self._tasks)

    def forget_module(self) -> None:
        """Unregister the workspace module (the session was dropped)."""
        if (
            sys.modules.get(self.module_name) is not None
            and sys.modules[self.module_name].__dict__ is self.namespace
        ):
            del sys.modules[self.module_name]

    # -- registry --

    def _binding_name_of(self, value: Any) -> str | None:
        for name, bound in list(self.namespace.items()):
            if bound is value and name != "_" and not is_hidden_name(name):
                return name
        return None

    def register(self, value: Any, added: dict[str, dict]) -> str:
        """The registry id of C{value} (a new C{obj_<n>} unless already registered)."""
        with self._registry_lock:
            known = self._id_by_identity.get(id(value))
            if known is not None and self._registry.get(known) is value:
                return known
            object_id = f"obj_{self.next_object_id}"
            self.next_object_id += 1
            meta = {
                "type": type_name(value),
                "repr": safe_repr(value),
                "live": True,
                "binding": self._binding_name_of(value),
            }
            self._registry[object_id] = value
            self._registry_meta[object_id] = meta
            self._id_by_identity[id(value)] = object_id
            added[object_id] = dict(meta)
            self._forget_oldest_registered()
            return object_id

    def _forget_oldest_registered(self) -> None:
        """Keep at most L{REGISTRY_LIMIT} registry entries (oldest go first)."""
        while len(self._registry_meta) > REGISTRY_LIMIT:
            oldest = next(iter(self._registry_meta))
            del self._registry_meta[oldest]
            value = self._registry.pop(oldest, None)
            if value is not None and self._id_by_identity.get(id(value)) == oldest:
                del self._id_by_identity[id(value)]

    def lookup(self, object_id: str) -> Any:
        """The live object registered as C{object_id}; ObjectNotFound otherwise."""
        with self._registry_lock:
            if object_id in self._registry:
                return self._registry[object_id]
        raise StuiError(
            "ObjectNotFound",
            f"object_id {object_id!r} is not a live object of this session",
            object_id=object_id,
        )

    # -- evaluation --

    def _remember_source(self, code: str, filename: str) -> None:
        """Keep the cell's source for tracebacks (bounded per session)."""
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        self._cell_sources.append(filename)
        while len(self._cell_sources) > CELL_SOURCES_KEPT:
            linecache.cache.pop(self._cell_sources.popleft(), None)

    def _compile_cell(self, code: str, filename: str):
        self._remember_source(code, filename)
        tree = ast.parse(code, filename, mode="exec")
        definitions = _top_level_definitions(tree, code)
        last_expression = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last_expression = ast.Expression(tree.body.pop().value)
        # A cell that is one expression (C{1+1}) has no statements to run
        # before it: no empty module is compiled and run for it.
        body = names = None
        if tree.body or last_expression is None:
            body = compile(tree, filename, "exec", flags=CELL_FLAGS)
            names = _code_names(body)
        expression = None
        if last_expression is not None:
            expression = compile(last_expression, filename, "eval", flags=CELL_FLAGS)
            expression_names = _code_names(expression)
            names = expression_names if names is None else names | expression_names
        return body, expression, names, definitions

    def evaluate(
        self,
        code: str,
        mode: str = "execute",
        guard=None,
        cell_index: int | None = None,
        stream=None,
    ) -> dict:
        """Run C{code} as a REPL cell; the result dict, or StuiError with the delta.

        C{cell_index} is the history index the server will give this
        evaluation; tracebacks call the cell C{<cell N>} by it.  C{stream}
        (an L{stui_twisted.image.streaming.OutputStream}) gets the output
        while the code runs, tagged with that index.
        """
        guard = guard or NoGuard()
        cell = self._cell_number(cell_index)
        self.debugger.cell = cell  # its debug_paused / debug_resumed events name it
        self.debugger.stream = stream  # flushed before them
        if stream is not None:
            stream.history_index = cell
        filename = _cell_filename(cell)
        # C{name?} / C{name??}: the expression is the cell, its description the result
        request = help_request(code)
        help_text = None
        before = dict(self.namespace)
        shared_before = dict(vars(self.image.shared))
        referenced: set[str] = set()
        value = None
        failure: BaseException | None = None
        buffer = BoundedTextBuffer(stream=stream)
        self._note_dropped_background_output(buffer)
        sink = OutputSink(buffer, self._count_dropped_background_output, self._tasks)
        started = time.perf_counter()
        with captured_output(buffer), answering_input(self._input_reader(guard, cell, stream)):
            try:
                try:
                    guard.arm()
                    body, expression, referenced, definitions = self._compile_cell(
                        code if request is None else request.expression, filename
                    )
                    if body is not None:
                        self.debugger.run(lambda: self._run_code(body, guard, sink), guard)
                    self._remember_definitions(definitions, cell)
                    if expression is not None:
                        value = self.debugger.run(
                            lambda: self._run_code(expression, guard, sink), guard
                        )
                    if request is not None:
                        help_text = describe(
                            request.expression,
                            value,
                            request.with_source,
                            self._recorded_source,
                            safe_repr,
                        )
                finally:
                    guard.disarm()
            except BaseException as exc:  # noqa: BLE001 - user code may raise anything
                guard.disarm()
                failure = exc
            finally:
                sink.close()
        buffer.finish()
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        self.namespace["__builtins__"] = builtins
        self.namespace["shared"] = self.image.shared
        registry_added: dict[str, dict] = {}
        object_id = None
        if help_text is not None:
            value = None  # described, not the cell's value: no C{_}, no registry entry
        if failure is None and value is not None:
            self.namespace["_"] = value
            object_id = self.register(value, registry_added)
        delta = self._delta(before, shared_before, referenced, registry_added)
        output = buffer.getvalue()
        self._last_cell = cell  # the server makes a history entry of this outcome
        if failure is not None:
            error = self._failure_error(failure, guard, filename, output, delta)
            if error.error_type == "EvaluationError":
                self.debugger.remember_failure(failure)
            raise error
        if help_text is not None:
            help_text = clip_text(help_text, MAX_RESULT_CHARS)
            return {
                "result": help_text,
                "result_type": "help",
                "object_id": None,
                "display": help_text if mode == "display" else None,
                "output": output,
                "execution_time": round(elapsed_ms, 3),
                "has_error": False,
                **delta,
            }
        return {
            "result": None if value is None else result_text(value),
            "result_type": type_name(value),
            "object_id": object_id,
            "display": display_text(value) if mode == "display" and value is not None else None,
            "output": output,
            "execution_time": round(elapsed_ms, 3),
            "has_error": False,
            **delta,
        }

    def _input_reader(self, guard, cell: int | None, stream=None):
        """What answers C{input()} in this cell: the image's C{input_source}
        (the child asks the server), or end of file when there is none.  The
        output printed before the C{input()} is sent before its request."""

        def ask(prompt: str, password: bool) -> str:
            source = self.image.input_source
            if source is None:
                raise EOFError("input() cannot be answered: no client is attached to this image")
            if stream is not None:
                stream.flush_soon()
            return source(self.session_id, cell, prompt, password, guard)

        return ask

    def _run_code(self, code: types.CodeType, guard, sink: OutputSink) -> Any:
        """Run one compiled part of a cell; a coroutine (the cell awaits) runs
        on the image's event loop while this thread waits, and a stop cancels
        only its task."""
        if code.co_flags & pyinspect.CO_COROUTINE:
            coroutine = eval(code, self.namespace)  # noqa: S307 - running user code is the job
        elif LOOP_NAMES.isdisjoint(code.co_names):
            return eval(code, self.namespace)  # noqa: S307
        else:
            coroutine = _run_on_loop(code, self.namespace)
        awaited = self.image.loop.submit(coroutine, sink)
        with guard.cancelling(awaited.cancel):
            return awaited.result()

    def _recorded_source(self, value: Any) -> str | None:
        """The source of the top-level C{def}/C{class} that made C{value}, if one did."""
        for source, made, _ in list(self._definitions.values()):
            if made is value:
                return source
        return None

    def _count_dropped_background_output(self, characters: int) -> None:
        with self._background_lock:
            self._background_dropped += characters

    def _note_dropped_background_output(self, buffer: BoundedTextBuffer) -> None:
        """Start an evaluation's output with a note of what background tasks
        printed, and was dropped, since the previous evaluation answered."""
        with self._background_lock:
            dropped, self._background_dropped = self._background_dropped, 0
        if dropped:
            buffer.write(
                f"[{dropped} characters printed by background tasks outside any"
                " evaluation were dropped]\n"
            )

    def _cell_number(self, cell_index: int | None) -> int | None:
        """The history index this evaluation gets: C{cell_index}, which the
        server assigns when the evaluation starts (queued ones included), or,
        from a server that numbered a queued evaluation like the one before
        it, one past the previous evaluation."""
        if cell_index is None:
            return None
        cell = int(cell_index)
        if self._last_cell is not None and cell <= self._last_cell:
            cell = self._last_cell + 1
        return cell

    def _failure_error(self, failure, guard, filename, output, delta) -> StuiError:
        stopped = failure if isinstance(failure, EvaluationStopped) else failure.__context__
        if isinstance(stopped, TimeLimitReached):
            limit = f" of {guard.timeout:g} s" if guard.timeout else ""
            return StuiError(
                "Timeout",
                f"the evaluation ran past its time limit{limit} and was stopped",
                timeout=guard.timeout,
                output=output,
                **delta,
            )
        if isinstance(stopped, EvaluationStopped):
            return StuiError(
                "Interrupted", "the evaluation was interrupted", output=output, **delta
            )
        message = _exception_message(failure)
        exception_type = type(failure).__name__
        lines, line = _user_traceback(failure, filename, message)
        hint = smalltalk_hint(failure, "".join(linecache.getlines(filename)))
        return stui_error(
            "EvaluationError",
            clip_text(message, MAX_ERROR_LINE_CHARS, prefix=f"{exception_type}: ") + hint,
            language=LANGUAGE,
            exception_type=exception_type,
            message=clip_text(message, MAX_MESSAGE_CHARS),
            traceback=lines,
            line=line,
            output=output,
            **delta,
        )

    def _delta(self, before, shared_before, referenced, registry_added) -> dict:
        changed_names = [
            name
            for name, value in self.namespace.items()
            if not is_hidden_name(name)
            and (name not in before or before[name] is not value or name in referenced)
        ]
        bindings_changed = {}
        for name in changed_names:
            self._unrestored.pop(name, None)
            value = self.namespace[name]
            if (
                type(value) in _TRIVIAL_TYPES
                and name in self._stored
                and self._stored_values.get(name, _NOTHING) is value
            ):
                continue  # the very object stored last time, and it cannot change
            stored = self._serialize(name, value)
            self._stored_values[name] = value
            if self._stored.get(name) != stored:
                self._stored[name] = stored
                bindings_changed[name] = stored
        bindings_removed = sorted(name for name in self._stored if name not in self.namespace)
        for name in bindings_removed:
            del self._stored[name]
            self._stored_values.pop(name, None)
        self._refresh_registry_bindings(set(changed_names) | set(bindings_removed), registry_added)
        shared_changed, shared_removed = self.image.shared_delta(shared_before, referenced)
        return {
            "bindings_changed": bindings_changed,
            "bindings_removed": bindings_removed,
            "variables": self.variables(),
            "registry_added": registry_added,
            "shared_changed": shared_changed,
            "shared_removed": shared_removed,
            "next_object_id": self.next_object_id,
        }

    def _remember_definitions(
        self, definitions: list[tuple[str, str, int]], cell_index: int | None
    ) -> None:
        """Keep the source of functions/classes this cell defined at top level
        (and where: tracebacks of a restored one then name the same cell)."""
        for name, source, first in definitions:
            if name in self.namespace:
                place = (cell_index, first) if cell_index is not None else None
                self._definitions[name] = (source, self.namespace[name], place)

    def definition_source(self, name: str, value: Any) -> str | None:
        """The source of the top-level C{def}/C{class} C{name} when it made C{value}."""
        definition = self._definitions.get(name)
        return definition[0] if definition is not None and definition[1] is value else None

    def _serialize(self, name: str, value: Any) -> dict:
        """Like L{serialize_binding}, but a function or class that is still the
        object its cell's C{def}/C{class} statement made is stored as that
        statement's source, run again in the namespace on restore (before any
        pickle, so instances of the class unpickle against it)."""
        if name in self._definitions:
            source, made, place = self._definitions[name]
            if (
                made is value
                and len(source.encode("utf-8", "surrogatepass")) <= self.image.max_binding_bytes
            ):
                stored = {
                    "encoding": "source",
                    "source": source,
                    "type": type_name(value),
                    "repr": safe_repr(value),
                }
                if place is not None:
                    stored["cell"], stored["line"] = place
                return stored
        return serialize_binding(value, self.image.max_binding_bytes, workspace=self, name=name)

    def _refresh_registry_bindings(self, touched: set[str], registry_added: dict) -> None:
        """Registry entries whose binding name now means something else lose it."""
        with self._registry_lock:
            for object_id, meta in self._registry_meta.items():
                name = meta.get("binding")
                if name in touched and self.namespace.get(name) is not self._registry.get(
                    object_id
                ):
                    meta["binding"] = None
                    registry_added[object_id] = dict(meta)

    def variables(self) -> list[dict]:
        """Summary of every binding (restorable or not), sorted by name."""
        entries = []
        names = set(self._stored) | set(self._unrestored)
        for name in sorted(names):
            stored = self._stored.get(name) or self._unrestored[name]
            entries.append(
                {
                    "name": name,
                    "type": stored.get("type", "?"),
                    "repr": stored.get("repr", ""),
                    "restorable": name in self._stored and stored["encoding"] != "unrestorable",
                }
            )
        return entries

    # -- persistence --

    def snapshot(self) -> dict:
        """Every binding re-serialized (plus the ones that could not be restored)."""
        fresh, values = {}, {}
        for name, value in list(self.namespace.items()):
            if not is_hidden_name(name):
                fresh[name] = self._serialize(name, value)
                values[name] = value
        self._stored = dict(fresh)
        self._stored_values = values
        bindings = dict(self._unrestored)
        bindings.update(fresh)
        return {"bindings": bindings, "variables": self.variables()}

    def materialize(
        self, bindings: dict[str, dict], registry: dict[str, dict], next_object_id: int, guard=None
    ) -> dict:
        """Replace the namespace and registry with the stored ones (restoring what can be)."""
        guard = guard or NoGuard()
        namespace = self._fresh_namespace()
        restored, unrestorable = [], []
        stored_ok, stored_failed = {}, {}
        buffer = BoundedTextBuffer()
        with captured_output(buffer):
            try:
                guard.arm()
                definitions: dict[str, tuple[str, Any, tuple[int, int] | None]] = {}
                failures: dict[str, BaseException] = {}
                pending = sorted(
                    (
                        (RESTORE_ORDER.get(stored.get("encoding"), 3), name)
                        for name, stored in bindings.items()
                        if not is_hidden_name(name)
                    )
                )
                # Modules and JSON first, then definitions (which may use them),
                # then pickles (which may be instances of those definitions); what
                # failed gets one more pass, for the rarer dependencies.
                for attempt in range(2):
                    names = [name for _, name in pending] if attempt == 0 else list(failures)
                    for name in names:
                        stored = bindings[name]
                        try:
                            if stored.get("encoding") == "source":
                                namespace[name] = self._restore_definition(name, stored, namespace)
                                definitions[name] = (
                                    stored["source"],
                                    namespace[name],
                                    _definition_place(stored),
                                )
                            else:
                                namespace[name] = deserialize_binding(stored)
                        except Exception as exc:  # noqa: BLE001 - any unpickling failure is reported
                            failures[name] = exc
                        else:
                            failures.pop(name, None)
                            stored_ok[name] = stored
                            restored.append(name)
                for name, exc in sorted(failures.items()):
                    stored = bindings[name]
                    stored_failed[name] = stored
                    unrestorable.append(
                        {
                            "name": name,
                            "type": stored.get("type", "?"),
                            "reason": _restore_reason(stored, exc),
                        }
                    )
            finally:
                guard.disarm()
        registry_live = []
        with self._registry_lock:
            self.namespace = namespace
            self._definitions = definitions
            self._last_cell = None
            self._stored = stored_ok
            self._stored_values = {name: namespace[name] for name in stored_ok}
            self._unrestored = stored_failed
            self._registry = {}
            self._registry_meta = {}
            self._id_by_identity = {}
            for object_id, meta in registry.items():
                meta = dict(meta)
                name = meta.get("binding")
                value = namespace.get(name) if name in stored_ok else None
                live = name in stored_ok and type_name(value) == meta.get("type")
                meta["live"] = live
                self._registry_meta[object_id] = meta
                if live:
                    self._registry[object_id] = value
                    self._id_by_identity[id(value)] = object_id
                    registry_live.append(object_id)
            known_numbers = [
                int(object_id[4:]) for object_id in registry if re.fullmatch(r"obj_\d+", object_id)
            ]
            self.next_object_id = max(
                [int(next_object_id), 1] + [number + 1 for number in known_numbers]
            )
        return {
            "restored": restored,
            "unrestorable": unrestorable,
            "registry_live": sorted(registry_live),
        }

    def _restore_definition(self, name: str, stored: dict, namespace: dict) -> Any:
        """Run a stored definition again, under its cell's name and line numbers when known."""
        place = _definition_place(stored)
        if place is None:
            return _run_definition(name, stored["source"], namespace)
        cell, line = place
        filename = _cell_filename(cell)
        text = "\n" * (line - 1) + stored["source"]
        self._remember_source(text, filename)
        return _run_definition(name, text, namespace, filename)

    def clear(self, parts: list[str]) -> dict:
        """Forget the namespace bindings ("variables") and/or registry objects ("registry")."""
        with self._registry_lock:
            if "variables" in parts:
                self.namespace = self._fresh_namespace()
                self._stored = {}
                self._stored_values = {}
                self._unrestored = {}
            if "registry" in parts:
                self._registry = {}
                self._registry_meta = {}
                self._id_by_identity = {}
        return {"cleared": [part for part in ("variables", "registry") if part in parts]}

    # -- inspection --

    def inspect(
        self,
        object_id: str | None = None,
        expression: str | None = None,
        limit: int = 100,
        guard=None,
    ) -> dict:
        """Describe an object (by registry id, or the value of C{expression})."""
        registry_added: dict[str, dict] = {}
        if expression is not None:
            target = self._evaluate_expression(expression, guard or NoGuard())
            object_id = self.register(target, registry_added)
        elif object_id is not None:
            target = self.lookup(object_id)
        else:
            raise StuiError(
                "InvalidRequest",
                "parameter 'object_id' or 'expression' is required",
                parameter="object_id",
            )
        limit = max(int(limit), 0)
        attributes, attributes_truncated = self._attributes_of(target, limit, registry_added)
        items, items_truncated = self._items_of(target, limit, registry_added)
        try:
            size = len(target)
        except Exception:  # noqa: BLE001 - len() of arbitrary objects may raise anything
            size = None
        return {
            "object_id": object_id,
            "class_name": type_name(target),
            "string_representation": safe_repr(target, INSPECT_REPR_CHARS),
            "size": size if isinstance(size, int) else None,
            "attributes": attributes,
            "items": items,
            "truncated": attributes_truncated or items_truncated,
            **object_facts(target),
            "registry_added": registry_added,
            "next_object_id": self.next_object_id,
        }

    def _evaluate_expression(self, expression: str, guard) -> Any:
        filename = "<inspect>"
        buffer = BoundedTextBuffer(64 * 1024)
        with captured_output(buffer):
            try:
                try:
                    guard.arm()
                    linecache.cache[filename] = (
                        len(expression),
                        None,
                        expression.splitlines(True),
                        filename,
                    )
                    code = compile(expression, filename, "eval")
                    return eval(code, self.namespace)  # noqa: S307 - inspecting user expressions
                finally:
                    guard.disarm()
            except BaseException as exc:  # noqa: BLE001 - user code may raise anything
                guard.disarm()
                raise self._failure_error(exc, guard, filename, buffer.getvalue(), {}) from None

    def _describe_child(self, value: Any, registry_added: dict) -> dict:
        child_id = (
            None if isinstance(value, _TRIVIAL_TYPES) else self.register(value, registry_added)
        )
        return {"type": type_name(value), "repr": safe_repr(value), "object_id": child_id}

    def _attributes_of(self, target: Any, limit: int, registry_added: dict) -> tuple[list, bool]:
        try:
            instance_dict = vars(target)
        except TypeError:
            instance_dict = None
        if instance_dict is not None:
            names = [name for name in list(instance_dict) if isinstance(name, str)]
        else:
            names = [name for name in dir(target) if not callable(getattr(target, name, None))]
        names = sorted(
            name for name in names if not (name.startswith("__") and name.endswith("__"))
        )
        attributes = []
        for name in names[:limit]:
            try:
                value = instance_dict[name] if instance_dict is not None else getattr(target, name)
            except Exception:  # noqa: BLE001 - a failing attribute is skipped, not fatal
                continue
            attributes.append({"name": name, **self._describe_child(value, registry_added)})
        return attributes, len(names) > limit

    def _items_of(self, target: Any, limit: int, registry_added: dict) -> tuple[list, bool]:
        if isinstance(target, dict):
            pairs = list(target.items())
        elif isinstance(target, (list, tuple)):
            pairs = list(enumerate(target))
        elif isinstance(target, (set, frozenset)):
            pairs = list(enumerate(target))
        else:
            return [], False
        items = []
        for key, value in pairs[:limit]:
            key_json = (
                key if isinstance(key, (str, int)) and not isinstance(key, bool) else safe_repr(key)
            )
            items.append({"key": key_json, **self._describe_child(value, registry_added)})
        return items, len(pairs) > limit

    # -- completion --

    _DOTTED_TAIL = re.compile(r"((?:[A-Za-z_]\w*\.)*)([A-Za-z_]\w*)?$")

    def complete(self, code: str, cursor_pos: int | None = None) -> dict:
        """Names or attributes that complete the dotted name before C{cursor_pos}."""
        if cursor_pos is None or cursor_pos > len(code):
            cursor_pos = len(code)
        cursor_pos = max(cursor_pos, 0)
        before_cursor = code[:cursor_pos]
        match = self._DOTTED_TAIL.search(before_cursor)
        path = match.group(1) if match else ""
        prefix = (match.group(2) if match else "") or ""
        if match and before_cursor[: match.start()].endswith("."):
            candidates = set()  # an attribute of a call or literal: never evaluated
        elif path:
            candidates = self._attribute_names(path[:-1].split("."))
        else:
            candidates = set(self.namespace) | set(dir(builtins)) | set(keyword.kwlist) | {"shared"}
            candidates = {name for name in candidates if name != "__builtins__"}
        if not prefix.startswith("_"):
            candidates = {name for name in candidates if not name.startswith("_")}
        matches = sorted(name for name in candidates if name.startswith(prefix))
        return {
            "matches": matches,
            "cursor_start": cursor_pos - len(prefix),
            "cursor_end": cursor_pos,
        }

    def _attribute_names(self, parts: list[str]) -> set[str]:
        head, *rest = parts
        if head in self.namespace:
            target = self.namespace[head]
        elif hasattr(builtins, head):
            target = getattr(builtins, head)
        else:
            return set()
        for part in rest:
            try:
                target = pyinspect.getattr_static(target, part)
            except AttributeError:
                return set()
        try:
            return set(dir(target))
        except Exception:  # noqa: BLE001 - a user __dir__ may raise anything
            return set()


#: An evaluation's internal cell filename (unique in the image, since linecache
#: is image-wide) and the name users see, the session's history index.
_CELL_FILENAME = re.compile(r"<cell (\d+)\|\d+>")


async def _run_on_loop(code: types.CodeType, namespace: dict) -> Any:
    """Run a cell's code that does not await, on the event loop (see L{LOOP_NAMES})."""
    return eval(code, namespace)  # noqa: S307 - running user code is the job


def _cell_filename(cell_index: int | None) -> str:
    """C{<cell N|U>}: N the session's history index, U unique in this image."""
    unique = next(_cell_numbers)
    if cell_index is None:
        return f"<cell {unique}>"
    return f"<cell {int(cell_index)}|{unique}>"


def _exception_message(failure: BaseException) -> str:
    if isinstance(failure, SyntaxError):
        return str(failure.msg)
    try:
        return str(failure)
    except Exception as exc:  # noqa: BLE001 - a user __str__ may raise anything
        return f"<str() of the exception failed: {type(exc).__name__}>"


def _exception_lines(failure: BaseException, message: str) -> list[str]:
    """What C{traceback.format_exception_only} gives, without building a line
    around a message too long to be shown whole."""
    if isinstance(failure, SyntaxError) or len(message) <= MAX_ERROR_LINE_CHARS:
        return traceback.format_exception_only(type(failure), failure)
    kind = type(failure)
    name = kind.__qualname__
    if kind.__module__ not in ("__main__", "builtins"):
        name = f"{kind.__module__}.{name}"
    lines = [clip_text(message, MAX_ERROR_LINE_CHARS, prefix=f"{name}: ")]
    notes = getattr(failure, "__notes__", None)
    if isinstance(notes, list | tuple):
        lines.extend(
            safe_repr(note, MAX_ERROR_LINE_CHARS) if not isinstance(note, str) else note
            for note in notes
        )
    return lines


def _user_traceback(
    failure: BaseException, filename: str, message: str
) -> tuple[list[str], int | None]:
    """Traceback lines without the workspace's own frames, and the cell's failing line.

    Bounded: the first and last L{TRACEBACK_FRAMES_KEPT} frames, each line
    (the exception's included) clipped to L{MAX_ERROR_LINE_CHARS}; cells are
    named by their history index.
    """
    frames = [
        frame
        for frame in traceback.extract_tb(failure.__traceback__)
        if not os.path.abspath(frame.filename).startswith(_PACKAGE_DIRECTORY + os.sep)
    ]
    # What ran before the first frame of the user's code is the image's machinery
    # (the compile in ast.parse of a SyntaxError, say): cells, restored
    # definitions and inspected expressions all have "<...>" file names.
    first_user = next(
        (index for index, frame in enumerate(frames) if frame.filename.startswith("<")),
        len(frames),
    )
    frames = frames[first_user:]
    # an awaited cell: the worker's wait and the loop's task step come first
    while frames and os.path.abspath(frames[0].filename).startswith(_ASYNC_DIRECTORIES):
        del frames[0]
    line = None
    for frame in frames:
        if frame.filename == filename:
            line = frame.lineno
    if isinstance(failure, SyntaxError) and failure.filename == filename:
        line = failure.lineno
    entries = []
    if frames:
        entries.append("Traceback (most recent call last):")
        parts = [frames]
        omitted = len(frames) - 2 * TRACEBACK_FRAMES_KEPT
        if omitted > 0:
            parts = [frames[:TRACEBACK_FRAMES_KEPT], frames[-TRACEBACK_FRAMES_KEPT:]]
        for number, part in enumerate(parts):
            if number:
                entries.append(f"  [... {omitted} frames omitted ...]")
            entries.extend(traceback.format_list(part))
    entries.extend(_exception_lines(failure, message))
    lines = []
    for entry in entries:
        for text in entry.rstrip("\n").split("\n"):
            lines.append(_CELL_FILENAME.sub(r"<cell \1>", clip_text(text, MAX_ERROR_LINE_CHARS)))
    return lines, line


__all__ = [
    "BoundedTextBuffer",
    "Image",
    "SessionWorkspace",
    "SharedNamespace",
    "ThreadOutputRouter",
    "captured_output",
    "deserialize_binding",
    "install_output_router",
    "safe_repr",
    "serialize_binding",
]
