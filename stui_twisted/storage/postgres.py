"""Sessions in PostgreSQL: the same documents and MACs as the file store, in rows.

Every row holds the complete sealed envelope, byte for byte what the file store
would write to a file (same format, same HMAC-SHA256 with the same kind of secret
key), so a database administrator who edits a row cannot get code execution in the
image: a row whose MAC fails is moved to the C{quarantine} table (never unpickled,
never deleted) and the read fails with L{SessionFileCorrupt}.  The secret key lives
outside the database (C{--secret-file}), so a dump alone cannot forge a session.

Tables (L{stui_twisted.storage.pg_schema}): C{sessions} (one row per session),
C{saved_copies} (what C{save_context} saved), C{shared} (the shared namespace, one
row per node id), C{quarantine}, C{leases} (which node serves a session:
L{stui_twisted.storage.pg_leases}), C{schema_version}.  The C{sessions} table is the
index: L{write_index} records nothing more, and L{load_index} reads and verifies
every row.

All database calls run in the store's own thread pool, each thread with its own
psycopg connection; the reactor thread only serializes and seals snapshots and keeps
counters.  Operations on one session run one at a time, in call order.  A write
commits before its Deferred fires; L{write_many} writes its whole group in one
transaction (one commit for many sessions).

Why one module of about 800 lines: it is one job, the L{ISessionStore} contract
over one database, and its parts (the connection pool, the per-session ordering,
the transactions of each operation, quarantine) share the same connection and
lock discipline; the schema is apart in C{pg_schema}, the envelope and MAC are
the file store's own (L{stui_twisted.storage.fileformat}).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

# The envelope functions of the file store (one format for both stores).  They are
# imported from storage.store; when that module is split, import them from their
# new home.
from stui_twisted.protocol.timefmt import iso_timestamp as utc_iso
from stui_twisted.storage import pg_schema
from stui_twisted.storage.errors import (
    RecordTooLarge,
    SessionFileCorrupt,
    SessionFileMissing,
    StorageFailure,
)
from stui_twisted.storage.fileformat import (
    SAVED_ENVELOPE as _SAVED_ENVELOPE,
)
from stui_twisted.storage.fileformat import (
    SECRET_KEY_BYTES,
    WriteResult,
    canonical_json,
)
from stui_twisted.storage.fileformat import (
    SESSION_ENVELOPE as _SESSION_ENVELOPE,
)
from stui_twisted.storage.fileformat import (
    SHARED_ENVELOPE as _SHARED_ENVELOPE,
)
from stui_twisted.storage.fileformat import BadFile as _BadFile
from stui_twisted.storage.fileformat import envelope_overhead as _envelope_overhead
from stui_twisted.storage.fileformat import seal as _seal
from stui_twisted.storage.fileformat import unseal as _unseal
from stui_twisted.storage.index import META_KEYS
from stui_twisted.storage.interface import ISessionStore
from stui_twisted.storage.pathcodec import check_session_id, encode_client_dir
from stui_twisted.storage.pg_leases import LeaseKeeper

__all__ = ["PostgresSessionStore", "PgSnapshot", "load_or_create_secret_key"]

DEFAULT_POOL_SIZE = 4
CONNECT_TIMEOUT = 10


@dataclass(frozen=True)
class PgSnapshot:
    """A session serialized and sealed for a later L{PostgresSessionStore.write_many}.

    C{document} is the complete row (the envelope with its MAC), stamped
    C{saved_at} when the snapshot was taken, as the file store stamps its
    snapshots: a flush seals each session in its own time slice
    (L{stui_twisted.sessions.persistence.SessionWriter.flush}), so the group's
    write holds the reactor thread for none of the sealing.
    """

    client_id: str
    session_id: str
    payload_json: bytes
    size_bytes: int
    document: bytes
    saved_at: str


def load_or_create_secret_key(path: str) -> bytes:
    """The 32-byte MAC key in C{path}, created (0600) when missing.

    @raise StorageFailure: the file cannot be read or does not hold 32 bytes.
    """
    try:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            directory = os.path.dirname(os.path.abspath(path))
            os.makedirs(directory, 0o700, exist_ok=True)
            key = secrets.token_bytes(SECRET_KEY_BYTES)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                return load_or_create_secret_key(path)
            try:
                os.write(fd, key)
                os.fsync(fd)
            finally:
                os.close(fd)
            return key
        with os.fdopen(fd, "rb") as handle:
            if stat.S_IMODE(os.fstat(handle.fileno()).st_mode) & 0o077:
                os.fchmod(handle.fileno(), 0o600)
            key = handle.read(SECRET_KEY_BYTES + 1)
    except OSError as exc:
        raise StorageFailure(f"--secret-file {path}: {exc.strerror or exc}") from exc
    if len(key) != SECRET_KEY_BYTES:
        raise StorageFailure(
            f"--secret-file {path} holds {len(key)} bytes, expected {SECRET_KEY_BYTES}"
        )
    return key


def _check_ids(client_id: Any, session_id: Any) -> tuple[str, str]:
    if not isinstance(client_id, str) or not client_id:
        raise ValueError(f"client_id must be a non-empty string, not {client_id!r}")
    encode_client_dir(client_id)  # the same ids the file store accepts
    check_session_id(session_id)
    return client_id, session_id


def _meta_of(session: dict[str, Any]) -> dict[str, Any]:
    return {key: session.get(key) for key in META_KEYS}


class _Corrupt(Exception):
    """A row failed verification and was quarantined (raised after the commit)."""

    def __init__(self, where: str, reason: str, quarantine_id: int) -> None:
        super().__init__(reason)
        self.where = where
        self.reason = reason
        self.quarantine_id = quarantine_id


@implementer(ISessionStore)
class PostgresSessionStore:
    """Sessions in one PostgreSQL database, read and written off the reactor thread.

    @param dsn: a libpq connection string or URI (the password may come from
        C{PGPASSWORD} or C{.pgpass}; it is never logged).
    @param secret_file: the MAC key's file (created when missing).
    @param node_id: this node's id: whose C{shared} namespace it reads and writes,
        and the holder of its leases.
    @param advertise: the C{HOST:PORT} clients should use for this node (shown to
        clients another node sends away), or C{None}.
    @param lease_interval: seconds between lease renewals.
    """

    shared_by_nodes = True
    """Several nodes may serve this database: sessions need a lease (L{acquire_lease})."""

    log = Logger()

    def __init__(
        self,
        dsn: str,
        *,
        reactor: Any,
        secret_file: str,
        node_id: str = "",
        advertise: str | None = None,
        lease_interval: float = 5.0,
        max_session_bytes: int = 8 * 1024 * 1024,
        pool_size: int = DEFAULT_POOL_SIZE,
    ) -> None:
        self.dsn = dsn
        self.secret_file = os.path.abspath(secret_file)
        self.node_id = node_id
        self.max_session_bytes = max_session_bytes
        self.pool_size = pool_size
        self._reactor = reactor
        self._threadpool: ThreadPool | None = None
        self._shutdown_trigger: Any = None
        self._secret_key: bytes | None = None
        self._is_open = False
        self._is_closing = False
        self._local = threading.local()
        self._connections: list[psycopg.Connection] = []
        self._connections_guard = threading.Lock()
        self._tails: dict[tuple[str, str], defer.Deferred] = {}
        self._active_jobs = 0
        self._idle_waiters: list[defer.Deferred] = []
        # counters (reactor thread only)
        self._row_info: dict[tuple[str, str], tuple[int, str | None]] = {}
        self._row_bytes = 0
        self._pending_writes = 0
        self._last_flush_at: str | None = None
        self._write_errors = 0
        self._quarantined = 0
        self._transactions = 0
        self._transaction_seconds = 0.0
        self._transaction_observers: list[Callable[[float], None]] = []
        self._write_observers: list[Callable[[str, float, bool], None]] = []
        self.leases = LeaseKeeper(
            self._run_for_leases,
            node_id=node_id,
            advertise=advertise,
            interval=lease_interval,
            clock=reactor,
        )

    @property
    def where(self) -> str:
        """The store as named in messages (no password)."""
        try:
            info = psycopg.conninfo.conninfo_to_dict(self.dsn)
        except psycopg.Error:
            return "postgresql"
        host = info.get("host", "")
        return f"postgresql:dbname={info.get('dbname', '')} host={host}".strip()

    # ------------------------------------------------------------------ lifecycle

    def check(self) -> None:
        """Read (or create) the key, connect and migrate the schema, synchronously.

        For start-up, before the pool exists: a database that cannot be reached or
        migrated stops the server at once (L{StorageFailure}).
        """
        self._secret_key = load_or_create_secret_key(self.secret_file)
        try:
            with psycopg.connect(
                self.dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT
            ) as connection:
                found, now = pg_schema.migrate(connection)
        except (psycopg.Error, RuntimeError) as exc:
            raise StorageFailure(f"PostgreSQL store {self.where}: {exc}") from exc
        if found != now:
            self.log.info(
                "PostgreSQL schema migrated from version {found} to {now}", found=found, now=now
            )

    def open(self) -> defer.Deferred:
        """Start the pool, load the key and migrate (idempotent)."""
        if self._is_open:
            return defer.succeed(None)
        self._threadpool = ThreadPool(minthreads=1, maxthreads=self.pool_size, name="stui-pg")
        self._threadpool.start()
        self._shutdown_trigger = self._reactor.addSystemEventTrigger(
            "after", "shutdown", self._reactor_shut_down
        )

        def opened_in_thread() -> bytes:
            key = load_or_create_secret_key(self.secret_file)
            connection = self._connection()
            try:
                pg_schema.migrate(connection)
            except (psycopg.Error, RuntimeError) as exc:
                raise StorageFailure(f"PostgreSQL store {self.where}: {exc}") from exc
            return key

        def opened(key: bytes) -> None:
            self._secret_key = key
            self._is_open = True
            self._is_closing = False
            self.leases.start()
            self.log.info(
                "session store open at {where} as node {node}", where=self.where, node=self.node_id
            )

        def failed(reason: Failure) -> Failure:
            self._stop_pool()
            return reason

        self._active_jobs += 1
        job = deferToThreadPool(self._reactor, self._threadpool, opened_in_thread)
        return job.addBoth(self._job_done).addCallbacks(opened, failed)

    def close(self) -> defer.Deferred:
        """Wait for every queued and running operation, then stop the pool."""
        if not self._is_open:
            return defer.succeed(None)
        self._is_closing = True
        waiter: defer.Deferred = defer.Deferred()
        self._idle_waiters.append(waiter)
        self._check_idle()

        def give_up_leases(_: object) -> defer.Deferred:
            # after every queued write: another node may take over from here on
            return self.leases.stop().addErrback(
                lambda failure: self.log.failure("giving up the leases failed", failure)
            )

        def closed(_: object) -> None:
            self._is_open = False
            self._stop_pool()
            self.log.info("session store closed")

        return waiter.addCallback(give_up_leases).addCallback(closed)

    def _reactor_shut_down(self) -> None:
        self._shutdown_trigger = None  # it is firing: nothing left to remove
        if self._threadpool is not None:
            self.log.warn("reactor stopped before the session store was closed")
        self._stop_pool()

    def _stop_pool(self) -> None:
        trigger, self._shutdown_trigger = self._shutdown_trigger, None
        if trigger is not None:
            self._reactor.removeSystemEventTrigger(trigger)
        pool, self._threadpool = self._threadpool, None
        if pool is not None:
            pool.stop()
        with self._connections_guard:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()

    # ------------------------------------------------------------------ threads

    def _connection(self) -> psycopg.Connection:
        """This thread's connection (reconnecting after a broken one)."""
        connection = getattr(self._local, "connection", None)
        if connection is not None and not connection.closed and not connection.broken:
            return connection
        try:
            connection = psycopg.connect(self.dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT)
        except psycopg.Error as exc:
            raise StorageFailure(f"cannot connect to PostgreSQL store {self.where}: {exc}") from exc
        self._local.connection = connection
        with self._connections_guard:
            self._connections.append(connection)
        return connection

    def _transaction(self, action: str, function: Callable, *args: Any) -> Any:
        """Run C{function(connection, *args)} in one transaction (in a pool thread).

        A connection found broken (the server restarted, a failover, an idle
        connection cut by a firewall) is replaced and the transaction run once more
        on the new one: every job of this store can run twice (upserts, deletes,
        reads).

        @return: C{(result, seconds)}.
        """
        started = time.perf_counter()
        for attempt in (1, 2):
            connection = self._connection()
            try:
                with connection.transaction():
                    result = function(connection, *args)
                break
            except psycopg.Error as exc:
                if attempt == 1 and connection.broken:
                    self._log_from_thread(
                        "warn",
                        "PostgreSQL connection lost ({error}); reconnecting to {where}",
                        error=exc,
                        where=self.where,
                    )
                    continue
                raise StorageFailure(
                    f"PostgreSQL store {self.where}: could not {action}: {exc}"
                ) from exc
        return result, time.perf_counter() - started

    def _log_from_thread(self, level: str, format: str, **fields: Any) -> None:
        self._reactor.callFromThread(getattr(self.log, level), format, **fields)

    def _in_pool(self, action: str, function: Callable, *args: Any) -> defer.Deferred:
        self._active_jobs += 1
        job = deferToThreadPool(
            self._reactor, self._threadpool, self._transaction, action, function, *args
        )

        def timed(outcome: tuple[Any, float]) -> Any:
            result, seconds = outcome
            self._transactions += 1
            self._transaction_seconds += seconds
            for observer in self._transaction_observers:
                observer(seconds)
            return result

        return job.addBoth(self._job_done).addCallback(timed)

    def _job_done(self, result: object) -> object:
        self._active_jobs -= 1
        self._check_idle()
        return result

    def _check_idle(self) -> None:
        if self._active_jobs or self._tails or not self._idle_waiters:
            return
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _in_lanes(
        self, keys: list[tuple[str, str]], action: str, function: Callable, *args: Any
    ) -> defer.Deferred:
        """Run a transaction after every earlier operation on any of C{keys}."""
        previous = [self._tails[key] for key in keys if key in self._tails]
        released: defer.Deferred = defer.Deferred()
        for key in keys:
            self._tails[key] = released
        result: defer.Deferred = defer.Deferred()

        def finished(outcome: object) -> None:
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(outcome)
            for key in keys:
                if self._tails.get(key) is released:
                    del self._tails[key]
            released.callback(None)
            self._check_idle()

        def start(_: object = None) -> None:
            self._in_pool(action, function, *args).addBoth(finished)

        if previous:
            defer.DeferredList(previous).addCallback(start)
        else:
            start()
        return result

    def _run_for_leases(
        self, action: str, lane: tuple[str, str, str] | None, function: Callable, *args: Any
    ) -> defer.Deferred:
        """The L{LeaseKeeper}'s jobs: in the pool, after earlier jobs of C{lane}."""
        if lane is None:
            return self._in_pool(action, function, *args)
        return self._in_lanes([lane], action, function, *args)

    def _check_open(self) -> None:
        if not self._is_open or self._threadpool is None:
            raise StorageFailure(f"session store {self.where} is not open")
        if self._is_closing:
            raise StorageFailure(f"session store {self.where} is closing")

    # ------------------------------------------------------------------ snapshots

    def _snapshot(
        self, session: Any, envelope=_SESSION_ENVELOPE, saved_at: str | None = None
    ) -> PgSnapshot:
        """C{session} serialized and sealed now (stamped C{saved_at}, default now)."""
        if not isinstance(session, dict):
            raise ValueError(f"a session must be a dict, not {type(session).__name__}")
        client_id, session_id = _check_ids(session.get("client_id"), session.get("session_id"))
        payload_json = canonical_json(session)
        size_bytes = _envelope_overhead(envelope, ()) + len(payload_json)
        if size_bytes > self.max_session_bytes:
            raise RecordTooLarge(size_bytes, self.max_session_bytes, session_id)
        document, stamp = self._sealed(envelope, payload_json, saved_at)
        return PgSnapshot(client_id, session_id, payload_json, size_bytes, document, stamp)

    def _sealed(self, envelope, payload_json: bytes, saved_at: str | None) -> tuple[bytes, str]:
        saved_at = saved_at or utc_iso(self._reactor.seconds())
        return _seal(envelope, payload_json, self._secret_key, saved_at), saved_at

    # ------------------------------------------------------------------ thread jobs

    def _quarantine_row(
        self, connection, source: str, key: tuple, document: bytes, reason: str
    ) -> int:
        client_id, session_id, node_id = key
        row = connection.execute(
            "INSERT INTO quarantine (source, client_id, session_id, node_id, document, reason)"
            " VALUES (%s, %s, %s, %s, %s, %s) RETURNING id",
            (source, client_id, session_id, node_id, document, reason),
        ).fetchone()
        return row[0]

    def _verified(self, document: bytes, envelope, client_id: str | None, session_id: str | None):
        """The verified envelope of a row. @raise _BadFile: with the reason."""
        parsed = _unseal(bytes(document), envelope, self._secret_key)
        payload = parsed[envelope.payload_key]
        if not isinstance(payload, dict):
            raise _BadFile(f"{envelope.payload_key!r} is not an object")
        if session_id is not None and (
            payload.get("session_id") != session_id or payload.get("client_id") != client_id
        ):
            raise _BadFile("holds another session (ids do not match its row)")
        return parsed

    def _read_row(self, connection, table: str, envelope, client_id: str, session_id: str):
        row = connection.execute(
            f"SELECT document FROM {table} WHERE client_id = %s AND session_id = %s FOR UPDATE",
            (client_id, session_id),
        ).fetchone()
        if row is None:
            return None
        document = bytes(row[0])
        try:
            return self._verified(document, envelope, client_id, session_id), len(document)
        except _BadFile as exc:
            quarantine_id = self._quarantine_row(
                connection, table, (client_id, session_id, None), document, str(exc)
            )
            connection.execute(
                f"DELETE FROM {table} WHERE client_id = %s AND session_id = %s",
                (client_id, session_id),
            )
            return _Corrupt(f"{table} row ({client_id!r}, {session_id!r})", str(exc), quarantine_id)

    def _write_rows(
        self, connection, table: str, rows: list[tuple], new_leases: list[str] = ()
    ) -> set[str]:
        """Upsert C{rows}; answers the session ids another node's lease kept unwritten.

        A session row is replaced only while no other node holds its lease: a node
        that lost a lease (it missed its renewals, another took the session over)
        cannot overwrite what the new node wrote.

        The rows go as one statement over arrays (C{unnest}) sent in binary
        (C{%b}): a flush of hundreds of sessions is one round trip whose documents
        are copied, not escaped.  C{executemany}, or arrays in text format, ran
        Python code per row in this pool thread (about 25 µs a row, a regular
        expression over every document), holding the GIL the reactor thread
        waits for; binary arrays take about a fifth of that (docs/performance.md).
        C{rows} never holds one session twice (L{write_many} keeps the last
        snapshot of each), which C{ON CONFLICT DO UPDATE} requires of one
        statement.
        """
        if new_leases:
            LeaseKeeper.insert_new(
                connection, self.node_id, self.leases.advertise, self.leases.ttl, new_leases
            )
        fence, fence_params = "", ()
        if table == "sessions":
            fence = (
                " WHERE NOT EXISTS (SELECT 1 FROM leases WHERE leases.session_id ="
                " EXCLUDED.session_id AND leases.node_id <> %s)"
            )
            fence_params = (self.node_id,)
        client_ids, session_ids, documents, stamps, sizes = (
            list(column) for column in zip(*rows, strict=True)
        )
        written = connection.execute(
            f"INSERT INTO {table} (client_id, session_id, document, saved_at, size_bytes)"
            " SELECT * FROM unnest(%b::text[], %b::text[], %b::bytea[], %b::text[], %b::int[])"
            " ON CONFLICT (client_id, session_id) DO UPDATE SET"
            " document = EXCLUDED.document, saved_at = EXCLUDED.saved_at,"
            f" size_bytes = EXCLUDED.size_bytes{fence} RETURNING session_id",
            (client_ids, session_ids, documents, stamps, sizes, *fence_params),
        ).fetchall()
        return set(session_ids) - {session_id for (session_id,) in written}

    def _fenced(self, session_ids: set[str]) -> Failure:
        """The failure of a write another node's lease kept out (L{_write_rows})."""
        self.leases.lost_to_others(sorted(session_ids))
        return Failure(
            StorageFailure(
                f"session {', '.join(sorted(session_ids))} is served by another node now;"
                " this node's copy was not written"
            )
        )

    # ------------------------------------------------------------------ results

    def _note_corrupt(self, corrupt: _Corrupt) -> SessionFileCorrupt:
        self._quarantined += 1
        self.log.warn(
            "quarantined {where} as quarantine row {id}: {reason}",
            where=corrupt.where,
            id=corrupt.quarantine_id,
            reason=corrupt.reason,
        )
        return SessionFileCorrupt(
            corrupt.where, {"main": corrupt.reason}, [f"quarantine row {corrupt.quarantine_id}"]
        )

    def _set_row_info(self, key: tuple[str, str], size: int, saved_at: str | None) -> None:
        previous = self._row_info.get(key)
        if previous is not None:
            self._row_bytes -= previous[0]
        self._row_info[key] = (size, saved_at)
        self._row_bytes += size

    def _forget_row(self, key: tuple[str, str]) -> None:
        previous = self._row_info.pop(key, None)
        if previous is not None:
            self._row_bytes -= previous[0]

    def _observed(self, result: object, kind: str, started: float) -> object:
        seconds = self._reactor.seconds() - started
        ok = not isinstance(result, Failure)
        for observer in list(self._write_observers):
            try:
                observer(kind, seconds, ok)
            except Exception:
                self.log.failure("write observer {observer} failed", observer=observer)
        return result

    def _wrote(self, result: object, key: tuple[str, str] | None) -> object:
        self._pending_writes -= 1
        if isinstance(result, Failure):
            self._write_errors += 1
            self.log.error("write of {key} failed: {error}", key=key, error=result.value)
            return result
        self._last_flush_at = result.saved_at
        if key is not None:
            self._set_row_info(key, result.size_bytes, result.saved_at)
        return result

    # ------------------------------------------------------------------ observers

    def addWriteObserver(self, observer: Callable[[str, float, bool], None]) -> None:  # noqa: N802
        """Call C{observer(kind, seconds, ok)} each time a L{write} or L{write_many} finishes.

        The same hook as the file store's (C{kind} is C{"single"} or C{"batch"}).
        """
        self._write_observers.append(observer)

    def removeWriteObserver(self, observer: Callable[[str, float, bool], None]) -> None:  # noqa: N802
        """Stop calling C{observer}."""
        self._write_observers.remove(observer)

    def addTransactionObserver(self, observer: Callable[[float], None]) -> None:  # noqa: N802
        """Call C{observer(seconds)} after each committed transaction (its latency)."""
        self._transaction_observers.append(observer)

    # ------------------------------------------------------------------ leases

    def acquire_lease(self, session_id: str, new: bool = False) -> defer.Deferred:
        """Take C{session_id}'s lease (L{LeaseKeeper.acquire}); C{new}: a session made here.

        Fires with C{True} when this node held it already, C{False} when it took it
        now (the caller reads the session again); fails with L{LeaseHeld}.
        """
        try:
            self._check_open()
            check_session_id(session_id)
        except (ValueError, StorageFailure):
            return defer.fail()
        if new:
            self.leases.claim_new(session_id)
            return defer.succeed(True)
        return self.leases.acquire(session_id)

    def release_lease(self, session_id: str) -> defer.Deferred:
        """Give up C{session_id}'s lease (closed or expired here)."""
        try:
            self._check_open()
        except StorageFailure:
            return defer.fail()
        return self.leases.release(session_id)

    def addLeaseLostObserver(self, observer: Callable[[list[str]], None]) -> None:  # noqa: N802
        """Call C{observer(session_ids)} when another node took over leases of this one."""
        self.leases.on_lost = observer

    def load_metas(
        self, client_id: str | None = None, session_id: str | None = None
    ) -> defer.Deferred:
        """The meta of the sessions in the database (of C{client_id}, or C{session_id}).

        Each row verified by its MAC like L{load_index} (a bad row is quarantined);
        the counters of L{statistics} are left as they are.
        """
        try:
            self._check_open()
            if session_id is not None:
                check_session_id(session_id)
        except (ValueError, StorageFailure):
            return defer.fail()
        return self._in_pool(
            "read the session index", self._load_metas, client_id, session_id
        ).addCallback(self._noted_corrupt)

    # ------------------------------------------------------------------ public API

    def read(self, client_id: str, session_id: str) -> defer.Deferred:
        """The C{session} dict last written for this session."""
        return self._read(client_id, session_id, "sessions", _SESSION_ENVELOPE).addCallback(
            lambda outcome: outcome[0]
        )

    def read_saved(self, client_id: str, session_id: str) -> defer.Deferred:
        """What C{save_context} last saved: C{(session dict, saved_at)}."""
        return self._read(client_id, session_id, "saved_copies", _SAVED_ENVELOPE)

    def _read(self, client_id: str, session_id: str, table: str, envelope) -> defer.Deferred:
        try:
            self._check_open()
            key = _check_ids(client_id, session_id)
        except (ValueError, StorageFailure):
            return defer.fail()

        def got(outcome: Any) -> tuple[dict, str | None]:
            if outcome is None:
                if table == "sessions":
                    self._forget_row(key)
                raise SessionFileMissing(client_id, session_id)
            if isinstance(outcome, _Corrupt):
                if table == "sessions":
                    self._forget_row(key)
                raise self._note_corrupt(outcome)
            document, size = outcome
            if table == "sessions":
                self._set_row_info(key, size, document.get("saved_at"))
            return document["session"], document.get("saved_at")

        return self._in_lanes(
            [(table, *key)], f"read {table}", self._read_row, table, envelope, *key
        ).addCallback(got)

    def write(
        self, session: dict[str, Any], *, saved_at: str | None = None, saved_copy: bool = False
    ) -> defer.Deferred:
        """Write C{session} (committed before the Deferred fires); a L{WriteResult}."""
        envelope = _SAVED_ENVELOPE if saved_copy else _SESSION_ENVELOPE
        table = "saved_copies" if saved_copy else "sessions"
        try:
            self._check_open()
            snapshot = self._snapshot(session, envelope, saved_at)
        except (ValueError, TypeError, RecursionError, RecordTooLarge, StorageFailure):
            return defer.fail()
        data, stamp = snapshot.document, snapshot.saved_at
        key = (snapshot.client_id, snapshot.session_id)
        self._pending_writes += 1
        row = (*key, data, stamp, len(data))
        new_leases = [] if saved_copy else self.leases.unwritten_among([key[1]])
        started = self._reactor.seconds()

        def written(fenced: set[str]) -> WriteResult | Failure:
            self.leases.written(new_leases)
            return self._fenced(fenced) if fenced else _result(data, stamp)

        done = self._in_lanes(
            [(table, *key)], f"write {table}", self._write_rows, table, [row], new_leases
        ).addCallback(written)
        done.addBoth(self._wrote, key if table == "sessions" else None)
        return done.addBoth(self._observed, "single", started)

    def snapshot(self, session: dict[str, Any]) -> PgSnapshot:
        """Serialize and seal C{session} now, for a later L{write_many}."""
        return self._snapshot(session)

    def write_many(self, sessions: list[dict[str, Any] | PgSnapshot]) -> defer.Deferred:
        """Write several sessions in one transaction: C{{session_id: WriteResult or Failure}}."""
        try:
            self._check_open()
        except StorageFailure:
            return defer.fail()
        outcomes: dict[str, Any] = {}
        group: dict[tuple[str, str], PgSnapshot] = {}
        for session in sessions:
            if isinstance(session, PgSnapshot):
                snapshot = session
            else:
                session_id = session.get("session_id") if isinstance(session, dict) else None
                name = session_id if isinstance(session_id, str) else repr(session_id)
                try:
                    snapshot = self._snapshot(session)
                except (ValueError, TypeError, RecursionError, RecordTooLarge):
                    outcomes[name] = Failure()
                    continue
            group[(snapshot.client_id, snapshot.session_id)] = snapshot  # the last one wins
        if not group:
            return defer.succeed(outcomes)
        rows = [
            (*key, snapshot.document, snapshot.saved_at, len(snapshot.document))
            for key, snapshot in group.items()
        ]
        self._pending_writes += len(rows)

        new_leases = self.leases.unwritten_among(key[1] for key in group)
        started = self._reactor.seconds()

        def fix_keys(outcome: object) -> dict[str, Any]:
            fenced: set[str] = set()
            if not isinstance(outcome, Failure):
                self.leases.written(new_leases)
                fenced = outcome
            self._observed(outcome, "batch", started)
            for client_id, session_id, data, saved_at, _size in rows:
                if isinstance(outcome, Failure):
                    result = outcome
                elif session_id in fenced:
                    result = self._fenced({session_id})
                else:
                    result = _result(data, saved_at)
                outcomes[session_id] = self._wrote(result, (client_id, session_id))
            return outcomes

        lanes = [("sessions", *key) for key in group]
        return self._in_lanes(
            lanes, "write a group", self._write_rows, "sessions", rows, new_leases
        ).addBoth(fix_keys)

    def delete(self, client_id: str, session_id: str) -> defer.Deferred:
        """Remove a session's row and its saved copy; missing is fine."""
        try:
            self._check_open()
            key = _check_ids(client_id, session_id)
        except (ValueError, StorageFailure):
            return defer.fail()

        def delete_rows(connection) -> None:
            for table in ("sessions", "saved_copies"):
                connection.execute(
                    f"DELETE FROM {table} WHERE client_id = %s AND session_id = %s", key
                )

        return self._in_lanes(
            [("sessions", *key), ("saved_copies", *key)], "delete", delete_rows
        ).addCallback(lambda _: self._forget_row(key))

    def read_shared(self) -> defer.Deferred:
        """This node's shared namespace bindings, or C{{}} if none were written."""
        try:
            self._check_open()
        except StorageFailure:
            return defer.fail()

        def read_in_thread(connection) -> Any:
            row = connection.execute(
                "SELECT document FROM shared WHERE node_id = %s FOR UPDATE", (self.node_id,)
            ).fetchone()
            if row is None:
                return {}
            document = bytes(row[0])
            try:
                return self._verified(document, _SHARED_ENVELOPE, None, None)["bindings"]
            except _BadFile as exc:
                quarantine_id = self._quarantine_row(
                    connection, "shared", (None, None, self.node_id), document, str(exc)
                )
                connection.execute("DELETE FROM shared WHERE node_id = %s", (self.node_id,))
                return _Corrupt(f"shared row {self.node_id!r}", str(exc), quarantine_id)

        def got(outcome: Any) -> dict:
            if isinstance(outcome, _Corrupt):
                raise self._note_corrupt(outcome)
            return outcome

        return self._in_lanes(
            [("shared", self.node_id, "")], "read shared", read_in_thread
        ).addCallback(got)

    def write_shared(self, bindings: dict[str, Any]) -> defer.Deferred:
        """Write this node's shared namespace bindings; a L{WriteResult}."""
        try:
            self._check_open()
            if not isinstance(bindings, dict):
                raise ValueError(f"bindings must be a dict, not {type(bindings).__name__}")
            payload_json = canonical_json(bindings)
            size_bytes = _envelope_overhead(_SHARED_ENVELOPE, ()) + len(payload_json)
            if size_bytes > self.max_session_bytes:
                raise RecordTooLarge(size_bytes, self.max_session_bytes, "shared")
        except (ValueError, TypeError, RecursionError, RecordTooLarge, StorageFailure):
            return defer.fail()
        data, stamp = self._sealed(_SHARED_ENVELOPE, payload_json, None)

        def write_in_thread(connection) -> None:
            connection.execute(
                "INSERT INTO shared (node_id, document, saved_at) VALUES (%s, %s, %s)"
                " ON CONFLICT (node_id) DO UPDATE SET document = EXCLUDED.document,"
                " saved_at = EXCLUDED.saved_at",
                (self.node_id, data, stamp),
            )

        self._pending_writes += 1
        done = self._in_lanes([("shared", self.node_id, "")], "write shared", write_in_thread)
        return done.addCallback(lambda _: _result(data, stamp)).addBoth(self._wrote, None)

    def write_index(self, metas: list[dict[str, Any]]) -> defer.Deferred:
        """Check C{metas}; the C{sessions} table is the index, so nothing more is written."""
        try:
            self._check_open()
            for meta in metas:
                if not isinstance(meta, dict):
                    raise ValueError(f"a meta must be a dict, not {type(meta).__name__}")
                _check_ids(meta.get("client_id"), meta.get("session_id"))
        except (ValueError, StorageFailure):
            return defer.fail()
        return defer.succeed(None)

    def load_index(self) -> defer.Deferred:
        """Meta of every session row, each verified by its MAC (bad rows are quarantined)."""
        try:
            self._check_open()
        except StorageFailure:
            return defer.fail()

        def loaded(metas: list[dict]) -> list[dict]:
            self._row_info = {}
            self._row_bytes = 0
            for meta in metas:
                key = (meta["client_id"], meta["session_id"])
                self._set_row_info(key, meta["size_bytes"], meta["saved_at"])
            self.log.info(
                "loaded {total} sessions from {where}, {unreadable} quarantined",
                total=len(metas),
                where=self.where,
                unreadable=self._quarantined - quarantined_before,
            )
            return metas

        quarantined_before = self._quarantined
        return (
            self._in_pool("load the index", self._load_metas, None, None)
            .addCallback(self._noted_corrupt)
            .addCallback(loaded)
        )

    def _noted_corrupt(self, outcome: tuple[list[dict], list[_Corrupt]]) -> list[dict]:
        metas, corrupt = outcome
        for bad in corrupt:
            self._note_corrupt(bad)
        return metas

    def _load_metas(
        self, connection, client_id: str | None, session_id: str | None
    ) -> tuple[list[dict], list[_Corrupt]]:
        """Verified metas of the rows (all, of C{client_id}, or C{session_id}); bad
        rows are quarantined."""
        metas: list[dict] = []
        corrupt: list[_Corrupt] = []
        rows = connection.execute(
            "SELECT client_id, session_id, document FROM sessions"
            " WHERE (%(client)s::text IS NULL OR client_id = %(client)s)"
            " AND (%(session)s::text IS NULL OR session_id = %(session)s)"
            " ORDER BY client_id, session_id FOR UPDATE",
            {"client": client_id, "session": session_id},
        ).fetchall()
        for row_client, row_session, document in rows:
            document = bytes(document)
            try:
                parsed = self._verified(document, _SESSION_ENVELOPE, row_client, row_session)
            except _BadFile as exc:
                quarantine_id = self._quarantine_row(
                    connection, "sessions", (row_client, row_session, None), document, str(exc)
                )
                connection.execute(
                    "DELETE FROM sessions WHERE client_id = %s AND session_id = %s",
                    (row_client, row_session),
                )
                where = f"sessions row ({row_client!r}, {row_session!r})"
                corrupt.append(_Corrupt(where, str(exc), quarantine_id))
                continue
            meta = _meta_of(parsed["session"])
            meta["size_bytes"] = len(document)
            meta["saved_at"] = parsed.get("saved_at")
            metas.append(meta)
        return metas, corrupt

    def verify_all(self) -> defer.Deferred:
        """Check every row (for an admin tool); moves nothing."""
        try:
            self._check_open()
        except StorageFailure:
            return defer.fail()

        def verify_in_thread(connection) -> list[dict]:
            report = []
            for table, kind, envelope in (
                ("sessions", "session", _SESSION_ENVELOPE),
                ("saved_copies", "saved", _SAVED_ENVELOPE),
            ):
                rows = connection.execute(
                    f"SELECT client_id, session_id, document FROM {table}"
                    " ORDER BY client_id, session_id"
                ).fetchall()
                for client_id, session_id, document in rows:
                    row = {
                        "path": f"{table}/{client_id}/{session_id}",
                        "kind": kind,
                        "client_id": client_id,
                        "session_id": session_id,
                        "size_bytes": len(document),
                        "ok": False,
                        "reason": None,
                    }
                    try:
                        self._verified(bytes(document), envelope, client_id, session_id)
                        row["ok"] = True
                    except _BadFile as exc:
                        row["reason"] = str(exc)
                    report.append(row)
            return report

        return self._in_pool("verify", verify_in_thread)

    def statistics(self) -> dict[str, Any]:
        """Cached counters; no I/O."""
        return {
            "files": len(self._row_info),
            "bytes": self._row_bytes,
            "pending_writes": self._pending_writes,
            "last_flush_at": self._last_flush_at,
            "write_errors": self._write_errors,
            "quarantined": self._quarantined,
            "pool_size": self.pool_size,
            "pool_in_use": min(self._active_jobs, self.pool_size),
            "transactions": self._transactions,
            "transaction_seconds": round(self._transaction_seconds, 6),
            **self.leases.statistics(),
        }


def _result(data: bytes, saved_at: str) -> WriteResult:
    return WriteResult(len(data), "sha256:" + hashlib.sha256(data).hexdigest(), saved_at)
