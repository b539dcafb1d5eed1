"""One clock in the store, one ISO formatter, one JSON codec, one session-id pattern (issue 14.5).

Each is defined once, in stui_twisted/protocol/, and imported where needed; these
checks keep a second copy from growing back.  (The terminal client, stui_twisted/client/,
is a program of its own and is not checked.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

import stui_twisted

PACKAGE = Path(stui_twisted.__file__).resolve().parent


def sources(under: Path = PACKAGE) -> dict[str, str]:
    return {
        str(path.relative_to(PACKAGE)): path.read_text()
        for path in sorted(under.rglob("*.py"))
        if "client" not in path.relative_to(PACKAGE).parts
    }


@pytest.mark.parametrize(
    ("text", "home"),
    [
        ("s_[A-Za-z0-9_-]", "protocol/ids.py"),
        ('strftime("%Y-%m-%dT%H:%M:%S', "protocol/timefmt.py"),
        ("%Y-%m-%dT%H:%M:%S.%fZ", "protocol/timefmt.py"),
        ('(",", ":")', "protocol/jsoncodec.py"),
        ("JSONEncoder(", "protocol/jsoncodec.py"),
    ],
)
def test_defined_once(text, home):
    assert [name for name, source in sources().items() if text in source] == [home]


@pytest.mark.parametrize("call", ["time.time(", "time_ns(", "monotonic(", "datetime.now("])
def test_the_store_reads_no_clock_of_its_own(call):
    found = sources(PACKAGE / "storage")
    assert [name for name, source in found.items() if call in source] == []
