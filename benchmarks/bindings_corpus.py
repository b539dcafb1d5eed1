"""How many kinds of binding survive a restart: plain pickle vs cloudpickle (issue 19.2).

Each corpus entry binds one kind of value as ``b_<kind>`` in a session; after a
restart, a check expression is evaluated and compared with what it gave before.
The fraction of entries whose check gives the same answer is the figure, with
cloudpickle disabled (``STUI_IMAGE_CLOUDPICKLE=0``, plain pickle as before) and
enabled::

    .venv/bin/python -m benchmarks.bindings_corpus            # a real server, stopped and started
    .venv/bin/python -m benchmarks.bindings_corpus --json out.json

``tests/image/test_bindings_corpus.py`` runs the same corpus in-process and once
through a real server restart.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tests.serverproc import ServerProcess  # noqa: E402

PRELUDE = """
import array, asyncio, collections, dataclasses, datetime, decimal, enum, fractions
import functools, itertools, operator, pathlib, re, socket, threading, types, typing
import uuid, weakref
base = 10
def top(v):
    return v + base
class Top:
    def __init__(self, v):
        self.v = v
    def get(self):
        return self.v + base
@dataclasses.dataclass
class Pair:
    a: int
    b: int
class Color(enum.Enum):
    RED = 1
"""

#: (kind, code binding NAME, check expression of NAME); NAME becomes ``b_<kind>``.
CORPUS: list[tuple[str, str, str]] = [
    ("int", "NAME = 42", "NAME"),
    ("float", "NAME = 1.5", "NAME"),
    ("str", "NAME = 'text'", "NAME"),
    ("none", "NAME = None", "NAME"),
    ("nested_json", "NAME = [1, [2, 3], {'a': None}]", "NAME"),
    ("tuple", "NAME = (1, 'a', None)", "NAME"),
    ("set", "NAME = {3, 1, 2}", "sorted(NAME)"),
    ("frozenset", "NAME = frozenset('ab')", "sorted(NAME)"),
    ("bytes", "NAME = b'\\x00\\xff'", "NAME"),
    ("bytearray", "NAME = bytearray(b'ab')", "NAME"),
    ("complex", "NAME = 1 + 2j", "NAME"),
    ("shared_list", "_x = [1]\nNAME = [_x, _x]", "NAME[0] is NAME[1]"),
    ("datetime", "NAME = datetime.datetime(2024, 1, 2, 3, 4, 5)", "NAME.isoformat()"),
    ("decimal", "NAME = decimal.Decimal('1.10')", "str(NAME)"),
    ("fraction", "NAME = fractions.Fraction(1, 3)", "str(NAME)"),
    ("uuid", "NAME = uuid.UUID(int=7)", "str(NAME)"),
    ("path", "NAME = pathlib.PurePosixPath('/a/b')", "str(NAME)"),
    ("regex", "NAME = re.compile('a+b')", "bool(NAME.match('aab'))"),
    ("counter", "NAME = collections.Counter('aab')", "NAME['a']"),
    ("ordered_dict", "NAME = collections.OrderedDict(a=1)", "list(NAME.items())"),
    ("defaultdict", "NAME = collections.defaultdict(list)\nNAME['k'].append(1)", "NAME['k']"),
    ("deque", "NAME = collections.deque([1, 2], maxlen=5)", "(list(NAME), NAME.maxlen)"),
    ("range", "NAME = range(2, 9, 3)", "list(NAME)"),
    ("array", "NAME = array.array('i', [1, 2])", "NAME.tolist()"),
    ("simple_namespace", "NAME = types.SimpleNamespace(a=1)", "NAME.a"),
    ("exception", "NAME = ValueError('bad')", "str(NAME)"),
    ("itemgetter", "NAME = operator.itemgetter(1)", "NAME('xy')"),
    ("typing_form", "NAME = typing.Optional[int]", "str(NAME)"),
    ("partial_builtin", "NAME = functools.partial(int, base=2)", "NAME('101')"),
    ("session_instance", "NAME = Top(5)", "NAME.get()"),
    ("dataclass_instance", "NAME = Pair(1, 2)", "(NAME.a + NAME.b, type(NAME) is Pair)"),
    ("enum_member", "NAME = Color.RED", "NAME is Color.RED"),
    ("alias_of_def", "NAME = top", "(NAME(1), NAME is top)"),
    ("partial_of_def", "NAME = functools.partial(top, 1)", "NAME()"),
    ("bound_method", "NAME = Top(2).get", "NAME()"),
    ("namedtuple_class", "NAME = collections.namedtuple('NAME', 'x y')", "NAME(1, 2).y"),
    (
        "namedtuple_instance",
        "_Pt = collections.namedtuple('_Pt', 'x y')\nNAME = _Pt(1, 2)",
        "NAME.y",
    ),
    ("type_made_class", "NAME = type('Dyn', (), {'k': 3})", "NAME.k"),
    ("lambda", "NAME = lambda v: v * 2 + base", "NAME(1)"),
    ("recursive_lambda", "NAME = lambda n: 1 if n < 2 else n * NAME(n - 1)", "NAME(5)"),
    ("closure", "def _mk(k):\n    return lambda v: v + k\nNAME = _mk(3)", "NAME(1)"),
    (
        "closure_over_session_variable",
        "def _counter():\n    count = [base]\n    def step():\n        count[0] += 1\n"
        "        return count[0]\n    return step\nNAME = _counter()",
        "NAME()",
    ),
    (
        "nested_function",
        "def _outer():\n    def inner(v):\n        return v - base\n    return inner\nNAME = _outer()",
        "NAME(15)",
    ),
    ("partial_of_lambda", "NAME = functools.partial(lambda a, b: a + b + base, 1)", "NAME(2)"),
    ("instance_holding_lambda", "NAME = Top(lambda: base)", "NAME.v()"),
    ("dict_of_lambdas", "NAME = {'f': lambda: base + 1}", "NAME['f']()"),
    (
        "nested_class_instance",
        "def _make():\n    class Inner:\n        def get(self):\n            return base * 2\n"
        "    return Inner()\nNAME = _make()",
        "NAME.get()",
    ),
    ("generator", "NAME = (i for i in range(3))", "list(NAME)"),
    ("lock", "NAME = threading.Lock()", "NAME.acquire(False)"),
    ("socket", "NAME = socket.socket()", "NAME.family.name"),
    ("open_file", "NAME = open(__import__('os').devnull)", "NAME.read()"),
    ("weakref", "_target = Top(1)\nNAME = weakref.ref(_target)", "NAME() is _target"),
    ("running_task", "NAME = asyncio.create_task(asyncio.sleep(3600))", "NAME.done()"),
]

#: Kinds no serializer here can store: the reason must say so.
UNRESTORABLE_KINDS = frozenset(
    {"generator", "lock", "socket", "open_file", "weakref", "running_task"}
)


def binding(kind: str) -> str:
    return f"b_{kind}"


def cell(kind: str, code: str) -> str:
    return code.replace("NAME", binding(kind))


def check(kind: str, expression: str) -> str:
    return expression.replace("NAME", binding(kind))


def _answer(reply: dict) -> str | None:
    """The check's result (its repr), or None when it failed."""
    if reply.get("status") != "success":
        return None
    return str(reply["result"]["result"])


def run_with_server(cloudpickle: bool, workdir: Path) -> dict:
    """Bind the corpus in a real server, stop and start it, check each binding."""
    env = {"STUI_IMAGE_CLOUDPICKLE": "1" if cloudpickle else "0"}
    server = ServerProcess(workdir, env=env).start()
    try:
        client = server.tcp_client(timeout=60)
        session_id = client.result("create_session", client_id="corpus")["session_id"]
        client.result("evaluate", code=PRELUDE)
        expected = {}
        for kind, code, expression in CORPUS:
            client.result("evaluate", code=cell(kind, code))
            expected[kind] = _answer(client.call("evaluate", code=check(kind, expression)))
        # checks may change state (the counter steps): bind everything afresh
        for kind, code, _ in CORPUS:
            client.result("evaluate", code=cell(kind, code))
        client.result("save_context")
        assert server.stop() == 0
        server.start()
        client = server.tcp_client(timeout=60)
        restored = client.result("restore_session", client_id="corpus", session_id=session_id)
        reasons = {entry["name"]: entry["reason"] for entry in restored["unrestorable_bindings"]}
        outcome = {}
        for kind, _, expression in CORPUS:
            answer = _answer(client.call("evaluate", code=check(kind, expression)))
            outcome[kind] = {
                "restored": answer is not None and answer == expected[kind],
                "expected": expected[kind],
                "after": answer,
                "reason": reasons.get(binding(kind)),
            }
        return outcome
    finally:
        server.kill()


def summary(outcome: dict) -> dict:
    restored = sorted(kind for kind, entry in outcome.items() if entry["restored"])
    return {
        "kinds": len(outcome),
        "restored": len(restored),
        "fraction": round(len(restored) / len(outcome), 3),
        "not_restored": sorted(set(outcome) - set(restored)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the outcome here")
    arguments = parser.parse_args()
    results = {}
    for label, enabled in (("plain pickle", False), ("cloudpickle", True)):
        with tempfile.TemporaryDirectory() as workdir:
            started = time.monotonic()
            outcome = run_with_server(enabled, Path(workdir))
            results[label] = {
                "summary": summary(outcome),
                "seconds": round(time.monotonic() - started, 1),
                "outcome": outcome,
            }
        figures = results[label]["summary"]
        print(
            f"{label}: {figures['restored']}/{figures['kinds']} kinds restored"
            f" ({figures['fraction']:.1%}); not restored: {', '.join(figures['not_restored'])}"
        )
    if arguments.json:
        Path(arguments.json).write_text(json.dumps(results, indent=2) + "\n")
    if os.environ.get("STUI_IMAGE_CLOUDPICKLE"):
        print("note: STUI_IMAGE_CLOUDPICKLE in the environment is overridden per run")


if __name__ == "__main__":
    main()
