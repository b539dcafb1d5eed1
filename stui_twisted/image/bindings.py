"""Bindings: how a value of a session is stored, clipped for display, and restored.

L{serialize_binding} stores a value as JSON when that is exact, else as a
pickle (plain, or cloudpickle for what plain pickle cannot carry, referring to
session definitions by name), else as an honest "unrestorable" record with the
reason; L{deserialize_binding} turns a stored form back into a value (only ever
in the image, and only from files whose MAC verified).  L{safe_repr},
L{result_text} and L{display_text} clip what is shown of a value without
building more than they show where they can.
"""

from __future__ import annotations

import ast
import base64
import collections
import copyreg
import importlib
import io
import json
import math
import os
import pickle
import sys
import types
from typing import TYPE_CHECKING, Any

import cloudpickle

from stui_twisted.protocol.errors import StuiError

if TYPE_CHECKING:
    from stui_twisted.image.workspace import SessionWorkspace

MiB = 1024 * 1024
DEFAULT_MAX_BINDING_BYTES = 8 * MiB
MAX_OUTPUT_CHARS = 1 * MiB
MAX_RESULT_CHARS = 1 * MiB
MAX_ERROR_LINE_CHARS = 4096
SUMMARY_REPR_CHARS = 200
TOO_LARGE = "too large"

CLOUDPICKLE_ENVIRONMENT = "STUI_IMAGE_CLOUDPICKLE"


def cloudpickle_enabled() -> bool:
    """Whether what plain pickle cannot store is tried with cloudpickle."""
    return os.environ.get(CLOUDPICKLE_ENVIRONMENT, "1") != "0"


def stui_error(error_type: str, sentence: str, **details: Any) -> StuiError:
    """A StuiError whose details may include a C{message} key (the exception's own)."""
    error = StuiError(error_type, sentence)
    error.details.update(details)
    return error


def type_name(value: Any) -> str:
    """The short type name used in results (C{int}, C{list}, C{Point})."""
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
    """C{repr(value)} cut to C{limit} characters; never raises for a broken C{__repr__}."""
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
