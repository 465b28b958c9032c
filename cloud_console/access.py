"""
Who may use the console: origin checks, passwords and bearer tokens via twisted.cred.

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
   Token; see L{cloud_console.links}) for one console or a pattern of them.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit

from twisted.cred import credentials, error, portal
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import pages, resource, util
from twisted.web.server import Request
from zope.interface import Attribute, implementer

#: PBKDF2-SHA256 rounds for new password hashes (OWASP's 2023 figure).
DEFAULT_ITERATIONS = 600_000
HASH_SCHEME = "pbkdf2-sha256"
TOKEN_COOKIE = b"cloud-console-token"


# -- origins ---------------------------------------------------------------------------

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def normalize_origin(origin: str) -> tuple[str, str, int] | None:
    """
    C{scheme://host[:port]} as (scheme, host, port) with the scheme's default port filled
    in, so C{https://a} and C{https://a:443} compare equal; C{None} if it is not one.
    """
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[scheme]


def _host_and_port(host: str, default_port: int) -> tuple[str, int] | None:
    """A Host header value as (host, port)."""
    try:
        parts = urlsplit("//" + host.strip())
        return (parts.hostname or "").lower(), parts.port or default_port
    except ValueError:
        return None


@dataclass(frozen=True)
class OriginPolicy:
    """
    Which browser origins may open the console's WebSocket.

    Allowed: a request without C{Origin} (not a browser: a browser always sends one, so
    no web page can leave it out), an origin whose host and port are the C{Host} the
    request was sent to (or the C{X-Forwarded-Host} a reverse proxy set, which a web page
    cannot set on a WebSocket), and any origin in C{allowed}. C{"*"} allows every origin.
    """

    allowed: tuple[str, ...] = ()

    @property
    def allow_any(self) -> bool:
        return "*" in self.allowed

    def permits(self, origin: str | None, hosts: Iterable[str | None]) -> bool:
        if self.allow_any or not origin:
            return True
        if origin.strip() == "null":
            return "null" in self.allowed
        parsed = normalize_origin(origin)
        if parsed is None:
            return False
        for allowed in self.allowed:
            if normalize_origin(allowed) == parsed:
                return True
        scheme, host, port = parsed
        # A Host (or X-Forwarded-Host) without a port means the scheme's default one, as a
        # browser sends it: not "whatever port the Origin has", which would let a page on
        # another port of the same name through.
        default = _DEFAULT_PORTS[scheme]
        for candidate in hosts:
            if candidate and _host_and_port(candidate, default) == (host, port):
                return True
        return False


# -- passwords -------------------------------------------------------------------------


def hash_password(password: str, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None) -> str:
    """A password hash for the password file: C{pbkdf2-sha256$rounds$salt$hash}."""
    salt = salt if salt is not None else os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    b64 = base64.b64encode
    return f"{HASH_SCHEME}${iterations}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    """Whether C{password} matches C{encoded} (constant-time compare)."""
    try:
        scheme, rounds, salt, digest = encoded.split("$")
        if scheme != HASH_SCHEME:
            return False
        expected = base64.b64decode(digest, validate=True)
        computed = hashlib.pbkdf2_hmac(
            "sha256", password.encode("utf-8"), base64.b64decode(salt, validate=True), int(rounds)
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(computed, expected)


class CredentialFileError(Exception):
    """A password or token file cannot be read or has a bad line (which one, and why)."""


#: What a console pattern may contain: the console-name alphabet and fnmatch's C{*?[]!}.
_PATTERN_CHARS = re.compile(r"[a-z0-9._\-*?\[\]!]+")


def parse_console_patterns(text: str) -> tuple[str, ...]:
    """
    C{web-*,db1} as C{("web-*", "db1")}: comma-separated fnmatch patterns over console
    names, each non-empty and made only of C{a-z 0-9 . _ -} and C{* ? [ ] !}.

    @raise ValueError: an empty pattern or a character a console name cannot hold (the
        message says which).
    """
    patterns = tuple(text.split(","))
    for pattern in patterns:
        if not pattern:
            raise ValueError(f"empty console pattern in {text!r} (expected e.g. web-*,db1)")
        if not _PATTERN_CHARS.fullmatch(pattern):
            bad = sorted({c for c in pattern if not _PATTERN_CHARS.fullmatch(c)})
            raise ValueError(
                f"console pattern {pattern!r} holds {''.join(bad)!r}: patterns use a-z 0-9 . _ - "
                "and * ? [ ] ! only"
            )
    return patterns


@dataclass(frozen=True)
class Access:
    """
    Who logged in, whether they may type, and which consoles they may see.

    C{consoles} holds fnmatch patterns over console names; empty means every console.
    C{link} is set for a signed link (L{cloud_console.links}): C{name} is then its C{sub},
    and the gate answers 401, not 404, for a console the link is not for.
    """

    name: str
    read_only: bool
    consoles: tuple[str, ...] = ()
    link: bool = False

    def may_see(self, console_name: str) -> bool:
        """Whether this credential may see the console of that name (at all)."""
        if not self.consoles:
            return True
        return any(fnmatch.fnmatchcase(console_name, pattern) for pattern in self.consoles)

    @property
    def scope(self) -> tuple[bool, tuple[str, ...]]:
        """
        What the credential may do, without who it is: two credentials with equal scopes
        are served the same tree (the patterns sorted, duplicates and order ignored, and
        any C{*} pattern meaning every console).
        """
        if "*" in self.consoles:
            return self.read_only, ()
        return self.read_only, tuple(sorted(set(self.consoles)))


_FIELD_HELP = "read-only, read-write or consoles=PATTERNS"


def _options(fields: list[str], where: str, name: str) -> Access:
    """The fields after a password hash or a token: a role and a console list, each once."""
    read_only: bool | None = None
    consoles: tuple[str, ...] | None = None
    for field in fields:
        key, sep, value = field.partition("=")
        if sep and key == "consoles":
            if consoles is not None:
                raise CredentialFileError(f"{where}: consoles= given twice")
            try:
                consoles = parse_console_patterns(value)
            except ValueError as e:
                raise CredentialFileError(f"{where}: {e}") from None
        elif not sep and field in ("", "read-write", "rw", "read-only", "ro"):
            if read_only is not None and field:
                raise CredentialFileError(f"{where}: the role is given twice")
            if field:
                read_only = field in ("read-only", "ro")
        else:
            raise CredentialFileError(f"{where}: unknown field {field!r} (expected {_FIELD_HELP})")
    return Access(name, bool(read_only), consoles or ())


def load_password_file(path: str) -> dict[str, tuple[str, Access]]:
    """
    Read C{user:hash[:read-only][:consoles=web-*,db1]} lines (the fields after the hash in
    either order; C{#} comments and blank lines allowed), as user: (hash, access).

    @raise CredentialFileError: unreadable, a malformed line or field, or a plain-text
        password.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CredentialFileError(f"cannot read password file {path}: {e}") from e
    users: dict[str, tuple[str, Access]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path} line {number}"
        fields = line.split(":")
        if len(fields) < 2 or not fields[0]:
            raise CredentialFileError(f"{where}: expected user:hash[:read-only][:consoles=PATTERNS]")
        if not fields[1].startswith(HASH_SCHEME + "$") or fields[1].count("$") != 3:
            raise CredentialFileError(
                f"{where}: not a {HASH_SCHEME} hash (make one with cloud-console-passwd)"
            )
        users[fields[0]] = (fields[1], _options(fields[2:], where, fields[0]))
    return users


def load_token_file(path: str) -> list[tuple[bytes, Access]]:
    """
    Read C{TOKEN [read-only] [consoles=web-*,db1]} lines (C{#} comments and blank lines
    allowed), as (token, access); the access is named C{token #N} after its place.

    @raise CredentialFileError: unreadable, a token shorter than 16 characters, or a bad
        field.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CredentialFileError(f"cannot read token file {path}: {e}") from e
    tokens: list[tuple[bytes, Access]] = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        where = f"{path} line {number}"
        if len(fields[0]) < 16:
            raise CredentialFileError(f"{where}: a token must be at least 16 characters")
        if len(fields) > 3:
            raise CredentialFileError(f"{where}: expected: token [read-only] [consoles=PATTERNS]")
        access = _options(fields[1:], where, f"token #{len(tokens) + 1}")
        tokens.append((fields[0].encode("utf-8"), access))
    return tokens


class IBearerToken(credentials.ICredentials):
    """A bearer token, from an C{Authorization: Bearer} header or the token cookie."""

    token = Attribute("the token, bytes")


@implementer(IBearerToken)
@dataclass(frozen=True)
class BearerToken:
    token: bytes


@implementer(ICredentialsChecker)
class PasswordChecker:
    """
    Checks Basic credentials against a password file.

    PBKDF2 is slow on purpose, and a browser sends Basic credentials with every request,
    so a successful check is remembered (as an HMAC of the password under a key that lives
    only in this process) and an unknown user costs as much as a wrong password.
    """

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, users: dict[str, tuple[str, Access]], run: Callable[..., Any] | None = None) -> None:
        self.users = users
        self._run = run
        # An unknown user is checked against this, at the cost of the file's own hashes.
        rounds = next((int(h.split("$")[1]) for h, _ in users.values()), DEFAULT_ITERATIONS)
        self._dummy = hash_password(secrets.token_hex(8), rounds)
        self._key = secrets.token_bytes(32)
        self._verified: dict[str, bytes] = {}

    def requestAvatarId(self, creds: Any) -> defer.Deferred[Any]:
        try:
            name = creds.username.decode("utf-8")
            password = creds.password.decode("utf-8")
        except UnicodeDecodeError:
            return defer.fail(error.UnauthorizedLogin("credentials are not UTF-8"))
        encoded, access = self.users.get(name, (self._dummy, Access(name, True)))
        mac = hmac.new(self._key, password.encode("utf-8"), "sha256").digest()
        if name in self.users and hmac.compare_digest(self._verified.get(name, b""), mac):
            return defer.succeed(access)

        def verified(ok: bool) -> Access:
            if not ok or name not in self.users:
                raise error.UnauthorizedLogin("wrong user name or password")
            self._verified[name] = mac
            return access

        if self._run is None:
            return defer.maybeDeferred(verify_password, password, encoded).addCallback(verified)
        d: defer.Deferred[bool] = self._run(verify_password, password, encoded)
        return d.addCallback(verified)


@implementer(ICredentialsChecker)
class TokenChecker:
    """Checks bearer tokens against a token file, comparing every token in constant time."""

    credentialInterfaces = (IBearerToken,)

    def __init__(self, tokens: list[tuple[bytes, Access]]) -> None:
        self.tokens = tokens

    def requestAvatarId(self, creds: Any) -> defer.Deferred[Any]:
        found: Access | None = None
        for token, access in self.tokens:
            if hmac.compare_digest(token, creds.token) and found is None:
                found = access
        if found is None:
            return defer.fail(error.UnauthorizedLogin("unknown token"))
        return defer.succeed(found)


@implementer(portal.IRealm)
class ConsoleRealm:
    """
    Hands out the site tree for a credential's access: one tree per distinct scope
    (read-only or not, and which consoles), built on first use and shared by every
    credential with that scope, so a thousand users with the same access cost one tree.

    C{build_tree} is called with an L{Access} named after the scope, not after whoever
    came first (the tree is shared: it must depend only on C{read_only} and C{consoles}).
    """

    def __init__(self, build_tree: Callable[[Access], resource.IResource]) -> None:
        self._build_tree = build_tree
        self._trees: dict[tuple[bool, tuple[str, ...]], resource.IResource] = {}

    def tree(self, access: Access) -> resource.IResource:
        scope = access.scope
        if scope not in self._trees:
            read_only, consoles = scope
            label = ("read-only" if read_only else "read-write") + " on " + (",".join(consoles) or "*")
            self._trees[scope] = self._build_tree(Access(label, read_only, consoles))
        return self._trees[scope]

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> tuple[Any, Any, Callable[[], None]]:
        if resource.IResource not in interfaces:
            raise NotImplementedError("only web resources here")
        if isinstance(mind, _Mind):
            mind.access = avatarId
        return resource.IResource, self.tree(avatarId), lambda: None


@implementer(ICredentialsChecker)
class BearerChecker:
    """
    Bearer tokens from the token file and signed links alike (the portal asks one checker
    per credential interface): a token the file holds is accepted; anything else shaped
    like a JSON Web Token is checked as a link, and refused with the link's reason.
    """

    credentialInterfaces = (IBearerToken,)

    def __init__(self, tokens: ICredentialsChecker | None, links: ICredentialsChecker | None) -> None:
        self.tokens = tokens
        self.links = links

    def requestAvatarId(self, creds: Any) -> defer.Deferred[Any]:
        from .links import looks_like_jwt

        if self.links is not None and (self.tokens is None or looks_like_jwt(creds.token)):
            if self.tokens is None:
                return self.links.requestAvatarId(creds)
            # A file's token might (in theory) hold two dots: it is tried first.
            tokens, links = self.tokens, self.links

            def as_link(failure: Failure) -> Any:
                failure.trap(error.UnauthorizedLogin)
                return links.requestAvatarId(creds)

            d: defer.Deferred[Any] = tokens.requestAvatarId(creds)
            return d.addErrback(as_link)
        assert self.tokens is not None
        return self.tokens.requestAvatarId(creds)


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
    ) -> None:
        """
        @param consoles_under: the path segment the consoles are under (C{b"c"} for
            C{/c/NAME/}), where a signed link is checked against the console it is used
            on; C{None} with one console.
        """
        resource.Resource.__init__(self)
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
            if access is not None and access.link:
                if console is not None and not access.may_see(console):
                    self._log.warn(
                        "authentication failed from {peer}: signed link for {who} is for console "
                        "{patterns}, not {console}",
                        peer=str(peer), who=access.name, patterns=",".join(access.consoles), console=console,
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
    from .links import LinkChecker, load_link_secret

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
    return AuthGate(gate_portal, basic=bool(password_file), on_refused=on_refused, consoles_under=consoles_under)
