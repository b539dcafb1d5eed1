"""Command line of C{stui-client} (also C{python -m stui_twisted.client}).

Exit status: 0 success; 1 an evaluation (C{--eval}) failed; 2 a usage, connection,
authentication or session error; 130 interrupted by Ctrl-C.  C{--watch} ends with 0
on Ctrl-C or when the watched session closes.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from stui_twisted import __version__
from stui_twisted.client.formatting import format_error, format_evaluation, format_sessions
from stui_twisted.client.live import EvaluationFollower, dim, format_event
from stui_twisted.client.session import (
    CredentialSource,
    CredentialsUnavailable,
    ServerError,
    StuiClient,
)
from stui_twisted.client.state import (
    ClientState,
    default_state_dir,
    is_valid_client_id,
    sanitize_client_id,
)
from stui_twisted.client.transport import DEFAULT_SERVER_URL, ConnectionLost, parse_server_url

EXIT_OK = 0
EXIT_EVALUATION_FAILED = 1
EXIT_USAGE_OR_CONNECTION = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stui-client",
        description="Work in a durable session on a stui-twisted server's live Python image.",
    )
    parser.add_argument(
        "server",
        nargs="?",
        default=os.environ.get("STUI_SERVER", DEFAULT_SERVER_URL),
        metavar="URL",
        help="tcp://HOST:PORT, tls://HOST:PORT or zmq://HOST:PORT "
        f"(default: $STUI_SERVER or {DEFAULT_SERVER_URL})",
    )
    parser.add_argument(
        "--cafile", help="CA certificates (PEM) that sign the server's TLS certificate"
    )
    parser.add_argument("--user", help="log in as USER (password from $STUI_PASSWORD or asked for)")
    parser.add_argument(
        "--client-id",
        help="client id that owns your sessions (default: $USER, reduced to A-Z a-z 0-9 . _ : @ -)",
    )
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--new", action="store_true", help="start a new session")
    choice.add_argument("--session", metavar="ID", help="restore session ID")
    choice.add_argument(
        "--watch",
        metavar="ID",
        help="follow session ID (yours or shared with you) read-only: print its events",
    )
    parser.add_argument(
        "--since",
        type=int,
        metavar="SEQ",
        help="with --watch: first replay the session's logged events after SEQ (0: all)",
    )
    parser.add_argument(
        "--eval",
        "-e",
        action="append",
        metavar="CODE",
        help="evaluate CODE ('-' reads stdin), print the result and exit; may be repeated",
    )
    parser.add_argument(
        "--json", action="store_true", help="with --eval: print each raw reply as one JSON line"
    )
    parser.add_argument(
        "--mode",
        choices=("execute", "display"),
        default="execute",
        help="evaluate mode: 'display' shows str() of the value instead of repr()",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        help="where state.json and history live (default: $XDG_STATE_HOME/stui-client)",
    )
    parser.add_argument(
        "--reconnect-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="give up reconnecting after this long (default: 60)",
    )
    parser.add_argument("--version", action="version", version=f"stui-client {__version__}")
    return parser


def default_client_id() -> str:
    try:
        user = os.environ.get("USER") or getpass.getuser()
    except (KeyError, OSError):
        user = ""
    return sanitize_client_id(user)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        address = parse_server_url(args.server)
    except ValueError as error:
        parser.error(str(error))
    if args.client_id is not None and not is_valid_client_id(args.client_id):
        parser.error(
            f"--client-id {args.client_id!r} is not valid: 1-128 characters of "
            "A-Z a-z 0-9 . _ : @ -, starting with a letter or digit"
        )
    if args.json and not args.eval:
        parser.error("--json needs --eval")
    if args.watch and args.eval:
        parser.error("--watch follows a session read-only; it cannot --eval")
    if args.since is not None and (not args.watch or args.since < 0):
        parser.error("--since needs --watch and a seq of 0 or more")
    if args.reconnect_timeout <= 0:
        parser.error("--reconnect-timeout must be positive")

    scripted = bool(args.eval or args.watch)
    state = ClientState(args.state_dir or default_state_dir())

    def notify(text: str) -> None:
        print(text, file=sys.stderr if scripted else sys.stdout, flush=True)

    client = StuiClient(
        address,
        client_id=args.client_id or default_client_id(),
        client_id_explicit=args.client_id is not None,
        state=state,
        credentials=CredentialSource.from_environment(args.user),
        cafile=args.cafile,
        notify=notify,
        reconnect_total_seconds=args.reconnect_timeout,
    )
    try:
        try:
            client.connect()
            if args.user:
                client.authenticate()
            if args.watch:
                return watch(client, args.watch, args.since)
            banner = client.open_session(force_new=args.new, session_id=args.session)
        except (ConnectionLost, CredentialsUnavailable) as error:
            print(f"stui-client: {error}", file=sys.stderr)
            return EXIT_USAGE_OR_CONNECTION
        except ServerError as error:
            if args.json:
                print(json.dumps(error.reply, ensure_ascii=False), flush=True)
            print(f"stui-client: {format_error(error.reply).rstrip()}", file=sys.stderr)
            if error.error_type == "SessionLimitExceeded":
                print(session_limit_hint(client), file=sys.stderr, end="")
            return EXIT_USAGE_OR_CONNECTION
        if scripted:
            if client.session_note:
                notify(client.session_note.strip())
            return run_evaluations(client, args.eval, mode=args.mode, as_json=args.json)
        from stui_twisted.client.repl import Repl  # prompt_toolkit only for the REPL

        server = client.server_info.get("server", "stui-twisted")
        print(f"Connected to {address.url} ({server}) as {client.client_id}.")
        print(banner.rstrip())
        print("Type :help for help, Ctrl-D to quit.", flush=True)
        return Repl(client, state, mode=args.mode).run()
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        client.close()


WATCH_SLICE_SECONDS = 0.5
SESSION_END_EVENTS = ("session_closed", "session_expired")
WATCH_ENDINGS = {
    "session_closed": "The session was closed.",
    "session_expired": "The session expired.",
    "unshared": "The session is no longer shared with you.",
}


def watch(client: StuiClient, session_id: str, since: int | None) -> int:
    """C{--watch}: subscribe to one session's stream and print its events, read-only.

    Nothing is evaluated and no session is created or restored; a reconnection
    subscribes again from the last seq printed.
    """
    colour = sys.stdout.isatty()
    ended: list[str] = []
    subscribed: list[bool] = []

    def show(message: dict) -> None:
        line = format_event(message, own_client_id=client.client_id)
        if line:
            print(dim(line, colour), flush=True)
        event = message.get("event")
        if message.get("session_id") != session_id:
            return
        if event in SESSION_END_EVENTS:
            ended.append(str(event))
        data = message.get("data") if isinstance(message.get("data"), dict) else {}
        if event == "watcher_left" and subscribed and data.get("client_id") == client.client_id:
            ended.append("unshared")  # the share was taken away: the server ended our stream

    client.on_event = show
    print(f"Watching session {session_id} read-only; Ctrl-C stops.", flush=True)
    try:
        result = client.subscribe(session_id, since=since)
    except ServerError as error:
        print(f"stui-client: {format_error(error.reply).rstrip()}", file=sys.stderr)
        return EXIT_USAGE_OR_CONNECTION
    subscribed.append(True)  # a watcher_left of ours replayed before this is history
    print(dim(f"[watch] live from seq {result.get('last_seq', '?')}", colour), flush=True)
    try:
        while not ended:
            client.wait_events(WATCH_SLICE_SECONDS)
    except KeyboardInterrupt:
        return EXIT_OK
    except (ConnectionLost, ServerError, CredentialsUnavailable) as error:
        print(f"stui-client: {error}", file=sys.stderr)
        return EXIT_USAGE_OR_CONNECTION
    print(WATCH_ENDINGS[ended[0]])
    return EXIT_OK


def follow_evaluations(client: StuiClient, as_json: bool) -> EvaluationFollower | None:
    """Subscribe to the session for C{--eval}; None when the server has no events."""
    if client.session_id is None:
        return None
    follower = EvaluationFollower(
        client, stream_output=not as_json, prompt_stream=sys.stderr if as_json else sys.stdout
    )
    client.on_event = follower
    try:
        client.subscribe(client.session_id)
    except (ServerError, ConnectionLost):
        client.on_event = None  # a 1.0 server, or events not in the plan: plain replies
        return None
    return follower


def session_limit_hint(client: StuiClient) -> str:
    """Which sessions exist and how to use or close one, after SessionLimitExceeded."""
    try:
        listing = client.result("list_client_sessions", {"client_id": client.client_id})
    except (ConnectionLost, ServerError, CredentialsUnavailable):
        listing = {"client_id": client.client_id, "sessions": []}
    return (
        format_sessions(listing, None)
        + "Restore one with --session ID (then :close it to free the slot), "
        "or wait for one to expire.\n"
    )


def run_evaluations(
    client: StuiClient, snippets: Sequence[str], *, mode: str, as_json: bool
) -> int:
    """C{--eval}: run each snippet in order, stop at the first failure.

    When the server has events, the output streams while the code runs (not with
    C{--json}) and an C{input()} is answered from stdin (its prompt on stderr with
    C{--json}, so that stdout stays JSON lines).
    """
    follower = follow_evaluations(client, as_json)
    for snippet in snippets:
        code = sys.stdin.read() if snippet == "-" else snippet
        try:
            if follower is None:
                reply = client.evaluate(code, mode)
            else:
                reply, newline = follower.evaluate(code, mode)
                if newline:
                    sys.stdout.write("\n")
        except (ConnectionLost, CredentialsUnavailable) as error:
            print(f"stui-client: {error}", file=sys.stderr)
            return EXIT_USAGE_OR_CONNECTION
        except ServerError as error:
            reply = error.reply
            if as_json:
                print(json.dumps(reply, ensure_ascii=False), flush=True)
            print(f"stui-client: {format_error(reply).rstrip()}", file=sys.stderr)
            return EXIT_USAGE_OR_CONNECTION
        if as_json:
            print(json.dumps(reply, ensure_ascii=False), flush=True)
        elif reply.get("status") == "success":
            sys.stdout.write(format_evaluation(reply.get("result") or {}))
            sys.stdout.flush()
        else:
            details = reply.get("details") if isinstance(reply.get("details"), dict) else {}
            if details.get("output"):
                sys.stdout.write(details["output"])
                sys.stdout.flush()
            sys.stderr.write(format_error({**reply, "details": {**details, "output": ""}}))
            sys.stderr.flush()
        if reply.get("status") != "success":
            return EXIT_EVALUATION_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
