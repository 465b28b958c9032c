"""
Tests for L{cloud_console.console.history}: the byte ring buffer with absolute offsets.

Pure logic, so L{SynchronousTestCase} throughout; the hypothesis tests check the ring
against the simplest possible model, a C{bytes} holding everything ever written.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cloud_console.console.history import (
    RING_MARKS,
    TIME_RESOLUTION,
    History,
    OffsetTooOld,
    TimeIndex,
)


def _wrapped(capacity: int, *writes: bytes | bytearray | memoryview) -> History:
    """A history of C{capacity} with C{writes} appended in order."""
    history = History(capacity)
    for data in writes:
        history.append(data)
    return history


class ConstructionTests(SynchronousTestCase):
    """A history needs room for at least one byte."""

    def test_zero_capacity(self) -> None:
        """A capacity of 0 is refused with a ValueError naming the capacity."""
        error = self.assertRaises(ValueError, History, 0)
        self.assertIn("0", str(error))

    def test_negative_capacity(self) -> None:
        """A negative capacity is refused with a ValueError naming the capacity."""
        error = self.assertRaises(ValueError, History, -5)
        self.assertIn("-5", str(error))

    def test_capacity_one(self) -> None:
        """The smallest history holds exactly the last byte written."""
        history = _wrapped(1, b"abc", b"d")
        self.assertEqual(history.contents(), b"d")
        self.assertEqual((history.start, history.end, len(history)), (3, 4, 1))

    def test_empty(self) -> None:
        """A new history is empty: start and end are 0 and nothing can be read."""
        history = History(16)
        self.assertEqual((history.start, history.end, len(history)), (0, 0, 0))
        self.assertEqual(history.contents(), b"")
        self.assertEqual(history.slices_from(0), [])


class ContentsTests(SynchronousTestCase):
    """What the history holds before, as and after it fills: never padding."""

    def test_small_write_no_padding(self) -> None:
        """
        Ten bytes into a history of 80000 read back as exactly those ten bytes: no NUL
        padding from the unwritten part of the ring.
        """
        history = _wrapped(80000, b"0123456789")
        self.assertEqual(history.contents(), b"0123456789")
        self.assertEqual((history.start, history.end, len(history)), (0, 10, 10))

    def test_several_writes_before_full(self) -> None:
        """Writes before the ring fills are concatenated in order."""
        history = _wrapped(100, b"abc", b"", b"defg", b"h")
        self.assertEqual(history.contents(), b"abcdefgh")
        self.assertEqual((history.start, history.end, len(history)), (0, 8, 8))

    def test_exactly_full(self) -> None:
        """Filling the ring exactly keeps every byte and the start at 0."""
        history = _wrapped(8, b"abcd", b"efgh")
        self.assertEqual(history.contents(), b"abcdefgh")
        self.assertEqual((history.start, history.end, len(history)), (0, 8, 8))

    def test_wrap_around(self) -> None:
        """Once full, the oldest bytes are overwritten and the start moves on."""
        history = _wrapped(8, b"abcdef", b"ghij")
        self.assertEqual(history.contents(), b"cdefghij")
        self.assertEqual((history.start, history.end, len(history)), (2, 10, 8))

    def test_wrap_around_many_times(self) -> None:
        """Wrapping repeatedly keeps the last C{capacity} bytes in order."""
        history = History(7)
        written = b""
        for i in range(50):
            data = bytes([65 + i % 26]) * (i % 4 + 1)
            history.append(data)
            written += data
        self.assertEqual(history.contents(), written[-7:])
        self.assertEqual(history.end, len(written))
        self.assertEqual(history.start, len(written) - 7)

    def test_write_larger_than_capacity(self) -> None:
        """A write larger than the ring keeps only its last C{capacity} bytes."""
        history = _wrapped(4, b"0123456789")
        self.assertEqual(history.contents(), b"6789")
        self.assertEqual((history.start, history.end, len(history)), (6, 10, 4))

    def test_write_larger_than_capacity_after_partial_fill(self) -> None:
        """
        A write larger than the ring, arriving when the ring is partly filled, still
        leaves exactly its last C{capacity} bytes, in order.
        """
        history = _wrapped(4, b"ab", b"0123456789")
        self.assertEqual(history.contents(), b"6789")
        self.assertEqual((history.start, history.end), (8, 12))

    def test_write_of_exactly_capacity_after_partial_fill(self) -> None:
        """A write of exactly C{capacity} bytes replaces everything held."""
        history = _wrapped(5, b"xyz", b"ABCDE")
        self.assertEqual(history.contents(), b"ABCDE")
        self.assertEqual((history.start, history.end), (3, 8))

    def test_empty_write(self) -> None:
        """An empty write changes nothing."""
        history = _wrapped(4, b"abcdef")
        history.append(b"")
        self.assertEqual(history.contents(), b"cdef")
        self.assertEqual((history.start, history.end), (2, 6))

    def test_accepts_bytearray_and_memoryview(self) -> None:
        """Appending a bytearray or a memoryview stores the same bytes as bytes would."""
        history = _wrapped(6, bytearray(b"abc"), memoryview(b"defgh"))
        self.assertEqual(history.contents(), b"cdefgh")

    def test_append_copies(self) -> None:
        """Changing a bytearray after appending it does not change the history."""
        data = bytearray(b"abc")
        history = _wrapped(8, data)
        data[:] = b"xyz"
        self.assertEqual(history.contents(), b"abc")


class SlicesFromTests(SynchronousTestCase):
    """L{History.slices_from}: views into the ring from an offset."""

    def test_one_view_when_contiguous(self) -> None:
        """Bytes that do not cross the ring's end come back as one memoryview."""
        history = _wrapped(8, b"abcdef")
        slices = history.slices_from(1)
        self.assertEqual(len(slices), 1)
        self.assertIsInstance(slices[0], memoryview)
        self.assertEqual(bytes(slices[0]), b"bcdef")

    def test_two_views_when_wrapped(self) -> None:
        """Bytes that cross the ring's end come back as two memoryviews, oldest first."""
        history = _wrapped(8, b"abcdef", b"ghij")
        slices = history.slices_from(2)
        self.assertEqual(len(slices), 2)
        for view in slices:
            self.assertIsInstance(view, memoryview)
        self.assertEqual([bytes(view) for view in slices], [b"cdefgh", b"ij"])

    def test_after_the_wrap_point(self) -> None:
        """From an offset past the wrap point, one view holds the newest bytes."""
        history = _wrapped(8, b"abcdef", b"ghij")
        slices = history.slices_from(8)
        self.assertEqual([bytes(view) for view in slices], [b"ij"])

    def test_views_are_not_copies(self) -> None:
        """
        The views alias the ring rather than copying it: a view taken before an append
        shows the bytes that append wrote over it.
        """
        history = _wrapped(4, b"abcd")
        [view] = history.slices_from(0)
        history.append(b"WX")
        self.assertEqual(bytes(view), b"WXcd")

    def test_views_are_read_only(self) -> None:
        """A caller cannot write into the ring through a view."""
        history = _wrapped(4, b"abcd")
        [view] = history.slices_from(0)
        self.assertTrue(view.readonly)
        with self.assertRaises(TypeError):
            view[0] = 0x41
        self.assertEqual(history.contents(), b"abcd")

    def test_at_end_is_empty(self) -> None:
        """From the end offset there is nothing to read: an empty list."""
        history = _wrapped(4, b"abcdef")
        self.assertEqual(history.slices_from(6), [])

    def test_limit_within_one_view(self) -> None:
        """C{limit} caps how many bytes come back."""
        history = _wrapped(8, b"abcdef")
        self.assertEqual(b"".join(history.slices_from(1, limit=3)), b"bcd")

    def test_limit_across_the_wrap(self) -> None:
        """C{limit} reaching past the ring's end gives two views totalling C{limit}."""
        history = _wrapped(8, b"abcdef", b"ghij")
        slices = history.slices_from(4, limit=5)
        self.assertEqual([bytes(view) for view in slices], [b"efgh", b"i"])

    def test_limit_stops_before_the_wrap(self) -> None:
        """C{limit} ending exactly at the ring's end gives one view."""
        history = _wrapped(8, b"abcdef", b"ghij")
        slices = history.slices_from(2, limit=6)
        self.assertEqual([bytes(view) for view in slices], [b"cdefgh"])

    def test_limit_zero(self) -> None:
        """A limit of 0 reads nothing."""
        history = _wrapped(8, b"abcdef")
        self.assertEqual(history.slices_from(0, limit=0), [])

    def test_limit_larger_than_available(self) -> None:
        """A limit larger than what is held returns everything from the offset."""
        history = _wrapped(8, b"abcdef")
        self.assertEqual(b"".join(history.slices_from(2, limit=1000)), b"cdef")

    def test_read_from(self) -> None:
        """L{History.read_from} joins the views into one C{bytes}, honouring limit."""
        history = _wrapped(8, b"abcdef", b"ghij")
        data = history.read_from(3, limit=6)
        self.assertIsInstance(data, bytes)
        self.assertEqual(data, b"defghi")

    def test_offset_too_old(self) -> None:
        """
        An offset that has been overwritten raises L{OffsetTooOld}, saying how many
        bytes were lost between it and the oldest byte held.
        """
        history = _wrapped(4, b"0123456789")
        error = self.assertRaises(OffsetTooOld, history.slices_from, 1)
        self.assertEqual((error.offset, error.start, error.lost), (1, 6, 5))

    def test_offset_just_too_old(self) -> None:
        """One byte before the start is too old by exactly one byte."""
        history = _wrapped(4, b"0123456789")
        error = self.assertRaises(OffsetTooOld, history.slices_from, 5)
        self.assertEqual(error.lost, 1)

    def test_offset_too_old_is_lookup_error(self) -> None:
        """L{OffsetTooOld} is a LookupError, not a ValueError (those are for the future)."""
        history = _wrapped(4, b"0123456789")
        error = self.assertRaises(LookupError, history.slices_from, 0)
        self.assertNotIsInstance(error, ValueError)

    def test_offset_in_the_future(self) -> None:
        """An offset past the end raises ValueError naming the offset and the end."""
        history = _wrapped(8, b"abc")
        error = self.assertRaises(ValueError, history.slices_from, 4)
        self.assertIn("4", str(error))
        self.assertIn("3", str(error))


# Small capacities and writes up to several times their size, so wrapping, writes
# exactly the capacity and writes larger than it all come up often.
capacities = st.integers(min_value=1, max_value=40)
writes = st.lists(st.binary(min_size=0, max_size=120), max_size=30)


class ModelTests(SynchronousTestCase):
    """The ring against a plain C{bytes} model of everything ever written."""

    @given(capacity=capacities, chunks=writes)
    def test_matches_model(self, capacity: int, chunks: list[bytes]) -> None:
        """
        After every append: contents are the model's last C{capacity} bytes, end is the
        model's length, start is end minus what is held, and the cap holds.
        """
        history = History(capacity)
        model = b""
        for data in chunks:
            history.append(data)
            model += data
            self.assertEqual(history.contents(), model[-capacity:] if model else b"")
            self.assertEqual(history.end, len(model))
            self.assertEqual(history.start, max(0, len(model) - capacity))
            self.assertEqual(len(history), min(len(model), capacity))
            self.assertLessEqual(len(history), capacity)

    @given(capacity=capacities, chunks=writes)
    def test_read_from_every_offset(self, capacity: int, chunks: list[bytes]) -> None:
        """
        Reading from any offset between start and end gives the model from there, in at
        most two views; every older offset raises L{OffsetTooOld} with the exact loss.
        """
        history = History(capacity)
        model = b""
        for data in chunks:
            history.append(data)
            model += data
        for offset in range(history.start, history.end + 1):
            slices = history.slices_from(offset)
            self.assertLessEqual(len(slices), 2)
            self.assertTrue(all(len(view) > 0 for view in slices))
            self.assertEqual(b"".join(slices), model[offset:])
        for offset in range(0, history.start):
            error = self.assertRaises(OffsetTooOld, history.slices_from, offset)
            self.assertEqual(error.lost, history.start - offset)
        self.assertRaises(ValueError, history.slices_from, history.end + 1)

    @given(capacity=capacities, chunks=writes, data=st.data())
    def test_read_with_limit(self, capacity: int, chunks: list[bytes], data: st.DataObject) -> None:
        """Reading with a limit gives the model's next C{limit} bytes from the offset."""
        history = History(capacity)
        model = b"".join(chunks)
        for chunk in chunks:
            history.append(chunk)
        offset = data.draw(st.integers(history.start, history.end), label="offset")
        limit = data.draw(st.integers(0, capacity + 5), label="limit")
        self.assertEqual(history.read_from(offset, limit), model[offset : offset + limit])

    @given(capacity=capacities, chunks=writes)
    def test_offsets_monotonic(self, capacity: int, chunks: list[bytes]) -> None:
        """
        Start and end never go backwards, and each append moves end by exactly the
        number of bytes written, however large the write.
        """
        history = History(capacity)
        for data in chunks:
            start, end = history.start, history.end
            history.append(data)
            self.assertEqual(history.end, end + len(data))
            self.assertGreaterEqual(history.start, start)
            self.assertLessEqual(history.start, history.end)


def _held_model(capacity: int, head_size: int, boot: int, end: int) -> set[int]:
    """The offsets a history should hold: its ring, and the head of the current boot."""
    held = set(range(max(0, end - capacity), end))
    held.update(range(boot, min(boot + head_size, end)))
    return held


# A step is a write, or (None) the console being reopened: a new boot starts.
steps = st.lists(st.one_of(st.binary(min_size=0, max_size=120), st.none()), max_size=30)


class HeadTests(SynchronousTestCase):
    """The head: the first bytes of the current boot, kept after the ring moved on."""

    def test_head_kept_after_ring_moved_on(self) -> None:
        """The first bytes stay readable once the ring overwrote them; the middle is skipped."""
        history = History(4, head_size=3)
        history.append(b"abcdefghij")
        self.assertEqual(history.head(), b"abc")
        self.assertEqual(history.read_from(0), b"abc")
        self.assertEqual(history.skipped, (3, 6))
        self.assertEqual(history.contents(), b"ghij")
        error = self.assertRaises(OffsetTooOld, history.read_from, 4)
        self.assertEqual((error.start, error.lost), (6, 2))

    def test_no_skip_while_head_and_ring_meet(self) -> None:
        """Before the ring has moved past the head, nothing is skipped and one copy is held."""
        history = History(8, head_size=4)
        history.append(b"abcdef")
        self.assertIsNone(history.skipped)
        self.assertEqual(history.head(), b"abcd")
        self.assertEqual(history.allocated, 8)

    def test_begin_boot_starts_a_new_head(self) -> None:
        """After a reopen the head is the new boot's first bytes; the old head is let go."""
        history = History(4, head_size=2)
        history.append(b"first boot output")
        history.begin_boot()
        history.append(b"NEW-BOOT")
        self.assertEqual(history.head_start, 17)
        self.assertEqual(history.head(), b"NE")
        self.assertFalse(history.holds(0))
        self.assertEqual(history.next_held(0), 17)

    def test_memory_follows_what_was_written(self) -> None:
        """A console that wrote little holds little, whatever the caps."""
        history = History(1024 * 1024, head_size=256 * 1024)
        history.append(b"x" * 20_000)
        self.assertLess(history.allocated, 40_000)
        self.assertEqual(History(1024 * 1024).allocated, 4096)

    def test_more_than_half_takes_the_whole_ring(self) -> None:
        """
        Output that needs more than half of the ring takes all of it in one step, not a
        power of two that the next output copies again.
        """
        history = History(80_000)
        history.append(b"x" * 1000)
        self.assertEqual(history.allocated, 4096)
        history.append(b"y" * 40_000)
        self.assertEqual(history.allocated, 80_000)
        self.assertEqual(history.read_from(0), b"x" * 1000 + b"y" * 40_000)

    @given(
        capacity=capacities,
        head_size=st.integers(min_value=0, max_value=50),
        script=steps,
    )
    def test_matches_model(self, capacity: int, head_size: int, script: list[bytes | None]) -> None:
        """
        Whatever is written and however often the console reopens: exactly the ring and
        the current boot's head are held, every held byte reads back as written (runs
        stop only where a held run stops), and the next held offset is the model's.
        """
        history = History(capacity, head_size=head_size)
        model = b""
        boot = 0
        for data in script:
            if data is None:
                history.begin_boot()
                boot = len(model)
            else:
                history.append(data)
                model += data
        end = len(model)
        held = _held_model(capacity, head_size, boot, end)
        self.assertEqual(history.end, end)
        for offset in range(end):
            self.assertEqual(history.holds(offset), offset in held, offset)
            if offset in held:
                run = offset
                while run in held:
                    run += 1
                got = b""
                while offset + len(got) < run:
                    piece = history.read_from(offset + len(got))
                    self.assertTrue(piece)
                    got += piece
                self.assertEqual(got, model[offset:run])
            else:
                following = min([o for o in held if o > offset], default=end)
                self.assertEqual(history.next_held(offset), following)
                error = self.assertRaises(OffsetTooOld, history.read_from, offset)
                self.assertEqual(error.start, following)
        self.assertEqual(history.head(), model[boot : boot + head_size])
        self.assertLessEqual(history.allocated, max(capacity, 4096) + head_size)


class TimeIndexTests(SynchronousTestCase):
    """
    When bytes arrived: one mark per read, merged to one per TIME_RESOLUTION, capped,
    the ring's marks let go with its bytes, the head's kept with the head. Times come
    from a L{Clock}, advanced as a guest would write.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)

    def write(self, history: History, data: bytes, after: float = 0.0) -> int:
        """Advance the clock by C{after}, append C{data} then; return its offset."""
        self.clock.advance(after)
        offset = history.end
        history.append(data, self.clock.seconds())
        return offset

    def test_each_byte_gets_its_read_time(self) -> None:
        """Bytes of reads far apart in time each get their own read's time."""
        history = History(1000)
        start = self.clock.seconds()
        self.write(history, b"first\n")
        second = self.write(history, b"second\n", after=5)
        self.assertEqual(history.time_at(0), start)
        self.assertEqual(history.time_at(5), start)
        self.assertEqual(history.time_at(second), start + 5)
        self.assertEqual(history.time_at(history.end - 1), start + 5)
        self.assertEqual(history.time_marks(0, history.end), [(0, start), (second, start + 5)])

    def test_merged_within_the_resolution(self) -> None:
        """Reads less than TIME_RESOLUTION after the mark share it; the next one does not."""
        history = History(1000)
        start = self.clock.seconds()
        self.write(history, b"a")
        self.write(history, b"b", after=TIME_RESOLUTION / 2)
        self.write(history, b"c", after=TIME_RESOLUTION / 4)
        late = self.write(history, b"d", after=TIME_RESOLUTION / 2)
        self.assertEqual(len(history.times), 2)
        self.assertEqual(history.time_at(2), start)
        self.assertEqual(history.time_at(late), start + TIME_RESOLUTION * 1.25)

    def test_marks_clipped_to_the_range(self) -> None:
        """Marks for a range start with the one covering its first byte, given there."""
        history = History(1000)
        start = self.clock.seconds()
        self.write(history, b"0123456789")
        self.write(history, b"abcdef", after=1)
        self.assertEqual(history.time_marks(4, 12), [(4, start), (10, start + 1)])
        self.assertEqual(history.time_marks(11, 16), [(11, start + 1)])

    def test_cap_keeps_the_silences(self) -> None:
        """
        Past the cap the marks are halved, dropping those closest in time to the one
        before: a burst after a long silence keeps its own time, and so do the first and
        newest marks.
        """
        index = TimeIndex(8)
        for i in range(6):
            index.mark(i * 10, 1000 + i)
        index.mark(60, 5000.0)  # after a long silence
        index.mark(70, 5001.0)
        index.mark(80, 5002.0)  # ninth mark: thinned to four
        self.assertEqual(len(index), 4)
        self.assertEqual(index.time_at(0), 1000)
        self.assertEqual(index.time_at(60), 5000.0)
        self.assertEqual(index.time_at(85), 5002.0)
        self.assertLessEqual(index.allocated, 8 * 16)

    def test_cap_held_under_a_flood_of_reads(self) -> None:
        """However many reads, the ring's marks stay within RING_MARKS."""
        history = History(10_000_000)
        for _ in range(3 * RING_MARKS):
            self.write(history, b"x" * 100, after=TIME_RESOLUTION)
        self.assertLessEqual(len(history.times), RING_MARKS)
        self.assertLessEqual(history.times_allocated, (RING_MARKS + 1) * 16)
        self.assertEqual(history.time_at(0), 1_800_000_000 + TIME_RESOLUTION)

    def test_ring_eviction(self) -> None:
        """Marks of bytes the ring let go go too, but the one covering its oldest byte."""
        history = History(100)
        start = self.clock.seconds()
        for i in range(10):
            self.write(history, bytes([65 + i]) * 30, after=1)
        self.assertEqual(history.start, 200)
        self.assertEqual(len(history.times), 4)  # marks at 180, 210, 240, 270
        self.assertEqual(history.time_marks(200, 300)[0], (200, start + 7))
        self.assertEqual(history.time_at(299), start + 10)

    def test_ring_eviction_compacts(self) -> None:
        """Marks let go are freed, not only skipped: memory stays at the ring's share."""
        history = History(1000)
        for _ in range(5000):
            self.write(history, b"y" * 100, after=1)
        self.assertLessEqual(len(history.times), 11)
        self.assertLess(history.times.allocated, 200 * 16)

    def test_head_keeps_its_own_marks(self) -> None:
        """The head's bytes keep their times after the ring and its marks moved on."""
        history = History(100, head_size=60)
        boot = self.clock.seconds()
        self.write(history, b"Linux version\n" + b"." * 16, after=0)
        self.write(history, b"init\n" + b"." * 15, after=2)
        for _ in range(20):
            self.write(history, b"z" * 40, after=60)
        self.assertEqual(history.skipped, (60, history.start))
        self.assertEqual(history.time_at(0), boot)
        self.assertEqual(history.time_at(31), boot + 2)
        self.assertEqual(history.time_at(55), boot + 62)
        self.assertEqual(
            history.time_marks(0, 60), [(0, boot), (30, boot + 2), (50, boot + 62)]
        )
        self.assertEqual(len(history.head_times), 3)

    def test_marks_across_head_and_ring(self) -> None:
        """A range from the head into the ring gets the head's marks, then the ring's."""
        history = History(100, head_size=20)
        boot = self.clock.seconds()
        self.write(history, b"h" * 20)
        for i in range(10):
            self.write(history, b"r" * 20, after=1)
        self.assertEqual(history.time_marks(10, 20), [(10, boot)])
        self.assertEqual(history.time_marks(history.start, history.start + 1), [(history.start, boot + 6)])

    def test_new_boot_new_head_marks(self) -> None:
        """
        A new boot's head keeps only its own marks, taken over from the ring as its
        bytes leave it (each mark held once).
        """
        history = History(100, head_size=50)
        self.write(history, b"old boot\n")
        history.begin_boot()
        offset = self.write(history, b"new boot\n", after=30)
        booted = self.clock.seconds()
        self.assertEqual(len(history.head_times), 0)  # still in the ring: its marks there
        for _ in range(10):
            self.write(history, b"w" * 30, after=1)
        self.assertGreater(history.start, history.head_end)
        self.assertEqual(history.head_times.marks(offset, history.head_end)[0], (offset, booted))
        self.assertEqual(history.time_at(offset + 3), booted)
        self.assertTrue(all(at >= offset for at, _ in history.head_times.marks(0, history.end)))

    def test_head_partly_in_the_ring(self) -> None:
        """A head partly out of the ring: its first bytes' times from the head, the rest from the ring."""
        history = History(100, head_size=80)
        boot = self.clock.seconds()
        self.write(history, b"a" * 40)
        self.write(history, b"b" * 40, after=5)
        self.write(history, b"c" * 60, after=5)
        self.assertEqual(history.start, 40)
        self.assertEqual(history.time_marks(0, 80), [(0, boot), (40, boot + 5)])

    def test_without_times(self) -> None:
        """Appends without a time leave no marks, and no time is made up."""
        history = _wrapped(100, b"abc")
        self.assertIsNone(history.time_at(1))
        self.assertEqual(history.time_marks(0, 3), [])

    def test_cap_too_small(self) -> None:
        """An index needs room for a few marks."""
        self.assertRaises(ValueError, TimeIndex, 2)
