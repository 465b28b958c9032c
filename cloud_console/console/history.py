"""
The console's history: the first bytes of the current boot and a ring of the last ones,
addressed by absolute offsets.

Every byte the guest writes gets an offset, counted from 0 at start-up. The ring keeps the
last C{capacity} of them. Clients remember a cursor (an offset) instead of holding their
own copies, so the ring is the only queue: a slow client costs an integer, and a client
that asks for an offset that has already been overwritten learns exactly how many bytes it
lost.

Operators debugging a failed boot need its I{first} screens (firmware, kernel, init),
which a ring of the last output has long overwritten. So the history also keeps the
I{head}: the first C{head_size} bytes since L{History.begin_boot}. The held bytes are then
two runs, the head and the ring, with the bytes between them not kept.

Memory follows what was written, not the caps: the ring's buffer grows (by doubling) until
it is full, and the head is copied out of the ring only when the ring is about to
overwrite it, so a console that printed 20 kB holds 20 kB.

When each byte arrived is kept too, sparsely (L{TimeIndex}): one mark per read, merged to
at most one per L{TIME_RESOLUTION}, a capped number per console, the ring's marks let go
with the ring's bytes and the head's kept with the head. Nothing per byte.

No Twisted here: this module is pure logic, tested against a plain C{bytes} model; the
caller passes the time.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from dataclasses import dataclass

#: The ring's first allocation; it doubles from there up to its capacity.
INITIAL_ALLOCATION = 4096

#: Reads closer in time than this (seconds) share one time mark: the first one's.
TIME_RESOLUTION = 0.1

#: Time marks kept for the ring, per console (16 bytes each: 64 KiB at most).
RING_MARKS = 4096

#: Time marks kept for the boot's head once its bytes left the ring (16 KiB at most).
HEAD_MARKS = 1024


class TimeIndex:
    """
    When bytes arrived, sparsely: marks (offset, time), each saying that the bytes from its
    offset up to the next mark's arrived at its time (to within L{TIME_RESOLUTION}, the
    reads merged into it arriving no earlier).

    At most C{cap} marks are kept: when full, the half whose times are closest to their
    predecessor's go (their bytes then take the predecessor's time), so a burst after a
    long silence keeps its own time and only close marks are coarsened. The first and
    newest marks always stay.
    """

    __slots__ = ("cap", "_offsets", "_times", "_first")

    def __init__(self, cap: int) -> None:
        if cap < 4:
            raise ValueError(f"a time index needs room for 4 marks at least, not {cap}")
        self.cap = cap
        self._offsets = array("q")
        self._times = array("d")
        #: Marks before this index are let go (compacted lazily).
        self._first = 0

    def __len__(self) -> int:
        """How many marks are kept."""
        return len(self._offsets) - self._first

    @property
    def allocated(self) -> int:
        """Bytes of memory the marks take (the arrays' items, not their headers)."""
        return len(self._offsets) * 16

    @property
    def last_offset(self) -> int:
        """Offset of the newest mark (-1 if none)."""
        return self._offsets[-1] if len(self) else -1

    def mark(self, offset: int, time: float) -> None:
        """Bytes from C{offset} on arrived at C{time}, unless the newest mark is that recent."""
        times = self._times
        if len(self) and 0 <= time - times[-1] < TIME_RESOLUTION:
            return
        self._offsets.append(offset)
        times.append(time)
        if len(self) > self.cap:
            self._thin()

    def _thin(self) -> None:
        """Keep half the cap: drop the marks closest in time to the mark before them."""
        offsets = self._offsets[self._first :]
        times = self._times[self._first :]
        count = len(offsets)
        drop = set(
            sorted(range(1, count - 1), key=lambda i: times[i] - times[i - 1])[
                : count - self.cap // 2
            ]
        )
        keep = [i for i in range(count) if i not in drop]
        self._offsets = array("q", [offsets[i] for i in keep])
        self._times = array("d", [times[i] for i in keep])
        self._first = 0

    def keep(self, offset: int, time: float) -> None:
        """Add a mark as it is (no merging), unless one at C{offset} or later is kept."""
        if len(self) and self._offsets[-1] >= offset:
            return
        self._offsets.append(offset)
        self._times.append(time)
        if len(self) > self.cap:
            self._thin()

    def evict(
        self, start: int, head: TimeIndex | None = None, head_start: int = 0, head_limit: int = 0
    ) -> None:
        """
        Bytes before C{start} are gone: let their marks go, but the one that covers
        C{start}. Marks of the head's bytes [head_start, head_limit) go to C{head}
        instead, so a mark is held once: by the ring while its bytes are there, then by
        the head.
        """
        offsets = self._offsets
        first, count = self._first, len(offsets)
        while first + 1 < count and offsets[first + 1] <= start:
            if head is not None and offsets[first + 1] > head_start and offsets[first] < head_limit:
                head.keep(max(offsets[first], head_start), self._times[first])
            first += 1
        if head is not None and first < count and head_start <= start:
            covering = offsets[first]
            if covering < head_limit and covering < start:
                # Its first bytes left the ring and some are the head's.
                head.keep(max(covering, head_start), self._times[first])
        if first > 64 and first * 2 > count:
            del offsets[:first]
            del self._times[:first]
            first = 0
        self._first = first

    def export(self) -> tuple[bytes, bytes]:
        """The marks as two machine arrays (offsets, times), for a saved state."""
        return self._offsets[self._first :].tobytes(), self._times[self._first :].tobytes()

    def restore(self, offsets: bytes, times: bytes) -> None:
        """
        Take the marks of L{export} back.

        @raise ValueError: the arrays do not pair up, or the offsets are not in order.
        """
        restored_offsets, restored_times = array("q"), array("d")
        restored_offsets.frombytes(offsets)
        restored_times.frombytes(times)
        if len(restored_offsets) != len(restored_times) or len(restored_offsets) > self.cap:
            raise ValueError("time marks do not pair up")
        if any(a > b for a, b in zip(restored_offsets, restored_offsets[1:])):
            raise ValueError("time marks out of order")
        self._offsets, self._times, self._first = restored_offsets, restored_times, 0

    def time_at(self, offset: int) -> float | None:
        """When the byte at C{offset} arrived, if a mark covers it."""
        at = bisect_right(self._offsets, offset, self._first) - 1
        return self._times[at] if at >= self._first else None

    def marks(self, start: int, end: int) -> list[tuple[int, float]]:
        """
        The marks for the bytes [start, end): the one covering C{start} (given at
        C{start}), then every one inside.
        """
        offsets, times, first = self._offsets, self._times, self._first
        at = bisect_right(offsets, start, first) - 1
        found: list[tuple[int, float]] = []
        if at >= first:
            found.append((start, times[at]))
        at = max(at + 1, first)
        count = len(offsets)
        while at < count and offsets[at] < end:
            found.append((offsets[at], times[at]))
            at += 1
        return found


@dataclass(frozen=True)
class HistoryState:
    """A history's contents as L{History.export} gives them (and L{History.restore} takes)."""

    capacity: int
    head_size: int
    #: Offset one past the newest byte.
    end: int
    head_start: int
    #: The head's bytes copied out of the ring (from C{head_start} on).
    head: bytes
    #: The ring's bytes, ending at C{end}.
    ring: bytes
    #: The ring's and the head's time marks (see L{TimeIndex.export}).
    times: tuple[bytes, bytes]
    head_times: tuple[bytes, bytes]


class OffsetTooOld(LookupError):
    """
    The requested offset is not held (overwritten, or between the head and the ring).

    @ivar start: the next offset that is held.
    @ivar lost: how many bytes between the requested offset and that one.
    """

    def __init__(self, offset: int, start: int) -> None:
        super().__init__(f"offset {offset} is not held; the next byte held is at {start}")
        self.offset = offset
        self.start = start
        self.lost = start - offset


class History:
    """
    The head of the current boot and the last C{capacity} bytes of output.

    Unlike a zero-filled fixed buffer, the history never yields a byte the guest did not
    write: before the ring fills, only the written part is returned.
    """

    def __init__(self, capacity: int, head_size: int = 0) -> None:
        if capacity <= 0:
            raise ValueError(f"history capacity must be positive, not {capacity}")
        if head_size < 0:
            raise ValueError(f"head size must be 0 or more, not {head_size}")
        self.capacity = capacity
        self.head_size = head_size
        self._ring = bytearray(min(capacity, INITIAL_ALLOCATION))
        self._view = memoryview(self._ring)
        self._end = 0
        #: Offset of the current boot's first byte.
        self.head_start = 0
        #: Head bytes copied out of the ring: [head_start, head_start + len(_head)).
        self._head = bytearray()
        #: When the ring's bytes arrived (marks let go with the bytes).
        self.times = TimeIndex(RING_MARKS)
        #: When the head's bytes arrived (kept as long as the head).
        self.head_times = TimeIndex(HEAD_MARKS)

    @property
    def end(self) -> int:
        """Offset one past the newest byte: the total number of bytes ever written."""
        return self._end

    @property
    def start(self) -> int:
        """Offset of the oldest byte still in the ring."""
        return max(0, self._end - self.capacity)

    @property
    def head_end(self) -> int:
        """Offset one past the head's last byte (C{head_start} when there is no head)."""
        return min(self.head_start + self.head_size, self._end)

    @property
    def skipped(self) -> tuple[int, int] | None:
        """The bytes [from, to) between the head and the ring, if any were not kept."""
        head_end, start = self.head_end, self.start
        if head_end > self.head_start and head_end < start:
            return head_end, start
        return None

    def __len__(self) -> int:
        """How many bytes the ring holds (never more than C{capacity})."""
        return self._end - self.start

    @property
    def allocated(self) -> int:
        """Bytes of memory the history's buffers take (bytes and time marks)."""
        return len(self._ring) + len(self._head) + self.times_allocated

    @property
    def times_allocated(self) -> int:
        """Bytes of memory the time marks take."""
        return self.times.allocated + self.head_times.allocated

    def begin_boot(self) -> None:
        """
        The console was (re)opened: what comes next is a new boot, whose first bytes are
        the head from now on. The previous boot's head is let go (the log file has it).
        """
        self.head_start = self._end
        self._head = bytearray()
        self.head_times = TimeIndex(HEAD_MARKS)

    def holds(self, offset: int) -> bool:
        """Whether the byte at C{offset} is held (in the head or the ring)."""
        if self.start <= offset < self._end:
            return True
        return self.head_start <= offset < self.head_end

    def next_held(self, offset: int) -> int:
        """The first offset at or after C{offset} that is held (C{end} if none is)."""
        if offset >= self._end or self.holds(offset):
            return offset
        following = self.start
        if offset < self.head_start < self.head_end:
            following = min(following, self.head_start)
        return following

    def append(self, data: bytes | bytearray | memoryview, now: float | None = None) -> None:
        """
        Add output at the end, overwriting the oldest bytes once the ring is full; with
        C{now}, mark that it arrived then.

        A write larger than the ring keeps only its last C{capacity} bytes (and, for the
        head, whatever of its front the head still wants).
        """
        size = len(data)
        if size == 0:
            return
        capacity = self.capacity
        if now is not None:
            self.times.mark(self._end, now)
        new_start = self._end + size - capacity
        if new_start > 0:
            limit = self.head_start + self.head_size
            if self.head_size and new_start > self.head_start:
                self.times.evict(new_start, self.head_times, self.head_start, limit)
            else:
                self.times.evict(new_start)
        src = memoryview(data)
        self._keep_head(src)
        self._make_room(self._end + size)
        if size >= capacity:
            src = src[size - capacity :]
            self._end += size - capacity
            size = capacity
        position = self._end % capacity
        first = min(size, capacity - position)
        self._view[position : position + first] = src[:first]
        if first < size:
            self._view[: size - first] = src[first:]
        self._end += size

    def _make_room(self, new_end: int) -> None:
        """
        Grow the ring's buffer to hold offsets up to C{new_end}, by copying, so views
        already handed out stay valid. Only needed before the ring first fills, while
        offsets are still positions in it.
        """
        allocated = len(self._ring)
        if allocated >= self.capacity or new_end <= allocated:
            return
        size = allocated
        while size < new_end:
            size *= 2
        if new_end > self.capacity // 2:
            # Most of the ring is needed already: take all of it now, instead of one
            # more step that is copied again at the next (a storm's first output grows
            # a thousand rings at once; each step is fresh memory to fault in and fill).
            size = self.capacity
        ring = bytearray(min(size, self.capacity))
        ring[: self._end] = self._view[: self._end]
        self._ring = ring
        self._view = memoryview(ring)

    def _keep_head(self, src: memoryview) -> None:
        """
        Copy the head's bytes that this append pushes out of the ring (from the ring,
        or from C{src} for a write larger than the ring) before they are gone.
        """
        limit = self.head_start + self.head_size
        copied_to = self.head_start + len(self._head)
        new_end = self._end + len(src)
        leaving = min(limit, new_end - self.capacity)
        if copied_to >= leaving:
            return
        end = self._end
        if copied_to < end:
            self._head += b"".join(self.slices_from(copied_to, min(leaving, end) - copied_to))
            copied_to = min(leaving, end)
        if copied_to < leaving:
            self._head += src[copied_to - end : leaving - end]

    def slices_from(self, offset: int, limit: int | None = None) -> list[memoryview]:
        """
        The held bytes from C{offset} on (at most C{limit} of them), oldest first, as
        far as they run without a break: from the head, up to its end or the ring; from
        the ring, to the end.

        Ring bytes come as one or two read-only views into the ring, no copies: callers
        must use or copy them before the next L{append}.

        @raise OffsetTooOld: C{offset} is not held.
        @raise ValueError: C{offset} is in the future.
        """
        start, end = self.start, self._end
        if offset > end:
            raise ValueError(f"offset {offset} is past the end of the history {end}")
        if offset < start:
            copied_to = self.head_start + len(self._head)
            if not self.head_start <= offset < copied_to:
                raise OffsetTooOld(offset, self.next_held(offset))
            stop = copied_to if limit is None else min(copied_to, offset + limit)
            if stop == offset:
                return []
            at = offset - self.head_start
            return [memoryview(bytes(self._head[at : at + stop - offset]))]
        size = end - offset
        if limit is not None:
            size = min(size, limit)
        if size == 0:
            return []
        capacity = self.capacity
        position = offset % capacity
        view = self._view.toreadonly()
        first = min(size, capacity - position)
        if first == size:
            return [view[position : position + size]]
        return [view[position:], view[: size - first]]

    def export(self) -> HistoryState:
        """Everything held, to be restored by another process (see L{restore})."""
        times = self.times.export()
        head_times = self.head_times.export()
        return HistoryState(
            capacity=self.capacity,
            head_size=self.head_size,
            end=self._end,
            head_start=self.head_start,
            head=bytes(self._head),
            ring=self.contents(),
            times=times,
            head_times=head_times,
        )

    def restore(self, state: HistoryState) -> None:
        """
        Hold exactly what L{export} held, offsets and all, into this (empty) history.

        @raise ValueError: C{state} is not a history this one can hold (another capacity
            or head size, lengths that do not add up), or this one is not empty.
        """
        capacity = self.capacity
        if self._end:
            raise ValueError("the history already holds output")
        if (state.capacity, state.head_size) != (capacity, self.head_size):
            raise ValueError(
                f"history size {state.capacity} (head {state.head_size}) is now "
                f"{capacity} (head {self.head_size})"
            )
        end = state.end
        if len(state.ring) != min(end, capacity) or not 0 <= state.head_start <= end:
            raise ValueError("the history's lengths do not add up")
        if len(state.head) > min(state.head_size, end - state.head_start):
            raise ValueError("the head is longer than it can be")
        times, head_times = TimeIndex(RING_MARKS), TimeIndex(HEAD_MARKS)
        times.restore(*state.times)
        head_times.restore(*state.head_times)
        size = capacity if end >= capacity else max(min(capacity, INITIAL_ALLOCATION), end)
        ring = bytearray(size)
        start = end - len(state.ring)
        position = start % capacity
        first = min(len(state.ring), capacity - position)
        ring[position : position + first] = state.ring[:first]
        ring[: len(state.ring) - first] = state.ring[first:]
        self._ring, self._view = ring, memoryview(ring)
        self._end = end
        self.head_start = state.head_start
        self._head = bytearray(state.head)
        self.times, self.head_times = times, head_times

    def time_marks(self, start: int, end: int) -> list[tuple[int, float]]:
        """
        When the held bytes [start, end) arrived: marks (offset, time), the first at
        C{start} (if any mark covers it), each standing until the next.
        """
        ring_start = self.start
        if start >= ring_start:
            return self.times.marks(start, end)
        # The head's bytes that left the ring have their marks in the head's index;
        # those still in the ring, in the ring's.
        marks = self.head_times.marks(start, min(end, self.head_end, ring_start))
        if end > ring_start:
            marks += self.times.marks(ring_start, end)
        return marks

    def time_at(self, offset: int) -> float | None:
        """When the held byte at C{offset} arrived (C{None} if unknown)."""
        marks = self.time_marks(offset, offset + 1)
        return marks[0][1] if marks else None

    def read_from(self, offset: int, limit: int | None = None) -> bytes:
        """The bytes from C{offset} on, as one C{bytes} (a copy; see L{slices_from})."""
        return b"".join(self.slices_from(offset, limit))

    def contents(self) -> bytes:
        """Everything the ring holds, oldest first."""
        return self.read_from(self.start)

    def head(self) -> bytes:
        """The current boot's head, as far as it is held."""
        head_start, head_end = self.head_start, self.head_end
        pieces: list[bytes] = []
        offset = head_start
        while offset < head_end:
            data = self.read_from(offset, head_end - offset)
            if not data:
                break
            pieces.append(data)
            offset += len(data)
        return b"".join(pieces)
