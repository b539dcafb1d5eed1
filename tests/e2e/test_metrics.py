"""--metrics: Prometheus exposition, from the collector up to a real twistd scrape."""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request

import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest

from stui_twisted.access.plans import PlanBook
from stui_twisted.dispatch.interfaces import ConnectionContext
from stui_twisted.ops.metrics import (
    MetricsPage,
    RequestMetrics,
    ServerCollector,
    metrics_site,
    time_store_writes,
)
from stui_twisted.sessions.model import Session
from stui_twisted.settings import Settings
from stui_twisted.storage.store import SessionStore
from stui_twisted.tap import Options
from stui_twisted.transports.connections import ConnectionRegistry
from tests.serverproc import ServerProcess

NOW = 1_800_000_000.0


# ------------------------------------------------------------------ fakes


class FakeStore:
    def __init__(self, **statistics) -> None:
        self._statistics = {
            "files": 0,
            "bytes": 0,
            "pending_writes": 0,
            "last_flush_at": None,
            "write_errors": 0,
            "quarantined": 0,
        }
        self._statistics.update(statistics)
        self.pending: list[defer.Deferred] = []
        self.observers: list = []

    def statistics(self) -> dict:
        return dict(self._statistics)

    def addWriteObserver(self, observer) -> None:  # noqa: N802
        self.observers.append(observer)

    def _observed(self, kind: str, written: defer.Deferred) -> defer.Deferred:
        def finished(result):
            for observer in self.observers:
                observer(kind, 0.001, not isinstance(result, Failure))
            return result

        return written.addBoth(finished)

    def write(self, document):
        self.pending.append(defer.Deferred())
        return self._observed("single", self.pending[-1])

    def write_many(self, documents):
        return self._observed("batch", defer.succeed({}))


class FakeService:
    def __init__(self, sessions=(), image=None, **store_statistics) -> None:
        self.sessions = {s.session_id: s for s in sessions}
        self.store = FakeStore(**store_statistics)
        self.connections = ConnectionRegistry(10)
        self._image = image
        self.plans = PlanBook(Settings())

    def now(self) -> float:
        return NOW

    def uptime(self) -> float:
        return 12.5

    def image_status(self) -> dict:
        if self._image is None:
            return {"status": "disabled", "pid": None, "started_at": None}
        return self._image


def session(number: int, client: str, state: str = "active", idle: float = 0.0) -> Session:
    return Session(
        session_id=f"s_{number:022d}",
        client_id=client,
        created_at=NOW - 100,
        timeout=60.0,
        last_activity=NOW - idle,
        last_modified=NOW - idle,
        state=state,
    )


class FakeConnection:
    def __init__(self, transport: str) -> None:
        self.context = ConnectionContext(transport=transport, peer="test")


def registry_with(service, connections=None) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(ServerCollector(service, connections))
    return registry


# ------------------------------------------------------------------ units


def test_request_metrics_count_and_time_by_command_and_status():
    registry = CollectorRegistry()
    observe = RequestMetrics(registry)
    observe("ping", "success", 0.001)
    observe("ping", "success", 0.002)
    observe("evaluate", "EvaluationError", 1.5)
    value = registry.get_sample_value
    assert value("stui_requests_total", {"command": "ping", "status": "success"}) == 2
    assert value("stui_requests_total", {"command": "evaluate", "status": "EvaluationError"}) == 1
    assert value("stui_request_duration_seconds_count", {"command": "ping"}) == 2
    assert value("stui_request_duration_seconds_bucket", {"command": "evaluate", "le": "1.0"}) == 0
    assert value("stui_request_duration_seconds_bucket", {"command": "evaluate", "le": "2.5"}) == 1


def test_collector_reads_sessions_storage_and_image_at_scrape_time():
    service = FakeService(
        [
            session(1, "alice"),
            session(2, "alice", idle=3600),  # idle past its timeout: expired
            session(3, "bob", state="closed"),
            session(4, "carol", state="expired"),
            session(5, "dave"),
        ],
        image={"status": "running", "pid": 7, "started_at": None, "restarts": 3},
        files=4,
        bytes=4096,
        pending_writes=2,
        write_errors=5,
        quarantined=1,
        last_flush_at="2027-01-15T08:00:00.000Z",
        journal_records_pending=200,
        journals_on_disk=1,
    )
    registry = registry_with(service)
    value = registry.get_sample_value
    assert value("stui_sessions", {"state": "active"}) == 2
    assert value("stui_sessions", {"state": "expired"}) == 2
    assert value("stui_sessions", {"state": "closed"}) == 1
    assert value("stui_active_clients") == 2
    assert value("stui_storage_files") == 4
    assert value("stui_storage_bytes") == 4096
    assert value("stui_storage_pending_writes") == 2
    assert value("stui_storage_write_errors_total") == 5
    assert value("stui_storage_quarantined_total") == 1
    assert value("stui_storage_journal_records_pending") == 200
    assert value("stui_storage_journals_on_disk") == 1
    assert value("stui_storage_last_flush_timestamp_seconds") == 1800000000.0
    assert value("stui_image_up") == 1
    assert value("stui_image_restarts_total") == 3
    assert value("stui_uptime_seconds") == 12.5

    # Read again at the next scrape, not copied: changes show at once.
    service.sessions.pop("s_0000000000000000000005")
    service._image = {"status": "restarting", "restarts": 4}
    assert value("stui_sessions", {"state": "active"}) == 1
    assert value("stui_image_up") == 0
    assert value("stui_image_restarts_total") == 4
    assert value("stui_config_reload_errors_total") == 0
    service.plans.reload_errors = 2
    assert value("stui_config_reload_errors_total") == 2


def test_collector_counts_connections_by_transport_from_the_given_registry():
    service = FakeService()
    connections = ConnectionRegistry(10)
    for transport in ("tcp", "tcp", "zmq"):
        connections.opened(FakeConnection(transport))
    registry = registry_with(service, connections)
    value = registry.get_sample_value
    assert value("stui_connections", {"transport": "tcp"}) == 2
    assert value("stui_connections", {"transport": "tls"}) == 0
    assert value("stui_connections", {"transport": "zmq"}) == 1
    # Without one, the service's own registry is read.
    assert registry_with(service).get_sample_value("stui_connections", {"transport": "tcp"}) == 0


def test_image_disabled_reads_as_down_with_no_restarts():
    registry = registry_with(FakeService())
    assert registry.get_sample_value("stui_image_up") == 0
    assert registry.get_sample_value("stui_image_restarts_total") == 0


def test_store_writes_are_timed_when_they_finish():
    store = FakeStore()
    registry = CollectorRegistry()
    histogram = Histogram("t_flush_seconds", "test", ("kind",), registry=registry)
    time_store_writes(store, histogram)
    written = store.write({"session_id": "x"})
    count = registry.get_sample_value
    assert count("t_flush_seconds_count", {"kind": "single"}) == 0
    store.pending[-1].callback("done")
    assert written.result == "done"
    assert count("t_flush_seconds_count", {"kind": "single"}) == 1
    store.write_many([])
    assert count("t_flush_seconds_count", {"kind": "batch"}) == 1
    # Failures are timed too and still reach the caller.
    failing = store.write({})
    store.pending[-1].errback(RuntimeError("disk full"))
    assert count("t_flush_seconds_count", {"kind": "single"}) == 2
    with pytest.raises(RuntimeError):
        failing.result.raiseException()
    failing.addErrback(lambda _: None)


@pytest_twisted.ensureDeferred
async def test_metrics_observe_a_real_store_through_its_hook_without_replacing_methods(
    tmp_path,
):
    from twisted.internet import reactor

    store = SessionStore(tmp_path / "data", reactor=reactor)
    await store.open()
    try:
        registry = CollectorRegistry()
        histogram = Histogram("t_flush_seconds", "test", ("kind",), registry=registry)
        time_store_writes(store, histogram)
        assert "write" not in vars(store) and "write_many" not in vars(store)
        document = {"session_id": "s_" + "a" * 22, "client_id": "alice"}
        await store.write(document)
        await store.write_many([document, dict(document, session_id="s_" + "b" * 22)])
        count = registry.get_sample_value
        assert count("t_flush_seconds_count", {"kind": "single"}) == 1
        assert count("t_flush_seconds_count", {"kind": "batch"}) == 1
        assert count("t_flush_seconds_sum", {"kind": "single"}) > 0
    finally:
        await store.close()


def test_metrics_do_not_import_the_service_tree():
    """tap builds the tree and imports metrics; metrics never imports tap back."""
    import ast
    import inspect

    import stui_twisted.ops.metrics as metrics

    tree = ast.parse(inspect.getsource(metrics))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    assert not {name for name in imported if name and name.startswith("stui_twisted.tap")}


def test_page_negotiates_prometheus_text_or_openmetrics():
    registry = CollectorRegistry()
    RequestMetrics(registry)("ping", "success", 0.001)
    page = MetricsPage(registry)

    plain = DummyRequest([b"metrics"])
    body = page.render_GET(plain)
    assert plain.responseHeaders.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    assert b'stui_requests_total{command="ping",status="success"} 1.0' in body

    openmetrics = DummyRequest([b"metrics"])
    openmetrics.requestHeaders.setRawHeaders(b"accept", [b"application/openmetrics-text"])
    body = page.render_GET(openmetrics)
    content_type = openmetrics.responseHeaders.getRawHeaders(b"content-type")[0]
    assert content_type.startswith(b"application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


def test_site_serves_metrics_under_slash_metrics():
    site = metrics_site(CollectorRegistry())
    assert isinstance(site.resource.children[b"metrics"], MetricsPage)


@pytest.mark.parametrize(
    "description", ["tcp:0", "tcp:0:interface=0.0.0.0", "ssl:0:interface=127.0.0.1"]
)
def test_metrics_listener_must_be_loopback_tcp(description):
    with pytest.raises(usage.UsageError, match="--metrics"):
        Options().parseOptions([f"--metrics={description}"])


# ------------------------------------------------------------------ a real server


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of one scrape: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def sample(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.mark.e2e
def test_real_server_metrics_move_under_load(tmp_path):
    server = ServerProcess(tmp_path, "--metrics=tcp:0:interface=127.0.0.1", image=False)
    with server:
        found = re.search(r"metrics listening on 127\.0\.0\.1:(\d+)", server.log_text())
        assert found, server.log_text()
        port = int(found.group(1))

        before = scrape(port)
        assert sample(before, "stui_sessions", state="active") == 0
        assert (
            sample(
                before, "stui_build_info", version=sample_version(before), protocol_version="1.0"
            )
            == 1
        )

        client = server.tcp_client()
        for _ in range(3):
            client.result("ping")
        client.result("create_session", client_id="metrics-test")
        assert client.call("no_such_command")["status"] == "error"
        assert client.call("restore_session", session_id="s_" + "A" * 22)["status"] == "error"

        deadline = time.monotonic() + 10
        while True:  # the batch flush writes the new session within flush_interval
            after = scrape(port)
            if sample(after, "stui_storage_files") >= 1 or time.monotonic() > deadline:
                break
            time.sleep(0.1)

        def moved(name, **labels):
            return sample(after, name, **labels) - sample(before, name, **labels)

        assert moved("stui_requests_total", command="ping", status="success") == 3
        assert moved("stui_requests_total", command="create_session", status="success") == 1
        assert moved("stui_requests_total", command="?", status="UnknownCommand") == 1
        assert (
            moved("stui_requests_total", command="restore_session", status="SessionNotFound") == 1
        )
        assert moved("stui_request_duration_seconds_count", command="ping") == 3
        assert sample(after, "stui_request_duration_seconds_bucket", command="ping", le="+Inf") == 3
        assert sample(after, "stui_sessions", state="active") == 1
        assert sample(after, "stui_active_clients") == 1
        assert sample(after, "stui_connections", transport="tcp") == 1
        assert sample(after, "stui_storage_files") >= 1
        assert sample(after, "stui_storage_bytes") > 0
        assert moved("stui_storage_flush_duration_seconds_count", kind="batch") >= 1
        assert sample(after, "stui_storage_write_errors_total") == 0
        assert sample(after, "stui_image_up") == 0  # started with --image=no
        assert sample(after, "stui_uptime_seconds") > 0
        assert sample(after, "process_resident_memory_bytes") > 0

        client.close()
        deadline = time.monotonic() + 10
        while sample(scrape(port), "stui_connections", transport="tcp") and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)
        assert sample(scrape(port), "stui_connections", transport="tcp") == 0

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as reply:
            assert b"/metrics" in reply.read()
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/nothing", timeout=10)
        assert missing.value.code == 404
        assert server.stop() == 0


def sample_version(samples) -> str:
    for (name, labels), _value in samples.items():
        if name == "stui_build_info":
            return dict(labels)["version"]
    raise AssertionError("no stui_build_info")
