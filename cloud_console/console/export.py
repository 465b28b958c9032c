"""
The history as a file for someone else: the raw bytes (the default), an asciicast to
replay with its true timing, or plain text for a ticket.

Pure functions of the history: no Twisted, no HTTP (the web door serves them).
"""

from __future__ import annotations

import codecs
import json
import re
from typing import Sequence

from .history import History
from .multiplexer import skip_marker

#: asciicast v2: U{https://docs.asciinema.org/manual/asciicast/v2/}.
ASCIICAST_VERSION = 2

#: A replayed run of output: its first byte's offset and its bytes.
Run = tuple[int, bytes]

#: Terminal escape sequences, as ECMA-48 shapes them: CSI (C{ESC [} parameters,
#: intermediates, a final byte); OSC to BEL or ST; DCS, SOS, PM and APC to ST; the other
#: two-byte escapes; and an ESC cut off at the end.
_ESCAPE = re.compile(
    rb"""
      \x1b\[ [\x30-\x3f]* [\x20-\x2f]* [\x40-\x7e]
    | \x1b\] .*? (?: \x07 | \x1b\\ | $ )
    | \x1b [PX^_] .*? (?: \x1b\\ | $ )
    | \x1b [\x20-\x2f]* [\x30-\x7e]
    | \x1b
    """,
    re.VERBOSE | re.DOTALL,
)

#: C0 controls other than tab and newline, and DEL: nothing a ticket can show.
_CONTROL = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]")


def plain_text(data: bytes) -> bytes:
    """
    C{data} as plain UTF-8 text: escape sequences removed, line ends as C{\\n} (a lone
    C{\\r}, which a terminal uses to redraw a line, too: nothing is lost), other control
    characters dropped, invalid UTF-8 replaced.
    """
    text = _ESCAPE.sub(b"", data)
    text = text.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    text = _CONTROL.sub(b"", text)
    return text.decode("utf-8", "replace").encode("utf-8")


def asciicast(
    history: History,
    runs: Sequence[Run],
    skipped: int,
    width: int,
    height: int,
    now: float,
) -> bytes:
    """
    The replayed history (C{runs}: the head and the tail, or one run) as an asciicast v2
    recording: a header (width, height, the first byte's time as C{timestamp}), then one
    C{[t, "o", text]} event per time mark, C{t} in seconds after C{timestamp}; between
    two runs, the "not kept" line as one event at the time of the tail's first byte.

    The format carries text: output is decoded as UTF-8 across events (a character split
    between two reads is whole in one event), an invalid byte becomes U+FFFD. Bytes
    without a mark (none, unless the history was kept without times) take C{now}.
    """
    events: list[tuple[float, str]] = []
    for index, (offset, data) in enumerate(runs):
        marks = history.time_marks(offset, offset + len(data)) or [(offset, now)]
        if index > 0:
            events.append((marks[0][1], skip_marker(skipped).decode("ascii")))
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        for at, (mark, seconds) in enumerate(marks):
            stop = marks[at + 1][0] if at + 1 < len(marks) else offset + len(data)
            text = decoder.decode(data[mark - offset : stop - offset])
            if text:
                events.append((seconds, text))
        rest = decoder.decode(b"", final=True)
        if rest:
            events.append((marks[-1][1], rest))
    start = int(events[0][0]) if events else int(now)
    header = {
        "version": ASCIICAST_VERSION,
        "width": width,
        "height": height,
        "timestamp": start,
        "env": {"TERM": "xterm-256color"},
    }
    lines = [json.dumps(header)]
    previous = 0.0
    for seconds, text in events:
        # Never backwards (a wall clock stepped back): players expect rising times.
        previous = max(previous, round(seconds - start, 6))
        lines.append(json.dumps([previous, "o", text]))
    return ("\n".join(lines) + "\n").encode("utf-8")
