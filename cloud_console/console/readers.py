"""
Read workers, seen from the main process: the consoles nobody watches are read on the
host's other cores (see L{cloud_console.console.readworker} for why and for the wire).

The main process keeps every console's descriptor, history, log and clients; a worker
only reads. A console is handed to a worker while nobody watches it (C{ADOPT}, the
descriptor passed along) and taken back when a viewer attaches (C{RELEASE}, answered once
every byte the worker read from it is on its way): the bytes before the answer come
through the worker, those after it from the main process's own reads, so nothing is lost
or doubled at the seam, and a watched console is read, paced and echoed as before.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import time
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet import main
from twisted.internet.abstract import FileDescriptor
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from .readworker import (
    ADOPT,
    COMMAND,
    DATA,
    END,
    LOGGED,
    MAX_MESSAGE,
    READY,
    RECORD,
    RELEASE,
    RELEASED,
)

#: Messages taken from one worker per reactor turn (each holds at most
#: L{cloud_console.console.readworker.RECORDS_PER_MESSAGE} records), so that a storm read
#: by the workers still leaves the main process short turns for its clients.
MESSAGES_PER_TURN = 1
#: Seconds a synchronous release (closing a console, stopping) waits for a worker.
RELEASE_TIMEOUT = 5.0
#: Seconds before a worker that died is started again (a worker that cannot start at all
#: must not spin).
RESTART_DELAY = 1.0


class RemotelyRead(Protocol):
    """A console device, as the workers see it."""

    def fileno(self) -> int: ...

    def log_descriptor(self) -> int | None:
        """The console's log file, for the worker to write; C{None}: this process logs."""

    def remote_output(self, data: bytes, logged: bool) -> None:
        """A worker read C{data} from the console (and wrote it to the log: C{logged})."""

    def remote_end(self, code: int) -> None:
        """The console hung up (C{code} 0) or failed (an errno); the worker let go."""

    def remote_released(self) -> None:
        """The worker let go as asked; every byte it read has been given."""

    def workers_ready(self) -> None:
        """A worker can take the console now (it was read here while none could)."""


def _parse(message: bytes | bytearray | memoryview) -> list[tuple[int, int, int, bytes]]:
    """A message's records as (console id, kind, length, data: a copy of its own)."""
    records = []
    view = memoryview(message)
    pos, size = 0, len(message)
    header = RECORD.size
    while pos + header <= size:
        console, kind, length = RECORD.unpack_from(message, pos)
        pos += header
        data = b""
        if kind == DATA or kind == LOGGED:
            data = bytes(view[pos : pos + length])
            pos += length
        records.append((console, kind, length, data))
    return records


def _worker_environment() -> dict[str, str]:
    """
    This process's environment, with the directory this package was imported from first
    on the worker's path: the worker runs the same code, however this process found it
    (an installed package, a checkout, twistd's plugin path).
    """
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return env


class _WorkerProcess(ProcessProtocol):
    def __init__(self, worker: _Worker) -> None:
        self.worker = worker

    def processEnded(self, reason: Failure) -> None:
        self.worker.process_ended(reason)


class _Worker(FileDescriptor):
    """One worker process and the main process's end of its socket pair."""

    _log = Logger()
    #: What the worker process runs (C{python -m MODULE FD PARENT_PID}).
    module = "cloud_console.console.readworker"

    def __init__(self, pool: ReadWorkers, number: int, reactor: Any) -> None:
        FileDescriptor.__init__(self, reactor)
        self.pool = pool
        self.number = number
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for sock in (ours, theirs):
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MAX_MESSAGE)
            except OSError:
                pass
        ours.setblocking(False)
        self.socket = ours
        #: Messages are received into this one buffer: a buffer made for each would be
        #: L{MAX_MESSAGE} bytes to allocate and give back per message, most of them small.
        self._buffer = bytearray(MAX_MESSAGE)
        self.devices: dict[int, RemotelyRead] = {}
        self._commands: list[tuple[bytes, list[int]]] = []
        self.ended = False
        #: The worker runs and takes consoles (it said C{READY}).
        self.ready = False
        self.connected = 1
        argv = [
            sys.executable, "-m", self.module, "3", str(os.getpid())
        ]  # fmt: skip
        try:
            self.process = reactor.spawnProcess(
                _WorkerProcess(self),
                sys.executable,
                argv,
                env=_worker_environment(),
                childFDs={1: 1, 2: 2, 3: theirs.fileno()},
            )
        finally:
            theirs.close()
        self.startReading()
        self._log.info(
            "read worker {number} started (pid {pid})", number=number, pid=self.process.pid
        )

    def fileno(self) -> int:
        return self.socket.fileno() if not self.ended else -1

    # -- commands --------------------------------------------------------------------

    def command(self, operation: int, console: int, fds: list[int] | None = None) -> None:
        """Send a command, now or (the socket is full) as soon as it can go, in order."""
        self._commands.append((COMMAND.pack(operation, console), fds or []))
        if len(self._commands) == 1:
            self._send_commands()

    def _send_commands(self) -> bool:
        """Send what is queued; whether all of it went."""
        while self._commands and not self.ended:
            message, fds = self._commands[0]
            try:
                if fds:
                    socket.send_fds(self.socket, [message], fds)
                else:
                    self.socket.send(message)
            except BlockingIOError:
                self.startWriting()
                return False
            except InterruptedError:
                continue
            except OSError:
                return False  # the worker is gone; process_ended deals with it
            del self._commands[0]
        self.stopWriting()
        return not self._commands

    def doWrite(self) -> Any:
        self._send_commands()
        return None

    # -- output ----------------------------------------------------------------------

    def doRead(self) -> Any:
        for _ in range(MESSAGES_PER_TURN):
            try:
                message = self.receive()
            except BlockingIOError:
                return None
            except InterruptedError:
                continue
            except OSError:
                return main.CONNECTION_LOST
            if not message:
                return main.CONNECTION_DONE
            self.dispatch(message)
        return None

    def receive(self) -> memoryview:
        """
        One message from the worker (empty: it is gone), valid until the next call. A
        message cut short would lose output in silence: the worker never sends one that
        large, and if it ever did, that is said (the records still in it are handed on).

        @raise OSError: as C{recvmsg_into} (C{BlockingIOError}: nothing waiting).
        """
        size, _, flags, _ = self.socket.recvmsg_into([self._buffer])
        message = memoryview(self._buffer)[:size]
        if flags & socket.MSG_TRUNC:
            self._log.error(
                "read worker {number} sent a message larger than {size} bytes; output was lost",
                number=self.number,
                size=MAX_MESSAGE,
            )
        return message

    def dispatch(self, message: bytes | bytearray | memoryview) -> list[int]:
        """Hand a message's records to their consoles; the ids released in it."""
        released = []
        for console, kind, length, data in _parse(message):
            if kind == READY:
                self.ready = True
                self.pool.worker_ready(self)
                continue
            device = self.devices.get(console)
            if kind == DATA or kind == LOGGED:
                if device is not None:
                    device.remote_output(data, kind == LOGGED)
                continue
            self.devices.pop(console, None)
            self.pool.owner.pop(console, None)
            if device is None:
                continue
            if kind == END:
                self.pool.ended(device)
                device.remote_end(length)
            elif kind == RELEASED:
                released.append(console)
                device.remote_released()
        return released

    def wait_released(self, consoles: set[int], timeout: float) -> bool:
        """
        Block until the worker has answered C{RELEASE} for all of C{consoles}, giving
        every byte read before the answers to its console; whether it answered in time.
        """
        deadline = time.monotonic() + timeout
        fd = self.socket.fileno()
        # poll(2), not select(2): with a thousand consoles open, this descriptor is
        # numbered above what select can watch.
        poller = select.poll()
        while consoles and not self.ended:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            poller.register(fd, select.POLLIN | (select.POLLOUT if self._commands else 0))
            events = dict(poller.poll(left * 1000))
            if events.get(fd, 0) & select.POLLOUT:
                self._send_commands()
            if not events.get(fd, 0) & (select.POLLIN | select.POLLHUP | select.POLLERR):
                continue
            try:
                message = self.receive()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return False
            if not message:
                return False
            consoles.difference_update(self.dispatch(message))
            consoles.intersection_update(self.devices)
        return not consoles

    # -- the end ---------------------------------------------------------------------

    def connectionLost(self, reason: Failure) -> None:
        FileDescriptor.connectionLost(self, reason)
        self._end()

    def _end(self) -> None:
        if self.ended:
            return
        self.ended = True
        self.stopReading()
        self.stopWriting()
        self._commands = []  # the descriptors in them are the consoles', still open here
        self.socket.close()

    def process_ended(self, reason: Failure) -> None:
        self._end()
        self.pool.worker_ended(self, reason)


class ReadWorkers(Service):
    """
    The read workers of a process (C{count} of them), and which console each reads.

    A console not taken (no worker running, the service stopped) is simply read by the
    main process: offloading is an optimisation, never a condition. L{adopt} of a console
    a worker already reads hands it its descriptors again (its log file was reopened).
    """

    _log = Logger()

    def __init__(self, count: int, reactor: Any) -> None:
        self.count = count
        self.reactor = reactor
        self.workers: list[_Worker] = []
        #: Console id -> the worker that reads it (or is releasing it).
        self.owner: dict[int, _Worker] = {}
        self._ids: dict[int, int] = {}  # id(device) -> console id
        self._next_id = 0
        #: Devices that asked while no worker was ready: read here, offered again later.
        #: (By identity: a device asking twice is offered once.)
        self._waiting: dict[int, RemotelyRead] = {}

    def startService(self) -> None:
        Service.startService(self)
        for number in range(self.count):
            self._start(number)

    def _start(self, number: int) -> None:
        try:
            worker = _Worker(self, number, self.reactor)
        except OSError as e:
            self._log.error(
                "read worker {number} cannot start: {error}", number=number, error=str(e)
            )
            return
        if len(self.workers) <= number:
            self.workers.extend([worker] * (number + 1 - len(self.workers)))
        self.workers[number] = worker

    def figures(self) -> tuple[int, int]:
        """The workers running (ready) now, and the consoles they read (for C{/metrics})."""
        live = [w for w in self.workers if w.ready and not w.ended]
        return len(live), sum(len(w.devices) for w in live)

    def adopt(self, device: RemotelyRead) -> bool:
        """Have a worker read C{device}; C{False} when none can (read it yourself)."""
        if not self.running:
            return False
        live = [w for w in self.workers if w.ready and not w.ended]
        if not live:
            self._waiting[id(device)] = device
            return False
        worker = min(live, key=lambda w: len(w.devices))
        key = id(device)
        console = self._ids.get(key)
        if console is None:
            console = self._ids[key] = self._next_id
            self._next_id += 1
        old = self.owner.get(console)
        if old is not None and old is not worker:
            worker = old  # adopted again (a new log file): the same worker, in order
        worker.devices[console] = device
        self.owner[console] = worker
        log = device.log_descriptor()
        worker.command(ADOPT, console, [device.fileno()] + ([log] if log is not None else []))
        return True

    def worker_ready(self, worker: _Worker) -> None:
        """A worker runs: the consoles read here meanwhile may go to it now."""
        self._log.info("read worker {number} ready", number=worker.number)
        waiting, self._waiting = self._waiting, {}
        for device in waiting.values():
            device.workers_ready()

    def ended(self, device: RemotelyRead) -> None:
        """C{device}'s console ended in a worker: forget it."""
        self._ids.pop(id(device), None)

    def release(self, device: RemotelyRead) -> None:
        """Ask for C{device} back; C{device.remote_released()} follows."""
        console = self._ids.get(id(device))
        worker = self.owner.get(console) if console is not None else None
        if worker is None or console is None:
            device.remote_released()
            return
        worker.command(RELEASE, console)

    def release_now(self, device: RemotelyRead) -> None:
        """
        Take C{device} back before returning (it is being closed): every byte its worker
        read is given to it first. A worker that does not answer in time is given up on.
        """
        console = self._ids.pop(id(device), None)
        worker = self.owner.get(console) if console is not None else None
        if worker is None or console is None:
            return
        worker.command(RELEASE, console)
        if not worker.wait_released({console}, RELEASE_TIMEOUT):
            self._log.error(
                "read worker {number} did not give a console back in {timeout} s; what it "
                "read of it is lost",
                number=worker.number,
                timeout=RELEASE_TIMEOUT,
            )
            worker.devices.pop(console, None)
            self.owner.pop(console, None)
            device.remote_released()

    def stopService(self) -> None:
        """Take every console back (each byte read given), then let the workers end."""
        Service.stopService(self)
        self._waiting = {}
        for worker in self.workers:
            pending = set(worker.devices)
            for console in pending:
                worker.command(RELEASE, console)
            if pending and not worker.wait_released(pending, RELEASE_TIMEOUT):
                self._log.error(
                    "read worker {number} did not give its consoles back", number=worker.number
                )
                for console in list(worker.devices):
                    self._forget(worker, console).remote_released()
        for worker in self.workers:
            worker._end()

    def _forget(self, worker: _Worker, console: int) -> RemotelyRead:
        device = worker.devices.pop(console)
        self.owner.pop(console, None)
        return device

    def worker_ended(self, worker: _Worker, reason: Failure) -> None:
        """
        A worker exited: outside a stop, that is a failure: its consoles go to the others
        (or back to the main process), and another worker starts in its place.
        """
        if not self.running:
            return
        self._log.error(
            "read worker {number} ended ({reason}); its {count} console(s) are read "
            "elsewhere, and what it had read of them but not sent is lost",
            number=worker.number,
            reason=reason.getErrorMessage(),
            count=len(worker.devices),
        )
        for console in list(worker.devices):
            self._forget(worker, console).remote_released()
        if not worker.ready:
            # It could not even start: another would fail the same way, every second.
            self._log.error(
                "read worker {number} did not start; the main process reads its share "
                "of the consoles (see the worker's error above)",
                number=worker.number,
            )
            return
        if worker in self.workers:
            self.reactor.callLater(RESTART_DELAY, self._restart, worker.number)

    def _restart(self, number: int) -> None:
        if self.running:
            self._start(number)
