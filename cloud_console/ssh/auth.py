"""
Who is at the SSH door: public keys from an C{authorized_keys} file and user
certificates signed by a trusted CA, plugged into Conch's public-key authentication.

Conch parses the key blob of a C{publickey} request with C{keys.Key.fromString}, which
refuses OpenSSH certificates before any checker sees them; L{ConsoleUserAuth} therefore
builds the credential itself, for plain keys and certificates alike, and L{KeyChecker}
checks the certificate (L{cloud_console.access.sshkeys}) and then the user's signature
over the session with the certified key. Everything else (the probe answered with
C{USERAUTH_PK_OK}, attempts, the failure messages) stays Conch's.

Only current signature algorithms: C{ssh-rsa} (RSA with SHA-1) and C{ssh-dss} are
refused, as OpenSSH itself does by default since 8.8; RSA keys sign with
C{rsa-sha2-256} or C{rsa-sha2-512}. No passwords and no keyboard-interactive: the portal
has only this checker, so Conch offers C{publickey} alone.
"""

from __future__ import annotations

import base64
import hashlib
import time
from dataclasses import dataclass
from typing import Any, Callable

from twisted.conch import error as conch_error
from twisted.conch.interfaces import IConchUser
from twisted.conch.ssh import keys, userauth
from twisted.conch.ssh.common import NS, getNS
from twisted.cred import credentials, error
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from ..access.audit import NO_AUDIT, Audit
from ..access.policy import CredentialFileError
from ..access.sshkeys import (
    AuthorizedKeys,
    RevokedKeys,
    SSHIdentity,
    SSHRefused,
    UserCertificateAuthorities,
    certificate_public_key_blob,
    is_certificate_algorithm,
)
from . import CONCH_LOG

#: Signature algorithms refused: SHA-1 RSA and DSA (OpenSSH refuses both by default).
REFUSED_ALGORITHMS = frozenset(
    {b"ssh-rsa", b"ssh-dss", b"ssh-rsa-cert-v01@openssh.com", b"ssh-dss-cert-v01@openssh.com"}
)

#: What the server accepts for user signatures (RFC 8308's C{server-sig-algs}). No
#: security keys (C{sk-*}): Conch verifies them as plain keys, ignoring their flags and
#: counter, so their signatures never check out (L{cloud_console.access.sshkeys}).
USER_SIGNATURE_ALGORITHMS = (
    b"ssh-ed25519",
    b"ecdsa-sha2-nistp256",
    b"ecdsa-sha2-nistp384",
    b"ecdsa-sha2-nistp521",
    b"rsa-sha2-512",
    b"rsa-sha2-256",
)

#: Seconds a connection may take to authenticate.
LOGIN_TIMEOUT = 30
#: Failed attempts a connection may make: the last of them closes it.
MAX_ATTEMPTS = 6

_log = Logger()


class AuthFailures:
    """SSH authentication failures by reason, for C{/metrics}; reactor thread only."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def count(self, reason: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1


class Keyring:
    """
    The keys and CAs the door trusts now. L{reload} (SIGHUP) reads the files again and,
    if one cannot be read, keeps what it had and says why.
    """

    def __init__(
        self,
        authorized_keys: str | None,
        user_ca: str | None,
        revoked_keys: str | None = None,
    ) -> None:
        self.paths = (authorized_keys, user_ca, revoked_keys)
        self.keys: AuthorizedKeys | None = None
        self.authorities: UserCertificateAuthorities | None = None
        self.revoked: RevokedKeys | None = None
        self._load()

    def _load(self) -> None:
        """@raise CredentialFileError: a file cannot be read (a revocation list too: fail closed)."""
        authorized_keys, user_ca, revoked_keys = self.paths
        keys_now = AuthorizedKeys.load(authorized_keys) if authorized_keys else None
        authorities = UserCertificateAuthorities.load(user_ca, revoked_keys) if user_ca else None
        revoked = RevokedKeys.load(revoked_keys) if revoked_keys else None
        self.keys, self.authorities, self.revoked = keys_now, authorities, revoked

    def reload(self) -> None:
        try:
            self._load()
        except CredentialFileError as e:
            _log.error("SSH keys not reloaded, the last good ones stay: {error}", error=str(e))
            return
        _log.info("SSH keys reloaded")

    def identify(self, algorithm: bytes, blob: bytes, address: str, now: float) -> SSHIdentity:
        """
        Who this key or certificate is.

        @raise SSHRefused: not trusted (the reason says why).
        """
        if is_certificate_algorithm(algorithm):
            if self.authorities is None:
                raise SSHRefused("unknown CA")
            return self.authorities.verify(blob, address, now)
        if self.keys is None:
            raise SSHRefused("unknown key")
        if self.revoked is not None and self.revoked.revokes_key(blob):
            raise SSHRefused("revoked")  # as sshd's RevokedKeys: plain keys too
        return self.keys.lookup(blob, address, now)


class AddressedKey(credentials.SSHPrivateKey):
    """Conch's public-key credential, with the client's address (for C{from=})."""

    def __init__(
        self,
        username: bytes,
        algName: bytes,
        blob: bytes,
        sigData: bytes | None,
        signature: bytes | None,
        address: str,
    ) -> None:
        credentials.SSHPrivateKey.__init__(self, username, algName, blob, sigData, signature)
        self.address = address


def _blob_fingerprint(algorithm: bytes, blob: bytes) -> str:
    """
    C{SHA256:...} of a key blob, as C{ssh-keygen -l} prints it for that key; for a
    certificate, of the certificate blob (said so), which C{ssh-keygen -l} does not print.
    """
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")
    kind = "certificate " if is_certificate_algorithm(algorithm) else ""
    return f"{kind}SHA256:{digest}"


@dataclass(frozen=True)
class SSHLogin:
    """An authenticated connection: who, as which user name (the console), from where."""

    identity: SSHIdentity
    username: str
    address: str


@implementer(ICredentialsChecker)
class KeyChecker:
    """Checks keys and certificates against the L{Keyring}, then the signature."""

    credentialInterfaces = (credentials.ISSHPrivateKey,)

    def __init__(
        self,
        keyring: Keyring,
        failures: AuthFailures,
        now: Callable[[], float] = time.time,
        audit: Audit = NO_AUDIT,
    ) -> None:
        self.keyring = keyring
        self.failures = failures
        self.now = now
        #: Where refused logins are audited (C{--audit-log}).
        self.audit = audit

    def requestAvatarId(self, creds: Any) -> defer.Deferred[Any]:
        address = getattr(creds, "address", "?")
        username = creds.username.decode("utf-8", "replace")
        try:
            login = self._check(creds, address, username)
        except SSHRefused as e:
            self.failures.count(e.reason)
            _log.info(
                "SSH login refused for {user!r} from {address} ({key}): {reason}",
                user=username,
                address=address,
                key=_blob_fingerprint(creds.algName, creds.blob),
                reason=e.reason,
                detail=getattr(e, "detail", ""),
            )
            fingerprint = _blob_fingerprint(creds.algName, creds.blob)
            self.audit.refused("ssh", e.reason, address, fingerprint, username)
            return defer.fail(error.UnauthorizedLogin(e.reason))
        except conch_error.ValidPublicKey:
            return defer.fail()
        return defer.succeed(login)

    def _check(self, creds: Any, address: str, username: str) -> SSHLogin:
        algorithm: bytes = creds.algName
        if algorithm in REFUSED_ALGORITHMS:
            raise SSHRefused("algorithm")
        identity = self.keyring.identify(algorithm, creds.blob, address, self.now())
        if creds.signature is None:
            # The probe: "would this key do?" Conch answers USERAUTH_PK_OK.
            raise conch_error.ValidPublicKey()
        blob = creds.blob
        if is_certificate_algorithm(algorithm):
            blob = certificate_public_key_blob(blob)
        try:
            signed_with = getNS(creds.signature)[0]
            key = keys.Key.fromString(blob)
            good = signed_with not in REFUSED_ALGORITHMS and key.verify(creds.signature, creds.sigData)
        except (keys.BadKeyError, ValueError, IndexError):
            good = False
        if not good:
            raise SSHRefused("bad signature")
        return SSHLogin(identity, username, address)


class ConsoleUserAuth(userauth.SSHUserAuthServer):
    """
    Conch's user-auth service with certificates, SHA-1 signatures refused, at most
    L{MAX_ATTEMPTS} attempts and L{LOGIN_TIMEOUT} seconds.
    """

    _log = CONCH_LOG
    loginTimeout = LOGIN_TIMEOUT
    # Conch disconnects once the failures exceed this: the sixth failure closes.
    attemptsBeforeDisconnect = MAX_ATTEMPTS - 1

    def auth_publickey(self, packet: bytes) -> defer.Deferred[Any]:
        transport, user, next_service = self.transport, self.user, self.nextService
        assert transport is not None and user is not None and next_service is not None
        has_signature = packet[0]
        algorithm, blob, rest = getNS(packet[1:], 2)
        signature = getNS(rest)[0] if has_signature else None
        signed = None
        if has_signature:
            signed = (
                NS(transport.sessionID or b"")
                + bytes((userauth.MSG_USERAUTH_REQUEST,))
                + NS(user)
                + NS(next_service)
                + NS(b"publickey")
                + bytes((has_signature,))
                + NS(algorithm)
                + NS(blob)
            )
            if not is_certificate_algorithm(algorithm):
                try:
                    key = keys.Key.fromString(blob)
                    if key.isSecurityKey():
                        signed = self._wrapMessageWithSKMetadata(signature, signed, key.application)
                except (keys.BadKeyError, ValueError):
                    pass  # the checker refuses it
        peer = transport.getPeer()
        address = getattr(getattr(peer, "address", None), "host", "?")
        creds = AddressedKey(user, algorithm, blob, signed, signature, address)
        result: defer.Deferred[Any] = self.portal.login(creds, None, IConchUser)
        if not has_signature:
            result.addErrback(self._ebCheckKey, packet[1:])
        return result

    def timeoutAuthentication(self) -> None:
        factory = getattr(self.transport, "factory", None)
        failures = getattr(factory, "auth_failures", None)
        if failures is not None:
            failures.count("timeout")
        audit = getattr(getattr(factory, "door", None), "audit", None)
        if audit is not None and self.transport is not None:
            peer = self.transport.getPeer()
            address = getattr(getattr(peer, "address", None), "host", "?")
            user = self.user.decode("utf-8", "replace") if self.user else None
            audit.refused("ssh", "timeout", address, None, user)
        _log.info("SSH connection closed: not authenticated within {seconds} s", seconds=self.loginTimeout)
        userauth.SSHUserAuthServer.timeoutAuthentication(self)
