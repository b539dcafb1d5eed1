"""Writes to the image's AMP pipes that leave at once when nothing waits before them.

Twisted buffers every write to a pipe until the next reactor iteration: the
writer is added to epoll, the loop comes round, the data is written and the
writer removed again -- two C{epoll_ctl} calls and a loop round per AMP box,
on both ends of every request to the image (issue 21).  L{write_now} writes
straight to the non-blocking pipe when nothing is buffered; what the pipe
does not take is buffered as before, so the order of the bytes is kept.
"""

from __future__ import annotations

import os


def write_now(writer, data: bytes) -> None:
    """Write C{data} to the pipe of C{writer} (a Twisted C{ProcessWriter}), now if it can.

    Anything unusual (something already buffered, the writer closing or
    closed, an error other than a full pipe) leaves the write to Twisted,
    which then behaves as it always does (an error ends the connection).
    """
    if (
        not data
        or not writer.connected
        or writer.disconnecting
        or writer._writeDisconnected
        or writer._tempDataBuffer
        or writer.offset != len(writer.dataBuffer)
    ):
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
