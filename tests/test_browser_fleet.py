"""
A host's consoles in Debian's Chromium: the index page and two console pages side by
side in two tabs, one of them a real QEMU guest found through QMP, the other a plain pty.

Waits are Playwright's (predicates evaluated in the page) and the guests' own (bytes on a
pty, a shell prompt); no sleeps.
"""

from __future__ import annotations

from twisted.trial.unittest import SkipTest

from tests.guest import BANNER, PROMPT, GuestUnavailable, QemuGuest
from tests.helpers import ThreadedGuest
from tests.test_browser import SHOWS_TEXT, BrowserHarness

INDEX_STATE = "() => window.cloudConsoleIndex && window.cloudConsoleIndex.state()"
ROW_DOWN = """name => {
    const row = document.querySelector(`tr.row[data-name="${name}"]`);
    return Boolean(row) && row.dataset.state === 'down';
}"""
INDEX_ROWS = """names => {
    const hook = window.cloudConsoleIndex;
    return Boolean(hook) && JSON.stringify(hook.state().rows) === JSON.stringify(names);
}"""


class FleetPageTests(BrowserHarness):
    """The index page and console pages of one process serving two consoles."""

    def test_index_and_two_consoles_in_two_tabs(self) -> None:
        """
        The index lists both consoles (up); typing a name and Enter opens that console;
        in two tabs, the QEMU guest's page boots to a shell and runs a typed command,
        while the other page shows its own pty's output and types into it only; when
        the plain pty hangs up the index shows it down first.
        """
        try:
            guest = QemuGuest("chardev-pty").start()
        except (GuestUnavailable, FileNotFoundError) as e:
            raise SkipTest(f"no QEMU guest here: {e} (tests/run.sh installs it)")
        self.addCleanup(guest.close)
        plain = ThreadedGuest()
        self.addCleanup(plain.hang_up)
        server = self.serve(
            None, "--console", f"vm1=qmp:{guest.qmp_path}", "--console", f"pty1={plain.path}"
        )
        index = self.browser().new_page()
        index.goto(self.url(server))
        index.wait_for_function(INDEX_ROWS, arg=["pty1", "vm1"])
        self.assertEqual(index.title(), "cloud-console — 2 consoles")

        index.keyboard.type("vm1")
        index.keyboard.press("Enter")
        index.wait_for_url(f"{self.url(server)}c/vm1/")
        vm = self.open_page(f"{self.url(server)}c/vm1/")
        other = self.open_page(f"{self.url(server)}c/pty1/")
        guest.cont()
        vm.wait_for_text(BANNER.decode(), timeout=60_000)
        vm.wait_for_text(PROMPT.decode(), timeout=30_000)
        vm.page.click("#terminal")
        vm.page.keyboard.type("echo $((6*7))\n")
        vm.wait_for_text("\n42", timeout=30_000)

        plain.write(b"plain pty says hello\r\n")
        other.wait_for_text("plain pty says hello")
        other.page.click("#terminal")
        other.page.keyboard.type("typed here")
        plain.wait_for_input(b"typed here")
        self.assertFalse(vm.page.evaluate(SHOWS_TEXT, "plain pty says hello"))
        self.assertFalse(other.page.evaluate(SHOWS_TEXT, BANNER.decode()))
        self.assertEqual(vm.state()["console"]["state"], "up")

        index.go_back()
        index.wait_for_function(INDEX_ROWS, arg=["pty1", "vm1"])
        plain.hang_up()
        index.wait_for_function(ROW_DOWN, arg="pty1", timeout=15_000)
        self.assertEqual(index.evaluate(INDEX_STATE)["rows"][0], "pty1")
        self.assertEqual(vm.errors + other.errors, [])
        shot = self.tmp / "fleet.png"
        index.screenshot(path=str(shot))
        print(f"screenshot: {shot}")
