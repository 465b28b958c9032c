"""
Following the guest: open the console from its source, and again whenever it goes away.

A VM's console does not live as long as the server: cloud-hypervisor makes a new pty on
every guest reboot, a VMM restart gives a new C{/dev/pts/N} (the old number may go to
someone else), a socket is gone while the VMM is down. With C{reopen}, a console that
goes away is shown as down to the clients (who stay, with the history) and its source is
tried again with backoff, resolved anew each time (a symlink's target, the VMM API's
answer), forever; when it comes back the stream goes on at the next offset. Without it,
the first loss is the end (the original's behaviour: exit status 2).

Resolving and opening may block (a VMM's API over a unix socket, a connect): the first
open happens before the reactor runs, as start-up did before; later ones run in the
reactor's thread pool, so a slow VMM never stalls the other clients.
"""

from __future__ import annotations

import os
import random
import socket
import stat
import termios
import tty
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from .device import ConsoleDevice, ConsoleOpenError, connect_unix, open_tty
from .multiplexer import Multiplexer
from .readers import ReadWorkers
from .sources import Source, SourceError

#: Seconds before the first retry, doubling up to L{RETRY_MAX}.
RETRY_FIRST = 0.2
RETRY_MAX = 5.0

#: A console that stayed up this long starts its next retries from L{RETRY_FIRST} again;
#: one that hangs up at once after each open keeps backing off instead of spinning.
STAYED_UP = RETRY_MAX


@dataclass
class OpenedConsole:
    """A console descriptor, opened (off the reactor) and not yet handed to the reactor."""

    fd: int
    saved_attributes: list[Any] | None
    #: What was opened, for messages: "pty /dev/pts/7".
    name: str
    path: str
    #: It speaks telnet (L{cloud_console.console.telnet}).
    telnet: bool = False


def open_source(source: Source, raw: bool) -> OpenedConsole:
    """
    Resolve C{source} and open what it names (blocking).

    @raise SourceError: the source does not name a usable console now.
    @raise ConsoleOpenError: what it names cannot be opened.
    """
    target = source.resolve()
    if target.kind == "pty":
        fd, saved = open_tty(target.path, raw)
        return OpenedConsole(fd, saved, str(target), target.path)
    return OpenedConsole(connect_unix(target.path), None, str(target), target.path, target.telnet)


class DescriptorStore(Protocol):
    """
    Where a console's descriptor outlives the process (systemd's store, see
    L{cloud_console.sdnotify.FdStore}): handed over when opened, taken back at start.
    """

    def store(self, name: str, fd: int) -> bool: ...

    def remove(self, name: str) -> bool: ...

    def take(self, name: str) -> int | None: ...


def adopt_descriptor(fd: int, source: Source, raw: bool) -> OpenedConsole:
    """
    Use C{fd}, a console descriptor kept across a restart, if it is still what
    C{source} names now: the same pty (device number) or a socket connected to the
    same path. Made non-blocking and close-on-exec; a pty is set raw again.

    @raise SourceError: the source cannot be resolved now.
    @raise ConsoleOpenError: C{fd} is not what the source names (it changed).
    """
    target = source.resolve()
    mode = os.fstat(fd).st_mode
    if target.kind == "pty":
        if not stat.S_ISCHR(mode) or not os.isatty(fd):
            raise ConsoleOpenError(f"the kept descriptor is not a terminal, {target} is")
        try:
            same = os.stat(target.path).st_rdev == os.fstat(fd).st_rdev
        except OSError:
            same = False
        if not same:
            raise ConsoleOpenError(f"the kept descriptor is not {target}")
        if raw:
            try:
                tty.setraw(fd, termios.TCSANOW)
            except (OSError, termios.error) as e:
                raise ConsoleOpenError(f"cannot set up the kept {target}: {e}") from e
        name = f"pty {os.ttyname(fd)}"
    else:
        if not stat.S_ISSOCK(mode):
            raise ConsoleOpenError(f"the kept descriptor is not a socket, {target} is")
        sock = socket.socket(fileno=os.dup(fd))
        try:
            peer = sock.getpeername()
        except OSError as e:
            raise ConsoleOpenError(f"the kept socket is not connected: {e.strerror}") from e
        finally:
            sock.close()
        if peer != target.path:
            raise ConsoleOpenError(f"the kept socket is connected to {peer!r}, not {target}")
        name = f"unix socket {target.path}"
    os.set_blocking(fd, False)
    os.set_inheritable(fd, False)
    return OpenedConsole(fd, None, name, target.path)


def _run_here(function: Callable[[], Any]) -> Deferred[Any]:
    return maybeDeferred(function)


class ConsoleFollower(Service):
    """
    Keeps the multiplexer's console open from a L{Source}.

    @ivar device: the console open now, if any.
    """

    _log = Logger()

    def __init__(
        self,
        source: Source,
        multiplexer: Multiplexer,
        reactor: Any,
        raw: bool = True,
        reopen: bool = False,
        run_blocking: Callable[[Callable[[], Any]], Deferred[Any]] | None = None,
        store: DescriptorStore | None = None,
        store_name: str = "console",
        workers: ReadWorkers | None = None,
        log_descriptor: Callable[[], int | None] | None = None,
    ) -> None:
        self.source = source
        #: The log file a read worker may write (see L{LogFileSink.worker_descriptor}).
        self.log_descriptor = log_descriptor
        #: Read workers that may read the console while nobody watches it.
        self.workers = workers
        #: Where the open descriptor is kept across restarts, under C{store_name}.
        self.store = store
        self.store_name = store_name
        #: Whether the descriptor open now was kept across a restart (not reopened).
        self.adopted = False
        self.multiplexer = multiplexer
        self.reactor = reactor
        self.raw = raw
        self.reopen = reopen
        self._run_blocking = run_blocking or _run_here
        self.device: ConsoleDevice | None = None
        self._retry: IDelayedCall | None = None
        self._attempting = False
        self._failures = 0
        self._up_since = 0.0
        self._last_error: str | None = None
        self._announce_failure = False

    def open_now(self) -> None:
        """
        The first open, blocking (at start-up, before the reactor runs). With C{reopen},
        a console that is not there yet is shown as down and waited for.

        @raise SourceError: (without C{reopen}) the source names no usable console.
        @raise ConsoleOpenError: (without C{reopen}) it cannot be opened.
        """
        if self._adopt():
            return
        try:
            opened = open_source(self.source, self.raw)
        except (SourceError, ConsoleOpenError) as e:
            if not self.reopen:
                raise
            self._last_error = str(e)
            self.multiplexer.console_down(f"waiting for {self.source}: {e}")
            return
        self._connect(opened)

    def _adopt(self) -> bool:
        """
        Take the descriptor the store kept for this console across a restart, if it is
        still this console's (see L{adopt_descriptor}); one that is not is closed and
        removed from the store, and the source is opened as usual.
        """
        if self.store is None:
            return False
        fd = self.store.take(self.store_name)
        if fd is None:
            return False
        try:
            opened = adopt_descriptor(fd, self.source, self.raw)
        except (SourceError, ConsoleOpenError, OSError) as e:
            self._log.warn(
                "console {source}: kept descriptor not used ({error}); opening the source",
                source=str(self.source),
                error=str(e),
            )
            os.close(fd)
            self.store.remove(self.store_name)
            return False
        self._log.info(
            "console {source}: kept {name} adopted across the restart",
            source=str(self.source),
            name=opened.name,
        )
        self.adopted = True
        self._connect(opened, kept=True)
        return True

    def forget(self) -> None:
        """The console is removed for good: its descriptor leaves the store."""
        if self.store is not None:
            self.store.remove(self.store_name)

    def open_in_background(self) -> None:
        """
        Open without blocking the reactor (a console added by a reload, whose VMM API may
        be slow): until then, and if it fails, the console is shown as down; a followed
        one is then retried.
        """
        self.multiplexer.console_down(f"opening {self.source}")
        self._announce_failure = True
        self._attempt()

    def _connect(self, opened: OpenedConsole, kept: bool = False) -> None:
        multiplexer = self.multiplexer
        saved = opened.saved_attributes
        if self.store is not None:
            # Kept across restarts: it stays raw when this process closes its copy (a
            # pty put back into cooked mode would echo the guest's output to it).
            saved = None
            if not kept:
                self.store.store(self.store_name, opened.fd)
        device = ConsoleDevice(
            opened.fd,
            opened.name,
            on_output=multiplexer.output_received,
            on_lost=self._lost,
            saved_attributes=saved,
            reactor=self.reactor,
            read_budget=multiplexer.read_budget,
            telnet=opened.telnet,
            workers=self.workers,
            log_descriptor=self.log_descriptor or (lambda: None),
        )
        self.device = device
        self._up_since = self.reactor.seconds()
        self._last_error = None
        description = f"{'kept' if kept else 'opened'} {opened.name}"
        if not str(self.source).endswith(opened.path):
            description += f" (from {self.source})"  # found through the VMM's API
        multiplexer.console_up(device, description)

    def _lost(self, reason: str) -> None:
        """The device went away: the end, or (with C{reopen}) down until it is back."""
        self.device = None
        self.adopted = False
        if self.store is not None:
            self.store.remove(self.store_name)
        if not self.reopen:
            self.multiplexer.console_lost(reason)
            return
        self.multiplexer.console_down(reason)
        if self.reactor.seconds() - self._up_since >= STAYED_UP:
            self._failures = 0
        if self.running:
            self._schedule()

    def _schedule(self) -> None:
        """Try again after the backoff (doubling from L{RETRY_FIRST} to L{RETRY_MAX})."""
        if self._retry is not None or self._attempting:
            return
        delay = min(RETRY_MAX, RETRY_FIRST * 2**self._failures)
        # Jitter, so that many consoles of one host (a host reboot) do not retry in step.
        delay *= random.uniform(0.9, 1.0)
        self._failures = min(self._failures + 1, 16)
        self._retry = self.reactor.callLater(delay, self._attempt)

    def _attempt(self) -> None:
        self._retry = None
        self._attempting = True
        opening = self._run_blocking(lambda: open_source(self.source, self.raw))
        opening.addCallbacks(self._opened, self._failed)

    def _opened(self, opened: OpenedConsole) -> None:
        self._attempting = False
        self._announce_failure = False
        if not self.running or self.multiplexer.closed_reason is not None:
            _discard(opened)
            return
        self._log.info(
            "console {source} back after {tries} tries: {name}",
            source=str(self.source),
            tries=self._failures,
            name=opened.name,
        )
        self._connect(opened)

    def _failed(self, failure: Failure) -> None:
        self._attempting = False
        if failure.check(SourceError, ConsoleOpenError) is None:
            self._log.failure("while reopening console {source}", failure, source=str(self.source))
        else:
            error = failure.getErrorMessage()
            if error != self._last_error:
                # Each new reason once, not every retry: a VM shut down for a week is quiet.
                self._last_error = error
                self._log.info(
                    "console {source} not back yet: {error}; retrying (every {most} s at most)",
                    source=str(self.source),
                    error=error,
                    most=RETRY_MAX,
                )
        if self._announce_failure:
            # The clients saw "opening": tell them why it did not (later failures, of a
            # console that went down, keep the reason it went down for).
            self._announce_failure = False
            self.multiplexer.console_down(f"cannot open {self.source}: {failure.getErrorMessage()}")
        if self.running and self.reopen:
            self._schedule()

    def startService(self) -> None:
        """Start retrying, if the console is down and is to be followed."""
        Service.startService(self)
        if self.device is None and self.reopen and self.multiplexer.closed_reason is None:
            self._schedule()

    def stopService(self) -> None:
        """Stop retrying; an open that finishes after this is closed again."""
        Service.stopService(self)
        if self._retry is not None:
            if self._retry.active():
                self._retry.cancel()
            self._retry = None


def _discard(opened: OpenedConsole) -> None:
    """Close a console opened too late to be used, restoring its terminal settings."""
    if opened.saved_attributes is not None:
        import termios

        try:
            termios.tcsetattr(opened.fd, termios.TCSANOW, opened.saved_attributes)
        except (OSError, termios.error):
            pass
    os.close(opened.fd)
