"""The Rust C{stui-protocol} crate's envelope ("Format A", stui-compat.md §1).

A request object that has C{payload} and no C{command} is Format A::

    {"id": "…", "version": "1.0.0", "timestamp": "…",
     "payload": {"type": "Request",
                 "data": {"request_type": "Evaluate", "params": {"code": "3 + 4"}}}}

L{parse} turns it into the flat L{stui_twisted.protocol.envelope.Request}
the dispatcher runs, with a L{FormatA} attached that knows how to shape
the result and the error back into the crate's Response/Error envelope.  The
dispatcher runs the same command table for both formats; only translation
lives here.
"""

from __future__ import annotations

import json
import re
from typing import Any

from stui_twisted.protocol.envelope import (
    Request,
    RequestError,
    _dumps,
    _sanitize,
    iso_timestamp,
    json_type_name,
)
from stui_twisted.protocol.errors import StuiError

VERSION = "1.0.0"

#: Flat error types the crate calls by another name.
CRATE_CODES = {"UnknownCommand": "UnsupportedOperation"}

#: Fields the crate declares as integers (stui-compat.md §1).
INTEGER_FIELDS = ("execution_time", "uptime", "size", "total_count", "hash")

_OBJECT_ID = re.compile(r"obj_\d+")
_UPPER = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")

#: request_type -> flat command, for the types whose names are not the
#: PascalCase of the command (the rest map generically).
_SPECIAL = {
    "Ping": "ping",
    "Evaluate": "evaluate",
    "Inspect": "inspect",
    "BrowseClass": "browse_class",
    "ListClasses": "list_classes",
    "GetMethod": "get_method",
    "SystemInfo": "system_info",
}


def is_format_a(message: dict) -> bool:
    """Whether a decoded request object is Format A: C{payload} and no C{command}."""
    return "payload" in message and "command" not in message


def snake_case(request_type: str) -> str:
    """C{CreateSession} -> C{create_session} (the generic mapping)."""
    return _UPPER.sub("_", request_type).lower()


def _malformed(message: str, request_id: Any, field: str) -> RequestError:
    error = RequestError(message, request_id, field=field)
    error.format_a = FormatA(request_id, None, {})
    return error


def parse(message: dict) -> Request:
    """The flat L{Request} for a Format A request object, or raise (in Format A).

    Raised errors carry a C{format_a} attribute, so the dispatcher answers
    them in Format A too.
    """
    request_id = message.get("id")
    payload = message["payload"]
    if not isinstance(payload, dict):
        raise _malformed(
            f"field 'payload' must be an object, not {json_type_name(payload)}",
            request_id,
            "payload",
        )
    if payload.get("type") != "Request":
        raise _malformed(
            f"field 'payload.type' must be \"Request\", not {json.dumps(payload.get('type'))[:40]}",
            request_id,
            "payload.type",
        )
    data = payload.get("data")
    if not isinstance(data, dict):
        raise _malformed(
            f"field 'payload.data' must be an object, not {json_type_name(data)}",
            request_id,
            "payload.data",
        )
    request_type = data.get("request_type")
    if not isinstance(request_type, str) or not request_type:
        raise _malformed(
            "field 'payload.data.request_type' is required (a string such as \"Evaluate\")",
            request_id,
            "payload.data.request_type",
        )
    params = data.get("params")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise _malformed(
            f"field 'payload.data.params' must be an object, not {json_type_name(params)}",
            request_id,
            "payload.data.params",
        )
    token = message.get("token")
    if token is not None and not isinstance(token, str):
        raise _malformed("field 'token' must be a string", request_id, "token")
    shape = FormatA(request_id, request_type, params)
    parameters = _flat_parameters(request_type, params)
    if request_type == "Debug":
        try:
            command, debug_parameters = _debug_command(params.get("operation"))
        except StuiError as error:
            error.format_a = shape
            error.request_id = request_id
            raise
        parameters.pop("operation", None)
        parameters.update(debug_parameters)
    else:
        command = _SPECIAL.get(request_type) or snake_case(request_type)
    return Request(
        command=command,
        id=request_id,
        parameters=parameters,
        token=token,
        format_a=shape,
    )


def _session_of(context: Any) -> str | None:
    """C{params.context} names a session when it is a session id string."""
    if isinstance(context, str) and context.startswith("s_"):
        return context
    return None


def _flat_parameters(request_type: str, params: dict) -> dict:
    flat = dict(params)
    session_id = _session_of(params.get("context"))
    if session_id is not None and "session_id" not in flat:
        flat["session_id"] = session_id
    if request_type == "Evaluate":
        mode = params.get("evaluation_mode", params.get("mode"))
        if isinstance(mode, str):
            flat["mode"] = mode.lower()
    elif request_type == "Inspect":
        target = params.get("target")
        if isinstance(target, str):
            if _OBJECT_ID.fullmatch(target):
                flat.setdefault("object_id", target)
            else:
                flat.setdefault("expression", target)
    elif request_type == "SystemInfo":
        if isinstance(params.get("info_type"), str):
            flat["info_type"] = params["info_type"].lower()
    return flat


#: Debug operations without arguments -> (flat command, parameters) (debugger.md §4)
_DEBUG_OPERATIONS = {
    "StepInto": ("debug_step", {"mode": "into"}),
    "StepOver": ("debug_step", {"mode": "over"}),
    "StepOut": ("debug_step", {"mode": "out"}),
    "Continue": ("debug_continue", {}),
    "GetStackTrace": ("debug_stack", {}),
    "GetLocalVars": ("debug_locals", {}),
}


def _debug_command(operation: Any) -> tuple[str, dict]:
    """The flat debugger command for a Format A C{Debug} C{operation}."""
    if isinstance(operation, str) and operation in _DEBUG_OPERATIONS:
        command, parameters = _DEBUG_OPERATIONS[operation]
        return command, dict(parameters)
    if isinstance(operation, dict) and len(operation) == 1:
        ((name, place),) = operation.items()
        if name in ("SetBreakpoint", "RemoveBreakpoint") and isinstance(place, dict):
            command = "set_breakpoint" if name == "SetBreakpoint" else "remove_breakpoint"
            return command, {"file": place.get("file"), "line": place.get("line")}
    raise StuiError(
        "UnsupportedOperation",
        f"Debug operation {str(operation)[:60]!r} is not one of "
        f"{', '.join([*_DEBUG_OPERATIONS, 'SetBreakpoint', 'RemoveBreakpoint'])}",
        request_type="Debug",
        parameter="operation",
    )


def _integer(value: Any) -> Any:
    if isinstance(value, float):
        return round(value)
    return value


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(_sanitize(value), ensure_ascii=False, default=str)


class FormatA:
    """How one Format A request is answered: its id and request type."""

    __slots__ = ("request_id", "request_type", "params")

    def __init__(self, request_id: Any, request_type: str | None, params: dict) -> None:
        self.request_id = request_id
        self.request_type = request_type
        self.params = params

    # -- results --

    def shape(self, result: Any) -> Any:
        """The response C{data} for a flat command's C{result}."""
        if not isinstance(result, dict):
            return result
        data = dict(result)
        for name in INTEGER_FIELDS:
            if name in data:
                data[name] = _integer(data[name])
        shaper = getattr(self, "_shape_" + (self.request_type or ""), None)
        if shaper is not None:
            data = shaper(data)
        return data

    def _shape_Ping(self, data: dict) -> dict:  # noqa: N802 - named after the request type
        message = self.params.get("message")
        data["message"] = message if isinstance(message, str) else "pong"
        data["status"] = "ready"
        return data

    def _shape_Evaluate(self, data: dict) -> dict:  # noqa: N802
        if data.get("result") is None:
            data["result"] = "None"
        data["has_error"] = False
        return data

    def _shape_Inspect(self, data: dict) -> dict:  # noqa: N802
        private = self.params.get("include_private") is True
        attributes = [
            a for a in data.get("attributes", []) if private or not a["name"].startswith("_")
        ]
        methods = [m for m in data.get("methods") or [] if private or not m.startswith("_")]
        return {
            "object_info": {
                "class_name": data.get("class_name"),
                "string_representation": data.get("string_representation"),
                "hash": _integer(data.get("hash")) or 0,
                "size": _integer(data.get("size")) or 0,
            },
            "instance_vars": {a["name"]: a["repr"] for a in attributes},
            "methods": methods,
            "object_id": data.get("object_id"),
            "session_id": data.get("session_id"),
            "items": data.get("items", []),
            "truncated": data.get("truncated", False),
        }

    def _shape_Debug(self, data: dict) -> dict:  # noqa: N802
        frame = data.get("paused_at") or (data.get("frames") or [None])[0] or {}
        if "breakpoint_id" in data and "removed" not in data:
            sentence = (
                f"breakpoint {data['breakpoint_id']} set at {data.get('file')}:{data.get('line')}"
            )
        elif "removed" in data:
            sentence = "breakpoint removed" if data["removed"] else "no breakpoint there"
        elif data.get("finished"):
            sentence = "the evaluation finished"
        elif data.get("resumed"):
            sentence = "resumed"
        elif frame:
            sentence = f"paused at {frame.get('function')} line {frame.get('line')}"
        else:
            sentence = "ok"
        data["result"] = sentence
        data["debug_info"] = {
            "current_line": _text(frame.get("line", "")),
            "current_method": _text(frame.get("function", "")),
            "local_vars": {v["name"]: v["repr"] for v in data.get("variables", [])},
        }
        return data

    def _shape_ListClasses(self, data: dict) -> dict:  # noqa: N802
        data["total_count"] = _integer(data.get("total_count"))
        return data

    def _shape_SystemInfo(self, data: dict) -> dict:  # noqa: N802
        info = data.get("info")
        if isinstance(info, dict):
            data["info"] = {key: _text(value) for key, value in info.items()}
        return data

    # -- the envelope --

    def _envelope(self, response_type: str, data: Any, now: float | None) -> bytes:
        reply = {
            "id": self.request_id,
            "version": VERSION,
            "timestamp": iso_timestamp(now),
            "payload": {
                "type": "Response",
                "data": {"response_type": response_type, "data": data},
            },
        }
        try:
            return _dumps(reply)
        except ValueError:
            reply["payload"]["data"]["data"] = _sanitize(data)
            return _dumps(reply)

    def encode_success(self, result: Any, now: float | None = None) -> bytes:
        """The bytes of a Format A Response to a successful request."""
        return self._envelope(self.request_type, self.shape(result), now)

    def encode_error(self, error: StuiError, now: float | None = None) -> bytes:
        """The bytes of a Format A Error response."""
        code = CRATE_CODES.get(error.error_type, error.error_type)
        message = error.message
        details = dict(error.details)
        if error.error_type == "UnknownCommand":
            message = (
                f"request_type {str(self.request_type)[:100]!r} is not supported; "
                "'Describe' lists the commands (their PascalCase names are request types)"
            )
            details = {"request_type": str(self.request_type)[:100]}
        traceback = details.pop("traceback", None)
        data = {
            "code": code,
            "message": message,
            "details": {str(key): _text(value) for key, value in details.items()},
        }
        if isinstance(traceback, list):
            data["stack_trace"] = "\n".join(str(line) for line in traceback)
        return self._envelope("Error", data, now)
