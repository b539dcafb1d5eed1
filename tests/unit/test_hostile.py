"""Hostile input: every input gets a well-formed reply or a clean close, never a crash or hang.

Three entry points are fed random envelopes and random bytes (hypothesis):

(a) the :class:`~stui_twisted.dispatch.dispatcher.Dispatcher` with the real command table
    over a real :class:`~stui_twisted.sessions.service.SessionService` on a temp dir
    (image disabled), once without and once with authentication;
(b) the line protocol over ``StringTransport``;
(c) the ZeroMQ adapter's ``message_received`` with a fake router.

Everything runs synchronously (a thread-pool stand-in that runs work at once,
a ``task.Clock`` reactor), so a reply that did not arrive by the time
``dispatch`` returns is a hang, and 10,000 examples per entry point stay cheap.
Explicit cases add what random generation rarely reaches: 100k levels of
nesting, a number with 10^6 digits, NaN, invalid UTF-8, and a 1 MB string in
every parameter of every command.
"""

from __future__ import annotations

import json
import os
import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from stui_twisted.access.auth import Authenticator
from stui_twisted.access.passwd import hash_password, write_atomically
from stui_twisted.dispatch.commands import build_commands
from stui_twisted.dispatch.dispatcher import Dispatcher
from stui_twisted.dispatch.interfaces import ConnectionContext
from stui_twisted.protocol.errors import ERROR_TYPES
from stui_twisted.sessions.service import SessionService
from stui_twisted.settings import Settings
from stui_twisted.storage.store import SessionStore
from stui_twisted.transports.linejson import LineJSONFactory
from stui_twisted.transports.zmqrouter import ZmqRouterService
from tests.helpers import NullImageService, SyncPool, SyncReactor

# 3,000 examples per entry point by default, new random ones every run (no example
# database): the suite's 8-minute budget.  STUI_HOSTILE_EXAMPLES=10000 is the deep run.
EXAMPLES = int(os.environ.get("STUI_HOSTILE_EXAMPLES", "3000"))
HYPOTHESIS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
# Extra angles on the same entry points get a fifth of the budget.
SECONDARY = settings(HYPOTHESIS, max_examples=max(1, EXAMPLES // 5))
ONE_MB = 1024 * 1024


class World:
    """A real SessionService on a temp dir, and dispatchers with and without auth."""

    def __init__(self, directory) -> None:
        self.reactor = SyncReactor()
        users = directory / "users"
        write_atomically(str(users), [f"alice:{hash_password('pw', n=2**4, r=1, p=1)}\n"])
        self.settings = Settings(
            data_dir=str(directory / "data"),
            image_enabled=False,
            auth_file=str(users),
            durability="none",
        )
        store = SessionStore(self.settings.data_dir, reactor=self.reactor, threadpool=SyncPool())
        self.sessions = SessionService(self.settings, reactor=self.reactor, store=store)
        self.sessions.startService()
        self.auth = Authenticator(
            self.settings, self.reactor, reactor=self.reactor, threadpool=SyncPool()
        )
        self.auth.load()
        self.open = Dispatcher(clock=self.reactor)
        self.open.register_all(build_commands(self.sessions, self.open, None))
        self.guarded = Dispatcher(clock=self.reactor, auth=self.auth)
        self.guarded.register_all(build_commands(self.sessions, self.guarded, self.auth))
        self.sessions.dispatcher = self.open
        token = self.dispatch(
            self.guarded,
            ConnectionContext("zmq", "x"),
            json.dumps(
                {"command": "authenticate", "parameters": {"username": "alice", "password": "pw"}}
            ).encode(),
        )
        self.token = token["result"]["token"]

    def dispatch(self, dispatcher, context, data: bytes) -> dict:
        replies = []
        dispatcher.dispatch(context, data).addCallback(replies.append)
        assert len(replies) == 1, f"no synchronous reply to {data[:200]!r}"
        return check_reply(replies[0])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("hostile"))


def check_reply(data: bytes) -> dict:
    """Assert C{data} is one well-formed reply (protocol.md section 2) and return it."""
    assert isinstance(data, bytes)
    assert b"\n" not in data, "a reply must be one line"
    reply = json.loads(data)
    assert isinstance(reply, dict)
    assert {"id", "status", "timestamp"} <= set(reply)
    assert isinstance(reply["timestamp"], str) and reply["timestamp"].endswith("Z")
    if reply["status"] == "success":
        assert isinstance(reply["result"], dict)
    else:
        assert reply["status"] == "error"
        assert reply["error_type"] in ERROR_TYPES
        assert reply["error_type"] != "InternalError", reply  # a bug, not hostile input
        assert isinstance(reply["error"], str) and reply["error"]
        assert isinstance(reply.get("details", {}), dict)
    return reply


# -- strategies -------------------------------------------------------------------------

TABLE = build_commands(NullImageService(), None, None)
COMMANDS = sorted(c.name for c in TABLE)
PARAMETER_NAMES = sorted({p.name for c in TABLE for p in c.params})

# Values are built by a seeded random.Random from one hypothesis-drawn seed: a
# recursive hypothesis strategy costs ~8 ms per example, this ~0.2 ms, which is
# what makes 10,000 examples per entry point fit in CI.  Hypothesis still picks
# the envelope's shape (command, parameter names, which fields are present) and
# reports the failing seed and payload.
SPECIAL_STRINGS = [
    "NaN",
    "Infinity",
    "-Infinity",
    "1e999",
    "",
    "\x00",
    "s_" + "A" * 22,
    "alice",
    "bob",
    "../../etc/passwd",
    "\ud800",
    "\udfff\ud800",
    "\u202e",
    "\r\n",
    "TOKEN",
    "null",
    "__import__('os').system('true')",
    "a" * 129,
    "display",
    "execute",
]
ALPHABET = 'az09 _-.:@"\\/\n\t\x00\x7f\u00e9\u4e2d\U0001f600\ud800\udc00{}[],'
HUGE_INTS = [2**64, -(2**63) - 1, 10**300, 2**31, -1, 0]


def random_value(rng, depth: int = 0):
    """One JSON-able value of any type, nested at most 4 deep."""
    kind = rng.randrange(13 if depth < 4 else 9)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.randint(-1000, 1000)
    if kind == 3:
        return rng.choice(HUGE_INTS)
    if kind == 4:
        return rng.uniform(-1, 1) * 10.0 ** rng.randint(-300, 300)
    if kind == 5:
        return "".join(rng.choices(ALPHABET, k=rng.randrange(40)))
    if kind in (6, 7):
        return rng.choice(SPECIAL_STRINGS)
    if kind == 8:
        return rng.choice(COMMANDS + PARAMETER_NAMES)
    if kind in (9, 10):
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {
        _key(random_value(rng, 4))
        if rng.random() < 0.2
        else rng.choice(PARAMETER_NAMES): random_value(rng, depth + 1)
        for _ in range(rng.randrange(4))
    }


def _key(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


SEEDS = st.integers(0, 2**32 - 1)
COMMAND_CHOICES = st.sampled_from(COMMANDS + ["<random>", "<missing>"])
SHAPES = st.sampled_from(["params", "params", "params", "other", "none"])
NAME_LISTS = st.lists(st.sampled_from(PARAMETER_NAMES + ["<random>"]), max_size=5)
QUARTER = st.integers(0, 3)


@st.composite
def envelopes(draw) -> dict:
    """A request-like object; a C{"TOKEN"} string stands for a valid token."""
    rng = random.Random(draw(SEEDS))
    message: dict = {}
    if draw(st.booleans()):
        message["id"] = random_value(rng)
    command = draw(COMMAND_CHOICES)
    if command == "<random>":
        message["command"] = random_value(rng)
    elif command != "<missing>":
        message["command"] = command
    shape = draw(SHAPES)
    if shape == "params":
        message["parameters"] = {
            (_key(random_value(rng)) if name == "<random>" else name): random_value(rng)
            for name in draw(NAME_LISTS)
        }
    elif shape == "other":
        message["parameters"] = random_value(rng)
    if draw(QUARTER) == 0:
        message["client_id"] = random_value(rng)
    if draw(QUARTER) == 0:
        message["token"] = "TOKEN" if draw(st.booleans()) else random_value(rng)
    return message


def encode(message: dict) -> bytes:
    return json.dumps(message, allow_nan=True).encode("utf-8", "surrogatepass")


def with_token(payload: bytes, token: str) -> bytes:
    """Put a real token where the envelope says C{"TOKEN"}."""
    return payload.replace(b'"TOKEN"', json.dumps(token).encode())


KINDS = st.integers(0, 9)
RANDOM_BYTES = st.binary(max_size=200)


@st.composite
def inputs(draw) -> bytes:
    """Valid-ish envelopes, mutated envelopes, or random bytes."""
    kind = draw(KINDS)
    if kind <= 5:
        return encode(draw(envelopes()))
    if kind <= 7:
        data = bytearray(encode(draw(envelopes())))
        rng = random.Random(draw(SEEDS))
        for _ in range(rng.randint(1, 4)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    return draw(RANDOM_BYTES)


# -- (a) the dispatcher -------------------------------------------------------------------


@HYPOTHESIS
@given(
    payload=inputs(),
    guarded=st.booleans(),
    transport=st.sampled_from(["tcp", "tls", "zmq"]),
    logged_in=st.booleans(),
)
def test_dispatcher_answers_everything(world, payload, guarded, transport, logged_in):
    context = ConnectionContext(transport, "203.0.113.9")
    if guarded and logged_in:
        context.principal = "alice"  # ignored on zmq: only tokens count there
    dispatcher = world.guarded if guarded else world.open
    world.dispatch(dispatcher, context, with_token(payload, world.token))


def test_auth_gate_holds_for_random_envelopes(world):
    """Without a token or a principal, only public commands ever succeed."""
    public = {"ping", "describe", "authenticate"}

    @SECONDARY
    @given(message=envelopes(), transport=st.sampled_from(["tcp", "zmq"]))
    def check(message, transport):
        message.pop("token", None)
        reply = world.dispatch(world.guarded, ConnectionContext(transport, "x"), encode(message))
        if reply["status"] == "success":
            assert message.get("command") in public, (message, reply)

    check()


# -- explicit extremes ---------------------------------------------------------------------

EXTREMES = [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"command": "ping", "parameters": ' + b'{"a":' * 100_000 + b"1" + b"}" * 100_000 + b"}",
    b'{"command": "ping", "id": ' + b"9" * 1_000_000 + b"}",
    b'{"command": "evaluate", "parameters": {"timeout": 1' + b"0" * 1_000_000 + b"}}",
    b'{"command": "ping", "id": NaN}',
    b'{"command": "create_session", "parameters": {"timeout": Infinity, "client_id": "a"}}',
    b'{"command": "create_session", "parameters": {"timeout": 1e999, "client_id": "a"}}',
    b'{"command": "ping", "id": "\xff\xfe"}',
    b'{"command": "p\xc3\x28ing"}',
    b'{"command": "ping", "id": "\\ud800"}',
    b"\xef\xbb\xbf" + b'{"command": "ping"}',
    b"\x00" * 1000,
    b'{"command": "ping"}' * 3,
    b'{"command": "ping", "command": 5}',
    b"",
]


@pytest.mark.parametrize("payload", EXTREMES, ids=lambda p: repr(p[:30]))
def test_extremes_get_a_reply(world, payload):
    for dispatcher in (world.open, world.guarded):
        world.dispatch(dispatcher, ConnectionContext("tcp", "x"), payload)


@pytest.mark.parametrize("command", COMMANDS)
def test_one_megabyte_in_every_parameter(world, command):
    big = "\u00e9" * (ONE_MB // 2) + "x" * (ONE_MB // 2)
    params = {p.name for c in world.open.commands().values() if c.name == command for p in c.params}
    # what the command answers anyway (describe lists every command): not an echo
    bare = json.dumps({"id": big[:10], "command": command, "parameters": {}}).encode()
    baseline = len(json.dumps(world.dispatch(world.open, ConnectionContext("tcp", "x"), bare)))
    for name in sorted(params) + ["__all__"]:
        parameters = {n: big for n in params} if name == "__all__" else {name: big}
        payload = json.dumps({"id": big[:10], "command": command, "parameters": parameters})
        started = time.perf_counter()
        reply = world.dispatch(world.open, ConnectionContext("tcp", "x"), payload.encode())
        assert time.perf_counter() - started < 5
        wire = len(json.dumps(reply, ensure_ascii=False).encode())
        assert wire < 2 * len(payload.encode()) + baseline + 10_000, "the reply echoes too much"


# -- (b) the line protocol -------------------------------------------------------------------


def _line_connection(world, max_message_bytes: int = 4096):
    factory = LineJSONFactory(
        world.guarded,
        transport_name="tcp",
        max_message_bytes=max_message_bytes,
        clock=world.reactor,
    )
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def _drain(world) -> None:
    """Run the calls due now (the fairness turns), as many reactor turns as they take."""
    clock = world.reactor
    for _ in range(1000):
        if not any(call.getTime() <= clock.seconds() for call in clock.getDelayedCalls()):
            return
        clock.advance(0)
    raise AssertionError("the connection never stopped scheduling turns")


@HYPOTHESIS
@given(
    lines=st.lists(st.one_of(inputs(), st.binary(max_size=300)), max_size=4),
    ending=st.sampled_from([b"\n", b"\r\n"]),
    chunk=st.integers(1, 512),
)
def test_line_protocol_answers_every_line_or_closes(world, lines, ending, chunk):
    protocol, transport = _line_connection(world)
    stream = b"".join(with_token(line, world.token).replace(b"\n", b" ") + ending for line in lines)
    for start in range(0, len(stream), chunk):
        protocol.dataReceived(stream[start : start + chunk])
    _drain(world)
    replies = [check_reply(line) for line in transport.value().split(b"\n") if line]
    expected = [line for line in stream.split(b"\n")[:-1] if line.rstrip(b"\r").strip()]
    if transport.disconnecting:
        assert replies and replies[-1]["error_type"] == "MessageTooLarge"
        assert len(replies) <= len(expected)
    else:
        assert len(replies) == len(expected)
        assert all(len(line) <= 4096 for line in expected)
    protocol.connectionLost(Failure(ConnectionError("test over")))


@SECONDARY
@given(data=st.binary(max_size=2000), chunk=st.integers(1, 700))
def test_line_protocol_survives_random_bytes(world, data, chunk):
    protocol, transport = _line_connection(world, max_message_bytes=512)
    for start in range(0, len(data), chunk):
        protocol.dataReceived(data[start : start + chunk])
    _drain(world)
    for line in transport.value().split(b"\n"):
        if line:
            check_reply(line)
    protocol.connectionLost(Failure(ConnectionError("test over")))


def test_line_protocol_extremes(world):
    for payload in EXTREMES[:4] + [b"\xff" * 10_000]:
        protocol, transport = _line_connection(world, max_message_bytes=2 * ONE_MB)
        protocol.dataReceived(payload + b"\n")
        _drain(world)
        (reply,) = [check_reply(line) for line in transport.value().split(b"\n") if line]
        assert reply["status"] == "error"
        assert not transport.disconnecting


def test_line_protocol_idle_timer_and_authentication(world):
    """Unauthenticated: closed after the idle time, each line restarts it; auth stops it."""
    protocol, transport = _line_connection(world)
    timeout = world.settings.unauthenticated_idle_timeout
    world.reactor.advance(timeout - 1)
    protocol.dataReceived(b'{"command": "ping"}\n')
    world.reactor.advance(timeout - 1)
    assert not transport.disconnecting
    world.reactor.advance(2)
    assert transport.disconnecting

    protocol, transport = _line_connection(world)
    protocol.dataReceived(
        b'{"command": "authenticate", "parameters": {"username": "alice", "password": "pw"}}\n'
    )
    assert json.loads(transport.value())["result"]["authenticated"] is True
    # authenticated: the (longer) idle_timeout applies instead, 600 s by default
    world.reactor.advance(timeout * 5)
    assert not transport.disconnecting
    protocol.dataReceived(b'{"id": 2, "command": "get_session_statistics"}\n')
    assert b'"success"' in transport.value().split(b"\n")[1]


def test_line_protocol_yields_after_its_turn(world):
    """A connection that used up its turn stops reading until the next reactor turn."""
    factory = LineJSONFactory(world.open, clock=world.reactor, turn_budget=0.0)
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b'{"command": "ping"}\n' * 5)
    assert transport.value().count(b"\n") == 2  # first line starts the turn, second ends it
    assert transport.producerState == "paused"
    _drain(world)
    assert transport.value().count(b"\n") == 5
    assert transport.producerState == "producing"


# -- (c) the ZeroMQ adapter --------------------------------------------------------------------


class FakeRouter:
    """Records what the adapter sends instead of using a socket."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, list[bytes], bytes]] = []

    def send_to(self, identity, envelope, data) -> None:
        self.sent.append((identity, list(envelope), data))

    def forget(self, identity) -> None:
        pass


def _zmq_adapter(world, max_message_bytes: int = 4096) -> tuple[ZmqRouterService, FakeRouter]:
    adapter = ZmqRouterService(
        "tcp://127.0.0.1:0", world.guarded, max_message_bytes=max_message_bytes
    )
    router = FakeRouter()
    adapter._router = router
    return adapter, router


@HYPOTHESIS
@given(
    identity=st.binary(min_size=1, max_size=255),
    envelope=st.one_of(st.just([]), st.just([b""]), st.lists(st.binary(max_size=8), max_size=3)),
    payload=st.one_of(inputs(), st.binary(max_size=300), st.just(b"x" * 5000)),
    address=st.sampled_from(["127.0.0.1", "::1", "zmq:no-peer-address"]),
)
def test_zmq_adapter_answers_every_message_once(world, identity, envelope, payload, address):
    adapter, router = _zmq_adapter(world)
    payload = with_token(payload, world.token)
    adapter.message_received(identity, [*envelope, payload], address)
    assert len(router.sent) == 1
    sent_identity, sent_envelope, data = router.sent[0]
    assert sent_identity == identity
    assert sent_envelope == envelope  # the reply mirrors the frames it came with
    reply = check_reply(data)
    if len(payload) > 4096 and envelope in ([], [b""]):
        assert reply["error_type"] == "MessageTooLarge"


def test_zmq_forged_identity_without_token(world):
    adapter, router = _zmq_adapter(world)
    login = {"command": "authenticate", "parameters": {"username": "alice", "password": "pw"}}
    adapter.message_received(b"victim", [b"", json.dumps(login).encode()], "127.0.0.1")
    token = json.loads(router.sent[-1][2])["result"]["token"]
    with_token = {"command": "get_session_statistics", "token": token}
    adapter.message_received(b"victim", [b"", json.dumps(with_token).encode()], "127.0.0.1")
    assert json.loads(router.sent[-1][2])["status"] == "success"
    forged = {"command": "get_session_statistics", "client_id": "alice"}
    adapter.message_received(b"victim", [b"", json.dumps(forged).encode()], "198.51.100.7")
    assert json.loads(router.sent[-1][2])["error_type"] == "AuthenticationRequired"


def test_zmq_extremes(world):
    adapter, router = _zmq_adapter(world, max_message_bytes=2 * ONE_MB)
    for payload in EXTREMES:
        adapter.message_received(b"peer", [payload], "127.0.0.1")
    assert len(router.sent) == len(EXTREMES)
    for _, _, data in router.sent:
        check_reply(data)
