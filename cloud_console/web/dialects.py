"""
The two ways a WebSocket client speaks to a console, each a small class.

 - L{OriginalDialect}: the original tool's protocol, byte for byte. Output is binary
   messages of console bytes; input is any message, text as UTF-8. It has no words for
   gaps, skips or states: a client that fell behind is closed (it reconnects and
   repaints), a skip is a marker line in the stream, states go unsaid.
 - L{V1Dialect}: C{cloud-console.v1}. Output messages carry their offset; the page
   acknowledges what it has rendered (more than C{ack_window} unacknowledged pauses it);
   a reconnecting page resumes from an offset; status (hello, gaps, skips, clients,
   console states, refused input, the console's end) comes as JSON text, never mixed into
   the terminal's bytes.

The connection (L{cloud_console.web.websocket.ConsoleServerProtocol}) does the handshake,
flow control and teardown, and hands everything the console says to its dialect.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Iterable, Protocol

from twisted.logger import Logger

from ..console.history import History
from ..console.inputpath import REFUSED_BACKLOG_FULL
from ..console.multiplexer import (
    CLOSE_LAGGING,
    Attachment,
    Chunk,
    ClientLabel,
    Multiplexer,
    iso_time,
    skip_marker,
)

#: The identity of a viewer who came without a credential: counted, never listed.
ANONYMOUS = "anonymous"


def who_is_on(viewers: Iterable[tuple[ClientLabel | None, bool]]) -> dict[str, Any]:
    """
    Who is on a console (its L{Multiplexer.viewers}), for the v1 C{clients} message and
    C{/api/consoles}: every viewer with an identity
    (oldest first: identity, front door, address, read-only, since), and how many came
    without one.
    """
    watchers = []
    anonymous = 0
    for label, read_only in viewers:
        if label is None or label.identity == ANONYMOUS:
            anonymous += 1
            continue
        watchers.append({
            "identity": label.identity,
            "front": label.front,
            "address": label.address,
            "readOnly": read_only,
            "since": iso_time(label.since),
        })
    return {"watchers": watchers, "anonymous": anonymous}


class Connection(Protocol):
    """What a dialect needs of its WebSocket connection (L{cloud_console.web.websocket})."""

    factory: Any
    attachment: Attachment | None
    peer_name: str
    #: Whether the viewer came with a credential (and so is told who else is on).
    identified: bool

    def sendMessage(self, payload: bytes, isBinary: bool = False) -> None: ...

    def sendPreparedMessage(self, preparedMsg: Any) -> None: ...

    def sendClose(self, code: int | None = None, reason: str | None = None) -> None: ...

    def close(self, code: int, reason: str) -> Any: ...

    def typed(self, attachment: Attachment, data: bytes) -> str | None: ...

#: The subprotocol with offsets, acknowledgements, resume and status messages.
SUBPROTOCOL_V1 = "cloud-console.v1"

_OFFSET = struct.Struct("!Q")

#: Close code for an original-protocol client whose input was refused because the
#: console's input backlog is full: that protocol has no words for a refusal, and input
#: dropped on a connection left open and quiet would be lost without a trace.
CLOSE_INPUT_REFUSED = 4003


def frame_raw(factory: Any, chunk: Chunk) -> Any:
    """The original protocol's frame: the bytes alone."""
    return factory.prepareMessage(chunk.data, isBinary=True)


def frame_v1(factory: Any, chunk: Chunk) -> Any:
    """The v1 frame: the offset of the first byte, then the bytes."""
    return factory.prepareMessage(_OFFSET.pack(chunk.offset) + chunk.data, isBinary=True)


class OriginalDialect:
    """The original protocol: bytes both ways, and nothing else."""

    _log = Logger()

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def start(self, multiplexer: Multiplexer) -> int | None:
        """Where the stream starts: the history a new client gets."""
        return None

    def message(self, attachment: Attachment, payload: bytes, is_binary: bool) -> None:
        """
        Every message is input (text as its UTF-8 bytes). This protocol cannot tell a
        refusal, so input refused because the guest is not reading (the backlog full)
        closes this client alone with L{CLOSE_INPUT_REFUSED} and the reason: its typist
        learns that keystrokes were lost instead of typing on into a quiet connection.
        Other refusals (read-only, console down) stay silent, as in the original tool.
        """
        refused = self.connection.typed(attachment, payload)
        if refused == REFUSED_BACKLOG_FULL:
            self._log.info(
                "closing peer {peer}: its input was refused ({why})",
                peer=self.connection.peer_name,
                why=refused,
            )
            self.connection.close(
                CLOSE_INPUT_REFUSED,
                f"input refused: {refused}, {attachment.input_discarded} bytes not written",
            )

    def output(self, chunk: Chunk) -> None:
        factory = self.connection.factory
        self.connection.sendPreparedMessage(chunk.framed("raw", factory.frame_raw))

    def gap(self, lost_from: int, lost_to: int, reason: str) -> bool:
        """No way to say so: close as "lagging"; the client reconnects to repaint."""
        lost = lost_to - lost_from
        self.connection.close(CLOSE_LAGGING, f"lagging: {lost} bytes fell out of the history")
        return False

    def skip(self, skip_from: int, skip_to: int) -> None:
        """A marker line in the stream, between the head and the tail."""
        self.connection.sendMessage(skip_marker(skip_to - skip_from), isBinary=True)

    def clients_changed(self, count: int) -> None:
        pass

    def console_state(self, up: bool, reason: str, since: str) -> None:
        pass

    def closing(self, code: int, reason: str) -> None:
        pass


class V1Dialect:
    """
    cloud-console.v1: offsets, acknowledgements, resume, status messages.

    @ivar acked: every byte before this offset has been rendered by the page.
    @ivar skipped: ranges [from, to) jumped over (gaps, skips) after C{acked}: sent
        offsets jump them, so they do not count as unacknowledged.
    """

    _log = Logger()

    def __init__(
        self,
        connection: Connection,
        resume_from: int | None = None,
        resume_session: str | None = None,
    ) -> None:
        self.connection = connection
        self.resume_from = resume_from
        self.resume_session = resume_session
        self.acked = 0
        self.skipped: list[tuple[int, int]] = []
        #: The page has been told when the bytes before this offset arrived...
        self._timed_to = -1
        #: ...the last of them at this time.
        self._last_time = -1.0

    def start(self, multiplexer: Multiplexer) -> int | None:
        """
        Say hello, and decide where this client's stream starts: after the offset it
        holds if it is resuming this session, else the whole history. A client resuming
        another session (the server restarted) is told to reset first.
        """
        factory = self.connection.factory
        history = multiplexer.history
        offset = self.resume_from
        restarted = offset is not None and (
            (self.resume_session is not None and self.resume_session != multiplexer.session)
            or offset > history.end
        )
        if offset is None or restarted:
            offset = None
        self.acked = multiplexer.replay_start if offset is None else offset
        self.event(
            "hello",
            version=1,
            session=multiplexer.session,
            title=factory.title(),
            offset=self.acked,
            historyStart=multiplexer.replay_start,
            historyEnd=history.end,
            clients=multiplexer.viewer_count + 1,
            readOnly=multiplexer.read_only or factory.read_only,
        )
        if not multiplexer.up:
            self.console_state(False, multiplexer.state_reason, multiplexer.state_since)
        if restarted:
            self.event("gap", reason="restart", lost=None, **{"from": None, "to": multiplexer.replay_start})
        return offset

    # -- from the page ---------------------------------------------------------------

    def message(self, attachment: Attachment, payload: bytes, is_binary: bool) -> None:
        """Binary is input (a refusal is told, with the running total); text is control."""
        if is_binary:
            refused = self.connection.typed(attachment, payload)
            if refused is not None:
                self.event("input-discarded", bytes=attachment.input_discarded, reason=refused)
            return
        self._control(payload)

    def _control(self, payload: bytes) -> None:
        connection = self.connection
        try:
            message = json.loads(payload)
            kind = message["type"]
        except (ValueError, TypeError, KeyError):
            self._log.info("peer {peer} sent a malformed control message", peer=connection.peer_name)
            connection.sendClose(4002, "malformed control message")
            return
        if kind == "ack":
            offset = message.get("offset")
            if not isinstance(offset, int) or isinstance(offset, bool):
                connection.sendClose(4002, "ack offset must be an integer")
                return
            self.acknowledge(offset)
        else:
            self._log.debug(
                "peer {peer} sent unknown control {kind!r}", peer=connection.peer_name, kind=kind
            )

    def acknowledge(self, offset: int) -> None:
        """The page has rendered every byte before C{offset}."""
        attachment = self.connection.attachment
        if attachment is None:
            return
        offset = min(offset, attachment.cursor)
        if offset <= self.acked:
            return
        self.acked = offset
        if self.skipped:
            self.skipped = [(f, t) for f, t in self.skipped if t > offset]
        if "acks" in attachment.pause_reasons:
            if self.unacknowledged(attachment) <= self.connection.factory.settings.ack_window // 2:
                attachment.resume("acks")

    def unacknowledged(self, attachment: Attachment) -> int:
        """Bytes sent to the page and not yet rendered, gaps and skips not counted."""
        acked = self.acked
        unacked = attachment.cursor - acked
        for lost_from, lost_to in self.skipped:
            unacked -= lost_to - max(lost_from, acked)
        return unacked

    # -- to the page -----------------------------------------------------------------

    def output(self, chunk: Chunk) -> None:
        connection = self.connection
        factory = connection.factory
        self._send_times(factory.multiplexer.history, chunk)
        connection.sendPreparedMessage(chunk.framed("v1", factory.frame_v1))
        attachment = connection.attachment
        if attachment is not None and self.unacknowledged(attachment) > factory.settings.ack_window:
            attachment.pause("acks")

    def _send_times(self, history: History, chunk: Chunk) -> None:
        """
        Before output, the marks saying when its bytes arrived (a C{times} message), the
        ones the page has not had yet. Live output usually has none new (one mark per
        100 ms at most): that costs two comparisons.
        """
        offset = chunk.offset
        if offset == self._timed_to and history.start <= offset > history.times.last_offset:
            self._timed_to = chunk.end
            return
        marks = history.time_marks(offset, chunk.end)
        if marks and offset == self._timed_to and marks[0][1] == self._last_time:
            del marks[0]
        self._timed_to = chunk.end
        if marks:
            self._last_time = marks[-1][1]
            self.event("times", marks=[[at, round(seconds, 3)] for at, seconds in marks])

    def gap(self, lost_from: int, lost_to: int, reason: str) -> bool:
        """
        Announce the gap and carry on (the page resets its terminal). What was sent
        before it is still on its way to the page: it stays unacknowledged; only the
        range jumped over is not owed an ack.
        """
        self.skipped = [*self.skipped, (max(lost_from, self.acked), lost_to)]
        self.event("gap", reason=reason, lost=lost_to - lost_from, **{"from": lost_from, "to": lost_to})
        return True

    def skip(self, skip_from: int, skip_to: int) -> None:
        """Say which bytes are skipped; the page marks the place and keeps its screen."""
        self.skipped = [*self.skipped, (max(skip_from, self.acked), skip_to)]
        self.event("skip", bytes=skip_to - skip_from, **{"from": skip_from, "to": skip_to})

    def clients_changed(self, count: int) -> None:
        """
        How many are on; and who, to a viewer with a credential (who may see the
        console). The list is made once per change and shared by this factory's viewers.
        """
        if not self.connection.identified:
            self.event("clients", count=count)
            return
        factory = self.connection.factory
        multiplexer = factory.multiplexer
        viewers = tuple(multiplexer.viewers())
        cached = getattr(factory, "who_cache", None)
        if cached is None or cached[0] != viewers:
            cached = factory.who_cache = (viewers, who_is_on(viewers))
        self.event("clients", count=count, **cached[1])

    def console_state(self, up: bool, reason: str, since: str) -> None:
        self.event("console", state="up" if up else "down", reason=reason, since=since)

    def closing(self, code: int, reason: str) -> None:
        """The console is gone for good (4001): say why before the close frame."""
        if code == 4001:
            self.event("closed", reason=self.connection.factory.multiplexer.closed_reason or reason)

    def event(self, kind: str, **fields: Any) -> None:
        fields["type"] = kind
        self.connection.sendMessage(json.dumps(fields).encode("utf-8"), isBinary=False)
