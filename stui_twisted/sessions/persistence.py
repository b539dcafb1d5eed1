"""How sessions reach the store: the dirty set, the durability policy, the flush.

L{SessionWriter} is a component the
L{stui_twisted.sessions.service.SessionService} owns.  A change marks a
session dirty (and, under C{always} durability or while writes fail, writes
it at once); L{SessionWriter.flush} writes every dirty session as one
store job, serializing them in slices so waiting requests are served between.
A session is clean again only if nothing changed while its write ran.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger

from stui_twisted.protocol.errors import StuiError
from stui_twisted.sessions.model import Session
from stui_twisted.sessions.results import SharedNamespace
from stui_twisted.storage.errors import RecordTooLarge, StorageFailure

FLUSH_SLICE_SECONDS = 0.00025
"""How long a flush serializes sessions before it lets waiting requests be served
(0.25 ms: create p99 under C{batch} was lower than with 1 ms in 4 of 4 interleaved
rounds, docs/performance.md "Issue 21"; the loss window is unchanged)."""


def storage_error(failure_or_exc: Any, action: str) -> StuiError:
    """The C{StorageError} a client gets when C{action} could not be made durable."""
    return StuiError(
        "StorageError",
        f"could not {action} durably: {failure_or_exc}; nothing was acknowledged",
    )


def state_too_large(exc: RecordTooLarge) -> StuiError:
    """The wire error for a store write refused as too large (nothing was written)."""
    return StuiError(
        "StateTooLarge", str(exc), size_bytes=exc.size_bytes, max_session_bytes=exc.max_bytes
    )


class SessionWriter:
    """The dirty set of one session service and how it is written.

    @param sessions: the service's sessions by id (read: a session removed
        meanwhile is not marked clean or written again).
    @param shared: the stored C{shared} namespace, written with the sessions.
    """

    log = Logger()

    def __init__(
        self, store, settings, clock, sessions: dict[str, Session], shared: SharedNamespace
    ) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.sessions = sessions
        self.shared = shared
        self.dirty: set[str] = set()
        """Ids of the sessions changed since they were last written."""
        self.degraded = False
        """A write failed: every change is written at once until a flush succeeds."""
        self._flushing: defer.Deferred | None = None

    async def changed(self, session: Session, action: str) -> None:
        """Record a content change of C{session}; durable before return under C{always}."""
        session.last_modified = self.clock.seconds()
        session.dirty = True
        session.version += 1
        self.dirty.add(session.session_id)
        if self.settings.durability == "always" or self.degraded:
            await self.write_now(session, action)

    async def write_now(self, session: Session, action: str, *, saved_at: str | None = None):
        version = session.version
        document = session.to_document()
        try:
            result = await self.store.write(document, saved_at=saved_at)
        except RecordTooLarge as exc:
            raise state_too_large(exc) from exc
        except StorageFailure as exc:
            self.degraded = True
            raise storage_error(exc, action) from exc
        self._wrote(session, result, version)
        if self.shared.dirty:
            await self.write_shared(action)
        return result

    def _wrote(self, session: Session, result, version: int) -> None:
        """C{session} as of change C{version} is on disk.

        It is clean only if nothing changed while the write ran; a change made
        meanwhile keeps it dirty so the next flush writes it.
        """
        session.size_bytes = result.size_bytes
        session.last_saved_at = result.saved_at
        if self.sessions.get(session.session_id) is session and session.version == version:
            session.dirty = False
            self.dirty.discard(session.session_id)

    async def write_shared(self, action: str = "save the shared namespace") -> None:
        self.shared.dirty = False
        try:
            await self.store.write_shared(dict(self.shared.bindings))
        except RecordTooLarge as exc:
            self.shared.dirty = True
            raise state_too_large(exc) from exc
        except StorageFailure as exc:
            self.shared.dirty = True
            raise storage_error(exc, action) from exc

    async def flush(self) -> None:
        """Write every dirty session (the C{batch} policy's loop).

        Sessions are serialized on the reactor thread (a session must not
        change while it is encoded); after L{FLUSH_SLICE_SECONDS} of that
        the flush lets the reactor serve what is waiting before it goes on.
        The group is then written as one store job.
        """
        if self._flushing is not None:
            await self._flushing_wait()
        if not self.dirty and not self.shared.dirty:
            return
        self._flushing = defer.Deferred()
        try:
            dirty = [self.sessions[sid] for sid in list(self.dirty) if sid in self.sessions]
            self.dirty.clear()
            if dirty:
                await self._flush_sessions(dirty)
            if self.shared.dirty:
                try:
                    await self.write_shared()
                except StuiError as exc:
                    self.log.error("flush of shared namespace failed: {error}", error=exc.message)
        finally:
            waiting, self._flushing = self._flushing, None
            waiting.callback(None)

    async def _flush_sessions(self, dirty: list[Session]) -> None:
        snapshots: dict[str, tuple[int, object]] = {}
        failed = 0
        # A stopwatch, not the clock: it measures how long this flush has held
        # the reactor thread, which an injected task.Clock cannot tell.
        slice_started = time.perf_counter()
        for session in dirty:
            if time.perf_counter() - slice_started > FLUSH_SLICE_SECONDS:
                await self._next_turn()
                slice_started = time.perf_counter()
            snapshot = self._snapshot_or_keep_dirty(session)
            if snapshot is None:
                failed += 1
            else:
                snapshots[session.session_id] = (session.version, snapshot)
        # From here to write_many nothing yields: a session that changed (or
        # was removed) while others were being serialized is taken as it is
        # now, so no older snapshot is queued behind a newer write.
        group = []
        for session in dirty:
            if (
                session.session_id not in snapshots
                or self.sessions.get(session.session_id) is not session
            ):
                continue
            version, snapshot = snapshots[session.session_id]
            if version != session.version:
                version, snapshot = session.version, self._snapshot_or_keep_dirty(session)
                if snapshot is None:
                    failed += 1
                    continue
            group.append(session)
            snapshots[session.session_id] = (version, snapshot)
        try:
            results = await self.store.write_many([snapshots[s.session_id][1] for s in group])
        except Exception:
            # Nothing of this group is known to be on disk: keep it dirty.
            self.dirty.update(s.session_id for s in group)
            self.degraded = True
            raise
        for session in group:
            outcome = results.get(session.session_id)
            if outcome is None or not hasattr(outcome, "size_bytes"):
                failed += 1
                self.dirty.add(session.session_id)
            else:
                self._wrote(session, outcome, snapshots[session.session_id][0])
        if failed:
            self.degraded = True
            self.log.error(
                "flush: {failed} of {total} sessions could not be written; "
                "they stay dirty and are retried",
                failed=failed,
                total=len(dirty),
            )
        elif self.degraded:
            self.degraded = False
            self.log.info("flush: storage writes succeed again")

    def _snapshot_or_keep_dirty(self, session: Session):
        """C{session} serialized for the store, or None (logged; it stays dirty)."""
        try:
            return self.store.snapshot(session.to_document())
        except Exception:
            self.log.failure("flush: session {sid} cannot be serialized", sid=session.session_id)
            self.dirty.add(session.session_id)
            return None

    def _next_turn(self) -> defer.Deferred:
        """Fires on the next reactor iteration, after what is waiting now.

        A turn belongs to the event loop, not to the clock: when the service
        was given a clock that is not a reactor (a C{task.Clock} in tests),
        nothing ever advances it by 0 s, so a yield scheduled on it never
        fired and the flush (and everything waiting for it, shutdown
        included) hung whenever serializing took longer than a slice.  The
        yield therefore always goes through a running reactor.
        """
        loop = self.clock if IReactorCore.providedBy(self.clock) else None
        if loop is None:
            from twisted.internet import reactor as loop  # the running one
        return task.deferLater(loop, 0, lambda: None)

    async def _flushing_wait(self) -> None:
        waiter: defer.Deferred = defer.Deferred()
        self._flushing.addBoth(lambda r: (waiter.callback(None), r)[1])
        await waiter

    async def write_index(self) -> None:
        await self.store.write_index([s.meta() for s in self.sessions.values()])
