"""
The console log file: every byte of output, exactly once, as another client.

The file is opened for append at start-up (a failure there is fatal: the operator asked
for a log), reopened on SIGHUP so logrotate can move it away, and written directly with
one write(2) per chunk: regular files cannot join epoll, and the chunks are already
coalesced per reactor turn. A write error (a full disk) is logged once and the console
carries on; the bytes it missed stay in the history.
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

    def startService(self) -> None:
        Service.startService(self)
        if self._fd < 0:
            self._fd = _open_for_append(self.path)
        self._attachment = self.multiplexer.attach(
            self, from_offset=self.multiplexer.history.end, viewer=False
        )
        self._log.info("logging console output to {path}", path=self.path)

    def stopService(self) -> None:
        Service.stopService(self)
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
        if self._fd < 0:
            return
        view = memoryview(chunk.data)
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
                return
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

    def gap(self, lost_from: int, lost_to: int, reason: str) -> bool:
        # Never paused, so never behind; if it ever were, carry on with what is left.
        return True

    def clients_changed(self, count: int) -> None:
        pass

    def pause_input(self) -> None:
        pass

    def resume_input(self) -> None:
        pass

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
