"""``name?`` and ``name??`` help cells (issue 19.3): in-process and in a real image."""

from __future__ import annotations

import pytest
import pytest_twisted

from stui_twisted.image.help import HelpRequest, help_request
from stui_twisted.image.supervisor import ImageSupervisor
from stui_twisted.image.workspace import Image
from stui_twisted.protocol.errors import StuiError

DEFINITION = 'def f(x, y=1):\n    "Add y to x."\n    return x + y\n'


@pytest.fixture
def workspace():
    image = Image()
    yield image.session("s_help")
    image.loop.close()


def test_which_cells_are_help_requests():
    assert help_request("len?") == HelpRequest("len", False)
    assert help_request("  obj.attr??\n") == HelpRequest("obj.attr", True)
    assert help_request("f(1)[0]?") == HelpRequest("f(1)[0]", False)
    # anything else is left as Python
    assert help_request("x  # why?") is None
    assert help_request("'what?'") is None
    assert help_request("1 ? 2") is None
    assert help_request("x = 1\nx?") is None
    assert help_request("?") is None
    assert help_request("x???") is None


def test_name_question_mark_gives_signature_and_docstring_as_display_text(workspace):
    answer = workspace.evaluate("len?", mode="display")
    assert answer["result_type"] == "help"
    assert answer["result"] == answer["display"]
    assert "Signature: len(obj, /)" in answer["result"]
    assert "Return the number of items in a container." in answer["result"]
    assert "Source:" not in answer["result"]
    assert answer["object_id"] is None
    assert "_" not in workspace.namespace
    executed = workspace.evaluate("len?")
    assert executed["display"] is None and executed["result"] == answer["result"]


def test_double_question_mark_gives_the_source_of_a_session_def(workspace):
    workspace.evaluate(DEFINITION)
    answer = workspace.evaluate("f??")
    assert "Signature: f(x, y=1)" in answer["result"]
    assert "Add y to x." in answer["result"]
    assert answer["result"].endswith("Source:\n" + DEFINITION)
    workspace.evaluate("class K:\n    'A K.'\n    def __init__(self, a):\n        self.a = a\n")
    described = workspace.evaluate("K??")["result"]
    assert "Signature: K(a)" in described and "class K:" in described
    assert "Source:\nnot available" in workspace.evaluate("len??")["result"]
    assert "Value:     [1, 2]" in workspace.evaluate("[1, 2]?")["result"]


def test_a_restored_definition_still_shows_its_source(workspace):
    workspace.evaluate(DEFINITION)
    stored = workspace.snapshot()["bindings"]
    workspace.materialize(stored, {}, 1)
    assert workspace.evaluate("f??")["result"].endswith("Source:\n" + DEFINITION)


def test_a_failing_help_expression_is_an_evaluation_error(workspace):
    with pytest.raises(StuiError) as raised:
        workspace.evaluate("undefined_name?")
    assert raised.value.details["exception_type"] == "NameError"
    assert raised.value.details["traceback"][-1].startswith("NameError")


def _reactor():
    from twisted.internet import reactor

    return reactor


@pytest.mark.image
@pytest.mark.timeout(20)
@pytest_twisted.ensureDeferred
async def test_help_in_a_real_image():
    supervisor = ImageSupervisor(_reactor(), kill_grace=0.5, restart_delay=0.1)
    supervisor.startService()
    try:
        await supervisor.whenRunning()
        described = await supervisor.evaluate("s_a", "len?", mode="display")
        assert "Return the number of items in a container." in described["display"]
        await supervisor.evaluate("s_a", DEFINITION)
        source = await supervisor.evaluate("s_a", "f??")
        assert source["result"].endswith("Source:\n" + DEFINITION)
    finally:
        await supervisor.stopService()
