"""The protocol client: requests, replies, authentication, sessions and reconnection.

L{StuiClient} is synchronous and used by one thread at a time (an C{RLock}
guards it, because the REPL's idle watcher may reconnect in the background while the
prompt is shown).  It

* numbers requests with an increasing integer C{id} and matches replies by C{id}
  (replies to other requests that arrive meanwhile are kept, replies nobody waits for
  any more are dropped);
* authenticates when the server answers C{AuthenticationRequired} and, on ZeroMQ,
  sends the returned C{token} with every request;
* restores the last session it used for this server and C{client_id} (see
  L{.state}) or creates one;
* turns Ctrl-C while an evaluation runs into an C{interrupt} request and keeps
  waiting for the evaluation's (C{Interrupted}) reply;
* on a lost connection reconnects with exponential backoff, re-authenticates,
  restores the session, tells the user, and retries the request when it had not been
  sent (or is harmless to repeat);
* hands every event message (a line with C{event} and no C{status}, events.md §1)
  to L{StuiClient.on_event}, in C{seq} order per stream with no duplicate: it
  remembers the last C{seq} of each stream it subscribed to, fills a C{dropped} gap
  with C{get_events}, and after a reconnection subscribes again with C{since} so that
  nothing seen is repeated and nothing missed is lost.
"""

from __future__ import annotations

import getpass
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from stui_twisted import __version__
from stui_twisted.client.formatting import SESSION_GONE_ERRORS, format_bindings_note
from stui_twisted.client.state import ClientState
from stui_twisted.client.transport import (
    ConnectionLost,
    ServerAddress,
    Transport,
    open_transport,
)

CLIENT_CAPABILITIES = ["evaluate", "inspect", "complete", "interrupt", "reconnect"]

SESSION_COMMANDS = frozenset(
    {
        "evaluate",
        "inspect",
        "complete",
        "interrupt",
        "get_session_info",
        "get_context_summary",
        "save_context",
        "load_context",
        "clear_context",
        "close_session",
        "update_session_state",
    }
)
"""Commands that act on a session; the client always names its session explicitly."""

REPEATABLE_COMMANDS = frozenset(
    {
        "ping",
        "describe",
        "get_session_info",
        "get_context_summary",
        "list_client_sessions",
        "restore_session",
        "complete",
        "inspect",
        "save_context",
        "load_context",
        "clear_context",
    }
)
"""Commands safe to send again when the connection died after they were sent."""

TEAM = "team"
"""The stream key of the team stream (events.md §1); a session stream's key is its id."""

CATCH_UP_LIMIT = 1000
"""Events per C{get_events} when filling a gap (the server's maximum)."""

RECEIVE_SLICE_SECONDS = 0.25
ZMQ_LIVENESS_INTERVAL_SECONDS = 5.0
ZMQ_PING_TIMEOUT_SECONDS = 5.0
MAX_RECOVERIES_PER_REQUEST = 3
AUTHENTICATION_ATTEMPTS = 3


class ServerError(Exception):
    """An error reply, kept whole in L{reply}."""

    def __init__(self, reply: dict[str, Any]) -> None:
        self.reply = reply
        self.error_type = str(reply.get("error_type") or "Error")
        self.message = str(reply.get("error") or "")
        details = reply.get("details")
        self.details = details if isinstance(details, dict) else {}
        super().__init__(f"{self.error_type}: {self.message}")


def is_event(message: dict[str, Any]) -> bool:
    """An event message has C{event} and never C{status} (events.md §1)."""
    return "event" in message and "status" not in message


def stream_key(message: dict[str, Any]) -> str:
    """The stream an event message belongs to: C{"team"} or its session id."""
    if message.get("stream") == TEAM:
        return TEAM
    return str(message.get("session_id") or "")


class RequestLost(ConnectionLost):
    """The connection died after the request was sent: it may or may not have run."""


class CredentialsUnavailable(Exception):
    """Authentication is needed but there is no way to get a user name or password."""


def backoff_delays(
    initial: float = 0.2, factor: float = 2.0, maximum: float = 5.0, total: float = 60.0
) -> Iterator[float]:
    """Waits between reconnection attempts: 0.2, 0.4, 0.8 … capped at 5 s, summing to
    at most C{total} seconds."""
    elapsed = 0.0
    delay = initial
    while elapsed < total - 1e-9:
        step = min(delay, maximum, total - elapsed)
        yield step
        elapsed += step
        delay = min(delay * factor, maximum)


class CredentialSource:
    """User name and password: from C{--user} and C{STUI_PASSWORD}, else asked for.

    A password that the server rejected is forgotten so that it is asked again.
    """

    def __init__(
        self,
        username: str | None = None,
        password: str | None = None,
        *,
        interactive: bool | None = None,
        ask_username: Callable[[str], str] = input,
        ask_password: Callable[[str], str] = getpass.getpass,
    ) -> None:
        self.username = username
        self.password = password
        self.interactive = sys.stdin.isatty() if interactive is None else interactive
        self._ask_username = ask_username
        self._ask_password = ask_password
        self._password_was_given = password is not None

    @classmethod
    def from_environment(cls, username: str | None) -> CredentialSource:
        return cls(username, os.environ.get("STUI_PASSWORD"))

    def get(self, allow_prompt: bool) -> tuple[str, str]:
        can_ask = allow_prompt and self.interactive
        if not self.username:
            if not can_ask:
                raise CredentialsUnavailable(
                    "the server requires authentication: pass --user NAME and set STUI_PASSWORD"
                )
            self.username = self._ask_username("username: ").strip()
        if self.password is None:
            if not can_ask:
                raise CredentialsUnavailable(
                    "the server requires a password: set STUI_PASSWORD or run interactively"
                )
            self.password = self._ask_password(f"password for {self.username}: ")
        return self.username, self.password

    def rejected(self) -> bool:
        """Forget a rejected password; True when asking again may help."""
        if self._password_was_given or not self.interactive:
            return False
        self.password = None
        return True


class StuiClient:
    """A connection to one server plus the session this client works in."""

    def __init__(
        self,
        address: ServerAddress,
        *,
        client_id: str,
        client_id_explicit: bool = True,
        state: ClientState | None = None,
        credentials: CredentialSource | None = None,
        cafile: str | None = None,
        notify: Callable[[str], None] | None = None,
        reconnect_total_seconds: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
        transport_factory: Callable[..., Transport] = open_transport,
    ) -> None:
        self.address = address
        self.client_id = client_id
        self.client_id_explicit = client_id_explicit
        self.state = state
        self.credentials = credentials or CredentialSource(interactive=False)
        self.cafile = cafile
        self.notify = notify or (lambda text: print(text, file=sys.stderr))
        self.reconnect_total_seconds = reconnect_total_seconds
        self.sleep = sleep
        self.transport_factory = transport_factory
        self.lock = threading.RLock()
        self.transport: Transport | None = None
        self.session_id: str | None = None
        self.token: str | None = None
        self.authenticated = False
        self.server_info: dict[str, Any] = {}
        self.reconnect_abandoned = False
        self._ever_connected = False
        self._recovering = False
        self.session_note = ""
        self._last_request_id = 0
        self._replies: dict[Any, dict[str, Any]] = {}
        self._unwanted_ids: set[int] = set()
        #: called with each event message, in order per stream (set by the REPL)
        self.on_event: Callable[[dict[str, Any]], None] | None = None
        #: called about every 0.25 s while a request waits (the REPL's debugger poll)
        self.on_waiting: Callable[[float], None] | None = None
        #: subscribed stream key -> the last seq handed to L{on_event}
        self.streams: dict[str, int] = {}
        # stream key -> seq up to which events were dropped and are still missing
        self._gaps: dict[str, int] = {}
        # events that came after a gap, held until the gap is filled
        self._held: dict[str, list[dict[str, Any]]] = {}
        self._filling_gaps = False
        self._caught_up: list[dict[str, Any]] = []  # replayed while reconnecting

    # -- connection -------------------------------------------------------------

    def connect(self) -> None:
        """Connect (no retries); on ZeroMQ, a ping proves the server is there."""
        with self.lock:
            self.close()
            transport = self.transport_factory(self.address, cafile=self.cafile)
            self.transport = transport
            self._replies.clear()
            self._unwanted_ids.clear()
            if self.address.scheme == "zmq":
                reply = self._exchange("ping", {}, timeout=ZMQ_PING_TIMEOUT_SECONDS)
                if reply is None:
                    self.close()
                    raise ConnectionLost(f"no answer from {self.address.url}")
                self.server_info = reply.get("result") or {}
            self._ever_connected = True
            self.reconnect_abandoned = False

    def close(self) -> None:
        with self.lock:
            if self.transport is not None:
                self.transport.close()
                self.transport = None

    # -- requests ---------------------------------------------------------------

    def call(
        self,
        command: str,
        parameters: dict[str, Any] | None = None,
        *,
        interruptible: bool = False,
        timeout: float | None = None,
        auto_authenticate: bool = True,
        allow_prompt: bool = True,
    ) -> dict[str, Any]:
        """Send one request and return its reply (success or error) as a dict.

        Reconnects when the connection is gone; raises L{RequestLost} when it
        died after a non-repeatable command was sent, L{TimeoutError} when
        C{timeout} passed, C{KeyboardInterrupt} on a second Ctrl-C.
        """
        with self.lock:
            params = dict(parameters or {})
            if command in SESSION_COMMANDS and "session_id" not in params and self.session_id:
                params["session_id"] = self.session_id
            authentications = 0
            recoveries = 0
            while True:
                if self.transport is None or self.transport.peer_closed():
                    if not self._ever_connected or self._recovering:
                        # Inside recover() a failure goes back to its backoff loop.
                        raise ConnectionLost(f"not connected to {self.address.url}")
                    recoveries += 1
                    self._recover_or_raise(recoveries, allow_prompt)
                    continue
                try:
                    reply = self._exchange(
                        command, params, interruptible=interruptible, timeout=timeout
                    )
                except RequestLost:
                    self.close()
                    if self._recovering:
                        raise
                    if command not in REPEATABLE_COMMANDS:
                        recoveries += 1
                        self._recover_or_raise(recoveries, allow_prompt)
                        raise
                    continue
                except ConnectionLost:
                    self.close()
                    if self._recovering:
                        raise
                    continue
                if reply is None:
                    raise TimeoutError(f"no reply to {command} within {timeout} s")
                if (
                    auto_authenticate
                    and command != "authenticate"
                    and reply.get("error_type") == "AuthenticationRequired"
                    and authentications == 0
                ):
                    authentications += 1
                    self.authenticate(allow_prompt=allow_prompt)
                    continue
                return reply

    def result(self, command: str, parameters: dict[str, Any] | None = None, **options: Any):
        """Like L{call} but returns the C{result} object or raises L{ServerError}."""
        reply = self.call(command, parameters, **options)
        if reply.get("status") != "success":
            raise ServerError(reply)
        return reply.get("result") or {}

    def _recover_or_raise(self, recoveries: int, allow_prompt: bool) -> None:
        if recoveries > MAX_RECOVERIES_PER_REQUEST:
            raise ConnectionLost(f"the connection to {self.address.url} keeps failing")
        self.recover(allow_prompt=allow_prompt)

    def _send(self, command: str, parameters: dict[str, Any]) -> int:
        if self.transport is None:
            raise ConnectionLost(f"not connected to {self.address.url}")
        self._last_request_id += 1
        request_id = self._last_request_id
        if not self.authenticated and "client_id" not in parameters:
            # With auth off the request's client_id is who acts (access.md §1): without
            # it a command on a session shared with us would act as its owner.
            parameters = dict(parameters, client_id=self.client_id)
        message: dict[str, Any] = {"id": request_id, "command": command, "parameters": parameters}
        if self.token and self.address.scheme == "zmq":
            message["token"] = self.token
        self.transport.send(message)
        return request_id

    def _exchange(
        self,
        command: str,
        parameters: dict[str, Any],
        *,
        interruptible: bool = False,
        timeout: float | None = None,
    ) -> dict[str, Any] | None:
        """Send and wait for the matching reply; C{None} when C{timeout} passed."""
        request_id = self._send(command, parameters)
        try:
            return self._wait_for(request_id, interruptible=interruptible, timeout=timeout)
        except RequestLost:
            raise
        except ConnectionLost as error:
            raise RequestLost(str(error)) from error

    def _wait_for(
        self, request_id: int, *, interruptible: bool, timeout: float | None
    ) -> dict[str, Any] | None:
        assert self.transport is not None
        sent_at = time.monotonic()
        deadline = None if timeout is None else sent_at + timeout
        interrupt_sent = False
        last_traffic = sent_at
        liveness_ping: tuple[int, float] | None = None
        watch_liveness = self.address.scheme == "zmq"
        while True:
            try:
                if request_id in self._replies:
                    return self._replies.pop(request_id)
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    self._unwanted_ids.add(request_id)
                    return None
                wait = RECEIVE_SLICE_SECONDS
                if deadline is not None:
                    wait = min(wait, deadline - now)
                message = self.transport.receive(wait)
                if message is not None and is_event(message):
                    last_traffic = time.monotonic()  # the peer is alive (ZeroMQ liveness)
                    self._dispatch_event(message)
                    continue
                if message is None:
                    if self.on_waiting is not None:
                        self.on_waiting(time.monotonic() - sent_at)
                    if not watch_liveness:
                        continue
                    now = time.monotonic()
                    if (
                        liveness_ping is None
                        and now - last_traffic >= ZMQ_LIVENESS_INTERVAL_SECONDS
                    ):
                        liveness_ping = (self._send("ping", {}), now)
                    elif liveness_ping and now - liveness_ping[1] >= ZMQ_PING_TIMEOUT_SECONDS:
                        raise RequestLost(f"no answer from {self.address.url}")
                    continue
                last_traffic = time.monotonic()
                reply_id = message.get("id")
                if liveness_ping is not None and reply_id == liveness_ping[0]:
                    liveness_ping = None
                    uptime = (message.get("result") or {}).get("uptime")
                    if isinstance(uptime, int | float) and uptime + 1.0 < last_traffic - sent_at:
                        raise RequestLost(f"the server at {self.address.url} restarted")
                    continue
                if reply_id in self._unwanted_ids:
                    self._unwanted_ids.discard(reply_id)
                    continue
                self._replies[reply_id] = message
            except KeyboardInterrupt:
                if not interruptible or interrupt_sent:
                    self._unwanted_ids.add(request_id)
                    raise
                interrupt_sent = True
                self.notify("interrupting the evaluation (Ctrl-C again to stop waiting)")
                self._unwanted_ids.add(self._send("interrupt", {"session_id": self.session_id}))

    # -- events -----------------------------------------------------------------------

    def subscribe(self, key: str, since: int | None = None) -> dict[str, Any]:
        """Subscribe this connection to a session's stream (its id) or the team's.

        With C{since}, the server replays the events after it first.  Returns the
        C{subscribe} result; raises L{ServerError} when refused (then the stream is not
        followed).  A C{truncated} answer is told to the user: events were trimmed.
        """
        with self.lock:
            parameters: dict[str, Any] = {"session_id": key, "client_id": self.client_id}
            if since is not None:
                parameters["since"] = since
            previous = self.streams.get(key)
            self.streams.setdefault(key, since or 0)
            try:
                result = self.result("subscribe", parameters)
            except BaseException:
                if previous is None:
                    self.streams.pop(key, None)
                raise
            self._after_subscribe(key, since, result)
            return result

    def _after_subscribe(self, key: str, since: int | None, result: dict[str, Any]) -> None:
        last_seq = result.get("last_seq")
        if since is None:
            # live only: what is in the log already is not shown
            if isinstance(last_seq, int):
                self.streams[key] = max(self.streams.get(key, 0), last_seq)
            return
        if isinstance(last_seq, int) and last_seq < since:
            # a team stream starts again at 1 after a server restart (kept in memory)
            self.streams[key] = last_seq
            self.notify(f"the {describe_stream(key)} started again; earlier events are gone")
        elif result.get("truncated"):
            self.notify(
                f"events {since + 1}..{int(result.get('first_seq') or 1) - 1} of the "
                f"{describe_stream(key)} were trimmed from its log before they were seen"
            )

    def unsubscribe(self, key: str) -> None:
        """Stop following a stream (errors are ignored: the stream may be gone)."""
        with self.lock:
            self.streams.pop(key, None)
            self._gaps.pop(key, None)
            self._held.pop(key, None)
            try:
                self.call("unsubscribe", {"session_id": key, "client_id": self.client_id})
            except ConnectionLost:
                return

    def poll_events(self) -> None:
        """Hand the events that arrived while idle to L{on_event}; never blocks.

        Does nothing while another thread uses the connection (it dispatches them).
        Replies that arrive here are kept for whoever waits for them.
        """
        if not self.lock.acquire(blocking=False):
            return
        try:
            transport = self.transport
            if transport is None or transport.peer_closed():
                return
            while True:
                message = transport.receive(0)
                if message is None:
                    break
                if is_event(message):
                    self._dispatch_event(message)
                elif message.get("id") in self._unwanted_ids:
                    self._unwanted_ids.discard(message.get("id"))
                else:
                    self._replies[message.get("id")] = message
        except ConnectionLost:
            return  # the idle watcher (or the next command) reconnects
        finally:
            self.lock.release()

    def wait_events(self, timeout: float) -> None:
        """Block up to C{timeout} s for events and hand them on (C{--watch}); a lost
        connection is recovered (and the streams subscribed again from their last seq)."""
        with self.lock:
            if self.transport is None or self.transport.peer_closed():
                self.recover(allow_prompt=False)
                return
            try:
                message = self.transport.receive(timeout)
            except ConnectionLost:
                self.close()
                return
            while message is not None:
                if is_event(message):
                    self._dispatch_event(message)
                message = self.transport.receive(0)

    def _dispatch_event(self, message: dict[str, Any]) -> None:
        key = stream_key(message)
        if message.get("event") == "dropped":
            from_seq, to_seq = message.get("from_seq"), message.get("to_seq")
            if isinstance(from_seq, int) and isinstance(to_seq, int):
                self._gaps[key] = max(self._gaps.get(key, 0), to_seq)
                self.streams[key] = min(self.streams.get(key, from_seq - 1), from_seq - 1)
                self._fill_gaps()
            return
        if key in self._gaps:
            self._held.setdefault(key, []).append(message)
            return
        self._deliver(key, message)

    def _deliver(self, key: str, message: dict[str, Any]) -> None:
        seq = message.get("seq")
        if isinstance(seq, int) and key in self.streams:
            if seq <= self.streams[key]:
                return  # seen already (a replay overlapping what arrived live)
            self.streams[key] = seq
        if self._recovering:
            self._caught_up.append(message)  # shown after "Reconnected to …"
        elif self.on_event is not None:
            self.on_event(message)

    def _deliver_caught_up(self) -> None:
        caught_up, self._caught_up = self._caught_up, []
        for message in caught_up:
            if self.on_event is not None:
                self.on_event(message)

    def _fill_gaps(self) -> None:
        """Read dropped events from the log (C{get_events since=from_seq-1})."""
        if self._filling_gaps:
            return  # the loop below sees the new gap
        self._filling_gaps = True
        try:
            while self._gaps:
                key, to_seq = next(iter(self._gaps.items()))
                since = self.streams.get(key, 0)
                while since < to_seq:
                    result = self.result(
                        "get_events",
                        {
                            "session_id": key,
                            "client_id": self.client_id,
                            "since": since,
                            "limit": CATCH_UP_LIMIT,
                        },
                    )
                    events = [e for e in result.get("events") or [] if e.get("seq", 0) > since]
                    if result.get("truncated"):
                        first = int(result.get("first_seq") or since + 1)
                        self.notify(
                            f"events {since + 1}..{first - 1} of the {describe_stream(key)} "
                            "were trimmed from its log before they were seen"
                        )
                        self.streams[key] = since = first - 1
                    if not events:
                        break
                    for event in events:
                        self._deliver(key, event)
                    since = self.streams.get(key, since)
                self._gaps.pop(key, None)
                for held in self._held.pop(key, []):
                    self._deliver(key, held)
        except (ServerError, ConnectionLost) as error:
            # a reconnection subscribes again with since = the last seq seen
            self.notify(f"could not read the dropped events: {error}")
            for key in self._gaps:
                self._held.pop(key, None)
            self._gaps.clear()
        finally:
            self._filling_gaps = False

    def _resubscribe(self) -> str:
        """After reconnecting: follow the same streams again from the last seq seen."""
        lost = []
        for key, last in list(self.streams.items()):
            self._gaps.pop(key, None)
            self._held.pop(key, None)
            try:
                self.subscribe(key, since=last)
            except ServerError as error:
                self.streams.pop(key, None)
                lost.append(f"{describe_stream(key)}: {error}")
        return "".join(f"no longer following the {line}\n" for line in lost)

    # -- authentication -----------------------------------------------------------

    def authenticate(self, *, allow_prompt: bool = True) -> dict[str, Any]:
        """Log in with L{credentials}; adopts the server's C{client_id} unless
        C{--client-id} was given.  Raises L{ServerError} when refused."""
        with self.lock:
            for attempt in range(AUTHENTICATION_ATTEMPTS):
                username, password = self.credentials.get(allow_prompt)
                self.token = None
                reply = self.call(
                    "authenticate",
                    {"username": username, "password": password},
                    auto_authenticate=False,
                    allow_prompt=allow_prompt,
                )
                if reply.get("status") == "success":
                    result = reply.get("result") or {}
                    self.token = result.get("token")
                    self.authenticated = True
                    principal = result.get("client_id")
                    if isinstance(principal, str) and principal and not self.client_id_explicit:
                        self.client_id = principal
                    return result
                error = ServerError(reply)
                if error.error_type != "AuthenticationFailed":
                    raise error
                last_attempt = attempt == AUTHENTICATION_ATTEMPTS - 1
                if last_attempt or not (allow_prompt and self.credentials.rejected()):
                    raise error
                self.notify("authentication failed; try again")
            raise AssertionError("unreachable")

    # -- sessions -------------------------------------------------------------------

    def client_info(self) -> dict[str, Any]:
        return {
            "platform": f"{sys.platform} python-{sys.version.split()[0]} stui-client",
            "version": __version__,
            "capabilities": list(CLIENT_CAPABILITIES),
        }

    def open_session(
        self, *, force_new: bool = False, session_id: str | None = None, remember: bool = True
    ) -> str:
        """Restore C{session_id}, or the last session used here, or create one.

        With C{remember=False} (a session somebody shared with us) the state file
        keeps naming our own last session.  Returns a sentence for the user; raises
        L{ServerError} if it cannot.
        """
        with self.lock:
            for attempt in range(2):
                try:
                    return self._open_session_once(
                        force_new=force_new, session_id=session_id, remember=remember
                    )
                except ServerError as error:
                    if error.error_type != "AuthenticationRequired" or attempt:
                        raise
                    self.authenticate()
            raise AssertionError("unreachable")

    def _open_session_once(
        self, *, force_new: bool, session_id: str | None, remember: bool = True
    ) -> str:
        self.session_note = ""
        if session_id is not None:
            result = self.result(
                "restore_session",
                {"session_id": session_id, "client_id": self.client_id},
                auto_authenticate=False,
            )
            if remember:
                self._adopt_session(result["session_id"])
            else:
                self.session_id = result["session_id"]
            return f"Session {self.session_id} restored.\n" + format_bindings_note(result)
        note = ""
        last = (
            None
            if force_new or self.state is None
            else self.state.last_session(self.address.url, self.client_id)
        )
        if last:
            reply = self.call(
                "restore_session",
                {"session_id": last, "client_id": self.client_id},
                auto_authenticate=False,
            )
            if reply.get("status") == "success":
                result = reply.get("result") or {}
                self._adopt_session(result.get("session_id", last))
                return f"Session {self.session_id} restored.\n" + format_bindings_note(result)
            error = ServerError(reply)
            if error.error_type not in SESSION_GONE_ERRORS:
                raise error
            note = f"Previous session {last} {describe_gone(error.error_type)}. "
            self.session_note = note
            if self.state is not None:
                self.state.forget_session(self.address.url, self.client_id)
        result = self.result(
            "create_session",
            {"client_id": self.client_id, "client_info": self.client_info()},
            auto_authenticate=False,
        )
        self._adopt_session(result["session_id"])
        return f"{note}New session {self.session_id} created.\n"

    def _adopt_session(self, session_id: str) -> None:
        self.session_id = session_id
        if self.state is not None:
            self.state.remember_session(self.address.url, self.client_id, session_id)

    def forget_session(self) -> None:
        """After C{close_session}: the next command starts a new session.

        The state file forgets it only when it is the session remembered there (a
        session shared with us, attached with C{remember=False}, never is).
        """
        url, client_id = self.address.url, self.client_id
        if (
            self.state is not None
            and self.session_id is not None
            and self.state.last_session(url, client_id) == self.session_id
        ):
            self.state.forget_session(url, client_id)
        self.session_id = None

    def evaluate(self, code: str, mode: str = "execute") -> dict[str, Any]:
        """Evaluate in the session (creating a new one if it is gone); returns the reply."""
        with self.lock:
            if self.session_id is None:
                self.notify(self.open_session(force_new=True).rstrip())
            parameters = {"code": code, "mode": mode}
            reply = self.call("evaluate", parameters, interruptible=True)
            if reply.get("error_type") in SESSION_GONE_ERRORS:
                gone = self.session_id
                # A session shared with us (attached, not remembered) that is gone, or
                # no longer shared: back to our own, remembered session if it is there.
                attached = self.state is not None and gone != self.state.last_session(
                    self.address.url, self.client_id
                )
                self.forget_session()
                message = self.open_session(force_new=not attached).rstrip()
                why = describe_gone(reply["error_type"])
                if attached and reply["error_type"] == "SessionNotFound":
                    why = "is not shared with you any more (or is gone)"
                self.notify(f"Session {gone} {why}. {message}")
                reply = self.call("evaluate", parameters, interruptible=True)
            return reply

    def complete(self, code: str, cursor_pos: int, timeout: float = 2.0) -> dict[str, Any] | None:
        """C{complete} without blocking the prompt: C{None} when busy, failed or slow."""
        if self.session_id is None or not self.lock.acquire(timeout=0.2):
            return None
        try:
            if self.transport is None or self.transport.peer_closed():
                return None  # reconnecting is the idle watcher's job, not the Tab key's
            reply = self.call(
                "complete",
                {"code": code, "cursor_pos": cursor_pos},
                timeout=timeout,
                allow_prompt=False,
            )
        except (ConnectionLost, TimeoutError, CredentialsUnavailable, ServerError):
            return None
        finally:
            self.lock.release()
        return reply.get("result") if reply.get("status") == "success" else None

    # -- reconnection -----------------------------------------------------------------

    def recover(self, *, allow_prompt: bool = True) -> None:
        """Reconnect with backoff, log in again and restore the session."""
        with self.lock:
            self.close()
            self.notify(f"Connection to {self.address.url} lost; reconnecting…")
            last_error: Exception | None = None
            for delay in backoff_delays(total=self.reconnect_total_seconds):
                self.sleep(delay)
                self._recovering = True
                try:
                    self.connect()
                    message = self._reestablish(allow_prompt)
                except ConnectionLost as error:
                    self.close()
                    last_error = error
                    continue
                finally:
                    self._recovering = False
                self.notify(f"Reconnected to {self.address.url}. {message}".rstrip())
                self._deliver_caught_up()
                return
            self.reconnect_abandoned = True
            raise ConnectionLost(
                f"could not reconnect to {self.address.url} within "
                f"{self.reconnect_total_seconds:g} s: {last_error}"
            )

    def _reestablish(self, allow_prompt: bool) -> str:
        if self.authenticated:
            self.authenticate(allow_prompt=allow_prompt)
        message = self._restore_after_reconnect(allow_prompt)
        return message + self._resubscribe()

    def _restore_after_reconnect(self, allow_prompt: bool) -> str:
        if self.session_id is None:
            return ""
        previous = self.session_id
        reply = self.call(
            "restore_session",
            {"session_id": previous, "client_id": self.client_id},
            allow_prompt=allow_prompt,
        )
        if reply.get("status") == "success":
            return f"Session {previous} restored.\n" + format_bindings_note(
                reply.get("result") or {}
            )
        error = ServerError(reply)
        if error.error_type not in SESSION_GONE_ERRORS:
            raise error
        self.streams.pop(previous, None)
        self.forget_session()
        created = self.open_session(force_new=True)
        return f"Session {previous} {describe_gone(error.error_type)}. {created}"

    def check_idle_connection(self) -> None:
        """Called by the REPL's watcher while the prompt is shown: reconnect as soon as
        the server goes away, instead of at the next command."""
        if self.reconnect_abandoned or not self._ever_connected:
            return
        if not self.lock.acquire(blocking=False):
            return
        try:
            if self.transport is not None and not self.transport.peer_closed():
                return
            self.recover(allow_prompt=False)
        except (ConnectionLost, ServerError, CredentialsUnavailable) as error:
            self.reconnect_abandoned = True
            self.notify(f"{error}; the next command will try again")
        finally:
            self.lock.release()


def describe_stream(key: str) -> str:
    return "team stream" if key == TEAM else f"event stream of {key}"


def describe_gone(error_type: str) -> str:
    return {
        "SessionExpired": "has expired",
        "SessionClosed": "was closed",
        "SessionNotFound": "no longer exists",
    }.get(error_type, "is unavailable")
