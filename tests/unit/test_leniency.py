"""Flat-format leniency for clients written against STUI's documents (stui-compat.md §2)."""

from __future__ import annotations

from tests.helpers import dispatch, make_dispatcher


def params_of(message: dict) -> dict:
    reply = dispatch(make_dispatcher(), message)
    assert reply["status"] == "success", reply
    return reply["result"]["params"]


def test_object_id_alias_and_object_id_wins():
    assert params_of({"command": "inspect", "parameters": {"objectId": "obj_3"}})["object_id"] == (
        "obj_3"
    )
    both = {"object_id": "obj_1", "objectId": "obj_2"}
    assert params_of({"command": "inspect", "parameters": both})["object_id"] == "obj_1"


def test_evaluation_mode_alias_and_case_insensitive_mode():
    given = {"code": "1", "evaluation_mode": "Display"}
    assert params_of({"command": "evaluate", "parameters": given})["mode"] == "display"
    given = {"code": "1", "mode": "EXECUTE", "evaluation_mode": "display"}
    assert params_of({"command": "evaluate", "parameters": given})["mode"] == "execute"


def test_top_level_parameters_when_parameters_is_absent():
    params = params_of({"id": 1, "command": "restore_session", "session_id": "s_abc"})
    assert params["session_id"] == "s_abc"


def test_parameters_alone_count_when_present():
    reply = dispatch(
        make_dispatcher(),
        {"command": "restore_session", "parameters": {}, "session_id": "s_abc"},
    )
    assert reply["error_type"] == "InvalidRequest"
    assert reply["details"] == {"parameter": "session_id"}


def test_top_level_parameters_are_type_checked():
    reply = dispatch(make_dispatcher(), {"command": "evaluate", "code": 5})
    assert reply["error"] == "parameter 'code' must be a string, not a number"


def test_ping_and_describe_say_what_the_image_runs():
    dispatcher = make_dispatcher()
    for command in ("ping", "describe"):
        result = dispatch(dispatcher, {"command": command})["result"]
        assert result["language"] == "python"
        assert result["language_version"].count(".") == 2


def test_whole_seconds_are_integers_in_limits():
    limits = dispatch(make_dispatcher(), {"command": "describe"})["result"]["limits"]
    for name in ("default_timeout", "max_timeout", "cleanup_interval"):
        assert type(limits[name]) is int, name
