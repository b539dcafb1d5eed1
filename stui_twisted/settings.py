"""Server settings: every configurable limit and option, with the embedded defaults.

One immutable L{Settings} object is built by C{tap.Options} (defaults <
C{--config} INI file < command-line flags) and handed to every component, so a
component never reads the command line or the environment itself.
"""

from __future__ import annotations

import dataclasses
import functools
import socket
from dataclasses import dataclass, field

from stui_twisted.protocol.envelope import whole_seconds

MiB = 1024 * 1024

DURABILITY_POLICIES = ("always", "batch", "none")


@dataclass(frozen=True)
class Settings:
    """All tunables of one server instance (docs/protocol.md section 7, docs/operations.md section 3)."""

    # listeners
    tcp: str = "tcp:7555:interface=127.0.0.1"
    tls: str = "none"
    zmq: str = "tcp://127.0.0.1:5555"
    metrics: str = "none"
    # storage
    data_dir: str = "./stui-data"
    store: str = "file"
    """C{file} (sessions under data_dir) or C{postgresql:DSN}; C{--store=file:DIR} sets data_dir."""
    secret_file: str | None = None
    """The MAC key's file (default: data_dir/secret.key)."""
    node_id: str | None = None
    """This node's name (default: the hostname); the shared namespace is stored per node id."""
    advertise: str | None = None
    """C{HOST:PORT} clients should use for this node (C{ping.node}, C{SessionElsewhere})."""
    lease_interval: float = 5.0
    """Seconds between lease renewals; a lease runs out after three without one."""
    durability: str = "batch"
    flush_interval: float = 0.1
    retention_days: float = 30.0
    # sessions
    default_timeout: float = 3600.0
    max_timeout: float = 7 * 24 * 3600.0
    cleanup_interval: float = 300.0
    max_sessions_per_client: int = 5
    max_sessions_total: int = 100_000
    max_session_bytes: int = 8 * MiB
    event_log_limit: int = 1000
    event_log_bytes: int = 4 * MiB
    event_pending_events: int = 1000
    event_pending_bytes: int = 8 * MiB
    history_limit: int = 100
    create_rate_limit: int = 10
    create_rate_window: float = 60.0
    allow_clients: tuple[str, ...] = ()
    deny_clients: tuple[str, ...] = ()
    # evaluation
    eval_timeout: float = 30.0
    max_eval_timeout: float = 600.0
    # transport limits
    max_message_bytes: int = 8 * MiB
    max_connections: int = 1000
    max_pending_per_connection: int = 64
    max_partial_input_bytes: int = 256 * MiB
    connection_idle_timeout: float = 600.0
    # security
    auth_file: str | None = None
    insecure_no_auth: bool = False
    token_ttl: float = 24 * 3600.0
    unauthenticated_idle_timeout: float = 60.0
    auth_failures_per_peer: int = 10
    auth_failures_per_user: int = 10
    auth_failure_window: float = 300.0
    # image
    image_enabled: bool = True
    image_python: str | None = None
    """The interpreter that runs the image (default: the server's own)."""
    image_user: str | None = None
    """Run the image as this OS user (privilege separation; the server needs root)."""
    capabilities: tuple[str, ...] = field(
        default=(
            "sessions",
            "persistence",
            "evaluate",
            "inspect",
            "complete",
            "interrupt",
            "shared_namespace",
            "browse",
        )
    )

    def replace(self, **changes) -> Settings:
        """A copy with C{changes} applied (dataclass fields only)."""
        return dataclasses.replace(self, **changes)

    def limits(self) -> dict:
        """The limits a client may see (C{describe})."""
        return {
            "max_message_bytes": self.max_message_bytes,
            "max_session_bytes": self.max_session_bytes,
            "event_log_limit": self.event_log_limit,
            "event_log_bytes": self.event_log_bytes,
            "event_pending_events": self.event_pending_events,
            "event_pending_bytes": self.event_pending_bytes,
            "max_sessions_per_client": self.max_sessions_per_client,
            "max_sessions_total": self.max_sessions_total,
            "default_timeout": whole_seconds(self.default_timeout),
            "max_timeout": whole_seconds(self.max_timeout),
            "cleanup_interval": whole_seconds(self.cleanup_interval),
            "retention_days": self.retention_days,
            "history_limit": self.history_limit,
            "create_session_rate": {
                "count": self.create_rate_limit,
                "window": self.create_rate_window,
            },
            "eval_timeout": self.eval_timeout,
            "max_eval_timeout": self.max_eval_timeout,
            "durability": self.durability,
            "flush_interval": self.flush_interval,
        }


def node_id_of(settings: Settings) -> str:
    """This node's id: C{--node-id}, else the hostname (read once: C{ping} shows it every time)."""
    return settings.node_id or _hostname()


@functools.cache
def _hostname() -> str:
    """The hostname when it was first asked for: a node keeps its id while it runs."""
    return socket.gethostname()
