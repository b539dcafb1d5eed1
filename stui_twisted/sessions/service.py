"""SessionService: the one owner of sessions, shared by every transport.

It applies protocol.md's session rules (current session, ownership, idle
expiry, limits, rate limits, allow/deny lists), keeps the sessions in memory,
and decides when each is written through the :class:`SessionStore` according
to the durability policy.  Time comes from an injected ``IReactorTime`` so
tests drive expiry and cleanup with ``task.Clock``.

Its children are the image supervisor (when enabled); its own timers are the
cleanup loop (expiry, retention, index) and, for ``batch`` durability, the
group-flush loop.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger

from stui_twisted.events import hooks as event_hooks
from stui_twisted.protocol.envelope import iso_timestamp, whole_seconds
from stui_twisted.protocol.errors import StorageFailure, StuiError, invalid_parameter
from stui_twisted.sessions.live import LiveImageCommands
from stui_twisted.sessions.model import (
    ACTIVE,
    CLOSED,
    EXPIRED,
    Session,
    merge_patch,
    new_session_id,
)
from stui_twisted.sessions.policy import ClientPolicy, check_client_id
from stui_twisted.transports.connections import ConnectionRegistry

DAY = 24 * 3600.0
FLUSH_SLICE_SECONDS = 0.001
"""How long a flush serializes sessions before it lets waiting requests be served."""
CONTEXT_PARTS = ("variables", "history", "registry", "inspector", "state")


def _storage_error(failure_or_exc: Any, action: str) -> StuiError:
    return StuiError(
        "StorageError",
        f"could not {action} durably: {failure_or_exc}; nothing was acknowledged",
    )


class SessionService(LiveImageCommands, service.MultiService):
    """Owns every session; the dispatcher's commands call into it."""

    log = Logger()

    def __init__(self, settings, *, reactor, store, image=None, connections=None) -> None:
        super().__init__()
        self.settings = settings
        self.clock = reactor
        self.store = store
        self.image = image
        if image is not None:
            image.setServiceParent(self)
            image.addRestartObserver(self._image_restarted)
        # Not `connections or ...`: an empty registry has len() 0 and is falsy.
        self.connections = (
            connections if connections is not None else ConnectionRegistry(settings.max_connections)
        )
        self.policy = ClientPolicy(
            allow=settings.allow_clients,
            deny=settings.deny_clients,
            rate_limit=settings.create_rate_limit,
            rate_window=settings.create_rate_window,
        )
        self.sessions: dict[str, Session] = {}
        self.events = None  # the EventHub (stui_twisted.events), set by tap.build_server
        self._by_client: dict[str, set[str]] = {}
        # ids of sessions whose state is ACTIVE (for max_sessions_total, in O(1))
        self._active_ids: set[str] = set()
        self.shared_bindings: dict = {}
        self._shared_dirty = False
        self._shared_generation: int | None = None
        self._image_locks: dict[str | None, defer.DeferredLock] = {}
        self._dirty: set[str] = set()
        self._storage_degraded = False
        self._stopping = False
        self._started_at: float | None = None
        self._ready: defer.Deferred | None = None
        self._cleanup_loop = task.LoopingCall(self.cleanup)
        self._cleanup_loop.clock = reactor
        self._flush_loop = task.LoopingCall(self._flush_tick)
        self._flush_loop.clock = reactor
        self._flushing: defer.Deferred | None = None
        self.unwritten_at_shutdown: list[str] = []
        """Sessions the final flush could not write (the process then exits non-zero)."""

    # ================================================================ lifecycle

    def startService(self) -> None:  # noqa: N802
        self._started_at = self.clock.seconds()
        self._ready = defer.ensureDeferred(self._start())
        self._ready.addErrback(self._start_failed)
        super().startService()

    async def _start(self) -> None:
        await self.store.open()
        metas = await self.store.load_index()
        for meta in metas:
            session = Session.from_meta(meta)
            self._add(session)
        self.shared_bindings = await self.store.read_shared()
        now = self.clock.seconds()
        active = sum(1 for s in self.sessions.values() if s.is_active(now))
        self.log.info(
            "session service ready: {total} sessions on disk ({active} active), data dir {data}",
            total=len(self.sessions),
            active=active,
            data=self.settings.data_dir,
        )
        self._cleanup_loop.start(self.settings.cleanup_interval, now=False)
        if self.settings.durability == "batch":
            self._flush_loop.start(self.settings.flush_interval, now=False)
        if self.image is not None and self.shared_bindings:
            await self._ensure_shared(await self.image.current_generation())

    def _start_failed(self, failure):
        self.log.failure("session service could not start", failure)
        return failure

    async def ready(self) -> None:
        """Wait until the store is open and the index loaded."""
        if self._ready is None:
            raise StuiError("InternalError", "the session service is not running")
        if not self._ready.called or isinstance(self._ready.result, Exception):
            waiter: defer.Deferred = defer.Deferred()
            self._ready.addBoth(lambda r: (waiter.callback(r), r)[1])
            try:
                await waiter
            except Exception as exc:
                raise _storage_error(exc, "open the data directory") from exc

    def stopService(self) -> defer.Deferred:  # noqa: N802
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        # Order matters: no change may be acknowledged after the final flush.
        # Listeners stop first (they are stopped before this service); then
        # open connections stop being read and every later change is refused;
        # then everything dirty is written.
        self._stopping = True
        for connection in self.connections:
            connection.close()
        for loop in (self._cleanup_loop, self._flush_loop):
            if loop.running:
                loop.stop()
        unwritten: list[str] = []
        if self._ready is not None and self._ready.called:
            try:
                await self.flush()
            except Exception:
                self.log.failure("flush at shutdown failed")
            unwritten = sorted(self._dirty)
            if self._shared_dirty:
                unwritten.append("(the shared namespace)")
            try:
                await self._write_index()
            except Exception:
                self.log.failure("writing the session index at shutdown failed")
            if self.events is not None:
                try:
                    await self.events.sync_all()
                except Exception:
                    self.log.failure("syncing the event logs at shutdown failed")
        await super().stopService()
        await self.store.close()
        if unwritten:
            self.unwritten_at_shutdown = unwritten
            self.log.critical(
                "session service stopped, but the final flush FAILED: {count} sessions were "
                "not written and their latest acknowledged changes are lost: {sessions}",
                count=len(unwritten),
                sessions=", ".join(unwritten),
            )
        else:
            self.log.info("session service stopped; every dirty session was flushed")

    # ================================================================ lookups

    def now(self) -> float:
        return self.clock.seconds()

    async def _session_for(self, call, *, touch: bool = True) -> Session:
        """The session a command names (or the connection's current one), checked."""
        await self.ready()
        session_id = call.params.get("session_id") or call.context.current_session_id
        if session_id is None:
            raise StuiError(
                "NoSession",
                "no 'session_id' given and this connection has no current session; "
                "create_session or restore_session first",
            )
        session = self.sessions.get(session_id)
        acting = call.client_id
        if session is None or (acting is not None and session.client_id != acting):
            raise StuiError(
                "SessionNotFound",
                f"no session {session_id[:80]!r} for this client",
                session_id=session_id[:80],
            )
        now = self.now()
        if session.state == CLOSED:
            raise StuiError(
                "SessionClosed", f"session {session_id!r} was closed", session_id=session_id
            )
        if session.is_expired(now):
            self._expire(session)
            raise StuiError(
                "SessionExpired",
                f"session {session_id!r} expired at {iso_timestamp(session.expires_at())} "
                f"after {session.timeout:g} s idle",
                session_id=session_id,
                expired_at=iso_timestamp(session.expires_at()),
            )
        await self._load(session)
        if touch:
            session.last_activity = now
        return session

    async def _load(self, session: Session) -> None:
        if session.loaded:
            return
        try:
            document = await self.store.read(session.client_id, session.session_id)
        except KeyError:
            document = {}
            self.log.warn("session {sid} has no file; starting it empty", sid=session.session_id)
        except StorageFailure as exc:
            raise _storage_error(exc, f"read session {session.session_id!r}") from exc
        if not session.loaded:
            session.load_document(document)
            session.size_bytes = self._size_of(session)

    def _add(self, session: Session) -> None:
        self.sessions[session.session_id] = session
        self._by_client.setdefault(session.client_id, set()).add(session.session_id)
        if session.state == ACTIVE:
            self._active_ids.add(session.session_id)

    def _remove(self, session: Session) -> None:
        self.sessions.pop(session.session_id, None)
        if self.events is not None:
            self.events.forget(session.session_id)  # its events stay on disk
        self._dirty.discard(session.session_id)
        self._active_ids.discard(session.session_id)
        owned = self._by_client.get(session.client_id)
        if owned is not None:
            owned.discard(session.session_id)
            if not owned:
                del self._by_client[session.client_id]

    def _sessions_of(self, client_id: str) -> list[Session]:
        """The sessions of one client, without scanning every session."""
        return [self.sessions[sid] for sid in self._by_client.get(client_id, ())]

    def _owned_client(self, call, required: bool = True) -> str | None:
        client_id = call.client_id
        if client_id is None:
            if required:
                raise invalid_parameter("client_id", "is required")
            return None
        return check_client_id(client_id)

    # ================================================================ persistence

    def _size_of(self, session: Session) -> int:
        return session.encoded_size()

    def _check_size(self, session: Session) -> int:
        size = self._size_of(session)
        if size > self.settings.max_session_bytes:
            raise StuiError(
                "StateTooLarge",
                f"session would be {size} bytes, over max_session_bytes "
                f"({self.settings.max_session_bytes})",
                size_bytes=size,
                max_session_bytes=self.settings.max_session_bytes,
            )
        session.size_bytes = size
        return size

    async def _changed(self, session: Session, action: str) -> None:
        """Record a content change; durable before return under C{always}.

        During shutdown, after the final flush has begun, a change is refused
        with C{StorageError} rather than acknowledged and lost.
        """
        if self._stopping:
            raise StuiError(
                "StorageError",
                f"could not {action}: the server is shutting down and nothing was "
                "acknowledged; reconnect and retry",
            )
        session.last_modified = self.now()
        session.dirty = True
        session.version += 1
        self._dirty.add(session.session_id)
        if self.settings.durability == "always" or self._storage_degraded:
            await self._write_now(session, action)

    async def _write_now(self, session: Session, action: str, *, saved_at: str | None = None):
        version = session.version
        document = session.to_document()
        try:
            result = await self.store.write(document, saved_at=saved_at)
        except StorageFailure as exc:
            self._storage_degraded = True
            raise _storage_error(exc, action) from exc
        self._wrote(session, result, version)
        if self._shared_dirty:
            await self._write_shared(action)
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
            self._dirty.discard(session.session_id)

    async def _write_shared(self, action: str = "save the shared namespace") -> None:
        self._shared_dirty = False
        try:
            await self.store.write_shared(dict(self.shared_bindings))
        except StorageFailure as exc:
            self._shared_dirty = True
            raise _storage_error(exc, action) from exc

    async def flush(self) -> None:
        """Write every dirty session (the C{batch} policy's loop).

        Sessions are serialized on the reactor thread (a session must not
        change while it is encoded); after L{FLUSH_SLICE_SECONDS} of that
        the flush lets the reactor serve what is waiting before it goes on.
        The group is then written as one store job.
        """
        if self._flushing is not None:
            await self._flushing_wait()
        if not self._dirty and not self._shared_dirty:
            return
        self._flushing = defer.Deferred()
        try:
            dirty = [self.sessions[sid] for sid in list(self._dirty) if sid in self.sessions]
            self._dirty.clear()
            if dirty:
                await self._flush_sessions(dirty)
            if self._shared_dirty:
                try:
                    await self._write_shared()
                except StuiError as exc:
                    self.log.error("flush of shared namespace failed: {error}", error=exc.message)
        finally:
            waiting, self._flushing = self._flushing, None
            waiting.callback(None)

    async def _flush_sessions(self, dirty: list[Session]) -> None:
        snapshots: dict[str, tuple[int, object]] = {}
        failed = 0
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
            self._dirty.update(s.session_id for s in group)
            self._storage_degraded = True
            raise
        for session in group:
            outcome = results.get(session.session_id)
            if outcome is None or not hasattr(outcome, "size_bytes"):
                failed += 1
                self._dirty.add(session.session_id)
            else:
                self._wrote(session, outcome, snapshots[session.session_id][0])
        if failed:
            self._storage_degraded = True
            self.log.error(
                "flush: {failed} of {total} sessions could not be written; "
                "they stay dirty and are retried",
                failed=failed,
                total=len(dirty),
            )
        elif self._storage_degraded:
            self._storage_degraded = False
            self.log.info("flush: storage writes succeed again")

    def _snapshot_or_keep_dirty(self, session: Session):
        """C{session} serialized for the store, or None (logged; it stays dirty)."""
        try:
            return self.store.snapshot(session.to_document())
        except Exception:
            self.log.failure("flush: session {sid} cannot be serialized", sid=session.session_id)
            self._dirty.add(session.session_id)
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

    async def _flush_tick(self) -> None:
        """One run of the batch loop; a failure is logged and the loop goes on.

        (A LoopingCall stops for good when its call fails, which would leave
        every later change unwritten.)
        """
        try:
            await self.flush()
        except Exception:
            self.log.failure("batch flush failed; retrying at the next interval")

    async def _flushing_wait(self) -> None:
        waiter: defer.Deferred = defer.Deferred()
        self._flushing.addBoth(lambda r: (waiter.callback(None), r)[1])
        await waiter

    async def _write_index(self) -> None:
        await self.store.write_index([s.meta() for s in self.sessions.values()])

    # ================================================================ cleanup

    async def cleanup(self) -> None:
        """Expire idle sessions, apply retention, flush, write the index.

        Each step is independent: a failing step is logged and the others
        (and the next run of the loop) still happen.
        """
        now = self.now()
        for name, step in (
            ("expire", self._expire_idle),
            ("retention", self._apply_retention),
            ("flush", self._cleanup_flush),
            ("index", self._write_index),
        ):
            try:
                await step()
            except Exception:
                self.log.failure("cleanup step {step} failed; continuing", step=name)
        self.policy.prune(now)

    async def _expire_idle(self) -> None:
        now = self.now()
        for session in list(self.sessions.values()):
            if session.state == ACTIVE and session.is_expired(now):
                self._expire(session)

    def _expire(self, session: Session) -> None:
        if session.state != ACTIVE:
            return
        session.state = EXPIRED
        self._active_ids.discard(session.session_id)
        session.materialized = False
        if session.loaded:
            self._dirty.add(session.session_id)
        self.log.info(
            "session {sid} of {client} expired after {timeout:g} s idle",
            sid=session.session_id,
            client=session.client_id,
            timeout=session.timeout,
        )
        event_hooks.publish(self, session.session_id, "session_expired", {"by": None})
        if self.image is not None:
            self.image.drop_session(session.session_id).addErrback(
                lambda f: self.log.failure("image: dropping {sid}", f, sid=session.session_id)
            )

    async def _apply_retention(self) -> None:
        horizon = self.now() - self.settings.retention_days * DAY
        for session in list(self.sessions.values()):
            ended = session.ended_at()
            if ended is not None and ended < horizon:
                await self.store.delete(session.client_id, session.session_id)
                self._remove(session)
                self.log.info(
                    "retention: deleted session {sid} of {client} ({state} since {when})",
                    sid=session.session_id,
                    client=session.client_id,
                    state=session.state,
                    when=iso_timestamp(ended),
                )

    async def _cleanup_flush(self) -> None:
        if self.settings.durability != "none":
            await self.flush()
            return
        # Under "none" content is written on close, save_context and shutdown
        # only; sessions that ended (expired) are written here.
        for session_id in list(self._dirty):
            session = self.sessions.get(session_id)
            if session is not None and session.state != ACTIVE:
                await self._write_now(session, "record the expiry")

    # ================================================================ session commands

    async def create_session(self, call) -> dict:
        await self.ready()
        client_id = self._owned_client(call)
        self.policy.admit(client_id)
        now = self.now()
        timeout = self._timeout_param(call.params.get("timeout"))
        active = [s for s in self._sessions_of(client_id) if s.is_active(now)]
        if len(active) >= self.settings.max_sessions_per_client:
            raise StuiError(
                "SessionLimitExceeded",
                f"client {client_id!r} already has {len(active)} active sessions "
                f"(max_sessions_per_client={self.settings.max_sessions_per_client}); "
                "close one first",
                active_sessions=len(active),
                max_sessions_per_client=self.settings.max_sessions_per_client,
                scope="client",
            )
        if len(self._active_ids) >= self.settings.max_sessions_total:
            raise StuiError(
                "SessionLimitExceeded",
                f"the server already has {len(self._active_ids)} active sessions "
                f"(max_sessions_total={self.settings.max_sessions_total}); try again later",
                active_sessions=len(self._active_ids),
                max_sessions_total=self.settings.max_sessions_total,
                scope="server",
            )
        self.policy.record_create(client_id, now)
        client_info = call.params.get("client_info") or {}
        session = Session(
            session_id=new_session_id(),
            client_id=client_id,
            created_at=now,
            timeout=timeout,
            last_activity=now,
            last_modified=now,
            client_info=client_info,
        )
        self._check_size(session)
        self._add(session)
        try:
            await self._changed(session, "create the session")
        except StuiError:
            self._remove(session)
            raise
        call.context.current_session_id = session.session_id
        self.log.info(
            "{conn} created session {sid} for {client}",
            conn=call.context.label,
            sid=session.session_id,
            client=client_id,
        )
        result = session.record(now)
        result["capabilities"] = list(self.settings.capabilities)
        return result

    def _timeout_param(self, value) -> float:
        if value is None:
            return float(self.settings.default_timeout)
        if value <= 0 or value > self.settings.max_timeout:
            raise invalid_parameter(
                "timeout",
                f"must be between 0 and {self.settings.max_timeout:g} seconds, not {value}",
                max_timeout=self.settings.max_timeout,
            )
        return float(value)

    async def restore_session(self, call) -> dict:
        session = await self._session_for(call)
        call.context.current_session_id = session.session_id
        restored = {"restored": [], "unrestorable": list(session.unrestorable)}
        if self._is_live(session):
            # Already live in the image (another connection, or a reconnect):
            # attach without rebuilding, so live objects that cannot be stored
            # (sockets, lambdas) are not thrown away.
            restored = {
                "restored": [v.get("name") for v in session.variables],
                "unrestorable": list(session.unrestorable),
            }
        elif self.image is not None:
            restored = await self._restore_in_image(session)
        self.log.info(
            "{conn} restored session {sid}", conn=call.context.label, sid=session.session_id
        )
        result = session.record(self.now())
        result.update(session.context())
        result["restored_bindings"] = restored["restored"]
        result["unrestorable_bindings"] = restored["unrestorable"]
        return result

    async def update_session_state(self, call) -> dict:
        params = call.params
        parts = [
            k
            for k in ("state_data", "workspace_context", "inspector_state")
            if k in call.request.parameters
        ]
        if not parts:
            raise StuiError(
                "InvalidRequest",
                "give at least one of 'state_data', 'workspace_context', 'inspector_state'",
                parameter="state_data",
            )
        session = await self._session_for(call)
        merge = params["merge"]
        before = (session.session_state, session.client_workspace, session.inspector_view)
        if "state_data" in parts:
            data = call.request.parameters["state_data"]
            session.session_state = merge_patch(session.session_state, data) if merge else data
        if "workspace_context" in parts:
            session.client_workspace = self._client_part(
                session.client_workspace,
                params["workspace_context"],
                "workspace_context",
                "client",
                merge,
            )
        if "inspector_state" in parts:
            session.inspector_view = self._client_part(
                session.inspector_view, params["inspector_state"], "inspector_state", "view", merge
            )
        try:
            self._check_size(session)
            await self._changed(session, "save the session state")
        except StuiError:
            session.session_state, session.client_workspace, session.inspector_view = before
            raise
        event_hooks.state_updated(self, session, call, parts)
        await event_hooks.durable(self, session)
        return {
            "session_id": session.session_id,
            "last_modified": iso_timestamp(session.last_modified),
            "session_state": session.session_state,
            "update_successful": True,
        }

    @staticmethod
    def _client_part(current: dict, given: Any, name: str, key: str, merge: bool) -> dict:
        if not isinstance(given, dict):
            raise invalid_parameter(name, "must be an object")
        # Accept both {"client": {...}} and the bare client object.
        value = given[key] if set(given) == {key} else given
        if not isinstance(value, dict):
            raise invalid_parameter(f"{name}.{key}", "must be an object")
        return merge_patch(current, value) if merge else value

    async def close_session(self, call) -> dict:
        session = await self._session_for(call)
        now = self.now()
        save = call.params["save_state"]
        if not save:
            try:
                document = await self.store.read(session.client_id, session.session_id)
                session.load_document(document)
            except KeyError:
                session.load_document({})
            except StorageFailure as exc:
                raise _storage_error(exc, "close the session") from exc
        session.state = CLOSED
        self._active_ids.discard(session.session_id)
        session.closed_at = now
        session.materialized = False
        session.last_modified = now
        try:
            await self._write_now(session, "close the session")
        except StuiError:
            session.state, session.closed_at = ACTIVE, None
            self._active_ids.add(session.session_id)
            raise
        if call.context.current_session_id == session.session_id:
            call.context.current_session_id = None
        for connection in self.connections:
            if connection.context.current_session_id == session.session_id:
                connection.context.current_session_id = None
        if self.image is not None:
            await self.image.drop_session(session.session_id)
        by = call.client_id or session.client_id
        event_hooks.publish(self, session.session_id, "session_closed", {"by": by})
        await event_hooks.durable(self, session)
        self.log.info(
            "{conn} closed session {sid} (saved={saved})",
            conn=call.context.label,
            sid=session.session_id,
            saved=save,
        )
        return {"session_id": session.session_id, "closed": True, "saved": bool(save)}

    async def get_session_info(self, call) -> dict:
        session = await self._session_for(call, touch=False)
        result = session.record(self.now())
        result.update(
            {
                "variable_count": len(session.variables),
                "history_length": len(session.history),
                "size_bytes": session.size_bytes or self._size_of(session),
                "attached_connections": self.connections.attached_to(session.session_id),
            }
        )
        return result

    async def list_client_sessions(self, call) -> dict:
        await self.ready()
        client_id = self._owned_client(call)
        now = self.now()
        include_inactive = call.params["include_inactive"]
        sessions = sorted(
            (s for s in self._sessions_of(client_id) if include_inactive or s.is_active(now)),
            key=lambda s: s.created_at,
        )
        return {
            "client_id": client_id,
            "session_count": len(sessions),
            "sessions": [s.record(now) for s in sessions],
        }

    async def get_session_statistics(self, call) -> dict:
        await self.ready()
        now = self.now()
        counts = {ACTIVE: 0, EXPIRED: 0, CLOSED: 0}
        clients = set()
        for session in self.sessions.values():
            if session.state == CLOSED:
                counts[CLOSED] += 1
            elif session.is_expired(now):
                counts[EXPIRED] += 1
            else:
                counts[ACTIVE] += 1
                clients.add(session.client_id)
        storage = dict(self.store.statistics())
        storage["pending_writes"] = storage.get("pending_writes", 0) + len(self._dirty)
        return {
            "total_sessions": len(self.sessions),
            "active_sessions": counts[ACTIVE],
            "expired_sessions": counts[EXPIRED],
            "closed_sessions": counts[CLOSED],
            "active_clients": len(clients),
            "connected_clients": len(self.connections),
            "max_sessions_per_client": self.settings.max_sessions_per_client,
            "default_timeout": whole_seconds(self.settings.default_timeout),
            "cleanup_interval": whole_seconds(self.settings.cleanup_interval),
            "uptime": round(now - (self._started_at or now), 3),
            "durability": self.settings.durability,
            "storage": storage,
        }

    # ================================================================ context commands

    async def save_context(self, call) -> dict:
        session = await self._session_for(call)
        if self._is_live(session):
            try:
                snapshot = await self.image.snapshot(
                    session.session_id, generation=session.image_generation
                )
            except StuiError as error:
                if error.error_type != "ImageRestarted":
                    raise
                # The namespace is gone with its image: what is stored is
                # everything that was acknowledged, and that is what is saved.
                snapshot = {}
            session.bindings = snapshot.get("bindings", session.bindings)
            if "variables" in snapshot:
                self._set_variables(session, snapshot["variables"])
            self._fit_bindings(session)
        # One stamp for both files: save_context's saved_at, the session's
        # last_saved_at and load_context's saved_at are the same string.
        # The session file first: a save that fails leaves the previous saved
        # copy as it was.
        stamp = iso_timestamp(self.now())
        document = session.to_document()
        result = await self._write_now(session, "save the context", saved_at=stamp)  # shared too
        try:
            await self.store.write(document, saved_at=stamp, saved_copy=True)
        except StorageFailure as exc:
            raise _storage_error(exc, "save the context") from exc
        return {
            "session_id": session.session_id,
            "saved": True,
            "saved_at": result.saved_at,
            "size_bytes": result.size_bytes,
            "checksum": result.checksum,
        }

    async def load_context(self, call) -> dict:
        session = await self._session_for(call)
        try:
            document, saved_at = await self.store.read_saved(session.client_id, session.session_id)
        except KeyError:
            raise StuiError(
                "InvalidRequest",
                f"session {session.session_id!r} has never been saved with save_context",
                session_id=session.session_id,
            ) from None
        except StorageFailure as exc:
            raise _storage_error(exc, "load the context") from exc
        counter = session.history_counter
        session.load_document(document)
        # Cells keep numbers of their own: the next one is not numbered again.
        session.history_counter = max(counter, session.history_counter)
        # Written back as a change: a flush still writing the replaced state
        # must not leave that state on disk with the session marked clean.
        await self._changed(session, "load the context")
        restored = {"restored": [], "unrestorable": []}
        if self.image is not None:
            restored = await self._restore_in_image(session, rebuild=True)
        context = session.context()
        return {
            "session_id": session.session_id,
            "loaded": True,
            "saved_at": saved_at,
            "context": context,
            "restored_bindings": restored["restored"],
            "unrestorable_bindings": restored["unrestorable"],
        }

    async def get_context_summary(self, call) -> dict:
        session = await self._session_for(call, touch=False)
        return {
            "session_id": session.session_id,
            "variables": [
                {"name": v.get("name"), "type": v.get("type"), "repr": v.get("repr")}
                for v in session.variables
            ],
            "variable_count": len(session.variables),
            "history_length": len(session.history),
            "last_evaluation": session.history[-1] if session.history else None,
            "registry_size": len(session.registry),
            "inspector": {
                "selected_object": session.inspector_selected,
                "history_length": len(session.inspector_history),
            },
            "size_bytes": session.size_bytes or self._size_of(session),
            "dirty": session.dirty,
            "last_saved_at": session.last_saved_at,
        }

    async def clear_context(self, call) -> dict:
        parts = call.params.get("parts")
        if parts is None:
            parts = list(CONTEXT_PARTS)
        for part in parts:
            if part not in CONTEXT_PARTS:
                raise invalid_parameter(
                    "parts",
                    f"has unknown part {str(part)[:40]!r}; use any of {', '.join(CONTEXT_PARTS)}",
                )
        session = await self._session_for(call)
        image_parts = [p for p in ("variables", "registry") if p in parts]
        if image_parts and self.image is not None:
            # Under the session's image lock: a rebuild in progress must not
            # bring back what is being cleared.
            lock = self._image_lock(session.session_id)
            await lock.acquire()
            try:
                if self._is_live(session):
                    await self.image.clear(
                        session.session_id, image_parts, generation=session.image_generation
                    )
                self._clear_parts(session, parts)
            finally:
                self._release_image_lock(session.session_id, lock)
        else:
            self._clear_parts(session, parts)
        await self._changed(session, "clear the context")
        event_hooks.state_updated(self, session, call, [p for p in CONTEXT_PARTS if p in parts])
        await event_hooks.durable(self, session)
        return {
            "session_id": session.session_id,
            "cleared": [p for p in CONTEXT_PARTS if p in parts],
        }

    @staticmethod
    def _clear_parts(session: Session, parts) -> None:
        if "variables" in parts:
            session.bindings = {}
            session.variables = []
            session.unrestorable = []
        if "history" in parts:
            session.history = []
        if "registry" in parts:
            session.registry = {}
        if "inspector" in parts:
            session.inspector_selected = None
            session.inspector_history = []
            session.inspector_view = {}
        if "state" in parts:
            session.session_state = {}
            session.client_workspace = {}

    # ================================================================ misc

    def uptime(self) -> float:
        return round(self.now() - (self._started_at or self.now()), 3)

    def image_status(self) -> dict:
        if self.image is None:
            return {"status": "disabled", "pid": None, "started_at": None}
        return self.image.status()
