"""C{stui-admin}: look after a data directory from the shell.

Usage (also C{python -m stui_twisted.ops.admin})::

    stui-admin [--data-dir DIR] list [--client ID] [--state STATE] [--json]
    stui-admin [--data-dir DIR] shares [--client ID] [--with ID] [--json]
    stui-admin [--data-dir DIR] verify [--json]
    stui-admin [--data-dir DIR] quarantine [--json]
    stui-admin [--data-dir DIR] expire SESSION_ID [--force]
    stui-admin [--data-dir DIR] delete SESSION_ID --yes [--force]
    stui-admin migrate --from file:DIR --to postgresql:DSN [--secret-file F] [--node-id ID]

Everything goes through L{stui_twisted.storage.store.SessionStore}, so the tool
reads and writes exactly the files the server does (MACs, C{.bak} recovery,
atomic replacement) and never re-implements the file format.

C{list}, C{shares}, C{verify} and C{quarantine} only read, and are safe while a server
uses the directory (files are replaced atomically; C{list} may, like the
server, restore a damaged file from its C{.bak}).  C{expire} and C{delete}
change files and are *offline* operations: a running server keeps its sessions
in memory and would write its own copy back.  They refuse to run while a
C{twistd stui} process on this machine uses the same data directory (found
through C{/proc}; C{--force} skips the check).

The tool never creates a data directory: a directory without C{secret.key} is
refused, so a mistyped C{--data-dir} cannot mint a new key.

Exit status: 0 success; 1 a check failed (C{verify} found bad files) or the
operation was refused; 2 bad usage or no such session or data directory.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import time
from typing import Any

from stui_twisted.events.log import log_path, remove_log
from stui_twisted.protocol.envelope import iso_timestamp, parse_iso_timestamp
from stui_twisted.storage.errors import StorageFailure
from stui_twisted.storage.pathcodec import decode_client_dir
from stui_twisted.storage.store import SessionFileMissing, SessionStore

DEFAULT_DATA_DIR = "./stui-data"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

_QUARANTINE_NAME = re.compile(r"^(?P<stamp>\d{8}T\d{6})-(?P<tag>[0-9a-f]{12})-(?P<rest>.+)$")
_QUARANTINED_SESSION = re.compile(r"^sessions__(?P<client_dir>c-[a-z2-7]+)-(?P<name>.+)$")


class AdminError(Exception):
    """An operator-facing failure: the message is printed, C{code} is the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------- running servers


def _read_proc(pid: str, name: str) -> bytes | None:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as handle:
            return handle.read()
    except OSError:
        return None


def _server_data_dir(argv: list[str], cwd: str | None) -> str | None:
    """The data directory a C{twistd ... stui ...} command line uses, if it can be told."""
    from stui_twisted.config import ConfigError, read_ini

    options = argv[argv.index("stui") + 1 :]
    data_dir = config = None
    for position, argument in enumerate(options):
        following = options[position + 1] if position + 1 < len(options) else None
        if argument.startswith("--data-dir="):
            data_dir = argument.split("=", 1)[1]
        elif argument == "--data-dir":
            data_dir = following
        elif argument.startswith("--config="):
            config = argument.split("=", 1)[1]
        elif argument in ("--config", "-c"):
            config = following
    if cwd is None:
        return None
    if data_dir is None and config is not None:
        try:
            data_dir = read_ini(os.path.join(cwd, config)).get("data-dir")
        except ConfigError:
            return None
    return os.path.realpath(os.path.join(cwd, data_dir or DEFAULT_DATA_DIR))


def running_servers(data_dir: str, proc: str = "/proc") -> list[tuple[int, str | None]]:
    """(pid, its data dir or None when unknown) of C{twistd stui} processes on C{data_dir}.

    Best effort, Linux only: reads C{/proc/PID/cmdline} and C{/proc/PID/cwd}.
    Servers whose data directory is another one are left out; servers whose
    data directory cannot be told (another user's process) are included with
    None.
    """
    if not os.path.isdir(proc):
        return []
    wanted = os.path.realpath(data_dir)
    found = []
    for pid in os.listdir(proc):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        raw = _read_proc(pid, "cmdline")
        if not raw:
            continue
        argv = [part.decode("utf-8", "replace") for part in raw.rstrip(b"\0").split(b"\0")]
        if "stui" not in argv or not any("twistd" in part for part in argv):
            continue
        try:
            cwd = os.readlink(f"{proc}/{pid}/cwd")
        except OSError:
            cwd = None
        used = _server_data_dir(argv, cwd)
        if used is None or used == wanted:
            found.append((int(pid), used))
    return found


def refuse_if_running(data_dir: str, force: bool) -> None:
    """Raise L{AdminError} when a server seems to use C{data_dir} (unless C{force})."""
    if force:
        return
    for pid, used in running_servers(data_dir):
        if used is not None:
            raise AdminError(
                f"a stui server (pid {pid}) is using {used}; stop it first: this is an "
                "offline operation (--force skips this check)"
            )
        print(
            f"warning: a stui server (pid {pid}) runs with a data directory this tool "
            "cannot see; make sure it is not this one",
            file=sys.stderr,
        )


# ----------------------------------------------------------------- helpers


def check_data_dir(data_dir: str) -> str:
    """C{data_dir} as an absolute path, if it holds a data directory."""
    path = os.path.abspath(data_dir)
    if not os.path.isdir(path):
        raise AdminError(f"no data directory at {path} (use --data-dir)", EXIT_USAGE)
    if not os.path.exists(os.path.join(path, "secret.key")):
        raise AdminError(
            f"{path} has no secret.key: not a stui data directory, or never used by a "
            "server (stui-admin does not create one)",
            EXIT_USAGE,
        )
    return path


def effective_state(meta: dict, now: float) -> str:
    """C{active}, C{expired} (also when idle past its timeout) or C{closed}."""
    state = meta.get("state") or "active"
    if state != "active":
        return state
    last_activity = meta.get("last_activity")
    if isinstance(last_activity, str):
        last_activity = parse_iso_timestamp(last_activity)
    timeout = meta.get("timeout") or 0
    if last_activity is not None and last_activity + float(timeout) <= now:
        return "expired"
    return "active"


def _print_table(headers: list[str], rows: list[list[Any]]) -> None:
    table = [headers] + [["" if cell is None else str(cell) for cell in row] for row in rows]
    widths = [max(len(row[column]) for row in table) for column in range(len(headers))]
    for row in table:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def parse_quarantine_name(name: str) -> dict:
    """What a quarantined file's name tells: when, from where, which session."""
    info = {
        "file": name,
        "quarantined_at": None,
        "original": None,
        "client_id": None,
        "session_id": None,
    }
    match = _QUARANTINE_NAME.match(name)
    if match is None:
        return info
    stamp = match["stamp"]
    info["quarantined_at"] = (
        f"{stamp[0:4]}-{stamp[4:6]}-{stamp[6:8]}T{stamp[9:11]}:{stamp[11:13]}:{stamp[13:15]}Z"
    )
    rest = match["rest"]
    if rest.startswith(".-"):
        info["original"] = rest[2:]
        return info
    session = _QUARANTINED_SESSION.match(rest)
    if session is None:
        return info
    original = session["name"]
    info["original"] = f"sessions/{session['client_dir']}/{original}"
    info["client_id"] = decode_client_dir(session["client_dir"])
    for suffix in (".json.bak", ".json"):
        if original.endswith(suffix):
            info["session_id"] = original[: -len(suffix)]
            break
    return info


# ----------------------------------------------------------------- commands


async def _open_store(reactor, data_dir: str):
    store = SessionStore(data_dir, reactor=reactor)
    await store.open()
    return store


async def _find(store, session_id: str) -> tuple[list[dict], dict]:
    metas = await store.load_index()
    for meta in metas:
        if meta["session_id"] == session_id:
            return metas, meta
    raise AdminError(f"no session {session_id!r} in {store.data_dir}", EXIT_USAGE)


async def command_list(reactor, store, args) -> int:
    """Print the sessions on disk."""
    now = time.time()
    metas = await store.load_index()
    rows = []
    for meta in sorted(metas, key=lambda m: (m["client_id"], m.get("created_at") or "")):
        state = effective_state(meta, now)
        if args.client is not None and meta["client_id"] != args.client:
            continue
        if args.state is not None and state != args.state:
            continue
        rows.append(dict(meta, effective_state=state))
    if args.json:
        _print_json(rows)
        return EXIT_OK
    _print_table(
        ["SESSION_ID", "CLIENT", "STATE", "LAST_ACTIVITY", "SIZE"],
        [
            [
                r["session_id"],
                r["client_id"],
                r["effective_state"],
                r.get("last_activity"),
                r.get("size_bytes"),
            ]
            for r in rows
        ],
    )
    print(f"{len(rows)} sessions", file=sys.stderr)
    return EXIT_OK


async def command_shares(reactor, store, args) -> int:
    """Print which sessions are shared with whom (access.md §1), one row per share."""
    from stui_twisted.access.sharing import shares_from, shares_list

    now = time.time()
    rows = []
    for meta in sorted(await store.load_index(), key=lambda m: m.get("created_at") or ""):
        if args.client is not None and meta["client_id"] != args.client:
            continue
        for share in shares_list(shares_from(meta.get("shares"))):
            if args.with_client is not None and share["client_id"] != args.with_client:
                continue
            rows.append(
                {
                    "session_id": meta["session_id"],
                    "owner": meta["client_id"],
                    "shared_with": share["client_id"],
                    "access": share["access"],
                    "effective_state": effective_state(meta, now),
                }
            )
    rows.sort(key=lambda r: (r["owner"], r["session_id"], r["shared_with"]))
    if args.json:
        _print_json(rows)
        return EXIT_OK
    _print_table(
        ["SESSION_ID", "OWNER", "SHARED_WITH", "ACCESS", "STATE"],
        [
            [r["session_id"], r["owner"], r["shared_with"], r["access"], r["effective_state"]]
            for r in rows
        ],
    )
    sessions = len({r["session_id"] for r in rows})
    print(f"{len(rows)} shares of {sessions} sessions", file=sys.stderr)
    return EXIT_OK


def _is_temp(row: dict) -> bool:
    return os.path.basename(row["path"]).startswith(".")


async def command_verify(reactor, store, args) -> int:
    """Check every file's MAC; non-zero exit when any is bad."""
    rows = await store.verify_all()
    bad = [row for row in rows if not row["ok"] and not _is_temp(row)]
    temp = [row for row in rows if not row["ok"] and _is_temp(row)]
    if args.json:
        _print_json(rows)
    else:
        for row in bad:
            print(f"BAD   {row['path']}: {row['reason']}")
        for row in temp:
            print(f"TEMP  {row['path']}: a write in progress, or left by an interrupted one")
        print(
            f"{len(rows)} files checked: {len(rows) - len(bad) - len(temp)} ok, "
            f"{len(bad)} bad, {len(temp)} temporary",
            file=sys.stderr,
        )
    return EXIT_FAILED if bad else EXIT_OK


async def command_quarantine(reactor, store, args) -> int:
    """Show what is in DATA/quarantine."""
    try:
        names = sorted(os.listdir(store.quarantine_dir))
    except FileNotFoundError:
        names = []
    rows = []
    for name in names:
        info = parse_quarantine_name(name)
        try:
            info["size_bytes"] = os.stat(os.path.join(store.quarantine_dir, name)).st_size
        except OSError:
            info["size_bytes"] = None
        rows.append(info)
    if args.json:
        _print_json(rows)
        return EXIT_OK
    _print_table(
        ["QUARANTINED_AT", "CLIENT", "SESSION_ID", "ORIGINAL", "SIZE", "FILE"],
        [
            [
                r["quarantined_at"],
                r["client_id"],
                r["session_id"],
                r["original"],
                r["size_bytes"],
                r["file"],
            ]
            for r in rows
        ],
    )
    print(f"{len(rows)} files in {store.quarantine_dir}", file=sys.stderr)
    return EXIT_OK


def _index_without_cache(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k not in ("size_bytes", "saved_at")}


async def command_expire(reactor, store, args) -> int:
    """Mark a session expired now, the way the server does after its idle timeout."""
    metas, meta = await _find(store, args.session_id)
    document = await store.read(meta["client_id"], args.session_id)
    state = document.get("state") or "active"
    if state == "closed":
        raise AdminError(f"session {args.session_id} is closed; nothing to expire")
    if state == "expired":
        print(f"session {args.session_id} was already expired")
        return EXIT_OK
    now = time.time()
    last_activity = parse_iso_timestamp(document["last_activity"])
    document["state"] = "expired"
    # expires_at = last_activity + timeout: make it "now", so the session reads as
    # expired from this moment and retention counts from it.
    document["timeout"] = round(max(0.0, now - last_activity), 3)
    document["last_modified"] = iso_timestamp(now)
    await store.write(document)
    updated = [
        _index_without_cache(
            dict(
                m,
                state="expired",
                timeout=document["timeout"],
                last_modified=document["last_modified"],
            )
        )
        if m["session_id"] == args.session_id
        else m
        for m in metas
    ]
    await store.write_index(updated)
    print(f"expired session {args.session_id} of {meta['client_id']}")
    return EXIT_OK


async def command_delete(reactor, store, args) -> int:
    """Remove a session's file, its backup and its event log for good."""
    metas, meta = await _find(store, args.session_id)
    if not args.yes:
        raise AdminError(
            f"would delete session {args.session_id} of {meta['client_id']} "
            f"({meta.get('state')}, {meta.get('size_bytes')} bytes) for good; "
            "run again with --yes"
        )
    await store.delete(meta["client_id"], args.session_id)
    remove_log(log_path(store.data_dir, args.session_id))
    await store.write_index([m for m in metas if m["session_id"] != args.session_id])
    print(f"deleted session {args.session_id} of {meta['client_id']}")
    return EXIT_OK


async def command_migrate(reactor, store, args) -> int:
    """Copy every session of the data directory to the PostgreSQL store, verified."""
    from twisted.internet import threads

    from stui_twisted.storage.migrate import migrate_sessions
    from stui_twisted.storage.postgres import PostgresSessionStore

    target = PostgresSessionStore(
        args.to[len("postgresql:") :],
        reactor=reactor,
        secret_file=args.secret_file or os.path.join(args.data_dir, "secret.key"),
        node_id=args.node_id or socket.gethostname(),
    )
    await threads.deferToThread(target.check)  # connect and create/migrate the schema
    await target.open()
    try:
        counts = await migrate_sessions(store, target)
    finally:
        await target.close()
    for bad in counts["unreadable_sessions"]:
        print(f"not copied: {bad['session_id']}: {bad['reason']}", file=sys.stderr)
    print(
        f"copied {counts['sessions']} sessions, {counts['saved_copies']} saved copies and"
        f" {counts['shared']} shared namespace to {target.where};"
        f" {counts['unreadable']} unreadable"
    )
    return EXIT_FAILED if counts["unreadable"] else EXIT_OK


COMMANDS = {
    "migrate": command_migrate,
    "list": command_list,
    "shares": command_shares,
    "verify": command_verify,
    "quarantine": command_quarantine,
    "expire": command_expire,
    "delete": command_delete,
}
OFFLINE_COMMANDS = ("expire", "delete")


def build_parser() -> argparse.ArgumentParser:
    """The command line of C{stui-admin}."""
    parser = argparse.ArgumentParser(
        prog="stui-admin",
        description="Inspect and maintain a stui-twisted data directory.",
        epilog="expire and delete are offline operations: stop the server first.",
    )
    parser.add_argument(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        help=f"the server's data directory (default: {DEFAULT_DATA_DIR})",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    listing = commands.add_parser(
        "list", help="sessions on disk: id, client, state, last activity, size"
    )
    listing.add_argument("--client", help="only this client id's sessions")
    listing.add_argument("--state", choices=("active", "expired", "closed"), help="only this state")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    shares = commands.add_parser("shares", help="which sessions are shared with whom, and how")
    shares.add_argument("--client", help="only sessions this client id owns")
    shares.add_argument("--with", dest="with_client", help="only shares with this client id")
    shares.add_argument("--json", action="store_true", help="print JSON instead of a table")
    verify = commands.add_parser("verify", help="check every file's MAC; exit 1 if any is bad")
    verify.add_argument("--json", action="store_true", help="print every file's result as JSON")
    quarantine = commands.add_parser("quarantine", help="show the files moved to DATA/quarantine")
    quarantine.add_argument("--json", action="store_true", help="print JSON instead of a table")
    expire = commands.add_parser("expire", help="mark a session expired now (offline)")
    expire.add_argument("session_id")
    expire.add_argument("--force", action="store_true", help="skip the running-server check")
    delete = commands.add_parser("delete", help="delete a session's files (offline)")
    delete.add_argument("session_id")
    delete.add_argument("--yes", action="store_true", help="really delete")
    delete.add_argument("--force", action="store_true", help="skip the running-server check")
    migrate = commands.add_parser(
        "migrate", help="copy every session to a PostgreSQL store, verified by MAC; idempotent"
    )
    migrate.add_argument("--from", dest="source", required=True, help="file:DIR")
    migrate.add_argument("--to", required=True, help="postgresql:DSN")
    migrate.add_argument(
        "--secret-file", help="the PostgreSQL store's MAC key (default: DIR/secret.key)"
    )
    migrate.add_argument("--node-id", help="whose shared namespace it becomes (default: hostname)")
    return parser


def _start_logging() -> None:
    """Show the store's warnings (recoveries, quarantines) on stderr."""
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    observer = FilteringLogObserver(
        textFileLogObserver(sys.stderr),
        [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)],
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


async def _run(reactor, args) -> None:
    store = await _open_store(reactor, args.data_dir)
    try:
        code = await COMMANDS[args.command](reactor, store, args)
    except AdminError as error:
        print(f"stui-admin: {error}", file=sys.stderr)
        code = error.code
    except (StorageFailure, SessionFileMissing) as error:
        print(f"stui-admin: {error}", file=sys.stderr)
        code = EXIT_FAILED
    finally:
        await store.close()
    if code:
        raise SystemExit(code)


def _migrate_ends(source: str, to: str) -> tuple[str, str]:
    """The data directory of C{--from file:DIR} and the normalised C{--to postgresql:DSN}."""
    from stui_twisted.config import ConfigError, _store

    try:
        source_store, target_store = _store("from", source), _store("to", to)
    except ConfigError as exc:
        raise AdminError(str(exc), EXIT_USAGE) from None
    if not source_store.startswith("file:"):
        raise AdminError("--from must be file:DIR", EXIT_USAGE)
    if not target_store.startswith("postgresql:"):
        raise AdminError("--to must be postgresql:DSN", EXIT_USAGE)
    return source_store[len("file:") :], target_store


def main(argv: list[str] | None = None) -> None:
    """Entry point of C{stui-admin}; exits with the status described in the module doc."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "migrate":
            args.data_dir, args.to = _migrate_ends(args.source, args.to)
        args.data_dir = check_data_dir(args.data_dir)
        if args.command in OFFLINE_COMMANDS:
            refuse_if_running(args.data_dir, args.force)
    except AdminError as error:
        print(f"stui-admin: {error}", file=sys.stderr)
        sys.exit(error.code)
    _start_logging()
    from twisted.internet import task

    task.react(_run, (args,))


if __name__ == "__main__":
    main()
