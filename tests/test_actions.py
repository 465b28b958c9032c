"""
Tests for L{cloud_console.console.actions}: which source can do what, refusals that send
nothing, QMP commands as QEMU receives them, cloud-hypervisor's power endpoints.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from cloud_console.console.actions import (
    ActionError,
    ActionInvalid,
    ActionRequest,
    ActionUnsupported,
    actions_for,
    check,
    perform,
)
from cloud_console.console.sources import parse_source

from .cloud_hypervisor_standin import CloudHypervisorStandIn
from .test_sources import _ScriptedServer, _short_tempdir

_GREETING = b'{"QMP": {"version": {"qemu": {"major": 8, "minor": 2, "micro": 0}, "package": ""}, "capabilities": []}}\r\n'


class ActionsForTests(SynchronousTestCase):
    """Which actions each source form offers."""

    def test_qmp(self) -> None:
        """QEMU over QMP: SysRq, reset and the power button (no BREAK on its pty)."""
        self.assertEqual(actions_for(parse_source("qmp:/run/vm.qmp")), ("sysrq", "reset", "power-button"))

    def test_cloud_hypervisor(self) -> None:
        """cloud-hypervisor: reset and the power button; its API cannot press keys."""
        self.assertEqual(actions_for(parse_source("cloud-hypervisor:/run/ch.sock")), ("reset", "power-button"))

    def test_pty_and_unix(self) -> None:
        """A pty or a plain socket reaches no VMM: nothing."""
        self.assertEqual(actions_for(parse_source("/dev/pts/3")), ())
        self.assertEqual(actions_for(parse_source("unix:/run/vm.sock")), ())

    def test_unsupported(self) -> None:
        """A source that cannot is told with the reason and what it can do."""
        with self.assertRaises(ActionUnsupported) as caught:
            check(parse_source("pty:/dev/ttyS9"), ActionRequest("reset"))
        self.assertIn("cannot do reset", str(caught.exception))
        with self.assertRaises(ActionUnsupported) as caught:
            check(parse_source("cloud-hypervisor:/x"), ActionRequest("sysrq", "t"))
        self.assertIn("cannot press keys", str(caught.exception))

    def test_invalid(self) -> None:
        """Unknown actions and keys, a missing key, a key where none is taken."""
        qmp = parse_source("qmp:/x")
        for request in (
            ActionRequest("explode"),
            ActionRequest("sysrq"),
            ActionRequest("sysrq", "tt"),
            ActionRequest("sysrq", "A"),
            ActionRequest("sysrq", "alt"),
            ActionRequest("reset", "t"),
        ):
            with self.assertRaises(ActionInvalid, msg=repr(request)):
                check(qmp, request)
        check(qmp, ActionRequest("sysrq", "t"))
        check(qmp, ActionRequest("sysrq", "7"))

    def test_describe(self) -> None:
        """How an action is told to the console's viewers."""
        self.assertEqual(ActionRequest("sysrq", "t").describe(), "SysRq t")
        self.assertEqual(ActionRequest("reset").describe(), "reset")
        self.assertEqual(ActionRequest("break").describe(), "BREAK")


class QmpActionTests(SynchronousTestCase):
    """QMP actions against a scripted QMP server (the real QEMU: tests/test_actions_qemu)."""

    def setUp(self) -> None:
        self.directory = _short_tempdir(self)
        self.path = os.path.join(self.directory, "vm.qmp")
        self.received: list[dict[str, Any]] = []

    def serve(self, answer: bytes = b'{"return": {}}\r\n') -> _ScriptedServer:
        """Greets, records every command with its arguments, answers C{answer} but to qmp_capabilities."""

        def script(conn: socket.socket) -> None:
            conn.sendall(_GREETING)
            for line in conn.makefile("rb"):
                message = json.loads(line)
                self.received.append(message)
                if message["execute"] == "qmp_capabilities":
                    conn.sendall(b'{"return": {}}\r\n')
                else:
                    conn.sendall(answer)
            server.closed_by_client.set()

        server = _ScriptedServer(self.path, script)
        self.addCleanup(server.stop)
        return server

    def test_sysrq(self) -> None:
        """SysRq is send-key with alt, sysrq and the key as qcodes; the socket is closed after."""
        server = self.serve()
        perform(parse_source("qmp:" + self.path), ActionRequest("sysrq", "h"))
        self.assertTrue(server.closed_by_client.wait(5))
        self.assertEqual(
            self.received,
            [
                {"execute": "qmp_capabilities"},
                {
                    "execute": "send-key",
                    "arguments": {
                        "keys": [
                            {"type": "qcode", "data": "alt"},
                            {"type": "qcode", "data": "sysrq"},
                            {"type": "qcode", "data": "h"},
                        ]
                    },
                },
            ],
        )

    def test_power(self) -> None:
        """Reset is system_reset, the power button system_powerdown."""
        self.serve()
        source = parse_source("qmp:" + self.path)
        perform(source, ActionRequest("reset"))
        perform(source, ActionRequest("power-button"))
        self.assertEqual(
            [m["execute"] for m in self.received if m["execute"] != "qmp_capabilities"],
            ["system_reset", "system_powerdown"],
        )

    def test_refused(self) -> None:
        """QEMU's error is the action's error, with its description."""
        self.serve(b'{"error": {"class": "GenericError", "desc": "no keyboard"}}\r\n')
        with self.assertRaises(ActionError) as caught:
            perform(parse_source("qmp:" + self.path), ActionRequest("sysrq", "t"))
        self.assertIn("no keyboard", str(caught.exception))

    def test_unreachable(self) -> None:
        """No socket: a clear error naming it."""
        with self.assertRaises(ActionError) as caught:
            perform(parse_source("qmp:" + self.path), ActionRequest("reset"))
        self.assertIn(self.path, str(caught.exception))
        self.assertIn("no such file", str(caught.exception))

    def test_silent(self) -> None:
        """A peer that never greets: the timeout bounds the wait."""

        def script(conn: socket.socket) -> None:
            server.release.wait(10)

        server = _ScriptedServer(self.path, script)
        self.addCleanup(server.stop)
        with self.assertRaises(ActionError) as caught:
            perform(parse_source("qmp:" + self.path), ActionRequest("reset"), timeout=0.2)
        self.assertIn("no greeting", str(caught.exception))

    def test_nothing_sent_on_refusal(self) -> None:
        """An invalid request never connects."""
        self.serve()
        with self.assertRaises(ActionInvalid):
            perform(parse_source("qmp:" + self.path), ActionRequest("sysrq", "!"))
        self.assertEqual(self.received, [])


class CloudHypervisorActionTests(SynchronousTestCase):
    """cloud-hypervisor's vm.reboot and vm.power-button against the stand-in."""

    def setUp(self) -> None:
        self.directory = _short_tempdir(self)
        self.api = os.path.join(self.directory, "ch.sock")
        self.standin = CloudHypervisorStandIn(self.api)
        self.standin.start()
        self.addCleanup(self.standin.stop)
        self.source = parse_source("cloud-hypervisor:" + self.api)

    def test_reboot_and_power_button(self) -> None:
        """Both reach the VMM as PUTs on their endpoints."""
        self.standin.boot(pty_path="/dev/pts/9")
        perform(self.source, ActionRequest("reset"))
        perform(self.source, ActionRequest("power-button"))
        self.assertEqual(self.standin.actions, ["vm.reboot", "vm.power-button"])
        self.assertIn("PUT /api/v1/vm.reboot HTTP/1.1", self.standin.requests)

    def test_not_booted(self) -> None:
        """A created VM that is not booted: the VMM's 405, in words."""
        self.standin.create()
        with self.assertRaises(ActionError) as caught:
            perform(self.source, ActionRequest("reset"))
        self.assertIn("not booted", str(caught.exception))
        self.assertEqual(self.standin.actions, [])

    def test_not_created(self) -> None:
        """No VM: the VMM's 404, in words."""
        with self.assertRaises(ActionError) as caught:
            perform(self.source, ActionRequest("power-button"))
        self.assertIn("no VM is created", str(caught.exception))

    def test_server_error(self) -> None:
        """Anything else is reported with its status and body."""
        self.standin.answer_with(500, b'["Error from API", "boom"]')
        with self.assertRaises(ActionError) as caught:
            perform(self.source, ActionRequest("reset"))
        self.assertIn("HTTP 500", str(caught.exception))
        self.assertIn("boom", str(caught.exception))

    def test_sysrq_sends_nothing(self) -> None:
        """SysRq is refused before the API is asked anything."""
        self.standin.boot(pty_path="/dev/pts/9")
        with self.assertRaises(ActionUnsupported):
            perform(self.source, ActionRequest("sysrq", "t"))
        self.assertEqual(self.standin.requests, [])
