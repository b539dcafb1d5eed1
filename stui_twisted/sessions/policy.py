"""Client admission policy: client-id format, allow/deny globs, create rate limit.

Pure logic with time passed in, so it is tested without a reactor.
"""

from __future__ import annotations

import fnmatch
import re
from collections import deque

from stui_twisted.protocol.errors import StuiError

CLIENT_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")


def check_client_id(client_id: str, parameter: str = "client_id") -> str:
    """Return C{client_id} or raise C{ClientNotAllowed} naming what is wrong.

    @param parameter: the name of the parameter that carried it (for the message).
    """
    if not CLIENT_ID_PATTERN.fullmatch(client_id):
        raise StuiError(
            "ClientNotAllowed",
            f"parameter {parameter!r} must be 1-128 characters of A-Z a-z 0-9 . _ : @ -, "
            "starting with a letter or digit",
            parameter=parameter,
        )
    return client_id


class ClientPolicy:
    """Decides which client ids may create sessions, and how often."""

    def __init__(
        self,
        *,
        allow: tuple[str, ...] = (),
        deny: tuple[str, ...] = (),
        rate_limit: int = 10,
        rate_window: float = 60.0,
    ) -> None:
        self.allow = tuple(allow)
        self.deny = tuple(deny)
        self.rate_limit = rate_limit
        self.rate_window = rate_window
        self._creates: dict[str, deque[float]] = {}

    def admit(self, client_id: str) -> None:
        """Raise C{ClientNotAllowed} unless C{client_id} is well-formed and permitted."""
        check_client_id(client_id)
        if any(fnmatch.fnmatchcase(client_id, glob) for glob in self.deny):
            raise StuiError(
                "ClientNotAllowed",
                f"client_id {client_id!r} is on the server's deny list",
                parameter="client_id",
            )
        if self.allow and not any(fnmatch.fnmatchcase(client_id, glob) for glob in self.allow):
            raise StuiError(
                "ClientNotAllowed",
                f"client_id {client_id!r} is not on the server's allow list",
                parameter="client_id",
            )

    def record_create(self, client_id: str, now: float, limit: int | None = None) -> None:
        """Count one C{create_session}, or raise C{RateLimited} with C{retry_after}.

        @param limit: this client's creates per window (its plan's); default C{rate_limit}.
        """
        limit = self.rate_limit if limit is None else limit
        times = self._creates.setdefault(client_id, deque())
        while times and times[0] <= now - self.rate_window:
            times.popleft()
        if len(times) >= limit:
            retry_after = max(0.001, times[0] + self.rate_window - now)
            raise StuiError(
                "RateLimited",
                f"client {client_id!r} created {len(times)} sessions in the last "
                f"{self.rate_window:g} s; retry after {retry_after:.1f} s",
                retry_after=round(retry_after, 3),
                limit=limit,
                window=self.rate_window,
            )
        times.append(now)

    def prune(self, now: float) -> None:
        """Forget rate-limit history older than the window (bounded memory)."""
        for client_id in list(self._creates):
            times = self._creates[client_id]
            while times and times[0] <= now - self.rate_window:
                times.popleft()
            if not times:
                del self._creates[client_id]
