"""More bindings survive a restart: cloudpickle for what plain pickle cannot store (issue 19.2).

The corpus is benchmarks/bindings_corpus.py (the figures of docs/reliability.md).
"""

from __future__ import annotations

import pytest

from benchmarks.bindings_corpus import (
    CORPUS,
    PRELUDE,
    UNRESTORABLE_KINDS,
    binding,
    cell,
    check,
    run_with_server,
)
from stui_twisted.image.workspace import Image
from stui_twisted.protocol.errors import StuiError


def _answer(workspace, expression: str) -> str | None:
    try:
        return str(workspace.evaluate(expression)["result"])
    except StuiError:
        return None


def _restart_in_process() -> tuple[dict, dict, dict]:
    """Bind the corpus, store it, rebuild it in a new Image: (before, after, unrestorable)."""
    first = Image()
    second = Image()
    try:
        workspace = first.session("s_corpus")
        workspace.evaluate(PRELUDE)
        before = {}
        for kind, code, expression in CORPUS:
            workspace.evaluate(cell(kind, code))
            before[kind] = _answer(workspace, check(kind, expression))
        for kind, code, _ in CORPUS:
            workspace.evaluate(cell(kind, code))
        stored = workspace.snapshot()["bindings"]
        first.drop_session("s_corpus")
        again = second.session("s_corpus")
        materialized = again.materialize(stored, {}, 1)
        after = {kind: _answer(again, check(kind, expression)) for kind, _, expression in CORPUS}
        reasons = {entry["name"]: entry["reason"] for entry in materialized["unrestorable"]}
        return before, after, reasons
    finally:
        first.loop.close()
        second.loop.close()


def test_the_corpus_has_at_least_40_kinds():
    assert len({kind for kind, _, _ in CORPUS}) == len(CORPUS) >= 40


def test_every_picklable_kind_is_back_and_the_rest_say_why(monkeypatch):
    monkeypatch.delenv("STUI_IMAGE_CLOUDPICKLE", raising=False)
    before, after, reasons = _restart_in_process()
    lost = sorted(kind for kind in before if after[kind] != before[kind])
    assert lost == sorted(UNRESTORABLE_KINDS), {kind: reasons.get(binding(kind)) for kind in lost}
    for kind in UNRESTORABLE_KINDS:
        assert reasons[binding(kind)].startswith("TypeError: cannot pickle"), reasons


def test_plain_pickle_only_when_cloudpickle_is_disabled(monkeypatch):
    monkeypatch.setenv("STUI_IMAGE_CLOUDPICKLE", "0")
    before, after, reasons = _restart_in_process()
    lost = {kind for kind in before if after[kind] != before[kind]}
    assert {"lambda", "closure", "nested_function", "partial_of_lambda"} <= lost
    assert "Can't pickle" in reasons[binding("lambda")]


def test_a_function_stored_by_cloudpickle_sees_the_sessions_live_globals():
    image = Image()
    try:
        workspace = image.session("s_globals")
        changed = workspace.evaluate("base = 1\nf = lambda: base\nbase = 2")
        assert changed["bindings_changed"]["f"]["pickler"] == "cloudpickle"
        stored = workspace.snapshot()["bindings"]
        workspace.materialize(stored, {}, 1)
        assert workspace.evaluate("f()")["result"] == "2"
        assert workspace.evaluate("base = 3\nf()")["result"] == "3"
        assert workspace.evaluate("f.__globals__ is globals()")["result"] == "True"
    finally:
        image.loop.close()


@pytest.mark.e2e
@pytest.mark.image
@pytest.mark.timeout(120)
def test_after_a_server_restart_lambdas_closures_nested_functions_and_partials_are_back(
    tmp_path,
):
    outcome = run_with_server(True, tmp_path)
    for kind in (
        "lambda",
        "closure",
        "closure_over_session_variable",
        "nested_function",
        "partial_of_lambda",
        "instance_holding_lambda",
    ):
        assert outcome[kind]["restored"], (kind, outcome[kind])
    not_restored = {kind for kind, entry in outcome.items() if not entry["restored"]}
    assert not_restored == UNRESTORABLE_KINDS, {kind: outcome[kind] for kind in not_restored}
    for kind in UNRESTORABLE_KINDS:
        assert outcome[kind]["reason"].startswith("TypeError: cannot pickle"), outcome[kind]
