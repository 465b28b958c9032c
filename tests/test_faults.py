"""
Faults around a real C{cloud-console} process: the pty hanging up mid-stream, a full disk
under the log file, a log directory that vanished before SIGHUP, clients that vanish or
stall or flood, SIGTERM under load, and a thousand clients coming and going.

Output is random bytes from a seeded generator (raw mode passes every byte value), so
"byte-exact" and "a prefix of what was written" mean something. Memory is the server's
resident set from C{/proc/PID/status}.

Every wait is on a Deferred fired by an event (bytes received, a close, a line in the
server's log, the process ending), never a sleep. One test needs to show that something
I{stops} (the server no longer reads a flooding client): it watches the client's transport
and calls the flood stalled once the transport has stayed paused for a second; the class
timeout is a safety net.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IPushProducer
from twisted.python import log
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from cloud_console.console.inputpath import INPUT_BACKLOG
from tests.helpers import OP_BINARY, Guest, Server, connect_v1
from tests.test_badinput import RawClient, start_console, ws_frame

MiB = 1024 * 1024


def stream(size: int, seed: int = 1) -> bytes:
    """C{size} reproducible random bytes."""
    return random.Random(seed).randbytes(size)


class StreamViewer(WebSocketClientProtocol):  # type: ignore[misc]
    """
    An Autobahn client that collects binary output and fires Deferreds when it has at
    least so many bytes (checked by length: megabytes arrive in hundreds of messages).
    """

    def __init__(self) -> None:
        super().__init__()
        self.received = bytearray()
        self.opened: defer.Deferred[None] = defer.Deferred()
        self.closed: defer.Deferred[tuple[int | None, str | None]] = defer.Deferred()
        self.close_status: tuple[int | None, str | None] | None = None
        self._waiters: list[tuple[int, defer.Deferred[None]]] = []

    def onOpen(self) -> None:
        self.opened.callback(None)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self.received += payload
            size = len(self.received)
            for waiter in [w for w in self._waiters if size >= w[0]]:
                self._waiters.remove(waiter)
                waiter[1].callback(None)

    def wait_bytes(self, count: int) -> defer.Deferred[None]:
        """Fires once at least C{count} bytes have arrived (fails if closed first)."""
        d: defer.Deferred[None] = defer.Deferred()
        if len(self.received) >= count:
            d.callback(None)
        elif self.close_status is not None:
            d.errback(AssertionError(f"closed {self.close_status} with {len(self.received)} bytes"))
        else:
            self._waiters.append((count, d))
        return d

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.close_status = (code, reason)
        for _, d in self._waiters:
            d.errback(AssertionError(f"closed ({code}, {reason!r}) with {len(self.received)} bytes"))
        self._waiters.clear()
        if not self.opened.called:
            self.opened.errback(AssertionError(f"not opened: {code} {reason}"))
        self.closed.callback((code, reason))


async def connect_stream_viewer(port: int) -> StreamViewer:
    factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}/ws")
    factory.protocol = StreamViewer
    viewer: StreamViewer = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    await viewer.opened
    return viewer


#: Output is written in windows of this size, at most two ahead of the slowest reading
#: client: always something in flight, never near the client buffer (256 KiB), so a client
#: that keeps reading is never paused, hence never lagging. (An unpaced flood from this
#: process outruns its own clients, which the server then rightly closes with 4000.)
WINDOW = 64 * 1024


async def paced_write(guest: Guest, data: bytes, viewers: list[StreamViewer],
                      start: int = 0) -> None:
    """
    Write C{data[start:]} as the guest, as fast as the slowest of C{viewers} takes it:
    window after window, each once every viewer has the one before the last.
    Each viewer's stream must be C{data} from its first byte.
    """
    position = start
    while position < len(data):
        end = min(position + WINDOW, len(data))
        await guest.write(data[position:end])
        # consumeErrors: when the viewers are closed (SIGTERM), every waiter fails, not
        # only the first; the others must not be left as unhandled errors.
        await defer.gatherResults(
            [v.wait_bytes(max(start, position - WINDOW)) for v in viewers], consumeErrors=True
        )
        position = end
    await defer.gatherResults([v.wait_bytes(len(data)) for v in viewers], consumeErrors=True)


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of process C{pid} from /proc, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


class FaultTests(TestCase):
    """One real server on a real pty per test."""

    timeout = 60

    async def start(self, *extra: str, log_file: str | None = None) -> Server:
        return await start_console(self, *extra, log_file=log_file)

    async def viewers(self, count: int) -> list[StreamViewer]:
        viewers = [await connect_stream_viewer(self.port) for _ in range(count)]
        for viewer in viewers:
            self.addCleanup(lambda v=viewer: None if v.close_status else v.transport.abortConnection())
        return viewers

    def assert_clean_log(self, server: Server) -> None:
        text = server.stderr.decode(errors="replace")
        self.assertNotIn("Traceback", text, text)
        self.assertNotIn("Unhandled", text, text)

    # -- the pty --------------------------------------------------------------------------

    async def test_hangup_mid_stream(self) -> None:
        """
        The pty hangs up while output is flowing to three clients: each is closed with
        4001 and a reason, after receiving every byte the server read (the log file's
        contents, a byte-exact prefix of what the guest wrote; the kernel discards what
        the server had not read yet); exit status 2 with one "exiting with status 2" line.
        """
        log_path = os.path.abspath(self.mktemp())
        server = await self.start(log_file=log_path)
        viewers = await self.viewers(3)
        data = stream(3 * MiB)
        flowing = 2 * MiB
        writing = defer.Deferred.fromCoroutine(paced_write(self.guest, data, viewers))
        writing.addErrback(lambda failure: None)  # ends when the clients are closed
        # Hang up while output is on its way: one client is past 2 MiB, mid-window.
        await viewers[0].wait_bytes(flowing + 1)
        self.guest.hang_up()
        closes = await defer.gatherResults([v.closed for v in viewers])
        status = await server.ended
        logged = Path(log_path).read_bytes()
        log.msg(f"fault: hang-up: {len(logged)} bytes logged; "
                f"closes {closes}; status {status}")
        self.assertGreater(len(logged), flowing)
        self.assertTrue(data.startswith(logged), "the log is not a prefix of the output")
        for index, (viewer, (code, reason)) in enumerate(zip(viewers, closes)):
            self.assertEqual(code, 4001, f"viewer {index}: {reason}")
            self.assertIn("hung up", reason or "")
            self.assertEqual(
                len(viewer.received), len(logged),
                f"viewer {index} got {len(viewer.received)} of the {len(logged)} bytes read",
            )
            self.assertTrue(viewer.received == logged, f"viewer {index}: bytes differ")
        self.assertEqual(status, 2)
        self.assertEqual(server.count(b"exiting with status 2"), 1, server.stderr.decode())
        self.assert_clean_log(server)

    # -- the log file ---------------------------------------------------------------------

    async def test_log_disk_full(self) -> None:
        """
        The log file is /dev/full (every write fails with ENOSPC): clients still get all
        output, the failure is logged once however many writes fail, no traceback, and
        SIGTERM still exits 0.
        """
        server = await self.start(log_file="/dev/full")
        (viewer,) = await self.viewers(1)
        data = stream(5 * 4096, seed=2)
        for piece in range(5):
            # Wait for each piece, so each is a separate write to the log.
            await self.guest.write(data[piece * 4096 : (piece + 1) * 4096])
            await viewer.wait_bytes((piece + 1) * 4096)
            if piece == 0:
                await server.log_line(lambda err: b"cannot write log file" in err)
        self.assertEqual(bytes(viewer.received), data)
        server.signal("TERM")
        self.assertEqual(await server.ended, 0)
        self.assertEqual(server.count(b"cannot write log file"), 1, server.stderr.decode())
        self.assert_clean_log(server)

    async def test_sighup_when_log_directory_gone(self) -> None:
        """
        SIGHUP after the log's directory was moved away: the reopen fails, is logged, and
        the old file keeps receiving output; a SIGHUP once the directory is back opens the
        new file, which then gets what follows.
        """
        directory = Path(os.path.abspath(self.mktemp()))
        directory.mkdir()
        log_path = directory / "console.log"
        server = await self.start(log_file=str(log_path))
        (viewer,) = await self.viewers(1)
        await self.guest.write(b"before\r\n")
        await viewer.wait_bytes(8)
        moved = directory.with_name(directory.name + ".old")
        directory.rename(moved)
        server.signal("HUP")
        await server.log_line(lambda err: b"log file not reopened" in err)
        await self.guest.write(b"while gone\r\n")
        await viewer.wait_bytes(8 + 12)
        directory.mkdir()
        server.signal("HUP")
        await server.log_line(lambda err: b"reopened" in err.split(b"not reopened")[-1])
        await self.guest.write(b"after\r\n")
        await viewer.wait_bytes(8 + 12 + 7)
        server.signal("TERM")
        self.assertEqual(await server.ended, 0)
        self.assertEqual((moved / "console.log").read_bytes(), b"before\r\nwhile gone\r\n")
        self.assertEqual(log_path.read_bytes(), b"after\r\n")
        self.assert_clean_log(server)

    # -- clients --------------------------------------------------------------------------

    async def test_client_vanishes(self) -> None:
        """
        A client whose connection is aborted (no close frame) is detached at once
        ("client detached", two left), and the others keep receiving.
        """
        server = await self.start()
        viewers = await self.viewers(3)
        await server.log_line(lambda err: err.count(b"client attached") == 3)
        viewers[2].transport.abortConnection()
        await server.log_line(lambda err: b"client detached" in err)
        self.assertRegex(server.stderr.decode(), r"client detached at offset 0; 2 attached")
        data = stream(256 * 1024, seed=3)
        await self.guest.write(data)
        for viewer in viewers[:2]:
            await viewer.wait_bytes(len(data))
            self.assertTrue(viewer.received == data)
        server.signal("TERM")
        self.assertEqual(await server.ended, 0)
        self.assert_clean_log(server)

    async def test_sigterm_under_load(self) -> None:
        """
        SIGTERM while the guest writes continuously (as fast as the clients read) to three
        clients: each is closed with
        1001, the process exits 0 without a traceback, and the log file and what each
        client got are byte-exact prefixes of the output.
        """
        log_path = os.path.abspath(self.mktemp())
        server = await self.start(log_file=log_path)
        viewers = await self.viewers(3)
        data = stream(64 * MiB, seed=4)
        writing = defer.Deferred.fromCoroutine(paced_write(self.guest, data, viewers))
        writing.addErrback(lambda failure: None)  # ends when the clients are closed
        await viewers[0].wait_bytes(2 * MiB + 1)
        server.signal("TERM")
        closes = await defer.gatherResults([v.closed for v in viewers])
        self.assertEqual(await server.ended, 0)
        self.assertEqual([code for code, _ in closes], [1001] * 3, closes)
        logged = Path(log_path).read_bytes()
        log.msg(f"fault: SIGTERM under load: {len(logged)} bytes logged, clients got "
                f"{[len(v.received) for v in viewers]}, closes {closes}")
        self.assertGreaterEqual(len(logged), 2 * MiB)
        self.assertTrue(data.startswith(logged), "the log is not a prefix of the output")
        for index, viewer in enumerate(viewers):
            self.assertTrue(logged.startswith(bytes(viewer.received)), f"viewer {index}")
        self.assert_clean_log(server)

    async def test_stalled_client(self) -> None:
        """
        One client stops reading while 24 MiB are written (as fast as the other two read):
        they get every byte,
        the server's peak RSS grows by less than 20 MB, and once the stalled client reads
        again it gets a prefix of the output and then close 4000 "lagging".
        """
        server = await self.start()
        fast = await self.viewers(2)
        (stalled,) = await self.viewers(1)
        stalled.transport.pauseProducing()
        data = stream(25 * MiB, seed=5)
        warm_up = MiB
        await paced_write(self.guest, data[:warm_up], fast)
        baseline = rss_kib(server.pid)
        await paced_write(self.guest, data, fast, start=warm_up)
        peak = rss_kib(server.pid, "VmHWM")
        log.msg(f"fault: stalled client: RSS {baseline} KiB after warm-up, peak {peak} KiB")
        for index, viewer in enumerate(fast):
            self.assertTrue(viewer.received == data, f"fast viewer {index}: bytes differ")
        self.assertLess(peak - baseline, 20 * 1024, f"RSS {baseline} KiB -> peak {peak} KiB")
        self.assertIsNone(stalled.close_status)
        stalled.transport.resumeProducing()
        code, reason = await stalled.closed
        log.msg(f"fault: stalled client closed {code} {reason!r} after {len(stalled.received)} bytes")
        self.assertEqual(code, 4000, reason)
        self.assertTrue((reason or "").startswith("lagging"), reason)
        self.assertLess(len(stalled.received), len(data))
        self.assertTrue(data.startswith(bytes(stalled.received)), "the stalled client's bytes differ")
        server.signal("TERM")
        self.assertEqual(await server.ended, 0)
        self.assert_clean_log(server)

    async def test_input_flood_guest_not_reading(self) -> None:
        """
        A v1 client types 8 MiB while the guest reads nothing, beside an idle viewer,
        with pings every 0.5 s. Nobody's connection is held up: the typist's messages
        are all handled (its ping is answered), the viewer is still there four seconds
        later (eight ping intervals) and still gets output; at most the input backlog is held (RSS
        grows by less than 20 MB); every refused byte is reported to the typist as
        "input backlog full". Once the guest reads, what it gets is whole messages, in
        order, and with what was refused adds up to what was sent.
        """
        server = await self.start("--ping-interval", "0.5")
        baseline = rss_kib(server.pid)
        viewer = await connect_v1(self.port)
        typist = await connect_v1(self.port)
        for client in (viewer, typist):
            self.addCleanup(lambda c=client: None if c.close_status else c.transport.abortConnection())
        randomness = random.Random(6)
        messages = [randomness.randbytes(64 * 1024) for _ in range(128)]
        for message in messages:
            typist.type(message)
        typist.sendPing(b"all sent")
        await typist.wait_for(lambda c: b"all sent" in c.pongs)
        refusals = typist.events_of("input-discarded")
        self.assertTrue(refusals, "8 MiB of input was all taken by a guest that reads nothing")
        self.assertEqual({event["reason"] for event in refusals}, {"input backlog full"})
        refused = refusals[-1]["bytes"]
        accepted = len(messages) * 64 * 1024 - refused
        self.assertLessEqual(accepted, INPUT_BACKLOG + 256 * 1024)  # backlog + the pty's buffer
        peak = rss_kib(server.pid, "VmHWM")
        log.msg(f"fault: input flood: {accepted} bytes queued, {refused} refused; RSS "
                f"{baseline} KiB before, peak {peak} KiB")
        self.assertLess(peak - baseline, 20 * 1024, f"RSS {baseline} KiB -> peak {peak} KiB")
        # Longer than a silent peer may last (2 x 0.5 s), four times over: what is tested
        # is that nothing happens, so this waits on time itself, not on an event.
        await task.deferLater(reactor, 4.0, lambda: None)
        self.assertGreaterEqual(viewer.pings, 4)
        self.assertIsNone(viewer.close_status)
        self.assertIsNone(typist.close_status)
        await self.guest.write(b"output while input waits\r\n")
        await viewer.wait_text("output while input waits\r\n")
        # The guest reads again: the accepted messages arrive whole, in order.
        self.guest.start_reading()
        await self.guest.receives(lambda got: len(got) >= accepted)
        got = bytes(self.guest.input)
        self.assertEqual(len(got), accepted)
        position = 0
        for message in messages:
            if got[position : position + len(message)] == message:
                position += len(message)
        self.assertEqual(position, len(got), "the input arrived cut, altered or reordered")
        server.signal("TERM")
        self.assertEqual(await server.ended, 0)
        self.assert_clean_log(server)

    async def test_input_flood_original_protocol_closed(self) -> None:
        """
        The same flood from an original-protocol client (which has no words for a
        refusal), beside an original-protocol viewer: once its input does not fit the
        backlog, the typist alone is closed with code 4003 and a reason naming the
        refusal, instead of being left open and quiet while its input is dropped; the
        viewer stays open and still gets output.
        """
        server = await self.start()
        viewer = await connect_stream_viewer(self.port)
        typist = await connect_stream_viewer(self.port)
        for client in (viewer, typist):
            self.addCleanup(lambda c=client: None if c.close_status else c.transport.abortConnection())
        randomness = random.Random(7)
        for _ in range(128):
            typist.sendMessage(randomness.randbytes(64 * 1024), isBinary=True)
        code, reason = await typist.closed
        self.assertEqual(code, 4003)
        self.assertIn("input backlog full", reason or "")
        self.assertIsNone(viewer.close_status)
        before = len(viewer.received)
        await self.guest.write(b"output after the refusal\r\n")
        await viewer.wait_bytes(before + len(b"output after the refusal\r\n"))
        self.assertTrue(bytes(viewer.received).endswith(b"output after the refusal\r\n"))
        self.assertEqual(server.count(b"its input was refused (input backlog full)"), 1)
        server.signal("TERM")
        self.assertEqual(await server.ended, 0)
        self.assert_clean_log(server)

    async def test_many_clients_come_and_go(self) -> None:
        """
        A thousand clients connect, get the history and leave (half with a close frame,
        half by dropping the connection), ten at a time: every one is detached, the
        server's RSS after all of them is within 5 MB of what it was after the first
        hundred, and it still serves history and live output.
        """
        server = await self.start()
        history = stream(4096, seed=7)
        await self.guest.write(history)
        after_first_hundred = 0
        detached = 0
        for round_number in range(100):
            batch = await defer.gatherResults(
                [defer.Deferred.fromCoroutine(connect_stream_viewer(self.port)) for _ in range(10)]
            )
            await defer.gatherResults([v.wait_bytes(len(history)) for v in batch])
            for index, viewer in enumerate(batch):
                self.assertTrue(viewer.received == history)
                if index % 2:
                    viewer.sendClose(1000)
                else:
                    viewer.transport.abortConnection()
            await defer.gatherResults([v.closed for v in batch])
            detached += 10
            await server.log_line(lambda err, n=detached: err.count(b"client detached") >= n)
            if round_number == 9:
                after_first_hundred = rss_kib(server.pid)
        settled = rss_kib(server.pid)
        log.msg(f"fault: 1000 clients: RSS {after_first_hundred} KiB after 100, {settled} KiB after 1000")
        self.assertEqual(server.count(b"client detached"), 1000)
        last = [line for line in server.stderr.splitlines() if b"client detached" in line][-1]
        self.assertIn(b"client detached at offset 4096; 0 attached", last)
        self.assertLess(settled - after_first_hundred, 5 * 1024,
                        f"RSS {after_first_hundred} KiB after 100 clients, {settled} KiB after 1000")
        (viewer,) = await self.viewers(1)
        await viewer.wait_bytes(len(history))
        await self.guest.write(b"still serving\r\n")
        await viewer.wait_bytes(len(history) + 15)
        self.assertEqual(bytes(viewer.received), history + b"still serving\r\n")
        server.signal("TERM")
        self.assertEqual(await server.ended, 0)
        self.assert_clean_log(server)


@implementer(IPushProducer)
class Flood:
    """
    Sends binary input frames (64 KiB of random bytes each) on an upgraded raw connection
    as fast as its transport takes them, up to C{limit} bytes. L{stalled} fires once the
    transport has stayed paused for a whole second (the server stopped reading), or with
    the flood complete.
    """

    QUIET = 1.0

    def __init__(self, raw: RawClient, limit: int) -> None:
        self.transport: Any = raw.transport
        self.limit = limit
        self.sent = 0
        self.payload = bytearray()
        self.paused = False
        self.stalled: defer.Deferred[None] = defer.Deferred()
        self._random = random.Random(6)
        self._watchdog: Any = None

    def start(self) -> None:
        self.transport.registerProducer(self, True)
        self._send()

    def _send(self) -> None:
        while not self.paused and self.sent < self.limit:
            piece = self._random.randbytes(64 * 1024)
            self.payload += piece
            self.sent += len(piece)
            self.transport.write(ws_frame(OP_BINARY, piece))
        if self.sent >= self.limit:
            self._finish()

    def _finish(self) -> None:
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.cancel()
        if not self.stalled.called:
            self.transport.unregisterProducer()
            self.stalled.callback(None)

    def pauseProducing(self) -> None:
        self.paused = True
        if self._watchdog is None or not self._watchdog.active():
            self._watchdog = reactor.callLater(self.QUIET, self._finish)  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        if self.stalled.called:
            return
        self.paused = False
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.cancel()
        self._send()

    def stopProducing(self) -> None:
        self._finish()
