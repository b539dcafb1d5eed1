"""Writes to the image's AMP pipes that leave at once (L{write_now}, issue 21): in order, never lost."""

from __future__ import annotations

import os

import pytest
from twisted.internet import process

from stui_twisted.image.process import _ChildPipeTransport
from stui_twisted.transports.immediate import write_now


class Reactor:
    """What a ProcessWriter asks of its reactor, recorded."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def addReader(self, r):  # noqa: N802 - the reactor's names
        self.calls.append("addReader")

    def removeReader(self, r):  # noqa: N802
        self.calls.append("removeReader")

    def addWriter(self, w):  # noqa: N802
        self.calls.append("addWriter")

    def removeWriter(self, w):  # noqa: N802
        self.calls.append("removeWriter")


class Process:
    """The process transport a C{_ChildPipeTransport} writes through."""

    def __init__(self, writer=None) -> None:
        self.pipes = {3: writer}

    def writeToChild(self, fd, data):  # noqa: N802 - as Twisted's Process does
        self.pipes[fd].write(data)

    def childConnectionLost(self, fd, reason):  # noqa: N802
        pass


@pytest.fixture
def pipe():
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    reactor = Reactor()
    writer = process.ProcessWriter(reactor, Process(), "write", write_end)
    yield reactor, writer, read_end
    os.close(read_end)
    writer.connectionLost(None)


def drain(read_end: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(read_end, 1 << 20)
        except BlockingIOError:
            return b"".join(chunks)
        chunks.append(chunk)


def test_a_box_to_the_image_leaves_in_the_write_without_waiting_for_the_reactor(pipe):
    reactor, writer, read_end = pipe
    reactor.calls.clear()
    transport = _ChildPipeTransport(Process(writer), 3)
    transport.write(b"box one")
    transport.write(b"box two")
    assert drain(read_end) == b"box onebox two"
    assert reactor.calls == []  # no writer added to epoll, nothing buffered
    assert writer._tempDataLen == 0


def test_what_a_full_pipe_does_not_take_is_buffered_and_nothing_overtakes_it(pipe):
    reactor, writer, read_end = pipe
    big = bytes(range(256)) * 4096  # 1 MiB, more than a pipe holds
    write_now(writer, big)
    assert "addWriter" in reactor.calls  # the rest waits for the reactor
    write_now(writer, b"after")  # behind what is buffered, not before it
    received = drain(read_end)
    while writer._tempDataBuffer or writer.offset != len(writer.dataBuffer):
        writer.doWrite()
        received += drain(read_end)
    assert received == big + b"after"
    reactor.calls.clear()
    write_now(writer, b"again")  # the buffer is empty again: at once
    assert drain(read_end) == b"again" and reactor.calls == []


def test_a_writer_without_the_fields_it_checks_takes_twisteds_own_path():
    """Should a Twisted release rename the buffer fields, writes still reach the pipe."""

    class OtherWriter:
        connected, disconnecting = True, False

        def __init__(self) -> None:
            self.written: list[bytes] = []

        def write(self, data: bytes) -> None:
            self.written.append(data)

    writer = OtherWriter()
    write_now(writer, b"box")
    assert writer.written == [b"box"]
