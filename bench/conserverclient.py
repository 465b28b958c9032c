"""
A client of conserver's own protocol, in clear text (the server runs with -E), with the
surface of wsclient.WSClient that clientproc drives (C{stream}, C{send_input}, C{close},
C{lost}, C{transport}), so the same orders measure either server.

Two connections, as conserver's C{console} program makes them (its PROTOCOL file; the
console mode's start seen with strace):

 - the master (the port given with -p) says which child process serves a console:
   it greets with C{ok}; C{login USER} -> C{ok}; C{call NAME} -> the child's port;
   C{exit};
 - the child greets and logs in the same way; C{call NAME} -> C{[attached]} (read-write;
   C{[spy]} if someone else is) and the connection is in console mode, but the child
   holds the console's output back until the client sends C{^Ec;}, answered with
   C{[connected]}.

From then on the wire carries the console's bytes both ways, with one exception: 0xFF
is a command prefix, so a data 0xFF travels doubled and 0xFF followed by anything else is
a command (dropped here). What the client types is checked by the child for conserver's
escape (^E c ...), so input must not contain ^E: the bench types ACK (0x06).
"""

from __future__ import annotations

import asyncio
import socket
import time

from wsclient import Stream

IAC = b"\xff"
#: conserver's default escape, ^E c, then ";": "connected, send me the output"
START_OUTPUT = b"\x05c;"


class Unescaper:
    """The child's wire to the console's bytes, chunk by chunk (a 0xFF may end a chunk)."""

    def __init__(self) -> None:
        self._held = False  # the last chunk ended in a lone 0xFF

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        i = 0
        if self._held and data:
            self._held = False
            if data[0] == 0xFF:
                out += IAC
            i = 1
        elif IAC not in data:
            return data
        while True:
            at = data.find(IAC, i)
            if at < 0:
                out += data[i:]
                break
            out += data[i:at]
            if at + 1 == len(data):
                self._held = True
                break
            if data[at + 1] == 0xFF:
                out += IAC
            i = at + 2
        return bytes(out)


class ConserverClient:
    """One console-mode connection to a conserver child, after the handshake."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 greeting: bytes) -> None:
        self.stream = Stream()
        self.greeting = greeting  # [attached] or [spy]
        self.transport = writer.transport
        self.close_code: int | None = None
        self.close_reason = ""
        self.frames = 0  # reads, for clientproc's counters
        self.last_data = time.monotonic()
        self.lost: asyncio.Future = asyncio.get_running_loop().create_future()
        self._writer = writer
        self._wire = Unescaper()
        self._task = asyncio.ensure_future(self._pump(reader))

    async def _pump(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    break
                self.last_data = time.monotonic()
                self.frames += 1
                data = self._wire.feed(data)
                if data:
                    self.stream.feed(data)
        except OSError as e:
            self.close_reason = repr(e)
        finally:
            if not self.lost.done():
                self.lost.set_result(None)

    def send_input(self, data: bytes) -> None:
        """Type C{data} into the console (0xFF doubled)."""
        self._writer.write(data.replace(IAC, IAC + IAC))

    async def close(self, timeout: float = 5.0) -> None:
        self._writer.close()
        try:
            await asyncio.wait_for(asyncio.shield(self.lost), timeout)
        except TimeoutError:
            self.transport.abort()


async def _line(reader: asyncio.StreamReader, timeout: float) -> bytes:
    return (await asyncio.wait_for(reader.readuntil(b"\n"), timeout)).strip()


async def _logged_in(host: str, port: int, user: str,
                     timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the master or a child, greeted and logged in."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for say in (None, b"login " + user.encode() + b"\r\n"):
        if say:
            writer.write(say)
        answer = await _line(reader, timeout)
        if answer != b"ok":
            writer.close()
            raise ConnectionError(f"conserver on port {port}: {answer!r} (to {say!r})")
    return reader, writer


async def connect(host: str, port: int, name: str, user: str = "bench",
                  timeout: float = 20.0) -> ConserverClient:
    """Attach to console C{name} of the conserver whose master listens on C{port}."""
    reader, writer = await _logged_in(host, port, user, timeout)
    try:
        writer.write(b"call " + name.encode() + b"\r\n")
        where = await _line(reader, timeout)
        writer.write(b"exit\r\n")
    finally:
        writer.close()
    if not where.isdigit():
        raise ConnectionError(f"conserver master: call {name}: {where!r}")
    reader, writer = await _logged_in(host, int(where), user, timeout)
    writer.write(b"call " + name.encode() + b"\r\n")
    greeting = await _line(reader, timeout)
    if not greeting.startswith(b"["):
        writer.close()
        raise ConnectionError(f"conserver child: call {name}: {greeting!r}")
    writer.write(START_OUTPUT)
    for _ in range(10):  # the status lines before it, if any
        if await _line(reader, timeout) == b"[connected]":
            return ConserverClient(reader, writer, greeting)
    writer.close()
    raise ConnectionError(f"conserver child: no [connected] for {name}")
