"""The interactive prompt: multi-line input, history, completion and meta-commands.

Input rules (see L{needs_more_input}): Enter submits a complete statement and
opens a continuation line (C{...}) when the code is unfinished — a line ending with
C{:}, an open bracket or string, a backslash, or an indented block not yet ended by
an empty line.  Esc-Enter (Meta-Enter) submits whatever is in the buffer.  Lines that
start with C{:} are meta-commands handled by the client (C{:help} lists them).
"""

from __future__ import annotations

import ast
import codeop
import sys
import threading
import warnings
from collections.abc import Callable, Iterable
from typing import Any, TextIO

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.patch_stdout import patch_stdout

from stui_twisted.client.browsing import (
    format_class,
    format_classes,
    format_method,
    format_sysinfo,
)
from stui_twisted.client.formatting import (
    format_bindings_note,
    format_error,
    format_inspection,
    format_reply,
    format_session_info,
    format_sessions,
)
from stui_twisted.client.session import (
    CredentialsUnavailable,
    RequestLost,
    ServerError,
    StuiClient,
)
from stui_twisted.client.state import ClientState
from stui_twisted.client.transport import ConnectionLost

PROMPT = ">>> "
CONTINUATION_PROMPT = "... "
INDENT = "    "
CLEARABLE_PARTS = ("variables", "history", "registry", "inspector", "state")

HELP_TEXT = """\
Type Python code; it runs in your session on the server's live image.
Enter runs a complete statement; unfinished code (a trailing ':', an open bracket,
an indented block) continues on a '...' line; an empty line ends a block.
Esc-Enter runs the buffer as it is.  Tab completes names from the server.
Ctrl-C stops a running evaluation (or clears the line); Ctrl-D quits.

Meta-commands:
  :inspect EXPR     show the value of EXPR: type, attributes and items
  :inspect @ID      inspect a registry object by id (e.g. @obj_3)
  :sessions         list your active sessions on this server (* = current)
  :info             details of the current session
  :save             save the session context durably now
  :load             go back to the context of the last :save
  :clear [PARTS]    clear all or some of: variables history registry inspector state
  :classes [PAT]    classes of the session matching the glob PAT (-a PAT: all loaded ones)
  :browse CLASS     methods and variables of CLASS (Point, collections.OrderedDict)
  :source C.METHOD  the source of a method, highlighted (Point.__init__)
  :sysinfo [KIND]   the image's Python: basic, memory, packages, environment or all
  :break F | :break cell:N:LINE [if COND]
                    a breakpoint on function F (f, Point.norm) or a line of cell N
  :breaks           list the session's breakpoints
  :delete BP        remove a breakpoint (bp_1)
  :pm               post-mortem: the stack and locals where the last error raised
  :close            close the current session for good (the next command starts a new one)
  :help             this text
  :quit             leave (the session stays on the server; also Ctrl-D)
"""

META_COMMANDS = (
    "inspect",
    "sessions",
    "info",
    "save",
    "load",
    "clear",
    "classes",
    "browse",
    "source",
    "sysinfo",
    "break",
    "breaks",
    "delete",
    "pm",
    "close",
    "help",
    "quit",
)


def needs_more_input(text: str) -> bool:
    """True when C{text} is unfinished Python that the user is still typing.

    Uses L{codeop.compile_command}, the rule of the standard interactive
    interpreter: an open bracket or string, a trailing C{:} or backslash, or an
    indented block that no empty line has ended yet.  Unlike that interpreter, a
    complete one-line compound statement (C{while True: pass}) runs at once.
    Complete code, meta-commands and code with a syntax error are submitted (the
    server reports the error).  Top-level C{await}, C{async for} and C{async
    with} are Python here, as on the server (protocol.md, evaluate).
    """
    if not text.strip() or text.lstrip().startswith(":"):
        return False
    lines = text.split("\n")
    if len(lines) > 1 and not lines[-1].strip():
        lines[-1] = ""  # an empty (or auto-indented only) last line ends a block
    source = "\n".join(lines)
    # "single" wants a blank line after an indented block; on one line, "exec" does not.
    symbols = ("exec",) if len(lines) == 1 else ("single", "exec")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for symbol in symbols:
            compiler = codeop.CommandCompiler()
            compiler.compiler.flags |= ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
            try:
                return compiler(source, "<input>", symbol) is None
            except (SyntaxError, ValueError, OverflowError):
                continue
    return False


def next_line_indent(current_line: str) -> str:
    """Indentation for the continuation line: keep the current one, one level deeper
    after a line that opens a block."""
    stripped = current_line.rstrip()
    indent = current_line[: len(current_line) - len(current_line.lstrip())]
    if stripped.endswith(":"):
        indent += INDENT
    return indent


def build_key_bindings() -> KeyBindings:
    """Enter submits complete code or continues unfinished code; Esc-Enter submits."""
    bindings = KeyBindings()

    @bindings.add("enter")
    def _enter(event: KeyPressEvent) -> None:
        buffer = event.current_buffer
        state = buffer.complete_state
        if state is not None and state.current_completion is not None:
            buffer.apply_completion(state.current_completion)
            return
        document = buffer.document
        at_end = document.cursor_position == len(document.text)
        if not at_end or needs_more_input(buffer.text):
            buffer.insert_text("\n" + next_line_indent(document.current_line_before_cursor))
        else:
            buffer.validate_and_handle()

    @bindings.add("escape", "enter")
    def _submit(event: KeyPressEvent) -> None:
        event.current_buffer.validate_and_handle()

    return bindings


class ServerCompleter(Completer):
    """Completes code with the server's C{complete} command, meta-commands locally."""

    def __init__(self, client: StuiClient) -> None:
        self.client = client

    def get_completions(
        self, document: Document, complete_event: CompleteEvent
    ) -> Iterable[Completion]:
        text = document.text_before_cursor
        if text.startswith(":") and " " not in text:
            for name in META_COMMANDS:
                if name.startswith(text[1:]):
                    yield Completion(name, start_position=-(len(text) - 1))
            return
        cursor = document.cursor_position
        result = self.client.complete(document.text, cursor)
        if not result:
            return
        start = result.get("cursor_start", cursor)
        if not isinstance(start, int) or start > cursor:
            return
        for match in result.get("matches") or []:
            yield Completion(str(match), start_position=start - cursor)


class IdleWatcher:
    """While the prompt waits for input, notice a lost connection and reconnect."""

    def __init__(self, client: StuiClient, interval: float = 0.5) -> None:
        self.client = client
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stui-idle-watcher", daemon=True)

    def __enter__(self) -> IdleWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.client.check_idle_connection()


class Repl:
    """The read-eval-print loop over a connected L{StuiClient} with a session."""

    def __init__(
        self,
        client: StuiClient,
        state: ClientState,
        *,
        mode: str = "execute",
        output: TextIO | None = None,
        color: bool | None = None,
    ) -> None:
        self.color = color
        self.client = client
        self.state = state
        self.mode = mode
        self.output = output
        self.meta_commands: dict[str, Callable[[str], bool]] = {
            "inspect": self.inspect,
            "sessions": self.sessions,
            "info": self.info,
            "save": self.save,
            "load": self.load,
            "clear": self.clear,
            "classes": self.classes,
            "browse": self.browse,
            "source": self.source,
            "sysinfo": self.sysinfo,
            "break": self.set_breakpoint,
            "breaks": self.list_breakpoints,
            "delete": self.delete_breakpoint,
            "pm": self.post_mortem,
            "close": self.close,
            "help": self.help,
            "quit": self.quit,
            "exit": self.quit,
            "q": self.quit,
        }

    def write(self, text: str) -> None:
        stream = self.output or sys.stdout
        stream.write(text if text.endswith("\n") or not text else text + "\n")
        stream.flush()

    def run(self) -> int:
        """Prompt until C{:quit} or Ctrl-D; returns the process exit status."""
        prompt_session: PromptSession[str] = PromptSession(
            history=FileHistory(str(self.state.ensure_history_file())),
            multiline=True,
            key_bindings=build_key_bindings(),
            completer=ServerCompleter(self.client),
            complete_while_typing=False,
            prompt_continuation=lambda width, line_number, wrap_count: CONTINUATION_PROMPT,
        )
        while True:
            try:
                with IdleWatcher(self.client), patch_stdout(raw=True):
                    text = prompt_session.prompt(PROMPT)
            except KeyboardInterrupt:
                continue
            except EOFError:
                break
            if not text.strip():
                continue
            if not self.run_one(text):
                break
        return 0

    def run_one(self, text: str) -> bool:
        """Run one submitted input; False means quit."""
        try:
            stripped = text.strip()
            if stripped.startswith(":"):
                return self.meta_command(stripped[1:])
            stream = self.output or sys.stdout
            colour = bool(getattr(stream, "isatty", lambda: False)())
            self.write(format_reply(self.client.evaluate(text, self.mode), colour=colour))
        except KeyboardInterrupt:
            self.write("Stopped waiting for the reply.")
        except RequestLost as error:
            self.write(f"{error}; the command may or may not have run.")
        except ConnectionLost as error:
            self.write(f"{error}")
        except ServerError as error:
            self.write(format_error(error.reply))
        except CredentialsUnavailable as error:
            self.write(f"{error}")
        return True

    def meta_command(self, line: str) -> bool:
        name, _, argument = line.partition(" ")
        handler = self.meta_commands.get(name.strip().lower())
        if handler is None:
            self.write(f"Unknown meta-command :{name}; :help lists them.")
            return True
        return handler(argument.strip())

    def _show(self, command: str, parameters: dict[str, Any] | None = None):
        """Run a command; on an error reply print it and return None."""
        reply = self.client.call(command, parameters)
        if reply.get("status") != "success":
            self.write(format_error(reply))
            return None
        return reply.get("result") or {}

    def inspect(self, argument: str) -> bool:
        if not argument:
            self.write("usage: :inspect EXPR  or  :inspect @OBJECT_ID")
            return True
        if argument.startswith("@"):
            parameters = {"object_id": argument[1:]}
        else:
            parameters = {"expression": argument}
        result = self._show("inspect", parameters)
        if result is not None:
            self.write(format_inspection(result))
        return True

    def sessions(self, argument: str) -> bool:
        result = self._show("list_client_sessions", {"client_id": self.client.client_id})
        if result is not None:
            self.write(format_sessions(result, self.client.session_id))
        return True

    def info(self, argument: str) -> bool:
        result = self._show("get_session_info")
        if result is not None:
            self.write(format_session_info(result))
        return True

    def save(self, argument: str) -> bool:
        result = self._show("save_context")
        if result is not None:
            self.write(
                f"Saved at {result.get('saved_at', '?')} ({result.get('size_bytes', '?')} bytes)."
            )
        return True

    def load(self, argument: str) -> bool:
        result = self._show("load_context")
        if result is not None:
            self.write(
                f"Loaded the context saved at {result.get('saved_at', '?')}.\n"
                + format_bindings_note(result)
            )
        return True

    def clear(self, argument: str) -> bool:
        parts = [part for part in argument.replace(",", " ").split() if part]
        unknown = [part for part in parts if part not in CLEARABLE_PARTS]
        if unknown:
            self.write(
                f"Cannot clear {', '.join(unknown)}; parts are: {' '.join(CLEARABLE_PARTS)}."
            )
            return True
        result = self._show("clear_context", {"parts": parts} if parts else {})
        if result is not None:
            self.write("Cleared: " + ", ".join(result.get("cleared") or parts or ["everything"]))
        return True

    def _colored(self) -> bool:
        if self.color is not None:
            return self.color
        stream = self.output or sys.stdout
        return bool(getattr(stream, "isatty", lambda: False)())

    def _browse(self, command: str, parameters: dict[str, Any]):
        """A browse command in the session (one is opened first if there is none)."""
        if self.client.session_id is None:
            self.write(self.client.open_session(force_new=True).rstrip())
        return self._show(command, dict(parameters, session_id=self.client.session_id))

    def classes(self, argument: str) -> bool:
        words = argument.split()
        include_system = "-a" in words
        patterns = [word for word in words if word != "-a"]
        result = self._browse(
            "list_classes",
            {"pattern": patterns[0] if patterns else "*", "include_system": include_system},
        )
        if result is not None:
            self.write(format_classes(result))
        return True

    def browse(self, argument: str) -> bool:
        if not argument:
            self.write("usage: :browse CLASS  (e.g. :browse collections.OrderedDict)")
            return True
        result = self._browse("browse_class", {"class_name": argument})
        if result is not None:
            self.write(format_class(result))
        return True

    def source(self, argument: str) -> bool:
        class_name, dot, method_name = argument.rpartition(".")
        if not argument or not dot or not class_name or not method_name:
            self.write("usage: :source CLASS.METHOD  (e.g. :source Point.__init__)")
            return True
        result = self._browse("get_method", {"class_name": class_name, "method_name": method_name})
        if result is not None:
            self.write(format_method(result, self._colored()))
        return True

    def sysinfo(self, argument: str) -> bool:
        result = self._show("system_info", {"info_type": argument or "basic"})
        if result is not None:
            self.write(format_sysinfo(result))
        return True

    def close(self, argument: str) -> bool:
        closing = self.client.session_id
        if closing is None:
            self.write("There is no current session.")
            return True
        result = self._show("close_session")
        if result is not None:
            self.client.forget_session()
            self.write(
                f"Session {closing} closed. The next evaluation starts a new session; "
                ":quit to leave."
            )
        return True

    def set_breakpoint(self, argument: str) -> bool:
        place, _, condition = argument.partition(" if ")
        place = place.strip()
        if not place:
            self.write("usage: :break FUNCTION  or  :break cell:N:LINE  [if CONDITION]")
            return True
        parameters: dict[str, Any] = {"function": place}
        if place.startswith("cell:"):
            cell, _, line = place[5:].partition(":")
            if not (cell.isdigit() and line.isdigit()):
                self.write("usage: :break cell:N:LINE (e.g. :break cell:3:2)")
                return True
            parameters = {"file": f"cell:{cell}", "line": int(line)}
        if condition.strip():
            parameters["condition"] = condition.strip()
        result = self._show("set_breakpoint", parameters)
        if result is not None:
            self.write(f"{result['breakpoint_id']} at {_breakpoint_place(result)}")
        return True

    def list_breakpoints(self, argument: str) -> bool:
        result = self._show("list_breakpoints")
        if result is not None:
            lines = [
                f"{b['breakpoint_id']}  {_breakpoint_place(b)}  hits {b['hits']}"
                for b in result["breakpoints"]
            ]
            self.write("\n".join(lines) or "No breakpoints.")
        return True

    def delete_breakpoint(self, argument: str) -> bool:
        if not argument:
            self.write("usage: :delete BREAKPOINT_ID (see :breaks)")
            return True
        result = self._show("remove_breakpoint", {"breakpoint_id": argument})
        if result is not None:
            self.write(f"{argument} removed." if result["removed"] else f"No {argument}.")
        return True

    def post_mortem(self, argument: str) -> bool:
        if self._show("debug_post_mortem") is None:
            return True
        stack = self._show("debug_stack")
        local_vars = self._show("debug_locals")
        self._show("debug_continue")
        if stack is not None:
            for frame in reversed(stack["frames"]):
                self.write(
                    f"  {frame['file']}, line {frame['line']}, in {frame['function']}\n"
                    f"    {frame['code_line']}"
                )
        if local_vars is not None:
            for variable in local_vars["variables"]:
                self.write(f"  {variable['name']} = {variable['repr']}")
        return True

    def help(self, argument: str) -> bool:
        self.write(HELP_TEXT)
        return True

    def quit(self, argument: str) -> bool:
        return False


def _breakpoint_place(entry: dict) -> str:
    place = entry.get("function") or f"{entry.get('file')}:{entry.get('line')}"
    if entry.get("condition"):
        place += f" if {entry['condition']}"
    if entry.get("verified") is False:
        place += " (not found yet)"
    return place
