"""
Tests for L{cloud_console.console.logfile}: the log file as one more console client.

These use real files under the test's temporary directory (C{self.mktemp()}), and
C{/dev/full} for a real ENOSPC, but no reactor and no time.
"""

from __future__ import annotations

import errno
import os
from typing import Sequence

from twisted.internet.task import Clock
from twisted.logger import LogEvent, capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from cloud_console.console.logfile import LogFileError, LogFileSink
from cloud_console.console.multiplexer import Chunk, IConsoleClient, Multiplexer

from .helpers import FakePty


def events_with(events: Sequence[LogEvent], fragment: str) -> list[LogEvent]:
    """The captured events whose format string contains C{fragment}."""
    return [e for e in events if fragment in (e.get("log_format") or "")]


def read(path: str) -> bytes:
    """The whole file at C{path}."""
    with open(path, "rb") as f:
        return f.read()


class LogFileTestCase(SynchronousTestCase):
    """A multiplexer and a sink writing to a fresh temporary path."""

    def setUp(self) -> None:
        self.multiplexer = Multiplexer(1000)
        self.path = self.mktemp()

    def make_sink(self, start: bool = True) -> LogFileSink:
        """A sink on C{self.path}, started unless told, closed after the test."""
        sink = LogFileSink(self.path, self.multiplexer)
        self.addCleanup(sink.close, 1001, "test over")
        if start:
            sink.startService()
        return sink

    def use_full_disk(self, sink: LogFileSink) -> None:
        """Point the sink at C{/dev/full}: every write fails with ENOSPC."""
        os.close(sink._fd)
        sink._fd = os.open("/dev/full", os.O_WRONLY | os.O_CLOEXEC)

    def use_file_again(self, sink: LogFileSink) -> None:
        """Point the sink back at its file, as if space had been freed."""
        os.close(sink._fd)
        sink._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)


class OutputTests(LogFileTestCase):
    """Every byte of output from start-up on, exactly once."""

    def test_provides_interface(self) -> None:
        """The sink implements every method of L{IConsoleClient}."""
        self.assertTrue(verifyObject(IConsoleClient, self.make_sink(start=False)))

    def test_empty_at_start(self) -> None:
        """
        The file exists and is empty once the sink starts, even with history in the
        multiplexer: no NUL padding, nothing from before.
        """
        self.multiplexer.output_received(b"before start")
        self.make_sink()
        self.assertEqual(read(self.path), b"")

    def test_every_byte_once(self) -> None:
        """
        Output after start-up is written byte-exact, exactly once, in order, and nothing
        written before start-up is.
        """
        self.multiplexer.output_received(b"not logged")
        sink = self.make_sink()
        expected = b""
        for i in range(300):
            data = bytes([(i * 7 + j) % 256 for j in range(i % 17)])
            self.multiplexer.output_received(data)
            expected += data
        self.multiplexer.output_received(b"\x00\xff\r\n\x1b[0m")
        expected += b"\x00\xff\r\n\x1b[0m"
        self.assertEqual(read(self.path), expected)
        self.assertEqual(sink.bytes_written, len(expected))
        self.assertEqual(sink.bytes_lost, 0)

    def test_large_output(self) -> None:
        """Output larger than the history is still written whole."""
        self.make_sink()
        data = os.urandom(5000)
        self.multiplexer.output_received(data)
        self.assertEqual(read(self.path), data)

    def test_appends_to_existing_file(self) -> None:
        """An existing log is appended to, not truncated."""
        with open(self.path, "wb") as f:
            f.write(b"yesterday\n")
        self.make_sink()
        self.multiplexer.output_received(b"today\n")
        self.assertEqual(read(self.path), b"yesterday\ntoday\n")

    def test_not_a_viewer(self) -> None:
        """The log file is not counted among the viewers."""
        viewers: list[int] = []

        class Viewer:
            def output(self, chunk: Chunk) -> None:
                pass

            def gap(self, lost_from: int, lost_to: int, reason: str) -> bool:
                return True

            def clients_changed(self, count: int) -> None:
                viewers.append(count)

        self.multiplexer.attach(Viewer())  # type: ignore[arg-type]
        self.make_sink()
        self.assertEqual(self.multiplexer.viewer_count, 1)
        self.assertEqual(viewers, [1])

    def test_start_logged(self) -> None:
        """Starting logs the path being written."""
        sink = self.make_sink(start=False)
        with capturedLogs() as events:
            sink.startService()
        [event] = events_with(events, "logging console output")
        self.assertEqual(event["path"], self.path)

    def test_gap_carries_on(self) -> None:
        """Told of a gap, the sink carries on rather than closing."""
        self.assertIs(self.make_sink().gap(0, 10, "lagging"), True)


class OpenTests(SynchronousTestCase):
    """Opening the file is fatal when it fails: the operator asked for a log."""

    def test_missing_directory(self) -> None:
        """
        A path in a directory that does not exist raises L{LogFileError} naming the
        path and the reason.
        """
        path = os.path.join(self.mktemp(), "console.log")
        error = self.assertRaises(LogFileError, LogFileSink, path, Multiplexer(100))
        self.assertIn(path, str(error))
        self.assertIn(os.strerror(errno.ENOENT), str(error))
        self.assertIsInstance(error.__cause__, FileNotFoundError)

    def test_directory_as_path(self) -> None:
        """A path that is a directory raises L{LogFileError}."""
        path = self.mktemp()
        os.mkdir(path)
        error = self.assertRaises(LogFileError, LogFileSink, path, Multiplexer(100))
        self.assertIn(path, str(error))


class ReopenTests(LogFileTestCase):
    """Reopening by name, for logrotate."""

    def test_reopen_after_rename(self) -> None:
        """
        After the file is renamed away and the sink reopened, output goes to a new file
        at the original path, and the renamed file keeps what came before.
        """
        sink = self.make_sink()
        self.multiplexer.output_received(b"one\n")
        os.rename(self.path, self.path + ".1")
        self.multiplexer.output_received(b"two\n")
        with capturedLogs() as events:
            sink.reopen()
        self.multiplexer.output_received(b"three\n")
        self.assertEqual(read(self.path + ".1"), b"one\ntwo\n")
        self.assertEqual(read(self.path), b"three\n")
        [event] = events_with(events, "reopened")
        self.assertEqual(event["path"], self.path)

    def test_reopen_failure_keeps_old_file(self) -> None:
        """
        If the path cannot be opened again, the error is logged, nothing is raised and
        output keeps going to the old file.
        """
        directory = self.mktemp()
        os.mkdir(directory)
        self.path = os.path.join(directory, "console.log")
        sink = self.make_sink()
        self.multiplexer.output_received(b"one\n")
        os.rename(directory, directory + ".moved")
        with capturedLogs() as events:
            sink.reopen()
        self.multiplexer.output_received(b"two\n")
        self.assertEqual(read(os.path.join(directory + ".moved", "console.log")), b"one\ntwo\n")
        [event] = events_with(events, "not reopened")
        self.assertIn(self.path, event["error"])
        self.assertEqual(event["log_level"].name, "error")


class WriteErrorTests(LogFileTestCase):
    """A full disk is logged once; the console carries on."""

    def test_error_logged_once(self) -> None:
        """
        Writes to a full disk never raise; the first failure is logged as one error
        event naming the path and ENOSPC, and later failures add no more events.
        """
        sink = self.make_sink()
        self.use_full_disk(sink)
        with capturedLogs() as events:
            for i in range(10):
                self.multiplexer.output_received(b"lost %d\n" % i)
        errors = [e for e in events if e["log_level"].name == "error"]
        self.assertEqual(len(errors), 1)
        self.assertEqual(errors[0]["path"], self.path)
        self.assertEqual(errors[0]["error"], os.strerror(errno.ENOSPC))
        self.assertEqual(sink.bytes_lost, sum(len(b"lost %d\n" % i) for i in range(10)))
        self.assertEqual(sink.bytes_written, 0)

    def test_recovery_logged_with_loss(self) -> None:
        """
        When writing works again, one event says so with the number of bytes that were
        not logged, and the file has what came before and after the failure.
        """
        sink = self.make_sink()
        self.multiplexer.output_received(b"before\n")
        self.use_full_disk(sink)
        self.multiplexer.output_received(b"12345")
        self.multiplexer.output_received(b"678")
        self.use_file_again(sink)
        with capturedLogs() as events:
            self.multiplexer.output_received(b"after\n")
            self.multiplexer.output_received(b"more\n")
        [event] = events_with(events, "writable again")
        self.assertEqual((event["path"], event["lost"]), (self.path, 8))
        self.assertEqual(read(self.path), b"before\nafter\nmore\n")

    def test_second_failure_logged_again(self) -> None:
        """A failure after a recovery is a new failure, logged once more."""
        sink = self.make_sink()
        self.use_full_disk(sink)
        self.multiplexer.output_received(b"a")
        self.use_file_again(sink)
        self.multiplexer.output_received(b"b")
        self.use_full_disk(sink)
        with capturedLogs() as events:
            self.multiplexer.output_received(b"c")
            self.multiplexer.output_received(b"d")
        self.assertEqual(len(events_with(events, "cannot write log file")), 1)

    def test_second_recovery_counts_its_own_loss(self) -> None:
        """
        Each recovery reports the bytes lost since that failure began, not the total
        over every failure so far.
        """
        sink = self.make_sink()
        self.use_full_disk(sink)
        self.multiplexer.output_received(b"x" * 100)
        self.use_file_again(sink)
        self.multiplexer.output_received(b"ok")
        self.use_full_disk(sink)
        self.multiplexer.output_received(b"y" * 7)
        self.use_file_again(sink)
        with capturedLogs() as events:
            self.multiplexer.output_received(b"ok")
        [event] = events_with(events, "writable again")
        self.assertEqual(event["lost"], 7)

    def test_reopen_while_failing_reports_loss(self) -> None:
        """
        When a reopen (logrotate freeing space) ends a failure, the number of bytes
        that were not logged is still reported once writing works.
        """
        sink = self.make_sink()
        self.use_full_disk(sink)
        self.multiplexer.output_received(b"z" * 42)
        with capturedLogs() as events:
            sink.reopen()
            self.multiplexer.output_received(b"ok")
        reported = [e["lost"] for e in events if "lost" in e]
        self.assertEqual(reported, [42])
        self.assertEqual(read(self.path), b"ok")


class CloseTests(LogFileTestCase):
    """Closing the sink closes the file and detaches it."""

    def detached(self, sink: LogFileSink) -> list[Chunk]:
        """Record any output the multiplexer still hands the sink from now on."""
        seen: list[Chunk] = []
        sink.output = seen.append  # type: ignore[method-assign, assignment]
        return seen

    def test_close(self) -> None:
        """
        C{close} fires at once, closes the file descriptor and detaches the sink: no
        more output reaches it.
        """
        sink = self.make_sink()
        self.multiplexer.output_received(b"kept")
        fd = sink._fd
        self.successResultOf(sink.close(1001, "bye"))
        self.assertRaises(OSError, os.fstat, fd)
        seen = self.detached(sink)
        self.multiplexer.output_received(b"dropped")
        self.assertEqual(seen, [])
        self.assertEqual(read(self.path), b"kept")

    def test_close_idempotent(self) -> None:
        """Closing twice is harmless."""
        sink = self.make_sink()
        self.successResultOf(sink.close(1001, "bye"))
        self.successResultOf(sink.close(1001, "bye"))

    def test_console_lost_closes(self) -> None:
        """The console going away closes and detaches the sink, like any client."""
        sink = self.make_sink()
        fd = sink._fd
        self.multiplexer.console_lost("EOF")
        self.assertRaises(OSError, os.fstat, fd)
        seen = self.detached(sink)
        self.multiplexer.output_received(b"late")
        self.assertEqual(seen, [])

    def test_stop_and_restart(self) -> None:
        """
        Stopping the service closes the file; starting it again reopens the path and
        appends from the output at that moment.
        """
        sink = self.make_sink()
        self.multiplexer.output_received(b"first\n")
        sink.stopService()
        self.multiplexer.output_received(b"while stopped\n")
        sink.startService()
        self.multiplexer.output_received(b"second\n")
        self.assertEqual(read(self.path), b"first\nsecond\n")

    def test_output_after_close_ignored(self) -> None:
        """Output handed to a closed sink directly is ignored, not an error."""
        sink = self.make_sink()
        sink.close(1001, "bye")
        sink.output(Chunk(0, b"late"))
        self.assertEqual(read(self.path), b"")


class ConsoleStateMarkerTests(LogFileTestCase):
    """One timestamped marker line per console down and up, on a line of its own."""

    def test_markers(self) -> None:
        """
        Down and up each add one conserver-style line with the reason and the time; a
        marker after a partial line starts a new line first; the output is unchanged.
        """
        self.make_sink()
        self.multiplexer.output_received(b"login: ")
        self.multiplexer.console_down("pty /dev/pts/3 hung up")
        self.multiplexer.console_up(FakePty(), "opened pty /dev/pts/4")
        self.multiplexer.output_received(b"Linux version\r\n")
        self.multiplexer.console_down("pty /dev/pts/4 hung up")
        lines = read(self.path).split(b"\r\n")
        self.assertEqual(lines[0], b"login: ")
        self.assertRegex(
            lines[1].decode(),
            r"^\[-- console down: pty /dev/pts/3 hung up -- \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ --\]$",
        )
        self.assertRegex(lines[2].decode(), r"^\[-- console up: opened pty /dev/pts/4 -- .*Z --\]$")
        self.assertEqual(lines[3], b"Linux version")
        self.assertRegex(lines[4].decode(), r"^\[-- console down: pty /dev/pts/4 hung up -- ")
        self.assertEqual(lines[5:], [b""])


class WorkerLoggedTests(LogFileTestCase):
    """Output a read worker already wrote to the file is counted, not written again."""

    def test_not_written_twice(self) -> None:
        """
        Logged output is not written again, but counts, and a marker line after it
        still starts on a line of its own.
        """
        sink = self.make_sink()
        fd = sink.worker_descriptor()
        assert fd is not None
        os.write(fd, b"login: ")  # as the worker writes it
        self.multiplexer.output_received(b"login: ", logged=True)
        self.multiplexer.console_down("pty /dev/pts/3 hung up")
        self.multiplexer.console_up(FakePty(), "opened pty /dev/pts/4")
        self.multiplexer.output_received(b"Linux\r\n")
        written = read(self.path)
        lines = written.split(b"\r\n")
        self.assertEqual(lines[0], b"login: ")
        self.assertRegex(lines[1].decode(), r"^\[-- console down: pty /dev/pts/3 hung up -- ")
        self.assertRegex(lines[2].decode(), r"^\[-- console up: ")
        self.assertEqual(lines[3:], [b"Linux", b""])
        self.assertEqual(sink.bytes_written, len(written))

    def test_no_descriptor_with_marks_or_failing(self) -> None:
        """
        With MARK lines on, or while the file fails, the worker gets no descriptor: the
        sink must see each chunk first.
        """
        sink = self.make_sink()
        self.assertIsNotNone(sink.worker_descriptor())
        sink.mark_after = 60.0
        self.assertIsNone(sink.worker_descriptor())
        sink.mark_after = 0.0
        sink._failing = True
        self.assertIsNone(sink.worker_descriptor())


class MarkTests(SynchronousTestCase):
    """--log-timestamps: a MARK line after N minutes of silence and when output resumes."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_796_349_600)  # 2026-12-04T02:00:00Z
        self.multiplexer = Multiplexer(1000, clock=self.clock)
        self.multiplexer.console_up(FakePty())
        self.path = self.mktemp()

    def make_sink(self, minutes: float) -> LogFileSink:
        sink = LogFileSink(self.path, self.multiplexer, mark_after=minutes * 60, clock=self.clock)
        self.addCleanup(sink.close, 1001, "test over")
        sink.startService()
        return sink

    def test_silence_then_resume(self) -> None:
        """
        Output, 10 minutes of silence: one MARK, on a line of its own; output resumes: a
        MARK with the time it resumed, then the output, untouched.
        """
        self.make_sink(10)
        self.multiplexer.output_received(b"login: ")
        self.clock.advance(9 * 60 + 59)
        self.assertEqual(read(self.path), b"login: ")
        self.clock.advance(1)
        self.assertEqual(read(self.path), b"login: \r\n[-- MARK -- 2026-12-04T02:10:00Z --]\r\n")
        self.clock.advance(3600)  # one mark per silence, not one per interval
        self.multiplexer.output_received(b"root\r\n")
        self.assertEqual(
            read(self.path),
            b"login: \r\n[-- MARK -- 2026-12-04T02:10:00Z --]\r\n"
            b"[-- MARK -- 2026-12-04T03:10:00Z --]\r\nroot\r\n",
        )
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_steady_output_no_mark(self) -> None:
        """Output every few minutes never leaves 10 minutes of silence: no mark."""
        self.make_sink(10)
        for _ in range(20):
            self.multiplexer.output_received(b"tick\n")
            self.clock.advance(5 * 60)
        self.assertEqual(read(self.path), b"tick\n" * 20)

    def test_silence_from_the_start(self) -> None:
        """A console silent since logging began gets its mark too."""
        self.make_sink(1)
        self.clock.advance(60)
        self.assertEqual(read(self.path), b"[-- MARK -- 2026-12-04T02:01:00Z --]\r\n")

    def test_off_by_default(self) -> None:
        """Without --log-timestamps the log is the exact output, and nothing is scheduled."""
        sink = LogFileSink(self.path, self.multiplexer, clock=self.clock)
        self.addCleanup(sink.close, 1001, "test over")
        sink.startService()
        self.multiplexer.output_received(b"x")
        self.clock.advance(86400)
        self.multiplexer.output_received(b"y")
        self.assertEqual((read(self.path), self.clock.getDelayedCalls()), (b"xy", []))

    def test_changed_by_reload_and_cancelled_at_close(self) -> None:
        """A reload can turn marks on and off; closing cancels the timer."""
        sink = self.make_sink(0)
        sink.set_mark_after(120)
        self.clock.advance(120)
        self.assertEqual(read(self.path), b"[-- MARK -- 2026-12-04T02:02:00Z --]\r\n")
        sink.set_mark_after(0)
        self.multiplexer.output_received(b"z")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        sink.set_mark_after(60)
        sink.close(1001, "done")
        self.assertEqual(self.clock.getDelayedCalls(), [])
