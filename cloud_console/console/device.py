"""
The guest's console device: a pty slave, or a unix socket the VMM listens on, opened once
and read and written through the reactor.

Only one process should hold a console: two readers would each get part of the guest's
output. A pty is opened once, read-write, non-blocking, without making it our
controlling terminal, and (by default) put in raw mode so the kernel's line discipline
never echoes, translates or swallows a byte behind the guest's back. A socket is
connected and used as it is. Both are one descriptor read until it has no more and
written without blocking, so one L{ConsoleDevice} serves both.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import termios
import time
import tty
from typing import Any, Callable

from twisted.internet import error, fdesc, main
from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IReactorFDSet
from twisted.logger import Logger
from twisted.python.failure import Failure

from .readers import ReadWorkers
from .telnet import BREAK, TelnetOutput, escape_input

#: Bytes asked for per read(2). In raw mode the n_tty line discipline hands out at most
#: about 4 KiB per call most of the time, so the size matters less than reading until
#: EAGAIN; a larger buffer lets the occasional big read through in one call.
READ_SIZE = 64 * 1024

#: Most bytes read in one wake-up before yielding to the reactor, so a guest flooding
#: its console cannot starve the clients (or the input path) of the reactor's time.
READ_PER_TURN = 256 * 1024

#: Most bytes a console reads in one wake-up while another console is active too. Every
#: console of a process shares one reactor turn: a keystroke and its echo on a quiet
#: console each wait for the turn a flooding neighbour is in, so a flood reads in small
#: bites while anyone else is busy (measured on 2 cores: the neighbour's echo p50 went
#: from 3.8 ms at 256 KiB to 2.2 ms at 16 KiB) and in big ones, for throughput, alone.
READ_PER_TURN_SHARED = 16 * 1024

#: Seconds a console counts as active after it last read something.
ACTIVE_WINDOW = 0.1


class TurnShare:
    """
    Which consoles of the process read lately, so that each can size its bites
    (L{READ_PER_TURN} alone, L{READ_PER_TURN_SHARED} beside another active console).

    Only the last two consoles that read are remembered: asking is O(1), whatever the
    number of consoles, on the path every read takes.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: object | None = None
        self._last_at = float("-inf")
        self._other: object | None = None
        self._other_at = float("-inf")

    def budget(self, device: object) -> int:
        """How much C{device} may read in this wake-up."""
        now = self._clock()
        other_at = self._other_at if device is self._last else self._last_at
        return READ_PER_TURN_SHARED if now - other_at < ACTIVE_WINDOW else READ_PER_TURN

    def read(self, device: object) -> None:
        """C{device} read something just now."""
        now = self._clock()
        if device is self._last:
            self._last_at = now
        else:
            self._other, self._other_at = self._last, self._last_at
            self._last, self._last_at = device, now


#: The process's consoles share the reactor, so by default they share one account of it.
TURN_SHARE = TurnShare()

#: Who reads a device: this process (through the reactor), a read worker, or a worker
#: that was asked to give it back and has not answered yet.
_HERE, _WORKER, _RETURNING = "here", "worker", "returning"


class ConsoleOpenError(Exception):
    """The console could not be opened: a message an operator can act on."""


def open_tty(path: str, raw: bool) -> tuple[int, list[Any] | None]:
    """
    Open C{path} read-write, non-blocking, close-on-exec and without making it the
    controlling terminal; refuse anything that is not a terminal.

    @return: the descriptor and the terminal attributes to restore on close (C{None}
        when C{raw} is false and nothing was changed).
    @raise ConsoleOpenError: the path does not exist, is not a terminal, or cannot be opened.
    """
    flags = os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise ConsoleOpenError(f"cannot open {path}: {e.strerror}") from e
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISCHR(mode) or not os.isatty(fd):
            raise ConsoleOpenError(f"{path} is not a terminal (pty) device")
        saved: list[Any] | None = None
        if raw:
            saved = termios.tcgetattr(fd)
            tty.setraw(fd, termios.TCSANOW)
    except ConsoleOpenError:
        os.close(fd)
        raise
    except (OSError, termios.error) as e:
        os.close(fd)
        raise ConsoleOpenError(f"cannot set up {path}: {e}") from e
    return fd, saved


def connect_unix(path: str, timeout: float = 2.0) -> int:
    """
    Connect to the unix stream socket at C{path} (a VMM's serial console socket) and
    return the connected descriptor, non-blocking and close-on-exec.

    @raise ConsoleOpenError: nothing listens there, or it is not a socket.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        why = e.strerror or str(e)
        raise ConsoleOpenError(f"cannot connect to unix socket {path}: {why}") from e
    return sock.detach()


class ConsoleDevice(FileDescriptor):
    """
    Reads the guest's output and writes its input on one descriptor (a pty or a
    connected unix socket).

    One selectable for both directions: the epoll reactor keeps one object per
    descriptor, so a separate reader and writer on the same fd would steal each other's
    events. Writes are buffered by L{FileDescriptor} and flushed as the guest reads;
    L{pending_input} says how much is waiting, so the multiplexer can bound it.
    """

    _log = Logger()

    def __init__(
        self,
        fd: int,
        name: str,
        on_output: Callable[..., None],
        on_lost: Callable[[str], None],
        saved_attributes: list[Any] | None = None,
        reactor: IReactorFDSet | None = None,
        read_budget: Callable[[], int] | None = None,
        turn_share: TurnShare | None = None,
        telnet: bool = False,
        workers: ReadWorkers | None = None,
        log_descriptor: Callable[[], int | None] = lambda: None,
    ) -> None:
        """
        @param telnet: the descriptor speaks telnet (QEMU's C{telnet=on} socket): its
            opening negotiation is stripped from the output, input 0xFF doubled, and
            L{send_break} works.
        @param workers: read workers that may read this device while nobody watches it
            (see L{set_watched}); not for a telnet device, whose output is parsed here.
        @param log_descriptor: the console's log file, if a worker may write it (then
            C{on_output} is called with C{logged=True} for what the worker logged).
        """
        FileDescriptor.__init__(self, reactor)
        self._telnet = TelnetOutput() if telnet else None
        if self._telnet is not None:
            telnet_output = self._telnet.feed
            plain = on_output

            def on_output(data: bytes) -> None:
                data = telnet_output(data)
                if data:
                    plain(data)

        self.fd = fd
        #: What the device is, for messages: "pty /dev/pts/7", "unix socket /run/vm.sock".
        self.name = name
        self._on_output = on_output
        self._on_lost = on_lost
        self._saved_attributes = saved_attributes
        self._closing_on_purpose = False
        self._read_budget = read_budget
        self._pending_input = 0
        self._turn_share = turn_share or TURN_SHARE
        self._workers = workers if not telnet else None
        self.log_descriptor = log_descriptor
        self._reader = _HERE
        self._wants_reading = False
        self._watched = True
        self.connected = 1

    @classmethod
    def open(
        cls,
        path: str,
        raw: bool,
        on_output: Callable[[bytes], None],
        on_lost: Callable[[str], None],
        reactor: IReactorFDSet | None = None,
        read_budget: Callable[[], int] | None = None,
        turn_share: TurnShare | None = None,
    ) -> ConsoleDevice:
        """
        Open the pty at C{path} (see L{open_tty}); reading starts with L{startReading}.

        @param read_budget: asked before each burst how many bytes may be read; at 0 the
            device stops reading until someone calls L{startReading} again.
        """
        fd, saved = open_tty(path, raw)
        device = cls(fd, f"pty {path}", on_output, on_lost, saved, reactor, read_budget, turn_share)
        cls._log.info("pty {path} opened (raw: {raw})", path=path, raw=raw)
        return device

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        """
        Close now, on purpose (shutdown): input still buffered for a guest that is not
        reading is dropped rather than holding the shutdown up, and nobody is told the
        console was lost.
        """
        if self.fd < 0:
            return
        self._closing_on_purpose = True
        self._take_back_for_good()
        self._drain()
        self.stopReading()
        self.stopWriting()
        self.connectionLost(Failure(error.ConnectionDone("closed by cloud-console")))

    def _take_back_for_good(self) -> None:
        """
        The console is closing: if a worker reads it, take it back now, with every byte
        the worker read (the guest's too), and do not read it again afterwards.
        """
        if self._reader != _HERE and self._workers is not None:
            self._wants_reading = False
            self._workers.release_now(self)
            self._reader = _HERE

    def _drain(self) -> None:
        """
        Read what has already arrived (up to L{READ_PER_TURN}), so that closing on
        purpose loses none of it: a socket's unread bytes die with it, and a restart's
        saved history then ends where the guest's output did. (Whether it hung up
        meanwhile does not matter: it is being closed.)
        """
        data, _ = self._read_burst(READ_PER_TURN)
        if data:
            self._on_output(data)

    # -- who reads: this process or a read worker -------------------------------------

    def set_watched(self, watched: bool) -> None:
        """
        Whether anyone watches the console now. Unwatched, a read worker (if there are
        any) reads it; watched, this process does, so a viewer's echo and pacing take no
        detour. The hand-over is ordered (see L{cloud_console.console.readers}).
        """
        self._watched = watched
        if self._workers is None:
            return
        if watched and self._reader == _WORKER:
            self._reader = _RETURNING
            self._workers.release(self)
        elif not watched and self._reader == _HERE and self._wants_reading and self.fd >= 0:
            FileDescriptor.stopReading(self)
            self.startReading()

    @property
    def read_by_worker(self) -> bool:
        """Whether a read worker holds the reading (or is giving it back)."""
        return self._reader != _HERE

    def startReading(self) -> None:
        self._wants_reading = True
        if self._reader != _HERE:
            return  # a worker reads it, or is giving it back: see remote_released
        workers = self._workers
        if workers is not None and not self._watched and self.fd >= 0 and workers.adopt(self):
            self._reader = _WORKER
            return
        FileDescriptor.startReading(self)

    def stopReading(self) -> None:
        self._wants_reading = False
        if self._reader == _WORKER and self._workers is not None:
            self._reader = _RETURNING
            self._workers.release(self)
        FileDescriptor.stopReading(self)

    def remote_output(self, data: bytes, logged: bool) -> None:
        """A read worker read C{data} from this console (and logged it: C{logged})."""
        if self.fd >= 0:
            self._on_output(data, logged=logged)

    def log_changed(self) -> None:
        """The log file was reopened, or its marks turned on or off: tell the worker."""
        if self._reader == _WORKER and self._workers is not None:
            self._workers.adopt(self)

    def remote_released(self) -> None:
        """The worker gave the reading back: read here from now on, if still wanted."""
        self._reader = _HERE
        if self._wants_reading and self.fd >= 0:
            self.startReading()

    def workers_ready(self) -> None:
        """A read worker can take this console now: it does, if nobody watches it."""
        if not self._watched:
            self.set_watched(False)

    def remote_end(self, code: int) -> None:
        """The worker saw the console hang up (0) or fail (an errno)."""
        self._reader = _HERE
        if self.fd < 0:
            return
        if code == 0:
            reason = Failure(error.ConnectionDone("hung up"))
        else:
            reason = Failure(error.ConnectionLost(os.strerror(code)))
        self.connectionLost(reason)

    def doRead(self) -> Any:
        """
        Read until the console has nothing more (or its share of the turn, see
        L{TurnShare}), then hand the whole burst on at once: one wake-up, one chunk, one
        frame per client.
        """
        share = self._turn_share
        limit = share.budget(self)
        if self._read_budget is not None:
            limit = min(limit, self._read_budget())
            if limit <= 0:
                self.stopReading()
                return None
        data, end = self._read_burst(limit)
        if data:
            if end is None:
                share.read(self)
            self._on_output(data)
        return end

    def _read_burst(self, limit: int) -> tuple[bytes, Any]:
        """
        Read until the console has nothing more, or C{limit} bytes; what was read, and
        why the console ended if it did (C{main.CONNECTION_DONE}: it hung up, as a pty
        whose other side closed says with EIO; C{main.CONNECTION_LOST}: it failed).
        """
        pieces: list[bytes] = []
        total = 0
        fd = self.fd
        end: Any = None
        while total < limit:
            try:
                data = os.read(fd, min(READ_SIZE, limit - total))
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError as e:
                end = main.CONNECTION_DONE if e.errno == errno.EIO else main.CONNECTION_LOST
                break
            if not data:
                end = main.CONNECTION_DONE
                break
            pieces.append(data)
            total += len(data)
        return (pieces[0] if len(pieces) == 1 else b"".join(pieces)), end

    @property
    def can_break(self) -> bool:
        """Whether this device can carry a serial BREAK (a telnet-mode socket)."""
        return self._telnet is not None

    def send_break(self) -> None:
        """
        Send a serial BREAK, in order with the input before it.

        @raise ValueError: this device cannot carry one (a pty, a plain socket).
        """
        if self._telnet is None:
            raise ValueError(f"{self.name} cannot carry a BREAK")
        self._write_raw(BREAK)

    @property
    def pending_input(self) -> int:
        """Bytes given to L{write} that the guest has not taken yet."""
        return self._pending_input

    def write(self, data: bytes) -> None:
        """
        Write input for the guest: at once when nothing is waiting before it (a
        keystroke reaches the guest in this reactor turn, not the next, which a console
        flooding beside it could make long), the rest queued and written as the guest
        reads (see L{pending_input}).
        """
        if self.fd < 0 or not data:
            return
        if self._telnet is not None:
            data = escape_input(data)
        self._write_raw(data)

    def _write_raw(self, data: bytes) -> None:
        """Write bytes as they are (a telnet command, or input already escaped)."""
        if self.fd < 0 or not data:
            return
        if self._pending_input == 0:
            written = fdesc.writeToFD(self.fd, data)
            if isinstance(written, int) and written > 0:
                data = data[written:]
                if not data:
                    return
        self._pending_input += len(data)
        FileDescriptor.write(self, data)

    def writeSomeData(self, data: bytes) -> Any:
        written = fdesc.writeToFD(self.fd, data)
        if isinstance(written, int) and written > 0:
            self._pending_input -= written
        return written

    def connectionLost(self, reason: Failure) -> None:
        """Restore the terminal, close the descriptor, and report why the console ended."""
        self._take_back_for_good()
        FileDescriptor.connectionLost(self, reason)
        fd, self.fd = self.fd, -1
        if fd >= 0:
            if self._saved_attributes is not None:
                try:
                    termios.tcsetattr(fd, termios.TCSANOW, self._saved_attributes)
                except (OSError, termios.error):
                    pass  # the other side is gone; nothing left to restore
            os.close(fd)
        if self._closing_on_purpose:
            self._log.info("{name} closed", name=self.name)
            return
        if reason.check(error.ConnectionDone):
            why = f"{self.name} hung up"
        else:
            why = f"{self.name} failed: {reason.getErrorMessage()}"
        self._log.info("console lost: {why}", why=why, name=self.name)
        self._on_lost(why)
