"""
The audit log: its events and bursts on a clock (L{cloud_console.access.audit}), and a
real server's audit log through attaches, typing, a rotation, refused logins and a file
that refuses writes, with real pages, a real pty and a real C{ssh}.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cloud_console.access.audit import BURST, NO_AUDIT, AuditLog, AuditLogError, audit_time
from cloud_console.console.multiplexer import ClientLabel
from tests.helpers import (
    OP_BINARY,
    FakePty,
    FileWatch,
    WebClient,
    Guest,
    connect_v1,
    free_port,
    http_get,
    serve_process,
    spawn_server,
    spawn_ssh,
    ssh_args,
    ssh_keygen,
    use_memory_reactor,
)

ALICE = ClientLabel("web", "alice", "10.0.0.1", 1000.0)


def events(path: Path | str) -> list[dict[str, Any]]:
    """The audit log's events, parsed."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


class AuditLogTests(SynchronousTestCase):
    """The events and their fields, bursts on a clock, failing writes, reopening."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000.0)
        self.path = Path(self.mktemp())
        self.audit = AuditLog(str(self.path), self.clock)
        self.addCleanup(self.audit.close)

    def test_attach_and_detach(self) -> None:
        """attach and detach carry time, console, front, identity, address; detach its length."""
        trail = self.audit.attached("vm1", ALICE, read_only=True)
        self.clock.advance(62.5)
        trail.detached()
        trail.detached()
        self.assertEqual(events(self.path), [
            {"time": "1970-01-01T00:16:40.000Z", "event": "attach", "console": "vm1", "front": "web",
             "identity": "alice", "address": "10.0.0.1", "readOnly": True},
            {"time": "1970-01-01T00:17:42.500Z", "event": "detach", "console": "vm1", "front": "web",
             "identity": "alice", "address": "10.0.0.1", "seconds": 62.5, "typed": 0},
        ])
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)

    def test_input_burst(self) -> None:
        """Typing within BURST seconds of its first byte is one event, timed at that byte."""
        trail = self.audit.attached(None, ALICE, read_only=False)
        trail.input(b"re", None)
        self.clock.advance(BURST / 2)
        trail.input(b"boot\r", None)
        self.assertEqual(len(events(self.path)), 1)  # nothing per keystroke
        self.clock.advance(BURST / 2)
        trail.input(b"x", None)  # the next burst
        trail.detached()  # writes it before the detach
        got = events(self.path)
        self.assertEqual([(e["event"], e.get("bytes")) for e in got],
                         [("attach", None), ("input", 7), ("input", 1), ("detach", None)])
        self.assertEqual(got[1]["time"], audit_time(1000.0))
        self.assertEqual(got[2]["time"], audit_time(1000.0 + BURST))
        self.assertNotIn("data", got[1])
        self.assertEqual(got[3]["typed"], 8)

    def test_input_bytes_recorded(self) -> None:
        """With record_input the burst's bytes are there too, base64 (any byte)."""
        audit = AuditLog(str(self.path), self.clock, record_input=True)
        self.addCleanup(audit.close)
        trail = audit.attached("vm1", ALICE, read_only=False)
        trail.input(b"\x00\xffls\r", None)
        trail.input(b"\x1b[A", None)
        self.clock.advance(BURST)
        event = events(self.path)[1]
        self.assertEqual(base64.b64decode(event["data"]), b"\x00\xffls\r\x1b[A")
        self.assertEqual(event["bytes"], 8)

    def test_refused_input_once_per_burst_and_reason(self) -> None:
        """A read-only viewer leaning on a key is one line per burst and reason, with the count."""
        trail = self.audit.attached("vm1", ALICE, read_only=True)
        for _ in range(50):
            trail.input(b"y", "read-only")
        trail.input(b"zz", "backlog full")
        self.clock.advance(BURST)
        for _ in range(3):
            trail.input(b"y", "read-only")
        self.clock.advance(BURST)
        got = [(e["event"], e.get("reason"), e.get("bytes")) for e in events(self.path)[1:]]
        self.assertEqual(got, [
            ("input-refused", "read-only", 50), ("input-refused", "backlog full", 2),
            ("input-refused", "read-only", 3),
        ])

    def test_refused_and_action(self) -> None:
        """A refused login names what it claimed (or anonymous); the action hook writes its details."""
        self.audit.refused("web", "credential", "10.0.0.2", "mallory", "vm1", why="wrong password")
        self.audit.refused("web", "origin", "10.0.0.3")
        self.audit.action("vm1", ALICE, "sysrq", key="b")
        got = events(self.path)
        self.assertEqual(
            [(e["event"], e["identity"], e.get("reason"), e["console"]) for e in got],
            [("refused", "mallory", "credential", "vm1"), ("refused", "anonymous", "origin", None),
             ("action", "alice", None, "vm1")],
        )
        self.assertEqual((got[0]["why"], got[2]["action"], got[2]["key"]), ("wrong password", "sysrq", "b"))

    def test_no_audit(self) -> None:
        """Without an audit log every call does nothing, and a door needs no branch."""
        trail = NO_AUDIT.attached("vm1", ALICE, False)
        trail.input(b"x", None)
        trail.detached()
        NO_AUDIT.refused("web", "credential", "x")
        NO_AUDIT.action("vm1", ALICE, "power", what="reset")

    def test_write_fails(self) -> None:
        """A full device: logged once (until a write succeeds), counted, never raised."""
        audit = AuditLog("/dev/full", self.clock)
        self.addCleanup(audit.close)
        with capturedLogs() as logged:
            for _ in range(3):
                audit.attached("vm1", ALICE, False).detached()
        self.assertEqual(audit.dropped, 6)
        errors = [e for e in logged if "not written" in e.get("log_format", "")]
        self.assertEqual(len(errors), 1)
        self.assertEqual(errors[0]["error"], "No space left on device")

    def test_open_fails(self) -> None:
        """At start-up an audit log that cannot be opened is an error that says which and why."""
        e = self.assertRaises(AuditLogError, AuditLog, "/proc/audit.log", self.clock)
        self.assertIn("cannot open audit log /proc/audit.log", str(e))

    def test_write_fails_read_only(self) -> None:
        """A file that takes no writes (one under /proc): logged once, never raised."""
        audit = AuditLog("/proc/version", self.clock)
        self.addCleanup(audit.close)
        with capturedLogs() as logged:
            audit.refused("web", "origin", "a")
            audit.refused("web", "origin", "b")
        self.assertEqual((audit.dropped, audit.written), (2, 0))
        self.assertEqual(len([e for e in logged if "not written" in e.get("log_format", "")]), 1)

    def test_reopen(self) -> None:
        """After a rotation the new file gets the events; a failed reopen keeps the old one."""
        self.audit.refused("web", "origin", "a")
        rotated = self.path.with_name("rotated")
        self.path.rename(rotated)
        self.audit.reopen()
        self.audit.refused("web", "origin", "b")
        self.assertEqual([e["address"] for e in events(rotated)], ["a"])
        self.assertEqual([e["address"] for e in events(self.path)], ["b"])
        directory = self.path.parent
        moved = directory.with_name(directory.name + ".old")
        directory.rename(moved)
        directory.write_text("not a directory any more")
        self.addCleanup(directory.unlink)
        with capturedLogs() as logged:
            self.audit.reopen()
        self.assertTrue(any("not reopened" in e.get("log_format", "") for e in logged))
        self.audit.refused("web", "origin", "c")
        self.assertEqual([e["address"] for e in events(moved / self.path.name)], ["b", "c"])


class ActionAuditTests(SynchronousTestCase):
    """A console action's outcome, as the service wires it, is an audit event."""

    def test_action_outcomes(self) -> None:
        from cloud_console.console.actions import ActionRequest
        from cloud_console.service import _audit_actions

        clock = Clock()
        clock.advance(1000.0)
        path = Path(self.mktemp())
        audit = AuditLog(str(path), clock)
        self.addCleanup(audit.close)
        observe = _audit_actions(audit, clock)
        observe("vm1", ActionRequest("sysrq", "t"), "alice", "web", "done", "")
        observe("vm1", ActionRequest("reset"), "bob", "ssh", "refused", "the source cannot")
        (done, refused) = events(path)
        self.assertEqual(
            {k: done[k] for k in ("event", "console", "identity", "front", "action", "key", "outcome")},
            {"event": "action", "console": "vm1", "identity": "alice", "front": "web",
             "action": "sysrq", "key": "t", "outcome": "done"},
        )
        self.assertEqual((refused["identity"], refused["front"], refused["action"], refused["outcome"],
                          refused["reason"]), ("bob", "ssh", "reset", "refused", "the source cannot"))


class WebDoorAuditTests(SynchronousTestCase):
    """The web door's calls, on a site over StringTransports and a memory clock."""

    def setUp(self) -> None:
        from cloud_console.console.multiplexer import Multiplexer
        from cloud_console.web.site import build_site
        from cloud_console.web.websocket import ConsoleSettings

        self.reactor = use_memory_reactor(self)
        self.reactor.advance(1000.0)
        self.path = Path(self.mktemp())
        self.audit = AuditLog(str(self.path), self.reactor)
        self.addCleanup(self.audit.close)
        self.multiplexer = Multiplexer(1000)
        self.pty = FakePty()
        self.multiplexer.console_up(self.pty)
        settings = ConsoleSettings(max_clients=1, audit=self.audit)
        self.site, _ = build_site(self.multiplexer, settings, self.mktemp())
        self.site.reactor = self.reactor

    def test_upgrades_refused_input_and_detach(self) -> None:
        """A foreign origin and an upgrade past --max-clients are refused; typing is one burst."""
        foreign = WebClient(self.site, 40001)
        self.assertIn(b"403", foreign.upgrade(origin="http://evil.example"))
        viewer = WebClient(self.site, 40002)
        self.assertIn(b"101", viewer.upgrade())
        self.assertIn(b"503", WebClient(self.site, 40003).upgrade())
        for key in (b"l", b"s", b"\r"):
            viewer.send(OP_BINARY, key)
        self.assertEqual(bytes(self.pty.written), b"ls\r")
        self.reactor.advance(BURST)
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        viewer.protocol.connectionLost(Failure(ConnectionDone()))
        got = [(e["event"], e.get("reason"), e.get("bytes"), e["identity"]) for e in events(self.path)]
        self.assertEqual(got, [
            ("refused", "origin", None, "anonymous"), ("attach", None, None, "anonymous"),
            ("refused", "limit", None, "anonymous"), ("input", None, 3, "anonymous"),
            ("detach", None, None, "anonymous"),
        ])
        self.assertEqual({e["console"] for e in events(self.path)}, {None})


class AuditedServerTests(TestCase):
    """A real server's audit log, with real pages, a real pty and a real ssh."""

    timeout = 60

    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir()
        self.tokens = self.dir / "tokens"
        self.tokens.write_text(
            "alice-0123456789abcdef name=alice\n"
            "bob-0123456789abcdef read-only name=bob\n"
        )

    def guest(self) -> Guest:
        guest = Guest()
        self.addCleanup(guest.close)
        guest.start_reading()
        return guest

    def bearer(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {name}-0123456789abcdef"}

    async def test_attach_input_detach_refused_through_rotation(self) -> None:
        """
        alice attaches and types (one burst: its bytes and their count), the log is
        rotated (SIGHUP), then her detach, bob's refused typing, a wrong token and an
        unknown SSH key are in the new file: in order, with identities and addresses.
        """
        guest = self.guest()
        port, ssh_port = free_port(), free_port()
        audit = self.dir / "audit.log"
        authorized = self.dir / "authorized_keys"
        known = ssh_keygen(self.dir, "known", comment="carol@laptop")
        stranger = ssh_keygen(self.dir, "stranger")
        authorized.write_text(Path(f"{known}.pub").read_text())
        server = await serve_process(self, [
            "--console", f"vm1=pty:{guest.path}", "--port", f"tcp:port={port}:interface=127.0.0.1",
            "--token-file", str(self.tokens), "--audit-log", str(audit), "--audit-input",
            "--ssh-port", f"tcp:port={ssh_port}:interface=127.0.0.1",
            "--ssh-host-key", str(self.dir / "host_key"), "--ssh-authorized-keys", str(authorized),
        ])
        # Both ports: serve_process returns at the first "starting on".
        await server.log_line(lambda err: err.count(b"starting on") >= 2)
        watch = FileWatch(self, audit)
        alice = await connect_v1(port, "/c/vm1/ws", self.bearer("alice"))
        alice.type(b"uptime\r")
        await guest.receives(lambda got: got.endswith(b"uptime\r"))
        await watch.wait_for(lambda lines: any('"input"' in line for line in lines))

        audit.rename(self.dir / "audit.log.1")
        server.signal("HUP")
        await server.log_line(lambda err: b"reopened" in err)

        alice.sendClose()
        await alice.closed
        await watch.wait_for(lambda lines: any('"detach"' in line for line in lines))
        bob = await connect_v1(port, "/c/vm1/ws", self.bearer("bob"))
        for _ in range(5):
            bob.type(b"y")
        await bob.wait_for(lambda c: bool(c.events_of("input-discarded")))
        code, _ = await http_get(port, "/c/vm1/", self.bearer("mallory"))
        self.assertEqual(code, 401)
        ssh = spawn_ssh(self, ssh_args(ssh_port, "vm1", stranger))
        self.assertEqual(await ssh.ended, 255)
        await watch.wait_for(lambda lines: sum('"refused"' in line for line in lines) >= 2)
        await watch.wait_for(lambda lines: any('"input-refused"' in line for line in lines))

        before = events(self.dir / "audit.log.1")
        after = events(audit)
        self.assertEqual(
            [(e["event"], e["identity"], e["front"], e["console"]) for e in before],
            [("attach", "alice", "web", "vm1"), ("input", "alice", "web", "vm1")],
        )
        self.assertEqual(before[0]["address"], "127.0.0.1")
        self.assertEqual(before[0]["readOnly"], False)
        self.assertEqual(before[1]["bytes"], 7)
        self.assertEqual(base64.b64decode(before[1]["data"]), b"uptime\r")
        got = [(e["event"], e["identity"], e["front"], e.get("reason")) for e in after]
        fingerprint = ssh_keygen_fingerprint(stranger)
        self.assertEqual(got[0], ("detach", "alice", "web", None))
        self.assertEqual(after[0]["typed"], 7)
        self.assertEqual(got[1], ("attach", "bob", "web", None))
        self.assertEqual(after[1]["readOnly"], True)
        self.assertIn(("refused", "anonymous", "web", "credential"), got)
        self.assertIn(("refused", fingerprint, "ssh", "unknown key"), got)
        self.assertIn(("input-refused", "bob", "web", "read-only"), got)
        # Five keystrokes, one line; and no line of this file is out of time order.
        self.assertEqual(sum(e["event"] == "input-refused" for e in after), 1)
        times = [e["time"] for e in before + after if e["event"] not in ("input", "input-refused")]
        self.assertEqual(times, sorted(times))
        for event in before + after:
            self.assertEqual(event["address"], "127.0.0.1")

    async def test_writes_fail_consoles_serve(self) -> None:
        """
        An audit log on a full device, then one whose directory is replaced by a file:
        each logged once, and both consoles keep taking input and sending output.
        """
        guests = {"vm1": self.guest(), "vm2": self.guest()}
        port = free_port()
        link = self.dir / "audit.log"
        link.symlink_to("/dev/full")
        server = await serve_process(self, [
            "--console", f"vm1=pty:{guests['vm1'].path}", "--console", f"vm2=pty:{guests['vm2'].path}",
            "--port", f"tcp:port={port}:interface=127.0.0.1", "--token-file", str(self.tokens),
            "--audit-log", str(link),
        ])

        async def still_serving(round: int) -> None:
            for name, guest in guests.items():
                page = await connect_v1(port, f"/c/{name}/ws", self.bearer("alice"))
                typed = f"{name} round {round}\r".encode()
                page.type(typed)
                await guest.receives(lambda got: got.endswith(typed))
                said = f"output {name} {round}\r\n".encode()
                await guest.write(said)
                await page.wait_for(lambda c: said in c.stream)
                page.sendClose()
                await page.closed

        await still_serving(1)
        await server.log_line(lambda err: b"not written: No space left on device" in err)
        await still_serving(2)
        self.assertEqual(server.count(b"not written"), 1)

        # A real file again: the next events are written, and that is said.
        link.unlink()
        server.signal("HUP")
        await server.log_line(lambda err: b"reopened" in err)
        watch = FileWatch(self, link)
        await still_serving(3)
        await watch.wait_for(lambda lines: sum('"detach"' in line for line in lines) == 2)
        await server.log_line(lambda err: b"written again" in err)

        # The directory replaced by a file: the reopen fails, the old file goes on.
        moved = self.dir.with_name(self.dir.name + ".old")
        self.dir.rename(moved)
        self.addCleanup(moved.rename, self.dir)
        self.dir.write_text("not a directory")
        self.addCleanup(self.dir.unlink)
        server.signal("HUP")
        await server.log_line(lambda err: b"audit log not reopened" in err)
        kept = FileWatch(self, moved / "audit.log")
        await still_serving(4)
        await kept.wait_for(lambda lines: sum('"detach"' in line for line in lines) == 4)
        self.assertEqual(server.count(b"Traceback"), 0)
        got = events(moved / "audit.log")
        self.assertEqual([e["event"] for e in got if e["console"] == "vm2"], ["attach", "input", "detach"] * 2)


class AuditOptionsTests(TestCase):
    """The options: what an operator is told when they do not fit."""

    timeout = 30

    def test_audit_input_needs_audit_log(self) -> None:
        """--audit-input alone is a usage error."""
        from cloud_console.tap import Options
        from twisted.python.usage import UsageError

        e = self.assertRaises(UsageError, Options().parseOptions, ["--pty", "/dev/null", "--audit-input"])
        self.assertIn("--audit-input needs --audit-log", str(e))

    async def test_unopenable_audit_log_stops_the_start(self) -> None:
        """An audit log that cannot be opened: status 2, saying which file and why."""
        guest = Guest()
        self.addCleanup(guest.close)
        server = spawn_server([
            "--console", f"pty:{guest.path}", "--port", f"tcp:port={free_port()}:interface=127.0.0.1",
            "--audit-log", "/proc/audit.log",
        ])
        server.listening.addErrback(lambda failure: None)
        self.assertEqual(await server.ended, 2)
        self.assertIn(b"cannot open audit log /proc/audit.log: No such file or directory", server.stderr)


def ssh_keygen_fingerprint(key: Path) -> str:
    """The SHA256 fingerprint C{ssh-keygen -lf} prints for C{key}."""
    from tests.helpers import ssh_keygen_run

    return ssh_keygen_run("-lf", f"{key}.pub").split()[1]
