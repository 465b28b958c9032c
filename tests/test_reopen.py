"""
Following the guest with a real C{cloud-console} process: a reboot that makes a new pty
(behind a symlink, or named by a cloud-hypervisor API stand-in), the console shown down
and up to a v1 client that never reconnects, the stream going on at the next offset,
input refused while down, the log file's markers, and a console not there at start-up.

Guests are real ptys (L{tests.test_badinput.Guest}); every wait is on an event (a byte, a
message, a line in the server's log).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from twisted.trial.unittest import TestCase

from tests.cloud_hypervisor_standin import CloudHypervisorStandIn
from tests.helpers import Guest, Server, V1Client, connect_v1, free_port, serve_process, spawn_server


def state_events(client: V1Client) -> list[tuple[str, str]]:
    """The console events a client heard, as (state, reason)."""
    return [(e["state"], e["reason"]) for e in client.events_of("console")]


class ReopenTests(TestCase):
    """One server per test, following a console through reboots."""

    timeout = 60

    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir()
        self.link = self.dir / "vm1.console"

    def guest(self) -> Guest:
        """A new pty, as the VMM makes on each boot; closed at the end."""
        guest = Guest()
        self.addCleanup(guest.close)
        guest.start_reading()
        return guest

    def point_link_at(self, guest: Guest) -> None:
        """The VMM's symlink now names C{guest}'s pty."""
        if self.link.is_symlink():
            self.link.unlink()
        self.link.symlink_to(guest.path)

    async def serve(self, source: str, *extra: str) -> Server:
        self.port = free_port()
        return await serve_process(self, [source, "127.0.0.1", str(self.port), *extra])

    async def test_reboot_with_a_new_pty(self) -> None:
        """
        The guest's pty hangs up and the VMM makes a new one behind the symlink: the
        client (never reconnecting) hears down with the reason, has its input refused
        as "console down", hears up, and the stream goes on at the next offset; input
        reaches the new guest; the log has the output and one marker line per change.
        """
        first = self.guest()
        self.point_link_at(first)
        log_file = self.dir / "vm1.log"
        server = await self.serve(str(self.link), str(log_file), "--reopen")
        client = await connect_v1(self.port)
        await first.write(b"first boot\r\n")
        await client.wait_text("first boot\r\n")
        first.hang_up()
        await client.wait_for(lambda c: ("down", f"pty {self.link} hung up") in state_events(c))
        client.type(b"lost\r")
        await client.wait_for(lambda c: bool(c.events_of("input-discarded")))
        self.assertEqual(
            client.events_of("input-discarded")[-1], {"type": "input-discarded", "bytes": 5, "reason": "console down"}
        )
        second = self.guest()
        self.point_link_at(second)
        await client.wait_for(lambda c: ("up", f"opened pty {self.link}") in state_events(c))
        await second.write(b"second boot\r\n")
        await client.wait_text("second boot\r\n")
        self.assertEqual(bytes(client.stream), b"first boot\r\nsecond boot\r\n")
        self.assertEqual(client.offsets[-1], 12)
        self.assertIsNone(client.close_status)
        self.assertEqual(len(client.events_of("hello")), 1)
        client.type(b"uname\r")
        await second.receives(lambda got: got == b"uname\r")
        self.assertEqual(bytes(first.input), b"")
        server.signal("TERM")
        self.assertEqual(await server.ended, 0)
        lines = log_file.read_bytes().split(b"\r\n")
        self.assertEqual(lines[0], b"first boot")
        self.assertRegex(lines[1].decode(), rf"^\[-- console down: pty {re.escape(str(self.link))} hung up -- .+Z --\]$")
        self.assertRegex(lines[2].decode(), r"^\[-- console up: opened pty .+ -- .+Z --\]$")
        self.assertEqual(lines[3:], [b"second boot", b""])

    async def test_head_of_each_boot_replayed(self) -> None:
        """
        A client connecting after a long boot gets the boot's first bytes, a skip, and
        the tail from its first whole line, with true offsets; after a reboot the head is
        the new boot's.
        """
        first = self.guest()
        self.point_link_at(first)
        await self.serve(str(self.link), "--reopen", "--head-size", "100", "--history-size", "200")
        watcher = await connect_v1(self.port)
        boot = b"Linux version 6.1 (first line of the boot)\r\n" + b"." * 3_000_000 + b"\r\nlogin: "
        await first.write(boot)
        await watcher.wait_for(lambda c: c.next_offset == len(boot))
        late = await connect_v1(self.port)
        await late.wait_for(lambda c: c.next_offset == len(boot))
        [skip] = late.events_of("skip")
        self.assertEqual(late.first_offset, 0)
        self.assertTrue(late.text().startswith("Linux version 6.1"))
        self.assertTrue(late.text().endswith("login: "))
        self.assertEqual((skip["from"], skip["to"]), (100, len(boot) - len(b"login: ")))
        self.assertEqual(len(late.stream), 100 + len(b"login: "))
        first.hang_up()
        await watcher.wait_for(lambda c: ("down", f"pty {self.link} hung up") in state_events(c))
        second = self.guest()
        self.point_link_at(second)
        await watcher.wait_for(lambda c: bool(state_events(c)) and state_events(c)[-1][0] == "up")
        await second.write(b"Linux version 6.2\r\n" + b"-" * 5000)
        await watcher.wait_for(lambda c: c.next_offset == len(boot) + 5019)
        newest = await connect_v1(self.port)
        await newest.wait_for(lambda c: c.next_offset == len(boot) + 5019)
        self.assertEqual(newest.first_offset, len(boot))
        self.assertTrue(newest.text().startswith("Linux version 6.2"))

    async def test_console_not_there_at_start(self) -> None:
        """
        With --reopen, a console that does not exist yet is waited for: the server
        serves, a client hears "down" right after hello, then "up" once it appears.
        """
        await self.serve(str(self.link), "--reopen")
        client = await connect_v1(self.port)
        await client.wait_for(lambda c: bool(c.events_of("console")))
        self.assertEqual([e["type"] for e in client.events[:2]], ["hello", "console"])
        self.assertEqual(client.events[1]["state"], "down")
        self.assertIn("waiting for", client.events[1]["reason"])
        guest = self.guest()
        self.point_link_at(guest)
        await client.wait_for(lambda c: state_events(c)[-1][0] == "up")
        await guest.write(b"hello")
        await client.wait_text("hello")

    async def test_cloud_hypervisor_reboot(self) -> None:
        """
        Through the cloud-hypervisor stand-in's vm.info: the pty it names is opened; on
        a reboot (a new pty, the old one closed) the new path is asked for and followed.
        """
        # A short directory: a unix socket's path is limited to 107 bytes, which a
        # checkout's _trial_temp/... may pass.
        sockets = tempfile.mkdtemp(prefix="cc-ch-")
        self.addCleanup(shutil.rmtree, sockets, True)
        api = os.path.join(sockets, "ch.sock")
        standin = CloudHypervisorStandIn(api)
        standin.start()
        self.addCleanup(standin.stop)
        first = self.guest()
        standin.boot(pty_path=first.path)
        await self.serve(f"cloud-hypervisor:{api}", "--reopen")
        client = await connect_v1(self.port)
        await first.write(b"boot 1 ")
        await client.wait_text("boot 1 ")
        second = self.guest()
        standin.shutdown()
        first.hang_up()
        await client.wait_for(lambda c: ("down", f"pty {first.path} hung up") in state_events(c))
        standin.boot(pty_path=second.path)
        await client.wait_for(lambda c: state_events(c)[-1][0] == "up")
        self.assertIn(second.path, state_events(client)[-1][1])
        self.assertIn("cloud-hypervisor:", state_events(client)[-1][1])
        await second.write(b"boot 2")
        await client.wait_text("boot 1 boot 2")
        self.assertEqual(client.offsets[-1], 7)

    async def test_reopen_refused_for_a_numbered_pty(self) -> None:
        """--reopen on a bare /dev/pts/N is a usage error (exit 1) with the reason."""
        guest = self.guest()
        server = spawn_server([guest.path, "127.0.0.1", str(free_port()), "--reopen"])
        server.listening.addErrback(lambda failure: None)  # it never listens
        self.assertEqual(await server.ended, 1)
        self.assertIn(b"another VM", server.stderr)

    async def test_without_reopen_hang_up_exits_2(self) -> None:
        """Without --reopen a hang-up still ends the server with status 2 (the original's)."""
        guest = self.guest()
        server = await self.serve(guest.path)
        client = await connect_v1(self.port)
        guest.hang_up()
        code, _ = await client.closed
        self.assertEqual(code, 4001)
        self.assertEqual(await server.ended, 2)
