"""Live lines: what the events of a watched session or of the team say, for a person.

L{format_event} turns one event message (events.md §1) into the line(s) the client
prints; L{OwnEvaluations} remembers which evaluations of a session this client
started, so that their events are not shown as somebody else's activity and their
streamed output is not printed a second time when the reply comes.
"""

from __future__ import annotations

from collections import deque
from typing import Any

DIM = "\x1b[2m"
RESET = "\x1b[0m"
CODE_PREVIEW_CHARACTERS = 72
OWN_INDICES_KEPT = 64


def _one_line(text: str, limit: int = CODE_PREVIEW_CHARACTERS) -> str:
    lines = [line for line in str(text).splitlines() if line.strip()]
    first = lines[0] if lines else ""
    if len(lines) > 1 or len(first) > limit:
        return first[:limit].rstrip() + " …"
    return first


def _duration(milliseconds: Any) -> str:
    """C{execution_time} (ms, protocol.md) as a short C{" (…)"} note."""
    if not isinstance(milliseconds, int | float) or isinstance(milliseconds, bool):
        return ""
    if milliseconds < 10:
        return f" ({milliseconds:.2g} ms)"
    if milliseconds < 1000:
        return f" ({milliseconds:.0f} ms)"
    return f" ({milliseconds / 1000:.1f} s)"


def format_frame(frame: dict[str, Any]) -> str:
    """A paused frame as pdb shows it: C{> FILE(LINE)FUNCTION()} and the code line."""
    head = f"> {frame.get('file', '?')}({frame.get('line', '?')}){frame.get('function', '?')}()"
    code = frame.get("code_line")
    return f"{head}\n-> {code}" if code else head


def format_event(message: dict[str, Any], *, own_client_id: str | None = None) -> str | None:
    """The live line(s) for one event, or C{None} when there is nothing to show.

    Session events start with C{[WHO #N]} (who acted, which history entry), team
    events with C{[team]}.  The caller dims them.
    """
    event = message.get("event")
    data = message.get("data") if isinstance(message.get("data"), dict) else {}
    who = data.get("by") or data.get("client_id") or "?"
    index = data.get("history_index")
    tag = f"[{who} #{index}]" if index is not None else f"[{who}]"
    if message.get("stream") == "team":
        return _format_team_event(event, data, own_client_id)
    if event == "evaluation_started":
        return f"{tag} >>> {_one_line(data.get('code', ''))}"
    if event == "output":
        text = str(data.get("text") or "").rstrip("\n")
        prefix = f"[#{index}] " if index is not None else ""
        return "\n".join(prefix + line for line in text.split("\n")) if text else None
    if event == "evaluation_finished":
        if data.get("ok", data.get("error_type") is None):
            result = data.get("result")
            timing = _duration(data.get("execution_time"))
            shown = "done" if result in (None, "None") else f"= {_one_line(result)}"
            return f"{tag} {shown}{timing}"
        return f"{tag} failed: {data.get('error_type')}: {_one_line(data.get('error') or '')}"
    if event == "input_requested":
        kind = "a password" if data.get("password") else "input"
        return (
            f"[#{index}] the code asks for {kind}: {data.get('prompt', '')!r} "
            "(answer with :input TEXT)"
        )
    if event == "state_updated":
        parts = ", ".join(map(str, data.get("parts") or [])) or "the state"
        return f"{tag} changed {parts}"
    if event in ("watcher_joined", "watcher_left") and who == own_client_id:
        return None  # our own subscription
    if event == "watcher_joined":
        return f"[{who}] is watching this session ({data.get('access', '?')} access)"
    if event == "watcher_left":
        return f"[{who}] stopped watching this session"
    if event == "session_closed":
        return f"{tag} closed the session"
    if event == "session_expired":
        return "[server] the session expired"
    if event == "debug_paused":
        frame = data.get("frame") or {}
        why = data.get("reason") or "paused"
        if data.get("breakpoint_id"):
            why += f" {data['breakpoint_id']}"
        return (
            f"[#{index}] paused ({why}) in {frame.get('function', '?')} at "
            f"{frame.get('file', '?')}:{frame.get('line', '?')}: {frame.get('code_line', '')}"
        )
    if event == "debug_resumed":
        return f"[#{index}] resumed" if index is not None else "[debugger] resumed"
    return f"{tag} {event}"


def _format_team_event(event: Any, data: dict[str, Any], own_client_id: str | None) -> str | None:
    if event == "presence":
        client = data.get("client_id") or "?"
        if client == own_client_id:
            return None  # our own connections
        verb = "connected" if data.get("joined") else "disconnected"
        count = data.get("connections", "?")
        return f"[team] {client} {verb} ({count} connection{'' if count == 1 else 's'} now)"
    if event == "shared_changed":
        names = ", ".join(map(str, data.get("names") or []))
        return f"[team] {data.get('by') or '?'} changed shared: {names}"
    if event == "image_restarted":
        return f"[team] the image restarted (pid {data.get('pid', '?')}): {data.get('reason', '')}"
    if event == "server_stopping":
        return "[team] the server is stopping"
    return f"[team] {event}"


def dim(text: str, colour: bool) -> str:
    """C{text} dimmed (SGR 2) on a terminal, line by line so that each line is."""
    if not colour:
        return text
    return "\n".join(f"{DIM}{line}{RESET}" for line in text.split("\n"))


class OwnEvaluations:
    """Which history entries of which session this client evaluated, and their output.

    The client calls L{begin} before it sends C{evaluate}; the first
    C{evaluation_started} of that session by this client id that arrives while the
    reply is pending is taken as ours (so is the reply's C{history_index}).
    """

    def __init__(self) -> None:
        self.pending: str | None = None
        self.index: int | None = None
        self.streamed = ""
        self.line_open = False  # the terminal's line does not end what was streamed
        self._done: deque[tuple[str, int]] = deque(maxlen=OWN_INDICES_KEPT)

    def begin(self, session_id: str | None) -> None:
        self.pending, self.index, self.streamed, self.line_open = session_id, None, "", False

    def shown(self, text: str) -> None:
        """C{text} of the evaluation's output was printed as it streamed."""
        self.streamed += text
        if text:
            self.line_open = not text.endswith("\n")

    def asked(self) -> None:
        """An C{input()} prompt was shown and answered: the answer's Enter (or the
        line saying another client answered) ended the terminal's line.  The
        prompt is not part of the evaluation's output (protocol.md C{send_input}),
        so it is not counted as streamed output."""
        self.line_open = False

    def claim(self, session_id: str | None, index: Any, by: Any, client_id: str) -> bool:
        """An C{evaluation_started}: True when it is the pending evaluation of ours."""
        if (
            self.pending is not None
            and session_id == self.pending
            and self.index is None
            and by == client_id
            and isinstance(index, int)
        ):
            self.index = index
            return True
        return False

    def is_current(self, session_id: str | None, index: Any) -> bool:
        return self.pending is not None and session_id == self.pending and index == self.index

    def is_own(self, session_id: str | None, index: Any) -> bool:
        return self.is_current(session_id, index) or (session_id, index) in self._done

    def end(self, reply_index: Any = None) -> str:
        """The evaluation's reply came: returns the output already streamed
        (L{line_open} stays as it was until the next L{begin})."""
        for index in (self.index, reply_index):
            if self.pending is not None and isinstance(index, int):
                self._done.append((self.pending, index))
        streamed = self.streamed
        self.pending, self.index, self.streamed = None, None, ""
        return streamed


def unstreamed_output(output: str, streamed: str) -> str:
    """The part of a reply's C{output} that the C{output} events did not show yet.

    Events clip a chunk at 64 KiB with a marker, so when the streamed text is not a
    prefix of the reply's output nothing more is printed (it was shown, clipped).
    """
    if not streamed:
        return output
    if output.startswith(streamed):
        return output[len(streamed) :]
    return ""


def reply_history_index(reply: dict[str, Any]) -> int | None:
    """The C{history_index} an C{evaluate} reply names (success or error)."""
    place = reply.get("result") if reply.get("status") == "success" else reply.get("details")
    index = place.get("history_index") if isinstance(place, dict) else None
    return index if isinstance(index, int) else None


def without_streamed_output(
    reply: dict[str, Any], streamed: str, line_open: bool | None = None
) -> tuple[dict[str, Any], bool]:
    """The C{evaluate} reply with only the output the events did not show, and
    whether a newline must end the streamed text before the value is printed.

    @param line_open: whether the terminal's line is still open after the
        streamed text; by default, when that text does not end with a newline.
    """
    key = "result" if reply.get("status") == "success" else "details"
    place = reply.get(key)
    if not streamed or not isinstance(place, dict):
        return reply, False
    rest = unstreamed_output(str(place.get("output") or ""), streamed)
    if line_open is None:
        line_open = not streamed.endswith("\n")
    newline = line_open and not rest
    return dict(reply, **{key: dict(place, output=rest)}), newline


class EvaluationFollower:
    """C{--eval}: stream our evaluations' output and answer their C{input()}.

    Set as the client's C{on_event} after subscribing to the session; only events
    of the evaluation this client runs count (others are ignored).
    """

    def __init__(self, client: Any, *, stream_output: bool, prompt_stream: Any) -> None:
        self.client = client
        self.own = OwnEvaluations()
        self.stream_output = stream_output
        self.prompt_stream = prompt_stream

    def __call__(self, message: dict[str, Any]) -> None:
        data = message.get("data") if isinstance(message.get("data"), dict) else {}
        session_id, index = message.get("session_id"), data.get("history_index")
        event = message.get("event")
        if event == "evaluation_started":
            self.own.claim(session_id, index, data.get("by"), self.client.client_id)
            return
        if not self.own.is_current(session_id, index):
            return
        if event == "output" and self.stream_output:
            text = str(data.get("text") or "")
            self.own.streamed += text
            self.prompt_stream.write(text)
            self.prompt_stream.flush()
        elif event == "input_requested":
            self.answer(str(session_id), data)

    def answer(self, session_id: str, data: dict[str, Any]) -> None:
        import getpass

        prompt = str(data.get("prompt") or "")  # not in the output: not counted as streamed
        self.prompt_stream.write(prompt)
        self.prompt_stream.flush()
        try:
            text = getpass.getpass("") if data.get("password") else input()
        except EOFError:
            text = ""  # no more input: an empty line, as a closed stdin gives
        reply = self.client.call("send_input", {"session_id": session_id, "text": text})
        if reply.get("status") != "success":
            self.prompt_stream.write(
                f"send_input: {reply.get('error_type')}: {reply.get('error')}\n"
            )

    def evaluate(self, code: str, mode: str) -> tuple[dict[str, Any], bool]:
        self.own.begin(self.client.session_id)
        reply: dict[str, Any] = {}
        try:
            reply = self.client.evaluate(code, mode)
        finally:
            streamed = self.own.end(reply_history_index(reply))
        return without_streamed_output(reply, streamed)
