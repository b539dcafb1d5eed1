"""Team presence: conversations counted per client id, from the first request naming it to close."""

from __future__ import annotations

from twisted.internet import task

from stui_twisted.events.hub import TEAM, EventHub
from stui_twisted.events.presence import MAX_IDS_PER_CONVERSATION, Presence
from stui_twisted.sessions.policy import CLIENT_ID_PATTERN
from tests.helpers import context, dispatch, make_dispatcher, write_users
from tests.unit.test_auth import make_auth


class Connection:
    def sendEvent(self, data: bytes) -> None:  # noqa: N802
        pass


def _presence(auth=None):
    hub = EventHub(task.Clock(), None)
    presence = Presence(hub, valid=CLIENT_ID_PATTERN.fullmatch)
    dispatcher = make_dispatcher(auth=auth)
    dispatcher.addClientObserver(presence.note)
    return hub, presence, dispatcher


def _conversation():
    ctx = context()
    ctx.connection = Connection()
    return ctx


def _seen(hub) -> list[tuple]:
    return [
        (e["data"]["client_id"], e["data"]["connections"], e["data"]["joined"])
        for e in hub.event_log(TEAM).since(0)
    ]


def test_requests_naming_a_client_id_count_their_conversation_until_it_closes():
    hub, presence, dispatcher = _presence()
    one, two = _conversation(), _conversation()
    request = {"id": 1, "command": "get_session_info", "parameters": {"client_id": "dave"}}
    dispatch(dispatcher, request, one)
    dispatch(dispatcher, request, one)
    dispatch(dispatcher, {"id": 2, "command": "ping"}, two)  # names nobody
    dispatch(dispatcher, request, two)
    assert presence.counts == {"dave": 2}
    one.outbox.close()
    two.outbox.close()
    assert _seen(hub) == [
        ("dave", 1, True),
        ("dave", 2, True),
        ("dave", 1, False),
        ("dave", 0, False),
    ]
    assert presence.counts == {}


def test_only_well_formed_ids_count_and_a_conversation_counts_for_a_bounded_number():
    hub, presence, dispatcher = _presence()
    ctx = _conversation()
    for number in range(MAX_IDS_PER_CONVERSATION + 5):
        presence.note(ctx, f"client-{number}")
    presence.note(ctx, "not a client id!")
    assert len(presence.counts) == MAX_IDS_PER_CONVERSATION
    ctx.outbox.close()
    assert presence.counts == {} and len(_seen(hub)) == 2 * MAX_IDS_PER_CONVERSATION


def test_authenticating_counts_the_conversation_for_its_principal(tmp_path):
    write_users(tmp_path / "users", erin="secret")
    hub, presence, dispatcher = _presence(auth=make_auth(tmp_path / "users"))
    ctx = _conversation()
    login = {"id": 1, "command": "authenticate"}
    login["parameters"] = {"username": "erin", "password": "secret"}
    assert dispatch(dispatcher, login, ctx)["status"] == "success"
    assert presence.counts == {"erin": 1}
    dispatch(dispatcher, {"id": 2, "command": "get_session_info"}, ctx)  # acts as erin
    assert _seen(hub) == [("erin", 1, True)]
