"""Replay every Format A example of stui-compat.md, as the Rust client sends it.

Each request goes verbatim over one ZeroMQ REQ socket (the Rust client's
transport) and over TCP, and the reply is checked field by field with the
types a serde struct would demand: integers are integers, strings strings.
"""

from __future__ import annotations

import json

import pytest

from tests.serverproc import ServerProcess

pytestmark = pytest.mark.e2e

UUID = "550e8400-e29b-41d4-a716-446655440000"

#: The request example of stui-compat.md §1, verbatim.
CONTRACT_EVALUATE = {
    "id": "550e8400-e29b-41d4-a716-446655440000",
    "version": "1.0.0",
    "timestamp": "2025-01-20T10:30:00Z",
    "payload": {
        "type": "Request",
        "data": {
            "request_type": "Evaluate",
            "params": {"code": "3 + 4", "context": None, "return_string": True},
        },
    },
}

STR, INT, BOOL, LIST, DICT = str, int, bool, list, dict
OPT_STR = (str, type(None))

CLASS_INFO = {"name": STR, "superclass": OPT_STR, "comment": STR, "package": STR, "is_system": BOOL}
METHOD_INFO = {
    "name": STR,
    "source": OPT_STR,
    "category": STR,
    "is_class_method": BOOL,
    "arguments": LIST,
    "comment": STR,
}


def request(request_type: str, params) -> dict:
    return {
        "id": UUID,
        "version": "1.0.0",
        "timestamp": "2025-01-20T10:30:00Z",
        "payload": {"type": "Request", "data": {"request_type": request_type, "params": params}},
    }


#: (request, response_type, shape of data) for every row of the contract's table.
EXAMPLES = [
    (request("Ping", {}), "Ping", {"message": STR, "status": STR, "uptime": INT}),
    (request("Ping", {"message": "hello"}), "Ping", {"message": STR, "status": STR}),
    (
        CONTRACT_EVALUATE,
        "Evaluate",
        {
            "result": STR,
            "result_type": STR,
            "execution_time": INT,
            "has_error": BOOL,
            "session_id": STR,
            "object_id": OPT_STR,
        },
    ),
    (
        request(
            "Evaluate",
            {
                "code": "'x' * 3",
                "context": None,
                "return_string": True,
                "evaluation_mode": "Display",
            },
        ),
        "Evaluate",
        {"result": STR, "display": STR, "execution_time": INT, "has_error": BOOL},
    ),
    (
        request(
            "Evaluate",
            {
                "code": "class Shape:\n    sides = 0\n    def area(self):\n        return 0\n",
                "context": None,
                "return_string": True,
                "evaluation_mode": "Execute",
            },
        ),
        "Evaluate",
        {"result": STR, "result_type": STR, "execution_time": INT, "has_error": BOOL},
    ),
    (
        request("Inspect", {"target": "[1, 2, 3]", "depth": 1, "include_private": False}),
        "Inspect",
        {"object_info": DICT, "instance_vars": DICT, "methods": LIST},
    ),
    (
        request("Inspect", {"target": "obj_1", "include_private": True}),
        "Inspect",
        {"object_info": DICT, "instance_vars": DICT, "methods": LIST},
    ),
    (
        request(
            "BrowseClass",
            {
                "class_name": "Shape",
                "include_methods": True,
                "include_instance_vars": True,
                "include_class_vars": True,
            },
        ),
        "BrowseClass",
        {
            "class_info": DICT,
            "instance_methods": LIST,
            "class_methods": LIST,
            "instance_vars": LIST,
            "class_vars": LIST,
        },
    ),
    (
        request("ListClasses", {"pattern": "*", "include_system": False, "limit": 100}),
        "ListClasses",
        {"classes": LIST, "total_count": INT, "truncated": BOOL},
    ),
    (
        request("ListClasses", {"pattern": "collections.*", "include_system": True, "limit": 5}),
        "ListClasses",
        {"classes": LIST, "total_count": INT, "truncated": BOOL},
    ),
    (
        request(
            "GetMethod", {"class_name": "Shape", "method_name": "area", "is_class_method": False}
        ),
        "GetMethod",
        {"method": DICT},
    ),
    *[
        (request("SystemInfo", {"info_type": kind}), "SystemInfo", {"info": DICT})
        for kind in ("Basic", "Memory", "Packages", "Environment", "All")
    ],
]

ERRORS = [
    (request("Debug", {"operation": "StepInto", "context": None}), "InvalidRequest"),
    (request("Debug", {"operation": "Teleport", "context": None}), "UnsupportedOperation"),
    (request("TeleportObject", {}), "UnsupportedOperation"),
    (request("Evaluate", {"code": "y", "context": None, "return_string": True}), "EvaluationError"),
    (request("BrowseClass", {"class_name": "NoSuchClass"}), "ClassNotFound"),
    (request("GetMethod", {"class_name": "Shape", "method_name": "volume"}), "MethodNotFound"),
    (request("Inspect", {"target": "obj_99999"}), "ObjectNotFound"),
    ({"id": UUID, "payload": {"type": "Request", "data": {"params": {}}}}, "InvalidRequest"),
]


def check_shape(data: dict, shape: dict, where: str) -> None:
    for name, kind in shape.items():
        assert name in data, f"{where}: no field {name!r} in {data}"
        value = data[name]
        if kind is INT:
            assert type(value) is int, f"{where}.{name} must be an integer, not {value!r}"
        else:
            assert isinstance(value, kind) and not (kind is not BOOL and isinstance(value, bool)), (
                f"{where}.{name} must be {kind}, not {value!r}"
            )


def check_envelope(reply: dict) -> tuple[str, dict]:
    assert reply["id"] == UUID
    assert reply["version"] == "1.0.0"
    assert isinstance(reply["timestamp"], str)
    assert reply["payload"]["type"] == "Response"
    data = reply["payload"]["data"]
    assert isinstance(data["response_type"], str)
    return data["response_type"], data["data"]


def check_response(reply: dict, response_type: str, shape: dict) -> dict:
    kind, data = check_envelope(reply)
    assert kind == response_type, reply
    check_shape(data, shape, response_type)
    if response_type == "Inspect":
        check_shape(
            data["object_info"],
            {"class_name": STR, "string_representation": STR, "hash": INT, "size": INT},
            "Inspect.object_info",
        )
        assert all(type(v) is str for v in data["instance_vars"].values())
    if response_type in ("ListClasses",):
        for info in data["classes"]:
            check_shape(info, CLASS_INFO, "ClassInfo")
    if response_type == "BrowseClass":
        check_shape(data["class_info"], CLASS_INFO, "ClassInfo")
        for method in data["instance_methods"] + data["class_methods"]:
            check_shape(method, METHOD_INFO, "MethodInfo")
    if response_type == "GetMethod":
        check_shape(data["method"], METHOD_INFO, "MethodInfo")
    if response_type == "SystemInfo":
        assert data["info"], data
        assert all(type(v) is str for v in data["info"].values()), data["info"]
    return data


def check_error(reply: dict, code: str) -> dict:
    kind, data = check_envelope(reply)
    assert kind == "Error", reply
    check_shape(data, {"code": STR, "message": STR, "details": DICT}, "Error")
    assert data["code"] == code, data
    assert all(type(v) is str for v in data["details"].values()), data["details"]
    if "stack_trace" in data:
        assert type(data["stack_trace"]) is str
    return data


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("replay")).start()
    yield proc
    proc.kill()


class Req:
    def __init__(self, url: str) -> None:
        import zmq

        self.sock = zmq.Context.instance().socket(zmq.REQ)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, 30_000)
        self.sock.connect(url)

    def send(self, message: dict) -> dict:
        self.sock.send(json.dumps(message).encode())
        return json.loads(self.sock.recv())

    def close(self) -> None:
        self.sock.close()


class Line:
    def __init__(self, client) -> None:
        self.client = client

    def send(self, message: dict) -> dict:
        self.client.send_raw(json.dumps(message).encode() + b"\n")
        return self.client.read_reply()

    def close(self) -> None:
        self.client.close()


@pytest.mark.parametrize("transport", ["zmq-req", "tcp"])
def test_every_contract_example_gets_the_documented_shape(server, transport):
    conv = Req(server.zmq_url) if transport == "zmq-req" else Line(server.tcp_client(timeout=30))
    try:
        session_ids = set()
        for message, response_type, shape in EXAMPLES:
            data = check_response(conv.send(message), response_type, shape)
            if "session_id" in data:
                session_ids.add(data["session_id"])
        # one conversation, one auto-created session
        assert len(session_ids) == 1, session_ids
        for message, code in ERRORS:
            check_error(conv.send(message), code)
    finally:
        conv.close()


def test_every_flat_command_is_a_request_type(server):
    conv = Req(server.zmq_url)
    try:
        _, described = check_envelope(conv.send(request("Describe", {})))
        names = sorted(described["commands"])
        assert {"list_classes", "browse_class", "get_method", "system_info"} <= set(names)
        for name in ("get_session_statistics", "get_context_summary", "list_client_sessions"):
            pascal = "".join(part.title() for part in name.split("_"))
            params = {"client_id": "stui"} if name == "list_client_sessions" else {}
            kind, data = check_envelope(conv.send(request(pascal, params)))
            assert kind == pascal, data
        created = check_response(
            conv.send(request("CreateSession", {"client_id": "replay"})),
            "CreateSession",
            {"session_id": STR, "timeout": INT, "time_until_expiry": INT},
        )
        check_response(
            conv.send(request("RestoreSession", {"session_id": created["session_id"]})),
            "RestoreSession",
            {"session_id": STR, "workspace_context": DICT},
        )
    finally:
        conv.close()
