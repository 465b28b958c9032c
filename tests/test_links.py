"""
Signed, expiring console links (L{cloud_console.access.links}): the secret file's checks, the
claims as the checker reads them, C{cloud-console-link}'s inputs, and real
C{cloud-console} processes opened with links that C{cloud-console-link} (a real process
too) minted: page, cookie, WebSocket, read-only, every kind of refusal (401, the reason
in the server's log and not in the body), a WebSocket outliving its link, single-console
mode, and links beside a token file and a password file.
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cloud_console.access import links
from cloud_console.access.checkers import hash_password
from cloud_console.access.policy import CredentialFileError
from cloud_console.access.links import LinkChecker, LinkRefused, load_link_secret, mint
from tests.helpers import ROOT, Guest, Server, V1Client, free_port, http_request, serve_process

SECRET = b"0123456789abcdef0123456789abcdef"  # 32 bytes
#: The clock leeway the issue asks for (written out, not imported: a change must fail here).
LEEWAY = 30


def write_secret(test: SynchronousTestCase, data: bytes = SECRET, mode: int = 0o600) -> str:
    path = Path(test.mktemp())
    path.write_bytes(data)
    path.chmod(mode)
    return str(path)


def token(claims: dict[str, Any], key: Any = SECRET, algorithm: str = "HS256") -> str:
    """A token signed as the test says (mint() makes only good ones)."""
    return jwt.encode(claims, key, algorithm=algorithm)


def unsigned(claims: dict[str, Any]) -> str:
    """An C{alg: none} token, built by hand so that no library refuses to make it."""

    def part(value: Any) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


class SecretFileTests(SynchronousTestCase):
    """--link-secret / --secret: 32 bytes or more, open to nobody but its owner."""

    def test_good_binary_secret(self) -> None:
        """A binary key is used byte for byte, a trailing newline byte included."""
        key = os.urandom(31) + b"\n"
        self.assertEqual(load_link_secret(write_secret(self, key)), key)

    def test_text_secret_loses_its_newline(self) -> None:
        """A text key (as openssl rand -base64 writes) is used without its line ending."""
        key = base64.b64encode(os.urandom(36))
        self.assertEqual(load_link_secret(write_secret(self, key + b"\n")), key)

    def test_open_to_others_refused(self) -> None:
        for mode in (0o640, 0o604, 0o620, 0o660, 0o644):
            with self.assertRaises(CredentialFileError) as caught:
                load_link_secret(write_secret(self, mode=mode))
            self.assertIn(f"mode {mode:04o}", str(caught.exception))
            self.assertIn("chmod 600", str(caught.exception))

    def test_too_short_refused(self) -> None:
        with self.assertRaises(CredentialFileError) as caught:
            load_link_secret(write_secret(self, os.urandom(31)))
        self.assertIn("31 bytes", str(caught.exception))
        # 32 characters of text, but 31 once the newline is gone.
        with self.assertRaises(CredentialFileError):
            load_link_secret(write_secret(self, b"a" * 31 + b"\n"))

    def test_missing_refused(self) -> None:
        with self.assertRaises(CredentialFileError) as caught:
            load_link_secret(self.mktemp())
        self.assertIn("cannot read link secret", str(caught.exception))


class CheckerTests(SynchronousTestCase):
    """The claims: exp required, nbf/iat with the leeway, console, ro, sub; HS256 only."""

    def setUp(self) -> None:
        self.checker = LinkChecker(SECRET)
        self.now = int(time.time())

    def refused(self, text: str, checker: LinkChecker | None = None) -> str:
        with self.assertRaises(LinkRefused) as caught:
            (checker or self.checker).check(text.encode())
        return str(caught.exception)

    def test_minted_link(self) -> None:
        access = self.checker.check(mint(SECRET, "vm1", 600, user="alice").encode())
        self.assertEqual(access.name, "alice")
        self.assertEqual((access.read_only, access.consoles, access.link), (False, ("vm1",), True))
        self.assertTrue(access.may_see("vm1"))
        self.assertFalse(access.may_see("vm2"))
        self.assertTrue(self.checker.check(mint(SECRET, "vm1", 600, read_only=True).encode()).read_only)
        self.assertEqual(self.checker.check(mint(SECRET, "web-*", 600).encode()).consoles, ("web-*",))
        self.assertEqual(self.checker.check(mint(SECRET, "*", 600).encode()).consoles, ())

    def test_control_claim(self) -> None:
        """C{ctl}: the control right; refused with C{ro}, or when not a boolean."""
        access = self.checker.check(mint(SECRET, "vm1", 600, user="alice", control=True).encode())
        self.assertTrue(access.may_control)
        self.assertFalse(self.checker.check(mint(SECRET, "vm1", 600).encode()).may_control)
        self.assertIn("ctl claim", self.refused(token({"console": "vm1", "ctl": 1, "exp": self.now + 600})))
        self.assertIn(
            "ro and ctl together",
            self.refused(token({"console": "vm1", "ro": True, "ctl": True, "exp": self.now + 600})),
        )
        self.assertRaises(ValueError, mint, SECRET, "vm1", 60, read_only=True, control=True)

    def test_expired(self) -> None:
        expired = token({"sub": "bob", "console": "vm1", "exp": self.now - LEEWAY - 5})
        self.assertEqual(self.refused(expired), "signed link for bob has expired")
        # Within the leeway, still good (a control plane's clock may be ahead).
        self.checker.check(token({"console": "vm1", "exp": self.now - LEEWAY + 5}).encode())

    def test_not_yet_valid(self) -> None:
        for claim in ("nbf", "iat"):
            early = token({"sub": "bob", "console": "vm1", "exp": self.now + 600, claim: self.now + LEEWAY + 10})
            self.assertEqual(self.refused(early), "signed link for bob is not valid yet", claim)
            self.checker.check(
                token({"console": "vm1", "exp": self.now + 600, claim: self.now + LEEWAY - 5}).encode()
            )

    def test_wrong_signature_and_algorithms(self) -> None:
        claims = {"sub": "bob", "console": "vm1", "exp": self.now + 600}
        self.assertEqual(self.refused(token(claims, b"another secret, 32 bytes or more")),
                         "signed link with a wrong signature")
        self.assertIn("algorithm", self.refused(unsigned(claims)))
        self.assertIn("algorithm", self.refused(token(claims, algorithm="HS512")))
        good = token(claims)
        header, payload, signature = good.split(".")
        self.assertIn("wrong signature", self.refused(f"{header}.{unsigned(dict(claims, ro=False)).split('.')[1]}.{signature}"))
        self.assertIn("refused", self.refused("not.a.jwt"))

    def test_missing_and_malformed_claims(self) -> None:
        self.assertEqual(self.refused(token({"sub": "bob", "console": "vm1"})),
                         "signed link for bob lacks the exp claim")
        self.assertEqual(self.refused(token({"sub": "bob", "exp": self.now + 600})),
                         "signed link for bob lacks the console claim")
        self.assertIn("not a string", self.refused(token({"console": 1, "exp": self.now + 600})))
        self.assertIn("patterns use", self.refused(token({"console": "VM/1", "exp": self.now + 600})))
        self.assertIn("one name or pattern", self.refused(token({"console": "vm1,vm2", "exp": self.now + 600})))
        self.assertIn("ro claim", self.refused(token({"console": "vm1", "ro": "yes", "exp": self.now + 600})))

    def test_single_console_needs_star(self) -> None:
        """The one console has no name: only a link for every console ('*') opens it."""
        single = LinkChecker(SECRET, single_console=True)
        self.assertEqual(single.check(mint(SECRET, "*", 60).encode()).consoles, ())
        self.assertIn("opens only for console '*'", self.refused(mint(SECRET, "vm1", 60), single))
        self.assertIn("opens only", self.refused(mint(SECRET, "v*", 60), single))


class LinkToolTests(SynchronousTestCase):
    """cloud-console-link's inputs (called in-process; a real process below)."""

    def run_tool(self, *args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            status = links.main(list(args))
        return status, out.getvalue(), err.getvalue()

    def test_prints_a_link(self) -> None:
        secret = write_secret(self)
        status, out, _ = self.run_tool("--secret", secret, "--console", "vm1", "--ttl", "600",
                                       "--read-only", "--user", "alice")
        self.assertEqual(status, 0)
        url = urlsplit(out.strip())
        self.assertEqual((url.scheme, url.netloc, url.path), ("http", "127.0.0.1:8080", "/c/vm1/"))
        claims = jwt.decode(url.query.removeprefix("token="), SECRET, algorithms=["HS256"])
        self.assertEqual((claims["console"], claims["ro"], claims["sub"]), ("vm1", True, "alice"))
        self.assertEqual(claims["exp"] - claims["iat"], 600)
        self.assertLess(abs(claims["iat"] - time.time()), 5)
        status, out, _ = self.run_tool("--secret", secret, "--console=web-*", "--ttl=5",
                                       "--base", "https://console.example.com/h/host1")
        self.assertEqual(status, 0)
        self.assertTrue(out.startswith("https://console.example.com/h/host1/?token="), out)
        self.assertNotIn("ro", jwt.decode(out.strip().partition("token=")[2], SECRET, algorithms=["HS256"]))
        status, out, _ = self.run_tool("--secret", secret, "--console", "vm1", "--ttl", "60", "--control")
        self.assertEqual(status, 0)
        self.assertIs(jwt.decode(out.strip().partition("token=")[2], SECRET, algorithms=["HS256"])["ctl"], True)

    def test_bad_inputs(self) -> None:
        secret = write_secret(self)
        good = ["--secret", secret, "--console", "vm1", "--ttl", "600"]
        for args in (
            [], good[2:], good[:2] + good[4:], good[:4],
            good[:5] + ["0"], good[:5] + ["-5"], good[:5] + ["soon"], good[:5] + ["inf"],
            good[:3] + ["VM1"], good[:3] + ["vm1,vm2"], good[:3] + [""],
            good + ["--base", "ftp://x/"], good + ["--user", ""], good + ["--colour"],
            good + ["--ttl", "5"], good + ["--user"], good + ["--read-only", "--control"],
        ):
            status, out, err = self.run_tool(*args)
            self.assertEqual(status, 1, args)
            self.assertEqual(out, "", args)
            self.assertIn("usage: cloud-console-link", err, args)

    def test_bad_secret(self) -> None:
        status, out, err = self.run_tool("--secret", write_secret(self, mode=0o644), "--console", "vm1",
                                         "--ttl", "600")
        self.assertEqual((status, out), (2, ""))
        self.assertIn("open to group or others", err)


# -- real processes ---------------------------------------------------------------------------


async def open_v1(port: int, path: str, headers: dict[str, str]) -> V1Client:
    """A v1 client whose upgrade carries C{headers} (a cookie, an Authorization)."""
    factory = WebSocketClientFactory(
        f"ws://127.0.0.1:{port}{path}", protocols=["cloud-console.v1"], headers=headers
    )
    factory.protocol = V1Client
    client: V1Client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    await client.opened
    return client


async def link_tool(*args: str) -> tuple[int, str, str]:
    """C{cloud-console-link ARGS} as a real process: status, stdout, stderr."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out, err, status = await getProcessOutputAndValue(
        sys.executable, ["-m", "cloud_console.access.links", *args], env=env, path=str(ROOT)
    )
    return status, out.decode(), err.decode()


class LinkServerTestCase(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir()
        self.secret = self.dir / "link.key"
        self.secret.write_bytes(SECRET)
        self.secret.chmod(0o600)

    def guest(self) -> Guest:
        guest = Guest()
        self.addCleanup(guest.close)
        guest.start_reading()
        return guest

    async def serve(self, *args: str) -> Server:
        self.port = free_port()
        return await serve_process(
            self, [*args, "--link-secret", str(self.secret), "--port", f"tcp:port={self.port}:interface=127.0.0.1"]
        )

    async def v1(self, path: str, headers: dict[str, str]) -> V1Client:
        client = await open_v1(self.port, path, headers)
        self.addCleanup(lambda: None if client.close_status else client.transport.abortConnection())
        await client.wait_for(lambda c: bool(c.events_of("hello")))
        return client

    async def refused(self, server: Server, path: str, link: str, reason: str) -> None:
        """The page (by URL and by header) and the upgrade are 401; the reason is logged only."""
        before = server.count(reason.encode())
        for where, headers in ((f"{path}?token={link}", {}), (path, {"Authorization": f"Bearer {link}"})):
            code, response_headers, body = await http_request(self.port, where, headers)
            self.assertEqual(code, 401, (where, reason))
            self.assertNotIn(reason.encode(), body)
            self.assertNotIn(b"signed link", body)
            self.assertIsNone(response_headers.getRawHeaders(b"set-cookie"))
        with self.assertRaises(AssertionError):  # "not opened"
            await open_v1(self.port, path + "ws", {"Cookie": f"cloud-console-token={link}"})
        await server.log_line(lambda err: err.count(reason.encode()) >= before + 3)


class FleetLinkTests(LinkServerTestCase):
    async def test_minted_link_opens_its_console(self) -> None:
        """
        A link from cloud-console-link opens its page (setting a Path-less HttpOnly cookie)
        and its WebSocket by that cookie; typing reaches the right pty; sub is logged. The
        same link by Authorization: Bearer opens them too; another console is 401.
        """
        vm1, vm2 = self.guest(), self.guest()
        server = await self.serve("--console", f"vm1={vm1.path}", "--console", f"vm2={vm2.path}")
        status, out, err = await link_tool(
            "--secret", str(self.secret), "--console", "vm1", "--ttl", "600", "--user", "alice",
            "--base", f"http://127.0.0.1:{self.port}/",
        )
        self.assertEqual((status, err), (0, ""))
        url = urlsplit(out.strip())
        self.assertEqual(url.path, "/c/vm1/")
        link = url.query.removeprefix("token=")
        code, headers, body = await http_request(self.port, f"{url.path}?{url.query}")
        self.assertEqual(code, 200)
        self.assertIn(b"<html", body.lower())
        [cookie] = headers.getRawHeaders(b"set-cookie")
        self.assertTrue(cookie.startswith(f"cloud-console-token={link};".encode()), cookie)
        self.assertIn(b"HttpOnly", cookie)
        self.assertIn(b"SameSite=strict", cookie)
        self.assertNotIn(b"Path", cookie)
        await server.log_line(lambda err: b"signed link for alice (read-write, console vm1) used from" in err)

        client = await self.v1("/c/vm1/ws", {"Cookie": f"cloud-console-token={link}"})
        self.assertFalse(client.events_of("hello")[0]["readOnly"])
        await vm1.write(b"hello from vm1\r\n")
        await client.wait_text("hello from vm1")
        client.type(b"typed\r")
        await vm1.receives(lambda got: got == b"typed\r")
        self.assertEqual(bytes(vm2.input), b"")
        await server.log_line(lambda err: err.count(b"signed link for alice (read-write") >= 2)

        bearer = await self.v1("/c/vm1/ws", {"Authorization": f"Bearer {link}"})
        await vm1.write(b"second\r\n")
        await bearer.wait_text("second")
        self.assertEqual((await http_request(self.port, "/c/vm1/history", {"Authorization": f"Bearer {link}"}))[0], 200)
        code, _, body = await http_request(self.port, "/api/consoles", {"Authorization": f"Bearer {link}"})
        self.assertEqual([c["name"] for c in json.loads(body)["consoles"]], ["vm1"])

    async def test_refusals(self) -> None:
        """
        Expired, not yet valid, wrongly signed, alg=none, no exp, and another console's
        link (an existing console or not: the same 401) are 401 with the reason logged.
        """
        vm1, vm2 = self.guest(), self.guest()
        server = await self.serve("--console", f"vm1={vm1.path}", "--console", f"vm2={vm2.path}")
        now = int(time.time())
        ok = {"sub": "mallory", "console": "vm1", "exp": now + 600}
        cases = [
            (token(dict(ok, exp=now - LEEWAY - 10)), "signed link for mallory has expired"),
            (token(dict(ok, nbf=now + LEEWAY + 60)), "signed link for mallory is not valid yet"),
            (token(dict(ok, iat=now + LEEWAY + 60)), "signed link for mallory is not valid yet"),
            (token(ok, b"not the server's secret, but long enough"), "signed link with a wrong signature"),
            (unsigned(ok), "signed link with an algorithm other than HS256"),
            (token({"sub": "mallory", "console": "vm1"}), "signed link for mallory lacks the exp claim"),
        ]
        for link, reason in cases:
            await self.refused(server, "/c/vm1/", link, reason)
        await self.refused(server, "/c/vm2/", token(ok), "signed link for mallory is for console vm1, not vm2")
        await self.refused(server, "/c/nope/", token(ok), "signed link for mallory is for console vm1, not nope")
        # The link itself is good where it belongs.
        self.assertEqual((await http_request(self.port, "/c/vm1/", {"Authorization": f"Bearer {token(ok)}"}))[0], 200)

    async def test_read_only_link(self) -> None:
        """ro: the session is read-only (the hello says so) and typing is discarded."""
        vm1 = self.guest()
        await self.serve("--console", f"vm1={vm1.path}")
        status, out, _ = await link_tool("--secret", str(self.secret), "--console", "vm1", "--ttl", "60", "--read-only")
        self.assertEqual(status, 0)
        link = out.strip().partition("token=")[2]
        client = await self.v1("/c/vm1/ws", {"Cookie": f"cloud-console-token={link}"})
        self.assertTrue(client.events_of("hello")[0]["readOnly"])
        client.type(b"rm -rf /\r")
        await client.wait_for(lambda c: bool(c.events_of("input-discarded")))
        self.assertEqual(bytes(vm1.input), b"")

    async def test_websocket_outlives_its_link(self) -> None:
        """
        A WebSocket opened with a link stays open after the link expires (as OpenStack's
        serial proxy does): only new requests are refused.
        """
        vm1 = self.guest()
        server = await self.serve("--console", f"vm1={vm1.path}")
        # Expiry is a matter of the clock, so this test waits on time (the one wait here
        # that is not on an event). With the 30 s leeway a 2 s link would last 32 s: the
        # link's exp is set in the past instead, so it is good for 2 more seconds only.
        exp = int(time.time()) - LEEWAY + 2
        link = token({"sub": "carol", "console": "vm1", "exp": exp})
        client = await self.v1("/c/vm1/ws", {"Cookie": f"cloud-console-token={link}"})
        await task.deferLater(reactor, max(0.0, exp + LEEWAY + 1 - time.time()), lambda: None)
        code, _, _ = await http_request(self.port, "/c/vm1/", {"Authorization": f"Bearer {link}"})
        self.assertEqual(code, 401)
        await server.log_line(lambda err: b"signed link for carol has expired" in err)
        await vm1.write(b"after expiry\r\n")
        await client.wait_text("after expiry")
        client.type(b"still typing\r")
        await vm1.receives(lambda got: got == b"still typing\r")
        self.assertIsNone(client.close_status)

    async def test_links_beside_tokens_and_passwords(self) -> None:
        """With --token-file and --password-file too, each credential is accepted."""
        vm1 = self.guest()
        tokens = self.dir / "tokens"
        tokens.write_text("file-token-0123456789abcdef\n")
        passwords = self.dir / "passwords"
        passwords.write_text(f"dave:{hash_password('secret-pw', iterations=1000)}\n")
        server = await self.serve("--console", f"vm1={vm1.path}", "--token-file", str(tokens),
                                  "--password-file", str(passwords))
        basic = base64.b64encode(b"dave:secret-pw").decode()
        for headers in (
            {"Authorization": "Bearer file-token-0123456789abcdef"},
            {"Authorization": f"Basic {basic}"},
            {"Authorization": f"Bearer {mint(SECRET, 'vm1', 60, user='erin')}"},
        ):
            self.assertEqual((await http_request(self.port, "/c/vm1/", headers))[0], 200, headers)
        self.assertEqual((await http_request(self.port, "/c/vm1/", {"Authorization": "Bearer nope-0123456789abcdef"}))[0], 401)
        await self.refused(server, "/c/vm1/", mint(b"x" * 32, "vm1", 60), "signed link with a wrong signature")


class SingleConsoleLinkTests(LinkServerTestCase):
    async def test_single_console(self) -> None:
        """One console (no name): a link for '*' opens it; a link naming a console is 401."""
        guest = self.guest()
        server = await self.serve("--console", guest.path)
        status, out, _ = await link_tool("--secret", str(self.secret), "--console", "*", "--ttl", "60",
                                         "--base", f"http://127.0.0.1:{self.port}")
        self.assertEqual(status, 0)
        url = urlsplit(out.strip())
        self.assertEqual(url.path, "/")
        code, headers, _ = await http_request(self.port, f"/?{url.query}")
        self.assertEqual(code, 200)
        link = url.query.removeprefix("token=")
        client = await self.v1("/ws", {"Cookie": f"cloud-console-token={link}"})
        await guest.write(b"single\r\n")
        await client.wait_text("single")
        await self.refused(server, "/", mint(SECRET, "vm1", 60, user="frank"),
                           "signed link for frank is for console vm1; this server's one console has no name")


class StartupTests(TestCase):
    """A bad --link-secret stops the server at start-up with status 2, as a bad password file does."""

    timeout = 30

    async def test_bad_secret_refused(self) -> None:
        from tests.helpers import spawn_server

        guest = Guest()
        self.addCleanup(guest.close)
        for data, mode, message in (
            (SECRET, 0o644, b"is open to group or others (mode 0644)"),
            (SECRET[:20], 0o600, b"holds 20 bytes; at least 32"),
        ):
            path = Path(self.mktemp()).resolve()
            path.write_bytes(data)
            path.chmod(mode)
            for form in (["--console", guest.path], ["--console", f"vm1={guest.path}"]):
                server = spawn_server([*form, "--link-secret", str(path), "--port", f"tcp:port={free_port()}"])
                server.listening.addErrback(lambda failure: None)  # it never listens, as wanted
                self.assertEqual(await server.ended, 2, server.stderr)
                self.assertIn(message, server.stderr)
