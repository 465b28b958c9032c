"""
The console's history: a byte ring buffer addressed by absolute offsets.

Every byte the guest writes gets an offset, counted from 0 at start-up. The ring keeps the
last C{capacity} of them. Clients remember a cursor (an offset) instead of holding their
own copies, so the ring is the only queue: a slow client costs an integer, and a client
that asks for an offset that has already been overwritten learns exactly how many bytes it
lost.

No Twisted here: this module is pure logic, tested against a plain C{bytes} model.
"""

from __future__ import annotations


class OffsetTooOld(LookupError):
    """
    The requested offset has already been overwritten.

    @ivar lost: how many bytes between the requested offset and the oldest byte held.
    """

    def __init__(self, offset: int, start: int) -> None:
        super().__init__(f"offset {offset} is older than the history start {start}")
        self.offset = offset
        self.start = start
        self.lost = start - offset


class History:
    """
    The last C{capacity} bytes of output, with absolute offsets.

    Unlike a zero-filled fixed buffer, the history never yields a byte the guest did not
    write: before the ring fills, only the written part is returned.
    """

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"history capacity must be positive, not {capacity}")
        self.capacity = capacity
        self._ring = bytearray(capacity)
        self._view = memoryview(self._ring)
        self._end = 0

    @property
    def end(self) -> int:
        """Offset one past the newest byte: the total number of bytes ever written."""
        return self._end

    @property
    def start(self) -> int:
        """Offset of the oldest byte still held."""
        return max(0, self._end - self.capacity)

    def __len__(self) -> int:
        """How many bytes are held (never more than C{capacity})."""
        return self._end - self.start

    def append(self, data: bytes | bytearray | memoryview) -> None:
        """
        Add output at the end, overwriting the oldest bytes once the ring is full.

        A write larger than the ring keeps only its last C{capacity} bytes.
        """
        size = len(data)
        if size == 0:
            return
        capacity = self.capacity
        src = memoryview(data)
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

    def slices_from(self, offset: int, limit: int | None = None) -> list[memoryview]:
        """
        The bytes from C{offset} to the end (at most C{limit} of them), oldest first.

        Returns one or two read-only views into the ring, no copies: callers must use or
        copy them before the next L{append}.

        @raise OffsetTooOld: C{offset} has already been overwritten.
        @raise ValueError: C{offset} is in the future.
        """
        start, end = self.start, self._end
        if offset < start:
            raise OffsetTooOld(offset, start)
        if offset > end:
            raise ValueError(f"offset {offset} is past the end of the history {end}")
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

    def read_from(self, offset: int, limit: int | None = None) -> bytes:
        """The bytes from C{offset} on, as one C{bytes} (a copy; see L{slices_from})."""
        return b"".join(self.slices_from(offset, limit))

    def contents(self) -> bytes:
        """Everything held, oldest first."""
        return self.read_from(self.start)
