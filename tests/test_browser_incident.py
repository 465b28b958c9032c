"""
The page's incident tools in a real browser (Debian's Chromium, headless, Playwright)
against a real C{cloud-console} process on a real pty: search in the head and the tail,
the time a line arrived (tooltip and gutter), go to time, the tail after the "not kept"
line starting on a whole line, and the download formats.

The harness is L{tests.test_browser}'s. Waits are on predicates in the page and on the
pty; the only pause spaces two writes in time, so that they arrive at distinct moments.
"""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

from .helpers import ThreadedGuest
from .test_browser import BrowserHarness

#: The buffer line whose text contains the needle (wrapped rows not joined), or -1.
LINE_OF = """needle => {
    const buffer = window.cloudConsole.term.buffer.active;
    for (let i = 0; i < buffer.length; i++) {
        if (buffer.getLine(i).translateToString(true).includes(needle)) return i;
    }
    return -1;
}"""

#: Where on the page a buffer line's row is (its centre), while it is on screen.
ROW_CENTRE = """line => {
    const term = window.cloudConsole.term;
    const box = document.querySelector('#terminal .xterm-screen').getBoundingClientRect();
    const height = box.height / term.rows;
    const row = line - term.buffer.active.viewportY;
    return [box.left + 40, box.top + height * (row + 0.5)];
}"""


def parse_utc(text: str) -> float:
    """Seconds since the epoch of an ISO 8601 UTC stamp ending in Z."""
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class IncidentPageTests(BrowserHarness):
    """Search, times, go to time, the line after "not kept", downloads."""

    def setUp(self) -> None:
        super().setUp()
        self.guest = ThreadedGuest()
        self.addCleanup(self.guest.hang_up)

    def line_of(self, watched: object, needle: str) -> int:
        line: int = watched.page.evaluate(LINE_OF, needle)  # type: ignore[attr-defined]
        self.assertGreaterEqual(line, 0, needle)
        return line

    def test_search_head_and_tail(self) -> None:
        """
        Ctrl+Shift+F opens the search: a word in the head and in the tail is found (two
        matches, counted, highlighted, next moves between them); the "not kept" line is
        followed by a whole line, not a fragment of the escape sequence the tail was
        cut in; closed, the terminal has its keys again (Ctrl+F reaches the guest).
        """
        server = self.serve(self.guest.path, "--head-size", "200", "--history-size", "400")
        head = "Linux version 6.1 oops-marker in the head\r\n".ljust(200, ".")
        self.guest.write(head.encode())
        self.guest.write(b"middle line\r\n" * 100)
        # The last 400 bytes start inside ESC[m (at its "["), as the tail that showed "[m".
        rest = b"\r\n" + b"".join(b"tail line %03d\r\n" % n for n in range(20)) + b"oops-marker in the tail\r\nlogin: "
        rest += b" " * (398 - len(rest))
        self.guest.write(b"\x1b[1mbold" + b"z" * 50 + b"\x1b[m" + rest)
        watched = self.open_page(self.url(server))
        page = watched.page
        watched.wait_for_text("login:")
        lines = watched.lines()
        (skip,) = [i for i, text in enumerate(lines) if "not kept" in text]
        self.assertEqual(lines[skip + 1], "tail line 000")

        page.keyboard.press("Control+Shift+F")
        self.assertTrue(page.is_visible("#searchbox"))
        page.keyboard.type("oops-marker")
        watched.wait_for("() => window.cloudConsole.state().search.resultCount === 2")
        self.assertEqual(page.text_content("#search-count"), "1 of 2")
        first = page.evaluate("() => window.cloudConsole.term.getSelectionPosition().start.y")
        # The matches are counted at once, but their highlights are drawn by xterm's
        # renderer on a later animation frame: wait for them, do not sample once.
        highlighted = watched.wait_for(
            "() => document.querySelectorAll('.xterm-find-result-decoration').length || false"
        )
        self.assertGreaterEqual(highlighted, 1)
        page.click("#search-next")
        watched.wait_for("() => window.cloudConsole.state().search.resultIndex === 1")
        second = page.evaluate("() => window.cloudConsole.term.getSelectionPosition().start.y")
        self.assertEqual({first, second}, {self.line_of(watched, "oops-marker in the head"),
                                          self.line_of(watched, "oops-marker in the tail")})
        self.assertEqual(page.evaluate("() => window.cloudConsole.term.getSelection()"), "oops-marker")

        page.check("#search-case")
        page.fill("#search-input", "OOPS-MARKER")
        watched.wait_for("() => window.cloudConsole.state().search.text === 'no matches'")
        page.uncheck("#search-case")
        page.check("#search-regex")
        page.fill("#search-input", "oops-marker in the (head|tail)")
        watched.wait_for("() => window.cloudConsole.state().search.resultCount === 2")

        page.keyboard.press("Escape")
        self.assertTrue(page.is_hidden("#searchbox"))
        page.keyboard.press("Control+f")
        self.guest.wait_for_input(b"\x06")
        self.assertNotIn(b"oops", bytes(self.guest.received))
        self.assertEqual(watched.errors, [])

    def test_line_times_and_go_to_time(self) -> None:
        """
        A line written at a known moment shows that time when hovered (local and UTC)
        and in the time gutter; "go to time" lands on the first line at or after it.
        """
        server = self.serve(self.guest.path)
        watched = self.open_page(self.url(server))
        page = watched.page
        before_first = time.time()
        self.guest.write(b"first event\r\n")
        watched.wait_for_text("first event")
        after_first = time.time()
        # Time passing, so that the next write is a moment of its own (marks merge
        # within 100 ms); nothing is waited for.
        time.sleep(0.3)
        before_second = time.time()
        self.guest.write(b"second event\r\n")
        watched.wait_for_text("second event")
        after_second = time.time()

        first, second = self.line_of(watched, "first event"), self.line_of(watched, "second event")
        shown = page.evaluate("line => window.cloudConsole.lineTime(line)", first)
        self.assertGreaterEqual(shown, before_first - 0.01)
        self.assertLessEqual(shown, after_first + 0.01)

        x, y = page.evaluate(ROW_CENTRE, second)
        page.mouse.move(x, y)
        tip = watched.wait_for("() => window.cloudConsole.lineTimeShown()")
        local, utc = tip.split("\n")
        self.assertTrue(local.endswith(" local"), tip)
        moment = parse_utc(utc)
        self.assertGreaterEqual(moment, before_second - 0.01)
        self.assertLessEqual(moment, after_second + 0.01)
        stamp = datetime.datetime.fromtimestamp(moment).strftime("%Y-%m-%d %H:%M:%S")
        self.assertTrue(local.startswith(stamp), (local, stamp))

        page.click("#times")
        self.assertTrue(page.is_visible("#gutter"))
        rows = page.evaluate("() => [...document.querySelectorAll('#gutter > div')].map(d => d.textContent)")
        viewport = page.evaluate("() => window.cloudConsole.term.buffer.active.viewportY")
        self.assertEqual(rows[second - viewport], datetime.datetime.fromtimestamp(moment).strftime("%H:%M:%S"))

        screenshot = self.tmp / "times.png"
        page.screenshot(path=str(screenshot))
        print(f"\nscreenshot of the page with its time gutter: {screenshot}")

        page.fill("#goto-time", utc)
        page.press("#goto-time", "Enter")
        watched.wait_for("line => window.cloudConsole.gotoLine() === line", second)
        self.assertEqual(page.evaluate("() => window.cloudConsole.term.getSelection()").strip(), "second event")
        self.assertEqual(watched.errors, [])

    def test_downloads(self) -> None:
        """The download offers raw bytes, an asciicast with the terminal's size, and text."""
        server = self.serve(self.guest.path)
        self.guest.write(b"\x1b[32mgreen\x1b[0m words\r\nlogin: ")
        watched = self.open_page(self.url(server))
        page = watched.page
        watched.wait_for_text("login:")
        got = {}
        for kind in ("raw", "asciicast", "text"):
            page.select_option("#download-format", kind)
            with page.expect_download() as info:
                page.click("#download")
            got[kind] = (info.value.suggested_filename, Path(info.value.path()).read_bytes())
        self.assertTrue(got["raw"][0].endswith(".log"))
        self.assertEqual(got["raw"][1], b"\x1b[32mgreen\x1b[0m words\r\nlogin: ")
        self.assertTrue(got["text"][0].endswith(".txt"))
        self.assertEqual(got["text"][1], b"green words\nlogin: ")
        self.assertTrue(got["asciicast"][0].endswith(".cast"))
        header = json.loads(got["asciicast"][1].split(b"\n")[0])
        cols, rows = page.evaluate("() => [window.cloudConsole.term.cols, window.cloudConsole.term.rows]")
        self.assertEqual((header["version"], header["width"], header["height"]), (2, cols, rows))
        self.assertEqual(watched.errors, [])


class WhoListPageTests(BrowserHarness):
    """The page's "N watching" opens who is on the console."""

    def setUp(self) -> None:
        super().setUp()
        self.guest = ThreadedGuest()
        self.addCleanup(self.guest.hang_up)

    def test_who_list_two_named_pages(self) -> None:
        """
        Two pages signed in with two named tokens: clicking "2 watching" on either lists
        both names (front door, address, mode); Escape closes it; when one leaves the
        other's open list follows.
        """
        tokens = self.tmp / "tokens"
        tokens.write_text("alice-0123456789abcdef name=alice\nbob-0123456789abcdef read-only name=bob\n")
        server = self.serve(self.guest.path, "--token-file", str(tokens))
        # One browser profile: each page's WebSocket carries the cookie its own ?token= set.
        alice = self.open_page(self.url(server) + "?token=alice-0123456789abcdef")
        bob = self.open_page(self.url(server) + "?token=bob-0123456789abcdef")
        for watched in (alice, bob):
            watched.wait_for("() => (window.cloudConsole.state().who?.watchers ?? []).length === 2")
            page = watched.page
            self.assertEqual(page.text_content("#viewers"), "2 watching")
            self.assertTrue(page.is_hidden("#who"))
            page.click("#viewers")
            self.assertTrue(page.is_visible("#who"))
            rows = [row.strip() for row in page.locator("#who-list li").all_inner_texts()]
            self.assertEqual(len(rows), 2, rows)
            self.assertTrue(rows[0].startswith("alice · web · 127.0.0.1 · read-write · since "), rows)
            self.assertTrue(rows[1].startswith("bob · web · 127.0.0.1 · read-only · since "), rows)
            self.assertEqual(page.text_content("#who-note"), "")
        bob.page.keyboard.press("Escape")
        self.assertTrue(bob.page.is_hidden("#who"))
        bob.page.close()
        alice.wait_for("() => document.querySelectorAll('#who-list li').length === 1")
        self.assertEqual(alice.page.text_content("#viewers"), "1 watching")
        self.assertIn("alice", alice.page.text_content("#who-list") or "")
        self.assertEqual(alice.errors, [])

    def test_index_names_who_is_on(self) -> None:
        """The index's viewer count, to a credential, names who is on the console."""
        tokens = self.tmp / "tokens"
        tokens.write_text("alice-0123456789abcdef name=alice\n")
        server = self.serve(None, "--console", f"vm1=pty:{self.guest.path}", "--token-file", str(tokens))
        self.open_page(self.url(server) + "c/vm1/?token=alice-0123456789abcdef")
        index = self.browser().new_page()
        index.goto(self.url(server))
        index.wait_for_function(
            "() => document.querySelector('td.viewers')?.title === 'on it: alice'"
        )
        self.assertEqual(index.text_content("td.viewers"), "1")
