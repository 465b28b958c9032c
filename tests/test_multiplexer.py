"""
Tests for L{cloud_console.console.multiplexer}: history plus live output fanned out to clients,
cursor-based flow control, the boot's head and the skip to the tail, the console going
down and up, the bounded input backlog, and shutdown.

Everything here is synchronous: the multiplexer never schedules, so a fake client and a
fake pty are all it takes.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogEvent, capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from cloud_console.console.inputpath import INPUT_BACKLOG
from cloud_console.console.multiplexer import (
    CATCH_UP_STEP,
    CLOSE_CONSOLE_CLOSED,
    CLOSE_GOING_AWAY,
    LINE_SEARCH,
    Attachment,
    Chunk,
    IConsoleClient,
    Multiplexer,
    skip_marker,
)

from .helpers import FakePty


@implementer(IConsoleClient)
class FakeClient:
    """
    Records everything the multiplexer tells it.

    Like a real transport it can pause itself from inside L{output}: with C{limit} set,
    once more than C{limit} bytes are "buffered" it pauses its attachment for reason
    "transport"; L{drain} empties the buffer and resumes it.
    """

    def __init__(
        self,
        limit: int | None = None,
        gap_result: bool = True,
        frame: tuple[str, Callable[[Chunk], Any]] | None = None,
        detach_on_close: bool = False,
    ) -> None:
        self.limit = limit
        self.detach_on_close = detach_on_close
        self.gap_result = gap_result
        self.frame = frame
        self.attachment: Attachment | None = None
        self.chunks: list[Chunk] = []
        self.framed: list[Any] = []
        self.received = bytearray()
        self.buffered = 0
        self.gaps: list[tuple[int, int, str]] = []
        self.counts: list[int] = []
        self.closes: list[tuple[int, str]] = []
        self.close_results: list[Deferred[None]] = []
        self.skips: list[tuple[int, int]] = []
        self.states: list[tuple[bool, str, str]] = []
        self.events: list[tuple[str, Any]] = []
        self.on_output: Callable[[Chunk], None] | None = None

    def output(self, chunk: Chunk) -> None:
        self.chunks.append(chunk)
        self.events.append(("output", chunk))
        self.received += chunk.data
        if self.frame is not None:
            key, build = self.frame
            self.framed.append(chunk.framed(key, build))
        self.buffered += len(chunk.data)
        if self.limit is not None and self.buffered > self.limit and self.attachment:
            self.attachment.pause("transport")
        if self.on_output is not None:
            self.on_output(chunk)

    def drain(self) -> None:
        """The transport's buffer emptied: resume, as its producer would be."""
        self.buffered = 0
        assert self.attachment is not None
        self.attachment.resume("transport")

    def gap(self, lost_from: int, lost_to: int, reason: str) -> bool:
        self.gaps.append((lost_from, lost_to, reason))
        self.events.append(("gap", (lost_from, lost_to, reason)))
        return self.gap_result

    def skip(self, skip_from: int, skip_to: int) -> None:
        self.skips.append((skip_from, skip_to))
        self.events.append(("skip", (skip_from, skip_to)))

    def clients_changed(self, count: int) -> None:
        self.counts.append(count)

    def console_state(self, up: bool, reason: str, since: str) -> None:
        self.states.append((up, reason, since))
        self.events.append(("console", (up, reason)))

    def close(self, code: int, reason: str) -> Deferred[None]:
        self.closes.append((code, reason))
        if self.detach_on_close and self.attachment is not None:
            self.attachment.detach()
        d: Deferred[None] = Deferred()
        self.close_results.append(d)
        return d


def attach(
    multiplexer: Multiplexer,
    client: FakeClient,
    from_offset: int | None = None,
    viewer: bool = True,
) -> Attachment:
    """Attach C{client} and let it know its attachment, as the WebSocket protocol does."""
    attachment = multiplexer.attach(client, from_offset, viewer=viewer)
    client.attachment = attachment
    return attachment


def events_with(events: Sequence[LogEvent], fragment: str) -> list[LogEvent]:
    """The captured events whose format string contains C{fragment}."""
    return [e for e in events if fragment in (e.get("log_format") or "")]


def assert_contiguous(test: SynchronousTestCase, client: FakeClient, start: int) -> None:
    """Every chunk C{client} got starts where the previous one ended, from C{start}."""
    expected = start
    for chunk in client.chunks:
        test.assertEqual(chunk.offset, expected)
        test.assertEqual(chunk.end, chunk.offset + len(chunk.data))
        expected = chunk.end


class FakeTests(SynchronousTestCase):
    """The doubles are faithful to the interfaces they stand in for."""

    def test_fake_client_provides_interface(self) -> None:
        """The fake client implements every method of L{IConsoleClient}."""
        self.assertTrue(verifyObject(IConsoleClient, FakeClient()))


class ChunkTests(SynchronousTestCase):
    """L{Chunk}: output at an offset, framed once per framing."""

    def test_end(self) -> None:
        """A chunk ends at its offset plus its length."""
        self.assertEqual(Chunk(10, b"abcd").end, 14)

    def test_framed_once_per_key(self) -> None:
        """
        C{framed} calls the builder once per key, returns the same object on every later
        call, and builds separately for another key.
        """
        calls: list[tuple[str, Chunk]] = []

        def builder(name: str) -> Callable[[Chunk], Any]:
            def build(chunk: Chunk) -> Any:
                calls.append((name, chunk))
                return object()

            return build

        chunk = Chunk(0, b"x")
        first = chunk.framed("raw", builder("raw"))
        again = chunk.framed("raw", builder("raw-again"))
        other = chunk.framed("v1", builder("v1"))
        self.assertIs(first, again)
        self.assertIsNot(first, other)
        self.assertEqual(calls, [("raw", chunk), ("v1", chunk)])


class AttachTests(SynchronousTestCase):
    """L{Multiplexer.attach}: the history, then live output, with nothing lost or doubled."""

    def test_history_then_live(self) -> None:
        """A new client gets the whole history, then each live chunk, in order."""
        multiplexer = Multiplexer(100)
        multiplexer.output_received(b"abc")
        multiplexer.output_received(b"def")
        client = FakeClient()
        attach(multiplexer, client)
        self.assertEqual(bytes(client.received), b"abcdef")
        multiplexer.output_received(b"ghi")
        self.assertEqual(bytes(client.received), b"abcdefghi")
        assert_contiguous(self, client, 0)
        self.assertEqual(client.chunks[-1].data, b"ghi")

    def test_empty_history(self) -> None:
        """A client attached before any output gets nothing until output arrives."""
        multiplexer = Multiplexer(100)
        client = FakeClient()
        attachment = attach(multiplexer, client)
        self.assertEqual(client.chunks, [])
        self.assertEqual(attachment.cursor, 0)
        multiplexer.output_received(b"hello")
        self.assertEqual([c.data for c in client.chunks], [b"hello"])

    def test_wrapped_history(self) -> None:
        """Once the history has wrapped, a new client starts at the oldest byte held."""
        multiplexer = Multiplexer(8)
        multiplexer.output_received(b"0123456789")
        multiplexer.output_received(b"ab")
        client = FakeClient()
        attachment = attach(multiplexer, client)
        self.assertEqual(bytes(client.received), b"456789ab")
        self.assertEqual(client.chunks[0].offset, 4)
        self.assertEqual(attachment.cursor, 12)
        self.assertEqual(client.gaps, [])

    def test_empty_output_ignored(self) -> None:
        """Empty output sends nothing and takes no offset."""
        multiplexer = Multiplexer(100)
        client = FakeClient()
        attach(multiplexer, client)
        multiplexer.output_received(b"")
        self.assertEqual(client.chunks, [])
        self.assertEqual(multiplexer.history.end, 0)

    def test_attach_between_many_small_chunks(self) -> None:
        """
        Clients attached at every point of a stream of one-byte and few-byte chunks
        each get exactly the stream from the oldest byte held at attach time: nothing
        lost or doubled at the seam between history and live output.
        """
        multiplexer = Multiplexer(50)
        model = b""
        clients: list[tuple[int, FakeClient]] = []
        for i in range(200):
            data = bytes([i % 251]) * (i % 3 + 1)
            multiplexer.output_received(data)
            model += data
            client = FakeClient()
            clients.append((multiplexer.history.start, client))
            attach(multiplexer, client)
        for start, client in clients:
            self.assertEqual(bytes(client.received), model[start:])
            assert_contiguous(self, client, start)

    def test_attach_from_inside_output(self) -> None:
        """
        A client attached while a chunk is being fanned out (from inside another
        client's C{output}) gets that chunk exactly once, then everything after it.
        """
        multiplexer = Multiplexer(100)
        multiplexer.output_received(b"before|")
        late = FakeClient()
        trigger = FakeClient()

        def attach_late(chunk: Chunk) -> None:
            if chunk.data == b"seam|" and late.attachment is None:
                attach(multiplexer, late)

        trigger.on_output = attach_late
        attach(multiplexer, trigger)
        for data in [b"a", b"b", b"seam|", b"c", b"d"]:
            multiplexer.output_received(data)
        self.assertEqual(bytes(late.received), b"before|abseam|cd")
        assert_contiguous(self, late, 0)
        self.assertEqual(bytes(trigger.received), b"before|abseam|cd")

    def test_resume_from_offset(self) -> None:
        """C{attach(client, from_offset)} sends exactly the bytes after that offset."""
        multiplexer = Multiplexer(100)
        multiplexer.output_received(b"abcdef")
        client = FakeClient()
        attachment = attach(multiplexer, client, from_offset=3)
        self.assertEqual(bytes(client.received), b"def")
        self.assertEqual(client.chunks[0].offset, 3)
        self.assertEqual(attachment.cursor, 6)
        self.assertEqual(client.gaps, [])

    def test_resume_from_end(self) -> None:
        """Resuming from the end sends nothing until new output, then only that."""
        multiplexer = Multiplexer(100)
        multiplexer.output_received(b"abcdef")
        client = FakeClient()
        attach(multiplexer, client, from_offset=6)
        self.assertEqual(client.chunks, [])
        multiplexer.output_received(b"g")
        self.assertEqual([(c.offset, c.data) for c in client.chunks], [(6, b"g")])

    def test_resume_from_too_old(self) -> None:
        """
        Resuming from an offset the history no longer holds first reports
        C{gap(from_offset, start, "resume")}, then sends the history from its start.
        """
        multiplexer = Multiplexer(4)
        multiplexer.output_received(b"0123456789")
        client = FakeClient()
        attachment = attach(multiplexer, client, from_offset=2)
        self.assertEqual(client.gaps, [(2, 6, "resume")])
        self.assertEqual(client.events[0], ("gap", (2, 6, "resume")))
        self.assertEqual(bytes(client.received), b"6789")
        assert_contiguous(self, client, 6)
        self.assertTrue(attachment.attached)

    def test_resume_from_too_old_refused(self) -> None:
        """A client whose C{gap} returns False on resume is detached and sent nothing."""
        multiplexer = Multiplexer(4)
        multiplexer.output_received(b"0123456789")
        client = FakeClient(gap_result=False)
        attachment = attach(multiplexer, client, from_offset=0)
        self.assertEqual(client.gaps, [(0, 6, "resume")])
        self.assertFalse(attachment.attached)
        self.assertEqual(multiplexer.viewer_count, 0)
        multiplexer.output_received(b"more")
        self.assertEqual(client.chunks, [])

    def test_resume_from_future(self) -> None:
        """
        An offset past the end raises ValueError and attaches nothing: no viewer is
        counted and nobody is told the count changed.
        """
        multiplexer = Multiplexer(100)
        multiplexer.output_received(b"abc")
        watcher = FakeClient()
        attach(multiplexer, watcher)
        client = FakeClient()
        self.assertRaises(ValueError, multiplexer.attach, client, 4)
        self.assertEqual(multiplexer.viewer_count, 1)
        self.assertEqual(watcher.counts, [1])
        multiplexer.output_received(b"d")
        self.assertEqual(client.chunks, [])

    def test_attach_logged(self) -> None:
        """Attaching logs the offset, how many are attached and how much history there is."""
        multiplexer = Multiplexer(100)
        multiplexer.output_received(b"abcdef")
        attach(multiplexer, FakeClient())
        with capturedLogs() as events:
            attach(multiplexer, FakeClient(), from_offset=2)
        [event] = events_with(events, "attached at")
        self.assertEqual(
            (event["offset"], event["clients"], event["history_bytes"]), (2, 2, 6)
        )


class FanOutTests(SynchronousTestCase):
    """One chunk, shared by every client that is keeping up."""

    def test_same_chunk_object(self) -> None:
        """Every live client is handed the very same L{Chunk} for a piece of output."""
        multiplexer = Multiplexer(100)
        clients = [FakeClient() for _ in range(5)]
        for client in clients:
            attach(multiplexer, client)
        multiplexer.output_received(b"shared")
        [chunk] = clients[0].chunks
        for client in clients:
            self.assertEqual(len(client.chunks), 1)
            self.assertIs(client.chunks[0], chunk)
        self.assertEqual((chunk.offset, chunk.data), (0, b"shared"))

    def test_framed_once(self) -> None:
        """
        Clients that frame each chunk build the frame once per framing, however many
        clients share it, and all get the same framed object.
        """
        built: list[tuple[str, int]] = []

        def builder(key: str) -> Callable[[Chunk], Any]:
            def build(chunk: Chunk) -> Any:
                built.append((key, chunk.offset))
                return (key, bytes(chunk.data))

            return build

        multiplexer = Multiplexer(100)
        raw = [FakeClient(frame=("raw", builder("raw"))) for _ in range(4)]
        v1 = [FakeClient(frame=("v1", builder("v1"))) for _ in range(3)]
        for client in raw + v1:
            attach(multiplexer, client)
        multiplexer.output_received(b"one")
        multiplexer.output_received(b"two")
        self.assertEqual(built, [("raw", 0), ("v1", 0), ("raw", 3), ("v1", 3)])
        for group in (raw, v1):
            for client in group:
                self.assertEqual(len(client.framed), 2)
                self.assertIs(client.framed[0], group[0].framed[0])
                self.assertIs(client.framed[1], group[0].framed[1])


class FlowControlTests(SynchronousTestCase):
    """Paused clients keep a cursor, and catch up from the history when resumed."""

    def test_paused_gets_nothing_then_catches_up(self) -> None:
        """
        A paused client is sent nothing; resumed, it is sent exactly what it missed,
        from its cursor, in one chunk.
        """
        multiplexer = Multiplexer(100)
        multiplexer.output_received(b"old")
        client = FakeClient()
        attachment = attach(multiplexer, client)
        attachment.pause("transport")
        self.assertTrue(attachment.paused)
        multiplexer.output_received(b"abc")
        multiplexer.output_received(b"def")
        self.assertEqual(bytes(client.received), b"old")
        self.assertEqual(attachment.cursor, 3)
        attachment.resume("transport")
        self.assertFalse(attachment.paused)
        self.assertEqual([(c.offset, c.data) for c in client.chunks[1:]], [(3, b"abcdef")])
        self.assertEqual(attachment.cursor, 9)
        multiplexer.output_received(b"g")
        self.assertEqual(bytes(client.received), b"oldabcdefg")
        assert_contiguous(self, client, 0)

    def test_pause_from_inside_output(self) -> None:
        """
        A client that pauses itself inside C{output} (as a transport past its buffer
        limit does) gets no more until it drains, then exactly the rest.
        """
        multiplexer = Multiplexer(100)
        client = FakeClient(limit=5)
        attachment = attach(multiplexer, client)
        multiplexer.output_received(b"abc")
        multiplexer.output_received(b"def")
        self.assertTrue(attachment.paused)
        multiplexer.output_received(b"ghi")
        multiplexer.output_received(b"jk")
        self.assertEqual(bytes(client.received), b"abcdef")
        client.drain()
        self.assertEqual(bytes(client.received), b"abcdefghijk")
        assert_contiguous(self, client, 0)

    def test_catch_up_stops_when_paused(self) -> None:
        """
        Catching up a long way goes in steps of L{CATCH_UP_STEP}, and a client that
        pauses after one step is sent no more until it drains again.
        """
        size = 3 * CATCH_UP_STEP
        multiplexer = Multiplexer(size)
        client = FakeClient(limit=CATCH_UP_STEP - 1)
        attachment = attach(multiplexer, client)
        attachment.pause("transport")
        model = bytes(range(256)) * (size // 256)
        multiplexer.output_received(model)
        client.drain()
        self.assertEqual([len(c.data) for c in client.chunks], [CATCH_UP_STEP])
        self.assertEqual(attachment.cursor, CATCH_UP_STEP)
        client.drain()
        client.drain()
        self.assertEqual(bytes(client.received), model)
        self.assertEqual(attachment.cursor, size)
        assert_contiguous(self, client, 0)

    def test_every_reason_must_be_lifted(self) -> None:
        """A client paused for two reasons stays paused until both are lifted."""
        multiplexer = Multiplexer(100)
        client = FakeClient()
        attachment = attach(multiplexer, client)
        attachment.pause("transport")
        attachment.pause("acks")
        multiplexer.output_received(b"abc")
        attachment.resume("transport")
        self.assertEqual(client.chunks, [])
        attachment.resume("acks")
        self.assertEqual(bytes(client.received), b"abc")

    def test_lagging_gap(self) -> None:
        """
        A paused client whose cursor fell out of the history is told, on resume,
        C{gap(cursor, start, "lagging")}, then gets the history from its start.
        """
        multiplexer = Multiplexer(10)
        multiplexer.output_received(b"012")
        client = FakeClient()
        attachment = attach(multiplexer, client)
        attachment.pause("transport")
        model = b"012"
        for i in range(5):
            data = bytes([97 + i]) * 5
            multiplexer.output_received(data)
            model += data
        self.assertEqual(client.gaps, [])
        attachment.resume("transport")
        self.assertEqual(client.gaps, [(3, 18, "lagging")])
        self.assertEqual(client.events[1], ("gap", (3, 18, "lagging")))
        self.assertEqual(bytes(client.received), b"012" + model[18:])
        self.assertEqual(client.chunks[-1].offset, 18)
        self.assertEqual(attachment.cursor, 28)
        self.assertTrue(attachment.attached)
        multiplexer.output_received(b"z")
        self.assertEqual(client.chunks[-1].data, b"z")

    def test_lagging_gap_logged(self) -> None:
        """Falling out of the history logs a warning with the bytes lost and offsets."""
        multiplexer = Multiplexer(10)
        client = FakeClient()
        attachment = attach(multiplexer, client)
        attachment.pause("transport")
        multiplexer.output_received(b"x" * 25)
        with capturedLogs() as events:
            attachment.resume("transport")
        [event] = events_with(events, "behind the history")
        self.assertEqual((event["lost"], event["offset"], event["start"]), (15, 0, 15))
        self.assertEqual(event["log_level"].name, "warn")

    def test_lagging_gap_refused(self) -> None:
        """
        A lagging client whose C{gap} returns False is detached: sent nothing more, not
        counted, and the other viewers are told the new count.
        """
        multiplexer = Multiplexer(10)
        other = FakeClient()
        attach(multiplexer, other)
        client = FakeClient(gap_result=False)
        attachment = attach(multiplexer, client)
        attachment.pause("transport")
        multiplexer.output_received(b"x" * 25)
        attachment.resume("transport")
        self.assertEqual(client.gaps, [(0, 15, "lagging")])
        self.assertEqual(client.chunks, [])
        self.assertFalse(attachment.attached)
        self.assertEqual(multiplexer.viewer_count, 1)
        self.assertEqual(other.counts, [1, 2, 1])
        multiplexer.output_received(b"y")
        self.assertEqual(client.chunks, [])

    def test_lagging_gap_refused_after_self_detach(self) -> None:
        """
        A client that closes (and so detaches itself) inside C{gap} and returns False,
        as the WebSocket protocol does, is detached once: no error, one announcement.
        """
        multiplexer = Multiplexer(10)
        other = FakeClient()
        attach(multiplexer, other)
        client = FakeClient(gap_result=False, detach_on_close=True)
        attachment = attach(multiplexer, client)

        def gap(lost_from: int, lost_to: int, reason: str) -> bool:
            client.gaps.append((lost_from, lost_to, reason))
            client.close(4000, "lagging")
            return False

        client.gap = gap  # type: ignore[method-assign]
        attachment.pause("transport")
        multiplexer.output_received(b"x" * 25)
        attachment.resume("transport")
        self.assertEqual(client.gaps, [(0, 15, "lagging")])
        self.assertFalse(attachment.attached)
        self.assertEqual(other.counts, [1, 2, 1])
        self.assertEqual(client.chunks, [])

    def test_paused_client_does_not_hold_back_others(self) -> None:
        """
        While one client is paused (and falls far out of the history), every other
        client gets every chunk as it arrives, and the paused client is not called at
        all: no output and no gap until it resumes.
        """
        multiplexer = Multiplexer(64)
        slow = FakeClient()
        slow_attachment = attach(multiplexer, slow)
        slow_attachment.pause("transport")
        fast = [FakeClient() for _ in range(3)]
        for client in fast:
            attach(multiplexer, client)
        sent = []
        for i in range(1000):
            data = b"%d," % i
            multiplexer.output_received(data)
            sent.append(data)
            for client in fast:
                self.assertEqual(client.chunks[-1].data, data)
        for client in fast:
            self.assertEqual([c.data for c in client.chunks], sent)
        self.assertEqual(slow.events, [])
        self.assertEqual(slow_attachment.cursor, 0)

    def test_resume_after_detach(self) -> None:
        """Resuming a detached client sends it nothing."""
        multiplexer = Multiplexer(100)
        client = FakeClient()
        attachment = attach(multiplexer, client)
        attachment.pause("transport")
        multiplexer.output_received(b"abc")
        attachment.detach()
        attachment.resume("transport")
        self.assertEqual(client.chunks, [])


class DetachAndCountTests(SynchronousTestCase):
    """Detaching, and telling viewers how many there are."""

    def test_detach_stops_output(self) -> None:
        """A detached client is sent no more output."""
        multiplexer = Multiplexer(100)
        client = FakeClient()
        attachment = attach(multiplexer, client)
        multiplexer.output_received(b"a")
        multiplexer.detach(attachment)
        multiplexer.output_received(b"b")
        self.assertEqual(bytes(client.received), b"a")
        self.assertFalse(attachment.attached)

    def test_detach_idempotent(self) -> None:
        """
        Detaching twice (directly or via the attachment) is harmless: the count drops
        once, other viewers are told once, and one detach is logged.
        """
        multiplexer = Multiplexer(100)
        other = FakeClient()
        attach(multiplexer, other)
        attachment = attach(multiplexer, FakeClient())
        with capturedLogs() as events:
            multiplexer.detach(attachment)
            multiplexer.detach(attachment)
            attachment.detach()
        self.assertEqual(multiplexer.viewer_count, 1)
        self.assertEqual(other.counts, [1, 2, 1])
        [event] = events_with(events, "detached")
        self.assertEqual(event["clients"], 1)

    def test_only_viewers_logged(self) -> None:
        """
        A viewer's attach and detach are logged with the viewers on; a client that is
        not a viewer (the log file) is neither logged nor counted: with a thousand
        consoles that was a line per console at every start and stop.
        """
        multiplexer = Multiplexer(100)
        with capturedLogs() as events:
            log_file = attach(multiplexer, FakeClient(), viewer=False)
            viewer = attach(multiplexer, FakeClient())
            multiplexer.detach(viewer)
            multiplexer.detach(log_file)
        [attached] = events_with(events, "attached at")
        [detached] = events_with(events, "detached")
        self.assertEqual((attached["clients"], detached["clients"]), (1, 0))

    def test_clients_changed(self) -> None:
        """
        Each attach and detach of a viewer tells every viewer still attached the new
        viewer count.
        """
        multiplexer = Multiplexer(100)
        a, b, c = FakeClient(), FakeClient(), FakeClient()
        attach_a = attach(multiplexer, a)
        attach(multiplexer, b)
        attach(multiplexer, c)
        attach_a.detach()
        self.assertEqual(a.counts, [1, 2, 3])
        self.assertEqual(b.counts, [2, 3, 2])
        self.assertEqual(c.counts, [3, 2])
        self.assertEqual(multiplexer.viewer_count, 2)

    def test_non_viewers_not_counted_or_told(self) -> None:
        """
        An attachment with C{viewer=False} (the log file) is not counted, its attach
        and detach announce nothing, and it is never told the count.
        """
        multiplexer = Multiplexer(100)
        viewer = FakeClient()
        attach(multiplexer, viewer)
        sink = FakeClient()
        sink_attachment = attach(multiplexer, sink, viewer=False)
        self.assertEqual(multiplexer.viewer_count, 1)
        attach(multiplexer, FakeClient())
        sink_attachment.detach()
        self.assertEqual(viewer.counts, [1, 2])
        self.assertEqual(sink.counts, [])

    def test_device_told_when_watched(self) -> None:
        """
        The device learns whether anyone watches (so a read worker may read it while
        nobody does): at console_up and whenever the viewer count goes to or from 0;
        the log file does not count.
        """
        multiplexer = Multiplexer(100)
        pty = FakePty(holds_input=True)
        pty.watched = True
        multiplexer.console_up(pty)
        self.assertFalse(pty.watched)
        attach(multiplexer, FakeClient(), viewer=False)
        self.assertFalse(pty.watched)
        first = attach(multiplexer, FakeClient())
        self.assertTrue(pty.watched)
        second = attach(multiplexer, FakeClient())
        first.detach()
        self.assertTrue(pty.watched)
        second.detach()
        self.assertFalse(pty.watched)
        attach(multiplexer, FakeClient())
        again = FakePty(holds_input=True)
        multiplexer.console_down("rebooting")
        multiplexer.console_up(again)
        self.assertTrue(again.watched)

    def test_non_viewer_gets_output(self) -> None:
        """A non-viewer attachment still gets history and live output."""
        multiplexer = Multiplexer(100)
        multiplexer.output_received(b"abc")
        sink = FakeClient()
        attach(multiplexer, sink, from_offset=multiplexer.history.end, viewer=False)
        multiplexer.output_received(b"def")
        self.assertEqual(bytes(sink.received), b"def")


class InputTests(SynchronousTestCase):
    """What clients type goes to the pty, unless it may not."""

    def setUp(self) -> None:
        self.pty = FakePty(holds_input=True)

    def make(self, read_only: bool = False) -> Multiplexer:
        multiplexer = Multiplexer(100, read_only=read_only)
        multiplexer.console_up(self.pty)
        return multiplexer

    def test_input_to_pty(self) -> None:
        """Input from any client is written to the pty, in order, unchanged."""
        multiplexer = self.make()
        first = attach(multiplexer, FakeClient())
        second = attach(multiplexer, FakeClient())
        first.send_input(b"ls\r")
        second.send_input(b"\x00\xff\x1b[A")
        self.assertEqual(self.pty.writes, [b"ls\r", b"\x00\xff\x1b[A"])
        self.assertEqual((first.input_discarded, second.input_discarded), (0, 0))

    def test_empty_input(self) -> None:
        """Empty input writes nothing."""
        multiplexer = self.make()
        attach(multiplexer, FakeClient()).send_input(b"")
        self.assertEqual(self.pty.writes, [])

    def test_read_only(self) -> None:
        """
        A read-only session writes nothing to the pty; it counts the bytes discarded per
        client and logs the first discard only, with its reason.
        """
        multiplexer = self.make(read_only=True)
        attachment = attach(multiplexer, FakeClient())
        with capturedLogs() as events:
            attachment.send_input(b"abc")
            attachment.send_input(b"de")
        self.assertEqual(self.pty.writes, [])
        self.assertEqual(attachment.input_discarded, 5)
        [event] = events_with(events, "input discarded")
        self.assertEqual((event["why"], event["count"]), ("read-only", 3))

    def test_input_after_console_lost(self) -> None:
        """Once the console is lost, input is discarded and counted, not written."""
        multiplexer = self.make()
        attachment = attach(multiplexer, FakeClient())
        multiplexer.console_lost("EOF")
        with capturedLogs() as events:
            attachment.send_input(b"xyz")
        self.assertEqual(self.pty.writes, [])
        self.assertEqual(attachment.input_discarded, 3)
        [event] = events_with(events, "input discarded")
        self.assertEqual(event["why"], "console closed")

    def test_input_without_pty(self) -> None:
        """Input before a console is connected is refused ("console down") and counted."""
        multiplexer = Multiplexer(100)
        attachment = attach(multiplexer, FakeClient())
        self.assertEqual(attachment.send_input(b"xy"), "console down")
        self.assertEqual(attachment.input_discarded, 2)


class InputBacklogTests(SynchronousTestCase):
    """
    A guest that does not read its input: what is typed waits, bounded, and what does
    not fit is refused whole; no client is ever paused for it.
    """

    def setUp(self) -> None:
        self.multiplexer = Multiplexer(100)
        self.pty = FakePty(holds_input=True)
        self.multiplexer.console_up(self.pty)

    def test_queued_until_full_then_refused_whole(self) -> None:
        """
        Messages are queued while they fit in L{INPUT_BACKLOG}; one that does not fit is
        refused whole (never cut), counted, and reported with its reason; once the
        guest reads, input is queued again, in order.
        """
        attachment = attach(self.multiplexer, FakeClient())
        big = b"p" * (INPUT_BACKLOG - 10)
        self.assertIsNone(attachment.send_input(big))
        self.assertIsNone(attachment.send_input(b"0123456789"))
        self.assertEqual(attachment.send_input(b"x"), "input backlog full")
        self.assertEqual(attachment.send_input(b"yz"), "input backlog full")
        self.assertEqual(self.pty.writes, [big, b"0123456789"])
        self.assertEqual(attachment.input_discarded, 3)
        self.pty.drain()
        self.assertIsNone(attachment.send_input(b"after"))
        self.assertEqual(self.pty.writes[-1], b"after")

    def test_backlog_shared_by_the_console(self) -> None:
        """The bound is per console: one client's paste fills it for everyone."""
        first = attach(self.multiplexer, FakeClient())
        second = attach(self.multiplexer, FakeClient())
        first.send_input(b"a" * INPUT_BACKLOG)
        self.assertEqual(second.send_input(b"b"), "input backlog full")
        self.assertEqual(first.input_discarded, 0)
        self.assertEqual(second.input_discarded, 1)

    def test_viewers_keep_receiving_output(self) -> None:
        """A full backlog holds up nobody's output: the idle viewer still gets every byte."""
        typist = attach(self.multiplexer, FakeClient())
        viewer = FakeClient()
        attach(self.multiplexer, viewer)
        typist.send_input(b"a" * INPUT_BACKLOG)
        typist.send_input(b"more")
        self.multiplexer.output_received(b"still here")
        self.assertEqual(bytes(viewer.received), b"still here")

    def test_refusal_logged_once_per_reason(self) -> None:
        """A stream of refused input is logged once, not once per message."""
        attachment = attach(self.multiplexer, FakeClient())
        attachment.send_input(b"a" * INPUT_BACKLOG)
        with capturedLogs() as events:
            for _ in range(5):
                attachment.send_input(b"x")
        [event] = events_with(events, "input discarded")
        self.assertEqual(event["why"], "input backlog full")


class ConsoleDownTests(SynchronousTestCase):
    """The console going away and coming back, with the clients and history kept."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_764_619_200)  # 2025-12-01T20:00:00Z
        self.multiplexer = Multiplexer(100, clock=self.clock)
        self.pty = FakePty(holds_input=True)
        self.multiplexer.console_up(self.pty, "opened pty /dev/pts/1")
        self.multiplexer.startService()

    def test_down_then_up_keeps_clients_and_offsets(self) -> None:
        """
        Down: every client hears why and when, nobody is closed, input is refused as
        "console down". Up: they hear what was opened, and output goes on at the next
        offset on the same attachment.
        """
        client = FakeClient()
        attachment = attach(self.multiplexer, client)
        self.multiplexer.output_received(b"before ")
        self.multiplexer.console_down("pty /dev/pts/1 hung up")
        self.assertEqual(client.states, [(False, "pty /dev/pts/1 hung up", "2025-12-01T20:00:00Z")])
        self.assertEqual(client.closes, [])
        self.assertEqual(attachment.send_input(b"ls"), "console down")
        self.assertFalse(self.multiplexer.up)
        second = FakePty(holds_input=True)
        self.clock.advance(3)
        self.multiplexer.console_up(second, "opened pty /dev/pts/2")
        self.assertEqual(client.states[-1], (True, "opened pty /dev/pts/2", "2025-12-01T20:00:03Z"))
        self.assertEqual(second.reading, 1)
        self.multiplexer.output_received(b"after")
        assert_contiguous(self, client, 0)
        self.assertEqual(bytes(client.received), b"before after")
        self.assertIsNone(attachment.send_input(b"ls"))
        self.assertEqual(second.writes, [b"ls"])
        self.assertEqual(self.multiplexer.reopen_count, 1)

    def test_reopen_starts_a_new_boot(self) -> None:
        """Coming back starts a new boot: its first bytes are the new head."""
        self.multiplexer.output_received(b"first boot")
        self.multiplexer.console_down("gone")
        self.multiplexer.console_up(FakePty(holds_input=True))
        self.assertEqual(self.multiplexer.history.head_start, 10)

    def test_lost_for_good_after_down(self) -> None:
        """A console lost for good closes everyone, even while it was down."""
        client = FakeClient()
        attach(self.multiplexer, client)
        self.multiplexer.console_down("gone")
        self.multiplexer.console_lost("stopped")
        self.assertEqual([code for code, _ in client.closes], [CLOSE_CONSOLE_CLOSED])
        device = FakePty(holds_input=True)
        self.multiplexer.console_up(device)
        self.assertEqual(device.closed, 1)

    def test_down_cancels_a_held_read(self) -> None:
        """A stall timer pending when the console goes down is cancelled."""
        client = FakeClient(limit=0)
        attach(self.multiplexer, client)
        self.multiplexer.output_received(b"x")  # pauses the only viewer
        self.assertEqual(self.multiplexer.read_budget(), 0)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.multiplexer.console_down("gone")
        self.assertEqual(self.clock.getDelayedCalls(), [])


class HeadReplayTests(SynchronousTestCase):
    """A new client gets the boot's head, a skip, then the tail, each byte at its offset."""

    def make(self, history_size: int = 10, head_size: int = 5) -> Multiplexer:
        multiplexer = Multiplexer(history_size, lag_window=20, head_size=head_size)
        multiplexer.console_up(FakePty(holds_input=True))
        return multiplexer

    def test_head_skip_tail(self) -> None:
        """Head [0, 5), a skip to the last 10 bytes, then those: offsets all true."""
        multiplexer = self.make()
        data = bytes(range(65, 65 + 50))
        multiplexer.output_received(data)
        client = FakeClient()
        attach(multiplexer, client)
        self.assertEqual([e[0] for e in client.events], ["output", "skip", "output"])
        self.assertEqual((client.chunks[0].offset, client.chunks[0].data), (0, data[:5]))
        self.assertEqual(client.skips, [(5, 40)])
        self.assertEqual((client.chunks[1].offset, client.chunks[1].data), (40, data[40:]))
        self.assertEqual(client.gaps, [])
        multiplexer.output_received(b"live")
        self.assertEqual(client.chunks[-1].offset, 50)

    def test_no_skip_when_head_meets_tail(self) -> None:
        """A console that wrote less than head and tail together is replayed whole."""
        multiplexer = self.make()
        multiplexer.output_received(b"0123456789abc")
        client = FakeClient()
        attach(multiplexer, client)
        self.assertEqual(client.skips, [])
        self.assertEqual(bytes(client.received), b"0123456789abc")

    def test_head_off(self) -> None:
        """With no head, a new client gets the tail alone, as before."""
        multiplexer = self.make(head_size=0)
        multiplexer.output_received(bytes(50))
        client = FakeClient()
        attach(multiplexer, client)
        self.assertEqual((client.skips, len(client.received)), ([], 10))

    def test_replay_download(self) -> None:
        """The history download is the head, a marker line, the tail."""
        multiplexer = self.make()
        data = bytes(range(65, 65 + 50))
        multiplexer.output_received(data)
        self.assertEqual(multiplexer.replay(), data[:5] + skip_marker(35) + data[40:])
        self.assertIn(b"[... 35 bytes not kept ...]", skip_marker(35))

    def test_resume_inside_the_skipped_range(self) -> None:
        """A resume from a byte no longer held is a "resume" gap to the next one held."""
        multiplexer = self.make()
        multiplexer.output_received(bytes(50))
        client = FakeClient()
        attach(multiplexer, client, from_offset=20)
        self.assertEqual(client.gaps, [(20, 30, "resume")])
        self.assertEqual(client.chunks[0].offset, 30)

    def test_resume_inside_the_head(self) -> None:
        """A resume inside the head gets the rest of it, the skip, then the tail."""
        multiplexer = self.make()
        multiplexer.output_received(bytes(range(50)))
        client = FakeClient()
        attach(multiplexer, client, from_offset=3)
        self.assertEqual(client.chunks[0].offset, 3)
        self.assertEqual(client.skips, [(5, 40)])

    def test_head_reader_does_not_hold_the_guest(self) -> None:
        """A viewer paused while it is sent the head does not hold up reading."""
        multiplexer = Multiplexer(10, lag_window=20, head_size=5)
        multiplexer.console_up(FakePty(holds_input=True))
        multiplexer.output_received(bytes(50))
        live = FakeClient()
        attach(multiplexer, live)
        slow = FakeClient(limit=0)
        attach(multiplexer, slow)
        self.assertEqual(slow.chunks[0].offset, 0)
        self.assertGreater(multiplexer.read_budget(), 0)


class TailAtLineBoundaryTests(SynchronousTestCase):
    """After a "not kept" line the replayed tail starts at a line, never inside one."""

    def make(self, head_size: int = 5, lag_window: int = 100) -> Multiplexer:
        multiplexer = Multiplexer(20, lag_window=lag_window, head_size=head_size)
        multiplexer.console_up(FakePty(holds_input=True))
        return multiplexer

    def test_tail_inside_an_escape_sequence(self) -> None:
        """
        The last 20 bytes begin inside C{ESC[m}: the tail starts after the first newline,
        and the skip (and the download's marker) counts the bytes before it.
        """
        multiplexer = self.make()
        data = b"HEAD." + b"x" * 40 + b"\x1b[1mred\x1b[m\r\nnext line\r\nmore\n"
        multiplexer.output_received(data)
        raw_start = len(data) - 20
        self.assertEqual(data[raw_start : raw_start + 2], b"[m")
        line = data.index(b"next")
        client = FakeClient()
        attach(multiplexer, client)
        self.assertEqual(client.skips, [(5, line)])
        self.assertEqual(bytes(client.received), b"HEAD.next line\r\nmore\n")
        self.assertEqual(
            multiplexer.replay(), b"HEAD." + skip_marker(line - 5) + b"next line\r\nmore\n"
        )

    def test_tail_at_a_line_already(self) -> None:
        """A tail whose previous byte is a newline starts where it is."""
        multiplexer = self.make()
        data = b"HEAD." + b"y" * 40 + b"\n" + b"z" * 10 + b"\n" + b"w" * 9
        multiplexer.output_received(data)
        client = FakeClient()
        attach(multiplexer, client)
        self.assertEqual(client.skips, [(5, len(data) - 20)])

    def test_oldest_byte_of_the_ring(self) -> None:
        """
        When the tail is the ring's oldest byte, the byte before it is not held: the tail
        still starts after the first newline.
        """
        multiplexer = self.make(lag_window=20)
        data = b"HEAD." + b"y" * 40 + b"abc\ndef" + b"g" * 13
        multiplexer.output_received(data)
        self.assertEqual(multiplexer.history.start, len(data) - 20)
        client = FakeClient()
        attach(multiplexer, client)
        self.assertEqual(bytes(client.received), b"HEAD." + b"def" + b"g" * 13)

    def test_no_newline_within_the_search(self) -> None:
        """A tail with no newline in its first LINE_SEARCH bytes is replayed as cut."""
        multiplexer = Multiplexer(LINE_SEARCH + 10, lag_window=0, head_size=5)
        multiplexer.console_up(FakePty(holds_input=True))
        data = b"HEAD." + b"q" * 100 + b"r" * (LINE_SEARCH + 1) + b"\n" + b"s" * 9
        multiplexer.output_received(data)
        client = FakeClient()
        attach(multiplexer, client)
        self.assertEqual(client.skips, [(5, len(data) - LINE_SEARCH - 10)])

    def test_without_a_head_exactly_the_last_bytes(self) -> None:
        """With --head-size 0 the replay is exactly the last history_size bytes."""
        multiplexer = self.make(head_size=0)
        data = b"x" * 40 + b"\x1b[1mred\x1b[m\r\nnext line\r\n"
        multiplexer.output_received(data)
        client = FakeClient()
        attach(multiplexer, client)
        self.assertEqual(bytes(client.received), data[-20:])
        self.assertEqual(multiplexer.replay(), data[-20:])

    def test_head_reader_skips_to_the_line(self) -> None:
        """A client reading the head when the tail moved on skips to the aligned tail."""
        multiplexer = self.make()
        multiplexer.output_received(b"HEAD.")
        client = FakeClient()
        client.attachment = multiplexer.attach(client, start=False)
        client.attachment.pause("transport")
        multiplexer.start(client.attachment)
        multiplexer.output_received(b"x" * 40 + b"\x1b[1mred\x1b[m\r\nnext line\r\n")
        client.drain()
        self.assertEqual(bytes(client.received), b"HEAD.next line\r\n")


class ConsoleLostTests(SynchronousTestCase):
    """When the pty goes away, every client is closed and whoever waits is told."""

    def test_closes_clients(self) -> None:
        """
        Every client, viewer or not, is closed with code 4001 and a reason naming the
        cause.
        """
        multiplexer = Multiplexer(100)
        clients = [FakeClient(), FakeClient()]
        for client in clients:
            attach(multiplexer, client)
        sink = FakeClient()
        attach(multiplexer, sink, viewer=False)
        multiplexer.console_lost("pty EOF")
        for client in clients + [sink]:
            [(code, reason)] = client.closes
            self.assertEqual(code, CLOSE_CONSOLE_CLOSED)
            self.assertEqual(code, 4001)
            self.assertIn("pty EOF", reason)
        self.assertEqual(multiplexer.closed_reason, "pty EOF")

    def test_closes_clients_that_detach_themselves(self) -> None:
        """
        Clients that detach themselves while being closed (as real ones do) do not
        cause any other client to be skipped.
        """
        multiplexer = Multiplexer(100)
        clients = [FakeClient(detach_on_close=True) for _ in range(4)]
        for client in clients:
            attach(multiplexer, client)
        multiplexer.console_lost("gone")
        self.assertEqual([len(c.closes) for c in clients], [1, 1, 1, 1])
        self.assertEqual(multiplexer.viewer_count, 0)

    def test_callbacks_once(self) -> None:
        """Every C{when_console_closed} callback is called once, with the cause."""
        multiplexer = Multiplexer(100)
        first: list[str] = []
        second: list[str] = []
        multiplexer.when_console_closed(first.append)
        multiplexer.when_console_closed(second.append)
        multiplexer.console_lost("hang-up")
        self.assertEqual((first, second), (["hang-up"], ["hang-up"]))

    def test_idempotent(self) -> None:
        """
        A second C{console_lost} closes nobody again, calls no callback again, and keeps
        the first cause.
        """
        multiplexer = Multiplexer(100)
        client = FakeClient()
        attach(multiplexer, client)
        called: list[str] = []
        multiplexer.when_console_closed(called.append)
        multiplexer.console_lost("first")
        multiplexer.console_lost("second")
        self.assertEqual(len(client.closes), 1)
        self.assertEqual(called, ["first"])
        self.assertEqual(multiplexer.closed_reason, "first")

    def test_logged(self) -> None:
        """Losing the console is logged with the cause and the number of clients."""
        multiplexer = Multiplexer(100)
        attach(multiplexer, FakeClient())
        attach(multiplexer, FakeClient(), viewer=False)
        with capturedLogs() as events:
            multiplexer.console_lost("EIO")
        [event] = events_with(events, "console closed")
        self.assertEqual((event["reason"], event["clients"]), ("EIO", 2))


class ServiceTests(SynchronousTestCase):
    """Starting reads the pty; stopping closes clients, then the pty."""

    def setUp(self) -> None:
        self.multiplexer = Multiplexer(100)
        self.pty = FakePty(holds_input=True)
        self.multiplexer.console_up(self.pty)

    def test_start_reads(self) -> None:
        """Starting the service starts reading the pty."""
        self.multiplexer.startService()
        self.assertTrue(self.pty.reading)
        self.assertTrue(self.multiplexer.running)

    def test_start_after_console_lost(self) -> None:
        """A console already lost is not read when the service starts."""
        self.multiplexer.console_lost("gone")
        self.multiplexer.startService()
        self.assertFalse(self.pty.reading)

    def test_stop_closes_clients_then_pty(self) -> None:
        """
        Stopping closes every client with 1001, waits for them all to be gone, then
        closes the pty once, and only then fires.
        """
        self.multiplexer.startService()
        clients = [FakeClient(), FakeClient()]
        for client in clients:
            attach(self.multiplexer, client)
        done = self.multiplexer.stopService()
        for client in clients:
            self.assertEqual(client.closes, [(CLOSE_GOING_AWAY, "server shutting down")])
        self.assertEqual(CLOSE_GOING_AWAY, 1001)
        clients[0].close_results[0].callback(None)
        self.assertEqual(self.pty.closed, 0)
        self.assertNoResult(done)
        clients[1].close_results[0].callback(None)
        self.assertEqual(self.pty.closed, 1)
        self.successResultOf(done)
        self.assertFalse(self.multiplexer.running)

    def test_stop_without_clients(self) -> None:
        """With no clients, stopping closes the pty at once."""
        self.multiplexer.startService()
        done = self.multiplexer.stopService()
        self.assertEqual(self.pty.closed, 1)
        self.successResultOf(done)

    def test_log_closed_after_the_console(self) -> None:
        """
        Stopping closes the viewers, then the console, and only then the clients that
        are not viewers (the log file): output read during the close handshakes still
        reaches it.
        """
        self.multiplexer.startService()
        viewer = FakeClient()
        attach(self.multiplexer, viewer)
        sink = FakeClient()
        attach(self.multiplexer, sink, viewer=False)
        done = self.multiplexer.stopService()
        self.assertEqual(len(viewer.closes), 1)
        self.assertEqual(sink.closes, [])
        self.multiplexer.output_received(b"said during the close handshake")
        self.assertEqual(bytes(sink.received), b"said during the close handshake")
        viewer.close_results[0].callback(None)
        self.assertEqual(self.pty.closed, 1)
        self.assertEqual(len(sink.closes), 1)
        sink.close_results[0].callback(None)
        self.successResultOf(done)

    def test_stop_cancels_stall_timer(self) -> None:
        """A stall timer pending at shutdown is cancelled, not left to fire later."""
        clock = Clock()
        multiplexer = Multiplexer(100, clock=clock)
        multiplexer.console_up(FakePty(holds_input=True))
        multiplexer.startService()
        attach(multiplexer, FakeClient(limit=0))
        multiplexer.output_received(b"x")
        self.assertEqual(multiplexer.read_budget(), 0)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        multiplexer.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_stop_when_client_close_fails(self) -> None:
        """A client whose close fails does not keep the pty open or fail the stop."""
        self.multiplexer.startService()
        client = FakeClient()
        attach(self.multiplexer, client)
        done = self.multiplexer.stopService()
        client.close_results[0].errback(RuntimeError("boom"))
        self.assertEqual(self.pty.closed, 1)
        self.successResultOf(done)


class HeadWithinTheRingTests(SynchronousTestCase):
    """The ring (the lag window) may still hold the middle: a new client skips it anyway."""

    def test_skip_bytes_still_in_the_ring(self) -> None:
        """
        With a large ring, head, skip and the last history_size bytes are sent, not
        everything the ring holds.
        """
        multiplexer = Multiplexer(10, lag_window=1000, head_size=5)
        multiplexer.console_up(FakePty(holds_input=True))
        data = bytes(range(50))
        multiplexer.output_received(data)
        client = FakeClient()
        attach(multiplexer, client)
        self.assertEqual(client.skips, [(5, 40)])
        self.assertEqual(bytes(client.received), data[:5] + data[40:])
        self.assertEqual(multiplexer.replay(), data[:5] + skip_marker(35) + data[40:])

    def test_live_output_after_the_head(self) -> None:
        """A head still being written reaches a client attached mid-head, then live output."""
        multiplexer = Multiplexer(10, lag_window=1000, head_size=100)
        multiplexer.console_up(FakePty(holds_input=True))
        multiplexer.output_received(b"abc")
        client = FakeClient()
        attach(multiplexer, client)
        multiplexer.output_received(b"def")
        self.assertEqual((bytes(client.received), client.skips), (b"abcdef", []))
