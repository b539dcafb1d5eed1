"""Write lanes: when each file operation runs, in which thread, and which writes coalesce.

Operations on one file run one at a time, in call order (one I{lane} per file), and
consecutive writes of one file coalesce: only the newest waiting snapshot is
written, and every caller's Deferred fires once a write holding its snapshot or a
later one is on disk.  The work itself runs in the store's thread pool; a group
write (C{write_many}) also uses a few fsync helper threads, so the filesystem can
commit its temp files together.  This module owns those threads and the per-file
locks; what a write does is given to it by the store.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from stui_twisted.storage import durable
from stui_twisted.storage.errors import StorageFailure, storage_failure
from stui_twisted.storage.fileformat import Envelope

#: Threads that write and fsync the temp files of one write_many in parallel.
FSYNC_HELPERS = 8

Key = tuple[str, str]


@dataclass(frozen=True)
class Target:
    """One file the store manages, and how to check it."""

    key: Key
    path: str
    envelope: Envelope
    keep_backup: bool
    client_id: str | None = None
    session_id: str | None = None

    @property
    def backup_path(self) -> str:
        return self.path + ".bak"


@dataclass(frozen=True)
class Snapshot:
    """A serialized payload waiting to be written to C{target}."""

    target: Target
    payload_json: bytes
    size_bytes: int
    saved_at: str
    """The envelope's C{saved_at}: stamped on the reactor thread when the write is
    asked for (or given by the caller), so no thread reads a clock."""
    extra_fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class _PendingWrite:
    snapshot: Snapshot
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


class WriteLanes:
    """The store's threads, its per-file lanes and locks, and its idle tracking.

    @param prepare: C{prepare(snapshot)} (in a thread): seal it into a durable
        temp file; returns what C{commit} needs.  Raises L{StorageFailure}.
    @param commit: C{commit(snapshot, prepared)} (in a thread): rename it into
        place; returns the C{WriteResult}.  Raises L{StorageFailure}.
    @param written: C{written(result, snapshot)} (reactor thread) after each write,
        before its callers hear of it; returns the result to pass on.
    @ivar pending_writes: writes queued or running.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        *,
        threadpool: ThreadPool | None,
        prepare: Callable[[Snapshot], Any],
        commit: Callable[[Snapshot, Any], Any],
        written: Callable[[object, Snapshot], object],
    ) -> None:
        self._reactor = reactor
        self.threadpool = threadpool
        self._owns_threadpool = threadpool is None
        self._shutdown_trigger: Any = None
        self._fsync_helpers: ThreadPoolExecutor | None = None
        self._prepare = prepare
        self._commit = commit
        self._written = written
        self._lanes: dict[Key, _Lane] = {}
        self._active_jobs = 0
        self._idle_waiters: list[defer.Deferred] = []
        # one lock per file being touched; an entry lives while some thread holds it
        self._file_locks: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._file_locks_guard = threading.Lock()
        self.pending_writes = 0

    # ------------------------------------------------------------------ threads

    def start(self) -> None:
        """Start the pool (making one if none was given) and the fsync helpers."""
        if self.threadpool is None:
            self.threadpool = ThreadPool(minthreads=1, maxthreads=4, name="stui-store")
            # a safety net: if nobody calls close(), the pool's threads (not daemons)
            # would keep the process alive after the reactor stopped
            self._shutdown_trigger = self._reactor.addSystemEventTrigger(
                "after", "shutdown", self._reactor_shut_down
            )
        if not self.threadpool.started:
            self.threadpool.start()
        if self._fsync_helpers is None:  # threads start only when a group write needs them
            self._fsync_helpers = ThreadPoolExecutor(
                max_workers=FSYNC_HELPERS, thread_name_prefix="stui-store-fsync"
            )

    def stop(self) -> None:
        """Stop the threads this object started (a given pool is left running)."""
        trigger, self._shutdown_trigger = self._shutdown_trigger, None
        if trigger is not None:
            self._reactor.removeSystemEventTrigger(trigger)
        if self._owns_threadpool and self.threadpool is not None:
            self.threadpool.stop()  # runs what is queued, then joins the threads
            self.threadpool = None
        # after the pool: a queued group write still needs its helpers
        helpers, self._fsync_helpers = self._fsync_helpers, None
        if helpers is not None:
            helpers.shutdown(wait=True)

    def _reactor_shut_down(self) -> None:
        self._shutdown_trigger = None  # it is firing: nothing left to remove
        if self.threadpool is not None and self._owns_threadpool:
            self.log.warn("reactor stopped before the session store was closed")
        self.stop()

    def in_pool(self, function: Callable, *args: Any) -> defer.Deferred:
        """Run C{function(*args)} in the pool; counted until it finishes."""
        self._active_jobs += 1
        job = deferToThreadPool(self._reactor, self.threadpool, function, *args)

        def finished(result: object) -> object:
            self._active_jobs -= 1
            self._check_idle()
            return result

        return job.addBoth(finished)

    def file_lock(self, key: Key) -> threading.Lock:
        """The lock a thread holds while it touches the file C{key}."""
        with self._file_locks_guard:
            lock = self._file_locks.get(key)
            if lock is None:
                lock = self._file_locks[key] = threading.Lock()
            return lock

    # ------------------------------------------------------------------ idle

    def when_idle(self) -> defer.Deferred:
        """Fires once nothing is queued or running."""
        waiter: defer.Deferred = defer.Deferred()
        self._idle_waiters.append(waiter)
        self._check_idle()
        return waiter

    def _check_idle(self) -> None:
        if self._active_jobs or self._lanes or not self._idle_waiters:
            return
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    # ------------------------------------------------------------------ lanes

    def submit_write(self, snapshot: Snapshot) -> defer.Deferred:
        """Queue a write of C{snapshot} in its file's lane (coalescing with a waiting one)."""
        waiter: defer.Deferred = defer.Deferred()
        lane = self._lanes.setdefault(snapshot.target.key, _Lane())
        if lane.queue and isinstance(lane.queue[-1], _PendingWrite):
            lane.queue[-1].snapshot = snapshot  # coalesce: the newest snapshot wins
            lane.queue[-1].waiters.append(waiter)
        else:
            lane.queue.append(_PendingWrite(snapshot, [waiter]))
            self.pending_writes += 1
        self._pump(snapshot.target.key)
        return waiter

    def submit_task(self, key: Key, run: Callable[[], defer.Deferred]) -> defer.Deferred:
        """Queue C{run()} (which returns a Deferred) in the lane of C{key}."""
        waiter: defer.Deferred = defer.Deferred()
        self._lanes.setdefault(key, _Lane()).queue.append(_PendingTask(run, waiter))
        self._pump(key)
        return waiter

    def claim(self, key: Key) -> bool:
        """Mark the lane of C{key} running for a group write, if nothing is queued there."""
        lane = self._lanes.get(key)
        if lane is not None and (lane.running or lane.queue):
            return False
        self._lanes[key] = lane or _Lane()
        self._lanes[key].running = True
        self.pending_writes += 1
        return True

    def release(self, keys: list[Key]) -> None:
        """Give back lanes L{claim}ed for work that is not a group write (compaction)."""
        for key in keys:
            self._lanes[key].running = False
            self.pending_writes -= 1
        for key in keys:
            self._pump(key)

    def _pump(self, key: Key) -> None:
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
            running = self.in_pool(self._write_job, snapshot).addBoth(
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

    def _write_finished(self, result: object, snapshot: Snapshot) -> object:
        self.pending_writes -= 1
        return self._written(result, snapshot)

    def start_group(
        self, snapshots: list[Snapshot], job: Callable[[list[Snapshot]], dict] | None = None
    ) -> defer.Deferred:
        """Write C{snapshots} (their lanes L{claim}ed) in one pool job.

        @param job: what the pool job runs instead of L{_write_group_job}
            (the group journal's write); it returns C{{key: result or exception}}.

        Fires once, with C{{key: WriteResult or Failure}}: one Deferred for
        the group rather than one per file, so finishing a group of hundreds
        of sessions costs the reactor thread a loop, not hundreds of
        callback chains (issue 21).  The lanes are released only after the
        caller's callbacks ran, so L{when_idle} cannot fire before them.
        """
        group: defer.Deferred = defer.Deferred()

        def finished(results: dict[Key, object]) -> None:
            outcome: dict[Key, object] = {}
            for snapshot in snapshots:
                key = snapshot.target.key
                self._lanes[key].running = False
                result = results[key]
                if isinstance(result, BaseException):
                    result = Failure(result)
                outcome[key] = self._write_finished(result, snapshot)
            try:
                group.callback(outcome)
            finally:
                for snapshot in snapshots:
                    self._pump(snapshot.target.key)

        def crashed(reason: Failure) -> None:  # a bug in the group job itself
            self.log.failure("group write crashed", reason)
            finished({snapshot.target.key: reason.value for snapshot in snapshots})

        self.in_pool(job or self._write_group_job, snapshots).addCallbacks(finished, crashed)
        return group

    # ------------------------------------------------------------------ thread side

    def _write_job(self, snapshot: Snapshot) -> Any:
        with self.file_lock(snapshot.target.key):
            prepared = self._prepare(snapshot)
            result = self._commit(snapshot, prepared)
            try:
                durable.fsync_dir(os.path.dirname(snapshot.target.path))
            except OSError as exc:
                raise storage_failure("fsync directory of", snapshot.target.path, exc) from exc
        return result

    def _write_group_job(self, snapshots: list[Snapshot]) -> dict:
        """Write C{snapshots}: temp files in parallel, then renames, then one fsync per dir.

        The temp files are written and fsynced by the fsync helpers at the same time,
        so the filesystem can commit them together (on ext4 that is 10-30 times
        faster than one fsync after the other); the renames and directory fsyncs stay
        in this job.
        """
        results: dict[Key, object] = {}
        if len(snapshots) > 1 and self._fsync_helpers is not None:
            prepared = [self._fsync_helpers.submit(self._prepare, s) for s in snapshots]
        else:
            prepared = [_Done(self._prepare, snapshot) for snapshot in snapshots]
        written_dirs: dict[str, list[Key]] = {}
        for snapshot, preparing in zip(snapshots, prepared, strict=True):
            key = snapshot.target.key
            try:
                ready = preparing.result()
                with self.file_lock(key):
                    results[key] = self._commit(snapshot, ready)
            except StorageFailure as exc:
                results[key] = exc
                continue
            written_dirs.setdefault(os.path.dirname(snapshot.target.path), []).append(key)
        for directory, keys in written_dirs.items():
            try:
                durable.fsync_dir(directory)
            except OSError as exc:
                failure = storage_failure("fsync directory", directory, exc)
                for key in keys:
                    results[key] = failure
        return results
