"""What the image writes to its stdout and stderr, as bounded, rate-limited log lines.

User code that writes outside an evaluation (a background thread's C{print},
C{os.write(1, ...)}, a C library) reaches the image's fds 1 and 2, which the
supervisor reads.  Each line becomes one server log line, cut at
L{MAX_LOG_LINE} characters; beyond L{MAX_LINES_PER_INTERVAL} lines or
L{MAX_BYTES_PER_INTERVAL} bytes per L{INTERVAL} seconds and stream the rest
is dropped, and one warning per interval says how much was dropped.  The
pipes are always read (a full pipe would block the image), so a flood costs
the server CPU to count the bytes, never memory or log space.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.logger import Logger

MAX_LOG_LINE = 2000
"""Characters of one output line that reach the log."""
INTERVAL = 1.0
MAX_LINES_PER_INTERVAL = 100
MAX_BYTES_PER_INTERVAL = 64 * 1024


class ChildOutputLog:
    """Turns one of the image's output fds into bounded, rate-limited log lines.

    @param logger: where the lines go.
    @param stream: C{"stdout"} or C{"stderr"}, named in every line.
    @param now: the clock (C{IReactorTime.seconds}).
    """

    def __init__(self, logger: Logger, stream: str, now: Callable[[], float]) -> None:
        self._log = logger
        self._stream = stream
        self._now = now
        self._pending = b""
        self.pid: int | None = None
        self._window_started = now()
        self._lines = 0
        self._bytes = 0
        self.dropped_lines = 0
        self.dropped_bytes = 0
        self._dropping = False

    def feed(self, data: bytes) -> None:
        """Take bytes the image wrote; log what the limits allow."""
        self._roll_window()
        if self._dropping:
            self._drop(data)
            return
        self._pending += data
        while not self._dropping:
            newline = self._pending.find(b"\n")
            if newline < 0:
                if len(self._pending) > MAX_LOG_LINE:
                    self._emit(self._pending[:MAX_LOG_LINE])
                    self._pending = self._pending[MAX_LOG_LINE:]
                    continue
                return
            line, self._pending = self._pending[:newline], self._pending[newline + 1 :]
            self._emit(line)
        # Over the limit: the rest of this data is only counted.
        rest, self._pending = self._pending, b""
        self._drop(rest)

    def flush(self) -> None:
        """Log what is left (the image ended), and what was dropped."""
        if self._pending and not self._dropping:
            self._emit(self._pending)
        self._pending = b""
        self._report_dropped()

    def _emit(self, raw: bytes) -> None:
        if self._lines >= MAX_LINES_PER_INTERVAL or self._bytes >= MAX_BYTES_PER_INTERVAL:
            self._dropping = True
            self._drop(raw + b"\n")
            return
        self._lines += 1
        self._bytes += len(raw) + 1
        text = raw[:MAX_LOG_LINE].decode("utf-8", "replace").rstrip("\r")
        if len(raw) > MAX_LOG_LINE:
            text += " [...]"
        self._log.info(
            "image[{pid}] {stream}: {line}", pid=self.pid, stream=self._stream, line=text
        )

    def _drop(self, data: bytes) -> None:
        self.dropped_bytes += len(data)
        self.dropped_lines += data.count(b"\n")

    def _roll_window(self) -> None:
        now = self._now()
        if now - self._window_started < INTERVAL:
            return
        self._report_dropped()
        self._window_started = now
        self._lines = self._bytes = 0
        self._dropping = False

    def _report_dropped(self) -> None:
        if self.dropped_bytes:
            self._log.warn(
                "image[{pid}] {stream}: dropped {lines} lines ({bytes} bytes) of output over "
                "the log limit ({limit_lines} lines or {limit_bytes} bytes per {interval:g} s)",
                pid=self.pid,
                stream=self._stream,
                lines=self.dropped_lines,
                bytes=self.dropped_bytes,
                limit_lines=MAX_LINES_PER_INTERVAL,
                limit_bytes=MAX_BYTES_PER_INTERVAL,
                interval=INTERVAL,
            )
        self.dropped_lines = self.dropped_bytes = 0
