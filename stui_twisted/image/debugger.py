"""A per-session debugger (debugger.md): pauses one session's evaluation thread only.

Tracing is installed with C{sys.settrace} on the session's own worker thread,
and only for an evaluation that starts while the session has breakpoints (a
session without breakpoints runs with no tracer at all).  A hit parks the
worker thread inside the trace function, waiting on a queue; the debug
commands arrive from the image's thread pool (never through the session's
worker lane, which is the paused thread) and are run by the paused thread
itself, so evaluating in a frame sees and can change its locals.

Post-mortem keeps the frames of the session's last failed evaluation; those
are dead frames, examined directly on the pool thread.
"""

from __future__ import annotations

import _thread
import ctypes
import dis
import importlib
import inspect
import os
import queue
import sys
import threading
import types
import weakref
from typing import Any

import stui_twisted
from stui_twisted.protocol.errors import StuiError

#: Frames of files under this directory are the server's, never shown or stopped in.
_PACKAGE_DIR = os.path.dirname(os.path.abspath(stui_twisted.__file__)) + os.sep
#: How long a debug command waits for the paused thread to answer.
COMMAND_TIMEOUT = 30.0
#: How often a paused thread looks whether it was asked to stop.
POLL_INTERVAL = 0.05
STEP_MODES = ("into", "over", "out")
#: Where C{debug_paused} / C{debug_resumed} go: C{event_sink(session_id, event, data)},
#: called on the paused (or a pool) thread; the image child sets it.
event_sink = None
#: The debugger of the evaluation running on each traced thread (thread id -> debugger).
_RUNNING: dict[int, SessionDebugger] = {}


def _is_user_frame(frame) -> bool:
    filename = frame.f_code.co_filename
    return not filename.startswith(_PACKAGE_DIR) and filename != threading.__file__


def _code_line(frame) -> str:
    import linecache

    return linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()


def _frame_info(index: int, frame, lineno: int | None = None) -> dict:
    return {
        "index": index,
        "file": frame.f_code.co_filename,
        "line": frame.f_lineno if lineno is None else lineno,
        "function": frame.f_code.co_name,
        "code_line": _code_line(frame),
    }


def _unwrapped(target: Any) -> Any:
    target = getattr(target, "__func__", target)
    while hasattr(target, "__wrapped__"):
        target = target.__wrapped__
    return target


def _code_of(target: Any) -> types.CodeType | None:
    code = getattr(_unwrapped(target), "__code__", None)
    return code if isinstance(code, types.CodeType) else None


#: Code flags of functions whose frames suspend (a hook sees only their first start).
_SUSPENDING = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR


def _last_line(code: types.CodeType) -> int:
    """The last line of C{code} and of the code nested in it."""
    last = max((line for _, _, line in code.co_lines() if line is not None), default=0)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            last = max(last, _last_line(const))
    return last


def _namespace_functions(namespace: dict):
    """The functions bound in C{namespace}, and those of the classes bound there."""
    seen: set[int] = set()
    for value in list(namespace.values()):
        members = list(vars(value).values()) if isinstance(value, type) else [value]
        for member in members:
            if isinstance(member, property):
                candidates = [member.fget, member.fset, member.fdel]
            else:
                candidates = [_unwrapped(member)]
            for function in candidates:
                if isinstance(function, types.FunctionType) and id(function) not in seen:
                    seen.add(id(function))
                    yield function


def _locals_to_fast(frame) -> None:
    """Write a frame's C{f_locals} dict back into its fast locals (CPython 3.11)."""
    ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(frame), ctypes.c_int(0))


# -- entry hooks: a function breakpoint without tracing ------------------------
#
# On CPython 3.11 any tracer set on a thread (sys.settrace) slows all of its
# code down, even frames the tracer declines: a call-heavy loop runs ~6x
# slower.  So a function breakpoint is not found by tracing: while the
# session evaluates, the breakpoint's function gets a copy of its code with a
# call of _entry_hook in front; the hook looks whether its thread is a
# debugged evaluation and only then turns tracing on, for that frame.  Code
# that never calls a breakpoint's function runs untraced.

#: Entry hooks need CPython 3.11's bytecode; elsewhere the tracer finds the calls.
HOOKS_SUPPORTED = sys.implementation.name == "cpython" and sys.version_info[:2] == (3, 11)
_patch_lock = threading.Lock()
#: id(function) -> [function, its own code, the hooked code, how many runs use it]
_patches: dict[int, list] = {}
_hooked_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _entry_hook() -> None:
    """Called first by a hooked function: stop there if this thread is debugged."""
    debugger = _RUNNING.get(_thread.get_ident())
    if debugger is not None:
        debugger._entered(sys._getframe(1))


def _varint(out: bytearray, value: int) -> None:
    while value >= 64:
        out.append(0x40 | (value & 63))
        value >>= 6
    out.append(value)


def _svarint(out: bytearray, value: int) -> None:
    _varint(out, (-value << 1) | 1 if value < 0 else value << 1)


def _encode_positions(positions: list, firstlineno: int) -> bytes:
    """CPython 3.11's C{co_linetable} for one position per code unit."""
    out = bytearray()
    line = firstlineno
    at = 0
    while at < len(positions):
        position = positions[at]
        count = 1
        while count < 8 and at + count < len(positions) and positions[at + count] == position:
            count += 1
        start, end, column, end_column = position
        if start is None:
            out.append(0x80 | (15 << 3) | (count - 1))
        elif column is None or end_column is None or end is None or end < start:
            out.append(0x80 | (13 << 3) | (count - 1))
            _svarint(out, start - line)
            line = start
        else:
            out.append(0x80 | (14 << 3) | (count - 1))
            _svarint(out, start - line)
            _varint(out, end - start)
            _varint(out, column + 1)
            _varint(out, end_column + 1)
            line = start
        at += count
    return bytes(out)


def _except_varint(out: bytearray, value: int, first: int) -> None:
    chunks = [value & 63]
    value >>= 6
    while value:
        chunks.append(value & 63)
        value >>= 6
    chunks.reverse()
    for index, chunk in enumerate(chunks):
        out.append(chunk | (0x40 if index < len(chunks) - 1 else 0) | (first if index == 0 else 0))


def _shifted_exception_table(code: types.CodeType, at: int, size: int) -> bytes:
    """C{co_exceptiontable} with C{size} bytes of code inserted at byte offset C{at}."""
    out = bytearray()
    for entry in dis._parse_exception_table(code):
        start = entry.start + size if entry.start >= at else entry.start
        end = entry.end + size if entry.end > at else entry.end
        target = entry.target + size if entry.target >= at else entry.target
        _except_varint(out, start // 2, 0x80)
        _except_varint(out, (end - start) // 2, 0)
        _except_varint(out, target // 2, 0)
        _except_varint(out, (entry.depth << 1) | int(entry.lasti), 0)
    return bytes(out)


def _instruction(name: str, argument: int = 0) -> bytes:
    opcode = dis.opmap[name]
    caches = dis._inline_cache_entries[opcode]
    return bytes((opcode, argument)) + b"\0\0" * caches


def _hooked_code(code: types.CodeType) -> types.CodeType | None:
    """C{code} calling L{_entry_hook} right after its C{RESUME} (3.11), or None."""
    cached = _hooked_cache.get(code)
    if cached is not None:
        return cached
    raw = code.co_code
    resume = dis.opmap["RESUME"]
    at = next((i for i in range(0, len(raw), 2) if raw[i] == resume), None)
    index = len(code.co_consts)
    if at is None or index > 0xFFFF:
        return None
    at += 2
    load = _instruction("LOAD_CONST", index & 0xFF)
    if index > 0xFF:
        load = _instruction("EXTENDED_ARG", index >> 8) + load
    inserted = (
        _instruction("PUSH_NULL")
        + load
        + _instruction("PRECALL")
        + _instruction("CALL")
        + _instruction("POP_TOP")
    )
    positions = list(code.co_positions())
    units = at // 2
    positions[units:units] = [(None, None, None, None)] * (len(inserted) // 2)
    hooked = code.replace(
        co_code=raw[:at] + inserted + raw[at:],
        co_consts=code.co_consts + (_entry_hook,),
        co_stacksize=max(code.co_stacksize, 2),
        co_linetable=_encode_positions(positions, code.co_firstlineno),
        co_exceptiontable=_shifted_exception_table(code, at, len(inserted)),
    )
    _hooked_cache[code] = hooked
    return hooked


def _hook(function: types.FunctionType) -> types.CodeType | None:
    """Give C{function} its hooked code (shared by every run that needs it)."""
    with _patch_lock:
        entry = _patches.get(id(function))
        if entry is not None and entry[0] is function:
            entry[3] += 1
            return entry[2]
        original = function.__code__
        try:
            hooked = _hooked_code(original)
            if hooked is None:
                return None
            function.__code__ = hooked
        except (TypeError, ValueError, AttributeError):
            return None
        _patches[id(function)] = [function, original, hooked, 1]
        return hooked


def _unhook(function: types.FunctionType) -> None:
    """Give C{function} its own code back once no run needs the hook."""
    with _patch_lock:
        entry = _patches.get(id(function))
        if entry is None or entry[0] is not function:
            return
        entry[3] -= 1
        if entry[3] == 0:
            del _patches[id(function)]
            if function.__code__ is entry[2]:
                function.__code__ = entry[1]


class _Pause:
    """Where a session is stopped: live (a thread waits) or post-mortem (dead frames)."""

    def __init__(self, frames: list, reason: str, breakpoint_id: str | None, live: bool):
        self.frames = frames  # [(frame, lineno)], innermost first
        self.reason = reason
        self.breakpoint_id = breakpoint_id
        self.live = live
        self.commands: queue.SimpleQueue = queue.SimpleQueue()


class SessionDebugger:
    """Breakpoints, the tracer and the paused state of one session workspace."""

    def __init__(self, workspace) -> None:
        self.workspace = workspace
        self._lock = threading.RLock()
        self.breakpoints: dict[str, dict] = {}
        self._next_id = 1
        self._pause: _Pause | None = None
        self._post_mortem: list | None = None  # frames of the last failure
        self._post_mortem_cell: int | None = None
        #: the history index of the running evaluation (the workspace sets it)
        self.cell: int | None = None
        #: its output stream (the workspace sets it), flushed before each event
        self.stream = None
        # tracer state (worker thread only)
        self._codes: dict[types.CodeType, str] = {}  # found by the tracer
        self._hooked: dict[types.CodeType, str] = {}  # found by their entry hook
        self._needs_trace = False  # a tracer from the start (file breakpoints)
        self._watched: set[int] = set()  # frames of hooked functions holding a breakpoint line
        self._tracing = False
        self._entering: dict[int, str] = {}
        self._step: str | None = None
        self._step_frame = None
        self._guard = None
        self._has_files = False

    # -- breakpoints (any thread) --

    def _target(self, name: str) -> Any:
        """What a function breakpoint's name means now (unwrapped), or None."""
        target = self.workspace.resolve(name)
        if _code_of(target) is None and "." in name:
            module_name, _, attribute = name.rpartition(".")
            try:
                module: Any = importlib.import_module(module_name)
            except Exception:  # noqa: BLE001 - not a module path: unresolved
                return None
            target = getattr(module, attribute, None)
        return _unwrapped(target) if _code_of(target) is not None else None

    def _resolve(self, name: str) -> types.CodeType | None:
        return _code_of(self._target(name))

    def set_breakpoint(self, arguments: dict) -> dict:
        function = arguments.get("function")
        file = arguments.get("file")
        line = arguments.get("line")
        condition = arguments.get("condition")
        if condition:
            try:
                compile(condition, "<condition>", "eval")
            except SyntaxError as exc:
                raise StuiError(
                    "InvalidParameter", f"condition is not an expression: {exc.msg}"
                ) from None
        with self._lock:
            breakpoint_id = arguments.get("breakpoint_id") or f"bp_{self._next_id}"
            number = int(breakpoint_id[3:]) if breakpoint_id[3:].isdigit() else 0
            self._next_id = max(self._next_id, number + 1)
            entry = {
                "breakpoint_id": breakpoint_id,
                "function": function,
                "file": file,
                "line": line,
                "condition": condition or None,
                "hits": int(arguments.get("hits") or 0),
            }
            self.breakpoints[breakpoint_id] = entry
            return self._described(entry)

    def _verified(self, entry: dict) -> bool:
        if entry["function"]:
            return self._resolve(entry["function"]) is not None
        file = entry["file"]
        if file.startswith("cell:"):
            return True
        return os.path.exists(file)

    def _described(self, entry: dict) -> dict:
        return dict(entry, verified=self._verified(entry))

    def remove_breakpoint(self, breakpoint_id: str) -> dict:
        with self._lock:
            return {"removed": self.breakpoints.pop(breakpoint_id, None) is not None}

    def list_breakpoints(self) -> dict:
        with self._lock:
            return {"breakpoints": [self._described(e) for e in self.breakpoints.values()]}

    def restore(self, breakpoints: list[dict]) -> None:
        """Take back the breakpoints stored with the session (after materialize)."""
        with self._lock:
            self.breakpoints.clear()
            for entry in breakpoints or []:
                self.set_breakpoint(entry)

    # -- running a cell (worker thread) --

    def wants_trace(self) -> bool:
        return bool(self.breakpoints)

    def _cell_functions(self, number: str, line: int) -> list[types.FunctionType] | None:
        """The session's functions written in cell C{number} whose code spans C{line}
        (methods included), or None when the line is not inside such a function
        (a cell's top level, a generator: then only the tracer finds it)."""
        found = []
        for function in _namespace_functions(self.workspace.namespace):
            code = function.__code__
            filename = code.co_filename
            if filename != f"<cell {number}>" and not filename.startswith(f"<cell {number}|"):
                continue
            if code.co_firstlineno <= line <= _last_line(code):
                if code.co_flags & _SUSPENDING:
                    return None
                found.append(function)
        return found or None

    def _hook_breakpoints(self, hooked_functions: list) -> None:
        """Fill C{_codes}/C{_hooked} for this run; hook what can be hooked."""
        self._codes = {}
        self._hooked = {}
        self._needs_trace = False

        def hook(function, breakpoint_id):
            hooked = _hook(function) if HOOKS_SUPPORTED else None
            if hooked is None:
                return False
            hooked_functions.append(function)
            if self._hooked.get(hooked) is None:  # a function breakpoint wins
                self._hooked[hooked] = breakpoint_id
            return True

        for entry in self.breakpoints.values():
            if entry["function"]:
                target = self._target(entry["function"])
                if isinstance(target, types.FunctionType) and hook(target, entry["breakpoint_id"]):
                    continue
                if target is not None:
                    self._codes[_code_of(target)] = entry["breakpoint_id"]
                continue
            # a file or cell line: hook the functions around it, else trace throughout
            functions = None
            if entry["file"].startswith("cell:") and isinstance(entry["line"], int):
                functions = self._cell_functions(entry["file"][5:], entry["line"])
            if not functions or not all([hook(function, None) for function in functions]):
                self._needs_trace = True
        self._has_files = any(entry["file"] for entry in self.breakpoints.values())
        self._needs_trace = self._needs_trace or bool(self._codes)

    def run(self, run, guard):
        """Call C{run()} watched for this session's breakpoints, if it has any.

        Function breakpoints, and cell lines inside a function, get entry
        hooks (no tracer until a hooked function is entered on this thread);
        other file and cell lines, and functions that cannot be hooked, need
        the tracer from the start.
        """
        self._post_mortem = None
        self._end_post_mortem()
        if not self.breakpoints:
            return run()
        hooked_functions: list = []
        with self._lock:
            self._hook_breakpoints(hooked_functions)
        self._guard = guard
        self._step = None
        self._step_frame = None
        self._entering = {}
        self._watched = set()
        thread = _thread.get_ident()
        _RUNNING[thread] = self
        self._tracing = self._needs_trace
        if self._tracing:
            sys.settrace(self._trace_call)
        try:
            return run()
        finally:
            sys.settrace(None)
            self._tracing = False
            _RUNNING.pop(thread, None)
            for function in hooked_functions:
                _unhook(function)
            self._step = None
            self._step_frame = None
            self._guard = None

    def _entered(self, frame) -> None:
        """A hooked function started on this session's thread: trace that frame."""
        code = frame.f_code
        if code not in self._hooked:
            return
        breakpoint_id = self._hooked[code]
        if breakpoint_id is not None:
            self._entering[id(frame)] = breakpoint_id
        else:
            self._watched.add(id(frame))  # holds a breakpoint line: trace it to its end
        frame.f_trace = self._trace_local
        if not self._tracing:
            self._tracing = True
            sys.settrace(self._trace_call)

    def _emit(self, event: str, data: dict) -> None:
        sink = event_sink
        if sink is not None:
            if self.stream is not None:
                self.stream.flush_soon()  # what it printed before goes first
            sink(self.workspace.session_id, event, data)

    def _emit_paused(self, pause: _Pause, history_index: int | None) -> None:
        frame, lineno = pause.frames[0]
        info = _frame_info(0, frame, lineno)
        del info["index"]
        data = {
            "history_index": history_index,
            "reason": pause.reason,
            "breakpoint_id": pause.breakpoint_id,
            "frame": info,
        }
        self._emit("debug_paused", data)

    def _emit_resumed(self, history_index: int | None, action: str, mode=None) -> None:
        data = {"history_index": history_index, "action": action, "mode": mode}
        self._emit("debug_resumed", data)

    def _end_post_mortem(self) -> None:
        """A new evaluation ends the look at the last one's failure (debugger.md §3)."""
        with self._lock:
            pause = self._pause
            if pause is None or pause.live:
                return
            self._pause = None
        self._emit_resumed(self._post_mortem_cell, "evaluation")

    def remember_failure(self, failure: BaseException) -> None:
        """Keep the frames of a failed evaluation for post-mortem."""
        frames = []
        tb = failure.__traceback__
        while tb is not None:
            if _is_user_frame(tb.tb_frame):
                frames.append((tb.tb_frame, tb.tb_lineno))
            tb = tb.tb_next
        frames.reverse()
        self._post_mortem = frames or None
        self._post_mortem_cell = self.cell

    def _file_breakpoint(self, frame) -> str | None:
        filename = frame.f_code.co_filename
        for entry in list(self.breakpoints.values()):
            file = entry["file"]
            if not file or entry["line"] != frame.f_lineno:
                continue
            if file.startswith("cell:"):
                number = file[5:]
                if filename != f"<cell {number}>" and not filename.startswith(f"<cell {number}|"):
                    continue
            elif os.path.abspath(file) != filename:
                continue
            return entry["breakpoint_id"]
        return None

    def _has_file_breakpoints(self, frame) -> bool:
        filename = frame.f_code.co_filename
        for entry in list(self.breakpoints.values()):
            file = entry["file"]
            if not file:
                continue
            if file.startswith("cell:"):
                if filename.startswith(f"<cell {file[5:]}|") or filename == f"<cell {file[5:]}>":
                    return True
            elif os.path.abspath(file) == filename:
                return True
        return False

    def _trace_call(self, frame, event, arg):
        # the global tracer sees only "call" events; the common case (a call
        # that is no breakpoint's, no file breakpoint, not stepping) is one
        # dict lookup and two attribute reads
        breakpoint_id = self._codes.get(frame.f_code)
        if breakpoint_id is not None:
            self._entering[id(frame)] = breakpoint_id
            return self._trace_local
        if self._step != "into" and not self._has_files:
            return None
        if not _is_user_frame(frame):
            return None
        if self._step == "into" or self._has_file_breakpoints(frame):
            return self._trace_local
        return None

    def _condition_holds(self, breakpoint_id: str, frame) -> bool:
        entry = self.breakpoints.get(breakpoint_id)
        if entry is None:
            return False
        if entry["condition"]:
            try:
                holds = bool(eval(entry["condition"], frame.f_globals, frame.f_locals))  # noqa: S307
            except Exception:  # noqa: BLE001 - pdb stops when a condition fails
                holds = True
            if not holds:
                return False
        entry["hits"] += 1
        return True

    def _trace_local(self, frame, event, arg):
        if event == "line":
            breakpoint_id = self._entering.pop(id(frame), None) or self._file_breakpoint(frame)
            if breakpoint_id is not None and self._condition_holds(breakpoint_id, frame):
                self._paused(frame, "breakpoint", breakpoint_id)
            elif self._step == "into" or (self._step == "over" and frame is self._step_frame):
                self._paused(frame, "step", None)
            elif breakpoint_id is not None:
                self._untrace_if_idle(frame)  # its condition is false: run on
        elif event == "return":
            self._entering.pop(id(frame), None)
            if id(frame) in self._watched:
                self._watched.discard(id(frame))
                self._untrace_if_idle(frame)
            if self._step in ("over", "out") and frame is self._step_frame:
                caller = frame.f_back
                if caller is not None and _is_user_frame(caller):
                    self._step, self._step_frame = "over", caller
                    caller.f_trace = self._trace_local
                else:
                    self._step, self._step_frame = None, None
                    self._untrace_if_idle(frame)
        return self._trace_local if self._tracing else None

    def _untrace_if_idle(self, frame) -> None:
        """Stop tracing when only entry hooks are left to watch (no step, no file breakpoint)."""
        if (
            self._step is None
            and not self._needs_trace
            and not self._entering
            and not self._watched
        ):
            sys.settrace(None)
            self._tracing = False
            frame.f_trace = None

    def _paused(self, frame, reason: str, breakpoint_id: str | None) -> None:
        frames = []
        walk = frame
        while walk is not None and _is_user_frame(walk):
            frames.append((walk, walk.f_lineno))
            walk = walk.f_back
        pause = _Pause(frames, reason, breakpoint_id, live=True)
        guard = self._guard
        pause_clock = getattr(guard, "pause_clock", None)
        if pause_clock is not None:
            pause_clock()
        with self._lock:
            self._pause = pause
        self._emit_paused(pause, self.cell)
        resume = None
        action = "interrupt"
        try:
            resume = self._serve(pause, guard)
            action = "continue" if resume is None else "step"
        finally:
            with self._lock:
                self._pause = None
            self._emit_resumed(self.cell, action, resume)
            resume_clock = getattr(guard, "resume_clock", None)
            if resume_clock is not None:
                resume_clock()
        self._step = resume
        self._step_frame = frame if resume in ("over", "out") else None
        if resume is None and not self._needs_trace and not self._watched:
            # continued, and nothing needs the tracer: the thread runs untraced
            # again until a hooked function is entered
            sys.settrace(None)
            self._tracing = False
            for walk, _ in frames:
                walk.f_trace = None
            return
        if resume == "into":
            sys.settrace(self._trace_call)
        self._tracing = True
        frame.f_trace = self._trace_local

    def _serve(self, pause: _Pause, guard) -> str | None:
        """Answer commands on the paused thread until one resumes it."""
        while True:
            stop_reason = getattr(guard, "stop_reason", None)
            if stop_reason is not None:
                raise stop_reason()
            try:
                operation, arguments, answer = pause.commands.get(timeout=POLL_INTERVAL)
            except queue.Empty:
                continue
            if operation in ("continue", "step"):
                # not paused any more before the answer: a debug_state right after
                # it must not see this pause (debug_step waits for the next one)
                with self._lock:
                    self._pause = None
                answer.put((True, {"resumed": True}))
                return arguments["mode"] if operation == "step" else None
            try:
                answer.put((True, self._examine(pause, operation, arguments)))
            except StuiError as error:
                answer.put((False, error))
            except Exception as exc:  # noqa: BLE001 - answered, the pause goes on
                answer.put((False, StuiError("InternalError", f"{type(exc).__name__}: {exc}")))

    # -- commands (pool threads) --

    def state(self) -> dict:
        with self._lock:
            pause = self._pause
        if pause is None:
            return {"paused": False, "post_mortem_available": self._post_mortem is not None}
        frame, lineno = pause.frames[0]
        return {
            "paused": True,
            "reason": pause.reason,
            "breakpoint_id": pause.breakpoint_id,
            "frame": _frame_info(0, frame, lineno),
        }

    def post_mortem(self) -> dict:
        with self._lock:
            if self._pause is not None:
                raise StuiError("InvalidRequest", "the session is already paused", paused=True)
            if not self._post_mortem:
                raise StuiError(
                    "InvalidRequest",
                    "no failed evaluation to examine: post-mortem looks at the session's last "
                    "evaluation only, when it ended with EvaluationError, until the next one "
                    "starts or the image restarts",
                    paused=False,
                )
            self._pause = pause = _Pause(self._post_mortem, "exception", None, live=False)
        self._emit_paused(pause, self._post_mortem_cell)
        return self.state()

    def command(self, operation: str, arguments: dict) -> dict:
        """A paused-session command, from any thread but the paused one."""
        with self._lock:
            pause = self._pause
        if pause is None:
            raise StuiError(
                "InvalidRequest",
                f"debug_{operation} needs a paused evaluation and this session is not paused",
                paused=False,
            )
        if operation == "step" and arguments.get("mode") not in STEP_MODES:
            raise StuiError(
                "InvalidParameter",
                f"mode must be one of {', '.join(STEP_MODES)}, not {arguments.get('mode')!r}",
            )
        if not pause.live:
            if operation == "continue":
                with self._lock:
                    self._pause = None
                self._emit_resumed(self._post_mortem_cell, "continue")
                return {"resumed": True}
            if operation == "step":
                raise StuiError(
                    "InvalidRequest", "a post-mortem stack cannot be stepped", paused=True
                )
            return self._examine(pause, operation, arguments)
        answer: queue.SimpleQueue = queue.SimpleQueue()
        pause.commands.put((operation, arguments, answer))
        try:
            ok, value = answer.get(timeout=COMMAND_TIMEOUT)
        except queue.Empty:
            raise StuiError(
                "Timeout", f"the paused session did not answer debug_{operation}"
            ) from None
        if not ok:
            raise value
        return value

    def _frame(self, pause: _Pause, arguments: dict):
        index = int(arguments.get("frame_index") or 0)
        if not 0 <= index < len(pause.frames):
            raise StuiError(
                "InvalidParameter",
                f"frame_index must be between 0 and {len(pause.frames) - 1}, not {index}",
            )
        return pause.frames[index][0]

    def _examine(self, pause: _Pause, operation: str, arguments: dict) -> dict:
        if operation == "stack":
            return {"frames": [_frame_info(i, f, n) for i, (f, n) in enumerate(pause.frames)]}
        if operation == "locals":
            frame = self._frame(pause, arguments)
            added: dict[str, dict] = {}
            variables = []
            for name, value in list(frame.f_locals.items()):
                variables.append(
                    {
                        "name": name,
                        "type": type(value).__name__,
                        "repr": self.workspace.safe_repr(value),
                        "object_id": self.workspace.register(value, added),
                    }
                )
            return {"variables": variables, "registry_added": added}
        if operation == "evaluate":
            frame = self._frame(pause, arguments)
            return self._evaluate_in(frame, arguments["code"])
        raise StuiError("InvalidParameter", f"unknown debug operation {operation!r}")

    def _evaluate_in(self, frame, code: str) -> dict:
        local_vars = frame.f_locals
        try:
            compiled = compile(code, "<debug>", "eval")
            is_expression = True
        except SyntaxError:
            try:
                compiled = compile(code, "<debug>", "exec")
            except SyntaxError as exc:  # the user's code, answered as such (not InternalError)
                raise StuiError(
                    "EvaluationError", f"SyntaxError: {exc}", exception_type="SyntaxError"
                ) from None
            is_expression = False
        try:
            value = eval(compiled, frame.f_globals, local_vars)  # noqa: S307 - the user's code
        except Exception as exc:  # noqa: BLE001 - the user's error, answered as such
            raise StuiError(
                "EvaluationError",
                f"{type(exc).__name__}: {exc}",
                exception_type=type(exc).__name__,
            ) from None
        finally:
            _locals_to_fast(frame)
        if not is_expression:
            value = None
        added: dict[str, dict] = {}
        return {
            "result": None if value is None else self.workspace.safe_repr(value),
            "result_type": type(value).__name__,
            "object_id": None if value is None else self.workspace.register(value, added),
            "has_error": False,
            "registry_added": added,
        }
