"""
The multiplexer: one console, its history, and every client attached to it.

Output read from the pty is appended to the L{History} and handed to each attached client
as a L{Chunk}. A client that cannot keep up is I{paused}: it keeps only a cursor (an
offset into the history) and catches up from the history when it is resumed, so the
history is the only queue and nothing is copied per client. A client whose cursor has
fallen out of the history learns of the gap; what it does then (close, or reset and
replay) is its own business.

The guest is read at the pace of the viewers that keep up, as far as the history allows:
the pty is read only as far as every paused viewer still finds its next byte in the
history. A viewer that makes no progress for C{max_stall} seconds while it holds the
reading back stops pacing the guest (it then falls behind and learns of the gap), so one
stuck browser delays the guest and the others by at most that, once; it paces again once
it has caught up.

Input from any client goes to the pty. When the guest stops reading its input, the pty's
write buffer fills and the multiplexer pauses every client's I{input} (their transports
stop reading), so keystrokes are neither buffered without bound nor dropped.
"""

from __future__ import annotations

import secrets
from typing import Any, Callable, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from .history import History

#: How much history one catch-up step hands a client at a time. Large enough that a
#: catching-up client costs few calls, small enough that the transport can pause it
#: before it buffers much more than its limit.
CATCH_UP_STEP = 64 * 1024


class Chunk:
    """
    A run of output at a known offset, shared by every client that is sent it.

    Clients that need the bytes framed (a WebSocket message) ask L{framed} with a key for
    their framing; the first asks builds it, every other client reuses it, so each chunk is
    encoded once per framing, not once per client.
    """

    __slots__ = ("offset", "data", "_framed")

    def __init__(self, offset: int, data: bytes) -> None:
        self.offset = offset
        self.data = data
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

    def clients_changed(count: int) -> None:
        """The number of attached viewers changed."""

    def pause_input() -> None:
        """The pty is not taking input: stop reading input from the peer."""

    def resume_input() -> None:
        """The pty takes input again."""

    def close(code: int, reason: str) -> Deferred[None]:
        """Close the client; the Deferred fires once it is gone."""


class ConsoleClosed(Exception):
    """The pty went away (the VM stopped)."""


class _PtyWriter(Protocol):
    """What the multiplexer needs of the pty: a buffered write and a producer slot."""

    def write(self, data: bytes) -> None: ...

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None: ...

    def startReading(self) -> None: ...

    def stopReading(self) -> None: ...

    def close(self) -> None: ...


#: Close codes sent to WebSocket clients, documented in the README.
CLOSE_LAGGING = 4000
CLOSE_CONSOLE_CLOSED = 4001
CLOSE_GOING_AWAY = 1001


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
            self.multiplexer._release_reading()

    def send_input(self, data: bytes) -> None:
        """Write what this client typed to the pty."""
        self.multiplexer.input_received(self, data)

    def detach(self) -> None:
        """Stop sending to this client."""
        self.multiplexer.detach(self)


@implementer(IPushProducer)
class _InputGate:
    """
    Registered as the pty's producer: when the guest does not drain its input, the pty's
    write buffer fills and every client stops being read, so input waits in the peers'
    sockets (bounded by TCP) instead of in our memory.
    """

    def __init__(self, multiplexer: Multiplexer) -> None:
        self.multiplexer = multiplexer

    def pauseProducing(self) -> None:
        self.multiplexer._set_input_paused(True)

    def resumeProducing(self) -> None:
        self.multiplexer._set_input_paused(False)

    def stopProducing(self) -> None:
        # The pty is closing; input is discarded from now on (see input_received).
        pass


class Multiplexer(Service):
    """
    Keeps the history and fans output out to every attached client.

    @ivar history: the ring of recent output.
    @ivar read_only: discard (and count) every client's input.
    @ivar session: names this run of the server; offsets from another run (before a
        restart) mean nothing here, so a resuming client must name the session too.
    """

    _log = Logger()

    def __init__(
        self,
        history_size: int,
        read_only: bool = False,
        clock: IReactorTime | None = None,
        max_stall: float = 0.1,
        lag_window: int = 0,
    ) -> None:
        # The ring is the replayed history, or the lag window if that is larger: slow
        # viewers catch up from it, new ones are sent only the last history_size bytes.
        self.history = History(max(history_size, lag_window))
        self.replay_size = history_size
        self.session = secrets.token_hex(8)
        self.clock = clock
        self.max_stall = max_stall
        self._reading_held = False
        self._stall_call: IDelayedCall | None = None
        self.read_only = read_only
        self._attachments: list[Attachment] = []
        self._pty: _PtyWriter | None = None
        self._input_paused = False
        self._closing = False
        self.closed_reason: str | None = None
        self._on_console_closed: list[Callable[[str], None]] = []

    @property
    def replay_start(self) -> int:
        """Offset of the oldest byte a new client is sent (the last history_size)."""
        history = self.history
        return max(history.start, history.end - self.replay_size)

    def replay(self) -> bytes:
        """The history a new client gets, oldest first."""
        return self.history.read_from(self.replay_start)

    # -- the pty side ----------------------------------------------------------------

    def connect_pty(self, pty: _PtyWriter) -> None:
        """Use C{pty} for input, and pause clients' input when its buffer fills."""
        self._pty = pty
        pty.registerProducer(_InputGate(self), True)

    def when_console_closed(self, callback: Callable[[str], None]) -> None:
        """Call C{callback(reason)} once, when the pty goes away (at once if it has)."""
        if self.closed_reason is not None:
            callback(self.closed_reason)
        else:
            self._on_console_closed.append(callback)

    def read_budget(self) -> int:
        """
        How many bytes the pty may be read now: as many as keep every pacing viewer's
        next byte in the history. At 0 the reading is held (the caller stops reading)
        until a viewer moves on, or for at most C{max_stall} seconds.
        """
        budget = self._room()
        if budget <= 0 and not self._reading_held:
            if self.clock is None or self.max_stall <= 0:
                self._stop_waiting_for_stalled()
                return max(self._room(), 0)
            self._reading_held = True
            self._stall_call = self.clock.callLater(self.max_stall, self._stall_expired)
        return max(budget, 0)

    def _room(self) -> int:
        """
        Bytes until the first pacing viewer's next byte would leave the history; none
        while every pacing viewer is paused, so that output waits in the pty and goes out
        on the shared path (one frame for all) once a viewer can take it.
        """
        history = self.history
        capacity, end = history.capacity, history.end
        room = capacity
        pacing = live = False
        for attachment in self._attachments:
            if attachment.paces:
                pacing = True
                if attachment.paused:
                    room = min(room, capacity - (end - attachment.cursor))
                else:
                    live = True
        if pacing and not live:
            return 0
        return room

    def _stop_waiting_for_stalled(self) -> None:
        """The viewers that hold the reading back no longer pace the guest."""
        history = self.history
        everyone_paused = not any(a.paces and not a.paused for a in self._attachments)
        for attachment in self._attachments:
            if attachment.paces and attachment.paused:
                room = history.capacity - (history.end - attachment.cursor)
                if everyone_paused or room <= 0:
                    attachment.paces = False
                    self._log.warn(
                        "client at offset {offset} made no progress for {stall} s; the "
                        "console no longer waits for it",
                        offset=attachment.cursor,
                        stall=self.max_stall,
                    )

    def _stall_expired(self) -> None:
        self._stall_call = None
        self._stop_waiting_for_stalled()
        self._release_reading()

    def _release_reading(self) -> None:
        """Read the pty again if it was held and there is room now."""
        if not self._reading_held or self._room() <= 0:
            return
        self._reading_held = False
        if self._stall_call is not None:
            self._stall_call.cancel()
            self._stall_call = None
        if self._pty is not None and self.running and self.closed_reason is None:
            self._pty.startReading()

    def output_received(self, data: bytes) -> None:
        """
        The guest wrote C{data}: keep it and send it to every client that is keeping up.

        One L{Chunk} is made and shared, so a WebSocket frame is built once for all.
        """
        if not data:
            return
        chunk = Chunk(self.history.end, data)
        self.history.append(data)
        end = chunk.end
        for attachment in list(self._attachments):
            if attachment.paused or not attachment.attached:
                continue
            if attachment.cursor == chunk.offset:
                attachment.cursor = end
                attachment.client.output(chunk)
            else:
                self._catch_up(attachment)

    def console_lost(self, reason: str) -> None:
        """The pty is gone: tell every client why, then whoever waits for it."""
        if self.closed_reason is not None:
            return
        self.closed_reason = reason
        self._log.info(
            "console closed: {reason}; closing {clients} client(s)",
            reason=reason,
            clients=len(self._attachments),
        )
        self._close_all(CLOSE_CONSOLE_CLOSED, f"console closed: {reason}")
        for callback in self._on_console_closed:
            callback(reason)

    # -- the client side -------------------------------------------------------------

    @property
    def viewer_count(self) -> int:
        """How many viewers (WebSocket clients, not the log file) are attached."""
        return sum(1 for a in self._attachments if a.viewer)

    def attach(
        self,
        client: IConsoleClient,
        from_offset: int | None = None,
        viewer: bool = True,
        start: bool = True,
        read_only: bool = False,
    ) -> Attachment:
        """
        Attach C{client} and send it the history from C{from_offset} (default: all of
        it), then live output. If C{from_offset} has already left the history, the
        client is told of the gap first.

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
        self._attachments.append(attachment)
        if self._input_paused:
            client.pause_input()
        self._log.info(
            "client attached at offset {offset}; {clients} attached, "
            "{history_bytes} bytes of history",
            offset=from_offset,
            clients=len(self._attachments),
            history_bytes=len(history),
        )
        if viewer:
            self._announce_viewers()
        if start:
            self.start(attachment)
        return attachment

    def start(self, attachment: Attachment) -> None:
        """Send a newly attached client what it asked for, then keep it live."""
        history = self.history
        if attachment.cursor < history.start:
            lost_from = attachment.cursor
            attachment.cursor = history.start
            if not attachment.client.gap(lost_from, history.start, "resume"):
                self.detach(attachment)
                return
        self._catch_up(attachment)

    def detach(self, attachment: Attachment) -> None:
        """Forget a client (idempotent)."""
        if not attachment.attached:
            return
        attachment.attached = False
        self._attachments.remove(attachment)
        self._release_reading()
        self._log.info(
            "client detached at offset {offset}; {clients} attached",
            offset=attachment.cursor,
            clients=len(self._attachments),
        )
        if attachment.viewer:
            self._announce_viewers()

    def _announce_viewers(self) -> None:
        count = self.viewer_count
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
                if not attachment.paces and attachment.viewer:
                    attachment.paces = True  # caught up: the guest may wait for it again
                return
            start = history.start
            if cursor < start:
                self._log.warn(
                    "client fell {lost} bytes behind the history (offset {offset}, "
                    "history starts at {start})",
                    lost=start - cursor,
                    offset=cursor,
                    start=start,
                )
                attachment.cursor = start
                if not attachment.client.gap(cursor, start, "lagging"):
                    self.detach(attachment)
                    return
                continue
            data = history.read_from(cursor, CATCH_UP_STEP)
            attachment.cursor = cursor + len(data)
            attachment.client.output(Chunk(cursor, data))

    def input_received(self, attachment: Attachment, data: bytes) -> None:
        """
        A client typed C{data}: write it to the pty, unless the session is read-only or
        the console has gone, in which case it is counted and discarded.
        """
        if not data:
            return
        read_only = self.read_only or attachment.read_only
        if read_only or self._pty is None or self.closed_reason is not None:
            first = attachment.input_discarded == 0
            attachment.input_discarded += len(data)
            if first:
                self._log.info(
                    "input discarded ({why}): {count} bytes",
                    why="read-only" if read_only else "console closed",
                    count=len(data),
                )
            return
        self._pty.write(data)

    def _set_input_paused(self, paused: bool) -> None:
        if paused == self._input_paused:
            return
        self._input_paused = paused
        self._log.info(
            "pty input {state}", state="backlogged: pausing clients" if paused else "drained"
        )
        for attachment in list(self._attachments):
            if paused:
                attachment.client.pause_input()
            else:
                attachment.client.resume_input()

    # -- service ---------------------------------------------------------------------

    def _close_all(self, code: int, reason: str) -> Deferred[Any]:
        closing = [a.client.close(code, reason) for a in list(self._attachments)]
        return DeferredList(closing, consumeErrors=True)

    def startService(self) -> None:
        """Start reading the guest's output."""
        Service.startService(self)
        if self._pty is not None and self.closed_reason is None:
            self._pty.startReading()

    def stopService(self) -> Deferred[Any]:
        """
        Close every client with a close frame, wait until they are gone, then close the
        pty (restoring its terminal settings).
        """
        Service.stopService(self)
        done: Deferred[Any] = self._close_all(CLOSE_GOING_AWAY, "server shutting down")

        def close_pty(result: object) -> None:
            if self._pty is not None:
                self._pty.close()

        def log_failure(failure: Failure) -> None:
            self._log.failure("while closing clients", failure)

        done.addCallback(close_pty)
        done.addErrback(log_failure)
        return done
