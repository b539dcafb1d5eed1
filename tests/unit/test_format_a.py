"""Format A, the Rust stui-protocol crate's envelope (stui-compat.md §1), in-process."""

from __future__ import annotations

import json

from stui_twisted.protocol.errors import StuiError
from stui_twisted.protocol.format_a import FormatA, parse, snake_case
from tests.helpers import NullImageService, context, dispatch, make_dispatcher

UUID = "550e8400-e29b-41d4-a716-446655440000"


def request(request_type, params=None, **top) -> dict:
    message = {
        "id": UUID,
        "version": "1.0.0",
        "timestamp": "2025-01-20T10:30:00Z",
        "payload": {"type": "Request", "data": {"request_type": request_type, "params": params}},
    }
    message.update(top)
    return message


def response(reply: dict) -> tuple[str, dict]:
    assert reply["id"] == UUID
    assert reply["version"] == "1.0.0"
    assert reply["timestamp"].endswith("Z")
    assert reply["payload"]["type"] == "Response"
    body = reply["payload"]["data"]
    return body["response_type"], body["data"]


def test_snake_case_of_request_types():
    assert snake_case("CreateSession") == "create_session"
    assert snake_case("GetContextSummary") == "get_context_summary"
    assert snake_case("Ping") == "ping"


def test_ping_is_answered_in_format_a_with_integer_uptime():
    kind, data = response(dispatch(make_dispatcher(), request("Ping", {"message": "hi"})))
    assert kind == "Ping"
    assert data["message"] == "hi"
    assert data["status"] == "ready"
    assert type(data["uptime"]) is int


def test_ping_without_params_says_pong():
    kind, data = response(dispatch(make_dispatcher(), request("Ping")))
    assert data["message"] == "pong"


def test_flat_requests_are_unchanged():
    reply = dispatch(make_dispatcher(), {"id": 1, "command": "ping"})
    assert reply["status"] == "success" and reply["result"]["message"] == "pong"
    assert "payload" not in reply


def test_an_object_with_command_and_payload_is_flat():
    reply = dispatch(make_dispatcher(), {"id": 1, "command": "ping", "payload": {}})
    assert reply["status"] == "success"


def test_unknown_request_type_is_unsupported_operation():
    kind, data = response(dispatch(make_dispatcher(), request("FlyToTheMoon")))
    assert kind == "Error"
    assert data["code"] == "UnsupportedOperation"
    assert "FlyToTheMoon" in data["message"]
    assert data["details"] == {"request_type": "FlyToTheMoon"}


def test_debug_operations_map_to_the_debugger_commands():
    from stui_twisted.protocol.format_a import parse

    cases = [
        ("StepInto", "debug_step", {"mode": "into"}),
        ("StepOver", "debug_step", {"mode": "over"}),
        ("StepOut", "debug_step", {"mode": "out"}),
        ("Continue", "debug_continue", {}),
        ("GetStackTrace", "debug_stack", {}),
        ("GetLocalVars", "debug_locals", {}),
        ({"SetBreakpoint": {"line": 4, "file": "cell:2"}}, "set_breakpoint", {"line": 4}),
        ({"RemoveBreakpoint": {"line": 4, "file": "x.py"}}, "remove_breakpoint", {"line": 4}),
    ]
    for operation, command, parameters in cases:
        parsed = parse(request("Debug", {"operation": operation, "context": "s_1"}))
        assert parsed.command == command, operation
        assert parameters.items() <= parsed.parameters.items(), parsed.parameters
        assert "operation" not in parsed.parameters and parsed.parameters["session_id"] == "s_1"


def test_an_unknown_debug_operation_is_unsupported():
    kind, data = response(
        dispatch(make_dispatcher(), request("Debug", {"operation": "Teleport", "context": None}))
    )
    assert (kind, data["code"]) == ("Error", "UnsupportedOperation")
    assert "Teleport" in data["message"]


def test_malformed_format_a_requests_are_invalid_request_in_format_a():
    dispatcher = make_dispatcher()
    for bad, field in [
        ({"id": UUID, "payload": []}, "payload"),
        ({"id": UUID, "payload": {"type": "Response", "data": {}}}, "payload.type"),
        ({"id": UUID, "payload": {"type": "Request"}}, "payload.data"),
        ({"id": UUID, "payload": {"type": "Request", "data": {}}}, "payload.data.request_type"),
        (request("Ping", [1]), "payload.data.params"),
    ]:
        kind, data = response(dispatch(dispatcher, bad))
        assert kind == "Error", bad
        assert data["code"] == "InvalidRequest", bad
        assert data["details"] == {"field": field}, bad
        assert field in data["message"]


def test_generic_mapping_passes_params_and_returns_the_flat_result():
    kind, data = response(
        dispatch(make_dispatcher(), request("ListClientSessions", {"client_id": "alice"}))
    )
    assert kind == "ListClientSessions"
    assert data["handled"] == "list_client_sessions"
    assert data["params"]["client_id"] == "alice"


def test_parameter_errors_name_the_field_and_details_are_strings():
    kind, data = response(
        dispatch(make_dispatcher(), request("ListClientSessions", {"client_id": 5}))
    )
    assert data["code"] == "InvalidRequest"
    assert "client_id" in data["message"]
    assert all(isinstance(value, str) for value in data["details"].values())


class SessionService(NullImageService):
    """Records create_session and evaluate calls, like the real service's session rule."""

    def __init__(self) -> None:
        super().__init__()
        self.created = []

    async def handle(self, name, call):
        if name == "create_session":
            self.created.append(call.params["client_id"])
            call.context.current_session_id = f"s_made{len(self.created)}"
            return {"session_id": call.context.current_session_id}
        if name == "evaluate":
            return {
                "session_id": call.params["session_id"] or call.context.current_session_id,
                "result": None,
                "result_type": "NoneType",
                "execution_time": 0.731,
                "has_error": False,
                "mode": call.params["mode"],
            }
        return await super().handle(name, call)


def test_a_conversation_without_a_session_gets_one_on_first_use():
    service = SessionService()
    dispatcher = make_dispatcher(service)
    ctx = context()
    kind, data = response(dispatch(dispatcher, request("Evaluate", {"code": "x = 1"}), ctx))
    assert kind == "Evaluate"
    assert data["session_id"] == "s_made1" == ctx.current_session_id
    assert service.created == ["stui"]
    assert data["execution_time"] == 1 and type(data["execution_time"]) is int
    assert data["result"] == "None"
    # the second request uses the current session: nothing new is created
    dispatch(dispatcher, request("Evaluate", {"code": "x"}), ctx)
    assert service.created == ["stui"]


def test_context_names_a_session_and_evaluation_mode_maps_to_mode():
    service = SessionService()
    kind, data = response(
        dispatch(
            make_dispatcher(service),
            request("Evaluate", {"code": "1", "context": "s_other", "evaluation_mode": "Display"}),
        )
    )
    assert service.created == []
    assert data["session_id"] == "s_other"
    assert data["mode"] == "display"


def test_inspect_target_is_an_object_id_or_an_expression():
    assert parse(request("Inspect", {"target": "obj_12"})).parameters["object_id"] == "obj_12"
    flat = parse(request("Inspect", {"target": "obj_12.attr"})).parameters
    assert flat["expression"] == "obj_12.attr" and "object_id" not in flat


def test_inspect_shape_and_include_private():
    result = {
        "object_id": "obj_1",
        "class_name": "P",
        "string_representation": "<P>",
        "size": None,
        "hash": 12.0,
        "methods": ["_hidden", "move"],
        "attributes": [
            {"name": "_p", "type": "int", "repr": "1", "object_id": None},
            {"name": "x", "type": "int", "repr": "2", "object_id": None},
        ],
    }
    data = FormatA(UUID, "Inspect", {"include_private": False}).shape(result)
    assert data["object_info"] == {
        "class_name": "P",
        "string_representation": "<P>",
        "hash": 12,
        "size": 0,
    }
    assert data["instance_vars"] == {"x": "2"}
    assert data["methods"] == ["move"]
    private = FormatA(UUID, "Inspect", {"include_private": True}).shape(result)
    assert private["instance_vars"] == {"_p": "1", "x": "2"}


def test_evaluation_error_carries_stack_trace_and_string_details():
    error = StuiError(
        "EvaluationError",
        "NameError: name 'y' is not defined",
        exception_type="NameError",
        line=1,
        traceback=["Traceback (most recent call last):", "NameError: name 'y' is not defined"],
    )
    reply = json.loads(FormatA(UUID, "Evaluate", {}).encode_error(error))
    kind, data = response(reply)
    assert kind == "Error"
    assert data["code"] == "EvaluationError"
    assert data["details"] == {"exception_type": "NameError", "line": "1"}
    assert data["stack_trace"].startswith("Traceback (most recent call last):\n")


def test_system_info_values_are_strings():
    data = FormatA(UUID, "SystemInfo", {}).shape(
        {"info": {"image_pid": 12, "packages": [{"name": "a", "version": "1"}]}}
    )
    assert data["info"]["image_pid"] == "12"
    assert json.loads(data["info"]["packages"]) == [{"name": "a", "version": "1"}]
