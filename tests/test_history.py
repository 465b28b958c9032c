"""
Tests for L{cloud_console.console.history}: the byte ring buffer with absolute offsets.

Pure logic, so L{SynchronousTestCase} throughout; the hypothesis tests check the ring
against the simplest possible model, a C{bytes} holding everything ever written.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from cloud_console.console.history import History, OffsetTooOld


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
