"""
The consoles' state across a restart: each console's session, offsets, history (head,
ring) and time marks, as bytes to hand over (a memfd in systemd's store, or a file in
C{--state-dir}) and to take back at the next start.

A state is used whole or not at all: a header with the format version, the payload's
length and its SHA-256 is checked first (another version, a torn or altered write), then
each console's part against the console configured now (its source, its history's
sizes); a part that does not check out is dropped and that console starts empty, as if
there had been no state. Nothing here does I/O: the caller reads and writes the bytes.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
import time
import zlib
from dataclasses import dataclass
from typing import Any

from .history import HistoryState

#: The format's version; another is refused (not converted).
STATE_VERSION = 1

_MAGIC = b"CCSTATE\0"
_HEADER = struct.Struct("!8sIQ32s")
_LENGTH = struct.Struct("!I")
#: The binary parts of one console, in order.
_BLOBS = ("head", "ring", "times.offsets", "times.times", "head_times.offsets", "head_times.times")


class StateError(ValueError):
    """A state that does not check out: one line saying why, for the log."""


@dataclass(frozen=True)
class ConsoleState:
    """What one console hands to the next process."""

    #: The console's name (C{""} for the single console of the original command line).
    name: str
    #: Its SOURCE as configured: a console whose source changed does not take it back.
    source: str
    session: str
    history: HistoryState


def encode(consoles: list[ConsoleState], now: float | None = None) -> bytes:
    """The state of C{consoles}, as one checked blob."""
    index: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for console in consoles:
        history = console.history
        parts = [history.head, history.ring, *history.times, *history.head_times]
        index.append(
            {
                "name": console.name,
                "source": console.source,
                "session": console.session,
                "capacity": history.capacity,
                "head_size": history.head_size,
                "end": history.end,
                "head_start": history.head_start,
                "blobs": [len(part) for part in parts],
            }
        )
        blobs.extend(parts)
    header = json.dumps(
        {
            "written": time.time() if now is None else now,
            "byteorder": sys.byteorder,
            "consoles": index,
        }
    ).encode("utf-8")
    payload = b"".join([_LENGTH.pack(len(header)), header, *blobs])
    digest = hashlib.sha256(payload).digest()
    return _HEADER.pack(_MAGIC, STATE_VERSION, len(payload), digest) + payload


def decode(data: bytes) -> dict[str, ConsoleState]:
    """
    The consoles' states in C{data}, by name.

    @raise StateError: not a state, another version, torn or altered.
    """
    if len(data) < _HEADER.size:
        raise StateError(f"{len(data)} bytes: too short to be a state")
    magic, version, length, digest = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise StateError("not a cloud-console state")
    if version != STATE_VERSION:
        raise StateError(f"format version {version}, this is version {STATE_VERSION}")
    payload = data[_HEADER.size :]
    if len(payload) != length:
        raise StateError(f"{len(payload)} bytes of {length}: a torn write")
    if hashlib.sha256(payload).digest() != digest:
        raise StateError("its checksum does not match: altered or torn")
    try:
        (size,) = _LENGTH.unpack_from(payload)
        header = json.loads(payload[_LENGTH.size : _LENGTH.size + size])
        if header["byteorder"] != sys.byteorder:
            raise StateError(f"written on a {header['byteorder']}-endian machine")
        position = _LENGTH.size + size
        states: dict[str, ConsoleState] = {}
        for entry in header["consoles"]:
            parts: list[bytes] = []
            for length in entry["blobs"]:
                if not isinstance(length, int) or length < 0 or position + length > len(payload):
                    raise StateError("its parts run past its end")
                parts.append(payload[position : position + length])
                position += length
            if len(parts) != len(_BLOBS):
                raise StateError("a console has the wrong number of parts")
            history = HistoryState(
                capacity=int(entry["capacity"]),
                head_size=int(entry["head_size"]),
                end=int(entry["end"]),
                head_start=int(entry["head_start"]),
                head=parts[0],
                ring=parts[1],
                times=(parts[2], parts[3]),
                head_times=(parts[4], parts[5]),
            )
            name = str(entry["name"])
            states[name] = ConsoleState(name, str(entry["source"]), str(entry["session"]), history)
    except (KeyError, TypeError, ValueError, struct.error) as e:
        if isinstance(e, StateError):
            raise
        raise StateError(f"malformed: {e}") from e
    return states


# -- the journal: a state that follows the history as it is written ----------------------
#
# Under systemd the state is kept as a journal in a memfd: a snapshot of every console
# (the blob above), then a record for each change to a history as it happens (output
# appended, a boot begun, a console added). Replaying it rebuilds each history exactly as
# it was when the process last wrote to it, so a process killed outright (kill -9) loses
# only what it had read and not yet recorded. Each record carries its length and a CRC-32:
# the first that does not check out (a record cut by the kill) ends the journal.

JOURNAL_MAGIC = b"CCJRNL\0\0"
_JOURNAL_HEADER = struct.Struct("!8sIQ")
_RECORD = struct.Struct("!IIB")
_OUTPUT = struct.Struct("!IQd")
_BOOT = struct.Struct("!IQ")
_ID = struct.Struct("!I")

RECORD_SNAPSHOT = 1
RECORD_ADD = 2
RECORD_OUTPUT = 3
RECORD_BOOT = 4


def journal_header(generation: int) -> bytes:
    """The journal's first bytes: magic, format version, generation (one more each time)."""
    return _JOURNAL_HEADER.pack(JOURNAL_MAGIC, STATE_VERSION, generation)


def journal_record(kind: int, *parts: bytes) -> list[bytes]:
    """A record of C{kind} whose body is C{parts}, as pieces for one C{writev}."""
    length = sum(len(part) for part in parts)
    crc = zlib.crc32(bytes([kind]))
    for part in parts:
        crc = zlib.crc32(part, crc)
    return [_RECORD.pack(length, crc, kind), *parts]


def output_record(console: int, offset: int, now: float, data: bytes) -> list[bytes]:
    """Output C{data} appended at C{offset} of console number C{console}, at C{now}."""
    return journal_record(RECORD_OUTPUT, _OUTPUT.pack(console, offset, now), data)


def boot_record(console: int, offset: int) -> list[bytes]:
    return journal_record(RECORD_BOOT, _BOOT.pack(console, offset))


def add_record(console: int, state: ConsoleState) -> list[bytes]:
    """Console number C{console} is C{state} from here on (added, or replaced)."""
    return journal_record(RECORD_ADD, _ID.pack(console), encode([state]))


@dataclass
class Replayed:
    """What a journal held: its generation, the consoles' states, records cut short."""

    generation: int
    states: dict[str, ConsoleState]
    #: Bytes at the end that were not a whole record (cut by a kill, most likely).
    torn: int


def replay_journal(data: bytes | memoryview) -> Replayed:
    """
    Rebuild the consoles' states from a journal.

    @raise StateError: not a journal, another version, a snapshot that does not check
        out, or records that do not follow from each other.
    """
    from .history import History

    view = memoryview(data)
    if len(view) < _JOURNAL_HEADER.size:
        raise StateError(f"{len(view)} bytes: too short to be a state")
    magic, version, generation = _JOURNAL_HEADER.unpack_from(view)
    if magic != JOURNAL_MAGIC:
        raise StateError("not a cloud-console state")
    if version != STATE_VERSION:
        raise StateError(f"format version {version}, this is version {STATE_VERSION}")
    consoles: dict[int, tuple[ConsoleState, History]] = {}

    def take(number: int, state: ConsoleState) -> None:
        history = History(state.history.capacity, state.history.head_size)
        try:
            history.restore(state.history)
        except ValueError as e:
            raise StateError(f"console {state.name!r}: {e}") from e
        consoles[number] = (state, history)

    position = _JOURNAL_HEADER.size
    snapshot = False
    while position + _RECORD.size <= len(view):
        length, crc, kind = _RECORD.unpack_from(view, position)
        body = view[position + _RECORD.size : position + _RECORD.size + length]
        if len(body) != length or zlib.crc32(body, zlib.crc32(bytes([kind]))) != crc:
            break
        position += _RECORD.size + length
        if kind == RECORD_SNAPSHOT:
            consoles.clear()
            for number, state in enumerate(decode(bytes(body)).values()):
                take(number, state)
            snapshot = True
        elif not snapshot:
            raise StateError("records before the snapshot")
        elif kind == RECORD_ADD:
            (number,) = _ID.unpack_from(body)
            for state in decode(bytes(body[_ID.size :])).values():
                take(number, state)
        elif kind == RECORD_OUTPUT:
            number, offset, now = _OUTPUT.unpack_from(body)
            entry = consoles.get(number)
            if entry is None or entry[1].end != offset:
                raise StateError(f"output at {offset} does not follow (console {number})")
            entry[1].append(body[_OUTPUT.size :], now)
        elif kind == RECORD_BOOT:
            number, offset = _BOOT.unpack_from(body)
            entry = consoles.get(number)
            if entry is None or entry[1].end != offset:
                raise StateError(f"a boot at {offset} does not follow (console {number})")
            entry[1].begin_boot()
        else:
            raise StateError(f"unknown record {kind}")
    if not snapshot:
        raise StateError("no snapshot in it")
    states: dict[str, ConsoleState] = {}
    for state, history in consoles.values():
        states[state.name] = ConsoleState(state.name, state.source, state.session, history.export())
    return Replayed(generation, states, len(view) - position)
