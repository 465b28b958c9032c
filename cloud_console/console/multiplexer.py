"""
The multiplexer: one console, its history, and every client attached to it.

Output read from the pty is appended to the L{History} and handed to each attached client
as a L{Chunk}. A client that cannot keep up is I{paused}: it keeps only a cursor (an
offset into the history) and catches up from the history when it is resumed, so the
history is the only queue and nothing is copied per client. A client whose cursor has
fallen out of the history learns of the gap; what it does then (close, or reset and
replay) is its own business.

The guest is read at the pace of the viewers that keep up (L{cloud_console.console.pacing}), and
what clients type goes to the console through a bounded input path that never pauses
anyone (L{cloud_console.console.inputpath}).

The console can go I{down} and come back (a reboot that makes a new pty, a VMM restart):
the clients and the history stay, the clients hear of it, and the stream goes on at the
next offset. Only L{Multiplexer.console_lost} ends it for good.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface

from .history import History, HistoryState
from .inputpath import InputPath
from .pacing import ReadPacer

#: How much history one catch-up step hands a client at a time. Large enough that a
#: catching-up client costs few calls, small enough that the transport can pause it
#: before it buffers much more than its limit.
CATCH_UP_STEP = 64 * 1024

#: How far into the replayed tail a line boundary is looked for, after a "not kept" line.
LINE_SEARCH = 4096


def iso_time(seconds: float) -> str:
    """C{seconds} since the epoch as ISO 8601 UTC to the second: C{2026-12-01T20:00:00Z}."""
    moment = datetime.fromtimestamp(seconds, timezone.utc).replace(microsecond=0)
    return moment.isoformat().replace("+00:00", "Z")


def skip_marker(skipped: int) -> bytes:
    """
    The line that stands for bytes not kept between the head and the tail, where the
    stream has no other way to say so (the original protocol, the history download).
    """
    return f"\r\n[... {skipped:,} bytes not kept ...]\r\n".encode("ascii")


class Chunk:
    """
    A run of output at a known offset, shared by every client that is sent it.

    Clients that need the bytes framed (a WebSocket message) ask L{framed} with a key for
    their framing; the first asks builds it, every other client reuses it, so each chunk is
    encoded once per framing, not once per client.
    """

    __slots__ = ("offset", "data", "logged", "_framed")

    def __init__(self, offset: int, data: bytes, logged: bool = False) -> None:
        self.offset = offset
        self.data = data
        #: Already in the console's log file (a read worker wrote it there).
        self.logged = logged
        self._framed: dict[str, Any] = {}

    @property
    def end(self) -> int:
        """Offset one past the last byte of this chunk."""
        return self.offset + len(self.data)

    def framed(self, key: str, build: Callable[[Chunk], Any]) -> Any:
        """The chunk framed by C{build}, built once per C{key}."""
        try:
            return self._framed[key]
        except KeyError:
            value = self._framed[key] = build(self)
            return value


class IConsoleClient(Interface):
    """Something attached to the multiplexer: a WebSocket connection, the log file."""

    def output(chunk: Chunk) -> None:
        """Deliver output; chunks arrive in order, without gaps unless L{gap} said so."""

    def gap(lost_from: int, lost_to: int, reason: str) -> bool:
        """
        The bytes in [lost_from, lost_to) are gone from the history before this client got
        them. Return C{True} to carry on from C{lost_to}, C{False} if the client has
        closed (it is then detached).
        """

    def skip(skip_from: int, skip_to: int) -> None:
        """
        The bytes in [skip_from, skip_to) between the boot's head and the recent output
        are not sent (not kept, or not replayed); what follows starts at C{skip_to}. Not
        a break in the screen: the client marks the place and carries on.
        """

    def clients_changed(count: int) -> None:
        """The number of attached viewers changed."""

    def console_state(up: bool, reason: str, since: str) -> None:
        """
        The console went down (C{up} false: why) or came back (what was opened), at
        C{since} (ISO 8601, UTC); the stream goes on at the next offset either way.
        """

    def close(code: int, reason: str) -> Deferred[None]:
        """Close the client; the Deferred fires once it is gone."""


class IActionNotices(Interface):
    """
    A client that is told of the console's actions (SysRq, BREAK, reset, power button;
    L{cloud_console.console.actions}): optional beside L{IConsoleClient}, so the log file
    and other clients need nothing new.
    """

    def action_done(who: str, description: str, at: str) -> None:
        """C{who} did C{description} (C{"SysRq t"}, C{"reset"}) at C{at} (ISO 8601, UTC)."""


class ConsoleClosed(Exception):
    """The pty went away (the VM stopped)."""


class _ConsoleWriter(Protocol):
    """What the multiplexer needs of the console device: a buffered write, reading."""

    @property
    def pending_input(self) -> int: ...

    def write(self, data: bytes) -> None: ...

    def startReading(self) -> None: ...

    def stopReading(self) -> None: ...

    def set_watched(self, watched: bool) -> None: ...

    def close(self) -> None: ...


#: Close codes sent to WebSocket clients, documented in the README.
CLOSE_LAGGING = 4000
CLOSE_CONSOLE_CLOSED = 4001
CLOSE_GOING_AWAY = 1001


@dataclass(frozen=True)
class ClientLabel:
    """
    Who a client is, for the who-is-on-this-console lists: the door it came through
    (C{"web"}, C{"ssh"}), its identity (C{"anonymous"} without a credential), its
    address, and since when (epoch seconds). Opaque to the console: the doors fill it.
    """

    front: str
    identity: str
    address: str
    since: float


class Attachment:
    """
    One client's place in the stream: its cursor and why it is paused, if it is.

    @ivar cursor: offset of the next byte this client should be sent.
    """

    def __init__(
        self, multiplexer: Multiplexer, client: IConsoleClient, cursor: int, viewer: bool
    ) -> None:
        self.multiplexer = multiplexer
        self.client = client
        self.cursor = cursor
        self.viewer = viewer
        self.pause_reasons: set[str] = set()
        self.attached = True
        #: Whether the guest's output waits for this client when it falls behind.
        self.paces = viewer
        self.read_only = False
        self.input_discarded = 0
        self.refused_for: str | None = None
        #: Whether this client's stream began in the boot's head: reaching the head's
        #: end it skips to the replayed tail, where another client would see a gap.
        self.in_head = False
        #: Who it is, where the door said so.
        self.label: ClientLabel | None = None

    @property
    def paused(self) -> bool:
        """Whether output to this client is held back."""
        return bool(self.pause_reasons)

    def pause(self, reason: str) -> None:
        """
        Hold output back (C{reason}: "transport", "acks", ...) until L{resume}. The pty
        learns of it at its next read (L{Multiplexer.read_budget}).
        """
        self.pause_reasons.add(reason)

    def resume(self, reason: str) -> None:
        """Lift one reason to pause; with none left, catch up from the history."""
        self.pause_reasons.discard(reason)
        if not self.pause_reasons and self.attached:
            self.multiplexer._catch_up(self)
            self.multiplexer.pacer.release()

    def send_input(self, data: bytes) -> str | None:
        """Write what this client typed to the console; return why not, if refused."""
        return self.multiplexer.input_received(self, data)

    def detach(self) -> None:
        """Stop sending to this client."""
        self.multiplexer.detach(self)


class HistoryRecorder(Protocol):
    """Follows a history as it changes, to rebuild it exactly elsewhere."""

    def appended(self, offset: int, data: bytes, now: float) -> None:
        """C{data} was appended at C{offset}, arriving at C{now}."""

    def boot(self, offset: int) -> None:
        """A new boot began at C{offset} (L{History.begin_boot})."""


class Multiplexer(Service):
    """
    Keeps the history and fans output out to every attached client.

    @ivar history: the boot's head and the ring of recent output.
    @ivar read_only: discard (and count) every client's input.
    @ivar session: names this run of the server; offsets from another run (before a
        restart) mean nothing here, so a resuming client must name the session too.
    @ivar up: whether a console device is connected now.
    @ivar state_reason: why the console is down, or what was opened when it came up.
    @ivar state_since: when it last went up or down (ISO 8601, UTC).
    """

    _log = Logger()

    def __init__(
        self,
        history_size: int,
        read_only: bool = False,
        clock: IReactorTime | None = None,
        max_stall: float = 0.1,
        lag_window: int = 0,
        head_size: int = 0,
    ) -> None:
        # The ring is the replayed history, or the lag window if that is larger: slow
        # viewers catch up from it, new ones are sent only the last history_size bytes.
        self.history = History(max(history_size, lag_window), head_size=head_size)
        self.replay_size = history_size
        self.session = secrets.token_hex(8)
        self.clock = clock
        self.max_stall = max_stall
        self.pacer = ReadPacer(self, clock, max_stall)
        self.input = InputPath()
        self.read_only = read_only
        self._attachments: list[Attachment] = []
        self._pty: _ConsoleWriter | None = None
        self.up = False
        self.state_reason = "not opened yet"
        self.state_since = self._now()
        #: How many times the console came back after going down.
        self.reopen_count = 0
        self._went_down = False
        self.closed_reason: str | None = None
        self._on_console_closed: list[Callable[[str], None]] = []
        #: Set once L{stopService} has begun closing the clients.
        self.stopping = False
        #: Counters for the index page and metrics (plain ints: nothing per byte).
        self.lagging_events = 0
        self.gaps = 0
        #: When the guest last wrote (clock seconds), or None.
        self.last_output_at: float | None = None
        #: The history was taken over from the previous process: the next console_up
        #: continues its boot (the head stays) instead of beginning one.
        self._continuing = False
        #: Told of every change to the history as it happens (a journal that outlives
        #: the process, see L{cloud_console.keeper}), if any.
        self.recorder: HistoryRecorder | None = None

    def _seconds(self) -> float:
        return self.clock.seconds() if self.clock is not None else time.time()

    def seconds(self) -> float:
        """Now, on this console's clock (seconds since the epoch)."""
        return self._seconds()

    def _now(self) -> str:
        return iso_time(self._seconds())

    def restore(self, session: str, history: HistoryState) -> None:
        """
        Take over the previous process's session and history (a restart): offsets go on
        where they were, so a page that names this session resumes with no gap, and the
        boot's head stays.

        @raise ValueError: see L{History.restore}.
        """
        self.history.restore(history)
        self.session = session
        self._continuing = True

    # -- what a new client is sent ----------------------------------------------------

    @property
    def tail_start(self) -> int:
        """
        Offset of the oldest byte of the replayed tail: the last history_size bytes, or,
        after a "not kept" line, from the first line boundary in them.

        A tail cut at a byte count starts inside a line, often inside an escape sequence
        (the page showed C{[m} under the "not kept" line): when the byte before the tail
        is not a newline (or is not held), the tail starts after the first newline within
        its first L{LINE_SEARCH} bytes, which the "not kept" line then counts. Without a
        head there is no such line and the replay stays exactly the last history_size
        bytes, the original tool's contract.
        """
        history = self.history
        start = max(history.start, history.end - self.replay_size)
        if not history.head_start < history.head_end < start:
            return start
        if start > history.start and history.read_from(start - 1, 1) == b"\n":
            return start
        newline = history.read_from(start, LINE_SEARCH).find(b"\n")
        return start if newline < 0 else start + newline + 1

    @property
    def replay_start(self) -> int:
        """
        Offset of the first byte a new client is sent: the boot's head, if one is held
        before the tail, else the tail.
        """
        history = self.history
        tail_start = self.tail_start
        if history.head_start < history.head_end and history.head_start < tail_start:
            return history.head_start
        return tail_start

    @property
    def replay_skip(self) -> tuple[int, int] | None:
        """The bytes [from, to) between the head and the tail that a new client skips."""
        history = self.history
        head_end, tail_start = history.head_end, self.tail_start
        if self.replay_start == history.head_start < head_end < tail_start:
            return head_end, tail_start
        return None

    def replay(self) -> bytes:
        """
        The history a new client gets, oldest first, as one file: the head, a marker
        line for the bytes skipped, the tail.
        """
        runs, skipped = self.replay_runs()
        if len(runs) == 1:
            return runs[0][1]
        return runs[0][1] + skip_marker(skipped) + runs[1][1]

    def replay_runs(self) -> tuple[list[tuple[int, bytes]], int]:
        """
        The history a new client gets as runs (offset, bytes): the head and the tail,
        with how many bytes between them are not sent; or the one run, and 0.
        """
        history = self.history
        skipped = self.replay_skip
        if skipped is None:
            start = self.replay_start
            return [(start, history.read_from(start))], 0
        tail = (skipped[1], history.read_from(skipped[1]))
        return [(history.head_start, history.head()), tail], skipped[1] - skipped[0]

    # -- the console side ------------------------------------------------------------

    def console_up(self, device: _ConsoleWriter, description: str = "") -> None:
        """
        The console is open (at start-up, or again after it went down): read it, write
        input to it, and keep its first bytes as the new boot's head.
        """
        if self.closed_reason is not None:
            device.close()
            return
        self._pty = device
        device.set_watched(self.viewer_count > 0)
        if self._continuing:
            self._continuing = False
        else:
            self.history.begin_boot()
            if self.recorder is not None:
                self.recorder.boot(self.history.end)
        if self._went_down:
            self.reopen_count += 1
        self.up = True
        self.state_reason = description or "console opened"
        self.state_since = self._now()
        self._log.info(
            "console up: {description}",
            description=self.state_reason,
            reopens=self.reopen_count,
        )
        self._announce_state()
        if self.running:
            device.startReading()

    def console_down(self, reason: str) -> None:
        """
        The console went away but may come back (it is being retried): keep the clients
        and the history, tell them why. Input queued for the old device is lost with it.
        """
        if self.closed_reason is not None:
            return
        device, self._pty = self._pty, None
        self.up = False
        self._went_down = True
        self.state_reason = reason
        self.state_since = self._now()
        if device is not None and device.pending_input:
            self._log.warn(
                "{count} bytes of input were not taken by the console before it went down",
                count=device.pending_input,
            )
        self._log.info("console down: {reason}", reason=reason)
        self.pacer.cancel()
        self._announce_state()

    def _announce_state(self) -> None:
        for attachment in list(self._attachments):
            attachment.client.console_state(self.up, self.state_reason, self.state_since)

    def when_console_closed(self, callback: Callable[[str], None]) -> None:
        """Call C{callback(reason)} once, when the console is gone for good."""
        if self.closed_reason is not None:
            callback(self.closed_reason)
        else:
            self._on_console_closed.append(callback)

    def console_lost(self, reason: str, close_reason: str | None = None) -> None:
        """
        The console is gone for good: tell every client why (C{close_reason}, default
        "console closed: REASON"), then whoever waits for it.
        """
        if self.closed_reason is not None:
            return
        self._pty = None
        self.up = False
        self.state_reason = reason
        self.state_since = self._now()
        self.closed_reason = reason
        self.pacer.cancel()
        self._log.info(
            "console closed: {reason}; closing {clients} client(s)",
            reason=reason,
            clients=len(self._attachments),
        )
        self._close_all(CLOSE_CONSOLE_CLOSED, close_reason or f"console closed: {reason}")
        for callback in self._on_console_closed:
            callback(reason)

    def read_budget(self) -> int:
        """How many bytes the console may be read now (see L{ReadPacer})."""
        return self.pacer.read_budget()

    def read_again(self) -> None:
        """The pacer let go of a held read: read the console again, if there is one."""
        if self._pty is not None and self.running and self.closed_reason is None:
            self._pty.startReading()

    @property
    def attachments(self) -> list[Attachment]:
        """The clients attached now (do not change the list)."""
        return self._attachments

    @property
    def bytes_in(self) -> int:
        """Input bytes written to the console."""
        return self.input.bytes_in

    def output_received(self, data: bytes, logged: bool = False) -> None:
        """
        The guest wrote C{data}: keep it and send it to every client that is keeping up.

        One L{Chunk} is made and shared, so a WebSocket frame is built once for all.

        @param logged: a read worker already wrote C{data} to the log file.
        """
        if not data:
            return
        now = self.last_output_at = self._seconds()
        chunk = Chunk(self.history.end, data, logged)
        self.history.append(data, now)
        if self.recorder is not None:
            self.recorder.appended(chunk.offset, data, now)
        end = chunk.end
        for attachment in list(self._attachments):
            if attachment.paused or not attachment.attached:
                continue
            if attachment.cursor == chunk.offset:
                attachment.cursor = end
                attachment.client.output(chunk)
            else:
                self._catch_up(attachment)

    # -- the client side -------------------------------------------------------------

    @property
    def viewer_count(self) -> int:
        """How many viewers (WebSocket clients, not the log file) are attached."""
        return sum(1 for a in self._attachments if a.viewer)

    def viewers(self) -> list[tuple[ClientLabel | None, bool]]:
        """Every attached viewer's label and whether it is read-only, oldest first."""
        return [
            (a.label, a.read_only or self.read_only) for a in self._attachments if a.viewer
        ]

    def attach(
        self,
        client: IConsoleClient,
        from_offset: int | None = None,
        viewer: bool = True,
        start: bool = True,
        read_only: bool = False,
        label: ClientLabel | None = None,
    ) -> Attachment:
        """
        Attach C{client} and send it the history from C{from_offset} (default: the
        boot's head and the tail), then live output. If C{from_offset} is no longer
        held, the client is told of the gap first.

        The history is sent and the client becomes live in one step, with no reactor turn
        in between, so no byte is lost or sent twice at the seam.

        @param read_only: discard this client's input (a read-only credential).
        @param start: C{False} to only register the client and return its attachment, so
            that it can be paused while the history goes out; then call L{start}.
        @raise ValueError: C{from_offset} is negative or past the end of the output.
        """
        history = self.history
        if from_offset is None:
            from_offset = self.replay_start
        elif not 0 <= from_offset <= history.end:
            raise ValueError(f"offset {from_offset} is outside the output [0, {history.end}]")
        attachment = Attachment(self, client, from_offset, viewer)
        attachment.read_only = read_only
        attachment.label = label
        attachment.in_head = history.head_start <= from_offset < history.head_end
        self._attachments.append(attachment)
        if viewer:
            # (The log file, attached for the console's life, says so in its own line:
            # logging it here too cost a line per console at a fleet's start and stop.)
            self._log.info(
                "client attached at offset {offset}; {clients} attached, "
                "{history_bytes} bytes of history",
                offset=from_offset,
                clients=self.viewer_count,
                history_bytes=len(history),
            )
            self._announce_viewers()
        if start:
            self.start(attachment)
        return attachment

    def start(self, attachment: Attachment) -> None:
        """Send a newly attached client what it asked for, then keep it live."""
        history = self.history
        cursor = attachment.cursor
        if not history.holds(cursor) and cursor < history.end:
            following = history.next_held(cursor)
            attachment.cursor = following
            attachment.in_head = history.head_start <= following < history.head_end
            self.gaps += 1
            if not attachment.client.gap(cursor, following, "resume"):
                self.detach(attachment)
                return
        self._catch_up(attachment)

    def detach(self, attachment: Attachment) -> None:
        """Forget a client (idempotent)."""
        if not attachment.attached:
            return
        attachment.attached = False
        self._attachments.remove(attachment)
        self.pacer.release()
        if attachment.viewer:
            self._log.info(
                "client detached at offset {offset}; {clients} attached",
                offset=attachment.cursor,
                clients=self.viewer_count,
            )
            self._announce_viewers()

    def announce_action(self, who: str, description: str) -> str:
        """
        Tell every attached client that can hear it (L{IActionNotices}) that C{who} did
        C{description} now; return the time told (ISO 8601, UTC).
        """
        at = self._now()
        for attachment in list(self._attachments):
            client = attachment.client
            if IActionNotices.providedBy(client):
                client.action_done(who, description, at)
        return at

    def _announce_viewers(self) -> None:
        count = self.viewer_count
        if self._pty is not None:
            self._pty.set_watched(count > 0)
        for attachment in list(self._attachments):
            if attachment.viewer:
                attachment.client.clients_changed(count)

    def _catch_up(self, attachment: Attachment) -> None:
        """
        Send C{attachment} what it is missing from the history, step by step, until it
        has everything or its transport pauses it.
        """
        history = self.history
        while attachment.attached and not attachment.paused:
            cursor = attachment.cursor
            end = history.end
            if cursor >= end:
                attachment.in_head = False  # live now: it gets every byte as it comes
                if not attachment.paces and attachment.viewer:
                    attachment.paces = True  # caught up: the guest may wait for it again
                return
            if attachment.in_head and cursor >= history.head_end:
                # The head was sent: on to the tail, past what is not replayed.
                attachment.in_head = False
                tail_start = max(history.next_held(cursor), self.tail_start)
                if cursor < tail_start:
                    attachment.cursor = tail_start
                    attachment.client.skip(cursor, tail_start)
                continue
            if not history.holds(cursor):
                following = history.next_held(cursor)
                self._log.warn(
                    "client fell {lost} bytes behind the history (offset {offset}, "
                    "the next byte held is at {start})",
                    lost=following - cursor,
                    offset=cursor,
                    start=following,
                )
                attachment.cursor = following
                attachment.in_head = history.head_start <= following < history.head_end
                self.gaps += 1
                self.lagging_events += 1
                if not attachment.client.gap(cursor, following, "lagging"):
                    self.detach(attachment)
                    return
                continue
            limit = CATCH_UP_STEP
            if attachment.in_head:
                limit = min(limit, history.head_end - cursor)
            data = history.read_from(cursor, limit)
            attachment.cursor = cursor + len(data)
            attachment.client.output(Chunk(cursor, data))

    def input_received(self, attachment: Attachment, data: bytes) -> str | None:
        """A client typed C{data}: see L{InputPath.received}."""
        return self.input.received(attachment, data, self._pty, self.read_only, self.closed_reason)

    # -- service ---------------------------------------------------------------------

    def _close_all(self, code: int, reason: str, viewers: bool | None = None) -> Deferred[Any]:
        """Close every client (or only the viewers, or only the others)."""
        closing = [
            a.client.close(code, reason)
            for a in list(self._attachments)
            if viewers is None or a.viewer == viewers
        ]
        return DeferredList(closing, consumeErrors=True)

    def startService(self) -> None:
        """Start reading the guest's output."""
        Service.startService(self)
        if self._pty is not None and self.closed_reason is None:
            self._pty.startReading()

    def stopService(self) -> Deferred[Any]:
        """
        Close every viewer with a close frame and wait until they are gone, then close
        the console (restoring its terminal settings), and only then the log file: the
        console is still read during the close handshakes, and what it says then is
        logged too.
        """
        Service.stopService(self)
        self.stopping = True
        self.pacer.cancel()
        done: Deferred[Any] = self._close_all(CLOSE_GOING_AWAY, "server shutting down", True)

        def close_console(result: object) -> Deferred[Any]:
            device, self._pty = self._pty, None
            if device is not None:
                device.close()
            return self._close_all(CLOSE_GOING_AWAY, "server shutting down", False)

        def log_failure(failure: Failure) -> None:
            self._log.failure("while closing clients", failure)

        done.addCallback(close_console)
        done.addErrback(log_failure)
        return done
