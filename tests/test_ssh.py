"""
The SSH door with a real OpenSSH client and real keys from C{ssh-keygen}: attaching to a
console shared with WebSocket viewers, the C{history} and C{status} commands, the escape
sequence, access by C{authorized_keys} options and by user certificates, limits, and the
host key.

Servers are real C{cloud-console} processes on real ptys; waits are on events (bytes on
the guest's side or the client's, lines in the server's log, the client's exit).
"""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import subprocess
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase

from tests.helpers import (
    TWISTD,
    Guest,
    Server,
    SSHClient,
    V1Client,
    connect_v1,
    free_port,
    serve_process,
    spawn_python,
    spawn_server,
    spawn_ssh,
    ssh_args,
    ssh_keygen,
    ssh_sign,
)


class SSHTestCase(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir()
        self.host_key = self.dir / "host_key"
        self.authorized = self.dir / "authorized_keys"
        self.alice = ssh_keygen(self.dir, "alice", comment="alice@laptop")

    def guest(self) -> Guest:
        guest = Guest()
        self.addCleanup(guest.close)
        guest.start_reading()
        return guest

    def authorize(self, *lines: str) -> None:
        self.authorized.write_text("".join(line + "\n" for line in lines))

    def key_line(self, key: Path, options: str = "") -> str:
        public = Path(f"{key}.pub").read_text().strip()
        return f"{options} {public}".strip()

    async def serve(self, *args: str, authorized: bool = True) -> Server:
        self.port = free_port()
        self.ssh_port = free_port()
        more = ["--ssh-authorized-keys", str(self.authorized)] if authorized else []
        server = await serve_process(
            self,
            [
                *args,
                "--port", f"tcp:port={self.port}:interface=127.0.0.1",
                "--ssh-port", f"tcp:port={self.ssh_port}:interface=127.0.0.1",
                "--ssh-host-key", str(self.host_key),
                *more,
            ],
        )
        await server.log_line(lambda err: b"ConsoleSSHFactory starting on" in err and err.count(b"starting on") >= 2)
        return server

    def ssh(self, user: str, *command: str, key: Path | None = None, terminal: bool = False,
            certificate: Path | None = None) -> SSHClient:
        args = ssh_args(self.ssh_port, user, key or self.alice, *command, certificate=certificate)
        return spawn_ssh(self, args, terminal=terminal)


class AttachTests(SSHTestCase):
    """An SSH session is one more viewer of the shared console."""

    async def test_history_then_typing_shared_with_a_page(self) -> None:
        """
        The SSH user gets the history, then new output; what they type reaches the
        guest; a WebSocket viewer sees the guest's echo of it, and the SSH user sees
        the echo of what the page typed.
        """
        guest = self.guest()
        self.authorize(self.key_line(self.alice))
        server = await self.serve("--console", f"vm1={guest.path}")
        await guest.write(b"boot line one\r\nlogin: ")
        await server.log_line(lambda err: True)
        client = self.ssh("vm1", terminal=True)
        await client.wait_output(b"boot line one\r\nlogin: ")
        page = await connect_v1(self.port, "/c/vm1/ws")
        self.addCleanup(page.transport.abortConnection)
        client.type(b"root\r")
        await guest.receives(lambda data: data.endswith(b"root\r"))
        await guest.write(b"root\r\n# ")
        await page.wait_text("root\r\n# ")
        await client.wait_output(b"root\r\n# ")
        page.type(b"uname\r")
        await guest.receives(lambda data: data.endswith(b"uname\r"))
        await guest.write(b"uname\r\nLinux\r\n# ")
        await client.wait_output(b"uname\r\nLinux\r\n# ")

    async def test_escapes(self) -> None:
        """
        ^Ec? lists the escapes; ^Ecw lists who is on the console (both doors, with
        identities); ^Ec^Ec sends the prefix to the guest; ^Ecs writes stty with the
        client's window size; ^Ec. disconnects with status 0.
        """
        guest = self.guest()
        self.authorize(self.key_line(self.alice))
        server = await self.serve("--console", f"vm1={guest.path}")
        client = self.ssh("vm1", terminal=True)
        await server.log_line(lambda err: b"SSH session on console vm1" in err)
        page = await connect_v1(self.port, "/c/vm1/ws")
        self.addCleanup(page.transport.abortConnection)
        await page.wait_for(lambda p: p.events_of("clients") and p.events_of("clients")[-1]["count"] == 2)
        client.type(b"\x05c?")
        await client.wait_output(b"w  who is on this console")
        client.type(b"\x05cw")
        await client.wait_output(b"[-- on this console --]")
        await client.wait_for(lambda c: b"anonymous" in c.stdout.split(b"on this console")[-1])
        who = client.stdout.split(b"[-- on this console --]")[-1]
        self.assertIn(b"ssh  alice@laptop  127.0.0.1  read-write", who)
        self.assertIn(b"web  anonymous  127.0.0.1  read-write", who)
        await guest.write(b"kept line\r\n")
        await client.wait_output(b"kept line\r\n")
        client.type(b"\x05cr")
        await client.wait_output(b"[-- end of the history --]")
        replayed = client.stdout.split(b"[-- replaying the history --]\r\n")[-1]
        self.assertEqual(replayed, b"kept line\r\n\r\n[-- end of the history --]\r\n")
        client.type(b"x\x05c\x05cy")
        await guest.receives(lambda data: data.endswith(b"x\x05cy"))
        client.type(b"\x05cs")
        await guest.receives(lambda data: data.endswith(b"stty rows 24 cols 80\r") or b"stty rows" in data)
        self.assertRegex(bytes(guest.input), rb"stty rows \d+ cols \d+\r$")
        client.type(b"\x05c.")
        self.assertEqual(await client.ended, 0)


class ActionEscapeTests(SSHTestCase):
    """The escapes k KEY (SysRq) and b (BREAK), behind the control right."""

    async def test_sysrq_and_break(self) -> None:
        """
        With the C{control} option, ^Eck then t is QMP send-key (seen on the VMM's side)
        and told to the session and the page; ^Ecb on a console that cannot carry a BREAK
        says why. Without the right, ^Eck is refused, nothing reaches the VMM, and the
        next key goes to the guest as typed.
        """
        from tests.test_actions_web import recording_qmp
        from tests.test_sources import _short_tempdir

        guest = self.guest()
        commands: list[dict[str, Any]] = []
        qmp = recording_qmp(self, os.path.join(_short_tempdir(self), "vm.qmp"), guest.path, commands)
        bob = ssh_keygen(self.dir, "bob", comment="bob@laptop")
        self.authorize(self.key_line(self.alice, "control"), self.key_line(bob))
        server = await self.serve("--console", f"vm1=qmp:{qmp.path}")
        page = await connect_v1(self.port, "/c/vm1/ws")
        self.addCleanup(page.transport.abortConnection)
        alice = self.ssh("vm1", terminal=True)
        await server.log_line(lambda err: b"SSH session on console vm1" in err)
        alice.type(b"\x05ck")
        await alice.wait_output(b"SysRq: type the key")
        alice.type(b"t")
        await alice.wait_output(b"[-- alice@laptop sent SysRq t at ")
        self.assertEqual([c["execute"] for c in commands], ["send-key"])
        self.assertEqual(commands[0]["arguments"]["keys"][2], {"type": "qcode", "data": "t"})
        await page.wait_for(lambda p: bool(p.events_of("action")))
        self.assertEqual(page.events_of("action")[0]["action"], "SysRq t")
        self.assertNotIn(b"t", bytes(guest.input))
        alice.type(b"\x05cb")
        await alice.wait_output(b"BREAK not sent: console source")
        alice.type(b"\x05c?")
        await alice.wait_output(b"k  then a key: Magic SysRq")

        bobs = self.ssh("vm1", key=bob, terminal=True)
        await server.log_line(lambda err: err.count(b"SSH session on console vm1") == 2)
        bobs.type(b"\x05ck")
        await bobs.wait_output(b"this key has no control right on this console")
        bobs.type(b"q")
        await guest.receives(lambda data: data.endswith(b"q"))
        self.assertEqual(len(commands), 1)


class CommandTests(SSHTestCase):
    """C{history} and C{status} as the SSH command; an unknown one."""

    async def test_history_is_byte_exact(self) -> None:
        guest = self.guest()
        self.authorize(self.key_line(self.alice))
        written = bytes(range(256)) * 40 + b"\x00\xff\xfe invalid \xc3\x28 utf-8\r\n"
        await self.serve("--console", f"vm1={guest.path}")
        page = await connect_v1(self.port, "/c/vm1/ws")
        self.addCleanup(page.transport.abortConnection)
        await guest.write(written)
        await page.wait_for(lambda p: bytes(p.stream) == written)
        client = self.ssh("vm1", "history")
        self.assertEqual(await client.ended, 0)
        self.assertEqual(client.stdout, written)

    async def test_status_is_json(self) -> None:
        guest = self.guest()
        self.authorize(self.key_line(self.alice))
        await self.serve("--console", f"vm1={guest.path}")
        client = self.ssh("vm1", "status")
        self.assertEqual(await client.ended, 0)
        status = json.loads(client.stdout)
        self.assertEqual((status["name"], status["state"]), ("vm1", "up"))

    async def test_unknown_command(self) -> None:
        guest = self.guest()
        self.authorize(self.key_line(self.alice))
        await self.serve("--console", f"vm1={guest.path}")
        client = self.ssh("vm1", "reboot")
        self.assertEqual(await client.ended, 2)
        self.assertEqual(client.stdout, b"")
        self.assertEqual(client.stderr.count(b"\n"), 1)
        self.assertIn(b"unknown command 'reboot'", client.stderr)


class AccessTests(SSHTestCase):
    """Which consoles a key opens, read-only keys, from=, and lines that are refused."""

    async def test_key_limited_to_patterns(self) -> None:
        """
        A key for web-* opens web-1; for db1 it gets one line naming only what it may
        open, and the same line for a console that does not exist (so it cannot learn
        which exist), then status 1.
        """
        web, db = self.guest(), self.guest()
        self.authorize(self.key_line(self.alice, 'consoles="web-*"'))
        await self.serve("--console", f"web-1={web.path}", "--console", f"db1={db.path}")
        refused = self.ssh("db1", "status")
        missing = self.ssh("nosuch", "status")
        self.assertEqual(await refused.ended, 1)
        self.assertEqual(await missing.ended, 1)
        self.assertEqual(refused.stderr, b"no console 'db1' for this key; it may open: web-1\n")
        self.assertEqual(missing.stderr, b"no console 'nosuch' for this key; it may open: web-1\n")
        self.assertEqual(refused.stdout, b"")
        allowed = self.ssh("web-1", "status")
        self.assertEqual(await allowed.ended, 0)
        self.assertEqual(json.loads(allowed.stdout)["name"], "web-1")

    async def test_read_only_key(self) -> None:
        """A read-only key's typing never reaches the guest; it is told once."""
        guest = self.guest()
        bob = ssh_keygen(self.dir, "bob", kind="rsa")
        self.authorize(self.key_line(self.alice), self.key_line(bob, "read-only,no-pty"))
        server = await self.serve("--console", f"vm1={guest.path}")
        viewer = self.ssh("vm1", key=bob, terminal=True)
        await server.log_line(lambda err: b", read-only" in err)
        viewer.type(b"rm -rf /\r")
        await viewer.wait_output(b"[-- input not sent: read-only --]")
        viewer.type(b"again\r")
        # The writer's input goes through, after the read-only user's: the guest got
        # nothing of the latter.
        writer = self.ssh("vm1", terminal=True)
        await server.log_line(lambda err: err.count(b"SSH session on console vm1") == 2)
        writer.type(b"ls\r")
        await guest.receives(lambda data: b"ls\r" in data)
        await guest.write(b"ls\r\nfile\r\n")
        await viewer.wait_output(b"ls\r\nfile\r\n")
        self.assertEqual(bytes(guest.input), b"ls\r")
        self.assertEqual(viewer.stdout.count(b"input not sent"), 1)

    async def test_from_and_refused_lines(self) -> None:
        """
        from= is matched against the client's address; a line with an option we do not
        know (command=) is refused with its file:line in the log, never used.
        """
        guest = self.guest()
        carol = ssh_keygen(self.dir, "carol")
        dave = ssh_keygen(self.dir, "dave")
        self.authorize(
            self.key_line(self.alice, 'from="10.0.0.0/8,!127.0.0.1"'),
            self.key_line(carol, 'command="/bin/sh"'),
            self.key_line(dave, 'restrict,from="127.0.0.0/8"'),
        )
        server = await self.serve("--console", f"vm1={guest.path}")
        await server.log_line(lambda err: f"{self.authorized}:2".encode() in err)
        for key, status in ((self.alice, 255), (carol, 255), (dave, 0)):
            client = self.ssh("vm1", "status", key=key)
            self.assertEqual(await client.ended, status, key.name)
            if status:
                self.assertIn(b"Permission denied (publickey)", client.stderr)
        self.assertRegex(server.stderr, rb"SSH login refused for 'vm1' from 127.0.0.1 \(SHA256:[^)]+\): from\n")

    async def test_sighup_reloads_keys(self) -> None:
        """A key added to the file opens consoles after SIGHUP, not before."""
        guest = self.guest()
        carol = ssh_keygen(self.dir, "carol")
        self.authorize(self.key_line(self.alice))
        server = await self.serve("--console", f"vm1={guest.path}")
        before = self.ssh("vm1", "status", key=carol)
        self.assertEqual(await before.ended, 255)
        self.authorize(self.key_line(self.alice), self.key_line(carol))
        server.signal("HUP")
        await server.log_line(lambda err: b"SSH keys reloaded" in err)
        after = self.ssh("vm1", "status", key=carol)
        self.assertEqual(await after.ended, 0)


class CertificateTests(SSHTestCase):
    """User certificates signed by a trusted CA: principals, validity, the wrong CA."""

    def setUp(self) -> None:
        super().setUp()
        self.ca = ssh_keygen(self.dir, "ca")
        self.other_ca = ssh_keygen(self.dir, "other-ca")
        self.ca_file = self.dir / "user_ca"
        self.ca_file.write_text(Path(f"{self.ca}.pub").read_text())

    async def serve_with_ca(self, *guests: tuple[str, Guest]) -> Server:
        args = []
        for name, guest in guests:
            args += ["--console", f"{name}={guest.path}"]
        return await self.serve(*args, "--ssh-user-ca", str(self.ca_file), authorized=False)

    def certified(self, name: str, principals: str, *extra: str, ca: Path | None = None) -> tuple[Path, Path]:
        key = ssh_keygen(self.dir, name)
        return key, ssh_sign(ca or self.ca, key, f"{name}-id", principals, *extra)

    async def test_certificates(self) -> None:
        web, db = self.guest(), self.guest()
        server = await self.serve_with_ca(("web-1", web), ("db1", db))
        valid = self.certified("valid", "web-*", "-V", "-5m:+1h")
        expired = self.certified("expired", "web-*", "-V", "20200101:20200102")
        future = self.certified("future", "web-*", "-V", "+1d:+2d")
        wrong_ca = self.certified("wrong", "web-*", ca=self.other_ca)
        cases = [(valid, "web-1", 0), (valid, "db1", 1), (expired, "web-1", 255),
                 (future, "web-1", 255), (wrong_ca, "web-1", 255)]
        for (key, cert), console, status in cases:
            client = self.ssh(console, "status", key=key, certificate=cert)
            self.assertEqual(await client.ended, status, f"{key.name} on {console}: {client.stderr!r}")
        for reason in (b"expired", b"not yet valid", b"unknown CA"):
            self.assertIn(reason, server.stderr)
        self.assertIn(b"SSH login refused", server.stderr)

    async def test_revoked(self) -> None:
        """
        --ssh-revoked-keys refuses a revoked plain key (as sshd's RevokedKeys does) and a
        certificate by its serial, while others still open the console.
        """
        guest = self.guest()
        carol = ssh_keygen(self.dir, "carol")
        self.authorize(self.key_line(self.alice), self.key_line(carol))
        good = self.certified("good", "web-*", "-z", "7")
        bad = self.certified("bad", "web-*", "-z", "42")
        revoked = self.dir / "revoked"
        revoked.write_text(Path(f"{carol}.pub").read_text() + "serial: 42\n")
        server = await self.serve(
            "--console", f"web-1={guest.path}", "--ssh-user-ca", str(self.ca_file),
            "--ssh-revoked-keys", str(revoked),
        )
        cases = [(self.alice, None, 0), (carol, None, 255), (good[0], good[1], 0), (bad[0], bad[1], 255)]
        for key, cert, status in cases:
            client = self.ssh("web-1", "status", key=key, certificate=cert)
            self.assertEqual(await client.ended, status, key.name)
        carol_print = subprocess.run(
            ["ssh-keygen", "-lf", f"{carol}.pub"], check=True, capture_output=True, text=True
        ).stdout.split()[1]
        self.assertIn(f"({carol_print}): revoked".encode(), server.stderr)
        self.assertRegex(server.stderr, rb"\(certificate SHA256:[^)]+\): revoked")

    async def test_read_only_principal(self) -> None:
        guest = self.guest()
        server = await self.serve_with_ca(("web-1", guest))
        key, cert = self.certified("viewer", "read-only:web-*")
        client = self.ssh("web-1", key=key, certificate=cert, terminal=True)
        await server.log_line(lambda err: b"viewer-id" in err and b", read-only" in err)
        client.type(b"reboot\r")
        await client.wait_output(b"input not sent: read-only")
        self.assertEqual(bytes(guest.input), b"")


class HostKeyTests(SSHTestCase):
    """The host key: made on first start with its fingerprint logged; refused if open."""

    async def test_generated_key_fingerprint_is_logged(self) -> None:
        guest = self.guest()
        self.authorize(self.key_line(self.alice))
        server = await self.serve("--console", f"vm1={guest.path}")
        mode = stat.S_IMODE(os.stat(self.host_key).st_mode)
        self.assertEqual(mode, 0o600)
        printed = subprocess.run(
            ["ssh-keygen", "-lf", str(self.host_key)], check=True, capture_output=True, text=True
        ).stdout.strip()
        self.assertIn(f"SSH host key {self.host_key} created: {printed}".encode(), server.stderr)
        # What ssh saw is that key.
        known = self.dir / "known_hosts"
        args = ssh_args(self.ssh_port, "vm1", self.alice, "status")
        args[args.index("UserKnownHostsFile=/dev/null")] = f"UserKnownHostsFile={known}"
        client = spawn_ssh(self, args)
        self.assertEqual(await client.ended, 0)
        seen = subprocess.run(["ssh-keygen", "-lf", str(known)], check=True, capture_output=True, text=True)
        self.assertEqual(seen.stdout.split()[1], printed.split()[1])

    async def test_readable_key_refused(self) -> None:
        guest = self.guest()
        self.authorize(self.key_line(self.alice))
        ssh_keygen(self.dir, "host_key")
        os.chmod(self.host_key, 0o644)
        server = spawn_server([
            "--console", f"vm1={guest.path}", "--port", f"tcp:port={free_port()}:interface=127.0.0.1",
            "--ssh-port", f"tcp:port={free_port()}:interface=127.0.0.1",
            "--ssh-host-key", str(self.host_key), "--ssh-authorized-keys", str(self.authorized),
        ])
        server.listening.addErrback(lambda failure: None)  # it never listens
        self.assertEqual(await server.ended, 2)
        self.assertIn(f"chmod 600 {self.host_key}".encode(), server.stderr)


#: The line that tells a session how many bytes it lost (see ConsoleChannel.gap).
LOSS_LINE = re.compile(rb"\r\n\[-- ([0-9,]+) bytes lost: this session fell behind the history --\]\r\n")


def check_stream_with_losses(written: bytes, received: bytes) -> int:
    """
    C{received} is C{written} in order, whole except for ranges announced by loss lines,
    each exactly as long as it says. Returns the bytes lost.
    """
    position = lost_total = 0
    last = 0
    for match in LOSS_LINE.finditer(received):
        segment = received[last:match.start()]
        assert written[position:position + len(segment)] == segment, f"bytes differ near {position}"
        lost = int(match.group(1).replace(b",", b""))
        position += len(segment) + lost
        lost_total += lost
        last = match.end()
    segment = received[last:]
    assert written[position:] == segment, f"the end differs near {position}"
    return lost_total


class FlowControlTests(SSHTestCase):
    """A suspended ssh holds up neither the guest nor the other viewers, nor memory."""

    timeout = 180

    async def flood(self, guest: Guest, page: V1Client, data: bytes) -> None:
        """
        Write C{data} as the guest and wait until the page has all of it, exactly (what
        it held before is dropped first: a growing buffer would slow the later floods).
        """
        del page.stream[:]
        await guest.write(data)
        await page.wait_for(lambda p: len(p.stream) >= len(data))
        self.assertEqual(bytes(page.stream), data)

    async def test_suspended_ssh_client(self) -> None:
        """
        An ssh stopped with SIGSTOP while the guest writes 3 x 50 MB: the console waits
        for the stopped session once, at most --max-stall, then no longer (so the page's
        pace is its own: measured in bench/run.py, not here, where other tests share the
        cores); the page gets every byte; the server grows by less than 10 MB; after
        SIGCONT the session gets the stream exactly, but for ranges it is told it lost,
        each of the length it is told.
        """
        guest = self.guest()
        self.authorize(self.key_line(self.alice))
        server = await self.serve("--console", f"vm1={guest.path}", "--history-size", "65536", "--head-size", "0")
        page = await connect_v1(self.port, "/c/vm1/ws")
        self.addCleanup(page.transport.abortConnection)
        size = 50 * 1024 * 1024
        floods = [b"".join(b"%09d\n" % (i + n * size) for i in range(size // 10)) for n in range(3)]
        client = self.ssh("vm1")
        await server.log_line(lambda err: b"SSH session on console vm1" in err)
        await guest.write(b"ssh attached\r\n")
        await client.wait_output(b"ssh attached\r\n")
        start = len(client.stdout) - len(b"ssh attached\r\n")
        before_kib = server.rss_kib()
        client.signal("STOP")
        for data in floods:
            await self.flood(guest, page, data)
        grown_kib = server.rss_kib() - before_kib
        self.assertLess(grown_kib, 10 * 1024, "the server's memory grew by that much")
        self.assertEqual(server.count(b"the console no longer waits for it"), 1)
        client.signal("CONT")
        written = b"ssh attached\r\n" + b"".join(floods)
        await client.wait_for(lambda c: c.stdout.endswith(written[-100:]))
        lost = check_stream_with_losses(written, client.stdout[start:])
        self.assertGreater(lost, 0)  # 150 MB do not fit in a stopped client's buffers


    async def test_stop_with_a_suspended_client(self) -> None:
        """
        SIGTERM while an ssh is stopped with its window full: the server tells it, waits
        at most 5 s for it, and ends with status 0; the client, continued, reads why.
        """
        guest = self.guest()
        self.authorize(self.key_line(self.alice))
        server = await self.serve("--console", f"vm1={guest.path}")
        client = self.ssh("vm1")
        await server.log_line(lambda err: b"SSH session on console vm1" in err)
        client.signal("STOP")
        await guest.write(os.urandom(8 * 1024 * 1024))
        server.signal("TERM")
        self.assertEqual(await server.ended, 0)
        self.assertIn(b"did not close within 5.0 s; dropped", server.stderr)
        client.signal("CONT")
        self.assertEqual(await client.ended, 255)  # the connection was dropped


class QemuOverSSHTests(SSHTestCase):
    """A real QEMU guest through the SSH door, across a guest reboot and a QEMU restart."""

    timeout = 180

    async def test_guest_reboot_and_qemu_restart(self) -> None:
        """
        One ssh session (under a real terminal) on a qmp: console: the boot, a command
        typed over SSH, ``reboot -f`` in the same stream, a QEMU restart told as console
        down then up, and the next boot's shell answering; the session never ends.
        """
        from twisted.trial.unittest import SkipTest

        from tests.guest import PROMPT, GuestUnavailable, QemuGuest

        try:
            guest = QemuGuest("chardev-pty").start()
        except (GuestUnavailable, FileNotFoundError) as e:
            raise SkipTest(f"no QEMU guest here: {e} (tests/run.sh installs it)")
        self.addCleanup(guest.close)
        self.authorize(self.key_line(self.alice))
        server = await self.serve("--console", f"vm1=qmp:{guest.qmp_path}")
        client = self.ssh("vm1", terminal=True)
        await server.log_line(lambda err: b"SSH session on console vm1" in err)
        guest.cont()

        async def shell(boot: int) -> None:
            await client.wait_for(lambda c: c.stdout.count(b"Linux version") >= boot)
            await client.wait_for(lambda c: PROMPT in c.stdout.rsplit(b"Linux version", 1)[1])

        async def command(text: bytes, answer: bytes) -> None:
            before = client.stdout.count(answer)
            client.type(text + b"\r")
            await client.wait_for(lambda c: c.stdout.count(answer) > before)

        await shell(1)
        await command(b"echo $((6*7))", b"\r\n42\r\n")
        client.type(b"reboot -f\r")
        await shell(2)
        self.assertNotIn(b"console down", client.stdout)  # the same pty all along
        guest.restart()
        await client.wait_for(lambda c: b"[-- console down:" in c.stdout)
        await client.wait_for(lambda c: b"[-- console up:" in c.stdout.rsplit(b"console down", 1)[1])
        guest.cont()
        await shell(3)
        await command(b"echo back $((1+1))", b"back 2\r\n")
        self.assertIsNone(client.status)
        self.assertNotIn(b"bytes lost", client.stdout)


class LimitTests(SSHTestCase):
    """Limits shared with the pages, attempts, the login timeout, and /metrics."""

    async def test_max_clients_counts_ssh_and_pages(self) -> None:
        guest = self.guest()
        self.authorize(self.key_line(self.alice))
        server = await self.serve("--console", f"vm1={guest.path}", "--max-clients", "1")
        page = await connect_v1(self.port, "/c/vm1/ws")
        self.addCleanup(page.transport.abortConnection)
        refused = self.ssh("vm1")
        self.assertEqual(await refused.ended, 1)
        self.assertEqual(refused.stderr, b"1 clients on this console already\n")
        page.transport.abortConnection()
        await server.log_line(lambda err: b"client detached" in err)
        first = self.ssh("vm1", terminal=True)
        await server.log_line(lambda err: b"SSH session on console vm1" in err)
        second = self.ssh("vm1")
        self.assertEqual(await second.ended, 1)
        self.assertIsNone(first.status)

    async def test_six_attempts(self) -> None:
        """A connection may fail six times: a good key offered seventh is never tried."""
        guest = self.guest()
        self.authorize(self.key_line(self.alice))
        await self.serve("--console", f"vm1={guest.path}")
        strangers = [ssh_keygen(self.dir, f"stranger{n}") for n in range(6)]
        for count, status in ((5, 0), (6, 255)):
            args = ssh_args(self.ssh_port, "vm1", self.alice, "status")
            i = args.index("-i")
            keys = [arg for key in strangers[:count] for arg in ("-i", str(key))]
            args[i:i + 2] = [*keys, "-i", str(self.alice)]
            client = spawn_ssh(self, args)
            self.assertEqual(await client.ended, status, f"{count} unknown keys first")

    async def test_metrics_by_front_door(self) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        from tests.helpers import http_get

        guest = self.guest()
        stranger = ssh_keygen(self.dir, "stranger")
        self.authorize(self.key_line(self.alice))
        metrics_port = free_port()
        server = await self.serve(
            "--console", f"vm1={guest.path}", "--metrics-port", f"tcp:port={metrics_port}:interface=127.0.0.1"
        )
        await server.log_line(lambda err: err.count(b"starting on") >= 3)
        refused = self.ssh("vm1", "status", key=stranger)
        self.assertEqual(await refused.ended, 255)
        self.ssh("vm1", terminal=True)
        await server.log_line(lambda err: b"SSH session on console vm1" in err)
        page = await connect_v1(self.port, "/c/vm1/ws")
        self.addCleanup(page.transport.abortConnection)
        code, body = await http_get(metrics_port, "/metrics")
        self.assertEqual(code, 200)
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
        }
        self.assertEqual(samples[("cloud_console_sessions", (("front", "ssh"),))], 1)
        self.assertEqual(samples[("cloud_console_sessions", (("front", "web"),))], 1)
        self.assertEqual(
            samples[("cloud_console_auth_failures_total", (("front", "ssh"), ("reason", "unknown key")))], 1
        )


#: A line of Conch's own (its classes, or the door's subclasses of them) at debug or info
#: in the server's log: the timestamp, then C{[NAMESPACE#LEVEL]}.
CONCH_CHATTER = re.compile(
    rb"\[(twisted\.conch\.[\w.]+|cloud_console\.ssh\.\w+\.Console"
    rb"(SSHTransport|SSHConnection|UserAuth|Channel|User))#(debug|info)\]"
)


class ServerLogTests(SSHTestCase):
    """
    What SSH sessions leave in the server's log, under C{cloud-console} and C{twistd}
    alike: the door's own lines, not Conch's packets and key exchanges, and no error
    when a client simply ends.
    """

    async def sessions(self, server: Server, guest: Guest) -> None:
        """A command that ends, then a viewer that attaches (logged after the first ended)."""
        await guest.write(b"login: ")
        command = self.ssh("vm1", "status")
        self.assertEqual(await command.ended, 0)
        viewer = self.ssh("vm1", terminal=True)
        await viewer.wait_output(b"login: ")
        await server.log_line(lambda err: b"SSH session on console vm1" in err)

    def assert_quiet(self, log: bytes) -> None:
        self.assertIn(b"SSH session on console vm1: alice@laptop", log)
        self.assertNotIn(b"Got remote error", log)
        self.assertEqual(CONCH_CHATTER.findall(log), [], log.decode(errors="replace"))

    async def test_cloud_console(self) -> None:
        guest = self.guest()
        self.authorize(self.key_line(self.alice))
        server = await self.serve("--console", f"vm1={guest.path}")
        await self.sessions(server, guest)
        self.assert_quiet(server.stderr)

    async def test_twistd(self) -> None:
        guest = self.guest()
        self.authorize(self.key_line(self.alice))
        self.ssh_port = free_port()
        server = spawn_python([
            *TWISTD, "--pidfile", os.path.abspath(self.mktemp()), "-n", "cloudconsole",
            "--console", f"vm1={guest.path}",
            "--port", f"tcp:port={free_port()}:interface=127.0.0.1",
            "--ssh-port", f"tcp:port={self.ssh_port}:interface=127.0.0.1",
            "--ssh-host-key", str(self.host_key), "--ssh-authorized-keys", str(self.authorized),
        ])

        async def stop() -> None:
            if server.status is None:
                server.signal("KILL")
                await server.ended

        self.addCleanup(stop)
        await server.log_line(lambda err: b"ConsoleSSHFactory starting on" in err)
        await self.sessions(server, guest)
        self.assert_quiet(server.stderr)


class LoginTimeoutTests(TestCase):
    """A connection that does not authenticate within 30 s is closed (on a memory clock)."""

    def test_closed_after_30_seconds(self) -> None:
        from twisted.conch.ssh import transport as ssh_transport
        from twisted.cred.portal import Portal
        from twisted.internet.task import Clock

        from types import SimpleNamespace

        from cloud_console.access.audit import AuditLog
        from cloud_console.ssh.auth import AuthFailures, ConsoleUserAuth

        clock = Clock()
        audit_path = self.mktemp()
        audit = AuditLog(audit_path, clock)
        self.addCleanup(audit.close)

        class Transport:
            def __init__(self) -> None:
                self.disconnected: list[int] = []
                self.factory = type("Factory", (), {
                    "portal": Portal(None, []), "auth_failures": AuthFailures(),
                    "door": SimpleNamespace(audit=audit),
                })()

            def getPeer(self) -> Any:
                return SimpleNamespace(address=SimpleNamespace(host="192.0.2.7"))

            def isEncrypted(self, direction: str) -> bool:
                return True

            def sendDisconnect(self, reason: int, description: bytes) -> None:
                self.disconnected.append(reason)

        auth = ConsoleUserAuth()
        auth.clock = clock
        auth.transport = transport = Transport()
        auth.serviceStarted()
        clock.advance(29.9)
        self.assertEqual(transport.disconnected, [])
        clock.advance(0.1)
        self.assertEqual(transport.disconnected, [ssh_transport.DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE])
        self.assertEqual(transport.factory.auth_failures.counts, {"timeout": 1})
        (event,) = [json.loads(line) for line in Path(audit_path).read_text().splitlines()]
        self.assertEqual(
            (event["event"], event["front"], event["reason"], event["address"], event["identity"]),
            ("refused", "ssh", "timeout", "192.0.2.7", "anonymous"),
        )


class SignatureAlgorithmTests(TestCase):
    """
    ssh-rsa (SHA-1) and DSA signatures are refused before any key is looked at; OpenSSH
    9.2 will not send one (it is not in server-sig-algs), so the checker is asked directly.
    """

    def test_sha1_rsa_refused(self) -> None:
        from twisted.cred.error import UnauthorizedLogin

        from cloud_console.ssh.auth import AddressedKey, AuthFailures, KeyChecker, Keyring

        directory = Path(self.mktemp())
        directory.mkdir()
        key = ssh_keygen(directory, "bob", kind="rsa")
        authorized = directory / "authorized_keys"
        authorized.write_text(Path(f"{key}.pub").read_text())
        blob = base64.b64decode(Path(f"{key}.pub").read_text().split()[1])
        failures = AuthFailures()
        checker = KeyChecker(Keyring(str(authorized), None), failures)
        for algorithm, refused in ((b"ssh-rsa", True), (b"rsa-sha2-256", False)):
            creds = AddressedKey(b"vm1", algorithm, blob, None, None, "127.0.0.1")
            failure = self.failureResultOf(checker.requestAvatarId(creds))
            if refused:
                failure.trap(UnauthorizedLogin)
            else:  # the probe of a known key: "it would do" (ValidPublicKey)
                from twisted.conch.error import ValidPublicKey

                failure.trap(ValidPublicKey)
        self.assertEqual(failures.counts, {"algorithm": 1})
