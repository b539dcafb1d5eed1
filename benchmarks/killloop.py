"""kill -9 cycles against a real server: the core of the crash-safety test and soak.

One cycle: start the server on a data dir, read back the stored counter of one
session (``restore_session`` → ``session_state.counter``), stream
``update_session_state`` with an increasing counter from a thread, SIGKILL the
server at a random moment, and record what had been acknowledged.  The next
cycle's read-back is checked against the previous cycle's last acknowledged
value: under ``always`` it must be ≥; under ``batch`` the gap must fit in what
could be acknowledged within one flush interval (plus a margin for the flush's
own write).
"""

from __future__ import annotations

import bisect
import socket
import threading
import time
from dataclasses import dataclass, field

from tests.serverproc import LineClient, ServerProcess


@dataclass
class CycleResult:
    """What one streaming-then-SIGKILL cycle saw."""

    start_counter: int
    last_sent: int = 0
    last_acked: int = 0
    acks: int = 0
    errors: list[str] = field(default_factory=list)
    ack_times: list[float] = field(default_factory=list)
    killed_at: float = 0.0
    server_rss: int = 0

    def lost_window(self, stored: int) -> float:
        """Seconds between the acknowledgement of the first lost update and the kill (0: none lost)."""
        index = stored - self.start_counter  # counters start_counter+1.. were acknowledged in order
        if stored >= self.last_acked or index >= len(self.ack_times):
            return 0.0
        return self.killed_at - self.ack_times[max(0, index)]

    def outcome(self, stored: int) -> dict:
        """The cycle as the kill -9 tests check it, beside what the restart found stored."""
        return {
            "start": self.start_counter,
            "acked": max(self.last_acked, self.start_counter),
            "sent": self.last_sent,
            "acks": self.acks,
            "stored": stored,
            "errors": self.errors,
        }

    def acked_since(self, seconds: float) -> int:
        """How many acknowledgements arrived in the last C{seconds} before the kill."""
        start = bisect.bisect_left(self.ack_times, self.killed_at - seconds)
        return len(self.ack_times) - start


class CounterStream(threading.Thread):
    """Stream C{update_session_state({"counter": n})} until the connection dies."""

    def __init__(self, port: int, session_id: str, client_id: str, result: CycleResult) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.session_id = session_id
        self.client_id = client_id
        self.result = result
        self.started_streaming = threading.Event()

    def run(self) -> None:
        """Send, wait for the reply, record acknowledgements; stop on a dead connection."""
        result = self.result
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), 10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client = LineClient(sock, timeout=10)
        except OSError as exc:
            result.errors.append(f"connect: {exc}")
            self.started_streaming.set()
            return
        counter = result.start_counter
        try:
            while True:
                counter += 1
                result.last_sent = counter
                reply = client.call(
                    "update_session_state",
                    session_id=self.session_id,
                    client_id=self.client_id,
                    state_data={"counter": counter},
                )
                if reply.get("status") == "success":
                    result.last_acked = counter
                    result.acks += 1
                    result.ack_times.append(time.monotonic())
                else:
                    result.errors.append(f"{reply.get('error_type')}: {reply.get('error')}")
                    if len(result.errors) > 100:
                        return
                self.started_streaming.set()
        except (OSError, ValueError):
            return  # the server was killed: the connection is gone, which is the point
        finally:
            self.started_streaming.set()
            client.close()


def stored_counter(server: ServerProcess, session_id: str, client_id: str) -> int:
    """The counter the restarted server has for the session (0 when none yet)."""
    client = server.tcp_client(timeout=15)
    try:
        result = client.result("restore_session", session_id=session_id, client_id=client_id)
    finally:
        client.close()
    state = result.get("session_state") or {}
    return int(state.get("counter", 0)) if isinstance(state, dict) else 0


def create_counter_session(server: ServerProcess, client_id: str) -> str:
    """A session whose state starts at counter 0, saved durably whatever the policy.

    C{save_context} is durable before it replies under every policy, so even
    under C{batch} the session exists on disk before the first kill.
    """
    client = server.tcp_client(timeout=15)
    try:
        session_id = client.result("create_session", client_id=client_id)["session_id"]
        client.result("update_session_state", session_id=session_id, state_data={"counter": 0})
        client.result("save_context", session_id=session_id)
        return session_id
    finally:
        client.close()


def kill_cycle(
    server: ServerProcess,
    session_id: str,
    client_id: str,
    start_counter: int,
    kill_after: float,
    rss=None,
) -> CycleResult:
    """Stream updates from C{start_counter + 1}, SIGKILL the server after C{kill_after} s."""
    result = CycleResult(start_counter=start_counter)
    stream = CounterStream(server.tcp_port, session_id, client_id, result)
    stream.start()
    stream.started_streaming.wait(10)
    time.sleep(kill_after)
    if rss is not None:
        result.server_rss = rss(server.process.pid)
    result.killed_at = time.monotonic()
    server.process.kill()
    server.process.wait(10)
    stream.join(15)
    return result
