"""SessionService: the one owner of sessions, shared by every transport.

It applies protocol.md's session rules (current session, ownership, idle
expiry, limits, rate limits, allow/deny lists), keeps the sessions in memory,
and records each change for the L{SessionStore} according to the
durability policy.  Time comes from an injected C{IReactorTime} so
tests drive expiry and cleanup with C{task.Clock}.

It is protocol-free: its commands take typed arguments (and the caller's
L{stui_twisted.dispatch.interfaces.ConnectionContext}) and answer
L{stui_twisted.sessions.model.Session} objects or the small results of
L{stui_twisted.sessions.results}; L{stui_twisted.dispatch.commands}
turns them into replies.  It owns two components: the live image glue
(L{stui_twisted.sessions.live.LiveSessions}) and the dirty set and its
writes (L{stui_twisted.sessions.persistence.SessionWriter}).  It builds
no services:
C{tap.py} parents the image beside it and runs L{SessionService.cleanup_tick}
and L{SessionService.flush_tick} as C{TimerService} children.

It is longer than ~600 lines because it is one job, protocol.md section 5's
session rules, command by command; what is not a rule lives apart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from stui_twisted.events import hooks as event_hooks
from stui_twisted.protocol.envelope import iso_timestamp
from stui_twisted.protocol.errors import StuiError, invalid_parameter
from stui_twisted.sessions.live import LiveSessions
from stui_twisted.sessions.model import (
    ACTIVE,
    CLOSED,
    EXPIRED,
    Session,
    merge_patch,
    new_session_id,
)
from stui_twisted.sessions.persistence import SessionWriter, state_too_large, storage_error
from stui_twisted.sessions.policy import ClientPolicy, check_client_id
from stui_twisted.sessions.results import (
    UNSET,
    ClientSessions,
    Completions,
    EvaluationOutcome,
    Inspection,
    LoadResult,
    RestoreResult,
    SaveResult,
    SessionInfo,
    SessionStatistics,
    SharedNamespace,
)
from stui_twisted.storage.errors import RecordTooLarge, StorageFailure
from stui_twisted.transports.connections import ConnectionRegistry

if TYPE_CHECKING:
    from stui_twisted.dispatch.interfaces import ConnectionContext

DAY = 24 * 3600.0
CONTEXT_PARTS = ("variables", "history", "registry", "inspector", "state", "events")


class SessionService(service.Service):
    """Owns every session; the command table calls into it.

    @param reactor: the clock (C{IReactorTime}); every time it uses is read from it.
    @param image: the L{ImageSupervisor}, or C{None}; the caller parents it
        (tap.py), so that it stops after this service's final flush.
    """

    log = Logger()

    def __init__(self, settings, *, reactor, store, image=None, connections=None) -> None:
        super().__init__()
        self.settings = settings
        self.clock = reactor
        self.store = store
        self.image = image
        self.shared = SharedNamespace()
        self.live = LiveSessions(self, image, settings, reactor)
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
        self.writer = SessionWriter(store, settings, reactor, self.sessions, self.shared)
        self._stopping = False
        self._started_at: float | None = None
        self._ready: defer.Deferred | None = None
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
        self.shared.bindings = await self.store.read_shared()
        now = self.clock.seconds()
        active = sum(1 for s in self.sessions.values() if s.is_active(now))
        self.log.info(
            "session service ready: {total} sessions on disk ({active} active), data dir {data}",
            total=len(self.sessions),
            active=active,
            data=self.settings.data_dir,
        )
        await self.live.start()

    def _start_failed(self, failure):
        self.log.failure("session service could not start", failure)
        return failure

    def is_ready(self) -> bool:
        """Whether the store is open and the index loaded (and start-up did not fail)."""
        return (
            self._ready is not None
            and self._ready.called
            and not isinstance(self._ready.result, Exception)
        )

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
                raise storage_error(exc, "open the data directory") from exc

    def stopService(self) -> defer.Deferred:  # noqa: N802
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        # Order matters: no change may be acknowledged after the final flush.
        # Listeners stop first (they are stopped before this service), and the
        # cleanup and flush timers (tap.py stops them just before it); then
        # open connections stop being read and every later change is refused;
        # then everything dirty is written.  The image stops after this
        # (tap.py: the session core stops its children one after another).
        self._stopping = True
        for connection in self.connections:
            connection.close()
        unwritten: list[str] = []
        if self._ready is not None and self._ready.called:
            try:
                await self.flush()
            except Exception:
                self.log.failure("flush at shutdown failed")
            unwritten = sorted(self.writer.dirty)
            if self.shared.dirty:
                unwritten.append("(the shared namespace)")
            try:
                await self.writer.write_index()
            except Exception:
                self.log.failure("writing the session index at shutdown failed")
            if self.events is not None:
                try:
                    await self.events.sync_all()
                except Exception:
                    self.log.failure("syncing the event logs at shutdown failed")
        super().stopService()
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

    async def _session_for(
        self,
        session_id: str | None,
        client_id: str | None,
        connection: ConnectionContext,
        *,
        touch: bool = True,
    ) -> Session:
        """The session C{session_id} names (or C{connection}'s current one), checked.

        @param client_id: the acting client; C{None} acts for any (auth off, no id given).
        """
        await self.ready()
        session_id = session_id or connection.current_session_id
        if session_id is None:
            raise StuiError(
                "NoSession",
                "no 'session_id' given and this connection has no current session; "
                "create_session or restore_session first",
            )
        session = self.sessions.get(session_id)
        if session is None or (client_id is not None and session.client_id != client_id):
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
        if self.events is not None:
            await self.events.load(session_id)  # its event log, read in a thread
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
            raise storage_error(exc, f"read session {session.session_id!r}") from exc
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
            self.events.forget(session.session_id)
        self.writer.dirty.discard(session.session_id)
        self._active_ids.discard(session.session_id)
        owned = self._by_client.get(session.client_id)
        if owned is not None:
            owned.discard(session.session_id)
            if not owned:
                del self._by_client[session.client_id]

    def _sessions_of(self, client_id: str) -> list[Session]:
        """The sessions of one client, without scanning every session."""
        return [self.sessions[sid] for sid in self._by_client.get(client_id, ())]

    @staticmethod
    def _owned_client(client_id: str | None) -> str:
        if client_id is None:
            raise invalid_parameter("client_id", "is required")
        return check_client_id(client_id)

    def live_sessions(self) -> list[Session]:
        """The active sessions that were live in the image (for L{LiveSessions})."""
        return [s for s in self.sessions.values() if s.materialized and s.state == ACTIVE]

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

    async def changed(self, session: Session, action: str) -> None:
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
        await self.writer.changed(session, action)

    async def flush(self) -> None:
        """Write every dirty session now (see L{SessionWriter.flush})."""
        await self.writer.flush()

    async def flush_tick(self) -> None:
        """One run of the batch loop; a failure is logged and the loop goes on.

        (A TimerService's loop stops for good when its call fails, which would
        leave every later change unwritten.)  Before the service is ready, and
        once it is stopping (its own final flush follows), it does nothing.
        """
        if not self.is_ready() or self._stopping:
            return
        try:
            await self.flush()
        except Exception:
            self.log.failure("batch flush failed; retrying at the next interval")

    # ================================================================ cleanup

    async def cleanup_tick(self) -> None:
        """One run of the cleanup timer (tap.py): L{cleanup} once the service is ready.

        The timer's first run comes at start-up, before the index is loaded;
        it and any run once the service is stopping do nothing.
        """
        if self.is_ready() and not self._stopping:
            await self.cleanup()

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
            ("index", self.writer.write_index),
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
            self.writer.dirty.add(session.session_id)
        self.log.info(
            "session {sid} of {client} expired after {timeout:g} s idle",
            sid=session.session_id,
            client=session.client_id,
            timeout=session.timeout,
        )
        event_hooks.publish(self, session.session_id, "session_expired", {"by": None})
        dropped = self.live.drop(session.session_id)
        if dropped is not None:
            dropped.addErrback(
                lambda f: self.log.failure("image: dropping {sid}", f, sid=session.session_id)
            )

    async def _apply_retention(self) -> None:
        horizon = self.now() - self.settings.retention_days * DAY
        for session in list(self.sessions.values()):
            ended = session.ended_at()
            if ended is not None and ended < horizon:
                await self.store.delete(session.client_id, session.session_id)
                if self.events is not None:
                    await self.events.delete(session.session_id)  # no orphaned log
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
        for session_id in list(self.writer.dirty):
            session = self.sessions.get(session_id)
            if session is not None and session.state != ACTIVE:
                await self.writer.write_now(session, "record the expiry")

    # ================================================================ session commands

    async def create_session(
        self,
        *,
        client_id: str | None,
        timeout: float | None,
        client_info: dict | None,
        connection: ConnectionContext,
    ) -> Session:
        """A new session of C{client_id}; it becomes C{connection}'s current one."""
        await self.ready()
        client_id = self._owned_client(client_id)
        self.policy.admit(client_id)
        now = self.now()
        timeout = self._timeout_param(timeout)
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
        session = Session(
            session_id=new_session_id(),
            client_id=client_id,
            created_at=now,
            timeout=timeout,
            last_activity=now,
            last_modified=now,
            client_info=client_info or {},
        )
        self._check_size(session)
        self._add(session)
        try:
            await self.changed(session, "create the session")
        except StuiError:
            self._remove(session)
            raise
        connection.current_session_id = session.session_id
        self.log.info(
            "{conn} created session {sid} for {client}",
            conn=connection.label,
            sid=session.session_id,
            client=client_id,
        )
        return session

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

    async def restore_session(
        self, *, session_id: str | None, client_id: str | None, connection: ConnectionContext
    ) -> RestoreResult:
        """Reattach C{connection} to a session, its namespace live in the image."""
        session = await self._session_for(session_id, client_id, connection)
        connection.current_session_id = session.session_id
        rebuilt = await self.live.restore(session)
        self.log.info(
            "{conn} restored session {sid}", conn=connection.label, sid=session.session_id
        )
        return RestoreResult(session, rebuilt)

    async def update_session_state(
        self,
        *,
        session_id: str | None,
        client_id: str | None,
        connection: ConnectionContext,
        state_data: Any = UNSET,
        workspace_context: Any = UNSET,
        inspector_state: Any = UNSET,
        merge: bool = False,
    ) -> Session:
        """Store client state: each part given replaces (or, C{merge}, patches) its own."""
        given = {
            "state_data": state_data,
            "workspace_context": workspace_context,
            "inspector_state": inspector_state,
        }
        parts = [name for name, value in given.items() if value is not UNSET]
        if not parts:
            raise StuiError(
                "InvalidRequest",
                "give at least one of 'state_data', 'workspace_context', 'inspector_state'",
                parameter="state_data",
            )
        session = await self._session_for(session_id, client_id, connection)
        before = (session.session_state, session.client_workspace, session.inspector_view)
        if state_data is not UNSET:
            session.session_state = (
                merge_patch(session.session_state, state_data) if merge else state_data
            )
        if workspace_context is not UNSET:
            session.client_workspace = self._client_part(
                session.client_workspace, workspace_context, "workspace_context", "client", merge
            )
        if inspector_state is not UNSET:
            session.inspector_view = self._client_part(
                session.inspector_view, inspector_state, "inspector_state", "view", merge
            )
        try:
            self._check_size(session)
            await self.changed(session, "save the session state")
        except StuiError:
            session.session_state, session.client_workspace, session.inspector_view = before
            raise
        event_hooks.state_updated(self, session, client_id, parts)
        await event_hooks.durable(self, session)
        return session

    @staticmethod
    def _client_part(current: dict, given: Any, name: str, key: str, merge: bool) -> dict:
        if not isinstance(given, dict):
            raise invalid_parameter(name, "must be an object")
        # Accept both {"client": {...}} and the bare client object.
        value = given[key] if set(given) == {key} else given
        if not isinstance(value, dict):
            raise invalid_parameter(f"{name}.{key}", "must be an object")
        return merge_patch(current, value) if merge else value

    async def close_session(
        self,
        *,
        session_id: str | None,
        client_id: str | None,
        connection: ConnectionContext,
        save_state: bool = True,
    ) -> Session:
        """End a session for good (without C{save_state}: as it was last written)."""
        session = await self._session_for(session_id, client_id, connection)
        now = self.now()
        if not save_state:
            try:
                document = await self.store.read(session.client_id, session.session_id)
                session.load_document(document)
            except KeyError:
                session.load_document({})
            except StorageFailure as exc:
                raise storage_error(exc, "close the session") from exc
        session.state = CLOSED
        self._active_ids.discard(session.session_id)
        session.closed_at = now
        session.materialized = False
        session.last_modified = now
        try:
            await self.writer.write_now(session, "close the session")
        except StuiError:
            session.state, session.closed_at = ACTIVE, None
            self._active_ids.add(session.session_id)
            raise
        if connection.current_session_id == session.session_id:
            connection.current_session_id = None
        for other in self.connections:
            if other.context.current_session_id == session.session_id:
                other.context.current_session_id = None
        dropped = self.live.drop(session.session_id)
        if dropped is not None:
            await dropped
        by = client_id or session.client_id
        event_hooks.publish(self, session.session_id, "session_closed", {"by": by})
        await event_hooks.durable(self, session)
        self.log.info(
            "{conn} closed session {sid} (saved={saved})",
            conn=connection.label,
            sid=session.session_id,
            saved=save_state,
        )
        return session

    async def get_session_info(
        self, *, session_id: str | None, client_id: str | None, connection: ConnectionContext
    ) -> SessionInfo:
        """The session (not touched: asking about it is not activity) and its sizes."""
        session = await self._session_for(session_id, client_id, connection, touch=False)
        return SessionInfo(
            session,
            size_bytes=session.size_bytes or self._size_of(session),
            attached_connections=self.connections.attached_to(session.session_id),
        )

    async def list_client_sessions(
        self, *, client_id: str | None, include_inactive: bool = False
    ) -> ClientSessions:
        """C{client_id}'s sessions (only active ones unless C{include_inactive}), oldest first."""
        await self.ready()
        client_id = self._owned_client(client_id)
        now = self.now()
        sessions = sorted(
            (s for s in self._sessions_of(client_id) if include_inactive or s.is_active(now)),
            key=lambda s: s.created_at,
        )
        return ClientSessions(client_id, sessions)

    async def get_session_statistics(self) -> SessionStatistics:
        """Server-wide session counts, connections and storage counters."""
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
        storage["pending_writes"] = storage.get("pending_writes", 0) + len(self.writer.dirty)
        return SessionStatistics(
            total=len(self.sessions),
            active=counts[ACTIVE],
            expired=counts[EXPIRED],
            closed=counts[CLOSED],
            active_clients=len(clients),
            connected_clients=len(self.connections),
            uptime=round(now - (self._started_at or now), 3),
            storage=storage,
        )

    # ================================================================ context commands

    async def save_context(
        self, *, session_id: str | None, client_id: str | None, connection: ConnectionContext
    ) -> SaveResult:
        """Write the session (its live namespace included) durably now, and a saved copy."""
        session = await self._session_for(session_id, client_id, connection)
        await self.live.snapshot_into(session)
        # One stamp for both files: save_context's saved_at, the session's
        # last_saved_at and load_context's saved_at are the same string.
        # The session file first: a save that fails leaves the previous saved
        # copy as it was.
        stamp = iso_timestamp(self.now())
        document = session.to_document()
        result = await self.writer.write_now(
            session, "save the context", saved_at=stamp
        )  # shared too
        try:
            await self.store.write(document, saved_at=stamp, saved_copy=True)
        except RecordTooLarge as exc:
            raise state_too_large(exc) from exc
        except StorageFailure as exc:
            raise storage_error(exc, "save the context") from exc
        return SaveResult(session.session_id, result.saved_at, result.size_bytes, result.checksum)

    async def load_context(
        self, *, session_id: str | None, client_id: str | None, connection: ConnectionContext
    ) -> LoadResult:
        """Replace the in-memory context with the copy C{save_context} wrote last."""
        session = await self._session_for(session_id, client_id, connection)
        try:
            document, saved_at = await self.store.read_saved(session.client_id, session.session_id)
        except KeyError:
            raise StuiError(
                "InvalidRequest",
                f"session {session.session_id!r} has never been saved with save_context",
                session_id=session.session_id,
            ) from None
        except StorageFailure as exc:
            raise storage_error(exc, "load the context") from exc
        counter = session.history_counter
        session.load_document(document)
        # Cells keep numbers of their own: the next one is not numbered again.
        session.history_counter = max(counter, session.history_counter)
        # Written back as a change: a flush still writing the replaced state
        # must not leave that state on disk with the session marked clean.
        await self.changed(session, "load the context")
        rebuilt = await self.live.restore(session, rebuild=True)
        return LoadResult(session, saved_at, rebuilt)

    async def get_context_summary(
        self, *, session_id: str | None, client_id: str | None, connection: ConnectionContext
    ) -> SessionInfo:
        """The session, not touched, for a summary of its context."""
        return await self.get_session_info(
            session_id=session_id, client_id=client_id, connection=connection
        )

    async def clear_context(
        self,
        *,
        session_id: str | None,
        client_id: str | None,
        connection: ConnectionContext,
        parts: list | None = None,
    ) -> tuple[str, list[str]]:
        """Forget C{parts} of the context (all of them by default).

        Answers the session's id and the parts cleared.
        """
        if parts is None:
            parts = list(CONTEXT_PARTS)
        for part in parts:
            if part not in CONTEXT_PARTS:
                raise invalid_parameter(
                    "parts",
                    f"has unknown part {str(part)[:40]!r}; use any of {', '.join(CONTEXT_PARTS)}",
                )
        session = await self._session_for(session_id, client_id, connection)
        image_parts = [p for p in ("variables", "registry") if p in parts]
        await self.live.clear(session, image_parts, lambda: self._clear_parts(session, parts))
        if "events" in parts and self.events is not None:
            self.events.clear(session.session_id)  # seq keeps counting
        await self.changed(session, "clear the context")
        event_hooks.state_updated(
            self, session, client_id, [p for p in CONTEXT_PARTS if p in parts]
        )
        await event_hooks.durable(self, session)
        return session.session_id, [p for p in CONTEXT_PARTS if p in parts]

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

    # ================================================================ image commands

    async def evaluate(
        self,
        *,
        session_id: str | None,
        client_id: str | None,
        connection: ConnectionContext,
        code: str,
        mode: str = "execute",
        timeout: float | None = None,
    ) -> EvaluationOutcome:
        """Run C{code} in the session's namespace (see L{LiveSessions.evaluate})."""
        session = await self._session_for(session_id, client_id, connection)
        return await self.live.evaluate(session, code, mode, timeout, by=client_id)

    async def inspect(
        self,
        *,
        session_id: str | None,
        client_id: str | None,
        connection: ConnectionContext,
        object_id: str | None = None,
        expression: str | None = None,
        limit: int = 100,
    ) -> Inspection:
        """Look inside an object of the session (see L{LiveSessions.inspect})."""
        LiveSessions.check_inspect(object_id, expression, limit)
        session = await self._session_for(session_id, client_id, connection)
        return await self.live.inspect(session, object_id, expression, limit)

    async def complete(
        self,
        *,
        session_id: str | None,
        client_id: str | None,
        connection: ConnectionContext,
        code: str,
        cursor_pos: int | None = None,
    ) -> Completions:
        """Completions at the cursor (see L{LiveSessions.complete})."""
        session = await self._session_for(session_id, client_id, connection)
        return await self.live.complete(session, code, cursor_pos)

    async def interrupt(
        self, *, session_id: str | None, client_id: str | None, connection: ConnectionContext
    ) -> tuple[str, bool]:
        """Stop the session's running evaluation: (session id, whether one was stopped)."""
        session = await self._session_for(session_id, client_id, connection)
        return session.session_id, await self.live.interrupt(session)

    async def browse(
        self,
        *,
        session_id: str | None,
        client_id: str | None,
        connection: ConnectionContext,
        operation: str,
        arguments: dict,
    ) -> tuple[str, dict]:
        """A browse tool in the session's namespace: (session id, the image's answer)."""
        session = await self._session_for(session_id, client_id, connection)
        return session.session_id, await self.live.browse(session, operation, arguments)

    # ================================================================ misc

    def uptime(self) -> float:
        return round(self.now() - (self._started_at or self.now()), 3)

    def image_status(self) -> dict:
        return self.live.status()
