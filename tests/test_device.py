"""
Tests for L{cloud_console.console.device} on a real pty pair from C{os.openpty()}.

The test plays the VM monitor on the master side; production code opens the slave by
path, as it would a guest console.
"""

from __future__ import annotations

import os
import select
import stat
import termios

from twisted.internet import error
from twisted.internet.interfaces import IPushProducer
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from cloud_console.console.device import (
    ACTIVE_WINDOW,
    READ_PER_TURN,
    READ_PER_TURN_SHARED,
    ConsoleDevice,
    ConsoleOpenError,
    TurnShare,
    open_tty,
)


def read_all(fd: int) -> bytes:
    """Everything readable on C{fd} right now (it must be non-blocking)."""
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except (BlockingIOError, OSError):
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


@implementer(IPushProducer)
class RecordingProducer:
    """Records what the device asks of its producer (the input gate's place)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


class PtyPairMixin:
    """A fresh pty pair per test; the master is non-blocking so reads never hang."""

    def make_pair(self) -> tuple[int, str]:
        master, slave = os.openpty()
        path = os.ttyname(slave)
        os.set_blocking(master, False)
        self.addCleanup(os.close, slave)  # type: ignore[attr-defined]
        self.master_open = True
        self.addCleanup(self._close_master, master)  # type: ignore[attr-defined]
        return master, path

    def _close_master(self, master: int) -> None:
        if self.master_open:
            os.close(master)


class OpenTtyTests(PtyPairMixin, SynchronousTestCase):
    """L{open_tty} opens a terminal, refuses anything else, and sets raw mode."""

    def test_raw_mode_by_default(self) -> None:
        """The slave is put in raw mode: no echo, no canonical input, no CR/NL mapping."""
        master, path = self.make_pair()
        fd, saved = open_tty(path, raw=True)
        self.addCleanup(os.close, fd)
        self.assertIsNotNone(saved)
        attributes = termios.tcgetattr(fd)
        lflag, iflag, oflag = attributes[3], attributes[0], attributes[1]
        self.assertFalse(lflag & termios.ECHO)
        self.assertFalse(lflag & termios.ICANON)
        self.assertFalse(iflag & termios.ICRNL)
        self.assertFalse(oflag & termios.OPOST)

    def test_no_raw_leaves_line_discipline(self) -> None:
        """With raw=False the terminal's attributes are untouched."""
        master, path = self.make_pair()
        before = termios.tcgetattr(master)
        fd, saved = open_tty(path, raw=False)
        self.addCleanup(os.close, fd)
        self.assertIsNone(saved)
        self.assertEqual(termios.tcgetattr(fd), before)

    def test_flags(self) -> None:
        """The descriptor is non-blocking, close-on-exec and read-write."""
        master, path = self.make_pair()
        fd, _ = open_tty(path, raw=True)
        self.addCleanup(os.close, fd)
        self.assertFalse(os.get_blocking(fd))
        self.assertFalse(os.get_inheritable(fd))
        import fcntl

        self.assertEqual(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE, os.O_RDWR)

    def test_missing_path(self) -> None:
        """A path that does not exist is a ConsoleOpenError naming the path and the cause."""
        path = self.mktemp()
        e = self.assertRaises(ConsoleOpenError, open_tty, path, True)
        self.assertIn(path, str(e))
        self.assertIn("No such file", str(e))

    def test_regular_file_refused(self) -> None:
        """A regular file is not a terminal: refused, and the descriptor is not leaked."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"x")
        before = len(os.listdir("/proc/self/fd"))
        e = self.assertRaises(ConsoleOpenError, open_tty, path, True)
        self.assertIn("not a terminal", str(e))
        self.assertEqual(len(os.listdir("/proc/self/fd")), before)

    def test_character_device_not_tty_refused(self) -> None:
        """/dev/null is a character device but not a terminal: refused."""
        self.assertTrue(stat.S_ISCHR(os.stat("/dev/null").st_mode))
        e = self.assertRaises(ConsoleOpenError, open_tty, "/dev/null", True)
        self.assertIn("not a terminal", str(e))


class ConsoleDeviceTests(PtyPairMixin, SynchronousTestCase):
    """L{ConsoleDevice} on a memory reactor, its I/O driven by hand on a real pty."""

    def make_device(self, raw: bool = True) -> tuple[ConsoleDevice, int, list[bytes], list[str]]:
        master, path = self.make_pair()
        self.reactor = MemoryReactorClock()
        output: list[bytes] = []
        lost: list[str] = []
        # A share of its own: what other tests' devices read must not size this one's bites.
        device = ConsoleDevice.open(
            path, raw, output.append, lost.append, self.reactor, turn_share=TurnShare()
        )
        self.addCleanup(device.close)
        return device, master, output, lost

    def test_reads_registered(self) -> None:
        """startReading puts the device among the reactor's readers."""
        device, master, output, lost = self.make_device()
        self.assertNotIn(device, self.reactor.getReaders())
        device.startReading()
        self.assertIn(device, self.reactor.getReaders())

    def test_output_arrives_byte_exact(self) -> None:
        """
        What the guest writes (NUL, 0xff, CR, escape sequences) reaches the callback
        unchanged: raw mode rewrites nothing.
        """
        device, master, output, lost = self.make_device()
        data = b"\x00\xff\r\n\x1b[31mred\x1b[0m\r\x03\x04\x1a\x7f"
        os.write(master, data)
        device.doRead()
        self.assertEqual(b"".join(output), data)

    def test_close_reads_what_arrived(self) -> None:
        """
        Closing on purpose first hands on what has already arrived (a socket's unread
        bytes would die with it; a saved history then ends where the output did).
        """
        device, master, output, lost = self.make_device()
        os.write(master, b"last words before the restart\r\n")
        # The kernel moves the bytes to the slave's side on its own time: wait for it.
        select.select([device.fd], [], [], 10)
        device.close()
        self.assertEqual(b"".join(output), b"last words before the restart\r\n")
        self.assertEqual(lost, [])

    def test_cooked_mode_translates(self) -> None:
        """
        With --no-raw the line discipline is left alone, and (the reason raw is the
        default) it rewrites the guest's output: a bare NL becomes CR NL.
        """
        device, master, output, lost = self.make_device(raw=False)
        os.write(master, b"line\n")
        device.doRead()
        self.assertEqual(b"".join(output), b"line\n")
        device.write(b"a\n")
        device.doWrite()
        # The kernel echoed the guest's output back to the monitor, and added a CR.
        self.assertEqual(read_all(master), b"line\r\na\r\n")

    def test_reads_a_burst_in_one_call(self) -> None:
        """One doRead reads until EAGAIN, so a burst arrives as one chunk, not 4 KiB ones."""
        device, master, output, lost = self.make_device()
        payload = bytes(range(256)) * 256
        written = 0
        while written < len(payload):
            try:
                written += os.write(master, payload[written : written + 1024])
            except BlockingIOError:
                break
        self.assertGreater(written, 4096)  # more than one read of the line discipline
        device.doRead()
        self.assertEqual(len(output), 1)
        self.assertEqual(output[0], payload[:written])

    def test_read_per_turn_bounded(self) -> None:
        """A flood is read at most READ_PER_TURN bytes per call (plus one read)."""
        device, master, output, lost = self.make_device()
        os.set_blocking(master, False)
        total = 0
        # Fill the pty as far as it will take.
        while True:
            try:
                total += os.write(master, b"y" * 65536)
            except BlockingIOError:
                break
        device.doRead()
        self.assertLessEqual(len(output[0]), READ_PER_TURN + 65536)
        self.assertGreater(len(output[0]), 0)

    def test_input_reaches_master(self) -> None:
        """write() then doWrite() delivers the bytes to the master, unchanged."""
        device, master, output, lost = self.make_device()
        device.write(b"ls -l\r\x03\x00\xff")
        device.doWrite()
        self.assertEqual(read_all(master), b"ls -l\r\x03\x00\xff")

    def test_backpressure_when_master_stops_reading(self) -> None:
        """
        When the guest does not read its input, the write buffer passes bufferSize and
        the registered producer is paused; once drained, it is resumed.
        """
        device, master, output, lost = self.make_device()
        producer = RecordingProducer()
        device.registerProducer(producer, True)
        chunk = b"k" * 4096
        # Write until the kernel buffer is full and ours passes bufferSize.
        for _ in range(200):
            device.write(chunk)
            device.doWrite()
            if "pause" in producer.calls:
                break
        self.assertEqual(producer.calls, ["pause"])
        # The guest reads everything: the buffer drains and the producer resumes.
        received = 0
        for _ in range(10000):
            received += len(read_all(master))
            device.doWrite()
            if "resume" in producer.calls:
                break
        self.assertEqual(producer.calls, ["pause", "resume"])

    def test_hang_up_when_master_closes(self) -> None:
        """Closing the master ends the device with CONNECTION_DONE and a clear reason."""
        device, master, output, lost = self.make_device()
        device.startReading()
        os.write(master, b"last words")
        self.assertIsNone(device.doRead())
        self.assertEqual(b"".join(output), b"last words")
        os.close(master)
        self.master_open = False
        why = device.doRead()
        self.assertIsInstance(why, error.ConnectionDone)
        device.connectionLost(Failure(why))
        self.assertEqual(len(lost), 1)
        self.assertIn("hung up", lost[0])
        self.assertEqual(device.fd, -1)

    def test_close_on_purpose_restores_terminal(self) -> None:
        """close() restores the saved attributes, closes the fd, and reports no loss."""
        master, path = self.make_pair()
        before = termios.tcgetattr(master)
        lost: list[str] = []
        device = ConsoleDevice.open(path, True, lambda data: None, lost.append, MemoryReactorClock())
        fd = device.fd
        device.close()
        self.assertEqual(lost, [])
        self.assertEqual(termios.tcgetattr(master), before)
        self.assertRaises(OSError, os.fstat, fd)


class PendingInputTests(PtyPairMixin, SynchronousTestCase):
    """L{ConsoleDevice.pending_input}: what the guest has not taken yet, exactly."""

    def test_written_at_once_when_nothing_waits(self) -> None:
        """Input with nothing queued before it goes to the guest at once, in this turn."""
        master, path = self.make_pair()
        device = ConsoleDevice.open(path, True, lambda data: None, lambda why: None, MemoryReactorClock())
        self.addCleanup(device.close)
        device.write(b"ls\r")
        self.assertEqual(device.pending_input, 0)
        self.assertEqual(read_all(master), b"ls\r")

    def test_counts_down_as_the_guest_reads(self) -> None:
        """
        Once the guest stops reading, input waits and is counted; later input queues
        behind it (never ahead of it), and the count goes down as the guest reads.
        """
        master, path = self.make_pair()
        device = ConsoleDevice.open(path, True, lambda data: None, lambda why: None, MemoryReactorClock())
        self.addCleanup(device.close)
        flood = bytes(range(256)) * 4096  # 1 MiB: more than the pty holds
        device.write(flood)
        waiting = device.pending_input
        self.assertGreater(waiting, 0)
        device.write(b"after")
        self.assertEqual(device.pending_input, waiting + 5)
        got = b""
        while device.pending_input:
            got += read_all(master)
            device.doWrite()
        got += read_all(master)
        self.assertEqual(got, flood + b"after")


class ConnectUnixTests(SynchronousTestCase):
    """L{connect_unix}: a VMM's console socket."""

    def test_connects(self) -> None:
        """A listening socket is connected; the descriptor is non-blocking."""
        import socket

        from cloud_console.console.device import connect_unix

        path = self.mktemp()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        listener.bind(path)
        listener.listen(1)
        fd = connect_unix(path)
        self.addCleanup(os.close, fd)
        self.assertFalse(os.get_blocking(fd))
        peer, _ = listener.accept()
        self.addCleanup(peer.close)
        os.write(fd, b"hi")
        self.assertEqual(peer.recv(10), b"hi")

    def test_nothing_listening(self) -> None:
        """No socket there: a ConsoleOpenError naming the path and the reason."""
        from cloud_console.console.device import connect_unix

        path = self.mktemp()
        e = self.assertRaises(ConsoleOpenError, connect_unix, path)
        self.assertIn(path, str(e))
        self.assertIn("No such file", str(e))


class TurnShareTests(SynchronousTestCase):
    """Consoles read in big bites alone and in small ones beside another active console."""

    def test_alone_big_beside_another_small(self) -> None:
        """
        A console alone reads L{READ_PER_TURN}; while another read within
        L{ACTIVE_WINDOW}, L{READ_PER_TURN_SHARED}; once the other is quiet, big again.
        """
        now = [100.0]
        share = TurnShare(clock=lambda: now[0])
        flood, quiet = object(), object()
        self.assertEqual(share.budget(flood), READ_PER_TURN)
        share.read(flood)
        self.assertEqual(share.budget(flood), READ_PER_TURN)
        share.read(quiet)
        self.assertEqual(share.budget(flood), READ_PER_TURN_SHARED)
        self.assertEqual(share.budget(quiet), READ_PER_TURN_SHARED)
        share.read(flood)
        now[0] += ACTIVE_WINDOW * 1.01
        self.assertEqual(share.budget(flood), READ_PER_TURN)
        self.assertLess(READ_PER_TURN_SHARED, READ_PER_TURN)

    def test_remembers_two(self) -> None:
        """Only the last two readers count (asking costs the same with 1,000 consoles)."""
        now = [0.0]
        share = TurnShare(clock=lambda: now[0])
        devices = [object() for _ in range(1000)]
        for device in devices:
            share.read(device)
        self.assertEqual(share.budget(devices[-1]), READ_PER_TURN_SHARED)
        self.assertEqual(len(vars(share)), 5)
