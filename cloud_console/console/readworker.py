"""
A read worker: a small process that reads a share of the consoles nobody is watching and
hands their bytes to the main process in batches.

Why: one process reading a host's consoles spends most of its time in read(2) on ptys and
in the reactor's dispatch of each one, on one core. During a boot storm that made an
operator's echo on a quiet console wait for turns of a thousand consoles. A worker reads
the unwatched consoles on another core, in a loop with no reactor, writes their log files,
and sends their bytes in a few messages per turn; the main process then handles a few
messages per turn instead of a thousand descriptors, and reads the watched consoles
itself as before.

The worker holds nothing but bytes in flight: the main process keeps every descriptor, the
history, the log and the clients; a worker that dies loses at most what it had read and
not yet sent (L{GATHER} per console and one message), and the main process starts
another. It dies with the main process (C{PR_SET_PDEATHSIG}), so that after a crash the
guests' output waits in the kernel for the next process, not in a worker.

The wire, one C{SOCK_SEQPACKET} socket pair per worker (so messages keep their bounds):
  - main to worker, one command per message: C{ADOPT id} with the console's descriptor
    and, if the worker is to write the console's log, the log file's (C{SCM_RIGHTS});
    C{RELEASE id};
  - worker to main, a message of records C{(id, kind, length)}, each followed by
    C{length} bytes of output for C{DATA} (not logged) and C{LOGGED} (already in the log
    file): C{END} (the console hung up (C{length} 0) or failed (C{length} is the errno);
    the worker has let go of it), C{RELEASED} (the answer to C{RELEASE}: every byte
    read from that console was sent before it), and C{READY}, first, once the worker
    runs (until then the main process reads the consoles itself).

Run as C{python -m cloud_console.console.readworker FD PARENT_PID}, FD being the
worker's end of the socket pair. It imports nothing of Twisted, to stay small.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import signal
import socket
import struct
import sys
import time

from .writing import write_all

#: A record's header: console id, kind, length (for END: the errno).
RECORD = struct.Struct("<IBI")
#: A command's header: operation, console id.
COMMAND = struct.Struct("<BI")

DATA, END, RELEASED, LOGGED, READY = 0, 1, 2, 3, 4
ADOPT, RELEASE = 1, 2

#: Bytes asked for in a console's one read per turn (a pty hands out about 4 KiB, a
#: socket more, and so can a pty the kernel refills during the read).
READ_PER_TURN = 64 * 1024
#: A read this large means the pty had more than it hands out at once (about 4 KiB in raw
#: mode): the console is busy, so gather and do not linger.
FULL_READ = 4000
#: Most bytes a busy console gathers before they are logged and sent (one write, one
#: record), so that a storm costs a write per 64 KiB, not per 4 KiB read.
GATHER = 64 * 1024
#: Seconds a turn that read only small pieces waits before the next (see L{Worker.linger}).
#: 0.2 s rather than 0.1 s: with 1,000 consoles printing a line at a time, both the
#: worker's reads and the main process's records per MiB halve (the storm benchmark's
#: paced phase: 48-70 ms of CPU per MiB at 0.1 s, 40-49 at 0.2 s), and so does the time
#: an operator's echo spends behind them. The cost: an unwatched console's line reaches
#: its log and its history (and its time mark) up to 0.2 s after the guest wrote it.
LINGER = 0.2

#: Largest message sent to the main process (it reads into a buffer this size; larger
#: output is cut into several records, see L{Worker.record}).
MAX_MESSAGE = READ_PER_TURN + 4096
#: Most records in a message: the main process handles one message per reactor turn, and
#: a record takes it 10-30 us (history, time index, counters), so this many take about
#: half a millisecond and a watched console's echo never waits long behind the output of
#: the consoles nobody watches. (64 records made turns of up to 8 ms in a storm of 500
#: consoles, and the echo's 99th percentile 10.8 ms instead of 5-8.)
RECORDS_PER_MESSAGE = 16
#: The socket buffer asked for, so that a few full messages can be in flight.
SOCKET_BUFFER = 2 * MAX_MESSAGE

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask the kernel to kill this process when the main process exits (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the worker still ends when its socket closes


class Worker:
    """The loop: read what is ready, batch it, send it; obey the main process."""

    def __init__(self, channel: socket.socket) -> None:
        self.channel = channel
        channel.setblocking(False)
        self.poll = select.epoll()
        #: While a message could not be sent, only the channel is watched (the consoles
        #: wait in the kernel: the main process sets the pace).
        self.blocked_poll = select.epoll()
        self.poll.register(channel.fileno(), select.EPOLLIN)
        self.blocked_poll.register(channel.fileno(), select.EPOLLIN | select.EPOLLOUT)
        #: While lingering, only the main process's commands are taken.
        self.command_poll = select.epoll()
        self.command_poll.register(channel.fileno(), select.EPOLLIN)
        #: Whether a read this turn filled what a pty hands out at once (more is waiting).
        self.busy = False
        self.consoles: dict[int, int] = {}  # descriptor -> console id
        self.descriptors: dict[int, int] = {}  # console id -> descriptor
        self.logs: dict[int, int] = {}  # console id -> its log file, if the worker logs it
        #: What consoles that keep filling their reads have gathered, not yet sent.
        self.gathered: dict[int, bytearray] = {}
        #: The consoles read in this turn.
        self.read_now: set[int] = set()
        self.records: list[bytes | bytearray] = []
        self.size = 0
        self.count = 0
        self.unsent: list[list[bytes | bytearray]] = []
        self.running = True

    def run(self) -> None:
        self.record(0, READY, b"")
        self.flush()
        while self.running:
            self.turn()

    def turn(self) -> None:
        """
        One turn: wait for the consoles (or, with output gathered, just look), read
        each ready one once, send what is due, and linger if it was all small pieces.
        """
        poll = self.blocked_poll if self.unsent else self.poll
        try:
            # What a console gathered goes out in the next turn it is not read in.
            events = poll.poll(0 if self.gathered else -1)
        except InterruptedError:
            return
        self.busy = False
        read = False
        self.read_now.clear()
        channel_fd = self.channel.fileno()
        for fd, _ in events:
            if fd == channel_fd:
                self.commands()
                if not self.running:
                    return
            elif fd in self.consoles:
                self.read(fd)
                read = True
        for console in [c for c in self.gathered if c not in self.read_now]:
            self.send_gathered(console)
        self.flush()
        if read and not self.busy and not self.unsent:
            self.linger()

    def linger(self) -> None:
        """
        Let the consoles' output gather for L{LINGER} seconds before the next turn
        (taking commands meanwhile): a guest printing a line at a time is then read,
        logged and sent a few lines per call instead of one, which is most of the cost
        of a host's consoles printing at once. Nobody watches these consoles, so the
        wait is seen only as a log line written a little later; a console that fills a
        read ends the lingering (see L{busy}).
        """
        deadline = time.monotonic() + LINGER
        while self.running:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                if self.command_poll.poll(left):
                    self.commands()
                    self.flush()  # a RELEASE is answered now, not after the lingering
            except InterruptedError:
                continue

    # -- the main process's commands -----------------------------------------------------

    def commands(self) -> None:
        """Take every command waiting (and send what was held back, if it can go now)."""
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(self.channel, COMMAND.size, 4)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError:
                message, fds = b"", []
            if not message:
                self.running = False  # the main process is gone
                return
            operation, console = COMMAND.unpack_from(message)
            if operation == ADOPT and fds:
                for extra in fds[2:]:
                    os.close(extra)
                self.adopt(console, fds[0], fds[1] if len(fds) > 1 else None)
            elif operation == RELEASE:
                self.release(console)
            else:
                for fd in fds:
                    os.close(fd)

    def adopt(self, console: int, fd: int, log: int | None) -> None:
        """
        Read C{fd} as C{console} (again: with new descriptors), logging to C{log}; what
        it holds already is read now, not after a lingering (see L{linger}): at start-up
        that is every console's output since the guest started, and the main process
        hands its consoles over in batches, so a linger per batch made a thousand
        consoles' logs wait 0.2 s more (1.07 s to all logged, against 0.70 s when the
        first batch held them all).
        """
        old = self.descriptors.get(console)
        if old is not None:
            self.forget(old)
        if log is not None:
            self.logs[console] = log
        self.descriptors[console] = fd
        self.consoles[fd] = console
        self.poll.register(fd, select.EPOLLIN)
        self.read(fd)

    def release(self, console: int) -> None:
        """
        Give a console back: what it holds now is read and sent first (a console being
        closed loses nothing that had already arrived), then C{RELEASED}.
        """
        fd = self.descriptors.get(console)
        if fd is not None:
            self.read(fd)
        fd = self.descriptors.get(console)  # (the read may have found it hung up)
        if fd is not None:
            self.forget(fd)
        self.record(console, RELEASED, b"")

    def forget(self, fd: int) -> None:
        console = self.consoles[fd]
        self.send_gathered(console)  # before its END or RELEASED, and while its log is open
        del self.consoles[fd]
        del self.descriptors[console]
        log = self.logs.pop(console, None)
        if log is not None:
            os.close(log)
        try:
            self.poll.unregister(fd)
        except OSError:
            pass
        os.close(fd)

    # -- the consoles --------------------------------------------------------------------

    def read(self, fd: int) -> None:
        """
        Read what one console holds now, once: epoll reports it again next turn if there
        is more, by when the kernel has moved more into the pty's line discipline (a
        second read at once would wait for that, in the kernel, while nothing else
        happens). A console that filled its read keeps gathering, up to L{GATHER}, and
        is then logged with one write and sent as one record; one that was emptied is
        sent at once.
        """
        console = self.consoles[fd]
        self.read_now.add(console)
        try:
            data = os.read(fd, READ_PER_TURN)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.end(fd, console, 0 if e.errno == errno.EIO else (e.errno or errno.EIO))
            return
        if not data:
            self.end(fd, console, 0)
            return
        gathered = self.gathered.get(console)
        if len(data) >= FULL_READ:
            self.busy = True
            if gathered is None:
                self.gathered[console] = gathered = bytearray()
            gathered += data
            if len(gathered) >= GATHER:
                self.send_gathered(console)
            return
        if gathered is not None:
            gathered += data
            self.send_gathered(console)
        else:
            self.output(console, data)

    def send_gathered(self, console: int) -> None:
        """Log and record what C{console} gathered, as one piece (its buffer, handed on)."""
        gathered = self.gathered.pop(console, None)
        if gathered:
            self.output(console, gathered)

    def output(self, console: int, data: bytes | bytearray) -> None:
        """Log C{data} (if this worker logs the console) and record it."""
        log = self.logs.get(console)
        if log is None:
            self.record(console, DATA, data)
            return
        done, _ = write_all(log, data)
        if done == len(data):
            self.record(console, LOGGED, data)
            return
        # The log refused it (a full disk): the main process logs the rest, or says why not.
        if done:
            self.record(console, LOGGED, data[:done])
        self.record(console, DATA, data[done:])

    def end(self, fd: int, console: int, code: int) -> None:
        self.forget(fd)
        self.record(console, END, b"", code)

    def record(self, console: int, kind: int, data: bytes | bytearray, length: int | None = None) -> None:
        """
        One record (C{length}: the data's, or the errno of an C{END}); output larger than
        a message can carry goes as several records, in order (a pty read can return
        far more than 4 KiB when the kernel refills it during the read, and what a busy
        console gathered comes on top).
        """
        most = MAX_MESSAGE - RECORD.size
        while len(data) > most:
            self.record(console, kind, data[:most])
            data = data[most:]
        size = RECORD.size + len(data)
        if self.size + size > MAX_MESSAGE or self.count == RECORDS_PER_MESSAGE:
            self.seal()
        self.records.append(RECORD.pack(console, kind, len(data) if length is None else length))
        if data:
            self.records.append(data)
        self.size += size
        self.count += 1

    def seal(self) -> None:
        """
        The records so far make one message, to be sent in order (as they are: the
        kernel gathers the pieces, so they are not joined here first).
        """
        if self.records:
            self.unsent.append(self.records)
            self.records = []
            self.size = 0
            self.count = 0

    def flush(self) -> None:
        """Send the messages made this turn, in order, until the socket is full."""
        self.seal()
        while self.unsent:
            try:
                self.channel.sendmsg(self.unsent[0])
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError:
                self.running = False  # the main process is gone
                return
            del self.unsent[0]


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m cloud_console.console.readworker FD PARENT_PID", file=sys.stderr)
        return 1
    _die_with_parent()
    if os.getppid() != int(argv[2]):
        return 0  # the main process died before the kernel could be told to end this one
    # Stopping is the main process's to decide: systemd's stop (SIGTERM to every process
    # of the unit), a terminal's ^C or hang-up reach this process too, and dying then
    # would lose what it had read and not yet sent. It ends when the main process closes
    # its socket (having taken every console back), or dies with it.
    for name in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(name, signal.SIG_IGN)
    channel = socket.socket(fileno=int(argv[1]))
    try:
        channel.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    except OSError:
        pass
    Worker(channel).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
