"""Shared pytest configuration.

Timeouts: a hang is one failing test, never a hung run
------------------------------------------------------

pytest-twisted runs the reactor in a greenlet and runs *every* test function
(and every async fixture, and every ``pytest_twisted.blockon``) inside it,
while the main greenlet waits in ``blockon_default``.  A test whose Deferred
never fires leaves the reactor idle in ``epoll``; pytest-timeout's SIGALRM
(and Ctrl-C's KeyboardInterrupt) is then raised inside the reactor's main
loop, which logs and swallows every exception, so the test hung on and the
run never ended.

So the deadline is kept by the reactor itself: :func:`_bounded_blockon`
replaces ``pytest_twisted.blockon_default`` and gives each wait the test's
timeout (its ``@pytest.mark.timeout`` or :data:`DEFAULT_TIMEOUT`).  When it
passes, that wait fails with :class:`TestTimedOut` (the test fails, or its
fixture errors), the test's Deferred is cancelled so its work stops, and the
reactor goes on with the next test.  Ctrl-C while the reactor waits ends the
wait with KeyboardInterrupt in the main greenlet, where pytest handles it.

pytest-timeout (signal method) stays as a backstop, for a reactor that is
itself stuck in blocking code: for tests marked with pytest-twisted (whose
bodies await) it fires :data:`BACKSTOP_GRACE` seconds after the deadline; for
plain test functions it fires at the deadline, raising inside the blocked
test code (the test then fails normally).
``tests/unit/test_conftest_timeouts.py`` runs pytest on a hanging test file to
show a hang fails in bounded time and the next test still passes.
"""

import gc
import os
import signal

import greenlet
import pytest
import pytest_twisted
from hypothesis import settings
from twisted.internet import defer
from twisted.python.failure import Failure

# The suite must give the same verdict on every run: property tests use a fixed
# sequence of examples unless STUI_HYPOTHESIS_EXPLORE=1 asks for fresh ones
# (do that when hunting bugs, then pin what it finds as an explicit test).
settings.register_profile("deterministic", derandomize=True, database=None)
settings.register_profile("explore")
settings.load_profile(
    "explore" if os.environ.get("STUI_HYPOTHESIS_EXPLORE") == "1" else "deterministic"
)

DEFAULT_TIMEOUT = 120.0
BACKSTOP_GRACE = 30.0


class TestTimedOut(Exception):
    """A test (or one of its fixtures) waited on the reactor past its timeout."""

    __test__ = False  # not a test class, whatever its name


_deadline = {"seconds": DEFAULT_TIMEOUT, "test": "?"}
_waiting: list[defer.Deferred] = []  # the Deferred the main greenlet waits on now
_original_blockon_default = pytest_twisted.blockon_default


def _bounded_blockon(d: defer.Deferred):
    """C{pytest_twisted.blockon_default}, but the wait ends at the test's deadline."""
    _install_sigint_handler()
    reactor = pytest_twisted._instances.reactor
    seconds = _deadline["seconds"]
    done: defer.Deferred = defer.Deferred()
    expired = []

    def settle(result):
        if timer.active():
            timer.cancel()
        if not expired and not done.called:
            if isinstance(result, Failure):
                done.errback(result)
            else:
                done.callback(result)
        return None  # a late result (after the deadline) is dropped, not "unhandled"

    def expire():
        expired.append(True)
        # Cancel first: firing `done` switches to the main greenlet at once, and
        # the hung test's work must stop before the next test starts.
        d.cancel()
        done.errback(
            Failure(
                TestTimedOut(
                    f"{_deadline['test']} did not finish within {seconds:g} s "
                    "(its timeout marker, or the default in tests/conftest.py); its "
                    "Deferred was cancelled and the reactor goes on with the next test"
                )
            )
        )

    timer = reactor.callLater(seconds, expire)
    d.addBoth(settle)
    _waiting.append(done)
    try:
        return _original_blockon_default(done)
    finally:
        _waiting.remove(done)


pytest_twisted.blockon_default = _bounded_blockon  # blockon and async fixtures call it too


def _on_sigint(signum, frame):
    if greenlet.getcurrent() is pytest_twisted._instances.gr_twisted and _waiting:
        # Raised here, the reactor's main loop would log and swallow it: end
        # the wait instead, so KeyboardInterrupt is raised in the main greenlet.
        waiting = _waiting[-1]

        def interrupt():
            if not waiting.called:
                waiting.errback(Failure(KeyboardInterrupt()))

        pytest_twisted._instances.reactor.callFromThread(interrupt)
        return
    raise KeyboardInterrupt


def _install_sigint_handler() -> None:
    if signal.getsignal(signal.SIGINT) is not _on_sigint:
        signal.signal(signal.SIGINT, _on_sigint)


def _timeout_of(item) -> float:
    marker = item.get_closest_marker("timeout")
    if marker is None:
        return DEFAULT_TIMEOUT
    return float(marker.kwargs.get("timeout", marker.args[0] if marker.args else DEFAULT_TIMEOUT))


def pytest_collection_modifyitems(items):
    for item in items:
        seconds = _timeout_of(item)
        item.stash[_deadline_key] = seconds
        awaits = pytest_twisted._get_mark(getattr(item, "obj", None)) is not None
        backstop = seconds + BACKSTOP_GRACE if awaits else seconds
        # Prepended, so pytest-timeout reads this one before the test's own marker.
        item.add_marker(pytest.mark.timeout(backstop), append=False)


_deadline_key = pytest.StashKey[float]()


def pytest_collection_finish(session):
    """What import and collection made lives until the run ends: out of the collector's way.

    Every full collection of the test process would otherwise walk it again (tens of
    thousands of objects: modules, test items, hypothesis strategies); frozen, gen-2
    collection time of test_hostile + test_passwd + test_service fell from 5.6 s to 4.2 s.
    """
    gc.collect()
    gc.freeze()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _deadline["seconds"] = item.stash.get(_deadline_key, DEFAULT_TIMEOUT)
    _deadline["test"] = item.nodeid
    try:
        return (yield)
    finally:
        _deadline["seconds"], _deadline["test"] = DEFAULT_TIMEOUT, "?"


# -- shared fixtures ----------------------------------------------------------


@pytest.fixture
def start_server():
    """Start a real C{twistd -n stui} (L{tests.serverproc.ServerProcess}); always stopped.

    C{start_server(workdir, *flags, **options)} returns the started server.
    Every server it started is killed when the test ends, whatever happened
    (a restart with C{server.stop()} / C{server.start()} inside the test is fine).
    """
    from tests.serverproc import ServerProcess

    started: list[ServerProcess] = []

    def start(workdir, *flags, **options):
        server = ServerProcess(workdir, *flags, **options)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.kill()


@pytest.fixture
def sync_pool():
    """A thread pool stand-in that runs work at once, in the calling thread."""
    from tests.helpers import SyncPool

    return SyncPool()


@pytest.fixture
def auth_file(tmp_path):
    """C{auth_file(alice="secret", ...)}: the path of a password file with those users."""
    from tests.helpers import write_users

    def write(path=None, **users):
        path = path or tmp_path / "users"
        write_users(path, **users)
        return path

    return write


@pytest.fixture(scope="session")
def pg_cluster():
    """A throwaway PostgreSQL cluster (tests/pgcluster.py), started once per test session.

    Without PostgreSQL the tests that use it skip with the reason, except when
    C{CI} or C{STUI_REQUIRE_POSTGRES} is set: CI must not skip them.
    """
    from tests.pgcluster import PgCluster, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        if os.environ.get("CI") or os.environ.get("STUI_REQUIRE_POSTGRES"):
            pytest.fail(f"PostgreSQL is required here: {reason}")
        pytest.skip(reason)
    cluster = PgCluster()
    cluster.start()
    yield cluster
    cluster.stop()


_pg_databases = 0


@pytest.fixture
def pg_dsn(pg_cluster, request):
    """The DSN of a fresh database in the test session's cluster."""
    import re

    global _pg_databases
    _pg_databases += 1
    name = "t_" + re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:40]
    return pg_cluster.create_database(f"{name}_{_pg_databases}")  # < 63 characters
