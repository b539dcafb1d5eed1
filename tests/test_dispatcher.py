"""The envelope and error model of protocol.md section 2, through the dispatcher."""

from __future__ import annotations

import re

import pytest

from tests.helpers import dispatch, make_dispatcher

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
        (b'{"command": "ping", "parameters": []}', "InvalidRequest", "'parameters' must be an object"),
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
        "ping", "describe", "authenticate", "create_session", "restore_session",
        "update_session_state", "close_session", "get_session_info", "list_client_sessions",
        "get_session_statistics", "save_context", "load_context", "get_context_summary",
        "clear_context", "evaluate", "inspect", "complete", "interrupt",
    }
    assert set(result["commands"]) == expected
    assert result["commands"]["evaluate"]["parameters"]["code"]["required"] is True
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

    from stui_twisted.envelope import iso_timestamp

    for seconds in (0.0, 1790000000.123, 1790000000.5, 1790000001.001, 1790000001.999, 2e9 + 0.25):
        moment = datetime.fromtimestamp(seconds, UTC)
        expected = moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
        assert iso_timestamp(seconds) == expected
