"""The envelope and error model of protocol.md section 2, through the dispatcher."""

from __future__ import annotations

import json
import platform
import re

import pytest
from twisted.internet import defer

from stui_twisted.protocol.errors import StuiError
from tests.helpers import NullImageService, context, dispatch, make_dispatcher

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def dispatcher():
    return make_dispatcher()


def test_ping_echoes_id_and_reports_versions(dispatcher):
    reply = dispatch(dispatcher, {"id": "c-1", "command": "ping"})
    assert reply["id"] == "c-1"
    assert reply["status"] == "success"
    assert reply["result"]["message"] == "pong"
    assert reply["result"]["server"] == "stui-twisted"
    assert reply["result"]["protocol_version"] == "1.0"
    assert TIMESTAMP.match(reply["timestamp"])


@pytest.mark.parametrize("request_id", [7, 1.5, None, "x" * 50])
def test_id_is_echoed_unchanged(dispatcher, request_id):
    assert dispatch(dispatcher, {"id": request_id, "command": "ping"})["id"] == request_id


@pytest.mark.parametrize(
    "raw, error_type, words",
    [
        (b"not json", "InvalidRequest", "not valid JSON"),
        (b"[]", "InvalidRequest", "must be a JSON object, not an array"),
        (b'"ping"', "InvalidRequest", "must be a JSON object"),
        (b'{"command": 5}', "InvalidRequest", "field 'command' must be a string"),
        (b'{"id": 1}', "InvalidRequest", "field 'command' is required"),
        (b"\xff\xfe{}", "InvalidRequest", "not valid UTF-8"),
        (
            b'{"command": "ping", "parameters": []}',
            "InvalidRequest",
            "'parameters' must be an object",
        ),
        (b'{"command": "ping", "id": {"a": 1}}', "InvalidRequest", "'id' must be"),
        (b'{"command": "ping", "x": NaN}', "InvalidRequest", "NaN"),
        (b"[" * 100_000 + b"]" * 100_000, "InvalidRequest", ""),
        (b'{"command": "ping", "n": ' + b"9" * 10_000 + b"}", "InvalidRequest", "not valid JSON"),
        (b'{"command": "frobnicate"}', "UnknownCommand", "unknown command 'frobnicate'"),
    ],
)
def test_malformed_requests_get_the_documented_error(dispatcher, raw, error_type, words):
    reply = dispatch(dispatcher, raw)
    assert reply["status"] == "error"
    assert reply["error_type"] == error_type
    assert words in reply["error"]
    assert isinstance(reply["details"], dict)
    assert TIMESTAMP.match(reply["timestamp"])


def test_error_reply_keeps_the_id_when_it_could_be_read(dispatcher):
    reply = dispatch(dispatcher, b'{"id": "k", "command": 5}')
    assert reply["id"] == "k"
    assert reply["details"] == {"field": "command"}


def test_parameter_types_are_checked_and_named(dispatcher):
    reply = dispatch(
        dispatcher,
        {"id": 1, "command": "create_session", "parameters": {"client_id": 42}},
    )
    assert reply["error_type"] == "InvalidRequest"
    assert reply["error"] == "parameter 'client_id' must be a string, not a number"
    assert reply["details"] == {"parameter": "client_id"}


def test_required_parameter_missing(dispatcher):
    reply = dispatch(dispatcher, {"command": "create_session"})
    assert reply["error"] == "parameter 'client_id' is required"


def test_top_level_client_id_is_an_alias(dispatcher):
    reply = dispatch(dispatcher, {"command": "create_session", "client_id": "alice"})
    assert reply["status"] == "success"
    assert reply["result"]["params"]["client_id"] == "alice"


def test_describe_lists_every_command_with_parameters(dispatcher):
    result = dispatch(dispatcher, {"command": "describe"})["result"]
    expected = {
        "ping",
        "describe",
        "authenticate",
        "create_session",
        "restore_session",
        "update_session_state",
        "close_session",
        "get_session_info",
        "list_client_sessions",
        "get_session_statistics",
        "save_context",
        "load_context",
        "get_context_summary",
        "clear_context",
        "evaluate",
        "inspect",
        "complete",
        "interrupt",
        "get_evaluation",
        "send_input",
        "list_classes",
        "browse_class",
        "get_method",
        "system_info",
        "set_breakpoint",
        "remove_breakpoint",
        "list_breakpoints",
        "debug_state",
        "debug_stack",
        "debug_locals",
        "debug_evaluate",
        "debug_step",
        "debug_continue",
        "debug_post_mortem",
        "whoami",
        "validate_feature_access",
        "list_clients",
        "disconnect_client",
        "revoke_tokens",
        "list_all_sessions",
        "share_session",
        "unshare_session",
        "list_shared_sessions",
    }
    assert set(result["commands"]) == expected
    assert result["commands"]["evaluate"]["parameters"]["code"]["required"] is True
    assert result["commands"]["evaluate"]["parameters"]["mode"]["aliases"] == ["evaluation_mode"]
    assert result["commands"]["inspect"]["parameters"]["object_id"]["aliases"] == ["objectId"]
    assert result["commands"]["browse_class"]["parameters"]["class_name"]["required"] is True
    assert (result["language"], result["language_version"]) == (
        "python",
        platform.python_version(),
    )
    assert result["auth_required"] is False
    assert result["limits"]["max_message_bytes"] == 8 * 1024 * 1024


def test_handler_bug_becomes_internal_error_without_traceback():
    class Broken:
        settings = None

        def __getattr__(self, name):
            async def handler(call):
                raise ZeroDivisionError("secret detail")

            return handler

    dispatcher = make_dispatcher(service=Broken())
    reply = dispatch(dispatcher, {"id": 3, "command": "get_session_statistics"})
    assert reply["error_type"] == "InternalError"
    assert "secret detail" not in reply["error"]
    assert "Traceback" not in str(reply)


def test_lone_surrogates_in_a_request_still_get_a_valid_reply(dispatcher):
    reply = dispatch(dispatcher, b'{"id": "\\ud800", "command": "\\udc00x"}')
    assert reply["error_type"] == "UnknownCommand"
    assert reply["id"] == "\ud800"


@pytest.mark.parametrize("number", [b"2147e83648", b"-1e400"])
def test_numbers_that_overflow_to_infinity_are_invalid_json(dispatcher, number):
    reply = dispatch(dispatcher, b'{"id": ' + number + b', "command": "ping"}')
    assert reply["error_type"] == "InvalidRequest"
    assert "out of range" in reply["error"]
    assert reply["id"] is None


def test_timestamps_match_datetime_formatting_across_seconds():
    from datetime import UTC, datetime

    from stui_twisted.protocol.envelope import iso_timestamp

    for seconds in (0.0, 1790000000.123, 1790000000.5, 1790000001.001, 1790000001.999, 2e9 + 0.25):
        moment = datetime.fromtimestamp(seconds, UTC)
        expected = moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
        assert iso_timestamp(seconds) == expected


# -- handlers that finish now and handlers that wait -----------------------------------


class Scripted(NullImageService):
    """A service whose C{get_session_statistics} runs a scripted coroutine."""

    def __init__(self, script) -> None:
        super().__init__()
        self.script = script

    async def handle(self, name, call):
        return await self.script()


def _answer(script, command: str = "get_session_statistics"):
    dispatcher = make_dispatcher(service=Scripted(script))
    data = json.dumps({"id": "a", "command": command}).encode()
    return dispatcher, dispatcher.answer(context(), data)


def test_a_handler_that_does_not_wait_is_answered_in_the_same_call():
    async def script():
        return {"now": True}

    _, reply = _answer(script)
    assert isinstance(reply, bytes)
    assert json.loads(reply)["result"] == {"now": True}


def test_a_handler_that_waits_is_answered_when_its_deferreds_fire():
    first, second = defer.Deferred(), defer.Deferred()

    async def script():
        a = await first
        b = await second
        return {"sum": a + b}

    dispatcher, reply = _answer(script)
    assert isinstance(reply, defer.Deferred)
    replies: list[bytes] = []
    reply.addCallback(replies.append)
    first.callback(2)
    assert replies == []
    second.callback(3)
    assert json.loads(replies[0])["result"] == {"sum": 5}
    assert dispatcher.stats.requests == 1 and dispatcher.stats.errors == 0


def test_an_error_thrown_into_a_waiting_handler_reaches_its_except_clause():
    waiting = defer.Deferred()

    async def script():
        try:
            await waiting
        except KeyError as error:
            raise StuiError("SessionNotFound", f"caught {error.args[0]}") from None
        return {}

    _, reply = _answer(script)
    replies: list[bytes] = []
    reply.addCallback(replies.append)
    waiting.errback(KeyError("it"))
    decoded = json.loads(replies[0])
    assert decoded["error_type"] == "SessionNotFound"
    assert decoded["error"] == "caught it"


def test_a_bug_after_waiting_is_an_internal_error():
    waiting = defer.Deferred()

    async def script():
        await waiting
        raise ZeroDivisionError("secret detail")

    _, reply = _answer(script)
    replies: list[bytes] = []
    reply.addCallback(replies.append)
    waiting.callback(None)
    decoded = json.loads(replies[0])
    assert decoded["error_type"] == "InternalError"
    assert "secret" not in decoded["error"]


def test_cancelling_the_reply_cancels_what_the_handler_awaits():
    waiting = defer.Deferred()
    cleaned: list[str] = []

    async def script():
        try:
            await waiting
        finally:
            cleaned.append("finally ran")
        return {}

    _, reply = _answer(script)
    replies: list[bytes] = []
    reply.addCallback(replies.append)
    reply.cancel()
    assert waiting.called
    assert cleaned == ["finally ran"]
    assert json.loads(replies[0])["error_type"] == "InternalError"


def test_a_result_that_cannot_be_encoded_is_an_internal_error():
    async def script():
        return {"not json": object()}

    _, reply = _answer(script)
    decoded = json.loads(reply)
    assert decoded["error_type"] == "InternalError"
    assert decoded["id"] == "a"


def test_replies_encode_like_json_dumps_and_survive_values_json_lacks():
    from stui_twisted.protocol.envelope import encode_success

    result = {"text": 'héllo \u2028 "quoted"', "n": [1, 2.5, -0.0, 10**30], "none": None, "t": True}
    reply = json.loads(encode_success("r", result, 0.0))
    assert reply["result"] == result
    assert encode_success("r", result, 0.0).decode() == json.dumps(
        {"id": "r", "status": "success", "result": result, "timestamp": "1970-01-01T00:00:00.000Z"},
        ensure_ascii=False,
        separators=(",", ":"),
    )
    odd = json.loads(encode_success("r", {"nan": float("nan"), "inf": [float("-inf")]}, 0.0))
    assert odd["result"] == {"nan": "nan", "inf": ["-inf"]}
    lone = encode_success("r", {"s": "\ud800"}, 0.0)
    assert json.loads(lone)["result"] == {"s": "\ud800"}


@pytest.mark.parametrize("text", [b'  {"command": "ping"}\r\n\t', b'{"command": "ping"} '])
def test_json_whitespace_around_a_request_is_allowed(dispatcher, text):
    assert dispatch(dispatcher, text)["status"] == "success"


@pytest.mark.parametrize(
    "text", [b'{"command": "ping"} {}', b'{"command": "ping"}\xc2\xa0', b"\x0b{}"]
)
def test_anything_but_json_whitespace_around_a_request_is_invalid(dispatcher, text):
    assert dispatch(dispatcher, text)["error_type"] == "InvalidRequest"
