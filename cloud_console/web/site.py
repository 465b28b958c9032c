"""
The one port. One console: the terminal page and its assets at C{/}, the console at
C{/ws}, and the history as a download at C{/history}. Many consoles: the same for each
under C{/c/NAME/}, the index page at C{/}, C{/api/consoles}, C{/healthz} and C{/metrics}.

Everything the page needs is served from here (no external requests), under a strict
Content-Security-Policy, with text assets gzipped and directory listings off.
"""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path
from typing import Any, Callable

from autobahn.twisted.resource import WebSocketResource
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web import http, pages, resource, server, static
from twisted.web.server import GzipEncoderFactory, Request, Site

from ..access.policy import Access
from ..console.console import Console, ConsoleStatus
from ..console.export import asciicast, plain_text
from ..console.multiplexer import Multiplexer
from ..fleet.registry import ConsoleRegistry
from ..console.actions import ConsoleActions
from .actions import ActionsPage
from .gate import AuthGate, access_of, build_gate
from .metrics import FrontCounts, MetricsPage, RefusalCounts, WorkerCounts, metrics_registry
from .dialects import who_is_on
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


class LabelledWebSocketResource(WebSocketResource):
    """
    The WebSocket upgrade, telling the connection who the gate let in and from where
    (for the who-is-on-this-console lists and the logs). Autobahn builds the protocol
    inside C{render}, synchronously, so the factory holds the label for that one call.
    """

    def render(self, request: Request) -> Any:
        access = access_of(request)
        address = request.getClientAddress()
        self._factory.next_viewer = (
            access.name if access is not None else "anonymous",
            getattr(address, "host", str(address)),
        )
        self._factory.next_identified = access is not None
        try:
            return WebSocketResource.render(self, request)
        finally:
            self._factory.next_viewer = None
            self._factory.next_identified = False


class HistoryDownload(resource.Resource):
    """C{GET /history}: the output the server holds, as a file (the page's download)."""

    isLeaf = True

    def __init__(self, multiplexer: Multiplexer) -> None:
        resource.Resource.__init__(self)
        self.multiplexer = multiplexer

    def render_GET(self, request: Request) -> bytes:
        """
        C{?format=raw} (the default: the bytes as kept), C{asciicast} (v2, with the
        true arrival times; C{width} and C{height} say the terminal's size, 80x24
        unless given) or C{text} (escape sequences removed).
        """
        args = request.args or {}
        kind = args.get(b"format", [b"raw"])[0]
        multiplexer = self.multiplexer
        request.setHeader(b"cache-control", b"no-store")
        if kind == b"raw":
            request.setHeader(b"content-type", b"application/octet-stream")
            request.setHeader(b"content-disposition", b'attachment; filename="console.log"')
            return multiplexer.replay()
        if kind == b"text":
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            request.setHeader(b"content-disposition", b'attachment; filename="console.txt"')
            return plain_text(multiplexer.replay())
        if kind == b"asciicast":
            try:
                width = _size(args, b"width", 80)
                height = _size(args, b"height", 24)
            except ValueError as e:
                return _bad_request(request, str(e))
            runs, skipped = multiplexer.replay_runs()
            body = asciicast(
                multiplexer.history, runs, skipped, width, height, multiplexer.seconds()
            )
            request.setHeader(b"content-type", b"application/x-asciicast")
            request.setHeader(b"content-disposition", b'attachment; filename="console.cast"')
            return body
        return _bad_request(request, "format must be raw, asciicast or text")


def _size(args: dict[bytes, list[bytes]], name: bytes, default: int) -> int:
    """A terminal dimension from the query: a whole number from 1 to 1000."""
    values = args.get(name)
    if not values:
        return default
    try:
        value = int(values[0])
    except ValueError:
        value = 0
    if not 1 <= value <= 1000:
        raise ValueError(f"{name.decode()} must be a whole number from 1 to 1000")
    return value


def _bad_request(request: Request, message: str) -> bytes:
    request.setResponseCode(400)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return (message + "\n").encode("utf-8")


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
    root.putChild(b"ws", LabelledWebSocketResource(factory))
    root.putChild(b"history", HistoryDownload(multiplexer))
    return root


def build_site(
    multiplexer: Multiplexer,
    settings: ConsoleSettings,
    static_dir: str | Path | None = None,
    password_file: str | None = None,
    token_file: str | None = None,
    run_in_thread: Any = None,
    link_secret: str | None = None,
    actions: ConsoleActions | None = None,
    allow_control: bool = False,
) -> tuple[ConsoleSite, ConsoleServerFactory]:
    """
    The console's web site.

    @param static_dir: serve the page from this directory (read on every request, so a
        rebuilt frontend is served without a restart); default the packaged build.
    @param password_file: require HTTP Basic credentials from this file.
    @param token_file: require (or also accept) bearer tokens from this file.
    @param link_secret: require (or also accept) links signed with the key in this file
        (their C{console} claim must be C{*}: this console has no name).
    @param actions: the console's actions, served at C{/actions/} to a credential with
        the control right (or to anyone with C{allow_control} and no credentials).
    @return: the site and the (read-write) WebSocket factory behind C{/ws}.
    @raise cloud_console.access.policy.CredentialFileError: a credential file is unusable.
    """
    factory = ConsoleServerFactory(multiplexer, settings)

    def with_actions(tree: resource.Resource, control: bool) -> resource.Resource:
        if actions is not None:
            tree.putChild(b"actions", ActionsPage(actions, control, settings.origins))
        return tree

    if not (password_file or token_file or link_secret):
        tree = with_actions(build_tree(multiplexer, factory, static_dir), allow_control)
        return ConsoleSite(tree, timeout=HTTP_IDLE_TIMEOUT), factory

    def tree_for(access: Access) -> resource.IResource:
        chosen = factory
        if access.read_only:
            chosen = ConsoleServerFactory(multiplexer, settings, read_only=True)
        return with_actions(build_tree(multiplexer, chosen, static_dir), access.may_control)

    refusals = settings.refusals
    gate = build_gate(
        tree_for, password_file, token_file, run_in_thread,
        on_refused=refusals.count if refusals is not None else None, link_secret=link_secret,
        audit=settings.audit,
    )
    return ConsoleSite(gate, timeout=HTTP_IDLE_TIMEOUT), factory


# -- many consoles -------------------------------------------------------------------------

#: The index page, beside the console page in the built assets.
INDEX_PAGE = "consoles.html"


class FleetFiles(StaticFiles):
    """The built assets, with the index page (not the console page) at the root."""

    indexNames = [INDEX_PAGE]


def _json(request: Request, body: Any, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body).encode("utf-8")


def _console_json(status: ConsoleStatus) -> dict[str, Any]:
    return {**status.to_json(), "url": f"c/{status.name}/"}


def _totals(statuses: list[ConsoleStatus]) -> dict[str, int]:
    up = sum(1 for s in statuses if s.up)
    return {
        "consoles": len(statuses),
        "up": up,
        "down": len(statuses) - up,
        "viewers": sum(s.viewers for s in statuses),
    }


class ConsoleList(resource.Resource):
    """
    C{GET /api/consoles}: the consoles this credential may see, as JSON; with
    C{watchers} (the identities on each, oldest first; anonymous viewers only counted)
    where a credential asks, and each console's C{actions} when the credential may use
    them (the C{control} right).
    """

    isLeaf = True

    def __init__(
        self,
        statuses: Callable[[], list[ConsoleStatus]],
        watchers: Callable[[str], list[str]] | None = None,
        control: bool = False,
    ) -> None:
        resource.Resource.__init__(self)
        self.statuses = statuses
        self.watchers = watchers
        self.control = control

    def render_GET(self, request: Request) -> bytes:
        statuses = self.statuses()
        consoles = [_console_json(s) for s in statuses]
        if self.watchers is not None:
            for body, status in zip(consoles, statuses):
                body["watchers"] = self.watchers(status.name)
        if self.control:
            for entry, status in zip(consoles, statuses):
                entry["actions"] = list(status.actions)
        return _json(request, {"consoles": consoles, "totals": _totals(statuses)})


class Health(resource.Resource):
    """
    C{GET /healthz}: 200 when every console is up, 503 otherwise (for supervisors and load
    balancers), with counts; the consoles that are down are named only to a request that
    may see them (a credential, or no authentication at all, or the metrics port).
    """

    isLeaf = True

    def __init__(
        self,
        registry: ConsoleRegistry,
        identify: Callable[[Request], Deferred[Access | None]] | None = None,
    ) -> None:
        resource.Resource.__init__(self)
        self.registry = registry
        self.identify = identify

    def render_GET(self, request: Request) -> Any:
        if self.identify is None:
            return self._answer(request, EVERYONE)
        d = self.identify(request)

        def answer(access: Access | None) -> None:
            request.write(self._answer(request, access))
            request.finish()

        d.addCallback(answer)
        d.addErrback(lambda failure: request.processingFailed(failure))
        return server.NOT_DONE_YET

    def _answer(self, request: Request, access: Access | None) -> bytes:
        statuses = self.registry.statuses()
        totals = _totals(statuses)
        body: dict[str, Any] = {
            "status": "ok" if totals["down"] == 0 else "down",
            "consoles": totals["consoles"],
            "up": totals["up"],
            "down": totals["down"],
        }
        if access is not None:
            body["downConsoles"] = [
                {"name": s.name, "reason": s.reason, "since": s.since}
                for s in statuses
                if not s.up and access.may_see(s.name)
            ]
        return _json(request, body, 200 if totals["down"] == 0 else 503)


#: Who is asking when nobody needs to ask: no authentication, or the metrics port
#: (with the consoles' actions, where --allow-control offers them to anyone).
EVERYONE = Access("anyone", read_only=False)
EVERYONE_WITH_CONTROL = Access("anyone", read_only=False, control=True)


class ConsolePages(resource.Resource):
    """C{/c/NAME/...}: console NAME's page, WebSocket and history, if this access may see it."""

    def __init__(
        self, registry: ConsoleRegistry, access: Access, tree_for: Callable[[Console, bool, bool], resource.IResource]
    ) -> None:
        resource.Resource.__init__(self)
        self.registry = registry
        self.access = access
        self.tree_for = tree_for

    def getChild(self, path: bytes, request: Request) -> resource.IResource:
        try:
            name = path.decode("ascii")
        except UnicodeDecodeError:
            name = ""
        console = self.registry.get(name) if name else None
        if console is None or not self.access.may_see(name):
            # 404 either way: the names of consoles a credential may not see are not told.
            not_found: resource.IResource = pages.notFound()
            return not_found
        return self.tree_for(console, self.access.read_only, self.access.may_control)


class FleetResources:
    """
    The many-console site's resources, made from the registry and the server-wide
    settings: one tree per access, each console's page made once per mode.
    """

    def __init__(
        self,
        registry: ConsoleRegistry,
        settings: ConsoleSettings,
        static_dir: str | Path | None,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.where = Path(static_dir) if static_dir is not None else packaged_assets()
        self.refusals = settings.refusals or RefusalCounts()
        #: The front doors' sessions and failures, for the full C{/metrics} (set by the wiring).
        self.fronts: Callable[[], FrontCounts] | None = None
        #: The read workers' figures, for the full C{/metrics} (set by the wiring).
        self.workers: Callable[[], WorkerCounts] | None = None
        #: Whether a server without credentials offers the consoles' actions to anyone
        #: (C{--allow-control}).
        self.allow_control = False

    def anonymous(self) -> Access:
        """Who anyone is on a server without credentials."""
        return EVERYONE_WITH_CONTROL if self.allow_control else EVERYONE

    def console_tree(self, console: Console, read_only: bool, control: bool = False) -> resource.IResource:
        """
        Console C{console}'s page, C{ws}, C{history} and C{actions} (made once per console
        and mode; the factory is shared by the modes that differ only in control).
        """
        key = ("tree", read_only, control)
        tree = console.resources.get(key)
        if tree is None:
            factory_key = ("factory", read_only)
            factory = console.resources.get(factory_key)
            if factory is None:
                factory = console.resources[factory_key] = ConsoleServerFactory(
                    console.multiplexer, self.settings, read_only=read_only,
                    title=lambda: console.spec.title, console_name=console.name,
                )
            tree = console.resources[key] = build_tree(console.multiplexer, factory, self.where)
            tree.putChild(b"actions", ActionsPage(console.actions, control and not read_only, self.settings.origins))
        return tree

    def watchers(self, name: str) -> list[str]:
        """The identities on console C{name} (anonymous viewers not listed)."""
        console = self.registry.get(name)
        if console is None:
            return []
        return [w["identity"] for w in who_is_on(console.multiplexer.viewers())["watchers"]]

    def statuses_for(self, access: Access) -> Callable[[], list[ConsoleStatus]]:
        return lambda: [s for s in self.registry.statuses() if access.may_see(s.name)]

    def root_for(self, access: Access) -> resource.IResource:
        """Everything a credential with C{access} may reach (but C{/healthz})."""
        root: resource.Resource
        if (self.where / INDEX_PAGE).is_file():
            root = FleetFiles(str(self.where))
        else:
            Logger().warn("index page not found in {where}", where=str(self.where))
            root = resource.Resource()
            root.putChild(b"", MissingFrontend(self.where))
        root.putChild(b"c", ConsolePages(self.registry, access, self.console_tree))
        api = resource.Resource()
        # Who is on is told to a credential only (not to everyone, without authentication).
        watchers = self.watchers if access not in (EVERYONE, EVERYONE_WITH_CONTROL) else None
        api.putChild(b"consoles", ConsoleList(self.statuses_for(access), watchers, access.may_control))
        root.putChild(b"api", api)
        registry = metrics_registry(self.statuses_for(access), self.refusals, process=False)
        root.putChild(b"metrics", MetricsPage(lambda request: registry))
        return root

    def metrics_root(self) -> resource.IResource:
        """C{--metrics-port}: C{/metrics} and C{/healthz} in full, for a management address."""
        root = resource.Resource()
        registry = metrics_registry(
            self.registry.statuses, self.refusals, fronts=self.fronts, workers=self.workers
        )
        root.putChild(b"metrics", MetricsPage(lambda request: registry))
        root.putChild(b"healthz", Health(self.registry))
        return root


class _PublicHealth(resource.Resource):
    """C{/healthz} answered before (and without) the credential check; the rest goes on."""

    def __init__(self, health: resource.IResource, rest: resource.IResource) -> None:
        resource.Resource.__init__(self)
        self.health = health
        self.rest = rest

    def getChildWithDefault(self, path: bytes, request: Request) -> resource.IResource:
        if path == b"healthz":
            return self.health
        # Hand the segment back to the tree that resolves it, as the auth gate does.
        assert request.postpath is not None and request.prepath is not None
        request.postpath.insert(0, request.prepath.pop())
        return self.rest

    def render(self, request: Request) -> Any:
        return self.rest.render(request)


def build_fleet_site(
    fleet: FleetResources,
    password_file: str | None = None,
    token_file: str | None = None,
    run_in_thread: Any = None,
    link_secret: str | None = None,
) -> ConsoleSite:
    """
    The many-console site (index, API, health, metrics, C{/c/NAME/}).

    @param link_secret: also accept links signed with the key in this file (a link used
        on a console it is not for gets 401; see L{AuthGate._console_asked}).

    @raise cloud_console.access.policy.CredentialFileError: a credential file is unusable.
    """
    if not (password_file or token_file or link_secret):
        rest = fleet.root_for(fleet.anonymous())
        root = _PublicHealth(Health(fleet.registry), rest)
        return ConsoleSite(root, timeout=HTTP_IDLE_TIMEOUT)
    gate: AuthGate = build_gate(
        fleet.root_for, password_file, token_file, run_in_thread, on_refused=fleet.refusals.count,
        link_secret=link_secret, consoles_under=b"c", audit=fleet.settings.audit,
    )
    root = _PublicHealth(Health(fleet.registry, gate.identify), gate)
    return ConsoleSite(root, timeout=HTTP_IDLE_TIMEOUT)
