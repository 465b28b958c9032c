"""
The one place the server's objects are wired together, for both entry points, for one
console or many.

Service order matters: services stop in the reverse of the order they were added. The
ports close first; then each console closes its clients (with close frames), then its
device, then its log file, which so still logs what the console says during the close
handshakes (see L{cloud_console.console.console.Console}).
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
from typing import TYPE_CHECKING, Any, Callable

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.logger import Logger

from .access.audit import NO_AUDIT, Audit, AuditLog, AuditLogError
from .access.policy import CredentialFileError
from .console.actions import ActionObserver, ActionRequest
from .console.console import Console, ConsoleLimits, build_console, console_state
from .console.device import ConsoleOpenError
from .console.logfile import LogFileError, LogFileSink
from .console.multiplexer import ClientLabel, Multiplexer
from .console.readers import ReadWorkers
from .console.sources import SourceError
from .console.spec import ConsoleSpec
from .console.state import ConsoleState
from .fleet.config import ConfigError, load_config
from .fleet.consoledir import ConsoleDirWatcher, scan_console_dir
from .fleet.registry import ConsoleRegistry
from .keeper import StateKeeper
from .sdnotify import CONSOLE_PREFIX, FdStore, Notifier, inherited_named_fds
from .web.metrics import FrontCounts, RefusalCounts, WorkerCounts
from .web.origin import OriginPolicy
from .web.site import ConsoleSite, FleetResources, build_fleet_site, build_site
from .web.websocket import ConsoleServerFactory, ConsoleSettings

if TYPE_CHECKING:
    from .ssh.session import ConsoleDirectory, SSHDoor

#: Exit status when the console (pty) could not be opened or went away: the original's.
EXIT_CONSOLE_FAILED = 2


class StartupError(Exception):
    """The console or the log file could not be opened; the message says which and why."""


class ConsoleService(MultiService):
    """
    The whole daemon. Records why it stopped, so the entry points can exit with the
    status an operator expects: 0 for a requested stop, 2 when the (single) console went
    away. SIGHUP calls C{on_sighup} (reopen the log file; with many consoles, reload).
    """

    _log = Logger()

    def __init__(self, reactor: Any, multiplexer: Multiplexer | None = None) -> None:
        MultiService.__init__(self)
        self.reactor = reactor
        self.multiplexer = multiplexer
        self.exit_status = 0
        self.log_sink: LogFileSink | None = None
        self.registry: ConsoleRegistry | None = None
        self.site: ConsoleSite | None = None
        self.websocket_factory: ConsoleServerFactory | None = None
        self.on_sighup: Callable[[], None] | None = None
        #: More to reload on SIGHUP (the SSH door's keys, the audit log).
        self.reloads: list[Callable[[], None]] = []
        #: The audit log (C{--audit-log}), if any.
        self.audit: AuditLog | None = None
        self._previous_sighup: Any = None
        #: The service manager (systemd), told when start-up and reloads are done.
        self.notifier = Notifier(None)
        #: Where the consoles' state goes at shutdown (see L{cloud_console.keeper}).
        self.keeper: StateKeeper | None = None
        #: The consoles served now (for their state at shutdown).
        self.consoles: Callable[[], list[Console]] = lambda: []
        if multiplexer is not None:
            multiplexer.when_console_closed(self._console_closed)

    def _console_closed(self, reason: str) -> None:
        self.exit_status = EXIT_CONSOLE_FAILED
        self._log.error(
            "console closed ({reason}); exiting with status {status}",
            reason=reason,
            status=EXIT_CONSOLE_FAILED,
        )
        if self.running:
            # Let the close frames go out; stopping the services then waits for them.
            self.reactor.callLater(0, self._stop_reactor)

    def _stop_reactor(self) -> None:
        if self.reactor.running:
            self.reactor.stop()

    def startService(self) -> None:
        MultiService.startService(self)
        if (self.on_sighup is not None or self.reloads) and hasattr(signal, "SIGHUP"):
            reactor = self.reactor
            self._previous_sighup = signal.signal(
                signal.SIGHUP, lambda signum, frame: reactor.callFromThread(self._sighup)
            )
        # Every console is open (or shown down) and every port listens by now; READY=1
        # waits for the reactor all the same, so that it is said by a serving process.
        self.reactor.callWhenRunning(self._ready)

    def _ready(self) -> None:
        if self.running:
            self.notifier.ready(self._status_line())

    def _status_line(self) -> str:
        if self.registry is not None:
            up = sum(1 for s in self.registry.statuses() if s.up)
            return f"serving {len(self.registry)} consoles ({up} up)"
        return "serving"

    def _sighup(self) -> None:
        self.notifier.reloading()
        try:
            if self.on_sighup is not None:
                self.on_sighup()
            for reload in self.reloads:
                reload()
        finally:
            journal = self.keeper.journal if self.keeper is not None else None
            if journal is not None:
                journal.compact()  # settings changed in place start a fresh snapshot
            self.notifier.ready(self._status_line())

    def stopService(self) -> Any:
        self.notifier.stopping()
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        stopped = MultiService.stopService(self)
        keeper = self.keeper
        if keeper is not None and keeper.enabled:
            # Once every console has stopped reading: the state holds every byte read.
            def save(result: object) -> object:
                keeper.save(console_state(console) for console in self.consoles())
                return result

            stopped.addCallback(save)
        return stopped


def _audit_actions(audit: Audit, reactor: Any) -> ActionObserver:
    """An action's outcome as an audit event (console, who, door, action, key, outcome)."""

    def observe(console: str, request: ActionRequest, who: str, via: str, outcome: str, reason: str) -> None:
        label = ClientLabel(via, who, "", reactor.seconds())
        audit.action(console or None, label, request.action, key=request.key, outcome=outcome, reason=reason)

    return observe


def _audit(service: ConsoleService, options: Any, reactor: Any) -> Audit:
    """
    The audit log, where C{--audit-log} asks for one (reopened on SIGHUP); else nothing.

    @raise StartupError: it cannot be opened.
    """
    if not options.get("audit-log"):
        return NO_AUDIT
    try:
        audit = AuditLog(options["audit-log"], reactor, bool(options.get("audit-input")))
    except AuditLogError as e:
        raise StartupError(str(e)) from e
    service.reloads.append(audit.reopen)
    service.audit = audit
    return audit


def _settings(options: Any, **more: Any) -> ConsoleSettings:
    return ConsoleSettings(
        title=options["title"] or options["console"] or "cloud-console",
        client_buffer=options["client-buffer"],
        ack_window=options["ack-window"],
        origins=OriginPolicy(tuple(options["allow-origin"])),
        max_clients=options["max-clients"],
        ping_interval=options["ping-interval"],
        **more,
    )


def _listen(service: ConsoleService, options: Any, site: Any, reactor: Any) -> None:
    if not (options["password-file"] or options["token-file"] or options["link-secret"]):
        service._log.info(
            "no --password-file, --token-file or --link-secret: anyone who reaches the port may type"
        )
    for description in options["port"]:
        strports.service(description, site, reactor=reactor).setServiceParent(service)


def raise_descriptor_limit() -> None:
    """
    Raise the soft limit on open descriptors to the hard one: every console holds one
    (a pty or a socket) and every viewer another, and the usual soft limit of 1,024 would
    stop a host's consoles well short of what the hard limit (and memory) allow.
    """
    try:
        import resource as rlimits
    except ImportError:  # not a POSIX system
        return
    soft, hard = rlimits.getrlimit(rlimits.RLIMIT_NOFILE)
    # Linux refuses an infinite soft limit for descriptors (it caps them at nr_open).
    target = hard if hard != rlimits.RLIM_INFINITY else 1 << 20
    if soft != rlimits.RLIM_INFINITY and soft < target:
        try:
            rlimits.setrlimit(rlimits.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass  # keep the limit we have; a console that cannot open says why


def build_service(options: Any, reactor: Any) -> ConsoleService:
    """
    Build the daemon from parsed L{cloud_console.tap.Options}: one console (the
    original's mode) or many (named consoles, C{--config}, C{--console-dir}).

    Consoles and log files are opened here, before the reactor runs (and before twistd
    drops privileges), so the first request finds them up and a console that cannot be
    opened is reported at once (followed consoles are shown down and waited for instead;
    with many consoles, no console stops the process).

    @raise StartupError: the console or the log file cannot be opened (one console), a
        log file or a credential file cannot (many).
    """
    raise_descriptor_limit()
    notifier = Notifier.from_environment()
    store = FdStore(notifier, inherited_named_fds()) if notifier.enabled else None
    keeper = StateKeeper(store, options.get("state-dir"))
    saved = keeper.load()
    if options["multi"]:
        service = _build_fleet(options, reactor, store, saved, keeper)
    else:
        service = _build_single(options, reactor, store, saved)
    service.notifier = notifier
    service.keeper = keeper
    # Before the reactor runs, so before the first byte is read.
    keeper.start_journal(service.consoles())
    for name in sorted(saved):
        service._log.info("saved state of console {name} dropped: it is not configured", name=name)
    if store is not None:
        # A console no longer configured: its kept descriptor is closed, and leaves the store.
        store.discard_leftovers(CONSOLE_PREFIX)
    return service


def _build_single(
    options: Any,
    reactor: Any,
    store: FdStore | None = None,
    saved: dict[str, ConsoleState] | None = None,
) -> ConsoleService:
    spec = ConsoleSpec(
        name=None,
        source=options["source"],
        title=options["title"],
        log_file=options["log-file"],
        history_size=options["history-size"],
        head_size=options["head-size"],
        log_timestamps=options["log-timestamps"],
        read_only=bool(options["read-only"]),
        reopen=bool(options["reopen"]),
        raw=not options["no-raw"],
    )
    try:
        console = build_console(
            spec,
            reactor,
            ConsoleLimits(options["max-stall"]),
            _thread_runner(reactor),
            store,
            (saved or {}).pop("", None),
        )
    except LogFileError as e:
        raise StartupError(str(e)) from e
    try:
        console.open_now()
    except (SourceError, ConsoleOpenError) as e:
        console.remove("console could not be opened")
        if console.log_sink is not None:
            console.log_sink.close(1001, "start-up failed")
        raise StartupError(str(e)) from e
    service = ConsoleService(reactor, console.multiplexer)
    service.consoles = lambda: [console]
    console.setServiceParent(service)
    service.log_sink = console.log_sink
    if console.log_sink is not None:
        service.on_sighup = console.log_sink.reopen
    try:
        audit = _audit(service, options, reactor)
    except StartupError:
        if console.follower.device is not None:
            console.follower.device.close()
        raise
    console.actions.observers.append(_audit_actions(audit, reactor))
    settings = _settings(options, refusals=RefusalCounts(), audit=audit)
    if settings.origins.allow_any:
        service._log.warn("--allow-origin '*': any web page may open this console's WebSocket")
    try:
        site, factory = build_site(
            console.multiplexer,
            settings,
            options["static-dir"],
            password_file=options["password-file"],
            token_file=options["token-file"],
            run_in_thread=_thread_runner(reactor),
            link_secret=options["link-secret"],
            actions=console.actions,
            allow_control=bool(options["allow-control"]),
        )
    except CredentialFileError as e:
        if console.follower.device is not None:
            console.follower.device.close()
        raise StartupError(str(e)) from e
    service.site = site
    service.websocket_factory = factory
    _listen(service, options, site, reactor)
    _listen_ssh(service, options, OneConsole(console), reactor, audit)
    return service


class ConsoleSources:
    """
    Where a host's consoles come from, read again on every reload: the command line
    (fixed), C{--config} (re-read on SIGHUP; a bad new file is logged and the last good
    one kept) and C{--console-dir} (rescanned on SIGHUP and whenever it changes).
    """

    _log = Logger()

    def __init__(self, options: Any) -> None:
        self.command_line: list[ConsoleSpec] = list(options["command-line-consoles"])
        self.config_path: str | None = options["config"]
        self.directory: str | None = options["console-dir"]
        self.defaults = options["defaults"]
        self._config: list[ConsoleSpec] = []
        self._warned: set[str] = set()
        if self.config_path:
            self._config = load_config(self.config_path, self.defaults)

    def reread_config(self) -> None:
        """Read C{--config} again; keep the last good one if the new one is bad."""
        if not self.config_path:
            return
        try:
            config = load_config(self.config_path, self.defaults)
        except ConfigError as e:
            self._log.error("config not reloaded, the last good one stays: {error}", error=str(e))
            return
        clash = {s.name for s in self.command_line} & {s.name for s in config}
        if clash:
            self._log.error(
                "config not reloaded: {names} named on the command line too",
                names=", ".join(sorted(n or "" for n in clash)),
            )
            return
        self._config = config

    def specs(self) -> list[ConsoleSpec]:
        """Every console wanted now: command line, config, then the directory's others."""
        specs = self.command_line + self._config
        if self.directory:
            found, warnings = scan_console_dir(self.directory, self.defaults)
            for warning in warnings:
                if warning not in self._warned:  # once, not at every rescan
                    self._log.warn("console directory: {warning}", warning=warning)
            self._warned = set(warnings)
            taken = {spec.name for spec in specs}
            for spec in found:
                if spec.name in taken:
                    self._log.warn(
                        "console directory: {name} is configured already; the entry is ignored",
                        name=spec.name,
                    )
                else:
                    specs.append(spec)
        return specs


def _build_fleet(
    options: Any,
    reactor: Any,
    store: FdStore | None = None,
    saved: dict[str, ConsoleState] | None = None,
    keeper: StateKeeper | None = None,
) -> ConsoleService:
    limits = ConsoleLimits(options["max-stall"])
    run_blocking = _thread_runner(reactor)
    states = saved if saved is not None else {}
    workers = _read_workers(options, reactor)

    action_observers: list[ActionObserver] = []

    def build(spec: ConsoleSpec) -> Console:
        console = build_console(
            spec, reactor, limits, run_blocking, store, states.pop(spec.name or "", None), workers
        )
        console.actions.observers = action_observers  # shared: the audit log joins below
        if keeper is not None and keeper.journal is not None:
            keeper.journal.add(console)  # added by a reload: it joins the journal
        return console

    registry = ConsoleRegistry(build)
    try:
        sources = ConsoleSources(options)
    except ConfigError as e:
        raise StartupError(str(e)) from e
    result = registry.apply(sources.specs(), at_start=True)
    if result.failed:
        raise StartupError("; ".join(f"console {n}: {why}" for n, why in result.failed.items()))
    service = ConsoleService(reactor)
    service.consoles = lambda: list(registry)
    service.registry = registry
    if workers is not None:
        # Before the consoles: running when they start reading, and stopped after them.
        workers.setServiceParent(service)
    registry.setServiceParent(service)
    service._log.info(
        "serving {count} consoles ({up} up)",
        count=len(registry),
        up=sum(1 for s in registry.statuses() if s.up),
    )

    def reload() -> None:
        sources.reread_config()
        registry.apply(sources.specs())
        registry.reopen_logs()

    def rescan() -> None:
        registry.apply(sources.specs())

    service.on_sighup = reload
    if sources.directory:
        ConsoleDirWatcher(sources.directory, rescan, reactor).setServiceParent(service)
        # Once the watcher watches: an entry made between the first scan and then counts.
        reactor.callWhenRunning(rescan)
    refusals = RefusalCounts()
    audit = _audit(service, options, reactor)
    action_observers.append(_audit_actions(audit, reactor))
    settings = _settings(
        options,
        audit=audit,
        refusals=refusals,
        max_clients_total=options["max-clients-total"],
        total_viewers=lambda: registry.viewer_count,
    )
    if settings.origins.allow_any:
        service._log.warn("--allow-origin '*': any web page may open the consoles' WebSockets")
    fleet = FleetResources(registry, settings, options["static-dir"])
    fleet.allow_control = bool(options["allow-control"])
    if fleet.allow_control and not (options["password-file"] or options["token-file"] or options["link-secret"]):
        service._log.warn("--allow-control without credentials: anyone who reaches the port may reset the VMs")
    try:
        site = build_fleet_site(
            fleet,
            password_file=options["password-file"],
            token_file=options["token-file"],
            run_in_thread=run_blocking,
            link_secret=options["link-secret"],
        )
    except CredentialFileError as e:
        raise StartupError(str(e)) from e
    service.site = site
    door = _listen_ssh(service, options, FleetConsoles(registry), reactor, audit)
    fleet.fronts = lambda: _front_counts(registry, refusals, door)
    if workers is not None:
        pool = workers
        fleet.workers = lambda: WorkerCounts(*pool.figures())
    if options["metrics-port"]:
        metrics_site = ConsoleSite(fleet.metrics_root())
        strports.service(options["metrics-port"], metrics_site, reactor=reactor).setServiceParent(service)
    _listen(service, options, site, reactor)
    return service


def _read_workers(options: Any, reactor: Any) -> ReadWorkers | None:
    """
    The read workers of C{--read-workers} (C{auto}: one per core beyond the first, for
    many consoles), or C{None} for none.
    """
    count = options["read-workers"]
    if count == "auto":
        count = max(0, (os.cpu_count() or 1) - 1)
    return ReadWorkers(count, reactor) if count else None


class OneConsole:
    """The SSH door's view of the one console of the original command line."""

    single = True

    def __init__(self, console: Console) -> None:
        self.console = console

    def find(self, name: str) -> Console | None:
        return self.console

    def names(self) -> list[str]:
        return []

    def total_viewers(self) -> int:
        return self.console.multiplexer.viewer_count


class FleetConsoles:
    """The SSH door's view of a host's consoles: the registry, by name."""

    single = False

    def __init__(self, registry: ConsoleRegistry) -> None:
        self.registry = registry

    def find(self, name: str) -> Console | None:
        return self.registry.get(name)

    def names(self) -> list[str]:
        return sorted(console.name or "" for console in self.registry)

    def total_viewers(self) -> int:
        return self.registry.viewer_count


def _listen_ssh(
    service: ConsoleService, options: Any, consoles: ConsoleDirectory, reactor: Any, audit: Audit = NO_AUDIT
) -> SSHDoor | None:
    """
    The SSH door, where C{--ssh-port} asks for it: the host key (made if missing), the
    keyring (reloaded with the rest on SIGHUP), the listening ports.

    @raise StartupError: the host key or a key file cannot be used.
    """
    if not options["ssh-port"]:
        return None
    # Imported here, not with the module: the SSH door (Twisted Conch, cryptography) is
    # 40-50 ms of a fleet's start and a few MiB that a host without it does not need.
    from .ssh.auth import Keyring
    from .ssh.factory import ConsoleSSHFactory
    from .ssh.hostkey import HostKeyError, load_or_create_host_key
    from .ssh.session import SSHDoor, SSHSettings

    try:
        host_key = load_or_create_host_key(options["ssh-host-key"])
        keyring = Keyring(
            options["ssh-authorized-keys"], options["ssh-user-ca"], options["ssh-revoked-keys"]
        )
    except (HostKeyError, CredentialFileError) as e:
        raise StartupError(str(e)) from e
    settings = SSHSettings(
        escape=options["ssh-escape-bytes"],
        max_clients=options["max-clients"],
        max_clients_total=options["max-clients-total"],
    )
    door = SSHDoor(consoles, settings, reactor, audit=audit)
    factory = ConsoleSSHFactory(door, host_key, keyring)
    service._log.info("SSH door algorithms: {algorithms}", algorithms=factory.algorithms())
    for description in options["ssh-port"]:
        strports.service(description, factory, reactor=reactor).setServiceParent(service)
    service.reloads.append(keyring.reload)
    return door


def _front_counts(registry: ConsoleRegistry, refusals: RefusalCounts, door: SSHDoor | None) -> FrontCounts:
    """Sessions by front door, and authentication failures by door and reason, now."""
    sessions = {"web": 0, "ssh": 0}
    for console in registry:
        for label, _read_only in console.multiplexer.viewers():
            front = label.front if label is not None else "web"
            sessions[front] = sessions.get(front, 0) + 1
    failures = {("web", "credential"): refusals.snapshot().get("auth", 0)}
    if door is not None:
        for reason, count in door.failures.counts.items():
            failures[("ssh", reason)] = count
    return FrontCounts(sessions, failures)


def _thread_runner(reactor: Any) -> Any:
    """Run password hashing off the reactor thread, where the reactor has threads."""
    from twisted.internet.interfaces import IReactorThreads
    from twisted.internet.threads import deferToThreadPool

    if not IReactorThreads.providedBy(reactor):
        return None

    def run(function: Any, *args: Any) -> Any:
        return deferToThreadPool(reactor, reactor.getThreadPool(), function, *args)

    return run


def exit_with_status_after_twistd(console: ConsoleService) -> None:
    """
    Make twistd exit with the console's status.

    twistd has no exit-status API: it returns normally after the reactor stops, so the
    process would end with 0 even when the console went away. This registers an exit hook
    that, only when the status is not 0, flushes output and ends the process with it.
    """

    def exit_with_status() -> None:
        if console.exit_status:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(console.exit_status)

    atexit.register(exit_with_status)
