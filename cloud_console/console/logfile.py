"""
The console log file: every byte of output, exactly once, as another client.

The file is opened for append at start-up (a failure there is fatal: the operator asked
for a log), reopened on SIGHUP so logrotate can move it away, and written directly with
one write(2) per chunk: regular files cannot join epoll, and the chunks are already
coalesced per reactor turn. A write error (a full disk) is logged once and the console
carries on; the bytes it missed stay in the history.

When the console goes down and comes back (C{--reopen}), one timestamped marker line
goes in the file for each, in conserver's style (C{[-- console down: ... -- TIME --]}):
the file tells the whole story while the clients' byte stream stays the guest's alone.
With C{--log-timestamps MINUTES}, a mark line (C{[-- MARK -- TIME --]}) goes in after
that many minutes of silence, and another when output resumes after it, so a log read
later says when things happened.
"""

from __future__ import annotations

import os

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from .multiplexer import Attachment, Chunk, IConsoleClient, Multiplexer, iso_time
from .writing import write_all


class LogFileError(Exception):
    """The log file cannot be opened: a message an operator can act on."""


def _open_for_append(path: str) -> int:
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as e:
        raise LogFileError(f"cannot open log file {path}: {e.strerror}") from e


@implementer(IConsoleClient)
class LogFileSink(Service):
    """
    Appends all console output to a file.

    Attached to the multiplexer from the moment the service starts, so the file receives
    what the guest writes from then on; never paused, never lagging.
    """

    _log = Logger()

    def __init__(
        self,
        path: str,
        multiplexer: Multiplexer,
        mark_after: float = 0.0,
        clock: IReactorTime | None = None,
    ) -> None:
        """
        @param mark_after: seconds of silence after which a MARK line is written (0:
            never); needs C{clock}.
        """
        self.path = path
        self.multiplexer = multiplexer
        self._fd = _open_for_append(path)
        self._attachment: Attachment | None = None
        self._failing = False
        self._lost_while_failing = 0
        self.bytes_written = 0
        self.bytes_lost = 0
        self._at_line_start = True
        self.clock = clock
        self.mark_after = mark_after if clock is not None else 0.0
        #: When the guest last wrote (or logging began), on C{clock}.
        self._last_output = 0.0
        #: Whether a silence was marked: the next output gets a mark of its own first.
        self._silence_marked = False
        self._mark_call: IDelayedCall | None = None

    def startService(self) -> None:
        Service.startService(self)
        if self._fd < 0:
            self._fd = _open_for_append(self.path)
        self._attachment = self.multiplexer.attach(
            self, from_offset=self.multiplexer.history.end, viewer=False
        )
        self._log.info("logging console output to {path}", path=self.path)
        if self.clock is not None:
            self._last_output = self.clock.seconds()
        self._watch_silence()

    def set_mark_after(self, seconds: float) -> None:
        """Change the silence that gets a MARK line (a reload); 0 turns marks off."""
        if self.clock is None:
            return
        if self.mark_after <= 0:
            self._last_output = self.clock.seconds()  # not tracked while marks were off
        self.mark_after = seconds
        self._cancel_mark()
        if self.running:
            self._watch_silence()

    def _watch_silence(self) -> None:
        """Wake up when the silence would be C{mark_after} long (if it still is then)."""
        if self.clock is None or self.mark_after <= 0 or self._mark_call is not None:
            return
        if self._silence_marked or self._fd < 0:
            return
        delay = self._last_output + self.mark_after - self.clock.seconds()
        self._mark_call = self.clock.callLater(max(delay, 0.0), self._silence_check)

    def _silence_check(self) -> None:
        """Still silent that long: mark it; else wait for the rest of the new silence."""
        self._mark_call = None
        assert self.clock is not None
        now = self.clock.seconds()
        if now - self._last_output >= self.mark_after:
            self._mark(now)
            self._silence_marked = True
        else:
            self._watch_silence()

    def _mark(self, when: float) -> None:
        """A conserver-style MARK line, on a line of its own."""
        self._line(f"[-- MARK -- {iso_time(when)} --]")

    def _cancel_mark(self) -> None:
        call, self._mark_call = self._mark_call, None
        if call is not None and call.active():
            call.cancel()

    def stopService(self) -> None:
        """
        Stop logging and close the file; but when the multiplexer is stopping too, leave
        the file open: the multiplexer closes it (L{close}) once the viewers are gone
        and the console is closed, so what the guest says during the viewers' close
        handshakes is logged too.
        """
        Service.stopService(self)
        self._cancel_mark()
        if not self.multiplexer.stopping:
            self._close_file()

    def worker_descriptor(self) -> int | None:
        """
        The file for a read worker to write the console's output to, or C{None} when this
        sink must see each chunk before it is written: MARK lines are on (the mark when
        output resumes goes before it), or the file is failing (the error is told here).
        """
        if self._fd < 0 or self.mark_after > 0 or self._failing:
            return None
        return self._fd

    def reopen(self) -> None:
        """
        Reopen the file by name (after logrotate moved it away). If that fails, keep
        writing to the old one and say so.
        """
        try:
            new_fd = _open_for_append(self.path)
        except LogFileError as e:
            self._log.error("log file not reopened: {error}", error=str(e))
            return
        old_fd, self._fd = self._fd, new_fd
        if old_fd >= 0:
            os.close(old_fd)
        self._log.info("log file {path} reopened", path=self.path)

    # IConsoleClient

    def output(self, chunk: Chunk) -> None:
        if self.mark_after > 0:
            assert self.clock is not None
            self._last_output = now = self.clock.seconds()
            if self._silence_marked:
                self._silence_marked = False
                self._mark(now)
            self._watch_silence()
        if chunk.logged:
            self.bytes_written += len(chunk.data)
            self._at_line_start = chunk.data.endswith(b"\n")
        elif self._write(chunk.data):
            self._at_line_start = chunk.data.endswith(b"\n")

    def _write(self, data: bytes) -> bool:
        """Write all of C{data}; C{False} (logged once) if the file refused it."""
        if self._fd < 0:
            return False
        written, error = write_all(self._fd, data)
        self.bytes_written += written
        if error is not None:
            self.bytes_lost += len(data) - written
            self._lost_while_failing += len(data) - written
            if not self._failing:
                self._failing = True
                self._log.error(
                    "cannot write log file {path}: {error}; output is not being "
                    "logged until a write succeeds (bytes stay in the history)",
                    path=self.path,
                    error=error.strerror,
                )
            return False
        if self._failing:
            self._failing = False
            self._log.info(
                "log file {path} writable again; {lost} bytes were not logged",
                path=self.path,
                lost=self._lost_while_failing,
            )
            self._lost_while_failing = 0
        return True

    def gap(self, lost_from: int, lost_to: int, reason: str) -> bool:
        # Never paused, so never behind; if it ever were, carry on with what is left.
        return True

    def skip(self, skip_from: int, skip_to: int) -> None:
        # Attached at the end, so it never replays the head.
        pass

    def clients_changed(self, count: int) -> None:
        pass

    def console_state(self, up: bool, reason: str, since: str) -> None:
        """One marker line, on a line of its own, per console down and up."""
        state = "up" if up else "down"
        self._line(f"[-- console {state}: {reason} -- {since} --]")

    def _line(self, text: str) -> None:
        """A marker line of our own, on a line of its own."""
        line = (text + "\r\n").encode("utf-8", "replace")
        if not self._at_line_start:
            line = b"\r\n" + line
        if self._write(line):
            self._at_line_start = True

    def close(self, code: int, reason: str) -> Deferred[None]:
        self._close_file()
        return succeed(None)

    def _close_file(self) -> None:
        self._cancel_mark()
        if self._attachment is not None:
            self._attachment.detach()
            self._attachment = None
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
