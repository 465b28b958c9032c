"""
One VM's console, whole: where it is (its source, followed across reboots), what it said
(the history), who watches (fan-out, pacing) and types (the input path), and its log
file; knowing nothing of HTTP.

A process serves one console (the original command line) or many (a host's VMs, through
L{cloud_console.fleet.registry}); either way each is a L{Console} built by L{build_console}, so
one console behaves the same alone or among a thousand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from .actions import ConsoleActions
from .device import ConsoleOpenError
from .follow import ConsoleFollower, DescriptorStore, _run_here
from .logfile import LogFileSink
from .multiplexer import Multiplexer, iso_time
from .readers import ReadWorkers
from .sources import SourceError
from .spec import ConsoleSpec
from .state import ConsoleState

#: Bytes a paused viewer may fall behind and still catch up intact, whatever the
#: replayed history's size: the ring is this large at least. Measured: with the 80 KB
#: history alone, a viewer paused for a millisecond of a flood fell out of it.
LAG_WINDOW = 1024 * 1024


@dataclass(frozen=True)
class ConsoleStatus:
    """A console's state now, for the index page, C{/api/consoles}, C{/healthz}, metrics."""

    name: str
    title: str
    up: bool
    #: Why it is down, or what was opened.
    reason: str
    #: When it last went up or down (ISO 8601, UTC).
    since: str
    viewers: int
    #: Bytes the guest wrote since the server started.
    bytes_out: int
    #: Input bytes written to the console.
    bytes_in: int
    last_output: str | None
    lagging: int
    gaps: int
    reopens: int
    history_bytes: int
    head_bytes: int
    #: What its source can do (SysRq, reset...): told only to a credential that may.
    actions: tuple[str, ...] = ()
    #: Actions tried, by (action, outcome: done, failed, refused).
    action_counts: dict[tuple[str, str], int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The status as C{/api/consoles} and the SSH door's C{status} show it."""
        return {
            "name": self.name,
            "title": self.title,
            "state": "up" if self.up else "down",
            "reason": self.reason,
            "since": self.since,
            "viewers": self.viewers,
            "bytesOut": self.bytes_out,
            "lastOutput": self.last_output,
        }


@dataclass(frozen=True)
class ConsoleLimits:
    """Server-wide settings every console is built with (not per-console ones)."""

    max_stall: float = 0.1
    lag_window: int = LAG_WINDOW


class Console(MultiService):
    """
    One console: its multiplexer, the follower that keeps it open, and its log file.

    Services stop in reverse order: the follower first (no more reopening), then the
    multiplexer (the viewers, then the device), then the log file, which so still logs
    what the console says while the viewers close.
    """

    _log = Logger()

    def __init__(
        self,
        spec: ConsoleSpec,
        multiplexer: Multiplexer,
        follower: ConsoleFollower,
        log_sink: LogFileSink | None,
        run_blocking: Callable[[Callable[[], Any]], Deferred[Any]] | None = None,
    ) -> None:
        MultiService.__init__(self)
        #: The console's name (C{""} for the single console of the original command line).
        self.name = spec.name or ""
        self.spec = spec
        self.multiplexer = multiplexer
        self.follower = follower
        self.log_sink = log_sink
        if log_sink is not None:
            log_sink.setServiceParent(self)
        multiplexer.setServiceParent(self)
        follower.setServiceParent(self)
        #: Web resources made for this console, by whoever serves it (cached per key).
        self.resources: dict[Any, Any] = {}
        #: What an operator can do to the VM besides typing (SysRq, reset...).
        self.actions = ConsoleActions(
            self.name, lambda: self.spec.source, multiplexer, run_blocking or _run_here,
            device=lambda: follower.device,
        )

    def open_now(self) -> None:
        """
        Open the console before the reactor runs (blocking). A console that is followed
        (reopen) and not there yet is shown as down and retried; one that is not followed
        raises.

        @raise SourceError: see L{ConsoleFollower.open_now}.
        @raise ConsoleOpenError: see L{ConsoleFollower.open_now}.
        """
        self.follower.open_now()

    def open_or_show_down(self) -> None:
        """
        Open it, or (it cannot be opened now) show it as down with the reason: one
        console among many never stops the process. Followed consoles are retried.
        """
        try:
            self.follower.open_now()
        except (SourceError, ConsoleOpenError) as e:
            self._log.warn("console {name} cannot be opened: {error}", name=self.name, error=str(e))
            self.multiplexer.console_down(f"cannot open {self.spec.source}: {e}")

    def status(self) -> ConsoleStatus:
        multiplexer = self.multiplexer
        history = multiplexer.history
        last = multiplexer.last_output_at
        return ConsoleStatus(
            name=self.spec.name or "",
            title=self.spec.title,
            up=multiplexer.up,
            reason=multiplexer.state_reason,
            since=multiplexer.state_since,
            viewers=multiplexer.viewer_count,
            bytes_out=history.end,
            bytes_in=multiplexer.bytes_in,
            last_output=iso_time(last) if last is not None else None,
            lagging=multiplexer.lagging_events,
            gaps=multiplexer.gaps,
            reopens=multiplexer.reopen_count,
            history_bytes=len(history),
            head_bytes=history.head_end - history.head_start,
            actions=self.actions.available,
            action_counts=dict(self.actions.counts),
        )

    def apply(self, spec: ConsoleSpec) -> None:
        """
        A reload changed this console's settings but not its source: apply them in place
        (title, read-only, replayed history size, head size, log marks); its clients,
        history and offsets stay.
        """
        self.spec = spec
        multiplexer = self.multiplexer
        multiplexer.read_only = spec.read_only
        if spec.history_size <= multiplexer.history.capacity:
            multiplexer.replay_size = spec.history_size
        else:
            self._log.warn(
                "console {name}: history-size {size} is larger than the ring ({ring}); "
                "it applies when the console is next added",
                name=self.name,
                size=spec.history_size,
                ring=multiplexer.history.capacity,
            )
        multiplexer.history.head_size = spec.head_size
        if self.log_sink is not None:
            self.log_sink.set_mark_after(spec.log_timestamps * 60)
            self._log_changed()

    def remove(self, reason: str) -> None:
        """
        The reload removed it: close every client with 4001 and C{reason}. Stopping the
        service (its parent does, when it lets go of it) then closes the device.
        """
        self.multiplexer.console_lost(reason, close_reason=reason)
        self.follower.forget()

    def reopen_log(self) -> None:
        """SIGHUP: reopen the log file (logrotate moved it away)."""
        if self.log_sink is not None:
            self.log_sink.reopen()
            self._log_changed()

    def _log_changed(self) -> None:
        """A read worker writing the log file must learn of the change."""
        device = self.follower.device
        if device is not None:
            device.log_changed()


def build_console(
    spec: ConsoleSpec,
    reactor: Any,
    limits: ConsoleLimits = ConsoleLimits(),
    run_blocking: Callable[[Callable[[], Any]], Deferred[Any]] | None = None,
    store: DescriptorStore | None = None,
    saved: ConsoleState | None = None,
    workers: ReadWorkers | None = None,
) -> Console:
    """
    The one place a console's objects are made (for one console or many). Nothing is
    opened yet but the log file; see L{Console.open_now}. C{workers} read it while
    nobody watches it (see L{cloud_console.console.readers}).

    @raise cloud_console.console.logfile.LogFileError: the log file cannot be opened.
    """
    multiplexer = Multiplexer(
        spec.history_size,
        read_only=spec.read_only,
        clock=reactor,
        max_stall=limits.max_stall,
        lag_window=limits.lag_window,
        head_size=spec.head_size,
    )
    if saved is not None:
        _take_over(spec, multiplexer, saved)
    sink = None
    if spec.log_file:
        sink = LogFileSink(
            spec.log_file, multiplexer, mark_after=spec.log_timestamps * 60, clock=reactor
        )
    follower = ConsoleFollower(
        spec.source,
        multiplexer,
        reactor,
        raw=spec.raw,
        reopen=spec.reopen,
        run_blocking=run_blocking,
        store=store,
        store_name=f"console.{spec.name}" if spec.name else "console",
        workers=workers,
        log_descriptor=sink.worker_descriptor if sink is not None else None,
    )
    return Console(spec, multiplexer, follower, sink, run_blocking)


def _take_over(spec: ConsoleSpec, multiplexer: Multiplexer, saved: ConsoleState) -> None:
    """
    Take the previous process's state of this console, if it is this console's (same
    source, same history sizes); otherwise log why and start empty, as without a state.
    """
    name = spec.name or ""
    why: str | None = None
    if saved.name != name:
        why = f"it is console {saved.name!r}'s"
    elif saved.source != str(spec.source):
        why = f"its source was {saved.source}, now {spec.source}"
    else:
        try:
            multiplexer.restore(saved.session, saved.history)
        except ValueError as e:
            why = str(e)
    if why is not None:
        Console._log.warn(
            "console {name}: saved state discarded ({why}); it starts empty", name=name, why=why
        )
        return
    Console._log.info(
        "console {name}: state taken over: session {session}, {bytes} bytes held, offset {end}",
        name=name,
        session=saved.session,
        bytes=len(multiplexer.history),
        end=multiplexer.history.end,
    )


def console_state(console: Console) -> ConsoleState:
    """What C{console} hands to the next process (once it has stopped reading)."""
    return ConsoleState(
        console.spec.name or "",
        str(console.spec.source),
        console.multiplexer.session,
        console.multiplexer.history.export(),
    )
