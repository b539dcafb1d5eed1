"""The administration commands of access.md §3 (feature C{admin}).

C{list_clients}, C{disconnect_client}, C{revoke_tokens} and
C{list_all_sessions}.  The dispatcher refuses them to every plan without
C{admin} (and to everybody when auth is off); each one that runs is logged
with the acting principal, what it did and to whom.
"""

from __future__ import annotations

from twisted.logger import Logger

from stui_twisted.dispatch.dispatcher import Call, Command, Param
from stui_twisted.protocol.timefmt import iso_timestamp
from stui_twisted.sessions.policy import check_client_id

log = Logger()

TARGET = Param("client_id", "string", True, description="the principal acted on")


def _when(seconds: float | None) -> str | None:
    return None if seconds is None else iso_timestamp(seconds)


def _conversation(context) -> dict:
    return {
        "conversation": f"{context.transport}#{context.connection_id}",
        "client_id": context.principal or context.last_client_id,
        "transport": context.transport,
        "peer": context.peer,
        "connected_at": _when(context.connected_at),
        "current_session": context.current_session_id,
        "last_command": context.last_command,
        "last_activity": _when(context.last_activity),
    }


def _audit(call: Call, command: str, target: str | None, outcome: str) -> None:
    log.info(
        "admin: {admin} ran {command} on {target} ({conn}): {outcome}",
        admin=call.principal,
        command=command,
        target=target if target is not None else "everyone",
        conn=call.context.label,
        outcome=outcome,
    )


def build_admin_commands(service, authenticator=None) -> list[Command]:
    """The admin commands over C{service}'s sessions and connections (and the tokens)."""

    def list_clients(call: Call) -> dict:
        contexts = sorted(
            (c.context for c in service.connections if c.context is not None),
            key=lambda context: context.connection_id,
        )
        clients = [_conversation(context) for context in contexts]
        _audit(call, "list_clients", None, f"{len(clients)} conversations")
        return {"clients": clients}

    def disconnect_client(call: Call) -> dict:
        target = check_client_id(call.params["client_id"])
        closed = 0
        for connection in service.connections:
            context = connection.context
            if context is None or target not in (context.principal, context.last_client_id):
                continue
            if context is call.context:  # its own: after this reply has gone out
                service.clock.callLater(0, connection.close)
            else:
                connection.close()
            closed += 1
        _audit(call, "disconnect_client", target, f"{closed} conversations closed")
        return {"disconnected": closed}

    def revoke_tokens(call: Call) -> dict:
        target = check_client_id(call.params["client_id"])
        revoked = authenticator.revoke_client(target) if authenticator is not None else 0
        _audit(call, "revoke_tokens", target, f"{revoked} tokens revoked")
        return {"revoked": revoked}

    async def list_all_sessions(call: Call) -> dict:
        owner = call.params["client_id"]
        if owner is not None:
            owner = check_client_id(owner)
        sessions = await service.list_all_sessions(
            client_id=owner, include_inactive=call.params["include_inactive"]
        )
        now = service.now()
        _audit(call, "list_all_sessions", owner, f"{len(sessions)} sessions")
        return {
            "session_count": len(sessions),
            "sessions": [dict(s.record(now), owner=s.client_id) for s in sessions],
        }

    return [
        Command("list_clients", list_clients, (), "every open conversation (admin)"),
        Command(
            "disconnect_client",
            disconnect_client,
            (TARGET,),
            "close every conversation of a principal (admin)",
            targets_client=True,
        ),
        Command(
            "revoke_tokens",
            revoke_tokens,
            (TARGET,),
            "invalidate every token of a principal (admin)",
            targets_client=True,
        ),
        Command(
            "list_all_sessions",
            list_all_sessions,
            (
                Param("client_id", "string", description="only this client's sessions"),
                Param("include_inactive", "boolean", default=False),
            ),
            "every client's sessions, with their owner (admin)",
            targets_client=True,
        ),
    ]
