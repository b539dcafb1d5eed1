"""stui-client's class browser: ``:classes``, ``:browse``, ``:source`` (highlighted), ``:sysinfo``.

Against a real ``twistd -n stui``, the client driven in a pseudo-terminal as a
person would use it; plus the formatting functions on their own.
"""

from __future__ import annotations

import pytest

from stui_twisted.client.browsing import format_class, format_method, highlight
from tests.e2e.test_client_e2e import quit_repl, spawn_repl, submit, tcp_url
from tests.serverproc import ServerProcess

CLIENT_TIMEOUT = 15
ANSI = "\x1b["


def test_highlight_colors_python_only_when_asked():
    source = "def f(x):\n    return x + 1\n"
    assert highlight(source, False) == source
    colored = highlight(source, True)
    assert ANSI in colored
    assert "return" in colored


def test_format_method_of_a_builtin_says_so():
    text = format_method(
        {
            "class_name": "dict",
            "method": {"name": "get", "source": None, "category": "instance", "arguments": []},
        },
        color=True,
    )
    assert "no Python source" in text and ANSI not in text


def test_format_class_lists_methods_and_variables():
    text = format_class(
        {
            "class_info": {"name": "Point", "superclass": "object", "is_system": False},
            "instance_methods": [
                {"name": "__init__", "category": "instance", "arguments": ["self", "x"]}
            ],
            "class_methods": [{"name": "origin", "category": "class", "arguments": ["cls"]}],
            "instance_vars": ["x"],
            "class_vars": ["dims"],
        }
    )
    assert "Point(object)  [session]" in text
    assert "__init__(self, x)" in text and "@classmethod origin(cls)" in text
    assert "instance variables: x" in text and "class variables: dims" in text


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("client-browse"), zmq=False).start()
    yield proc
    proc.kill()


@pytest.mark.e2e
@pytest.mark.image
@pytest.mark.timeout(90)
def test_browse_meta_commands_in_the_terminal(server, tmp_path):
    child = spawn_repl(tcp_url(server), tmp_path / "client-state", "--new")
    child.timeout = CLIENT_TIMEOUT
    child.expect(">>>")
    # one line per statement: the REPL continues an indented block until an empty line
    submit(child, "class Point:\r    def __init__(self, x):\r        self.x = x\r")
    submit(child, "")
    child.expect(">>>")
    submit(child, ":classes")
    child.expect(r"Point\(object\)  \[session\]")
    child.expect("1 classes")
    child.expect(">>>")
    submit(child, ":classes -a collections.Ord*")
    child.expect(r"collections\.OrderedDict\(dict\)")
    child.expect(">>>")
    submit(child, ":browse Point")
    child.expect(r"__init__\(self, x\)")
    child.expect("instance variables: x")
    child.expect(">>>")
    submit(child, ":source Point.__init__")
    child.expect(r"# Point\.__init__\(self, x\)")
    child.expect(r"\x1b\[")  # highlighted
    child.expect("self")
    child.expect(">>>")
    submit(child, ":source Point.nope")
    child.expect("MethodNotFound|has no method")
    child.expect(">>>")
    submit(child, ":browse NoSuchClass")
    child.expect("ClassNotFound|no class")
    child.expect(">>>")
    submit(child, ":sysinfo")
    child.expect("python_version")
    child.expect(">>>")
    submit(child, ":sysinfo environment")
    child.expect("sys_path")
    child.expect(">>>")
    quit_repl(child)
