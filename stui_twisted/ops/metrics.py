"""Prometheus metrics over HTTP: C{--metrics=ENDPOINT} serves C{GET /metrics}.

What is measured, and where it comes from:

- C{stui_requests_total{command,status}} and
  C{stui_request_duration_seconds{command}} (histogram): one observation per
  reply, through L{Dispatcher.addObserver}.  C{status} is C{success} or
  the reply's C{error_type}; requests that named no known command count as
  command C{?} (so a client cannot grow the label set).
- Sessions by state, connections by transport, uptime, the image's state and
  restarts, and the store's counters are read from the running
  L{stui_twisted.sessions.service.SessionService} at scrape time by
  L{ServerCollector}; nothing is copied ahead of time.
- C{stui_storage_flush_duration_seconds{kind}} (histogram): how long each
  durable write took, C{kind="batch"} for a group flush (C{write_many}) and
  C{kind="single"} for one session (C{always} durability, C{save_context},
  C{close_session}), from the store's write observer hook
  (C{SessionStore.addWriteObserver}; L{time_store_writes}).
- With C{--store=postgresql:...}: the pool (C{stui_storage_pool_size},
  C{stui_storage_pool_in_use}), C{stui_storage_transaction_duration_seconds}
  (histogram: the latency of each committed transaction, from the store's
  C{addTransactionObserver}), leases held and C{stui_storage_lease_takeovers}
  (sessions taken over from a node whose lease ran out).
- C{process_*}: CPU, memory and file descriptors of the server process.

Each server has its own L{CollectorRegistry}, never the global one, so
tests can run several servers in one process.

The page is rendered on the reactor thread (L{MetricsPage}), not in a
thread pool as C{prometheus_client.twisted.MetricsResource} would: the
collector reads session and connection tables that only the reactor thread
may touch, and rendering a few hundred samples takes well under a
millisecond.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from twisted.web.resource import Resource
from twisted.web.server import Site

from stui_twisted import PROTOCOL_VERSION, __version__
from stui_twisted.protocol.envelope import parse_iso_timestamp

__all__ = [
    "LATENCY_BUCKETS",
    "MetricsPage",
    "RequestMetrics",
    "ServerCollector",
    "build_registry",
    "time_store_writes",
]

#: Request latency buckets (s): fast commands land in the first few, evaluations
#: may run up to the 600 s maximum time limit.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    600.0,
)

#: Durable write buckets (s): an fsync'd write takes a millisecond to a second, so
#: the request buckets up to 10 s.
FLUSH_BUCKETS = LATENCY_BUCKETS[: LATENCY_BUCKETS.index(10.0) + 1]

SESSION_STATES = ("active", "expired", "closed")
TRANSPORTS = ("tcp", "tls", "zmq")


class RequestMetrics:
    """Counts every reply by command and status and times it by command.

    An instance is a dispatcher observer: C{dispatcher.addObserver(metrics)}.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "stui_requests",
            "Requests answered, by command and status (success or the error_type).",
            ("command", "status"),
            registry=registry,
        )
        self.latency = Histogram(
            "stui_request_duration_seconds",
            "Time from receiving a request to having its reply, by command.",
            ("command",),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def __call__(self, command: str, status: str, seconds: float) -> None:
        """Record one reply (the dispatcher's observer signature)."""
        self.requests.labels(command, status).inc()
        self.latency.labels(command).observe(seconds)


class ServerCollector:
    """Reads sessions, connections, storage and image state at scrape time.

    @param service: the running L{SessionService}.
    @param connections: the L{ConnectionRegistry} the transports fill; defaults
        to C{service.connections}.
    """

    def __init__(self, service: Any, connections: Any = None) -> None:
        self.service = service
        self.connections = connections if connections is not None else service.connections

    def collect(self):
        """Yield one family per metric (called by the registry while rendering)."""
        yield from self._build_info()
        yield from self._sessions()
        yield from self._connections()
        yield from self._storage()
        yield from self._image()
        yield CounterMetricFamily(
            "stui_config_reload_errors",
            "Plan reloads (SIGHUP, or a changed --config file) that failed and kept the plans.",
            value=self.service.plans.reload_errors,
        )

    def _build_info(self):
        info = GaugeMetricFamily(
            "stui_build_info",
            "Always 1; the labels say which server and protocol version runs.",
            labels=("version", "protocol_version"),
        )
        info.add_metric((__version__, PROTOCOL_VERSION), 1)
        yield info
        yield GaugeMetricFamily(
            "stui_uptime_seconds",
            "Seconds since the session service started.",
            value=self.service.uptime(),
        )

    def _sessions(self):
        now = self.service.now()
        counts = dict.fromkeys(SESSION_STATES, 0)
        clients = set()
        for session in list(self.service.sessions.values()):
            if session.state == "closed":
                counts["closed"] += 1
            elif session.is_expired(now):
                counts["expired"] += 1
            else:
                counts["active"] += 1
                clients.add(session.client_id)
        sessions = GaugeMetricFamily(
            "stui_sessions",
            "Sessions the server knows (in memory or on disk only), by state.",
            labels=("state",),
        )
        for state in SESSION_STATES:
            sessions.add_metric((state,), counts[state])
        yield sessions
        yield GaugeMetricFamily(
            "stui_active_clients",
            "Client ids with at least one active session.",
            value=len(clients),
        )

    def _connections(self):
        counts = dict.fromkeys(TRANSPORTS, 0)
        for connection in self.connections:
            context = getattr(connection, "context", None)
            transport = getattr(context, "transport", None) or "unknown"
            counts[transport] = counts.get(transport, 0) + 1
        family = GaugeMetricFamily(
            "stui_connections",
            "Open TCP/TLS connections, and ZeroMQ peers seen in the last 24 h, by transport.",
            labels=("transport",),
        )
        for transport, count in sorted(counts.items()):
            family.add_metric((transport,), count)
        yield family

    def _storage(self):
        statistics = self.service.store.statistics()
        yield GaugeMetricFamily(
            "stui_storage_files",
            "Session files the store knows of.",
            value=statistics.get("files", 0),
        )
        yield GaugeMetricFamily(
            "stui_storage_bytes",
            "Bytes in those session files.",
            value=statistics.get("bytes", 0),
        )
        yield GaugeMetricFamily(
            "stui_storage_pending_writes",
            "Writes queued or running in the store.",
            value=statistics.get("pending_writes", 0),
        )
        yield CounterMetricFamily(
            "stui_storage_write_errors",
            "Session, shared or index writes that failed since start.",
            value=statistics.get("write_errors", 0),
        )
        yield CounterMetricFamily(
            "stui_storage_quarantined",
            "Unreadable files moved to DATA/quarantine since start.",
            value=statistics.get("quarantined", 0),
        )
        if "journals_on_disk" in statistics:  # the file store's group journal
            yield GaugeMetricFamily(
                "stui_storage_journal_records_pending",
                "Sessions written only to a group journal so far (durable, not yet compacted).",
                value=statistics["journal_records_pending"],
            )
            yield GaugeMetricFamily(
                "stui_storage_journals_on_disk",
                "Group journal files in DATA/journal not yet compacted.",
                value=statistics["journals_on_disk"],
            )
        if "pool_size" in statistics:  # the PostgreSQL store's connection pool
            yield GaugeMetricFamily(
                "stui_storage_pool_size",
                "Database connections (threads) the PostgreSQL store may use.",
                value=statistics["pool_size"],
            )
            yield GaugeMetricFamily(
                "stui_storage_pool_in_use",
                "Database transactions running in the PostgreSQL store now (at most the pool size).",
                value=statistics.get("pool_in_use", 0),
            )
            yield CounterMetricFamily(
                "stui_storage_transactions",
                "Database transactions the PostgreSQL store committed since start.",
                value=statistics.get("transactions", 0),
            )
            yield CounterMetricFamily(
                "stui_storage_transaction_seconds",
                "Time spent in those transactions (s).",
                value=statistics.get("transaction_seconds", 0.0),
            )
            yield GaugeMetricFamily(
                "stui_storage_leases_held",
                "Sessions this node holds the lease of (serves) now.",
                value=statistics.get("leases_held", 0),
            )
            yield CounterMetricFamily(
                "stui_storage_lease_takeovers",
                "Sessions this node took over from a node whose lease had run out, since start.",
                value=statistics.get("lease_takeovers", 0),
            )
        last_flush = statistics.get("last_flush_at")
        if last_flush:
            try:
                stamp = parse_iso_timestamp(last_flush)
            except ValueError:
                return
            yield GaugeMetricFamily(
                "stui_storage_last_flush_timestamp_seconds",
                "When the store last finished a durable write (Unix time).",
                value=stamp,
            )

    def _image(self):
        status = self.service.image_status() or {}
        yield GaugeMetricFamily(
            "stui_image_up",
            "1 when the live image process is running, else 0.",
            value=1 if status.get("status") == "running" else 0,
        )
        yield CounterMetricFamily(
            "stui_image_restarts",
            "Times the image process died and was started again.",
            value=status.get("restarts") or 0,
        )


def time_store_writes(store: Any, histogram: Histogram) -> None:
    """Time each C{store.write} and C{store.write_many} into C{histogram}.

    Through the store's write observer hook (C{kind} is the label: C{single}
    or C{batch}); the store itself is not changed.
    """
    children = {kind: histogram.labels(kind) for kind in ("single", "batch")}

    def observe(kind: str, seconds: float, ok: bool) -> None:
        children[kind].observe(seconds)

    store.addWriteObserver(observe)


def build_registry(service: Any, dispatcher: Any, connections: Any = None) -> CollectorRegistry:
    """A fresh registry with every stui metric, hooked into C{dispatcher} and the store."""
    registry = CollectorRegistry(auto_describe=True)
    dispatcher.addObserver(RequestMetrics(registry))
    flushes = Histogram(
        "stui_storage_flush_duration_seconds",
        "Durable writes: kind=batch is one group flush, kind=single one session.",
        ("kind",),
        buckets=FLUSH_BUCKETS,
        registry=registry,
    )
    flushes.labels("batch")
    flushes.labels("single")
    time_store_writes(service.store, flushes)
    observe_transactions = getattr(service.store, "addTransactionObserver", None)
    if observe_transactions is not None:  # the PostgreSQL store
        transactions = Histogram(
            "stui_storage_transaction_duration_seconds",
            "Database transactions of the PostgreSQL store, from start to commit.",
            buckets=FLUSH_BUCKETS,
            registry=registry,
        )
        observe_transactions(transactions.observe)
    registry.register(ServerCollector(service, connections))
    ProcessCollector(registry=registry)
    return registry


class MetricsPage(Resource):
    """C{GET /metrics}: the registry in the format the scraper asks for."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request) -> bytes:  # noqa: N802
        """Prometheus text (or OpenMetrics when the Accept header asks for it)."""
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        encoder, content_type = choose_encoder(accept)
        request.setHeader(b"content-type", content_type.encode("latin-1"))
        return encoder(self.registry)

    render_HEAD = render_GET  # noqa: N815


class _Index(Resource):
    """C{GET /}: a pointer to C{/metrics}, for a person with a browser."""

    def getChild(self, path: bytes, request):  # noqa: N802
        """C{/} itself is this resource; other unknown paths are 404."""
        if path == b"":
            return self
        return super().getChild(path, request)

    def render_GET(self, request) -> bytes:  # noqa: N802
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"stui-twisted metrics: GET /metrics\n"


class MetricsSite(Site):
    """The HTTP factory of the metrics listener, without per-scrape access log lines."""

    noisy = False

    def log(self, request) -> None:
        """Scrapes come every few seconds; logging each would flood the server log."""


def metrics_site(registry: CollectorRegistry) -> MetricsSite:
    """The site serving C{/metrics} (and a hint at C{/})."""
    root = _Index()
    root.putChild(b"metrics", MetricsPage(registry))
    return MetricsSite(root)
