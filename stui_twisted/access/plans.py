"""Plans: named sets of features and limits per principal (access.md §2).

The C{--config} INI file may hold, beside C{[stui]}::

    [plans]
    default = free

    [plan:free]
    features = evaluate inspect complete browse events share
    max_sessions_per_client = 2

    [principals]
    alice = pro

L{parse_plans} turns those sections into an immutable L{Plans};
L{PlanBook} holds the current one, answers what a principal may do
(L{PlanBook.check}, L{PlanBook.limit}) and reloads the file on SIGHUP or
when the cleanup loop sees it changed (L{PlanBook.reload_if_changed}).  A
file that does not parse keeps the previous plans: the reason is logged and
L{PlanBook.reload_errors} counts it.

The feature table is by command name, so the dispatcher gates every
transport and Format A (whose requests map to the same commands) in one
place.
"""

from __future__ import annotations

import configparser
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from stui_twisted.access.sharing import DEBUG_COMMANDS
from stui_twisted.config import ConfigError, _positive_float, _positive_int
from stui_twisted.protocol.errors import StuiError
from stui_twisted.sessions.policy import CLIENT_ID_PATTERN

log = Logger()

ADMIN_COMMANDS = ("list_clients", "disconnect_client", "revoke_tokens", "list_all_sessions")

#: feature -> the commands it gates (access.md §2); a command in none is never gated.
FEATURE_COMMANDS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "evaluate": ("evaluate", "send_input", "get_evaluation"),
        "inspect": ("inspect",),
        "complete": ("complete",),
        "browse": ("list_classes", "browse_class", "get_method", "system_info"),
        "events": ("subscribe", "get_events"),
        "share": ("share_session", "unshare_session"),
        "debug": DEBUG_COMMANDS,
        "admin": ADMIN_COMMANDS,
    }
)
FEATURES = tuple(FEATURE_COMMANDS)
#: what C{features = all} means: every feature but admin.
ALL_BUT_ADMIN = frozenset(FEATURES) - {"admin"}

COMMAND_FEATURE: Mapping[str, str] = MappingProxyType(
    {command: feature for feature, commands in FEATURE_COMMANDS.items() for command in commands}
)

#: Commands no plan gates (access.md §2): session life-cycle and context, the
#: public ones, the plan questions themselves, C{unsubscribe} (stopping a
#: stream gives nothing away) and C{list_shared_sessions}.
NEVER_GATED = frozenset(
    {
        "ping",
        "describe",
        "authenticate",
        "whoami",
        "validate_feature_access",
        "create_session",
        "restore_session",
        "update_session_state",
        "close_session",
        "get_session_info",
        "list_client_sessions",
        "get_session_statistics",
        "save_context",
        "load_context",
        "get_context_summary",
        "clear_context",
        "interrupt",
        "unsubscribe",
        "list_shared_sessions",
    }
)

#: limit -> its parser (each falls back to the server-wide setting of that name).
LIMITS: Mapping[str, Callable[[str, Any], Any]] = MappingProxyType(
    {
        "max_sessions_per_client": _positive_int,
        "max_eval_timeout": _positive_float,
        "max_session_bytes": _positive_int,
        "history_limit": _positive_int,
        "create_rate_limit": _positive_int,
    }
)

#: The plan everybody has when the file has no C{[plans]} section.
IMPLICIT_PLAN = "default"


@dataclass(frozen=True)
class Plan:
    """A named set of features and the limits it sets (the others are server-wide)."""

    name: str
    features: frozenset[str]
    limits: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Plans:
    """One parsed configuration: the plans, the default plan, who has which."""

    plans: Mapping[str, Plan]
    default: str
    principals: Mapping[str, str]
    configured: bool
    """Whether the file had a C{[plans]} section (else: everything but admin for all)."""

    def plan_of(self, client_id: str | None) -> Plan:
        """The plan C{client_id} is mapped to (the default plan for anyone else)."""
        return self.plans[self.principals.get(client_id, self.default)]


UNCONFIGURED = Plans(
    plans=MappingProxyType({IMPLICIT_PLAN: Plan(IMPLICIT_PLAN, ALL_BUT_ADMIN)}),
    default=IMPLICIT_PLAN,
    principals=MappingProxyType({}),
    configured=False,
)


def _words(text: str) -> list[str]:
    return [word for word in re.split(r"[,\s]+", text) if word]


def _features(where: str, text: str) -> frozenset[str]:
    features: set[str] = set()
    for word in _words(text):
        name = word.lower()
        if name == "all":
            features |= ALL_BUT_ADMIN
        elif name in FEATURE_COMMANDS:
            features.add(name)
        else:
            raise ConfigError(
                f"{where}: unknown feature {word!r}; known features: "
                f"{', '.join(FEATURES)}, or all (every feature but admin)"
            )
    return frozenset(features)


def parse_plans(parser: configparser.ConfigParser, source: str) -> Plans:
    """The plans of a parsed INI file, checked; L{ConfigError} names the bad key.

    The parser must keep key case (C{optionxform = str}): principals are
    client ids, and client ids are case-sensitive.
    """
    plan_sections = [s for s in parser.sections() if s.lower().startswith("plan:")]
    if not parser.has_section("plans"):
        stray = plan_sections + (["principals"] if parser.has_section("principals") else [])
        if stray:
            raise ConfigError(f"{source}: [{stray[0]}] needs a [plans] section with default = PLAN")
        return UNCONFIGURED
    plans: dict[str, Plan] = {}
    for section in plan_sections:
        name = section.split(":", 1)[1].strip()
        where = f"{source}: [{section}]"
        if not name:
            raise ConfigError(f"{where}: a plan needs a name ([plan:NAME])")
        features: frozenset[str] | None = None
        limits: dict[str, Any] = {}
        for key, value in parser.items(section):
            option = key.strip().lower().replace("-", "_")
            if option == "features":
                features = _features(f"{where} features", value)
            elif option in LIMITS:
                try:
                    limits[option] = LIMITS[option](option, value)
                except ConfigError as exc:
                    message = str(exc).removeprefix("--")
                    raise ConfigError(f"{where} {key} = {value}: {message}") from None
            else:
                raise ConfigError(
                    f"{where}: unknown key {key!r}; a plan takes features and {', '.join(LIMITS)}"
                )
        if features is None:
            raise ConfigError(f"{where}: features = ... is required (e.g. features = all)")
        plans[name] = Plan(name, features, MappingProxyType(limits))
    default = None
    for key, value in parser.items("plans"):
        if key.strip().lower() != "default":
            raise ConfigError(f"{source}: [plans]: unknown key {key!r}; it takes default = PLAN")
        default = value.strip()
    if not default:
        raise ConfigError(f"{source}: [plans] needs default = PLAN")
    known = ", ".join(sorted(plans)) or "none"
    if default not in plans:
        raise ConfigError(
            f"{source}: [plans] default = {default}: no [plan:{default}] (plans: {known})"
        )
    principals: dict[str, str] = {}
    if parser.has_section("principals"):
        for client_id, value in parser.items("principals"):
            plan = value.strip()
            if not CLIENT_ID_PATTERN.fullmatch(client_id):
                raise ConfigError(f"{source}: [principals] {client_id!r} is not a client id")
            if plan not in plans:
                raise ConfigError(
                    f"{source}: [principals] {client_id} = {plan}: no [plan:{plan}] "
                    f"(plans: {known})"
                )
            principals[client_id] = plan
    return Plans(MappingProxyType(plans), default, MappingProxyType(principals), True)


def plans_parser() -> configparser.ConfigParser:
    """An INI parser for the plans sections: keys keep their case, C{;} ends a value."""
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";", "#"))
    parser.optionxform = str  # principals are case-sensitive client ids
    return parser


def file_signature(path: str) -> tuple | None:
    """What changes when the file is edited or replaced (C{None}: it cannot be read)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def read_plans(path: str) -> tuple[Plans, tuple | None]:
    """Read and check the plans of the INI file C{path} (blocking: call it in a thread).

    @return: the plans and the file's signature as it was read.
    @raise ConfigError: the file cannot be read, is not INI, or its plans are wrong.
    """
    signature = file_signature(path)
    parser = plans_parser()
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except (configparser.Error, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not a valid INI file: {exc}") from None
    return parse_plans(parser, path), signature


def _in_thread(f, *args):
    from twisted.internet import threads

    return threads.deferToThread(f, *args)


class PlanBook:
    """The current plans, what they allow, and their reload.

    @param settings: the server-wide limits each plan limit falls back to.
    @param path: the C{--config} file the plans come from (C{None}: no file,
        nothing to reload).
    @param plans: the plans already read at start-up (default L{UNCONFIGURED}).
    @param auth_enabled: with auth off everybody has the default plan (client
        ids are claims) and C{admin} is never granted.
    @param run_blocking: how the file is read off the reactor thread
        (C{deferToThread}; tests run it in place).
    """

    def __init__(
        self,
        settings,
        *,
        path: str | None = None,
        plans: Plans = UNCONFIGURED,
        signature: tuple | None = None,
        auth_enabled: bool | None = None,
        run_blocking: Callable[..., defer.Deferred] = _in_thread,
    ) -> None:
        self.settings = settings
        self.path = os.path.abspath(path) if path else None
        self.current = plans
        self.auth_enabled = bool(settings.auth_file) if auth_enabled is None else auth_enabled
        self.reload_errors = 0
        self.reloads = 0
        self._signature = signature
        self._run_blocking = run_blocking
        self._lock = defer.DeferredLock()

    # -- what a principal may do

    def plan_for(self, client_id: str | None) -> Plan:
        """The plan C{client_id} acts under (admin left out when auth is off)."""
        if not self.auth_enabled:
            plan = self.current.plans[self.current.default]
            if "admin" in plan.features:
                return Plan(plan.name, plan.features - {"admin"}, plan.limits)
            return plan
        return self.current.plan_of(client_id)

    def check(self, command: str, client_id: str | None) -> None:
        """Raise C{PermissionDenied} when C{command} is gated by a feature C{client_id} lacks."""
        feature = COMMAND_FEATURE.get(command)
        if feature is None:
            return
        plan = self.plan_for(client_id)
        if feature in plan.features:
            return
        raise StuiError(
            "PermissionDenied",
            f"{command!r} needs the feature {feature!r}, which the plan {plan.name!r} "
            "does not include",
            feature=feature,
            plan=plan.name,
            command=command,
        )

    def limit(self, client_id: str | None, name: str) -> Any:
        """C{client_id}'s value of the limit C{name}: its plan's, else the server-wide one.

        A plan's C{max_session_bytes} cannot go beyond the server-wide one: the
        store refuses larger records whoever writes them.
        """
        server = getattr(self.settings, name)
        value = self.plan_for(client_id).limits.get(name, server)
        return min(value, server) if name == "max_session_bytes" else value

    def limits_for(self, client_id: str | None) -> dict:
        """Every plan limit of C{client_id}, as C{whoami} shows them."""
        return {name: self.limit(client_id, name) for name in LIMITS}

    # -- reloading

    def reload(self) -> defer.Deferred:
        """Re-read the file now; fires with whether the new plans were taken.

        A file that is wrong keeps the previous plans; the reason is logged
        and counted in L{reload_errors}.  The Deferred never fails.
        """
        return self._lock.run(self._reload)

    async def _reload(self) -> bool:
        if self.path is None:
            log.info("plans: no --config file, nothing to reload")
            return False
        try:
            plans, signature = await self._run_blocking(read_plans, self.path)
        except ConfigError as exc:
            self._signature = file_signature(self.path)  # counted once per bad version
            self.reload_errors += 1
            log.error("plans not reloaded, the previous ones stay in force: {error}", error=exc)
            return False
        self.current, self._signature = plans, signature
        self.reloads += 1
        log.info(
            "plans reloaded from {path}: {count} plans, {principals} principals",
            path=self.path,
            count=len(plans.plans) if plans.configured else 0,
            principals=len(plans.principals),
        )
        return True

    def reload_if_changed(self) -> defer.Deferred:
        """Reload when the file changed since it was last read (one C{stat})."""
        if self.path is None or file_signature(self.path) == self._signature:
            return defer.succeed(False)
        return self.reload()
