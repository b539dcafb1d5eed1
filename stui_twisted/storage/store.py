"""Durable session files: the store facade, and the only code that reads or writes the data directory.

Layout (architecture.md, Persistence)::

    DATA/secret.key                           32 random bytes, the HMAC key (0600)
    DATA/index.json                           meta of every session (MAC'd)
    DATA/shared.json, shared.json.bak         the image-wide shared bindings (MAC'd)
    DATA/sessions/<client-dir>/<sid>.json     one session; <sid>.json.bak its previous version
    DATA/journal/<seq>.jnl                    first writes of one flush, not yet compacted
    DATA/quarantine/                          unreadable files, moved here, never deleted

Directories are 0700 and files 0600.  C{<client-dir>} comes from
L{stui_twisted.storage.pathcodec.encode_client_dir}, so no client id can name a path outside
C{DATA/sessions/}.

L{SessionStore} ties the storage modules together and is the one public API:

- L{stui_twisted.storage.fileformat}: the sealed envelope, its MAC, the secret key;
- L{stui_twisted.storage.durable}: temp file, fsync, rename, .bak, quarantine moves;
- L{stui_twisted.storage.lanes}: the threads, per-file lanes and write coalescing;
- L{stui_twisted.storage.index}: the index at start-up, and C{verify_all};
- L{stui_twisted.storage.journal}: the group journal, one file per C{write_many} for
  the sessions written for the first time, compacted into their files later
  (replayed by L{SessionStore.load_index} after a crash);
- L{stui_twisted.storage.errors}: what callers are told went wrong.

All file I/O runs in the store's own threads; the reactor thread only serializes
the snapshot (so later changes to the caller's dict cannot leak into it; about
90 ms for an 8 MiB session) and keeps counters.  This module holds what a read,
write or delete of one file does, and the counters.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from datetime import UTC, datetime
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from stui_twisted.protocol.timefmt import iso_timestamp
from stui_twisted.storage import durable, index, journal, recovery
from stui_twisted.storage.counters import StoreCounters, WriteObserver
from stui_twisted.storage.durable import DIR_MODE
from stui_twisted.storage.errors import (
    RecordTooLarge,
    SessionFileCorrupt,
    SessionFileMissing,
    StorageFailure,
    storage_failure,
)
from stui_twisted.storage.fileformat import (
    INDEX_ENVELOPE,
    SAVED_ENVELOPE,
    SESSION_ENVELOPE,
    SHARED_ENVELOPE,
    WriteResult,
    canonical_json,
    envelope_overhead,
    load_or_create_secret_key,
    seal,
)
from stui_twisted.storage.index import META_KEYS, SAVED_SUFFIX, meta_of
from stui_twisted.storage.interface import ISessionStore
from stui_twisted.storage.lanes import Key, Snapshot, Target, WriteLanes
from stui_twisted.storage.pathcodec import check_session_id, encode_client_dir

__all__ = [
    "META_KEYS",
    "SAVED_SUFFIX",
    "SessionFileCorrupt",
    "SessionFileMissing",
    "SessionStore",
    "WriteResult",
]

_SHARED_KEY = ("", "shared.json")
_INDEX_KEY = ("", "index.json")


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
        journal_compact_delay: float = 0.3,
        journal_min_group: int = journal.MIN_GROUP,
        journal_max_records: int = journal.MAX_RECORDS,
        journal_max_bytes: int = journal.MAX_BYTES,
    ) -> None:
        self.data_dir = os.path.abspath(os.fspath(data_dir))
        self.sessions_dir = os.path.join(self.data_dir, "sessions")
        self.quarantine_dir = os.path.join(self.data_dir, "quarantine")
        self.secret_key_path = os.path.join(self.data_dir, "secret.key")
        self.index_path = os.path.join(self.data_dir, "index.json")
        self.shared_path = os.path.join(self.data_dir, "shared.json")
        self.journal_dir = os.path.join(self.data_dir, "journal")
        self.max_session_bytes = max_session_bytes
        self._reactor = reactor
        self._counters = StoreCounters(reactor.seconds)
        self._lanes = WriteLanes(
            reactor,
            threadpool=threadpool,
            prepare=self._prepare_write,
            commit=self._commit_write,
            written=self._write_finished,
        )
        self._journal = journal.GroupJournal(
            self,
            self._lanes,
            reactor,
            compact_delay=journal_compact_delay,
            min_group=journal_min_group,
            max_records=journal_max_records,
            max_bytes=journal_max_bytes,
        )
        self._secret_key: bytes | None = None
        self._is_open = False
        self._is_closing = False

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> defer.Deferred:
        """Create the directories and secret key (if missing) and start the pool."""
        if self._is_open:
            return defer.succeed(None)
        self._lanes.start()

        def opened(secret_key: bytes) -> None:
            self._secret_key = secret_key
            self._is_open = True
            self._is_closing = False
            self.log.info("session store open at {data_dir}", data_dir=self.data_dir)

        def failed(reason: Failure) -> Failure:
            self._lanes.stop()
            return reason

        return self._lanes.in_pool(self._open_in_thread).addCallbacks(opened, failed)

    def close(self) -> defer.Deferred:
        """Compact the journals, wait for every queued and running operation, stop the pool.

        A clean close leaves no journal on disk; one whose compaction fails is
        left (logged) for the next start-up to replay.
        """
        if not self._is_open:
            return defer.succeed(None)
        self._is_closing = True

        def compaction_failed(reason: Failure) -> None:
            self.log.error("journals left for replay at start-up: {error}", error=reason.value)

        waiter = self._journal.compact_all().addErrback(compaction_failed)
        waiter.addCallback(lambda _: self._lanes.when_idle())

        def closed(_: object) -> None:
            self._is_open = False
            self._lanes.stop()
            self.log.info("session store closed")

        return waiter.addCallback(closed)

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
            for directory in (self.sessions_dir, self.quarantine_dir, self.journal_dir):
                durable.ensure_dir(directory, parent_to_sync=self.data_dir)
                if stat.S_IMODE(os.stat(directory).st_mode) != DIR_MODE:
                    os.chmod(directory, DIR_MODE)
            secret_key = load_or_create_secret_key(
                self.secret_key_path,
                lambda: durable.fsync_dir(self.data_dir),
                self._log_from_thread,
            )
            self._journal.opened(journal.found_on_disk(self.journal_dir))
            return secret_key
        except OSError as exc:
            raise storage_failure("prepare data directory", self.data_dir, exc) from exc

    # ------------------------------------------------------------------ targets

    def _session_target(self, client_id: str, session_id: str, *, saved: bool = False) -> Target:
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
            return Target(
                key=(client_id, session_id + SAVED_SUFFIX),
                path=os.path.join(self.sessions_dir, client_dir, session_id + SAVED_SUFFIX),
                envelope=SAVED_ENVELOPE,
                keep_backup=False,
                client_id=client_id,
                session_id=session_id,
            )
        path = os.path.join(self.sessions_dir, client_dir, session_id + ".json")
        return Target(
            key=(client_id, session_id),
            path=path,
            envelope=SESSION_ENVELOPE,
            keep_backup=True,
            client_id=client_id,
            session_id=session_id,
        )

    def _shared_target(self) -> Target:
        return Target(_SHARED_KEY, self.shared_path, SHARED_ENVELOPE, keep_backup=True)

    def _index_target(self) -> Target:
        return Target(_INDEX_KEY, self.index_path, INDEX_ENVELOPE, keep_backup=False)

    def _file_lock(self, key: Key):
        return self._lanes.file_lock(key)

    def _snapshot(
        self, target: Target, payload: Any, extra_fields: dict[str, Any] | None = None
    ) -> Snapshot:
        """Serialize C{payload} now and check the file's size against the limit."""
        payload_json = canonical_json(payload)
        overhead = envelope_overhead(target.envelope, tuple(sorted((extra_fields or {}).items())))
        size_bytes = overhead + len(payload_json)
        if target.envelope is not INDEX_ENVELOPE and size_bytes > self.max_session_bytes:
            what = target.session_id or os.path.basename(target.path)
            raise RecordTooLarge(size_bytes, self.max_session_bytes, what)
        saved_at = iso_timestamp(self._reactor.seconds())
        return Snapshot(target, payload_json, size_bytes, saved_at, dict(extra_fields or {}))

    def _session_snapshot(self, session: dict[str, Any]) -> Snapshot:
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
        return self._lanes.submit_task(target.key, lambda: self._read_pending_or_file(target))

    def write(
        self, session: dict[str, Any], *, saved_at: str | None = None, saved_copy: bool = False
    ) -> defer.Deferred:
        """Write C{session} durably; fires with a L{WriteResult}.

        @param saved_at: the envelope's timestamp (default: when it is written).
        @param saved_copy: write the copy that C{save_context} keeps (read back
            with L{read_saved}) instead of the session file.
        """
        return self._counters.observed(
            "single", lambda: self._write(session, saved_at=saved_at, saved_copy=saved_copy)
        )

    def _write(
        self, session: dict[str, Any], *, saved_at: str | None, saved_copy: bool
    ) -> defer.Deferred:
        try:
            self._check_open()
            if not isinstance(session, dict):
                raise ValueError(f"a session must be a dict, not {type(session).__name__}")
            target = self._session_target(
                session.get("client_id"), session.get("session_id"), saved=saved_copy
            )
            snapshot = self._snapshot(target, session)
        except (ValueError, TypeError, RecursionError, RecordTooLarge, StorageFailure):
            return defer.fail()
        if saved_at is not None:
            snapshot = dataclasses.replace(snapshot, saved_at=saved_at)
        return self._lanes.submit_write(snapshot)

    def addWriteObserver(self, observer: WriteObserver) -> None:  # noqa: N802
        """Call C{observer(kind, seconds, ok)} each time a L{write} or L{write_many} finishes.

        C{kind} is C{"single"} (L{write}) or C{"batch"} (L{write_many});
        C{seconds} runs from the call to its Deferred firing, on the reactor's
        clock; C{ok} is false when that Deferred failed.  Observers run on the
        reactor thread before the caller sees the result; one that raises is
        logged and changes nothing.
        """
        self._counters.add_write_observer(observer)

    def removeWriteObserver(self, observer: WriteObserver) -> None:  # noqa: N802
        """Stop calling C{observer}."""
        self._counters.remove_write_observer(observer)

    def read_saved(self, client_id: str, session_id: str) -> defer.Deferred:
        """What C{save_context} last saved: fires with C{(session dict, saved_at)}.

        Fails with L{SessionFileMissing} (a C{KeyError}) when nothing was saved.
        """
        try:
            self._check_open()
            target = self._session_target(client_id, session_id, saved=True)
        except (ValueError, StorageFailure):
            return defer.fail()
        return self._lanes.submit_task(target.key, lambda: self._read_job(target)).addCallback(
            lambda session: (session, self._counters.saved_at(target.key))
        )

    def snapshot(self, session: dict[str, Any]) -> Snapshot:
        """Serialize C{session} now, for a later L{write_many}.

        A caller that must not hold the reactor for a whole group serializes
        sessions one by one with this, yielding in between, and writes the
        snapshots together.

        @raise RecordTooLarge: over C{max_session_bytes}.
        @raise ValueError: not a session dict, or ids that cannot name a file.
        """
        return self._session_snapshot(session)

    def write_many(self, sessions: list[dict[str, Any] | Snapshot]) -> defer.Deferred:
        """Write several sessions in one thread job, fsyncing each directory once.

        Each item is a session dict or a L{snapshot} of one.

        Fires with C{{session_id: WriteResult or Failure}}; it never fails as a whole.
        A session with a write already queued or running joins that queue instead
        (so writes of one session stay in order).
        """
        return self._counters.observed("batch", lambda: self._write_many(sessions))

    def _write_many(self, sessions: list[dict[str, Any] | Snapshot]) -> defer.Deferred:
        try:
            self._check_open()
        except StorageFailure:
            return defer.fail()
        outcomes: dict[str, defer.Deferred] = {}
        group: dict[Key, Snapshot] = {}
        for session in sessions:
            if isinstance(session, Snapshot):
                snapshot, name = session, session.target.session_id
            else:
                session_id = session.get("session_id") if isinstance(session, dict) else None
                name = session_id if isinstance(session_id, str) else repr(session_id)
                try:
                    snapshot = self._session_snapshot(session)
                except (ValueError, TypeError, RecursionError, RecordTooLarge):
                    outcomes[name] = defer.fail()
                    continue
            key = snapshot.target.key
            if key in group:  # the same session twice in one batch: the last one wins
                group[key] = snapshot
                continue
            if self._lanes.claim(key):
                group[key] = snapshot
                dropped = outcomes.pop(name, None)
                if dropped is not None:  # an earlier item of that name; this one answers
                    dropped.addErrback(lambda _: None)
            else:
                if name in outcomes:  # superseded by this later snapshot; its result is moot
                    outcomes[name].addErrback(lambda _: None)
                outcomes[name] = self._lanes.submit_write(snapshot)
        # Few outcomes of their own (refused or queued behind a running write);
        # the group answers for all its members at once.
        names = list(outcomes)
        others = defer.DeferredList([outcomes[name] for name in names], consumeErrors=True)
        self._journal.busy(len(group))
        to_journal, as_files = self._journal.split(list(group.values()), self._counters.file_info)
        grouped = self._lanes.start_group(as_files) if as_files else defer.succeed({})
        journaled = self._journal.write_group(to_journal) if to_journal else defer.succeed({})

        def gathered(results: list) -> dict[str, object]:
            (_, by_key), (_, journal_by_key), (_, singles) = results
            merged = {key[1]: value for key, value in by_key.items()}
            merged.update((key[1], value) for key, value in journal_by_key.items())
            merged.update((name, value) for name, (_, value) in zip(names, singles, strict=True))
            return merged

        both = defer.DeferredList(
            [grouped, journaled, others], fireOnOneErrback=True, consumeErrors=True
        )
        return both.addCallback(gathered)

    def delete(self, client_id: str, session_id: str) -> defer.Deferred:
        """Remove a session's file, its .bak and its saved copy (after their queued
        writes); missing is fine."""
        try:
            self._check_open()
            target = self._session_target(client_id, session_id)
            saved = self._session_target(client_id, session_id, saved=True)
        except (ValueError, StorageFailure):
            return defer.fail()
        # A journal holding the session is retired first, or replay would bring it back.
        deleted = self._journal.retired_through(target.key).addCallback(
            lambda _: self._lanes.submit_task(target.key, lambda: self._delete_job(target))
        )
        return deleted.addCallback(
            lambda _: self._lanes.submit_task(saved.key, lambda: self._delete_job(saved))
        )

    def read_shared(self) -> defer.Deferred:
        """The shared namespace bindings last written, or C{{}} if none were."""
        try:
            self._check_open()
        except StorageFailure:
            return defer.fail()
        target = self._shared_target()
        return self._lanes.submit_task(target.key, lambda: self._read_shared_job(target))

    def write_shared(self, bindings: dict[str, Any]) -> defer.Deferred:
        """Write the shared namespace bindings durably; fires with a L{WriteResult}."""
        try:
            self._check_open()
            if not isinstance(bindings, dict):
                raise ValueError(f"bindings must be a dict, not {type(bindings).__name__}")
            snapshot = self._snapshot(self._shared_target(), bindings)
        except (ValueError, TypeError, RecursionError, RecordTooLarge, StorageFailure):
            return defer.fail()
        return self._lanes.submit_write(snapshot)

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
                entry = meta_of(meta)
                size_bytes, saved_at = self._counters.file_info.get(key, (None, None))
                entry["size_bytes"] = meta.get("size_bytes", size_bytes)
                entry["saved_at"] = meta.get("saved_at", saved_at)
                entries.append(entry)
            snapshot = self._snapshot(
                self._index_target(),
                entries,
                extra_fields={"saved_at_ns": int(self._reactor.seconds() * 1_000_000_000)},
            )
        except (ValueError, TypeError, StorageFailure):
            return defer.fail()
        return self._lanes.submit_write(snapshot).addCallback(lambda _: None)

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
        # journals of this run first (their sessions have no files yet), then those
        # a crash left, replayed in the same pool job before the index is built
        loaded = self._journal.compact_all().addCallback(
            lambda _: self._lanes.in_pool(self._load_index_in_thread, self._reactor.seconds())
        )
        return loaded.addCallback(self._index_loaded)

    def _load_index_in_thread(self, now: float) -> tuple[list[dict], dict, dict]:
        replayed = journal.replay_found(
            self, self._journal.found_up_to, now, index.STALE_TEMP_SECONDS
        )
        if replayed["journals"] or replayed["quarantined"]:
            self._log_from_thread(
                "info",
                "replayed {journals} journals ({records} records: {written} written,"
                " {skipped} skipped as older than their files), {quarantined} quarantined",
                **replayed,
            )
        return index.load_index(self, now)

    # ------------------------------------------------------------------ leases
    # One node owns a data directory: it holds every lease, and no other node
    # can take one over.

    shared_by_nodes = False

    def acquire_lease(self, session_id: str, new: bool = False) -> defer.Deferred:
        """Always granted, and this node's copy is current (C{True})."""
        return defer.succeed(True)

    def release_lease(self, session_id: str) -> defer.Deferred:
        """Nothing to give up: no other node shares the data directory."""
        return defer.succeed(None)

    def addLeaseLostObserver(self, observer) -> None:  # noqa: N802
        """Never called: no other node can take a lease of this one."""

    def load_metas(
        self, client_id: str | None = None, session_id: str | None = None
    ) -> defer.Deferred:
        """The metas of L{load_index}, of C{client_id} or the one C{session_id}."""

        def matching(metas: list[dict]) -> list[dict]:
            return [
                meta
                for meta in metas
                if client_id in (None, meta.get("client_id"))
                and session_id in (None, meta.get("session_id"))
            ]

        return self.load_index().addCallback(matching)

    def verify_all(self) -> defer.Deferred:
        """Check every file (for an admin tool); moves nothing.

        Fires with one dict per file: C{path} (relative to the data directory),
        C{kind}, C{client_id}, C{session_id}, C{size_bytes}, C{ok}, C{reason}.
        """
        try:
            self._check_open()
        except StorageFailure:
            return defer.fail()
        return self._lanes.in_pool(index.verify_all, self)

    def statistics(self) -> dict[str, Any]:
        """Cached counters; no I/O."""
        return {
            **self._counters.statistics(self._lanes.pending_writes),
            **self._journal.statistics(),
        }

    # ------------------------------------------------------------------ checks

    def _check_open(self) -> None:
        if not self._is_open or self._lanes.threadpool is None:
            raise StorageFailure(f"session store {self.data_dir} is not open")
        if self._is_closing:
            raise StorageFailure(f"session store {self.data_dir} is closing")

    def _write_finished(self, result: object, snapshot: Snapshot) -> object:
        """Log a failed write and count it (reactor thread)."""
        if isinstance(result, Failure):
            path, error = snapshot.target.path, result.value
            self.log.error("write of {path} failed: {error}", path=path, error=error)
        elif snapshot.target.envelope is SESSION_ENVELOPE:
            self._journal.superseded(snapshot.target.key)  # a newer file than its record
        return self._counters.written(result, snapshot)

    def _note_quarantine(self, path: str, destination: str, reason: str) -> None:
        self._counters.quarantined()
        self.log.warn(
            "quarantined unreadable {path} as {destination}: {reason}",
            path=path,
            destination=destination,
            reason=reason,
        )

    # ------------------------------------------------------------------ thread side

    def _log_from_thread(self, level: str, format: str, **fields: Any) -> None:
        self._reactor.callFromThread(getattr(self.log, level), format, **fields)

    def _sealed(self, snapshot: Snapshot) -> bytes:
        """The bytes of C{snapshot}'s file: its envelope, MAC'd (for a file or a journal record)."""
        return seal(
            snapshot.target.envelope,
            snapshot.payload_json,
            self._secret_key,
            snapshot.saved_at,
            snapshot.extra_fields,
        )

    def _prepare_write(self, snapshot: Snapshot) -> tuple[bytes, str, str]:
        """Seal C{snapshot} into a durable temp file beside its target.

        @return: the file bytes, their C{saved_at}, and the temp file's path.
        @raise StorageFailure: on any OS error (the temp file is removed).
        """
        target = snapshot.target
        saved_at = snapshot.saved_at
        data = self._sealed(snapshot)
        try:
            if target.session_id is not None:
                durable.ensure_dir(os.path.dirname(target.path), parent_to_sync=self.sessions_dir)
            temp_path = durable.write_temp(target.path, data)
        except OSError as exc:
            raise storage_failure("write", target.path, exc) from exc
        return data, saved_at, temp_path

    def _commit_write(self, snapshot: Snapshot, prepared: tuple[bytes, str, str]) -> WriteResult:
        """Keep the old file as .bak and rename the prepared temp file over it."""
        data, saved_at, temp_path = prepared
        target = snapshot.target
        try:
            durable.commit_temp(temp_path, target.path, backup=target.keep_backup)
        except OSError as exc:
            raise storage_failure("write", target.path, exc) from exc
        return WriteResult.of(data, saved_at)

    def _quarantine(self, path: str, reason: str, now: float) -> str:
        """Move C{path} into the quarantine directory under a unique name."""
        stamp = datetime.fromtimestamp(now, tz=UTC).strftime("%Y%m%dT%H%M%S")
        destination = durable.quarantine_move(path, self.data_dir, self.quarantine_dir, stamp)
        self._reactor.callFromThread(self._note_quarantine, path, destination, reason)
        return destination

    def _load_verified(self, path: str, target: Target) -> tuple[dict[str, Any], int]:
        return recovery.load_verified(path, target, self._secret_key)

    def _read_recovering(self, target: Target, now: float) -> tuple[dict[str, Any], int]:
        """Caller holds the file lock; C{now} stamps what it quarantines."""
        return recovery.read_recovering(
            target,
            self._secret_key,
            lambda path, reason: self._quarantine(path, reason, now),
            self._log_from_thread,
        )

    def _read_pending_or_file(self, target: Target) -> defer.Deferred:
        """A journaled session not yet compacted is answered from its record's bytes."""
        pending = self._journal.document(target.key)
        if pending is None:
            return self._read_job(target)
        return self._lanes.in_pool(self._journal.session_of, pending)

    def _read_job(self, target: Target) -> defer.Deferred:
        now = self._reactor.seconds()

        def read_in_thread() -> tuple[dict[str, Any], int]:
            with self._file_lock(target.key):
                return self._read_recovering(target, now)

        def loaded(outcome: tuple[dict[str, Any], int]) -> dict[str, Any]:
            document, size = outcome
            self._counters.set_file(target.key, size, document.get("saved_at"))
            return document["session"]

        def gone(reason: Failure) -> Failure:
            reason.trap(SessionFileMissing, SessionFileCorrupt)
            self._counters.forget_file(target.key)
            return reason

        return self._lanes.in_pool(read_in_thread).addCallbacks(loaded, gone)

    def _read_shared_job(self, target: Target) -> defer.Deferred:
        now = self._reactor.seconds()

        def read_in_thread() -> dict[str, Any]:
            with self._file_lock(target.key):
                try:
                    document, _ = self._read_recovering(target, now)
                except SessionFileMissing:
                    return {}
            return document["bindings"]

        return self._lanes.in_pool(read_in_thread)

    def _delete_job(self, target: Target) -> defer.Deferred:
        def delete_in_thread() -> None:
            with self._file_lock(target.key):
                try:
                    durable.remove_file_and_backup(target.path)
                except FileNotFoundError:
                    return  # the client directory itself never existed
                except OSError as exc:
                    raise storage_failure("delete", target.path, exc) from exc

        def deleted(_: object) -> None:
            self._counters.forget_file(target.key)

        return self._lanes.in_pool(delete_in_thread).addCallback(deleted)

    def _index_loaded(self, outcome: tuple[list[dict], dict, dict]) -> list[dict]:
        metas, file_info, counts = outcome
        self._counters.reset(file_info)
        self.log.info(
            "loaded {total} sessions: {from_index} from the index, {from_files} read"
            " from their files, {dropped} index entries dropped, {unreadable} unreadable",
            total=len(metas),
            **counts,
        )
        return metas
