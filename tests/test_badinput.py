"""
Bad input against a real C{cloud-console} process: malformed WebSocket frames, garbage
instead of HTTP, odd paths and oversized headers, each sent as raw bytes over a plain TCP
connection.

Every test runs its own server on a real pty with a well-behaved viewer attached
throughout. After each bad input the viewer must still get live output and its input must
still reach the guest (and nothing of the bad input must), the server must still run, and
when it is stopped at the end it must exit 0 with no "Traceback" and no "Unhandled" in its
log.

Every wait is on a Deferred fired by an event (bytes received, a connection closed, a line
in the server's log, the process ending), never a sleep; the class timeout is a safety net.
What each bad input got (status line, or close code and reason) is logged to trial's
C{test.log} as C{bad input: ...} lines.
"""

from __future__ import annotations

import ssl
import struct
from typing import Any, Callable

from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.python import log
from twisted.trial.unittest import TestCase

from tests.helpers import OP_BINARY, OP_CLOSE, OP_TEXT, Frame, decode_frames, handshake
from tests.helpers import encode_frame as ws_frame
from tests.helpers import Guest, Server, free_port, serve_process
from tests.test_integration import Client

OP_CONTINUATION = 0x0

#: The server's default largest input message (ConsoleSettings.max_message_size).
MAX_MESSAGE = 1024 * 1024


# -- the guest's side of the pty ---------------------------------------------------------


# -- the server process -------------------------------------------------------------------


# -- clients ------------------------------------------------------------------------------


class Viewer(Client):
    """A well-behaved Autobahn client; its pending waits fail if it is closed."""

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        for _, d in self._waiters:
            d.errback(AssertionError(f"viewer closed ({code}, {reason!r}) while waiting"))
        self._waiters.clear()
        super().onClose(wasClean, code, reason)


async def connect_viewer(port: int, cls: type[Viewer] = Viewer) -> Viewer:
    factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}/ws")
    factory.protocol = cls
    viewer: Viewer = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    await viewer.opened
    return viewer


class RawClient(protocol.Protocol):
    """
    A plain TCP connection: sends bytes as given, collects what comes back, and fires
    Deferreds when a condition on it holds (or fails them when the connection ends first).
    """

    def __init__(self) -> None:
        self.received = bytearray()
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.is_lost = False
        self._waiters: list[tuple[Callable[[bytes], bool], defer.Deferred[bytes]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        for waiter in list(self._waiters):
            if waiter[0](bytes(self.received)):
                self._waiters.remove(waiter)
                waiter[1].callback(bytes(self.received))

    def connectionLost(self, reason: Any) -> None:
        self.is_lost = True
        for condition, d in self._waiters:
            d.errback(AssertionError(f"connection closed first; received {bytes(self.received)[:300]!r}"))
        self._waiters.clear()
        self.lost.callback(None)

    def wait_for(self, condition: Callable[[bytes], bool]) -> defer.Deferred[bytes]:
        d: defer.Deferred[bytes] = defer.Deferred()
        if condition(bytes(self.received)):
            d.callback(bytes(self.received))
        elif self.is_lost:
            d.errback(AssertionError(f"connection closed; received {bytes(self.received)[:300]!r}"))
        else:
            self._waiters.append((condition, d))
        return d

    def response_or_close(self) -> defer.Deferred[bytes]:
        """Fires with what came once a whole response head has, or the server closed."""
        d: defer.Deferred[bytes] = defer.Deferred()
        if b"\r\n\r\n" in self.received or self.is_lost:
            d.callback(bytes(self.received))
            return d
        head: defer.Deferred[bytes] = self.wait_for(lambda got: b"\r\n\r\n" in got)
        head.addErrback(lambda _: None)
        head.addCallback(lambda got: None if d.called else d.callback(bytes(self.received)))
        self.lost.addCallback(lambda _: None if d.called else d.callback(bytes(self.received)))
        return d

    @property
    def head(self) -> bytes:
        return bytes(self.received).partition(b"\r\n\r\n")[0]

    @property
    def status_line(self) -> str:
        return self.head.split(b"\r\n", 1)[0].decode("latin-1")

    def frames(self) -> list[Frame]:
        body = bytes(self.received).partition(b"\r\n\r\n")[2]
        return decode_frames(body)[0]

    async def close_frame(self) -> Frame | None:
        """
        Wait for the server's close frame; C{None} if it closed the connection without
        one.
        """

        def has_close(got: bytes) -> bool:
            return any(f.opcode == OP_CLOSE for f in decode_frames(got.partition(b"\r\n\r\n")[2])[0])

        try:
            await self.wait_for(has_close)
        except AssertionError:
            return None
        return [f for f in self.frames() if f.opcode == OP_CLOSE][0]


async def connect_raw(port: int) -> RawClient:
    factory = protocol.Factory.forProtocol(RawClient)
    client: RawClient = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    return client


def upgrade_request(path: str = "/ws", method: str = "GET", port: int = 8080,
                    extra: list[str] | None = None) -> bytes:
    """An upgrade request to the server on C{port}, with raw extra header lines."""
    return handshake(path=path, method=method, host=f"127.0.0.1:{port}", extra_lines=extra)


def tls_client_hello() -> bytes:
    """
    A real TLS ClientHello, as a browser sends to an https:// URL on the plain port. It
    never starts with an HTTP method, and rarely holds the CRLF that ends an HTTP line.
    """
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    assert hello[:1] == b"\x16", hello[:10]
    return hello


async def start_console(test: TestCase, *args: str, log_file: str | None = None) -> Server:
    """
    A guest (a real pty) and a cloud-console process serving it on a free port, killed at
    the test's end; sets C{test.guest} and C{test.port}, returns once it listens.
    """
    test.guest = Guest()  # type: ignore[attr-defined]
    test.addCleanup(test.guest.close)  # type: ignore[attr-defined]
    test.port = free_port()  # type: ignore[attr-defined]
    positional = [test.guest.path, "127.0.0.1", str(test.port)]  # type: ignore[attr-defined]
    if log_file is not None:
        positional.append(log_file)
    return await serve_process(test, [*positional, *args])


# -- the tests ----------------------------------------------------------------------------


class ServerUnderTest(TestCase):
    """
    Base: one server on a real pty per test, a viewer attached throughout, and checks that
    the server survived each bad input.
    """

    timeout = 30
    extra_args: list[str] = []

    async def start(self, *extra: str, log_file: str | None = None) -> None:
        self.server = await start_console(self, *self.extra_args, *extra, log_file=log_file)
        self.guest.start_reading()
        self.viewer = await connect_viewer(self.port)
        self.addCleanup(self.viewer.transport.abortConnection)  # type: ignore[union-attr]
        self.live_count = 0
        self.sent_input = bytearray()

    async def assert_alive(self) -> None:
        """
        The viewer still gets live output, its input still reaches the guest, and the guest
        has received nothing but the viewer's input (none of the bad input); the server is
        running.
        """
        self.live_count += 1
        out = f"live output {self.live_count}\r\n".encode()
        await self.guest.write(out)
        await self.viewer.wait_for(lambda got: got.endswith(out))
        typed = f"typed {self.live_count}\r".encode()
        self.sent_input += typed
        self.viewer.sendMessage(typed, isBinary=True)
        await self.guest.receives(lambda got: got.endswith(typed))
        self.assertEqual(bytes(self.guest.input), bytes(self.sent_input))
        self.assertIsNone(self.server.status, "the server exited")
        self.assertFalse(self.viewer.closed.called, "the viewer was closed")

    async def stop_cleanly(self) -> None:
        """SIGTERM: exit 0, and the whole log is free of tracebacks and unhandled errors."""
        self.assertIsNone(self.server.status, "the server exited")
        self.server.signal("TERM")
        status = await self.server.ended
        self.assertNotIn(b"Traceback", self.server.stderr, self.server.stderr.decode(errors="replace"))
        self.assertNotIn(b"Unhandled", self.server.stderr, self.server.stderr.decode(errors="replace"))
        self.assertEqual(status, 0, self.server.stderr.decode(errors="replace"))

    def record(self, what: str, got: str) -> None:
        log.msg(f"bad input: {what}: {got}")

    async def upgraded(self) -> RawClient:
        """A raw connection upgraded to a WebSocket (original protocol) on /ws."""
        raw = await connect_raw(self.port)
        self.addCleanup(lambda: None if raw.is_lost else raw.transport.abortConnection())  # type: ignore[union-attr]
        raw.transport.write(upgrade_request(port=self.port))  # type: ignore[union-attr]
        await raw.wait_for(lambda got: b"\r\n\r\n" in got)
        self.assertTrue(raw.status_line.startswith("HTTP/1.1 101"), raw.status_line)
        return raw

    async def closed_with(self, raw: RawClient, what: str) -> Frame:
        """The server's close frame, recorded; the connection is then dropped."""
        frame = await raw.close_frame()
        self.assertIsNotNone(frame, f"{what}: the connection closed without a close frame")
        assert frame is not None
        self.record(what, f"close {frame.close_code} {frame.close_reason!r}")
        raw.transport.loseConnection()  # type: ignore[union-attr]
        return frame

    async def http(self, request: bytes, what: str, deadline: float | None = None) -> RawClient:
        """
        Send C{request} on a fresh connection; wait for a response head or a close (for
        at most C{deadline} seconds, if given: then the test fails).
        """
        raw = await connect_raw(self.port)
        self.addCleanup(lambda: None if raw.is_lost else raw.transport.abortConnection())  # type: ignore[union-attr]
        raw.transport.write(request)  # type: ignore[union-attr]
        answered = raw.response_or_close()
        if deadline is not None:
            answered.addTimeout(deadline, reactor)
        try:
            await answered
        except defer.TimeoutError:
            self.record(what, f"no response and still open after {deadline} s")
            self.fail(f"{what}: no response and the connection still open after {deadline} s")
        self.record(what, raw.status_line or "closed without a response")
        return raw


class WebSocketFrameTests(ServerUnderTest):
    """Malformed and abusive WebSocket frames on an upgraded connection."""

    async def test_invalid_utf8_text(self) -> None:
        """
        A text message that is not UTF-8 (the original protocol writes text as input) is
        refused with close code 1007 and nothing of it is written to the pty.
        """
        await self.start()
        raw = await self.upgraded()
        raw.transport.write(ws_frame(OP_TEXT, b"ok \xc3\x28 \xff\xfe bad"))  # type: ignore[union-attr]
        frame = await self.closed_with(raw, "text message with invalid UTF-8")
        self.assertEqual(frame.close_code, 1007)
        await self.assert_alive()
        await self.stop_cleanly()

    async def test_invalid_utf8_split_across_fragments(self) -> None:
        """
        A text message whose UTF-8 sequence is cut by a fragment boundary is valid; one
        whose second fragment continues it wrongly is refused with 1007, and nothing of
        either fragment reaches the pty.
        """
        await self.start()
        raw = await self.upgraded()
        raw.transport.write(ws_frame(OP_TEXT, b"half \xc3", fin=False))  # type: ignore[union-attr]
        raw.transport.write(ws_frame(OP_CONTINUATION, b"\x28 not a continuation"))  # type: ignore[union-attr]
        frame = await self.closed_with(raw, "fragmented text, invalid UTF-8 across the boundary")
        self.assertEqual(frame.close_code, 1007)
        await self.assert_alive()
        await self.stop_cleanly()

    async def test_oversize_message(self) -> None:
        """
        A message over 1 MiB (the default limit) is refused with 1009 and none of it
        reaches the pty.
        """
        await self.start()
        raw = await self.upgraded()
        raw.transport.write(ws_frame(OP_BINARY, b"A" * (MAX_MESSAGE + 1)))  # type: ignore[union-attr]
        frame = await self.closed_with(raw, "one binary frame of 1 MiB + 1")
        self.assertEqual(frame.close_code, 1009)
        await self.assert_alive()
        await self.stop_cleanly()

    async def test_oversize_announced_only(self) -> None:
        """
        A frame header announcing 2**62 bytes is refused with 1009 at once, without
        waiting for (or reserving room for) the payload.
        """
        await self.start()
        raw = await self.upgraded()
        raw.transport.write(ws_frame(OP_BINARY, b"", length=2**62))  # type: ignore[union-attr]
        frame = await self.closed_with(raw, "a frame header announcing 2**62 bytes")
        self.assertEqual(frame.close_code, 1009)
        await self.assert_alive()
        await self.stop_cleanly()

    async def test_unmasked_frame(self) -> None:
        """An unmasked client frame is a protocol error: close 1002, nothing to the pty."""
        await self.start()
        raw = await self.upgraded()
        raw.transport.write(ws_frame(OP_BINARY, b"unmasked input\r", mask=False))  # type: ignore[union-attr]
        frame = await self.closed_with(raw, "an unmasked binary frame")
        self.assertEqual(frame.close_code, 1002)
        await self.assert_alive()
        await self.stop_cleanly()

    async def test_unknown_opcodes(self) -> None:
        """Reserved opcodes (0x3 data, 0xB control) are protocol errors: close 1002."""
        await self.start()
        for opcode in (0x3, 0xB):
            raw = await self.upgraded()
            raw.transport.write(ws_frame(opcode, b"reserved\r"))  # type: ignore[union-attr]
            frame = await self.closed_with(raw, f"opcode {opcode:#x}")
            self.assertEqual(frame.close_code, 1002, f"opcode {opcode:#x}")
            await self.assert_alive()
        await self.stop_cleanly()

    async def test_reserved_bits(self) -> None:
        """A frame with RSV1-3 set (no extension was agreed) is a protocol error: 1002."""
        await self.start()
        raw = await self.upgraded()
        frame_bytes = bytearray(ws_frame(OP_BINARY, b"rsv\r"))
        frame_bytes[0] |= 0x70
        raw.transport.write(bytes(frame_bytes))  # type: ignore[union-attr]
        frame = await self.closed_with(raw, "RSV1-3 set")
        self.assertEqual(frame.close_code, 1002)
        await self.assert_alive()
        await self.stop_cleanly()

    async def test_fragmented_message_never_ends(self) -> None:
        """
        A first fragment without FIN, then silence: nothing reaches the pty and the other
        client is not held up. Continuation frames past the 1 MiB limit then get 1009.
        """
        await self.start()
        raw = await self.upgraded()
        raw.transport.write(ws_frame(OP_BINARY, b"first fragment\r", fin=False))  # type: ignore[union-attr]
        # The unfinished message holds nothing up: the viewer's output and input flow.
        await self.assert_alive()
        await self.assert_alive()
        self.assertFalse(raw.is_lost)
        piece = b"B" * (64 * 1024)
        for _ in range(MAX_MESSAGE // len(piece) + 1):
            raw.transport.write(ws_frame(OP_CONTINUATION, piece, fin=False))  # type: ignore[union-attr]
        frame = await self.closed_with(raw, "continuation frames past 1 MiB, never FIN")
        self.assertEqual(frame.close_code, 1009)
        await self.assert_alive()
        await self.stop_cleanly()

    async def test_continuation_without_start(self) -> None:
        """A continuation frame with no message to continue is a protocol error: 1002."""
        await self.start()
        raw = await self.upgraded()
        raw.transport.write(ws_frame(OP_CONTINUATION, b"orphan\r"))  # type: ignore[union-attr]
        frame = await self.closed_with(raw, "a continuation frame with no message started")
        self.assertEqual(frame.close_code, 1002)
        await self.assert_alive()
        await self.stop_cleanly()

    async def test_fragmented_control_frame(self) -> None:
        """A ping without FIN (control frames must not be fragmented) gets 1002."""
        await self.start()
        raw = await self.upgraded()
        raw.transport.write(ws_frame(0x9, b"ping", fin=False))  # type: ignore[union-attr]
        frame = await self.closed_with(raw, "a fragmented ping")
        self.assertEqual(frame.close_code, 1002)
        await self.assert_alive()
        await self.stop_cleanly()

    async def test_bad_close_frames(self) -> None:
        """
        Close frames with a 1-byte payload, an invalid code (999) or a reason that is not
        UTF-8 are answered with a close (1002, or 1007 for the reason), without a crash.
        """
        await self.start()
        cases = [
            (b"\x03", "a close frame with a 1-byte payload", {1002}),
            (struct.pack("!H", 999), "close code 999", {1002}),
            (struct.pack("!H", 1000) + b"\xff\xfe", "close reason not UTF-8", {1007}),
        ]
        for payload, what, codes in cases:
            raw = await self.upgraded()
            raw.transport.write(ws_frame(OP_CLOSE, payload))  # type: ignore[union-attr]
            frame = await raw.close_frame()
            if frame is None:
                self.record(what, "connection closed without a close frame")
            else:
                self.record(what, f"close {frame.close_code} {frame.close_reason!r}")
                self.assertIn(frame.close_code, codes, what)
            await raw.lost
            await self.assert_alive()
        await self.stop_cleanly()


class HttpTests(ServerUnderTest):
    """Garbage instead of HTTP, wrong upgrades, path traversal and oversized headers."""

    async def test_random_bytes(self) -> None:
        """
        Binary garbage with line ends instead of a request, starting with a non-letter or
        with a letter (past a first-byte check, into the HTTP parser): 400, or closed.
        """
        await self.start()
        tail = bytes(range(256)) * 4 + b"\r\n\r\n"
        for what, garbage in (("binary garbage", tail), ("a letter, then binary garbage", b"G" + tail),
                              ("a request line of garbage", b"HELLO \x00\xff there\r\n\r\n")):
            raw = await self.http(garbage, what)
            self.assertTrue(raw.status_line.startswith("HTTP/1.1 400") or not raw.received,
                            raw.status_line)
            await raw.lost
            await self.assert_alive()
        await self.stop_cleanly()

    async def test_tls_client_hello(self) -> None:
        """
        A TLS ClientHello on the plain port (a browser sent to https://) gets a 400 or a
        close promptly (within 5 s), not a connection held open until the request timeout.
        """
        await self.start()
        raw = await self.http(tls_client_hello(), "TLS ClientHello", deadline=5)
        self.assertTrue(raw.status_line.startswith("HTTP/1.1 400") or not raw.received,
                        raw.status_line)
        await raw.lost
        await self.assert_alive()
        await self.stop_cleanly()

    async def test_partial_request_then_eof(self) -> None:
        """
        Half a request line, then the client half-closes: the server closes the connection
        without a crash.
        """
        await self.start()
        raw = await connect_raw(self.port)
        raw.transport.write(b"GET /ws HTT")  # type: ignore[union-attr]
        raw.transport.loseWriteConnection()  # type: ignore[union-attr]
        await raw.lost
        self.record("half a request line, then EOF", raw.status_line or "closed without a response")
        self.assertTrue(raw.status_line.startswith("HTTP/1.1 400") or not raw.received)
        await self.assert_alive()
        await self.stop_cleanly()

    async def test_upgrade_on_wrong_path(self) -> None:
        """An upgrade request for /wrong is a 404, not a WebSocket."""
        await self.start()
        raw = await self.http(upgrade_request("/wrong", port=self.port), "upgrade on /wrong")
        self.assertTrue(raw.status_line.startswith("HTTP/1.1 404"), raw.status_line)
        self.assertNotIn(b"sec-websocket-accept", raw.head.lower())
        await self.assert_alive()
        await self.stop_cleanly()

    async def test_post_upgrade(self) -> None:
        """An upgrade by POST on /ws is refused with a 4xx and no upgrade."""
        await self.start()
        raw = await self.http(
            upgrade_request("/ws", method="POST", port=self.port, extra=["Content-Length: 0"]),
            "POST /ws with upgrade headers",
        )
        self.assertRegex(raw.status_line, r"^HTTP/1\.1 4\d\d")
        self.assertNotIn(b"sec-websocket-accept", raw.head.lower())
        await self.assert_alive()
        await self.stop_cleanly()

    async def test_path_traversal(self) -> None:
        """
        Traversal out of the static directory, plain or encoded, is a 404 (or 400), never
        the file's contents.
        """
        await self.start()
        for path in ("/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/..%2f..%2fetc/passwd",
                     "/static/..%252f..", "/fonts/..%2f..%2f..%2f..%2fetc%2fpasswd",
                     "/%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd", "//etc/passwd"):
            request = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
            raw = await self.http(request, f"GET {path}")
            await raw.lost
            self.assertRegex(raw.status_line, r"^HTTP/1\.1 40[04]", path)
            self.assertNotIn(b"root:", bytes(raw.received), path)
            await self.assert_alive()
        await self.stop_cleanly()

    async def test_path_not_utf8(self) -> None:
        """
        A path segment that is not UTF-8 (C{/%ff}) is a 404, logged without a traceback
        (a stranger must not be able to fill the log with stack traces).
        """
        await self.start()
        raw = await self.http(b"GET /%ff%fe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                              "GET /%ff%fe")
        await raw.lost
        self.assertRegex(raw.status_line, r"^HTTP/1\.1 40[04]")
        await self.assert_alive()
        await self.stop_cleanly()

    async def test_long_header_line(self) -> None:
        """A 100 KB header line: 4xx or closed, no crash."""
        await self.start()
        request = (b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 100_000 + b"\r\n\r\n")
        raw = await self.http(request, "a 100 KB header line")
        self.assertTrue(raw.status_line.startswith("HTTP/1.1 4") or not raw.received,
                        raw.status_line)
        await raw.lost
        await self.assert_alive()
        await self.stop_cleanly()

    async def test_many_headers(self) -> None:
        """Ten thousand small headers: 4xx or closed, no crash."""
        await self.start()
        headers = b"".join(b"X-H%d: v\r\n" % i for i in range(10_000))
        raw = await self.http(b"GET / HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n", "10,000 headers")
        self.assertTrue(raw.status_line.startswith("HTTP/1.1 4") or not raw.received,
                        raw.status_line)
        await raw.lost
        await self.assert_alive()
        await self.stop_cleanly()

    async def test_long_upgrade_header(self) -> None:
        """An upgrade with a 100 KB Sec-WebSocket-Protocol header: 4xx or closed, no upgrade."""
        await self.start()
        raw = await self.http(
            upgrade_request(port=self.port, extra=["Sec-WebSocket-Protocol: " + "p," * 50_000]),
            "upgrade with a 100 KB Sec-WebSocket-Protocol",
        )
        self.assertTrue(raw.status_line.startswith("HTTP/1.1 4") or not raw.received,
                        raw.status_line)
        await raw.lost
        await self.assert_alive()
        await self.stop_cleanly()
