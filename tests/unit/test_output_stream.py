"""The image's output stream: chunks at most every 50 ms or 64 KiB, one in flight, all before the reply."""

from __future__ import annotations

from twisted.internet import defer, task

from stui_twisted.image.capture import BoundedTextBuffer
from stui_twisted.image.streaming import OutputStream


class Reactor(task.Clock):
    """A clock whose C{callFromThread} runs at once (the test is the only thread)."""

    def callFromThread(self, f, *args, **kwargs):  # noqa: N802 - IReactorThreads
        f(*args, **kwargs)


def _stream(interval=0.05, max_chunk=100):
    reactor = Reactor()
    sent: list[tuple[int | None, list, defer.Deferred]] = []

    def send(history_index, pieces):
        answer = defer.Deferred()
        sent.append((history_index, pieces, answer))
        return answer

    stream = OutputStream(reactor, send, interval=interval, max_chunk=max_chunk)
    stream.history_index = 7
    return reactor, stream, sent


def test_writes_within_the_interval_go_out_as_one_chunk_after_it():
    reactor, stream, sent = _stream()
    reactor.advance(1)  # long after any previous chunk: the first goes out soon
    stream.write("stdout", "a")
    stream.write("stdout", "\n")
    reactor.advance(0.009)
    assert sent == []
    reactor.advance(0.002)
    assert [pieces for _, pieces, _ in sent] == [[["stdout", "a\n"]]]
    sent[0][2].callback({})
    stream.write("stdout", "b")
    stream.write("stderr", "c")
    stream.write("stderr", "d")
    reactor.advance(0.04)
    assert len(sent) == 1  # within 50 ms of the last chunk: coalesced
    reactor.advance(0.01)
    assert sent[1][:2] == (7, [["stdout", "b"], ["stderr", "cd"]])


def test_a_full_chunk_goes_at_once_and_only_one_is_in_flight():
    reactor, stream, sent = _stream(max_chunk=10)
    stream.write("stdout", "x" * 25)
    assert [pieces for _, pieces, _ in sent] == [[["stdout", "x" * 10]]]
    stream.write("stdout", "y")
    reactor.advance(1)
    assert len(sent) == 1  # the server has not answered: the rest waits
    sent[0][2].callback({})
    assert [pieces for _, pieces, _ in sent[1:]] == [[["stdout", "x" * 10]]]
    sent[1][2].callback({})
    reactor.advance(0.05)
    assert [pieces for _, pieces, _ in sent[2:]] == [[["stdout", "x" * 5 + "y"]]]


def test_close_sends_everything_left_in_order_and_later_writes_are_ignored():
    reactor, stream, sent = _stream(max_chunk=4)
    reactor.advance(1)
    stream.write("stdout", "ab")
    reactor.advance(0.01)  # sent, and stays in flight
    stream.write("stdout", "cdefgh")
    stream.write("stderr", "ij")
    stream.close()
    assert [pieces for _, pieces, _ in sent] == [
        [["stdout", "ab"]],
        [["stdout", "cdef"]],
        [["stdout", "gh"], ["stderr", "ij"]],
    ]
    stream.write("stdout", "late")
    reactor.advance(1)
    for _, _, answer in sent:
        answer.callback({})
    assert len(sent) == 3 and not reactor.getDelayedCalls()


def test_the_buffer_streams_what_it_keeps_and_its_truncation_note():
    reactor, stream, sent = _stream(max_chunk=1000)
    buffer = BoundedTextBuffer(limit=5, stream=stream)
    buffer.write("abc")
    buffer.write("defgh", "stderr")
    buffer.finish()
    stream.close()
    streamed = "".join(text for _, pieces, _ in sent for _, text in pieces)
    assert streamed == buffer.getvalue() == "abcde\n[output truncated: 3 more characters]\n"
