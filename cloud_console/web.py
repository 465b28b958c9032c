"""
The one port: the terminal page and its assets at C{/}, the console at C{/ws}, and the
history as a download at C{/history}.

Everything the page needs is served from here (no external requests), under a strict
Content-Security-Policy, with text assets gzipped and directory listings off.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.logger import Logger
from twisted.web import http, pages, resource, static
from twisted.web.server import GzipEncoderFactory, Request, Site

from .access import build_gate
from .multiplexer import Multiplexer
from .websocket import ConsoleServerFactory, ConsoleSettings

#: Types set explicitly: the system's mime table (which L{static.File} reads) may lack
#: them or name them differently, and a wrong type breaks the page under C{nosniff}.
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".map": "application/json",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".wasm": "application/wasm",
    ".woff2": "font/woff2",
    ".woff": "font/woff",
    ".txt": "text/plain; charset=utf-8",
}

#: Text types worth compressing; fonts and images are compressed already.
#: Seconds an HTTP connection may sit idle (or half-sent) before it is closed: the page
#: loads in a moment, so a long wait only lets strangers hold descriptors. An upgraded
#: WebSocket is not affected (its pings keep watch instead).
HTTP_IDLE_TIMEOUT = 20

COMPRESSIBLE = {".html", ".js", ".mjs", ".css", ".map", ".json", ".svg", ".txt"}

SECURITY_HEADERS = {
    b"content-security-policy": (
        b"default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data: blob:; "
        b"style-src 'self' 'unsafe-inline'; font-src 'self'; object-src 'none'; "
        b"base-uri 'none'; frame-ancestors 'none'"
    ),
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
    b"x-frame-options": b"DENY",
}


def packaged_assets() -> Path:
    """Where the package build put the frontend (C{cloud_console/web_assets})."""
    return Path(str(importlib.resources.files("cloud_console") / "web_assets"))


class StaticFiles(static.File):
    """
    Static files without directory listings, with explicit types, gzip for text.

    Path traversal (C{..}, encoded or not) is refused by L{static.File.child}, which
    rejects segments that leave the directory.
    """

    contentTypes = CONTENT_TYPES
    indexNames = ["index.html"]

    def directoryListing(self) -> resource.IResource:
        listing: resource.IResource = pages.notFound(
            "No Such Resource", "Directory listings are disabled."
        )
        return listing

    def getChild(self, path: bytes, request: Request) -> resource.IResource:
        try:
            path.decode("utf-8")
        except UnicodeDecodeError:
            # No file of ours has such a name; static.File would raise on it.
            not_found: resource.IResource = pages.notFound()
            return not_found
        child: resource.IResource = static.File.getChild(self, path, request)
        if isinstance(child, static.File) and child.isfile():
            if child.splitext()[1].lower() in COMPRESSIBLE:
                compressed: resource.IResource = resource.EncodingResourceWrapper(
                    child, [GzipEncoderFactory()]
                )
                return compressed
        return child


class HistoryDownload(resource.Resource):
    """C{GET /history}: the output the server holds, as a file (the page's download)."""

    isLeaf = True

    def __init__(self, multiplexer: Multiplexer) -> None:
        resource.Resource.__init__(self)
        self.multiplexer = multiplexer

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-disposition", b'attachment; filename="console.log"')
        request.setHeader(b"cache-control", b"no-store")
        return self.multiplexer.replay()


class MissingFrontend(resource.Resource):
    """Stands in for the page when the frontend was not built, and says how to build it."""

    isLeaf = True

    def __init__(self, where: Path) -> None:
        resource.Resource.__init__(self)
        self.where = where

    def render(self, request: Request) -> bytes:
        request.setResponseCode(503)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return (
            f"The terminal page was not built ({self.where} is missing).\n"
            "Install the package with pip (it runs the frontend build), or run\n"
            "  npm --prefix static ci && npm --prefix static run build\n"
            "The WebSocket at /ws works without it.\n"
        ).encode("utf-8")


class ConsoleChannel(http.HTTPChannel):
    """
    An HTTP/1.1 channel that turns away a peer whose first byte cannot start a request.

    A browser pointed at C{https://} on the plain port sends a TLS ClientHello, which has
    no line end: twisted.web would wait for the request timeout with the connection open.
    Every HTTP method starts with a letter, so anything else is answered 400 at once.
    """

    _log = Logger()
    _first_data = True

    def dataReceived(self, data: bytes) -> None:
        if self._first_data and data:
            self._first_data = False
            if not data[:1].isalpha():
                transport: Any = self.transport
                self._log.info(
                    "not HTTP from {peer} (first byte {byte!r}); closing",
                    peer=str(transport.getPeer()),
                    byte=data[:1],
                )
                transport.write(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
                transport.loseConnection()
                return
        http.HTTPChannel.dataReceived(self, data)


class ConsoleSite(Site):
    """
    The site: adds the security headers to every response and keeps request lines out
    of the log (the console's own events say who attached). Plain HTTP/1.1 channels:
    the console needs no HTTP/2, and WebSocket upgrades are HTTP/1.1.
    """

    _log = Logger()
    protocol = ConsoleChannel  # type: ignore[assignment]

    def getResourceFor(self, request: Request) -> Any:
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        return Site.getResourceFor(self, request)

    def log(self, request: http.Request) -> None:
        pass


def build_tree(
    multiplexer: Multiplexer,
    factory: ConsoleServerFactory,
    static_dir: str | Path | None = None,
) -> resource.Resource:
    """The page, C{/ws} and C{/history} for one WebSocket factory."""
    where = Path(static_dir) if static_dir is not None else packaged_assets()
    root: resource.Resource
    if (where / "index.html").is_file():
        root = StaticFiles(str(where))
    else:
        Logger().warn("frontend not found in {where}; serving a notice at /", where=str(where))
        root = resource.Resource()
        root.putChild(b"", MissingFrontend(where))
    root.putChild(b"ws", WebSocketResource(factory))
    root.putChild(b"history", HistoryDownload(multiplexer))
    return root


def build_site(
    multiplexer: Multiplexer,
    settings: ConsoleSettings,
    static_dir: str | Path | None = None,
    password_file: str | None = None,
    token_file: str | None = None,
    run_in_thread: Any = None,
) -> tuple[ConsoleSite, ConsoleServerFactory]:
    """
    The console's web site.

    @param static_dir: serve the page from this directory (read on every request, so a
        rebuilt frontend is served without a restart); default the packaged build.
    @param password_file: require HTTP Basic credentials from this file.
    @param token_file: require (or also accept) bearer tokens from this file.
    @return: the site and the (read-write) WebSocket factory behind C{/ws}.
    @raise cloud_console.access.CredentialFileError: a credential file is unusable.
    """
    factory = ConsoleServerFactory(multiplexer, settings)
    if not (password_file or token_file):
        return ConsoleSite(build_tree(multiplexer, factory, static_dir), timeout=HTTP_IDLE_TIMEOUT), factory

    def tree_for(read_only: bool) -> resource.IResource:
        chosen = factory
        if read_only:
            chosen = ConsoleServerFactory(multiplexer, settings, read_only=True)
        return build_tree(multiplexer, chosen, static_dir)

    gate = build_gate(tree_for, password_file, token_file, run_in_thread)
    return ConsoleSite(gate, timeout=HTTP_IDLE_TIMEOUT), factory
