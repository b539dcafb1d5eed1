"""What the session service publishes, kept out of its modules (one call per hook).

C{service} is the session service (its C{events} hub, its C{settings}); C{by}
is the acting client id, or None for the session's owner.
"""

from __future__ import annotations

from stui_twisted.events.hub import clip_text
from stui_twisted.protocol.envelope import iso_timestamp


async def evaluation_finished(service, session, by, index: int, *, outcome=None, error=None):
    """Publish C{evaluation_finished}; under C{always} it is on disk before the reply."""
    hub = getattr(service, "events", None)
    if hub is None:
        return
    if outcome is not None:
        data = {
            "history_index": index,
            "ok": True,
            "result": outcome.get("result"),
            "result_type": outcome.get("result_type"),
            "object_id": outcome.get("object_id"),
            "error_type": None,
            "error": None,
            "execution_time": outcome.get("execution_time"),
            "output": clip_text(outcome.get("output") or ""),
            "by": by or session.client_id,
        }
    else:
        data = {
            "history_index": index,
            "ok": False,
            "result": None,
            "result_type": None,
            "object_id": None,
            "error_type": error.error_type,
            "error": error.message,
            "execution_time": None,
            "output": clip_text(error.details.get("output") or ""),
            "by": by or session.client_id,
        }
    hub.publish(session.session_id, "evaluation_finished", data)
    await durable(service, session)


def evaluation_started(service, session, by, index: int, code: str) -> None:
    hub = getattr(service, "events", None)
    if hub is not None:
        data = {
            "history_index": index,
            "code": clip_text(code),
            "by": by or session.client_id,
        }
        hub.publish(session.session_id, "evaluation_started", data)


def output(service, session_id: str, history_index: int | None, pieces) -> None:
    """Publish what a running evaluation wrote, one C{output} event per piece.

    Only for a session the service still has (a closed session's evaluation
    may still be stopping); under C{always} the chunks are synced within the
    flush interval, and all of them before C{evaluation_finished}'s reply.
    """
    hub = getattr(service, "events", None)
    if hub is None or session_id not in service.sessions:
        return
    for piece in pieces if isinstance(pieces, list) else ():
        if not isinstance(piece, list) or len(piece) != 2:
            continue
        name, text = piece
        if name not in ("stdout", "stderr") or not isinstance(text, str) or not text:
            continue
        data = {"history_index": history_index, "name": name, "text": clip_text(text)}
        hub.publish(session_id, "output", data)
    hub.schedule_sync()


async def durable(service, session) -> None:
    """Under C{always}, wait until the session's events are on disk."""
    hub = getattr(service, "events", None)
    if hub is not None and service.settings.durability == "always":
        await hub.sync(session.session_id)


def publish(service, session_id: str | None, event: str, data: dict) -> None:
    """Publish one event if the event machinery is wired (C{session_id=None}: the team)."""
    hub = getattr(service, "events", None)
    if hub is not None:
        hub.publish(session_id, event, data)


def state_updated(service, session, by, parts) -> None:
    data = {
        "by": by or session.client_id,
        "parts": list(parts),
        "last_modified": iso_timestamp(session.last_modified),
    }
    publish(service, session.session_id, "state_updated", data)


def share_changed(service, session_id: str, client_id: str, access: str | None) -> None:
    """C{client_id}'s share is now C{access} (None: unshared; its subscriptions end)."""
    hub = getattr(service, "events", None)
    if hub is not None:
        hub.share_changed(session_id, client_id, access)
