"""Unit tests of the stui-client pieces that need no server."""

from __future__ import annotations

import json
import os
import stat

import pytest

from stui_twisted.client.formatting import (
    format_error,
    format_evaluation,
    format_inspection,
    format_reply,
    format_session_info,
    format_sessions,
)
from stui_twisted.client.repl import needs_more_input, next_line_indent
from stui_twisted.client.session import CredentialSource, CredentialsUnavailable, backoff_delays
from stui_twisted.client.state import (
    ClientState,
    default_state_dir,
    is_valid_client_id,
    sanitize_client_id,
)
from stui_twisted.client.transport import (
    ProtocolViolation,
    ServerAddress,
    decode_reply,
    parse_server_url,
)

pytestmark = pytest.mark.timeout(10)


# -- server URLs -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("tcp://127.0.0.1:7555", ServerAddress("tcp", "127.0.0.1", 7555)),
        ("tls://stui.example.org:7556", ServerAddress("tls", "stui.example.org", 7556)),
        ("zmq://localhost:5555", ServerAddress("zmq", "localhost", 5555)),
        ("ZMQ://localhost:5555/", ServerAddress("zmq", "localhost", 5555)),
        ("localhost:7555", ServerAddress("tcp", "localhost", 7555)),
        ("tcp://[::1]:7555", ServerAddress("tcp", "::1", 7555)),
    ],
)
def test_parse_server_url_accepts_the_three_schemes(url, expected):
    assert parse_server_url(url) == expected


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("http://127.0.0.1:7555", "scheme"),
        ("tcp://127.0.0.1", "needs a port"),
        ("tcp://127.0.0.1:99999", "invalid port"),
        ("tcp://:7555", "no host"),
        ("tcp://127.0.0.1:7555/path", "nothing after"),
    ],
)
def test_parse_server_url_explains_bad_urls(url, complaint):
    with pytest.raises(ValueError, match=complaint):
        parse_server_url(url)


def test_address_url_is_canonical_for_state_keys():
    assert parse_server_url("TCP://Example.ORG:7555").url == "tcp://example.org:7555"
    assert parse_server_url("tcp://[::1]:7555").url == "tcp://[::1]:7555"


def test_decode_reply_rejects_non_objects():
    assert decode_reply(b'{"id": 1}') == {"id": 1}
    for bad in (b"[1]", b"not json", b"\xff"):
        with pytest.raises(ProtocolViolation, match="server sent"):
            decode_reply(bad)


# -- client ids and the state file ---------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("alice", "alice"),
        ("Jean Dupont", "JeanDupont"),
        ("_svc-build", "svc-build"),
        ("ü", "stui-client"),
        ("", "stui-client"),
        (None, "stui-client"),
        ("a" * 200, "a" * 128),
        ("bob@example.org", "bob@example.org"),
    ],
)
def test_sanitize_client_id(raw, expected):
    assert sanitize_client_id(raw) == expected
    assert is_valid_client_id(sanitize_client_id(raw))


def test_is_valid_client_id():
    assert is_valid_client_id("a.b_c:d@e-f")
    assert not is_valid_client_id("-leading")
    assert not is_valid_client_id("has space")
    assert not is_valid_client_id("")


def test_default_state_dir_follows_xdg(tmp_path):
    assert default_state_dir({"XDG_STATE_HOME": str(tmp_path)}) == tmp_path / "stui-client"
    home_default = default_state_dir({})
    assert home_default.parts[-3:] == (".local", "state", "stui-client")


def test_state_remembers_sessions_per_server_and_client(tmp_path):
    state = ClientState(tmp_path / "stui-client")
    assert state.last_session("tcp://h:1", "alice") is None
    state.remember_session("tcp://h:1", "alice", "s_a")
    state.remember_session("tcp://h:1", "bob", "s_b")
    state.remember_session("zmq://h:2", "alice", "s_z")
    reread = ClientState(tmp_path / "stui-client")
    assert reread.last_session("tcp://h:1", "alice") == "s_a"
    assert reread.last_session("tcp://h:1", "bob") == "s_b"
    assert reread.last_session("zmq://h:2", "alice") == "s_z"
    reread.forget_session("tcp://h:1", "alice")
    assert ClientState(tmp_path / "stui-client").last_session("tcp://h:1", "alice") is None
    data = json.loads(state.path.read_text())
    assert data["version"] == 1


def test_state_files_are_private(tmp_path):
    state = ClientState(tmp_path / "stui-client")
    state.remember_session("tcp://h:1", "alice", "s_a")
    history = state.ensure_history_file()
    assert stat.S_IMODE(os.stat(state.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(history).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(state.directory).st_mode) == 0o700
    assert not [p for p in state.directory.iterdir() if p.name.startswith(".state-")]


@pytest.mark.parametrize("content", ["not json", "[1, 2]", '{"sessions": 3}'])
def test_a_damaged_state_file_is_ignored_then_replaced(tmp_path, content):
    state = ClientState(tmp_path)
    state.path.write_text(content)
    assert state.last_session("tcp://h:1", "alice") is None
    state.remember_session("tcp://h:1", "alice", "s_a")
    assert state.last_session("tcp://h:1", "alice") == "s_a"


# -- multi-line input ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "more"),
    [
        ("x = 6 * 7", False),
        ("", False),
        ("   ", False),
        ("if x:", True),
        ("def f():", True),
        ("def f():\n    return 1", True),
        ("def f():\n    return 1\n", False),
        ("def f():\n    return 1\n    ", False),
        ("foo(", True),
        ("x = [1,", True),
        ("d = {'a':", True),
        ("foo(\n1)", False),
        ("s = '''abc", True),
        ("x = 1 + \\", True),
        ("x = 1\ny = 2", False),
        ("1/", False),
        (":inspect foo(", False),
        (":help", False),
        ("for i in range(3):\n    print(i)\nprint('done')", False),
        ("while True: pass", False),
        ("def f(): return 1", False),
        ("while True:\n    pass", True),
        ("async with lock:\n    await x", True),
        ("async for i in it():\n    print(i)", True),
        ("await asyncio.sleep(1)", False),
        ("len?", False),
    ],
)
def test_needs_more_input(text, more):
    assert needs_more_input(text) is more


def test_next_line_indent():
    assert next_line_indent("if x:") == "    "
    assert next_line_indent("    y = 1") == "    "
    assert next_line_indent("    for i in x:") == "        "
    assert next_line_indent("x = [1,") == ""


# -- reply formatting ------------------------------------------------------------


def test_format_evaluation_shows_output_then_result():
    assert format_evaluation({"output": "hi\n", "result": "42"}) == "hi\n42\n"
    assert format_evaluation({"output": "no newline", "result": None}) == "no newline\n"
    assert format_evaluation({"output": "", "result": None}) == ""
    assert format_evaluation({"output": "", "result": "'a'", "display": "a"}) == "a\n"


def test_help_replies_are_highlighted_on_a_terminal_only():
    help_reply = {
        "output": "",
        "result": "Type:      int\nDocstring:\nint(x)",
        "result_type": "help",
    }
    assert format_evaluation(help_reply) == "Type:      int\nDocstring:\nint(x)\n"
    assert format_evaluation(help_reply, colour=True) == (
        "\x1b[1;36mType:\x1b[0m      int\n\x1b[1;36mDocstring:\x1b[0m\nint(x)\n"
    )
    value = {"output": "", "result": "'Type: x'", "result_type": "str"}
    assert format_evaluation(value, colour=True) == "'Type: x'\n"


def test_format_evaluation_error_ends_with_exception_line():
    reply = {
        "status": "error",
        "error_type": "EvaluationError",
        "error": "ZeroDivisionError: division by zero",
        "details": {
            "exception_type": "ZeroDivisionError",
            "message": "division by zero",
            "traceback": [
                "Traceback (most recent call last):\n",
                '  File "<input>", line 1, in <module>\n',
                "ZeroDivisionError: division by zero\n",
            ],
            "output": "before\n",
        },
    }
    text = format_reply(reply)
    assert text.startswith("before\nTraceback (most recent call last):\n")
    assert text.endswith("ZeroDivisionError: division by zero\n")
    assert text.count("ZeroDivisionError: division by zero") == 1


def test_format_error_adds_the_summary_when_the_traceback_lacks_it():
    reply = {
        "status": "error",
        "error_type": "EvaluationError",
        "error": "boom",
        "details": {"exception_type": "ValueError", "message": "boom", "traceback": []},
    }
    assert format_error(reply) == "ValueError: boom\n"


def test_format_error_for_protocol_errors():
    reply = {"status": "error", "error_type": "Interrupted", "error": "evaluation interrupted"}
    assert format_error(reply) == "Interrupted: evaluation interrupted\n"


def test_format_inspection_lists_attributes_and_items():
    text = format_inspection(
        {
            "object_id": "obj_1",
            "class_name": "list",
            "string_representation": "[1, [2]]",
            "size": 2,
            "attributes": [],
            "items": [
                {"key": "0", "type": "int", "repr": "1", "object_id": None},
                {"key": "1", "type": "list", "repr": "[2]", "object_id": "obj_2"},
            ],
            "truncated": True,
        }
    )
    assert text.splitlines()[0] == "list obj_1"
    assert "size: 2" in text
    assert "list: [2]  [obj_2]" in text
    assert "truncated" in text


def test_format_sessions_marks_the_current_one():
    text = format_sessions(
        {"client_id": "alice", "sessions": [{"session_id": "s_1"}, {"session_id": "s_2"}]},
        "s_2",
    )
    assert text.splitlines()[0].startswith("  s_1")
    assert text.splitlines()[1].startswith("* s_2")
    assert "no active sessions" in format_sessions({"client_id": "a", "sessions": []}, None)


def test_format_session_info_puts_the_id_first():
    text = format_session_info({"zzz": 1, "session_id": "s_1", "is_active": True})
    assert text.splitlines()[0].split() == ["session_id", "s_1"]
    assert "is_active" in text and "yes" in text


# -- reconnection and credentials --------------------------------------------------


def test_backoff_doubles_to_five_seconds_and_is_bounded():
    delays = list(backoff_delays(total=60.0))
    assert delays[:6] == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5.0])
    assert all(delay <= 5.0 for delay in delays)
    assert sum(delays) == pytest.approx(60.0)
    assert list(backoff_delays(total=0.5)) == pytest.approx([0.2, 0.3])


def test_credentials_are_not_asked_for_when_not_interactive():
    with pytest.raises(CredentialsUnavailable, match="--user"):
        CredentialSource(interactive=False).get(allow_prompt=True)
    with pytest.raises(CredentialsUnavailable, match="STUI_PASSWORD"):
        CredentialSource("alice", interactive=False).get(allow_prompt=True)
    assert CredentialSource("alice", "pw", interactive=False).get(True) == ("alice", "pw")


def test_credentials_are_asked_for_and_a_rejected_password_again():
    asked = []
    source = CredentialSource(
        interactive=True,
        ask_username=lambda prompt: asked.append(prompt) or "alice",
        ask_password=lambda prompt: asked.append(prompt) or "pw",
    )
    assert source.get(allow_prompt=True) == ("alice", "pw")
    assert source.rejected() is True
    assert source.password is None
    with pytest.raises(CredentialsUnavailable):
        source.get(allow_prompt=False)
    assert asked == ["username: ", "password for alice: "]


def test_the_clearable_parts_are_the_servers():
    from stui_twisted.client.repl import CLEARABLE_PARTS
    from stui_twisted.sessions.service import CONTEXT_PARTS

    assert CLEARABLE_PARTS == CONTEXT_PARTS
