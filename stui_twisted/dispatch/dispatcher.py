"""The command table: request bytes in, reply bytes out.

The L{Dispatcher} parses the envelope, finds the command, enforces
authentication, validates parameters against the command's declared
L{Param} list, runs the handler and maps every outcome to exactly one
reply.  It never raises and never lets a traceback reach a client.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field
from types import CoroutineType
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from stui_twisted.access.plans import PlanBook
from stui_twisted.dispatch.interfaces import ConnectionContext
from stui_twisted.protocol.envelope import (
    Request,
    encode_error,
    encode_success,
    json_type_name,
)
from stui_twisted.protocol.errors import StuiError, invalid_parameter
from stui_twisted.protocol.requests import parse_request
from stui_twisted.settings import Settings

_TYPE_CHECKS: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "any": lambda v: True,
}

#: Arrays and objects nested deeper than this in a parameter are refused:
#: client JSON is stored and sent back, and must stay readable (protocol.md §7).
MAX_JSON_DEPTH = 100


def nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays/objects in C{value} nest more than C{limit} levels (no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


_TYPE_NAMES = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean",
    "object": "an object",
    "array": "an array",
    "any": "any JSON value",
}


@dataclass(frozen=True)
class Param:
    """One declared parameter of a command: name, JSON type, required, default."""

    name: str
    type: str = "string"
    required: bool = False
    default: Any = None
    description: str = ""
    nullable: bool = False
    aliases: tuple[str, ...] = ()
    """Other names the parameter is accepted under (the declared name wins)."""
    lowercase: bool = False
    """String values are matched case-insensitively (e.g. C{Display} = C{display})."""

    def describe(self) -> dict:
        """The parameter as C{describe} lists it."""
        described = {"type": self.type, "required": self.required}
        if self.default is not None:
            described["default"] = self.default
        if self.aliases:
            described["aliases"] = list(self.aliases)
        if self.description:
            described["description"] = self.description
        return described


@dataclass
class Call:
    """One validated invocation handed to a command handler."""

    context: ConnectionContext
    request: Request
    params: dict
    received_at: float
    principal: str | None = None
    """Who this request acts as when auth is on: the token's user, or (TCP/TLS only)
    the user the connection authenticated as.  C{None} when auth is off or the
    command is public."""

    @property
    def client_id(self) -> str | None:
        """The acting client id: the principal when authenticated, else the parameter.

        Under authentication it is never taken from the request: the dispatcher
        has already refused a C{client_id} parameter that differs from the
        principal.
        """
        if self.principal is not None:
            return self.principal
        return self.params.get("client_id")


Handler = Callable[[Call], Awaitable[dict] | dict]
"""A coroutine function (most commands) or a plain function that returns the result."""


@dataclass(frozen=True)
class Command:
    """A command name, its handler and its parameter declaration."""

    name: str
    handler: Handler
    params: tuple[Param, ...] = ()
    description: str = ""
    public: bool = False
    """Allowed before authentication (ping, describe, authenticate)."""
    targets_client: bool = False
    """Its C{client_id} parameter names the principal acted on, not the caller
    (the admin commands): it is neither checked against nor defaulted to the
    principal."""


class IAuthGate:
    """What the dispatcher needs from authentication (see L{stui_twisted.access.auth})."""

    enabled: bool = False

    def check_token(self, token: str) -> str | None:  # pragma: no cover - interface
        raise NotImplementedError


class NoAuth(IAuthGate):
    """Authentication switched off: everybody may do everything."""

    enabled = False

    def check_token(self, token: str) -> str | None:
        return None


@dataclass
class DispatchStats:
    """Counters the dispatcher keeps for statistics and metrics."""

    requests: int = 0
    errors: int = 0
    by_command: dict = field(default_factory=dict)


class Dispatcher:
    """Maps request bytes to reply bytes through a table of L{Command}s."""

    log = Logger()

    def __init__(self, *, clock, auth: IAuthGate | None = None, plans=None, observers=()) -> None:
        self._clock = clock
        self._commands: dict[str, Command] = {}
        self.auth = auth or NoAuth()
        self.plans = (
            plans if plans is not None else PlanBook(Settings(), auth_enabled=self.auth.enabled)
        )
        """The L{stui_twisted.access.plans.PlanBook} that gates commands by feature."""
        self.stats = DispatchStats()
        self._observers = list(observers)
        self._client_observers: list[Callable[[ConnectionContext, str], None]] = []

    # -- the table -------------------------------------------------------

    def register(self, command: Command) -> None:
        """Add C{command} to the table (names are unique)."""
        if command.name in self._commands:
            raise ValueError(f"command {command.name!r} registered twice")
        self._commands[command.name] = command

    def register_all(self, commands) -> None:
        """Register every command of an iterable."""
        for command in commands:
            self.register(command)

    def commands(self) -> dict[str, Command]:
        """The table, by name."""
        return dict(self._commands)

    def addClientObserver(self, observer) -> None:  # noqa: N802
        """Call C{observer(context, client_id)} whenever a conversation acts as a
        client id: each request naming one (or authenticated as one), and each
        successful C{authenticate} (team C{presence}, events.md §1)."""
        self._client_observers.append(observer)

    def note_client(self, context: ConnectionContext, client_id: str) -> None:
        """Tell the client observers that C{context} acts as C{client_id}."""
        for observer in self._client_observers:
            observer(context, client_id)

    def addObserver(self, observer: Callable[[str, str, float], None]) -> None:  # noqa: N802
        """Call C{observer(command, status, seconds)} after every reply (metrics)."""
        self._observers.append(observer)

    # -- dispatching ------------------------------------------------------

    def dispatch(self, context: ConnectionContext, data: bytes) -> defer.Deferred:
        """Answer one request; the Deferred fires with the reply bytes, never fails."""
        reply = self.answer(context, data)
        if isinstance(reply, bytes):
            return defer.succeed(reply)
        return reply

    def answer(self, context: ConnectionContext, data: bytes) -> bytes | defer.Deferred:
        """Answer one request: the reply bytes now, or a Deferred that fires with them.

        The transports call this.  A handler that finishes without waiting
        (ping, describe, most session commands under C{batch}) is answered in
        the same call, without a Deferred: the coroutine is stepped once by
        hand and only handed to Twisted if it awaits something (see
        L{_step_handler}).  The Deferred, when there is one, never fails.
        """
        started = time.perf_counter()
        received_at = self._clock.seconds()
        request_id: Any = None
        command_name = "?"
        shape = None
        try:
            request = parse_request(data)
            request_id = request.id
            command_name = request.command
            shape = request.format_a
            command = self._lookup(request)
            principal = self._authorize(context, request, command)
            context.last_command, context.last_activity = command.name, received_at
            if principal is not None:
                context.last_client_id = principal
            self.plans.check(command.name, principal)
            params = (
                self._validate(command, self._with_principal(command, request, principal))
                if command.params
                else {}  # what _validate gives for a command without parameters (ping)
            )
            call = Call(context, request, params, received_at, principal)
            if self._client_observers and call.client_id is not None:
                self.note_client(context, call.client_id)
            if shape is None:
                finished, outcome = _step_handler(command.handler(call))
            else:
                finished, outcome = _step_handler(format_a_call(self, command, call))
        except StuiError as error:
            shape = getattr(error, "format_a", shape)
            request_id = getattr(error, "request_id", request_id)
            return self._error(context, request_id, command_name, error, started, shape)
        except Exception:
            return self._internal(context, request_id, command_name, Failure(), started, shape)
        if finished:
            return self._success(context, request_id, command_name, outcome, started, shape)

        def failed(failure: Failure) -> bytes:
            if failure.check(StuiError):
                return self._error(context, request_id, command_name, failure.value, started, shape)
            return self._internal(context, request_id, command_name, failure, started, shape)

        outcome.addCallbacks(
            lambda value: self._success(context, request_id, command_name, value, started, shape),
            failed,
        )
        outcome.addErrback(
            lambda f: self._internal(context, request_id, command_name, f, started, shape)
        )
        return outcome

    def too_large(self, context: ConnectionContext, size: int, limit: int) -> bytes:
        """The reply to a line or frame over C{max_message_bytes}."""
        error = StuiError(
            "MessageTooLarge",
            f"message of {size} bytes or more is over the limit of {limit} bytes",
            size=size,
            max_message_bytes=limit,
        )
        return self._error(context, None, "?", error, time.perf_counter())

    def reject(self, context: ConnectionContext, error: StuiError) -> bytes:
        """The reply to input a transport refused before parsing it."""
        return self._error(context, None, "?", error, time.perf_counter())

    def _lookup(self, request: Request) -> Command:
        command = self._commands.get(request.command)
        if command is None:
            raise StuiError(
                "UnknownCommand",
                f"unknown command {request.command[:100]!r}; 'describe' lists the commands",
                command=request.command[:100],
            )
        return command

    def _authorize(
        self, context: ConnectionContext, request: Request, command: Command
    ) -> str | None:
        """The principal C{request} acts as, or raise C{AuthenticationRequired}.

        - Public commands (ping, describe, authenticate) and a server without
          auth need nobody: C{None}.
        - A top-level C{token} wins on every transport; an unknown or expired one
          is refused even when the connection itself is authenticated.
        - TCP/TLS without a token: the user this connection authenticated as.
        - ZeroMQ without a token: nobody.  A routing identity is chosen by the
          peer, so nothing is remembered per identity (docs/security.md).

        Nothing is written to C{context} here: the principal travels with the
        L{Call}, so one request's token never authenticates another request.
        """
        if not self.auth.enabled or command.public:
            return None
        principal = None
        if request.token is not None:
            principal = self.auth.check_token(request.token)
            if principal is None:
                raise StuiError(
                    "AuthenticationRequired",
                    "the token is unknown or expired; send 'authenticate' again",
                )
        elif context.transport != "zmq":
            principal = context.principal
        if principal is None:
            hint = (
                "; ZeroMQ requests must carry the 'token' that 'authenticate' returns"
                if context.transport == "zmq"
                else ""
            )
            raise StuiError(
                "AuthenticationRequired",
                f"authenticate first with 'authenticate' (username, password){hint}",
            )
        claimed = request.parameters.get("client_id")
        if claimed is not None and claimed != principal and not command.targets_client:
            raise StuiError(
                "PermissionDenied",
                f"client_id {str(claimed)[:128]!r} is not the authenticated client",
                parameter="client_id",
            )
        return principal

    def _with_principal(self, command: Command, request: Request, principal: str | None) -> dict:
        """The parameters, with C{client_id} defaulting to the principal under auth."""
        given = request.parameters
        if principal is None or "client_id" in given or command.targets_client:
            return given
        if any(param.name == "client_id" for param in command.params):
            return dict(given, client_id=principal)
        return given

    def _validate(self, command: Command, given: dict) -> dict:
        params: dict = {}
        for param in command.params:
            name = param.name
            if param.aliases and given.get(name) is None:
                name = next((alias for alias in param.aliases if alias in given), name)
            if name not in given or (given[name] is None and not param.nullable):
                if param.required:
                    raise invalid_parameter(param.name, "is required")
                params[param.name] = param.default
                continue
            value = given[name]
            if value is not None and not _TYPE_CHECKS[param.type](value):
                raise invalid_parameter(
                    param.name,
                    f"must be {_TYPE_NAMES[param.type]}, not {json_type_name(value)}",
                )
            if isinstance(value, dict | list) and nested_deeper_than(value, MAX_JSON_DEPTH):
                raise invalid_parameter(
                    param.name,
                    f"is nested more than {MAX_JSON_DEPTH} levels deep (arrays and objects); "
                    f"at most {MAX_JSON_DEPTH} are accepted",
                    max_depth=MAX_JSON_DEPTH,
                )
            if param.lowercase and isinstance(value, str):
                value = value.lower()
            params[param.name] = value
        return params

    # -- outcomes ---------------------------------------------------------

    def _observe(self, command_name: str, status: str, started: float) -> None:
        self.stats.requests += 1
        self.stats.by_command[command_name] = self.stats.by_command.get(command_name, 0) + 1
        if status != "success":
            self.stats.errors += 1
        if self._observers:
            elapsed = time.perf_counter() - started
            name = command_name if command_name in self._commands else "?"
            for observer in self._observers:
                observer(name, status, elapsed)

    def _success(self, context, request_id, command_name, value, started, shape=None) -> bytes:
        try:
            if shape is None:
                reply = encode_success(request_id, value, self._clock.seconds())
            else:
                reply = shape.encode_success(value, self._clock.seconds())
        except Exception:
            return self._internal(context, request_id, command_name, Failure(), started, shape)
        self._observe(command_name, "success", started)
        return reply

    def _error(
        self, context, request_id, command_name, error: StuiError, started, shape=None
    ) -> bytes:
        self._observe(command_name, error.error_type, started)
        self.log.info(
            "{conn} {command} -> {error_type}: {message}",
            conn=context.label,
            command=command_name[:100],
            error_type=error.error_type,
            message=error.message,
        )
        # encode_* escape what UTF-8 cannot carry (lone surrogates), so this
        # never fails on echoed client input.
        if shape is not None:
            return shape.encode_error(error, self._clock.seconds())
        return encode_error(request_id, error, self._clock.seconds())

    def _internal(
        self, context, request_id, command_name, failure: Failure, started, shape=None
    ) -> bytes:
        self.log.failure(
            "{conn} {command} failed with an unexpected error",
            failure,
            conn=context.label,
            command=command_name[:100],
        )
        error = StuiError(
            "InternalError",
            "the server failed to handle this request; the error is in the server log",
        )
        return self._error(context, request_id, command_name, error, started, shape)


#: Session commands for which a new session would be pointless (nothing to close or stop).
_NO_NEW_SESSION = frozenset({"close_session", "interrupt"})


def format_a_call(dispatcher: Dispatcher, command: Command, call: Call):
    """Run C{command} for a Format A request: the flat handler, and the session rule.

    A Format A conversation without a current session gets one on first use of
    a command that works on a session (stui-compat.md §1): created for the
    principal, or client id C{stui} with auth off; it becomes current and its id
    is in the response's C{session_id}.  Commands that need no session (Ping)
    run exactly as flat ones, without a coroutine.
    """
    needs_session = (
        command.name not in _NO_NEW_SESSION
        and call.params.get("session_id") is None
        and call.context.current_session_id is None
        and any(param.name == "session_id" for param in command.params)
        and "create_session" in dispatcher._commands
    )
    if not needs_session:
        return command.handler(call)
    return _with_new_session(dispatcher, command, call)


async def _with_new_session(dispatcher: Dispatcher, command: Command, call: Call):
    create = dispatcher._commands["create_session"]
    client_id = call.principal or call.params.get("client_id") or "stui"
    created = create.handler(
        Call(
            call.context,
            Request("create_session", call.request.id, {"client_id": client_id}),
            {"client_id": client_id, "client_info": None, "timeout": None},
            call.received_at,
            call.principal,
        ),
    )
    if isinstance(created, CoroutineType | defer.Deferred):
        created = await created
    outcome = command.handler(call)
    if isinstance(outcome, CoroutineType | defer.Deferred):
        outcome = await outcome
    if isinstance(outcome, dict):
        outcome = dict(outcome, session_id=created["session_id"])
    return outcome


def _step_handler(outcome) -> tuple[bool, Any]:
    """Run a handler's result as far as it goes without waiting.

    Returns C{(True, value)} when the handler finished (a plain value, or a
    coroutine that returned without awaiting anything), else C{(False,
    deferred)}.  A coroutine that awaited something is handed to Twisted from
    where it stopped (L{_resume}), so it runs exactly as C{ensureDeferred}
    would have run it.  A handler's exception propagates to the caller.
    """
    if isinstance(outcome, dict):  # a plain function's result (ping): no ABC check below
        return True, outcome
    if isinstance(outcome, defer.Deferred):
        return False, outcome
    if not isinstance(outcome, CoroutineType):
        return True, outcome
    try:
        awaited = outcome.send(None)
    except StopIteration as stop:
        return True, stop.value
    return False, defer.Deferred.fromCoroutine(_resume(outcome, awaited))


def _resume(coroutine: CoroutineType, awaited: Any) -> Generator[Any, Any, Any]:
    """A generator that continues C{coroutine}, which already yielded C{awaited}.

    This is what C{yield from} does (PEP 380), written out because a started
    coroutine cannot be delegated to: values Twisted sends in (the awaited
    Deferred's result) go to the coroutine, exceptions thrown in are thrown
    into it, and its return value is this generator's.
    """
    while True:
        try:
            sent = yield awaited
        except GeneratorExit:
            coroutine.close()
            raise
        except BaseException as error:  # noqa: BLE001 - everything is forwarded, not handled
            try:
                awaited = coroutine.throw(error)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                awaited = coroutine.send(sent)
            except StopIteration as stop:
                return stop.value
