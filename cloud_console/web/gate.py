"""
The web door's gate: every request's credential checked through twisted.cred.

A web console is a root shell on a VM for anyone who reaches it, so:

 - the WebSocket upgrade is refused unless its C{Origin} is the page's own host (or an
   origin the operator allowed): otherwise any web page an operator visits could open a
   WebSocket to the console and type into the VM (cross-site WebSocket hijacking);
 - optionally, every request (the page and the upgrade alike) needs a credential: HTTP
   Basic against a file of PBKDF2-hashed passwords, or a bearer token from a file (in an
   C{Authorization: Bearer} header, or once as C{?token=} on the page's URL, which sets a
   same-site cookie the page's WebSocket then carries);
 - a credential may be read-only: that viewer's input is discarded and counted;
 - a credential may be limited to some consoles (fnmatch patterns over their names): the
   others do not exist for it;
 - with C{--link-secret}, a bearer token may also be a signed, expiring link (a JSON Web
   Token; see L{cloud_console.access.links}) for one console or a pattern of them.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Callable

from twisted.cred import credentials, error, portal
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import pages, resource, util
from twisted.web.server import Request
from zope.interface import implementer

from ..access.audit import NO_AUDIT, Audit
from ..access.checkers import (
    BearerToken,
    PasswordChecker,
    TokenChecker,
    load_password_file,
    load_token_file,
)
from ..access.links import BearerChecker, LinkChecker, load_link_secret
from ..access.policy import Access

TOKEN_COOKIE = b"cloud-console-token"

#: Where the gate leaves the request's L{Access}, for the WebSocket to label its viewer.
_ACCESS_ATTRIBUTE = "cloud_console_access"


def access_of(request: Any) -> Access | None:
    """The credential the gate let this request in with (C{None} without credentials)."""
    access: Access | None = getattr(request, _ACCESS_ATTRIBUTE, None)
    return access


@implementer(portal.IRealm)
class ConsoleRealm:
    """
    Hands out the site tree for a credential's access: one tree per distinct scope
    (read-only or not, and which consoles), built on first use and shared by every
    credential with that scope, so a thousand users with the same access cost one tree.

    C{build_tree} is called with an L{Access} named after the scope, not after whoever
    came first (the tree is shared: it must depend only on C{read_only}, C{consoles} and
    C{control}; whoever acts is read from the request, L{access_of}).
    """

    def __init__(self, build_tree: Callable[[Access], resource.IResource]) -> None:
        self._build_tree = build_tree
        self._trees: dict[tuple[bool, tuple[str, ...], bool], resource.IResource] = {}

    def tree(self, access: Access) -> resource.IResource:
        scope = access.scope
        if scope not in self._trees:
            read_only, consoles, control = scope
            label = ("read-only" if read_only else "read-write") + (", control" if control else "")
            label += " on " + (",".join(consoles) or "*")
            self._trees[scope] = self._build_tree(Access(label, read_only, consoles, control=control))
        return self._trees[scope]

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> tuple[Any, Any, Callable[[], None]]:
        if resource.IResource not in interfaces:
            raise NotImplementedError("only web resources here")
        if isinstance(mind, _Mind):
            mind.access = avatarId
        return resource.IResource, self.tree(avatarId), lambda: None


@dataclass
class _Mind:
    """Passed to the portal so that the gate learns the L{Access} the realm was given."""

    access: Access | None = None


def _first_cookie(request: Request, name: bytes) -> bytes | None:
    """
    The first C{name} cookie the request carries. A browser sends the most specific path
    first, so a link's cookie (scoped to its console's directory) wins over an older
    site-wide one of the same name; twisted.web's getCookie would keep the last.
    """
    for header in request.requestHeaders.getRawHeaders(b"cookie") or []:
        for part in header.split(b";"):
            key, sep, value = part.strip().partition(b"=")
            if sep and key == name:
                return value
    return None


def _basic_credentials(value: bytes) -> credentials.UsernamePassword | None:
    try:
        decoded = base64.b64decode(value.strip(), validate=True)
    except ValueError:
        return None
    user, sep, password = decoded.partition(b":")
    if not sep:
        return None
    return credentials.UsernamePassword(user, password)


class AuthGate(resource.Resource):
    """
    Asks every request for a credential and serves the tree its avatar is given.

    Failures get 401 (with a Basic challenge when passwords are configured) and a log line
    with the peer's address; nothing of the console is reachable without a credential.
    Every 401 is reported to C{on_refused} as C{"auth"} (for the refusal counts).
    """

    _log = Logger()

    def __init__(
        self,
        portal: portal.Portal,
        basic: bool,
        on_refused: Callable[[str], None] | None = None,
        consoles_under: bytes | None = None,
        audit: Audit = NO_AUDIT,
    ) -> None:
        """
        @param consoles_under: the path segment the consoles are under (C{b"c"} for
            C{/c/NAME/}), where a signed link is checked against the console it is used
            on; C{None} with one console.
        @param audit: where a refused credential is audited (a request with none is not:
            every first visit is one).
        """
        resource.Resource.__init__(self)
        self.audit = audit
        self.portal = portal
        self.basic = basic
        self.on_refused = on_refused
        self.consoles_under = consoles_under

    def render(self, request: Request) -> Any:
        return self._authorized(request).render(request)

    def getChildWithDefault(self, path: bytes, request: Request) -> resource.IResource:
        # Hand the segment back so the tree that is chosen resolves it, as twisted.web's
        # guard does.
        assert request.postpath is not None and request.prepath is not None
        request.postpath.insert(0, request.prepath.pop())
        return self._authorized(request)

    def _credentials(self, request: Request) -> tuple[Any, bool]:
        """The request's credential, and whether it came in the URL (set a cookie)."""
        header = request.getHeader(b"authorization")
        if header:
            scheme, _, value = header.partition(b" ")
            scheme = scheme.lower()
            if scheme == b"basic" and self.basic:
                return _basic_credentials(value), False
            if scheme == b"bearer":
                return BearerToken(value.strip()), False
        token = (request.args or {}).get(b"token")
        if token:
            return BearerToken(token[0]), True
        cookie = _first_cookie(request, TOKEN_COOKIE)
        if cookie:
            return BearerToken(cookie), False
        return None, False

    def identify(self, request: Request) -> defer.Deferred[Access | None]:
        """
        Who is asking, for a resource outside the gate that serves everyone but shows a
        credential more (C{/healthz}): the L{Access} of a valid credential, else C{None}.

        Nothing is answered and no cookie is set; a bad credential is logged as by the
        gate, but it is not a 401 and is not counted as a refusal.
        """
        creds, _ = self._credentials(request)
        if creds is None:
            return defer.succeed(None)
        checker = next(
            (c for i, c in self.portal.checkers.items() if i.providedBy(creds)), None
        )
        if checker is None:
            return defer.succeed(None)
        peer = request.getClientAddress()

        def refused(failure: Failure) -> None:
            failure.trap(error.UnauthorizedLogin, error.UnhandledCredentials)
            self._log.warn(
                "authentication failed from {peer}: {why}", peer=str(peer), why=failure.getErrorMessage()
            )
            return None

        def check() -> Any:
            return checker.requestAvatarId(creds)

        d: defer.Deferred[Access | None] = defer.maybeDeferred(check)
        return d.addErrback(refused)

    def _authorized(self, request: Request) -> resource.IResource:
        creds, from_url = self._credentials(request)
        peer = request.getClientAddress()
        if creds is None:
            self._log.info(
                "no credentials from {peer} for {path}", peer=str(peer), path=request.uri.decode("latin-1")
            )
            return self._unauthorized()

        console = self._console_asked(request)
        mind = _Mind()

        def granted(result: tuple[Any, Any, Any]) -> Any:
            access = mind.access
            if access is not None:
                setattr(request, _ACCESS_ATTRIBUTE, access)
            if access is not None and access.link:
                if console is not None and not access.may_see(console):
                    self._log.warn(
                        "authentication failed from {peer}: signed link for {who} is for console "
                        "{patterns}, not {console}",
                        peer=str(peer), who=access.name, patterns=",".join(access.consoles), console=console,
                    )
                    self.audit.refused(
                        "web", "credential", _host(peer), access.name, console,
                        why="signed link for another console",
                    )
                    return self._unauthorized()
                if from_url or request.getHeader(b"upgrade"):
                    self._log.info(
                        "signed link for {who} ({mode}, console {patterns}) used from {peer} for {path}",
                        who=access.name, mode="read-only" if access.read_only else "read-write",
                        patterns=",".join(access.consoles) or "*", peer=str(peer),
                        path=request.path.decode("latin-1"),
                    )
            if from_url:
                # A link's cookie has no Path: the browser scopes it to the directory of
                # the URL it opened (its console's, however a proxy prefixes it), so links
                # to two consoles open in two tabs do not overwrite each other's cookie.
                link = access is not None and access.link
                request.addCookie(
                    TOKEN_COOKIE, creds.token, path=None if link else b"/", httpOnly=True,
                    sameSite="strict", secure=request.isSecure(),
                )
            return result[1]

        def refused(failure: Failure) -> resource.IResource:
            failure.trap(error.UnauthorizedLogin, error.UnhandledCredentials)
            self._log.warn(
                "authentication failed from {peer}: {why}", peer=str(peer), why=failure.getErrorMessage()
            )
            claimed = getattr(creds, "username", None)
            self.audit.refused(
                "web", "credential", _host(peer),
                claimed.decode("utf-8", "replace") if isinstance(claimed, bytes) else None,
                console, why=failure.getErrorMessage(),
            )
            return self._unauthorized()

        d = self.portal.login(creds, mind, resource.IResource)
        d.addCallbacks(granted, refused)
        return util.DeferredResource(d)

    def _console_asked(self, request: Request) -> str | None:
        """
        The console name a request is for (C{/c/NAME/...}), where links are checked.

        A link used on a console it is not for is answered 401 (where an ordinary
        credential gets 404 for a console it may not see): a link names one console, so
        the browser holding it is told the credential does not open this one, and since
        the 401 comes before the name is looked up, it is the same for a console that
        exists and for one that does not: no console's name is revealed either way.
        """
        postpath = request.postpath or []
        if self.consoles_under is None or len(postpath) < 2 or postpath[0] != self.consoles_under:
            return None
        return postpath[1].decode("latin-1")

    def _unauthorized(self) -> resource.IResource:
        if self.on_refused is not None:
            self.on_refused("auth")
        challenge = [b'Basic realm="cloud-console", charset="UTF-8"'] if self.basic else [b"Bearer"]
        return _Unauthorized(challenge)


def _host(address: Any) -> str:
    """A peer's host (its address without the port), as the who lists show it."""
    return str(getattr(address, "host", address))


class _Unauthorized(resource.Resource):
    isLeaf = True

    def __init__(self, challenges: list[bytes]) -> None:
        resource.Resource.__init__(self)
        self.challenges = challenges

    def render(self, request: Request) -> bytes:
        for challenge in self.challenges:
            request.responseHeaders.addRawHeader(b"www-authenticate", challenge)
        page: Any = pages.errorPage(401, "Unauthorized", "This console needs a credential.")
        result: bytes = page.render(request)
        return result


def build_gate(
    build_tree: Callable[[Access], resource.IResource],
    password_file: str | None,
    token_file: str | None,
    run_in_thread: Callable[..., Any] | None = None,
    *,
    on_refused: Callable[[str], None] | None = None,
    link_secret: str | None = None,
    consoles_under: bytes | None = None,
    audit: Audit = NO_AUDIT,
) -> AuthGate:
    """
    The authenticating root for the given credential files.

    @param build_tree: the site tree for an access (called once per distinct scope; see
        L{ConsoleRealm}).
    @param on_refused: called with C{"auth"} on every 401.
    @param link_secret: also accept links signed with the key in this file.
    @param consoles_under: the segment consoles are under (many consoles), else C{None}.

    @raise CredentialFileError: a file cannot be read, has a bad line, or (the link
        secret) is open to others or too short.
    """
    checkers: list[ICredentialsChecker] = []
    if password_file:
        checkers.append(PasswordChecker(load_password_file(password_file), run_in_thread))
    tokens = TokenChecker(load_token_file(token_file)) if token_file else None
    links = (
        LinkChecker(load_link_secret(link_secret), single_console=consoles_under is None)
        if link_secret else None
    )
    bearer: ICredentialsChecker | None = BearerChecker(tokens, links) if links is not None else tokens
    if bearer is not None:
        checkers.append(bearer)
    gate_portal = portal.Portal(ConsoleRealm(build_tree), checkers)
    return AuthGate(
        gate_portal, basic=bool(password_file), on_refused=on_refused, consoles_under=consoles_under,
        audit=audit,
    )
