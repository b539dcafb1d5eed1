"""The image's stdout/stderr cannot flood the server log (issue 13.8)."""

from __future__ import annotations

import time

import pytest
from twisted.internet import task
from twisted.logger import Logger

from stui_twisted.image import outputlog
from stui_twisted.image.outputlog import ChildOutputLog


class Recorder:
    def __init__(self) -> None:
        self.events: list[dict] = []

    def __call__(self, event: dict) -> None:
        self.events.append(event)

    def lines(self) -> list[str]:
        return [e["line"] for e in self.events if "line" in e]

    def drops(self) -> list[dict]:
        return [e for e in self.events if "dropped" in e.get("log_format", "")]


def make_log() -> tuple[ChildOutputLog, Recorder, task.Clock]:
    recorder, clock = Recorder(), task.Clock()
    output = ChildOutputLog(Logger(observer=recorder), "stdout", clock.seconds)
    output.pid = 4242
    return output, recorder, clock


def test_lines_are_logged_whole_and_long_ones_cut():
    output, recorder, _ = make_log()
    output.feed(b"one\ntw")
    output.feed(b"o\n" + b"z" * (outputlog.MAX_LOG_LINE + 10))
    output.flush()
    assert recorder.lines() == ["one", "two", "z" * outputlog.MAX_LOG_LINE, "z" * 10]


def test_a_flood_is_cut_to_the_rate_limit_and_the_drop_is_said_once_per_interval():
    output, recorder, clock = make_log()
    flood = b"x" * 99 + b"\n"
    for _ in range(10):
        output.feed(flood * 1000)  # 100,000 lines in one interval
    assert len(recorder.lines()) == outputlog.MAX_LINES_PER_INTERVAL
    assert recorder.drops() == []
    clock.advance(outputlog.INTERVAL)
    output.feed(b"after\n")
    (drop,) = recorder.drops()
    assert drop["lines"] == 10_000 - outputlog.MAX_LINES_PER_INTERVAL
    assert drop["bytes"] == drop["lines"] * len(flood)
    assert recorder.lines()[-1] == "after"


def test_the_byte_limit_holds_for_long_lines_too():
    output, recorder, _ = make_log()
    output.feed((b"y" * 1999 + b"\n") * 1000)
    logged = sum(len(line) + 1 for line in recorder.lines())
    assert logged <= outputlog.MAX_BYTES_PER_INTERVAL + outputlog.MAX_LOG_LINE + 1


FLOOD = """
import os, threading, time
def flood():
    line = b'flood ' * 20 + b'\\n'
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        os.write(1, line * 50)
threading.Thread(target=flood, daemon=True).start()
"""


@pytest.mark.e2e
@pytest.mark.image
@pytest.mark.timeout(60)
def test_a_thread_writing_to_fd_1_does_not_grow_the_server_log(tmp_path, start_server):
    server = start_server(tmp_path, zmq=False)
    client = server.tcp_client()
    client.result("create_session", client_id="alice")
    before = server.log_path.stat().st_size
    client.result("evaluate", code=FLOOD)
    time.sleep(2.5)
    assert client.result("ping")["message"] == "pong"
    grown = server.log_path.stat().st_size - before
    # About 3 intervals' worth of lines at most (each ~200 bytes with its prefix).
    assert grown < 3 * outputlog.MAX_LINES_PER_INTERVAL * 300, grown
    assert "dropped" in server.log_text()
