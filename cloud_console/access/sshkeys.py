"""
Who an SSH client is: its public key in an C{authorized_keys} file (L{AuthorizedKeys}), or
its certificate from a trusted user CA (L{UserCertificateAuthorities}), as an
L{SSHIdentity} that says which consoles it may open and whether it may type there.

Keys are parsed by Conch, certificates by C{cryptography}; this module only reads the
lines around them and decides. Its rule: a key or certificate is never given more than its
issuer meant. An C{authorized_keys} option or a certificate critical option that cannot be
honoured here (C{command=}, C{force-command}, C{verify-required}, an unknown word) refuses
that key or certificate rather than being skipped.

Security keys (C{sk-ssh-ed25519@openssh.com}, C{sk-ecdsa-sha2-nistp256@openssh.com}) are
refused, in a file and in a certificate: Conch parses them but verifies their signatures
as plain Ed25519 or ECDSA ones (a real security key's signature covers its flags and
counter too, so it never verifies), and nothing here could check the touch or PIN flags
OpenSSH checks. DSA keys are refused as OpenSSH refuses them.

Both files are read once by C{load()} and never change after it; the door reloads them on
SIGHUP by calling C{load()} again.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import fnmatch
import ipaddress
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Union

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import (
    SSHCertificate,
    SSHCertificateType,
    load_ssh_public_identity,
)
from twisted.conch.ssh import common, keys
from twisted.cred import error
from twisted.logger import Logger

from .links import LEEWAY
from .policy import Access, CredentialFileError, parse_console_patterns

_log = Logger()

#: What every certificate key type and certificate signature algorithm name ends with.
CERT_SUFFIX = b"-cert-v01@openssh.com"
#: A certificate's C{valid_before} that means "forever".
_FOREVER = 2**64 - 1
#: Read-only principal prefix: C{read-only:db*} opens the consoles C{db*} read-only.
READ_ONLY_PRINCIPAL = "read-only:"
#: Control principal prefix: C{control:web-*} opens the consoles C{web-*} read-write with
#: the right to their actions (SysRq, BREAK, reset, power button).
CONTROL_PRINCIPAL = "control:"
#: The C{authorized_keys} option that gives a key the control right on what it opens.
CONTROL_OPTION = "control"

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class SSHRefused(error.UnauthorizedLogin):
    """
    A key or certificate that opens nothing here. C{reason} is short and fixed (C{"unknown
    key"}, C{"expired"}, ...) for counting and tests; C{detail} says more, for the log.
    An L{error.UnauthorizedLogin}, so that the door can hand it to Conch as a plain failed
    login.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class SSHIdentity:
    """
    Who an SSH key or certificate is, and which consoles it opens.

    C{consoles} and C{read_only_consoles} are fnmatch patterns over console names, opened
    read-write and read-only; both empty means every console (as for L{Access}). The
    control right (L{Access.control}) is on the read-write consoles matching
    C{control_consoles} (a certificate's C{control:} principals), or on every read-write
    one with C{control} (an C{authorized_keys} line's option); never read-only. C{expires}
    is when it stops opening consoles (a certificate's C{valid_before}, an
    C{authorized_keys} line's C{expiry-time}), or C{None}. C{serial} and C{signer} (the
    CA's fingerprint) are set for certificates, for the log.
    """

    name: str
    fingerprint: str
    consoles: tuple[str, ...]
    read_only_consoles: tuple[str, ...]
    read_only: bool
    certificate: bool
    expires: float | None
    serial: int | None = None
    signer: str | None = None
    control: bool = False
    control_consoles: tuple[str, ...] = ()

    def _controls(self, console_name: str | None) -> bool:
        """Whether the control right covers that console (if it opens it read-write)."""
        if self.control:
            return True
        if console_name is None:
            return "*" in self.control_consoles
        return _matches(console_name, self.control_consoles)

    def _covers_all(self) -> bool | None:
        """Whether it opens every console read-write (C{True}), read-only (C{False}), or not."""
        if (not self.consoles and not self.read_only_consoles) or "*" in self.consoles:
            return True
        if "*" in self.read_only_consoles:
            return False
        return None

    def access_for(self, console_name: str | None) -> Access | None:
        """
        The access to console C{console_name}, or C{None} if it may not open it.

        C{None} for C{console_name} is a single-console server's one console, which has no
        name: it opens only for an identity that covers every console (no pattern at all,
        or C{*}), as signed links do there (L{cloud_console.access.links}), so that one CA
        or key file may serve a fleet and single-console hosts alike.
        """
        if console_name is None:
            every = self._covers_all()
            if every is None:
                return None
            read_only = self.read_only or not every
            return Access(self.name, read_only, (), control=not read_only and self._controls(None))
        control = not self.read_only and self._controls(console_name)
        if not self.consoles and not self.read_only_consoles:
            return Access(self.name, self.read_only, (console_name,), control=control)
        if _matches(console_name, self.consoles):
            return Access(self.name, self.read_only, (console_name,), control=control)
        if _matches(console_name, self.read_only_consoles):
            return Access(self.name, True, (console_name,))
        return None

    def may_open(self, console_name: str | None) -> bool:
        """Whether it opens that console at all (see L{access_for})."""
        return self.access_for(console_name) is not None

    def visible(self, names: Iterable[str]) -> list[str]:
        """Those of C{names} it may open, in their order."""
        return [name for name in names if self.may_open(name)]


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def is_certificate_algorithm(name: bytes) -> bool:
    """
    Whether a public key algorithm name is a certificate's
    (C{ssh-ed25519-cert-v01@openssh.com}, C{rsa-sha2-512-cert-v01@openssh.com}, ...).
    """
    return name.endswith(CERT_SUFFIX)


def fingerprint(key: keys.Key) -> str:
    """
    C{SHA256:...} as C{ssh-keygen -l} prints it: Conch's SHA256 fingerprint is the same
    base64 but keeps its C{=} padding, which OpenSSH drops.
    """
    return "SHA256:" + str(key.fingerprint(keys.FingerprintFormats.SHA256_BASE64)).rstrip("=")


def _conch_key(blob: bytes) -> keys.Key | None:
    """
    The public key in an SSH wire blob, or C{None}. The blob may come from the client:
    Conch's parser raises C{BadKeyError}, C{struct.error}, C{IndexError} or C{ValueError}
    on bad input, and C{None} stands for all of them.
    """
    if not blob.startswith(b"\x00\x00\x00"):  # else Conch would try other formats
        return None
    try:
        key: keys.Key = keys.Key.fromString(blob)
    except (keys.BadKeyError, struct.error, IndexError, ValueError, UnsupportedAlgorithm):
        return None
    return key if key.isPublic() else None


def _unsupported_key_type(kind: bytes) -> str | None:
    """Why a key of this type is refused (see the module docstring), or C{None}."""
    if kind.startswith(b"sk-"):
        return (
            "security keys (sk-*) are not supported: their signatures and touch flags "
            "cannot be checked"
        )
    if kind.startswith(b"ssh-dss"):
        return "DSA keys are not accepted (OpenSSH refuses them too)"
    return None


def _parse_public_key(text: str) -> tuple[keys.Key, str]:
    """
    C{keytype base64 [comment]} as (key, comment).

    @raise ValueError: why not (the text's type must be the blob's).
    """
    parts = text.split(None, 2)
    if len(parts) < 2:
        raise ValueError("expected: [options] keytype base64 [comment]")
    kind, data = parts[0], parts[1]
    try:
        blob = base64.b64decode(data, validate=True)
    except binascii.Error:
        raise ValueError(f"the {kind} key is not valid base64") from None
    key = _conch_key(blob)
    if key is None:
        raise ValueError(f"cannot parse the {kind} key")
    real = key.sshType()
    if real != kind.encode("utf-8", "replace"):
        raise ValueError(f"the line says {kind} but the key is {real.decode('ascii', 'replace')}")
    unsupported = _unsupported_key_type(real)
    if unsupported:
        raise ValueError(unsupported)
    return key, parts[2].strip() if len(parts) > 2 else ""


# -- addresses: from= and source-address --------------------------------------------------


def _client_address(address: str) -> Address | None:
    """The client's address; an IPv4-mapped IPv6 address as the IPv4 one (as sshd sees it)."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclass(frozen=True)
class AddressList:
    """
    An address pattern list as OpenSSH matches C{from=} against the client's IP address
    (never its host name here: no DNS): comma-separated entries, each an address or a CIDR
    network (C{10.0.0.0/8}, C{2001:db8::/32}), or a pattern with C{*} and C{?}
    (C{192.168.1.*}); C{!} before an entry negates it. A matching negated entry refuses
    outright; otherwise some plain entry must match.
    """

    entries: tuple[tuple[bool, Network | re.Pattern[str]], ...]

    @classmethod
    def parse(cls, text: str, cidr_only: bool = False) -> AddressList:
        """
        @param cidr_only: addresses and networks only, no C{!} or wildcard (a certificate's
            C{source-address}).
        @raise ValueError: an empty entry, a network with host bits set or a bad mask.
        """
        entries: list[tuple[bool, Network | re.Pattern[str]]] = []
        for entry in text.split(","):
            negated = entry.startswith("!") and not cidr_only
            body = entry[1:] if negated else entry
            if not body:
                raise ValueError(f"empty entry in {text!r}")
            try:
                entries.append((negated, ipaddress.ip_network(body, strict=True)))
                continue
            except ValueError as e:
                if cidr_only or "/" in body:
                    raise ValueError(f"{body!r} is not an address or network: {e}") from None
            pattern = "".join({"*": ".*", "?": "."}.get(c, re.escape(c)) for c in body.lower())
            entries.append((negated, re.compile(pattern)))
        return cls(tuple(entries))

    def allows(self, address: str) -> bool:
        """Whether the client at C{address} (an IP address string) is allowed."""
        ip = _client_address(address)
        text = str(ip) if ip is not None else address.lower()
        allowed = False
        for negated, matcher in self.entries:
            if isinstance(matcher, re.Pattern):
                hit = matcher.fullmatch(text) is not None
            else:
                hit = ip is not None and ip in matcher
            if hit and negated:
                return False
            allowed = allowed or hit
        return allowed


# -- authorized_keys ----------------------------------------------------------------------

#: Options accepted and ignored: they restrict what this door never offers (a command,
#: forwarding, X11, ~/.ssh/rc), or re-allow it after C{restrict}. C{no-touch-required}
#: too: it only relaxes a check on security keys, which are refused anyway.
IGNORED_OPTIONS = frozenset({
    "restrict", "pty", "no-pty", "port-forwarding", "no-port-forwarding", "agent-forwarding",
    "no-agent-forwarding", "x11-forwarding", "no-x11-forwarding", "user-rc", "no-user-rc",
    "no-touch-required",
})
#: OpenSSH options that grant or demand what cannot be honoured here: the line is refused.
REFUSED_OPTIONS = {
    "command": "a forced command cannot be honoured: the door only opens consoles",
    "environment": "environment variables cannot be set",
    "permitopen": "port forwarding is not offered",
    "permitlisten": "port forwarding is not offered",
    "tunnel": "tunnels are not offered",
    "cert-authority": "CAs are given with --ssh-user-ca, not in authorized_keys",
    "principals": "principals belong with cert-authority, which is not accepted here",
    "verify-required": "user verification (a security key PIN) cannot be checked",
}
_VALUED_OPTIONS = ("consoles", "from", "expiry-time")
_OPTION_NAME = re.compile(r"[A-Za-z0-9._-]+")
_EXPIRY_TIME = re.compile(r"(\d{8}(?:\d{4}(?:\d{2})?)?)([Zz]?)")
_KEY_TYPE_PREFIXES = ("ssh-", "ecdsa-", "sk-")


def _quoted(line: str, start: int) -> tuple[str, int]:
    """
    The double-quoted value starting at C{line[start]} (a C{"}) and the index after it;
    C{\\"} stands for C{"} and every other character, C{\\} and C{,} included, for itself
    (as OpenSSH reads option values).
    """
    out: list[str] = []
    i = start + 1
    while i < len(line):
        c = line[i]
        if c == "\\" and line[i + 1 : i + 2] == '"':
            out.append('"')
            i += 2
        elif c == '"':
            return "".join(out), i + 1
        else:
            out.append(c)
            i += 1
    raise ValueError("unterminated quoted option value")


def split_options(line: str) -> tuple[list[tuple[str, str | None]], str]:
    """
    The options that start an C{authorized_keys} line, as (lower-cased name, value or
    C{None}), and the rest of the line (the key). Options are comma-separated words or
    C{name="value"}; they end at the first blank outside quotes.

    @raise ValueError: a malformed option list.
    """
    options: list[tuple[str, str | None]] = []
    i = 0
    while True:
        match = _OPTION_NAME.match(line, i)
        if match is None:
            raise ValueError(f"malformed options at column {i + 1}")
        name, i = match.group().lower(), match.end()
        value: str | None = None
        if line[i : i + 1] == "=":
            if line[i + 1 : i + 2] != '"':
                raise ValueError(f'option {name}= needs a double-quoted value ({name}="...")')
            value, i = _quoted(line, i + 1)
        options.append((name, value))
        if i >= len(line):
            raise ValueError("no key after the options")
        if line[i] == ",":
            i += 1
        elif line[i] in " \t":
            return options, line[i:].strip()
        else:
            raise ValueError(f"unexpected {line[i]!r} after option {name}")


def parse_expiry_time(text: str) -> float:
    """
    C{expiry-time}'s C{YYYYMMDD[HHMM[SS]][Z]} in epoch seconds: local time, or UTC with
    C{Z}, as OpenSSH reads it.

    @raise ValueError: anything else.
    """
    match = _EXPIRY_TIME.fullmatch(text)
    if match is None:
        raise ValueError(f"expiry-time {text!r} is not YYYYMMDD[HHMM[SS]][Z]")
    digits, utc = match.groups()
    layout = {8: "%Y%m%d", 12: "%Y%m%d%H%M", 14: "%Y%m%d%H%M%S"}[len(digits)]
    try:
        when = time.strptime(digits, layout)
    except ValueError:
        raise ValueError(f"expiry-time {text!r} is not a valid date and time") from None
    return float(calendar.timegm(when) if utc else time.mktime(when))


@dataclass(frozen=True)
class _KeyLine:
    """One accepted C{authorized_keys} line: its key's identity and its conditions."""

    where: str
    blob: bytes
    identity: SSHIdentity
    origins: AddressList | None
    origins_text: str

    def refusal(self, address: str, now: float) -> SSHRefused | None:
        """Why this line does not let the key in from C{address} at C{now}, or C{None}."""
        if self.origins is not None and not self.origins.allows(address):
            why = f"{self.where}: from={self.origins_text!r} does not allow {address}"
            return SSHRefused("from", why)
        expires = self.identity.expires
        if expires is not None and now > expires:
            return SSHRefused("expired", f"{self.where}: expiry-time passed at {expires:.0f}")
        return None


def _parse_key_line(line: str, where: str) -> _KeyLine:
    """
    One C{authorized_keys} line (neither blank nor a comment).

    @raise ValueError: why it is refused.
    """
    first = line.split(None, 1)[0]
    if first.startswith(_KEY_TYPE_PREFIXES) and "=" not in first and "," not in first:
        options: list[tuple[str, str | None]] = []
        rest = line
    else:
        options, rest = split_options(line)
    consoles: tuple[str, ...] = ()
    read_only = False
    control = False
    values: dict[str, str] = {}
    for name, value in options:
        if name in REFUSED_OPTIONS:
            raise ValueError(f"option {name}: {REFUSED_OPTIONS[name]}")
        if name in _VALUED_OPTIONS:
            if value is None:
                raise ValueError(f'option {name} needs a value ({name}="...")')
            if name in values:
                raise ValueError(f"option {name} given twice")
            values[name] = value
        elif name in IGNORED_OPTIONS or name in ("read-only", CONTROL_OPTION):
            if value is not None:
                raise ValueError(f"option {name} takes no value")
            read_only = read_only or name == "read-only"
            control = control or name == CONTROL_OPTION
        else:
            raise ValueError(f"unknown option {name}")
    origins: AddressList | None = None
    expires: float | None = None
    for name, value in values.items():
        try:
            if name == "consoles":
                consoles = parse_console_patterns(value)
            elif name == "from":
                origins = AddressList.parse(value)
            else:
                expires = parse_expiry_time(value)
        except ValueError as e:
            raise ValueError(f"option {name}: {e}") from None
    if control and read_only:
        raise ValueError("options control and read-only together: read-only never controls")
    key, comment = _parse_public_key(rest)
    print_ = fingerprint(key)
    identity = SSHIdentity(
        name=comment or print_,
        fingerprint=print_,
        consoles=consoles,
        read_only_consoles=(),
        read_only=read_only,
        certificate=False,
        expires=expires,
        control=control,
    )
    return _KeyLine(where, key.blob(), identity, origins, values.get("from", ""))


class AuthorizedKeys:
    """
    An C{authorized_keys} file: C{[options] keytype base64 [comment]} lines, C{#} comments
    and blank lines, as OpenSSH reads them, with two options of our own:

     - C{consoles="web-*,db1"}: the consoles the key opens (default: every one);
     - C{read-only}: it may watch, not type.

    Also honoured: C{from="PATTERNS"} (see L{AddressList}) and C{expiry-time="YYYYMMDD[HHMM
    [SS]][Z]"} (local time unless C{Z}; no leeway: the only clock is this host's);
    accepted and ignored: L{IGNORED_OPTIONS}. Any other option refuses its line, as does
    C{verify-required}: a line that demands a PIN must not let its key in without one.

    A bad line is refused alone (listed in C{refused} as C{PATH:LINE: reason} and logged
    at load); the other lines still count.
    """

    def __init__(self, path: str, lines: tuple[_KeyLine, ...], refused: list[str]) -> None:
        self.path = path
        self.lines = lines
        self.refused = refused
        self._by_blob: dict[bytes, tuple[_KeyLine, ...]] = {}
        for line in lines:
            self._by_blob[line.blob] = self._by_blob.get(line.blob, ()) + (line,)

    def __len__(self) -> int:
        """The number of accepted lines."""
        return len(self.lines)

    @classmethod
    def load(cls, path: str) -> AuthorizedKeys:
        """
        Read C{path}.

        @raise CredentialFileError: the file cannot be read (or is not UTF-8).
        """
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CredentialFileError(f"cannot read authorized keys file {path}: {e}") from e
        lines: list[_KeyLine] = []
        refused: list[str] = []
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{path}:{number}"
            try:
                lines.append(_parse_key_line(line, where))
            except ValueError as e:
                refused.append(f"{where}: {e}")
                _log.warn("authorized keys line refused: {refusal}", refusal=refused[-1])
        return cls(path, tuple(lines), refused)

    def lookup(self, key_blob: bytes, address: str, now: float) -> SSHIdentity:
        """
        The identity of the key in C{key_blob} (SSH wire format) for a client at
        C{address} (an IP address string) at C{now} (epoch seconds): that of the first
        line for that key that lets it in, as OpenSSH takes the first matching line.

        @raise SSHRefused: C{"unknown key"}; or, from the first line for it, C{"from"} or
            C{"expired"}.
        """
        key = _conch_key(key_blob)
        candidates = self._by_blob.get(key.blob(), ()) if key is not None else ()
        if not candidates:
            raise SSHRefused("unknown key", fingerprint(key) if key is not None else "unparseable key")
        refusals: list[SSHRefused] = []
        for line in candidates:
            refusal = line.refusal(address, now)
            if refusal is None:
                return line.identity
            refusals.append(refusal)
        raise refusals[0]


# -- user certificates --------------------------------------------------------------------


def _blob_of(key: object) -> bytes:
    """The SSH wire blob of a C{cryptography} public key (through Conch, as the files' are)."""
    return bytes(keys.Key(key).blob())


def _load_certificate(cert_blob: bytes) -> SSHCertificate:
    """
    The certificate in an SSH wire blob.

    @raise SSHRefused: C{"not a certificate"}, or C{"security key"} (module docstring).
    """
    try:
        kind = common.getNS(cert_blob)[0]
    except struct.error:
        raise SSHRefused("not a certificate", "truncated blob") from None
    if not is_certificate_algorithm(kind):
        raise SSHRefused("not a certificate", kind.decode("ascii", "replace"))
    if kind.startswith(b"sk-"):
        raise SSHRefused("security key", kind.decode("ascii", "replace"))
    try:
        cert = load_ssh_public_identity(kind + b" " + base64.b64encode(cert_blob))
    except (ValueError, UnsupportedAlgorithm, NotImplementedError) as e:
        # NotImplementedError: a compressed EC point ("Need uncompressed point").
        raise SSHRefused("not a certificate", str(e)) from None
    if not isinstance(cert, SSHCertificate):
        raise SSHRefused("not a certificate", kind.decode("ascii", "replace"))
    return cert


def certificate_public_key_blob(cert_blob: bytes) -> bytes:
    """
    The SSH wire blob of the key a certificate certifies (Conch-parsable), to check the
    client's session signature with.

    @raise ValueError: not a certificate.
    """
    try:
        cert = _load_certificate(cert_blob)
    except SSHRefused as e:
        raise ValueError(str(e)) from None
    return _blob_of(cert.public_key())


def _rsa_signed_with_sha2(cert_blob: bytes, ca: rsa.RSAPublicKey) -> bool:
    """
    Whether an RSA CA signed with C{rsa-sha2-256} or C{rsa-sha2-512}, not SHA-1
    (C{ssh-rsa}), which OpenSSH has refused for certificates since 8.2 (SHA-1 collisions)
    and C{cryptography} still accepts without saying which it was.

    C{cryptography} keeps the algorithm to itself, but it has parsed and verified the
    certificate, so the blob ends with the signature, C{string(string(algorithm)
    string(signature))}, and OpenSSH writes an RSA signature exactly as long as the
    modulus. Only a blob that ends so with a SHA-2 algorithm passes: anything else (a
    signature shortened by its leading zeros, say) is refused, so this fails closed.
    """
    size = (ca.key_size + 7) // 8
    head = cert_blob[: len(cert_blob) - size - 4]
    if cert_blob[len(head) : len(head) + 4] != struct.pack("!L", size):
        return False
    return head.endswith(common.NS(b"rsa-sha2-256")) or head.endswith(common.NS(b"rsa-sha2-512"))


@dataclass(frozen=True)
class RevokedKeys:
    """
    A revocation list, modelled on C{ssh-keygen -k}'s text format; lines are:

     - a public key (C{keytype base64 [comment]}, or the same after C{key:}): that key,
       every certificate of it, and every certificate it signed as a CA;
     - C{serial: N} or C{serial: N-M}: certificates with such a serial, from any trusted
       CA (0 is refused: it is the serial of every certificate made without C{-z});
     - C{id: KEY_ID}: certificates with that key id.

    A bad line fails the whole file (L{CredentialFileError}): a revocation that is not
    read must not let anything in.
    """

    path: str
    key_blobs: frozenset[bytes]
    serials: tuple[tuple[int, int], ...]
    key_ids: frozenset[bytes]

    @classmethod
    def load(cls, path: str) -> RevokedKeys:
        """
        @raise CredentialFileError: unreadable, or a bad line (which, and why).
        """
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CredentialFileError(f"cannot read revoked keys file {path}: {e}") from e
        blobs: set[bytes] = set()
        serials: list[tuple[int, int]] = []
        ids: set[bytes] = set()
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            kind, _, value = line.partition(":")
            kind = kind.strip().lower()
            value = value.strip()
            try:
                if kind == "serial":
                    serials.append(_serial_range(value))
                elif kind == "id":
                    if not value:
                        raise ValueError("id: needs a key id")
                    ids.add(value.encode("utf-8"))
                elif kind in ("sha1", "sha256", "hash"):
                    raise ValueError(f"{kind}: lines are not supported; give the public key")
                else:
                    key, _ = _parse_public_key(value if kind == "key" else line)
                    blobs.add(key.blob())
            except ValueError as e:
                raise CredentialFileError(f"{path}:{number}: {e}") from None
        return cls(path, frozenset(blobs), tuple(serials), frozenset(ids))

    def revokes_key(self, key_blob: bytes) -> bool:
        """Whether the key in C{key_blob} is revoked (for plain keys too)."""
        key = _conch_key(key_blob)
        return key is not None and key.blob() in self.key_blobs

    def revokes_certificate(self, cert: SSHCertificate, key_blob: bytes, ca_blob: bytes) -> str | None:
        """Why the certificate is revoked (for the log), or C{None}."""
        if key_blob in self.key_blobs:
            return "its key is revoked"
        if ca_blob in self.key_blobs:
            return "its CA is revoked"
        if any(low <= cert.serial <= high for low, high in self.serials):
            return f"serial {cert.serial} is revoked"
        if cert.key_id in self.key_ids:
            return f"key id {cert.key_id.decode('utf-8', 'replace')!r} is revoked"
        return None


def _serial_range(text: str) -> tuple[int, int]:
    """C{N} or C{N-M} as (low, high)."""
    match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", text)
    if match is None:
        raise ValueError(f"serial: {text!r} is not N or N-M")
    low = int(match.group(1))
    high = int(match.group(2) or low)
    if low == 0:
        raise ValueError("serial: 0 would revoke every certificate made without a serial")
    if high < low or high > _FOREVER:
        raise ValueError(f"serial: {text!r} is not a range of 64-bit serials")
    return low, high


def principal_patterns(
    principals: Iterable[bytes], key_id: str
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """
    A certificate's principals as (read-write, read-only) console patterns: each
    principal is one pattern, C{read-only:PATTERN}, or C{control:PATTERN} (read-write,
    and also in L{control_patterns}). Any other principal (not UTF-8, a bad pattern, a
    list) is ignored and logged.
    """
    read_write: list[str] = []
    read_only: list[str] = []
    for raw in principals:
        principal = raw.decode("utf-8", "replace")
        target = read_only if principal.startswith(READ_ONLY_PRINCIPAL) else read_write
        pattern = principal.removeprefix(READ_ONLY_PRINCIPAL).removeprefix(CONTROL_PRINCIPAL)
        try:
            if "," in pattern:
                raise ValueError("one pattern per principal")
            target.extend(parse_console_patterns(pattern))
        except ValueError as e:
            _log.warn(
                "certificate {key_id}: principal {principal!r} ignored: {why}",
                key_id=key_id, principal=principal, why=str(e),
            )
    return tuple(read_write), tuple(read_only)


def control_patterns(principals: Iterable[bytes]) -> tuple[str, ...]:
    """
    The patterns of a certificate's valid C{control:PATTERN} principals: the consoles it
    may control (L{principal_patterns} logs the bad ones and opens these read-write).
    """
    found: list[str] = []
    for raw in principals:
        principal = raw.decode("utf-8", "replace")
        if not principal.startswith(CONTROL_PRINCIPAL):
            continue
        pattern = principal[len(CONTROL_PRINCIPAL) :]
        try:
            if "," in pattern:
                continue
            found.extend(parse_console_patterns(pattern))
        except ValueError:
            continue
    return tuple(found)


class UserCertificateAuthorities:
    """
    Trusted user CAs (C{--ssh-user-ca FILE}: one public key a line, as OpenSSH's
    C{TrustedUserCAKeys}; C{#} comments and blank lines; a bad line is refused alone, as in
    L{AuthorizedKeys}) and, optionally, revocations (L{RevokedKeys}).

    A certificate's principals name the consoles it opens (see L{principal_patterns}); an
    empty list opens nothing (OpenSSH, too, refuses a user certificate without
    principals). Critical options: C{source-address} is honoured; C{force-command} is
    refused, since a forced command cannot be honoured by a door that only opens
    consoles and granting a session the CA meant to confine to one command would give the
    certificate more than it was issued for; so are C{verify-required} (a PIN that cannot
    be checked) and any unknown one, as the certificate format demands.
    """

    def __init__(
        self, path: str, cas: dict[bytes, str], refused: list[str], revoked: RevokedKeys | None
    ) -> None:
        self.path = path
        self.cas = cas
        self.refused = refused
        self.revoked = revoked

    def __len__(self) -> int:
        """The number of trusted CAs."""
        return len(self.cas)

    @classmethod
    def load(cls, ca_path: str, revoked_path: str | None = None) -> UserCertificateAuthorities:
        """
        Read the CA file and the revocation file.

        @raise CredentialFileError: either cannot be read, or the revocation file has a
            bad line.
        """
        try:
            text = Path(ca_path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CredentialFileError(f"cannot read user CA file {ca_path}: {e}") from e
        revoked = RevokedKeys.load(revoked_path) if revoked_path is not None else None
        cas: dict[bytes, str] = {}
        refused: list[str] = []
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                key, _ = _parse_public_key(line)
            except ValueError as e:
                refused.append(f"{ca_path}:{number}: {e}")
                _log.warn("user CA line refused: {refusal}", refusal=refused[-1])
                continue
            cas[key.blob()] = fingerprint(key)
        return cls(ca_path, cas, refused, revoked)

    def verify(self, cert_blob: bytes, address: str, now: float) -> SSHIdentity:
        """
        The identity a user certificate (SSH wire format) gives a client at C{address} at
        C{now}. The client's proof that it holds the certified key is the door's to check
        (L{certificate_public_key_blob}).

        @raise SSHRefused: C{"not a certificate"}, C{"security key"}, C{"unknown CA"},
            C{"bad signature"}, C{"weak signature"} (SHA-1), C{"not a user certificate"},
            C{"revoked"}, C{"not yet valid"}, C{"expired"} (both with L{LEEWAY} seconds),
            C{"critical option NAME"}, C{"source-address"}, or C{"no principal names a
            console"}.
        """
        cert = _load_certificate(cert_blob)
        try:
            ca_key = cert.signature_key()
            ca_blob = _blob_of(ca_key)
        except (ValueError, UnsupportedAlgorithm, NotImplementedError) as e:
            raise SSHRefused("not a certificate", f"its CA key: {e}") from None
        signer = self.cas.get(ca_blob)
        if signer is None:
            raise SSHRefused("unknown CA", fingerprint(keys.Key(ca_key)))
        try:
            cert.verify_cert_signature()
        except (InvalidSignature, ValueError):
            raise SSHRefused("bad signature", f"CA {signer}") from None
        if isinstance(ca_key, rsa.RSAPublicKey) and not _rsa_signed_with_sha2(cert_blob, ca_key):
            raise SSHRefused("weak signature", f"CA {signer} signed with ssh-rsa (SHA-1)")
        key_id = cert.key_id.decode("utf-8", "replace")
        if cert.type is not SSHCertificateType.USER:
            kind = cert.type.name.lower()
            raise SSHRefused("not a user certificate", f"{key_id!r} is a {kind} certificate")
        certified = keys.Key(cert.public_key())
        key_blob = certified.blob()
        why = self.revoked.revokes_certificate(cert, key_blob, ca_blob) if self.revoked else None
        if why is not None:
            raise SSHRefused("revoked", f"certificate {key_id!r}: {why}")
        if now < cert.valid_after - LEEWAY:
            raise SSHRefused("not yet valid", f"certificate {key_id!r} is valid from {cert.valid_after}")
        if now >= cert.valid_before + LEEWAY:
            raise SSHRefused("expired", f"certificate {key_id!r} expired at {cert.valid_before}")
        self._check_critical_options(cert, key_id, address)
        consoles, read_only_consoles = principal_patterns(cert.valid_principals, key_id)
        if not consoles and not read_only_consoles:
            raise SSHRefused("no principal names a console", f"certificate {key_id!r}")
        print_ = fingerprint(certified)
        return SSHIdentity(
            name=key_id or print_,
            fingerprint=print_,
            consoles=consoles,
            read_only_consoles=read_only_consoles,
            read_only=False,
            certificate=True,
            expires=None if cert.valid_before == _FOREVER else float(cert.valid_before),
            serial=cert.serial,
            signer=signer,
            control_consoles=control_patterns(cert.valid_principals),
        )

    @staticmethod
    def _check_critical_options(cert: SSHCertificate, key_id: str, address: str) -> None:
        """
        @raise SSHRefused: an option that cannot be honoured, or C{source-address} refusing
            C{address}.
        """
        for raw_name, raw_value in sorted(cert.critical_options.items()):
            name = raw_name.decode("utf-8", "replace")
            if name != "source-address":
                raise SSHRefused(f"critical option {name}", f"certificate {key_id!r}")
            value = raw_value.decode("utf-8", "replace")
            try:
                sources = AddressList.parse(value, cidr_only=True)
            except ValueError as e:
                raise SSHRefused(f"critical option {name}", f"certificate {key_id!r}: {e}") from None
            if not sources.allows(address):
                raise SSHRefused(
                    "source-address", f"certificate {key_id!r}: {value} does not allow {address}"
                )
