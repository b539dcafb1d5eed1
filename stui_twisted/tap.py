"""The C{twistd stui} plugin's options and service tree.

L{Options} parses and checks the command line (and C{--config});
L{makeService} only assembles services.  Nothing here opens a socket,
starts a thread or spawns a process: those happen in C{startService} because
C{twistd} daemonizes (forks) after C{makeService}.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys

from twisted.application import internet, service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import usage

from stui_twisted.config import OPTIONS, ConfigError, build_settings, read_ini, shown_default
from stui_twisted.settings import Settings
from stui_twisted.transports.listener import ListenerService

log = Logger()


JOURNAL_COMPACT_DELAY_VARIABLE = "STUI_JOURNAL_COMPACT_DELAY"
"""Internal, for tests: seconds without a flush before the group journal is compacted
(default: three flush intervals, C{journal.DELAY_PER_FLUSH_INTERVAL}).  A test that kills the server before compaction sets
it large (docs/reliability.md, "The group journal")."""


def journal_compact_delay(settings: Settings) -> float:
    """The group journal's idle delay: C{STUI_JOURNAL_COMPACT_DELAY}, or 3 flush intervals."""
    from stui_twisted.storage.journal import DELAY_PER_FLUSH_INTERVAL

    value = os.environ.get(JOURNAL_COMPACT_DELAY_VARIABLE)
    if not value:
        return DELAY_PER_FLUSH_INTERVAL * settings.flush_interval
    try:
        delay = float(value)
    except ValueError:
        delay = -1.0
    if not delay > 0:
        raise ConfigError(f"{JOURNAL_COMPACT_DELAY_VARIABLE}={value!r}: not a positive number")
    return delay


class Options(usage.Options):
    """Command-line options of C{twistd stui}."""

    # no synopsis: twistd already prints "Usage: twistd [options] stui [options]"
    longdesc = (
        "Serve durable STUI sessions over line-JSON TCP/TLS and ZeroMQ, with a "
        "supervised live Python image. Defaults: TCP tcp:7555:interface=127.0.0.1, "
        "ZeroMQ tcp://127.0.0.1:5555, TLS off, data in ./stui-data."
    )
    optFlags = [
        ["insecure-no-auth", None, "allow non-loopback listeners without --auth-file"],
        [
            "check-config",
            None,
            "check the configuration (--config file and options, TLS files, --auth-file) "
            "and exit: 0 if it is good, 1 with the reason",
        ],
    ]
    optParameters = [
        [
            "config",
            "c",
            None,
            "INI file: a [stui] section of options, and plans ([plans], [plan:NAME], "
            "[principals]; reloaded on SIGHUP); see etc/stui.ini",
        ]
    ] + [
        [name, None, None, f"{help_text} [default: {shown_default(getattr(Settings(), field))}]"]
        for name, (field, _parse, help_text) in OPTIONS.items()
    ]

    def opt_version(self) -> None:
        """Display the stui-twisted and Twisted versions and exit."""
        from stui_twisted import PROTOCOL_VERSION, SERVER_NAME, __version__
        from twisted import copyright

        print(f"{SERVER_NAME} {__version__} (protocol {PROTOCOL_VERSION})")
        print(f"Twisted version: {copyright.version}")
        sys.exit(0)

    def postOptions(self) -> None:  # noqa: N802
        """Merge defaults < --config < flags into C{self.settings}; refuse bad values."""
        try:
            file_values = read_ini(self["config"]) if self["config"] else {}
            flags = {name: self[name] for name in OPTIONS}
            self.settings = build_settings(
                file_values, flags, bool(self["insecure-no-auth"]), source=self["config"]
            )
            self.plans = start_plans(self.settings, self["config"])
            if self["check-config"]:
                check_resources(self.settings)
        except ConfigError as exc:
            if self["check-config"]:
                raise SystemExit(f"twistd stui: configuration error: {exc}") from None
            raise usage.UsageError(str(exc)) from None
        if self["check-config"]:
            where = f"{self['config']} and the options" if self["config"] else "the options"
            print(f"twistd stui: configuration OK ({where})")
            sys.exit(0)


def start_plans(settings: Settings, path: str | None):
    """The L{PlanBook} of the C{--config} file's plans; a wrong plan stops start-up."""
    from stui_twisted.access.plans import PlanBook, read_plans

    if not path:
        return PlanBook(settings)
    try:
        plans, signature = read_plans(path)
    except ConfigError as exc:
        raise ConfigError(f"--config: {exc}") from None
    return PlanBook(settings, path=path, plans=plans, signature=signature)


def check_resources(settings: Settings) -> None:
    """What start-up would read besides the options: TLS files, the password file.

    Nothing is bound, started or written.  Raises L{ConfigError} naming the option.
    """
    from twisted.internet import reactor

    if settings.tls.lower() != "none":
        tls_endpoint(reactor, settings.tls)
    if settings.auth_file:
        from stui_twisted.access.auth import Authenticator
        from stui_twisted.access.passwd import PasswordFileError

        try:
            Authenticator(settings, reactor).load()
        except PasswordFileError as exc:
            raise ConfigError(f"--auth-file: {exc}") from None
    if os.path.exists(settings.data_dir) and not os.path.isdir(settings.data_dir):
        raise ConfigError(f"--data-dir: {settings.data_dir} exists and is not a directory")


def tls_endpoint(reactor, description: str):
    """The C{--tls} endpoint; a bad description or unreadable file is a L{ConfigError}."""
    from OpenSSL.SSL import Error as SSLError

    from stui_twisted.transports.tls import TLSConfigError, server_endpoint

    try:
        return server_endpoint(reactor, description)
    except TLSConfigError as exc:
        raise ConfigError(str(exc)) from None
    except OSError as exc:
        raise ConfigError(f"--tls: cannot read {exc.filename}: {exc.strerror}") from None
    except (ValueError, SSLError) as exc:
        raise ConfigError(f"--tls: {description!r}: {exc}") from None


class StartupFailed(SystemExit, Exception):
    """Start-up cannot go on; the reason is already logged, in one line.

    An C{Exception}, so twistd's runner treats it as a failed start (it
    reports it to the waiting parent of a daemon, which exits 1, and removes
    the pidfile); a C{SystemExit}, so the interpreter then exits with status 1
    without printing a traceback.  Raised before any thread is started, so
    nothing keeps the process alive.
    """

    def __init__(self, message: str) -> None:
        super().__init__(1)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _listen_failure(option: str, child, exc: Exception) -> tuple[str, str]:
    """Why a bind failed: (the log line, a short form for a daemon's parent).

    Both name the option and the address; the short form fits the 100 bytes
    twistd passes from a failed daemon to the parent that waits for it.
    """
    import zmq
    from twisted.internet.error import CannotListenError

    value = getattr(child, "description", None) or getattr(child, "url", "")
    if isinstance(exc, CannotListenError):
        address = f"{exc.interface or '*'}:{exc.port}"
        reason = getattr(exc.socketError, "strerror", None) or str(exc.socketError)
    else:
        address = getattr(child, "url", value)
        reason = zmq.strerror(exc.errno) if isinstance(exc, zmq.ZMQError) else str(exc)
    line = f"start-up failed: {option}={value}: cannot listen on {address}: {reason}"
    return line, f"{option} {address}: {reason}"


class ServerRoot(service.MultiService):
    """The root of the service tree: a listener that cannot bind stops start-up.

    Every listener (TCP, TLS, metrics and ZeroMQ) binds in
    C{privilegedStartService}, which twistd runs after daemonizing and before
    any C{startService}: no thread, image or timer exists yet.  A bind that
    fails is logged as one line naming the option and the address, and the
    process exits with status 1 at once (L{StartupFailed}), instead of a
    traceback or a server that runs without one of its listeners.
    """

    def __init__(self) -> None:
        super().__init__()
        # (option, value, check): run first in startService, after twistd has
        # dropped privileges (so nothing is created as root) and before any thread
        self.start_checks: list = []
        # called first in stopService, while every connection is still open
        self.stop_hooks: list = []

    def startService(self) -> None:  # noqa: N802
        from stui_twisted.storage.errors import StorageFailure

        for option, value, check in self.start_checks:
            try:
                check()
            except (StorageFailure, OSError) as exc:
                log.critical(
                    "start-up failed: {option}={value}: {error}",
                    option=option,
                    value=value,
                    error=exc,
                )
                raise StartupFailed(f"{option} {value}: {exc}") from None
        super().startService()

    def stopService(self):  # noqa: N802
        for hook in self.stop_hooks:
            hook()
        return super().stopService()

    def privilegedStartService(self) -> None:  # noqa: N802
        service.Service.privilegedStartService(self)
        for child in self:
            try:
                child.privilegedStartService()
            except Exception as exc:
                if not (isinstance(child, ListenerService) or hasattr(child, "url")):
                    raise
                option = f"--{child.name}" if child.name in OPTIONS else str(child.name)
                line, short = _listen_failure(option, child, exc)
                log.critical("{message}", message=line)
                raise StartupFailed(short) from None


class StopInOrder(service.MultiService):
    """Children start in the order added and stop in reverse, one after another.

    Twisted's C{MultiService} stops its children all at once; the session core
    needs each stopped before the next: the cleanup and flush timers (their
    running call finished), then the session service (its final flush), and
    only then the image, so no request in flight loses its image before the
    flush that records it.
    """

    def stopService(self) -> defer.Deferred:  # noqa: N802
        service.Service.stopService(self)
        return defer.ensureDeferred(self._stop_each())

    async def _stop_each(self) -> None:
        for child in reversed(list(self)):
            try:
                await defer.maybeDeferred(child.stopService)
            except Exception:
                log.failure("stopping {service} failed", service=child.name or child)


def build_session_core(
    settings: Settings, reactor, store, image=None, connections=None, plans=None
):
    """The session service with its image and timers; returns (core, session service).

    The core's children, in start order: the image (when enabled), the
    session service, the cleanup timer and (C{batch} durability) the flush
    timer.  L{StopInOrder} stops them in reverse, each after the one before.
    The cleanup timer also reloads the plans (C{plans}, a L{PlanBook}) when
    their file changed.
    """
    from stui_twisted.sessions.service import SessionService

    core = StopInOrder()
    core.setName("sessions")  # the session part of the tree, as operators know it
    if image is not None:
        image.setName("image")
        image.setServiceParent(core)
    sessions = SessionService(
        settings, reactor=reactor, store=store, image=image, connections=connections, plans=plans
    )
    sessions.setName("sessions")
    sessions.setServiceParent(core)

    async def cleanup_tick() -> None:
        await sessions.plans.reload_if_changed()  # never fails: a bad file is logged, counted
        await sessions.cleanup_tick()

    cleanup = internet.TimerService(settings.cleanup_interval, cleanup_tick)
    cleanup.clock = reactor
    cleanup.setName("cleanup")
    cleanup.setServiceParent(core)
    if settings.durability == "batch":
        flush = internet.TimerService(settings.flush_interval, sessions.flush_tick)
        flush.clock = reactor
        flush.setName("flush")
        flush.setServiceParent(core)
    return core, sessions


def build_postgres_store(settings: Settings, reactor):
    """The PostgreSQL session store of C{--store=postgresql:DSN}."""
    from stui_twisted.settings import node_id_of
    from stui_twisted.storage.postgres import PostgresSessionStore

    return PostgresSessionStore(
        settings.store[len("postgresql:") :],
        reactor=reactor,
        secret_file=settings.secret_file or os.path.join(settings.data_dir, "secret.key"),
        node_id=node_id_of(settings),
        advertise=settings.advertise,
        lease_interval=settings.lease_interval,
        max_session_bytes=settings.max_session_bytes,
    )


def build_server(settings: Settings, reactor, plans=None) -> tuple[service.MultiService, object]:
    """The whole service tree for C{settings}; returns (root, session service).

    @param plans: the L{stui_twisted.access.plans.PlanBook} of the C{--config}
        file (default: no plans, every feature but admin for everybody).
    """
    from stui_twisted.access.plans import PlanBook
    from stui_twisted.dispatch.commands import build_commands
    from stui_twisted.dispatch.dispatcher import Dispatcher
    from stui_twisted.storage.store import SessionStore
    from stui_twisted.transports.connections import ConnectionRegistry
    from stui_twisted.transports.fdlimit import FdGuardedFactory, FdReserve
    from stui_twisted.transports.linejson import InputBudget, LineJSONFactory
    from stui_twisted.transports.tls import server_endpoint

    root = ServerRoot()
    connections = ConnectionRegistry(settings.max_connections, clock=reactor)
    plans = plans if plans is not None else PlanBook(settings)
    fd_reserve = FdReserve(reactor, connections)
    fd_reserve.setServiceParent(root)  # first: raises the open-files limit
    if settings.store.startswith("postgresql:"):
        store = build_postgres_store(settings, reactor)
        root.start_checks.append(("--store", store.where, store.check))
    else:
        store = SessionStore(
            settings.data_dir,
            reactor=reactor,
            max_session_bytes=settings.max_session_bytes,
            journal_compact_delay=journal_compact_delay(settings),
        )
        root.start_checks.append(("--data-dir", settings.data_dir, store.check))
    image = None
    if settings.image_enabled:
        from stui_twisted.image.supervisor import ImageSupervisor

        image = ImageSupervisor(
            reactor,
            max_binding_bytes=settings.max_session_bytes,
            python=settings.image_python or sys.executable,
            user=settings.image_user,
            state_dir=settings.data_dir,
        )
    core, sessions = build_session_core(settings, reactor, store, image, connections, plans)
    core.setServiceParent(root)

    authenticator = None
    if settings.auth_file:
        from stui_twisted.access.auth import Authenticator
        from stui_twisted.access.passwd import PasswordFileError

        authenticator = Authenticator(settings, reactor)
        try:
            authenticator.load()  # fail now, with the file's name, not at the first login
        except PasswordFileError as exc:
            raise SystemExit(f"twistd stui: --auth-file: {exc}") from None
        authenticator.setServiceParent(root)  # before the listeners: started first
    dispatcher = Dispatcher(clock=reactor, auth=authenticator, plans=plans)
    dispatcher.register_all(build_commands(sessions, dispatcher, authenticator))
    from stui_twisted.events.commands import build_event_commands
    from stui_twisted.events.hub import EventHub

    sessions.events = EventHub(
        reactor,
        settings.data_dir,
        durability=settings.durability,
        log_limit=settings.event_log_limit,
        log_bytes=settings.event_log_bytes,
        pending_events=settings.event_pending_events,
        pending_bytes=settings.event_pending_bytes,
        flush_interval=settings.flush_interval,
    )
    dispatcher.register_all(build_event_commands(sessions, sessions.events))
    from stui_twisted.events.presence import Presence
    from stui_twisted.sessions.policy import CLIENT_ID_PATTERN

    presence = Presence(sessions.events, valid=CLIENT_ID_PATTERN.fullmatch)
    dispatcher.addClientObserver(presence.note)
    root.stop_hooks.append(sessions.events.server_stopping)

    input_budget = InputBudget(settings.max_partial_input_bytes)  # TCP and TLS share it
    for name in ("tcp", "tls"):
        description = getattr(settings, name)
        if description.lower() == "none":
            continue
        factory = LineJSONFactory(
            dispatcher,
            transport_name=name,
            max_message_bytes=settings.max_message_bytes,
            max_pending=settings.max_pending_per_connection,
            unauthenticated_idle_timeout=settings.unauthenticated_idle_timeout,
            idle_timeout=settings.connection_idle_timeout,
            input_budget=input_budget,
            registry=connections,
        )
        if name == "tls":
            try:
                endpoint = tls_endpoint(reactor, description)
            except ConfigError as exc:
                raise SystemExit(f"twistd stui: {exc}") from None
        else:
            endpoint = server_endpoint(reactor, description)
        listener = ListenerService(
            name, endpoint, FdGuardedFactory(factory, fd_reserve), description
        )
        listener.setName(name)
        listener.setServiceParent(root)
    if settings.zmq.lower() != "none":
        from stui_twisted.transports.zmqrouter import ZmqRouterService

        zmq_service = ZmqRouterService(
            settings.zmq,
            dispatcher,
            max_message_bytes=settings.max_message_bytes,
            registry=connections,
        )
        zmq_service.setName("zmq")
        zmq_service.setServiceParent(root)
    if settings.metrics.lower() != "none":
        from stui_twisted.ops.metrics import build_registry, metrics_site

        registry = build_registry(sessions, dispatcher, connections)
        metrics = ListenerService(
            "metrics",
            server_endpoint(reactor, settings.metrics),
            metrics_site(registry),
            settings.metrics,
        )
        metrics.setName("metrics")
        metrics.registry = registry
        metrics.setServiceParent(root)
    return root, sessions


class CleanExitOnSigterm(service.Service):
    """Make SIGTERM (and SIGINT, Ctrl-C) a clean shutdown that exits with status 0.

    twistd's own handler stops the reactor and then re-raises the signal so the
    process dies "by signal"; service managers and shell scripts read that as
    a failure.  This handler stops the reactor the same orderly way (every
    service's C{stopService} runs, sessions are flushed) and lets twistd exit 0.
    A SIGINT that was ignored when the server started (a background job of a
    non-interactive shell) stays ignored.
    """

    def __init__(self, reactor) -> None:
        self._reactor = reactor

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self._reactor.callWhenRunning(self._install)

    def _install(self) -> None:
        signal.signal(signal.SIGTERM, self._terminate)
        if signal.getsignal(signal.SIGINT) not in (signal.SIG_IGN, None):
            signal.signal(signal.SIGINT, self._terminate)

    def _terminate(self, signum, frame) -> None:
        log.info(
            "{signal}: shutting down (flushing sessions, stopping the image)",
            signal=signal.Signals(signum).name,
        )
        self._reactor.callFromThread(self._stop_once)

    def _stop_once(self) -> None:
        if self._reactor.running:
            self._reactor.stop()


class ReloadOnSighup(service.Service):
    """SIGHUP re-reads the plans of the C{--config} file (access.md §2).

    The handler only schedules the reload on the reactor thread; the file is
    read in a thread (L{stui_twisted.access.plans.PlanBook.reload}).  A file
    that is wrong keeps the plans in force and is logged and counted.
    """

    def __init__(self, reactor, plans) -> None:
        self._reactor = reactor
        self.plans = plans

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self._reactor.callWhenRunning(signal.signal, signal.SIGHUP, self._hangup)

    def _hangup(self, signum, frame) -> None:
        self._reactor.callFromThread(self._reload)

    def _reload(self) -> None:
        log.info("SIGHUP: reloading the plans of {path}", path=self.plans.path or "(no --config)")
        self.plans.reload()


def apply_twistd_umask(options: Options) -> None:
    """Apply twistd's C{--umask} now, so the log file it opens next honours it.

    twistd opens C{--logfile} after C{makeService} but sets the umask only
    later, when it daemonizes; the log file was therefore created 0644 even
    with C{--umask=0077}.  The umask is the one twistd will set anyway:
    C{--umask}, else 0077 for a daemon, else none (C{-n} keeps the caller's).
    """
    parent = getattr(options, "parent", None)
    if parent is None:  # not run by twistd (tests)
        return
    umask = parent.get("umask")
    if umask is None and not parent.get("nodaemon"):
        umask = 0o077
    if umask is not None:
        os.umask(umask)


def makeService(options: Options) -> service.IService:  # noqa: N802
    """Assemble the service tree from parsed L{Options} (twistd's entry point)."""
    from twisted.internet import reactor

    apply_twistd_umask(options)
    root, sessions = build_server(options.settings, reactor, getattr(options, "plans", None))
    CleanExitOnSigterm(reactor).setServiceParent(root)
    ReloadOnSighup(reactor, sessions.plans).setServiceParent(root)
    from stui_twisted.ops.gcpauses import FreezeAfterStartUp

    FreezeAfterStartUp(sessions).setServiceParent(root)  # last: after the session service
    atexit.register(exit_nonzero_if_unwritten, sessions)
    return root


EXIT_UNWRITTEN = 75
"""Exit status when the final flush failed (EX_TEMPFAIL: acknowledged work was lost)."""


def exit_nonzero_if_unwritten(sessions) -> None:
    """At interpreter exit: a shutdown whose final flush failed is not a success.

    It runs when the interpreter exits, after twistd has stopped the reactor
    (every service stopped, the failure logged) and removed its pidfile; it
    then ends the process with L{EXIT_UNWRITTEN} instead of twistd's 0.
    """
    if sessions is not None and sessions.unwritten_at_shutdown:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                continue  # a closed or broken stream has nothing left to write
        os._exit(EXIT_UNWRITTEN)
