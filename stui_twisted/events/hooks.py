"""What the session service publishes, kept out of its modules (one call per hook)."""

from __future__ import annotations

from stui_twisted.events.hub import clip_text


async def evaluation_finished(service, session, call, index: int, *, outcome=None, error=None):
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
            "by": call.client_id or session.client_id,
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
            "by": call.client_id or session.client_id,
        }
    hub.publish(session.session_id, "evaluation_finished", data)
    await durable(service, session)


def evaluation_started(service, session, call, index: int, code: str) -> None:
    hub = getattr(service, "events", None)
    if hub is not None:
        data = {
            "history_index": index,
            "code": clip_text(code),
            "by": call.client_id or session.client_id,
        }
        hub.publish(session.session_id, "evaluation_started", data)


async def durable(service, session) -> None:
    """Under C{always}, wait until the session's events are on disk."""
    hub = getattr(service, "events", None)
    if hub is not None and service.settings.durability == "always":
        await hub.sync(session.session_id)
