"""
The keys menu and the phone layout, in headless Chromium against a real cloud-console
whose VMM side is recorded (a scripted QMP server: every command it receives).

Desk: the menu lists SysRq (with meanings), reset and the power button for a console with
those actions and the right (--allow-control), and is hidden for one without; SysRq t is
sent and told in the status bar; c asks twice; reset asks for the console's name.
Phone (390x844, touch): the bar keeps "connected" whole and every control on screen,
the menu opens inside the screen, the key bar's Ctrl then c sends 0x03; screenshots
are saved beside the test's log.
"""

from __future__ import annotations

import os
from typing import Any

from playwright.sync_api import Dialog

from tests.helpers import ThreadedGuest
from tests.test_actions_web import recording_qmp
from tests.test_browser import BrowserHarness, Watched
from tests.test_sources import _short_tempdir

OUTCOME = "() => window.cloudConsole.state().lastOutcome"
KEYS_SHOWN = "() => !document.getElementById('keys').hidden"


class KeysPageBase(BrowserHarness):
    """A fleet of two consoles: vm (QEMU over QMP, recorded) and plain (a pty)."""

    def setUp(self) -> None:
        super().setUp()
        self.guest = ThreadedGuest()
        self.addCleanup(self.guest.hang_up)
        self.plain = ThreadedGuest()
        self.addCleanup(self.plain.hang_up)
        self.commands: list[dict[str, Any]] = []
        qmp = recording_qmp(self, os.path.join(_short_tempdir(self), "vm.qmp"), self.guest.path, self.commands)
        self.server = self.serve(None, "--console", f"vm=qmp:{qmp.path}", "--console", f"plain={self.plain.path}",
                                 "--allow-control")

    def page(self, name: str) -> Watched:
        return self.open_page(f"http://127.0.0.1:{self.server.port}/c/{name}/")

    def answer_dialogs(self, watched: Watched, *answers: bool | str) -> list[str]:
        """Answer the next dialogs in order (True/False: confirm; a string: prompt)."""
        asked: list[str] = []
        queue = list(answers)

        def on_dialog(dialog: Dialog) -> None:
            asked.append(dialog.message)
            answer = queue.pop(0) if queue else False
            if answer is False:
                dialog.dismiss()
            elif answer is True:
                dialog.accept()
            else:
                dialog.accept(str(answer))

        watched.page.on("dialog", on_dialog)
        return asked

    def choose(self, watched: Watched, item: str) -> None:
        watched.page.click("#keys")
        watched.page.click(f"#keymenu [data-action='{item}']")


class KeysMenuTests(KeysPageBase):
    def test_sysrq_and_reset(self) -> None:
        """SysRq t is sent and told; c asks twice (refused: nothing sent); reset needs the name."""
        watched = self.page("vm")
        watched.wait_for(KEYS_SHOWN)
        self.assertEqual(watched.state()["actions"], ["sysrq", "reset", "power-button"])
        watched.page.click("#keys")
        menu = watched.page.inner_text("#keymenu")
        self.assertIn("show every task and its state", menu)
        self.assertIn("crash the kernel", menu)
        watched.page.click("#keymenu [data-action='sysrq-t']")
        outcome = watched.wait_for(OUTCOME)
        self.assertEqual(outcome["status"], 200, outcome)
        self.assertEqual(self.commands[-1]["arguments"]["keys"][2]["data"], "t")
        watched.wait_for("() => /^anonymous sent SysRq t at \\d\\d:\\d\\d:\\d\\d$/.test(window.cloudConsole.state().lastAction || '')")
        self.assertIn("SysRq t", watched.page.inner_text("#notice"))

        asked = self.answer_dialogs(watched, True, False, "not-vm", "vm")
        self.choose(watched, "sysrq-c")
        watched.wait_for("() => true")
        self.assertEqual(len(asked), 2, asked)
        self.choose(watched, "reset")
        watched.wait_for("() => window.cloudConsole.state().lastNotice.includes('not sent')")
        self.assertEqual(len(self.commands), 1)
        self.choose(watched, "reset")
        watched.wait_for("() => (window.cloudConsole.state().lastOutcome || {}).action === 'reset'")
        self.assertEqual(self.commands[-1], {"execute": "system_reset"})
        self.assertEqual(len(self.commands), 2)
        self.assertIn("console's name (vm)", asked[2])
        self.assertEqual(watched.errors, [])

    def test_hidden_without_actions(self) -> None:
        """A console whose source has no actions shows no keys menu."""
        watched = self.page("plain")
        watched.page.wait_for_function("() => window.cloudConsole.state().actions !== undefined")
        watched.page.wait_for_load_state("networkidle")
        self.assertTrue(watched.page.is_hidden("#keys"))
        self.assertEqual(watched.state()["actions"], [])


class PhoneTests(KeysPageBase):
    phone = True

    def test_fits_and_key_bar(self) -> None:
        """At 390x844 with touch: everything on screen, the menu reachable, Ctrl then c is 0x03."""
        watched = self.page("vm")
        page = watched.page
        watched.wait_for(KEYS_SHOWN)
        page.screenshot(path=str(self.tmp / "phone.png"))
        status = page.eval_on_selector("#status", "e => [e.textContent, e.scrollWidth <= e.clientWidth]")
        self.assertEqual(status, ["connected", True])
        outside = page.evaluate("""() => [...document.querySelectorAll('#bar button:not([hidden]), #bar select, #bar input, #keybar button')]
            .filter(e => { const r = e.getBoundingClientRect(); return r.left < 0 || r.right > innerWidth || r.bottom > innerHeight || r.width === 0; })
            .map(e => e.id || e.textContent)""")
        self.assertEqual(outside, [])
        self.assertTrue(page.is_visible("#keybar"))
        page.tap("#keys")
        box = page.eval_on_selector("#keymenu", "e => { const r = e.getBoundingClientRect(); return [r.left, r.right, r.top, r.bottom]; }")
        self.assertGreaterEqual(box[0], 0)
        self.assertLessEqual(box[1], 390)
        self.assertGreaterEqual(box[2], 0)
        page.screenshot(path=str(self.tmp / "phone-menu.png"))
        page.tap("#keys")
        page.tap(".xterm")
        page.tap("#key-ctrl")
        self.assertTrue(watched.state()["ctrl"])
        page.keyboard.type("c")
        self.guest.wait_for_input(b"\x03")
        self.assertFalse(watched.state()["ctrl"])
        page.tap("#keybar [data-key='up']")
        self.guest.wait_for_input(b"\x03\x1b[A")
        page.tap("#keybar [data-key='|']")
        self.guest.wait_for_input(b"\x1b[A|")
        self.assertEqual(watched.errors, [])
