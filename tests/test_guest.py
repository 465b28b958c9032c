"""
Tests of the real-guest harness (tests/guest.py) against a real QEMU, without cloud-console.

They pin down the VMM behaviour cloud-console's real-guest tests rely on: the boot log
starts with ``Linux version`` when the console is opened before ``cont``; the shell
answers on the serial console; ``reboot -f`` and ``system_reset`` print a new boot log on
the *same* pty; query-chardev's labels for QEMU's and libvirt's spellings; the unix socket
chardev; and what a restart and an exit do to the pty (new number while the old slave is
held; EOF on read, EIO on write of the old slave).

Guests boot under TCG (no KVM); the tests that need a shell share one guest per class
(:class:`tests.guest.SharedGuest`), the rest use a paused guest, which costs no boot.
"""

from __future__ import annotations

import json
import os
import select
import socket
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.guest import (
    BANNER,
    BOOT_TIMEOUT,
    PROMPT,
    Console,
    ConsoleClosed,
    ConsoleTimeout,
    QemuGuest,
    SharedGuest,
    boot,
    newc_archive,
    read_until,
)

_pty_guest = SharedGuest(lambda: QemuGuest("chardev-pty"))


class ReadUntilTests(SynchronousTestCase):
    """The blocking reader on a plain pipe: no QEMU needed."""

    def pipe(self) -> tuple[int, int]:
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, read_end)
        self.addCleanup(lambda: _close_quietly(write_end))
        return read_end, write_end

    def test_returns_everything_read(self) -> None:
        """Bytes after the needle in the same read are returned, not dropped."""
        read_end, write_end = self.pipe()
        os.write(write_end, b"abc NEEDLE def")
        self.assertEqual(read_until(read_end, b"NEEDLE", 5), b"abc NEEDLE def")

    def test_initial_is_searched(self) -> None:
        """A needle already in ``initial`` returns without reading."""
        read_end, _ = self.pipe()
        self.assertEqual(read_until(read_end, b"x", 5, initial=b"_x_"), b"_x_")

    def test_timeout_carries_what_was_read(self) -> None:
        """Without the needle it raises ConsoleTimeout after the deadline, with the bytes."""
        read_end, write_end = self.pipe()
        os.write(write_end, b"partial")
        started = time.monotonic()
        error = self.assertRaises(ConsoleTimeout, read_until, read_end, b"never", 0.2)
        self.assertGreaterEqual(time.monotonic() - started, 0.2)
        self.assertEqual(error.received, b"partial")

    def test_end_of_file(self) -> None:
        """EOF before the needle raises ConsoleClosed, with the bytes."""
        read_end, write_end = self.pipe()
        os.write(write_end, b"bye")
        os.close(write_end)
        error = self.assertRaises(ConsoleClosed, read_until, read_end, b"never", 5)
        self.assertEqual((error.received, error.reason), (b"bye", "end of file"))

    def test_console_expect_keeps_the_rest(self) -> None:
        """Console.expect splits at the needle and the next expect sees the remainder."""
        read_end, write_end = self.pipe()
        console = Console(read_end, lambda: None)
        os.write(write_end, b"one\ntwo\n")
        self.assertEqual(console.expect(b"one\n", 5), b"one\n")
        self.assertEqual(console.expect(b"two\n", 5), b"two\n")
        self.assertEqual(bytes(console.transcript), b"one\ntwo\n")


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class NewcTests(SynchronousTestCase):
    """The initramfs writer's layout (the boot tests prove the kernel accepts it)."""

    def test_entry_layout(self) -> None:
        """Header fields, name and data are 4-byte aligned; the archive ends in a trailer."""
        archive = newc_archive([("init", 0o100755, b"12345")])
        self.assertEqual(archive[:6], b"070701")
        self.assertEqual(int(archive[6 + 8 * 1 : 6 + 8 * 2], 16), 0o100755)  # mode
        self.assertEqual(int(archive[6 + 8 * 6 : 6 + 8 * 7], 16), 5)  # file size
        self.assertEqual(int(archive[6 + 8 * 11 : 6 + 8 * 12], 16), 5)  # "init\0"
        # 110-byte header + "init\0" = 115, padded to 116; 5 data bytes padded to 8.
        self.assertEqual(archive[110:116], b"init\0\0")
        self.assertEqual(archive[116:124], b"12345\0\0\0")
        self.assertEqual(archive[124:130], b"070701")
        self.assertIn(b"TRAILER!!!\0", archive[124:])
        self.assertEqual(len(archive) % 4, 0)


class PtyConsoleTests(SynchronousTestCase):
    """
    A guest on libvirt's ``-chardev pty,id=charserial0``, shared by the tests of the class.

    test_reboot and test_system_reset leave the guest at a fresh prompt, so the order in
    which trial runs these does not matter.
    """

    def test_linux_version_first(self) -> None:
        """The console opened before cont() sees the kernel's first line."""
        booted = _pty_guest.get()
        self.assertIn(b"Linux version", booted.boot[:100])

    def test_banner_then_prompt(self) -> None:
        """/init's banner, then the shell's prompt, with job control on (no warning)."""
        booted = _pty_guest.get()
        self.assertIn(BANNER, booted.boot)
        self.assertTrue(booted.boot.endswith(PROMPT))
        self.assertLess(booted.boot.index(BANNER), booted.boot.rindex(PROMPT))
        self.assertNotIn(b"job control turned off", booted.boot)

    def test_arithmetic(self) -> None:
        """Typing ``echo $((6*7))`` gives 42: the shell reads and writes ttyS0."""
        console = _pty_guest.get().console
        self.assertEqual(console.run("echo $((6*7))"), b"42\r\n")

    def test_controlling_tty(self) -> None:
        """The shell owns ttyS0 as its controlling tty, so background jobs are tracked."""
        console = _pty_guest.get().console
        self.assertEqual(console.run("tty"), b"/dev/ttyS0\r\n")
        console.run("sleep 600 &")
        self.assertIn(b"Running", console.run("jobs"))
        console.run("kill %1; wait")

    def test_label(self) -> None:
        """query-chardev names the console ``charserial0``, a ``pty:/dev/pts/N``."""
        guest = _pty_guest.get().guest
        self.assertRegex(guest.chardevs()["charserial0"], r"^pty:/dev/pts/[0-9]+$")

    def test_reboot(self) -> None:
        """``reboot -f`` resets the machine: a new boot log and shell on the same pty."""
        booted = _pty_guest.get()
        before = booted.guest.pty_path()
        booted.console.write(b"reboot -f\n")
        booted.console.expect(b"reboot: Restarting system", 30)
        booted.console.expect(b"Linux version", 30)
        booted.console.expect(BANNER, BOOT_TIMEOUT)
        booted.console.expect(PROMPT, 30)
        self.assertEqual(booted.guest.pty_path(), before)
        self.assertIn("RESET", [event["event"] for event in booted.guest.events])
        self.assertEqual(booted.console.run("echo $((6*7))"), b"42\r\n")

    def test_system_reset(self) -> None:
        """QMP ``system_reset`` reboots the guest on the same pty, too."""
        booted = _pty_guest.get()
        before = booted.guest.pty_path()
        booted.guest.system_reset()
        booted.console.expect(b"Linux version", 30)
        booted.console.expect(PROMPT, BOOT_TIMEOUT)
        self.assertEqual(booted.guest.pty_path(), before)


class SerialPtyTests(SynchronousTestCase):
    """QEMU's own ``-serial pty`` spelling, on a paused guest (no boot needed)."""

    def test_label(self) -> None:
        """``-serial pty`` is labelled ``serial0``, and pty_path() finds it there."""
        guest = QemuGuest("pty").start()
        self.addCleanup(guest.close)
        chardevs = guest.chardevs()
        self.assertNotIn("charserial0", chardevs)
        self.assertEqual(chardevs["serial0"], "pty:" + guest.pty_path())
        self.assertTrue(os.path.exists(guest.pty_path()))


class SocketConsoleTests(SynchronousTestCase):
    """The console as a unix socket server chardev (``server=on,wait=off``)."""

    def test_boot(self) -> None:
        """Connected before cont(), the socket carries the whole boot and the shell."""
        guest = QemuGuest("socket")
        booted = boot(guest)
        self.addCleanup(booted.close)
        self.assertIn(b"Linux version", booted.boot[:100])
        self.assertIn(BANNER, booted.boot)
        self.assertEqual(guest.chardevs()["charserial0"], f"unix:{guest.serial_path},server=on")
        self.assertEqual(booted.console.run("echo $((6*7))"), b"42\r\n")


class LifecycleTests(SynchronousTestCase):
    """Restarts and exits: what a console client holding the old pty sees."""

    def guest(self) -> QemuGuest:
        guest = QemuGuest("chardev-pty").start()
        self.addCleanup(guest.close)
        return guest

    def hold(self, path: str) -> Console:
        console = Console.open_pty(path)
        self.addCleanup(console.close)
        return console

    def test_restart_new_pty(self) -> None:
        """
        restart() while the old slave is held gives a new pty, on which the new guest boots;
        the old slave reads EOF.
        """
        guest = self.guest()
        old = self.hold(guest.pty_path())
        old_path = guest.pty_path()
        first = guest.process
        guest.restart()
        self.assertIsNot(guest.process, first)
        self.assertNotEqual(guest.pty_path(), old_path)
        self.assertEqual(os.read(old.fd, 100), b"")
        booted = boot(guest)
        self.assertIn(b"Linux version", booted.boot[:100])
        booted.console.close()

    def test_exit_hangs_up_the_slave(self) -> None:
        """When QEMU quits, the held slave reads EOF (not EIO) and writes fail with EIO."""
        guest = self.guest()
        console = self.hold(guest.pty_path())
        self.assertEqual(guest.quit(), 0)
        readable, _, _ = select.select([console.fd], [], [], 5)
        self.assertEqual(readable, [console.fd])
        self.assertEqual(os.read(console.fd, 100), b"")
        error = self.assertRaises(OSError, os.write, console.fd, b"x")
        self.assertEqual(error.errno, 5)  # EIO

    def test_qmp_path_is_separate(self) -> None:
        """
        qmp_path is a second monitor, usable while the test's control monitor is connected,
        and is recreated by restart(), even after a kill left the old socket file behind.
        """
        guest = self.guest()
        self.assertEqual(_query_status(guest.qmp_path), "prelaunch")
        guest.kill()
        self.assertTrue(os.path.exists(guest.qmp_path))
        guest.restart()
        self.assertEqual(_query_status(guest.qmp_path), "prelaunch")
        self.assertEqual(guest.qmp("query-status")["status"], "prelaunch")


def _query_status(path: str) -> str:
    """Run ``query-status`` on a QMP unix socket as cloud-console would; return the status."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(path)
        stream = sock.makefile("rwb")
        greeting = stream.readline()
        if b"QMP" not in greeting:
            raise AssertionError(f"not a QMP greeting: {greeting!r}")
        for command in ("qmp_capabilities", "query-status"):
            stream.write(json.dumps({"execute": command}).encode() + b"\n")
            stream.flush()
            reply = json.loads(stream.readline())
        status: str = reply["return"]["status"]
        return status
