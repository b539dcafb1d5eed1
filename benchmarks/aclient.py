"""An asyncio line-JSON client for the concurrent benchmarks (many connections, one CPU).

One :class:`Conn` is one TCP connection; :meth:`Conn.call` sends a request and
waits for the reply with the same id, so several coroutines may share a
connection, although the benchmarks give each simulated client its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import time


class Conn:
    """One asyncio TCP connection speaking line-JSON, replies matched by id."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._dead: BaseException | None = None
        self._reading = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def open(cls, port: int, timeout: float = 30.0) -> Conn:
        """Connect to 127.0.0.1:C{port}."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, limit=16 * 1024 * 1024), timeout
        )
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def _read_loop(self) -> None:
        try:
            while True:
                line = await self.reader.readline()
                if not line:
                    break
                reply = json.loads(line)
                future = self._waiting.pop(reply.get("id"), None)
                if future is not None and not future.done():
                    future.set_result(reply)
        except (ConnectionError, ValueError, asyncio.IncompleteReadError) as exc:
            self._fail(exc)
            return
        self._fail(ConnectionError("server closed the connection"))

    def _fail(self, exc: BaseException) -> None:
        self._dead = exc
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(exc)
        self._waiting.clear()

    async def call(self, command: str, timeout: float = 60.0, **params) -> dict:
        """Send one request; the decoded reply (ConnectionError at once on a dead connection)."""
        if self._dead is not None:
            raise ConnectionError(f"connection already lost: {self._dead}")
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        message = {"id": request_id, "command": command, "parameters": params}
        self.writer.write(json.dumps(message).encode() + b"\n")
        return await asyncio.wait_for(future, timeout)

    async def timed(self, command: str, **params) -> tuple[float, dict]:
        """(seconds, reply) of one call."""
        started = time.perf_counter()
        reply = await self.call(command, **params)
        return time.perf_counter() - started, reply

    async def close(self) -> None:
        """Close the connection and stop reading."""
        self._reading.cancel()
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):  # already gone is fine
            await self.writer.wait_closed()
