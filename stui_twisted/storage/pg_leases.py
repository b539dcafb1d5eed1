"""Node leases of the PostgreSQL store: which node serves a session now.

A node serves a session only while it holds the session's row in the C{leases}
table (C{session_id}, C{node_id}, C{advertise}, C{expires_at}).  L{LeaseKeeper}
takes leases, renews every held lease with one batched C{UPDATE} per
C{--lease-interval} (in the store's thread pool, never on the reactor thread),
gives them up, and tells the session service about leases it lost.  A lease runs
out three intervals after its last renewal; every comparison with C{expires_at}
uses the database's clock (C{now()}), so the nodes' clocks do not matter.

Taking a lease (one transaction, the row locked with C{FOR UPDATE}):

  - no row: insert one (the session was never served, or its node gave it up);
  - our own node id: take it back at once (a node restarted with the same id);
  - another node's fresh lease: L{LeaseHeld} (the service answers
    C{SessionElsewhere});
  - another node's lease that ran out: take it over with
    C{UPDATE ... WHERE expires_at < now()}.

The lease of a session created here is written in the same transaction as the
session's first row (L{LeaseKeeper.claim_new}), so no other node can see the
session without its lease, and creating a session costs no extra transaction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger

from stui_twisted.storage.errors import LeaseHeld

__all__ = ["LeaseKeeper", "RUNS_OUT_AFTER"]

RUNS_OUT_AFTER = 3
"""A lease runs out this many intervals after its last renewal."""

_LEASE_ROW = "SELECT node_id, advertise, expires_at < now() FROM leases WHERE session_id = %s"


class LeaseKeeper:
    """This node's leases in one PostgreSQL database.

    @param run: C{run(action, lane, function, *args)}: a Deferred of
        C{function(connection, *args)} run in one transaction in the store's pool,
        after every earlier job of the same C{lane} (L{PostgresSessionStore}).
    @param node_id: this node's id (the C{node_id} of its rows).
    @param advertise: the C{HOST:PORT} clients should use for this node, or C{None}.
    @param interval: seconds between renewals.
    @param clock: an C{IReactorTime}.
    """

    log = Logger()

    def __init__(
        self,
        run: Callable[..., defer.Deferred],
        *,
        node_id: str,
        advertise: str | None,
        interval: float,
        clock: Any,
    ) -> None:
        self._run = run
        self.node_id = node_id
        self.advertise = advertise
        self.interval = interval
        self.ttl = RUNS_OUT_AFTER * interval
        self.clock = clock
        self.takeovers = 0
        self.lost = 0
        self.on_lost: Callable[[list[str]], None] | None = None
        # session id -> local time at which its lease was last confirmed in the
        # database (taken when the confirming transaction was started)
        self._held: dict[str, float] = {}
        # leases of sessions created here, written with the session's first row
        self._unwritten: set[str] = set()
        self._renewing: defer.Deferred | None = None
        self._loop: task.LoopingCall | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Renew every held lease once per interval, from now on."""
        if self._loop is None:
            self._loop = task.LoopingCall(self.renew)
            self._loop.clock = self.clock
            self._loop.start(self.interval, now=False).addErrback(
                lambda failure: self.log.failure("lease renewal loop stopped", failure)
            )

    def stop_renewing(self) -> None:
        """Renew no more (the leases run out unless given up)."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def stop(self) -> defer.Deferred:
        """Stop renewing and give up every lease of this node (a clean shutdown)."""
        self.stop_renewing()
        renewing = self._renewing or defer.succeed(None)
        self._held.clear()
        self._unwritten.clear()

        def release_all(connection) -> int:
            return connection.execute(
                "DELETE FROM leases WHERE node_id = %s", (self.node_id,)
            ).rowcount

        def released(count: int) -> None:
            self.log.info("gave up {count} session leases", count=count)

        return renewing.addBoth(
            lambda _: self._run("give up the leases", None, release_all)
        ).addCallback(released)

    # ------------------------------------------------------------------ queries

    def statistics(self) -> dict[str, int]:
        return {"leases_held": len(self._held), "lease_takeovers": self.takeovers}

    def holds(self, session_id: str) -> bool:
        """Whether this node holds C{session_id}'s lease as far as it knows."""
        return session_id in self._held

    # ------------------------------------------------------------------ taking

    def claim_new(self, session_id: str) -> None:
        """Hold the lease of a session created here; its row comes with the session's."""
        self._held[session_id] = self.clock.seconds()
        self._unwritten.add(session_id)

    def unwritten_among(self, session_ids) -> list[str]:
        """Which of C{session_ids} have a lease row still to write with their session."""
        return [session_id for session_id in session_ids if session_id in self._unwritten]

    def written(self, session_ids) -> None:
        """Their lease rows were committed with their sessions."""
        self._unwritten.difference_update(session_ids)

    @staticmethod
    def insert_new(connection, node_id: str, advertise: str | None, ttl: float, ids) -> None:
        """In a write's transaction: the lease rows of new sessions (for L{claim_new})."""
        connection.execute(
            "INSERT INTO leases (session_id, node_id, advertise, expires_at)"
            " SELECT new.session_id, %s, %s, now() + make_interval(secs => %s)"
            " FROM unnest(%b::text[]) AS new (session_id)"
            " ON CONFLICT (session_id) DO NOTHING",
            (node_id, advertise, ttl, list(ids)),
        )

    def acquire(self, session_id: str) -> defer.Deferred:
        """Take C{session_id}'s lease.

        A Deferred firing with C{True} when this node held it already (what it has
        in memory is current) or C{False} when it was taken now (read the session
        from the database again); failing with L{LeaseHeld} when another node's
        lease is fresh.
        """
        confirmed = self._held.get(session_id)
        now = self.clock.seconds()
        if confirmed is not None and (
            session_id in self._unwritten or now - confirmed < self.ttl - self.interval
        ):
            return defer.succeed(True)

        def acquire_in_thread(connection) -> tuple[str, str | None, str | None]:
            row = connection.execute(_LEASE_ROW + " FOR UPDATE", (session_id,)).fetchone()
            if row is None:
                inserted = connection.execute(
                    "INSERT INTO leases (session_id, node_id, advertise, expires_at)"
                    " VALUES (%s, %s, %s, now() + make_interval(secs => %s))"
                    " ON CONFLICT (session_id) DO NOTHING RETURNING session_id",
                    (session_id, self.node_id, self.advertise, self.ttl),
                ).fetchone()
                if inserted is not None:
                    return "free", None, None
                row = connection.execute(_LEASE_ROW + " FOR UPDATE", (session_id,)).fetchone()
            holder, advertise, expired = row
            if holder != self.node_id and not expired:
                return "held", holder, advertise
            taken = connection.execute(
                "UPDATE leases SET node_id = %s, advertise = %s,"
                " expires_at = now() + make_interval(secs => %s)"
                " WHERE session_id = %s AND (node_id = %s OR expires_at < now())"
                " RETURNING session_id",
                (self.node_id, self.advertise, self.ttl, session_id, self.node_id),
            ).fetchone()
            if taken is None:  # cannot happen while the row is locked; never steal
                return "held", holder, advertise
            return ("own" if holder == self.node_id else "taken over"), holder, advertise

        def acquired(outcome: tuple[str, str | None, str | None]) -> bool:
            kind, holder, advertise = outcome
            current = session_id in self._held and kind == "own"
            if kind == "held":
                self._forget([session_id])
                raise LeaseHeld(session_id, holder, advertise)
            self._held[session_id] = now
            if kind == "taken over":
                self.takeovers += 1
                self.log.warn(
                    "took over session {sid} from node {node}: its lease had run out",
                    sid=session_id,
                    node=holder,
                )
            return current

        lane = ("leases", session_id, "")
        return self._run("take a lease", lane, acquire_in_thread).addCallback(acquired)

    # ------------------------------------------------------------------ giving up

    def release(self, session_id: str) -> defer.Deferred:
        """Give up C{session_id}'s lease (closed, expired)."""
        self._held.pop(session_id, None)
        self._unwritten.discard(session_id)

        def release_in_thread(connection) -> None:
            connection.execute(
                "DELETE FROM leases WHERE session_id = %s AND node_id = %s",
                (session_id, self.node_id),
            )

        lane = ("leases", session_id, "")
        return self._run("give up a lease", lane, release_in_thread)

    # ------------------------------------------------------------------ renewing

    def renew(self) -> defer.Deferred | None:
        """Renew every held lease in one C{UPDATE}; report those that were lost."""
        if self._renewing is not None:
            return self._renewing  # the last one is still running: skip this turn
        ids = [session_id for session_id in self._held if session_id not in self._unwritten]
        if not ids:
            return None
        started = self.clock.seconds()

        def renew_in_thread(connection) -> set[str]:
            # A lost renewal costs nothing lasting: no fsync wait for it.  The ids
            # go as a binary array (%b): a text one is escaped element by element
            # in Python, holding the GIL, for every held lease at every renewal.
            connection.execute("SET LOCAL synchronous_commit = off")
            rows = connection.execute(
                "UPDATE leases SET expires_at = now() + make_interval(secs => %s)"
                " WHERE node_id = %s AND session_id = ANY(%b::text[]) RETURNING session_id",
                (self.ttl, self.node_id, ids),
            ).fetchall()
            return {row[0] for row in rows}

        def renewed(kept: set[str]) -> None:
            lost = []
            for session_id in ids:
                if session_id not in self._held:
                    continue  # given up meanwhile
                if session_id in kept:
                    self._held[session_id] = max(self._held[session_id], started)
                else:
                    lost.append(session_id)
            if lost:
                self.log.warn(
                    "lost the lease of {count} sessions to other nodes: {ids}",
                    count=len(lost),
                    ids=", ".join(lost),
                )
                self._forget(lost)

        def failed(failure) -> None:
            self.log.failure("renewing {count} leases failed", failure, count=len(ids))

        def done(result: object) -> object:
            self._renewing = None
            return result

        self._renewing = self._run("renew the leases", None, renew_in_thread)
        self._renewing.addCallbacks(renewed, failed).addBoth(done)
        return self._renewing

    def lost_to_others(self, session_ids: list[str]) -> None:
        """A write found these sessions leased by another node: they are not ours."""
        if any(session_id in self._held for session_id in session_ids):
            self.log.warn(
                "another node holds the lease of {ids}: not written here",
                ids=", ".join(session_ids),
            )
        self._forget(session_ids)

    def _forget(self, session_ids: list[str]) -> None:
        lost = [session_id for session_id in session_ids if session_id in self._held]
        for session_id in lost:
            del self._held[session_id]
            self._unwritten.discard(session_id)
        self.lost += len(lost)
        if lost and self.on_lost is not None:
            self.on_lost(lost)
