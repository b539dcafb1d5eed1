"""Durable session files: the only code that reads or writes the data directory.

Layout (architecture.md, Persistence)::

    DATA/secret.key                           32 random bytes, the HMAC key (0600)
    DATA/index.json                           meta of every session (MAC'd)
    DATA/shared.json, shared.json.bak         the image-wide shared bindings (MAC'd)
    DATA/sessions/<client-dir>/<sid>.json     one session; <sid>.json.bak its previous version
    DATA/quarantine/                          unreadable files, moved here, never deleted

Directories are 0700 and files 0600.  ``<client-dir>`` comes from
L{stui_twisted.storage.pathcodec.encode_client_dir}, so no client id can name a path outside
``DATA/sessions/``.

Every file is one JSON object, the I{envelope}::

    {"format": "stui-session", "version": 1, "saved_at": "2026-11-23T10:30:00.123Z",
     "mac": "hmac-sha256:<hex>", "session": {...}}

(``shared.json`` has format ``stui-shared`` and its payload under ``bindings``;
``index.json`` has format ``stui-index``, its payload under ``sessions`` and an extra
``saved_at_ns``.)  The MAC is HMAC-SHA256, keyed with ``secret.key``, over the
canonical JSON (sorted keys, compact separators, ASCII) of the envelope without
``mac``.

A write is: temp file in the same directory, write, fsync, hard-link the old file to
``.bak`` (atomically, via a temp name), rename the temp file over the file, fsync the
directory.  All file I/O runs in the store's own thread pool (plus, for the temp
files of one C{write_many}, a few fsync helper threads, so the filesystem can commit
them together); the reactor thread only serializes the snapshot (so later changes to
the caller's dict cannot leak into it; about 90 ms for an 8 MiB session) and keeps
counters.  Operations on one session run one at a time, in call order, and
consecutive writes of one session coalesce: only the newest waiting snapshot is
written, and every caller's Deferred fires once a write holding its snapshot or a
later one is on disk.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import hmac
import json
import os
import secrets
import stat
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from stui_twisted.protocol.errors import StorageFailure, StuiError
from stui_twisted.storage.interface import ISessionStore
from stui_twisted.storage.pathcodec import check_session_id, decode_client_dir, encode_client_dir

__all__ = [
    "META_KEYS",
    "SessionFileCorrupt",
    "SessionFileMissing",
    "SessionStore",
    "WriteResult",
]

#: The keys of a session dict the store reads (everything else is opaque to it).
META_KEYS = (
    "session_id",
    "client_id",
    "state",
    "created_at",
    "last_modified",
    "last_activity",
    "timeout",
    "closed_at",
)

SECRET_KEY_BYTES = 32
DIR_MODE = 0o700
FILE_MODE = 0o600
MAC_PREFIX = "hmac-sha256:"
FORMAT_VERSION = 1

#: Session files modified later than this before the index snapshot are read again by
#: load_index (file mtimes come from a coarse kernel clock, a few ms behind time_ns()).
INDEX_MTIME_SLACK_NS = 2_000_000_000

#: load_index removes temp files of interrupted writes once they are this old (a
#: younger one may belong to a write still running).
STALE_TEMP_SECONDS = 3600

#: Threads that write and fsync the temp files of one write_many in parallel.
FSYNC_HELPERS = 8

_OPEN_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_OPEN_CREATE_FLAGS = (
    os.O_WRONLY
    | os.O_CREAT
    | os.O_EXCL
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
)
_LINK_UNSUPPORTED = {errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}


class SessionFileMissing(KeyError):
    """Neither a session's file nor its backup exists."""

    def __init__(self, client_id: str, session_id: str) -> None:
        super().__init__(session_id)
        self.client_id = client_id
        self.session_id = session_id

    def __str__(self) -> str:
        return f"no file for session {self.session_id!r} of client {self.client_id!r}"


class SessionFileCorrupt(StorageFailure):
    """A file and its backup both failed verification; both are now in quarantine.

    @ivar path: the main file's path.
    @ivar reasons: why each copy was refused, e.g. C{{"main": "MAC mismatch"}}.
    @ivar quarantined: where the bad copies were moved.
    """

    def __init__(self, path: str, reasons: dict[str, str], quarantined: list[str]) -> None:
        detail = "; ".join(f"{which}: {why}" for which, why in reasons.items())
        super().__init__(f"{path} and its backup are unreadable ({detail})")
        self.path = path
        self.reasons = reasons
        self.quarantined = quarantined


@dataclass(frozen=True)
class WriteResult:
    """What one durable write put on disk."""

    size_bytes: int
    checksum: str  # "sha256:<hex>" of the file's bytes
    saved_at: str  # ISO-8601 UTC with milliseconds and Z


class _BadFile(Exception):
    """A file's bytes are not a valid envelope (internal; the message is the reason)."""


@dataclass(frozen=True)
class _Envelope:
    format: str
    payload_key: str


_SESSION_ENVELOPE = _Envelope("stui-session", "session")
_SAVED_ENVELOPE = _Envelope("stui-saved-context", "session")
"""What C{save_context} saved, beside the session file: a different format, so
the MAC never lets one file stand in for the other."""
SAVED_SUFFIX = ".saved.json"
_SHARED_ENVELOPE = _Envelope("stui-shared", "bindings")
_INDEX_ENVELOPE = _Envelope("stui-index", "sessions")

_SHARED_KEY = ("", "shared.json")
_INDEX_KEY = ("", "index.json")


@dataclass(frozen=True)
class _Target:
    """One file the store manages, and how to check it."""

    key: tuple[str, str]
    path: str
    envelope: _Envelope
    keep_backup: bool
    client_id: str | None = None
    session_id: str | None = None

    @property
    def backup_path(self) -> str:
        return self.path + ".bak"


@dataclass(frozen=True)
class _Snapshot:
    """A serialized payload waiting to be written to C{target}."""

    target: _Target
    payload_json: bytes
    size_bytes: int
    extra_fields: dict[str, Any] = field(default_factory=dict)
    saved_at: str | None = None
    """The envelope's C{saved_at}, when the caller stamps the write itself."""


@dataclass
class _PendingWrite:
    snapshot: _Snapshot
    waiters: list[defer.Deferred]


@dataclass
class _PendingTask:
    run: Callable[[], defer.Deferred]
    waiter: defer.Deferred


@dataclass
class _Lane:
    """The queue of operations on one file; at most one runs at a time."""

    running: bool = False
    queue: deque = field(default_factory=deque)


def utc_iso(timestamp: float) -> str:
    """C{timestamp} as ISO-8601 UTC with milliseconds and C{Z}."""
    moment = datetime.fromtimestamp(timestamp, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def canonical_json(value: Any) -> bytes:
    """The canonical JSON the MAC covers: sorted keys, compact, ASCII, no NaN."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def _compose(fields: dict[str, Any], payload_key: str, payload_json: bytes) -> bytes:
    """Canonical JSON of C{fields} plus C{payload_key}, splicing in pre-made payload JSON."""
    parts = []
    for key in sorted([*fields, payload_key]):
        value = payload_json if key == payload_key else canonical_json(fields[key])
        parts.append(canonical_json(key) + b":" + value)
    return b"{" + b",".join(parts) + b"}"


def _seal(
    envelope: _Envelope,
    payload_json: bytes,
    secret_key: bytes,
    saved_at: str,
    extra_fields: dict[str, Any] | None = None,
) -> bytes:
    """The complete file bytes of an envelope around C{payload_json}."""
    fields = {"format": envelope.format, "version": FORMAT_VERSION, "saved_at": saved_at}
    fields.update(extra_fields or {})
    signed = _compose(fields, envelope.payload_key, payload_json)
    mac = MAC_PREFIX + hmac.new(secret_key, signed, hashlib.sha256).hexdigest()
    return _compose({**fields, "mac": mac}, envelope.payload_key, payload_json) + b"\n"


def _unseal(data: bytes, envelope: _Envelope, secret_key: bytes) -> dict[str, Any]:
    """The parsed envelope in C{data}, once its format and MAC check out.

    @raise _BadFile: with the reason it was refused.
    """
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise _BadFile(f"not JSON ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(document, dict):
        raise _BadFile("not a JSON object")
    if document.get("format") != envelope.format:
        raise _BadFile(f"format is {document.get('format')!r}, expected {envelope.format!r}")
    version = document.get("version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise _BadFile(f"version is {version!r}, expected {FORMAT_VERSION}")
    mac = document.get("mac")
    if not isinstance(mac, str) or not mac.startswith(MAC_PREFIX):
        raise _BadFile("no hmac-sha256 MAC")
    if envelope.payload_key not in document:
        raise _BadFile(f"no {envelope.payload_key!r} member")
    unsigned = {key: value for key, value in document.items() if key != "mac"}
    try:
        signed = json.dumps(unsigned, sort_keys=True, separators=(",", ":")).encode("ascii")
    except (ValueError, TypeError, RecursionError) as exc:
        raise _BadFile(f"cannot re-serialize ({exc})") from None
    expected = MAC_PREFIX + hmac.new(secret_key, signed, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(mac.encode("ascii", "replace"), expected.encode("ascii")):
        raise _BadFile("MAC mismatch (edited, or written with another secret.key)")
    return document


@functools.lru_cache(maxsize=16)
def _envelope_overhead(envelope: _Envelope, extra_items: tuple[tuple[str, Any], ...]) -> int:
    """Bytes an envelope adds around its payload (saved_at and MAC have fixed widths)."""
    return len(_seal(envelope, b"", b"\0" * SECRET_KEY_BYTES, utc_iso(0), dict(extra_items)))


def _storage_failure(action: str, path: str, error: OSError) -> StorageFailure:
    """A StorageFailure naming the path and errno of C{error}."""
    code = errno.errorcode.get(error.errno or 0, str(error.errno))
    failure = StorageFailure(
        f"could not {action} {error.filename or path}: [{code}] {error.strerror or error}"
    )
    failure.path = error.filename or path
    failure.errno = error.errno
    return failure


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _remove_quietly(path: str) -> None:
    """Remove a temp file of ours that may or may not exist."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return


def _temp_name(path: str) -> str:
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.tmp-{secrets.token_hex(6)}")


def _write_temp(path: str, data: bytes) -> str:
    """Write C{data} to a fresh 0600 temp file beside C{path}, fsync it, return its name."""
    temp_path = _temp_name(path)
    fd = os.open(temp_path, _OPEN_CREATE_FLAGS, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        _write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _remove_quietly(temp_path)
        raise
    os.close(fd)
    return temp_path


def _keep_backup(path: str) -> None:
    """Make C{path}.bak the current C{path} (if any), replacing the old backup atomically."""
    backup_path = path + ".bak"
    temp_path = _temp_name(backup_path)
    try:
        os.link(path, temp_path)
    except FileNotFoundError:
        return  # first version: nothing to keep
    except OSError as exc:
        if exc.errno not in _LINK_UNSUPPORTED:
            raise
        with open(path, "rb") as current:
            temp_path_written = _write_temp(backup_path, current.read())
        os.replace(temp_path_written, backup_path)
        return
    try:
        os.replace(temp_path, backup_path)
    except BaseException:
        _remove_quietly(temp_path)
        raise


def _durable_replace(path: str, data: bytes, *, keep_backup: bool, sync_dir: bool) -> None:
    """Temp file → write → fsync → keep old as .bak → rename over C{path} → fsync dir."""
    temp_path = _write_temp(path, data)
    try:
        if keep_backup:
            _keep_backup(path)
        os.replace(temp_path, path)
    except BaseException:
        _remove_quietly(temp_path)
        raise
    if sync_dir:
        _fsync_dir(os.path.dirname(path))


def _read_bytes(path: str) -> bytes:
    fd = os.open(path, _OPEN_READ_FLAGS)
    with os.fdopen(fd, "rb") as handle:
        return handle.read()


def _ensure_dir(path: str, parent_to_sync: str | None = None) -> None:
    """Create C{path} with mode 0700 if missing (fsyncing its parent so it lasts)."""
    if os.path.isdir(path):
        return
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
        return
    os.chmod(path, DIR_MODE)
    if parent_to_sync is not None:
        _fsync_dir(parent_to_sync)


def _meta_of(session: dict[str, Any]) -> dict[str, Any]:
    return {key: session.get(key) for key in META_KEYS}


@implementer(ISessionStore)
class SessionStore:
    """Session files under one data directory, read and written off the reactor thread.

    Construction touches nothing; L{open} creates the directories and the secret key
    and starts the thread pool; L{close} waits for pending work and stops it.

    @ivar data_dir: the data directory (C{DATA}).
    """

    log = Logger()

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        reactor: Any,
        max_session_bytes: int = 8 * 1024 * 1024,
        threadpool: ThreadPool | None = None,
    ) -> None:
        self.data_dir = os.path.abspath(os.fspath(data_dir))
        self.sessions_dir = os.path.join(self.data_dir, "sessions")
        self.quarantine_dir = os.path.join(self.data_dir, "quarantine")
        self.secret_key_path = os.path.join(self.data_dir, "secret.key")
        self.index_path = os.path.join(self.data_dir, "index.json")
        self.shared_path = os.path.join(self.data_dir, "shared.json")
        self.max_session_bytes = max_session_bytes
        self._reactor = reactor
        self._threadpool = threadpool
        self._owns_threadpool = threadpool is None
        self._shutdown_trigger: Any = None
        self._fsync_helpers: ThreadPoolExecutor | None = None
        self._secret_key: bytes | None = None
        self._is_open = False
        self._is_closing = False
        self._lanes: dict[tuple[str, str], _Lane] = {}
        self._active_jobs = 0
        self._idle_waiters: list[defer.Deferred] = []
        # one lock per file being touched; an entry lives while some thread holds it
        self._file_locks: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._file_locks_guard = threading.Lock()
        # cached counters (reactor thread only)
        self._file_info: dict[tuple[str, str], tuple[int, str | None]] = {}
        self._file_bytes = 0
        self._pending_writes = 0
        self._last_flush_at: str | None = None
        self._write_errors = 0
        self._quarantined = 0

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> defer.Deferred:
        """Create the directories and secret key (if missing) and start the pool."""
        if self._is_open:
            return defer.succeed(None)
        if self._threadpool is None:
            self._threadpool = ThreadPool(minthreads=1, maxthreads=4, name="stui-store")
            # a safety net: if nobody calls close(), the pool's threads (not daemons)
            # would keep the process alive after the reactor stopped
            self._shutdown_trigger = self._reactor.addSystemEventTrigger(
                "after", "shutdown", self._reactor_shut_down
            )
        if not self._threadpool.started:
            self._threadpool.start()
        if self._fsync_helpers is None:  # threads start only when a group write needs them
            self._fsync_helpers = ThreadPoolExecutor(
                max_workers=FSYNC_HELPERS, thread_name_prefix="stui-store-fsync"
            )

        def opened(secret_key: bytes) -> None:
            self._secret_key = secret_key
            self._is_open = True
            self._is_closing = False
            self.log.info("session store open at {data_dir}", data_dir=self.data_dir)

        def failed(reason: Failure) -> Failure:
            self._stop_own_pool()
            return reason

        return self._in_pool(self._open_in_thread).addCallbacks(opened, failed)

    def close(self) -> defer.Deferred:
        """Wait for every queued and running operation, then stop the store's pool."""
        if not self._is_open:
            return defer.succeed(None)
        self._is_closing = True
        waiter: defer.Deferred = defer.Deferred()
        self._idle_waiters.append(waiter)
        self._check_idle()

        def closed(_: object) -> None:
            self._is_open = False
            self._stop_own_pool()
            self.log.info("session store closed")

        return waiter.addCallback(closed)

    def _reactor_shut_down(self) -> None:
        self._shutdown_trigger = None  # it is firing: nothing left to remove
        if self._threadpool is not None and self._owns_threadpool:
            self.log.warn("reactor stopped before the session store was closed")
        self._stop_own_pool()

    def _stop_own_pool(self) -> None:
        trigger, self._shutdown_trigger = self._shutdown_trigger, None
        if trigger is not None:
            self._reactor.removeSystemEventTrigger(trigger)
        if self._owns_threadpool and self._threadpool is not None:
            self._threadpool.stop()  # runs what is queued, then joins the threads
            self._threadpool = None
        # after the pool: a queued group write still needs its helpers
        helpers, self._fsync_helpers = self._fsync_helpers, None
        if helpers is not None:
            helpers.shutdown(wait=True)

    def check(self) -> None:
        """Prepare the data directory and read (or create) the key, synchronously.

        For start-up, before the pool or any other thread exists: a directory
        or a key that cannot be used stops the server at once
        (L{StorageFailure}) instead of failing every command later.
        """
        self._open_in_thread()

    def _open_in_thread(self) -> bytes:
        try:
            if not os.path.isdir(self.data_dir):
                os.makedirs(self.data_dir, DIR_MODE, exist_ok=True)
                os.chmod(self.data_dir, DIR_MODE)
            for directory in (self.sessions_dir, self.quarantine_dir):
                _ensure_dir(directory, parent_to_sync=self.data_dir)
                if stat.S_IMODE(os.stat(directory).st_mode) != DIR_MODE:
                    os.chmod(directory, DIR_MODE)
            return self._load_or_create_secret_key()
        except OSError as exc:
            raise _storage_failure("prepare data directory", self.data_dir, exc) from exc

    def _load_or_create_secret_key(self) -> bytes:
        path = self.secret_key_path
        try:
            fd = os.open(path, _OPEN_READ_FLAGS)
        except FileNotFoundError:
            key = secrets.token_bytes(SECRET_KEY_BYTES)
            try:
                fd = os.open(path, _OPEN_CREATE_FLAGS, FILE_MODE)
            except FileExistsError:
                return self._load_or_create_secret_key()  # another process made it
            try:
                os.fchmod(fd, FILE_MODE)
                _write_all(fd, key)
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_dir(self.data_dir)
            self._log_from_thread("info", "created a new secret key at {path}", path=path)
            return key
        with os.fdopen(fd, "rb") as handle:
            if stat.S_IMODE(os.fstat(handle.fileno()).st_mode) & 0o077:
                os.fchmod(handle.fileno(), FILE_MODE)
                self._log_from_thread(
                    "warn", "secret key {path} was readable by others; now 0600", path=path
                )
            key = handle.read(SECRET_KEY_BYTES + 1)
        if len(key) != SECRET_KEY_BYTES:
            raise StorageFailure(
                f"{path} holds {len(key)} bytes, expected {SECRET_KEY_BYTES}; refusing to"
                " start (move it away to start with a new key: existing files will then"
                " fail verification)"
            )
        return key

    # ------------------------------------------------------------------ targets

    def _session_target(self, client_id: str, session_id: str, *, saved: bool = False) -> _Target:
        """The session's file, or with C{saved} the copy C{save_context} made."""
        check_session_id(session_id)
        client_dir = encode_client_dir(client_id)
        # Both names are encoded or checked already; this keeps the path inside
        # sessions_dir even if that ever changes: each must be one plain component.
        for part in (client_dir, session_id):
            if (
                not part
                or part in (".", "..")
                or os.sep in part
                or (os.altsep and os.altsep in part)
            ):
                raise ValueError(f"client id {client_id!r} would leave the sessions directory")
        if saved:
            return _Target(
                key=(client_id, session_id + SAVED_SUFFIX),
                path=os.path.join(self.sessions_dir, client_dir, session_id + SAVED_SUFFIX),
                envelope=_SAVED_ENVELOPE,
                keep_backup=False,
                client_id=client_id,
                session_id=session_id,
            )
        path = os.path.join(self.sessions_dir, client_dir, session_id + ".json")
        return _Target(
            key=(client_id, session_id),
            path=path,
            envelope=_SESSION_ENVELOPE,
            keep_backup=True,
            client_id=client_id,
            session_id=session_id,
        )

    def _shared_target(self) -> _Target:
        return _Target(_SHARED_KEY, self.shared_path, _SHARED_ENVELOPE, keep_backup=True)

    def _index_target(self) -> _Target:
        return _Target(_INDEX_KEY, self.index_path, _INDEX_ENVELOPE, keep_backup=False)

    def _file_lock(self, key: tuple[str, str]) -> threading.Lock:
        with self._file_locks_guard:
            lock = self._file_locks.get(key)
            if lock is None:
                lock = self._file_locks[key] = threading.Lock()
            return lock

    def _snapshot(
        self, target: _Target, payload: Any, extra_fields: dict[str, Any] | None = None
    ) -> _Snapshot:
        """Serialize C{payload} now and check the file's size against the limit."""
        payload_json = canonical_json(payload)
        overhead = _envelope_overhead(target.envelope, tuple(sorted((extra_fields or {}).items())))
        size_bytes = overhead + len(payload_json)
        if target.envelope is not _INDEX_ENVELOPE and size_bytes > self.max_session_bytes:
            what = target.session_id or os.path.basename(target.path)
            raise StuiError(
                "StateTooLarge",
                f"{what} would take {size_bytes} bytes on disk, more than"
                f" max_session_bytes ({self.max_session_bytes})",
                size_bytes=size_bytes,
                max_session_bytes=self.max_session_bytes,
            )
        return _Snapshot(target, payload_json, size_bytes, dict(extra_fields or {}))

    def _session_snapshot(self, session: dict[str, Any]) -> _Snapshot:
        if not isinstance(session, dict):
            raise ValueError(f"a session must be a dict, not {type(session).__name__}")
        target = self._session_target(session.get("client_id"), session.get("session_id"))
        return self._snapshot(target, session)

    # ------------------------------------------------------------------ public API

    def read(self, client_id: str, session_id: str) -> defer.Deferred:
        """The C{session} dict last written for this session (recovering from .bak)."""
        try:
            self._check_open()
            target = self._session_target(client_id, session_id)
        except (ValueError, StorageFailure):
            return defer.fail()
        return self._submit_task(target.key, lambda: self._read_job(target))

    def write(
        self, session: dict[str, Any], *, saved_at: str | None = None, saved_copy: bool = False
    ) -> defer.Deferred:
        """Write C{session} durably; fires with a L{WriteResult}.

        @param saved_at: the envelope's timestamp (default: when it is written).
        @param saved_copy: write the copy that C{save_context} keeps (read back
            with L{read_saved}) instead of the session file.
        """
        try:
            self._check_open()
            if not isinstance(session, dict):
                raise ValueError(f"a session must be a dict, not {type(session).__name__}")
            target = self._session_target(
                session.get("client_id"), session.get("session_id"), saved=saved_copy
            )
            snapshot = self._snapshot(target, session)
        except (ValueError, TypeError, RecursionError, StuiError, StorageFailure):
            return defer.fail()
        if saved_at is not None:
            snapshot = dataclasses.replace(snapshot, saved_at=saved_at)
        return self._submit_write(snapshot)

    def read_saved(self, client_id: str, session_id: str) -> defer.Deferred:
        """What C{save_context} last saved: fires with C{(session dict, saved_at)}.

        Fails with L{SessionFileMissing} (a C{KeyError}) when nothing was saved.
        """
        try:
            self._check_open()
            target = self._session_target(client_id, session_id, saved=True)
        except (ValueError, StorageFailure):
            return defer.fail()
        return self._submit_task(target.key, lambda: self._read_job(target)).addCallback(
            lambda session: (session, self._file_info.get(target.key, (0, None))[1])
        )

    def snapshot(self, session: dict[str, Any]) -> _Snapshot:
        """Serialize C{session} now, for a later L{write_many}.

        A caller that must not hold the reactor for a whole group serializes
        sessions one by one with this, yielding in between, and writes the
        snapshots together.

        @raise StuiError: C{StateTooLarge} over C{max_session_bytes}.
        @raise ValueError: not a session dict, or ids that cannot name a file.
        """
        return self._session_snapshot(session)

    def write_many(self, sessions: list[dict[str, Any] | _Snapshot]) -> defer.Deferred:
        """Write several sessions in one thread job, fsyncing each directory once.

        Each item is a session dict or a L{snapshot} of one.

        Fires with C{{session_id: WriteResult or Failure}}; it never fails as a whole.
        A session with a write already queued or running joins that queue instead
        (so writes of one session stay in order).
        """
        try:
            self._check_open()
        except StorageFailure:
            return defer.fail()
        outcomes: dict[str, defer.Deferred] = {}
        group: dict[tuple[str, str], _Snapshot] = {}
        for session in sessions:
            if isinstance(session, _Snapshot):
                snapshot, name = session, session.target.session_id
            else:
                session_id = session.get("session_id") if isinstance(session, dict) else None
                name = session_id if isinstance(session_id, str) else repr(session_id)
                try:
                    snapshot = self._session_snapshot(session)
                except (ValueError, TypeError, RecursionError, StuiError):
                    outcomes[name] = defer.fail()
                    continue
            key = snapshot.target.key
            if key in group:  # the same session twice in one batch: the last one wins
                group[key] = snapshot
                continue
            lane = self._lanes.get(key)
            if lane is None or not (lane.running or lane.queue):
                self._lanes[key] = lane or _Lane()
                self._lanes[key].running = True
                group[key] = snapshot
                self._pending_writes += 1
                outcomes[name] = defer.Deferred()
            else:
                if name in outcomes:  # superseded by this later snapshot; its result is moot
                    outcomes[name].addErrback(lambda _: None)
                outcomes[name] = self._submit_write(snapshot)
        if group:
            self._start_group(group, outcomes)
        names = list(outcomes)
        gathered = defer.DeferredList([outcomes[name] for name in names], consumeErrors=True)
        return gathered.addCallback(
            lambda results: {name: value for name, (_, value) in zip(names, results, strict=True)}
        )

    def delete(self, client_id: str, session_id: str) -> defer.Deferred:
        """Remove a session's file, its .bak and its saved copy (after their queued
        writes); missing is fine."""
        try:
            self._check_open()
            target = self._session_target(client_id, session_id)
            saved = self._session_target(client_id, session_id, saved=True)
        except (ValueError, StorageFailure):
            return defer.fail()
        deleted = self._submit_task(target.key, lambda: self._delete_job(target))
        return deleted.addCallback(
            lambda _: self._submit_task(saved.key, lambda: self._delete_job(saved))
        )

    def read_shared(self) -> defer.Deferred:
        """The shared namespace bindings last written, or C{{}} if none were."""
        try:
            self._check_open()
        except StorageFailure:
            return defer.fail()
        target = self._shared_target()
        return self._submit_task(target.key, lambda: self._read_shared_job(target))

    def write_shared(self, bindings: dict[str, Any]) -> defer.Deferred:
        """Write the shared namespace bindings durably; fires with a L{WriteResult}."""
        try:
            self._check_open()
            if not isinstance(bindings, dict):
                raise ValueError(f"bindings must be a dict, not {type(bindings).__name__}")
            snapshot = self._snapshot(self._shared_target(), bindings)
        except (ValueError, TypeError, RecursionError, StuiError, StorageFailure):
            return defer.fail()
        return self._submit_write(snapshot)

    def write_index(self, metas: list[dict[str, Any]]) -> defer.Deferred:
        """Write C{DATA/index.json} from C{metas} (meta keys of each session)."""
        try:
            self._check_open()
            entries = []
            for meta in metas:
                if not isinstance(meta, dict):
                    raise ValueError(f"a meta must be a dict, not {type(meta).__name__}")
                key = (meta.get("client_id"), meta.get("session_id"))
                self._session_target(*key)  # validates both ids
                entry = _meta_of(meta)
                size_bytes, saved_at = self._file_info.get(key, (None, None))
                entry["size_bytes"] = meta.get("size_bytes", size_bytes)
                entry["saved_at"] = meta.get("saved_at", saved_at)
                entries.append(entry)
            snapshot = self._snapshot(
                self._index_target(), entries, extra_fields={"saved_at_ns": time.time_ns()}
            )
        except (ValueError, TypeError, StorageFailure):
            return defer.fail()
        return self._submit_write(snapshot).addCallback(lambda _: None)

    def load_index(self) -> defer.Deferred:
        """Meta of every session on disk: the index, reconciled with a stat-only listing.

        Sessions missing from the index, or whose file changed after the index was
        saved, get their meta from the file; entries whose file vanished are dropped.
        No index, or a corrupt one (quarantined), means a full scan.  Each meta has
        the L{META_KEYS} plus C{size_bytes} and C{saved_at}.  Call it at start-up,
        before other operations.
        """
        try:
            self._check_open()
        except StorageFailure:
            return defer.fail()
        return self._in_pool(self._load_index_job).addCallback(self._index_loaded)

    def verify_all(self) -> defer.Deferred:
        """Check every file (for an admin tool); moves nothing.

        Fires with one dict per file: C{path} (relative to the data directory),
        C{kind}, C{client_id}, C{session_id}, C{size_bytes}, C{ok}, C{reason}.
        """
        try:
            self._check_open()
        except StorageFailure:
            return defer.fail()
        return self._in_pool(self._verify_all_job)

    def statistics(self) -> dict[str, Any]:
        """Cached counters; no I/O."""
        return {
            "files": len(self._file_info),
            "bytes": self._file_bytes,
            "pending_writes": self._pending_writes,
            "last_flush_at": self._last_flush_at,
            "write_errors": self._write_errors,
            "quarantined": self._quarantined,
        }

    # ------------------------------------------------------------------ scheduling

    def _check_open(self) -> None:
        if not self._is_open or self._threadpool is None:
            raise StorageFailure(f"session store {self.data_dir} is not open")
        if self._is_closing:
            raise StorageFailure(f"session store {self.data_dir} is closing")

    def _in_pool(self, function: Callable, *args: Any) -> defer.Deferred:
        self._active_jobs += 1
        job = deferToThreadPool(self._reactor, self._threadpool, function, *args)

        def finished(result: object) -> object:
            self._active_jobs -= 1
            self._check_idle()
            return result

        return job.addBoth(finished)

    def _check_idle(self) -> None:
        if self._active_jobs or self._lanes or not self._idle_waiters:
            return
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _submit_write(self, snapshot: _Snapshot) -> defer.Deferred:
        waiter: defer.Deferred = defer.Deferred()
        lane = self._lanes.setdefault(snapshot.target.key, _Lane())
        if lane.queue and isinstance(lane.queue[-1], _PendingWrite):
            lane.queue[-1].snapshot = snapshot  # coalesce: the newest snapshot wins
            lane.queue[-1].waiters.append(waiter)
        else:
            lane.queue.append(_PendingWrite(snapshot, [waiter]))
            self._pending_writes += 1
        self._pump(snapshot.target.key)
        return waiter

    def _submit_task(
        self, key: tuple[str, str], run: Callable[[], defer.Deferred]
    ) -> defer.Deferred:
        waiter: defer.Deferred = defer.Deferred()
        self._lanes.setdefault(key, _Lane()).queue.append(_PendingTask(run, waiter))
        self._pump(key)
        return waiter

    def _pump(self, key: tuple[str, str]) -> None:
        """Start the next queued operation of C{key}'s lane if none is running."""
        lane = self._lanes.get(key)
        if lane is None or lane.running:
            return
        if not lane.queue:
            del self._lanes[key]
            self._check_idle()
            return
        operation = lane.queue.popleft()
        lane.running = True
        if isinstance(operation, _PendingWrite):
            snapshot = operation.snapshot
            running = self._in_pool(self._write_job, snapshot).addBoth(
                self._write_finished, snapshot
            )
            waiters = operation.waiters
        else:
            running = operation.run()
            waiters = [operation.waiter]

        def finished(result: object) -> None:
            # waiters first: close() must not see the store idle before they have fired
            for waiter in waiters:
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)
            lane.running = False
            self._pump(key)

        running.addBoth(finished)

    def _start_group(
        self, group: dict[tuple[str, str], _Snapshot], outcomes: dict[str, defer.Deferred]
    ) -> None:
        snapshots = list(group.values())

        def finished(results: dict[tuple[str, str], object]) -> None:
            for snapshot in snapshots:
                self._lanes[snapshot.target.key].running = False
            for snapshot in snapshots:
                result = results[snapshot.target.key]
                if isinstance(result, BaseException):
                    result = Failure(result)
                result = self._write_finished(result, snapshot)
                waiter = outcomes[snapshot.target.session_id]
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)
            # lanes are released only now, so close() cannot finish before the waiters fired
            for snapshot in snapshots:
                self._pump(snapshot.target.key)

        def crashed(reason: Failure) -> None:  # a bug in the group job itself
            self.log.failure("group write crashed", reason)
            finished({snapshot.target.key: reason.value for snapshot in snapshots})

        self._in_pool(self._write_group_job, snapshots).addCallbacks(finished, crashed)

    def _write_finished(self, result: object, snapshot: _Snapshot) -> object:
        """Update the counters after one write of C{snapshot} (reactor thread)."""
        self._pending_writes -= 1
        target = snapshot.target
        if isinstance(result, Failure):
            self._write_errors += 1
            self.log.error("write of {path} failed: {error}", path=target.path, error=result.value)
            return result
        self._last_flush_at = result.saved_at
        if target.session_id is not None:
            self._set_file_info(target.key, result.size_bytes, result.saved_at)
        return result

    def _set_file_info(self, key: tuple[str, str], size: int, saved_at: str | None) -> None:
        previous = self._file_info.get(key)
        if previous is not None:
            self._file_bytes -= previous[0]
        self._file_info[key] = (size, saved_at)
        self._file_bytes += size

    def _forget_file(self, key: tuple[str, str]) -> None:
        previous = self._file_info.pop(key, None)
        if previous is not None:
            self._file_bytes -= previous[0]

    # ------------------------------------------------------------------ thread side

    def _log_from_thread(self, level: str, format: str, **fields: Any) -> None:
        self._reactor.callFromThread(getattr(self.log, level), format, **fields)

    def _write_job(self, snapshot: _Snapshot) -> WriteResult:
        with self._file_lock(snapshot.target.key):
            prepared = self._prepare_write(snapshot)
            result = self._commit_write(snapshot, prepared)
            try:
                _fsync_dir(os.path.dirname(snapshot.target.path))
            except OSError as exc:
                raise _storage_failure("fsync directory of", snapshot.target.path, exc) from exc
        return result

    def _prepare_write(self, snapshot: _Snapshot) -> tuple[bytes, str, str]:
        """Seal C{snapshot} into a durable temp file beside its target.

        @return: the file bytes, their C{saved_at}, and the temp file's path.
        @raise StorageFailure: on any OS error (the temp file is removed).
        """
        target = snapshot.target
        saved_at = snapshot.saved_at or utc_iso(time.time())
        data = _seal(
            target.envelope,
            snapshot.payload_json,
            self._secret_key,
            saved_at,
            snapshot.extra_fields,
        )
        try:
            if target.session_id is not None:
                _ensure_dir(os.path.dirname(target.path), parent_to_sync=self.sessions_dir)
            temp_path = _write_temp(target.path, data)
        except OSError as exc:
            raise _storage_failure("write", target.path, exc) from exc
        return data, saved_at, temp_path

    def _commit_write(self, snapshot: _Snapshot, prepared: tuple[bytes, str, str]) -> WriteResult:
        """Keep the old file as .bak and rename the prepared temp file over it."""
        data, saved_at, temp_path = prepared
        target = snapshot.target
        try:
            if target.keep_backup:
                _keep_backup(target.path)
            os.replace(temp_path, target.path)
        except OSError as exc:
            _remove_quietly(temp_path)
            raise _storage_failure("write", target.path, exc) from exc
        return WriteResult(len(data), "sha256:" + hashlib.sha256(data).hexdigest(), saved_at)

    def _write_group_job(self, snapshots: list[_Snapshot]) -> dict:
        """Write C{snapshots}: temp files in parallel, then renames, then one fsync per dir.

        The temp files are written and fsynced by the store's fsync helpers at the same
        time, so the filesystem can commit them together (on ext4 that is 10-30 times
        faster than one fsync after the other); the renames and directory fsyncs stay
        in this job.
        """
        results: dict[tuple[str, str], object] = {}
        if len(snapshots) > 1 and self._fsync_helpers is not None:
            prepared = [self._fsync_helpers.submit(self._prepare_write, s) for s in snapshots]
        else:
            prepared = [_Done(self._prepare_write, snapshot) for snapshot in snapshots]
        written_dirs: dict[str, list[tuple[str, str]]] = {}
        for snapshot, preparing in zip(snapshots, prepared, strict=True):
            key = snapshot.target.key
            try:
                ready = preparing.result()
                with self._file_lock(key):
                    results[key] = self._commit_write(snapshot, ready)
            except StorageFailure as exc:
                results[key] = exc
                continue
            written_dirs.setdefault(os.path.dirname(snapshot.target.path), []).append(key)
        for directory, keys in written_dirs.items():
            try:
                _fsync_dir(directory)
            except OSError as exc:
                failure = _storage_failure("fsync directory", directory, exc)
                for key in keys:
                    results[key] = failure
        return results

    def _quarantine(self, path: str, reason: str) -> str:
        """Move C{path} into the quarantine directory under a unique name."""
        relative = os.path.relpath(os.path.dirname(path), self.data_dir).replace(os.sep, "__")
        stamp = datetime.now(tz=UTC).strftime("%Y%m%dT%H%M%S")
        name = f"{stamp}-{uuid.uuid4().hex[:12]}-{relative[:100]}-{os.path.basename(path)}"
        destination = os.path.join(self.quarantine_dir, name)
        try:
            os.rename(path, destination)
            _fsync_dir(self.quarantine_dir)
            _fsync_dir(os.path.dirname(path))
        except OSError as exc:
            raise _storage_failure("quarantine", path, exc) from exc
        self._reactor.callFromThread(self._note_quarantine, path, destination, reason)
        return destination

    def _note_quarantine(self, path: str, destination: str, reason: str) -> None:
        self._quarantined += 1
        self.log.warn(
            "quarantined unreadable {path} as {destination}: {reason}",
            path=path,
            destination=destination,
            reason=reason,
        )

    def _load_verified(self, path: str, target: _Target) -> tuple[dict[str, Any], int]:
        """The verified envelope in C{path} and its size.

        @raise FileNotFoundError: no such file.
        @raise _BadFile: it is there but not a valid file for C{target}.
        @raise StorageFailure: it could not be read (permissions, I/O error).
        """
        try:
            data = _read_bytes(path)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise _storage_failure("read", path, exc) from exc
        document = _unseal(data, target.envelope, self._secret_key)
        payload = document[target.envelope.payload_key]
        if target.envelope is not _INDEX_ENVELOPE and not isinstance(payload, dict):
            raise _BadFile(f"{target.envelope.payload_key!r} is not an object")
        if target.session_id is not None and (
            payload.get("session_id") != target.session_id
            or payload.get("client_id") != target.client_id
        ):
            raise _BadFile("holds another session (ids do not match its path)")
        return document, len(data)

    def _read_recovering(self, target: _Target) -> tuple[dict[str, Any], int]:
        """The verified envelope of C{target}, falling back to (and restoring) its .bak.

        Caller holds the file lock.
        """
        reasons: dict[str, str] = {}
        quarantined: list[str] = []
        try:
            return self._load_verified(target.path, target)
        except FileNotFoundError:
            main_missing = True
        except _BadFile as exc:
            main_missing = False
            reasons["main"] = str(exc)
            quarantined.append(self._quarantine(target.path, str(exc)))
        try:
            document, size = self._load_verified(target.backup_path, target)
        except FileNotFoundError:
            if main_missing:
                raise SessionFileMissing(target.client_id or "", target.session_id or "") from None
            raise SessionFileCorrupt(target.path, reasons, quarantined) from None
        except _BadFile as exc:
            reasons["backup"] = str(exc)
            quarantined.append(self._quarantine(target.backup_path, str(exc)))
            raise SessionFileCorrupt(target.path, reasons, quarantined) from None
        try:
            with open(target.backup_path, "rb") as backup:
                data = backup.read()
            _durable_replace(target.path, data, keep_backup=False, sync_dir=True)
        except OSError as exc:
            raise _storage_failure("restore from backup", target.path, exc) from exc
        self._log_from_thread(
            "info",
            "recovered {path} from its backup ({problem})",
            path=target.path,
            problem=reasons.get("main", "main file missing"),
        )
        return document, size

    def _read_job(self, target: _Target) -> defer.Deferred:
        def read_in_thread() -> tuple[dict[str, Any], int]:
            with self._file_lock(target.key):
                return self._read_recovering(target)

        def loaded(outcome: tuple[dict[str, Any], int]) -> dict[str, Any]:
            document, size = outcome
            self._set_file_info(target.key, size, document.get("saved_at"))
            return document["session"]

        def gone(reason: Failure) -> Failure:
            reason.trap(SessionFileMissing, SessionFileCorrupt)
            self._forget_file(target.key)
            return reason

        return self._in_pool(read_in_thread).addCallbacks(loaded, gone)

    def _read_shared_job(self, target: _Target) -> defer.Deferred:
        def read_in_thread() -> dict[str, Any]:
            with self._file_lock(target.key):
                try:
                    document, _ = self._read_recovering(target)
                except SessionFileMissing:
                    return {}
            return document["bindings"]

        return self._in_pool(read_in_thread)

    def _delete_job(self, target: _Target) -> defer.Deferred:
        def delete_in_thread() -> None:
            with self._file_lock(target.key):
                try:
                    for path in (target.path, target.backup_path):
                        try:
                            os.unlink(path)
                        except FileNotFoundError:
                            continue
                    _fsync_dir(os.path.dirname(target.path))
                except FileNotFoundError:
                    return  # the client directory itself never existed
                except OSError as exc:
                    raise _storage_failure("delete", target.path, exc) from exc

        def deleted(_: object) -> None:
            self._forget_file(target.key)

        return self._in_pool(delete_in_thread).addCallback(deleted)

    # ------------------------------------------------------------------ index

    def _read_index_file(self) -> tuple[dict[tuple[str, str], dict], int | None]:
        """Entries of a valid index and its snapshot time; ({}, None) without one."""
        target = self._index_target()
        try:
            document, _ = self._load_verified(self.index_path, target)
            entries = document["sessions"]
            saved_at_ns = document.get("saved_at_ns")
            if not isinstance(entries, list) or type(saved_at_ns) is not int:
                raise _BadFile("sessions is not a list or saved_at_ns is not an integer")
        except FileNotFoundError:
            self._log_from_thread("info", "no session index: scanning every session file")
            return {}, None
        except _BadFile as exc:
            self._quarantine(self.index_path, str(exc))
            return {}, None
        known: dict[tuple[str, str], dict] = {}
        for entry in entries:
            if isinstance(entry, dict):
                known[(entry.get("client_id"), entry.get("session_id"))] = entry
        return known, saved_at_ns

    def _scan_sessions(self) -> dict[tuple[str, str], os.stat_result | None]:
        """Every session on disk: key → stat of its main file (None: only a .bak)."""
        found: dict[tuple[str, str], os.stat_result | None] = {}
        with os.scandir(self.sessions_dir) as client_dirs:
            for client_dir in client_dirs:
                client_id = decode_client_dir(client_dir.name)
                if client_id is None or not client_dir.is_dir(follow_symlinks=False):
                    continue
                with os.scandir(client_dir.path) as files:
                    for entry in files:
                        name = entry.name
                        if name.startswith("."):
                            self._remove_stale_temp(entry)
                            continue
                        if name.endswith(SAVED_SUFFIX):
                            continue  # save_context's copy, not a session of its own
                        if name.endswith(".json.bak"):
                            session_id, is_main = name[: -len(".json.bak")], False
                        elif name.endswith(".json"):
                            session_id, is_main = name[: -len(".json")], True
                        else:
                            continue
                        try:
                            check_session_id(session_id)
                        except ValueError:
                            continue
                        key = (client_id, session_id)
                        if is_main:
                            found[key] = entry.stat(follow_symlinks=False)
                        else:
                            found.setdefault(key, None)
        return found

    def _remove_stale_temp(self, entry: os.DirEntry) -> None:
        """Remove the temp file of a write interrupted long ago (never acknowledged)."""
        if ".tmp-" not in entry.name:
            return
        try:
            age_seconds = time.time() - entry.stat(follow_symlinks=False).st_mtime
            if age_seconds < STALE_TEMP_SECONDS or not entry.is_file(follow_symlinks=False):
                return
            os.unlink(entry.path)
        except FileNotFoundError:
            return
        except OSError as exc:
            self._log_from_thread(
                "warn",
                "could not remove stale temp file {path}: {error}",
                path=entry.path,
                error=exc,
            )
            return
        self._log_from_thread(
            "info", "removed the temp file of an interrupted write: {path}", path=entry.path
        )

    def _load_index_job(self) -> tuple[list[dict], dict, dict]:
        known, saved_at_ns = self._read_index_file()
        try:
            on_disk = self._scan_sessions()
        except OSError as exc:
            raise _storage_failure("list", self.sessions_dir, exc) from exc
        metas: list[dict] = []
        file_info: dict[tuple[str, str], tuple[int, str | None]] = {}
        counts = {"from_index": 0, "from_files": 0, "dropped": 0, "unreadable": 0}
        counts["dropped"] = len(set(known) - set(on_disk))
        for key, main_stat in on_disk.items():
            entry = known.get(key)
            if (
                entry is not None
                and main_stat is not None
                and saved_at_ns is not None
                and main_stat.st_mtime_ns < saved_at_ns - INDEX_MTIME_SLACK_NS
            ):
                meta = _meta_of(entry)
                meta["size_bytes"] = main_stat.st_size
                meta["saved_at"] = entry.get("saved_at")
                counts["from_index"] += 1
            else:
                target = self._session_target(*key)
                try:
                    with self._file_lock(key):
                        document, size = self._read_recovering(target)
                except (SessionFileMissing, StorageFailure) as exc:
                    counts["unreadable"] += 1
                    self._log_from_thread(
                        "warn", "session file {key} skipped: {error}", key=key, error=exc
                    )
                    continue
                meta = _meta_of(document["session"])
                meta["size_bytes"] = size
                meta["saved_at"] = document.get("saved_at")
                counts["from_files"] += 1
            metas.append(meta)
            file_info[key] = (meta["size_bytes"], meta["saved_at"])
        return metas, file_info, counts

    def _index_loaded(self, outcome: tuple[list[dict], dict, dict]) -> list[dict]:
        metas, file_info, counts = outcome
        self._file_info = {}
        self._file_bytes = 0
        for key, (size, saved_at) in file_info.items():
            self._set_file_info(key, size, saved_at)
        self.log.info(
            "loaded {total} sessions: {from_index} from the index, {from_files} read"
            " from their files, {dropped} index entries dropped, {unreadable} unreadable",
            total=len(metas),
            **counts,
        )
        return metas

    # ------------------------------------------------------------------ verify

    def _verify_all_job(self) -> list[dict]:
        report: list[dict] = []

        def check(path: str, kind: str, target: _Target | None) -> None:
            row = {
                "path": os.path.relpath(path, self.data_dir),
                "kind": kind,
                "client_id": target.client_id if target else None,
                "session_id": target.session_id if target else None,
                "size_bytes": None,
                "ok": False,
                "reason": None,
            }
            try:
                row["size_bytes"] = os.stat(path, follow_symlinks=False).st_size
                if target is None:
                    row["reason"] = (
                        "temp file of an interrupted write" if kind == "temp" else "unexpected file"
                    )
                else:
                    with self._file_lock(target.key):
                        self._load_verified(path, target)
                    row["ok"] = True
            except FileNotFoundError:
                return  # removed while we looked
            except (_BadFile, StorageFailure) as exc:
                row["reason"] = str(exc)
            except OSError as exc:
                row["reason"] = str(_storage_failure("stat", path, exc))
            report.append(row)

        for path, kind, target in (
            (self.index_path, "index", self._index_target()),
            (self.shared_path, "shared", self._shared_target()),
            (self.shared_path + ".bak", "shared-backup", self._shared_target()),
        ):
            if os.path.lexists(path):
                check(path, kind, target)
        for client_dir in sorted(_listdir(self.sessions_dir)):
            client_path = os.path.join(self.sessions_dir, client_dir)
            client_id = decode_client_dir(client_dir)
            if client_id is None or not os.path.isdir(client_path):
                check(client_path, "unexpected", None)
                continue
            for name in sorted(_listdir(client_path)):
                path = os.path.join(client_path, name)
                session_id, kind = _classify_session_file(name)
                try:
                    target = (
                        self._session_target(client_id, session_id, saved=kind == "saved")
                        if session_id
                        else None
                    )
                except ValueError:
                    target = None
                check(path, kind if target or kind == "temp" else "unexpected", target)
        return report


class _Done:
    """A call made now, with the C{result()} method of a future (sequential fallback)."""

    def __init__(self, function: Callable, *args: Any) -> None:
        try:
            self._value, self._error = function(*args), None
        except StorageFailure as exc:
            self._value, self._error = None, exc

    def result(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value


def _listdir(path: str) -> Iterable[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def _classify_session_file(name: str) -> tuple[str | None, str]:
    if name.startswith("."):
        return None, "temp"
    if name.endswith(".json.bak"):
        return name[: -len(".json.bak")], "backup"
    if name.endswith(SAVED_SUFFIX):
        return name[: -len(SAVED_SUFFIX)], "saved"
    if name.endswith(".json"):
        return name[: -len(".json")], "session"
    return None, "unexpected"
