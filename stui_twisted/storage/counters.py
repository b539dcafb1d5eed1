"""What the store has done, for statistics and metrics: cached counters and write observers.

Reactor thread only; no I/O.  L{StoreCounters.statistics} is what
C{SessionStore.statistics} returns, and write observers are how metrics time the
store's writes (C{stui_storage_flush_duration_seconds}) without wrapping its methods.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from stui_twisted.storage.lanes import Key, Snapshot

WriteObserver = Callable[[str, float, bool], object]


class StoreCounters:
    """Sizes and save times of the files the store knows of, errors, and observers.

    The store logs; this only counts (and calls observers).

    @param seconds: the clock (the reactor's C{seconds}).
    """

    log = Logger()

    def __init__(self, seconds: Callable[[], float]) -> None:
        self._seconds = seconds
        self.file_info: dict[Key, tuple[int, str | None]] = {}
        self._file_bytes = 0
        self._last_flush_at: str | None = None
        self._write_errors = 0
        self._quarantined = 0
        self._write_observers: list[WriteObserver] = []

    def statistics(self, pending_writes: int) -> dict[str, Any]:
        return {
            "files": len(self.file_info),
            "bytes": self._file_bytes,
            "pending_writes": pending_writes,
            "last_flush_at": self._last_flush_at,
            "write_errors": self._write_errors,
            "quarantined": self._quarantined,
        }

    def saved_at(self, key: Key) -> str | None:
        """The C{saved_at} of the last write or read of C{key}, if known."""
        return self.file_info.get(key, (0, None))[1]

    def set_file(self, key: Key, size: int, saved_at: str | None) -> None:
        previous = self.file_info.get(key)
        if previous is not None:
            self._file_bytes -= previous[0]
        self.file_info[key] = (size, saved_at)
        self._file_bytes += size

    def forget_file(self, key: Key) -> None:
        previous = self.file_info.pop(key, None)
        if previous is not None:
            self._file_bytes -= previous[0]

    def reset(self, file_info: dict[Key, tuple[int, str | None]]) -> None:
        """Know exactly the files in C{file_info} (after loading the index)."""
        self.file_info = {}
        self._file_bytes = 0
        for key, (size, saved_at) in file_info.items():
            self.set_file(key, size, saved_at)

    def written(self, result: object, snapshot: Snapshot) -> object:
        """Count one finished write of C{snapshot}; passes C{result} on."""
        target = snapshot.target
        if isinstance(result, Failure):
            self._write_errors += 1
            return result
        self._last_flush_at = result.saved_at
        if target.session_id is not None:
            self.set_file(target.key, result.size_bytes, result.saved_at)
        return result

    def quarantined(self) -> None:
        """Count one file moved to quarantine."""
        self._quarantined += 1

    # ------------------------------------------------------------------ observers

    def add_write_observer(self, observer: WriteObserver) -> None:
        self._write_observers.append(observer)

    def remove_write_observer(self, observer: WriteObserver) -> None:
        self._write_observers.remove(observer)

    def observed(self, kind: str, write: Callable[[], defer.Deferred]) -> defer.Deferred:
        """What C{write()} returns, telling each observer C{(kind, seconds, ok)} when it fires.

        The time runs from before the call (which serializes on this thread).
        """
        started = self._seconds()
        written = write()

        def finished(result: object) -> object:
            seconds = self._seconds() - started
            ok = not isinstance(result, Failure)
            for observer in list(self._write_observers):
                try:
                    observer(kind, seconds, ok)
                except Exception:
                    self.log.failure("write observer {observer!r} failed", observer=observer)
            return result

        return written.addBoth(finished)
