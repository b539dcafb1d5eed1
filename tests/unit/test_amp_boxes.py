"""The image pipes' AMP box parser (L{BoxParsingAMP}, issue 21): AMP's boxes, fewer calls."""

from __future__ import annotations

import random
import sys

from twisted.internet.testing import StringTransport
from twisted.protocols import amp

from stui_twisted.image import amp_commands as commands


def collecting(base):
    """An AMP protocol of C{base}'s parser that keeps the boxes it parses."""

    class Collecting(base):
        def __init__(self) -> None:
            super().__init__()
            self.boxes: list[dict] = []

        def ampBoxReceived(self, box):  # noqa: N802 - AMP's name
            self.boxes.append(dict(box))

    return Collecting


Collecting = collecting(commands.BoxParsingAMP)
CollectingAMP = collecting(amp.AMP)  # AMP's own parser, the reference


def connected(protocol):
    protocol.makeConnection(StringTransport())
    return protocol


def random_box(rng: random.Random) -> amp.AmpBox:
    box = amp.AmpBox()
    for _ in range(rng.randrange(0, 8)):
        key = bytes(rng.randrange(256) for _ in range(rng.choice((1, 2, 9, 255))))
        size = rng.choice((0, 1, 3, 300, 65_535))
        box[key] = bytes(rng.randrange(256) for _ in range(size))
    return box


def test_boxes_are_the_ones_amp_parses_however_the_bytes_are_split():
    rng = random.Random(7)
    boxes = [random_box(rng) for _ in range(60)]
    boxes.append(
        commands.Evaluate.makeArguments(
            {"session_id": "s_x", "code": "1+1", "mode": "execute", "cell_index": 3}, None
        )
    )
    wire = b"".join(box.serialize() for box in boxes)
    expected = [dict(box) for box in boxes]
    for trial in range(40):
        ours, reference = connected(Collecting()), connected(CollectingAMP())
        at = 0
        while at < len(wire):
            step = rng.choice((1, 2, 3, 7, 100, 70_000)) if trial else len(wire)
            for protocol in (ours, reference):
                protocol.dataReceived(wire[at : at + step])
            at += step
        assert reference.boxes == expected
        assert ours.boxes == expected, trial
        assert ours._unparsed == b""


def test_a_large_box_read_in_pipe_sized_pieces_is_not_kept_whole_between_reads():
    """An 8 MiB restore arrives as one box of many 64 KiB values in 64 KiB reads.

    Only the bytes after its last complete value wait for the next read (at most one
    key and value); keeping the whole box and parsing it again from its start on
    every read made a cold restore of 8 MiB 5.4 times slower (curve a, issue 21).
    """
    values = {f"part{n}".encode(): bytes([n]) * 65_535 for n in range(40)}
    wire = amp.AmpBox(values).serialize() + amp.AmpBox(after=b"1").serialize()
    protocol = connected(Collecting())
    held = []
    for at in range(0, len(wire), 65_536):
        protocol.dataReceived(wire[at : at + 65_536])
        held.append(len(protocol._unparsed))
    assert protocol.boxes == [values, {b"after": b"1"}]
    assert max(held) <= 2 + 255 + 2 + 65_535


def test_a_key_longer_than_amp_allows_closes_the_connection():
    protocol = connected(Collecting())
    protocol.dataReceived(amp.AmpBox(a=b"1").serialize() + b"\x01\x00" + b"k" * 256)
    assert protocol.boxes == [{b"a": b"1"}]
    assert protocol.transport.disconnecting
    assert protocol._keyLengthLimitExceeded


def test_parsing_an_evaluate_box_takes_a_few_calls_not_five_per_string():
    box = commands.Evaluate.makeArguments(
        {"session_id": "s_" + "a" * 22, "code": "1+1", "mode": "execute", "timeout": 30.0}, None
    )
    box[b"_ask"], box[b"_command"] = b"1", b"Evaluate"
    wire = box.serialize()
    protocol = connected(Collecting())
    calls = []

    def count(frame, event, arg):
        if event in ("call", "c_call"):
            calls.append(frame.f_code.co_name if event == "call" else arg)

    sys.setprofile(count)
    try:
        protocol.dataReceived(wire)
    finally:
        sys.setprofile(None)
    assert protocol.boxes == [dict(box)] and len(box) == 6
    assert len(calls) <= 12, calls


CALLS = [
    (
        commands.Evaluate,
        {"session_id": "s_é", "code": "x = '\ud800'", "mode": "execute", "timeout": 2.5},
    ),
    (commands.Evaluate, {"session_id": "s_x", "code": "1", "mode": "m", "cell_index": 7}),
    (commands.OutputChunk, {"session_id": "s_x", "pieces": [["stdout", "hi"]]}),
    (commands.Interrupt, {"session_id": "s_x"}),
    (commands.Ping, {}),
]


def test_boxes_and_values_are_amps_with_the_names_converted_once(monkeypatch):
    converted = []
    real = amp._wireNameToPythonIdentifier

    def ours(call, *args):
        """C{call(*args)}, counting the names converted meanwhile."""
        monkeypatch.setattr(
            amp, "_wireNameToPythonIdentifier", lambda name: converted.append(name) or real(name)
        )
        try:
            return call(*args)
        finally:
            monkeypatch.setattr(amp, "_wireNameToPythonIdentifier", real)

    for command, objects in CALLS:  # every name is seen once first
        command.makeArguments(objects, None)
    for command, objects in CALLS:
        box = ours(command.makeArguments, objects, None)
        assert box == amp._objectsToStrings(objects, command.arguments, amp.Box(), None)
        parsed = ours(command.parseArguments, box, None)
        assert parsed == amp._stringsToObjects(box, command.arguments, None)
        assert {k: v for k, v in parsed.items() if v is not None} == objects
        answer = {"reply": {"ok": True, "result": objects}}
        if command is commands.Interrupt:
            answer = {"interrupted": True}
        elif command is commands.Ping:
            answer = {"pid": 12, "python_version": None}
        response = ours(command.makeResponse, answer, None)
        assert response == amp._objectsToStrings(answer, command.response, amp.Box(), None)
        assert ours(command.parseResponse, response, None) == amp._stringsToObjects(
            response, command.response, None
        )
    assert converted == []
    try:
        commands.Interrupt.makeArguments({"session_id": "s", "sessionid": "s"}, None)
    except amp.InvalidSignature as error:
        assert "sessionid is not a valid argument" in str(error)
    else:
        raise AssertionError("an unknown argument was boxed")
    try:
        commands.Interrupt.parseArguments(amp.Box(), None)
    except KeyError as error:
        assert error.args == (b"session_id",)
    else:
        raise AssertionError("a missing argument was not noticed")
