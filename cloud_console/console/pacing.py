"""
Reading the guest at the pace of the viewers that keep up.

The console is read only as far as every paused viewer still finds its next byte in the
history (the ring), and not at all while every pacing viewer is paused: then output waits
in the pty and goes out framed once for all when one can take it. A viewer that makes no
progress for C{max_stall} seconds while it holds the reading back stops pacing the guest
(it then falls behind and learns of the gap), so one stuck browser delays the guest and
the others by at most that, once; it paces again once it has caught up.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from .history import History


class PacedViewer(Protocol):
    """What the pacer reads and sets on a viewer (an attachment)."""

    cursor: int
    paces: bool
    in_head: bool

    @property
    def paused(self) -> bool: ...


class PacedConsole(Protocol):
    """What the pacer needs of its console (the multiplexer): the ring, the viewers, reading."""

    @property
    def history(self) -> History: ...

    @property
    def tail_start(self) -> int: ...

    @property
    def attachments(self) -> Sequence[PacedViewer]: ...

    def read_again(self) -> None: ...


class ReadPacer:
    """How far one console may be read now, and the stall timer that bounds the wait."""

    _log = Logger()

    def __init__(self, multiplexer: PacedConsole, clock: IReactorTime | None, max_stall: float) -> None:
        self.multiplexer = multiplexer
        self.clock = clock
        self.max_stall = max_stall
        self._reading_held = False
        self._stall_call: IDelayedCall | None = None

    def read_budget(self) -> int:
        """
        How many bytes the console may be read now: as many as keep every pacing
        viewer's next byte in the history. At 0 the reading is held (the caller stops
        reading) until a viewer moves on, or for at most C{max_stall} seconds.
        """
        budget = self._room()
        if budget <= 0 and not self._reading_held:
            if self.clock is None or self.max_stall <= 0:
                self._stop_waiting_for_stalled()
                return max(self._room(), 0)
            self._reading_held = True
            self._stall_call = self.clock.callLater(self.max_stall, self._stall_expired)
        return max(budget, 0)

    def _pacing_cursor(self, attachment: PacedViewer) -> int:
        """
        Where a viewer's stream goes on in the ring: its cursor, or, while it is still
        being sent the boot's head, the tail it will skip to (so a new viewer reading
        the head never holds the guest up).
        """
        cursor = attachment.cursor
        if attachment.in_head and cursor < self.multiplexer.history.start:
            return self.multiplexer.tail_start
        return cursor

    def _room(self) -> int:
        """
        Bytes until the first pacing viewer's next byte would leave the history; none
        while every pacing viewer is paused, so that output waits in the pty and goes out
        on the shared path (one frame for all) once a viewer can take it.
        """
        history = self.multiplexer.history
        capacity, end = history.capacity, history.end
        room = capacity
        pacing = live = False
        for attachment in self.multiplexer.attachments:
            if attachment.paces:
                pacing = True
                if attachment.paused:
                    room = min(room, capacity - (end - self._pacing_cursor(attachment)))
                else:
                    live = True
        if pacing and not live:
            return 0
        return room

    def _stop_waiting_for_stalled(self) -> None:
        """The viewers that hold the reading back no longer pace the guest."""
        history = self.multiplexer.history
        attachments = self.multiplexer.attachments
        everyone_paused = not any(a.paces and not a.paused for a in attachments)
        for attachment in attachments:
            if attachment.paces and attachment.paused:
                room = history.capacity - (history.end - self._pacing_cursor(attachment))
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
        self.release()

    def cancel(self) -> None:
        """Forget a held read (the console went down, or the service stops)."""
        self._reading_held = False
        if self._stall_call is not None:
            if self._stall_call.active():
                self._stall_call.cancel()
            self._stall_call = None

    def release(self) -> None:
        """Read the console again if it was held and there is room now."""
        if not self._reading_held or self._room() <= 0:
            return
        self.cancel()
        self.multiplexer.read_again()
