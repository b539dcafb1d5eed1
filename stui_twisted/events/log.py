"""One session's durable, bounded event log: an append file of checked lines.

Each line of C{<data_dir>/events/<digest>.log} is C{<crc32 hex8> <json>\\n}; the
JSON is either an event message or C{{"seq_floor": N}} (written when the log
is compacted or cleared, so sequence numbers keep counting across restarts).
A line whose checksum does not match (a torn last write) is ignored on load.

The file is first read in a thread (L{read}; L{load} then applies it on the
reactor, see L{EventHub.load<stui_twisted.events.hub.EventHub.load>}).
Nothing touches the file on the reactor thread: an append keeps the line in
memory, and L{sync} writes what is pending and fsyncs it in a thread (the
file is opened per write, so no descriptor is held per session).  Under
C{always} the service awaits L{sync} before a reply, so an event is on disk
before any reply that follows it; otherwise the hub syncs within the flush
interval.  The file is rewritten (temp file, fsync, rename) when it holds
twice the retained events or bytes, so it stays bounded too.  File jobs run
one at a time, in the order they were asked for (a L{defer.DeferredLock}),
so a rewrite never loses an append and a removal comes after both.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import zlib
from collections import deque

from twisted.internet import defer, threads
from twisted.logger import Logger

from stui_twisted.protocol.jsoncodec import COMPACT_ALLOW_NAN
from stui_twisted.storage import durable
from stui_twisted.storage.fileformat import write_all

log = Logger()

#: Output text is clipped at this many characters per event (events.md §3).
MAX_OUTPUT_TEXT = 64 * 1024


def _line(message: dict) -> bytes:
    body = COMPACT_ALLOW_NAN.encode(message).encode("utf-8", "surrogatepass")
    return b"%08x %s\n" % (zlib.crc32(body), body)


def _body(line: bytes) -> bytes:
    """The JSON of a checked line (what a subscriber is sent)."""
    return line[9:].rstrip(b"\n")


def _decode(body: bytes) -> dict:
    return json.loads(body.decode("utf-8", "surrogatepass"))


def _parse(line: bytes) -> dict | None:
    """The JSON of one checked line, or C{None} if it is torn or corrupt."""
    if len(line) < 10 or line[8:9] != b" ":
        return None
    body = _body(line)
    try:
        if int(line[:8], 16) != zlib.crc32(body):
            return None
        value = _decode(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def log_path(data_dir: str, session_id: str) -> str:
    """Where the log of C{session_id} lives (a digest: ids are capabilities)."""
    digest = hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()[:40]
    return os.path.join(data_dir, "events", digest + ".log")


class EventLog:
    """The retained events of one session, in memory and in its append file."""

    def __init__(self, path: str | None, *, limit: int = 1000, max_bytes: int = 4 * 1024**2):
        self.path = path
        self.limit = limit
        self.max_bytes = max_bytes
        # (seq, checked line): kept encoded, as written and as sent; decoded when read
        self.events: deque[tuple[int, bytes]] = deque()
        self.bytes = 0
        self.last_seq = 0
        self._floor = 0  # highest seq trimmed or cleared away
        self._open = False
        self._file_lines = 0
        self._file_bytes = 0
        self._pending: list[bytes] = []  # appended, not yet handed to a file job
        self._jobs = defer.DeferredLock()  # file jobs, one at a time, in order

    # -- opening ---------------------------------------------------------

    def open(self) -> None:
        """Read the file (if any) and open it for appending (L{read} then L{load})."""
        self.load(self.read())

    def read(self) -> tuple[list[tuple[dict | None, bytes]], bool]:
        """The file's lines, each with its JSON (None: torn or corrupt), and whether
        its last line is torn; touches nothing of this log, so it may run in a thread."""
        if self.path is None:
            return [], False
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        try:
            with open(self.path, "rb") as handle:
                lines = handle.readlines()
        except FileNotFoundError:
            lines = []
        torn = bool(lines) and not lines[-1].endswith(b"\n")
        return [(_parse(raw), raw) for raw in lines], torn

    def load(self, read: tuple[list[tuple[dict | None, bytes]], bool]) -> None:
        """Take what L{read} found and open the file for appending."""
        if self.path is None:
            return
        values, torn = read
        for value, raw in values:
            if value is None:
                continue
            if "seq_floor" in value:
                self._floor = max(self._floor, int(value["seq_floor"]))
                self.last_seq = max(self.last_seq, self._floor)
                self.events.clear()
                self.bytes = 0
                continue
            seq = value.get("seq")
            if not isinstance(seq, int) or seq <= self.last_seq:
                continue
            self._keep(seq, raw if raw.endswith(b"\n") else raw + b"\n")
        self._file_lines = len(values)
        self._file_bytes = sum(len(raw) for _value, raw in values)
        self._open = True
        if torn:
            self._pending.insert(0, b"\n")  # a torn last line must not swallow the next one

    def close(self) -> defer.Deferred:
        """Stop appending; fires once what was appended is written (L{sync})."""
        settled = self.sync()
        self._open = False
        return settled

    # -- reading -----------------------------------------------------------

    @property
    def first_seq(self) -> int:
        """The oldest seq still kept (C{last_seq + 1} when the log is empty)."""
        return self.events[0][0] if self.events else self.last_seq + 1

    def since(self, since: int, limit: int | None = None) -> list[dict]:
        """Kept events with C{seq > since}, oldest first, at most C{limit}."""
        return [_decode(body) for _seq, body in self.since_encoded(since, limit)]

    def since_encoded(self, since: int, limit: int | None = None) -> list[tuple[int, bytes]]:
        """Like L{since}, as C{(seq, JSON bytes)} (what is pushed to a subscriber)."""
        out = []
        for seq, line in self.events:
            if seq > since:
                out.append((seq, _body(line)))
                if limit is not None and len(out) >= limit:
                    break
        return out

    def truncated(self, since: int) -> bool:
        """Whether events after C{since} were trimmed away."""
        return since < self.first_seq - 1

    # -- writing -----------------------------------------------------------

    def next_seq(self) -> int:
        return self.last_seq + 1

    def append(self, message: dict) -> bytes:
        """Keep C{message} (its C{seq} is L{next_seq}) for the file's next write
        (L{sync}); answers its JSON (encoded once, for the file and the subscribers)."""
        line = _line(message)
        self._keep(message["seq"], line)
        if self._open:
            self._pending.append(line)
            self._file_lines += 1
            self._file_bytes += len(line)
            if self._too_big():
                self._compact()
        return _body(line)

    @property
    def unwritten(self) -> bool:
        """Whether appends wait for a write, or a file job runs (L{sync} has work)."""
        return bool(self._pending) or self._jobs.locked

    def _too_big(self) -> bool:
        return self._file_lines > 2 * self.limit or self._file_bytes > 2 * self.max_bytes

    def clear(self) -> None:
        """Forget every event; C{seq} keeps counting (clear_context part C{events})."""
        self._floor = self.last_seq
        self.events.clear()
        self.bytes = 0
        if self._open:
            self._compact()

    def _keep(self, seq: int, line: bytes) -> None:
        self.events.append((seq, line))
        self.bytes += len(line)
        self.last_seq = seq
        while self.events and (len(self.events) > self.limit or self.bytes > self.max_bytes):
            old_seq, old_line = self.events.popleft()
            self.bytes -= len(old_line)
            self._floor = old_seq

    def _compact(self) -> None:
        """Replace the file by the kept events (bounded: at most C{max_bytes}), in
        a thread after the file jobs before it; what is pending is in them."""
        lines = [_line({"seq_floor": self._floor})]
        lines.extend(line for _seq, line in self.events)
        data = b"".join(lines)
        self._pending = []
        self._file_lines, self._file_bytes = len(lines), len(data)
        done = self._jobs.run(threads.deferToThread, _replace_file, self.path, data)
        done.addErrback(self._compaction_failed, data)

    def _compaction_failed(self, failure, data: bytes) -> None:
        # Appending the rewrite's lines is the same log (its seq_floor line
        # drops what came before, duplicates of a seq are skipped on load).
        log.failure("an event log could not be compacted", failure, path=self.path)
        self._pending.insert(0, data)

    def sync(self) -> defer.Deferred:
        """Write what was appended and fsync it (in a thread, after the file jobs
        before it); fires when it is on disk.  Fails if it could not be written
        (it stays pending: the next sync tries again)."""
        if self.path is None:
            return defer.succeed(None)
        if not self._pending:
            if not self._jobs.locked:
                return defer.succeed(None)  # nothing written or being written
            return self._jobs.run(defer.succeed, None)  # what runs now finishes first
        data = b"".join(self._pending)
        self._pending = []
        done = self._jobs.run(threads.deferToThread, _append_and_fsync, self.path, data)

        def failed(failure):
            self._pending.insert(0, data)
            return failure

        return done.addErrback(failed)


def _write_synced(path: str, flags: int, data: bytes) -> None:
    """Open C{path} with C{flags} (mode 0600), write all of C{data}, fsync, close."""
    fd = os.open(path, flags, 0o600)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_file(path: str, data: bytes) -> None:
    """Write C{data} to a temp file, fsync it, rename it over C{path}, fsync the directory."""
    temp = path + ".tmp"  # a fixed name: L{remove_log} removes one a crash left
    _write_synced(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, data)
    os.replace(temp, path)
    durable.fsync_dir(os.path.dirname(path))


def remove_log(path: str) -> None:
    """Delete a log file and a temp file a rewrite may have left (missing is fine)."""
    for name in (path, path + ".tmp"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(name)


def _append_and_fsync(path: str, data: bytes) -> None:
    """Append C{data} to C{path} (created if missing), fsync it and its directory."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    _write_synced(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, data)
    durable.fsync_dir(os.path.dirname(path))
