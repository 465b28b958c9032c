"""
Tests for L{cloud_console.access}: origin checks, passwords, tokens, read-only viewers and
the client limit, through the real site on StringTransports.
"""

from __future__ import annotations

import base64
import io
import os
import sys
from typing import Any

from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from cloud_console import passwd
from cloud_console.access import (
    CredentialFileError,
    OriginPolicy,
    hash_password,
    load_password_file,
    load_token_file,
    verify_password,
)
from cloud_console.multiplexer import Multiplexer
from cloud_console.web import build_site
from cloud_console.websocket import SUBPROTOCOL_V1, ConsoleSettings

from .helpers import OP_BINARY, FakePty, WebClient, use_memory_reactor

#: Few rounds: these tests check the logic, not the cost.
FAST = 1000


class OriginPolicyTests(SynchronousTestCase):
    """Which origins may open the WebSocket."""

    def test_same_origin(self) -> None:
        """The page's own scheme://host:port is allowed, default ports included."""
        policy = OriginPolicy()
        self.assertTrue(policy.permits("http://127.0.0.1:8080", ["127.0.0.1:8080"]))
        self.assertTrue(policy.permits("https://console.example.com", ["console.example.com"]))
        self.assertTrue(policy.permits("https://Console.Example.com:443", ["console.example.com"]))
        self.assertTrue(policy.permits("http://[::1]:8080", ["[::1]:8080"]))

    def test_foreign_origin(self) -> None:
        """Another host, or the same host on another port, is refused."""
        policy = OriginPolicy()
        self.assertFalse(policy.permits("http://evil.example", ["127.0.0.1:8080"]))
        self.assertFalse(policy.permits("http://127.0.0.1:9999", ["127.0.0.1:8080"]))
        self.assertFalse(policy.permits("http://127.0.0.1.evil.example:8080", ["127.0.0.1:8080"]))

    def test_no_origin(self) -> None:
        """No Origin (not a browser) is allowed; 'null' and garbage are not."""
        policy = OriginPolicy()
        self.assertTrue(policy.permits(None, ["127.0.0.1:8080"]))
        self.assertTrue(policy.permits("", ["127.0.0.1:8080"]))
        self.assertFalse(policy.permits("null", ["127.0.0.1:8080"]))
        self.assertFalse(policy.permits("javascript:alert(1)", ["127.0.0.1:8080"]))

    def test_forwarded_host(self) -> None:
        """Behind a proxy that rewrites Host, the X-Forwarded-Host it sets counts."""
        policy = OriginPolicy()
        hosts = ["127.0.0.1:8080", "console.example.com"]
        self.assertTrue(policy.permits("https://console.example.com", hosts))
        self.assertFalse(policy.permits("https://console.example.com", hosts[:1]))

    def test_allowed_list(self) -> None:
        """--allow-origin adds origins; '*' allows any; 'null' only when listed."""
        policy = OriginPolicy(("https://ops.example.com",))
        self.assertTrue(policy.permits("https://ops.example.com:443", ["127.0.0.1:8080"]))
        self.assertFalse(policy.permits("http://ops.example.com", ["127.0.0.1:8080"]))
        self.assertTrue(OriginPolicy(("*",)).permits("http://evil.example", ["x"]))
        self.assertTrue(OriginPolicy(("null",)).permits("null", ["x"]))


class PasswordTests(SynchronousTestCase):
    """Password hashes and files."""

    def test_hash_round_trip(self) -> None:
        """A hash verifies its password and no other, and never contains it."""
        encoded = hash_password("s3cret pässword", FAST)
        self.assertTrue(encoded.startswith("pbkdf2-sha256$1000$"))
        self.assertNotIn("s3cret", encoded)
        self.assertTrue(verify_password("s3cret pässword", encoded))
        self.assertFalse(verify_password("s3cret password", encoded))
        self.assertFalse(verify_password("x", "garbage"))
        self.assertNotEqual(hash_password("same", FAST), hash_password("same", FAST))

    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_load(self) -> None:
        """user:hash[:role] lines, comments and blank lines."""
        h = hash_password("pw", FAST)
        users = load_password_file(self.write(f"# ops\n\nalice:{h}\nbob:{h}:read-only\n"))
        self.assertEqual(users, {"alice": (h, False), "bob": (h, True)})

    def test_plain_text_refused(self) -> None:
        """A plain-text password in the file is refused with the line number."""
        e = self.assertRaises(CredentialFileError, load_password_file, self.write("alice:hunter2\n"))
        self.assertIn("line 1", str(e))
        self.assertIn("cloud-console-passwd", str(e))

    def test_bad_role_and_missing_file(self) -> None:
        """An unknown role, or an unreadable file, is a clear error."""
        h = hash_password("pw", FAST)
        e = self.assertRaises(CredentialFileError, load_password_file, self.write(f"a:{h}:admin\n"))
        self.assertIn("admin", str(e))
        e = self.assertRaises(CredentialFileError, load_password_file, "/nonexistent/pw")
        self.assertIn("/nonexistent/pw", str(e))

    def test_tokens(self) -> None:
        """Token files: one per line, optional read-only, short tokens refused."""
        tokens = load_token_file(self.write("0123456789abcdef\nfedcba9876543210 read-only\n"))
        self.assertEqual(tokens, [(b"0123456789abcdef", False), (b"fedcba9876543210", True)])
        self.assertRaises(CredentialFileError, load_token_file, self.write("short\n"))

    def test_passwd_tool(self) -> None:
        """cloud-console-passwd stores a hash (not the password) and replaces a user."""
        path = self.mktemp()
        self.patch(sys, "stdin", io.StringIO("first\n"))
        self.assertEqual(passwd.main([path, "alice"]), 0)
        self.patch(sys, "stdin", io.StringIO("second\n"))
        self.assertEqual(passwd.main([path, "alice", "--read-only"]), 0)
        users = load_password_file(path)
        self.assertEqual(list(users), ["alice"])
        encoded, read_only = users["alice"]
        self.assertTrue(read_only)
        self.assertTrue(verify_password("second", encoded))
        self.assertNotIn("second", open(path).read())
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)


class GateTestCase(SynchronousTestCase):
    """A site with credentials, on StringTransports."""

    def setUp(self) -> None:
        self.reactor = use_memory_reactor(self)
        self.multiplexer = Multiplexer(1000)
        self.pty = FakePty()
        self.multiplexer.console_up(self.pty)
        self.password = self.mktemp()
        with open(self.password, "w") as f:
            f.write(f"alice:{hash_password('wonderland', FAST)}\n")
            f.write(f"bob:{hash_password('builder', FAST)}:read-only\n")
        self.tokens = self.mktemp()
        with open(self.tokens, "w") as f:
            f.write("tok-0123456789abcdef\ntok-readonly-0123456789 read-only\n")
        self.settings = ConsoleSettings(max_clients=3)
        self.site, _ = build_site(
            self.multiplexer, self.settings, self.mktemp(),
            password_file=self.password, token_file=self.tokens,
        )
        self.site.reactor = self.reactor

    def request(self, path: bytes, headers: dict[str, str] | None = None) -> bytes:
        client = WebClient(self.site, 5)
        lines = [b"GET " + path + b" HTTP/1.1", b"Host: 127.0.0.1:8080"]
        lines += [f"{k}: {v}".encode() for k, v in (headers or {}).items()]
        client.send_raw(b"\r\n".join(lines) + b"\r\n\r\n")
        return client.transport.value()

    @staticmethod
    def basic(user: str, password: str) -> dict[str, str]:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def upgrade(self, **kwargs: Any) -> WebClient:
        client = WebClient(self.site, 6)
        client.upgrade(**kwargs)
        return client


class AuthenticationTests(GateTestCase):
    """Credentials are needed for the page and the WebSocket alike."""

    def test_no_credentials(self) -> None:
        """Without credentials: 401 with a Basic challenge, for the page and /history."""
        for path in (b"/", b"/history"):
            response = self.request(path)
            self.assertIn(b"401", response.split(b"\r\n")[0])
            self.assertIn(b'www-authenticate: basic realm="cloud-console"', response.lower())

    def test_wrong_password_logged(self) -> None:
        """A wrong password is 401, and logged with the peer's address."""
        self.multiplexer.output_received(b"secret output")
        with capturedLogs() as events:
            response = self.request(b"/history", self.basic("alice", "wrong"))
        self.assertIn(b"401", response.split(b"\r\n")[0])
        self.assertNotIn(b"secret output", response)
        failures = [e for e in events if e.get("log_format", "").startswith("authentication failed")]
        self.assertEqual(len(failures), 1)
        self.assertIn("127.0.0.1", failures[0]["peer"])

    def test_unknown_user(self) -> None:
        """An unknown user is refused like a wrong password."""
        response = self.request(b"/history", self.basic("mallory", "wonderland"))
        self.assertIn(b"401", response.split(b"\r\n")[0])

    def test_right_password(self) -> None:
        """The right password serves the request (twice: the second from the cache)."""
        self.multiplexer.output_received(b"secret output")
        for _ in range(2):
            response = self.request(b"/history", self.basic("alice", "wonderland"))
            self.assertIn(b"200", response.split(b"\r\n")[0])
            self.assertTrue(response.endswith(b"secret output"))
        response = self.request(b"/history", self.basic("alice", "wonderland!"))
        self.assertIn(b"401", response.split(b"\r\n")[0])

    def test_websocket_needs_credentials(self) -> None:
        """The upgrade without credentials is 401; with them it is 101 and input flows."""
        client = self.upgrade()
        self.assertIn(b"401", client.response.split(b"\r\n")[0])
        client = self.upgrade(extra=self.basic("alice", "wonderland"))
        self.assertIn(b"101", client.response.split(b"\r\n")[0])
        client.send(OP_BINARY, b"ls\r")
        self.assertEqual(bytes(self.pty.written), b"ls\r")

    def test_read_only_user(self) -> None:
        """A read-only credential sees output, but its input is discarded and counted."""
        client = self.upgrade(extra=self.basic("bob", "builder"), protocols=[SUBPROTOCOL_V1])
        hello = client.frames()[0].json()
        self.assertTrue(hello["readOnly"])
        self.multiplexer.output_received(b"visible")
        client.send(OP_BINARY, b"reboot\r")
        self.assertEqual(bytes(self.pty.written), b"")
        self.assertEqual(client.protocol.attachment.input_discarded, 7)

    def test_bearer_token(self) -> None:
        """A bearer token in the Authorization header; a wrong one is refused."""
        ok = self.request(b"/history", {"Authorization": "Bearer tok-0123456789abcdef"})
        self.assertIn(b"200", ok.split(b"\r\n")[0])
        bad = self.request(b"/history", {"Authorization": "Bearer tok-0123456789abcdeX"})
        self.assertIn(b"401", bad.split(b"\r\n")[0])

    def test_token_in_url_sets_cookie(self) -> None:
        """?token= on the page sets an HttpOnly same-site cookie the upgrade then carries."""
        response = self.request(b"/history?token=tok-0123456789abcdef")
        self.assertIn(b"200", response.split(b"\r\n")[0])
        cookie_line = [line for line in response.split(b"\r\n") if line.lower().startswith(b"set-cookie")][0]
        self.assertIn(b"cloud-console-token=tok-0123456789abcdef", cookie_line)
        self.assertIn(b"HttpOnly", cookie_line)
        self.assertIn(b"SameSite=strict", cookie_line)
        client = self.upgrade(extra={"Cookie": "cloud-console-token=tok-0123456789abcdef"})
        self.assertIn(b"101", client.response.split(b"\r\n")[0])

    def test_read_only_token(self) -> None:
        """A read-only token's input is discarded."""
        client = self.upgrade(extra={"Authorization": "Bearer tok-readonly-0123456789"})
        client.send(OP_BINARY, b"x")
        self.assertEqual(bytes(self.pty.written), b"")


class OriginOnSiteTests(GateTestCase):
    """The origin check on the real upgrade path (with credentials, so only origin fails)."""

    def test_foreign_origin_refused_and_logged(self) -> None:
        """A cross-site upgrade is refused with 403 and logged with the origin."""
        with capturedLogs() as events:
            client = self.upgrade(origin="http://evil.example", extra=self.basic("alice", "wonderland"))
        self.assertIn(b"403", client.response.split(b"\r\n")[0])
        refused = [e for e in events if "origin" in e and e.get("origin") == "http://evil.example"]
        self.assertEqual(len(refused), 1)
        self.assertEqual(self.multiplexer.viewer_count, 0)

    def test_same_origin_and_proxied(self) -> None:
        """The page's own origin passes; so does a proxied one with X-Forwarded-Host."""
        auth = self.basic("alice", "wonderland")
        client = self.upgrade(origin="http://127.0.0.1:8080", extra=auth)
        self.assertIn(b"101", client.response.split(b"\r\n")[0])
        proxied = self.upgrade(
            origin="https://console.example.com",
            extra={**auth, "X-Forwarded-Host": "console.example.com"},
        )
        self.assertIn(b"101", proxied.response.split(b"\r\n")[0])
        rewritten = self.upgrade(origin="https://console.example.com", extra=auth)
        self.assertIn(b"403", rewritten.response.split(b"\r\n")[0])

    def test_max_clients(self) -> None:
        """Past --max-clients the next upgrade is refused with 503."""
        auth = self.basic("alice", "wonderland")
        for _ in range(3):
            self.assertIn(b"101", self.upgrade(extra=auth).response)
        refused = self.upgrade(extra=auth)
        self.assertIn(b"503", refused.response.split(b"\r\n")[0])
