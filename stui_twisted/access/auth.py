"""Authentication core: password checks through C{twisted.cred}, tokens, brute-force limits.

Pieces, from the bottom up:

- L{PasswordFileChecker} is an C{ICredentialsChecker} for
  C{IUsernamePassword} backed by the C{--auth-file} password file
  (L{stui_twisted.access.passwd}).  scrypt is slow on purpose, so the check runs in
  a thread pool and the reactor is never blocked.  The file is re-read when it
  changes on disk (its mtime, size or inode).
- L{ClientIdRealm} turns an authenticated username into a
  L{Principal} whose C{client_id} is that username.
- L{Authenticator} is what the dispatcher uses: C{authenticate} (the
  C{authenticate} command of protocol.md section 6) with per-peer and
  per-username failure limits (kept by L{stui_twisted.access.lockout}), and the
  in-memory tokens a ZeroMQ request carries (C{check_token}, C{revoke}).

Time comes from an injected C{IReactorTime} so tests drive expiry and rate
windows with C{task.Clock}.  Nothing here starts threads until the service is
started (or the first check runs), so it is safe to build in C{makeService}.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
import os
import secrets
import threading
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import Attribute, Interface, implementer

from stui_twisted.access.lockout import FailureLog as _FailureLog
from stui_twisted.access.lockout import SpreadLog as _SpreadLog
from stui_twisted.access.passwd import (
    SALT_BYTES,
    SCRYPT_N,
    SCRYPT_P,
    SCRYPT_R,
    PasswordFileError,
    PasswordHash,
    parse_password_file,
    read_text,
    too_permissive,
    valid_username,
)
from stui_twisted.protocol.errors import StuiError, invalid_parameter
from stui_twisted.protocol.timefmt import iso_timestamp
from stui_twisted.settings import Settings

log = Logger()

AUTH_FAILED_MESSAGE = "invalid username or password"

_UNLOADED = "unloaded"

# How often (at most) check_token stats the password file to notice edits.
FILE_STAT_INTERVAL = 1.0


def iso_utc(seconds: float) -> str:
    """ISO-8601 UTC with milliseconds and C{Z} (protocol.md section 2)."""
    return iso_timestamp(seconds)


def _to_text(value: str | bytes) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogatepass")
    return value


def _to_bytes(value: str | bytes) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    return value


# -- twisted.cred ---------------------------------------------------------------------


class IClientId(Interface):
    """The avatar interface: an authenticated principal, named by its client id."""

    client_id = Attribute("The principal's name; it is the client_id of its requests.")


@implementer(IClientId)
@dataclasses.dataclass(frozen=True)
class Principal:
    """An authenticated user. Its C{client_id} is the username it logged in with."""

    client_id: str


@implementer(IRealm)
class ClientIdRealm:
    """The realm: every authenticated username becomes a L{Principal} of that name."""

    def requestAvatar(self, avatarId, mind, *interfaces):
        if IClientId not in interfaces:
            raise NotImplementedError("ClientIdRealm only provides IClientId avatars")
        return IClientId, Principal(_to_text(avatarId)), lambda: None


@implementer(ICredentialsChecker)
class PasswordFileChecker:
    """Checks C{IUsernamePassword} credentials against a password file, off the reactor.

    Unknown usernames are checked against a dummy hash with the same cost as the
    file's entries, so a failure takes as long whether or not the user exists.
    A file that disappears or cannot be read makes every check fail (fail
    closed) until it is readable again.

    @ivar threadpool: where hashing runs; C{None} means the reactor's pool.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, path: str, *, reactor: Any = None, threadpool: Any = None) -> None:
        self.path = path
        self.reactor = reactor
        self.threadpool = threadpool
        self._lock = threading.Lock()
        self._users: dict[str, PasswordHash] = {}
        self._signature: tuple | str | None = _UNLOADED
        self._dummy = self._make_dummy(SCRYPT_N, SCRYPT_R, SCRYPT_P, 32)

    @staticmethod
    def _make_dummy(n: int, r: int, p: int, key_len: int) -> PasswordHash:
        return PasswordHash(n, r, p, secrets.token_bytes(SALT_BYTES), secrets.token_bytes(key_len))

    @staticmethod
    def _signature_of(st: os.stat_result) -> tuple:
        return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)

    # blocking methods: call them from a thread (or at start-up, before the reactor runs)

    def load(self) -> int:
        """(Re)read the file now; return the number of users.

        Raises L{PasswordFileError} when it cannot be read.  Malformed lines and a
        group/world-readable file are logged as warnings.
        """
        text, st = read_text(self.path)
        users, problems = parse_password_file(text)
        for problem in problems:
            log.warn("auth file {path}: {problem}", path=self.path, problem=problem)
        if too_permissive(st):
            log.warn(
                "auth file {path} is readable by group or others; run: chmod 600 {path}",
                path=self.path,
            )
        if not users:
            log.warn("auth file {path} has no valid users: nobody can log in", path=self.path)
        if users:
            first = next(iter(users.values()))
            self._dummy = self._make_dummy(first.n, first.r, first.p, len(first.key))
        self._users = users
        self._signature = self._signature_of(st)
        log.info("auth file {path} loaded: {count} users", path=self.path, count=len(users))
        return len(users)

    def changed_on_disk(self) -> bool:
        """Whether the file differs from the last load (one C{stat})."""
        try:
            return self._signature_of(os.stat(self.path)) != self._signature
        except OSError:
            # Unreadable now: worth a (failing, logged) reload unless that already happened.
            return self._signature is not None

    def reload_if_changed(self) -> bool:
        """Re-read the file when it changed; return whether it was re-read."""
        with self._lock:
            if not self.changed_on_disk():
                return False
            try:
                self.load()
            except PasswordFileError as e:
                log.error("{error}; every login fails until it is fixed", error=e)
                self._users = {}
                self._signature = None
            return True

    def check_password(self, username: str, password: bytes) -> bool:
        """Whether C{password} is C{username}'s (blocking: one scrypt run, always)."""
        self.reload_if_changed()
        entry = self._users.get(username)
        if entry is None:
            self._dummy.verify(password)
            return False
        return entry.verify(password)

    # reactor-thread methods

    def has_user(self, username: str) -> bool:
        """Whether C{username} was in the file when it was last read (no I/O)."""
        return username in self._users

    def _pool(self):
        reactor = self.reactor
        if reactor is None:
            from twisted.internet import reactor  # lazily: importing it installs it
        return reactor, (self.threadpool or reactor.getThreadPool())

    def run_blocking(self, f: Callable, *args: Any) -> defer.Deferred:
        """Run C{f(*args)} in the hashing thread pool."""
        reactor, pool = self._pool()
        return deferToThreadPool(reactor, pool, f, *args)

    def requestAvatarId(self, credentials) -> defer.Deferred:
        """The username as avatar id, or a failure with L{UnauthorizedLogin}."""
        username = _to_text(credentials.username)
        password = _to_bytes(credentials.password)

        def checked(ok: bool) -> str:
            if not ok:
                raise UnauthorizedLogin(AUTH_FAILED_MESSAGE)
            return username

        return self.run_blocking(self.check_password, username, password).addCallback(checked)


@dataclasses.dataclass(frozen=True)
class _Token:
    client_id: str
    expires_at: float


def _token_key(token: str) -> bytes:
    # Tokens are looked up by their SHA-256, so lookup timing says nothing about them.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


# -- the service ----------------------------------------------------------------------


class Authenticator(service.Service):
    """Authentication for the dispatcher: passwords, brute-force limits, tokens.

    @param settings: uses C{auth_file}, C{token_ttl}, C{auth_failures_per_peer},
        C{auth_failures_per_user}, C{auth_failure_window}.
    @param clock: an C{IReactorTime} for token expiry and failure windows.
    @param reactor: for C{deferToThreadPool}; default the global reactor, used lazily.
    @param threadpool: where scrypt runs.  Default: a 2-thread pool of its own,
        created in C{startService}; before that, the reactor's pool.
    @param max_tokens_per_user: older tokens of a user are evicted beyond this.
    @param max_pending_checks: password checks queued at once (all peers); more
        answer C{RateLimited} so a flood cannot queue unbounded scrypt work.
    @param prune_interval: seconds between L{prune} runs while the service runs.
    """

    name = "auth"

    def __init__(
        self,
        settings: Settings,
        clock: IReactorTime,
        *,
        reactor: Any = None,
        threadpool: Any = None,
        max_tokens_per_user: int = 16,
        max_pending_checks: int = 64,
        prune_interval: float = 60.0,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.max_tokens_per_user = max_tokens_per_user
        self.max_pending_checks = max_pending_checks
        self._given_pool = threadpool
        self._own_pool: ThreadPool | None = None
        self.checker: PasswordFileChecker | None = None
        if settings.auth_file:
            self.checker = PasswordFileChecker(
                settings.auth_file, reactor=reactor, threadpool=threadpool
            )
        self.portal = Portal(ClientIdRealm(), [self.checker] if self.checker else [])
        self._tokens: dict[bytes, _Token] = {}
        self._tokens_by_client: dict[str, collections.OrderedDict[bytes, None]] = {}
        window = settings.auth_failure_window
        self._peer_failures = _SpreadLog(settings.auth_failures_per_peer, window)
        self._user_failures = _FailureLog(settings.auth_failures_per_user, window)
        # Per peer: how many checks of each name are in flight.
        self._pending_by_peer: dict[str, collections.Counter[str]] = {}
        self._pending_by_user: collections.Counter[str] = collections.Counter()
        self._pending = 0
        self._malformed_attempts = 0
        self._next_stat = 0.0
        self._refreshing = False
        self.prune_interval = prune_interval
        self._prune_loop = task.LoopingCall(self.prune)
        self._prune_loop.clock = clock

    @property
    def enabled(self) -> bool:
        """Whether authentication is on (an auth file is configured)."""
        return self.checker is not None

    # -- lifecycle

    def load(self) -> int:
        """Read the auth file now (blocking); call at start-up to fail early.

        Returns the number of users (0 when auth is off).  Raises
        L{PasswordFileError} with a sentence naming the file when it is unreadable.
        """
        return self.checker.load() if self.checker else 0

    def startService(self) -> None:
        super().startService()
        if self.checker is not None and self._given_pool is None:
            self._own_pool = ThreadPool(minthreads=0, maxthreads=2, name="stui-auth")
            self._own_pool.start()
            self.checker.threadpool = self._own_pool
        if self.checker is not None:
            d = self._prune_loop.start(self.prune_interval, now=False)
            d.addErrback(lambda f: log.failure("pruning tokens stopped", f))

    def stopService(self):
        if self._prune_loop.running:
            self._prune_loop.stop()
        if self._own_pool is not None:
            self._own_pool.stop()
            self._own_pool = None
            if self.checker is not None:
                self.checker.threadpool = self._given_pool
        return super().stopService()

    # -- authenticate

    async def authenticate(self, username: Any, password: Any, peer: Any) -> dict:
        """The C{authenticate} command: check the password, return a fresh token.

        @param peer: the remote host (IP address, no port) the attempt came from:
            C{ConnectionContext.peer}; for ZeroMQ the message's C{Peer-Address}.
        @return: C{{"authenticated": True, "client_id", "token", "expires_at"}}.
        @raise StuiError: C{AuthenticationFailed} (same message for an unknown user
            and a wrong password), C{RateLimited} with C{retry_after} (seconds)
            when too many attempts failed recently, C{InvalidRequest} for
            non-string parameters.
        """
        if not isinstance(username, str):
            raise invalid_parameter("username", "is required and must be a string")
        if not isinstance(password, str):
            raise invalid_parameter("password", "is required and must be a string")
        if self.checker is None:
            raise StuiError(
                "AuthenticationFailed",
                "authentication is not enabled on this server (it was started without "
                "--auth-file); no authenticate is needed",
            )
        peer_key = "unknown" if peer is None else str(peer)
        # Malformed names cannot be users: they still fail (after a dummy hash) and
        # count against the peer, each attempt as a name of its own, but get no
        # per-user bucket an attacker could inflate.
        user_key = username if valid_username(username) else None
        if user_key is None:
            self._malformed_attempts += 1
        name_key = user_key if user_key is not None else f"\0malformed#{self._malformed_attempts}"
        self._check_rate(peer_key, user_key, name_key, self.clock.seconds())

        credentials = UsernamePassword(_to_bytes(username), _to_bytes(password))
        self._pending += 1
        self._pending_by_peer.setdefault(peer_key, collections.Counter())[name_key] += 1
        if user_key is not None:
            self._pending_by_user[user_key] += 1
        try:
            _, principal, _logout = await self.portal.login(credentials, None, IClientId)
        except UnauthorizedLogin:
            now = self.clock.seconds()
            self._peer_failures.record(peer_key, name_key, now)
            if user_key is not None:
                self._user_failures.record(user_key, now)
            log.info(
                "authentication failed for {username!r} from {peer}",
                username=username[:128],
                peer=peer_key,
            )
            raise StuiError("AuthenticationFailed", AUTH_FAILED_MESSAGE) from None
        finally:
            self._pending -= 1
            pending_names = self._pending_by_peer[peer_key]
            _decrement(pending_names, name_key)
            if not pending_names:
                del self._pending_by_peer[peer_key]
            if user_key is not None:
                _decrement(self._pending_by_user, user_key)
        log.info(
            "{client_id} authenticated from {peer}", client_id=principal.client_id, peer=peer_key
        )
        return self._issue_token(principal.client_id)

    def _check_rate(self, peer_key: str, user_key: str | None, name_key: str, now: float) -> None:
        """Raise C{RateLimited} when this attempt is over a limit.

        Per username: the failures of that name, from anywhere.  Per peer: the
        distinct names that failed from that peer (L{_SpreadLog}), whether or
        not they exist, so the answer says nothing about which users exist.
        Checks in flight count as failures until they end.
        """
        if self._pending >= self.max_pending_checks:
            raise _rate_limited(1.0, "too many logins are being checked right now")
        waits = []
        peers = self._peer_failures
        if peers.limit > 0:
            failed = peers.names(peer_key, now)
            if len(failed) >= peers.limit:
                waits.append(peers.retry_after(peer_key, now))
            else:
                counted = failed | set(self._pending_by_peer.get(peer_key, ()))
                if name_key not in counted and len(counted) >= peers.limit:
                    waits.append(1.0)  # attempts in flight would reach the limit
        users = self._user_failures
        if user_key is not None and users.limit > 0:
            failed_count = users.count(user_key, now)
            if failed_count >= users.limit:
                waits.append(users.retry_after(user_key, now))
            elif failed_count + self._pending_by_user[user_key] >= users.limit:
                waits.append(1.0)  # attempts in flight would reach the limit
        if waits:
            raise _rate_limited(max(waits), "too many failed authentication attempts")

    # -- tokens

    def _issue_token(self, client_id: str) -> dict:
        now = self.clock.seconds()
        expires_at = now + self.settings.token_ttl
        token = secrets.token_urlsafe(32)
        key = _token_key(token)
        self._tokens[key] = _Token(client_id, expires_at)
        owned = self._tokens_by_client.setdefault(client_id, collections.OrderedDict())
        for old in [k for k in owned if self._expired(k, now)]:
            self._drop(old)
        owned[key] = None
        while len(owned) > self.max_tokens_per_user:
            oldest = next(iter(owned))
            self._drop(oldest)
        return {
            "authenticated": True,
            "client_id": client_id,
            "token": token,
            "expires_at": iso_utc(expires_at),
        }

    def _expired(self, key: bytes, now: float) -> bool:
        entry = self._tokens.get(key)
        return entry is None or now >= entry.expires_at

    def _drop(self, key: bytes) -> str | None:
        entry = self._tokens.pop(key, None)
        if entry is None:
            return None
        owned = self._tokens_by_client.get(entry.client_id)
        if owned is not None:
            owned.pop(key, None)
            if not owned:
                del self._tokens_by_client[entry.client_id]
        return entry.client_id

    def check_token(self, token: Any) -> str | None:
        """The client id a valid, unexpired token belongs to, else C{None}.

        A token of a user who is no longer in the auth file is rejected and
        dropped.  At most once per L{FILE_STAT_INTERVAL} this stats the auth file
        and, when it changed, re-reads it in the thread pool.
        """
        if not isinstance(token, str) or not token or len(token) > 512:
            return None
        key = _token_key(token)
        entry = self._tokens.get(key)
        if entry is None:
            return None
        now = self.clock.seconds()
        self._maybe_refresh(now)
        if now >= entry.expires_at or not self.has_user(entry.client_id):
            self._drop(key)
            return None
        return entry.client_id

    def token_expires_at(self, token: Any) -> float | None:
        """When a valid C{token} expires (seconds since the epoch), else C{None}."""
        if self.check_token(token) is None:
            return None
        return self._tokens[_token_key(token)].expires_at

    def revoke(self, token: Any) -> bool:
        """Invalidate C{token}; return whether it was valid."""
        if not isinstance(token, str):
            return False
        return self._drop(_token_key(token)) is not None

    def revoke_client(self, client_id: str) -> int:
        """Invalidate every token of C{client_id}; return how many there were."""
        keys = list(self._tokens_by_client.get(client_id, ()))
        for key in keys:
            self._drop(key)
        return len(keys)

    def has_user(self, client_id: str) -> bool:
        """Whether C{client_id} is (still) a user of the auth file, as last read."""
        return self.checker is not None and self.checker.has_user(client_id)

    def token_count(self) -> int:
        """How many tokens are held (expired ones included until pruned)."""
        return len(self._tokens)

    def prune(self) -> None:
        """Forget expired tokens and failures older than the window (cleanup loop)."""
        now = self.clock.seconds()
        for key in [k for k, t in self._tokens.items() if now >= t.expires_at]:
            self._drop(key)
        self._peer_failures.prune(now)
        self._user_failures.prune(now)

    def _maybe_refresh(self, now: float) -> None:
        if self.checker is None or self._refreshing or now < self._next_stat:
            return
        self._next_stat = now + FILE_STAT_INTERVAL
        if not self.checker.changed_on_disk():
            return
        self._refreshing = True
        d = self.checker.run_blocking(self.checker.reload_if_changed)

        def done(result):
            self._refreshing = False
            return result

        d.addBoth(done)
        d.addErrback(lambda f: log.failure("re-reading the auth file failed", f))


def _decrement(counter: collections.Counter, key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


def _rate_limited(seconds: float, why: str) -> StuiError:
    retry_after = max(1, math.ceil(seconds))
    return StuiError("RateLimited", f"{why}; retry in {retry_after} s", retry_after=retry_after)


__all__ = [
    "AUTH_FAILED_MESSAGE",
    "Authenticator",
    "ClientIdRealm",
    "IClientId",
    "PasswordFileChecker",
    "PasswordFileError",
    "Principal",
    "iso_utc",
]
