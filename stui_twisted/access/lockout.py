"""Brute-force limits for logins: failures per key, and distinct names per peer.

L{FailureLog} keeps the times of the last failures per key (a username) within a
sliding window; L{SpreadLog} keeps, per peer, the distinct usernames that failed
from it, so one address cannot spray passwords over many accounts while a
mistyped password does not lock every other account out.  Both are bounded in
the number of keys they hold.  Time is passed in by the caller (its reactor's
clock).
"""

from __future__ import annotations

import collections
from collections import deque


class FailureLog:
    """The times of the last C{limit} failures per key, within C{window} seconds."""

    def __init__(self, limit: int, window: float, max_keys: int = 100_000) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._times: dict[str, deque[float]] = {}

    def _recent(self, key: str, now: float) -> deque[float] | None:
        times = self._times.get(key)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._times[key]
            return None
        return times

    def count(self, key: str, now: float) -> int:
        times = self._recent(key, now)
        return len(times) if times else 0

    def retry_after(self, key: str, now: float) -> float:
        """Seconds until one more attempt is allowed (only meaningful when at the limit)."""
        times = self._recent(key, now)
        if not times:
            return 0.0
        return times[0] + self.window - now

    def record(self, key: str, now: float) -> None:
        if self.limit <= 0:
            return
        times = self._recent(key, now)
        if times is None:
            if len(self._times) >= self.max_keys:
                self.prune(now)
                while len(self._times) >= self.max_keys:
                    oldest = min(self._times, key=lambda k: self._times[k][-1])
                    del self._times[oldest]
            times = self._times[key] = deque(maxlen=self.limit)
        times.append(now)

    def prune(self, now: float) -> None:
        for key in list(self._times):
            self._recent(key, now)

    def __len__(self) -> int:
        return len(self._times)


class SpreadLog:
    """Per key (a peer): the distinct usernames that failed from it within C{window}.

    Each name is kept with the time of its last failure from that peer, so a
    name counts once however often it failed, until its last failure leaves
    the window.  This limits how many accounts one address can try (password
    spraying) without letting one mistyped account lock every other account
    out: repeated failures of one name are the per-username limit's job.
    """

    def __init__(self, limit: int, window: float, max_keys: int = 100_000) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._names: dict[str, collections.OrderedDict[str, float]] = {}

    def _recent(self, key: str, now: float) -> collections.OrderedDict[str, float] | None:
        names = self._names.get(key)
        if names is None:
            return None
        while names:
            name, last = next(iter(names.items()))
            if last > now - self.window:
                break
            del names[name]
        if not names:
            del self._names[key]
            return None
        return names

    def names(self, key: str, now: float) -> set[str]:
        """The names that failed from C{key} within the window."""
        names = self._recent(key, now)
        return set(names) if names else set()

    def count(self, key: str, now: float) -> int:
        names = self._recent(key, now)
        return len(names) if names else 0

    def retry_after(self, key: str, now: float) -> float:
        """Seconds until the oldest name leaves the window (meaningful at the limit)."""
        names = self._recent(key, now)
        if not names:
            return 0.0
        return next(iter(names.values())) + self.window - now

    def record(self, key: str, name: str, now: float) -> None:
        if self.limit <= 0:
            return
        names = self._recent(key, now)
        if names is None:
            if len(self._names) >= self.max_keys:
                self.prune(now)
                while len(self._names) >= self.max_keys:
                    oldest = min(self._names, key=lambda k: next(reversed(self._names[k].values())))
                    del self._names[oldest]
            names = self._names[key] = collections.OrderedDict()
        names[name] = now
        names.move_to_end(name)

    def prune(self, now: float) -> None:
        for key in list(self._names):
            self._recent(key, now)

    def __len__(self) -> int:
        return len(self._names)
