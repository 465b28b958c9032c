"""
Tests for L{cloud_console.console.export} and C{GET history?format=}: the history as
asciicast v2 with its true arrival times, and as plain text for a ticket.

The asciicast is checked by a real consumer, Debian's C{asciinema} (C{asciinema cat}
must print exactly the raw history), against a real server on a real pty.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from cloud_console.console.export import asciicast, plain_text
from cloud_console.console.multiplexer import Multiplexer, skip_marker

from .helpers import FakePty, Guest, asciinema_cat, connect_v1, free_port, http_get, serve_process


def parse_cast(body: bytes) -> tuple[dict[str, Any], list[list[Any]]]:
    """An asciicast v2 file's header and events, each line parsed as JSON."""
    lines = body.decode("utf-8").splitlines()
    return json.loads(lines[0]), [json.loads(line) for line in lines[1:]]


class PlainTextTests(SynchronousTestCase):
    """format=text: what a person reads, without the terminal's control."""

    def test_escape_sequences_removed(self) -> None:
        """CSI, OSC, DCS and two-byte escapes go; the text between them stays."""
        data = (
            b"\x1b[0;32m[  OK  ]\x1b[0m Started \x1b]0;title\x07journal\r\n"
            b"\x1b(B\x1b=\x1bPq#0;2;0;0;0\x1b\\plain \x1b[?25lcursor\x1b[2J\x1b"
        )
        self.assertEqual(plain_text(data), b"[  OK  ] Started journal\nplain cursor")

    def test_line_ends_and_controls(self) -> None:
        """CR LF and lone CR become newlines; other controls go; invalid UTF-8 is replaced."""
        self.assertEqual(
            plain_text(b"a\r\nb\rc\x07\x08\td\xff\n"), "a\nb\nc\td\ufffd\n".encode("utf-8")
        )


class AsciicastTests(SynchronousTestCase):
    """format=asciicast from a multiplexer on a Clock: the header, the events, the gap."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000.25)
        self.multiplexer = Multiplexer(20, clock=self.clock, lag_window=100, head_size=10)
        self.multiplexer.console_up(FakePty())

    def cast(self) -> tuple[dict[str, Any], list[list[Any]]]:
        runs, skipped = self.multiplexer.replay_runs()
        body = asciicast(self.multiplexer.history, runs, skipped, 120, 40, self.clock.seconds())
        return parse_cast(body)

    def test_header_and_timed_events(self) -> None:
        """One event per arrival time, at its time after the header's timestamp."""
        self.multiplexer.output_received(b"one\r\n")
        self.clock.advance(1.5)
        self.multiplexer.output_received("tw\u00e9\r\n".encode("utf-8"))
        header, events = self.cast()
        self.assertEqual(
            header,
            {"version": 2, "width": 120, "height": 40, "timestamp": 1_800_000_000,
             "env": {"TERM": "xterm-256color"}},
        )
        self.assertEqual(events, [[0.25, "o", "one\r\n"], [1.75, "o", "tw\u00e9\r\n"]])

    def test_character_split_between_reads(self) -> None:
        """A UTF-8 character split between two reads is whole in the later event."""
        euro = "\u20ac".encode("utf-8")
        self.multiplexer.output_received(b"a" + euro[:1])
        self.clock.advance(1)
        self.multiplexer.output_received(euro[1:] + b"b")
        _, events = self.cast()
        self.assertEqual([e[2] for e in events], ["a", "\u20acb"])

    def test_not_kept_is_one_event(self) -> None:
        """Between head and tail the "not kept" line is one event, at the tail's time."""
        self.multiplexer.output_received(b"HEAD.....\n")
        for i in range(6):
            self.clock.advance(10)
            self.multiplexer.output_received(b"line %d...\n" % i)
        _, events = self.cast()
        texts = [e[2] for e in events]
        (skip,) = [i for i, t in enumerate(texts) if "not kept" in t]
        self.assertEqual(texts[skip], skip_marker(40).decode())
        self.assertEqual(texts[:skip], ["HEAD.....\n"])
        self.assertEqual("".join(texts[skip + 1 :]), "line 4...\nline 5...\n")
        self.assertEqual(events[skip][0], events[skip + 1][0])
        self.assertEqual(events[skip + 1][0], 50.25)
        self.assertEqual("".join(texts).encode(), self.multiplexer.replay())


class DownloadTests(TestCase):
    """A real server on a real pty: the three downloads, and asciinema reading one."""

    timeout = 60

    async def serve(self) -> tuple[Guest, int]:
        guest = Guest()
        self.addCleanup(guest.close)
        guest.start_reading()
        port = free_port()
        await serve_process(
            self,
            [guest.path, "127.0.0.1", str(port), "--head-size", "64", "--history-size", "4096"],
        )
        return guest, port

    async def test_asciicast_times_and_asciinema_cat(self) -> None:
        """
        Output written at known moments has those times in the asciicast (to the
        100 ms the marks merge), and C{asciinema cat} of it prints exactly the raw
        history: head, "not kept" line, tail.
        """
        if shutil.which("asciinema") is None:
            raise SkipTest("asciinema is not installed (tests/run.sh installs it)")
        guest, port = await self.serve()
        watcher = await connect_v1(port)
        pieces = [
            b"\x1b[1mBoot\x1b[0m \xc3\xa9t\xc3\xa9 first line of the head\r\n",
            b"second write\r\n" + b"filler \xe2\x82\xac line\r\n" * 400,
            b"\x1b[31mthird\x1b[m write\r\nlogin: ",
        ]
        moments = []
        written = 0
        for piece in pieces:
            before = time.time()
            await guest.write(piece)
            written += len(piece)
            await watcher.wait_for(lambda c: c.next_offset == written)
            moments.append((before, time.time()))
            # Make the next write a moment of its own (marks merge within 100 ms):
            # time passing, not a wait for anything.
            await task.deferLater(reactor, 0.3, lambda: None)
        code, raw = await http_get(port, "/history")
        self.assertEqual(code, 200)
        self.assertIn(b"bytes not kept", raw)
        code, cast = await http_get(port, "/history?format=asciicast&width=100&height=30")
        self.assertEqual(code, 200)
        header, events = parse_cast(cast)
        self.assertEqual((header["version"], header["width"], header["height"]), (2, 100, 30))
        start = header["timestamp"]
        self.assertLessEqual(start, moments[0][0])
        first = events[0]
        self.assertTrue(first[2].startswith("\x1b[1mBoot"))
        self.assertGreaterEqual(start + first[0], moments[0][0] - 0.001)
        self.assertLessEqual(start + first[0], moments[0][1] + 0.001)
        last_write = [e for e in events if "third" in e[2]]
        self.assertEqual(len(last_write), 1)
        self.assertGreaterEqual(start + last_write[0][0], moments[2][0] - 0.001)
        self.assertLessEqual(start + last_write[0][0], moments[2][1] + 0.001)
        cast_file = Path(self.mktemp())
        cast_file.write_bytes(cast)
        out = Path(self.mktemp())
        self.assertEqual(await asciinema_cat(cast_file, out), 0)
        self.assertEqual(out.read_bytes(), raw)

    async def test_text_and_formats(self) -> None:
        """format=text has no ESC byte and keeps the words; an unknown format is 400."""
        guest, port = await self.serve()
        watcher = await connect_v1(port)
        data = b"\x1b[0;32m[  OK  ]\x1b[0m Reached target \x1b]0;t\x07Multi-User\r\nlogin: "
        await guest.write(data)
        await watcher.wait_for(lambda c: c.next_offset == len(data))
        code, text = await http_get(port, "/history?format=text")
        self.assertEqual(code, 200)
        self.assertNotIn(b"\x1b", text)
        self.assertEqual(text, b"[  OK  ] Reached target Multi-User\nlogin: ")
        code, raw = await http_get(port, "/history?format=raw")
        self.assertEqual((code, raw), (200, data))
        code, _ = await http_get(port, "/history?format=pdf")
        self.assertEqual(code, 400)
        code, _ = await http_get(port, "/history?format=asciicast&width=0")
        self.assertEqual(code, 400)
