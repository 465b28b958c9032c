"""
The page against a real guest: QEMU booting Linux (tests/guest.py), its console found by
cloud-console through QMP, in Debian's Chromium.

One page lives through the guest's whole life without reloading: it shows the boot and
the shell, a command typed into the page runs in the guest, a guest C{reboot -f} goes on
in the same terminal, and a QEMU restart (a new process with a new pty) is shown as the
console going down and coming back, after which typing works again.
"""

from __future__ import annotations

from twisted.trial.unittest import SkipTest

from tests.guest import BANNER, PROMPT, GuestUnavailable, QemuGuest
from tests.test_browser import BrowserHarness

#: How many times the page's terminal shows C{needle} (scrollback included).
COUNT_TEXT = """needle => {
    const buffer = window.cloudConsole.term.buffer.active;
    let text = '';
    for (let i = 0; i < buffer.length; i++) text += buffer.getLine(i).translateToString(true) + '\\n';
    return text.split(needle).length - 1;
}"""
AT_LEAST = """([needle, count]) => {
    const buffer = window.cloudConsole.term.buffer.active;
    let text = '';
    for (let i = 0; i < buffer.length; i++) text += buffer.getLine(i).translateToString(true) + '\\n';
    return text.split(needle).length - 1 >= count;
}"""
CONSOLE_BACK = """() => {
    const state = window.cloudConsole.state();
    return state.console.state === 'up' && state.console.since !== null;
}"""


class QemuPageTests(BrowserHarness):
    """One page, one URL, a guest that boots, reboots and is restarted."""

    def test_page_follows_the_guest(self) -> None:
        """
        The page shows the boot and the shell; ``echo $((6*7))`` typed in it prints 42;
        after ``reboot -f`` the second boot shows in the same terminal; after a QEMU
        restart the console comes back (the page says so) and typing works again; the
        page never reloads, never reconnects, never resets, and logs no error.
        """
        try:
            guest = QemuGuest("chardev-pty").start()
        except (GuestUnavailable, FileNotFoundError) as e:
            raise SkipTest(f"no QEMU guest here: {e} (tests/run.sh installs it)")
        self.addCleanup(guest.close)
        server = self.serve(f"qmp:{guest.qmp_path}", "--reopen", "--title", "vm1")
        watched = self.open_page(self.url(server))
        page = watched.page
        page.evaluate("() => { window.loadedOnce = true; }")  # gone if the page reloads
        guest.cont()
        banner, prompt = BANNER.decode(), PROMPT.decode()
        watched.wait_for(AT_LEAST, [banner, 1], timeout=60_000)
        watched.wait_for(AT_LEAST, [prompt, 1], timeout=30_000)
        page.click("#terminal")
        page.keyboard.type("echo $((6*7))\n")
        watched.wait_for(AT_LEAST, ["\n42\n", 1], timeout=30_000)

        page.keyboard.type("reboot -f\n")
        watched.wait_for(AT_LEAST, [banner, 2], timeout=60_000)
        watched.wait_for(AT_LEAST, [prompt, 3], timeout=30_000)

        guest.restart()
        watched.wait_for(CONSOLE_BACK, timeout=30_000)
        guest.cont()
        watched.wait_for(AT_LEAST, [banner, 3], timeout=60_000)
        watched.wait_for(AT_LEAST, [prompt, 4], timeout=30_000)
        page.keyboard.type("echo back $((2*21))\n")
        watched.wait_for(AT_LEAST, ["back 42", 1], timeout=30_000)

        state = watched.state()
        self.assertTrue(page.evaluate("() => window.loadedOnce === true"))
        self.assertEqual(state["connects"], 1)
        self.assertEqual(state["gaps"], 0)
        self.assertEqual(state["lastStatus"], "connected")
        self.assertIn("console back", state["lastNotice"])
        self.assertEqual(watched.errors, [])
        screenshot = self.tmp / "qemu-guest.png"
        page.screenshot(path=str(screenshot))
        print(f"screenshot: {screenshot}")
