"""Who may do what on a session: its owner, and the principals it is shared with.

access.md §1 in one table and one decision.  The owner may run every command on
the session; a principal it is shared with C{read} may run the commands of
L{READ_COMMANDS}, one with C{write} those of L{WRITE_COMMANDS}; anyone else does
not learn that the session exists.  Pure logic (no clock, no I/O), so the table
is tested without a server; L{stui_twisted.sessions.service} asks
L{decide} for every command that names a session.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping

from stui_twisted.protocol.errors import StuiError

OWNER, READ, WRITE = "owner", "read", "write"
ACCESS_LEVELS = (READ, WRITE)
"""The access a share grants (C{share_session}'s C{access})."""

READ_COMMANDS = frozenset(
    {
        "restore_session",
        "get_session_info",
        "get_context_summary",
        "complete",
        "inspect",
        "subscribe",
        "get_events",
        "get_evaluation",
    }
)
"""What a reader may run on a session shared with it (access.md §1)."""

DEBUG_COMMANDS = frozenset(
    {
        "set_breakpoint",
        "remove_breakpoint",
        "list_breakpoints",
        "debug_state",
        "debug_stack",
        "debug_locals",
        "debug_evaluate",
        "debug_step",
        "debug_continue",
        "debug_post_mortem",
    }
)
"""The debugger's session commands (debugger.md); a writer may run them."""

BROWSE_COMMANDS = frozenset({"list_classes", "browse_class", "get_method"})
"""The browse tools that look into a session's namespace (stui-compat.md §3).

access.md does not name them.  A writer may run them (evaluate reaches whatever
they show, so refusing them would protect nothing); a reader may not, since
"everything else" is refused to readers."""

WRITE_COMMANDS = (
    READ_COMMANDS
    | DEBUG_COMMANDS
    | BROWSE_COMMANDS
    | frozenset(
        {
            "evaluate",
            "interrupt",
            "send_input",
            "update_session_state",
            "clear_context",
            "save_context",
            "load_context",
        }
    )
)
"""What a writer may run: everything a reader may, and what changes the session."""

OWNER_COMMANDS = frozenset({"close_session", "share_session", "unshare_session"})
"""Session commands only the owner may run, whatever the share."""

SESSION_COMMANDS = WRITE_COMMANDS | OWNER_COMMANDS
"""Every command that acts on one session, classified above (a test checks the table)."""


def session_not_found(session_id: str) -> StuiError:
    """The error for a session the caller may not see: the same as for none at all."""
    return StuiError(
        "SessionNotFound",
        f"no session {session_id[:80]!r} for this client",
        session_id=session_id[:80],
    )


def role_of(owner: str, shares: Mapping[str, str], client_id: str | None) -> str | None:
    """C{owner}, C{read} or C{write}: what C{client_id} is to the session (None: nothing).

    C{client_id} C{None} acts as the owner (see L{decide}).
    """
    if client_id is None or client_id == owner:
        return OWNER
    return shares.get(client_id)


def decide(
    session_id: str,
    owner: str,
    shares: Mapping[str, str],
    client_id: str | None,
    command: str,
) -> str:
    """The access C{client_id} has to run C{command} on the session, or the refusal.

    @param session_id: the session's id (for the error messages).
    @param owner: the session's owner (its C{client_id}).
    @param shares: client id -> C{read} or C{write}.
    @param client_id: the acting client id (the principal with auth on, the
        request's claim with auth off); C{None} acts as the owner (auth off and
        no client id given: the session id is the capability, as before sharing).
    @param command: the command's name.
    @return: C{owner}, C{read} or C{write}.
    @raise StuiError: C{SessionNotFound} when C{client_id} is neither the owner
        nor shared with; C{PermissionDenied} with C{details} C{access} and
        C{command} when the share does not allow C{command}.
    """
    access = role_of(owner, shares, client_id)
    if access is None:
        raise session_not_found(session_id)
    if access == OWNER:
        return OWNER
    allowed = READ_COMMANDS if access == READ else WRITE_COMMANDS
    if command not in allowed:
        if command in OWNER_COMMANDS:
            why = f"only its owner {owner!r} may run {command}"
        else:
            why = f"{command} needs write access" if access == READ else f"{command} is not allowed"
        raise StuiError(
            "PermissionDenied",
            f"session {session_id!r} is shared with {client_id!r} for {access} access; {why}",
            access=access,
            command=command,
        )
    return access


def check_reader_expression(expression: str) -> None:
    """Refuse a reader's C{inspect} expression that would run code rather than name a value.

    C{inspect} evaluates its C{expression} in the session's namespace, so an
    arbitrary one (C{x.clear()}, C{__import__('os')...}) would let a reader change
    the session after all.  A reader may name a value: a name, attributes of it,
    and items by a constant key (C{x}, C{p.x}, C{rows[0]}, C{d['k']}, C{m[-1].y}),
    which is what C{complete} resolves too.

    @raise StuiError: C{PermissionDenied} naming the parameter.
    """
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        tree = None
    node = tree.body if tree is not None else None
    while isinstance(node, ast.Attribute | ast.Subscript):
        if isinstance(node, ast.Subscript) and not _constant(node.slice):
            break
        node = node.value
    if not isinstance(node, ast.Name):
        raise StuiError(
            "PermissionDenied",
            "with read access, inspect takes an 'object_id' or an 'expression' that names a "
            "value (x, x.attr, x[0], d['k']), not one that computes",
            access=READ,
            command="inspect",
            parameter="expression",
        )


def _constant(node: ast.AST) -> bool:
    """A literal key: a constant, or a negative number."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        node = node.operand
    return isinstance(node, ast.Constant)


def shares_list(shares: Mapping[str, str]) -> list[dict]:
    """C{shares} as the wire and the session document have them, by client id."""
    return [{"client_id": who, "access": shares[who]} for who in sorted(shares)]


def shares_from(value) -> dict[str, str]:
    """The shares of a stored session (a list of C{{client_id, access}}; none if absent).

    Entries that are not well-formed are skipped: a share is a grant, and a grant
    that cannot be read must not be guessed at.
    """
    shares: dict[str, str] = {}
    if not isinstance(value, list):
        return shares
    for entry in value:
        if not isinstance(entry, dict):
            continue
        who, access = entry.get("client_id"), entry.get("access")
        if isinstance(who, str) and access in ACCESS_LEVELS:
            shares[who] = access
    return shares
