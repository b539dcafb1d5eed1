"""Writes that leave at once when nothing waits before them (issue 21).

Twisted buffers every write to a socket or pipe until the next reactor
iteration: the descriptor is added to epoll, the loop comes round, the data
is written and the descriptor removed again -- two C{epoll_ctl} calls and a
loop round per write.  L{write_now} writes straight to the non-blocking
descriptor when nothing is buffered; what the kernel does not take is
buffered as before, so the order of the bytes is kept.  Used for the image's
AMP pipes, both ends (no producer is registered on them).  Not for client
connections: tried for line-JSON replies and events (a producer there pauses
reading and the event outboxes while the buffer is full), the e2e test of a
subscriber that stops reading never got its last events (not diagnosed;
tests/e2e/test_e2e_events.py), and the latency did not move (issue 21).
"""

from __future__ import annotations

import os


def write_now(writer, data: bytes) -> None:
    """Write C{data} to C{writer} (a Twisted C{ProcessWriter}), now if it can.

    Anything unusual (something already buffered, the writer closing or
    closed, an error other than a full pipe) leaves the write to Twisted,
    which then behaves as it always does (an error ends the connection).
    """
    try:
        busy = (
            not writer.connected
            or writer.disconnecting
            or writer._writeDisconnected
            or writer._tempDataBuffer
            or writer.offset != len(writer.dataBuffer)
        )
    except AttributeError:  # a Twisted without these FileDescriptor fields: its own path
        busy = True
    if not data or busy:
        writer.write(data)
        return
    try:
        written = os.write(writer.fileno(), data)
    except (BlockingIOError, InterruptedError):
        written = 0
    except OSError:
        writer.write(data)  # the reactor's write meets the error and reports it
        return
    if written < len(data):
        writer.write(data[written:])
