"""
The one place the console's objects are wired together, for both entry points.

Service order matters: services stop in the reverse of the order they were added. The
ports close first; then the multiplexer closes the clients (with close frames), then the
console, then the log file, which is added before it so that it is still open while the
console is read during the close handshakes.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
from typing import Any

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.logger import Logger

from .access import CredentialFileError, OriginPolicy
from .device import ConsoleOpenError
from .follow import ConsoleFollower
from .logfile import LogFileError, LogFileSink
from .multiplexer import Multiplexer
from .sources import SourceError
from .web import ConsoleSite, build_site
from .websocket import ConsoleServerFactory, ConsoleSettings

#: Bytes a paused viewer may fall behind and still catch up intact, whatever the
#: replayed history's size: the ring is this large at least. Measured: with the 80 KB
#: history alone, a viewer paused for a millisecond of a flood fell out of it.
LAG_WINDOW = 1024 * 1024

#: Exit status when the console (pty) could not be opened or went away: the original's.
EXIT_CONSOLE_FAILED = 2


class StartupError(Exception):
    """The pty or the log file could not be opened; the message says which and why."""


class ConsoleService(MultiService):
    """
    The whole daemon. Records why it stopped, so the entry points can exit with the
    status an operator expects: 0 for a requested stop, 2 when the console went away.
    """

    _log = Logger()

    def __init__(self, reactor: Any, multiplexer: Multiplexer) -> None:
        MultiService.__init__(self)
        self.reactor = reactor
        self.multiplexer = multiplexer
        self.exit_status = 0
        self.log_sink: LogFileSink | None = None
        self.site: ConsoleSite | None = None
        self.websocket_factory: ConsoleServerFactory | None = None
        self._previous_sighup: Any = None
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
        if self.log_sink is not None and hasattr(signal, "SIGHUP"):
            sink, reactor = self.log_sink, self.reactor
            self._previous_sighup = signal.signal(
                signal.SIGHUP, lambda signum, frame: reactor.callFromThread(sink.reopen)
            )

    def stopService(self) -> Any:
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        return MultiService.stopService(self)


def build_service(options: Any, reactor: Any) -> ConsoleService:
    """
    Build the daemon from parsed L{cloud_console.tap.Options}.

    The console and the log file are opened here, before the reactor runs (and before
    twistd drops privileges), so a console that cannot be opened is reported at once
    (with C{--reopen} it is shown as down and waited for instead).

    @raise StartupError: the console or the log file cannot be opened.
    """
    multiplexer = Multiplexer(
        options["history-size"],
        read_only=bool(options["read-only"]),
        clock=reactor,
        max_stall=options["max-stall"],
        lag_window=LAG_WINDOW,
        head_size=options["head-size"],
    )
    follower = ConsoleFollower(
        options["source"],
        multiplexer,
        reactor,
        raw=not options["no-raw"],
        reopen=bool(options["reopen"]),
        run_blocking=_thread_runner(reactor),
    )
    try:
        follower.open_now()
    except (SourceError, ConsoleOpenError) as e:
        raise StartupError(str(e)) from e

    def close_console() -> None:
        if follower.device is not None:
            follower.device.close()

    console = ConsoleService(reactor, multiplexer)
    if options["log-file"]:
        try:
            sink = LogFileSink(options["log-file"], multiplexer)
        except LogFileError as e:
            close_console()
            raise StartupError(str(e)) from e
        sink.setServiceParent(console)
        console.log_sink = sink
    multiplexer.setServiceParent(console)
    follower.setServiceParent(console)
    settings = ConsoleSettings(
        title=options["title"] or options["pty"],
        client_buffer=options["client-buffer"],
        ack_window=options["ack-window"],
        origins=OriginPolicy(tuple(options["allow-origin"])),
        max_clients=options["max-clients"],
        ping_interval=options["ping-interval"],
    )
    if settings.origins.allow_any:
        console._log.warn("--allow-origin '*': any web page may open this console's WebSocket")
    try:
        site, factory = build_site(
            multiplexer,
            settings,
            options["static-dir"],
            password_file=options["password-file"],
            token_file=options["token-file"],
            run_in_thread=_thread_runner(reactor),
        )
    except CredentialFileError as e:
        close_console()
        raise StartupError(str(e)) from e
    if not (options["password-file"] or options["token-file"]):
        console._log.info("no --password-file or --token-file: anyone who reaches the port may type")
    console.site = site
    console.websocket_factory = factory
    for description in options["port"]:
        strports.service(description, site, reactor=reactor).setServiceParent(console)
    return console


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
