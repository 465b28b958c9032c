"""
Credential files and their twisted.cred checkers: PBKDF2-hashed passwords (HTTP Basic)
and bearer tokens, each line with its role and the consoles it may see.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from twisted.cred import credentials, error
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from zope.interface import Attribute, implementer

from .policy import Access, CredentialFileError, parse_console_patterns

#: PBKDF2-SHA256 rounds for new password hashes (OWASP's 2023 figure).
DEFAULT_ITERATIONS = 600_000
HASH_SCHEME = "pbkdf2-sha256"


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


_FIELD_HELP = "read-only, read-write, control or consoles=PATTERNS"

#: What a token's C{name=} may be: the identity logged and shown for it.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+\-]{0,63}")


def _options(fields: list[str], where: str, name: str, named: bool = False) -> Access:
    """
    The fields after a password hash or a token: a role, C{control} (the right to the
    consoles' actions: SysRq, BREAK, reset, power button) and a console list, each once;
    with C{named} (token lines) also C{name=}, the identity that stands for C{name}.
    """
    read_only: bool | None = None
    consoles: tuple[str, ...] | None = None
    given_name: str | None = None
    control = False
    for field in fields:
        key, sep, value = field.partition("=")
        if sep and key == "name" and named:
            if given_name is not None:
                raise CredentialFileError(f"{where}: name= given twice")
            if not _NAME.fullmatch(value) or value == "anonymous":
                raise CredentialFileError(
                    f"{where}: name {value!r} is not a name (up to 64 of A-Z a-z 0-9 . _ @ + -, "
                    "starting with a letter or digit, and not 'anonymous')"
                )
            given_name = value
        elif not sep and field == "control":
            if control:
                raise CredentialFileError(f"{where}: control given twice")
            control = True
        elif sep and key == "consoles":
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
            expected = _FIELD_HELP + (" or name=NAME" if named else "")
            raise CredentialFileError(f"{where}: unknown field {field!r} (expected {expected})")
    if control and read_only:
        raise CredentialFileError(f"{where}: control and read-only together (read-only never controls)")
    return Access(given_name or name, bool(read_only), consoles or (), control=control)


def load_password_file(path: str) -> dict[str, tuple[str, Access]]:
    """
    Read C{user:hash[:read-only][:control][:consoles=web-*,db1]} lines (the fields after
    the hash in any order; C{#} comments and blank lines allowed), as user: (hash, access).

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
    Read C{TOKEN [read-only] [control] [consoles=web-*,db1] [name=NAME]} lines (C{#}
    comments and blank lines allowed), as (token, access); the access is named C{NAME},
    or without a name C{token #N} after its place (the identity the logs, the audit log
    and the who lists show).

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
        if len(fields) > 4:
            raise CredentialFileError(
                f"{where}: expected: token [read-only] [control] [consoles=PATTERNS] [name=NAME]"
            )
        access = _options(fields[1:], where, f"token #{len(tokens) + 1}", named=True)
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
