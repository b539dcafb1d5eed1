"""Evaluations from start to end: who runs, their C{input()}, C{get_evaluation} (events.md §4-§5).

An evaluation gets its history index when it starts and is a
L{RunningEvaluation} until its outcome is recorded; L{RunningEvaluations}
keeps them per session (one runs in the image, later ones wait behind it),
routes the image's C{input()} requests to C{send_input}, and answers what
C{get_evaluation} shows of one that runs.  It sees the service through the
same view as L{stui_twisted.sessions.live.LiveSessions}, and, when they are
wired, its C{events} hub and C{connections} registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet import defer

from stui_twisted.events import hooks as event_hooks
from stui_twisted.protocol.envelope import iso_timestamp
from stui_twisted.protocol.errors import StuiError, invalid_parameter
from stui_twisted.sessions.model import Session

MAX_HISTORY_TEXT = 64 * 1024
NO_CLIENT = (
    "input() cannot be answered: no client is attached to session {session_id} "
    "(nobody is subscribed to it and the connection that started the evaluation is gone)"
)


def clip(text, limit: int = MAX_HISTORY_TEXT):
    """C{text} cut to C{limit} characters with a note of what was cut."""
    if isinstance(text, str) and len(text) > limit:
        return text[:limit] + f"... [{len(text) - limit} more characters]"
    return text


@dataclass
class RunningEvaluation:
    """One evaluation from its start (its history index assigned) to its end.

    @ivar context: the L{ConnectionContext} that started it, or None.
    @ivar done: fires with the L{EvaluationOutcome}, or fails with its StuiError.
    @ivar input_wait: while its C{input()} waits for C{send_input}: the Deferred
        the answer fires (with the AMP answer C{{text}} or C{{eof}}).
    @ivar ended: its history entry is made (it finished, or the server stopped).
    """

    session: Session
    index: int
    code: str
    started: float
    by: str | None
    context: Any = None
    done: Any = None
    input_wait: defer.Deferred | None = None
    prompt: str | None = None
    password: bool = False
    ended: bool = False

    def answer_input(self, answer: dict) -> None:
        """End a wait in C{input()} (if any) with the image's answer."""
        if self.input_wait is not None:
            waiting, self.input_wait, self.prompt = self.input_wait, None, None
            waiting.callback(answer)


class RunningEvaluations:
    """The evaluations not ended yet, by session and history index."""

    def __init__(self, view) -> None:
        self.view = view
        self._by_session: dict[str, dict[int, RunningEvaluation]] = {}

    def __bool__(self) -> bool:
        return bool(self._by_session)

    def add(self, run: RunningEvaluation) -> None:
        self._by_session.setdefault(run.session.session_id, {})[run.index] = run

    def forget(self, run: RunningEvaluation) -> None:
        """C{run} ended: forget it; an C{input()} it waited in gets end of file."""
        runs = self._by_session.get(run.session.session_id)
        if runs is not None and runs.get(run.index) is run:
            del runs[run.index]
            if not runs:
                del self._by_session[run.session.session_id]
        run.answer_input({"eof": "the evaluation ended"})

    def all(self) -> list[RunningEvaluation]:
        return [run for runs in self._by_session.values() for run in runs.values()]

    def _of(self, session_id: str) -> dict[int, RunningEvaluation]:
        return self._by_session.get(session_id) or {}

    # -- input() ---------------------------------------------------------

    def someone_can_answer(self, run: RunningEvaluation) -> bool:
        """Whether a client can answer C{run}'s C{input()}: a conversation is
        subscribed to the session, or the one that started it is still there
        and can still send (a TCP client that half-closed cannot)."""
        hub = getattr(self.view, "events", None)
        if hub is not None and hub.subscribers(run.session.session_id):
            return True
        connections = getattr(self.view, "connections", None)
        connection = getattr(run.context, "connection", None)
        return (
            connection is not None
            and connections is not None
            and connection in connections
            and not getattr(connection, "input_ended", False)
        )

    def input_requested(self, session_id: str, index, prompt: str, password: bool):
        """A cell called C{input()}: a Deferred of the image's answer, C{{text}}
        once C{send_input} gives it, or C{{eof}} at once if nobody can answer."""
        runs = self._of(session_id)
        run = runs.get(index) if index is not None else None
        if run is None and runs:
            run = runs[min(runs)]  # the one that runs: the others wait behind it
        if run is None or run.ended:
            return defer.succeed({"eof": "input() cannot be answered: the evaluation ended"})
        if not self.someone_can_answer(run):
            return defer.succeed({"eof": NO_CLIENT.format(session_id=session_id)})
        run.input_wait = defer.Deferred()
        run.prompt, run.password = prompt, bool(password)
        event_hooks.publish(
            self.view,
            session_id,
            "input_requested",
            {"history_index": run.index, "prompt": prompt, "password": run.password},
        )
        return run.input_wait

    def send_input(self, session: Session, text: str) -> int:
        """Answer the C{input()} the session's evaluation waits in; its history index."""
        for run in self._of(session.session_id).values():
            if run.input_wait is not None:
                run.answer_input({"text": text})
                return run.index
        raise StuiError(
            "InvalidRequest",
            f"nothing in session {session.session_id!r} is waiting for input",
            session_id=session.session_id,
        )

    # -- get_evaluation ----------------------------------------------------

    def output_so_far(self, session_id: str, index: int) -> str:
        """The C{output} events of evaluation C{index} still in the session's log."""
        hub = getattr(self.view, "events", None)
        if hub is None:
            return ""
        parts = [
            event["data"].get("text") or ""
            for event in hub.event_log(session_id).since(0)
            if event.get("event") == "output"
            and event.get("data", {}).get("history_index") == index
        ]
        return clip("".join(parts))

    def evaluation(self, session: Session, index: int) -> dict:
        """Evaluation C{index}: its history entry (or, while it runs, what is
        known so far) and C{running}."""
        run = self._of(session.session_id).get(index)
        if run is not None and not run.ended:
            waiting = run.input_wait is not None
            return {
                "index": index,
                "code": clip(run.code),
                "timestamp": iso_timestamp(run.started),
                "by": run.by or session.client_id,
                "running": True,
                "output": self.output_so_far(session.session_id, index),
                "input_requested": (
                    {"prompt": run.prompt, "password": run.password} if waiting else None
                ),
            }
        for entry in reversed(session.history):
            if entry.get("index") == index:
                return dict(entry, running=False)
        kept = (
            f"its history keeps {session.history[0]['index']} to {session.history[-1]['index']}"
            if session.history
            else "its history is empty"
        )
        raise invalid_parameter(
            "history_index",
            f"names no evaluation of session {session.session_id!r} ({kept})",
            history_index=index,
        )
