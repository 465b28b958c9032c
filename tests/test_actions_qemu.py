"""
Actions on a real QEMU guest (tests/guest.py) booted with SysRq enabled, through a real
cloud-console process and its C{POST /c/NAME/actions/ACTION}: SysRq C{h} makes the guest
print its SysRq help on the console, C{t} its tasks; reset reboots it while the same v1
client rides on; the power button reaches QEMU (its QMP event C{POWERDOWN}, seen on the
test's own monitor).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SkipTest

from tests.guest import GuestUnavailable, QemuGuest
from tests.helpers import connect_v1, free_port, http_post, serve_process
from tests.test_qemu import QemuTestCase

JSON = {"Content-Type": "application/json"}


class QemuActionTests(QemuTestCase):
    """SysRq, reset and the power button on a booted guest."""

    async def act(self, action: str, body: dict[str, Any] | None = None) -> Any:
        code, answer = await http_post(
            self.port, f"/c/vm/actions/{action}", json.dumps(body or {}).encode(), JSON
        )
        self.assertEqual(code, 200, answer)
        return answer

    async def test_sysrq_reset_power_button(self) -> None:
        """The guest answers SysRq h and t, reboots on reset, and QEMU sees the power button."""
        guest = self.guest_with_sysrq()
        self.port = free_port()
        await serve_process(self, [
            "--console", f"vm=qmp:{guest.qmp_path}", "--allow-control",
            "--port", f"tcp:port={self.port}:interface=127.0.0.1",
        ])
        watcher = await connect_v1(self.port, "/c/vm/ws")
        self.addCleanup(lambda: None if watcher.close_status else watcher.transport.abortConnection())
        guest.cont()
        await self.shell(watcher)
        # The keyboard is bound by the kernel's serio thread, which may come after the
        # shell on a loaded host: keys sent before that are lost.
        await watcher.wait_for(lambda c: "input: AT Translated Set 2 keyboard" in c.text())

        since = len(watcher.text())
        await self.act("sysrq", {"key": "h"})
        await watcher.wait_for(lambda c: "sysrq: HELP : " in c.text()[since:])
        since = len(watcher.text())
        await self.act("sysrq", {"key": "t"})
        await watcher.wait_for(lambda c: "Show State" in c.text()[since:])
        await watcher.wait_for(lambda c: "task:init" in c.text()[since:])

        since = len(watcher.text())
        answer = await self.act("reset")
        self.assertEqual(answer["by"], "anonymous")
        await self.shell(watcher, since)
        self.assertIsNone(watcher.close_status)
        told = [e["action"] for e in watcher.events_of("action")]
        self.assertEqual(told, ["SysRq h", "SysRq t", "reset"])

        await self.act("power-button")
        guest.qmp("query-status")  # the control monitor reads what QEMU said meanwhile
        self.assertIn("POWERDOWN", [e["event"] for e in guest.events])

    def guest_with_sysrq(self) -> QemuGuest:
        """A paused guest whose kernel acts on every SysRq key."""
        try:
            guest = QemuGuest("chardev-pty", append="sysrq_always_enabled=1").start()
        except (GuestUnavailable, FileNotFoundError) as e:
            raise SkipTest(f"no QEMU guest here: {e} (tests/run.sh installs it)")
        self.addCleanup(guest.close)
        return guest
