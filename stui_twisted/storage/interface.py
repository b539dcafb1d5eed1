"""What every session store provides: the file store and the PostgreSQL store.

The session service, the metrics and the admin tool use a store only through these
methods, so either store can stand behind them.  Every method that does I/O returns a
Deferred and runs the I/O off the reactor thread.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class ISessionStore(Interface):
    """Durable session documents, the saved copies of C{save_context}, the shared
    namespace and the session index."""

    max_session_bytes = Attribute("The largest stored document in bytes (StateTooLarge above).")

    shared_by_nodes = Attribute(
        "Whether several nodes may serve this store's sessions (the PostgreSQL store):"
        " the service then takes a lease before it uses a session, and looks in the"
        " store for sessions other nodes created."
    )

    def check():
        """Prepare the store synchronously at start-up (before any thread exists).

        @raise StorageFailure: the store cannot be used; the server must not start.
        """

    def open():
        """Start the store's threads; a Deferred that fires when it is usable."""

    def close():
        """A Deferred that fires once every queued operation is done and the threads
        are stopped."""

    def read(client_id, session_id):
        """A Deferred firing with the session dict last written.

        Fails with C{SessionFileMissing} (a C{KeyError}) for an unknown session and
        C{SessionFileCorrupt} when the stored copy fails its MAC (it is quarantined).
        """

    def write(session, *, saved_at=None, saved_copy=False):
        """Write C{session} durably; a Deferred firing with a C{WriteResult}.

        With C{saved_copy}, write the copy C{save_context} keeps instead.
        """

    def read_saved(client_id, session_id):
        """A Deferred firing with C{(session dict, saved_at)} of the saved copy."""

    def snapshot(session):
        """Serialize C{session} now, for a later L{write_many}.

        @raise StuiError: C{StateTooLarge}.
        @raise ValueError: not a session dict or bad ids.
        """

    def write_many(sessions):
        """Write several sessions (dicts or snapshots) as one group.

        A Deferred firing with C{{session_id: WriteResult or Failure}}; never fails
        as a whole once the store is open.
        """

    def delete(client_id, session_id):
        """Remove a session and its saved copy; missing is fine."""

    def read_shared():
        """A Deferred firing with the shared namespace bindings (C{{}} if none)."""

    def write_shared(bindings):
        """Write the shared namespace bindings; a Deferred firing with a C{WriteResult}."""

    def write_index(metas):
        """Record the meta of every session (a Deferred firing with None)."""

    def load_index():
        """A Deferred firing with the meta of every stored session (META_KEYS plus
        C{size_bytes} and C{saved_at})."""

    def verify_all():
        """A Deferred firing with one report row per stored object; moves nothing."""

    def acquire_lease(session_id, new=False):
        """Take the lease that lets this node serve C{session_id} (docs/operations.md).

        A Deferred firing with C{True} when this node held it already (its copy in
        memory is current) or C{False} when it took it now (read the session from
        the store again).  Fails with L{stui_twisted.storage.errors.LeaseHeld}
        while another node's lease is fresh.  C{new}: a session created here now
        (its lease is written with its first write).  A store one node owns
        grants every lease.
        """

    def release_lease(session_id):
        """Give up C{session_id}'s lease (closed or expired); a Deferred."""

    def addLeaseLostObserver(observer):  # noqa: N802
        """Call C{observer(session_ids)} when other nodes took over leases of this one."""

    def load_metas(client_id=None, session_id=None):
        """A Deferred firing with the meta of the stored sessions (of C{client_id},
        or the one C{session_id}), each verified, as L{load_index} gives them."""

    def statistics():
        """Cached counters (files, bytes, pending_writes, last_flush_at, write_errors,
        quarantined); no I/O."""
