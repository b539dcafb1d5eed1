"""The image's in-process model: session workspaces around one shared namespace.

A :class:`SessionWorkspace` is one session's global namespace, object registry
and last-stored form of each binding; it runs REPL cells, serializes bindings
(JSON when exact, else pickle, else an honest "unrestorable" record), inspects
and completes.  :class:`Image` holds the workspaces and the one ``shared``
object every session sees.  Nothing here knows about processes, threads or
Twisted (the child adds those), so tests drive it directly.

Failures are raised as :class:`~stui_twisted.protocol.errors.StuiError` with protocol
error types; evaluation failures carry the persistence delta in their details
so bindings changed before an exception are still saved.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import builtins
import collections
import copyreg
import importlib
import inspect as pyinspect
import io
import itertools
import json
import keyword
import linecache
import math
import os
import pickle
import re
import sys
import threading
import time
import traceback
import types
import weakref
from typing import Any

import cloudpickle

from stui_twisted.image.asyncloop import ImageLoop, OutputSink, current_sink
from stui_twisted.image.browse import object_facts
from stui_twisted.image.debugger import SessionDebugger
from stui_twisted.image.help import describe, help_request
from stui_twisted.image.hints import LANGUAGE, smalltalk_hint
from stui_twisted.image.interruption import (
    EvaluationStopped,
    NoGuard,
    TimeLimitReached,
)
from stui_twisted.protocol.errors import StuiError

MiB = 1024 * 1024
DEFAULT_MAX_BINDING_BYTES = 8 * MiB
MAX_OUTPUT_CHARS = 1 * MiB
#: ``result`` and ``display`` text of one evaluation (the server's MAX_RESULT_TEXT).
MAX_RESULT_CHARS = 1 * MiB
#: An exception's own message (``details.message``).
MAX_MESSAGE_CHARS = 64 * 1024
#: The error sentence (``"ValueError: ..."``) and each traceback line.
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
#: one of these at top level (``t = asyncio.create_task(poll())``) runs on the
#: image's loop too, as in ``python -m asyncio``.
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
CLOUDPICKLE_ENVIRONMENT = "STUI_IMAGE_CLOUDPICKLE"


def cloudpickle_enabled() -> bool:
    """Whether what plain pickle cannot store is tried with cloudpickle."""
    return os.environ.get(CLOUDPICKLE_ENVIRONMENT, "1") != "0"


# -- output capture -------------------------------------------------------------------------


class BoundedTextBuffer:
    """Collects text up to a size, then notes how much was dropped."""

    def __init__(self, limit: int = MAX_OUTPUT_CHARS) -> None:
        self._limit = limit
        self._parts: list[str] = []
        self._size = 0
        self._dropped = 0

    def write(self, text: str) -> None:
        room = self._limit - self._size
        if len(text) > room:
            self._dropped += len(text) - max(room, 0)
            text = text[: max(room, 0)]
        if text:
            self._parts.append(text)
            self._size += len(text)

    def getvalue(self) -> str:
        text = "".join(self._parts)
        if self._dropped:
            text += f"\n[output truncated: {self._dropped} more characters]\n"
        return text


_capture_state = threading.local()
_install_lock = threading.Lock()


class ThreadOutputRouter:
    """Stands in for ``sys.stdout``/``sys.stderr``: writes go to the calling
    thread's capture buffer when it has one, else to the real stream.

    Installed once; this is what keeps concurrent sessions' output apart.
    """

    def __init__(self, fallback) -> None:
        self.fallback = fallback

    def write(self, text) -> int:
        buffer = getattr(_capture_state, "buffer", None)
        if buffer is None:
            # a coroutine of a cell (or a task it made) on the image's event loop
            buffer = current_sink.get()
        if buffer is None:
            return self.fallback.write(text)
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        buffer.write(text)
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if getattr(_capture_state, "buffer", None) is None and current_sink.get() is None:
            self.fallback.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name):
        return getattr(self.fallback, name)


def install_output_router() -> None:
    """Route ``sys.stdout``/``sys.stderr`` through :class:`ThreadOutputRouter` (idempotent)."""
    with _install_lock:
        if not isinstance(sys.stdout, ThreadOutputRouter):
            sys.stdout = ThreadOutputRouter(sys.stdout)
        if not isinstance(sys.stderr, ThreadOutputRouter):
            sys.stderr = ThreadOutputRouter(sys.stderr)


class captured_output:
    """Context manager: this thread's stdout/stderr go into ``buffer``."""

    def __init__(self, buffer: BoundedTextBuffer) -> None:
        self._buffer = buffer
        self._previous = None

    def __enter__(self) -> BoundedTextBuffer:
        install_output_router()
        self._previous = getattr(_capture_state, "buffer", None)
        _capture_state.buffer = self._buffer
        return self._buffer

    def __exit__(self, *exc_info) -> None:
        _capture_state.buffer = self._previous


# -- reprs and serialization ----------------------------------------------------------------


def stui_error(error_type: str, sentence: str, **details: Any) -> StuiError:
    """A StuiError whose details may include a ``message`` key (the exception's own)."""
    error = StuiError(error_type, sentence)
    error.details.update(details)
    return error


def type_name(value: Any) -> str:
    """The short type name used in results (``int``, ``list``, ``Point``)."""
    return type(value).__name__


def clip_text(text: str, limit: int, prefix: str = "") -> str:
    """C{prefix + text} cut to at most C{limit} characters, a note of what was cut included.

    The note has the server's form (C{"... [N more characters]"}) and fits
    within C{limit}, so the server's own clipping to the same limit leaves the
    text alone.  Only the kept part of a long C{text} is copied.
    """
    if len(prefix) + len(text) <= limit:
        return prefix + text
    keep = max(limit - len(prefix) - 48, 0)
    return prefix + text[:keep] + f"... [{len(text) - keep} more characters]"


_SEQUENCES = (str, bytes, bytearray)


def _repr_head(value: Any, limit: int) -> str | None:
    """For a str/bytes/bytearray longer than C{limit}: the repr of its first
    C{limit} items, which is where the full repr starts (bar the choice of
    quote), without building the full one (a 400 MB bytearray's repr is 1.6 GB).
    None for anything else."""
    if type(value) in _SEQUENCES and len(value) > limit:
        return repr(value[:limit])
    return None


def safe_repr(value: Any, limit: int | None = SUMMARY_REPR_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters; never raises for a broken ``__repr__``."""
    text = None if limit is None else _repr_head(value, limit)
    if text is None:
        try:
            text = repr(value)
        except Exception as exc:  # noqa: BLE001 - a user __repr__ may raise anything
            text = f"<{type_name(value)} object; repr() failed: {type(exc).__name__}: {exc}>"
    if limit is not None and len(text) > limit:
        text = text[:limit] + "..."
    return text


def result_text(value: Any, limit: int = MAX_RESULT_CHARS) -> str:
    """The C{result} of an evaluation: C{repr(value)} clipped to C{limit} with a note."""
    head = _repr_head(value, limit)
    if head is None:
        return clip_text(safe_repr(value, None), limit)
    unit = "characters" if isinstance(value, str) else "bytes"
    keep = max(limit - 64, 0)
    return head[:keep] + f"... [{len(value)} {unit} in all]"


def display_text(value: Any, limit: int = MAX_RESULT_CHARS) -> str:
    """The C{display} of an evaluation: C{str(value)} clipped to C{limit} with a note."""
    if type(value) is str:
        return clip_text(value, limit)
    if type(value) in _SEQUENCES:
        return result_text(value, limit)  # str() of bytes is their repr
    try:
        text = str(value)
    except Exception as exc:  # noqa: BLE001 - a user __str__ may raise anything
        text = f"<{type_name(value)} object; str() failed: {type(exc).__name__}: {exc}>"
    return clip_text(text, limit)


_JSON_PLAIN = frozenset({type(None), bool, int})
_JSON_NUMBERS = frozenset({bool, int, float})


def _json_shape(value: Any, max_bytes: int) -> bool | None:
    """Whether C{value} is exact JSON (a tree of dicts with str keys, lists,
    str, int, finite float, bool, None), walked without recursion.

    None when its JSON text would surely be over C{max_bytes} (a lower bound
    of the size is added up on the way) or a container occurs twice (shared or
    cyclic: JSON would copy it, pickle keeps it one object); then it is not
    stored as JSON.  Members that are all numbers (or all str) are checked at
    C speed, without a step of the walk each.
    """
    size = 0
    seen: set[int] = set()
    stack = [value]
    pop, push_all = stack.pop, stack.extend
    while stack:
        item = pop()
        kind = type(item)
        if kind is str:
            size += len(item) + 2
        elif kind is int or kind is bool or item is None:
            size += 1
        elif kind is float:
            if not math.isfinite(item):
                return False
            size += 1
        elif kind is list or kind is dict:
            before = len(seen)
            seen.add(id(item))
            if len(seen) == before:
                return None
            size += len(item) + 1
            if kind is dict:
                for key in item:
                    if type(key) is not str:
                        return False
                    size += len(key) + 3
                members = item.values()
            else:
                members = item
            if len(item) < 32:
                push_all(members)
                continue
            kinds = set(map(type, members))
            if kinds <= _JSON_PLAIN:
                size += len(item)
            elif kinds <= _JSON_NUMBERS:
                if not all(map(math.isfinite, members)):
                    return False
                size += len(item)
            elif kinds == {str}:
                size += sum(map(len, members)) + 2 * len(item)
            else:
                push_all(members)
        else:
            return False
        if size > max_bytes:
            return None
    return True


def _reason(exc: BaseException) -> str:
    """Why a value could not be stored (kept in the session: clipped)."""
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001 - a user __str__ may raise anything
        message = "<str() of the exception failed>"
    return clip_text(message, MAX_ERROR_LINE_CHARS, prefix=f"{type(exc).__name__}: ")


class BindingTooLarge(Exception):
    """The stored form of a binding would exceed max_binding_bytes."""


def _too_large_reason(max_bytes: int) -> str:
    return f"{TOO_LARGE}: its stored form would exceed {max_bytes} bytes (the binding limit, max_session_bytes)"


def _surely_larger(value: Any, limit: int) -> bool:
    """A cheap look at a buffer's or string's length, before anything is encoded."""
    if isinstance(value, (bytes, bytearray, str)):
        return len(value) > limit
    if isinstance(value, memoryview):
        return value.nbytes > limit
    return False


def serialize_binding(
    value: Any,
    max_bytes: int = DEFAULT_MAX_BINDING_BYTES,
    workspace: SessionWorkspace | None = None,
    name: str | None = None,
) -> dict:
    """The stored form of one binding (see protocol: json, pickle, module, unrestorable).

    Nothing is built in full when it would be over C{max_bytes}: the summary
    repr is clipped as it is made, JSON is tried only when a walk of the value
    stays under the limit, and the pickle is written into a buffer that gives
    up at the limit.

    C{name} is the binding's name in C{workspace}: a class or function found
    under that name is stored by value, not as a reference to the binding
    itself (C{Pt = namedtuple('Pt', 'x y')} is no def statement to run again).
    """
    kind = type_name(value)
    summary = safe_repr(value)
    if isinstance(value, types.ModuleType):
        return {"encoding": "module", "module": value.__name__, "type": "module", "repr": summary}
    if _json_shape(value, max_bytes):
        try:
            text = json.dumps(value, ensure_ascii=False)
            round_trips = json.loads(text) == value
        except (ValueError, RecursionError):
            round_trips = False
        if round_trips:
            if len(text.encode("utf-8", "surrogatepass")) > max_bytes:
                return _unrestorable(kind, summary, _too_large_reason(max_bytes))
            return {"encoding": "json", "value": value, "type": kind, "repr": summary}
    pickle_limit = max_bytes * 3 // 4  # base64 makes 4 characters of 3 bytes
    if _surely_larger(value, pickle_limit):
        return _unrestorable(kind, summary, _too_large_reason(max_bytes))
    pickler = "pickle"
    try:
        data = _pickle_dumps(value, workspace, pickle_limit, name=name)
        pickle.loads(data)
    except BindingTooLarge:
        return _unrestorable(kind, summary, _too_large_reason(max_bytes))
    except Exception as exc:  # noqa: BLE001 - any pickling failure makes it unrestorable
        if not cloudpickle_enabled():
            return _unrestorable(kind, summary, _reason(exc))
        # lambdas, closures, nested functions and classes, what refers to them
        pickler = "cloudpickle"
        try:
            data = _pickle_dumps(value, workspace, pickle_limit, SessionCloudPickler, name)
            pickle.loads(data)
        except BindingTooLarge:
            return _unrestorable(kind, summary, _too_large_reason(max_bytes))
        except Exception as exc:  # noqa: BLE001 - not even cloudpickle can: unrestorable
            return _unrestorable(kind, summary, _reason(exc))
    encoded = base64.b64encode(data).decode("ascii")
    stored = {"encoding": "pickle", "data": encoded, "type": kind, "repr": summary}
    if pickler != "pickle":
        stored["pickler"] = pickler
    return stored


def _workspace_attribute(module_name: str, qualname: str) -> Any:
    """Unpickling helper: the object a session workspace binds at C{qualname}."""
    target: Any = sys.modules[module_name]
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


class WorkspacePickler(pickle.Pickler):
    """Pickles functions and classes defined in a session's cells by reference.

    Their C{__module__} is C{"__main__"}, which plain pickle would look up in
    the image process's own C{__main__}; this pickler refers to them through
    the workspace's registered module instead (see L{_workspace_attribute}).
    """

    def __init__(self, file, workspace: SessionWorkspace, binding: str | None = None) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._workspace = workspace
        self._binding = binding

    def reducer_override(self, obj: Any) -> Any:  # noqa: N802 - pickle's hook name
        if (
            isinstance(obj, type | types.FunctionType)
            and getattr(obj, "__module__", None) == "__main__"
        ):
            qualname = getattr(obj, "__qualname__", "")
            if (
                "<" not in qualname
                and qualname.partition(".")[0] != self._binding
                and self._workspace.resolve(qualname) is obj
            ):
                return _workspace_attribute, (self._workspace.module_name, qualname)
        return NotImplemented


def _workspace_globals(module_name: str) -> dict:
    """Unpickling helper: the global namespace of a session workspace."""
    return sys.modules[module_name].__dict__


class _WorkspaceGlobals:
    """Stands for a workspace's namespace in a pickle (a dict is never reduced by hook)."""

    def __init__(self, module_name: str) -> None:
        self._module_name = module_name

    def __reduce__(self):
        return _workspace_globals, (self._module_name,)


#: cloudpickle's reducers, less the one that stores an open text file as its
#: contents (it would come back as a different object: an open file is unrestorable).
_CLOUDPICKLE_DISPATCH = collections.ChainMap(
    {
        kind: reducer
        for kind, reducer in cloudpickle.Pickler._dispatch_table.items()
        if kind is not io.TextIOWrapper
    },
    copyreg.dispatch_table,
)


class SessionCloudPickler(cloudpickle.Pickler):
    """cloudpickle, for what plain pickle cannot store (lambdas, closures,
    nested functions and classes), made to fit a session workspace.

    Functions and classes a cell bound at top level still go by reference
    (as with L{WorkspacePickler}); a function whose globals are the session's
    namespace gets that namespace back on restore, not a copy of the globals
    it used, so it keeps seeing the session's live bindings like any function
    written in a cell.
    """

    dispatch_table = _CLOUDPICKLE_DISPATCH

    def __init__(
        self, file, workspace: SessionWorkspace | None, binding: str | None = None
    ) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._workspace = workspace
        self._binding = binding

    def _in_workspace(self, func: Any) -> bool:
        workspace = self._workspace
        return workspace is not None and getattr(func, "__globals__", None) is workspace.namespace

    def reducer_override(self, obj: Any) -> Any:  # noqa: N802 - pickle's hook name
        if self._workspace is not None:
            by_reference = WorkspacePickler.reducer_override(self, obj)
            if by_reference is not NotImplemented:
                return by_reference
        return super().reducer_override(obj)

    def _function_getnewargs(self, func):
        newargs = super()._function_getnewargs(func)
        if self._in_workspace(func):
            code, _, name, defaults, closure = newargs
            return code, _WorkspaceGlobals(self._workspace.module_name), name, defaults, closure
        return newargs

    def _dynamic_function_reduce(self, func):
        reduced = super()._dynamic_function_reduce(func)
        if self._in_workspace(func):
            make, newargs, (state, slotstate), *rest = reduced
            slotstate = dict(slotstate, __globals__={})  # the namespace itself comes back
            reduced = (make, newargs, (state, slotstate), *rest)
        return reduced


class _LimitedBuffer:
    """A write-only file that raises L{BindingTooLarge} past C{limit} bytes.

    The pickler streams its output here frame by frame (and a large buffer
    in one write, without copying it first), so a value too large to store
    costs at most C{limit} bytes of memory to find out.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._size = 0
        self._buffer = io.BytesIO()

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        self._size += size
        if self._size > self._limit:
            raise BindingTooLarge
        return self._buffer.write(data)

    def getvalue(self) -> bytes:
        return self._buffer.getvalue()


def _pickle_dumps(
    value: Any,
    workspace: SessionWorkspace | None,
    limit: int,
    pickler_class=None,
    name: str | None = None,
) -> bytes:
    buffer = _LimitedBuffer(limit)
    if pickler_class is not None:
        pickler_class(buffer, workspace, name).dump(value)
    elif workspace is None:
        pickle.Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    else:
        WorkspacePickler(buffer, workspace, name).dump(value)
    return buffer.getvalue()


def _unrestorable(kind: str, summary: str, reason: str) -> dict:
    return {"encoding": "unrestorable", "type": kind, "repr": summary, "reason": reason}


def deserialize_binding(stored: dict) -> Any:
    """The value of a stored binding; raises ValueError (with the reason) if it cannot be."""
    encoding = stored.get("encoding")
    if encoding == "json":
        return json.loads(json.dumps(stored["value"]))
    if encoding == "pickle":
        return pickle.loads(base64.b64decode(stored["data"]))
    if encoding == "module":
        return importlib.import_module(stored["module"])
    if encoding == "unrestorable":
        raise ValueError(stored.get("reason") or "not restorable")
    if encoding == "source":
        raise ValueError("a definition is restored only inside a session namespace")
    raise ValueError(f"unknown binding encoding {encoding!r}")


#: The order bindings are restored in (lower first).
RESTORE_ORDER = {"module": 0, "json": 0, "source": 1, "pickle": 2}


def _top_level_definitions(tree: ast.Module, code: str) -> list[tuple[str, str, int]]:
    """(name, source, first line) of each top-level C{def}/C{class} of a cell, decorators included."""
    lines = code.splitlines()
    found = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            found.append((node.name, "\n".join(lines[first - 1 : node.end_lineno]) + "\n", first))
    return found


def _definition_place(stored: dict) -> tuple[int, int] | None:
    """(cell, line) where a stored definition was written, when it says so."""
    cell, line = stored.get("cell"), stored.get("line")
    if type(cell) is int and type(line) is int and cell >= 1 and 1 <= line <= 1_000_000:
        return cell, line
    return None


def _run_definition(name: str, source: str, namespace: dict, filename: str | None = None) -> Any:
    """Run a stored C{def}/C{class} statement in C{namespace}; the object it binds.

    C{source} may be preceded by blank lines, so that line numbers are the
    ones of the cell it was written in (C{filename}).
    """
    filename = filename or f"<restored {name}>"
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - the user's own code
    if name not in namespace:
        raise ValueError(f"restoring the definition did not bind {name!r}")
    return namespace[name]


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
    """The one ``shared`` object all sessions of the image see (team collaboration)."""


# -- the image and its sessions -------------------------------------------------------------


class Image:
    """All session workspaces of one image process, plus the ``shared`` object.

    @ivar shared: the L{SharedNamespace} bound as ``shared`` in every session.
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

    def session(self, session_id: str) -> SessionWorkspace:
        """The workspace of ``session_id``, created empty on first use."""
        with self._sessions_lock:
            workspace = self._sessions.get(session_id)
            if workspace is None:
                workspace = self._sessions[session_id] = SessionWorkspace(self, session_id)
            return workspace

    def has_session(self, session_id: str) -> bool:
        """Whether a workspace exists for ``session_id``."""
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
        """Replace the ``shared`` object's attributes with the stored ``bindings``."""
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
        """The registry id of ``value`` (a new ``obj_<n>`` unless already registered)."""
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
        """The live object registered as ``object_id``; ObjectNotFound otherwise."""
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
        body = compile(tree, filename, "exec", flags=CELL_FLAGS)
        names = _code_names(body)
        expression = None
        if last_expression is not None:
            expression = compile(last_expression, filename, "eval", flags=CELL_FLAGS)
            names |= _code_names(expression)
        return body, expression, names, definitions

    def evaluate(
        self, code: str, mode: str = "execute", guard=None, cell_index: int | None = None
    ) -> dict:
        """Run ``code`` as a REPL cell; the result dict, or StuiError with the delta.

        ``cell_index`` is the history index the server will give this
        evaluation; tracebacks call the cell ``<cell N>`` by it.
        """
        guard = guard or NoGuard()
        cell = self._cell_number(cell_index)
        filename = _cell_filename(cell)
        # ``name?`` / ``name??``: the expression is the cell, its description the result
        request = help_request(code)
        help_text = None
        before = dict(self.namespace)
        shared_before = dict(vars(self.image.shared))
        referenced: set[str] = set()
        value = None
        failure: BaseException | None = None
        buffer = BoundedTextBuffer()
        self._note_dropped_background_output(buffer)
        sink = OutputSink(buffer, self._count_dropped_background_output, self._tasks)
        started = time.perf_counter()
        with captured_output(buffer):
            try:
                try:
                    guard.arm()
                    body, expression, referenced, definitions = self._compile_cell(
                        code if request is None else request.expression, filename
                    )
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
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        self.namespace["__builtins__"] = builtins
        self.namespace["shared"] = self.image.shared
        registry_added: dict[str, dict] = {}
        object_id = None
        if help_text is not None:
            value = None  # described, not the cell's value: no ``_``, no registry entry
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
        """The history index this evaluation gets: C{cell_index}, the server's
        C{history_counter + 1} when it sent the request, or one past the
        previous evaluation when that one was still running then (pipelined
        requests of one session run one after the other and each makes a
        history entry)."""
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
        """Describe an object (by registry id, or the value of ``expression``)."""
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
        """Names or attributes that complete the dotted name before ``cursor_pos``."""
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
    """``<cell N|U>``: N the session's history index, U unique in this image."""
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
    """What ``traceback.format_exception_only`` gives, without building a line
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
