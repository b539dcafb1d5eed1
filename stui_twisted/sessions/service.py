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

from stui_twisted.access import sharing
from stui_twisted.access.plans import PlanBook
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
    EvaluationStarted,
    Inspection,
    LoadResult,
    RestoreResult,
    SaveResult,
    SessionInfo,
    SessionStatistics,
    SharedNamespace,
)
from stui_twisted.settings import node_id_of
from stui_twisted.storage.errors import LeaseHeld, RecordTooLarge, StorageFailure
from stui_twisted.transports.connections import ConnectionRegistry

if TYPE_CHECKING:
    from stui_twisted.dispatch.interfaces import ConnectionContext

DAY = 24 * 3600.0
CONTEXT_PARTS = ("variables", "history", "registry", "inspector", "state", "events")


def _restore_share(session: Session, client_id: str, access: str | None) -> None:
    """Put C{client_id}'s share back as it was (C{None}: there was none)."""
    if access is None:
        session.shares.pop(client_id, None)
    else:
        session.shares[client_id] = access


def _forget(index: dict[str, set[str]], client_id: str, session_id: str) -> None:
    """Take C{session_id} out of C{index[client_id]} (and the key once it is empty)."""
    ids = index.get(client_id)
    if ids is not None:
        ids.discard(session_id)
        if not ids:
            del index[client_id]


class SessionService(service.Service):
    """Owns every session; the command table calls into it.

    @param reactor: the clock (C{IReactorTime}); every time it uses is read from it.
    @param image: the L{ImageSupervisor}, or C{None}; the caller parents it
        (tap.py), so that it stops after this service's final flush.
    """

    log = Logger()

    def __init__(
        self, settings, *, reactor, store, image=None, connections=None, plans=None
    ) -> None:
        super().__init__()
        self.settings = settings
        self.plans = plans if plans is not None else PlanBook(settings)
        """Per-principal limits (access.md §2), each falling back to C{settings}."""
        self.clock = reactor
        self.store = store
        self.image = image
        self.shared = SharedNamespace()
        self.live = LiveSessions(self, image, settings, reactor, self.plans)
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
        # client id -> ids of the sessions others shared with it (list_shared_sessions)
        self._shared_with: dict[str, set[str]] = {}
        # ids of sessions whose state is ACTIVE (for max_sessions_total, in O(1))
        self._active_ids: set[str] = set()
        self.writer = SessionWriter(store, settings, reactor, self.sessions, self.shared)
        # With a store several nodes share: the sessions this node holds the lease
        # of, and a lock per session while its lease is taken (docs/operations.md).
        self._served_here: set[str] = set()
        self._claim_locks: dict[str, defer.DeferredLock] = {}
        store.addLeaseLostObserver(self._leases_lost)
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
            # Evaluations still running end here: their history entries and
            # evaluation_finished events say so, and are written below.
            for session in await self.live.stop_running():
                try:
                    await self.writer.changed(session, "record the stopped evaluation")
                except StuiError:
                    self.log.failure("recording a stopped evaluation failed (flushed below)")
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
        command: str,
        touch: bool = True,
    ) -> Session:
        """The session C{session_id} names (or C{connection}'s current one), checked.

        Whether C{client_id} may run C{command} on it is decided by
        L{sharing.decide} (owner, or the access it was shared with).

        @param client_id: the acting client; C{None} acts for any (auth off, no id given).
        @param command: the command's name, for the access decision.
        """
        await self.ready()
        session_id = session_id or connection.current_session_id
        if session_id is None:
            raise StuiError(
                "NoSession",
                "no 'session_id' given and this connection has no current session; "
                "create_session or restore_session first",
            )
        if self.store.shared_by_nodes and session_id not in self._served_here:
            # another node may have created or changed it: what the database says
            await self._find_in_store(session_id=session_id)
        session = self.sessions.get(session_id)
        if session is None:
            raise sharing.session_not_found(session_id)
        sharing.decide(session.session_id, session.client_id, session.shares, client_id, command)
        if touch and session.state != CLOSED:  # closed is final: no lease needed to say so
            await self._claim(session)
        now = self.now()
        # With a shared store, only the lease holder may record an end (another
        # node's copy of last_activity may be old); a lease taken for a session
        # that turns out to have ended is given up at once.
        holder = not self.store.shared_by_nodes or session_id in self._served_here
        if session.state == CLOSED:
            if self.store.shared_by_nodes and holder:
                await self._give_up(session)
            raise StuiError(
                "SessionClosed", f"session {session_id!r} was closed", session_id=session_id
            )
        if session.is_expired(now):
            if session.state == ACTIVE and holder:
                self._expire(session)  # gives the lease up once the expiry is written
            elif self.store.shared_by_nodes and holder:
                await self._give_up(session)
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

    # ================================================================ leases

    async def _claim(self, session: Session) -> None:
        """Take C{session}'s lease before it is used here (a store several nodes share).

        When this node did not hold it already, the session is read from the store
        again: another node may have changed it since this node last served it.

        @raise StuiError: C{SessionElsewhere} while another node's lease is fresh.
        """
        if not self.store.shared_by_nodes:
            return
        session_id = session.session_id
        lock = self._claim_locks.setdefault(session_id, defer.DeferredLock())
        await lock.acquire()
        try:
            try:
                current = await self.store.acquire_lease(session_id)
            except LeaseHeld as held:
                self._served_here.discard(session_id)
                raise StuiError(
                    "SessionElsewhere",
                    f"{held}; reconnect there"
                    if held.advertise
                    else f"{held} (it advertises no endpoint)",
                    session_id=session_id,
                    node_id=held.node_id,
                    advertise=held.advertise,
                ) from None
            except StorageFailure as exc:
                raise storage_error(exc, f"take the lease of session {session_id!r}") from exc
            self._served_here.add(session_id)
            if not current:
                await self._reload(session)
        finally:
            lock.release()
            if not lock.locked and not lock.waiting:
                self._claim_locks.pop(session_id, None)

    async def _reload(self, session: Session) -> None:
        """Take C{session} as the store has it now (its lease was just taken)."""
        try:
            document = await self.store.read(session.client_id, session.session_id)
        except KeyError:
            return  # never written (created here and not flushed yet): memory is all
        except StorageFailure as exc:
            raise storage_error(exc, f"read session {session.session_id!r}") from exc
        self.writer.dirty.discard(session.session_id)
        self._refresh_meta(session, document)
        session.load_document(document)
        session.size_bytes = self._size_of(session)
        session.materialized = False  # rebuilt from these bindings at its next use
        session.image_generation = None

    def _refresh_meta(self, session: Session, meta: dict) -> None:
        """Take state and times of C{session} from a stored meta (another node's)."""
        fresh = Session.from_meta(meta)
        for name in ("state", "timeout", "closed_at", "last_activity", "last_modified"):
            setattr(session, name, getattr(fresh, name))
        if session.state == ACTIVE:
            self._active_ids.add(session.session_id)
        else:
            self._active_ids.discard(session.session_id)

    async def _find_in_store(self, **which: str) -> None:
        """Learn the sessions other nodes created or changed (C{load_metas(**which)})."""
        try:
            metas = await self.store.load_metas(**which)
        except StorageFailure as exc:
            raise storage_error(exc, "read the session index") from exc
        for meta in metas:
            session = self.sessions.get(meta["session_id"])
            if session is None:
                self._add(Session.from_meta(meta))
            elif session.session_id not in self._served_here:
                self._refresh_meta(session, meta)
                session.loaded = False  # its content is read again at its next use

    def _leases_lost(self, session_ids: list[str]) -> None:
        """Another node took these sessions over (this one missed its renewals)."""
        for session_id in session_ids:
            self._served_here.discard(session_id)
            self.writer.dirty.discard(session_id)
            session = self.sessions.get(session_id)
            if session is None:
                continue
            session.loaded = False
            session.materialized = False
            dropped = self.live.drop(session_id)
            if dropped is not None:
                dropped.addErrback(
                    lambda f, sid=session_id: self.log.failure("image: dropping {sid}", f, sid=sid)
                )

    async def _give_up(self, session: Session) -> None:
        """Release C{session}'s lease once its end is written (closed or expired)."""
        self._served_here.discard(session.session_id)
        try:
            await self.store.release_lease(session.session_id)
        except StorageFailure:
            self.log.failure("giving up the lease of {sid}", sid=session.session_id)

    def node(self) -> dict:
        """This node as C{ping} shows it: C{node_id} and C{advertise}."""
        return {"node_id": node_id_of(self.settings), "advertise": self.settings.advertise}

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
        for reader in session.shares:
            self._shared_with.setdefault(reader, set()).add(session.session_id)
        if session.state == ACTIVE:
            self._active_ids.add(session.session_id)

    def _remove(self, session: Session) -> None:
        self.sessions.pop(session.session_id, None)
        if self.events is not None:
            self.events.forget(session.session_id)
        self.writer.dirty.discard(session.session_id)
        self._active_ids.discard(session.session_id)
        _forget(self._by_client, session.client_id, session.session_id)
        for reader in session.shares:
            _forget(self._shared_with, reader, session.session_id)

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
        limit = self.plans.limit(session.client_id, "max_session_bytes")  # the owner's plan
        if size > limit:
            raise StuiError(
                "StateTooLarge",
                f"session would be {size} bytes, over max_session_bytes ({limit})",
                size_bytes=size,
                max_session_bytes=limit,
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
                if self.store.shared_by_nodes and session.session_id not in self._served_here:
                    continue  # another node's (or nobody's): expired where it is used
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
        if self.store.shared_by_nodes:
            defer.ensureDeferred(self._record_expiry_and_give_up(session)).addErrback(
                lambda f: self.log.failure(
                    "recording the expiry of {sid}", f, sid=session.session_id
                )
            )

    async def _record_expiry_and_give_up(self, session: Session) -> None:
        """Write the expiry, then give up the lease (no node serves it stale)."""
        try:
            await self.writer.write_now(session, "record the expiry")
        finally:
            await self._give_up(session)

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
        most = self.plans.limit(client_id, "max_sessions_per_client")
        if len(active) >= most:
            raise StuiError(
                "SessionLimitExceeded",
                f"client {client_id!r} already has {len(active)} active sessions "
                f"(max_sessions_per_client={most}); close one first",
                active_sessions=len(active),
                max_sessions_per_client=most,
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
        self.policy.record_create(
            client_id, now, limit=self.plans.limit(client_id, "create_rate_limit")
        )
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
        if self.store.shared_by_nodes:
            await self.store.acquire_lease(session.session_id, new=True)
            self._served_here.add(session.session_id)
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
        """Reattach C{connection} to a session, its namespace live in the image.

        A principal the session is shared with attaches as itself: the session
        stays its owner's, and no other connection's current session changes.
        """
        session = await self._session_for(
            session_id, client_id, connection, command="restore_session"
        )
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
        session = await self._session_for(
            session_id, client_id, connection, command="update_session_state"
        )
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
        session = await self._session_for(
            session_id, client_id, connection, command="close_session"
        )
        now = self.now()
        if not save_state:
            try:
                document = await self.store.read(session.client_id, session.session_id)
                session.load_document(document, shares=False)
            except KeyError:
                session.load_document({}, shares=False)
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
        if self.store.shared_by_nodes:
            await self._give_up(session)
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
        self,
        *,
        session_id: str | None,
        client_id: str | None,
        connection: ConnectionContext,
        command: str = "get_session_info",
    ) -> SessionInfo:
        """The session (not touched: asking about it is not activity) and its sizes.

        Its shares are in the answer for the owner only (C{None} for anyone else).
        """
        session = await self._session_for(
            session_id, client_id, connection, command=command, touch=False
        )
        owner = sharing.role_of(session.client_id, session.shares, client_id) == sharing.OWNER
        return SessionInfo(
            session,
            size_bytes=session.size_bytes or self._size_of(session),
            attached_connections=self.connections.attached_to(session.session_id),
            shares=sharing.shares_list(session.shares) if owner else None,
        )

    async def list_client_sessions(
        self, *, client_id: str | None, include_inactive: bool = False
    ) -> ClientSessions:
        """C{client_id}'s sessions (only active ones unless C{include_inactive}), oldest first."""
        await self.ready()
        client_id = self._owned_client(client_id)
        if self.store.shared_by_nodes:
            await self._find_in_store(client_id=client_id)
        now = self.now()
        sessions = sorted(
            (s for s in self._sessions_of(client_id) if include_inactive or s.is_active(now)),
            key=lambda s: s.created_at,
        )
        return ClientSessions(client_id, sessions)

    async def list_all_sessions(
        self, *, client_id: str | None = None, include_inactive: bool = False
    ) -> list[Session]:
        """Every client's sessions (or C{client_id}'s), oldest first: the admin view."""
        await self.ready()
        now = self.now()
        chosen = self.sessions.values() if client_id is None else self._sessions_of(client_id)
        return sorted(
            (s for s in chosen if include_inactive or s.is_active(now)),
            key=lambda s: (s.created_at, s.session_id),
        )

    async def get_session_statistics(self) -> SessionStatistics:
        """Server-wide session counts, connections and storage counters.

        With a store several nodes share, the counts are of every session in it.
        """
        await self.ready()
        if self.store.shared_by_nodes:
            await self._find_in_store()
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

    # ================================================================ sharing

    async def share_session(
        self,
        *,
        session_id: str | None,
        client_id: str | None,
        connection: ConnectionContext,
        with_client: str,
        access: str,
    ) -> Session:
        """Let C{with_client} use the session with C{access} (replacing its share, if any).

        Only the owner shares (L{sharing.decide}); the share is part of the
        session, written under its durability policy.
        """
        if access not in sharing.ACCESS_LEVELS:
            raise invalid_parameter(
                "access",
                f"must be read or write, not {str(access)[:40]!r}",
                allowed=["read", "write"],
            )
        check_client_id(with_client, parameter="with")
        session = await self._session_for(
            session_id, client_id, connection, command="share_session"
        )
        if with_client == session.client_id:
            raise invalid_parameter(
                "with",
                f"is the session's owner {with_client!r}; a session is not shared with its owner",
            )
        before = session.shares.get(with_client)
        if before == access:
            return session
        session.shares[with_client] = access
        try:
            await self.changed(session, "share the session")
        except StuiError:
            _restore_share(session, with_client, before)
            raise
        self._shared_with.setdefault(with_client, set()).add(session.session_id)
        event_hooks.share_changed(self, session.session_id, with_client, access)
        self.log.info(
            "{conn} shared session {sid} of {owner} with {who} ({access})",
            conn=connection.label,
            sid=session.session_id,
            owner=session.client_id,
            who=with_client,
            access=access,
        )
        return session

    async def unshare_session(
        self,
        *,
        session_id: str | None,
        client_id: str | None,
        connection: ConnectionContext,
        with_client: str,
    ) -> Session:
        """Take C{with_client}'s share away, at once: its next command and its stream end.

        Unsharing a client the session is not shared with changes nothing.
        """
        check_client_id(with_client, parameter="with")
        session = await self._session_for(
            session_id, client_id, connection, command="unshare_session"
        )
        before = session.shares.pop(with_client, None)
        if before is None:
            return session
        try:
            await self.changed(session, "unshare the session")
        except StuiError:
            session.shares[with_client] = before
            raise
        _forget(self._shared_with, with_client, session.session_id)
        event_hooks.share_changed(self, session.session_id, with_client, None)
        await event_hooks.durable(self, session)
        self.log.info(
            "{conn} unshared session {sid} of {owner} from {who}",
            conn=connection.label,
            sid=session.session_id,
            owner=session.client_id,
            who=with_client,
        )
        return session

    async def list_shared_sessions(self, *, client_id: str | None) -> ClientSessions:
        """The active sessions others shared with C{client_id}, oldest first."""
        await self.ready()
        client_id = self._owned_client(client_id)
        now = self.now()
        sessions = sorted(
            (
                self.sessions[sid]
                for sid in self._shared_with.get(client_id, ())
                if self.sessions[sid].is_active(now)
            ),
            key=lambda s: s.created_at,
        )
        return ClientSessions(client_id, sessions)

    # ================================================================ context commands

    async def save_context(
        self, *, session_id: str | None, client_id: str | None, connection: ConnectionContext
    ) -> SaveResult:
        """Write the session (its live namespace included) durably now, and a saved copy."""
        session = await self._session_for(session_id, client_id, connection, command="save_context")
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
        session = await self._session_for(session_id, client_id, connection, command="load_context")
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
        session.load_document(document, shares=False)
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
            session_id=session_id,
            client_id=client_id,
            connection=connection,
            command="get_context_summary",
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
        session = await self._session_for(
            session_id, client_id, connection, command="clear_context"
        )
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
        wait: bool = True,
    ) -> EvaluationOutcome | EvaluationStarted:
        """Run C{code} in the session's namespace (see L{LiveSessions.start_evaluation}).

        With C{wait} the outcome; without, L{EvaluationStarted} once it started
        (under C{always} its C{evaluation_started} event is on disk first).
        """
        session = await self._session_for(session_id, client_id, connection, command="evaluate")
        run = self.live.start_evaluation(
            session, code, mode, timeout, client_id, wait=wait, context=connection
        )
        if wait:
            return await run.done
        await event_hooks.durable(self, session)
        return EvaluationStarted(session.session_id, run.index)

    async def get_evaluation(
        self,
        *,
        session_id: str | None,
        client_id: str | None,
        connection: ConnectionContext,
        history_index: int,
    ) -> tuple[str, dict]:
        """Evaluation C{history_index} of the session (not touched): (session id, entry)."""
        session = await self._session_for(
            session_id, client_id, connection, touch=False, command="get_evaluation"
        )
        return session.session_id, self.live.running.evaluation(session, history_index)

    async def send_input(
        self,
        *,
        session_id: str | None,
        client_id: str | None,
        connection: ConnectionContext,
        text: str,
    ) -> tuple[str, int]:
        """Answer the C{input()} the session's evaluation waits in: (session id, index)."""
        session = await self._session_for(session_id, client_id, connection, command="send_input")
        return session.session_id, self.live.running.send_input(session, text)

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
        """Look inside an object of the session (see L{LiveSessions.inspect}).

        A reader's inspection does not become the session's inspector selection,
        and its C{expression} may only name a value (L{sharing.check_reader_expression}).
        """
        LiveSessions.check_inspect(object_id, expression, limit)
        session = await self._session_for(session_id, client_id, connection, command="inspect")
        reader = sharing.role_of(session.client_id, session.shares, client_id) == sharing.READ
        if reader and expression is not None:
            sharing.check_reader_expression(expression)
        return await self.live.inspect(session, object_id, expression, limit, select=not reader)

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
        session = await self._session_for(session_id, client_id, connection, command="complete")
        return await self.live.complete(session, code, cursor_pos)

    async def interrupt(
        self, *, session_id: str | None, client_id: str | None, connection: ConnectionContext
    ) -> tuple[str, bool]:
        """Stop the session's running evaluation: (session id, whether one was stopped)."""
        session = await self._session_for(session_id, client_id, connection, command="interrupt")
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
        session = await self._session_for(session_id, client_id, connection, command=operation)
        return session.session_id, await self.live.browse(session, operation, arguments)

    # ================================================================ misc

    def uptime(self) -> float:
        return round(self.now() - (self._started_at or self.now()), 3)

    def image_status(self) -> dict:
        return self.live.status()
