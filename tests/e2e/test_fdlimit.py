"""File-descriptor exhaustion: a reserve for the image and the store.

A real server started under a low RLIMIT_NOFILE is flooded with idle
connections; the image, killed meanwhile, must still be respawned.
"""

from __future__ import annotations

import json
import resource
import socket
import time

import pytest
from twisted.internet.task import Clock

from stui_twisted.transports.connections import ConnectionRegistry
from stui_twisted.transports.fdlimit import (
    FdGuardedFactory,
    FdReserve,
    _Refusal,
    raise_nofile_limit,
)
from tests.serverproc import ServerProcess


def _limit_open_files(soft: int, hard: int):
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return preexec


def _wait_for(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"no {what} within {seconds} s")


@pytest.mark.e2e
def test_flooded_with_connections_the_server_still_respawns_its_image(tmp_path):
    proc = ServerProcess(tmp_path, zmq=False, preexec_fn=_limit_open_files(128, 256)).start()
    flood: list[socket.socket] = []
    try:
        assert "soft limit raised from 128 to 256" in proc.log_text()
        client = proc.tcp_client(timeout=30)
        client.result("create_session", client_id="fd")
        assert client.result("evaluate", code="x = 7")["has_error"] is False
        for _ in range(300):  # more than the 256 descriptors the server may have
            sock = socket.create_connection(("127.0.0.1", proc.tcp_port), 10)
            flood.append(sock)
        told = closed = 0
        for sock in flood[-100:]:  # past the reserve: told why (or, past 16 at once, just closed)
            sock.settimeout(10)
            data = sock.recv(65536)
            if data:
                reply = json.loads(data.splitlines()[0])
                assert reply["error_type"] == "RateLimited", reply
                assert reply["details"]["reason"] == "file_descriptors"
                told += 1
            else:
                closed += 1
        assert told >= 1 and told + closed == 100
        _wait_for(lambda: "refusing new connections" in proc.log_text(), 10, "refusal log line")

        before = client.result("ping")["image"]
        assert before["status"] == "running", before
        reply = client.call("evaluate", code="import os; os._exit(3)")
        assert reply["status"] == "error", reply

        def restarted():
            image = client.result("ping")["image"]
            return image["status"] == "running" and image["pid"] != before["pid"] and image

        _wait_for(restarted, 30, "image restart while the connections are held")
        client.result("restore_session", session_id=client.result("get_session_info")["session_id"])
        assert client.result("evaluate", code="x")["result"] == "7"
        client.close()
    finally:
        for sock in flood:
            sock.close()
        proc.kill()


# -- the reserve's arithmetic, without a process ---------------------------------------


class _Registry(ConnectionRegistry):
    def __init__(self) -> None:
        super().__init__(10_000)
        self.count = 0

    @property
    def limited_count(self) -> int:
        return self.count


def test_the_reserve_counts_connections_opened_since_the_last_count():
    clock, registry, open_fds = Clock(), _Registry(), [100]
    reserve = FdReserve(clock, registry, reserve=10, count=lambda: open_fds[0], limit=120)
    reserve.startService()
    try:
        for _ in range(10):  # 100 open + 10 connections = 110 = limit - reserve
            assert reserve.admit()
            registry.count += 1
            open_fds[0] += 1
        assert not reserve.admit()  # the 11th would eat into the reserve
        open_fds[0] -= 5  # five descriptors of something else are closed
        assert not reserve.admit()  # not counted again yet: at most every recount_interval
        clock.advance(reserve.recount_interval)
        assert reserve.admit()
        registry.count += 1
        assert reserve.estimate() == 106
    finally:
        reserve.stopService()


def test_a_refused_connection_gets_one_error_line():
    clock, registry = Clock(), _Registry()
    reserve = FdReserve(clock, registry, reserve=10, count=lambda: 200, limit=100)
    reserve.startService()
    inner = object()
    try:
        factory = FdGuardedFactory(inner, reserve)
        built = factory.buildProtocol(None)
        assert isinstance(built, _Refusal)
        assert json.loads(built._line)["error_type"] == "RateLimited"
    finally:
        reserve.stopService()


def test_raise_nofile_limit_reaches_the_hard_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if hard != resource.RLIM_INFINITY and soft > 64:
            resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        before, after, reported_hard = raise_nofile_limit()
        assert reported_hard == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == after
        if hard != resource.RLIM_INFINITY:
            assert after == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_slow_count_is_made_less_often():
    """Counting costs ~1 µs per descriptor: the gaps stretch to 100x its duration."""
    clock, registry, counts = Clock(), _Registry(), []

    def slow_count() -> int:
        counts.append(clock.seconds())
        time.sleep(0.02)  # as slow as ~20,000 open descriptors
        return 200

    reserve = FdReserve(clock, registry, reserve=10, count=slow_count, limit=100)
    reserve.startService()
    try:
        assert len(counts) == 1
        assert reserve._count_seconds >= 0.02
        clock.advance(reserve.interval)  # 1 s < 100 x 20 ms: not yet
        assert not reserve.admit()  # full, but not counted again either
        assert len(counts) == 1
        clock.advance(100 * reserve._count_seconds)
        assert not reserve.admit()
        assert len(counts) == 2
    finally:
        reserve.stopService()
