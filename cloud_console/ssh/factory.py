"""
The SSH door's server: Conch's transport and factory, with current algorithms only.

What remains after the filtering here (OpenSSH 9.2's client against it, checked with
C{ssh -vv} and the tests): key exchange C{mlkem768x25519-sha256} where Conch has it,
C{curve25519-sha256}, C{ecdh-sha2-nistp256/384/521}, C{diffie-hellman-group14/16/18} with
SHA-2 (no SHA-1 exchange, and no group exchange without a moduli file, as Conch says);
ciphers C{aes256/192/128-ctr} (no CBC, no 3DES); MACs C{hmac-sha2-512/256} (no SHA-1, no
MD5); host key C{ssh-ed25519} (or an operator's ECDSA or RSA key with C{rsa-sha2-*},
never C{ssh-rsa}); user signatures as L{cloud_console.ssh.auth.USER_SIGNATURE_ALGORITHMS}.
"""

from __future__ import annotations

from typing import Any

from twisted.conch.ssh import _kex, connection, factory, keys, transport
from twisted.cred.portal import IRealm, Portal
from twisted.internet import protocol
from twisted.logger import Logger
from zope.interface import implementer

from . import CONCH_LOG
from .auth import (
    USER_SIGNATURE_ALGORITHMS,
    AuthFailures,
    ConsoleUserAuth,
    KeyChecker,
    Keyring,
    SSHLogin,
)
from .session import ConsoleUser, SSHDoor

_log = Logger()


def _current(names: list[bytes], refused: tuple[bytes, ...]) -> list[bytes]:
    return [n for n in names if not any(part in n for part in refused)]


class ConsoleSSHTransport(transport.SSHServerTransport):
    """
    Conch's server transport, announcing the user signature algorithms it accepts.

    Conch sends its host key algorithms as C{server-sig-algs}; a client picks the
    algorithm its RSA key signs with from that list, so it must name C{rsa-sha2-*}
    (or an RSA user key would fall back to SHA-1, which is refused).
    """

    _log = CONCH_LOG

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        """
        The client said why it disconnects. A client that is done (C{exit}, the
        escape's quit, a terminal closed: C{DISCONNECT_BY_APPLICATION}) is no error, and
        the session's detach line already says it ended; any other reason stays Conch's
        error line.
        """
        if reasonCode != transport.DISCONNECT_BY_APPLICATION:
            transport.SSHServerTransport.receiveError(self, reasonCode, description)

    def sendExtInfo(self, extensions: list[tuple[bytes, bytes]]) -> None:
        extensions = [
            (name, b",".join(USER_SIGNATURE_ALGORITHMS) if name == b"server-sig-algs" else value)
            for name, value in extensions
        ]
        transport.SSHServerTransport.sendExtInfo(self, extensions)


@implementer(IRealm)
class _Realm:
    def __init__(self, door: SSHDoor) -> None:
        self.door = door

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> tuple[Any, Any, Any]:
        from twisted.conch.interfaces import IConchUser

        if IConchUser not in interfaces or not isinstance(avatarId, SSHLogin):
            raise NotImplementedError("only SSH console users here")
        return IConchUser, ConsoleUser(avatarId, self.door), lambda: None


class ConsoleSSHConnection(connection.SSHConnection):
    """Conch's connection service, logging through L{CONCH_LOG} (warnings and errors)."""

    _log = CONCH_LOG


class ConsoleSSHFactory(factory.SSHFactory):
    """Serves the consoles over SSH with one host key and the door's keyring."""

    _log = CONCH_LOG
    protocol = ConsoleSSHTransport
    services = {
        b"ssh-userauth": ConsoleUserAuth,
        b"ssh-connection": ConsoleSSHConnection,
    }

    def __init__(self, door: SSHDoor, host_key: keys.Key, keyring: Keyring) -> None:
        self.door = door
        self.keyring = keyring
        self.auth_failures: AuthFailures = door.failures
        self.privateKeys = {host_key.sshType(): host_key}
        self.publicKeys = {host_key.sshType(): host_key.public()}
        self.primes = None
        self.portal = Portal(_Realm(door), [KeyChecker(keyring, door.failures, audit=door.audit)])

    def buildProtocol(self, addr: Any) -> transport.SSHServerTransport:
        # Not SSHFactory.buildProtocol: it logs, on every connection, that it drops the
        # group exchanges (no moduli file); that is said once, in algorithms().
        built = protocol.Factory.buildProtocol(self, addr)
        assert isinstance(built, transport.SSHServerTransport)
        built.supportedCiphers = _current(built.supportedCiphers, (b"-cbc", b"3des"))
        built.supportedMACs = _current(built.supportedMACs, (b"sha1", b"md5"))
        built.supportedKeyExchanges = [
            name
            for name in _current(built.supportedKeyExchanges, (b"sha1",))
            if not _kex.isDynamicPrimesGroup(name)
        ]
        built.supportedPublicKeys = [
            name
            for key in self.privateKeys.values()
            for name in key.supportedSignatureAlgorithms()
            if name not in (b"ssh-rsa", b"ssh-dss")
        ]
        return built

    def algorithms(self) -> dict[str, list[str]]:
        """What a connection may negotiate, by kind (logged at start, for the README)."""
        probe = self.buildProtocol(None)
        return {
            "kex": [n.decode() for n in probe.supportedKeyExchanges],
            "hostkey": [n.decode() for n in probe.supportedPublicKeys],
            "cipher": [n.decode() for n in probe.supportedCiphers],
            "mac": [n.decode() for n in probe.supportedMACs],
        }
