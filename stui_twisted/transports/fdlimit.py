"""File descriptors: raise the soft limit, and keep a reserve for the server itself.

Every TCP/TLS connection costs one descriptor, and so does every ZeroMQ peer
(inside libzmq).  Without a reserve, idle connections can take the last ones,
and then the image cannot be respawned (it needs pipes) and the store cannot
open a file: the server is stuck.  So:

- at start-up the soft C{RLIMIT_NOFILE} is raised to the hard limit
  (L{raise_nofile_limit}), and the result is logged;
- L{FdReserve} keeps L{RESERVE} descriptors for the image and the
  store: while fewer than that are free, a new TCP/TLS connection gets one
  C{RateLimited} error line (C{details.reason: "file_descriptors"}) and is
  closed (L{FdGuardedFactory}), and the refusals are logged (once per
  interval, with a count).  A refused connection holds its descriptor until
  its line is written, so at most L{MAX_REFUSALS_IN_FLIGHT} are answered
  at a time; the others are closed at once, without a reply.

Counting open descriptors (C{/proc/self/fd}) costs about 1 µs per open
descriptor, too much for every accept.  The reserve therefore counts them once
per L{FdReserve.interval} and adds the TCP/TLS connections opened since
(the connection registry's count); only near the threshold does it count
again, at most every L{FdReserve.recount_interval}.  Both gaps stretch to
100 times the last count's duration, so counting never takes more than about 1%
of the reactor even with tens of thousands of descriptors open.  The reserve is
large enough to absorb what else can open descriptors meanwhile (ZeroMQ peers).
"""

from __future__ import annotations

import os
import resource
import time

from twisted.application import service
from twisted.internet import protocol, task
from twisted.logger import Logger

from stui_twisted.protocol.envelope import encode_error
from stui_twisted.protocol.errors import StuiError

log = Logger()

#: descriptors kept free for the image (pipes of a respawn) and the store (files)
RESERVE = 64

#: refused connections that may hold their descriptor (to say why) at once
MAX_REFUSALS_IN_FLIGHT = 16

#: the soft limit asked for when the hard limit is unlimited (macOS)
UNLIMITED_TARGET = 1 << 20


def raise_nofile_limit() -> tuple[int, int, int]:
    """Raise the soft C{RLIMIT_NOFILE} to the hard one; (before, after, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warn(
                "open files: could not raise the soft limit {soft} to {target}: {error}",
                soft=soft,
                target=target,
                error=exc,
            )
            return soft, soft, hard
        return soft, target, hard
    return soft, soft, hard


def count_open_fds() -> int:
    """How many descriptors this process has open (Linux: /proc/self/fd)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # minus the one listdir used
    except OSError:
        try:
            return len(os.listdir("/dev/fd")) - 1
        except OSError:
            return 0  # cannot tell: admit (the limit still applies in accept)


class FdReserve(service.Service):
    """Decides whether a new connection may take a descriptor; logs refusals.

    @param registry: the L{ConnectionRegistry}; its C{limited_count} is the
        number of open TCP/TLS connections.
    @param count: counts the open descriptors (a parameter for tests).
    @param limit: the descriptor limit; default the soft C{RLIMIT_NOFILE}
        read at L{startService} (after L{raise_nofile_limit}).
    """

    name = "fd-reserve"
    interval = 1.0
    recount_interval = 0.1
    log_interval = 10.0

    def __init__(
        self, reactor, registry, *, reserve: int = RESERVE, count=count_open_fds, limit=None
    ) -> None:
        self._reactor = reactor
        self._registry = registry
        self.reserve = reserve
        self._count = count
        self.limit = limit
        self._counted = 0
        self._connections_at_count = 0
        self._counted_at = float("-inf")
        self._count_seconds = 0.0  # how long the last count took
        self._refused = 0
        self._refused_logged_at = float("-inf")
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = reactor

    def privilegedStartService(self) -> None:  # noqa: N802
        super().privilegedStartService()
        before, after, hard = raise_nofile_limit()
        if after != before:
            log.info(
                "open files: soft limit raised from {before} to {after} (hard {hard}); "
                "{reserve} kept for the image and the store",
                before=before,
                after=after,
                hard=hard,
                reserve=self.reserve,
            )
        else:
            log.info(
                "open files: limit {limit} (hard {hard}); {reserve} kept for the image and the store",
                limit=after,
                hard=hard,
                reserve=self.reserve,
            )

    def startService(self) -> None:  # noqa: N802
        super().startService()
        if self.limit is None:
            self.limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self._loop.start(self.interval, now=True)

    def stopService(self) -> None:  # noqa: N802
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    def _due(self, gap: float) -> bool:
        """Whether the last count is older than C{gap} (stretched for slow counts)."""
        gap = max(gap, 100 * self._count_seconds)
        return self._reactor.seconds() - self._counted_at >= gap

    def _tick(self) -> None:
        if self._due(self.interval):
            self.recount()

    def recount(self) -> None:
        """Count the open descriptors now."""
        started = time.perf_counter()
        self._counted = self._count()
        self._count_seconds = time.perf_counter() - started
        self._connections_at_count = self._registry.limited_count
        self._counted_at = self._reactor.seconds()

    def estimate(self) -> int:
        """Open descriptors: the last count plus the connections opened since."""
        opened_since = self._registry.limited_count - self._connections_at_count
        return self._counted + max(0, opened_since)

    def admit(self) -> bool:
        """Whether one more connection leaves the reserve free (logs refusals)."""
        if self.limit is None or self.limit == resource.RLIM_INFINITY:
            return True
        threshold = self.limit - self.reserve
        if self.estimate() + 1 > threshold:
            if self._due(self.recount_interval):
                self.recount()
            if self.estimate() + 1 > threshold:
                self._note_refusal()
                return False
        return True

    def _note_refusal(self) -> None:
        self._refused += 1
        now = self._reactor.seconds()
        if now - self._refused_logged_at >= self.log_interval:
            log.warn(
                "refusing new connections: {open} of {limit} file descriptors open, "
                "{reserve} kept for the image and the store ({refused} refused)",
                open=self.estimate(),
                limit=self.limit,
                reserve=self.reserve,
                refused=self._refused,
            )
            self._refused_logged_at = now
            self._refused = 0


class _Refusal(protocol.Protocol):
    """Says why in one error line, then closes."""

    def __init__(self, line: bytes, done=None) -> None:
        self._line = line
        self._done = done

    def connectionMade(self) -> None:  # noqa: N802
        self.transport.write(self._line)
        self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:  # noqa: N802
        if self._done is not None:
            self._done()


class FdGuardedFactory(protocol.Factory):
    """Wraps a server factory: refuse a connection when the reserve is reached.

    Only C{buildProtocol} is intercepted; the protocols are the wrapped
    factory's own, so nothing else changes for admitted connections.
    """

    noisy = False

    def __init__(self, factory, reserve: FdReserve) -> None:
        self.wrapped = factory
        self.reserve = reserve
        self.refusals_in_flight = 0

    def logPrefix(self) -> str:  # noqa: N802 - "LineJSONFactory starting on 7555"
        return self.wrapped.logPrefix()

    def doStart(self) -> None:  # noqa: N802
        self.wrapped.doStart()

    def doStop(self) -> None:  # noqa: N802
        self.wrapped.doStop()

    def buildProtocol(self, addr):  # noqa: N802
        if not self.reserve.admit():
            if self.refusals_in_flight >= MAX_REFUSALS_IN_FLIGHT:
                return None  # closed at once: its descriptor is free again now
            self.refusals_in_flight += 1
            error = StuiError(
                "RateLimited",
                "the server is short of file descriptors; try again later",
                reason="file_descriptors",
                retry_after=self.reserve.interval,
            )
            return _Refusal(encode_error(None, error) + b"\n", self._refusal_done)
        return self.wrapped.buildProtocol(addr)

    def _refusal_done(self) -> None:
        self.refusals_in_flight -= 1
