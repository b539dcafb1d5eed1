"""The image side of the browse tools (stui-compat.md §3): classes, methods, system facts.

Python meanings of STUI's class browser.  Everything here reads; nothing
changes the session.  Sources of classes a session defined come from the
session's own cells (the workspace keeps each top-level C{class}/C{def}
statement's source, also across restarts), so they are there when
C{inspect.getsource} has no file to read.

Never reports environment variables: they hold secrets.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib
import importlib.metadata
import inspect
import os
import platform
import sys
import textwrap
import time
import types
from typing import Any

from stui_twisted.protocol.errors import StuiError

STARTED_AT = time.time()
MAX_LIST_LIMIT = 10_000
MAX_OBJECT_METHODS = 500
INFO_TYPES = ("basic", "memory", "packages", "environment", "all")

#: Modules of the server/image machinery and of other sessions: never listed.
_HIDDEN_MODULE_PREFIXES = ("stui_twisted", "stui_workspace_")


def _iso(seconds: float) -> str:
    from stui_twisted.protocol.envelope import iso_timestamp

    return iso_timestamp(seconds)


# -- finding classes ------------------------------------------------------


def _session_classes(workspace) -> dict[int, tuple[str, type]]:
    found = {}
    for name, value in list(workspace.namespace.items()):
        if type(value) is not type and not issubclass(type(value), type):
            continue  # type(), not isinstance(): a user __class__ property may raise
        if isinstance(name, str) and not name.startswith("__"):
            found[id(value)] = (_qualified(workspace, value), value)
    return found


def _is_session_class(workspace, cls: type) -> bool:
    return cls.__module__ in ("__main__", workspace.module_name) and (
        workspace.namespace.get(cls.__name__) is cls
        or workspace.definition_source(cls.__name__, cls) is not None
    )


def _qualified(workspace, cls: type) -> str:
    if _is_session_class(workspace, cls) or cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def find_class(workspace, class_name: str) -> type:
    """The class C{class_name} names: a namespace binding (dotted) or a module path."""
    if not class_name or not all(part.isidentifier() for part in class_name.split(".")):
        raise _class_not_found(class_name)
    head, *rest = class_name.split(".")
    target: Any = None
    if head in workspace.namespace:
        target = workspace.resolve(class_name)
    elif not rest and hasattr(__import__("builtins"), head):
        target = getattr(__import__("builtins"), head)
    else:
        target = _from_module(class_name)
    if not isinstance(target, type):
        raise _class_not_found(class_name)
    return target


def _from_module(dotted: str) -> Any:
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        if module_name.startswith(_HIDDEN_MODULE_PREFIXES):
            return None
        module = sys.modules.get(module_name)
        if module is None:
            try:
                module = importlib.import_module(module_name)
            except Exception:  # noqa: BLE001 - any import failure means "no such class"
                continue
        target: Any = module
        for part in parts[cut:]:
            target = getattr(target, part, None)
        return target
    return None


def _class_not_found(class_name: str) -> StuiError:
    return StuiError(
        "ClassNotFound",
        f"no class {class_name[:200]!r}: give a dotted path (collections.OrderedDict) "
        "or a name bound in the session",
        class_name=class_name[:200],
    )


# -- describing -----------------------------------------------------------


def class_info(workspace, cls: type) -> dict:
    """ClassInfo: name, superclass, comment, package, is_system."""
    bases = [base for base in cls.__bases__ if base is not object]
    session = _is_session_class(workspace, cls)
    return {
        "name": _qualified(workspace, cls),
        "superclass": None
        if cls is object
        else _qualified(workspace, bases[0] if bases else object),
        "comment": inspect.getdoc(cls) or "" if "__doc__" in cls.__dict__ else "",
        "package": cls.__module__ if not session else "__main__",
        "is_system": not session,
    }


def _class_source(workspace, cls: type) -> str | None:
    if _is_session_class(workspace, cls):
        return workspace.definition_source(cls.__name__, cls)
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):
        return None


def _class_node(source: str | None, name: str) -> ast.ClassDef | None:
    if not source:
        return None
    try:
        tree = ast.parse(textwrap.dedent(source))
    except SyntaxError:
        return None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    return None


def _method_source(class_source: str | None, node: ast.ClassDef | None, name: str) -> str | None:
    if node is None:
        return None
    lines = textwrap.dedent(class_source).splitlines()
    for item in node.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name == name:
            first = min([item.lineno] + [d.lineno for d in item.decorator_list])
            return textwrap.dedent("\n".join(lines[first - 1 : item.end_lineno])) + "\n"
    return None


def _arguments(function: Any) -> list[str]:
    try:
        return list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return []


def _category(raw: Any) -> str | None:
    if isinstance(raw, classmethod):
        return "class"
    if isinstance(raw, staticmethod):
        return "static"
    if isinstance(raw, property):
        return "property"
    if callable(raw) or isinstance(
        raw,
        types.MethodDescriptorType | types.WrapperDescriptorType | types.ClassMethodDescriptorType,
    ):
        return "class" if isinstance(raw, types.ClassMethodDescriptorType) else "instance"
    return None


def method_info(workspace, cls: type, name: str, raw: Any, class_source=None, node=None) -> dict:
    """MethodInfo of C{raw}, the attribute C{name} in a class C{__dict__}."""
    category = _category(raw)
    function = raw.__func__ if isinstance(raw, classmethod | staticmethod) else raw
    if isinstance(raw, property):
        function = raw.fget
    source = _method_source(class_source, node, name)
    if source is None and not _is_session_class(workspace, cls):
        try:
            source = inspect.getsource(function)
        except (OSError, TypeError):
            source = None
    return {
        "name": name,
        "source": source,
        "category": category,
        "is_class_method": category == "class",
        "arguments": _arguments(function),
        "comment": inspect.getdoc(function) or "" if getattr(function, "__doc__", None) else "",
    }


def _instance_vars(cls: type, node: ast.ClassDef | None) -> list[str]:
    names: list[str] = []
    slots = cls.__dict__.get("__slots__", ())
    if isinstance(slots, str):
        slots = (slots,)
    names.extend(slot for slot in slots if isinstance(slot, str))
    names.extend(name for name in cls.__dict__.get("__annotations__", {}) if isinstance(name, str))
    if node is not None:
        for item in ast.walk(node):
            targets = []
            if isinstance(item, ast.Assign):
                targets = item.targets
            elif isinstance(item, ast.AnnAssign | ast.AugAssign):
                targets = [item.target]
            for target in targets:
                if (
                    isinstance(target, ast.Attribute)
                    and isinstance(target.value, ast.Name)
                    and target.value.id == "self"
                ):
                    names.append(target.attr)
    return list(dict.fromkeys(names))


def browse_class(
    workspace,
    class_name: str,
    include_methods: bool = True,
    include_instance_vars: bool = True,
    include_class_vars: bool = True,
) -> dict:
    """What C{class_name} itself defines: methods, instance and class variables."""
    cls = find_class(workspace, class_name)
    class_source = _class_source(workspace, cls)
    node = _class_node(class_source, cls.__name__)
    instance_methods, class_methods = [], []
    instance_vars = _instance_vars(cls, node) if include_instance_vars else []
    class_vars = []
    for name, raw in list(cls.__dict__.items()):
        if not isinstance(name, str):
            continue
        category = _category(raw)
        if category is None:
            if not (name.startswith("__") and name.endswith("__")) and name not in instance_vars:
                class_vars.append(name)
            continue
        if not include_methods:
            continue
        info = method_info(workspace, cls, name, raw, class_source, node)
        (class_methods if category in ("class", "static") else instance_methods).append(info)
    return {
        "class_info": class_info(workspace, cls),
        "instance_methods": instance_methods,
        "class_methods": class_methods,
        "instance_vars": instance_vars,
        "class_vars": sorted(class_vars) if include_class_vars else None,
    }


def get_method(workspace, class_name: str, method_name: str, is_class_method: bool = False) -> dict:
    """MethodInfo of C{class_name.method_name} (the class's own, else an inherited one)."""
    cls = find_class(workspace, class_name)
    for owner in cls.__mro__:
        raw = owner.__dict__.get(method_name)
        if raw is not None and _category(raw) is not None:
            class_source = _class_source(workspace, owner)
            node = _class_node(class_source, owner.__name__)
            return {
                "method": method_info(workspace, owner, method_name, raw, class_source, node),
                "class_name": _qualified(workspace, owner),
            }
    raise StuiError(
        "MethodNotFound",
        f"class {class_name[:200]!r} has no method {method_name[:200]!r}",
        class_name=class_name[:200],
        method_name=method_name[:200],
        is_class_method=bool(is_class_method),
    )


def list_classes(
    workspace, pattern: str = "*", include_system: bool = False, limit: int = 100
) -> dict:
    """ClassInfo of the classes whose qualified name matches the glob C{pattern}."""
    found = _session_classes(workspace)
    if include_system:
        for module_name, module in list(sys.modules.items()):
            if module is None or module_name.startswith(_HIDDEN_MODULE_PREFIXES):
                continue
            try:
                members = list(vars(module).values())
            except TypeError:
                continue
            for value in members:
                if (
                    issubclass(type(value), type)
                    and value.__dict__.get("__module__", getattr(value, "__module__", None))
                    == module_name
                ):
                    found.setdefault(id(value), (_qualified(workspace, value), value))
    matching = sorted(
        ((name, cls) for name, cls in found.values() if fnmatch.fnmatchcase(name, pattern)),
        key=lambda pair: pair[0],
    )
    return {
        "classes": [class_info(workspace, cls) for _, cls in matching[:limit]],
        "total_count": len(matching),
        "truncated": len(matching) > limit,
    }


# -- the system -----------------------------------------------------------


def _memory() -> dict:
    rss = None
    try:
        with open("/proc/self/statm") as statm:
            rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    free = None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        free = None
    return {"memory_used": rss, "memory_free": free, "rss_bytes": rss}


def _packages() -> dict:
    packages = {}
    for distribution in importlib.metadata.distributions():
        name = distribution.metadata.get("Name")
        if name:
            packages.setdefault(name, distribution.version)
    return {
        "packages": [
            {"name": name, "version": packages[name]} for name in sorted(packages, key=str.lower)
        ]
    }


def system_info(workspace, info_type: str = "basic") -> dict:
    """Facts about the image; C{info_type} one of L{INFO_TYPES}.  No environment variables."""
    info_type = (info_type or "basic").lower()
    if info_type not in INFO_TYPES:
        raise StuiError(
            "InvalidRequest",
            f"parameter 'info_type' must be one of {', '.join(INFO_TYPES)}, not {info_type[:40]!r}",
            parameter="info_type",
        )
    info: dict = {}
    if info_type in ("basic", "all"):
        info.update(
            {
                "python_version": platform.python_version(),
                "implementation": platform.python_implementation(),
                "platform": platform.platform(),
                "image_pid": os.getpid(),
                "image_started_at": _iso(STARTED_AT),
                "pharo_version": platform.python_version(),
            }
        )
    if info_type in ("memory", "all"):
        info.update(_memory())
    if info_type in ("packages", "all"):
        info.update(_packages())
    if info_type in ("environment", "all"):
        info.update({"executable": sys.executable, "cwd": os.getcwd(), "sys_path": list(sys.path)})
    return {"info_type": info_type, "info": info}


def object_facts(target: Any) -> dict:
    """What Format A's Inspect adds to an inspection: the hash and the method names."""
    try:
        value = hash(target)
    except Exception:  # noqa: BLE001 - unhashable, or a user __hash__ that raises
        value = None
    methods = []
    try:
        names = dir(target)
    except Exception:  # noqa: BLE001 - a user __dir__ may raise anything
        names = []
    for name in names:
        if len(methods) >= MAX_OBJECT_METHODS:
            break
        try:
            raw = inspect.getattr_static(target, name)
            if callable(raw) or isinstance(raw, classmethod | staticmethod):
                methods.append(name)
        except AttributeError:
            continue
    return {"hash": value, "methods": methods}


OPERATIONS = {
    "list_classes": list_classes,
    "browse_class": browse_class,
    "get_method": get_method,
    "system_info": system_info,
}


def run(workspace, operation: str, arguments: dict) -> dict:
    """Run one browse operation (the L{amp_commands.Browse} responder's work)."""
    function = OPERATIONS.get(operation)
    if function is None:
        raise StuiError("UnsupportedOperation", f"unknown browse operation {operation[:40]!r}")
    return function(workspace, **arguments)
