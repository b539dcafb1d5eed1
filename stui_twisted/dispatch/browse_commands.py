"""The server side of the browse tools (stui-compat.md §3): parameters in, image call, result.

C{list_classes}, C{browse_class} and C{get_method} look into the session's
namespace in the live image (L{stui_twisted.image.browse} does the work);
C{system_info} asks the image about itself and needs no session.
"""

from __future__ import annotations

import platform

from stui_twisted.dispatch.dispatcher import Command, Param
from stui_twisted.image.browse import INFO_TYPES, MAX_LIST_LIMIT
from stui_twisted.protocol.errors import StuiError, invalid_parameter

SESSION_ID = Param("session_id", "string", description="defaults to the current session")
CLIENT_ID = Param("client_id", "string")


def language_version(service) -> str:
    """The Python version the image runs: its own answer, else the server's."""
    version = getattr(getattr(service, "image", None), "python_version", None)
    return version if isinstance(version, str) else platform.python_version()


async def _in_session(service, call, operation: str, arguments: dict) -> dict:
    session_id, result = await service.browse(
        session_id=call.params.get("session_id"),
        client_id=call.client_id,
        connection=call.context,
        operation=operation,
        arguments=arguments,
    )
    return dict(result, session_id=session_id)


def _class_name(params) -> str:
    name = params["class_name"]
    if not name.strip():
        raise invalid_parameter("class_name", "must not be empty")
    return name.strip()


def build_browse_commands(service) -> list[Command]:
    """The four browse commands, bound to C{service}."""

    async def list_classes(call) -> dict:
        params = call.params
        limit = params["limit"]
        if not 0 <= limit <= MAX_LIST_LIMIT:
            raise invalid_parameter("limit", f"must be between 0 and {MAX_LIST_LIMIT}, not {limit}")
        return await _in_session(
            service,
            call,
            "list_classes",
            {
                "pattern": params["pattern"] or "*",
                "include_system": params["include_system"],
                "limit": limit,
            },
        )

    async def browse_class(call) -> dict:
        params = call.params
        return await _in_session(
            service,
            call,
            "browse_class",
            {
                "class_name": _class_name(params),
                "include_methods": params["include_methods"],
                "include_instance_vars": params["include_instance_vars"],
                "include_class_vars": params["include_class_vars"],
            },
        )

    async def get_method(call) -> dict:
        params = call.params
        if not params["method_name"].strip():
            raise invalid_parameter("method_name", "must not be empty")
        return await _in_session(
            service,
            call,
            "get_method",
            {
                "class_name": _class_name(params),
                "method_name": params["method_name"].strip(),
                "is_class_method": params["is_class_method"],
            },
        )

    async def system_info(call) -> dict:
        info_type = call.params["info_type"].lower()
        if info_type not in INFO_TYPES:
            raise invalid_parameter(
                "info_type",
                f"must be one of {', '.join(INFO_TYPES)}, not {call.params['info_type'][:40]!r}",
            )
        await service.ready()
        if service.image is None:
            raise StuiError(
                "UnsupportedOperation",
                "system_info describes the live image, which is disabled on this server "
                "(image_enabled=false)",
            )
        return await service.image.browse("", "system_info", {"info_type": info_type})

    return [
        Command(
            "list_classes",
            list_classes,
            (
                SESSION_ID,
                CLIENT_ID,
                Param("pattern", "string", default="*", description="glob on the qualified name"),
                Param(
                    "include_system",
                    "boolean",
                    default=False,
                    description="every class of every loaded module, not only the session's",
                ),
                Param("limit", "integer", default=100, description=f"at most {MAX_LIST_LIMIT}"),
            ),
            "classes the session defined or imported (or all loaded ones)",
        ),
        Command(
            "browse_class",
            browse_class,
            (
                SESSION_ID,
                CLIENT_ID,
                Param("class_name", "string", True, description="dotted path or session name"),
                Param("include_methods", "boolean", default=True),
                Param("include_instance_vars", "boolean", default=True),
                Param("include_class_vars", "boolean", default=True),
            ),
            "what a class itself defines: methods with sources, variables",
        ),
        Command(
            "get_method",
            get_method,
            (
                SESSION_ID,
                CLIENT_ID,
                Param("class_name", "string", True),
                Param("method_name", "string", True),
                Param("is_class_method", "boolean", default=False),
            ),
            "one method with its source",
        ),
        Command(
            "system_info",
            system_info,
            (Param("info_type", "string", default="basic", description=", ".join(INFO_TYPES)),),
            "the image's Python, memory, packages, paths (never environment variables)",
        ),
    ]
