"""
The SSH door's host key: read from an OpenSSH private key file, or made on first start.

A host key is what lets an operator's C{ssh} tell this server from an impostor, so it is
kept private: a file that group or others may read is refused (as sshd refuses one),
with the C{chmod} to run, and a key made here is written with mode 0600 before a byte of
it is. Its fingerprint is logged as C{ssh-keygen -lf} prints it, to compare with what
C{ssh} shows on first contact.
"""

from __future__ import annotations

import os
import socket
import stat

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh import keys
from twisted.logger import Logger

from ..access.sshkeys import fingerprint

_log = Logger()


class HostKeyError(Exception):
    """The host key cannot be used; the message says why and what to do."""


def key_line(key: keys.Key, comment: str = "") -> str:
    """
    The key as C{ssh-keygen -lf} prints it: bits, fingerprint, comment (the public
    half's, where there is one beside it), type, e.g.
    C{256 SHA256:abc... cloud-console@host (ED25519)}.
    """
    kind = key.type()
    label = {"EC": "ECDSA", "Ed25519": "ED25519", "RSA": "RSA", "DSA": "DSA"}.get(kind, kind.upper())
    return f"{key.size()} {fingerprint(key)} {comment} ({label})"


def load_or_create_host_key(path: str) -> keys.Key:
    """
    The private host key in C{path}; if there is no such file, a new ed25519 key written
    there (mode 0600, its public half beside it as C{PATH.pub}).

    @raise HostKeyError: the file is open to group or others, unreadable, or not a key.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return _create(path)
    except OSError as e:
        raise HostKeyError(f"--ssh-host-key {path}: {e.strerror}") from e
    if info.st_mode & 0o077:
        raise HostKeyError(
            f"--ssh-host-key {path} may be read by others (mode "
            f"{stat.filemode(info.st_mode)}): a host key must be private; run: chmod 600 {path}"
        )
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise HostKeyError(f"--ssh-host-key {path}: {e.strerror}") from e
    try:
        key: keys.Key = keys.Key.fromString(data)
    except (keys.BadKeyError, keys.EncryptedKeyError, ValueError) as e:
        raise HostKeyError(
            f"--ssh-host-key {path} is not an unencrypted OpenSSH private key: {e}"
        ) from e
    if key.isPublic():
        raise HostKeyError(f"--ssh-host-key {path} holds a public key; the private key is needed")
    _log.info("SSH host key {path}: {line}", path=path, line=key_line(key, _comment(path)))
    return key


def _comment(path: str) -> str:
    """The comment of the public half beside the key (as C{ssh-keygen -lf} shows it)."""
    try:
        with open(path + ".pub", encoding="utf-8") as f:
            fields = f.read().split(None, 2)
    except (OSError, UnicodeDecodeError):
        return ""
    return fields[2].strip() if len(fields) == 3 else ""


def _create(path: str) -> keys.Key:
    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise HostKeyError(f"--ssh-host-key {path}: cannot create it: {e.strerror}") from e
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    key = keys.Key(private)
    comment = f"cloud-console@{socket.gethostname()}"
    public = key.public().toString("openssh", comment=comment).decode("ascii")
    try:
        with open(path + ".pub", "x", encoding="ascii") as f:
            f.write(public + "\n")
    except OSError:
        comment = ""  # the public half is a convenience; the private key holds it too
    _log.info("SSH host key {path} created: {line}", path=path, line=key_line(key, comment))
    return key
