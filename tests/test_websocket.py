"""
Tests for L{cloud_console.web.websocket} and L{cloud_console.web.site} over StringTransports: the
original protocol, the v1 subprotocol, flow control and framing.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from cloud_console.console.inputpath import INPUT_BACKLOG
from cloud_console.console.multiplexer import Multiplexer, skip_marker
from cloud_console.web.site import build_site
from cloud_console.web.websocket import (
    INTERACTIVE_OUTPUT,
    SUBPROTOCOL_V1,
    ConsoleSettings,
    _TransportFlow,
)

from .helpers import OP_BINARY, OP_CLOSE, OP_TEXT, FakePty, Frame, WebClient, use_memory_reactor


def v1_data(frames: list[Frame]) -> list[tuple[int, bytes]]:
    """(offset, bytes) of each v1 output frame."""
    return [
        (struct.unpack("!Q", f.payload[:8])[0], f.payload[8:])
        for f in frames
        if f.opcode == OP_BINARY
    ]


def v1_events(frames: list[Frame], times: bool = False) -> list[dict[str, Any]]:
    """The v1 status events, without the C{times} ones unless asked."""
    events = [f.json() for f in frames if f.opcode == OP_TEXT]
    return events if times else [e for e in events if e["type"] != "times"]


class SiteTestCase(SynchronousTestCase):
    """A multiplexer with a fake pty, its site, and clients on StringTransports."""

    history_size = 1000

    def setUp(self) -> None:
        self.reactor = use_memory_reactor(self)
        self.multiplexer = Multiplexer(self.history_size)
        self.pty = FakePty()
        self.multiplexer.console_up(self.pty)
        self.settings = ConsoleSettings(title="test console", client_buffer=4096, ack_window=2000)
        self.site, self.factory = build_site(self.multiplexer, self.settings, self.mktemp())
        # HTTP channel timeouts go on the memory reactor, not the global one.
        self.site.reactor = self.reactor
        self._ports = iter(range(40000, 50000))

    def client(self, **upgrade: Any) -> WebClient:
        client = WebClient(self.site, next(self._ports))
        response = client.upgrade(**upgrade)
        self.assertIn(b"101 Switching Protocols", response)
        return client


class OriginalProtocolTests(SiteTestCase):
    """A client that asks for no subprotocol gets the original protocol."""

    def test_history_then_live(self) -> None:
        """History first, exactly what was written (no NUL padding), then live output."""
        self.multiplexer.output_received(b"boot log\r\n")
        client = self.client()
        self.assertNotIn(b"Sec-WebSocket-Protocol", client.response)
        frames = client.frames()
        self.assertEqual([f.opcode for f in frames], [OP_BINARY])
        self.assertEqual(frames[0].payload, b"boot log\r\n")
        self.multiplexer.output_received(b"login: ")
        self.assertEqual(client.output(), b"login: ")

    def test_empty_history_sends_nothing(self) -> None:
        """With nothing written yet, a new client gets no message at all (no padding)."""
        client = self.client()
        self.assertEqual(client.frames(), [])

    def test_input_text_and_binary(self) -> None:
        """Binary input is written as is; text input as UTF-8."""
        client = self.client()
        client.send(OP_BINARY, b"\x03\x00\xff")
        client.send(OP_TEXT, "é\r".encode("utf-8"))
        self.assertEqual(bytes(self.pty.written), b"\x03\x00\xff" + "é\r".encode("utf-8"))

    def test_shared_frame(self) -> None:
        """
        Each chunk is framed once and the same bytes go to every client: prepareMessage is
        called once per chunk, however many clients.
        """
        clients = [self.client() for _ in range(5)]
        calls = []
        original = self.factory.prepareMessage

        def counting(payload: bytes, isBinary: bool = False, doNotCompress: bool = False) -> Any:
            calls.append(payload)
            return original(payload, isBinary, doNotCompress)

        self.factory.prepareMessage = counting  # type: ignore[method-assign]
        self.multiplexer.output_received(b"fan out")
        self.assertEqual(len(calls), 1)
        outputs = {c.transport.value() for c in clients}
        self.assertEqual(len(outputs), 1)
        self.assertEqual(clients[0].output(), b"fan out")

    def test_transport_producer_is_ours(self) -> None:
        """
        After the upgrade, twisted.web's channel no longer holds the transport's producer
        slot: ours does, so the transport can pause the client.
        """
        client = self.client()
        self.assertIsInstance(client.transport.producer, _TransportFlow)
        self.assertTrue(client.transport.streaming)

    def test_slow_client_paused_then_catches_up(self) -> None:
        """
        A paused client is written nothing more; the others carry on; on resume it gets
        exactly what it missed, in order.
        """
        slow, fast = self.client(), self.client()
        slow.transport.producer.pauseProducing()
        self.multiplexer.output_received(b"a" * 300)
        self.multiplexer.output_received(b"b" * 300)
        self.assertEqual(slow.transport.value(), b"")
        self.assertEqual(fast.output(), b"a" * 300 + b"b" * 300)
        slow.transport.producer.resumeProducing()
        self.assertEqual(slow.output(), b"a" * 300 + b"b" * 300)

    def test_slow_client_memory_bounded(self) -> None:
        """
        However much is written while a client is paused, nothing is queued for it: the
        only thing it holds is its cursor.
        """
        slow = self.client()
        slow.transport.producer.pauseProducing()
        for _ in range(1000):
            self.multiplexer.output_received(b"x" * 1000)
        self.assertEqual(len(slow.transport.value()), 0)
        attachment = slow.protocol.attachment
        self.assertEqual(attachment.cursor, 0)
        self.assertTrue(attachment.paused)

    def test_lagging_client_closed(self) -> None:
        """
        A client that fell further behind than the history holds is closed with code 4000
        and a reason saying how much it lost, so it reconnects and repaints.
        """
        slow = self.client()
        slow.transport.producer.pauseProducing()
        self.multiplexer.output_received(b"x" * 1500)
        slow.transport.producer.resumeProducing()
        frames = slow.frames()
        self.assertEqual(frames[-1].opcode, OP_CLOSE)
        self.assertEqual(frames[-1].close_code, 4000)
        self.assertIn("lagging", frames[-1].close_reason)
        self.assertIn("500", frames[-1].close_reason)
        self.assertEqual([f for f in frames if f.opcode == OP_BINARY], [])
        self.assertIsNone(slow.protocol.attachment)

    def test_console_closed(self) -> None:
        """When the pty goes away every client gets close code 4001 with the reason."""
        client = self.client()
        self.multiplexer.console_lost("pty /dev/pts/9 hung up")
        frames = client.frames()
        self.assertEqual(frames[-1].close_code, 4001)
        self.assertIn("hung up", frames[-1].close_reason)

    def test_guest_not_reading_pauses_nobody(self) -> None:
        """
        A guest that does not read its input never pauses a connection: the typist's
        excess is refused, and an idle viewer keeps being read (its pongs and close
        frames flow) and keeps receiving output.
        """
        typist = self.client()
        viewer = self.client()
        self.pty.pending_input = INPUT_BACKLOG
        typist.send(OP_BINARY, b"more")
        self.assertEqual(bytes(self.pty.written), b"")
        for client in (typist, viewer):
            self.assertEqual(client.transport.producerState, "producing")
        self.multiplexer.output_received(b"output")
        self.assertEqual(viewer.output(), b"output")

    def test_refused_input_closes_the_typist_alone(self) -> None:
        """
        The original protocol cannot say that input was refused: a client whose input
        does not fit the backlog is closed with code 4003 and the reason, and nothing
        of it reaches the pty; a viewer beside it stays attached and gets output.
        """
        typist = self.client()
        viewer = self.client()
        typist.frames()
        self.pty.pending_input = INPUT_BACKLOG - 2
        typist.send(OP_BINARY, b"ok")
        self.assertEqual(bytes(self.pty.written), b"ok")
        self.assertEqual(typist.frames(), [])
        self.pty.pending_input = INPUT_BACKLOG
        typist.send(OP_BINARY, b"more")
        self.assertEqual(bytes(self.pty.written), b"ok")
        frames = typist.frames()
        self.assertEqual(frames[-1].close_code, 4003)
        self.assertIn("input backlog full", frames[-1].close_reason)
        self.assertIn("4 bytes", frames[-1].close_reason)
        self.assertIsNone(typist.protocol.attachment)
        self.assertEqual(self.multiplexer.viewer_count, 1)
        self.multiplexer.output_received(b"output")
        self.assertEqual(viewer.output(), b"output")
        self.assertEqual(typist.frames(), [])

    def test_read_only_input_stays_silent(self) -> None:
        """Input refused as read-only does not close an original-protocol client."""
        self.multiplexer.read_only = True
        client = self.client()
        client.send(OP_BINARY, b"ls")
        self.assertEqual([f.opcode for f in client.frames()], [])
        self.multiplexer.output_received(b"output")
        self.assertEqual(client.output(), b"output")

    def test_oversize_message_refused(self) -> None:
        """An input message over the limit closes the connection; nothing reaches the pty."""
        self.settings.max_message_size = 1000
        self.site, self.factory = build_site(self.multiplexer, self.settings, self.mktemp())
        self.site.reactor = self.reactor
        client = self.client()
        client.send(OP_BINARY, b"q" * 2000)
        self.assertEqual(bytes(self.pty.written), b"")
        frames = client.frames()
        self.assertEqual(frames[-1].opcode, OP_CLOSE)
        self.assertEqual(frames[-1].close_code, 1009)
        self.assertIsNone(client.protocol.attachment)


class V1ProtocolTests(SiteTestCase):
    """The cloud-console.v1 subprotocol: offsets, acks, resume, status events."""

    def test_hello_then_offsets(self) -> None:
        """The hello comes first; each output message carries the offset of its first byte."""
        self.multiplexer.output_received(b"0123456789")
        client = self.client(protocols=[SUBPROTOCOL_V1])
        self.assertIn(b"Sec-WebSocket-Protocol: cloud-console.v1", client.response)
        frames = client.frames()
        hello = frames[0].json()
        self.assertEqual(hello["type"], "hello")
        self.assertEqual(hello["title"], "test console")
        self.assertEqual(hello["session"], self.multiplexer.session)
        self.assertEqual(
            (hello["offset"], hello["historyStart"], hello["historyEnd"]), (0, 0, 10)
        )
        self.assertEqual(v1_data(frames), [(0, b"0123456789")])
        self.multiplexer.output_received(b"abc")
        self.assertEqual(v1_data(client.frames()), [(10, b"abc")])

    def test_original_and_v1_share_output(self) -> None:
        """An original client and a v1 client each get the chunk in their own framing."""
        plain = self.client()
        v1 = self.client(protocols=[SUBPROTOCOL_V1])
        v1.frames()
        self.multiplexer.output_received(b"both")
        self.assertEqual(plain.output(), b"both")
        self.assertEqual(v1_data(v1.frames()), [(0, b"both")])

    def test_resume_exactly_after_offset(self) -> None:
        """A client resuming this session from offset N gets exactly the bytes from N on."""
        self.multiplexer.output_received(b"0123456789")
        session = self.multiplexer.session
        client = self.client(protocols=[SUBPROTOCOL_V1], path=f"/ws?from=4&session={session}")
        frames = client.frames()
        self.assertEqual(frames[0].json()["offset"], 4)
        self.assertEqual(v1_data(frames), [(4, b"456789")])
        self.assertEqual([e["type"] for e in v1_events(frames)], ["hello", "clients"])

    def test_resume_after_gap(self) -> None:
        """Resuming from an offset that left the history: a gap notice, then the history."""
        self.multiplexer.output_received(b"x" * 1500)
        client = self.client(protocols=[SUBPROTOCOL_V1], path="/ws?from=100")
        frames = client.frames()
        gaps = [e for e in v1_events(frames) if e["type"] == "gap"]
        self.assertEqual(gaps, [{"type": "gap", "reason": "resume", "lost": 400, "from": 100, "to": 500}])
        self.assertEqual(v1_data(frames), [(500, b"x" * 1000)])

    def test_resume_other_session_resets(self) -> None:
        """Offsets from another run of the server (a restart) mean a reset and the history."""
        self.multiplexer.output_received(b"fresh")
        client = self.client(protocols=[SUBPROTOCOL_V1], path="/ws?from=3&session=0000")
        frames = client.frames()
        gap = [e for e in v1_events(frames) if e["type"] == "gap"][0]
        self.assertEqual(gap["reason"], "restart")
        self.assertEqual(v1_data(frames), [(0, b"fresh")])

    def test_bad_resume_offset_refused(self) -> None:
        """A 'from' that is not a non-negative integer is refused at the upgrade (400)."""
        client = WebClient(self.site, 1)
        response = client.upgrade(protocols=[SUBPROTOCOL_V1], path="/ws?from=-3")
        self.assertIn(b"400", response.split(b"\r\n")[0])

    def test_ack_window(self) -> None:
        """
        Past ack_window unacknowledged bytes the client is paused; an ack that brings it
        under half the window resumes it and it catches up from the history.
        """
        client = self.client(protocols=[SUBPROTOCOL_V1])
        client.frames()
        for _ in range(3):
            self.multiplexer.output_received(b"w" * 900)
        self.multiplexer.output_received(b"W" * 500)
        got = v1_data(client.frames())
        sent = sum(len(data) for _, data in got)
        self.assertEqual(sent, 2700)  # paused once more than 2000 were unacknowledged
        self.assertEqual(client.protocol.attachment.pause_reasons, {"acks"})
        client.send(OP_TEXT, b'{"type": "ack", "offset": 1000}')
        self.assertEqual(v1_data(client.frames()), [])  # 1700 unacked: still above half
        client.send(OP_TEXT, b'{"type": "ack", "offset": 2700}')
        self.assertEqual(v1_data(client.frames()), [(2700, b"W" * 500)])

    def test_ack_window_across_a_gap(self) -> None:
        """
        Bytes sent before a gap still count as unacknowledged after it (the page has yet
        to render them); only the skipped range is not owed an ack.
        """
        client = self.client(protocols=[SUBPROTOCOL_V1])
        client.frames()
        self.multiplexer.output_received(b"a" * 900)  # sent, not acknowledged
        self.assertEqual(v1_data(client.frames()), [(0, b"a" * 900)])
        client.transport.producer.pauseProducing()
        self.multiplexer.output_received(b"b" * 1500)  # [900, 2400): 400 lost, history 1000
        client.transport.producer.resumeProducing()
        frames = client.frames()
        self.assertEqual([e["type"] for e in v1_events(frames)], ["gap"])
        # 900 before the gap + 1000 of history = 1900 unacknowledged: not over 2000 yet.
        self.assertEqual(v1_data(frames), [(1400, b"b" * 1000)])
        self.multiplexer.output_received(b"c" * 200)
        self.assertEqual(v1_data(client.frames()), [(2400, b"c" * 200)])
        self.assertEqual(client.protocol.attachment.pause_reasons, {"acks"})
        # Acknowledging everything before the gap brings it to 1200: still paused
        # (over half the window); acknowledging past the gap resumes it.
        client.send(OP_TEXT, b'{"type": "ack", "offset": 900}')
        self.assertEqual(client.protocol.attachment.pause_reasons, {"acks"})
        client.send(OP_TEXT, b'{"type": "ack", "offset": 2000}')
        self.assertEqual(client.protocol.attachment.pause_reasons, set())

    def test_ack_cannot_run_ahead(self) -> None:
        """An ack past what was sent counts only what was sent."""
        client = self.client(protocols=[SUBPROTOCOL_V1])
        self.multiplexer.output_received(b"v" * 100)
        client.send(OP_TEXT, b'{"type": "ack", "offset": 99999}')
        self.assertEqual(client.protocol.dialect.acked, 100)

    def test_lagging_gap_not_close(self) -> None:
        """A v1 client that fell out of the history gets a gap notice and carries on."""
        client = self.client(protocols=[SUBPROTOCOL_V1])
        client.frames()
        client.transport.producer.pauseProducing()
        self.multiplexer.output_received(b"y" * 1700)
        client.transport.producer.resumeProducing()
        frames = client.frames()
        gap = [e for e in v1_events(frames) if e["type"] == "gap"]
        self.assertEqual(gap, [{"type": "gap", "reason": "lagging", "lost": 700, "from": 0, "to": 700}])
        self.assertEqual(v1_data(frames)[0][0], 700)
        self.assertNotIn(OP_CLOSE, [f.opcode for f in frames])

    def test_clients_count(self) -> None:
        """Viewers hear how many are watching as others come and go."""
        first = self.client(protocols=[SUBPROTOCOL_V1])
        self.assertEqual(first.frames()[0].json()["clients"], 1)
        second = self.client()
        counts = [e["count"] for e in v1_events(first.frames()) if e["type"] == "clients"]
        self.assertEqual(counts, [2])
        second.protocol.transport.loseConnection()
        second.protocol.connectionLost(Failure(ConnectionDone()))
        counts = [e["count"] for e in v1_events(first.frames()) if e["type"] == "clients"]
        self.assertEqual(counts, [1])

    def test_binary_is_input_text_is_control(self) -> None:
        """In v1, binary messages are input; text messages are JSON control, not input."""
        client = self.client(protocols=[SUBPROTOCOL_V1])
        client.send(OP_BINARY, b"typed")
        client.send(OP_TEXT, b'{"type": "ack", "offset": 0}')
        self.assertEqual(bytes(self.pty.written), b"typed")

    def test_malformed_control_closes(self) -> None:
        """A text message that is not a JSON control message closes with 4002."""
        client = self.client(protocols=[SUBPROTOCOL_V1])
        client.send(OP_TEXT, b"not json")
        frames = client.frames()
        self.assertEqual(frames[-1].close_code, 4002)
        self.assertEqual(bytes(self.pty.written), b"")

    def test_console_closed_event(self) -> None:
        """v1 clients hear why the console closed before the 4001 close frame."""
        client = self.client(protocols=[SUBPROTOCOL_V1])
        client.frames()
        self.multiplexer.console_lost("pty hung up")
        frames = client.frames()
        self.assertEqual(frames[0].json(), {"type": "closed", "reason": "pty hung up"})
        self.assertEqual(frames[-1].close_code, 4001)

    def test_backlog_full_told_not_closed(self) -> None:
        """
        A v1 client whose input does not fit the backlog is told (C{input-discarded},
        with the running total) and stays open; a viewer beside it hears nothing of it.
        """
        typist = self.client(protocols=[SUBPROTOCOL_V1])
        viewer = self.client(protocols=[SUBPROTOCOL_V1])
        typist.frames()
        viewer.frames()
        self.pty.pending_input = INPUT_BACKLOG
        typist.send(OP_BINARY, b"more")
        typist.send(OP_BINARY, b"again")
        self.assertEqual(bytes(self.pty.written), b"")
        frames = typist.frames()
        self.assertNotIn(OP_CLOSE, [f.opcode for f in frames])
        self.assertEqual(
            v1_events(frames),
            [
                {"type": "input-discarded", "bytes": 4, "reason": "input backlog full"},
                {"type": "input-discarded", "bytes": 9, "reason": "input backlog full"},
            ],
        )
        self.assertEqual(viewer.frames(), [])
        self.assertIsNotNone(typist.protocol.attachment)

    def test_read_only_input_discarded(self) -> None:
        """A read-only session discards input and tells the v1 client how much."""
        self.multiplexer.read_only = True
        client = self.client(protocols=[SUBPROTOCOL_V1])
        self.assertTrue(client.frames()[0].json()["readOnly"])
        client.send(OP_BINARY, b"rm -rf /")
        self.assertEqual(bytes(self.pty.written), b"")
        events = v1_events(client.frames())
        self.assertEqual(events, [{"type": "input-discarded", "bytes": 8, "reason": "read-only"}])


class SiteTests(SiteTestCase):
    """The HTTP side of the port."""

    def get(self, path: bytes) -> bytes:
        client = WebClient(self.site, 2)
        client.send_raw(b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        return client.transport.value()

    def test_no_autobahn_status_page(self) -> None:
        """A plain GET on /ws is refused without a page naming library versions."""
        response = self.get(b"/ws")
        self.assertNotIn(b"Autobahn", response)
        self.assertNotIn(b"200 OK", response.split(b"\r\n")[0])

    def test_history_download(self) -> None:
        """GET /history returns exactly the history as a file."""
        self.multiplexer.output_received(b"saved \x00 bytes")
        response = self.get(b"/history")
        head, _, body = response.partition(b"\r\n\r\n")
        self.assertIn(b"200", head.split(b"\r\n")[0])
        self.assertIn(b"attachment", head.lower())
        self.assertTrue(body.endswith(b"saved \x00 bytes"))

    def test_security_headers(self) -> None:
        """Every response carries the CSP and nosniff headers."""
        response = self.get(b"/history").lower()
        self.assertIn(b"content-security-policy: default-src 'self'", response)
        self.assertIn(b"x-content-type-options: nosniff", response)

    def test_missing_frontend_notice(self) -> None:
        """Without a built frontend, / says how to build it (503), and /ws still works."""
        response = self.get(b"/")
        self.assertIn(b"503", response.split(b"\r\n")[0])
        self.assertIn(b"npm", response)


class PauseDuringHistoryTests(SiteTestCase):
    """A client can be paused while the history is still being sent to it."""

    history_size = 300_000

    def test_pause_while_history_goes_out(self) -> None:
        """
        The transport's pause during attach takes effect: only part of a large history is
        written before the client is paused, and the rest follows on resume.
        """
        from cloud_console.web import websocket

        original = websocket._TransportFlow.pauseProducing
        pauses: list[int] = []

        def pause_after_first_step(flow: websocket._TransportFlow) -> None:
            pauses.append(1)
            original(flow)

        self.multiplexer.output_received(bytes(range(256)) * 1000)
        client = WebClient(self.site, 1)
        # Pause the transport as soon as the first frame has been written to it.
        write = client.transport.write

        def write_then_pause(data: bytes) -> None:
            write(data)
            if b"\x82" in data[:1] and not pauses and client.transport.producer is not None:
                pause_after_first_step(client.transport.producer)

        client.transport.write = write_then_pause  # type: ignore[method-assign]
        client.upgrade()
        first = client.output()
        self.assertEqual(pauses, [1])
        self.assertLess(len(first), 256_000)
        client.transport.producer.resumeProducing()
        self.assertEqual(first + client.output(), bytes(range(256)) * 1000)


class KeepaliveTests(SiteTestCase):
    """Automatic pings drop peers that stopped answering."""

    def test_silent_peer_dropped(self) -> None:
        """
        After 30 s a ping goes out; a peer that has not answered 60 s later is dropped
        and detached, while one that answers stays (well past the HTTP idle timeout,
        which no longer applies once upgraded).
        """
        silent = self.client()
        answering = self.client()
        self.reactor.advance(30)
        for client in (silent, answering):
            pings = [f for f in client.frames() if f.opcode == 0x9]
            self.assertEqual(len(pings), 1)
        answering.send(0xA, pings[0].payload)  # the pong echoes the ping's payload
        self.reactor.advance(60)
        self.assertTrue(silent.transport.disconnecting)
        self.assertFalse(answering.transport.disconnecting)
        # The aborted connection ends; the console forgets it.
        silent.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertIsNone(silent.protocol.attachment)
        self.assertIsNotNone(answering.protocol.attachment)

    def test_idle_http_connection_closed(self) -> None:
        """A connection that never finishes its request is closed after the idle timeout."""
        from cloud_console.web.site import HTTP_IDLE_TIMEOUT

        client = WebClient(self.site, 9)
        client.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n")
        self.reactor.advance(HTTP_IDLE_TIMEOUT - 1)
        self.assertFalse(client.transport.disconnecting)
        self.reactor.advance(1)
        self.assertTrue(client.transport.disconnecting)


class HeadAndConsoleStateTests(SynchronousTestCase):
    """The boot's head with its skip, and the console going down and up, on the wire."""

    def setUp(self) -> None:
        self.reactor = use_memory_reactor(self)
        self.multiplexer = Multiplexer(10, lag_window=20, head_size=5)
        self.pty = FakePty()
        self.multiplexer.console_up(self.pty)
        settings = ConsoleSettings(title="t", client_buffer=4096, ack_window=2000)
        self.site, self.factory = build_site(self.multiplexer, settings, self.mktemp())
        self.site.reactor = self.reactor
        self._ports = iter(range(40000, 50000))

    def client(self, **upgrade: Any) -> WebClient:
        client = WebClient(self.site, next(self._ports))
        self.assertIn(b"101 Switching Protocols", client.upgrade(**upgrade))
        return client

    def test_v1_head_skip_tail(self) -> None:
        """
        v1: the head at offset 0, a skip message naming [5, 40), then the tail at 40;
        no gap, and the skipped bytes do not count against the ack window.
        """
        data = bytes(range(65, 115))
        self.multiplexer.output_received(data)
        client = self.client(protocols=[SUBPROTOCOL_V1])
        frames = client.frames()
        self.assertEqual(frames[0].json()["offset"], 0)
        frames = [f for f in frames if f.opcode != OP_TEXT or f.json()["type"] != "times"]
        kinds = [(f.json()["type"] if f.opcode == OP_TEXT else "binary") for f in frames[1:]]
        self.assertEqual(kinds[-3:], ["binary", "skip", "binary"])
        head, skip, tail = frames[-3:]
        self.assertEqual(head.payload, struct.pack("!Q", 0) + data[:5])
        self.assertEqual(skip.json(), {"type": "skip", "from": 5, "to": 40, "bytes": 35})
        self.assertEqual(tail.payload, struct.pack("!Q", 40) + data[40:])
        protocol = client.protocol
        self.assertEqual(protocol.dialect.unacknowledged(protocol.attachment), 15)

    def test_original_protocol_gets_a_marker_line(self) -> None:
        """The original protocol has only bytes: a marker line stands for the skip."""
        data = bytes(range(65, 115))
        self.multiplexer.output_received(data)
        client = self.client()
        self.assertEqual(client.output(), data[:5] + skip_marker(35) + data[40:])

    def test_console_down_and_up_events(self) -> None:
        """v1 clients hear the console go down and come back; the connection stays."""
        client = self.client(protocols=[SUBPROTOCOL_V1])
        client.frames()
        self.multiplexer.console_down("pty /dev/pts/3 hung up")
        [event] = v1_events(client.frames())
        self.assertEqual(
            (event["type"], event["state"], event["reason"]),
            ("console", "down", "pty /dev/pts/3 hung up"),
        )
        self.assertRegex(event["since"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        client.send(OP_BINARY, b"ls\r")
        self.assertEqual(
            v1_events(client.frames()),
            [{"type": "input-discarded", "bytes": 3, "reason": "console down"}],
        )
        self.multiplexer.console_up(FakePty(), "opened pty /dev/pts/4")
        [event] = v1_events(client.frames())
        self.assertEqual((event["state"], event["reason"]), ("up", "opened pty /dev/pts/4"))
        self.multiplexer.output_received(b"back")
        [times, frame] = client.frames()
        self.assertEqual(times.json()["type"], "times")
        self.assertEqual(frame.payload, struct.pack("!Q", 0) + b"back")

    def test_down_message_right_after_hello(self) -> None:
        """A client connecting while the console is down hears so right after hello."""
        self.multiplexer.console_down("waiting for qmp:/run/vm.qmp")
        client = self.client(protocols=[SUBPROTOCOL_V1])
        events = v1_events(client.frames())
        self.assertEqual(events[0]["type"], "hello")
        self.assertEqual((events[1]["type"], events[1]["state"]), ("console", "down"))

    def test_ping_interval(self) -> None:
        """--ping-interval S pings every S seconds and drops a peer silent for 2 S."""
        settings = ConsoleSettings(ping_interval=1.5)
        self.site, factory = build_site(self.multiplexer, settings, self.mktemp())
        self.assertEqual((factory.autoPingInterval, factory.autoPingTimeout), (1.5, 3.0))


class WriteNowTests(SiteTestCase):
    """Small output (an echo) goes to the socket in this turn; bulk output keeps its pace."""

    def test_small_output_written_at_once(self) -> None:
        """
        A small chunk asks the transport to write now; a large one, or a closing
        connection, does not.
        """
        client = self.client()
        client.frames()
        calls: list[int] = []
        transport: Any = client.transport
        transport.doWrite = lambda: calls.append(1)
        transport.connected = True
        self.multiplexer.output_received(b"x")
        self.assertEqual(calls, [1])
        self.multiplexer.output_received(b"y" * (INTERACTIVE_OUTPUT + 1))
        self.assertEqual(calls, [1])
        transport.disconnecting = True
        self.multiplexer.output_received(b"z")
        self.assertEqual(calls, [1])
        self.assertEqual(client.output(), b"x" + b"y" * (INTERACTIVE_OUTPUT + 1) + b"z")


class _TimesCase(SiteTestCase):
    """A console on the memory reactor's clock."""

    head_size = 0

    def setUp(self) -> None:
        super().setUp()
        self.multiplexer = Multiplexer(
            50, clock=self.reactor, lag_window=100, head_size=self.head_size
        )
        self.multiplexer.console_up(self.pty)
        self.site, self.factory = build_site(self.multiplexer, self.settings, self.mktemp())
        self.site.reactor = self.reactor
        self.reactor.advance(1_800_000_000)

    def kinds(self, frames: list[Frame]) -> list[Any]:
        """Each frame as its event (text) or its (offset, bytes) (output)."""
        return [
            f.json() if f.opcode == OP_TEXT else v1_data([f])[0]
            for f in frames
            if f.opcode == OP_BINARY or (f.opcode == OP_TEXT and f.json()["type"] in ("times", "skip"))
        ]


class TimesTests(_TimesCase):
    """v1 clients learn when the bytes arrived: C{times} messages before the output."""

    def test_history_times_then_live(self) -> None:
        """
        The history comes after the marks of its reads; live output brings a new mark
        only when it is a new one (reads within 100 ms share one).
        """
        t0 = self.reactor.seconds()
        self.multiplexer.output_received(b"first\r\n")
        self.reactor.advance(2.5)
        self.multiplexer.output_received(b"second\r\n")
        client = self.client(protocols=[SUBPROTOCOL_V1])
        self.assertEqual(
            self.kinds(client.frames()),
            [
                {"type": "times", "marks": [[0, t0], [7, t0 + 2.5]]},
                (0, b"first\r\nsecond\r\n"),
            ],
        )
        self.reactor.advance(60)
        self.multiplexer.output_received(b"a")
        self.reactor.advance(0.05)
        self.multiplexer.output_received(b"b")
        self.assertEqual(
            self.kinds(client.frames()),
            [{"type": "times", "marks": [[15, t0 + 62.5]]}, (15, b"a"), (16, b"b")],
        )

    def test_resume_gets_the_covering_mark(self) -> None:
        """A client resuming mid-read learns the time of its first byte."""
        t0 = self.reactor.seconds()
        self.multiplexer.output_received(b"0123456789")
        session = self.multiplexer.session
        client = self.client(protocols=[SUBPROTOCOL_V1], path=f"/ws?from=4&session={session}")
        self.assertEqual(
            self.kinds(client.frames()),
            [{"type": "times", "marks": [[4, t0]]}, (4, b"456789")],
        )


class HeadTimesTests(_TimesCase):
    """The head's times, kept apart from the ring's."""

    head_size = 10

    def test_head_and_tail_times(self) -> None:
        """The head's bytes keep their times after the ring moved on; the tail has its own."""
        t0 = self.reactor.seconds()
        self.multiplexer.output_received(b"HEAD......\n")
        for _ in range(30):
            self.reactor.advance(10)
            self.multiplexer.output_received(b"x" * 9 + b"\n")
        client = self.client(protocols=[SUBPROTOCOL_V1])
        frames = self.kinds(client.frames())
        self.assertEqual(frames[0], {"type": "times", "marks": [[0, t0]]})
        self.assertEqual(frames[1], (0, b"HEAD......"))
        self.assertEqual(frames[2]["type"], "skip")
        tail_start = frames[2]["to"]
        self.assertEqual(frames[3]["marks"][0], [tail_start, self.multiplexer.history.time_at(tail_start)])
        self.assertEqual(frames[3]["marks"][-1], [self.multiplexer.history.end - 10, t0 + 300])
