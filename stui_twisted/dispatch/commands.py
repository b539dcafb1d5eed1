"""The command table of protocol.md: names, parameter declarations, handlers.

Each entry binds a command name to a handler and declares its parameters, so
the dispatcher validates them and ``describe`` lists them from one source.
Session rules live in :class:`~stui_twisted.sessions.service.SessionService`; this
module only connects names to it.
"""

from __future__ import annotations

import os

from stui_twisted import PROTOCOL_VERSION, SERVER_NAME, __version__
from stui_twisted.dispatch.dispatcher import Command, Param
from stui_twisted.protocol.errors import invalid_parameter
from stui_twisted.sessions.browse import build_browse_commands, language_version
from stui_twisted.sessions.debug import build_debug_commands

SESSION_ID = Param("session_id", "string", description="defaults to the current session")


def build_commands(service, dispatcher, authenticator=None) -> list[Command]:
    """Every command of protocol 1.0, bound to C{service} (and C{authenticator})."""

    def ping(call) -> dict:
        # A plain function: it never waits, and as the liveness probe it is
        # answered without creating a coroutine (Dispatcher.answer takes both).
        return {
            "message": "pong",
            "server": SERVER_NAME,
            "version": __version__,
            "protocol_version": PROTOCOL_VERSION,
            "language": "python",
            "language_version": language_version(service),
            "uptime": service.uptime(),
            "pid": os.getpid(),
            "image": service.image_status(),
        }

    async def describe(call) -> dict:
        return {
            "server": SERVER_NAME,
            "version": __version__,
            "protocol_version": PROTOCOL_VERSION,
            "language": "python",
            "language_version": language_version(service),
            "commands": {
                name: {
                    "description": command.description,
                    "parameters": {p.name: p.describe() for p in command.params},
                }
                for name, command in sorted(dispatcher.commands().items())
            },
            "capabilities": list(service.settings.capabilities),
            "limits": service.settings.limits(),
            "auth_required": dispatcher.auth.enabled,
        }

    async def authenticate(call) -> dict:
        if authenticator is None or not authenticator.enabled:
            client_id = call.params.get("username")
            return {
                "authenticated": True,
                "client_id": client_id,
                "token": None,
                "expires_at": None,
                "auth_required": False,
            }
        for name in ("username", "password"):
            if not call.params.get(name):
                raise invalid_parameter(name, "is required")
        result = await authenticator.authenticate(
            call.params["username"], call.params["password"], call.context.peer
        )
        if call.context.transport != "zmq":
            # TCP/TLS authenticate the connection; a ZeroMQ identity proves
            # nothing, so ZeroMQ requests carry the token instead.
            call.context.principal = result["client_id"]
        return result

    S = service  # noqa: N806 - short alias keeps the table readable
    return [
        Command("ping", ping, (), "liveness, versions and image status", public=True),
        Command("describe", describe, (), "commands, capabilities and limits", public=True),
        Command(
            "authenticate",
            authenticate,
            (Param("username", "string", True), Param("password", "string", True)),
            "log in; returns the token ZeroMQ requests carry",
            public=True,
        ),
        Command(
            "create_session",
            S.create_session,
            (
                Param("client_id", "string", True),
                Param("client_info", "object"),
                Param("timeout", "number", description="idle timeout in seconds"),
            ),
            "create a session and make it the current one",
        ),
        Command(
            "restore_session",
            S.restore_session,
            (Param("session_id", "string", True), Param("client_id", "string")),
            "reattach to a session; returns its whole context",
        ),
        Command(
            "update_session_state",
            S.update_session_state,
            (
                SESSION_ID,
                Param("client_id", "string"),
                Param("state_data", "any", nullable=True),
                Param("workspace_context", "object"),
                Param("inspector_state", "object"),
                Param("merge", "boolean", default=False),
            ),
            "store client state (replace, or RFC 7396 merge patch)",
        ),
        Command(
            "close_session",
            S.close_session,
            (
                SESSION_ID,
                Param("client_id", "string"),
                Param("save_state", "boolean", default=True),
            ),
            "end a session for good",
        ),
        Command(
            "get_session_info",
            S.get_session_info,
            (SESSION_ID, Param("client_id", "string")),
            "the session record and sizes",
        ),
        Command(
            "list_client_sessions",
            S.list_client_sessions,
            (
                Param("client_id", "string", True),
                Param("include_inactive", "boolean", default=False),
            ),
            "the client's sessions",
        ),
        Command("get_session_statistics", S.get_session_statistics, (), "server-wide counters"),
        Command(
            "save_context",
            S.save_context,
            (SESSION_ID, Param("client_id", "string")),
            "write the session durably now",
        ),
        Command(
            "load_context",
            S.load_context,
            (SESSION_ID, Param("client_id", "string")),
            "replace the in-memory context with the last one on disk",
        ),
        Command(
            "get_context_summary",
            S.get_context_summary,
            (SESSION_ID, Param("client_id", "string")),
            "variables, history and inspector at a glance",
        ),
        Command(
            "clear_context",
            S.clear_context,
            (SESSION_ID, Param("client_id", "string"), Param("parts", "array")),
            "forget parts of the context",
        ),
        Command(
            "evaluate",
            S.evaluate,
            (
                SESSION_ID,
                Param("client_id", "string"),
                Param("code", "string", True),
                Param(
                    "mode",
                    "string",
                    default="execute",
                    aliases=("evaluation_mode",),
                    lowercase=True,
                ),
                Param("timeout", "number", description="seconds, default 30, max 600"),
            ),
            "run code in the session's workspace",
        ),
        Command(
            "inspect",
            S.inspect,
            (
                SESSION_ID,
                Param("client_id", "string"),
                Param("object_id", "string", aliases=("objectId",)),
                Param("expression", "string"),
                Param("limit", "integer", default=100),
            ),
            "look inside an object",
        ),
        Command(
            "complete",
            S.complete,
            (
                SESSION_ID,
                Param("client_id", "string"),
                Param("code", "string", True),
                Param("cursor_pos", "integer"),
            ),
            "completions at the cursor",
        ),
        Command(
            "interrupt",
            S.interrupt,
            (SESSION_ID, Param("client_id", "string")),
            "stop the session's running evaluation",
        ),
        *build_browse_commands(service),
        *build_debug_commands(service),
    ]
