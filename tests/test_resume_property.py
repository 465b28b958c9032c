"""
Property test of the v1 protocol's promise: whatever the output, disconnects, ack delays,
slow transports and reconnects, a client's reassembled stream is the guest's output
exactly, and a gap is announced exactly when bytes fell out of the history.
"""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from cloud_console.console.multiplexer import Multiplexer
from cloud_console.web.site import build_site
from cloud_console.web.websocket import SUBPROTOCOL_V1, ConsoleSettings

from .helpers import OP_BINARY, OP_TEXT, FakePty, Frame, WebClient, decode_frames, use_memory_reactor


def guest_bytes(start: int, size: int) -> bytes:
    """The guest's output at [start, start + size): every offset has its own byte value."""
    return bytes((i * 7 + i // 251) % 256 for i in range(start, start + size))


class ModelClient:
    """A v1 client as the page is: reassembles, acks, resumes from the next offset."""

    def __init__(self, test: ResumePropertyTests) -> None:
        self.test = test
        self.next: int | None = None
        self.session: str | None = None
        self.acked = 0
        self.received: dict[int, bytes] = {}  # offset -> bytes, contiguous runs
        self.gaps: list[tuple[int, int]] = []
        self.web: WebClient | None = None
        self.buffer = b""
        self.connect()

    def connect(self) -> None:
        path = "/ws"
        if self.next is not None:
            path += f"?from={self.next}&session={self.session}"
        self.web = WebClient(self.test.site, 1)
        response = self.web.upgrade(protocols=[SUBPROTOCOL_V1], path=path)
        assert b"101" in response.split(b"\r\n")[0], response
        # Whatever came with the handshake response (the hello, the history).
        self.buffer = self.web._buffer

    def read(self, keep: int | None = None) -> None:
        """Take what the server wrote; with C{keep}, only that many whole frames."""
        assert self.web is not None
        data = self.buffer + self.web.transport.value()
        self.web.transport.clear()
        frames, self.buffer = decode_frames(data)
        if keep is not None:
            frames = frames[:keep]
        for frame in frames:
            self.handle(frame)

    def handle(self, frame: Frame) -> None:
        mux = self.test.multiplexer
        if frame.opcode == OP_TEXT:
            event = frame.json()
            if event["type"] == "hello":
                self.session = event["session"]
                if self.next is None:
                    self.next = event["offset"]
                else:
                    assert event["offset"] == self.next, (event, self.next)
            elif event["type"] == "gap":
                assert event["reason"] in ("resume", "lagging"), event
                # Announced only for bytes we lack that are no longer held (the history
                # start only moves on, so it is at least where it was when announced).
                assert event["from"] == self.next, (event, self.next)
                assert self.next < event["to"] <= mux.history.start, (event, mux.history.start)
                assert event["lost"] == event["to"] - event["from"]
                self.gaps.append((event["from"], event["to"]))
                self.next = event["to"]
            return
        if frame.opcode != OP_BINARY:
            return
        offset = struct.unpack("!Q", frame.payload[:8])[0]
        data = frame.payload[8:]
        assert offset == self.next, ("not contiguous", offset, self.next)
        assert data == guest_bytes(offset, len(data)), "corrupt"
        self.received[offset] = data
        self.next = offset + len(data)

    def ack(self, fraction: float) -> None:
        assert self.web is not None and self.next is not None
        target = self.acked + int((self.next - self.acked) * fraction)
        if target > self.acked:
            self.acked = target
            self.web.send(OP_TEXT, b'{"type": "ack", "offset": %d}' % target)

    def drop(self, frames_kept: int) -> None:
        """The network drops the connection: some whole frames made it, the rest not."""
        assert self.web is not None
        self.read(keep=frames_kept)
        protocol = self.web.protocol
        self.web.transport.loseConnection()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.acked = self.next or 0
        self.connect()

    def reassembled(self) -> bytes:
        return b"".join(self.received[k] for k in sorted(self.received))


actions = st.lists(
    st.one_of(
        st.tuples(st.just("output"), st.integers(1, 700)),
        st.tuples(st.just("read"), st.just(0)),
        st.tuples(st.just("ack"), st.sampled_from([0.0, 0.5, 1.0])),
        st.tuples(st.just("pause"), st.just(0)),
        st.tuples(st.just("resume"), st.just(0)),
        st.tuples(st.just("drop"), st.integers(0, 3)),
    ),
    max_size=40,
)


class ResumePropertyTests(SynchronousTestCase):
    """The reassembled stream is exact; gaps come exactly when bytes were lost."""

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(actions, st.integers(200, 2000), st.integers(100, 3000))
    def test_stream_exact_or_gap(self, steps: list[tuple[str, Any]], history: int, window: int) -> None:
        """
        Random output, slow transports, ack delays, drops and reconnects: every byte the
        client holds is the guest's at that offset, with nothing missing between them but
        announced gaps; with everything acknowledged and drained it reaches the end.
        """
        reactor = use_memory_reactor(self)
        self.multiplexer = Multiplexer(history)
        self.multiplexer.console_up(FakePty())
        site_settings = ConsoleSettings(ack_window=window)
        self.site, _ = build_site(self.multiplexer, site_settings, "/nonexistent")
        self.site.reactor = reactor
        written = 0
        client = ModelClient(self)
        for action, argument in steps:
            web = client.web
            assert web is not None
            if action == "output":
                self.multiplexer.output_received(guest_bytes(written, argument))
                written += argument
            elif action == "read":
                client.read()
            elif action == "ack":
                client.read()
                client.ack(argument)
            elif action == "pause":
                web.transport.producer.pauseProducing()
            elif action == "resume":
                web.transport.producer.resumeProducing()
            elif action == "drop":
                client.drop(argument)
        # Settle: drain the transport, acknowledge everything, until nothing changes.
        for _ in range(100):
            web = client.web
            assert web is not None
            web.transport.producer.resumeProducing()
            client.read()
            client.ack(1.0)
            client.read()
            if client.next == written:
                break
        self.assertEqual(client.next, written)
        # Everything held is exact (checked per frame), and the runs plus the gaps tile
        # the whole stream from where the client started.
        runs = sorted((k, k + len(v)) for k, v in client.received.items())
        pieces = sorted(runs + client.gaps)
        position = pieces[0][0] if pieces else written
        for start, end in pieces:
            self.assertEqual(start, position)
            position = end
        self.assertEqual(position, written)
        if not client.gaps:
            self.assertEqual(client.reassembled(), guest_bytes(0, written)[min(client.received, default=written):])
