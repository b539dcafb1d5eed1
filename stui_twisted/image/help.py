"""IPython-style help cells: C{name?} and C{name??} (issue 19.3).

A cell that is, as a whole, one Python expression followed by C{?} (or
C{??}) and is not valid Python as it stands is rewritten before it is compiled:
the expression alone is evaluated as the cell (under the same guard, output
capture and tracebacks as any cell), and its value is described instead of
being the result.  C{?} gives the type, signature and docstring; C{??} adds
the source when there is one (session definitions included).  Anything else
(a C{?} inside a string or comment, C{a ? b}) is left as Python.
"""

from __future__ import annotations

import ast
import inspect
import types
from dataclasses import dataclass
from typing import Any

#: What the source part says when there is none to show.
NO_SOURCE = "not available"


@dataclass(frozen=True)
class HelpRequest:
    """A help cell: the C{expression} to describe, and whether with its source."""

    expression: str
    with_source: bool


def help_request(code: str) -> HelpRequest | None:
    """The help request C{code} is, or None when it is to run as Python."""
    text = code.strip()
    if not text.endswith("?"):
        return None
    try:
        ast.parse(code)
    except SyntaxError:
        pass
    else:
        return None  # valid Python (C{x  # why?}): left alone
    with_source = text.endswith("??")
    expression = text[: -2 if with_source else -1].strip()
    if not expression:
        return None
    try:
        ast.parse(expression, mode="eval")
    except SyntaxError:
        return None
    return HelpRequest(expression, with_source)


def _signature(value: Any) -> str | None:
    if not callable(value):
        return None
    try:
        return str(inspect.signature(value))
    except Exception:  # noqa: BLE001 - no signature (builtins), or a user __signature__ raised
        return None


def _source(value: Any, session_source) -> str:
    """The source of C{value}: the session's record first, else inspect's."""
    recorded = session_source(value)
    if recorded is not None:
        return recorded
    if isinstance(value, type) and value.__module__ == "__main__":
        # inspect would search the image process's own __main__ file
        return f"{NO_SOURCE} (a class defined in the session, not by a class statement kept)"
    if not isinstance(
        value, (type, types.FunctionType, types.MethodType, types.ModuleType, types.CodeType)
    ):
        return f"{NO_SOURCE} (a {type(value).__name__} object has no source of its own)"
    try:
        return inspect.getsource(value)
    except Exception as exc:  # noqa: BLE001 - built-in, no file, or a file that changed
        return f"{NO_SOURCE} ({type(exc).__name__}: {exc})"


def describe(expression: str, value: Any, with_source: bool, session_source, short_repr) -> str:
    """The help text of C{value}, the value of C{expression}.

    C{session_source(value)} is the source the session recorded for it (or
    None); C{short_repr(value)} a clipped, never-raising repr.
    """
    lines = [f"Type:      {type(value).__name__}"]
    if not isinstance(value, (type, types.ModuleType)) and not callable(value):
        lines.append(f"Value:     {short_repr(value)}")
    signature = _signature(value)
    if signature is not None:
        name = getattr(value, "__name__", None)
        if not isinstance(name, str) or name.startswith("<"):
            name = expression  # a lambda, or an object without a name
        lines.append(f"Signature: {name}{signature}")
    if isinstance(value, types.ModuleType):
        lines.append(f"File:      {getattr(value, '__file__', None) or '(built-in)'}")
    try:
        docstring = inspect.getdoc(value)
    except Exception:  # noqa: BLE001 - a user __doc__ property may raise anything
        docstring = None
    lines.append("Docstring:")
    lines.append(docstring if docstring else "<no docstring>")
    if with_source:
        lines.append("Source:")
        lines.append(_source(value, session_source).rstrip("\n"))
    return "\n".join(lines) + "\n"
