"""
The one test harness: WebSocket framing by hand, a site on a StringTransport, a real
cloud-console.v1 client, the guest's side of a real pty, and real server processes.

Frames are built and parsed here, independently of Autobahn, so the tests check what goes
over the wire rather than what the library under test believes it sent.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import random
import select
import socket
import struct
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import txaio
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, protocol, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8


@dataclass
class Frame:
    """One decoded WebSocket frame."""

    fin: bool
    opcode: int
    payload: bytes

    @property
    def close_code(self) -> int | None:
        if self.opcode != OP_CLOSE or len(self.payload) < 2:
            return None
        return int(struct.unpack("!H", self.payload[:2])[0])

    @property
    def close_reason(self) -> str:
        return self.payload[2:].decode("utf-8")

    def json(self) -> Any:
        assert self.opcode == OP_TEXT, self
        return json.loads(self.payload)


def encode_frame(
    opcode: int, payload: bytes, mask: bool = True, fin: bool = True, length: int | None = None
) -> bytes:
    """
    A client frame, masked with a random key unless told otherwise (fast enough for
    megabytes). C{length} overrides the declared payload length (to announce more than
    is sent).
    """
    size = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | opcode])
    mask_bit = 0x80 if mask else 0
    if size < 126:
        head += bytes([mask_bit | size])
    elif size < 65536:
        head += bytes([mask_bit | 126]) + struct.pack("!H", size)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", size)
    if not mask:
        return head + payload
    key = os.urandom(4)
    if not payload:
        return head + key
    keystream = (key * (len(payload) // 4 + 1))[: len(payload)]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(keystream, "big")).to_bytes(
        len(payload), "big"
    )
    return head + key + masked


def write_self_signed(directory: Path) -> tuple[Path, Path, bytes]:
    """
    A fresh key and self-signed certificate for localhost and 127.0.0.1, written as PEM
    files into C{directory}; returns the key's path, the certificate's path and its PEM.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pem = certificate.public_bytes(serialization.Encoding.PEM)
    cert_path.write_bytes(pem)
    return key_path, cert_path, pem


def decode_frames(data: bytes) -> tuple[list[Frame], bytes]:
    """Parse unmasked server frames; return them and any incomplete tail."""
    frames = []
    position = 0
    while True:
        if len(data) - position < 2:
            break
        b0, b1 = data[position], data[position + 1]
        size = b1 & 0x7F
        header = 2
        if size == 126:
            if len(data) - position < 4:
                break
            size = struct.unpack("!H", data[position + 2 : position + 4])[0]
            header = 4
        elif size == 127:
            if len(data) - position < 10:
                break
            size = struct.unpack("!Q", data[position + 2 : position + 10])[0]
            header = 10
        assert not b1 & 0x80, "server frames must not be masked"
        if len(data) - position < header + size:
            break
        start = position + header
        frames.append(Frame(bool(b0 & 0x80), b0 & 0x0F, data[start : start + size]))
        position = start + size
    return frames, data[position:]


def handshake(
    path: str = "/ws",
    protocols: list[str] | None = None,
    origin: str | None = None,
    host: str = "127.0.0.1:8080",
    extra: dict[str, str] | None = None,
    method: str = "GET",
    extra_lines: list[str] | None = None,
) -> bytes:
    """The bytes of a client's upgrade request (C{extra_lines}: raw header lines)."""
    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version: 13",
    ]
    if protocols:
        lines.append("Sec-WebSocket-Protocol: " + ", ".join(protocols))
    if origin is not None:
        lines.append(f"Origin: {origin}")
    for name, value in (extra or {}).items():
        lines.append(f"{name}: {value}")
    lines.extend(extra_lines or [])
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class FakePty:
    """
    Stands in for the console device as the multiplexer sees it: buffered writes,
    reading started and stopped, closes counted.

    @ivar written: every byte written, in order; L{writes} keeps each write apart.
    @ivar holds_input: the guest takes no input until L{drain} (what is written stays in
        L{pending_input}); otherwise it reads everything at once.
    """

    def __init__(self, holds_input: bool = False) -> None:
        self.holds_input = holds_input
        self.written = bytearray()
        self.writes: list[bytes] = []
        self.pending_input = 0
        self.reading = False
        self.closed = 0
        self.watched = False

    def write(self, data: bytes) -> None:
        self.written += data
        self.writes.append(data)
        if self.holds_input:
            self.pending_input += len(data)

    def drain(self) -> None:
        """The guest read everything queued."""
        self.pending_input = 0

    def startReading(self) -> None:
        self.reading = True

    def stopReading(self) -> None:
        self.reading = False

    def set_watched(self, watched: bool) -> None:
        self.watched = watched

    def close(self) -> None:
        self.closed += 1


class WebClient:
    """One connection to a site over a StringTransport, read as frames."""

    def __init__(self, site: Any, peer_port: int) -> None:
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", peer_port))
        channel = site.buildProtocol(self.transport.getPeer())
        # Real transports know their protocol; WebSocketResource swaps it on upgrade.
        self.transport.protocol = channel  # type: ignore[attr-defined]
        channel.makeConnection(self.transport)
        self._buffer = b""
        self.response = b""

    @property
    def protocol(self) -> Any:
        return self.transport.protocol  # type: ignore[attr-defined]

    def send_raw(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def upgrade(self, **kwargs: Any) -> bytes:
        """Send the handshake; return the HTTP response head."""
        self.send_raw(handshake(**kwargs))
        data = self.transport.value()
        self.transport.clear()
        head, sep, rest = data.partition(b"\r\n\r\n")
        self.response = head + sep
        self._buffer = rest
        return self.response

    def send(self, opcode: int, payload: bytes) -> None:
        self.send_raw(encode_frame(opcode, payload))

    def frames(self) -> list[Frame]:
        """Frames written since the last call."""
        self._buffer += self.transport.value()
        self.transport.clear()
        frames, self._buffer = decode_frames(self._buffer)
        return frames

    def output(self) -> bytes:
        """Binary payloads written since the last call, joined (original protocol)."""
        return b"".join(f.payload for f in self.frames() if f.opcode == OP_BINARY)


def use_memory_reactor(test: SynchronousTestCase) -> MemoryReactorClock:
    """
    Point txaio (which schedules Autobahn's timers) at a memory reactor for one test.
    """
    reactor = MemoryReactorClock()
    previous = txaio.config.loop
    txaio.config.loop = reactor
    test.addCleanup(setattr, txaio.config, "loop", previous)
    return reactor


class V1Client(WebSocketClientProtocol):  # type: ignore[misc]
    """
    A real cloud-console.v1 client (Autobahn): reassembles the output stream by offset,
    acknowledges it as a page would, records every event, and fires Deferreds when a
    condition on what it has holds (never a sleep).

    @ivar stream: the output bytes, from C{first_offset} on, with skipped ranges left
        out; C{offsets} is where each received message started.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stream = bytearray()
        self.first_offset: int | None = None
        self.next_offset: int | None = None
        self.events: list[dict[str, Any]] = []
        self.offsets: list[int] = []
        self.pings = 0
        self.pongs: list[bytes] = []
        self.opened: Deferred[None] = Deferred()
        self.closed: Deferred[tuple[int | None, str | None]] = Deferred()
        self.close_status: tuple[int | None, str | None] | None = None
        self._waiters: list[tuple[Callable[[V1Client], bool], Deferred[None]]] = []

    def onOpen(self) -> None:
        self.opened.callback(None)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            (offset,) = struct.unpack("!Q", payload[:8])
            if self.first_offset is None:
                self.first_offset = offset
            if self.next_offset is not None and offset != self.next_offset:
                raise AssertionError(f"output at {offset}, expected {self.next_offset}")
            self.offsets.append(offset)
            self.stream += payload[8:]
            self.next_offset = offset + len(payload) - 8
            self.sendMessage(json.dumps({"type": "ack", "offset": self.next_offset}).encode())
        else:
            event = json.loads(payload)
            self.events.append(event)
            if event["type"] == "hello":
                self.next_offset = event["offset"]
            elif event["type"] in ("skip", "gap") and event.get("to") is not None:
                self.next_offset = event["to"]
        self._check()

    def onPing(self, payload: bytes) -> None:
        """The server's keep-alive: counted (time passing, as an event), then answered."""
        self.pings += 1
        super().onPing(payload)
        self._check()

    def onPong(self, payload: bytes) -> None:
        """The answer to L{sendPing}: the server has handled every frame sent before."""
        self.pongs.append(payload)
        self._check()

    def text(self) -> str:
        """The output so far, decoded leniently (for searching a guest's messages)."""
        return self.stream.decode("utf-8", "replace")

    def events_of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    def wait_for(self, condition: Callable[[V1Client], bool]) -> Deferred[None]:
        """Fires once C{condition(self)} holds; fails if the connection closes first."""
        d: Deferred[None] = Deferred()
        if condition(self):
            d.callback(None)
        elif self.close_status is not None:
            d.errback(AssertionError(f"closed {self.close_status} before the condition held"))
        else:
            self._waiters.append((condition, d))
        return d

    def wait_text(self, needle: str) -> Deferred[None]:
        return self.wait_for(lambda client: needle in client.text())

    def _check(self) -> None:
        for waiter in [w for w in self._waiters if w[0](self)]:
            self._waiters.remove(waiter)
            waiter[1].callback(None)

    def type(self, data: bytes) -> None:
        """Input, as the page sends it (a binary message)."""
        self.sendMessage(data, isBinary=True)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.close_status = (code, reason)
        waiters, self._waiters = self._waiters, []
        for _, d in waiters:
            d.errback(AssertionError(f"closed ({code}, {reason!r}) while waiting"))
        if not self.opened.called:
            self.opened.errback(AssertionError(f"not opened: {code} {reason}"))
        self.closed.callback((code, reason))


async def connect_v1(port: int, path: str = "/ws", headers: dict[str, str] | None = None) -> V1Client:
    """A connected, opened L{V1Client} to a server on 127.0.0.1:C{port} (the upgrade with C{headers})."""
    factory = WebSocketClientFactory(
        f"ws://127.0.0.1:{port}{path}", protocols=["cloud-console.v1"], headers=headers or {}
    )
    factory.protocol = V1Client
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    client: V1Client = await endpoint.connect(factory)
    await client.opened
    return client


# -- real processes and ptys -----------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def _ephemeral_ports() -> tuple[int, int]:
    """The range the kernel takes local ports of outgoing connections from."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = f.read().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(family: int = socket.AF_INET, host: str = "127.0.0.1") -> int:
    """
    A port nobody listens on right now (the positional CLI needs a number), for a server
    to bind a moment later.

    Taken at random outside the kernel's ephemeral range, not from it (as a bind to port 0
    would): in between, any connection the tests make, in this process or in another
    trial worker, could be given an ephemeral port as its own, and the server would then
    fail to bind.
    """
    low, high = _ephemeral_ports()
    start, stop = (10000, low) if low > 11000 else (high + 1, 65536)
    if stop - start < 1000:  # no room outside the range: leave the choice to the kernel
        start, stop = 0, 1
    for _ in range(100):
        port = random.randrange(start, stop)
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise RuntimeError(f"no free port found on {host} in [{start}, {stop})")


class Guest:
    """
    The guest: the pty's master side, read and written through the reactor (one object
    for both directions, as the epoll reactor wants one per descriptor).

    @ivar input: every byte the console wrote to the guest.
    """

    def __init__(self) -> None:
        self.master, slave = os.openpty()
        self.slave = slave
        self.path = os.ttyname(slave)
        os.set_blocking(self.master, False)
        self.input = bytearray()
        self.open = True
        self.reading = False
        self._pending = memoryview(b"")
        self._written: defer.Deferred[None] | None = None
        self._input_waiters: list[tuple[Callable[[bytes], bool], defer.Deferred[None]]] = []

    # reactor interface
    def fileno(self) -> int:
        return self.master

    def logPrefix(self) -> str:
        return "guest"

    def connectionLost(self, reason: Any) -> None:
        pass

    def doRead(self) -> None:
        try:
            data = os.read(self.master, 65536)
        except OSError:
            return
        self.input += data
        for waiter in list(self._input_waiters):
            if waiter[0](bytes(self.input)):
                self._input_waiters.remove(waiter)
                waiter[1].callback(None)

    def doWrite(self) -> None:
        while self._pending:
            try:
                written = os.write(self.master, self._pending)
            except BlockingIOError:
                return
            except OSError as e:
                reactor.removeWriter(self)  # type: ignore[attr-defined]
                d, self._written = self._written, None
                if d is not None:
                    d.errback(e)
                return
            self._pending = self._pending[written:]
        reactor.removeWriter(self)  # type: ignore[attr-defined]
        d, self._written = self._written, None
        if d is not None:
            d.callback(None)

    # test interface
    def start_reading(self) -> None:
        if not self.reading:
            self.reading = True
            reactor.addReader(self)  # type: ignore[attr-defined]

    def stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            reactor.removeReader(self)  # type: ignore[attr-defined]

    def write(self, data: bytes) -> defer.Deferred[None]:
        """Write C{data} as the guest reads it; fires once all of it is in the pty."""
        assert self._written is None, "one write at a time"
        self._pending = memoryview(bytes(data))
        d = self._written = defer.Deferred()
        reactor.addWriter(self)  # type: ignore[attr-defined]
        self.doWrite()  # as much as the pty takes now; the rest as it drains
        return d

    def receives(self, condition: Callable[[bytes], bool]) -> defer.Deferred[None]:
        """Fires once the guest's input satisfies C{condition}."""
        d: defer.Deferred[None] = defer.Deferred()
        self._input_waiters.append((condition, d))
        if condition(bytes(self.input)):
            self._input_waiters.remove((condition, d))
            d.callback(None)
        return d

    def hang_up(self) -> None:
        """Close the master: the console hangs up (the VM stopped)."""
        if self.open:
            self.stop_reading()
            reactor.removeWriter(self)  # type: ignore[attr-defined]
            os.close(self.master)
            self.open = False

    def close(self) -> None:
        self.hang_up()
        os.close(self.slave)


class ThreadedGuest:
    """
    The guest's side of a real pty pair for tests that run outside the reactor (a
    browser driven by Playwright's synchronous API): a thread collects what the console
    types (and hands it to L{on_input}); waits block, with a deadline.
    """

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        self.path = os.ttyname(self.slave)
        self.written = 0
        self.received = bytearray()
        self.on_input: Callable[[bytes], None] | None = None
        self._changed = threading.Condition()
        self._write_lock = threading.Lock()
        self._stop_r, self._stop_w = os.pipe()
        self._open = True
        self._reader = threading.Thread(target=self._read, name="guest-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            ready, _, _ = select.select([self.master, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if not data:
                return
            with self._changed:
                self.received += data
                self._changed.notify_all()
            if self.on_input is not None:
                self.on_input(data)

    def write(self, data: bytes) -> None:
        """Print C{data} (blocks while the console is not reading)."""
        with self._write_lock:
            view = memoryview(data)
            while view:
                view = view[os.write(self.master, view) :]
            with self._changed:
                self.written += len(data)
                self._changed.notify_all()

    def print(self, *lines: str) -> None:
        self.write("".join(line + "\r\n" for line in lines).encode("utf-8"))

    def wait_for_input(self, needle: bytes, timeout: float = 15) -> None:
        """Wait until the console has typed C{needle} into the guest."""
        with self._changed:
            if not self._changed.wait_for(lambda: needle in self.received, timeout):
                raise AssertionError(
                    f"the guest never got {needle!r}; last input: {bytes(self.received[-200:])!r}"
                )

    def wait_written(self, count: int, timeout: float = 60) -> None:
        """Wait until at least C{count} bytes have been printed (by another thread)."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.written >= count, timeout):
                raise AssertionError(f"the guest printed only {self.written} of {count} bytes")

    def hang_up(self) -> None:
        """Close the pty as a VM that went away does (idempotent)."""
        if not self._open:
            return
        self._open = False
        os.write(self._stop_w, b"x")
        self._reader.join(10)
        for fd in (self.master, self.slave, self._stop_r, self._stop_w):
            os.close(fd)


class Server(protocol.ProcessProtocol):
    """
    A cloud-console process: L{listening} fires once its port is up, L{ended} at exit;
    L{log_line} waits for something in its log.
    """

    def __init__(self) -> None:
        self.stderr = b""
        self.listening: defer.Deferred[None] = defer.Deferred()
        self.ended: defer.Deferred[int] = defer.Deferred()
        self.status: int | None = None
        self._waiters: list[tuple[Callable[[bytes], bool], defer.Deferred[None]]] = []

    def errReceived(self, data: bytes) -> None:
        self.stderr += data
        if not self.listening.called and b"starting on" in self.stderr:
            self.listening.callback(None)
        for waiter in list(self._waiters):
            if waiter[0](self.stderr):
                self._waiters.remove(waiter)
                waiter[1].callback(None)
        if b"Traceback" in self.stderr or b"Unhandled" in self.stderr:
            # Whatever is awaited, the server has failed: say so now, not at the timeout.
            waiters, self._waiters = self._waiters, []
            for _, d in waiters:
                d.errback(AssertionError("error in the server's log:\n" + self.stderr.decode(errors="replace")))

    outReceived = errReceived

    def processEnded(self, reason: Any) -> None:
        code = reason.value.exitCode
        self.status = code if code is not None else -reason.value.signal
        if not self.listening.called:
            self.listening.errback(RuntimeError(f"server exited: {self.stderr.decode()}"))
        for _, d in self._waiters:
            d.errback(RuntimeError(f"server exited {self.status} first"))
        self._waiters.clear()
        self.ended.callback(self.status)

    def log_line(self, condition: Callable[[bytes], bool]) -> defer.Deferred[None]:
        """Fires once the server's log (stderr) satisfies C{condition}."""
        d: defer.Deferred[None] = defer.Deferred()
        if condition(self.stderr):
            d.callback(None)
        elif self.status is not None:
            d.errback(RuntimeError(f"server exited {self.status}"))
        else:
            self._waiters.append((condition, d))
        return d

    def count(self, text: bytes) -> int:
        return self.stderr.count(text)

    @property
    def pid(self) -> int:
        return int(self.transport.pid)  # type: ignore[union-attr]

    def rss_kib(self) -> int:
        """The process's resident set (VmRSS), in KiB."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def signal(self, name: str) -> None:
        self.transport.signalProcess(name)  # type: ignore[union-attr]


def spawn_python(args: list[str]) -> Server:
    """This checkout's Python with C{args} (C{-m cloud_console.cli ...}, twistd), watched."""
    server = Server()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    reactor.spawnProcess(  # type: ignore[attr-defined]
        server, sys.executable, [sys.executable, *args], env=env, path=str(ROOT)
    )
    return server


#: C{twistd}, as this checkout's Python runs it (C{spawn_python([*TWISTD, ...])}).
TWISTD = ["-c", "from twisted.scripts.twistd import run; run()"]


def spawn_server(args: list[str]) -> Server:
    """A C{cloud-console ARGS} process (the positional or the option form)."""
    return spawn_python(["-m", "cloud_console.cli", *args])


async def serve_process(test: TestCase, args: list[str]) -> Server:
    """A cloud-console process with C{args}, killed at the test's end; returns once it listens."""
    server = spawn_server(args)

    async def kill() -> None:
        if server.status is None:
            server.signal("KILL")
            await server.ended

    test.addCleanup(kill)
    await server.listening
    return server


async def http_request(
    port: int, path: str, headers: dict[str, str] | None = None
) -> tuple[int, Any, bytes]:
    """A GET to 127.0.0.1:C{port}: the status, the response headers and the body."""
    from twisted.web.client import Agent, readBody
    from twisted.web.http_headers import Headers

    raw = Headers({k.encode(): [v.encode()] for k, v in (headers or {}).items()})
    response = await Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}{path}".encode(), raw)
    return response.code, response.headers, await readBody(response)


async def http_post(
    port: int, path: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """A POST of C{body} to 127.0.0.1:C{port}: the status and the body (JSON decoded if it is)."""
    import json
    from io import BytesIO

    from twisted.web.client import Agent, FileBodyProducer, readBody
    from twisted.web.http_headers import Headers

    raw = Headers({k.encode(): [v.encode()] for k, v in (headers or {}).items()})
    response = await Agent(reactor).request(
        b"POST", f"http://127.0.0.1:{port}{path}".encode(), raw, FileBodyProducer(BytesIO(body))
    )
    data = await readBody(response)
    types = response.headers.getRawHeaders(b"content-type") or [b""]
    return response.code, json.loads(data) if types[0].startswith(b"application/json") else data


async def http_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """A GET to 127.0.0.1:C{port}: the status and the body."""
    code, _, body = await http_request(port, path, headers)
    return code, body


# -- the SSH door: real OpenSSH clients and keys from ssh-keygen -----------------------


def ssh_keygen_run(*args: str) -> str:
    """Run C{ssh-keygen ARGS} quietly; its standard output."""
    import subprocess

    return subprocess.run(["ssh-keygen", *args], check=True, capture_output=True, text=True).stdout


def ssh_keygen(directory: Path, name: str, kind: str = "ed25519", comment: str | None = None) -> Path:
    """A new key pair made by C{ssh-keygen} (no passphrase); returns the private key's path."""
    size = ["-b", "2048"] if kind == "rsa" else []
    path = directory / name
    ssh_keygen_run("-q", "-t", kind, *size, "-N", "", "-C", name if comment is None else comment, "-f", str(path))
    return path


def ssh_sign(ca: Path, key: Path, identity: str, principals: str, *extra: str) -> Path:
    """C{ssh-keygen -s CA -I IDENTITY -n PRINCIPALS [EXTRA] KEY.pub}: the certificate's path."""
    ssh_keygen_run("-q", "-s", str(ca), "-I", identity, "-n", principals, *extra, f"{key}.pub")
    return Path(f"{key}-cert.pub")


class FileWatch:
    """
    A file's lines, read again whenever inotify says its directory changed (written,
    created, moved: a rotation too); L{wait_for} fires once a condition on them holds.
    Never a sleep or a poll: the kernel says when to look.
    """

    def __init__(self, test: TestCase, path: Path) -> None:
        from twisted.internet import inotify
        from twisted.python.filepath import FilePath

        self.path = path
        self._waiters: list[tuple[Callable[[list[str]], bool], defer.Deferred[None]]] = []
        self._notifier = inotify.INotify()
        self._notifier.startReading()
        test.addCleanup(self._notifier.connectionLost, None)
        mask = inotify.IN_MODIFY | inotify.IN_CREATE | inotify.IN_MOVED_TO | inotify.IN_MOVED_FROM
        self._notifier.watch(FilePath(str(path.parent)), mask, callbacks=[self._changed])

    def lines(self) -> list[str]:
        """The file's lines now ([] while it does not exist)."""
        try:
            return self.path.read_text().splitlines()
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _changed(self, *args: Any) -> None:
        lines = self.lines()
        for waiter in list(self._waiters):
            if waiter[0](lines):
                self._waiters.remove(waiter)
                waiter[1].callback(None)

    def wait_for(self, condition: Callable[[list[str]], bool]) -> defer.Deferred[None]:
        """Fires once C{condition(lines)} holds (at once if it does now)."""
        d: defer.Deferred[None] = defer.Deferred()
        if condition(self.lines()):
            d.callback(None)
        else:
            self._waiters.append((condition, d))
        return d


def capture_log(test: TestCase) -> list[dict[str, Any]]:
    """Every twisted.logger event from now until the end of C{test}."""
    from typing import cast

    from twisted.logger import ILogObserver, globalLogPublisher

    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    test.addCleanup(globalLogPublisher.removeObserver, observer)
    return events


class SSHClient(protocol.ProcessProtocol):
    """
    A real C{ssh} process: what it prints (stdout; and stderr, or both through its
    terminal when it runs under a pty), what it types (L{type}), how it ends (L{ended}).
    """

    def __init__(self) -> None:
        self.stdout = b""
        self.stderr = b""
        self.ended: defer.Deferred[int] = defer.Deferred()
        self.status: int | None = None
        self._waiters: list[tuple[Callable[[SSHClient], bool], defer.Deferred[None]]] = []

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == 2:
            self.stderr += data
        else:
            self.stdout += data
        for waiter in list(self._waiters):
            if waiter[0](self):
                self._waiters.remove(waiter)
                waiter[1].callback(None)

    def processEnded(self, reason: Any) -> None:
        code = reason.value.exitCode
        self.status = code if code is not None else -reason.value.signal
        for _, d in self._waiters:
            d.errback(AssertionError(f"ssh exited {self.status}: {self.stdout[-500:]!r} {self.stderr[-500:]!r}"))
        self._waiters.clear()
        self.ended.callback(self.status)

    def wait_for(self, condition: Callable[[SSHClient], bool]) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        if condition(self):
            d.callback(None)
        elif self.status is not None:
            d.errback(AssertionError(f"ssh exited {self.status}: {self.stdout[-500:]!r} {self.stderr[-500:]!r}"))
        else:
            self._waiters.append((condition, d))
        return d

    def wait_output(self, needle: bytes) -> defer.Deferred[None]:
        return self.wait_for(lambda client: needle in client.stdout)

    def type(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def signal(self, name: str) -> None:
        """Send C{SIGNAME} (any signal: Twisted's signalProcess knows only a few names)."""
        import signal

        os.kill(self.pid, getattr(signal, f"SIG{name}"))

    @property
    def pid(self) -> int:
        return int(self.transport.pid)  # type: ignore[union-attr]


def ssh_args(port: int, user: str, key: Path, *command: str, certificate: Path | None = None) -> list[str]:
    """An C{ssh} command line for 127.0.0.1:C{port}, with no config, agent or known hosts."""
    args = [
        "ssh", "-F", "/dev/null", "-p", str(port), "-i", str(key),
        "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "LogLevel=ERROR",
    ]
    if certificate is not None:
        args += ["-o", f"CertificateFile={certificate}"]
    return [*args, f"{user}@127.0.0.1", *command]


def spawn_ssh(test: TestCase, args: list[str], terminal: bool = False) -> SSHClient:
    """
    Run C{ssh ARGS}, under a real pty (C{terminal}: as an operator types, C{-tt}) or with
    pipes; killed at the test's end if still running.
    """
    client = SSHClient()
    if terminal:
        args = [args[0], "-tt", *args[1:]]
    home = Path(test.mktemp())
    home.mkdir()
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "TERM": "xterm"}
    reactor.spawnProcess(client, "/usr/bin/ssh", args, env=env, usePTY=terminal)  # type: ignore[attr-defined]

    async def kill() -> None:
        if client.status is None:
            client.signal("KILL")
            await client.ended

    test.addCleanup(kill)
    return client

class _Ended(protocol.ProcessProtocol):
    """Fires L{ended} with the exit status; what the process prints on its tty is dropped."""

    def __init__(self) -> None:
        self.ended: defer.Deferred[int] = defer.Deferred()

    def processEnded(self, reason: Any) -> None:
        code = reason.value.exitCode
        self.ended.callback(code if code is not None else -reason.value.signal)


async def asciinema_cat(cast: Path, out: Path) -> int:
    """
    Debian's C{asciinema cat CAST}, its output written to C{out}; returns its status.
    It opens /dev/tty (to set raw mode) before printing, so it runs on a pty of its own
    (C{usePTY}), its stdout redirected to the file: the pty's line discipline never
    touches the bytes compared.
    """
    ended = _Ended()
    env = dict(os.environ, LC_ALL="C.UTF-8")
    reactor.spawnProcess(  # type: ignore[attr-defined]
        ended,
        "/bin/sh",
        ["sh", "-c", 'exec asciinema cat "$0" > "$1"', str(cast), str(out)],
        env=env,
        usePTY=True,
    )
    return await ended.ended


# -- systemd's side: the notification socket and the descriptor store -------------------


class ServiceManager:
    """
    A stand-in for PID 1's side of sd_notify(3): a datagram socket (C{NOTIFY_SOCKET})
    reading each message's C{KEY=VALUE} lines and the descriptors sent with it
    (C{SCM_RIGHTS}), keeping the store as systemd does (C{FDSTORE=1} with C{FDNAME},
    C{FDSTOREREMOVE=1}), so that a test can start the daemon again with the stored
    descriptors at 3.. and C{LISTEN_FDS}/C{LISTEN_FDNAMES}/C{LISTEN_PID}.

    @ivar messages: every message received, as dicts, in order.
    @ivar store: the stored descriptors (this process's copies), by name, in order.
    """

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.socket.bind(self.path)
        self.socket.setblocking(False)
        self.messages: list[dict[str, str]] = []
        self.store: dict[str, int] = {}
        self._waiters: list[tuple[Callable[[ServiceManager], bool], defer.Deferred[None]]] = []
        reactor.addReader(self)  # type: ignore[attr-defined]

    # reactor interface
    def fileno(self) -> int:
        return self.socket.fileno()

    def logPrefix(self) -> str:
        return "service manager"

    def connectionLost(self, reason: Any) -> None:
        pass

    def doRead(self) -> None:
        while True:
            try:
                data, fds, _flags, _address = socket.recv_fds(self.socket, 4096, 64)
            except BlockingIOError:
                break
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(fields)
            name = fields.get("FDNAME", "stored")
            if fields.get("FDSTOREREMOVE") == "1":
                fd = self.store.pop(name, None)
                if fd is not None:
                    os.close(fd)
            if fields.get("FDSTORE") == "1":
                for fd in fds:
                    old = self.store.pop(name, None)
                    if old is not None:
                        os.close(old)
                    self.store[name] = fd
            else:
                for fd in fds:
                    os.close(fd)
        for waiter in [w for w in self._waiters if w[0](self)]:
            self._waiters.remove(waiter)
            waiter[1].callback(None)

    # test interface
    def wait_for(self, condition: Callable[[ServiceManager], bool]) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        if condition(self):
            d.callback(None)
        else:
            self._waiters.append((condition, d))
        return d

    def count(self, key: str, value: str = "1") -> int:
        """How many messages said C{key=value}."""
        return sum(1 for m in self.messages if m.get(key) == value)

    def wait_ready(self, times: int = 1) -> defer.Deferred[None]:
        """Fires once C{READY=1} has come C{times} times in all."""
        return self.wait_for(lambda m: m.count("READY") >= times)

    def close(self) -> None:
        reactor.removeReader(self)  # type: ignore[attr-defined]
        self.socket.close()
        for fd in self.store.values():
            os.close(fd)
        self.store.clear()


class SocketGuest(protocol.Factory):
    """
    A VMM's serial socket (QEMU's socket chardev with server=on): a unix socket the
    console connects to. As QEMU does, output goes to the connection of now: what is
    written while no one is connected, or to a connection that was dropped, is gone.

    @ivar connections: every connection accepted, in order.
    @ivar dropped: bytes written while no connection was there to take them.
    """

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.connections: list[protocol.Protocol] = []
        self.current: protocol.Protocol | None = None
        self.dropped = 0
        self.port = reactor.listenUNIX(self.path, self)  # type: ignore[attr-defined]

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        guest = self

        class Connection(protocol.Protocol):
            def connectionMade(self) -> None:
                guest.connections.append(self)
                guest.current = self

            def connectionLost(self, reason: Any = None) -> None:
                if guest.current is self:
                    guest.current = None

        return Connection()

    def write(self, data: bytes) -> None:
        if self.current is None:
            self.dropped += len(data)
        else:
            self.current.transport.write(data)  # type: ignore[union-attr]

    async def close(self) -> None:
        for connection in self.connections:
            connection.transport.abortConnection()  # type: ignore[union-attr]
        await self.port.stopListening()
