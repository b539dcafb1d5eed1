"""Turning the command line and the INI file into one L{Settings}.

Precedence: embedded defaults < C{--config} INI file (section C{[stui]}) <
command-line flags.  Every value is checked here so a bad one stops the
server at start-up with a message naming the option, never later.
"""

from __future__ import annotations

import configparser
import dataclasses
import ipaddress
import re
from typing import Any

from stui_twisted.settings import DURABILITY_POLICIES, Settings


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the option."""


# option name (as on the command line) -> (Settings field, parser)
def _positive_float(name: str, text: Any) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ConfigError(f"--{name} must be a number, not {text!r}") from None
    if not value > 0:
        raise ConfigError(f"--{name} must be greater than 0, not {text!r}")
    return value


def _positive_int(name: str, text: Any) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise ConfigError(f"--{name} must be a whole number, not {text!r}") from None
    if value < 1:
        raise ConfigError(f"--{name} must be at least 1, not {text!r}")
    return value


def _string(name: str, text: Any) -> str:
    return str(text).strip()


def _optional_path(name: str, text: Any) -> str | None:
    text = str(text).strip()
    return None if text.lower() in ("", "none") else text


def _boolean(name: str, text: Any) -> bool:
    if isinstance(text, bool):
        return text
    lowered = str(text).strip().lower()
    if lowered in ("1", "yes", "true", "on"):
        return True
    if lowered in ("0", "no", "false", "off"):
        return False
    raise ConfigError(f"{name} must be yes or no, not {text!r}")


def _globs(name: str, text: Any) -> tuple[str, ...]:
    if isinstance(text, list | tuple):
        return tuple(text)
    return tuple(part for part in re.split(r"[,\s]+", str(text)) if part)


def shown_default(value: Any) -> str:
    """A default as a user would write it in the INI file or on the command line."""
    if isinstance(value, tuple):
        return ", ".join(value) if value else "(empty)"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "none"
    return str(value)


def _durability(name: str, text: Any) -> str:
    value = str(text).strip().lower()
    if value not in DURABILITY_POLICIES:
        raise ConfigError(f"--{name} must be one of {', '.join(DURABILITY_POLICIES)}, not {text!r}")
    return value


def _store(name: str, text: Any) -> str:
    """C{file:DIR} or C{postgresql:DSN} (C{postgres:} too); the DSN must parse."""
    value = str(text).strip()
    kind, colon, rest = value.partition(":")
    kind = kind.lower()
    if kind == "file" and colon and rest.strip():
        return f"file:{rest.strip()}"
    if kind == "file" and not colon:
        return "file"
    if kind in ("postgresql", "postgres") and colon:
        if rest.startswith("//"):  # postgresql://user@host/db: the URI is the DSN
            rest = value
        import psycopg

        try:
            psycopg.conninfo.conninfo_to_dict(rest)
        except psycopg.Error:  # the DSN is not echoed: it may hold a password
            raise ConfigError(
                f"--{name}: the PostgreSQL connection string does not parse"
                " (expected postgresql:host=... dbname=... or postgresql://...)"
            ) from None
        return f"postgresql:{rest}"
    raise ConfigError(f"--{name} must be file:DIR or postgresql:DSN, not {value!r}")


def _advertise(name: str, text: Any) -> str | None:
    """C{HOST:PORT} (C{[v6]:PORT} for an IPv6 address), or none."""
    value = str(text).strip()
    if value.lower() in ("", "none"):
        return None
    host, colon, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        inner = host[1:-1]
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            raise ConfigError(f"--{name}: {inner!r} is not an IPv6 address") from None
    elif not host or ":" in host or any(c.isspace() for c in host):
        raise ConfigError(f"--{name} must be HOST:PORT (or [IPv6]:PORT), not {value!r}")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--{name}: the port must be 1-65535, in HOST:PORT, not {value!r}")
    return value


def _image_user(name: str, text: Any) -> str | None:
    from stui_twisted.image.privileges import PrivilegeError, check_can_switch_to

    value = str(text).strip()
    if value.lower() in ("", "none"):
        return None
    try:
        check_can_switch_to(value)
    except PrivilegeError as exc:
        raise ConfigError(f"--{name}: {exc}") from None
    return value


OPTIONS: dict[str, tuple[str, Any, str]] = {
    # name: (Settings field, parser, help)
    "tcp": ("tcp", _string, "line-JSON TCP listener (strports description) or none"),
    "tls": (
        "tls",
        _string,
        "line-JSON TLS listener, e.g. ssl:7556:privateKey=k.pem:certKey=c.pem, or none",
    ),
    "zmq": ("zmq", _string, "ZeroMQ ROUTER bind URL, e.g. tcp://127.0.0.1:5555, or none"),
    "metrics": ("metrics", _string, "Prometheus /metrics HTTP listener (strports) or none"),
    "data-dir": ("data_dir", _string, "directory of session files"),
    "store": (
        "store",
        _store,
        "where sessions live: file:DIR (same as --data-dir) or postgresql:DSN",
    ),
    "secret-file": (
        "secret_file",
        _optional_path,
        "with --store=postgresql: the MAC key's file, outside the database (default: DATA/secret.key)",
    ),
    "node-id": ("node_id", _optional_path, "this node's id (default: the hostname)"),
    "advertise": (
        "advertise",
        _advertise,
        "HOST:PORT clients should use for this node (ping.node, SessionElsewhere), or none",
    ),
    "lease-interval": (
        "lease_interval",
        _positive_float,
        "with --store=postgresql: seconds between lease renewals (a lease runs out after 3)",
    ),
    "durability": ("durability", _durability, "always | batch | none"),
    "flush-interval": ("flush_interval", _positive_float, "seconds between batch flushes"),
    "retention-days": ("retention_days", _positive_float, "days to keep files of ended sessions"),
    "session-timeout": (
        "default_timeout",
        _positive_float,
        "default idle timeout of a session (s)",
    ),
    "max-session-timeout": (
        "max_timeout",
        _positive_float,
        "largest timeout a client may ask for (s)",
    ),
    "cleanup-interval": ("cleanup_interval", _positive_float, "seconds between cleanup runs"),
    "max-sessions-per-client": (
        "max_sessions_per_client",
        _positive_int,
        "active sessions per client",
    ),
    "max-sessions-total": (
        "max_sessions_total",
        _positive_int,
        "active sessions on the whole server",
    ),
    "max-session-bytes": ("max_session_bytes", _positive_int, "largest session file (bytes)"),
    "event-log-limit": ("event_log_limit", _positive_int, "events kept per session log"),
    "event-log-bytes": ("event_log_bytes", _positive_int, "bytes kept per session event log"),
    "event-pending-events": (
        "event_pending_events",
        _positive_int,
        "events waiting per subscribed connection before a 'dropped' marker",
    ),
    "event-pending-bytes": (
        "event_pending_bytes",
        _positive_int,
        "bytes of events waiting per subscribed connection before a 'dropped' marker",
    ),
    "max-message-bytes": ("max_message_bytes", _positive_int, "largest request line/frame (bytes)"),
    "max-connections": ("max_connections", _positive_int, "open TCP/TLS connections at most"),
    "max-partial-input-bytes": (
        "max_partial_input_bytes",
        _positive_int,
        "unfinished request lines of all TCP/TLS connections together (bytes)",
    ),
    "connection-idle-timeout": (
        "connection_idle_timeout",
        _positive_float,
        "close TCP/TLS connections without a request for (s)",
    ),
    "history-limit": ("history_limit", _positive_int, "evaluations kept per session"),
    "create-rate-limit": (
        "create_rate_limit",
        _positive_int,
        "create_session per client per window",
    ),
    "create-rate-window": ("create_rate_window", _positive_float, "rate-limit window (s)"),
    "eval-timeout": ("eval_timeout", _positive_float, "default evaluation time limit (s)"),
    "max-eval-timeout": ("max_eval_timeout", _positive_float, "largest evaluation time limit (s)"),
    "auth-file": ("auth_file", _optional_path, "password file (see stui-passwd); turns auth on"),
    "idle-timeout": (
        "unauthenticated_idle_timeout",
        _positive_float,
        "close unauthenticated idle connections after (s)",
    ),
    "token-ttl": ("token_ttl", _positive_float, "lifetime of an authenticate token (s)"),
    "auth-failures-per-peer": (
        "auth_failures_per_peer",
        _positive_int,
        "distinct usernames failing from one peer address per window",
    ),
    "auth-failures-per-user": (
        "auth_failures_per_user",
        _positive_int,
        "failed logins per username per window",
    ),
    "auth-failure-window": (
        "auth_failure_window",
        _positive_float,
        "sliding window of the failed-login limits (s)",
    ),
    "allow-clients": ("allow_clients", _globs, "client-id globs allowed (comma separated)"),
    "deny-clients": ("deny_clients", _globs, "client-id globs refused (comma separated)"),
    "image": ("image_enabled", _boolean, "run the live image (yes/no)"),
    "image-user": (
        "image_user",
        _image_user,
        "run the image as this OS user (the server must start as root); none: as the server's user",
    ),
    "image-python": (
        "image_python",
        _optional_path,
        "interpreter that runs the image (default: the server's)",
    ),
}


def read_ini(path: str) -> dict[str, str]:
    """The C{[stui]} section of an INI file, keys normalised to option names."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc.strerror}") from None
    except configparser.Error as exc:
        raise ConfigError(f"--config: {path} is not a valid INI file: {exc}") from None
    if not parser.has_section("stui"):
        raise ConfigError(f"--config: {path} has no [stui] section")
    values: dict[str, str] = {}
    for key, value in parser.items("stui"):
        name = key.strip().replace("_", "-")
        if name not in OPTIONS and name != "insecure-no-auth":
            raise ConfigError(f"--config: {path}: unknown option {key!r}")
        values[name] = value
    return values


def build_settings(
    file_values: dict[str, Any],
    flag_values: dict[str, Any],
    insecure: bool,
    source: str | None = None,
) -> Settings:
    """Merge defaults < file < flags into checked L{Settings}.

    @param source: the INI file's path; a bad value that came from it is
        reported with the file and its key.
    """
    changes: dict[str, Any] = {}
    flags = {k: v for k, v in flag_values.items() if v is not None}
    merged = {**file_values, **flags}
    for name, raw in merged.items():
        try:
            if name == "insecure-no-auth":
                insecure = insecure or _boolean(name, raw)
                continue
            field, parse, _ = OPTIONS[name]
            changes[field] = parse(name, raw)
        except ConfigError as exc:
            if name in flags or source is None:
                raise
            key = name.replace("-", "_")
            raise ConfigError(f"--config: {source}: {key} = {raw}: {exc}") from None
    changes["insecure_no_auth"] = insecure
    store = changes.get("store", "file")
    if store.startswith("file:"):  # --data-dir's alias
        directory = store[len("file:") :]
        if "data_dir" in changes and changes["data_dir"] != directory:
            raise ConfigError(
                f"--store={store} and --data-dir={changes['data_dir']} name different directories"
            )
        changes["data_dir"], changes["store"] = directory, "file"
    if changes.get("secret_file") and not changes.get("store", "file").startswith("postgresql:"):
        raise ConfigError(
            "--secret-file applies to --store=postgresql:DSN only (the file store keeps its"
            " key in DATA/secret.key)"
        )
    settings = dataclasses.replace(Settings(), **changes)
    check_listeners(settings)
    if settings.image_user:
        from stui_twisted.image.privileges import PrivilegeError, check_private, lookup

        try:
            check_private(settings.data_dir, lookup(settings.image_user))
        except PrivilegeError as exc:
            raise ConfigError(f"--image-user: {exc}") from None
    return settings


# -- listeners --------------------------------------------------------------


def split_description(description: str) -> list[str]:
    """Split a strports description on unescaped colons."""
    parts, current, escaped = [], [], False
    for char in description:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _is_loopback_host(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def endpoint_host(description: str) -> tuple[str, str | None]:
    """(kind, interface) of a strports server description; interface None = all."""
    parts = split_description(description)
    kind = parts[0].lower()
    if kind.isdigit():  # old style "7555"
        return "tcp", None
    for part in parts[1:]:
        if part.startswith("interface="):
            return kind, part[len("interface=") :]
    return kind, None


def listener_is_local(description: str) -> bool:
    """Whether a strports listener is reachable only from this machine."""
    kind, interface = endpoint_host(description)
    if kind in ("unix",):
        return True
    return interface is not None and _is_loopback_host(interface)


def zmq_is_local(url: str) -> bool:
    """Whether a ZeroMQ bind URL is reachable only from this machine."""
    scheme, _, rest = url.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    host = rest.rsplit(":", 1)[0]
    return _is_loopback_host(host)


def check_listeners(settings: Settings) -> None:
    """Refuse bad listener strings and non-loopback listeners without auth."""
    exposed = []
    for name in ("tcp", "tls", "metrics"):
        description = getattr(settings, name)
        if description.lower() == "none":
            continue
        kind, _ = endpoint_host(description)
        allowed = {"tcp", "tcp6", "unix"} | ({"ssl", "tls"} if name == "tls" else set())
        if kind not in allowed and not kind.isdigit():
            raise ConfigError(
                f"--{name}: {description!r} is not a listener description this option takes "
                f"(expected one of: {', '.join(sorted(allowed))}, or none)"
            )
        if name == "metrics":
            if not listener_is_local(description):
                raise ConfigError(
                    f"--metrics must listen on loopback only (add interface=127.0.0.1), not {description!r}"
                )
            continue
        if not listener_is_local(description):
            exposed.append(f"--{name}={description}")
    if settings.zmq.lower() != "none":
        scheme = settings.zmq.partition("://")[0]
        if scheme not in ("tcp", "ipc", "inproc") or "://" not in settings.zmq:
            raise ConfigError(
                f"--zmq: {settings.zmq!r} is not a ZeroMQ bind URL (tcp://HOST:PORT, ipc://PATH) or none"
            )
        if not zmq_is_local(settings.zmq):
            exposed.append(f"--zmq={settings.zmq}")
    if exposed and not settings.auth_file and not settings.insecure_no_auth:
        raise ConfigError(
            f"refusing to listen beyond loopback ({', '.join(exposed)}) without authentication: "
            "anyone who can connect could run code as this user. Give --auth-file=FILE "
            "(create it with stui-passwd), or bind to interface=127.0.0.1, or pass "
            "--insecure-no-auth if you really mean it"
        )
