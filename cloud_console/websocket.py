"""
The WebSocket side of the console: one Autobahn protocol per browser.

Two protocols share the connection class:

 - no subprotocol: the original's protocol, byte for byte. Output is binary messages of
   pty bytes (history first); input is any message, text as UTF-8;
 - C{cloud-console.v1}: output messages carry their offset, the client acknowledges what
   it has rendered, can resume from an offset after a reconnect, and hears status events
   (clients, gaps, closing) as JSON text, never mixed into the terminal's bytes.

Flow control is the multiplexer's pause/cursor mechanism, driven from two places: the
transport (a push producer registered here is paused when more than C{client_buffer}
bytes are unsent) and, for v1, the client's acknowledgements (paused when more than
C{ack_window} bytes are sent but not yet rendered by the page).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any, Callable

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer, ITCPTransport
from twisted.logger import Logger
from zope.interface import implementer

from .access import OriginPolicy
from .metrics import RefusalCounts
from .multiplexer import (
    CLOSE_LAGGING,
    Attachment,
    Chunk,
    IConsoleClient,
    Multiplexer,
    skip_marker,
)

#: The subprotocol with offsets, acknowledgements, resume and status messages.
SUBPROTOCOL_V1 = "cloud-console.v1"

_OFFSET = struct.Struct("!Q")


@dataclass
class ConsoleSettings:
    """What every connection of one server shares."""

    title: str = "cloud-console"
    #: Unsent bytes a connection's transport may hold before the client is paused.
    client_buffer: int = 256 * 1024
    #: Bytes sent to a v1 client but not yet acknowledged before it is paused.
    ack_window: int = 1024 * 1024
    #: Largest input message accepted from a client.
    max_message_size: int = 1024 * 1024
    #: Which browser origins may open the WebSocket.
    origins: OriginPolicy = field(default_factory=OriginPolicy)
    #: Viewers at once; the next upgrade is refused with 503.
    max_clients: int = 256
    #: Seconds between keep-alive pings; a peer silent for twice that is dropped.
    ping_interval: float = 30.0
    #: Viewers at once over every console of the process (0: no limit), and how many
    #: there are now.
    max_clients_total: int = 0
    total_viewers: Callable[[], int] | None = None
    #: Where refused upgrades are counted (for /metrics).
    refusals: RefusalCounts | None = None


@implementer(IPushProducer)
class _TransportFlow:
    """
    The push producer a connection registers with its transport: the transport pauses
    it when its buffer passes the client's limit and resumes it once drained.
    """

    def __init__(self, protocol: ConsoleServerProtocol) -> None:
        self.protocol = protocol

    def pauseProducing(self) -> None:
        attachment = self.protocol.attachment
        if attachment is not None:
            attachment.pause("transport")

    def resumeProducing(self) -> None:
        attachment = self.protocol.attachment
        if attachment is not None:
            attachment.resume("transport")

    def stopProducing(self) -> None:
        self.protocol.detach()


@implementer(IConsoleClient)
class ConsoleServerProtocol(WebSocketServerProtocol):
    """One browser (or any WebSocket client) attached to the console."""

    _log = Logger()
    factory: ConsoleServerFactory

    attachment: Attachment | None = None
    v1 = False
    _resume_from: int | None = None
    _resume_session: str | None = None
    _acked = 0
    #: Ranges [from, to) skipped by gaps after the acknowledged offset: sent offsets jump
    #: over them, so they do not count as unacknowledged.
    _skipped: list[tuple[int, int]] = []
    _closed: Deferred[None] | None = None
    _gone = False
    _peer = "?"

    # -- handshake -------------------------------------------------------------------

    def onConnect(self, request: ConnectionRequest) -> str | None:
        """
        Refuse foreign origins and upgrades past the client limit; pick the protocol and
        note where a resuming v1 client wants to start.
        """
        self._peer = request.peer
        settings = self.factory.settings
        hosts = (request.headers.get("host"), request.headers.get("x-forwarded-host"))
        if not settings.origins.permits(request.origin, hosts):
            self._log.warn(
                "refused WebSocket from {peer}: origin {origin!r} is not {host!r} "
                "(see --allow-origin)",
                peer=request.peer,
                origin=request.origin,
                host=hosts[0],
            )
            self._refused("origin")
            raise ConnectionDeny(403, "origin not allowed")
        if self.factory.multiplexer.viewer_count >= settings.max_clients:
            self._log.warn(
                "refused WebSocket from {peer}: {clients} clients already (--max-clients)",
                peer=request.peer,
                clients=settings.max_clients,
            )
            self._refused("limit")
            raise ConnectionDeny(503, "too many clients")
        total = settings.total_viewers
        if settings.max_clients_total and total is not None and total() >= settings.max_clients_total:
            self._log.warn(
                "refused WebSocket from {peer}: {clients} clients on all consoles already "
                "(--max-clients-total)",
                peer=request.peer,
                clients=settings.max_clients_total,
            )
            self._refused("limit")
            raise ConnectionDeny(503, "too many clients")
        self.v1 = SUBPROTOCOL_V1 in request.protocols
        if self.v1:
            values = request.params.get("from")
            if values:
                try:
                    resume_from = int(values[0])
                    if resume_from < 0:
                        raise ValueError
                except ValueError:
                    raise ConnectionDeny(400, "'from' must be a byte offset (an integer >= 0)")
                self._resume_from = resume_from
                sessions = request.params.get("session")
                self._resume_session = sessions[0] if sessions else None
            return SUBPROTOCOL_V1
        return None

    def _refused(self, reason: str) -> None:
        refusals = self.factory.settings.refusals
        if refusals is not None:
            refusals.count(reason)

    def onOpen(self) -> None:
        """
        Take over flow control of the transport and attach to the console.

        twisted.web's channel stays registered as the transport's producer after the
        upgrade, so it is unregistered before ours goes in.
        """
        settings = self.factory.settings
        transport: Any = self.transport
        if ITCPTransport.providedBy(transport):
            transport.setTcpNoDelay(True)
        if getattr(transport, "producer", None) is not None:
            transport.unregisterProducer()
        if hasattr(transport, "bufferSize"):
            transport.bufferSize = settings.client_buffer
        transport.registerProducer(_TransportFlow(self), True)
        multiplexer = self.factory.multiplexer
        self._closed = Deferred()
        if multiplexer.closed_reason is not None:
            self.close(4001, f"console closed: {multiplexer.closed_reason}")
            return
        resume_from = None
        if self.v1:
            resume_from = self._start_v1(multiplexer)
        # Register first, then send: the transport may pause us while the history goes out.
        self.attachment = multiplexer.attach(
            self, resume_from, start=False, read_only=self.factory.read_only
        )
        multiplexer.start(self.attachment)

    def _start_v1(self, multiplexer: Multiplexer) -> int | None:
        """
        Say hello, and decide where this client's stream starts: after the offset it
        holds if it is resuming this session, else the whole history. A client resuming
        another session (the server restarted) is told to reset first.
        """
        history = multiplexer.history
        offset = self._resume_from
        session = self._resume_session
        restarted = offset is not None and (
            (session is not None and session != multiplexer.session) or offset > history.end
        )
        if offset is None or restarted:
            offset = None
        self._acked = multiplexer.replay_start if offset is None else offset
        self._send_event(
            "hello",
            version=1,
            session=multiplexer.session,
            title=self.factory.title(),
            offset=self._acked,
            historyStart=multiplexer.replay_start,
            historyEnd=history.end,
            clients=multiplexer.viewer_count + 1,
            readOnly=multiplexer.read_only or self.factory.read_only,
        )
        if not multiplexer.up:
            self.console_state(False, multiplexer.state_reason, multiplexer.state_since)
        if restarted:
            self._send_event(
                "gap",
                reason="restart",
                lost=None,
                **{"from": None, "to": multiplexer.replay_start},
            )
        return offset

    # -- input -----------------------------------------------------------------------

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        """Binary is input; text is input (original protocol) or a v1 control message."""
        attachment = self.attachment
        if attachment is None:
            return
        if isBinary or not self.v1:
            refused = attachment.send_input(payload)
            if refused is not None and self.v1:
                self._send_event(
                    "input-discarded", bytes=attachment.input_discarded, reason=refused
                )
            return
        self._control(payload)

    def _control(self, payload: bytes) -> None:
        try:
            message = json.loads(payload)
            kind = message["type"]
        except (ValueError, TypeError, KeyError):
            self._log.info("peer {peer} sent a malformed control message", peer=self._peer)
            self.sendClose(4002, "malformed control message")
            return
        if kind == "ack":
            offset = message.get("offset")
            if not isinstance(offset, int) or isinstance(offset, bool):
                self.sendClose(4002, "ack offset must be an integer")
                return
            self.acknowledge(offset)
        else:
            self._log.debug("peer {peer} sent unknown control {kind!r}", peer=self._peer, kind=kind)

    def acknowledge(self, offset: int) -> None:
        """The page has rendered every byte before C{offset}."""
        attachment = self.attachment
        if attachment is None:
            return
        offset = min(offset, attachment.cursor)
        if offset <= self._acked:
            return
        self._acked = offset
        if self._skipped:
            self._skipped = [(f, t) for f, t in self._skipped if t > offset]
        if "acks" in attachment.pause_reasons:
            if self._unacknowledged(attachment) <= self.factory.settings.ack_window // 2:
                attachment.resume("acks")

    def _unacknowledged(self, attachment: Attachment) -> int:
        """Bytes sent to the page and not yet rendered, gaps not counted."""
        acked = self._acked
        unacked = attachment.cursor - acked
        for lost_from, lost_to in self._skipped:
            unacked -= lost_to - max(lost_from, acked)
        return unacked

    # -- IConsoleClient --------------------------------------------------------------

    def output(self, chunk: Chunk) -> None:
        if self.v1:
            self.sendPreparedMessage(chunk.framed("v1", self.factory.frame_v1))
            attachment = self.attachment
            if attachment is not None:
                if self._unacknowledged(attachment) > self.factory.settings.ack_window:
                    attachment.pause("acks")
        else:
            self.sendPreparedMessage(chunk.framed("raw", self.factory.frame_raw))

    def gap(self, lost_from: int, lost_to: int, reason: str) -> bool:
        """
        v1: announce the gap and carry on from the oldest byte held (the page resets
        its terminal). The original protocol has no way to say so, so the client is
        closed with the "lagging" code and reconnects to repaint from the history.
        """
        lost = lost_to - lost_from
        self._log.info(
            "peer {peer} lost {lost} bytes ({reason})", peer=self._peer, lost=lost, reason=reason
        )
        if self.v1:
            # What was sent before the gap is still on its way to the page: it stays
            # unacknowledged; only the skipped range is not owed an ack.
            self._skipped = [*self._skipped, (max(lost_from, self._acked), lost_to)]
            self._send_event("gap", reason=reason, lost=lost, **{"from": lost_from, "to": lost_to})
            return True
        self.close(CLOSE_LAGGING, f"lagging: {lost} bytes fell out of the history")
        return False

    def skip(self, skip_from: int, skip_to: int) -> None:
        """
        v1: say which bytes are skipped (the page marks the place, no reset). The
        original protocol has only the byte stream: a marker line goes in it.
        """
        skipped = skip_to - skip_from
        if self.v1:
            self._skipped = [*self._skipped, (max(skip_from, self._acked), skip_to)]
            self._send_event("skip", bytes=skipped, **{"from": skip_from, "to": skip_to})
        else:
            self.sendMessage(skip_marker(skipped), isBinary=True)

    def clients_changed(self, count: int) -> None:
        if self.v1:
            self._send_event("clients", count=count)

    def console_state(self, up: bool, reason: str, since: str) -> None:
        """v1: the console went down or came back (the original protocol cannot say)."""
        if self.v1:
            self._send_event("console", state="up" if up else "down", reason=reason, since=since)

    def close(self, code: int, reason: str) -> Deferred[None]:
        """Send a close frame with C{code} and C{reason}; fires once the peer is gone."""
        if self._gone or self._closed is None:
            return succeed(None)
        closed = self._closed
        self.detach()
        if self.v1 and code == 4001:
            why = self.factory.multiplexer.closed_reason or reason
            self._send_event("closed", reason=why)
        if self.state == WebSocketServerProtocol.STATE_OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123])
        d: Deferred[None] = Deferred()
        closed.addBoth(lambda result: d.callback(None))
        return d

    # -- teardown --------------------------------------------------------------------

    def detach(self) -> None:
        """Stop getting output (idempotent)."""
        attachment, self.attachment = self.attachment, None
        if attachment is not None:
            attachment.detach()

    def sendCloseFrame(
        self, code: int | None = None, reasonUtf8: bytes | None = None, isReply: bool = False
    ) -> None:
        """Every close (ours, the peer's, a refused frame) detaches first: no output after it."""
        self.detach()
        WebSocketServerProtocol.sendCloseFrame(self, code, reasonUtf8, isReply)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.detach()
        self._gone = True
        closed, self._closed = self._closed, None
        if closed is not None:
            closed.callback(None)

    # -- helpers ---------------------------------------------------------------------

    def _send_event(self, kind: str, **fields: Any) -> None:
        fields["type"] = kind
        self.sendMessage(json.dumps(fields).encode("utf-8"), isBinary=False)


class ConsoleServerFactory(WebSocketServerFactory):
    """Builds L{ConsoleServerProtocol}s for one multiplexer, with one set of options."""

    protocol = ConsoleServerProtocol  # type: ignore[assignment]

    def __init__(
        self,
        multiplexer: Multiplexer,
        settings: ConsoleSettings,
        read_only: bool = False,
        title: Callable[[], str] | None = None,
    ) -> None:
        WebSocketServerFactory.__init__(self, server="cloud-console")
        self.multiplexer = multiplexer
        self.settings = settings
        self._title = title
        #: Whether this factory's viewers (a read-only credential's) may not type.
        self.read_only = read_only
        # One call: each call resets the options it is not given.
        self.setProtocolOptions(
            # Input is keystrokes and pastes; anything bigger is abuse.
            maxMessagePayloadSize=settings.max_message_size,
            maxFramePayloadSize=settings.max_message_size,
            # Notice peers that vanished without a close frame.
            autoPingInterval=settings.ping_interval,
            autoPingTimeout=2 * settings.ping_interval,
            # A half-open upgrade must not hold a slot forever.
            openHandshakeTimeout=10,
            # A peer closed as lagging first reads what is queued before the close frame
            # (up to the client buffer plus the sockets' buffers): give it time to.
            closeHandshakeTimeout=5,
            # A refused frame (too big, unmasked, bad UTF-8) gets a close frame with the
            # reason rather than a silently dropped connection.
            failByDrop=False,
            # No status page naming library versions on a plain GET /ws.
            webStatus=False,
            # Output is framed once and shared; per-client compression would undo that.
            perMessageCompressionAccept=lambda offers: None,
        )

    def title(self) -> str:
        """The console's title now (a reload may change it in place)."""
        return self._title() if self._title is not None else self.settings.title

    def frame_raw(self, chunk: Chunk) -> Any:
        """The original protocol's frame: the bytes alone."""
        return self.prepareMessage(chunk.data, isBinary=True)

    def frame_v1(self, chunk: Chunk) -> Any:
        """The v1 frame: the offset of the first byte, then the bytes."""
        return self.prepareMessage(_OFFSET.pack(chunk.offset) + chunk.data, isBinary=True)
