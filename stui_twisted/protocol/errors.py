"""The protocol's error model: one exception type carrying an C{error_type}.

Every failure a client can see is a L{StuiError} whose C{error_type} is
one of L{ERROR_TYPES} (protocol.md section 2).  Anything else that escapes
a handler is a bug and is answered as C{InternalError} by the dispatcher.
"""

from __future__ import annotations

from typing import Any

ERROR_TYPES = frozenset(
    {
        "InvalidRequest",
        "UnknownCommand",
        "MessageTooLarge",
        "AuthenticationRequired",
        "AuthenticationFailed",
        "PermissionDenied",
        "ClientNotAllowed",
        "RateLimited",
        "SessionLimitExceeded",
        "NoSession",
        "SessionNotFound",
        "SessionExpired",
        "SessionClosed",
        "SessionElsewhere",
        "StateTooLarge",
        "EvaluationError",
        "ObjectNotFound",
        "ClassNotFound",
        "MethodNotFound",
        "UnsupportedOperation",
        "Timeout",
        "Interrupted",
        "ImageRestarted",
        "StorageError",
        "InternalError",
    }
)


class StuiError(Exception):
    """A failure that is answered to the client as an error reply.

    @ivar error_type: one of L{ERROR_TYPES}.
    @ivar message: a sentence a person can act on, naming the bad field or value.
    @ivar details: JSON-able extra facts (always a dict).
    """

    def __init__(self, error_type: str, message: str, **details: Any) -> None:
        if error_type not in ERROR_TYPES:
            raise ValueError(f"unknown error_type {error_type!r}")
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.details = details

    def __repr__(self) -> str:
        return f"StuiError({self.error_type!r}, {self.message!r}, **{self.details!r})"


def invalid_parameter(name: str, problem: str, **details: Any) -> StuiError:
    """An C{InvalidRequest} naming parameter C{name}, e.g. "must be a string"."""
    return StuiError("InvalidRequest", f"parameter '{name}' {problem}", parameter=name, **details)
