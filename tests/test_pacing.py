"""
Tests for pacing the guest to the viewers: the pty is read only as far as every paused
viewer still finds its next byte in the history, and a viewer that makes no progress for
max_stall seconds stops holding the guest up.
"""

from __future__ import annotations

import os

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from cloud_console.console.multiplexer import Chunk, IConsoleClient, Multiplexer
from cloud_console.console.device import READ_PER_TURN, ConsoleDevice, TurnShare

from .helpers import FakePty


@implementer(IConsoleClient)
class Viewer:
    """A client that records what it gets; pausing is done through its attachment."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.gaps: list[tuple[int, int]] = []

    def output(self, chunk: Chunk) -> None:
        self.data += chunk.data

    def gap(self, lost_from: int, lost_to: int, reason: str) -> bool:
        self.gaps.append((lost_from, lost_to))
        return True

    def clients_changed(self, count: int) -> None:
        pass

    def pause_input(self) -> None:
        pass

    def resume_input(self) -> None:
        pass

    def close(self, code: int, reason: str) -> Deferred[None]:
        return succeed(None)


class PacingTests(SynchronousTestCase):
    """Multiplexer.read_budget and the stall timer."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.multiplexer = Multiplexer(1000, clock=self.clock, max_stall=0.1)
        self.pty = FakePty()
        self.multiplexer.console_up(self.pty)
        self.multiplexer.startService()
        self.assertTrue(self.pty.reading)

    def read(self, size: int) -> None:
        """What the pty device does: ask the budget, read at most that, stop at 0."""
        budget = self.multiplexer.read_budget()
        if budget <= 0:
            self.pty.stopReading()
            return
        self.multiplexer.output_received(b"x" * min(size, budget))

    def test_no_limit_while_everyone_keeps_up(self) -> None:
        """With every viewer live, the whole history's worth may be read at once."""
        self.multiplexer.attach(Viewer())
        self.multiplexer.output_received(b"a" * 600)
        self.assertEqual(self.multiplexer.read_budget(), 1000)

    def test_budget_shrinks_for_a_paused_viewer(self) -> None:
        """A paused viewer's room is what is left of the history after its cursor."""
        slow = self.multiplexer.attach(Viewer())
        self.multiplexer.attach(Viewer())
        slow.pause("transport")
        self.multiplexer.output_received(b"a" * 600)
        self.assertEqual(self.multiplexer.read_budget(), 400)

    def test_held_then_released_without_loss(self) -> None:
        """
        While one viewer keeps up and another is paused, reading goes on until the paused
        one's next byte would leave the history, then is held; when it drains, reading
        resumes and it has lost nothing.
        """
        self.multiplexer.attach(Viewer())
        viewer = Viewer()
        slow = self.multiplexer.attach(viewer)
        slow.pause("transport")
        for _ in range(5):
            self.read(300)
        self.assertFalse(self.pty.reading)
        self.assertEqual(self.multiplexer.history.end, 1000)
        slow.resume("transport")
        self.assertTrue(self.pty.reading)
        self.assertEqual(bytes(viewer.data), b"x" * 1000)
        self.assertEqual(viewer.gaps, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_held_while_everyone_is_paused(self) -> None:
        """
        With every viewer paused nothing is read: output waits in the pty, to go out on
        the shared path once someone can take it.
        """
        first, second = self.multiplexer.attach(Viewer()), self.multiplexer.attach(Viewer())
        first.pause("transport")
        self.assertEqual(self.multiplexer.read_budget(), 1000)
        second.pause("acks")
        self.assertEqual(self.multiplexer.read_budget(), 0)
        first.resume("transport")
        self.assertTrue(self.pty.reading)
        self.assertEqual(self.multiplexer.read_budget(), 1000)

    def test_stalled_viewer_stops_pacing(self) -> None:
        """
        A viewer that makes no progress for max_stall no longer holds the guest: reading
        resumes, the viewer later gets a gap, and once caught up it paces again.
        """
        viewer = Viewer()
        stuck = self.multiplexer.attach(viewer)
        stuck.pause("transport")
        self.read(10)
        self.assertFalse(self.pty.reading)
        with capturedLogs() as events:
            self.clock.advance(0.05)
            self.assertFalse(self.pty.reading)
            self.clock.advance(0.05)
        self.assertTrue(self.pty.reading)
        self.assertFalse(stuck.paces)
        self.assertEqual([e["stall"] for e in events if "stall" in e], [0.1])
        self.read(1000)
        self.read(500)
        stuck.resume("transport")
        self.assertEqual(viewer.gaps, [(0, 500)])
        self.assertTrue(stuck.paces)

    def test_detach_releases(self) -> None:
        """A viewer that leaves while holding the reading back releases it."""
        self.multiplexer.attach(Viewer())
        held = self.multiplexer.attach(Viewer())
        held.pause("transport")
        self.read(1000)
        self.read(1)
        self.assertFalse(self.pty.reading)
        held.detach()
        self.assertTrue(self.pty.reading)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_non_viewers_never_pace(self) -> None:
        """The log file (not a viewer) never holds the guest up, even if paused."""
        sink = self.multiplexer.attach(Viewer(), viewer=False)
        sink.pause("transport")
        self.multiplexer.output_received(b"z" * 1000)
        self.assertEqual(self.multiplexer.read_budget(), 1000)

    def test_no_clock_means_no_waiting(self) -> None:
        """Without a clock (or with max_stall 0) a stuck viewer is let go at once."""
        multiplexer = Multiplexer(100, max_stall=0.25)
        stuck = multiplexer.attach(Viewer())
        stuck.pause("acks")
        multiplexer.output_received(b"q" * 100)
        self.assertEqual(multiplexer.read_budget(), 100)
        self.assertFalse(stuck.paces)


class ConsoleDeviceBudgetTests(SynchronousTestCase):
    """ConsoleDevice reads no more than its budget, and stops reading at 0."""

    def setUp(self) -> None:
        master, slave = os.openpty()
        self.addCleanup(os.close, slave)
        self.addCleanup(os.close, master)
        self.master = master
        self.budget = READ_PER_TURN
        self.output: list[bytes] = []
        self.reactor = MemoryReactorClock()
        self.device = ConsoleDevice.open(
            os.ttyname(slave), True, self.output.append, lambda why: None,
            self.reactor, read_budget=lambda: self.budget, turn_share=TurnShare(),
        )
        self.addCleanup(self.device.close)
        self.device.startReading()

    def test_reads_at_most_budget(self) -> None:
        """A budget of 10 reads 10 bytes; the rest waits in the pty."""
        os.write(self.master, b"0123456789abcdef")
        self.budget = 10
        self.device.doRead()
        self.assertEqual(self.output, [b"0123456789"])
        self.budget = 100
        self.device.doRead()
        self.assertEqual(self.output[1:], [b"abcdef"])

    def test_zero_budget_stops_reading(self) -> None:
        """At 0 nothing is read and the device leaves the reactor's readers."""
        os.write(self.master, b"waiting")
        self.budget = 0
        self.device.doRead()
        self.assertEqual(self.output, [])
        self.assertNotIn(self.device, self.reactor.getReaders())


class LagWindowTests(SynchronousTestCase):
    """The ring can be larger than the replayed history: slack for slow viewers."""

    def test_replay_is_history_size(self) -> None:
        """A new client gets exactly the last history_size bytes, not the whole ring."""
        multiplexer = Multiplexer(100, lag_window=1000)
        multiplexer.output_received(bytes(range(250)))
        viewer = Viewer()
        multiplexer.attach(viewer)
        self.assertEqual(bytes(viewer.data), bytes(range(150, 250)))
        self.assertEqual(multiplexer.replay(), bytes(range(150, 250)))
        self.assertEqual(multiplexer.replay_start, 150)

    def test_paused_viewer_catches_up_within_window(self) -> None:
        """A viewer paused for more than the history but less than the window loses nothing."""
        multiplexer = Multiplexer(100, lag_window=1000)
        viewer = Viewer()
        slow = multiplexer.attach(viewer)
        slow.pause("transport")
        multiplexer.output_received(b"k" * 900)
        slow.resume("transport")
        self.assertEqual(bytes(viewer.data), b"k" * 900)
        self.assertEqual(viewer.gaps, [])
