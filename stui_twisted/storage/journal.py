"""The group journal: first writes of many new sessions as one durable file per flush.

A C{batch} flush that creates many sessions (the C{create_session} storm of issue 21)
would otherwise create one durable file per new session: temp file, fsync, rename,
directory fsync, thousands a second, on the CPU the reactor uses.  Instead, the
sessions of one L{SessionStore.write_many} call that have never been written by the
store go as records into I{one} new file::

    DATA/journal/<seq>.jnl        seq: 1, 2, 3, ... (monotonic; decimal)

written durably (temp file, fsync, rename, fsync of C{DATA/journal/}) in the store's
pool thread; the group's C{WriteResult}s fire once it is durable, so "clean" still
means "on disk" and the loss window stays one flush interval.  Sessions that have a
file keep the per-session path.

B{Format.}  The first line is a sealed envelope (L{stui_twisted.storage.fileformat})
of format C{stui-journal} whose payload is C{{"seq": N, "records": K, "sha256":
"<hex of the record lines>"}}; then K lines, each exactly the bytes the session's
own file would hold (C{fileformat.seal} of a C{stui-session} envelope; canonical
JSON has no newline inside).  So the header's MAC covers the body through its hash,
and each record carries its own MAC.  A record names its session only by the
C{client_id} and C{session_id} inside it; the file it becomes is computed with the
store's C{_session_target} (L{stui_twisted.storage.pathcodec}), never taken from the
journal's bytes.

B{Compaction.}  Journaled records are later I{materialized} into their per-session
files: a normal durable group write, with each key's lane claimed, so it is ordered
with that session's other writes.  It starts once no group write has run for
C{compact_delay} seconds (three flush intervals in the server; a write of fewer
than C{min_group} sessions does not count), in chunks of L{COMPACT_CHUNK}
records, and stops again when such a write comes; above C{max_records} pending
records or C{max_bytes} pending bytes it runs at once.  A record is skipped when its session's file (or
C{.bak}) exists: that is a newer direct write.  A journal file is unlinked (and the
directory fsynced) only when every record in it is materialized or superseded, and
journals retire strictly in sequence order.  Until then the pending records' bytes
are kept in memory, so a read of such a session is answered from them.  A delete of
a session held by a journal first compacts every journal up to it, so replay cannot
bring it back.  L{SessionStore.close} compacts everything (a clean shutdown leaves
no journal); after a crash, C{load_index} replays the journals found at C{open},
in sequence order, before it builds the index (L{replay_found}).

This module holds the format (L{encode}, L{decode}), the thread-side file work
(L{write_file}, L{replay_found}, L{verify_rows}) and the reactor-side book-keeping
and scheduling (L{GroupJournal}).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from stui_twisted.storage import durable
from stui_twisted.storage.errors import storage_failure
from stui_twisted.storage.fileformat import (
    SESSION_ENVELOPE,
    BadFile,
    Envelope,
    WriteResult,
    canonical_json,
    seal,
    unseal,
)
from stui_twisted.storage.lanes import Key, Snapshot, WriteLanes

if TYPE_CHECKING:
    from stui_twisted.storage.store import SessionStore

JOURNAL_ENVELOPE = Envelope("stui-journal", "journal")
JOURNAL_SUFFIX = ".jnl"

#: Records materialized by one compaction job (one pool job, one fsync per directory:
#: with 50 clients, 512 files share about 50 directory fsyncs).
COMPACT_CHUNK = 512

#: The idle delay as a multiple of the flush interval (tap.py): a flush that starts
#: a little late must not look like quiet in the middle of a storm.
DELAY_PER_FLUSH_INTERVAL = 3

#: Fewest first writes in one write_many that go to a journal; fewer are written as
#: files, as before (one or two files cost little, and their files exist at once).
MIN_GROUP = 8

#: Pending records or bytes above which compaction runs at once, busy or not.  The
#: bytes bound the memory the pending records hold; the records bound how much a
#: start-up after a crash replays (16,384 new files: a few seconds).
MAX_RECORDS = 16384
MAX_BYTES = 32 * 1024 * 1024


# ---------------------------------------------------------------------- format


def encode(seq: int, records: list[bytes], secret_key: bytes, saved_at: str) -> bytes:
    """The bytes of journal C{seq} holding C{records} (sealed session files)."""
    body = b"".join(records)
    header = {"seq": seq, "records": len(records), "sha256": hashlib.sha256(body).hexdigest()}
    return seal(JOURNAL_ENVELOPE, canonical_json(header), secret_key, saved_at) + body


def decode(data: bytes, secret_key: bytes) -> tuple[int, list[tuple[bytes, dict[str, Any]]]]:
    """The sequence number and the records of a journal, each as (bytes, session dict).

    @raise BadFile: the header, the body's hash, or a record does not verify.
    """
    first, _, body = data.partition(b"\n")
    header = unseal(first, JOURNAL_ENVELOPE, secret_key)["journal"]
    if not isinstance(header, dict) or type(header.get("seq")) is not int:
        raise BadFile("journal header has no integer 'seq'")
    if hashlib.sha256(body).hexdigest() != header.get("sha256"):
        raise BadFile("journal body does not match its header's sha256 (torn or edited)")
    lines = body.split(b"\n")[:-1] if body else []
    if len(lines) != header.get("records"):
        raise BadFile(
            f"journal holds {len(lines)} records, its header says {header.get('records')!r}"
        )
    records = []
    for number, line in enumerate(lines, 1):
        try:
            session = unseal(line, SESSION_ENVELOPE, secret_key)["session"]
        except BadFile as exc:
            raise BadFile(f"record {number}: {exc}") from None
        if not isinstance(session, dict):
            raise BadFile(f"record {number}: 'session' is not an object")
        records.append((line + b"\n", session))
    return header["seq"], records


def journal_path(directory: str, seq: int) -> str:
    return os.path.join(directory, f"{seq}{JOURNAL_SUFFIX}")


def found_on_disk(directory: str) -> list[tuple[int, str]]:
    """The journals in C{directory}, oldest first (temp files and other names left out)."""
    found = []
    for name in durable.listdir(directory):
        stem = name[: -len(JOURNAL_SUFFIX)]
        if name.endswith(JOURNAL_SUFFIX) and stem.isdigit():
            found.append((int(stem), os.path.join(directory, name)))
    return sorted(found)


# ---------------------------------------------------------------------- thread side


def write_file(directory: str, seq: int, data: bytes) -> str:
    """Write journal C{seq} durably: temp file, fsync, rename, fsync the directory."""
    path = journal_path(directory, seq)
    durable.commit_temp(durable.write_temp(path, data), path, backup=False)
    durable.fsync_dir(directory)
    return path


def retire_files(directory: str, paths: list[str]) -> None:
    """Unlink compacted journals (in order), then fsync the directory once."""
    for path in paths:
        durable.remove_quietly(path)
    durable.fsync_dir(directory)


def _has_file(target) -> bool:
    return os.path.lexists(target.path) or os.path.lexists(target.backup_path)


def remove_stale_temps(directory: str, now: float, stale_after: float) -> None:
    """Remove temp files of journal writes interrupted at least C{stale_after} s ago."""
    for name in durable.listdir(directory):
        if not name.startswith(".") or ".tmp-" not in name:
            continue
        path = os.path.join(directory, name)
        try:
            if now - os.lstat(path).st_mtime >= stale_after:
                durable.remove_quietly(path)
        except FileNotFoundError:
            continue


def replay_found(store: SessionStore, up_to: int, now: float, stale_after: float) -> dict[str, int]:
    """Materialize every journal of seq <= C{up_to} in order, then unlink it (start-up).

    A record is written only when its session had no file before the replay (a
    file there is a newer direct write; one written by an earlier journal of this
    replay is older, so a later record replaces it).  A journal that does not
    verify is quarantined (and logged); its records are then not replayed.  Temp
    files of journal writes older than C{stale_after} seconds are removed (never
    acknowledged; a younger one may be a write still running).

    @return: counts for the log: journals, records, written, skipped, quarantined.
    """
    remove_stale_temps(store.journal_dir, now, stale_after)
    directory = store.journal_dir
    counts = {"journals": 0, "records": 0, "written": 0, "skipped": 0, "quarantined": 0}
    replayed: set[Key] = set()
    for seq, path in found_on_disk(directory):
        if seq > up_to:
            break
        try:
            _, records = decode(durable.read_bytes(path), store._secret_key)
        except FileNotFoundError:
            continue
        except BadFile as exc:
            store._quarantine(path, f"journal: {exc}", now)
            counts["quarantined"] += 1
            continue
        except OSError as exc:
            raise storage_failure("read journal", path, exc) from exc
        counts["journals"] += 1
        written_dirs: set[str] = set()
        for data, session in records:
            counts["records"] += 1
            try:
                target = store._session_target(session.get("client_id"), session.get("session_id"))
            except (ValueError, TypeError) as exc:
                store._log_from_thread(
                    "warn", "journal {path}: record skipped: {error}", path=path, error=exc
                )
                counts["skipped"] += 1
                continue
            with store._file_lock(target.key):
                if target.key not in replayed and _has_file(target):
                    counts["skipped"] += 1
                    continue
                try:
                    directory_of = os.path.dirname(target.path)
                    durable.ensure_dir(directory_of, parent_to_sync=store.sessions_dir)
                    durable.durable_replace(target.path, data, backup=False, sync_dir=False)
                except OSError as exc:
                    raise storage_failure("replay journal record to", target.path, exc) from exc
            replayed.add(target.key)
            written_dirs.add(directory_of)
            counts["written"] += 1
        try:
            for written in written_dirs:
                durable.fsync_dir(written)
            retire_files(directory, [path])
        except OSError as exc:
            raise storage_failure("retire journal", path, exc) from exc
    return counts


def verify_rows(store: SessionStore) -> list[dict]:
    """One C{verify_all} row per journal file (thread side)."""
    rows = []
    for _, path in found_on_disk(store.journal_dir):
        row = {
            "path": os.path.relpath(path, store.data_dir),
            "kind": "journal",
            "client_id": None,
            "session_id": None,
            "size_bytes": None,
            "ok": False,
            "reason": None,
        }
        try:
            data = durable.read_bytes(path)
            row["size_bytes"] = len(data)
            decode(data, store._secret_key)
            row["ok"] = True
        except FileNotFoundError:
            continue  # retired while we looked
        except BadFile as exc:
            row["reason"] = str(exc)
        except OSError as exc:
            row["reason"] = str(storage_failure("read", path, exc))
        rows.append(row)
    return rows


# ---------------------------------------------------------------------- reactor side


@dataclass
class _Journal:
    seq: int
    path: str
    outstanding: set[Key] = field(default_factory=set)
    written: bool = False  # its write finished (whether or not it held records)
    keys: list[Key] = field(default_factory=list)  # the sessions it was written for


class GroupJournal:
    """Which sessions are journaled, when to compact, and what a read or delete waits for.

    Reactor thread only, except the jobs it runs in the store's pool.

    @param store: the L{SessionStore} (its secret key, targets, counters, quarantine).
    @param lanes: the store's L{WriteLanes}.
    @param compact_delay: seconds without a group write before compaction starts.
    @param min_group: fewest first writes in one C{write_many} that are journaled.
    @param max_records: pending records above which compaction runs at once.
    @param max_bytes: pending payload bytes above which compaction runs at once.
    """

    log = Logger()

    def __init__(
        self,
        store: SessionStore,
        lanes: WriteLanes,
        reactor: Any,
        *,
        compact_delay: float,
        min_group: int = MIN_GROUP,
        max_records: int = MAX_RECORDS,
        max_bytes: int = MAX_BYTES,
    ) -> None:
        self._store = store
        self._lanes = lanes
        self._reactor = reactor
        self.compact_delay = compact_delay
        self.min_group = min_group
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.pending: dict[Key, Snapshot] = {}
        """Journaled records not yet materialized or superseded: their snapshots."""
        self._pending_bytes = 0
        self._journals: dict[int, _Journal] = {}  # on disk (or being written), by seq
        self._holding: dict[Key, int] = {}  # key -> newest journal on disk holding it
        self.next_seq = 1
        self.found_up_to = 0
        """The newest journal found at C{open}: what L{replay_found} replays."""
        self._last_group = reactor.seconds()
        self._timer: Any = None
        self._compacting = False
        self._retiring = False
        self._waiters: list[tuple[int, defer.Deferred]] = []

    # ------------------------------------------------------------------ state

    def opened(self, found: list[tuple[int, str]]) -> None:
        """The journals C{open} found (left by a crash): replayed by C{load_index}."""
        self.found_up_to = found[-1][0] if found else 0
        self.next_seq = max(self.next_seq, self.found_up_to + 1)

    def statistics(self) -> dict[str, int]:
        return {
            "journal_records_pending": len(self.pending),
            "journals_on_disk": len(self._journals),
        }

    def holds(self, key: Key) -> bool:
        """Whether a journal on disk (or being written) holds C{key}."""
        return key in self._holding

    def split(
        self, snapshots: list[Snapshot], file_info: dict[Key, Any]
    ) -> tuple[list[Snapshot], list[Snapshot]]:
        """C{(to journal, to write as files)}: first writes go to a journal if enough."""
        first = [
            s
            for s in snapshots
            if s.target.envelope is SESSION_ENVELOPE
            and s.target.key not in file_info
            and s.target.key not in self._holding
        ]
        if len(first) < self.min_group:
            return [], snapshots
        chosen = {id(s) for s in first}
        return first, [s for s in snapshots if id(s) not in chosen]

    def busy(self, size: int) -> None:
        """A group write of C{size} sessions is starting: a large one (a flush of a
        storm) makes compaction wait for quiet again; a few sessions do not."""
        if size >= self.min_group:
            self._last_group = self._reactor.seconds()

    # ------------------------------------------------------------------ journal writes

    def write_group(self, snapshots: list[Snapshot]) -> defer.Deferred:
        """Journal C{snapshots} (their lanes claimed); fires like C{start_group}."""
        seq, self.next_seq = self.next_seq, self.next_seq + 1
        keys = [snapshot.target.key for snapshot in snapshots]
        journal = self._journals[seq] = _Journal(
            seq, journal_path(self._store.journal_dir, seq), keys=keys
        )
        for key in keys:
            self._holding[key] = seq
        journaled: list[Snapshot] = []
        self._last_group = self._reactor.seconds()

        def job(group: list[Snapshot]) -> dict:
            return self._write_job(seq, group, journaled)

        def registered(results: dict) -> dict:
            journal.written = True
            for snapshot in journaled:
                key = snapshot.target.key
                if not isinstance(results.get(key), WriteResult):
                    continue
                journal.outstanding.add(key)
                self.pending[key] = snapshot
                self._pending_bytes += len(snapshot.payload_json)
            for snapshot in snapshots:  # written as files after all, or failed
                key = snapshot.target.key
                if key not in journal.outstanding and self._holding.get(key) == seq:
                    del self._holding[key]
            self._last_group = self._reactor.seconds()
            self._retire_ready()
            self._schedule()
            return results

        return self._lanes.start_group(snapshots, job=job).addCallback(registered)

    def _write_job(self, seq: int, group: list[Snapshot], journaled: list[Snapshot]) -> dict:
        """Thread side: one journal file for the group (a session with a file: a file)."""
        store = self._store
        results: dict[Key, object] = {}
        as_files, records = [], []
        for snapshot in group:
            target = snapshot.target
            if _has_file(target):  # a file is there after all (a failed write, say)
                as_files.append(snapshot)
                continue
            data = store._sealed(snapshot)
            records.append(data)
            journaled.append(snapshot)
            results[target.key] = WriteResult.of(data, snapshot.saved_at)
        if as_files:
            results.update(self._lanes._write_group_job(as_files))
        if records:
            path = journal_path(store.journal_dir, seq)
            try:
                data = encode(seq, records, store._secret_key, journaled[0].saved_at)
                write_file(store.journal_dir, seq, data)
            except OSError as exc:
                failure = storage_failure("write journal", path, exc)
                for snapshot in journaled:
                    results[snapshot.target.key] = failure
        return results

    def superseded(self, key: Key) -> None:
        """A durable per-session write of C{key} finished: its record is not needed."""
        snapshot = self.pending.pop(key, None)
        if snapshot is None:
            return
        self._pending_bytes -= len(snapshot.payload_json)
        journal = self._journals.get(self._holding.get(key, -1))
        if journal is not None:
            journal.outstanding.discard(key)
        self._retire_ready()

    # ------------------------------------------------------------------ reads, deletes

    def document(self, key: Key) -> Snapshot | None:
        """The pending snapshot of C{key}, if a read should be answered from it."""
        return self.pending.get(key)

    @staticmethod
    def session_of(snapshot: Snapshot) -> dict[str, Any]:
        """The session dict of a pending record (thread side)."""
        return json.loads(snapshot.payload_json)

    def retired_through(self, key: Key) -> defer.Deferred:
        """Fires once no journal on disk holds C{key} (compacting up to it at once)."""
        seq = self._holding.get(key)
        if seq is None:
            return defer.succeed(None)
        waiter: defer.Deferred = defer.Deferred()
        self._waiters.append((seq, waiter))
        self._compact()
        return waiter

    def compact_all(self) -> defer.Deferred:
        """Fires once every journal is retired (for C{close} and C{load_index})."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if not self._journals:
            return defer.succeed(None)
        waiter: defer.Deferred = defer.Deferred()
        self._waiters.append((max(self._journals), waiter))
        self._compact()
        return waiter

    # ------------------------------------------------------------------ compaction

    def _forced(self) -> bool:
        return bool(self._waiters) or (
            len(self.pending) > self.max_records or self._pending_bytes > self.max_bytes
        )

    def _schedule(self) -> None:
        if not self._journals:
            return
        if self._forced():
            self._compact()
            return
        if self._timer is None or not self._timer.active():
            self._timer = self._reactor.callLater(self.compact_delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        wait = self._last_group + self.compact_delay - self._reactor.seconds()
        # (a tenth of the delay of slack: float rounding must not re-arm it forever)
        if wait <= self.compact_delay / 10 or self._forced():
            self._compact()
        elif self._journals:
            self._timer = self._reactor.callLater(wait, self._tick)

    def _compact(self) -> None:
        """Materialize the next chunk of the oldest journal's records (one pool job)."""
        if self._compacting or not self._journals or self._lanes.threadpool is None:
            return
        # the oldest journals' records first (they retire first), then in key order
        # so that the chunk's files share few directories (one fsync each)
        candidates: list[Key] = []
        for journal in self._journals.values():
            candidates.extend(key for key in journal.outstanding if key in self.pending)
            if len(candidates) >= COMPACT_CHUNK:
                break
        chunk = [
            self.pending[key]
            for key in sorted(candidates[:COMPACT_CHUNK])
            if self._lanes.claim(key)
        ]
        if not chunk:
            self._retire_ready()
            if self._journals and not self._retiring:
                # lanes busy with this journal's keys (or it is being written): later
                self._timer = self._timer or self._reactor.callLater(self.compact_delay, self._tick)
            return
        self._compacting = True
        started = self._last_group
        keys = [snapshot.target.key for snapshot in chunk]
        job = self._lanes.in_pool(self._compact_job, chunk)

        def done(results: object) -> None:
            self._compacting = False
            failed: list[object] = []
            for snapshot in chunk:
                key = snapshot.target.key
                result = results if isinstance(results, Failure) else results.get(key)
                if isinstance(result, (BaseException, Failure)):
                    failed.append(result)
                    continue
                if isinstance(result, WriteResult):
                    self._store._counters.set_file(key, result.size_bytes, result.saved_at)
                if self.pending.get(key) is snapshot:
                    self.superseded(key)
            self._lanes.release(keys)
            if failed:
                reason = failed[0] if isinstance(failed[0], Failure) else Failure(failed[0])
                self.log.error(
                    "journal compaction: {count} records could not be written: {error}",
                    count=len(failed),
                    error=reason.value,
                )
                self._fail_waiters(reason)
                self._timer = self._timer or self._reactor.callLater(self.compact_delay, self._tick)
            elif self._forced() or self._last_group == started:
                self._compact()  # idle still (or must): the next chunk
            else:
                self._schedule()  # a group write came: wait for quiet again

        job.addBoth(done)

    def _compact_job(self, chunk: list[Snapshot]) -> dict:
        """Thread side: write the chunk's records as files (skipping those with a file)."""
        to_write = []
        results: dict[Key, object] = {}
        for snapshot in chunk:
            if _has_file(snapshot.target):  # a newer direct write is there
                results[snapshot.target.key] = None
            else:
                to_write.append(snapshot)
        results.update(self._lanes._write_group_job(to_write))
        return results

    def _retire_ready(self) -> None:
        """Unlink the oldest journals whose records are all done, strictly in order."""
        if self._retiring:
            return
        ready = []
        for journal in self._journals.values():
            if journal.outstanding or not journal.written:
                break
            ready.append(journal)
        if not ready:
            return
        self._retiring = True
        paths = [journal.path for journal in ready]
        job = self._lanes.in_pool(retire_files, self._store.journal_dir, paths)

        def retired(result: object) -> None:
            self._retiring = False
            if isinstance(result, Failure):
                self.log.error("could not remove compacted journals: {error}", error=result.value)
                self._fail_waiters(result)
                return
            for journal in ready:
                del self._journals[journal.seq]
                for key in journal.keys:  # not every held key: only this journal's
                    if self._holding.get(key) == journal.seq:
                        del self._holding[key]
            oldest = min(self._journals, default=None)
            still = []
            for seq, waiter in self._waiters:
                if oldest is None or seq < oldest:
                    waiter.callback(None)
                else:
                    still.append((seq, waiter))
            self._waiters = still
            self._retire_ready()
            if self._waiters:
                self._compact()

        job.addBoth(retired)

    def _fail_waiters(self, reason: Failure) -> None:
        waiters, self._waiters = self._waiters, []
        for _, waiter in waiters:
            waiter.errback(reason)
