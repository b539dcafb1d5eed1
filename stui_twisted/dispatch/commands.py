"""The command table of protocol.md: names, parameter declarations, handlers.

Each entry binds a command name to a handler and declares its parameters, so
the dispatcher validates them and C{describe} lists them from one source.
Session rules live in L{stui_twisted.sessions.service.SessionService},
which is protocol-free (typed arguments in, domain objects out);
L{WireCommands} is the one place that unpacks a validated
L{stui_twisted.dispatch.dispatcher.Call} into those arguments and shapes
the reply dicts protocol.md section 5 specifies.
"""

from __future__ import annotations

import os

from stui_twisted import PROTOCOL_VERSION, SERVER_NAME, __version__
from stui_twisted.dispatch.admin_commands import build_admin_commands
from stui_twisted.dispatch.browse_commands import build_browse_commands, language_version
from stui_twisted.dispatch.debug_commands import build_debug_commands
from stui_twisted.dispatch.dispatcher import Call, Command, Param
from stui_twisted.dispatch.plan_commands import build_plan_commands
from stui_twisted.dispatch.share_commands import build_share_commands
from stui_twisted.protocol.envelope import EncodedResult, iso_timestamp, json_text, whole_seconds
from stui_twisted.protocol.errors import invalid_parameter
from stui_twisted.sessions.results import UNSET, EvaluationStarted, Rebuilt

SESSION_ID = Param("session_id", "string", description="defaults to the current session")


def _target(call: Call) -> dict:
    """The session a call names: its id (or the current one), the acting client, the caller."""
    return {
        "session_id": call.params.get("session_id"),
        "client_id": call.client_id,
        "connection": call.context,
    }


def _rebuilt(rebuilt: Rebuilt) -> dict:
    return {
        "restored_bindings": rebuilt.restored,
        "unrestorable_bindings": rebuilt.unrestorable,
    }


class WireCommands:
    """The session commands as the wire sees them: a L{Call} in, a reply dict out.

    Each method unpacks the call's parameters into the typed arguments of the
    L{SessionService} method of the same name and shapes what it answers.
    """

    def __init__(self, service) -> None:
        self.service = service

    async def create_session(self, call: Call) -> dict:
        session = await self.service.create_session(
            client_id=call.client_id,
            timeout=call.params.get("timeout"),
            client_info=call.params.get("client_info"),
            connection=call.context,
        )
        result = session.record(self.service.now())
        result["capabilities"] = list(self.service.settings.capabilities)
        return result

    async def restore_session(self, call: Call) -> dict:
        restored = await self.service.restore_session(**_target(call))
        session = restored.session
        result = session.record(self.service.now())
        result.update(session.context())
        result.update(_rebuilt(restored.rebuilt))
        return result

    async def update_session_state(self, call: Call) -> dict:
        given = call.request.parameters
        session = await self.service.update_session_state(
            **_target(call),
            state_data=given.get("state_data", UNSET),
            workspace_context=call.params["workspace_context"]
            if "workspace_context" in given
            else UNSET,
            inspector_state=call.params["inspector_state"] if "inspector_state" in given else UNSET,
            merge=call.params["merge"],
        )
        return {
            "session_id": session.session_id,
            "last_modified": iso_timestamp(session.last_modified),
            "session_state": session.session_state,
            "update_successful": True,
        }

    async def close_session(self, call: Call) -> dict:
        save = call.params["save_state"]
        session = await self.service.close_session(**_target(call), save_state=save)
        return {"session_id": session.session_id, "closed": True, "saved": bool(save)}

    async def get_session_info(self, call: Call) -> dict:
        info = await self.service.get_session_info(**_target(call))
        session = info.session
        result = session.record(self.service.now())
        result.update(
            {
                "variable_count": len(session.variables),
                "history_length": len(session.history),
                "size_bytes": info.size_bytes,
                "attached_connections": info.attached_connections,
            }
        )
        if info.shares is not None:  # the owner's view only (access.md §1)
            result["shares"] = info.shares
        return result

    async def list_client_sessions(self, call: Call) -> dict:
        listed = await self.service.list_client_sessions(
            client_id=call.client_id, include_inactive=call.params["include_inactive"]
        )
        now = self.service.now()
        return {
            "client_id": listed.client_id,
            "session_count": len(listed.sessions),
            "sessions": [s.record(now) for s in listed.sessions],
        }

    async def get_session_statistics(self, call: Call) -> dict:
        stats = await self.service.get_session_statistics()
        settings = self.service.settings
        return {
            "total_sessions": stats.total,
            "active_sessions": stats.active,
            "expired_sessions": stats.expired,
            "closed_sessions": stats.closed,
            "active_clients": stats.active_clients,
            "connected_clients": stats.connected_clients,
            "max_sessions_per_client": settings.max_sessions_per_client,
            "default_timeout": whole_seconds(settings.default_timeout),
            "cleanup_interval": whole_seconds(settings.cleanup_interval),
            "uptime": stats.uptime,
            "durability": settings.durability,
            "storage": stats.storage,
            "config_reload_errors": self.service.plans.reload_errors,
        }

    async def save_context(self, call: Call) -> dict:
        saved = await self.service.save_context(**_target(call))
        return {
            "session_id": saved.session_id,
            "saved": True,
            "saved_at": saved.saved_at,
            "size_bytes": saved.size_bytes,
            "checksum": saved.checksum,
        }

    async def load_context(self, call: Call) -> dict:
        loaded = await self.service.load_context(**_target(call))
        result = {
            "session_id": loaded.session.session_id,
            "loaded": True,
            "saved_at": loaded.saved_at,
            "context": loaded.session.context(),
        }
        result.update(_rebuilt(loaded.rebuilt))
        return result

    async def get_context_summary(self, call: Call) -> dict:
        info = await self.service.get_context_summary(**_target(call))
        session = info.session
        return {
            "session_id": session.session_id,
            "variables": [
                {"name": v.get("name"), "type": v.get("type"), "repr": v.get("repr")}
                for v in session.variables
            ],
            "variable_count": len(session.variables),
            "history_length": len(session.history),
            "last_evaluation": session.history[-1] if session.history else None,
            "registry_size": len(session.registry),
            "inspector": {
                "selected_object": session.inspector_selected,
                "history_length": len(session.inspector_history),
            },
            "size_bytes": info.size_bytes,
            "dirty": session.dirty,
            "last_saved_at": session.last_saved_at,
        }

    async def clear_context(self, call: Call) -> dict:
        session_id, cleared = await self.service.clear_context(
            **_target(call), parts=call.params.get("parts")
        )
        return {"session_id": session_id, "cleared": cleared}

    async def evaluate(self, call: Call) -> dict:
        outcome = await self.service.evaluate(
            **_target(call),
            code=call.params["code"],
            mode=call.params["mode"],
            timeout=call.params.get("timeout"),
            wait=call.params["wait"],
        )
        if isinstance(outcome, EvaluationStarted):
            return {
                "session_id": outcome.session_id,
                "history_index": outcome.history_index,
                "started": True,
            }
        return {
            "session_id": outcome.session_id,
            "result": outcome.result,
            "result_type": outcome.result_type,
            "object_id": outcome.object_id,
            "display": outcome.display,
            "output": outcome.output,
            "execution_time": outcome.execution_time,
            "has_error": False,
            "history_index": outcome.history_index,
        }

    async def inspect(self, call: Call) -> dict:
        inspection = await self.service.inspect(
            **_target(call),
            object_id=call.params.get("object_id"),
            expression=call.params.get("expression"),
            limit=call.params["limit"],
        )
        result = dict(inspection.view)
        result["session_id"] = inspection.session_id
        return result

    async def complete(self, call: Call) -> dict:
        completions = await self.service.complete(
            **_target(call), code=call.params["code"], cursor_pos=call.params.get("cursor_pos")
        )
        return completions.completions

    async def get_evaluation(self, call: Call) -> dict:
        session_id, entry = await self.service.get_evaluation(
            **_target(call), history_index=call.params["history_index"]
        )
        return dict(entry, session_id=session_id, history_index=entry["index"])

    async def send_input(self, call: Call) -> dict:
        session_id, index = await self.service.send_input(**_target(call), text=call.params["text"])
        return {"session_id": session_id, "history_index": index, "accepted": True}

    async def interrupt(self, call: Call) -> dict:
        session_id, interrupted = await self.service.interrupt(**_target(call))
        return {"session_id": session_id, "interrupted": interrupted}


_pid = [os.getpid()]
"""This process's id, read once and again after a fork (C{ping} shows it every time)."""
os.register_at_fork(after_in_child=lambda: _pid.__setitem__(0, os.getpid()))


class PingTexts:
    """The JSON text of C{ping} results, all but the uptime remembered.

    Everything in a C{ping} result but C{uptime} stays the same for long
    stretches (the image's status changes when it restarts), so the text
    before and after the uptime is kept per distinct rest, a few at most, and
    each reply only formats the uptime (L{EncodedResult}).
    """

    LIMIT = 8

    def __init__(self) -> None:
        self._texts: dict = {}

    def encoded(self, result: dict, rest: tuple) -> dict:
        """C{result} as an L{EncodedResult}.

        @param rest: every value of C{result} but the uptime, hashable (the
            nested objects as tuples of their items); the text is kept by it.
        """
        parts = self._texts.get(rest)
        if parts is None:
            if len(self._texts) >= self.LIMIT:
                self._texts.clear()
            parts = self._texts[rest] = self._parts(result)
        uptime = result["uptime"]
        # repr is the JSON encoder's own text for a (finite) float
        uptime_text = repr(uptime) if type(uptime) is float else json_text(uptime)
        return EncodedResult(result, f"{parts[0]}{uptime_text}{parts[1]}")

    @staticmethod
    def _parts(result: dict) -> tuple[str, str]:
        pairs = [f"{json_text(k)}:{json_text(v)}" for k, v in result.items()]
        at = list(result).index("uptime")
        head = "{" + ",".join(pairs[:at]) + (',"uptime":' if at else '"uptime":')
        rest = pairs[at + 1 :]
        return head, ("," + ",".join(rest) if rest else "") + "}"


def build_commands(service, dispatcher, authenticator=None, *, handlers=None) -> list[Command]:
    """Every command of protocol 1.0, bound to C{service} (and C{authenticator}).

    @param handlers: what answers the session commands' calls; by default
        L{WireCommands} over C{service}.  Tests of the dispatcher and the
        transports give a stand-in that answers calls directly.
    """

    ping_texts = PingTexts()

    def ping(call) -> dict:
        # A plain function: it never waits, and as the liveness probe it is
        # answered without creating a coroutine (Dispatcher.answer takes both).
        version = language_version(service)
        pid = _pid[0]
        image = service.image_status()
        node = service.node()
        result = {
            "message": "pong",
            "server": SERVER_NAME,
            "version": __version__,
            "protocol_version": PROTOCOL_VERSION,
            "language": "python",
            "language_version": version,
            "uptime": service.uptime(),
            "pid": pid,
            "image": image,
            "node": node,
        }
        try:
            # The constant fields are the same for every call of this closure;
            # the others' types are fixed (str, int or None), so equal keys
            # are equal texts.
            rest = (version, pid, tuple(image.items()), tuple(node.items()))
            return ping_texts.encoded(result, rest)
        except TypeError:  # an unhashable value in the image's status: no text kept
            return result

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
        dispatcher.note_client(call.context, result["client_id"])
        return result

    S = handlers if handlers is not None else WireCommands(service)  # noqa: N806 - short alias
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
                Param(
                    "wait",
                    "boolean",
                    default=True,
                    description="false: reply at once with history_index",
                ),
            ),
            "run code in the session's workspace",
        ),
        Command(
            "get_evaluation",
            S.get_evaluation,
            (SESSION_ID, Param("client_id", "string"), Param("history_index", "integer", True)),
            "one evaluation: its history entry, or its output so far while it runs",
        ),
        Command(
            "send_input",
            S.send_input,
            (SESSION_ID, Param("client_id", "string"), Param("text", "string", True)),
            "answer the input() the session's evaluation waits in",
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
        *build_plan_commands(dispatcher, authenticator),
        *build_admin_commands(service, authenticator),
        *build_share_commands(service),
    ]
