"""The request/reply envelope of protocol.md section 2: parsing and encoding.

Parsing is strict and total: any byte string either becomes a L{Request}
or raises L{stui_twisted.protocol.errors.StuiError} (C{InvalidRequest}) carrying
the request's C{id} when one could be read, so the error reply can echo it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from stui_twisted.protocol.errors import StuiError
from stui_twisted.protocol.jsoncodec import COMPACT, COMPACT_ASCII
from stui_twisted.protocol.timefmt import iso_timestamp, parse_iso_timestamp

__all__ = [
    "Request",
    "RequestError",
    "encode_error",
    "encode_success",
    "iso_timestamp",  # defined in protocol.timefmt; imported from here by older code
    "parse_iso_timestamp",
    "EncodedResult",
    "decode_message",
    "json_text",
    "parse_flat",
    "whole_seconds",
]

_NO_ID = object()
_ENVELOPE_FIELDS = frozenset({"id", "command", "token"})


def whole_seconds(value: Any) -> Any:
    """A number of seconds as a JSON integer when it is whole (C{3600.0} -> C{3600})."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


@dataclass
class Request:
    """One parsed request: what to do, with which parameters, for which reply id."""

    command: str
    id: Any = None
    parameters: dict = field(default_factory=dict)
    token: str | None = None
    format_a: Any = None
    """A L{stui_twisted.protocol.format_a.FormatA} when the request came in that envelope."""


class RequestError(StuiError):
    """An C{InvalidRequest} that also remembers the request id it could read."""

    def __init__(self, message: str, request_id: Any = None, **details: Any) -> None:
        super().__init__("InvalidRequest", message, **details)
        self.request_id = request_id


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
_ENCODER = COMPACT
_ASCII_ENCODER = COMPACT_ASCII
_JSON_WHITESPACE = " \t\n\r"


def _not_serializable(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# Every reply is encoded here, so the C encoder is made once instead of once
# per reply as JSONEncoder.encode does; same output as _ENCODER, without the
# circular-reference check (replies are trees built by handlers; a cycle
# fails with RecursionError, an internal error like any other encoding bug).
_c_encoder = (
    None
    if json.encoder.c_make_encoder is None
    else json.encoder.c_make_encoder(
        None, _not_serializable, json.encoder.encode_basestring, None, ":", ",", False, False, False
    )
)


def _encode_text(reply: dict) -> str:
    if _c_encoder is None:
        return _ENCODER.encode(reply)
    return "".join(_c_encoder(reply, 0))


json_text = _encode_text
"""The compact JSON text of any value, as it appears inside a reply."""


class EncodedResult(dict):
    """A result that also carries its own JSON text, so a reply need not encode it.

    A handler whose result is mostly the same from call to call (C{ping})
    returns one: L{encode_success} splices C{text} into the reply instead of
    encoding the dict again.  C{text} must be exactly what L{json_text} gives
    for the dict; the dict itself is what every other consumer (Format A, the
    ASCII fallback) sees.
    """

    __slots__ = ("text",)

    def __init__(self, items: dict, text: str) -> None:
        super().__init__(items)
        self.text = text


def _decode_json(text: str) -> Any:
    """What C{json.loads} gives, minus its two whitespace regex scans."""
    body = text.strip(_JSON_WHITESPACE)
    try:
        message, end = _DECODER.raw_decode(body)
        if end != len(body):
            raise json.JSONDecodeError("Extra data", body, end)
        return message
    except RecursionError:
        raise RequestError("request is nested too deeply to parse") from None
    except ValueError as exc:
        # json.JSONDecodeError, NaN/Infinity, and int digit-limit errors.
        raise RequestError(f"request is not valid JSON: {exc}") from None


def decode_message(data: bytes) -> dict:
    """One line/frame as a JSON object, or L{RequestError}."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"request is not valid UTF-8 (byte {exc.start})") from None
    message = _decode_json(text)
    if not isinstance(message, dict):
        raise RequestError(f"request must be a JSON object, not {_json_type_name(message)}")
    return message


def parse_flat(message: dict) -> Request:
    """A decoded flat-envelope request object as a L{Request}, or L{RequestError}."""
    request_id = message.get("id")
    if request_id is not None and (
        isinstance(request_id, bool) or not isinstance(request_id, str | int | float)
    ):
        raise RequestError("field 'id' must be a string, a number or null", None, field="id")
    command = message.get("command")
    if command is None:
        raise RequestError("field 'command' is required", request_id, field="command")
    if not isinstance(command, str):
        raise RequestError(
            f"field 'command' must be a string, not {_json_type_name(command)}",
            request_id,
            field="command",
        )
    if "parameters" not in message:
        # Clients written against STUI's session documents put the parameters
        # at the top level; the command's declared ones are read from there.
        parameters = {k: v for k, v in message.items() if k not in _ENVELOPE_FIELDS}
    else:
        parameters = message["parameters"]
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        raise RequestError(
            f"field 'parameters' must be an object, not {_json_type_name(parameters)}",
            request_id,
            field="parameters",
        )
    if "client_id" in message and "client_id" not in parameters:
        parameters = dict(parameters, client_id=message["client_id"])
    token = message.get("token")
    if token is not None and not isinstance(token, str):
        raise RequestError("field 'token' must be a string", request_id, field="token")
    return Request(command=command, id=request_id, parameters=parameters, token=token)


def _json_type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


json_type_name = _json_type_name


def _dumps(reply: dict) -> bytes:
    text = _encode_text(reply)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (e.g. echoed from a request's "\ud800") is not UTF-8;
        # the ASCII form escapes it and is still valid JSON.
        return _ASCII_ENCODER.encode(reply).encode("ascii")


def _sanitize(value: Any) -> Any:
    """Replace non-finite floats (not JSON) by their string form, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _sanitize(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_sanitize(v) for v in value]
    return value


def _spliced_success(request_id: Any, result: dict, timestamp: str) -> bytes | None:
    """The success reply written as text around the encoded result, or None.

    The same bytes as encoding C{{"id", "status", "result", "timestamp"}}
    compactly, without building and encoding that dict; None when the result
    needs the general path (NaN to sanitize, a lone surrogate to escape).
    """
    if _c_encoder is None:
        return None
    try:
        body = result.text if type(result) is EncodedResult else "".join(_c_encoder(result, 0))
        return (
            f'{{"id":{"".join(_c_encoder(request_id, 0))},"status":"success",'
            f'"result":{body},"timestamp":"{timestamp}"}}'
        ).encode()
    except ValueError:  # NaN, or a lone surrogate (UnicodeEncodeError)
        return None


def encode_success(request_id: Any, result: dict, now: float | None = None) -> bytes:
    """The bytes of a success reply (no line terminator)."""
    timestamp = iso_timestamp(now)
    spliced = _spliced_success(request_id, result, timestamp)
    if spliced is not None:
        return spliced
    reply = {
        "id": request_id,
        "status": "success",
        "result": result,
        "timestamp": timestamp,
    }
    try:
        return _dumps(reply)
    except ValueError:
        reply["result"] = _sanitize(result)
        return _dumps(reply)


def encode_error(request_id: Any, error: StuiError, now: float | None = None) -> bytes:
    """The bytes of an error reply (no line terminator)."""
    reply = {
        "id": request_id,
        "status": "error",
        "error": error.message,
        "error_type": error.error_type,
        "details": error.details,
        "timestamp": iso_timestamp(now),
    }
    try:
        return _dumps(reply)
    except (ValueError, TypeError):
        reply["details"] = _sanitize(error.details)
        return _dumps(reply)
