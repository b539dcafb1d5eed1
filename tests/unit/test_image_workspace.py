"""The image's in-child workspace logic, driven in-process (no child, no reactor)."""

from __future__ import annotations

import re
import socket
import threading

import pytest

from stui_twisted.image.interruption import InterruptRequested, StopGuard, TimeLimitReached
from stui_twisted.image.workspace import Image, deserialize_binding, serialize_binding
from stui_twisted.protocol.errors import StuiError


@pytest.fixture
def image():
    return Image()


@pytest.fixture
def workspace(image):
    return image.session("s_test")


def test_last_expression_is_the_result_bound_to_underscore_and_registered(workspace):
    first = workspace.evaluate("x = 41 + 1")
    assert first["result"] is None
    assert first["result_type"] == "NoneType"
    assert first["object_id"] is None
    result = workspace.evaluate("x")
    assert result["result"] == "42"
    assert result["result_type"] == "int"
    assert result["object_id"] == "obj_1"
    assert workspace.namespace["_"] == 42
    assert result["registry_added"]["obj_1"] == {
        "type": "int",
        "repr": "42",
        "live": True,
        "binding": "x",
    }
    assert result["next_object_id"] == 2
    second = workspace.evaluate("[1, 2]")
    assert second["object_id"] == "obj_2"


def test_display_mode_and_statements_only_cell(workspace):
    result = workspace.evaluate(
        "class P:\n    def __str__(self): return 'pretty'\nP()", mode="display"
    )
    assert result["display"] == "pretty"
    assert result["result"].startswith("<")
    assert workspace.evaluate("y = 1\nz = 2")["result"] is None


def test_output_is_captured_per_evaluation(workspace):
    result = workspace.evaluate("print('hello')\nimport sys\nprint('oops', file=sys.stderr)")
    assert result["output"] == "hello\noops\n"
    assert workspace.evaluate("1")["output"] == ""


def test_output_capture_is_isolated_between_threads(image):
    a, b = image.session("a"), image.session("b")
    barrier = threading.Barrier(2)
    image.shared.barrier = barrier
    outputs = {}

    def run(workspace, tag):
        code = (
            f"for i in range(200):\n    print('{tag}', i)\n    if i == 100: shared.barrier.wait(5)"
        )
        outputs[tag] = workspace.evaluate(code)["output"]

    threads = [
        threading.Thread(target=run, args=(a, "A")),
        threading.Thread(target=run, args=(b, "B")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert outputs["A"] == "".join(f"A {i}\n" for i in range(200))
    assert outputs["B"] == "".join(f"B {i}\n" for i in range(200))


def test_captured_output_is_bounded(workspace):
    output = workspace.evaluate("print('x' * (3 * 1024 * 1024))")["output"]
    assert len(output) < 1100 * 1024
    assert "[output truncated" in output


def test_exception_reports_user_frames_and_saves_earlier_bindings(workspace):
    with pytest.raises(StuiError) as caught:
        workspace.evaluate("a = 5\nprint('before')\n\ndef f():\n    return 1 / 0\nf()")
    error = caught.value
    assert error.error_type == "EvaluationError"
    assert error.message == "ZeroDivisionError: division by zero"
    details = error.details
    assert details["exception_type"] == "ZeroDivisionError"
    assert details["message"] == "division by zero"
    assert details["line"] == 5  # innermost frame of this cell
    assert details["output"] == "before\n"
    assert details["bindings_changed"]["a"]["value"] == 5
    assert "f" in details["bindings_changed"]
    assert not any("workspace.py" in line for line in details["traceback"])
    assert details["traceback"][-1] == "ZeroDivisionError: division by zero"
    assert any("return 1 / 0" in line for line in details["traceback"])


def test_syntax_error_is_an_evaluation_error_with_line(workspace):
    with pytest.raises(StuiError) as caught:
        workspace.evaluate("x = 1\nx = = 2")
    assert caught.value.error_type == "EvaluationError"
    assert caught.value.details["exception_type"] == "SyntaxError"
    assert caught.value.details["line"] == 2


def test_serialization_encodings():
    assert serialize_binding({"a": [1, 2.5, None, True, "s"]})["encoding"] == "json"
    assert serialize_binding((1, 2))["encoding"] == "pickle"
    assert serialize_binding({1: "int key"})["encoding"] == "pickle"
    assert serialize_binding({1, 2})["encoding"] == "pickle"
    assert serialize_binding([float("nan")])["encoding"] == "pickle"
    with socket.socket() as sock:
        stored = serialize_binding(sock)
    assert stored["encoding"] == "unrestorable"
    assert stored["type"] == "socket"
    assert "pickle" in stored["reason"]
    too_large = (
        "too large: its stored form would exceed 1000 bytes (the binding limit, max_session_bytes)"
    )
    assert serialize_binding("x" * 2000, max_bytes=1000) == {
        "encoding": "unrestorable",
        "type": "str",
        "repr": repr("x" * 2000)[:200] + "...",
        "reason": too_large,
    }
    assert serialize_binding(bytes(2000), max_bytes=1000)["reason"] == too_large
    module = serialize_binding(socket)
    assert module["encoding"] == "module" and module["module"] == "socket"
    for value in ((1, 2), {1: "a"}, {3}, {"k": [1]}, socket):
        assert deserialize_binding(serialize_binding(value)) == value


def test_only_changed_bindings_are_reported(workspace):
    workspace.evaluate("d = {'n': 1}\nunrelated = [1]")
    mutated = workspace.evaluate("d['n'] = 2")
    assert set(mutated["bindings_changed"]) == {"d"}
    assert mutated["bindings_changed"]["d"]["value"] == {"n": 2}
    unchanged = workspace.evaluate("d['n'] = 2")
    assert unchanged["bindings_changed"] == {}
    removed = workspace.evaluate("del unrelated")
    assert removed["bindings_removed"] == ["unrelated"]
    assert [v["name"] for v in removed["variables"]] == ["d"]


def test_variables_summary_and_unrestorable_binding(workspace):
    result = workspace.evaluate("import socket\ns = socket.socket()\nt = (1, 2)")
    by_name = {v["name"]: v for v in result["variables"]}
    assert by_name["s"]["restorable"] is False
    assert by_name["t"] == {"name": "t", "type": "tuple", "repr": "(1, 2)", "restorable": True}
    assert result["bindings_changed"]["socket"]["encoding"] == "module"
    workspace.namespace["s"].close()


def test_shared_is_one_object_and_its_changes_are_reported(image):
    a, b = image.session("a"), image.session("b")
    result = a.evaluate("shared.team = 'ok'")
    assert result["shared_changed"]["team"]["value"] == "ok"
    assert b.evaluate("shared.team")["result"] == "'ok'"
    assert "shared" not in [v["name"] for v in result["variables"]]
    assert b.evaluate("del shared.team")["shared_removed"] == ["team"]


def test_sessions_have_separate_namespaces(image):
    image.session("a").evaluate("x = 1")
    with pytest.raises(StuiError) as caught:
        image.session("b").evaluate("x")
    assert caught.value.details["exception_type"] == "NameError"


def test_inspect_expression_items_and_child_by_id(workspace):
    described = workspace.inspect(expression="[1, {'a': 2}]")
    assert described["class_name"] == "list"
    assert described["size"] == 2
    first, second = described["items"]
    assert first == {"key": 0, "type": "int", "repr": "1", "object_id": None}
    assert second["type"] == "dict" and second["object_id"] in described["registry_added"]
    assert described["next_object_id"] == 3
    child = workspace.inspect(object_id=second["object_id"])
    assert child["items"] == [{"key": "a", "type": "int", "repr": "2", "object_id": None}]
    with pytest.raises(StuiError) as caught:
        workspace.inspect(object_id="obj_999")
    assert caught.value.error_type == "ObjectNotFound"
    assert caught.value.details == {"object_id": "obj_999"}


def test_inspect_attributes_skip_dunders_and_respect_limit(workspace):
    workspace.evaluate(
        "class Thing:\n    pass\nt = Thing()\nt.name = 'n'\nt.parts = [1]\nfor i in range(5): setattr(t, f'a{i}', i)"
    )
    described = workspace.inspect(expression="t", limit=3)
    names = [a["name"] for a in described["attributes"]]
    assert names == ["a0", "a1", "a2"]
    assert described["truncated"] is True
    full = workspace.inspect(expression="t")
    parts = next(a for a in full["attributes"] if a["name"] == "parts")
    assert parts["object_id"] is not None
    assert not any(a["name"].startswith("__") for a in full["attributes"])


def test_complete_names_attributes_and_keywords(workspace):
    workspace.evaluate("apple = 1\nimport os\nshared.team = 'x'")
    assert "apple" in workspace.complete("app")["matches"]
    assert "print" in workspace.complete("pri")["matches"]
    assert "while" in workspace.complete("whi")["matches"]
    completion = workspace.complete("shared.te")
    assert completion == {"matches": ["team"], "cursor_start": 7, "cursor_end": 9}
    assert "path" in workspace.complete("os.pa")["matches"]
    workspace.evaluate("x = [1]")
    assert workspace.complete("y = x.app + 1", 9) == {
        "matches": ["append"],
        "cursor_start": 6,
        "cursor_end": 9,
    }
    assert workspace.complete("open().re")["matches"] == []


def test_snapshot_and_materialize_round_trip(image):
    source = image.session("a")
    source.evaluate("import socket\nn = 1\nt = (1, 2)\ns = socket.socket()\nitems = [1, 2]")
    listed = source.evaluate("items")
    source.namespace["s"].close()
    snapshot = source.snapshot()
    assert set(snapshot["bindings"]) == {"socket", "n", "t", "s", "items", "_"}
    registry = listed["registry_added"]
    target = image.session("b")
    outcome = target.materialize(snapshot["bindings"], registry, listed["next_object_id"])
    assert sorted(outcome["restored"]) == ["_", "items", "n", "socket", "t"]
    assert outcome["unrestorable"] == [
        {"name": "s", "type": "socket", "reason": snapshot["bindings"]["s"]["reason"]}
    ]
    assert outcome["registry_live"] == [listed["object_id"]]
    assert target.inspect(object_id=listed["object_id"])["items"][0]["repr"] == "1"
    tuple_result = target.evaluate("t")
    assert tuple_result["result"] == "(1, 2)"
    assert tuple_result["object_id"] == f"obj_{listed['next_object_id']}"
    # the unrestorable binding is kept (not dropped silently) until rebound
    assert "s" in target.snapshot()["bindings"]
    assert {v["name"]: v["restorable"] for v in target.variables()}["s"] is False


def test_clear_variables_and_registry(workspace):
    result = workspace.evaluate("x = [1]\nx")
    assert workspace.clear(["registry"]) == {"cleared": ["registry"]}
    with pytest.raises(StuiError):
        workspace.inspect(object_id=result["object_id"])
    workspace.clear(["variables"])
    assert workspace.variables() == []
    assert "x" not in workspace.namespace


def test_stop_guard_interrupts_running_code(workspace):
    guard = StopGuard()
    timer = threading.Timer(0.2, guard.request_stop, args=(InterruptRequested,))
    timer.start()
    with pytest.raises(StuiError) as caught:
        workspace.evaluate("n = 0\nwhile True:\n    n += 1", guard=guard)
    assert caught.value.error_type == "Interrupted"
    assert "n" in caught.value.details["bindings_changed"]


def test_a_disarmed_stop_leaves_no_pending_signal_that_hangs_a_traced_thread():
    """C{disarm} after a stop must not leave CPython's async-exception flag set: a
    traced thread (the session debugger) entering a function then loops forever."""
    import sys

    guard = StopGuard()

    def stopped_worker():
        guard.arm()
        try:
            guard.request_stop(InterruptRequested)
            while True:
                pass
        except InterruptRequested:
            guard.disarm()

    worker = threading.Thread(target=stopped_worker)
    worker.start()
    worker.join(10)
    returned = threading.Event()

    def traced():
        sys.settrace(lambda frame, event, arg: None)
        try:
            (lambda: None)()
        finally:
            sys.settrace(None)
        returned.set()

    threading.Thread(target=traced, daemon=True).start()
    assert returned.wait(5), "a traced call hung after a disarmed stop"


def test_stop_guard_time_limit_reports_timeout(workspace):
    guard = StopGuard(timeout=0.1)
    timer = threading.Timer(0.1, guard.request_stop, args=(TimeLimitReached,))
    timer.start()
    with pytest.raises(StuiError) as caught:
        workspace.evaluate("while True: pass", guard=guard)
    assert caught.value.error_type == "Timeout"
    assert workspace.evaluate("1 + 1")["result"] == "2"


# -- functions, classes and their instances survive a restore -------------------------


def _round_trip(code: str, check: str, session_id: str = "s_defs"):
    from stui_twisted.image.workspace import Image

    first = Image().session(session_id)
    first.evaluate(code)
    stored = first.snapshot()["bindings"]
    second = Image().session(session_id)
    outcome = second.materialize(stored, {}, 1)
    return stored, outcome, second.evaluate(check)["result"]


def test_cell_functions_and_classes_are_stored_as_source_and_instances_as_pickles():
    code = (
        "import math\nfactor = 3\n"
        "def f(x):\n    return x * factor\n"
        "class P:\n    def __init__(self, r):\n        self.r = r\n"
        "    def area(self):\n        return math.pi * self.r\n"
        "p = P(2)\nps = [P(1), P(3)]\ng = f\n"
    )
    stored, outcome, result = _round_trip(
        code, "factor = 10; f(2), round(p.area(), 3), [q.r for q in ps], type(p) is P, g is f"
    )
    assert stored["f"]["encoding"] == "source" and stored["f"]["source"].startswith("def f(x):")
    assert stored["P"]["encoding"] == "source"
    assert stored["p"]["encoding"] == "pickle" and stored["ps"]["encoding"] == "pickle"
    assert outcome["unrestorable"] == []
    # f sees the live namespace (factor rebound after restore), instances use the new class
    assert result == "(20, 6.283, [1, 3], True, True)"


def test_decorated_definitions_keep_their_decorators():
    code = "import functools\n@functools.lru_cache(maxsize=None)\ndef fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
    stored, outcome, result = _round_trip(code, "fib(30), hasattr(fib, 'cache_info')")
    assert stored["fib"]["source"].startswith("@functools.lru_cache")
    assert result == "(832040, True)"


def test_rebound_definition_is_not_stored_as_stale_source():
    from stui_twisted.image.workspace import Image

    workspace = Image().session("s_rebound")
    workspace.evaluate("def f():\n    return 1\n")
    workspace.evaluate("f = len")
    assert workspace.snapshot()["bindings"]["f"]["encoding"] == "pickle"


def test_lambdas_come_back_generators_are_unrestorable_with_a_reason_and_name_is_main():
    stored, outcome, result = _round_trip(
        "lam = lambda: 1\ngen = (n for n in [])\nname = __name__\n", "(name, lam())"
    )
    assert stored["lam"]["encoding"] == "pickle"
    assert stored["lam"]["pickler"] == "cloudpickle"
    assert stored["gen"]["encoding"] == "unrestorable"
    assert "generator" in stored["gen"]["reason"]
    assert [u["name"] for u in outcome["unrestorable"]] == ["gen"]
    assert result == "('__main__', 1)"


def test_registry_is_bounded_oldest_first():
    from stui_twisted.image import workspace as ws_module
    from stui_twisted.image.workspace import Image

    workspace = Image().session("s_bounded")
    first = workspace.evaluate("[0]")["object_id"]
    for n in range(ws_module.REGISTRY_LIMIT + 5):
        workspace.evaluate(f"[{n + 1}]")
    assert len(workspace._registry_meta) == ws_module.REGISTRY_LIMIT
    with pytest.raises(StuiError) as caught:
        workspace.lookup(first)
    assert caught.value.error_type == "ObjectNotFound"


# -- big values are clipped, and big bindings are not encoded again and again ---------


def test_big_results_displays_and_exception_messages_are_clipped_in_the_image(workspace):
    # The documented limits (protocol.md §7).
    MAX_RESULT_CHARS, MAX_MESSAGE_CHARS, MAX_ERROR_LINE_CHARS = 1024 * 1024, 64 * 1024, 4096  # noqa: N806
    shown = workspace.evaluate("s = 'a' * 50_000_000\ns", mode="display")
    assert len(shown["display"]) <= MAX_RESULT_CHARS
    assert shown["display"].endswith(
        f"... [{50_000_000 - (MAX_RESULT_CHARS - 48)} more characters]"
    )
    assert len(shown["result"]) <= MAX_RESULT_CHARS
    assert shown["result"].startswith("'aaa") and shown["result"].endswith(
        "[50000000 characters in all]"
    )
    raw = workspace.evaluate("bytearray(5_000_000)", mode="display")
    assert len(raw["result"]) <= MAX_RESULT_CHARS and len(raw["display"]) <= MAX_RESULT_CHARS
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(StuiError) as caught:
            workspace.evaluate("raise ValueError('b' * (50 * 1024 * 1024))")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1.2 * 50 * 1024 * 1024, peak  # the message itself, no copy of it
    error = caught.value
    assert len(error.message) <= MAX_ERROR_LINE_CHARS
    assert error.message.startswith("ValueError: bbb")
    assert len(error.details["message"]) <= MAX_MESSAGE_CHARS
    assert error.details["message"].startswith("b" * 60_000)
    assert all(len(line) <= MAX_ERROR_LINE_CHARS for line in error.details["traceback"])
    assert error.details["traceback"][-1].startswith("ValueError: bbb")
    # The one long copy of the message is details.message; the rest are short.
    everything = repr((error.message, error.details))
    assert len(re.findall("b{5000,}", everything)) == 1
    assert len(everything) < MAX_MESSAGE_CHARS + 4 * MAX_ERROR_LINE_CHARS


def test_a_deep_recursion_traceback_keeps_both_ends(workspace):
    code = "def ping(n):\n    return pong(n)\ndef pong(n):\n    return ping(n)\nping(1)"
    with pytest.raises(StuiError) as caught:
        workspace.evaluate(code)
    lines = caught.value.details["traceback"]
    assert caught.value.details["exception_type"] == "RecursionError"
    assert any("frames omitted" in line for line in lines)
    assert len(lines) < 450  # 100 frames of at most 4 lines, not ~1000 frames
    assert lines[-1].startswith("RecursionError")


def test_unchanged_immutable_bindings_are_not_serialized_again(workspace, monkeypatch):
    from stui_twisted.image import workspace as ws_module

    workspace.evaluate("text = 'x' * 1_000_000\nitems = [1, 2]")
    serialized = []
    real = ws_module.serialize_binding

    def counting(value, *args, **kwargs):
        serialized.append(type(value).__name__)
        return real(value, *args, **kwargs)

    monkeypatch.setattr(ws_module, "serialize_binding", counting)
    assert workspace.evaluate("n = len(text)")["bindings_changed"].keys() == {"n"}
    assert serialized == ["int"]  # the new binding n only: text is the same str object
    serialized.clear()
    changed = workspace.evaluate("items.append(len(text))")["bindings_changed"]
    assert serialized == ["list"]  # a mentioned list may have changed in place: encoded again
    assert changed["items"]["value"] == [1, 2, 1_000_000]
    serialized.clear()
    workspace.evaluate("text = text + 'y'")
    assert serialized == ["str"]  # rebound: a new object
    assert "text" in workspace.snapshot()["bindings"]  # save_context encodes everything


def test_a_binding_over_the_limit_is_refused_before_it_is_encoded_whole(monkeypatch):
    import tracemalloc

    from stui_twisted.image import bindings as bindings_module

    workspace = Image(max_binding_bytes=1024 * 1024).session("s_big")
    pickled = []
    real = bindings_module._pickle_dumps
    monkeypatch.setattr(
        bindings_module, "_pickle_dumps", lambda *args: pickled.append(1) or real(*args)
    )
    stored = workspace.evaluate("x = bytearray(64 * 1024 * 1024)")["bindings_changed"]["x"]
    assert stored["encoding"] == "unrestorable"
    assert pickled == []  # refused by its length, never pickled
    assert stored["reason"].startswith("too large") and "exceed 1048576 bytes" in stored["reason"]
    tracemalloc.start()
    try:
        for code in ("len(x)", "x[0] = 1", "x[:3]"):
            workspace.evaluate(code)
        _, peak = tracemalloc.get_traced_memory()
        assert peak < 4 * 1024 * 1024, peak  # no repr, pickle or JSON of the 64 MiB value
        # A big value the length test cannot see is given up when its pickle reaches the limit.
        tracemalloc.reset_peak()
        many = workspace.evaluate("many = [str(i) for i in range(2_000_000)]")["bindings_changed"][
            "many"
        ]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert many["encoding"] == "unrestorable" and many["reason"].startswith("too large")
    assert peak < 200 * 1024 * 1024, (
        peak
    )  # the list itself is ~130 MB; its JSON/pickle were not built


def test_a_restored_definition_keeps_its_cell_name_and_line_numbers():
    first = Image().session("s_cells")
    first.evaluate("x = 1\n\ndef f():\n    return 1 / 0\n", cell_index=3)
    stored = first.snapshot()["bindings"]
    assert (stored["f"]["cell"], stored["f"]["line"]) == (3, 3)
    second = Image().session("s_cells")  # a new image, as after a restart
    assert second.materialize(stored, {}, 1)["unrestorable"] == []
    with pytest.raises(StuiError) as caught:
        second.evaluate("f()", cell_index=9)
    lines = caught.value.details["traceback"]
    assert lines[1:5] == [
        '  File "<cell 9>", line 1, in <module>',
        "    f()",
        '  File "<cell 3>", line 4, in f',
        "    return 1 / 0",
    ]
    again = second.snapshot()["bindings"]["f"]
    assert {k: again[k] for k in ("source", "cell", "line")} == {
        k: stored["f"][k] for k in ("source", "cell", "line")
    }
    legacy = {key: value for key, value in stored["f"].items() if key not in ("cell", "line")}
    third = Image().session("s_cells")
    third.materialize({"f": legacy}, {}, 1)  # a file written before cells were recorded
    with pytest.raises(StuiError) as caught:
        third.evaluate("f()", cell_index=1)
    assert '  File "<restored f>", line 2, in f' in caught.value.details["traceback"]


def test_pipelined_cells_are_numbered_one_after_the_other(workspace):
    def cell_of(code: str, cell_index: int) -> str:
        with pytest.raises(StuiError) as caught:
            workspace.evaluate(code, cell_index=cell_index)
        return caught.value.details["traceback"][1]

    assert cell_of("1 / 0", 5) == '  File "<cell 5>", line 1, in <module>'
    # Sent while cell 5 still ran, so the server counted from before it: it gets 6.
    assert cell_of("1 / 0", 5) == '  File "<cell 6>", line 1, in <module>'
    assert cell_of("1 / 0", 9) == '  File "<cell 9>", line 1, in <module>'  # the server is ahead
    workspace.materialize({}, {}, 1)  # load_context may take the history back
    assert cell_of("1 / 0", 3) == '  File "<cell 3>", line 1, in <module>'


def test_input_in_a_cell_asks_the_images_input_source_and_other_threads_see_eof(image, workspace):
    asked = []

    def source(session_id, cell, prompt, password, guard):
        asked.append((session_id, cell, prompt, password))
        return f"answer {len(asked)}\n"

    # no source (no client can answer): EOFError, with a reason
    code = "try:\n    input()\nexcept EOFError as e:\n    why = str(e)\nwhy"
    assert "no client is attached" in workspace.evaluate(code)["result"]
    image.input_source = source
    code = (
        "import getpass, threading\n"
        "got = []\n"
        "def elsewhere():\n"
        "    try:\n        input()\n"
        "    except (EOFError, OSError) as e:\n        got.append(type(e).__name__)\n"
        "t = threading.Thread(target=elsewhere); t.start(); t.join()\n"
        "(input('Name? '), getpass.getpass(), got != [])"
    )
    result = workspace.evaluate(code, cell_index=3)
    assert result["result"] == "('answer 1', 'answer 2', True)"
    assert asked == [("s_test", 3, "Name? ", False), ("s_test", 3, "Password: ", True)]
    assert result["output"] == ""


def test_a_cell_that_is_one_expression_compiles_and_runs_only_the_expression(
    workspace, monkeypatch
):
    """C{1+1} has no statements before its expression: no empty module is
    compiled and run for it (issue 21: a third of the cell's compiling)."""
    from stui_twisted.image import workspace as module

    modes = []
    monkeypatch.setattr(
        module,
        "compile",
        lambda *args, **kwargs: modes.append(args[2]) or compile(*args, **kwargs),
        raising=False,
    )
    assert workspace.evaluate("1+1")["result"] == "2"
    assert modes == ["eval"]
    modes.clear()
    assert workspace.evaluate("x = 40\nx + 2")["result"] == "42"
    assert modes == ["exec", "eval"]
    modes.clear()
    assert workspace.evaluate("")["result"] is None  # nothing at all: the empty module
    assert modes == ["exec"]
