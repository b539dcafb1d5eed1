"""The sharing commands of access.md §1: share_session, unshare_session, list_shared_sessions.

Who may run which command on a shared session is decided in
L{stui_twisted.access.sharing}; these handlers unpack the parameters for the
L{stui_twisted.sessions.service.SessionService} and shape its answers.
"""

from __future__ import annotations

from stui_twisted.access.sharing import shares_list
from stui_twisted.dispatch.dispatcher import Command, Param

SESSION_ID = Param("session_id", "string", description="defaults to the current session")
CLIENT_ID = Param("client_id", "string")
WITH = Param("with", "string", True, description="the client id to share with")


def build_share_commands(service) -> list[Command]:
    """The three sharing commands, bound to C{service}."""

    def shared(session) -> dict:
        return {"session_id": session.session_id, "shares": shares_list(session.shares)}

    def target(call) -> dict:
        """The session a call names, who acts, and whom the share is about."""
        return {
            "session_id": call.params.get("session_id"),
            "client_id": call.client_id,
            "connection": call.context,
            "with_client": call.params["with"],
        }

    async def share_session(call) -> dict:
        return shared(await service.share_session(**target(call), access=call.params["access"]))

    async def unshare_session(call) -> dict:
        return shared(await service.unshare_session(**target(call)))

    async def list_shared_sessions(call) -> dict:
        listed = await service.list_shared_sessions(client_id=call.client_id)
        now = service.now()
        sessions = []
        for session in listed.sessions:
            record = session.record(now)
            record["owner"] = session.client_id
            record["access"] = session.shares[listed.client_id]
            sessions.append(record)
        return {"client_id": listed.client_id, "sessions": sessions}

    return [
        Command(
            "share_session",
            share_session,
            (
                SESSION_ID,
                CLIENT_ID,
                WITH,
                Param("access", "string", True, description="read or write", lowercase=True),
            ),
            "let another client read (or also change) your session",
        ),
        Command(
            "unshare_session",
            unshare_session,
            (SESSION_ID, CLIENT_ID, WITH),
            "take a share away; its subscriptions end at once",
        ),
        Command(
            "list_shared_sessions",
            list_shared_sessions,
            (CLIENT_ID,),
            "the active sessions others shared with you",
        ),
    ]
