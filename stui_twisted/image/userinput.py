"""C{input()}, C{getpass.getpass()} and C{sys.stdin.readline()} in a cell (events.md §5).

L{install_input_router} replaces C{builtins.input}, C{getpass.getpass} and
C{sys.stdin} once with routers that ask the calling thread's reader
(L{answering_input}: set on a session's worker thread while it evaluates);
a thread without one (a thread user code started, the event loop) gets the
originals, which read the image's stdin and so see end of file at once.

A reader is C{ask(prompt, password) -> text} and may raise C{EOFError}.
C{input()} and C{getpass()} return the text without one trailing newline;
C{sys.stdin.readline()} returns it with one.  The prompt is not written to
the cell's output: it travels in the C{input_requested} event.
"""

from __future__ import annotations

import builtins
import getpass
import sys
import threading

_state = threading.local()
_install_lock = threading.Lock()
_originals: dict = {}


def _reader():
    return getattr(_state, "ask", None)


def routed_input(prompt="") -> str:
    """C{input()}: the thread's reader answers, else the original C{input}."""
    ask = _reader()
    if ask is None:
        return _originals["input"](prompt)
    return ask(str(prompt), False).removesuffix("\n")


def routed_getpass(prompt="Password: ", stream=None) -> str:
    """C{getpass.getpass()}: like L{routed_input}, the request marked C{password}."""
    ask = _reader()
    if ask is None:
        return _originals["getpass"](prompt, stream)
    return ask(str(prompt), True).removesuffix("\n")


class StdinRouter:
    """Stands in for C{sys.stdin}: C{readline()} asks the thread's reader."""

    def __init__(self, fallback) -> None:
        self.fallback = fallback

    def readline(self, size: int = -1) -> str:
        ask = _reader()
        if ask is None:
            return self.fallback.readline(size) if self.fallback is not None else ""
        text = ask("", False)
        return text if text.endswith("\n") else text + "\n"

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name):
        return getattr(self.fallback, name)


def install_input_router() -> None:
    """Route C{input}, C{getpass.getpass} and C{sys.stdin} (idempotent)."""
    with _install_lock:
        if builtins.input is not routed_input:
            _originals["input"] = builtins.input
            builtins.input = routed_input
        if getpass.getpass is not routed_getpass:
            _originals["getpass"] = getpass.getpass
            getpass.getpass = routed_getpass
        if not isinstance(sys.stdin, StdinRouter):
            sys.stdin = StdinRouter(sys.stdin)


class answering_input:
    """Context manager: this thread's C{input()} is answered by C{ask}."""

    def __init__(self, ask) -> None:
        self._ask = ask
        self._previous = None

    def __enter__(self) -> None:
        install_input_router()
        self._previous = _reader()
        _state.ask = self._ask

    def __exit__(self, *exc_info) -> None:
        _state.ask = self._previous
