"""
Tests for L{cloud_console.console.state} and L{cloud_console.console.history}'s export
and restore: a history taken over by another process goes on exactly as if it had never
stopped; a state that does not check out is refused whole, with the reason.
"""

from __future__ import annotations

import random

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from cloud_console.console.console import build_console, console_state
from cloud_console.console.history import History
from cloud_console.console.sources import parse_source
from cloud_console.console.spec import ConsoleSpec
from cloud_console.console.state import (
    RECORD_SNAPSHOT,
    STATE_VERSION,
    ConsoleState,
    StateError,
    boot_record,
    decode,
    encode,
    journal_header,
    journal_record,
    output_record,
    replay_journal,
)

from .helpers import FakePty


def feed(history: History, randomness: random.Random, count: int, clock: list[float]) -> None:
    for _ in range(count):
        clock[0] += randomness.choice([0.01, 0.2, 5.0])
        history.append(randomness.randbytes(randomness.randint(1, 700)), clock[0])


class HistoryRestoreTests(SynchronousTestCase):
    """A restored history is the same history."""

    def check(self, capacity: int, head_size: int, before: int, boot_at: int | None = None) -> None:
        randomness = random.Random(capacity * 7 + before)
        clock = [1000.0]
        original = History(capacity, head_size)
        feed(original, randomness, before, clock)
        if boot_at is not None:
            original.begin_boot()
            feed(original, randomness, boot_at, clock)
        restored = History(capacity, head_size)
        restored.restore(original.export())
        for history in (original, restored):
            self.assertEqual(history.end, original.end)
        for history in (original, restored):
            feed(history, random.Random(99), 40, [clock[0]])
        self.assertEqual(restored.end, original.end)
        self.assertEqual(restored.contents(), original.contents())
        self.assertEqual(restored.head(), original.head())
        self.assertEqual(restored.skipped, original.skipped)
        self.assertEqual(
            restored.time_marks(original.head_start, original.end),
            original.time_marks(original.head_start, original.end),
        )

    def test_not_yet_full(self) -> None:
        """A ring that has not filled, restored and written on: the same bytes and marks."""
        self.check(100_000, 0, 20)

    def test_wrapped_with_head(self) -> None:
        """A ring that wrapped, with a boot head copied out: the same head, skip and tail."""
        self.check(5000, 3000, 60, boot_at=30)

    def test_head_still_in_ring(self) -> None:
        """A head not yet copied out of the ring is kept when the ring wraps later."""
        self.check(20_000, 8000, 5, boot_at=3)

    def test_other_size_refused(self) -> None:
        """A history of another capacity or head size is refused, not squeezed."""
        original = History(5000, 100)
        original.append(b"x" * 6000)
        self.assertRaises(ValueError, History(6000, 100).restore, original.export())
        self.assertRaises(ValueError, History(5000, 200).restore, original.export())


def a_state() -> ConsoleState:
    history = History(4096, 1024)
    history.append(b"boot log\r\n" * 500, 1.0)
    return ConsoleState("vm1", "unix:/run/vm1.sock", "0123456789abcdef", history.export())


class EncodingTests(SynchronousTestCase):
    """The state's bytes: checked whole before anything is used."""

    def test_round_trip(self) -> None:
        """What is encoded decodes to the same states."""
        state = a_state()
        self.assertEqual(decode(encode([state])), {"vm1": state})

    def test_flipped_byte_refused(self) -> None:
        """Any byte altered, header or payload, is refused."""
        data = encode([a_state()])
        for at in (8, 20, 60, len(data) // 2, len(data) - 1):
            altered = bytearray(data)
            altered[at] ^= 0x01
            self.assertRaises(StateError, decode, bytes(altered))

    def test_torn_write_refused(self) -> None:
        """A state cut short is refused as torn."""
        data = encode([a_state()])
        error = self.assertRaises(StateError, decode, data[: len(data) - 100])
        self.assertIn("torn", str(error))

    def test_other_version_refused(self) -> None:
        """Another format version is refused, by its number."""
        data = bytearray(encode([a_state()]))
        data[8:12] = (STATE_VERSION + 1).to_bytes(4, "big")
        error = self.assertRaises(StateError, decode, bytes(data))
        self.assertIn("version", str(error))

    def test_foreign_refused(self) -> None:
        """Bytes that are not a state at all are refused."""
        self.assertRaises(StateError, decode, b"")
        self.assertRaises(StateError, decode, random.Random(1).randbytes(4000))


class TakeOverTests(SynchronousTestCase):
    """A console takes its saved state only if it is still the same console."""

    def spec(self, source: str) -> ConsoleSpec:
        return ConsoleSpec(name="vm1", source=parse_source(source), title="vm1", history_size=4096, head_size=1024)

    def saved(self) -> ConsoleState:
        reactor = MemoryReactorClock()
        console = build_console(self.spec("unix:/run/vm1.sock"), reactor)
        console.multiplexer.output_received(b"before the restart\r\n")
        return console_state(console)

    def test_same_console_takes_over(self) -> None:
        """Same source: the session, offsets and history go on; the next open keeps the head."""
        saved = self.saved()
        console = build_console(self.spec("unix:/run/vm1.sock"), MemoryReactorClock(), saved=saved)
        multiplexer = console.multiplexer
        self.assertEqual(multiplexer.session, saved.session)
        self.assertEqual(multiplexer.history.end, len(b"before the restart\r\n"))
        multiplexer.console_up(FakePty(), "kept")
        multiplexer.output_received(b"after\r\n")
        self.assertEqual(multiplexer.history.head(), b"before the restart\r\nafter\r\n")

    def test_changed_source_discarded(self) -> None:
        """Another source: the state is discarded with a warning; the console starts empty."""
        saved = self.saved()
        with capturedLogs() as events:
            console = build_console(self.spec("unix:/run/vm2.sock"), MemoryReactorClock(), saved=saved)
        self.assertEqual(console.multiplexer.history.end, 0)
        self.assertNotEqual(console.multiplexer.session, saved.session)
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertIn("source was unix:/run/vm1.sock", warnings[0]["why"])


class _ListRecorder:
    """A journal in memory: the records a multiplexer's changes make."""

    def __init__(self, number: int, pieces: list[bytes]) -> None:
        self.number = number
        self.pieces = pieces

    def appended(self, offset: int, data: bytes, now: float) -> None:
        self.pieces += output_record(self.number, offset, now, data)

    def boot(self, offset: int) -> None:
        self.pieces += boot_record(self.number, offset)


class JournalTests(SynchronousTestCase):
    """The journal rebuilds a history exactly as it was last written."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1000)
        spec = ConsoleSpec(
            name="vm1", source=parse_source("unix:/run/vm1.sock"), title="vm1",
            history_size=4096, head_size=1024,
        )
        self.console = build_console(spec, self.reactor)
        self.multiplexer = self.console.multiplexer
        self.multiplexer.output_received(b"before the journal\r\n")
        self.pieces = [journal_header(7)]
        self.pieces += journal_record(RECORD_SNAPSHOT, encode([console_state(self.console)]))
        self.multiplexer.recorder = _ListRecorder(0, self.pieces)

    def write(self, count: int) -> None:
        randomness = random.Random(count)
        for _ in range(count):
            self.reactor.advance(randomness.choice([0.01, 0.3, 4.0]))
            self.multiplexer.output_received(randomness.randbytes(randomness.randint(1, 3000)))

    def test_replay_is_the_history(self) -> None:
        """Snapshot, output, a new boot, more output: replayed, the same state."""
        self.write(30)
        self.multiplexer.console_up(FakePty(), "reopened")
        self.write(30)
        replayed = replay_journal(b"".join(self.pieces))
        self.assertEqual(replayed.generation, 7)
        self.assertEqual(replayed.torn, 0)
        self.assertEqual(replayed.states, {"vm1": console_state(self.console)})

    def test_torn_last_record_dropped(self) -> None:
        """A record cut by a kill ends the journal: the history as before that read."""
        self.write(10)
        expected = console_state(self.console)
        self.multiplexer.output_received(b"x" * 500)
        data = b"".join(self.pieces)
        replayed = replay_journal(data[:-200])
        self.assertEqual(replayed.states, {"vm1": expected})
        self.assertGreater(replayed.torn, 0)

    def test_records_that_do_not_follow_refused(self) -> None:
        """Output at an offset that does not follow the history refuses the whole journal."""
        self.write(3)
        self.pieces += output_record(0, 10, 1.0, b"out of place")
        self.assertRaises(StateError, replay_journal, b"".join(self.pieces))

    def test_not_a_journal(self) -> None:
        """A blob or random bytes are not a journal."""
        self.assertRaises(StateError, replay_journal, encode([console_state(self.console)]))
        self.assertRaises(StateError, replay_journal, random.Random(2).randbytes(1000))
