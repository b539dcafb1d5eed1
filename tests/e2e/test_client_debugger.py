"""stui-client's debugger meta-commands: ``:break``, ``:breaks``, ``:delete``, ``:pm``."""

from __future__ import annotations

import pytest

from tests.e2e.test_client_e2e import quit_repl, spawn_repl, submit, tcp_url

CLIENT_TIMEOUT = 15


def start_repl(start_server, tmp_path):
    """A real server and a REPL at its first prompt, in a new session."""
    server = start_server(tmp_path / "server", zmq=False)
    child = spawn_repl(tcp_url(server), tmp_path / "client-state", "--new")
    child.timeout = CLIENT_TIMEOUT
    child.expect(">>>")
    return child


@pytest.mark.e2e
@pytest.mark.image
@pytest.mark.timeout(90)
def test_breakpoint_meta_commands_and_post_mortem(start_server, tmp_path):
    child = start_repl(start_server, tmp_path)
    submit(child, "def g(n): q = n * 5; return q / 0")
    child.expect(">>>")
    submit(child, ":break g if n > 1")
    child.expect(r"bp_1 at g if n > 1")
    child.expect(">>>")
    submit(child, ":break cell:1:1")
    child.expect(r"bp_2 at cell:1:1")
    child.expect(">>>")
    submit(child, ":breaks")
    child.expect(r"bp_1 +g if n > 1")
    child.expect(r"bp_2 +cell:1:1 +hits 0")
    child.expect(">>>")
    submit(child, ":delete bp_1")
    child.expect("bp_1 removed")
    child.expect(">>>")
    submit(child, ":delete bp_2")
    child.expect("bp_2 removed")
    child.expect(">>>")
    submit(child, "g(3)")
    child.expect("ZeroDivisionError")
    child.expect(">>>")
    submit(child, ":pm")
    child.expect(r"line 1, in g")
    child.expect(r"return q / 0")
    child.expect(r"n = 3")
    child.expect(r"q = 15")
    child.expect(r"\(Pdb\)")  # paused mode on the failed stack
    submit(child, "p q + n")
    child.expect("18")
    submit(child, "c")
    child.expect(">>>")
    quit_repl(child)


@pytest.mark.e2e
@pytest.mark.image
@pytest.mark.timeout(90)
def test_paused_mode_drives_a_breakpoint_with_pdb_keys(start_server, tmp_path):
    """Paused mode opens on the server's debug_paused event (the debug_state poll is
    only for servers without it)."""
    child = start_repl(start_server, tmp_path)
    submit(child, "def g(n):")
    submit(child, "q = n * 5")
    submit(child, "return q + 1")
    submit(child, "")
    child.expect(">>>")
    submit(child, ":break g")
    child.expect("bp_1 at g")
    child.expect(">>>")
    submit(child, "g(3)")
    child.expect(r"Paused \(breakpoint at bp_1\)")
    child.expect(r"\(2\)g\(\)")
    child.expect(r"-> q = n \* 5")
    child.expect(r"\(Pdb\)")
    submit(child, "p n * 14")
    child.expect("42")
    submit(child, "l")
    child.expect(r"   1    def g\(n\):")
    child.expect(r"   2 ->     q = n \* 5")
    submit(child, "n")
    child.expect(r"\(3\)g\(\)")
    child.expect(r"-> return q \+ 1")
    submit(child, "w")
    child.expect(r"> <cell [^(]+\(3\)g\(\)")
    submit(child, "c")
    child.expect("16")
    child.expect(">>>")
    quit_repl(child)
