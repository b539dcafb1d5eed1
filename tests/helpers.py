"""Small in-process fixtures: a dispatcher with the real command table."""

from __future__ import annotations

import json
import os

from twisted.internet import task
from twisted.python.failure import Failure

from stui_twisted.access.passwd import hash_password, write_atomically
from stui_twisted.dispatch.commands import build_commands
from stui_twisted.dispatch.dispatcher import Dispatcher
from stui_twisted.dispatch.interfaces import ConnectionContext
from stui_twisted.settings import Settings


class SilentImageObservers:
    """For image fakes: takes the supervisor's observers and never calls them
    (the fake image never restarts by itself, streams no output, never pauses)."""

    def addRestartObserver(self, observer):  # noqa: N802
        pass

    def addOutputObserver(self, observer):  # noqa: N802
        pass

    def addDebugObserver(self, observer):  # noqa: N802
        pass


class NullImageService:
    """Stands in for the service when only the dispatcher and transports are exercised.

    Every command answers through L{handle}; tests override it to delay or
    inspect calls.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()

    def uptime(self) -> float:
        return 0.0

    def image_status(self) -> dict:
        return {"status": "disabled", "pid": None, "started_at": None}

    def node(self) -> dict:
        return {"node_id": "test-node", "advertise": None}

    async def handle(self, name: str, call) -> dict:
        return {"handled": name, "params": call.params}

    def __getattr__(self, name):
        async def handler(call):
            return await self.handle(name, call)

        return handler


def make_dispatcher(service=None, clock=None, auth=None) -> Dispatcher:
    clock = clock or task.Clock()
    service = service or NullImageService()
    dispatcher = Dispatcher(clock=clock, auth=auth)
    # the stand-ins answer calls themselves, in place of the wire adapter
    dispatcher.register_all(build_commands(service, dispatcher, auth, handlers=service))
    return dispatcher


def context(transport: str = "tcp") -> ConnectionContext:
    return ConnectionContext(transport=transport, peer="test")


def dispatch(dispatcher: Dispatcher, data, ctx=None) -> dict:
    """Dispatch synchronously-completing requests and decode the reply."""
    if not isinstance(data, bytes):
        data = json.dumps(data).encode()
    replies = []
    dispatcher.dispatch(ctx or context(), data).addCallback(replies.append)
    assert replies, "the reply did not complete synchronously"
    return json.loads(replies[0])


def wait_for_signal_keys(child, timeout: float = 10.0) -> None:
    """Wait until the child's terminal turns Ctrl-C into SIGINT (ISIG on).

    The REPL reads its prompt in raw mode, where Ctrl-C is only a byte; once
    a line is submitted it restores the terminal, and only then does
    C{child.sendintr()} interrupt the evaluation it is waiting for.
    """
    import termios
    import time

    deadline = time.monotonic() + timeout
    while not termios.tcgetattr(child.child_fd)[3] & termios.ISIG:
        assert time.monotonic() < deadline, "the terminal stayed in raw mode"
        time.sleep(0.01)


KILL9_CYCLES = int(os.environ.get("STUI_KILL9_CYCLES", "5"))
"""kill -9 rounds per kill-loop test (crash safety, PostgreSQL): 5 by default, for the
suite's 8-minute budget; C{STUI_KILL9_CYCLES=20} is the deep run (docs/reliability.md)."""


FAST_SCRYPT = {"n": 2**10, "r": 8, "p": 1}
"""Cheap scrypt parameters for test password files."""


def write_users(path, **users: str) -> None:
    """A password file at C{path} with C{users} (name=password; C{__} in a name is C{:})."""
    lines = [
        f"{name.replace('__', ':')}:{hash_password(pw, **FAST_SCRYPT)}\n"
        for name, pw in users.items()
    ]
    write_atomically(str(path), ["# test users\n", *lines])


class SyncPool:
    """A thread-pool stand-in: runs the work at once, on the calling thread."""

    started = True

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.started = False

    def callInThreadWithCallback(self, on_result, func, *args, **kw):  # noqa: N802
        try:
            result = func(*args, **kw)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class SyncReactor(task.Clock):
    """A C{task.Clock} whose C{callFromThread} runs at once (threads are synchronous here)."""

    def callFromThread(self, f, *args, **kw):  # noqa: N802
        f(*args, **kw)

    def getThreadPool(self):  # noqa: N802
        return SyncPool()


START_PROCESSES = """
import os, subprocess, time
popen = subprocess.Popen(['sleep', '300'])
os.system('sleep 75 & echo $! > {pidfile}')
forked = os.fork()
if forked == 0:
    time.sleep(300)
    os._exit(0)
pids = [popen.pid, forked]
"""
"""A cell that starts three processes (Popen, a shell's background job, a fork)."""


def process_alive(pid: int) -> bool:
    """Whether C{pid} is a live process (a zombie counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def reactor_sleep(seconds: float):
    """A Deferred that fires after C{seconds} on the running reactor."""
    from twisted.internet import reactor

    return task.deferLater(reactor, seconds, lambda: None)


async def failure_of(deferred):
    """The StuiError a Deferred fails with (fails the test if it succeeds)."""
    from stui_twisted.protocol.errors import StuiError

    try:
        value = await deferred
    except StuiError as error:
        return error
    raise AssertionError(f"expected a StuiError, got {value!r}")


def make_session(client_id: str = "alice", number: int = 1, **extra) -> dict:
    """A minimal session document as the store takes it (session id from C{number})."""
    session = {
        "session_id": f"s_{number:022d}",
        "client_id": client_id,
        "state": "active",
        "created_at": "2026-11-23T10:00:00.000Z",
        "last_modified": "2026-11-23T10:00:00.000Z",
        "last_activity": "2026-11-23T10:00:00.000Z",
        "timeout": 3600.0,
        "closed_at": None,
        "shares": [],
        "session_state": {"n": number},
    }
    session.update(extra)
    return session
