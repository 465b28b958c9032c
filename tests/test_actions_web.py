"""
C{POST /c/NAME/actions/ACTION} on a real cloud-console process, against VMMs whose side is
recorded: the cloud-hypervisor stand-in (its C{actions}) and a scripted QMP server (every
command it receives). Each refusal is followed by an action that is done, and the VMM's
record must hold that one alone: a refused request sent nothing.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase

from tests.cloud_hypervisor_standin import CloudHypervisorStandIn
from tests.helpers import Guest, Server, connect_v1, free_port, http_get, http_post, serve_process
from tests.test_sources import _ScriptedServer, _short_tempdir

CONTROL = "c0ntrol-token-0123456789"
WRITER = "wr1ter-token-0123456789"
READER = "r3ader-token-0123456789"
OTHER = "0ther-token-0123456789"
JSON = {"Content-Type": "application/json"}


def recording_qmp(test: TestCase, path: str, pty: str, commands: list[dict[str, Any]]) -> _ScriptedServer:
    """
    A QMP server at C{path} whose serial chardev is C{pty}, appending every command it
    receives (but the handshake and query-chardev) to C{commands}: the VMM's side.
    """

    def script(conn: socket.socket) -> None:
        conn.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\r\n')
        for line in conn.makefile("rb"):
            message = json.loads(line)
            if message["execute"] == "query-chardev":
                answer = {"return": [{"label": "charserial0", "filename": f"pty:{pty}"}]}
                conn.sendall(json.dumps(answer).encode() + b"\r\n")
                continue
            if message["execute"] != "qmp_capabilities":
                commands.append(message)
            conn.sendall(b'{"return": {}}\r\n')

    server = _ScriptedServer(path, script)
    test.addCleanup(server.stop)
    return server


def bearer(token: str, **more: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **more}


class WebActionTests(TestCase):
    """The web door's actions, with credentials."""

    timeout = 60

    async def setUp(self) -> None:  # type: ignore[override]
        directory = _short_tempdir(self)
        self.ch_guest, self.qmp_guest, self.pty_guest, other = Guest(), Guest(), Guest(), Guest()
        for guest in (self.ch_guest, self.qmp_guest, self.pty_guest, other):
            self.addCleanup(guest.close)
        self.standin = CloudHypervisorStandIn(os.path.join(directory, "ch.sock"))
        self.standin.start()
        self.addCleanup(self.standin.stop)
        self.standin.boot(pty_path=self.ch_guest.path)
        self.qmp_commands: list[dict[str, Any]] = []
        self.qmp = recording_qmp(self, os.path.join(directory, "vm.qmp"), self.qmp_guest.path, self.qmp_commands)
        tokens = Path(self.mktemp()).resolve()
        tokens.write_text(
            f"{CONTROL} control\n{WRITER}\n{READER} read-only\n{OTHER} control consoles=vm-other\n"
        )
        self.port = free_port()
        self.server: Server = await serve_process(self, [
            "--console", f"vm-ch=cloud-hypervisor:{self.standin.socket_path}",
            "--console", f"vm-qmp=qmp:{self.qmp.path}",
            "--console", f"vm-pty={self.pty_guest.path}",
            "--console", f"vm-other={other.path}",
            "--token-file", str(tokens),
            "--port", f"tcp:port={self.port}:interface=127.0.0.1",
        ])

    async def post(self, console: str, action: str, body: dict[str, Any] | bytes | None = None,
                   headers: dict[str, str] | None = None) -> tuple[int, Any]:
        data = body if isinstance(body, bytes) else json.dumps(body or {}).encode()
        return await http_post(self.port, f"/c/{console}/actions/{action}", data, headers)

    async def test_power_actions_reach_cloud_hypervisor(self) -> None:
        """Reset and the power button are done and told to everyone on the console."""
        viewer = await connect_v1(self.port, "/c/vm-ch/ws", bearer(WRITER))
        self.addCleanup(viewer.transport.abortConnection)
        code, body = await self.post("vm-ch", "reset", headers=bearer(CONTROL, **JSON))
        self.assertEqual(code, 200, body)
        self.assertEqual((body["ok"], body["description"], body["by"]), (True, "reset", "token #1"))
        code, body = await self.post("vm-ch", "power-button", headers=bearer(CONTROL, **JSON))
        self.assertEqual(code, 200, body)
        self.assertEqual(self.standin.actions, ["vm.reboot", "vm.power-button"])
        await viewer.wait_for(lambda c: len(c.events_of("action")) == 2)
        told = viewer.events_of("action")
        self.assertEqual([(e["who"], e["action"]) for e in told], [("token #1", "reset"), ("token #1", "power-button")])
        self.assertRegex(told[0]["at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")

    async def test_sysrq_reaches_qemu(self) -> None:
        """SysRq t is QMP send-key alt, sysrq, t."""
        code, body = await self.post("vm-qmp", "sysrq", {"key": "t"}, bearer(CONTROL, **JSON))
        self.assertEqual(code, 200, body)
        self.assertEqual(body["description"], "SysRq t")
        self.assertEqual(
            self.qmp_commands,
            [{"execute": "send-key", "arguments": {"keys": [
                {"type": "qcode", "data": "alt"}, {"type": "qcode", "data": "sysrq"}, {"type": "qcode", "data": "t"},
            ]}}],
        )

    async def test_refusals_send_nothing(self) -> None:
        """Every refusal, with its status, and nothing reaches either VMM."""
        cases: list[tuple[str, str, Any, dict[str, str], int, str]] = [
            ("vm-ch", "reset", {}, bearer(WRITER, **JSON), 403, "may not control"),
            ("vm-ch", "reset", {}, bearer(READER, **JSON), 403, "may not control"),
            ("vm-ch", "reset", {}, bearer(OTHER, **JSON), 404, ""),
            ("vm-ch", "reset", {}, {**JSON}, 401, ""),
            ("vm-ch", "reset", {}, bearer(CONTROL, Origin="http://evil.example", **JSON), 403, "origin"),
            ("vm-ch", "reset", b"key=t", bearer(CONTROL, **{"Content-Type": "application/x-www-form-urlencoded"}), 415, "JSON"),
            ("vm-ch", "reset", b"{}", bearer(CONTROL, **{"Content-Type": "text/plain"}), 415, "JSON"),
            ("vm-ch", "sysrq", {"key": "t"}, bearer(CONTROL, **JSON), 409, "cannot press keys"),
            ("vm-pty", "reset", {}, bearer(CONTROL, **JSON), 409, "cannot do reset"),
            ("vm-qmp", "sysrq", {"key": "!"}, bearer(CONTROL, **JSON), 400, "SysRq needs a key"),
            ("vm-qmp", "sysrq", b"[1]", bearer(CONTROL, **JSON), 400, "JSON object"),
            ("vm-qmp", "explode", {}, bearer(CONTROL, **JSON), 404, "no action"),
        ]
        for console, action, body, headers, status, why in cases:
            code, answer = await self.post(console, action, body, headers)
            self.assertEqual(code, status, (console, action, headers, answer))
            if why:
                self.assertIn(why, answer["error"])
        self.assertEqual(self.standin.actions, [])
        self.assertEqual(self.qmp_commands, [])
        # What came before had its answer; what is done now is alone on each VMM's side.
        self.assertEqual((await self.post("vm-ch", "reset", {}, bearer(CONTROL, **JSON)))[0], 200)
        self.assertEqual((await self.post("vm-qmp", "reset", {}, bearer(CONTROL, **JSON)))[0], 200)
        self.assertEqual(self.standin.actions, ["vm.reboot"])
        self.assertEqual(self.qmp_commands, [{"execute": "system_reset"}])
        # A GET does nothing either.
        code, _ = await http_get(self.port, "/c/vm-ch/actions/reset", bearer(CONTROL))
        self.assertEqual(code, 405)
        self.assertEqual(self.standin.actions, ["vm.reboot"])

    async def test_listed_to_whom_may(self) -> None:
        """/api/consoles lists actions only to a credential with the right."""
        code, raw = await http_get(self.port, "/api/consoles", bearer(CONTROL))
        listed = {c["name"]: c["actions"] for c in json.loads(raw)["consoles"]}
        self.assertEqual(listed, {
            "vm-ch": ["reset", "power-button"], "vm-qmp": ["sysrq", "reset", "power-button"],
            "vm-pty": [], "vm-other": [],
        })
        for token in (WRITER, READER):
            code, raw = await http_get(self.port, "/api/consoles", bearer(token))
            self.assertEqual(code, 200)
            self.assertTrue(all("actions" not in c for c in json.loads(raw)["consoles"]), token)
        # The page asks under the console's path (where a link's cookie goes).
        code, raw = await http_get(self.port, "/c/vm-qmp/actions/", bearer(CONTROL))
        self.assertEqual((code, json.loads(raw)), (200, {"actions": ["sysrq", "reset", "power-button"]}))
        code, raw = await http_get(self.port, "/c/vm-qmp/actions/", bearer(WRITER))
        self.assertEqual((code, json.loads(raw)), (200, {"actions": []}))
        code, raw = await http_get(self.port, "/c/vm-ch/actions/", bearer(OTHER))
        self.assertEqual(code, 404)

    async def test_counted_and_logged(self) -> None:
        """Done and refused actions are counted in /metrics and logged with their fields."""
        await self.post("vm-ch", "reset", {}, bearer(CONTROL, **JSON))
        await self.post("vm-ch", "sysrq", {"key": "t"}, bearer(CONTROL, **JSON))
        code, raw = await http_get(self.port, "/metrics", bearer(CONTROL))
        text = raw.decode()
        self.assertIn('cloud_console_actions_total{action="reset",console="vm-ch",outcome="done"} 1.0', text)
        self.assertIn('cloud_console_actions_total{action="sysrq",console="vm-ch",outcome="refused"} 1.0', text)
        await self.server.log_line(lambda log: b"console vm-ch: token #1 sent reset (web)" in log)


class AnonymousActionTests(TestCase):
    """A server without credentials offers actions only with --allow-control."""

    timeout = 60

    async def serve(self, *more: str) -> tuple[int, CloudHypervisorStandIn]:
        directory = _short_tempdir(self)
        guest = Guest()
        self.addCleanup(guest.close)
        standin = CloudHypervisorStandIn(os.path.join(directory, "ch.sock"))
        standin.start()
        self.addCleanup(standin.stop)
        standin.boot(pty_path=guest.path)
        port = free_port()
        await serve_process(self, [
            "--console", f"vm=cloud-hypervisor:{standin.socket_path}",
            "--port", f"tcp:port={port}:interface=127.0.0.1", *more,
        ])
        return port, standin

    async def test_no_actions_by_default(self) -> None:
        """403, nothing sent, and none listed."""
        port, standin = await self.serve()
        code, body = await http_post(port, "/c/vm/actions/reset", b"{}", JSON)
        self.assertEqual(code, 403, body)
        self.assertEqual(standin.actions, [])
        _, raw = await http_get(port, "/api/consoles")
        self.assertNotIn("actions", json.loads(raw)["consoles"][0])

    async def test_allow_control(self) -> None:
        """--allow-control: anyone may, as C{anonymous}."""
        port, standin = await self.serve("--allow-control")
        code, body = await http_post(port, "/c/vm/actions/reset", b"{}", JSON)
        self.assertEqual(code, 200, body)
        self.assertEqual(body["by"], "anonymous")
        self.assertEqual(standin.actions, ["vm.reboot"])


class SingleConsoleActionTests(TestCase):
    """The original command line's one console: its actions at /actions/ACTION."""

    timeout = 60

    async def test_single_console(self) -> None:
        """With --allow-control and no credentials: listed and done; without: 403."""
        directory = _short_tempdir(self)
        guest = Guest()
        self.addCleanup(guest.close)
        commands: list[dict[str, Any]] = []
        qmp = recording_qmp(self, os.path.join(directory, "vm.qmp"), guest.path, commands)
        port = free_port()
        await serve_process(self, [f"qmp:{qmp.path}", "127.0.0.1", str(port), "--allow-control"])
        code, raw = await http_get(port, "/actions/")
        self.assertEqual((code, json.loads(raw)), (200, {"actions": ["sysrq", "reset", "power-button"]}))
        code, body = await http_post(port, "/actions/sysrq", b'{"key": "w"}', JSON)
        self.assertEqual(code, 200, body)
        self.assertEqual([c["arguments"]["keys"][2]["data"] for c in commands], ["w"])

        other = free_port()
        await serve_process(self, [f"qmp:{qmp.path}", "127.0.0.1", str(other)])
        code, body = await http_post(other, "/actions/reset", b"{}", JSON)
        self.assertEqual(code, 403, body)
        self.assertEqual(len(commands), 1)
