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
"""

from __future__ import annotations

import os

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from .multiplexer import Attachment, Chunk, IConsoleClient, Multiplexer


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

    def __init__(self, path: str, multiplexer: Multiplexer) -> None:
        self.path = path
        self.multiplexer = multiplexer
        self._fd = _open_for_append(path)
        self._attachment: Attachment | None = None
        self._failing = False
        self._lost_while_failing = 0
        self.bytes_written = 0
        self.bytes_lost = 0
        self._at_line_start = True

    def startService(self) -> None:
        Service.startService(self)
        if self._fd < 0:
            self._fd = _open_for_append(self.path)
        self._attachment = self.multiplexer.attach(
            self, from_offset=self.multiplexer.history.end, viewer=False
        )
        self._log.info("logging console output to {path}", path=self.path)

    def stopService(self) -> None:
        """
        Stop logging and close the file; but when the multiplexer is stopping too, leave
        the file open: the multiplexer closes it (L{close}) once the viewers are gone
        and the console is closed, so what the guest says during the viewers' close
        handshakes is logged too.
        """
        Service.stopService(self)
        if not self.multiplexer.stopping:
            self._close_file()

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
        if self._write(chunk.data):
            self._at_line_start = chunk.data.endswith(b"\n")

    def _write(self, data: bytes) -> bool:
        """Write all of C{data}; C{False} (logged once) if the file refused it."""
        if self._fd < 0:
            return False
        view = memoryview(data)
        while view:
            try:
                written = os.write(self._fd, view)
            except InterruptedError:
                continue
            except OSError as e:
                self.bytes_lost += len(view)
                self._lost_while_failing += len(view)
                if not self._failing:
                    self._failing = True
                    self._log.error(
                        "cannot write log file {path}: {error}; output is not being "
                        "logged until a write succeeds (bytes stay in the history)",
                        path=self.path,
                        error=e.strerror,
                    )
                return False
            self.bytes_written += written
            view = view[written:]
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
        line = f"[-- console {state}: {reason} -- {since} --]\r\n".encode("utf-8", "replace")
        if not self._at_line_start:
            line = b"\r\n" + line
        if self._write(line):
            self._at_line_start = True

    def close(self, code: int, reason: str) -> Deferred[None]:
        self._close_file()
        return succeed(None)

    def _close_file(self) -> None:
        if self._attachment is not None:
            self._attachment.detach()
            self._attachment = None
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
