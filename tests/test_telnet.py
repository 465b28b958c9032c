"""
The C{telnet+unix:} source: the telnet filter alone, the device speaking it on a socket
pair, and a real QEMU socket chardev with C{telnet=on} (BREAK then h is SysRq help, a
0xFF typed reaches the guest once, the console rides a reboot). Also measured here: a
BREAK sent on a pty does not reach the guest through QEMU.
"""

from __future__ import annotations

import json
import os
import socket
import termios

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from cloud_console.console.actions import actions_for
from cloud_console.console.device import ConsoleDevice
from cloud_console.console.sources import Target, parse_source
from cloud_console.console.telnet import BREAK, TelnetOutput, escape_input
from tests.guest import PROMPT, Console, GuestUnavailable, QemuGuest
from tests.helpers import connect_v1, free_port, http_post, serve_process
from tests.test_qemu import QemuTestCase

#: What QEMU sends first on a telnet=on socket (measured): WILL ECHO, WILL SGA,
#: WILL BINARY, DO BINARY.
QEMU_OPENING = b"\xff\xfb\x01\xff\xfb\x03\xff\xfb\x00\xff\xfd\x00"


class FilterTests(SynchronousTestCase):
    """L{TelnetOutput} and L{escape_input}."""

    def test_opening_stripped(self) -> None:
        """QEMU's opening negotiation is dropped; the guest's bytes after it are kept."""
        self.assertEqual(TelnetOutput().feed(QEMU_OPENING + b"login: "), b"login: ")

    def test_split_across_reads(self) -> None:
        """A command cut between reads is still recognised."""
        telnet = TelnetOutput()
        out = b"".join(telnet.feed(bytes([b])) for b in QEMU_OPENING + b"ok")
        self.assertEqual(out, b"ok")

    def test_subnegotiation_and_two_byte_commands(self) -> None:
        """SB ... IAC SE and NOP are dropped too."""
        self.assertEqual(TelnetOutput().feed(b"\xff\xfa\x18\x01\xff\xf0\xff\xf1hi"), b"hi")

    def test_guest_bytes_verbatim(self) -> None:
        """After the opening, a 0xFF from the guest is its own (QEMU does not double it)."""
        telnet = TelnetOutput()
        self.assertEqual(telnet.feed(QEMU_OPENING + b"A\xffB"), b"A\xffB")
        self.assertEqual(telnet.feed(b"\xff\xfb\x01\xff\xff"), b"\xff\xfb\x01\xff\xff")

    def test_not_a_command_at_start(self) -> None:
        """An IAC not followed by a command byte is the guest's, with what follows."""
        self.assertEqual(TelnetOutput().feed(b"\xffA"), b"\xffA")
        self.assertEqual(TelnetOutput().feed(b"\xff\xff"), b"\xff\xff")

    def test_escape_input(self) -> None:
        """0xFF is doubled, the rest untouched."""
        self.assertEqual(escape_input(b"a\xffb\xff\xff"), b"a\xff\xffb\xff\xff\xff\xff")
        self.assertEqual(BREAK, b"\xff\xf3")

    def test_source(self) -> None:
        """telnet+unix:PATH resolves to the socket in telnet mode; it can BREAK only."""
        source = parse_source("telnet+unix:/run/vm.sock")
        self.assertEqual(source.resolve(), Target("unix", "/run/vm.sock", telnet=True))
        self.assertEqual(actions_for(source), ("break",))
        self.assertRaises(ValueError, parse_source, "telnet+unix:")


class DeviceTests(SynchronousTestCase):
    """L{ConsoleDevice} with C{telnet=True} on a socket pair."""

    def device(self, telnet: bool) -> tuple[ConsoleDevice, socket.socket, list[bytes]]:
        ours, theirs = socket.socketpair()
        self.addCleanup(theirs.close)
        ours.setblocking(False)
        output: list[bytes] = []
        device = ConsoleDevice(
            os.dup(ours.fileno()), "telnet unix socket x", output.append, lambda why: None,
            reactor=MemoryReactorClock(), telnet=telnet,
        )
        ours.close()
        self.addCleanup(device.close)
        return device, theirs, output

    def test_output_input_and_break(self) -> None:
        """The opening is stripped, input 0xFF doubled, BREAK is IAC BRK in order."""
        device, vmm, output = self.device(telnet=True)
        vmm.sendall(QEMU_OPENING + b"guest# ")
        device.doRead()
        self.assertEqual(output, [b"guest# "])
        device.write(b"a\xffb")
        device.send_break()
        device.write(b"h")
        self.assertEqual(vmm.recv(100), b"a\xff\xffb\xff\xf3h")
        self.assertTrue(device.can_break)

    def test_plain_socket_cannot_break(self) -> None:
        """Without telnet: bytes as they are, and no BREAK."""
        device, vmm, output = self.device(telnet=False)
        device.write(b"\xff")
        self.assertEqual(vmm.recv(10), b"\xff")
        self.assertFalse(device.can_break)
        self.assertRaises(ValueError, device.send_break)


class QemuTelnetTests(QemuTestCase):
    """A real QEMU socket chardev with telnet=on."""

    def sysrq_guest(self, serial: str) -> QemuGuest:
        try:
            guest = QemuGuest(serial, append="sysrq_always_enabled=1").start()  # type: ignore[arg-type]
        except (GuestUnavailable, FileNotFoundError) as e:
            raise SkipTest(f"no QEMU guest here: {e} (tests/run.sh installs it)")
        self.addCleanup(guest.close)
        return guest

    async def test_break_iac_and_reboot(self) -> None:
        """
        The page never sees telnet; 0xFF typed reaches the guest once; BREAK from the
        POST then h prints the SysRq help; ``reboot -f`` and the stream goes on.
        """
        guest = self.sysrq_guest("telnet")
        self.port = free_port()
        await serve_process(self, [
            "--console", f"vm=telnet+unix:{guest.serial_path}", "--allow-control",
            "--port", f"tcp:port={self.port}:interface=127.0.0.1",
        ])
        page = await connect_v1(self.port, "/c/vm/ws")
        self.addCleanup(lambda: None if page.close_status else page.transport.abortConnection())
        guest.cont()
        await self.shell(page)
        self.assertNotIn(b"\xff", bytes(page.stream))

        await self.command(page, "stty raw -echo; head -c 3 | od -An -tx1; stty sane", "stty sane")
        page.type(b"\xffZ\xff")
        await page.wait_for(lambda c: " ff 5a ff\n" in c.text())

        since = len(page.text())
        code, body = await http_post(self.port, "/c/vm/actions/break", b"{}", {"Content-Type": "application/json"})
        self.assertEqual(code, 200, body)
        page.type(b"h")
        await page.wait_for(lambda c: "sysrq: HELP : " in c.text()[since:])
        self.assertEqual([e["action"] for e in page.events_of("action")], ["BREAK"])

        since = len(page.text())
        page.type(b"reboot -f\r")
        await self.shell(page, since)
        self.assertIsNone(page.close_status)

    def test_pty_cannot_carry_a_break(self) -> None:
        """
        Measured: tcsendbreak on the pty QEMU serves (Linux accepts it without error)
        then h: the guest gets the h as a character, and no SysRq happens.
        """
        guest = self.sysrq_guest("chardev-pty")
        console = Console.open_pty(guest.pty_path())
        self.addCleanup(console.close)
        guest.cont()
        console.expect(PROMPT, 60)
        termios.tcsendbreak(console.fd, 0)
        console.write(b"h")
        console.write(b"; echo done-$((6*7))\r")
        seen = console.expect(b"done-42", 30)
        self.assertNotIn(b"sysrq: HELP", seen)
        self.assertIn(b"h; echo done", seen)
