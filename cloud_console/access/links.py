"""
Signed, expiring console links: JSON Web Tokens (HS256, through PyJWT) that a control
plane mints with a secret it shares with the host, and C{cloud-console-link}, which mints
one.

A link is C{BASE/c/NAME/?token=JWT} (or C{BASE/?token=JWT} for every console, or for the
one console of a single-console server). Its claims:

 - C{exp} (required): when the link stops opening consoles; C{nbf} and C{iat}, when
   present, are honoured too; all three with L{LEEWAY} seconds for clocks that differ;
 - C{console} (required): the console name or fnmatch pattern it opens (C{*}: every one);
 - C{ro}: true for a read-only session;
 - C{sub}: who it was minted for, logged when it is used.

The signature is checked with one algorithm only, HS256, named here and never taken from
the token (so C{alg: none} and every other algorithm are refused). A refused link is
answered 401 like any bad credential; the reason (expired, not yet valid, bad signature,
a missing or malformed claim) goes to the log, never into the response.

Single-console mode: that console has no name, so a link opens it only when its
C{console} claim is C{*} (C{cloud-console-link --console '*'}); a link naming a console
is refused there. A fleet's secret may so be shared with single-console servers without
a link for one VM opening another's console.
"""

from __future__ import annotations

import os
import stat
import sys
import time
from typing import Any, Sequence
from urllib.parse import quote

import jwt
from twisted.cred import error
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from .checkers import IBearerToken
from .policy import Access, CredentialFileError, parse_console_patterns

#: The only algorithm accepted (a fixed list, never read from the token: RFC 8725 2.1).
ALGORITHMS = ["HS256"]
#: Seconds of clock difference allowed for C{exp}, C{nbf} and C{iat}.
LEEWAY = 30
#: The shortest secret accepted, in bytes (HS256's own output size).
MIN_SECRET_BYTES = 32
DEFAULT_BASE = "http://127.0.0.1:8080/"
#: Every console (and the only one a single-console server accepts).
EVERY_CONSOLE = "*"


def load_link_secret(path: str) -> bytes:
    """
    The key in C{path}: its bytes as they are, except that a text key (printable ASCII,
    as C{openssl rand -base64 48} writes) loses its trailing line ending.

    @raise CredentialFileError: unreadable, group or others have any access to it, or
        shorter than L{MIN_SECRET_BYTES} bytes.
    """
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read()
    except OSError as e:
        raise CredentialFileError(f"cannot read link secret {path}: {e}") from e
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CredentialFileError(
            f"link secret {path} is open to group or others (mode {stat.S_IMODE(mode):04o}): "
            f"chmod 600 {path}"
        )
    text = data.rstrip(b"\r\n")
    if text and all(0x20 <= byte < 0x7F for byte in text):
        data = text
    if len(data) < MIN_SECRET_BYTES:
        raise CredentialFileError(
            f"link secret {path} holds {len(data)} bytes; at least {MIN_SECRET_BYTES} random "
            "bytes are needed (e.g. head -c 32 /dev/urandom > FILE)"
        )
    return data


def mint(
    secret: bytes,
    console: str,
    ttl: float,
    *,
    read_only: bool = False,
    user: str | None = None,
    now: float | None = None,
    control: bool = False,
) -> str:
    """
    A link token for C{console} (a name or pattern) valid for C{ttl} seconds from C{now};
    C{control} adds the C{ctl} claim (the console's actions).
    """
    if control and read_only:
        raise ValueError("a read-only link cannot control")
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"console": console, "iat": issued, "exp": issued + max(1, round(ttl))}
    if read_only:
        claims["ro"] = True
    if control:
        claims["ctl"] = True
    if user is not None:
        claims["sub"] = user
    return jwt.encode(claims, secret, algorithm=ALGORITHMS[0])


def link_url(base: str, console: str, token: str) -> str:
    """C{BASE c/NAME/?token=...} for a console name; C{BASE ?token=...} for a pattern."""
    if not base.endswith("/"):
        base += "/"
    path = "" if any(c in console for c in "*?[]!") else f"c/{console}/"
    return f"{base}{path}?token={quote(token, safe='')}"


class LinkRefused(error.UnauthorizedLogin):
    """A link that does not open this console; the message is the reason, for the log."""


def _who(token: bytes, secret: bytes) -> str:
    """C{sub} of a token whose signature was found good (for the log), or C{?}."""
    try:
        claims = jwt.decode(token, secret, algorithms=ALGORITHMS, options={"verify_exp": False,
                            "verify_nbf": False, "verify_iat": False})
    except jwt.InvalidTokenError:
        return "?"
    return str(claims.get("sub", "?"))


@implementer(ICredentialsChecker)
class LinkChecker:
    """
    Checks bearer tokens as signed links; the avatar is an L{Access} named after C{sub}
    with C{consoles} the link's pattern and C{link} set (see L{AuthGate} for the console
    a link is used on).
    """

    credentialInterfaces = (IBearerToken,)

    def __init__(self, secret: bytes, single_console: bool = False) -> None:
        self.secret = secret
        self.single_console = single_console

    def check(self, token: bytes) -> Access:
        """
        The access a link grants.

        @raise LinkRefused: why not.
        """
        try:
            claims = jwt.decode(
                token,
                self.secret,
                algorithms=ALGORITHMS,
                leeway=LEEWAY,
                options={"require": ["exp", "console"], "verify_exp": True, "verify_nbf": True,
                         "verify_iat": True, "verify_signature": True},
            )
        except jwt.ExpiredSignatureError:
            raise LinkRefused(f"signed link for {_who(token, self.secret)} has expired") from None
        except jwt.ImmatureSignatureError:
            raise LinkRefused(f"signed link for {_who(token, self.secret)} is not valid yet") from None
        except jwt.MissingRequiredClaimError as e:
            raise LinkRefused(f"signed link for {_who(token, self.secret)} lacks the {e.claim} claim") from None
        except jwt.InvalidSignatureError:
            raise LinkRefused("signed link with a wrong signature") from None
        except jwt.InvalidAlgorithmError:
            raise LinkRefused("signed link with an algorithm other than HS256") from None
        except jwt.InvalidTokenError as e:
            raise LinkRefused(f"signed link refused: {e}") from None
        who = str(claims.get("sub", "?"))
        console = claims["console"]
        if not isinstance(console, str):
            raise LinkRefused(f"signed link for {who}: the console claim is not a string")
        try:
            if "," in console:
                raise ValueError(f"console claim {console!r}: one name or pattern per link")
            patterns = parse_console_patterns(console)
        except ValueError as e:
            raise LinkRefused(f"signed link for {who}: {e}") from None
        if self.single_console and console != EVERY_CONSOLE:
            raise LinkRefused(
                f"signed link for {who} is for console {console}; this server's one console "
                f"has no name and opens only for console {EVERY_CONSOLE!r}"
            )
        read_only = claims.get("ro", False)
        if not isinstance(read_only, bool):
            raise LinkRefused(f"signed link for {who}: the ro claim is not true or false")
        control = claims.get("ctl", False)
        if not isinstance(control, bool):
            raise LinkRefused(f"signed link for {who}: the ctl claim is not true or false")
        if control and read_only:
            raise LinkRefused(f"signed link for {who}: ro and ctl together (read-only never controls)")
        return Access(
            who, read_only, () if console == EVERY_CONSOLE else patterns, link=True, control=control
        )

    def requestAvatarId(self, creds: Any) -> defer.Deferred[Any]:
        try:
            return defer.succeed(self.check(creds.token))
        except LinkRefused:
            return defer.fail()


def looks_like_jwt(token: bytes) -> bool:
    """Three dot-separated parts: worth checking as a link (a file's token is never one)."""
    return token.count(b".") == 2


# -- cloud-console-link --------------------------------------------------------------------

USAGE = (
    "usage: cloud-console-link --secret FILE --console NAME|PATTERN --ttl SECONDS "
    "[--read-only | --control] [--user NAME] [--base URL]\n"
    "  prints BASE c/NAME/?token=JWT (BASE ?token=JWT for a pattern such as '*');\n"
    f"  --base defaults to {DEFAULT_BASE}\n"
)


def main(argv: Sequence[str] | None = None) -> int:
    """Print a signed link; exit 1 with the usage on a bad input, 2 on a bad secret file."""
    args = list(sys.argv[1:] if argv is None else argv)
    values: dict[str, str] = {}
    read_only = False
    control = False

    def bad(message: str) -> int:
        sys.stderr.write(f"cloud-console-link: {message}\n{USAGE}")
        return 1

    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            sys.stdout.write(USAGE)
            return 0
        if arg == "--read-only":
            read_only = True
            continue
        if arg == "--control":
            control = True
            continue
        name, sep, value = arg.partition("=")
        if name not in ("--secret", "--console", "--ttl", "--user", "--base"):
            return bad(f"unknown argument {arg!r}")
        if not sep:
            if not args:
                return bad(f"{arg} needs a value")
            value = args.pop(0)
        if name in values:
            return bad(f"{name} given twice")
        values[name] = value
    if read_only and control:
        return bad("--read-only and --control together: a read-only link never controls")
    for required in ("--secret", "--console", "--ttl"):
        if required not in values:
            return bad(f"{required} is required")
    console = values["--console"]
    if "," in console:
        return bad(f"--console {console!r}: one name or pattern per link")
    try:
        parse_console_patterns(console)
    except ValueError as e:
        return bad(f"--console: {e}")
    try:
        ttl = float(values["--ttl"])
    except ValueError:
        return bad(f"--ttl must be a number of seconds, not {values['--ttl']!r}")
    if not 0 < ttl < float("inf"):
        return bad(f"--ttl must be more than 0 seconds, not {values['--ttl']}")
    user = values.get("--user")
    if user is not None and not user:
        return bad("--user must not be empty")
    base = values.get("--base", DEFAULT_BASE)
    if not base.startswith(("http://", "https://")):
        return bad(f"--base {base!r} is not an http:// or https:// URL")
    try:
        secret = load_link_secret(values["--secret"])
    except CredentialFileError as e:
        sys.stderr.write(f"cloud-console-link: {e}\n")
        return 2
    token = mint(secret, console, ttl, read_only=read_only, user=user, control=control)
    sys.stdout.write(link_url(base, console, token) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())


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
