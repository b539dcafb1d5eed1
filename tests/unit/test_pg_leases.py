"""Nodes of the PostgreSQL store (leases, per-node shared namespace, their metrics), on
the test session's real cluster.

Two stores on one database stand for two nodes.  A lease "runs out" by moving its
C{expires_at} into the past on the database's clock (what three missed renewals
do), so the tests need no sleeps; one test lets real renewals run.
"""

from __future__ import annotations

import psycopg
import pytest
import pytest_twisted

from stui_twisted.storage import postgres
from stui_twisted.storage.errors import LeaseHeld
from stui_twisted.storage.postgres import PostgresSessionStore
from tests.helpers import make_session, reactor_sleep
from tests.unit.test_store_backends import the_reactor, within_time_limit

pytestmark = pytest.mark.timeout(60)

SID = make_session()["session_id"]


async def open_node(dsn, tmp_path, node_id, **options):
    store = PostgresSessionStore(
        dsn,
        reactor=the_reactor(),
        secret_file=str(tmp_path / "secret.key"),
        node_id=node_id,
        advertise=f"{node_id}.example:7555",
        **options,
    )
    store.check()
    await within_time_limit(store.open())
    return store


def lease_rows(dsn):
    with psycopg.connect(dsn) as connection:
        return connection.execute(
            "SELECT session_id, node_id, advertise, expires_at > now() FROM leases"
            " ORDER BY session_id"
        ).fetchall()


def run_out(dsn, session_id=SID):
    """The lease's holder missed three renewals (on the database's clock)."""
    with psycopg.connect(dsn) as connection:
        connection.execute(
            "UPDATE leases SET expires_at = now() - interval '1 second' WHERE session_id = %s",
            (session_id,),
        )


@pytest_twisted.async_yield_fixture
async def nodes(pg_dsn, tmp_path):
    """C{await nodes(**options)}: stores of nodes C{a} and C{b} on one database, open;
    closed when the test ends."""
    opened = []

    async def open_pair(**options):
        for name in ("a", "b"):
            opened.append(await open_node(pg_dsn, tmp_path, name, **options))
        return opened[-2:]

    yield open_pair
    for store in opened:
        await within_time_limit(store.close())


async def held_elsewhere(store, session_id=SID) -> LeaseHeld:
    with pytest.raises(LeaseHeld) as caught:
        await within_time_limit(store.acquire_lease(session_id))
    return caught.value


@pytest_twisted.ensureDeferred
async def test_fresh_lease_sends_others_away_until_it_runs_out(pg_dsn, nodes):
    a, b = await nodes()
    lost = []
    a.addLeaseLostObserver(lost.extend)
    assert await within_time_limit(a.acquire_lease(SID)) is False  # taken now: read it
    assert await within_time_limit(a.acquire_lease(SID)) is True  # held: current
    assert lease_rows(pg_dsn) == [(SID, "a", "a.example:7555", True)]

    elsewhere = await held_elsewhere(b)
    assert (elsewhere.node_id, elsewhere.advertise) == ("a", "a.example:7555")
    assert b.statistics()["lease_takeovers"] == 0

    run_out(pg_dsn)
    assert await within_time_limit(b.acquire_lease(SID)) is False  # taken over
    assert b.statistics()["lease_takeovers"] == 1
    assert lease_rows(pg_dsn) == [(SID, "b", "b.example:7555", True)]

    # a's next renewal finds the lease gone and says so; a then asks the database
    await within_time_limit(a.leases.renew())
    assert lost == [SID] and not a.leases.holds(SID)
    assert (await held_elsewhere(a)).node_id == "b"

    await within_time_limit(b.release_lease(SID))  # closed on b
    assert lease_rows(pg_dsn) == []
    assert await within_time_limit(a.acquire_lease(SID)) is False
    assert a.statistics()["lease_takeovers"] == 0  # a free lease is no takeover


@pytest_twisted.ensureDeferred
async def test_a_restarted_node_takes_its_own_lease_back_at_once(pg_dsn, tmp_path):
    first = await open_node(pg_dsn, tmp_path, "a")
    await within_time_limit(first.acquire_lease(SID))
    first.leases.stop_renewing()  # as if killed: the row stays, fresh
    again = await open_node(pg_dsn, tmp_path, "a")
    other = await open_node(pg_dsn, tmp_path, "b")
    try:
        assert (await held_elsewhere(other)).node_id == "a"
        assert await within_time_limit(again.acquire_lease(SID)) is False
        assert again.statistics()["lease_takeovers"] == 0
        assert lease_rows(pg_dsn) == [(SID, "a", "a.example:7555", True)]
    finally:
        await within_time_limit(other.close())
        await within_time_limit(again.close())  # gives up every lease of node a
        assert lease_rows(pg_dsn) == []
        first._stop_pool()


@pytest_twisted.ensureDeferred
async def test_a_new_sessions_lease_is_written_with_its_first_row(pg_dsn, nodes):
    a, b = await nodes()
    assert await within_time_limit(a.acquire_lease(SID, new=True)) is True
    assert lease_rows(pg_dsn) == []  # nothing is in the database yet
    await within_time_limit(a.write_many([make_session()]))
    assert lease_rows(pg_dsn) == [(SID, "a", "a.example:7555", True)]
    assert (await held_elsewhere(b)).node_id == "a"


@pytest_twisted.ensureDeferred
async def test_a_flush_group_is_sealed_when_snapshotted_not_when_written(
    pg_dsn, nodes, monkeypatch
):
    """C{write_many} of snapshots seals nothing on the reactor thread (the flush seals
    each session in its own time slice, when it takes the snapshot); the group, the
    new sessions' leases with it, is stored as snapshotted, the last snapshot of a
    session winning."""
    a, b = await nodes()
    sessions = [make_session(number=n) for n in range(1, 41)]
    for session in sessions:
        await within_time_limit(a.acquire_lease(session["session_id"], new=True))
    snapshots = [a.snapshot(session) for session in sessions]
    snapshots.append(a.snapshot(make_session(number=1, session_state={"n": "later"})))
    sealed = []
    seal = postgres._seal
    monkeypatch.setattr(postgres, "_seal", lambda *args: sealed.append(args) or seal(*args))
    results = await within_time_limit(a.write_many(snapshots))
    assert sealed == []
    latest = {snapshot.session_id: snapshot for snapshot in snapshots}
    with psycopg.connect(pg_dsn) as connection:
        stored = dict(connection.execute("SELECT session_id, document FROM sessions").fetchall())
    assert sorted(stored) == sorted(latest)
    for session_id, snapshot in latest.items():
        assert bytes(stored[session_id]) == snapshot.document
        assert results[session_id].saved_at == snapshot.saved_at
    assert (await within_time_limit(a.read("alice", SID)))["session_state"] == {"n": "later"}
    assert [row[1:] for row in lease_rows(pg_dsn)] == [("a", "a.example:7555", True)] * 40
    assert (await held_elsewhere(b)).node_id == "a"


@pytest_twisted.ensureDeferred
async def test_renewals_keep_a_lease_fresh_past_its_lifetime(pg_dsn, nodes):
    a, b = await nodes(lease_interval=0.2)
    await within_time_limit(a.acquire_lease(SID))
    with psycopg.connect(pg_dsn) as connection:
        first = connection.execute("SELECT expires_at FROM leases").fetchone()[0]
    await reactor_sleep(1.0)  # 5 intervals: the lease lives 3 without renewal
    with psycopg.connect(pg_dsn) as connection:
        later = connection.execute("SELECT expires_at FROM leases").fetchone()[0]
    assert later > first
    assert (await held_elsewhere(b)).node_id == "a"


@pytest_twisted.ensureDeferred
async def test_each_node_has_its_own_shared_namespace(nodes):
    a, b = await nodes()
    await within_time_limit(a.write_shared({"team": {"encoding": "json", "value": "a"}}))
    assert await within_time_limit(b.read_shared()) == {}
    await within_time_limit(b.write_shared({"team": {"encoding": "json", "value": "b"}}))
    assert (await within_time_limit(a.read_shared()))["team"]["value"] == "a"
    assert (await within_time_limit(b.read_shared()))["team"]["value"] == "b"


@pytest_twisted.ensureDeferred
async def test_metrics_of_a_node_show_its_pool_transactions_and_takeovers(pg_dsn, nodes):
    """--metrics with the PostgreSQL store: the registry builds (the store has the write
    observer hook) and shows transaction latency, leases held and takeovers."""
    from types import SimpleNamespace

    from stui_twisted.ops.metrics import build_registry
    from stui_twisted.transports.connections import ConnectionRegistry
    from tests.helpers import make_dispatcher

    a, b = await nodes()
    service = SimpleNamespace(
        store=b,
        sessions={},
        connections=ConnectionRegistry(1),
        now=lambda: 0.0,
        uptime=lambda: 0.0,
        image_status=lambda: {"status": "disabled", "pid": None, "started_at": None},
        plans=SimpleNamespace(reload_errors=0),
    )
    registry = build_registry(service, make_dispatcher())
    await within_time_limit(a.acquire_lease(SID))
    run_out(pg_dsn)
    await within_time_limit(b.acquire_lease(SID))
    await within_time_limit(b.write(make_session()))
    value = registry.get_sample_value
    assert value("stui_storage_lease_takeovers_total") == 1
    assert value("stui_storage_leases_held") == 1
    assert value("stui_storage_transaction_duration_seconds_count") >= 2
    assert value("stui_storage_flush_duration_seconds_count", {"kind": "single"}) == 1
    assert value("stui_storage_pool_in_use") == 0


@pytest_twisted.ensureDeferred
async def test_a_node_that_lost_its_lease_cannot_overwrite_the_new_holders_row(pg_dsn, nodes):
    from stui_twisted.storage.errors import StorageFailure

    a, b = await nodes()
    lost = []
    a.addLeaseLostObserver(lost.extend)
    await within_time_limit(a.acquire_lease(SID))
    await within_time_limit(a.write(make_session(session_state={"by": "a"})))
    run_out(pg_dsn)  # a stalled for three intervals; b takes the session over
    await within_time_limit(b.acquire_lease(SID))
    await within_time_limit(b.write(make_session(session_state={"by": "b"})))

    with pytest.raises(StorageFailure, match="served by another node now"):
        await within_time_limit(a.write(make_session(session_state={"by": "a, late"})))
    assert lost == [SID] and not a.leases.holds(SID)
    outcomes = await within_time_limit(
        a.write_many([make_session(session_state={"by": "a, later"}), make_session(number=2)])
    )
    assert outcomes[SID].check(StorageFailure)
    assert outcomes[make_session(number=2)["session_id"]].saved_at  # another is written
    assert (await within_time_limit(b.read("alice", SID)))["session_state"] == {"by": "b"}


class _Jobs:
    """Stands in for the store's pool: records each job; the test fires its Deferred."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object, tuple, object]] = []

    def __call__(self, action, lane, function, *args):
        from twisted.internet import defer

        done = defer.Deferred()
        self.calls.append((action, lane, args, done))
        return done


def test_renewal_is_one_job_per_interval_for_every_lease_and_skips_while_one_runs():
    """The renewal schedule on a task.Clock: every interval one job renews all held
    leases (those written with their first row only once written); a turn that comes
    while the last renewal still runs is skipped; what the database did not renew is
    reported lost; a lease not confirmed for two intervals is asked for again."""
    from twisted.internet import task

    from stui_twisted.storage.pg_leases import LeaseKeeper

    clock, jobs, lost = task.Clock(), _Jobs(), []
    keeper = LeaseKeeper(jobs, node_id="a", advertise=None, interval=5.0, clock=clock)
    keeper.on_lost = lost.extend
    keeper.claim_new("s_1")
    keeper.claim_new("s_2")
    keeper.written(["s_1", "s_2"])
    keeper.claim_new("s_3")  # not written yet: no row to renew
    keeper.start()
    clock.advance(5.0)
    assert [call[0] for call in jobs.calls] == ["renew the leases"]
    clock.advance(5.0)  # the first renewal still runs: this turn is skipped
    assert len(jobs.calls) == 1
    jobs.calls[0][3].callback({"s_1"})  # the database renewed s_1 only
    assert lost == ["s_2"] and keeper.holds("s_1") and not keeper.holds("s_2")
    assert keeper.holds("s_3")

    # s_1 was confirmed at t=5; at t=14 (within 2 intervals) it is trusted as held
    clock.advance(4.0)
    assert keeper.acquire("s_1").result is True
    assert len(jobs.calls) == 1
    keeper.stop_renewing()  # no more renewals: after 2 intervals, the database decides
    clock.advance(2.0)
    asked = keeper.acquire("s_1")
    assert [call[0] for call in jobs.calls[1:]] == ["take a lease"]
    jobs.calls[-1][3].callback(("own", "a", None))
    assert asked.result is True  # held here all along: what is in memory is current
    assert keeper.statistics() == {"leases_held": 2, "lease_takeovers": 0}
