"""End to end: Format A and the browse tools against a real ``twistd -n stui``.

Format A is the envelope of the Rust ``stui-protocol`` crate (stui-compat.md §1);
it must work on TCP, TLS and ZeroMQ REQ/DEALER, with the crate's integer fields
as JSON integers.
"""

from __future__ import annotations

import json

import pytest

from tests.serverproc import ServerProcess

pytestmark = pytest.mark.e2e

UUID = "550e8400-e29b-41d4-a716-446655440000"

POINT = '''\
class Point:
    """A point in the plane."""

    dims = 2

    def __init__(self, x, y):
        self.x = x
        self.y = y

    @classmethod
    def origin(cls):
        return cls(0, 0)

    @property
    def norm(self):
        return (self.x**2 + self.y**2) ** 0.5
'''


def fa(request_type, params=None, request_id=UUID) -> dict:
    return {
        "id": request_id,
        "version": "1.0.0",
        "timestamp": "2025-01-20T10:30:00Z",
        "payload": {"type": "Request", "data": {"request_type": request_type, "params": params}},
    }


def body(reply: dict, request_id=UUID) -> tuple[str, dict]:
    assert reply["id"] == request_id, reply
    assert reply["version"] == "1.0.0"
    assert reply["payload"]["type"] == "Response", reply
    return reply["payload"]["data"]["response_type"], reply["payload"]["data"]["data"]


class ZmqConversation:
    """One REQ or DEALER socket kept open, as the Rust client keeps it."""

    def __init__(self, url: str, socket_type: str) -> None:
        import zmq

        self.socket_type = socket_type
        self.sock = zmq.Context.instance().socket(getattr(zmq, socket_type))
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, 20_000)
        self.sock.connect(url)

    def send(self, message: dict) -> dict:
        data = json.dumps(message).encode()
        if self.socket_type == "REQ":
            self.sock.send(data)
            return json.loads(self.sock.recv())
        self.sock.send_multipart([b"", data])
        return json.loads(self.sock.recv_multipart()[-1])

    def close(self) -> None:
        self.sock.close()


class LineConversation:
    def __init__(self, client) -> None:
        self.client = client

    def send(self, message: dict) -> dict:
        self.client.send_raw(json.dumps(message).encode() + b"\n")
        return self.client.read_reply()

    def close(self) -> None:
        self.client.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServerProcess(
        tmp_path_factory.mktemp("format-a"), "--max-sessions-per-client=50", tls=True
    ).start()
    yield proc
    proc.kill()


@pytest.fixture(params=["tcp", "tls", "REQ", "DEALER"])
def conversation(request, server):
    if request.param == "tcp":
        conv = LineConversation(server.tcp_client(timeout=20))
    elif request.param == "tls":
        conv = LineConversation(server.tls_client(timeout=20))
    else:
        conv = ZmqConversation(server.zmq_url, request.param)
    yield conv
    conv.close()


def test_format_a_on_every_transport(conversation):
    kind, data = body(conversation.send(fa("Ping")))
    assert (kind, data["message"], data["status"]) == ("Ping", "pong", "ready")
    assert type(data["uptime"]) is int
    kind, data = body(
        conversation.send(fa("Evaluate", {"code": "3 + 4", "context": None, "return_string": True}))
    )
    assert kind == "Evaluate"
    assert (data["result"], data["result_type"], data["has_error"]) == ("7", "int", False)
    assert type(data["execution_time"]) is int
    assert data["session_id"].startswith("s_")
    session_id = data["session_id"]
    # the auto-created session is the conversation's current one from now on
    kind, data = body(conversation.send(fa("Evaluate", {"code": "_ * 2"})))
    assert (data["result"], data["session_id"]) == ("14", session_id)
    kind, data = body(conversation.send(fa("Evaluate", {"code": "y"})))
    assert kind == "Error"
    assert data["code"] == "EvaluationError"
    assert data["message"] == "NameError: name 'y' is not defined"
    assert data["details"]["line"] == "1"
    assert data["details"]["exception_type"] == "NameError"
    assert all(type(value) is str for value in data["details"].values())
    assert data["stack_trace"].startswith("Traceback (most recent call last):")
    kind, data = body(conversation.send(fa("NoSuchThing")))
    assert (kind, data["code"]) == ("Error", "UnsupportedOperation")
    kind, data = body(conversation.send({"id": 7, "payload": {"type": "Request", "data": {}}}), 7)
    assert (kind, data["code"]) == ("Error", "InvalidRequest")


def test_flat_requests_still_get_flat_replies(conversation):
    reply = conversation.send({"id": "flat-1", "command": "ping"})
    assert reply["status"] == "success" and reply["result"]["message"] == "pong"


def test_context_names_an_existing_session(server):
    client = server.tcp_client()
    session_id = client.result("create_session", client_id="stui")["session_id"]
    client.result("evaluate", code="marker = 'here'")
    other = LineConversation(server.tcp_client())
    kind, data = body(other.send(fa("Evaluate", {"code": "marker", "context": session_id})))
    assert (data["result"], data["session_id"]) == ("'here'", session_id)
    other.close()
    client.close()


def test_inspect_by_expression_and_by_object_id(server):
    conv = ZmqConversation(server.zmq_url, "REQ")
    try:
        body(conv.send(fa("Evaluate", {"code": POINT})))
        kind, data = body(
            conv.send(fa("Inspect", {"target": "Point(3, 4)", "include_private": False}))
        )
        assert kind == "Inspect"
        info = data["object_info"]
        assert info["class_name"] == "Point"
        assert type(info["hash"]) is int and type(info["size"]) is int
        assert data["instance_vars"] == {"x": "3", "y": "4"}
        assert "origin" in data["methods"] and "__init__" not in data["methods"]
        kind, data = body(conv.send(fa("Evaluate", {"code": "[1, 2, 3]"})))
        object_id = data["object_id"]
        kind, data = body(conv.send(fa("Inspect", {"target": object_id})))
        assert data["object_info"]["size"] == 3
        kind, data = body(conv.send(fa("Inspect", {"target": "obj_999999"})))
        assert (kind, data["code"]) == ("Error", "ObjectNotFound")
    finally:
        conv.close()


@pytest.fixture(scope="module")
def browsing(server):
    client = server.tcp_client(timeout=30)
    session_id = client.result("create_session", client_id="browser")["session_id"]
    client.result("evaluate", code="import collections\nfrom json import JSONDecoder\n" + POINT)
    yield client, session_id
    client.close()


def test_list_classes_of_the_session(browsing):
    client, _ = browsing
    result = client.result("list_classes")
    names = {info["name"]: info for info in result["classes"]}
    assert set(names) == {"Point", "json.decoder.JSONDecoder"}
    assert names["Point"] == {
        "name": "Point",
        "superclass": "object",
        "comment": "A point in the plane.",
        "package": "__main__",
        "is_system": False,
    }
    assert names["json.decoder.JSONDecoder"]["is_system"] is True
    assert result["total_count"] == 2 and result["truncated"] is False


def test_list_classes_of_the_system_with_pattern_and_limit(browsing):
    client, _ = browsing
    result = client.result("list_classes", pattern="collections.*", include_system=True, limit=2)
    assert len(result["classes"]) == 2
    assert result["truncated"] is True and result["total_count"] > 2
    assert all(info["name"].startswith("collections.") for info in result["classes"])
    everything = client.result("list_classes", pattern="*", include_system=True, limit=10_000)
    # the image's own machinery and other sessions' workspaces are not listed
    assert not any(info["package"].startswith("stui_") for info in everything["classes"])
    reply = client.call("list_classes", limit=10_001)
    assert reply["error_type"] == "InvalidRequest" and "limit" in reply["error"]


def test_browse_class_of_the_session(browsing):
    client, _ = browsing
    result = client.result("browse_class", class_name="Point")
    assert result["class_info"]["name"] == "Point"
    methods = {m["name"]: m for m in result["instance_methods"]}
    assert set(methods) == {"__init__", "norm"}
    assert methods["__init__"]["source"] == (
        "def __init__(self, x, y):\n    self.x = x\n    self.y = y\n"
    )
    assert methods["__init__"]["arguments"] == ["self", "x", "y"]
    assert methods["norm"]["category"] == "property"
    (origin,) = result["class_methods"]
    assert (origin["name"], origin["category"], origin["is_class_method"]) == (
        "origin",
        "class",
        True,
    )
    assert result["instance_vars"] == ["x", "y"]
    assert result["class_vars"] == ["dims"]
    lean = client.result(
        "browse_class", class_name="Point", include_methods=False, include_class_vars=False
    )
    assert lean["instance_methods"] == [] and lean["class_vars"] is None


def test_browse_class_by_dotted_path_and_unknown_class(browsing):
    client, _ = browsing
    result = client.result("browse_class", class_name="collections.OrderedDict")
    assert result["class_info"]["package"] == "collections"
    assert result["class_info"]["superclass"] == "dict"
    reply = client.call("browse_class", class_name="NoSuchClass")
    assert reply["error_type"] == "ClassNotFound"
    assert reply["details"] == {"class_name": "NoSuchClass"}
    reply = client.call("browse_class", class_name="collections")  # a module, not a class
    assert reply["error_type"] == "ClassNotFound"


def test_get_method(browsing):
    client, _ = browsing
    method = client.result("get_method", class_name="Point", method_name="origin")["method"]
    assert method["source"] == "@classmethod\ndef origin(cls):\n    return cls(0, 0)\n"
    builtin = client.result("get_method", class_name="dict", method_name="get")["method"]
    assert builtin["source"] is None and builtin["category"] == "instance"
    library = client.result("get_method", class_name="JSONDecoder", method_name="decode")
    assert library["method"]["source"].startswith("def decode(self, s")
    reply = client.call("get_method", class_name="Point", method_name="nope")
    assert reply["error_type"] == "MethodNotFound"
    assert reply["details"]["class_name"] == "Point"
    assert reply["details"]["method_name"] == "nope"


def test_system_info_never_shows_the_environment(server):
    client = server.tcp_client()
    basic = client.result("system_info")["info"]
    assert basic["python_version"] == basic["pharo_version"]
    assert type(basic["image_pid"]) is int
    everything = client.result("system_info", info_type="All")["info"]
    assert {"memory_used", "rss_bytes", "packages", "executable", "cwd", "sys_path"} <= set(
        everything
    )
    assert any(p["name"].lower() == "twisted" for p in everything["packages"])
    text = json.dumps(everything)
    assert "PATH=" not in text and "environ" not in text
    reply = client.call("system_info", info_type="secrets")
    assert reply["error_type"] == "InvalidRequest" and "info_type" in reply["error"]
    kind, data = body(LineConversation(client).send(fa("SystemInfo", {"info_type": "Memory"})))
    assert kind == "SystemInfo"
    assert all(type(value) is str for value in data["info"].values())
    client.close()


def test_sources_of_session_classes_survive_a_restart(tmp_path, start_server):
    proc = start_server(tmp_path, zmq=False)
    client = proc.tcp_client(timeout=30)
    session_id = client.result("create_session", client_id="alice")["session_id"]
    client.result("evaluate", code=POINT)
    client.result("save_context")
    client.close()
    proc.stop()
    proc.start()
    client = proc.tcp_client(timeout=30)
    client.result("restore_session", session_id=session_id)
    method = client.result("get_method", class_name="Point", method_name="__init__")
    assert method["method"]["source"] == (
        "def __init__(self, x, y):\n    self.x = x\n    self.y = y\n"
    )
    info = client.result("browse_class", class_name="Point")["class_info"]
    assert info["is_system"] is False and info["comment"] == "A point in the plane."
    client.close()


# -- flat-format leniency (stui-compat.md §2) against the real image ------------


@pytest.fixture(scope="module")
def flat(server):
    client = server.tcp_client(timeout=30)
    created = client.call("create_session", client_id="lenient", timeout=120)
    yield client, created
    client.close()


def test_session_records_use_whole_seconds(flat):
    client, created = flat
    assert created["status"] == "success"
    assert type(created["result"]["timeout"]) is int
    assert type(created["result"]["time_until_expiry"]) is int
    statistics = client.result("get_session_statistics")
    assert type(statistics["default_timeout"]) is int
    assert type(statistics["cleanup_interval"]) is int


def test_smalltalk_gets_a_python_hint(flat):
    client, _ = flat
    for code in ("x := 3 + 4.", "Transcript show: 'Hello'.", "Array with: 1 with: 2"):
        reply = client.call("evaluate", code=code)
        assert reply["error_type"] == "EvaluationError", reply
        assert "looks like Smalltalk" in reply["error"], code
        assert "evaluates Python" in reply["error"]
        assert reply["details"]["language"] == "python"
    reply = client.call("evaluate", code="def (:")
    assert "Smalltalk" not in reply["error"]
    assert reply["details"]["language"] == "python"


def test_tracebacks_show_no_frame_of_the_server_or_image(flat):
    client, _ = flat
    for code in ("x = (", "1/0", "import no_such_module_here", "def f():\n    return g()\nf()"):
        reply = client.call("evaluate", code=code)
        text = "\n".join(reply["details"]["traceback"])
        assert "ast.py" not in text, text
        assert "stui_twisted" not in text, text
        assert "<cell" in text, text


def test_object_id_alias_and_evaluation_mode_over_the_wire(flat):
    client, _ = flat
    client.send_raw(
        json.dumps(
            {"id": "m", "command": "evaluate", "code": "[1, 2]", "evaluation_mode": "Display"}
        ).encode()
        + b"\n"
    )
    reply = client.read_reply()
    assert reply["result"]["display"] == "[1, 2]"
    object_id = reply["result"]["object_id"]
    inspected = client.result("inspect", objectId=object_id)
    assert inspected["object_id"] == object_id and inspected["size"] == 2
    reply = client.call("inspect", objectId="obj_424242")
    assert reply["error_type"] == "ObjectNotFound"


def test_system_info_without_an_image_is_unsupported(tmp_path, start_server):
    proc = start_server(tmp_path, zmq=False, image=False)
    client = proc.tcp_client()
    reply = client.call("system_info")
    assert reply["error_type"] == "UnsupportedOperation", reply
    assert "disabled" in reply["error"]
    client.close()


def test_format_a_close_session_creates_no_session_to_close(server):
    conv = ZmqConversation(server.zmq_url, "REQ")
    try:
        kind, data = body(conv.send(fa("CloseSession", {})))
        assert (kind, data["code"]) == ("Error", "NoSession")
    finally:
        conv.close()
