"""Output capture: what a cell prints goes to its own bounded buffer, per thread.

L{install_output_router} replaces C{sys.stdout}/C{sys.stderr} once with a
L{ThreadOutputRouter} that sends each thread's writes to the buffer that
thread is capturing into (L{captured_output}), or to the real stream; a
L{BoundedTextBuffer} keeps at most its limit and counts the rest, and hands
what it keeps to its C{stream} (an evaluation's
L{stui_twisted.image.streaming.OutputStream}), if it has one.
"""

from __future__ import annotations

import sys
import threading

from stui_twisted.image.asyncloop import current_sink

MiB = 1024 * 1024
MAX_OUTPUT_CHARS = 1 * MiB
"""Characters of output one evaluation keeps."""


# -- output capture -------------------------------------------------------------------------


class BoundedTextBuffer:
    """Collects text up to a size, then notes how much was dropped.

    @param stream: gets C{write(name, text)} of every part kept (while the
        code runs) and, from L{finish}, the note of what was dropped; so what
        it was given adds up to L{getvalue}.
    """

    def __init__(self, limit: int = MAX_OUTPUT_CHARS, stream=None) -> None:
        self._limit = limit
        self._parts: list[str] = []
        self._size = 0
        self._dropped = 0
        self._stream = stream

    def write(self, text: str, name: str = "stdout") -> None:
        room = self._limit - self._size
        if len(text) > room:
            self._dropped += len(text) - max(room, 0)
            text = text[: max(room, 0)]
        if text:
            self._parts.append(text)
            self._size += len(text)
            if self._stream is not None:
                self._stream.write(name, text)

    def _dropped_note(self) -> str:
        return f"\n[output truncated: {self._dropped} more characters]\n" if self._dropped else ""

    def finish(self) -> None:
        """The code has ended: hand the stream the note of what was dropped."""
        note = self._dropped_note()
        if note and self._stream is not None:
            self._stream.write("stdout", note)

    def getvalue(self) -> str:
        return "".join(self._parts) + self._dropped_note()


_capture_state = threading.local()
_install_lock = threading.Lock()


class ThreadOutputRouter:
    """Stands in for C{sys.stdout}/C{sys.stderr}: writes go to the calling
    thread's capture buffer when it has one, else to the real stream.

    Installed once; this is what keeps concurrent sessions' output apart.
    """

    def __init__(self, fallback, name: str = "stdout") -> None:
        self.fallback = fallback
        self.name = name

    def write(self, text) -> int:
        buffer = getattr(_capture_state, "buffer", None)
        if buffer is None:
            # a coroutine of a cell (or a task it made) on the image's event loop
            buffer = current_sink.get()
        if buffer is None:
            return self.fallback.write(text)
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        buffer.write(text, self.name)
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
    """Route C{sys.stdout}/C{sys.stderr} through L{ThreadOutputRouter} (idempotent)."""
    with _install_lock:
        if not isinstance(sys.stdout, ThreadOutputRouter):
            sys.stdout = ThreadOutputRouter(sys.stdout, "stdout")
        if not isinstance(sys.stderr, ThreadOutputRouter):
            sys.stderr = ThreadOutputRouter(sys.stderr, "stderr")


class captured_output:
    """Context manager: this thread's stdout/stderr go into C{buffer}."""

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
