"""Turn server replies into text a person reads at the terminal.

Pure functions of the reply dictionaries (protocol.md sections 2, 4 and 6), so they
are easy to test and shared by the REPL and C{--eval}.
"""

from __future__ import annotations

from typing import Any

SESSION_GONE_ERRORS = frozenset({"SessionNotFound", "SessionExpired", "SessionClosed"})


def _with_newline(text: str) -> str:
    return text if not text or text.endswith("\n") else text + "\n"


#: The section labels of a help reply (C{name?}, protocol.md evaluate).
HELP_LABELS = ("Type:", "Value:", "Signature:", "File:", "Docstring:", "Source:")
BOLD_CYAN = "\x1b[1;36m"
RESET = "\x1b[0m"


def highlight_help(text: str) -> str:
    """A help reply with its section labels in bold cyan (for a terminal)."""
    lines = []
    for line in text.split("\n"):
        for label in HELP_LABELS:
            if line.startswith(label):
                line = f"{BOLD_CYAN}{label}{RESET}{line[len(label) :]}"
                break
        lines.append(line)
    return "\n".join(lines)


def format_evaluation(result: dict[str, Any], colour: bool = False) -> str:
    """Captured output first, then the value: C{display} (display mode) or C{result}.

    A statement, or an expression whose value is None, shows only its output.  A
    help reply (C{result_type} C{"help"}) has its labels highlighted when
    C{colour} (the REPL on a terminal).
    """
    parts = [_with_newline(result.get("output") or "")]
    shown = result.get("display")
    if shown is None:
        shown = result.get("result")
    if shown is not None:
        shown = str(shown)
        if colour and result.get("result_type") == "help":
            shown = highlight_help(shown)
        parts.append(_with_newline(shown))
    return "".join(parts)


def format_error(reply: dict[str, Any]) -> str:
    """An error reply as text.

    For C{EvaluationError}: captured output, the traceback lines, then
    C{ExcType: message} as the last line (not repeated if the traceback already ends
    with it).  For any other error: C{ErrorType: message}.
    """
    details = reply.get("details") if isinstance(reply.get("details"), dict) else {}
    error_type = reply.get("error_type") or "Error"
    message = reply.get("error") or ""
    if error_type == "PermissionDenied":
        return format_refusal(details, message)
    if error_type != "EvaluationError":
        return f"{error_type}: {message}\n"
    exception_type = details.get("exception_type") or error_type
    exception_message = details.get("message")
    if exception_message is None:
        exception_message = message
    summary = f"{exception_type}: {exception_message}" if exception_message else exception_type
    lines: list[str] = []
    output = details.get("output") or ""
    traceback_lines = details.get("traceback") or []
    if isinstance(traceback_lines, str):
        traceback_lines = [traceback_lines]
    for entry in traceback_lines:
        lines.extend(str(entry).rstrip("\n").split("\n"))
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines or lines[-1].strip() != summary.strip():
        lines.append(summary)
    return _with_newline(output) + "\n".join(lines) + "\n"


def format_refusal(details: dict[str, Any], message: str) -> str:
    """C{PermissionDenied} as one clear line: the plan's missing feature, or the
    access a shared session gives (access.md §1-§2)."""
    if details.get("feature"):
        head = (
            f"Refused by your plan: {details['feature']!r} is not a feature of plan "
            f"{details.get('plan', '?')!r}"
        )
    elif details.get("access"):
        head = (
            f"Refused: you have {details['access']} access to this session and "
            f"{details.get('command', 'this command')!r} needs more"
        )
    else:
        head = "Refused"
    return f"{head} (PermissionDenied: {message})\n" if message else f"{head}.\n"


def format_whoami(result: dict[str, Any]) -> str:
    """C{whoami}: who the server thinks we are and what our plan allows."""
    limits = result.get("limits") or {}
    lines = [
        f"client_id      {result.get('client_id') or '(none)'}",
        f"authenticated  {_scalar(bool(result.get('authenticated')))}",
        f"plan           {result.get('plan') or '?'}",
        "features       " + " ".join(map(str, result.get("features") or [])),
    ]
    lines += [f"  {key} = {_scalar(value)}" for key, value in sorted(limits.items())]
    if result.get("token_expires_at"):
        lines.append(f"token expires  {result['token_expires_at']}")
    return "\n".join(lines) + "\n"


def format_shared_sessions(sessions: list[dict[str, Any]], current_session_id: str | None) -> str:
    """C{list_shared_sessions}: numbered, so that C{:shared N} attaches to one."""
    if not sessions:
        return "Nobody shares a session with you.\n"
    lines = []
    for number, record in enumerate(sessions, start=1):
        marker = "*" if record.get("session_id") == current_session_id else " "
        lines.append(
            f"{marker} {number}  {record.get('session_id', '?')}  owner {record.get('owner', '?')}"
            f"  {record.get('access', '?')} access  last used {record.get('last_activity', '?')}"
        )
    return "\n".join(lines) + "\n:shared N attaches to session N.\n"


def format_reply(reply: dict[str, Any], colour: bool = False) -> str:
    """An C{evaluate} reply, success or error."""
    if reply.get("status") == "success":
        return format_evaluation(reply.get("result") or {}, colour)
    return format_error(reply)


def format_inspection(result: dict[str, Any]) -> str:
    """The C{inspect} result: header, then attributes and items as aligned rows."""
    header = f"{result.get('class_name', '?')} {result.get('object_id') or ''}".rstrip()
    lines = [header, f"  {result.get('string_representation', '')}"]
    if result.get("size") is not None:
        lines.append(f"  size: {result['size']}")
    for title, rows, key in (
        ("attributes", result.get("attributes") or [], "name"),
        ("items", result.get("items") or [], "key"),
    ):
        if not rows:
            continue
        lines.append(f"{title}:")
        width = min(30, max(len(str(row.get(key, ""))) for row in rows))
        for row in rows:
            reference = f"  [{row['object_id']}]" if row.get("object_id") else ""
            lines.append(
                f"  {str(row.get(key, '')):<{width}}  {row.get('type', '')}: "
                f"{row.get('repr', '')}{reference}"
            )
    if result.get("truncated"):
        lines.append("  … (truncated; use a larger limit to see more)")
    return "\n".join(lines) + "\n"


def format_session_info(result: dict[str, Any]) -> str:
    """C{get_session_info} as C{key: value} lines, the most useful first."""
    order = [
        "session_id",
        "client_id",
        "created_at",
        "last_activity",
        "expires_at",
        "time_until_expiry",
        "timeout",
        "is_active",
        "variable_count",
        "history_length",
        "size_bytes",
        "attached_connections",
    ]
    keys = [key for key in order if key in result] + sorted(k for k in result if k not in order)
    width = max((len(key) for key in keys), default=0)
    return "".join(f"{key:<{width}}  {_scalar(result[key])}\n" for key in keys)


def format_sessions(result: dict[str, Any], current_session_id: str | None) -> str:
    """C{list_client_sessions}: one line per session, C{*} marking the current one."""
    sessions = result.get("sessions") or []
    if not sessions:
        return f"no active sessions for client {result.get('client_id', '?')}\n"
    lines = []
    for record in sessions:
        marker = "*" if record.get("session_id") == current_session_id else " "
        state = "active" if record.get("is_active", True) else "inactive"
        lines.append(
            f"{marker} {record.get('session_id', '?')}  {state}  "
            f"last used {record.get('last_activity', '?')}  "
            f"expires {record.get('expires_at', '?')}"
        )
    return "\n".join(lines) + "\n"


def format_bindings_note(result: dict[str, Any]) -> str:
    """What C{restore_session}/C{load_context} brought back, in one or two lines."""
    lines = []
    restored = result.get("restored_bindings") or []
    if restored:
        lines.append("restored variables: " + ", ".join(map(str, restored)))
    for entry in result.get("unrestorable_bindings") or []:
        lines.append(
            f"not restorable: {entry.get('name', '?')} ({entry.get('type', '?')}): "
            f"{entry.get('reason', '')}"
        )
    return "".join(line + "\n" for line in lines)


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)
