"""
The WebSocket side of the console: one Autobahn protocol per browser.

The connection class does the handshake, flow control and teardown; the two protocols
it may speak (the original's, and C{cloud-console.v1}) are its dialects
(L{cloud_console.web.dialects}).

Flow control is the multiplexer's pause/cursor mechanism, driven from two places: the
transport (a push producer registered here is paused when more than C{client_buffer}
bytes are unsent) and, for v1, the client's acknowledgements (paused when more than
C{ack_window} bytes are sent but not yet rendered by the page).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer, ITCPTransport
from twisted.logger import Logger
from zope.interface import implementer

from ..access.audit import NO_AUDIT, Audit, Trail
from ..console.multiplexer import (
    Attachment,
    Chunk,
    ClientLabel,
    IActionNotices,
    IConsoleClient,
    Multiplexer,
)
from .dialects import SUBPROTOCOL_V1, OriginalDialect, V1Dialect, frame_raw, frame_v1
from .metrics import RefusalCounts
from .origin import OriginPolicy

__all__ = ["SUBPROTOCOL_V1", "ConsoleServerFactory", "ConsoleServerProtocol", "ConsoleSettings"]

#: Output this small is written to the socket at once (see L{ConsoleServerProtocol.output}).
INTERACTIVE_OUTPUT = 1024


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
    #: Where attaches, input, detaches and refusals are audited (C{--audit-log}).
    audit: Audit = NO_AUDIT


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


@implementer(IConsoleClient, IActionNotices)
class ConsoleServerProtocol(WebSocketServerProtocol):
    """
    One browser (or any WebSocket client) attached to the console: the handshake
    (origin, limits, which dialect), flow control, attaching and closing. What the
    console says is put in words by the connection's dialect (L{cloud_console.web.dialects}).
    """

    _log = Logger()
    factory: ConsoleServerFactory

    attachment: Attachment | None = None
    dialect: OriginalDialect | V1Dialect
    _closed: Deferred[None] | None = None
    _gone = False
    peer_name = "?"
    #: Who the gate let in (identity, address), as the resource told the factory.
    viewer: tuple[str, str] | None = None
    #: This viewer's part of the audit log, once attached.
    trail: Trail | None = None
    #: Whether it came with a credential (and so may be told who else is on).
    identified = False

    @property
    def v1(self) -> bool:
        """Whether this connection speaks cloud-console.v1."""
        return isinstance(self.dialect, V1Dialect)

    # -- handshake -------------------------------------------------------------------

    def onConnect(self, request: ConnectionRequest) -> str | None:
        """
        Refuse foreign origins and upgrades past the client limits; pick the dialect and
        note where a resuming v1 client wants to start.
        """
        self.peer_name = request.peer
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
        if SUBPROTOCOL_V1 not in request.protocols:
            self.dialect = OriginalDialect(self)
            return None
        resume_from = None
        session = None
        values = request.params.get("from")
        if values:
            try:
                resume_from = int(values[0])
                if resume_from < 0:
                    raise ValueError
            except ValueError:
                raise ConnectionDeny(400, "'from' must be a byte offset (an integer >= 0)")
            sessions = request.params.get("session")
            session = sessions[0] if sessions else None
        self.dialect = V1Dialect(self, resume_from, session)
        return SUBPROTOCOL_V1

    def _refused(self, reason: str) -> None:
        settings = self.factory.settings
        if settings.refusals is not None:
            settings.refusals.count(reason)
        identity, address = self.viewer or ("anonymous", self.peer_name)
        settings.audit.refused("web", reason, address, identity, self.factory.console_name)

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
        resume_from = self.dialect.start(multiplexer)
        # Register first, then send: the transport may pause us while the history goes out.
        identity, address = self.viewer or ("anonymous", self.peer_name)
        label = ClientLabel("web", identity, address, time.time())
        self.attachment = multiplexer.attach(
            self, resume_from, start=False, read_only=self.factory.read_only, label=label
        )
        self.trail = settings.audit.attached(
            self.factory.console_name, label, self.factory.read_only or multiplexer.read_only
        )
        multiplexer.start(self.attachment)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        attachment = self.attachment
        if attachment is not None:
            self.dialect.message(attachment, payload, isBinary)

    def typed(self, attachment: Attachment, data: bytes) -> str | None:
        """Send what the viewer typed to the console (audited); return why not, if refused."""
        refused = attachment.send_input(data)
        if self.trail is not None:
            self.trail.input(data, refused)
        return refused

    # -- IConsoleClient --------------------------------------------------------------

    def output(self, chunk: Chunk) -> None:
        self.dialect.output(chunk)
        if len(chunk.data) <= INTERACTIVE_OUTPUT:
            self._write_now()

    def _write_now(self) -> None:
        """
        Hand a small message (an echo, a prompt) to the socket in this reactor turn
        rather than the next: the transport would otherwise wait for the next turn, which
        a console flooding beside this one makes long. Bulk output keeps the transport's
        own pace (and its coalescing).
        """
        transport: Any = self.transport
        write = getattr(transport, "doWrite", None)
        if write is not None and transport.connected and not transport.disconnecting:
            write()

    def gap(self, lost_from: int, lost_to: int, reason: str) -> bool:
        self._log.info(
            "peer {peer} lost {lost} bytes ({reason})",
            peer=self.peer_name,
            lost=lost_to - lost_from,
            reason=reason,
        )
        return self.dialect.gap(lost_from, lost_to, reason)

    def skip(self, skip_from: int, skip_to: int) -> None:
        self.dialect.skip(skip_from, skip_to)

    def clients_changed(self, count: int) -> None:
        self.dialect.clients_changed(count)

    def console_state(self, up: bool, reason: str, since: str) -> None:
        self.dialect.console_state(up, reason, since)

    def action_done(self, who: str, description: str, at: str) -> None:
        """Someone used an action on this console: v1 pages are told (C{action} message)."""
        if isinstance(self.dialect, V1Dialect):
            self.dialect.event("action", who=who, action=description, at=at)

    def close(self, code: int, reason: str) -> Deferred[None]:
        """Send a close frame with C{code} and C{reason}; fires once the peer is gone."""
        if self._gone or self._closed is None:
            return succeed(None)
        closed = self._closed
        self.detach()
        self.dialect.closing(code, reason)
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
        trail, self.trail = self.trail, None
        if trail is not None:
            trail.detached()

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


class ConsoleServerFactory(WebSocketServerFactory):
    """Builds L{ConsoleServerProtocol}s for one multiplexer, with one set of options."""

    protocol = ConsoleServerProtocol  # type: ignore[assignment]

    def __init__(
        self,
        multiplexer: Multiplexer,
        settings: ConsoleSettings,
        read_only: bool = False,
        title: Callable[[], str] | None = None,
        console_name: str | None = None,
    ) -> None:
        WebSocketServerFactory.__init__(self, server="cloud-console")
        self.multiplexer = multiplexer
        #: The console's name (C{None} with one console), for the audit log.
        self.console_name = console_name
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

    #: The identity and address of the upgrade being handled (see L{buildProtocol}),
    #: and whether a credential vouches for it.
    next_viewer: tuple[str, str] | None = None
    next_identified = False
    #: The last who-is-on list sent, with the attachments it was made for.
    who_cache: tuple[tuple[tuple[ClientLabel | None, bool], ...], dict[str, Any]] | None = None

    def buildProtocol(self, addr: Any) -> Any:
        protocol = WebSocketServerFactory.buildProtocol(self, addr)
        if isinstance(protocol, ConsoleServerProtocol):
            protocol.viewer = self.next_viewer
            protocol.identified = self.next_identified
        return protocol

    def title(self) -> str:
        """The console's title now (a reload may change it in place)."""
        return self._title() if self._title is not None else self.settings.title

    def frame_raw(self, chunk: Chunk) -> Any:
        """The original protocol's frame (built once per chunk, shared by its clients)."""
        return frame_raw(self, chunk)

    def frame_v1(self, chunk: Chunk) -> Any:
        """The v1 frame (built once per chunk, shared by its clients)."""
        return frame_v1(self, chunk)
