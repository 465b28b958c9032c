"""
The input path: what clients type, to the console, bounded and never holding anyone up.

When the guest does not read its input, what is typed waits in the device's write buffer,
at most L{INPUT_BACKLOG} per console; a message that does not fit is refused whole (a
paste is never cut in the middle) and the client is told why, so keystrokes are neither
buffered without bound nor silently dropped, and no client's connection is ever paused
for it (a viewer who never typed keeps receiving output, pings and acks).
"""

from __future__ import annotations

from typing import Protocol

from twisted.logger import Logger

#: Most input bytes held for a guest that is not reading its input, per console. A
#: message is queued whole or refused whole, so a paste is never cut in the middle.
INPUT_BACKLOG = 1024 * 1024

#: Why input was refused (v1 clients are told, as C{input-discarded}'s C{reason}).
REFUSED_READ_ONLY = "read-only"
REFUSED_CONSOLE_DOWN = "console down"
REFUSED_CONSOLE_CLOSED = "console closed"
REFUSED_BACKLOG_FULL = "input backlog full"


class InputSender(Protocol):
    """What the input path reads and records on the client that typed (its attachment)."""

    read_only: bool
    input_discarded: int
    refused_for: str | None


class InputDevice(Protocol):
    """What the input path needs of the console device: a buffered write and its backlog."""

    @property
    def pending_input(self) -> int: ...

    def write(self, data: bytes) -> None: ...


class InputPath:
    """
    One console's input: queued for the device whole or refused whole, and counted.

    @ivar bytes_in: input bytes written to the console (for the index and metrics).
    """

    _log = Logger()

    def __init__(self) -> None:
        self.bytes_in = 0

    def received(
        self,
        attachment: InputSender,
        data: bytes,
        device: InputDevice | None,
        read_only: bool,
        closed_reason: str | None,
    ) -> str | None:
        """
        A client typed C{data}: queue it for C{device} whole, or refuse it whole and
        count it (read-only, console down or gone, or the input backlog full).

        @return: why the input was refused, or C{None} if it was queued.
        """
        if not data:
            return None
        reason: str | None = None
        if read_only or attachment.read_only:
            reason = REFUSED_READ_ONLY
        elif closed_reason is not None:
            reason = REFUSED_CONSOLE_CLOSED
        elif device is None:
            reason = REFUSED_CONSOLE_DOWN
        elif device.pending_input + len(data) > INPUT_BACKLOG:
            reason = REFUSED_BACKLOG_FULL
        if reason is None:
            assert device is not None
            device.write(data)
            self.bytes_in += len(data)
            attachment.refused_for = None
            return None
        attachment.input_discarded += len(data)
        if attachment.refused_for != reason:
            attachment.refused_for = reason  # logged once per reason, not per message
            self._log.info(
                "input discarded ({why}): {count} bytes",
                why=reason,
                count=len(data),
                total=attachment.input_discarded,
            )
        return reason
