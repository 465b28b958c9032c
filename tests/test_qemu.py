"""
cloud-console against a real VMM: QEMU booting a real Linux guest (tests/guest.py).

A real C{cloud-console} process finds the guest's console through QMP (C{qmp:}) or
QEMU's unix socket chardev (C{unix:}), holds it before the guest runs (QEMU drops what
the guest writes while nobody holds it: the guest is started paused and let go once
cloud-console serves), and real v1 WebSocket clients watch and type. Shown: the kernel's
first line in the head of a client that connects after the shell is up, a command typed
over the WebSocket running in the guest, a guest C{reboot -f} and a QEMU restart
followed with the stream going on and no client reconnecting.

The guest boots under TCG in a few seconds; QMP calls are short and blocking (the test's
own monitor), everything else waits on events.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SkipTest, TestCase

from tests.guest import BANNER, PROMPT, GuestUnavailable, QemuGuest
from tests.helpers import Server, V1Client, connect_v1, free_port, serve_process


#: The kernel's first line on the console (printk's timestamp in front).
FIRST_LINE = r"^\[\s*0\.0+\] Linux version \d"


def states(client: V1Client) -> list[str]:
    """The console states a client heard, in order."""
    return [e["state"] for e in client.events_of("console")]


class QemuTestCase(TestCase):
    """A paused QEMU guest and a cloud-console serving it, both stopped at the end."""

    timeout = 180

    def guest(self, serial: Any) -> QemuGuest:
        try:
            guest = QemuGuest(serial).start()
        except (GuestUnavailable, FileNotFoundError) as e:
            raise SkipTest(f"no QEMU guest here: {e} (tests/run.sh installs it)")
        self.addCleanup(guest.close)
        return guest

    async def serve(self, source: str, *extra: str) -> Server:
        self.port = free_port()
        return await serve_process(self, [source, "127.0.0.1", str(self.port), "--reopen", *extra])

    async def shell(self, client: V1Client, since: int = 0) -> None:
        """Wait for a boot's shell prompt in what the client got after C{since} (a text index)."""
        prompt = BANNER.decode() + "\r\n"
        await client.wait_for(lambda c: prompt in c.text()[since:])
        await client.wait_for(lambda c: PROMPT.decode() in c.text()[since:].split(prompt, 1)[1])

    async def command(self, client: V1Client, command: str, answer: str) -> None:
        """Type C{command} as a page would, and wait for C{answer} to come back."""
        before = client.text().count(answer)
        client.type(command.encode() + b"\r")
        await client.wait_for(lambda c: c.text().count(answer) > before)


class QmpTests(QemuTestCase):
    """C{qmp:} (libvirt's chardev name): the pty is found, and found again after a restart."""

    async def test_boot_log_typing_reboot_and_restart(self) -> None:
        """
        The whole life of a VM behind one URL: boot (the late client's head starts with
        the kernel's first line, then a skip, then the tail); a command typed over the
        WebSocket runs in the guest; ``reboot -f`` (same pty) goes on in the same
        stream; a QEMU restart (new process, new pty) is shown down then up and the
        stream goes on at the next offset; no client ever reconnects.
        """
        guest = self.guest("chardev-pty")
        await self.serve(f"qmp:{guest.qmp_path}", "--history-size", "2000", "--head-size", "4096")
        watcher = await connect_v1(self.port)
        guest.cont()
        await self.shell(watcher)
        late = await connect_v1(self.port)
        shown = watcher.next_offset or 0
        await late.wait_for(lambda c: (c.next_offset or 0) >= shown)
        self.assertEqual(late.first_offset, 0)
        self.assertRegex(late.text().split("\n", 1)[0], FIRST_LINE)
        [skip] = late.events_of("skip")
        self.assertEqual(skip["from"], 4096)
        self.assertTrue(late.text().endswith(PROMPT.decode()) or PROMPT.decode() in late.text()[-200:])

        await self.command(late, "echo $((6*7))", "\n42")
        await watcher.wait_text("\n42")

        boots = watcher.text().count("Linux version")
        since = len(watcher.text())
        late.type(b"reboot -f\r")
        await watcher.wait_for(lambda c: c.text().count("Linux version") > boots)
        await self.shell(watcher, since)
        self.assertEqual(states(watcher), [])  # the same pty all along: never down

        offset = watcher.next_offset
        since = len(watcher.text())
        guest.restart()
        await watcher.wait_for(lambda c: states(c)[-2:] == ["down", "up"])
        guest.cont()
        await watcher.wait_for(lambda c: c.text().count("Linux version") > boots + 1)
        await self.shell(watcher, since)
        self.assertGreater(watcher.offsets[-1], offset)
        await self.command(watcher, "echo back $((1+1))", "back 2")
        for client in (watcher, late):
            self.assertIsNone(client.close_status)
            self.assertEqual(len(client.events_of("hello")), 1)
            self.assertEqual(client.events_of("gap"), [])


class UnixSocketTests(QemuTestCase):
    """C{unix:} with QEMU's socket chardev: connected, typed into, reconnected after a restart."""

    async def test_socket_chardev(self) -> None:
        """
        The console is QEMU's unix socket chardev: the boot comes through from its first
        line, typing works, and a QEMU restart is followed on the same connection.
        """
        guest = self.guest("socket")
        await self.serve(f"unix:{guest.serial_path}")
        client = await connect_v1(self.port)
        guest.cont()
        await self.shell(client)
        self.assertRegex(client.text().split("\n", 1)[0], FIRST_LINE)
        await self.command(client, "echo $((6*7))", "\n42")
        since = len(client.text())
        guest.restart()
        await client.wait_for(lambda c: states(c)[-2:] == ["down", "up"])
        guest.cont()
        await self.shell(client, since)
        await self.command(client, "echo again", "\nagain")
        self.assertEqual(len(client.events_of("hello")), 1)
