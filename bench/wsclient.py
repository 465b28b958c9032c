"""
A minimal, fast WebSocket client (asyncio Protocol, RFC 6455 framing by hand).

Server frames are parsed as they arrive and binary payloads are checked in place against
the expected stream (C{bytes.startswith}, a memcmp), so a client costs little more than
the kernel's copy. Two wire protocols:

 - C{raw} (cloud-console's original protocol): output is binary frames of pty bytes,
   input is sent as binary frames;
 - C{terminado}: output is text frames C{["stdout", text]}, input C{["stdin", text]};
   the text is re-encoded as UTF-8 before checking.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import struct
import time

from workload import PROBE

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# what the stream is doing with the bytes it is given
DISCARD, SYNC, VERIFY, DONE, BAD, PROBING, COLLECT = range(7)


class Stream:
    """
    The pty bytes one client received, checked against what the guest wrote.

    SYNC: skip everything (history, earlier output) up to the sync marker; VERIFY: every
    byte after it must equal C{expected}, in order; DONE once all of it arrived.
    """

    def __init__(self) -> None:
        self.mode = DISCARD
        self.received = 0
        self.first_byte: float | None = None
        self.expected = b""
        self.pos = 0
        self.t_end: float | None = None
        self.error: str | None = None
        self.sync = b""
        self._tail = b""
        self.on_synced = None
        self.on_done = None
        self.on_probe = None
        self.collected = bytearray()

    def arm(self, sync: bytes, expected: bytes, on_synced, on_done) -> None:
        self.mode, self.sync, self._tail = SYNC, sync, b""
        self.expected, self.pos, self.t_end, self.error = expected, 0, None, None
        self.on_synced, self.on_done = on_synced, on_done

    def feed(self, data) -> None:
        self.received += len(data)
        if self.first_byte is None:
            self.first_byte = time.monotonic()
        self._handle(data)

    def _handle(self, data) -> None:
        mode = self.mode
        if mode == VERIFY:
            if self.expected.startswith(data, self.pos):
                self.pos += len(data)
                if self.pos == len(self.expected):
                    self._finish(DONE)
            else:
                self._mismatch(bytes(data))
        elif mode == SYNC:
            buf = self._tail + bytes(data)
            i = buf.find(self.sync)
            if i < 0:
                self._tail = buf[-len(self.sync):]
                return
            self.mode = VERIFY
            if self.on_synced:
                self.on_synced()
            rest = buf[i + len(self.sync):]
            if rest:
                self._handle(rest)
        elif mode == PROBING:
            if PROBE in bytes(data) and self.on_probe:
                self.on_probe()
        elif mode == COLLECT:
            self.collected += data
        elif mode == DONE:
            self.error = "extra bytes after the end"
            self.mode = BAD

    def _mismatch(self, data: bytes) -> None:
        expected = self.expected[self.pos:self.pos + len(data)]
        at = next((i for i, (a, b) in enumerate(zip(data, expected)) if a != b), len(expected))
        self.error = (f"CORRUPT at offset {self.pos + at}: got {data[at:at + 12]!r}, "
                      f"expected {expected[at:at + 12]!r}")
        self.pos += at
        self._finish(BAD)

    def _finish(self, mode: int) -> None:
        self.mode = mode
        self.t_end = time.monotonic()
        if self.on_done:
            self.on_done()


class WSClient(asyncio.Protocol):
    """One WebSocket connection; pty bytes go to L{Stream}."""

    def __init__(self, host: str, port: int, path: str, protocol: str = "raw",
                 mode: int = DISCARD) -> None:
        self.host, self.port, self.path, self.protocol = host, port, path, protocol
        self.stream = Stream()
        self.stream.mode = mode  # before the handshake: history may come with its reply
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future = loop.create_future()
        self.lost: asyncio.Future = loop.create_future()
        self.close_code: int | None = None
        self.close_reason = ""
        self.last_data = time.monotonic()
        self._handshake = bytearray()
        self._key = base64.b64encode(os.urandom(16))
        self._open = False
        self._header = b""
        self._need = 0  # payload bytes still to come in the current frame
        self._opcode = 0  # of the current message (continuations keep it)
        self._message = bytearray()  # non-binary messages are gathered whole
        self._sent_close = False
        self._fin = True
        self.frames = 0

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        hostport = f"{self.host}:{self.port}"
        transport.write(
            f"GET {self.path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {self._key.decode()}\r\n"
            f"Sec-WebSocket-Version: 13\r\nOrigin: http://{hostport}\r\n\r\n".encode())

    def connection_lost(self, exc) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed during handshake: {exc}"))
        if not self.lost.done():
            self.lost.set_result(exc)

    def data_received(self, data: bytes) -> None:
        self.last_data = time.monotonic()
        if not self._open:
            self._handshake += data
            end = self._handshake.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._handshake[:end]).decode("latin-1")
            data = bytes(self._handshake[end + 4:])
            self._handshake = bytearray()
            status = head.split("\r\n", 1)[0]
            accept = base64.b64encode(hashlib.sha1(self._key + _GUID).digest()).decode()
            if " 101 " not in status + " " or accept not in head:
                self.opened.set_exception(ConnectionError(f"handshake refused: {status}"))
                self.transport.close()
                return
            self._open = True
            self.opened.set_result(None)
            if not data:
                return
        self._frames(data)

    # -- framing -------------------------------------------------------------------------

    def _frames(self, data: bytes) -> None:
        if self._header:
            data = self._header + data
            self._header = b""
        view = memoryview(data)
        size = len(data)
        i = 0
        while i < size:
            need = self._need
            if need:
                take = need if need <= size - i else size - i
                self._need = need - take
                self._payload(view[i:i + take])
                i += take
                if not self._need and self._fin:
                    self._message_end()
                continue
            # a frame header: 2, 4 or 10 bytes (server frames are not masked)
            if size - i < 2:
                self._header = bytes(view[i:])
                return
            b0, b1 = data[i], data[i + 1]
            length = b1 & 0x7F
            head = 2
            if length == 126:
                head = 4
            elif length == 127:
                head = 10
            if size - i < head:
                self._header = bytes(view[i:])
                return
            if length == 126:
                length = struct.unpack_from("!H", data, i + 2)[0]
            elif length == 127:
                length = struct.unpack_from("!Q", data, i + 2)[0]
            i += head
            self.frames += 1
            opcode = b0 & 0x0F
            self._fin = bool(b0 & 0x80)
            if opcode:
                self._opcode = opcode
            self._need = length
            if length == 0 and self._fin:
                self._message_end()

    def _payload(self, chunk: memoryview) -> None:
        if self._opcode == 2 and self.protocol == "raw":
            self.stream.feed(chunk)
        else:
            self._message += chunk

    def _message_end(self) -> None:
        opcode, message = self._opcode, bytes(self._message)
        self._message = bytearray()
        if opcode == 1 and self.protocol == "terminado":
            kind, *rest = json.loads(message)
            if kind == "stdout":
                self.stream.feed(rest[0].encode("utf-8"))
        elif opcode == 8:
            if len(message) >= 2:
                self.close_code = struct.unpack("!H", message[:2])[0]
                self.close_reason = message[2:].decode("utf-8", "replace")
            else:
                self.close_code = 1005
            if not self._sent_close:
                self.send_frame(8, message[:2])
            self.transport.close()
        elif opcode == 9:
            self.send_frame(0xA, message)

    # -- sending -------------------------------------------------------------------------

    def send_frame(self, opcode: int, payload: bytes) -> None:
        if self._sent_close or self.transport is None or self.transport.is_closing():
            return
        if opcode == 8:
            self._sent_close = True
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        mask = os.urandom(4)
        key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
        masked = (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big") if n else b""
        self.transport.write(head + mask + masked)

    def send_input(self, data: bytes) -> None:
        """Type C{data} into the console."""
        if self.protocol == "terminado":
            self.send_frame(1, json.dumps(["stdin", data.decode("utf-8")]).encode())
        else:
            self.send_frame(2, data)

    async def close(self, timeout: float = 5.0) -> None:
        """Close handshake (code 1000), then wait for the TCP connection to end."""
        if not self.lost.done():
            self.send_frame(8, struct.pack("!H", 1000))
            try:
                await asyncio.wait_for(asyncio.shield(self.lost), timeout)
            except asyncio.TimeoutError:
                self.transport.abort()


async def connect(host: str, port: int, path: str, protocol: str = "raw",
                  timeout: float = 20.0, mode: int = DISCARD) -> WSClient:
    loop = asyncio.get_running_loop()
    _, client = await asyncio.wait_for(
        loop.create_connection(lambda: WSClient(host, port, path, protocol, mode), host, port),
        timeout)
    await asyncio.wait_for(client.opened, timeout)
    return client
