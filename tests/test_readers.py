"""
Read workers: a console nobody watches is read (and logged) by a worker process, a
watched one by the main process, and every byte arrives once, in order, across the
hand-overs, a hang-up, a close and a worker's death. Real ptys, real worker processes.
"""

from __future__ import annotations

import os
import re
import resource
import select
import signal
import socket
import subprocess
import sys
import tempfile
import termios
import tty
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from cloud_console.console import readworker
from cloud_console.console.device import ConsoleDevice
from cloud_console.console.readers import ReadWorkers, _parse, _Worker
from cloud_console.console.readworker import (
    ADOPT,
    COMMAND,
    DATA,
    MAX_MESSAGE,
    RECORDS_PER_MESSAGE,
    Worker,
)

from .helpers import (
    FileWatch,
    Guest,
    Server,
    capture_log,
    connect_v1,
    free_port,
    http_get,
    serve_process,
)


class Output:
    """What a device handed on: every byte, and which of it the worker logged."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.logged = bytearray()
        self.lost: list[str] = []
        self._waiters: list[tuple[Callable[[], bool], defer.Deferred[None]]] = []

    def received(self, data: bytes, logged: bool = False) -> None:
        self.data += data
        if logged:
            self.logged += data
        self._check()

    def ended(self, why: str) -> None:
        self.lost.append(why)
        self._check()

    def _check(self) -> None:
        for waiter in list(self._waiters):
            if waiter[0]():
                self._waiters.remove(waiter)
                waiter[1].callback(None)

    def until(self, condition: Callable[[], bool]) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        if condition():
            d.callback(None)
        else:
            self._waiters.append((condition, d))
        return d

    def holds(self, size: int) -> defer.Deferred[None]:
        return self.until(lambda: len(self.data) >= size)


def payload(label: bytes, size: int) -> bytes:
    """Numbered lines, so a lost, doubled or reordered piece shows."""
    lines = b"".join(b"%s %08d\r\n" % (label, i) for i in range(size // 16 + 1))
    return lines[:size]


def start_workers(test: TestCase, count: int = 1) -> ReadWorkers:
    """C{count} real worker processes, stopped (and waited for) at the test's end."""
    workers = ReadWorkers(count, reactor)
    workers.startService()
    processes = [worker.process for worker in workers.workers]

    def stop() -> defer.Deferred[None]:
        workers.stopService()
        return defer.DeferredList([_exited(p) for p in processes]).addCallback(lambda _: None)

    test.addCleanup(stop)
    return workers


def console(
    test: TestCase, workers: ReadWorkers, log_fd: int | None = None, watched: bool | None = None
) -> tuple[Guest, Output, ConsoleDevice]:
    """
    A guest's pty and the device reading it through C{workers} (logging to C{log_fd}),
    closed at the test's end; reading from the start if C{watched} is given.
    """
    guest = Guest()
    test.addCleanup(guest.close)
    output = Output()
    device = ConsoleDevice(
        _open_raw(guest.path),  # its own descriptor of the slave, as a console's
        "pty test",
        output.received,
        output.ended,
        reactor=reactor,
        workers=workers,
        log_descriptor=lambda: log_fd,
    )
    test.addCleanup(device.close)
    if watched is not None:
        device.set_watched(watched)
        device.startReading()
    return guest, output, device


class ReadWorkerTests(TestCase):
    """One worker process, real ptys, the trial reactor."""

    timeout = 60

    def setUp(self) -> defer.Deferred[None]:
        self.workers = start_workers(self)
        self.log_path = Path(tempfile.mkdtemp()) / "console.log"
        self.log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.addCleanup(os.close, self.log_fd)
        self.guest, self.output, self.device = console(self, self.workers, self.log_fd)
        return _until(lambda: all(worker.ready for worker in self.workers.workers))

    def start_unwatched(self) -> None:
        self.device.set_watched(False)
        self.device.startReading()
        self.assertTrue(self.device.read_by_worker)

    async def test_unwatched_read_and_logged_by_worker(self) -> None:
        """Unwatched: the worker reads and logs; the bytes arrive once, marked logged."""
        self.start_unwatched()
        data = payload(b"worker", 200_000)
        await self.guest.write(data)
        await self.output.holds(len(data))
        self.assertEqual(bytes(self.output.data), data)
        self.assertEqual(bytes(self.output.logged), data)
        self.assertEqual(self.log_path.read_bytes(), data)
        self.assertEqual(list(self.workers.owner.values()), self.workers.workers)

    async def test_watched_read_here(self) -> None:
        """Watched from the start: no worker is involved, nothing is logged by one."""
        self.device.set_watched(True)
        self.device.startReading()
        self.assertFalse(self.device.read_by_worker)
        await self.guest.write(b"typed and echoed\r\n")
        await self.output.holds(18)
        self.assertEqual(bytes(self.output.logged), b"")
        self.assertEqual(self.workers.owner, {})

    async def test_hand_overs_keep_every_byte_in_order(self) -> None:
        """A viewer comes and goes while the guest writes: each byte once, in order."""
        self.start_unwatched()
        pieces = [payload(b"piece%d" % i, 30_000) for i in range(6)]
        expected = b""
        for i, piece in enumerate(pieces):
            writing = self.guest.write(piece)
            self.device.set_watched(i % 2 == 0)
            await writing
            expected += piece
            await self.output.holds(len(expected))
        self.assertEqual(bytes(self.output.data), expected)
        # What the worker logged went to the log file, and only that.
        self.assertEqual(self.log_path.read_bytes(), bytes(self.output.logged))

    async def test_release_then_read_here(self) -> None:
        """Watched again: once the worker answers, this process reads the console."""
        self.start_unwatched()
        await self.guest.write(b"before\r\n")
        await self.output.holds(8)
        self.device.set_watched(True)
        await _until(lambda: not self.device.read_by_worker)
        self.assertEqual(self.workers.owner, {})
        await self.guest.write(b"after\r\n")
        await self.output.holds(15)
        self.assertEqual(bytes(self.output.data), b"before\r\nafter\r\n")
        self.assertEqual(bytes(self.output.logged), b"before\r\n")

    async def test_hang_up_seen_by_worker(self) -> None:
        """The guest's side closes: the worker says so and the console ends as usual."""
        self.start_unwatched()
        await self.guest.write(b"last words\r\n")
        await self.output.holds(12)
        os.close(self.guest.master)
        self.guest.open = False
        await self.output.until(lambda: bool(self.output.lost))
        self.assertEqual(self.output.lost, ["pty test hung up"])
        self.assertEqual(self.device.fd, -1)
        self.assertEqual(self.workers.owner, {})

    async def test_close_takes_what_the_worker_read(self) -> None:
        """Closing an unwatched console first takes every byte its worker read."""
        self.start_unwatched()
        data = payload(b"closing", 60_000)
        await self.guest.write(data)
        self.device.close()
        # Whatever was not read yet is still in the pty (or on its way to the slave's
        # side, which the kernel does on its own time); what was read arrived.
        left = b""
        while len(self.output.data) + len(left) < len(data):
            readable, _, _ = select.select([self.guest.slave], [], [], 10)
            if not readable:
                break
            left += os.read(self.guest.slave, 65536)
        self.assertEqual(bytes(self.output.data) + left, data)
        self.assertEqual(self.output.lost, [])
        self.assertEqual(self.workers.owner, {})  # given back for good, not taken again

    async def test_worker_death(self) -> None:
        """A worker killed: its console is read elsewhere, another worker starts."""
        events = capture_log(self)
        self.start_unwatched()
        await self.guest.write(b"first\r\n")
        await self.output.holds(7)
        dead = self.workers.workers[0]
        os.kill(dead.process.pid, signal.SIGKILL)
        await _exited(dead.process)
        self.assertFalse(self.device.read_by_worker)
        await self.guest.write(b"second\r\n")
        await self.output.holds(15)
        self.assertEqual(bytes(self.output.data), b"first\r\nsecond\r\n")
        self.assertTrue(
            any("ended" in e.get("log_format", "") and e.get("number") == 0 for e in events)
        )
        # Another worker starts in its place and takes the console when it is unwatched.
        await _until(
            lambda: self.workers.workers[0] is not dead and not self.workers.workers[0].ended
        )
        self.device.set_watched(True)
        self.device.set_watched(False)
        await _until(lambda: self.device.read_by_worker)
        await self.guest.write(b"third\r\n")
        await self.output.holds(22)
        self.assertEqual(bytes(self.output.data), b"first\r\nsecond\r\nthird\r\n")

    async def test_many_consoles_small_messages(self) -> None:
        """
        Output of more consoles than a message holds records arrives whole: messages
        are cut at RECORDS_PER_MESSAGE records (one per reactor turn on this side).
        """
        self.start_unwatched()
        count = RECORDS_PER_MESSAGE + 20
        guests = []
        outputs = []
        for _ in range(count):
            guest, output, _ = console(self, self.workers, watched=False)
            guests.append(guest)
            outputs.append(output)
        for i, guest in enumerate(guests):
            await guest.write(b"console %d\r\n" % i)
        for i, output in enumerate(outputs):
            line = b"console %d\r\n" % i
            await output.holds(len(line))
            self.assertEqual(bytes(output.data), line)
            # No log file given: the main process logs these.
            self.assertEqual(bytes(output.logged), b"")


class NotReadyTests(TestCase):
    """A worker starting up: its consoles are read here meanwhile, then handed over."""

    timeout = 60

    async def test_read_here_until_ready(self) -> None:
        workers = start_workers(self)
        guest, output, device = console(self, workers, watched=False)
        self.assertFalse(device.read_by_worker)
        await guest.write(b"early\r\n")
        await output.holds(7)
        await _until(lambda: device.read_by_worker)
        await guest.write(b"later\r\n")
        await output.holds(14)
        self.assertEqual(bytes(output.data), b"early\r\nlater\r\n")


class WorkerCommandLineTests(SynchronousTestCase):
    def test_usage(self) -> None:
        """Run by hand without its arguments: a usage line and status 1."""
        done = subprocess.run(
            [sys.executable, "-m", "cloud_console.console.readworker"],
            check=False,
            capture_output=True,
            text=True,
            env=dict(os.environ),
            timeout=30,
        )
        self.assertEqual(done.returncode, 1)
        self.assertIn("usage:", done.stderr)


def _open_raw(path: str) -> int:
    """The slave, opened as cloud-console opens a console: non-blocking, raw."""
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    tty.setraw(fd, termios.TCSANOW)  # not TCSAFLUSH: that would drop input waiting there
    return fd


def _exited(process: object) -> defer.Deferred[None]:
    """Fires once the worker process has exited (its protocol saw processEnded)."""
    return _until(lambda: getattr(process, "pid", None) is None)


async def _until_async(
    ask: Callable[[], Coroutine[Any, Any, tuple[float, float]]], expected: tuple[float, float]
) -> None:
    """
    Ask until C{ask()} gives C{expected} (each answer is a round trip through the
    reactor; the test's timeout bounds the asking).
    """
    while await ask() != expected:
        pass


def _until(condition: Callable[[], bool]) -> defer.Deferred[None]:
    """Fires once C{condition} holds, checked at every reactor turn (never a sleep)."""
    d: defer.Deferred[None] = defer.Deferred()

    def check() -> None:
        if condition():
            d.callback(None)
        else:
            reactor.callLater(0, check)  # type: ignore[attr-defined]

    check()
    return d


class FleetWorkerTests(TestCase):
    """A real fleet process with a read worker: logs, a viewer, logrotate, a crash."""

    timeout = 90

    async def serve(self, *extra: str) -> tuple[Server, list[Guest], Path]:
        directory = Path(self.mktemp()).resolve()
        directory.mkdir()
        guests = [Guest() for _ in range(3)]
        for guest in guests:
            self.addCleanup(guest.close)
            guest.start_reading()
        self.port = free_port()
        args = [
            "--port",
            f"tcp:{self.port}:interface=127.0.0.1",
            "--log-dir",
            str(directory),
            "--read-workers",
            "1",
            *extra,
        ]
        for i, guest in enumerate(guests):
            args += ["--console", f"vm{i}={guest.path}"]
        server = await serve_process(self, args)
        await server.log_line(lambda err: b"read worker 0 started" in err)
        return server, guests, directory

    async def test_logs_viewer_and_logrotate(self) -> None:
        """
        Unwatched consoles are logged whole by the worker; a page attached meanwhile
        gets the history and then every byte, typed input reaches the guest; after a
        logrotate and SIGHUP the new output goes to the new file, nothing lost or doubled.
        """
        server, guests, directory = await self.serve()
        first = [payload(b"vm%d" % i, 50_000) for i in range(3)]
        for guest, data in zip(guests, first):
            await guest.write(data)
        for i, data in enumerate(first):
            await _file_holds(self, directory / f"vm{i}.log", data)
        page = await connect_v1(self.port, "/c/vm0/ws")
        self.addCleanup(page.transport.abortConnection)
        await page.wait_text(first[0][-30:].decode())
        second = payload(b"watched", 30_000)
        await guests[0].write(second)
        await page.wait_text(second[-30:].decode())
        page.type(b"uname\r")
        await guests[0].receives(lambda data: data.endswith(b"uname\r"))
        os.rename(directory / "vm1.log", directory / "vm1.log.1")
        server.signal("HUP")
        await server.log_line(lambda err: err.count(b"reopened") >= 3)
        third = payload(b"rotated", 20_000)
        await guests[1].write(third)
        await _file_holds(self, directory / "vm1.log", third)
        self.assertEqual((directory / "vm1.log.1").read_bytes(), first[1])
        self.assertEqual((directory / "vm0.log").read_bytes(), first[0] + second)
        self.assertEqual(bytes(page.stream), first[0] + second)

    async def test_worker_ends_with_the_server(self) -> None:
        """kill -9 of the server: its worker ends too, reading nothing more."""
        server, guests, _ = await self.serve()
        match = re.search(rb"read worker 0 started \(pid (\d+)\)", server.stderr)
        assert match is not None
        worker = int(match.group(1))
        server.signal("KILL")
        await server.ended
        await _until(lambda: not _alive(worker))
        # What the guest writes now waits in the pty for the next process.
        await guests[2].write(b"after the crash\r\n")
        fd = _open_raw(guests[2].path)
        self.addCleanup(os.close, fd)
        # The kernel hands the bytes to the slave's side on its own time: wait for them.
        readable, _, _ = select.select([fd], [], [], 30)
        self.assertEqual(readable, [fd])
        self.assertEqual(os.read(fd, 100), b"after the crash\r\n")

    async def test_stop_signal_to_every_process(self) -> None:
        """
        SIGTERM to the server and its worker at once (systemd's stop without
        KillMode=mixed): the worker waits for the server, which takes its consoles back
        with every byte read, and both end cleanly.
        """
        server, guests, directory = await self.serve()
        await server.log_line(lambda err: b"read worker 0 ready" in err)
        match = re.search(rb"read worker 0 started \(pid (\d+)\)", server.stderr)
        assert match is not None
        worker = int(match.group(1))
        data = payload(b"stopping", 40_000)
        await guests[0].write(data)
        await _file_holds(self, directory / "vm0.log", data)
        os.kill(worker, signal.SIGTERM)
        server.signal("TERM")
        self.assertEqual(await server.ended, 0)
        await _until(lambda: not _alive(worker))
        self.assertNotIn(b"read worker 0 ended", server.stderr)
        self.assertNotIn(b"did not give", server.stderr)
        self.assertEqual((directory / "vm0.log").read_bytes()[: len(data)], data)

    async def test_metrics(self) -> None:
        """
        /metrics on --metrics-port (read by Prometheus' own parser): one worker running,
        reading the three consoles; a page on one of them takes it back.
        """
        metrics_port = free_port()
        _, guests, _ = await self.serve("--metrics-port", f"tcp:{metrics_port}:interface=127.0.0.1")

        async def figures() -> tuple[float, float]:
            _, body = await http_get(metrics_port, "/metrics")
            values = {
                sample.name: sample.value
                for family in text_string_to_metric_families(body.decode())
                for sample in family.samples
            }
            return (
                values["cloud_console_read_workers"],
                values["cloud_console_consoles_read_by_workers"],
            )

        await _until_async(lambda: figures(), (1.0, 3.0))
        page = await connect_v1(self.port, "/c/vm1/ws")
        self.addCleanup(page.transport.abortConnection)
        await guests[1].write(b"watched now\r\n")
        await page.wait_text("watched now")
        await _until_async(lambda: figures(), (1.0, 2.0))


def _file_holds(test: TestCase, path: Path, data: bytes) -> defer.Deferred[None]:
    """Fires once the file at C{path} holds exactly C{data} (looked at as inotify says)."""

    def holds(lines: list[str]) -> bool:
        try:
            return path.read_bytes() == data
        except FileNotFoundError:
            return False

    return FileWatch(test, path).wait_for(holds)


def _alive(pid: int) -> bool:
    """Whether process C{pid} runs (a zombie no longer does)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class WorkerCannotStartTests(TestCase):
    """A worker that cannot start is not restarted every second: this process reads."""

    timeout = 60

    async def test_read_here(self) -> None:
        events = capture_log(self)
        self.patch(_Worker, "module", "cloud_console.no_such_module")
        workers = start_workers(self)
        process = workers.workers[0].process
        guest, output, device = console(self, workers, watched=False)
        await _exited(process)
        self.assertTrue(workers.workers[0].ended)
        self.assertTrue(any("did not start" in e.get("log_format", "") for e in events))
        await guest.write(b"still read\r\n")
        await output.holds(12)
        self.assertFalse(device.read_by_worker)
        restarts = [c for c in reactor.getDelayedCalls() if c.func == workers._restart]
        self.assertEqual(restarts, [])  # not started again


class ManyDescriptorsTests(TestCase):
    """With a thousand consoles open, a worker's socket is numbered past 1024."""

    timeout = 60

    async def test_release_past_select_limit(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard < 1200:
            raise SkipTest(f"a descriptor limit of {hard} cannot go past 1024")
        if soft < 1200:
            resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
            self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        filler = []
        null = os.open(os.devnull, os.O_RDONLY)
        filler.append(null)
        while filler[-1] < 1100:
            filler.append(os.dup(null))
        self.addCleanup(lambda: [os.close(fd) for fd in filler])
        workers = start_workers(self)
        self.assertGreater(workers.workers[0].fileno(), 1024)
        await _until(lambda: workers.workers[0].ready)
        guest, output, device = console(self, workers, watched=False)
        self.assertTrue(device.read_by_worker)
        await guest.write(b"read by the worker\r\n")
        await output.holds(20)
        device.close()  # waits for the worker's answer on that descriptor
        self.assertEqual(device.fd, -1)
        self.assertEqual(bytes(output.data), b"read by the worker\r\n")
        self.assertEqual(workers.owner, {})


class GatherTests(SynchronousTestCase):
    """The worker's loop, in this process: a busy console's gathered output goes out."""

    def setUp(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        ours.setblocking(False)
        self.main = ours
        self.worker = Worker(theirs)
        self.master, slave = os.openpty()
        self.addCleanup(os.close, self.master)
        self.addCleanup(os.close, slave)
        tty.setraw(slave, termios.TCSANOW)
        fd = os.open(os.ttyname(slave), os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        self.worker.adopt(7, fd, None)
        self.slave = slave

    def received(self) -> list[tuple[int, int, int, bytes]]:
        records = []
        while True:
            try:
                message = self.main.recv(MAX_MESSAGE)
            except BlockingIOError:
                return records
            records += _parse(message)

    def arrive(self, data: bytes) -> None:
        """Write C{data} as the guest; return once the console's side can read it."""
        os.write(self.master, data)
        select.select([self.slave], [], [], 10)

    def test_busy_console_then_silence(self) -> None:
        """
        A console whose reads were all full (it kept the worker busy) and then went
        silent: what it gathered goes out in the next turn, not when it next prints.
        """
        self.patch(readworker, "FULL_READ", 10)
        self.arrive(b"0123456789abcdef")
        self.worker.turn()
        self.assertEqual(self.worker.gathered, {7: bytearray(b"0123456789abcdef")})
        self.assertEqual(self.received(), [])
        self.worker.turn()  # nothing new: the gathered output is due
        self.assertEqual(self.received(), [(7, DATA, 16, b"0123456789abcdef")])
        self.assertEqual(self.worker.gathered, {})

    def test_output_larger_than_a_message(self) -> None:
        """
        Output larger than a message (a read the kernel refilled, on top of what a busy
        console gathered) goes as several whole messages, every byte in order: the main
        process reads at most MAX_MESSAGE bytes of a message and would lose the rest.
        """
        data = payload(b"large", 3 * MAX_MESSAGE + 123)
        self.worker.output(7, data)
        sizes = []
        received = b""
        while True:
            self.worker.flush()  # as much as the socket takes; the rest after this reads
            try:
                message, _, flags, _ = self.main.recvmsg(4 * MAX_MESSAGE)
            except BlockingIOError:
                break
            sizes.append(len(message))
            self.assertFalse(flags & socket.MSG_TRUNC)
            for console, kind, length, piece in _parse(message):
                self.assertEqual((console, kind, length), (7, DATA, len(piece)))
                received += piece
        self.assertEqual(received, data)
        self.assertLessEqual(max(sizes), MAX_MESSAGE)
        self.assertGreaterEqual(len(sizes), 4)

    def test_adopted_console_read_at_once(self) -> None:
        """
        A console handed over with output waiting is read when its ADOPT is taken, as
        the worker takes commands while it lingers, not after the lingering: at start-up
        the consoles come in batches, each with the guest's output so far.
        """
        master, slave = os.openpty()
        self.addCleanup(os.close, master)
        self.addCleanup(os.close, slave)
        tty.setraw(slave, termios.TCSANOW)
        fd = os.open(os.ttyname(slave), os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        os.write(master, b"login: ")
        select.select([slave], [], [], 10)
        socket.send_fds(self.main, [COMMAND.pack(ADOPT, 8)], [fd])
        os.close(fd)  # the worker has its own copy
        self.worker.commands()  # what linger() does when a command comes
        self.worker.flush()
        self.assertEqual(self.received(), [(8, DATA, 7, b"login: ")])

    def test_gathered_then_short_read(self) -> None:
        """A full read, then a short one: both go out together, in order."""
        self.patch(readworker, "FULL_READ", 10)
        self.arrive(b"0123456789abcdef")
        self.worker.turn()
        self.arrive(b"xyz")
        self.worker.turn()  # (then lingers for LINGER: all it read was small)
        self.assertEqual(self.received(), [(7, DATA, 19, b"0123456789abcdefxyz")])


class _Received:
    """A device as the main process's side of a worker sees it: keeps what it is given."""

    def __init__(self, log: list[bytes]) -> None:
        self.log = log

    def remote_output(self, data: bytes, logged: bool) -> None:
        self.log.append(data)


class TurnTests(SynchronousTestCase):
    """
    The main process takes one message of a worker per reactor turn, so a watched
    console's echo waits behind at most RECORDS_PER_MESSAGE records of the consoles
    nobody watches, however many of them printed at once (counted in turns, not time).
    """

    def test_one_message_per_turn(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        ours.setblocking(False)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 * MAX_MESSAGE)
        worker = Worker(theirs)
        consoles = 3 * RECORDS_PER_MESSAGE + 5
        lines = [b"console %d printed\r\n" % i for i in range(consoles)]
        for i, line in enumerate(lines):
            worker.output(i, line)  # one turn of the worker's: every console read once
        worker.flush()
        self.assertEqual(worker.unsent, [])

        # The main side of the socket, without a process behind it: what a reactor turn
        # (doRead) hands to the devices.
        main_side = _Worker.__new__(_Worker)
        main_side.socket = ours
        main_side._buffer = bytearray(MAX_MESSAGE)
        main_side.number = 0
        main_side.ready = True
        delivered: list[bytes] = []
        main_side.devices = {i: _Received(delivered) for i in range(consoles)}

        per_turn = []
        while True:
            before = len(delivered)
            main_side.doRead()
            if len(delivered) == before:
                break
            per_turn.append(len(delivered) - before)
        self.assertEqual(per_turn, [RECORDS_PER_MESSAGE] * 3 + [5])
        self.assertEqual(delivered, lines)
