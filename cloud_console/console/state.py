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
