"""
Tests for the static side of L{cloud_console.web.site}: the page from a directory, re-read on
every request, gzip for text, explicit types, no listings, no way out of the directory.
Served on a real port on 127.0.0.1 (static.File streams through the reactor).
"""

from __future__ import annotations

import gzip
import os

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial.unittest import TestCase

from cloud_console.console.multiplexer import Multiplexer
from cloud_console.web.site import build_site
from cloud_console.web.websocket import ConsoleSettings


class Fetch(protocol.Protocol):
    """Sends one request and collects the response until the server closes."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: object) -> None:
        self.done.callback(self.data)


def dechunk(body: bytes) -> bytes:
    """Undo HTTP chunked transfer encoding."""
    out = b""
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out += body[:size]
        body = body[size + 2 :]
    return out


class StaticTests(TestCase):
    """--static-dir serving."""

    timeout = 30

    def setUp(self) -> None:
        self.root = self.mktemp()
        os.makedirs(os.path.join(self.root, "fonts"))
        self.write("index.html", b"<!doctype html><title>page one</title>" + b" " * 2000)
        self.write("app.js", b"console.log('x');" * 200)
        self.write("fonts/mono.woff2", b"wOF2" + bytes(300))
        site, _ = build_site(Multiplexer(100), ConsoleSettings(), self.root)
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(self.port.stopListening)

    def write(self, name: str, data: bytes) -> None:
        with open(os.path.join(self.root, name), "wb") as f:
            f.write(data)

    async def get(self, path: bytes, gzip_ok: bool = False) -> tuple[bytes, bytes]:
        extra = b"Accept-Encoding: gzip\r\n" if gzip_ok else b""
        request = b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" + extra + b"\r\n"
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)
        fetch = await endpoint.connect(protocol.Factory.forProtocol(lambda: Fetch(request)))
        data = await fetch.done
        head, _, body = data.partition(b"\r\n\r\n")
        if b"transfer-encoding: chunked" in head.lower():
            body = dechunk(body)
        return head.lower(), body

    async def test_index_and_reload(self) -> None:
        """/ is index.html, re-read from disk on every request (a rebuild needs no restart)."""
        head, body = await self.get(b"/")
        self.assertIn(b"200", head.split(b"\r\n")[0])
        self.assertIn(b"content-type: text/html; charset=utf-8", head)
        self.assertIn(b"page one", body)
        self.write("index.html", b"<!doctype html><title>page two</title>")
        self.assertIn(b"page two", (await self.get(b"/"))[1])

    async def test_gzip_for_text(self) -> None:
        """Text assets are gzipped when the browser accepts it; fonts are not."""
        head, body = await self.get(b"/app.js", gzip_ok=True)
        self.assertIn(b"content-encoding: gzip", head)
        self.assertIn(b"content-type: text/javascript; charset=utf-8", head)
        self.assertEqual(gzip.decompress(body), b"console.log('x');" * 200)
        head, body = await self.get(b"/fonts/mono.woff2", gzip_ok=True)
        self.assertNotIn(b"content-encoding", head)
        self.assertIn(b"content-type: font/woff2", head)

    async def test_no_directory_listing(self) -> None:
        """A directory without an index is a 404, not a listing."""
        head, body = await self.get(b"/fonts/")
        self.assertIn(b"404", head.split(b"\r\n")[0])
        self.assertNotIn(b"mono.woff2", body)

    async def test_traversal(self) -> None:
        """Leaving the directory, plainly or encoded, is a 404."""
        for path in (b"/../../etc/passwd", b"/%2e%2e/%2e%2e/etc/passwd", b"/fonts/..%2f..%2fetc%2fpasswd"):
            head, body = await self.get(path)
            self.assertIn(b"404", head.split(b"\r\n")[0], path)
            self.assertNotIn(b"root:", body)
