"""
SSH credentials (L{cloud_console.access.sshkeys}) against keys and certificates that the
real C{ssh-keygen} made: C{authorized_keys} lines and every option, user CAs and their
certificates (validity, leeway, CA, signature, type, critical options, principals), and
revocation. Times are explicit C{now} values, never the clock, except where a
certificate's window is relative (C{-V +1h}).
"""

from __future__ import annotations

import base64
import calendar
import datetime
import shutil
import time
from pathlib import Path
from typing import Any, cast

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh import common, keys
from twisted.logger import formatEvent
from twisted.trial.unittest import TestCase

from .helpers import capture_log, ssh_keygen, ssh_keygen_run

from cloud_console.access.policy import Access, CredentialFileError
from cloud_console.access.sshkeys import (
    AddressList,
    AuthorizedKeys,
    RevokedKeys,
    SSHIdentity,
    SSHRefused,
    UserCertificateAuthorities,
    certificate_public_key_blob,
    is_certificate_algorithm,
    parse_expiry_time,
    split_options,
)

KEYGEN = shutil.which("ssh-keygen")
#: The certificate clock leeway (written out, not imported: a change must fail here).
LEEWAY = 30
#: 2030-01-01 and 2030-01-02, 00:00 UTC: the window of most certificates here.
T0 = calendar.timegm((2030, 1, 1, 0, 0, 0))
T1 = T0 + 86400
WINDOW = "20300101000000Z:20300102000000Z"


# -- helpers (candidates for tests/helpers.py) ---------------------------------------------


def make_key(directory: Path, name: str, kind: str = "ed25519", comment: str | None = None) -> Path:
    """A new key pair C{directory/name}; the public key's path."""
    return Path(f"{ssh_keygen(directory, name, kind, comment)}.pub")


def certify(ca: Path, public: Path, *options: str, identity: str = "alice") -> bytes:
    """
    A certificate of C{public} signed by the CA whose public key is C{ca} (its private
    key beside it), as C{ssh-keygen -s ca -I identity OPTIONS}; its wire blob. Each call
    signs a fresh copy of the key, so one key may have many certificates.
    """
    n = len(list(public.parent.glob(f"{public.stem}.c*-cert.pub")))
    copy = public.parent / f"{public.stem}.c{n}.pub"
    shutil.copy(public, copy)
    ssh_keygen_run("-q", "-s", str(ca.with_suffix("")), "-I", identity, *options, str(copy))
    return blob(copy.parent / f"{copy.stem}-cert.pub")


def blob(public: Path) -> bytes:
    """The wire blob in a C{.pub} file (OpenSSH one-line format)."""
    return base64.b64decode(public.read_text().split()[1])


def keygen_fingerprint(public: Path) -> str:
    """The fingerprint as C{ssh-keygen -lf} prints it."""
    return ssh_keygen_run("-lf", str(public)).split()[1]


def texts(events: list[dict[str, Any]]) -> list[str]:
    return [formatEvent(event) for event in events]


def sk_public_key(directory: Path, public: Path) -> Path:
    """
    An C{sk-ssh-ed25519@openssh.com} public key (no hardware needed: only its public part
    is used) with the Ed25519 key of C{public}.
    """
    raw = common.getNS(blob(public), 2)[1]
    data = common.NS(b"sk-ssh-ed25519@openssh.com") + common.NS(raw) + common.NS(b"ssh:")
    path = directory / "sk.pub"
    path.write_text(f"sk-ssh-ed25519@openssh.com {base64.b64encode(data).decode()} sk\n")
    return path


class Base(TestCase):
    if KEYGEN is None:
        skip = "ssh-keygen (OpenSSH) is not installed"

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()

    def write(self, name: str, text: str) -> str:
        path = self.dir / name
        path.write_text(text)
        return str(path)

    def line(self, public: Path, options: str = "") -> str:
        return f"{options} {public.read_text().strip()}".strip()


# -- authorized_keys -----------------------------------------------------------------------


class AuthorizedKeysTests(Base):
    def setUp(self) -> None:
        super().setUp()
        self.ed = make_key(self.dir, "ed", comment="alice@laptop")

    def load(self, *lines: str) -> AuthorizedKeys:
        return AuthorizedKeys.load(self.write("authorized_keys", "".join(f"{l}\n" for l in lines)))

    def test_plain_keys_of_each_type(self) -> None:
        """Every key type, no options: every console, read-write; the fingerprint is ssh-keygen's."""
        ec = make_key(self.dir, "ec", "ecdsa", comment="bob")
        rsa = make_key(self.dir, "rsa", "rsa", comment="carol")
        keys_ = self.load("# the team", "", self.line(self.ed), "  " + self.line(ec), self.line(rsa))
        self.assertEqual(keys_.refused, [])
        self.assertEqual(len(keys_), 3)
        for public, name in ((self.ed, "alice@laptop"), (ec, "bob"), (rsa, "carol")):
            identity = keys_.lookup(blob(public), "192.0.2.1", T0)
            self.assertEqual(identity, SSHIdentity(
                name=name, fingerprint=keygen_fingerprint(public), consoles=(),
                read_only_consoles=(), read_only=False, certificate=False, expires=None,
            ))
            self.assertEqual(identity.access_for("web-1"), Access(name, False, ("web-1",)))
            self.assertEqual(identity.access_for(None), Access(name, False, ()))
        self.assertTrue(keygen_fingerprint(rsa).startswith("SHA256:"))
        self.assertNotIn("=", keygen_fingerprint(rsa))

    def test_name_without_comment_is_the_fingerprint(self) -> None:
        bare = make_key(self.dir, "bare", comment="")
        identity = self.load(self.line(bare)).lookup(blob(bare), "192.0.2.1", T0)
        self.assertEqual(identity.name, keygen_fingerprint(bare))

    def test_unknown_key(self) -> None:
        other = make_key(self.dir, "other")
        keys_ = self.load(self.line(self.ed))
        for unknown in (blob(other), b"", b"garbage", blob(self.ed)[:-3]):
            e = self.assertRaises(SSHRefused, keys_.lookup, unknown, "192.0.2.1", T0)
            self.assertEqual(e.reason, "unknown key")

    def test_consoles_and_read_only(self) -> None:
        keys_ = self.load(self.line(self.ed, 'consoles="web-*,db1",read-only'))
        identity = keys_.lookup(blob(self.ed), "192.0.2.1", T0)
        self.assertEqual((identity.consoles, identity.read_only_consoles, identity.read_only),
                         (("web-*", "db1"), (), True))
        self.assertEqual(identity.access_for("web-2"), Access("alice@laptop", True, ("web-2",)))
        self.assertIsNone(identity.access_for("db2"))
        self.assertIsNone(identity.access_for(None))
        self.assertTrue(identity.may_open("db1"))
        self.assertFalse(identity.may_open("mail"))
        self.assertEqual(identity.visible(["web-1", "db2", "db1", "mail", "web-"]), ["web-1", "db1", "web-"])

    def test_control_option(self) -> None:
        """The C{control} option: the control right on every console the line opens."""
        identity = self.load(self.line(self.ed, 'consoles="web-*",control')).lookup(blob(self.ed), "192.0.2.1", T0)
        self.assertEqual(identity.access_for("web-2"), Access("alice@laptop", False, ("web-2",), control=True))
        self.assertIsNone(identity.access_for("db1"))
        plain = self.load(self.line(self.ed, 'consoles="web-*"')).lookup(blob(self.ed), "192.0.2.1", T0)
        access = plain.access_for("web-2")
        assert access is not None
        self.assertFalse(access.may_control)
        keys_ = self.load(self.line(self.ed, "control,read-only"), self.line(self.ed, 'control="x"'))
        self.assertEqual(len(keys_.refused), 2, keys_.refused)
        self.assertIn("control and read-only together", keys_.refused[0])
        self.assertIn("option control takes no value", keys_.refused[1])

    def test_star_opens_the_single_console(self) -> None:
        identity = self.load(self.line(self.ed, 'consoles="*"')).lookup(blob(self.ed), "192.0.2.1", T0)
        self.assertEqual(identity.access_for(None), Access("alice@laptop", False, ()))
        identity = self.load(self.line(self.ed, 'read-only')).lookup(blob(self.ed), "192.0.2.1", T0)
        self.assertEqual(identity.access_for(None), Access("alice@laptop", True, ()))

    def test_split_options(self) -> None:
        """Quoted values keep their commas and blanks; \\" is a quote; names are lower-cased."""
        self.assertEqual(
            split_options('from="10.0.0.0/8,!10.1.0.0/16",No-Pty,command="echo \\"a, b\\" \\\\x"  ssh-ed25519 AAAA c'),
            ([("from", "10.0.0.0/8,!10.1.0.0/16"), ("no-pty", None), ("command", 'echo "a, b" \\\\x')],
             "ssh-ed25519 AAAA c"),
        )
        for bad, why in (
            ('consoles=web-1 ssh-ed25519 AAAA', "needs a double-quoted value"),
            ('consoles="web-1 ssh-ed25519 AAAA', "unterminated"),
            ('consoles="web-1"x ssh-ed25519 AAAA', "unexpected 'x'"),
            ('restrict,,no-pty ssh-ed25519 AAAA', "malformed options at column 10"),
            ('restrict', "no key after the options"),
        ):
            e = self.assertRaises(ValueError, split_options, bad)
            self.assertIn(why, str(e))

    def test_options_accepted_and_ignored(self) -> None:
        options = ("restrict,no-pty,pty,no-port-forwarding,no-agent-forwarding,no-X11-forwarding,"
                   "no-user-rc,no-touch-required,NO-PTY,port-forwarding,agent-forwarding,"
                   "x11-forwarding,user-rc")
        keys_ = self.load(self.line(self.ed, options))
        self.assertEqual(keys_.refused, [])
        identity = keys_.lookup(blob(self.ed), "192.0.2.1", T0)
        self.assertEqual((identity.consoles, identity.read_only, identity.expires), ((), False, None))

    def test_options_refusing_the_line(self) -> None:
        """Each such line is refused alone, with PATH:LINE and why; the good line still works."""
        bad = [
            ('command="echo a, b",no-pty', "option command: a forced command cannot be honoured"),
            ('environment="A=b"', "option environment:"),
            ('permitopen="localhost:22"', "option permitopen:"),
            ('permitlisten="8080"', "option permitlisten:"),
            ('tunnel="0"', "option tunnel:"),
            ("cert-authority", "option cert-authority:"),
            ('principals="alice"', "option principals:"),
            ("verify-required", "option verify-required: user verification"),
            ("frobnicate", "unknown option frobnicate"),
            ('read-only="yes"', "option read-only takes no value"),
            ("consoles", 'option consoles needs a value'),
            ('consoles="Web-1"', "option consoles: console pattern 'Web-1'"),
            ('consoles=""', "option consoles: empty console pattern"),
            ('consoles="a",consoles="b"', "option consoles given twice"),
            ('from="10.0.0.0/8",from="::1"', "option from given twice"),
            ('from="10.0.0.1/8"', "option from: '10.0.0.1/8' is not an address or network"),
            ('from="10.0.0.0/33"', "option from: '10.0.0.0/33'"),
            ('from="10.0.0.0/8,"', "option from: empty entry"),
            ('expiry-time="2030-01-01"', "option expiry-time: expiry-time '2030-01-01' is not"),
            ('expiry-time="20301301Z"', "option expiry-time: expiry-time '20301301Z' is not a valid date"),
        ]
        path = self.dir / "authorized_keys"
        log = capture_log(self)
        keys_ = self.load("# refused lines", *(self.line(self.ed, o) for o, _ in bad),
                          self.line(self.ed, 'consoles="ok"'))
        self.assertEqual(len(keys_.refused), len(bad))
        for number, (refusal, (_, why)) in enumerate(zip(keys_.refused, bad), 2):
            self.assertTrue(refusal.startswith(f"{path}:{number}: {why}"), (refusal, why))
        self.assertEqual(keys_.lookup(blob(self.ed), "192.0.2.1", T0).consoles, ("ok",))
        # Logged once each, at load, and not again on lookup.
        logged = [t for t in texts(log) if "authorized keys line refused" in t]
        self.assertEqual(len(logged), len(bad))
        self.assertEqual(logged[0], f"authorized keys line refused: {keys_.refused[0]}")

    def test_bad_key_lines(self) -> None:
        rsa = make_key(self.dir, "rsa", "rsa")
        dsa = make_key(self.dir, "dsa", "dsa")
        sk = sk_public_key(self.dir, self.ed)
        ca = make_key(self.dir, "ca")
        cert = self.dir / "ed.c0-cert.pub"
        certify(ca, self.ed, "-n", "web-1")
        rsa_data = rsa.read_text().split()[1]
        keys_ = self.load(
            "ssh-ed25519 !!!notbase64 x",
            f"ssh-ed25519 {rsa_data} liar",
            "ssh-ed25519",
            'read-only ssh-ed25519',
            self.line(dsa),
            self.line(sk),
            self.line(cert),
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5 truncated",
            self.line(self.ed),
        )
        path = self.dir / "authorized_keys"
        self.assertEqual(keys_.refused, [
            f"{path}:1: the ssh-ed25519 key is not valid base64",
            f"{path}:2: the line says ssh-ed25519 but the key is ssh-rsa",
            f"{path}:3: expected: [options] keytype base64 [comment]",
            f"{path}:4: expected: [options] keytype base64 [comment]",
            f"{path}:5: DSA keys are not accepted (OpenSSH refuses them too)",
            f"{path}:6: security keys (sk-*) are not supported: their signatures and touch flags "
            "cannot be checked",
            f"{path}:7: cannot parse the ssh-ed25519-cert-v01@openssh.com key",
            f"{path}:8: cannot parse the ssh-ed25519 key",
        ])
        self.assertEqual(len(keys_), 1)
        e = self.assertRaises(SSHRefused, keys_.lookup, blob(dsa), "192.0.2.1", T0)
        self.assertEqual(e.reason, "unknown key")

    def test_unreadable_file(self) -> None:
        for path in (str(self.dir / "missing"), str(self.dir)):
            e = self.assertRaises(CredentialFileError, AuthorizedKeys.load, path)
            self.assertIn(f"cannot read authorized keys file {path}", str(e))
        latin = self.dir / "latin"
        latin.write_bytes(b"# caf\xe9\n")
        self.assertRaises(CredentialFileError, AuthorizedKeys.load, str(latin))

    def test_from_patterns(self) -> None:
        keys_ = self.load(self.line(self.ed, 'from="10.0.0.0/8,!10.1.0.0/16,192.168.1.*,2001:DB8::/32,172.16.0.?"'))
        for address, allowed in (
            ("10.2.3.4", True),
            ("10.1.2.3", False),          # negated network
            ("192.168.1.77", True),       # wildcard
            ("192.168.2.1", False),
            ("2001:db8::5", True),        # IPv6 network, upper case in the file
            ("2001:db9::1", False),
            ("::ffff:10.2.3.4", True),    # IPv4-mapped, as sshd sees it
            ("::ffff:10.1.0.1", False),
            ("172.16.0.5", True),         # ? is one character
            ("172.16.0.55", False),
            ("fe80::1%eth0", False),
            ("unix", False),
            ("", False),
        ):
            if allowed:
                self.assertEqual(keys_.lookup(blob(self.ed), address, T0).name, "alice@laptop", address)
            else:
                e = self.assertRaises(SSHRefused, keys_.lookup, blob(self.ed), address, T0)
                self.assertEqual(e.reason, "from", address)
                self.assertIn(f"does not allow {address}", e.detail)

    def test_negation_wins_wherever_it_stands(self) -> None:
        for text in ("10.0.0.0/8,!10.1.2.3", "!10.1.2.3,10.0.0.0/8", "!10.1.2.*,10.*"):
            patterns = AddressList.parse(text)
            self.assertFalse(patterns.allows("10.1.2.3"), text)
            self.assertTrue(patterns.allows("10.1.3.3"), text)
        self.assertFalse(AddressList.parse("!10.0.0.0/8").allows("192.0.2.1"))  # no positive match
        self.assertTrue(AddressList.parse("2001:db8:0::1").allows("2001:db8::1"))  # as addresses
        self.assertTrue(AddressList.parse("fe80::1").allows("fe80::1%eth0"))
        self.assertFalse(AddressList.parse("::/0").allows("10.0.0.1"))  # no family mix-up
        self.assertRaises(ValueError, AddressList.parse, "!10.0.0.0/8", cidr_only=True)
        self.assertRaises(ValueError, AddressList.parse, "10.0.0.*", cidr_only=True)

    def test_first_line_that_accepts_wins(self) -> None:
        text = self.ed.read_text().split()
        key = f"{text[0]} {text[1]}"
        keys_ = self.load(
            f'from="10.0.0.0/8",consoles="db*" {key} office',
            f'expiry-time="20200101Z",consoles="old" {key} old',
            f'consoles="web-*",read-only {key} anywhere',
        )
        office = keys_.lookup(blob(self.ed), "10.1.1.1", T0)
        self.assertEqual((office.name, office.consoles, office.read_only), ("office", ("db*",), False))
        anywhere = keys_.lookup(blob(self.ed), "192.0.2.1", T0)
        self.assertEqual((anywhere.name, anywhere.consoles, anywhere.read_only), ("anywhere", ("web-*",), True))
        # No line accepts: the reason of the first line for the key.
        keys_ = self.load(f'from="10.0.0.0/8",expiry-time="20200101Z" {key} a', f'from="192.0.2.0/24" {key} b')
        e = self.assertRaises(SSHRefused, keys_.lookup, blob(self.ed), "10.0.0.1", T0)
        self.assertEqual(e.reason, "expired")
        self.assertIn("authorized_keys:1: ", e.detail)
        e = self.assertRaises(SSHRefused, keys_.lookup, blob(self.ed), "198.51.100.1", T0)
        self.assertEqual(e.reason, "from")
        self.assertIn("authorized_keys:1: ", e.detail)
        self.assertEqual(keys_.lookup(blob(self.ed), "192.0.2.1", T0).name, "b")

    def test_expiry_time(self) -> None:
        keys_ = self.load(self.line(self.ed, 'expiry-time="20300101Z"'))
        identity = keys_.lookup(blob(self.ed), "192.0.2.1", T0)  # valid up to that second
        self.assertEqual(identity.expires, float(T0))
        e = self.assertRaises(SSHRefused, keys_.lookup, blob(self.ed), "192.0.2.1", T0 + 1)
        self.assertEqual(e.reason, "expired")
        self.assertEqual(parse_expiry_time("203001021230Z"), T1 + 12 * 3600 + 30 * 60)
        self.assertEqual(parse_expiry_time("20300102123456z"), T1 + 12 * 3600 + 34 * 60 + 56)
        # Without Z: local time, as OpenSSH.
        self.assertEqual(parse_expiry_time("203001021230"), datetime.datetime(2030, 1, 2, 12, 30).timestamp())
        for bad in ("2030010", "203001021", "20300102123", "2030-01-02", "20300230Z", "20300101ZZ", ""):
            self.assertRaises(ValueError, parse_expiry_time, bad)


# -- user certificates ---------------------------------------------------------------------


class CertificateTests(Base):
    def setUp(self) -> None:
        super().setUp()
        self.ca = make_key(self.dir, "ca", comment="user CA")
        self.user = make_key(self.dir, "user")
        self.cas = UserCertificateAuthorities.load(str(self.ca))

    def refused(self, cert: bytes, reason: str, address: str = "192.0.2.1", now: float = T0 + 60,
                cas: UserCertificateAuthorities | None = None) -> SSHRefused:
        e = self.assertRaises(SSHRefused, (cas or self.cas).verify, cert, address, now)
        self.assertEqual(e.reason, reason)
        return cast(SSHRefused, e)

    def test_identity_for_each_key_type(self) -> None:
        for kind in ("ed25519", "ecdsa", "rsa"):
            user = make_key(self.dir, f"user-{kind}", kind)
            cert = certify(self.ca, user, "-n", "web-*,read-only:db*", "-V", WINDOW, "-z", "7")
            identity = self.cas.verify(cert, "192.0.2.1", T0 + 60)
            self.assertEqual(identity, SSHIdentity(
                name="alice", fingerprint=keygen_fingerprint(user), consoles=("web-*",),
                read_only_consoles=("db*",), read_only=False, certificate=True, expires=float(T1),
                serial=7, signer=keygen_fingerprint(self.ca),
            ))
        self.assertEqual(identity.access_for("web-1"), Access("alice", False, ("web-1",)))
        self.assertEqual(identity.access_for("db3"), Access("alice", True, ("db3",)))
        self.assertIsNone(identity.access_for("mail"))
        self.assertIsNone(identity.access_for(None))
        self.assertEqual(identity.visible(["mail", "db3", "web-1"]), ["db3", "web-1"])

    def test_rsa_ca(self) -> None:
        """An RSA CA signs with rsa-sha2-512 by default, rsa-sha2-256 on request: both good."""
        ca = make_key(self.dir, "rsa-ca", "rsa")
        cas = UserCertificateAuthorities.load(str(ca))
        for algorithm in ("rsa-sha2-512", "rsa-sha2-256"):
            cert = certify(ca, self.user, "-n", "web-1", "-t", algorithm)
            self.assertEqual(cas.verify(cert, "192.0.2.1", T0).consoles, ("web-1",))

    def test_sha1_signature_refused(self) -> None:
        ca = make_key(self.dir, "rsa-ca", "rsa")
        cert = certify(ca, self.user, "-n", "web-1", "-t", "ssh-rsa")
        e = self.refused(cert, "weak signature", cas=UserCertificateAuthorities.load(str(ca)))
        self.assertIn("ssh-rsa (SHA-1)", e.detail)

    def test_forever_and_relative_windows(self) -> None:
        forever = self.cas.verify(certify(self.ca, self.user, "-n", "web-1"), "192.0.2.1", T0)
        self.assertIsNone(forever.expires)
        now = time.time()
        hour = self.cas.verify(certify(self.ca, self.user, "-n", "web-*", "-V", "+1h"), "192.0.2.1", now)
        assert hour.expires is not None
        self.assertTrue(now + 3500 < hour.expires < now + 3700, hour.expires - now)
        self.refused(certify(self.ca, self.user, "-n", "web-1", "-V", "20200101:20200102"), "expired", now=now)
        self.refused(certify(self.ca, self.user, "-n", "web-1", "-V", "+1d:+2d"), "not yet valid", now=now)

    def test_leeway(self) -> None:
        cert = certify(self.ca, self.user, "-n", "web-1", "-V", WINDOW)
        for now in (T0 - LEEWAY, T1 + LEEWAY - 1):
            self.assertEqual(self.cas.verify(cert, "192.0.2.1", now).name, "alice")
        self.refused(cert, "not yet valid", now=T0 - LEEWAY - 1)
        self.refused(cert, "expired", now=T1 + LEEWAY)

    def test_unknown_ca(self) -> None:
        other = make_key(self.dir, "other-ca")
        cert = certify(other, self.user, "-n", "web-1")
        e = self.refused(cert, "unknown CA")
        self.assertEqual(e.detail, keygen_fingerprint(other))
        both = self.write("cas", f"# two CAs\n{self.ca.read_text()}\n{other.read_text()}")
        identity = UserCertificateAuthorities.load(both).verify(cert, "192.0.2.1", T0)
        self.assertEqual(identity.signer, keygen_fingerprint(other))

    def test_bad_signature(self) -> None:
        cert = certify(self.ca, self.user, "-n", "web-1", identity="alice")
        self.assertEqual(cert.count(b"alice"), 1)
        self.refused(cert.replace(b"alice", b"mallo"), "bad signature")

    def test_host_certificate(self) -> None:
        self.refused(certify(self.ca, self.user, "-h", "-n", "web-1"), "not a user certificate")

    def test_not_a_certificate(self) -> None:
        cert = certify(self.ca, self.user, "-n", "web-1")
        for junk in (blob(self.user), b"", b"\x00\x00", b"garbage", cert[:-10], cert + b"x",
                     common.NS(b"ssh-ed25519-cert-v01@openssh.com") + b"\x00" * 8):
            self.refused(junk, "not a certificate")

    def test_security_key_certificate(self) -> None:
        cert = certify(self.ca, sk_public_key(self.dir, self.user), "-n", "web-1")
        self.refused(cert, "security key")

    def test_critical_options(self) -> None:
        for option, reason in (
            ("critical:foo=bar", "critical option foo"),
            ("force-command=ls", "critical option force-command"),
            ("verify-required", "critical option verify-required"),
            ("source-address=10.0.0.0/8", "source-address"),
        ):
            self.refused(certify(self.ca, self.user, "-n", "web-1", "-O", option), reason)

    def test_source_address(self) -> None:
        cert = certify(self.ca, self.user, "-n", "web-1", "-O", "source-address=10.0.0.0/8,2001:db8::/32")
        for address in ("10.1.2.3", "2001:db8::1", "::ffff:10.0.0.1"):
            self.assertEqual(self.cas.verify(cert, address, T0).name, "alice")
        for address in ("192.0.2.1", "2001:db9::1", "unix"):
            e = self.refused(cert, "source-address", address=address)
            self.assertIn(f"does not allow {address}", e.detail)

    def test_principals(self) -> None:
        log = capture_log(self)
        cert = certify(self.ca, self.user, "-n", "web-1,control:web-*,Web-2,read-only:,read-only:db*,control:X")
        identity = self.cas.verify(cert, "192.0.2.1", T0)
        self.assertEqual((identity.consoles, identity.read_only_consoles), (("web-1", "web-*"), ("db*",)))
        self.assertEqual(identity.control_consoles, ("web-*",))
        logged = texts(log)
        self.assertEqual(len(logged), 3, logged)
        self.assertIn("certificate alice: principal 'Web-2' ignored: console pattern 'Web-2'", logged[0])
        self.assertIn("certificate alice: principal 'read-only:' ignored: empty console pattern", logged[1])
        self.assertIn("certificate alice: principal 'control:X' ignored", logged[2])

    def test_control_principal(self) -> None:
        """C{control:PATTERN} opens those consoles read-write with the control right, and
        only those; it never gives control on a read-only console."""
        cert = certify(self.ca, self.user, "-n", "control:web-*,db1,read-only:log*")
        identity = self.cas.verify(cert, "192.0.2.1", T0)
        web = identity.access_for("web-3")
        assert web is not None
        self.assertTrue(web.may_control)
        self.assertFalse(web.read_only)
        db = identity.access_for("db1")
        assert db is not None
        self.assertFalse(db.may_control)
        log = identity.access_for("log1")
        assert log is not None
        self.assertTrue(log.read_only)
        self.assertFalse(log.may_control)
        self.assertIsNone(identity.access_for(None))
        every = self.cas.verify(certify(self.ca, self.user, "-n", "control:*"), "192.0.2.1", T0).access_for(None)
        assert every is not None
        self.assertTrue(every.may_control)

    def test_no_principal_names_a_console(self) -> None:
        for principals in (["-n", "Web,control:Web-1"], []):
            self.refused(certify(self.ca, self.user, *principals), "no principal names a console")

    def test_one_pattern_per_principal(self) -> None:
        """ssh-keygen -n splits at commas; a certificate made otherwise may hold one in a principal."""
        private = serialization.load_ssh_private_key(self.ca.with_suffix("").read_bytes(), None)
        user = serialization.load_ssh_public_key(self.user.read_bytes())
        assert isinstance(private, ed25519.Ed25519PrivateKey) and isinstance(user, ed25519.Ed25519PublicKey)
        cert = (
            serialization.SSHCertificateBuilder()
            .public_key(user).serial(1).type(serialization.SSHCertificateType.USER).key_id(b"bob")
            .valid_principals([b"web-1,db1", b"\xffweb"]).valid_after(T0).valid_before(T1)
            .sign(private)
        )
        line = cert.public_bytes()
        log = capture_log(self)
        self.refused(base64.b64decode(line.split()[1]), "no principal names a console")
        self.assertEqual(len(log), 2)
        self.assertIn("principal 'web-1,db1' ignored: one pattern per principal", texts(log)[0])

    def test_every_console(self) -> None:
        identity = self.cas.verify(certify(self.ca, self.user, "-n", "*"), "192.0.2.1", T0)
        self.assertEqual(identity.access_for(None), Access("alice", False, ()))
        identity = self.cas.verify(certify(self.ca, self.user, "-n", "read-only:*,web-1"), "192.0.2.1", T0)
        self.assertEqual(identity.access_for(None), Access("alice", True, ()))
        self.assertEqual(identity.access_for("web-1"), Access("alice", False, ("web-1",)))
        self.assertEqual(identity.access_for("db"), Access("alice", True, ("db",)))

    def test_empty_key_id_is_the_fingerprint(self) -> None:
        identity = self.cas.verify(certify(self.ca, self.user, "-n", "web-1", identity=""), "192.0.2.1", T0)
        self.assertEqual(identity.name, keygen_fingerprint(self.user))

    def test_certificate_public_key_blob(self) -> None:
        """The certified key checks the client's session signature, as the door will."""
        for kind in ("ed25519", "ecdsa", "rsa"):
            user = make_key(self.dir, f"u-{kind}", kind)
            key_blob = certificate_public_key_blob(certify(self.ca, user, "-n", "web-1"))
            self.assertEqual(key_blob, blob(user))
            private = keys.Key.fromFile(str(user.with_suffix("")))
            signature = private.sign(b"session data")
            self.assertTrue(keys.Key.fromString(key_blob).verify(signature, b"session data"))
            self.assertFalse(keys.Key.fromString(key_blob).verify(signature, b"other data"))
        self.assertRaises(ValueError, certificate_public_key_blob, blob(self.user))
        self.assertRaises(ValueError, certificate_public_key_blob, b"junk")

    def test_is_certificate_algorithm(self) -> None:
        for name in (b"ssh-ed25519-cert-v01@openssh.com", b"ecdsa-sha2-nistp256-cert-v01@openssh.com",
                     b"rsa-sha2-512-cert-v01@openssh.com", b"ssh-rsa-cert-v01@openssh.com"):
            self.assertTrue(is_certificate_algorithm(name), name)
        for name in (b"ssh-ed25519", b"rsa-sha2-512", b"ssh-ed25519-cert-v00@openssh.com", b""):
            self.assertFalse(is_certificate_algorithm(name), name)

    def test_ca_file(self) -> None:
        dsa = make_key(self.dir, "dsa", "dsa")
        path = self.write("cas", f"# CAs\n\nnot a key\n{dsa.read_text()}{self.ca.read_text()}")
        cas = UserCertificateAuthorities.load(path)
        self.assertEqual(cas.refused, [
            f"{path}:3: the not key is not valid base64",
            f"{path}:4: DSA keys are not accepted (OpenSSH refuses them too)",
        ])
        self.assertEqual(len(cas), 1)
        self.assertEqual(cas.verify(certify(self.ca, self.user, "-n", "x"), "192.0.2.1", T0).name, "alice")
        e = self.assertRaises(CredentialFileError, UserCertificateAuthorities.load, str(self.dir / "nope"))
        self.assertIn(f"cannot read user CA file {self.dir / 'nope'}", str(e))


class RevocationTests(Base):
    def setUp(self) -> None:
        super().setUp()
        self.ca = make_key(self.dir, "ca")
        self.user = make_key(self.dir, "user")
        self.other = make_key(self.dir, "other")

    def authorities(self, revoked: str) -> UserCertificateAuthorities:
        return UserCertificateAuthorities.load(str(self.ca), self.write("revoked", revoked))

    def assertRevoked(self, cas: UserCertificateAuthorities, cert: bytes, why: str) -> None:
        e = self.assertRaises(SSHRefused, cas.verify, cert, "192.0.2.1", T0)
        self.assertEqual(e.reason, "revoked")
        self.assertIn(why, e.detail)

    def test_by_key(self) -> None:
        cas = self.authorities(f"# lost laptop\n{self.user.read_text()}")
        self.assertRevoked(cas, certify(self.ca, self.user, "-n", "x"), "its key is revoked")
        self.assertEqual(cas.verify(certify(self.ca, self.other, "-n", "x"), "192.0.2.1", T0).name, "alice")
        assert cas.revoked is not None
        self.assertTrue(cas.revoked.revokes_key(blob(self.user)))
        self.assertFalse(cas.revoked.revokes_key(blob(self.other)))

    def test_by_ca_key(self) -> None:
        cas = self.authorities(f"key: {self.ca.read_text()}")
        self.assertRevoked(cas, certify(self.ca, self.other, "-n", "x"), "its CA is revoked")

    def test_by_serial(self) -> None:
        cas = self.authorities("serial: 42\nSERIAL: 100-200\n")
        for serial in ("42", "100", "150", "200"):
            self.assertRevoked(cas, certify(self.ca, self.user, "-n", "x", "-z", serial), f"serial {serial}")
        for serial in ("41", "43", "99", "201"):
            self.assertEqual(cas.verify(certify(self.ca, self.user, "-n", "x", "-z", serial),
                                        "192.0.2.1", T0).serial, int(serial))

    def test_by_id(self) -> None:
        cas = self.authorities("id: alice smith\n")
        self.assertRevoked(cas, certify(self.ca, self.user, "-n", "x", identity="alice smith"), "key id 'alice smith'")
        self.assertEqual(cas.verify(certify(self.ca, self.user, "-n", "x", identity="alice"),
                                    "192.0.2.1", T0).name, "alice")

    def test_bad_file_fails_closed(self) -> None:
        for line, why in (
            ("serial: x", "serial: 'x' is not N or N-M"),
            ("serial: 0", "serial: 0 would revoke every certificate"),
            ("serial: 9-3", "not a range"),
            ("id:", "id: needs a key id"),
            ("sha256: abc", "sha256: lines are not supported"),
            ("garbage here", "cannot parse the garbage key"),
        ):
            path = self.write("revoked", f"# comment\n{line}\n")
            e = self.assertRaises(CredentialFileError, UserCertificateAuthorities.load, str(self.ca), path)
            self.assertTrue(str(e).startswith(f"{path}:2: "), str(e))
            self.assertIn(why, str(e))
        missing = str(self.dir / "missing")
        e = self.assertRaises(CredentialFileError, UserCertificateAuthorities.load, str(self.ca), missing)
        self.assertIn(f"cannot read revoked keys file {missing}", str(e))
        self.assertRaises(CredentialFileError, RevokedKeys.load, missing)
