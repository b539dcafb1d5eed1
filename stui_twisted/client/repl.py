"""The interactive prompt: multi-line input, history, completion and meta-commands.

Input rules (see L{needs_more_input}): Enter submits a complete statement and
opens a continuation line (C{...}) when the code is unfinished — a line ending with
C{:}, an open bracket or string, a backslash, or an indented block not yet ended by
an empty line.  Esc-Enter (Meta-Enter) submits whatever is in the buffer.  Lines that
start with C{:} are meta-commands handled by the client (C{:help} lists them).

Live events (events.md §7): while the prompt waits, a task in the prompt's own event
loop reads the events that arrived (L{StuiClient.poll_events}) and prints each as a
dimmed line; C{patch_stdout} puts it above the prompt and redraws the prompt with
what the user was typing.  While an evaluation of ours runs, its C{output} events are
printed as they come and an C{input_requested} is answered at once.  When the current
session pauses in the debugger (a C{debug_paused} event, or C{debug_state} polled
while an evaluation waits, for servers that do not send the event) the REPL switches
to paused mode: a C{(Pdb)} prompt with pdb's keys (L{PAUSED_HELP}).
"""

from __future__ import annotations

import ast
import asyncio
import codeop
import getpass
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any, TextIO

from prompt_toolkit import PromptSession
from prompt_toolkit.application import get_app
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
    format_evaluation,
    format_inspection,
    format_reply,
    format_session_info,
    format_sessions,
    format_shared_sessions,
    format_whoami,
)
from stui_twisted.client.live import (
    OwnEvaluations,
    dim,
    format_event,
    format_frame,
    reply_history_index,
    without_streamed_output,
)
from stui_twisted.client.session import (
    TEAM,
    CredentialsUnavailable,
    RequestLost,
    ServerError,
    StuiClient,
    stream_key,
)
from stui_twisted.client.state import ClientState
from stui_twisted.client.transport import ConnectionLost

PROMPT = ">>> "
CONTINUATION_PROMPT = "... "
INDENT = "    "
CLEARABLE_PARTS = ("variables", "history", "registry", "inspector", "state", "events")

HELP_TEXT = """\
Type Python code; it runs in your session on the server's live image.
Enter runs a complete statement; unfinished code (a trailing ':', an open bracket,
an indented block) continues on a '...' line; an empty line ends a block.
Esc-Enter runs the buffer as it is.  Tab completes names from the server.
Ctrl-C stops a running evaluation (or clears the line); Ctrl-D quits.
What others do in this session (and the team) shows as dimmed lines above the
prompt.  When the session pauses in the debugger the prompt becomes (Pdb): h there
lists pdb's keys (s n r c w p l).

Meta-commands:
  :inspect EXPR     show the value of EXPR: type, attributes and items
  :inspect @ID      inspect a registry object by id (e.g. @obj_3)
  :sessions         list your active sessions on this server (* = current)
  :info             details of the current session
  :save             save the session context durably now
  :load             go back to the context of the last :save
  :clear [PARTS]    clear all or some of: variables history registry inspector state
                    events
  :classes [PAT]    classes of the session matching the glob PAT (-a PAT: all loaded ones)
  :browse CLASS     methods and variables of CLASS (Point, collections.OrderedDict)
  :source C.METHOD  the source of a method, highlighted (Point.__init__)
  :sysinfo [KIND]   the image's Python: basic, memory, packages, environment or all
  :break F | :break cell:N:LINE [if COND]
                    a breakpoint on function F (f, Point.norm) or a line of cell N
  :breaks           list the session's breakpoints
  :delete BP        remove a breakpoint (bp_1)
  :pm               post-mortem: the stack and locals where the last error raised,
                    then paused mode on that stack (c leaves)
  :input TEXT       answer an input() that another client's evaluation waits for
  :share USER read|write
                    let USER attach to and watch (read) or also run code in (write)
                    the current session
  :unshare USER     take that back
  :shared [N|ID]    sessions others shared with you; with N or ID attach to one
  :detach           back to your own session after :shared N
  :whoami           your client id, plan, features and limits
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
    "input",
    "share",
    "unshare",
    "shared",
    "detach",
    "whoami",
    "close",
    "help",
    "quit",
)

PDB_PROMPT = "(Pdb) "
PAUSED_HELP = """Paused in the debugger; the evaluation waits.  Keys (as in pdb):
  s        step into the next call          n   step over to the next line
  r        step out: run to the return      c   continue (leave paused mode)
  w        where: the stack, innermost last (> marks the frame p and l use)
  u / d    one frame up (outer) / down (inner)
  p EXPR   print EXPR's value in the frame  l   the code around the current line
  q        stop the evaluation (interrupt)  h   this text
Anything else runs as Python in the frame.  Ctrl-C interrupts the evaluation.
"""
LIST_CONTEXT_LINES = 5
EVENT_POLL_SECONDS = 0.1
DEBUG_POLL_AFTER_SECONDS = 0.3
DEBUG_POLL_EVERY_SECONDS = 0.5


class _Preempted:
    """What the prompt returns when an event ends it (the session paused)."""


PREEMPTED = _Preempted()


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
            "input": self.answer_input_command,
            "share": self.share,
            "unshare": self.unshare,
            "shared": self.shared,
            "detach": self.detach,
            "whoami": self.whoami,
            "close": self.close,
            "help": self.help,
            "quit": self.quit,
            "exit": self.quit,
            "q": self.quit,
        }
        self.own = OwnEvaluations()
        self.followed: str | None = None  # the session whose stream we subscribed to
        self.events_available = True
        self.waiting_input: dict[str, Any] | None = None  # another's input() request
        self.paused: dict[str, Any] | None = None  # debug_paused data while paused
        self.frame_index = 0
        self.debug_polling = True  # off once the server pushes debug_paused itself
        self._in_debug_poll = False
        self._last_debug_poll = 0.0
        self._prompt_app: Any = None
        self._kept_text = ""
        self._prompt_message: str | None = None  # the prompt shown now
        self.own_session: str | None = None  # before :shared N attached elsewhere
        self.running_command = False  # a meta-command of ours is running
        self.stepping = False  # a paused-mode command of ours is running
        self.asking_input: dict[str, Any] | None = None  # our input() being asked
        self.next_input: dict[str, Any] | None = None
        self.share_ended: str | None = None  # the attached session's share was taken away
        client.on_event = self.handle_event
        client.on_waiting = self.while_waiting

    def write(self, text: str) -> None:
        stream = self.output or sys.stdout
        stream.write(text if text.endswith("\n") or not text else text + "\n")
        stream.flush()

    def write_raw(self, text: str) -> None:
        stream = self.output or sys.stdout
        stream.write(text)
        stream.flush()

    def live_line(self, text: str) -> None:
        """A line about somebody else's activity: dimmed, above the prompt."""
        self.write(dim(text, self._colored()))

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
        self.follow_events(team=True)
        while True:
            if self.share_ended is not None:
                self.leave_unshared()
            if self.paused is not None:
                self.paused_mode()
                continue
            try:
                text = self._prompt(prompt_session, PROMPT)
            except KeyboardInterrupt:
                continue
            except EOFError:
                break
            if text is PREEMPTED:
                continue
            if not text.strip():
                continue
            if not self.run_one(text):
                break
            self.follow_events()
        return 0

    def _prompt(self, prompt_session: PromptSession[str], message: str, **options: Any) -> Any:
        """One prompt, with the idle watcher and the event pump running meanwhile.

        What was typed at the C{>>>} prompt when an event ended it comes back at
        the next C{>>>} prompt, not at a C{(Pdb)} or C{input()} prompt meanwhile.
        """
        default = ""
        if message == PROMPT:
            default, self._kept_text = self._kept_text, ""
        outer, self._prompt_message = self._prompt_message, message
        with IdleWatcher(self.client), patch_stdout(raw=True):
            try:
                return prompt_session.prompt(
                    message, default=default, pre_run=self._start_event_pump, **options
                )
            finally:
                self._prompt_app, self._prompt_message = None, outer

    def _start_event_pump(self) -> None:
        app = get_app()
        self._prompt_app = app

        async def pump() -> None:
            while True:
                await asyncio.sleep(EVENT_POLL_SECONDS)
                self.client.poll_events()

        app.create_background_task(pump())

    def _preempt(self) -> None:
        """End the prompt that is shown (from any thread), keeping what was typed."""
        app = self._prompt_app
        if app is None or app.loop is None:
            return
        main_prompt = self._prompt_message == PROMPT

        def leave() -> None:
            if app.is_running and not app.is_done:
                if main_prompt:  # a (Pdb) or input() line typed meanwhile is not kept
                    self._kept_text = app.current_buffer.text
                app.exit(result=PREEMPTED)

        app.loop.call_soon_threadsafe(leave)

    # -- live events ------------------------------------------------------------------

    def follow_events(self, *, team: bool = False) -> None:
        """Subscribe to the current session's stream (and once to the team's)."""
        if not self.events_available:
            return
        try:
            if team and TEAM not in self.client.streams:
                self.client.subscribe(TEAM)
            current = self.client.session_id
            if current == self.followed:
                return
            if self.followed is not None:
                self.client.unsubscribe(self.followed)
                self.followed = None
            if current is not None:
                self.client.subscribe(current)
                self.followed = current
        except ServerError as error:
            self.events_available = False
            if error.error_type == "PermissionDenied":
                self.write("No live events: " + format_error(error.reply).rstrip())
            elif error.error_type not in ("UnknownCommand", "InvalidRequest"):
                self.write(f"No live events: {error}")
        except ConnectionLost as error:
            self.write(f"{error}")

    def handle_event(self, message: dict[str, Any]) -> None:
        """One event message from the client (any thread that reads the connection)."""
        event = message.get("event")
        data = message.get("data") if isinstance(message.get("data"), dict) else {}
        session_id = None if stream_key(message) == TEAM else message.get("session_id")
        index = data.get("history_index")
        current = session_id is not None and session_id == self.client.session_id
        if event == "evaluation_started" and self.own.claim(
            session_id, index, data.get("by"), self.client.client_id
        ):
            return
        own = self.own.is_own(session_id, index)
        if event == "output" and own:
            if self.own.is_current(session_id, index):
                self.own.shown(str(data.get("text") or ""))
                self.write_raw(str(data.get("text") or ""))
            return
        if event == "input_requested" and current:
            if self.own.is_current(session_id, index):
                self.answer_own_input(session_id, data)
                return
            self.waiting_input = dict(data, session_id=session_id)
        if event == "evaluation_finished":
            if self.asking_input is not None and own:
                self.asking_input = None  # somebody else answered it
                self._preempt()
            if self.waiting_input and self.waiting_input.get("history_index") == index:
                self.waiting_input = None
            if current and self.paused and self.paused.get("history_index") == index:
                self.leave_paused()  # its reply (or its live line) tells how it ended
        if event in ("debug_paused", "debug_resumed") and current and self.stepping:
            if event == "debug_paused":
                self.debug_polling = False
            return  # our own step or continue: its reply says where it stopped
        if event == "debug_paused" and current:
            self.debug_polling = False
            self.pause(data)
            if own:
                return
        if event == "debug_resumed" and current and self.paused is not None:
            self.leave_paused()
        if own and event in ("evaluation_finished", "debug_resumed"):
            return
        if (
            event == "watcher_left"
            and current
            and self.own_session is not None
            and data.get("client_id") == self.client.client_id
        ):
            self.share_ended = session_id  # the server ended our subscription: unshared
            self._preempt()
            return
        if (
            self.running_command
            and current
            and event in ("state_updated", "session_closed")
            and data.get("by") == self.client.client_id
        ):
            return  # what our own meta-command (:clear, :close …) just did
        line = format_event(message, own_client_id=self.client.client_id)
        if line:
            self.live_line(line)

    def leave_unshared(self) -> None:
        """The attached session is no longer shared with us: back to our own."""
        gone, self.share_ended = self.share_ended, None
        if gone != self.client.session_id or self.own_session is None:
            return  # we left it meanwhile
        self.write(f"Session {gone} is no longer shared with you.")
        self.detach("")
        self.follow_events()

    def answer_own_input(self, session_id: str, data: dict[str, Any]) -> None:
        """Our evaluation called input(): ask here and send the answer (send_input).

        The question is a prompt with the event pump running, so that an answer
        from another client (the evaluation goes on and finishes) ends it.
        """
        if self.asking_input is not None:
            self.next_input = data  # asked again while we ask: after this prompt
            self._preempt()
            return
        while data is not None:
            self.asking_input, self.next_input = data, None
            self.own.asked()  # the prompt is shown here; the output does not have it
            try:
                text = self._prompt(
                    PromptSession(),
                    str(data.get("prompt") or ""),
                    is_password=bool(data.get("password")),
                )
            except EOFError:
                text = ""  # Ctrl-D answers an empty line; Ctrl-C interrupts the evaluation
            finally:
                asked, self.asking_input = self.asking_input, None
            if text is not PREEMPTED and asked is not None:
                self.send_input(session_id, text)
            elif self.next_input is None:
                self.write("(answered by another client)")
            data = self.next_input

    def send_input(self, session_id: str, text: str) -> None:
        reply = self.client.call("send_input", {"session_id": session_id, "text": text})
        if reply.get("status") != "success":
            self.write(format_error(reply))

    def answer_input_command(self, argument: str) -> bool:
        waiting = self.waiting_input
        if waiting is None:
            self.write("No evaluation is waiting for input.")
            return True
        text = argument
        if waiting.get("password") and not argument:
            text = getpass.getpass(str(waiting.get("prompt") or "password: "))
        self.waiting_input = None
        self.send_input(str(waiting["session_id"]), text)
        return True

    def while_waiting(self, elapsed: float) -> None:
        """Called while a reply is awaited: notice a paused evaluation of ours by
        polling C{debug_state}, for servers that do not send C{debug_paused}."""
        if (
            not self.debug_polling
            or self._in_debug_poll
            or self.paused is not None
            or self.own.pending is None
            or elapsed < DEBUG_POLL_AFTER_SECONDS
            or time.monotonic() - self._last_debug_poll < DEBUG_POLL_EVERY_SECONDS
        ):
            return
        self._in_debug_poll = True
        try:
            self._last_debug_poll = time.monotonic()
            reply = self.client.call("debug_state", {"session_id": self.own.pending})
        finally:
            self._in_debug_poll = False
        if reply.get("status") != "success":
            self.debug_polling = False  # no debugger here (or not in the plan)
            return
        state = reply.get("result") or {}
        if state.get("paused") and self.paused is None:
            self.pause(
                {
                    "history_index": self.own.index,
                    "reason": state.get("reason"),
                    "breakpoint_id": state.get("breakpoint_id"),
                    "frame": state.get("frame") or {},
                }
            )

    # -- paused mode --------------------------------------------------------------------

    def pause(self, data: dict[str, Any]) -> None:
        """The current session paused: paused mode now (our evaluation waits in this
        thread) or instead of the prompt that is shown."""
        if self.paused is not None:
            self.paused = data  # a step's new place; its reply shows it
            return
        self.paused = data
        self.frame_index = 0
        if self.own.pending is not None and threading.current_thread() is threading.main_thread():
            self.paused_mode()
        else:
            self._preempt()

    def leave_paused(self) -> None:
        if self.paused is None:
            return
        self.paused = None
        self._preempt()

    def paused_mode(self) -> None:
        """The C{(Pdb)} prompt until the evaluation resumes or ends."""
        data = self.paused or {}
        why = data.get("reason") or "paused"
        if data.get("breakpoint_id"):
            why += f" at {data['breakpoint_id']}"
        self.write(f"Paused ({why}); h lists the keys, c continues.")
        self.write(format_frame(data.get("frame") or {}))
        pdb_session: PromptSession[str] = PromptSession()
        while self.paused is not None:
            try:
                line = self._prompt(pdb_session, PDB_PROMPT)
            except EOFError:
                line = "c"
            except KeyboardInterrupt:
                if self.own.pending is not None:
                    raise  # the evaluation's wait turns it into an interrupt
                self.paused_command("q")
                continue
            if line is PREEMPTED:
                continue
            self.stepping = True
            try:
                self.paused_command(line.strip())
            except ConnectionLost as error:
                self.write(f"{error}")
                self.paused = None
            finally:
                self.stepping = False

    def paused_command(self, line: str) -> None:
        key, _, argument = line.partition(" ")
        session_id = self.client.session_id
        steps = {"s": "into", "n": "over", "r": "out"}
        if key in steps:
            result = self._paused_call("debug_step", {"mode": steps[key]})
            if result is None:
                return
            if result.get("paused_at"):
                self.frame_index = 0
                if self.paused is not None:
                    self.paused = dict(self.paused, frame=result["paused_at"])
                self.write(format_frame(result["paused_at"]))
            else:
                self.paused = None
                self.write("The evaluation ran to its end.")
        elif key == "c":
            if self._paused_call("debug_continue") is not None:
                self.paused = None
        elif key == "q":
            reply = self.client.call("interrupt", {"session_id": session_id})
            self.paused = None
            if reply.get("status") != "success":
                self.write(format_error(reply))
        elif key == "w":
            self.where()
        elif key in ("u", "d"):
            self.move_frame(1 if key == "u" else -1)
        elif key == "l":
            self.list_code()
        elif key == "h":
            self.write(PAUSED_HELP)
        elif key == "p" and argument.strip():
            self.debug_evaluate(argument.strip(), show_none=True)
        elif line:
            self.debug_evaluate(line[1:] if line.startswith("!") else line)

    def _paused_call(self, command: str, parameters: dict[str, Any] | None = None):
        """A debugger command; an answer that the session is not paused leaves paused mode."""
        reply = self.client.call(command, dict(parameters or {}, session_id=self.client.session_id))
        if reply.get("status") == "success":
            return reply.get("result") or {}
        details = reply.get("details") if isinstance(reply.get("details"), dict) else {}
        if details.get("paused") is False:
            self.paused = None
            self.write("The session is not paused any more.")
        else:
            self.write(format_error(reply))
        return None

    def _frames(self) -> list[dict[str, Any]]:
        result = self._paused_call("debug_stack")
        return list((result or {}).get("frames") or [])

    def where(self) -> None:
        frames = self._frames()
        for frame in reversed(frames):
            marker = ">" if frame.get("index") == self.frame_index else " "
            self.write(
                f"{marker} {frame.get('file')}({frame.get('line')}){frame.get('function')}()\n"
                f"    {frame.get('code_line', '')}"
            )

    def move_frame(self, step: int) -> None:
        frames = self._frames()
        if not frames:
            return
        wanted = self.frame_index + step
        if not 0 <= wanted < len(frames):
            self.write("Oldest frame" if step > 0 else "Newest frame")
            return
        self.frame_index = wanted
        self.write(format_frame(frames[wanted]))

    def debug_evaluate(self, code: str, *, show_none: bool = False) -> None:
        result = self._paused_call(
            "debug_evaluate", {"code": code, "frame_index": self.frame_index}
        )
        if result is not None:
            shown = format_evaluation(result, self._colored())
            self.write(shown or ("None" if show_none else ""))  # p shows None, as pdb does

    def list_code(self) -> None:
        """pdb's C{l}: the lines around the frame's current line, read in the image."""
        frames = self._frames()
        frame = next((f for f in frames if f.get("index") == self.frame_index), None)
        if frame is None:
            return
        line = int(frame.get("line") or 1)
        first = max(1, line - LIST_CONTEXT_LINES)
        code = (
            f"__import__('linecache').getlines({str(frame.get('file'))!r})"
            f"[{first - 1}:{line + LIST_CONTEXT_LINES}]"
        )
        result = self._paused_call("debug_evaluate", {"code": code, "frame_index": 0})
        try:
            lines = ast.literal_eval(str((result or {}).get("result")))
        except (ValueError, SyntaxError):
            lines = None
        if not isinstance(lines, list) or not lines:
            self.write(f"{line:>4} -> {frame.get('code_line', '')}")
            return
        for number, text in enumerate(lines, start=first):
            marker = "->" if number == line else "  "
            self.write(f"{number:>4} {marker} {str(text).rstrip()}")

    def run_one(self, text: str) -> bool:
        """Run one submitted input; False means quit."""
        try:
            stripped = text.strip()
            if stripped.startswith(":"):
                self.running_command = True
                try:
                    return self.meta_command(stripped[1:])
                finally:
                    self.running_command = False
            self.write(format_reply(self.evaluate(text), colour=self._colored()))
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

    def evaluate(self, text: str) -> dict[str, Any]:
        """Evaluate as ours: output streamed by events is not in the reply we show."""
        self.own.begin(self.client.session_id)
        reply: dict[str, Any] = {}
        try:
            reply = self.client.evaluate(text, self.mode)
        finally:
            streamed = self.own.end(reply_history_index(reply))
            self.paused = None
            if self.client.session_id == self.own_session:
                self.own_session = None  # the shared session was gone: back in our own
        reply, newline = without_streamed_output(reply, streamed, self.own.line_open)
        if newline:
            self.write_raw("\n")
        return reply

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
        """The stack and locals of the last error, then paused mode on that stack."""
        state = self._show("debug_post_mortem")
        if state is None:
            return True
        stack = self._show("debug_stack")
        local_vars = self._show("debug_locals")
        if stack is not None:
            for frame in reversed(stack["frames"]):
                self.write(
                    f"  {frame['file']}, line {frame['line']}, in {frame['function']}\n"
                    f"    {frame['code_line']}"
                )
        if local_vars is not None:
            for variable in local_vars["variables"]:
                self.write(f"  {variable['name']} = {variable['repr']}")
        self.paused = {
            "reason": "exception",
            "frame": state.get("frame") or ((stack or {}).get("frames") or [{}])[0],
        }
        self.frame_index = 0
        return True

    # -- sharing (access.md §4) -----------------------------------------------------------

    def share(self, argument: str) -> bool:
        words = argument.split()
        if len(words) != 2 or words[1] not in ("read", "write"):
            self.write("usage: :share USER read|write")
            return True
        result = self._show(
            "share_session",
            {"session_id": self.client.session_id, "with": words[0], "access": words[1]},
        )
        if result is not None:
            self.write(
                f"Session {result.get('session_id')} shared with {words[0]} ({words[1]}). "
                + _format_shares(result)
            )
        return True

    def unshare(self, argument: str) -> bool:
        if not argument or " " in argument:
            self.write("usage: :unshare USER")
            return True
        result = self._show(
            "unshare_session", {"session_id": self.client.session_id, "with": argument}
        )
        if result is not None:
            self.write(
                f"Session {result.get('session_id')} no longer shared with {argument}. "
                + _format_shares(result)
            )
        return True

    def shared(self, argument: str) -> bool:
        """C{:shared}: list; C{:shared N} or C{:shared ID}: attach to that session."""
        result = self._show("list_shared_sessions")
        if result is None:
            return True
        sessions = list(result.get("sessions") or [])
        if not argument:
            self.write(format_shared_sessions(sessions, self.client.session_id))
            return True
        chosen = next((s for s in sessions if s.get("session_id") == argument), None)
        if chosen is None and argument.isdigit() and 1 <= int(argument) <= len(sessions):
            chosen = sessions[int(argument) - 1]
        if chosen is None:
            self.write(f"No shared session {argument}; :shared lists them.")
            return True
        own = self.own_session or self.client.session_id
        try:
            message = self.client.open_session(session_id=chosen["session_id"], remember=False)
        except ServerError as error:
            self.write(format_error(error.reply))
            return True
        self.own_session = own
        self.write(
            message.rstrip()
            + f"\nAttached to {chosen.get('owner', '?')}'s session ({chosen.get('access')} "
            "access); :detach goes back to yours."
        )
        return True

    def detach(self, argument: str) -> bool:
        if self.own_session is None:
            self.write("You are in your own session (:shared N attaches to a shared one).")
            return True
        own, self.own_session = self.own_session, None
        try:
            self.write(self.client.open_session(session_id=own).rstrip())
        except ServerError as error:
            self.write(format_error(error.reply).rstrip())
            self.write(self.client.open_session(force_new=True).rstrip())
        return True

    def whoami(self, argument: str) -> bool:
        result = self._show("whoami")
        if result is not None:
            self.write(format_whoami(result))
        return True

    def help(self, argument: str) -> bool:
        self.write(HELP_TEXT)
        return True

    def quit(self, argument: str) -> bool:
        return False


def _format_shares(result: dict) -> str:
    shares = result.get("shares") or []
    if not shares:
        return "It is shared with nobody."
    return "Shares: " + ", ".join(f"{s.get('client_id')} ({s.get('access')})" for s in shares)


def _breakpoint_place(entry: dict) -> str:
    place = entry.get("function") or f"{entry.get('file')}:{entry.get('line')}"
    if entry.get("condition"):
        place += f" if {entry['condition']}"
    if entry.get("verified") is False:
        place += " (not found yet)"
    return place
