"""The server side of the session debugger (debugger.md): parameters in, image call, result.

Breakpoints are kept in the session document (C{breakpoints}) and restored
into the image whenever the session is materialized, also after a restart.
The paused-state commands go to the image beside the session's worker lane
(L{stui_twisted.image.supervisor.ImageSupervisor.debug}): an C{evaluate} that
hit a breakpoint keeps its reply pending until C{debug_continue} (or a step
that runs to the end), and another connection drives the debugger meanwhile.
"""

from __future__ import annotations

from stui_twisted.dispatch.dispatcher import Command, Param
from stui_twisted.protocol.errors import StuiError, invalid_parameter

SESSION_ID = Param("session_id", "string")
CLIENT_ID = Param("client_id", "string")
FRAME_INDEX = Param("frame_index", "integer", default=0)
BREAKPOINT_FIELDS = ("breakpoint_id", "function", "file", "line", "condition", "hits")


async def _session(service, call):
    return await service._session_for(
        call.params.get("session_id"),
        call.client_id,
        call.context,
        command=call.request.command,
    )


async def _debug(service, call, operation: str, arguments: dict):
    session = await _session(service, call)
    return session, await service.live.debug(session, operation, arguments)


def _stored(entry: dict) -> dict:
    return {key: entry.get(key) for key in BREAKPOINT_FIELDS}


def build_debug_commands(service) -> list[Command]:
    """The commands of debugger.md §1-§3, bound to C{service}."""

    async def set_breakpoint(call) -> dict:
        params = call.params
        function, file, line = params["function"], params["file"], params["line"]
        if bool(function) == bool(file):
            raise invalid_parameter("function", "give either function or file + line")
        if file and line is None:
            raise invalid_parameter("line", "is required with file")
        if file and file.startswith("cell:") and not file[5:].isdigit():
            raise invalid_parameter("file", f"cell:N needs a history index, not {file!r}")
        session, result = await _debug(
            service,
            call,
            "set_breakpoint",
            {"function": function, "file": file, "line": line, "condition": params["condition"]},
        )
        session.breakpoints = [
            b for b in session.breakpoints if b["breakpoint_id"] != result["breakpoint_id"]
        ] + [_stored(result)]
        await service.changed(session, "set the breakpoint")
        return dict(result, session_id=session.session_id)

    async def remove_breakpoint(call) -> dict:
        breakpoint_id = call.params["breakpoint_id"]
        if breakpoint_id is None:
            # by place (Format A's RemoveBreakpoint {file, line})
            file, line = call.params["file"], call.params["line"]
            if file is None or line is None:
                raise invalid_parameter("breakpoint_id", "is required (or file + line)")
            session = await _session(service, call)
            breakpoint_id = next(
                (
                    b["breakpoint_id"]
                    for b in session.breakpoints
                    if b.get("file") == file and b.get("line") == line
                ),
                "",
            )
        session, result = await _debug(
            service, call, "remove_breakpoint", {"breakpoint_id": breakpoint_id}
        )
        kept = [b for b in session.breakpoints if b["breakpoint_id"] != breakpoint_id]
        if len(kept) != len(session.breakpoints):
            session.breakpoints = kept
            await service.changed(session, "remove the breakpoint")
        return dict(result, session_id=session.session_id)

    async def list_breakpoints(call) -> dict:
        session, result = await _debug(service, call, "list_breakpoints", {})
        return dict(result, session_id=session.session_id)

    def paused_command(operation: str, *names: str):
        async def handler(call) -> dict:
            arguments = {name: call.params[name] for name in names}
            session, result = await _debug(service, call, operation, arguments)
            return dict(result, session_id=session.session_id)

        return handler

    async def debug_step(call) -> dict:
        mode = call.params["mode"]
        if mode not in ("into", "over", "out"):
            raise invalid_parameter("mode", f"must be into, over or out, not {mode!r}")
        session, _ = await _debug(service, call, "step", {"mode": mode})
        # the thread runs on to its next stop or to the end of the evaluation
        state = await _settled_state(service, call)
        if state.get("paused"):
            return {"session_id": session.session_id, "paused_at": state["frame"]}
        return {"session_id": session.session_id, "finished": True}

    async def debug_state(call) -> dict:
        session, result = await _debug(service, call, "state", {})
        return dict(result, session_id=session.session_id)

    return [
        Command(
            "set_breakpoint",
            set_breakpoint,
            (
                SESSION_ID,
                CLIENT_ID,
                Param("function", "string", description="f, Point.norm"),
                Param("file", "string", description="path or cell:N"),
                Param("line", "integer"),
                Param("condition", "string"),
            ),
            "a breakpoint at a function or line",
        ),
        Command(
            "remove_breakpoint",
            remove_breakpoint,
            (
                SESSION_ID,
                CLIENT_ID,
                Param("breakpoint_id", "string"),
                Param("file", "string"),
                Param("line", "integer"),
            ),
            "forget a breakpoint",
        ),
        Command(
            "list_breakpoints",
            list_breakpoints,
            (SESSION_ID, CLIENT_ID),
            "the session's breakpoints",
        ),
        Command(
            "debug_state",
            debug_state,
            (SESSION_ID, CLIENT_ID),
            "paused or not, and where",
        ),
        Command(
            "debug_stack",
            paused_command("stack"),
            (SESSION_ID, CLIENT_ID),
            "the paused stack",
        ),
        Command(
            "debug_locals",
            paused_command("locals", "frame_index"),
            (SESSION_ID, CLIENT_ID, FRAME_INDEX),
            "a paused frame's locals",
        ),
        Command(
            "debug_evaluate",
            paused_command("evaluate", "code", "frame_index"),
            (SESSION_ID, CLIENT_ID, Param("code", "string", True), FRAME_INDEX),
            "run code in a paused frame",
        ),
        Command(
            "debug_step",
            debug_step,
            (SESSION_ID, CLIENT_ID, Param("mode", "string", default="over")),
            "step into, over or out",
        ),
        Command(
            "debug_continue",
            paused_command("continue"),
            (SESSION_ID, CLIENT_ID),
            "resume the paused evaluation",
        ),
        Command(
            "debug_post_mortem",
            paused_command("post_mortem"),
            (SESSION_ID, CLIENT_ID),
            "examine the last error's stack",
        ),
    ]


async def _settled_state(service, call, attempts: int = 50) -> dict:
    """The session's debug state once a resumed thread stopped again or ended."""
    from twisted.internet import reactor, task

    for _ in range(attempts):
        _, state = await _debug(service, call, "state", {})
        if state.get("paused"):
            return state
        session = await _session(service, call)
        image = service.live._need_image()
        if session.session_id not in image._running_tasks:
            return state
        await task.deferLater(reactor, 0.02, lambda: None)
    raise StuiError("Timeout", "the stepped evaluation neither paused nor finished in time")
