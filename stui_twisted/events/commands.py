"""The event commands: subscribe, unsubscribe, get_events (events.md §2)."""

from __future__ import annotations

from stui_twisted.access.sharing import OWNER, role_of
from stui_twisted.dispatch.dispatcher import Command, Param
from stui_twisted.events.hub import TEAM
from stui_twisted.protocol.errors import invalid_parameter

STREAM = Param(
    "session_id", "string", description='defaults to the current session; "team" for the team'
)


def build_event_commands(service, hub, *, max_limit: int = 1000, max_wait: float = 30.0):
    """The commands, bound to the session service (access checks) and the hub."""

    async def stream_of(call, command: str) -> tuple[str, tuple[str, str] | None]:
        """The stream key, and C{(client id, access)} when a non-owner watches it."""
        if call.params.get("session_id") == TEAM:
            return TEAM, None
        session = await service._session_for(
            call.params.get("session_id"),
            call.client_id,
            call.context,
            command=command,
            touch=False,
        )
        access = role_of(session.client_id, session.shares, call.client_id)
        watcher = None if access == OWNER else (call.client_id, access)
        return session.session_id, watcher

    def since_param(call, required: bool) -> int | None:
        since = call.params.get("since")
        if since is None:
            if required:
                raise invalid_parameter("since", "is required")
            return None
        if since < 0:
            raise invalid_parameter("since", f"must be 0 or more, not {since}")
        return since

    async def watchers_durable(key: str) -> None:
        """Under C{always}, a C{watcher_joined}/C{watcher_left} is on disk before the reply."""
        if key != TEAM and hub.durability == "always":
            await hub.sync(key)

    async def subscribe(call) -> dict:
        key, watcher = await stream_of(call, "subscribe")
        since = since_param(call, False)
        result = hub.subscribe(call.context, call.context.connection, key, since, watcher)
        await watchers_durable(key)
        return result

    async def unsubscribe(call) -> dict:
        if call.params.get("session_id") == TEAM:
            key = TEAM
        else:
            key = call.params.get("session_id") or call.context.current_session_id or ""
        unsubscribed = hub.unsubscribe(call.context, key)
        await watchers_durable(key)
        return {"unsubscribed": unsubscribed}

    async def get_events(call) -> dict:
        key, _watcher = await stream_of(call, "get_events")
        since = since_param(call, True)
        limit = call.params["limit"]
        if not 1 <= limit <= max_limit:
            raise invalid_parameter("limit", f"must be between 1 and {max_limit}, not {limit}")
        wait = call.params["wait"]
        if not 0 <= wait <= max_wait:
            raise invalid_parameter("wait", f"must be between 0 and {max_wait:g} s, not {wait}")
        return await hub.get_events(key, since, limit, wait)

    return [
        Command(
            "subscribe",
            subscribe,
            (
                STREAM,
                Param("client_id", "string"),
                Param("since", "integer", description="replay events with seq > since first"),
            ),
            "receive a session's (or the team's) events on this connection",
        ),
        Command(
            "unsubscribe",
            unsubscribe,
            (STREAM, Param("client_id", "string")),
            "stop receiving a stream's events",
        ),
        Command(
            "get_events",
            get_events,
            (
                STREAM,
                Param("client_id", "string"),
                Param("since", "integer", True),
                Param("limit", "integer", default=100, description=f"at most {max_limit}"),
                Param(
                    "wait", "number", default=0, description=f"long-poll s, at most {max_wait:g}"
                ),
            ),
            "events with seq > since from the log (long-poll with wait)",
        ),
    ]
