"""The class browser of stui-client: C{:classes}, C{:browse}, C{:source}, C{:sysinfo}.

Formats the results of the browse commands (docs/protocol.md §5, "Browse
tools").  Method sources are highlighted with Pygments when it is installed
(it usually is, beside prompt_toolkit) and the output is a terminal.
"""

from __future__ import annotations

import json
from typing import Any


def highlight(source: str, color: bool) -> str:
    """C{source} with ANSI syntax highlighting when C{color} and Pygments is there."""
    if not color:
        return source
    try:
        from pygments import highlight as pygments_highlight
        from pygments.formatters import TerminalFormatter
        from pygments.lexers import PythonLexer
    except ImportError:
        return source
    return pygments_highlight(source, PythonLexer(), TerminalFormatter())


def _class_line(info: dict[str, Any]) -> str:
    superclass = info.get("superclass")
    base = f"({superclass})" if superclass else ""
    where = "session" if not info.get("is_system") else info.get("package", "")
    comment = (info.get("comment") or "").strip().splitlines()
    summary = f"  — {comment[0]}" if comment else ""
    return f"{info.get('name', '?')}{base}  [{where}]{summary}"


def format_classes(result: dict[str, Any]) -> str:
    """A C{list_classes} result: one line per class, then the count."""
    classes = result.get("classes") or []
    lines = [_class_line(info) for info in classes]
    total = result.get("total_count", len(classes))
    note = f"{len(classes)} of {total} classes" if result.get("truncated") else f"{total} classes"
    if not classes:
        note = "No classes match (:classes * lists the session's; :classes -a PATTERN all loaded)"
    return "\n".join(lines + [note]) + "\n"


def _signature(method: dict[str, Any]) -> str:
    marker = {"class": "@classmethod ", "static": "@staticmethod ", "property": "@property "}
    prefix = marker.get(method.get("category"), "")
    return f"{prefix}{method.get('name', '?')}({', '.join(method.get('arguments') or [])})"


def format_class(result: dict[str, Any]) -> str:
    """A C{browse_class} result: the class, its methods and variables."""
    info = result.get("class_info") or {}
    lines = [_class_line(info)]
    for title, key in (
        ("instance methods", "instance_methods"),
        ("class methods", "class_methods"),
    ):
        methods = result.get(key) or []
        if methods:
            lines.append(f"{title}:")
            lines.extend(f"  {_signature(method)}" for method in methods)
    for title, key in (("instance variables", "instance_vars"), ("class variables", "class_vars")):
        names = result.get(key) or []
        if names:
            lines.append(f"{title}: {', '.join(names)}")
    return "\n".join(lines) + "\n"


def format_method(result: dict[str, Any], color: bool) -> str:
    """A C{get_method} result: the signature line, then the (highlighted) source."""
    method = result.get("method") or {}
    header = f"# {result.get('class_name', '?')}.{_signature(method)}"
    source = method.get("source")
    if source is None:
        comment = method.get("comment") or ""
        body = "(no Python source: a builtin)" + (f"\n{comment}" if comment else "")
        return f"{header}\n{body}\n"
    return f"{header}\n{highlight(source, color).rstrip()}\n"


def format_sysinfo(result: dict[str, Any]) -> str:
    """A C{system_info} result as C{key: value} lines."""
    info = result.get("info") or {}
    lines = []
    width = max((len(key) for key in info), default=0)
    for key, value in info.items():
        if key == "packages" and isinstance(value, list):
            value = ", ".join(f"{p.get('name')} {p.get('version')}" for p in value)
        elif not isinstance(value, str):
            value = json.dumps(value)
        lines.append(f"{key:<{width}}  {value}")
    return "\n".join(lines) + "\n"
