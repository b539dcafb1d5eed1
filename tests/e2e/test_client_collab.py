"""The collaboration walk-through of docs/client.md through stui-client, on a real server.

Alice shares her session with bob for write; bob follows it with C{--watch} in one
terminal and attaches to it in another.  Alice's cell prints in a loop and then
waits in C{input()}: the watcher shows the loop's lines and the input request while
the cell still runs (streamed, not replayed at its end).  Bob's C{input()} is
answered by alice with C{:input}, and C{:unshare} ends bob's watch and sends his
REPL back to his own session.
"""

from __future__ import annotations

import pexpect
import pytest

from tests.e2e.test_client_e2e import quit_repl, spawn_repl, submit, tcp_url

pytestmark = [pytest.mark.e2e, pytest.mark.image, pytest.mark.timeout(90)]

PROMPT = r"(?<!\] )>>>"  # the prompt, not a live line's "[bob #2] >>> code"
BACKSPACE = "\x7f"
ESC_ENTER = "\x1b\r"


def test_share_watch_stream_input_and_unshare(start_server, tmp_path):
    server = start_server(tmp_path / "server", zmq=False)
    url = tcp_url(server)
    alice = spawn_repl(url, tmp_path / "alice", "--client-id=alice", "--new")
    alice.expect(r"New session (s_\S+) created")
    session_id = alice.match.group(1)
    alice.expect(PROMPT)
    submit(alice, ":share bob write")
    alice.expect(r"shared with bob \(write\)\. Shares: bob \(write\)")
    alice.expect(PROMPT)

    watcher = spawn_repl(url, tmp_path / "watch", "--client-id=bob", "--watch", session_id)
    watcher.expect("live from seq")
    alice.expect(r"\[bob\] is watching this session \(write access\)")
    bob = spawn_repl(url, tmp_path / "bob", "--client-id=bob", "--new")
    bob.expect(r"New session (s_\S+) created")
    bob_own = bob.match.group(1)
    bob.expect(PROMPT)
    submit(bob, ":shared 1")
    bob.expect(r"Attached to alice's session \(write access\)")
    bob.expect(PROMPT)  # drawn after the REPL subscribed to alice's session

    # a loop, then input() in the same cell: its lines stream while it still runs
    alice.send("for step in range(3):\r")
    alice.send("print('step', step)\r")
    alice.send(BACKSPACE * 4 + "name = input('your name? ')" + ESC_ENTER)
    for terminal in (watcher, bob):
        terminal.expect(r"\[alice #1\] >>> for step in range\(3\): …")
        terminal.expect(r"\[#1\] step 0")
        terminal.expect(r"\[#1\] step 1")
        terminal.expect(r"\[#1\] step 2")
        terminal.expect(r"\[#1\] the code asks for input: 'your name\? '")
    alice.expect(r"step 2\r\n.*your name\?")  # her own input(), asked at once
    submit(alice, "alice")
    alice.expect(PROMPT)
    watcher.expect(r"\[alice #1\] done")

    submit(bob, "int(input('alice, a number? ')) * 2")
    bob.expect(r"alice, a number\? ")
    alice.expect(r"\[bob #2\] >>> int\(input")
    alice.expect(r"\[#2\] the code asks for input: 'alice, a number\? '")
    submit(alice, ":input 21")
    bob.expect(r"\(answered by another client\)")
    bob.expect("42")
    bob.expect(PROMPT)
    alice.expect(r"\[bob #2\] = 42")
    watcher.expect(r"\[bob #2\] = 42")

    submit(alice, ":unshare bob")
    alice.expect("no longer shared with bob. It is shared with nobody.")
    alice.expect(PROMPT)
    watcher.expect("The session is no longer shared with you.")
    watcher.expect(pexpect.EOF)
    watcher.close()
    assert watcher.exitstatus == 0
    bob.expect(f"Session {session_id} is no longer shared with you.")
    bob.expect(f"Session {bob_own} restored.")
    bob.expect(PROMPT)
    submit(bob, "name")  # in bob's own session again, where there is no name
    bob.expect("NameError")
    bob.expect(PROMPT)
    quit_repl(bob)
    quit_repl(alice)
