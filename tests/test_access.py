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

from twisted.cred import credentials
from twisted.logger import capturedLogs
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from cloud_console.access import passwd
from cloud_console.access.checkers import (
    BearerToken,
    PasswordChecker,
    TokenChecker,
    hash_password,
    load_password_file,
    load_token_file,
    verify_password,
)
from cloud_console.access.policy import Access, CredentialFileError, parse_console_patterns
from cloud_console.web.gate import AuthGate, ConsoleRealm, build_gate
from cloud_console.web.origin import OriginPolicy
from cloud_console.console.multiplexer import Multiplexer
from cloud_console.web.site import build_site
from cloud_console.web.websocket import SUBPROTOCOL_V1, ConsoleSettings

from .helpers import OP_BINARY, FakePty, WebClient, use_memory_reactor

#: Few rounds: these tests check the logic, not the cost.
FAST = 1000


class OriginPolicyTests(SynchronousTestCase):
    """Which origins may open the WebSocket."""

    def test_host_without_a_port_is_the_default_port(self) -> None:
        """
        A Host or X-Forwarded-Host without a port names the scheme's default port, so a
        page on another port of the same name is refused.
        """
        policy = OriginPolicy(())
        self.assertTrue(policy.permits("https://console.example.com", [None, "console.example.com"]))
        self.assertTrue(policy.permits("http://console.example.com", ["console.example.com"]))
        self.assertFalse(policy.permits("https://console.example.com:8443", [None, "console.example.com"]))
        self.assertTrue(policy.permits("https://console.example.com:8443", ["console.example.com:8443"]))

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
        self.assertEqual(users, {"alice": (h, Access("alice", False)), "bob": (h, Access("bob", True))})

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
        self.assertEqual(
            tokens,
            [(b"0123456789abcdef", Access("token #1", False)), (b"fedcba9876543210", Access("token #2", True))],
        )
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
        encoded, access = users["alice"]
        self.assertTrue(access.read_only)
        self.assertEqual(access.consoles, ())
        self.assertTrue(verify_password("second", encoded))
        self.assertNotIn("second", open(path).read())
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        self.patch(sys, "stdin", io.StringIO("third\n"))
        self.assertEqual(passwd.main([path, "bob", "--control"]), 0)
        self.assertTrue(load_password_file(path)["bob"][1].may_control)
        self.patch(sys, "stderr", io.StringIO())
        self.assertEqual(passwd.main([path, "carol", "--control", "--read-only"]), 1)


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


class ConsoleAccessTests(SynchronousTestCase):
    """Which consoles a credential may see, and the patterns that say so."""

    def test_may_see(self) -> None:
        """No patterns: every console; else fnmatch, case-sensitive, against each pattern."""
        everyone = Access("alice", False)
        self.assertTrue(everyone.may_see("web-1"))
        self.assertTrue(everyone.may_see("anything"))
        some = Access("bob", True, ("web-*", "db1", "app-?", "vm[0-3]", "x[!a]"))
        for name in ("web-1", "web-", "db1", "app-7", "vm2", "xb"):
            self.assertTrue(some.may_see(name), name)
        for name in ("db10", "db", "adb1", "app-77", "vm4", "xa", "WEB-1", "mail"):
            self.assertFalse(some.may_see(name), name)

    def test_scope(self) -> None:
        """Equal rights, whoever holds them, are one scope; order and repeats do not count."""
        self.assertEqual(Access("a", True, ("b*", "a")).scope, Access("z", True, ("a", "b*", "a")).scope)
        self.assertNotEqual(Access("a", True, ("a",)).scope, Access("a", False, ("a",)).scope)
        self.assertNotEqual(Access("a", True, ("a",)).scope, Access("a", True, ()).scope)
        self.assertEqual(Access("a", False, ("*", "db1")).scope, Access("b", False).scope)

    def test_parse_patterns(self) -> None:
        """Comma-separated patterns of the name alphabet and * ? [ ] !; others refused."""
        self.assertEqual(parse_console_patterns("web-*,db1"), ("web-*", "db1"))
        self.assertEqual(parse_console_patterns("vm[!0-3]?.x_y"), ("vm[!0-3]?.x_y",))
        for bad, why in (
            ("", "empty"), ("a,,b", "empty"), ("web-*,", "empty"), ("web 1", "' '"),
            ("a/b", "'/'"), ("Web", "'W'"), ("a:b", "':'"), ("db1;rm", "';'"),
        ):
            e = self.assertRaises(ValueError, parse_console_patterns, bad)
            self.assertIn(why, str(e), bad)


class RestrictedFileTests(SynchronousTestCase):
    """Password and token lines with a console list."""

    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_password_line_forms(self) -> None:
        """Role and console fields are optional and may come in either order."""
        h = hash_password("pw", FAST)
        users = load_password_file(self.write(
            f"a:{h}\nb:{h}:read-only\nc:{h}:consoles=web-*,db1\nd:{h}:read-only:consoles=db1\n"
            f"e:{h}:consoles=db1:ro\nf:{h}:\ng:{h}:read-write:consoles=*\n"
        ))
        self.assertEqual(
            {name: access for name, (_, access) in users.items()},
            {
                "a": Access("a", False), "b": Access("b", True),
                "c": Access("c", False, ("web-*", "db1")), "d": Access("d", True, ("db1",)),
                "e": Access("e", True, ("db1",)), "f": Access("f", False),
                "g": Access("g", False, ("*",)),
            },
        )
        self.assertTrue(all(encoded == h for encoded, _ in users.values()))

    def test_password_bad_fields(self) -> None:
        """Unknown, repeated or malformed fields are errors naming the file and line."""
        h = hash_password("pw", FAST)
        for field, why in (
            ("admin", "unknown field 'admin'"), ("console=web", "unknown field"),
            ("read-only:ro", "role is given twice"), ("consoles=a:consoles=b", "consoles= given twice"),
            ("consoles=", "empty console pattern"), ("consoles=a,,b", "empty console pattern"),
            ("consoles=web 1", "' '"), ("consoles=a/b", "'/'"), ("read-only:consoles=x:extra", "'extra'"),
        ):
            path = self.write(f"# users\nok:{h}\nx:{h}:{field}\n")
            e = self.assertRaises(CredentialFileError, load_password_file, path)
            self.assertIn(f"{path} line 3", str(e), field)
            self.assertIn(why, str(e), field)

    def test_token_line_forms(self) -> None:
        """TOKEN [read-only] [consoles=...], in either order."""
        tokens = load_token_file(self.write(
            "# tokens\n0123456789abcdef\n1123456789abcdef read-only\n2123456789abcdef consoles=web-*,db1\n"
            "3123456789abcdef read-only consoles=db1\n4123456789abcdef consoles=db?  ro\n"
        ))
        self.assertEqual(tokens, [
            (b"0123456789abcdef", Access("token #1", False)),
            (b"1123456789abcdef", Access("token #2", True)),
            (b"2123456789abcdef", Access("token #3", False, ("web-*", "db1"))),
            (b"3123456789abcdef", Access("token #4", True, ("db1",))),
            (b"4123456789abcdef", Access("token #5", True, ("db?",))),
        ])

    def test_token_name(self) -> None:
        """name=NAME is the token's identity, in any place on the line; unnamed lines stay token #N."""
        tokens = load_token_file(self.write(
            "0123456789abcdef name=alice\n1123456789abcdef read-only name=bob.ops@example consoles=db1\n"
            "2123456789abcdef\n"
        ))
        self.assertEqual(tokens, [
            (b"0123456789abcdef", Access("alice", False)),
            (b"1123456789abcdef", Access("bob.ops@example", True, ("db1",))),
            (b"2123456789abcdef", Access("token #3", False)),
        ])
        e = self.assertRaises(
            CredentialFileError, load_password_file,
            self.write(f"alice:{hash_password('pw', FAST)}:name=bob\n"),
        )
        self.assertIn("unknown field 'name=bob'", str(e))

    def test_token_bad_fields(self) -> None:
        """Unknown or repeated fields, bad patterns, too many fields: errors with file and line."""
        for rest, why in (
            ("admin", "unknown field 'admin'"), ("read-only read-only", "role is given twice"),
            ("consoles=a consoles=b", "consoles= given twice"), ("consoles=a/b", "'/'"),
            ("consoles=", "empty console pattern"), ("read-only consoles=a name=x y", "expected: token"),
            ("name=a name=b", "name= given twice"), ("name=", "is not a name"),
            ("name=anonymous", "is not a name"), ("name=-x", "is not a name"),
            ("name=" + "a" * 65, "is not a name"),
            ("consoles=", "empty console pattern"), ("control read-write consoles=a x", "expected: token"),
            ("control control", "control given twice"),
            ("read-only control", "control and read-only together"),
        ):
            path = self.write(f"0123456789abcdef\n\n1123456789abcdef {rest}\n")
            e = self.assertRaises(CredentialFileError, load_token_file, path)
            self.assertIn(f"{path} line 3", str(e), rest)
            self.assertIn(why, str(e), rest)

    def test_control_field(self) -> None:
        """C{control} on password and token lines, in any place among the fields."""
        h = hash_password("pw", FAST)
        users = load_password_file(
            self.write(f"alice:{h}:control:consoles=web-*\nbob:{h}:consoles=web-*\ncarol:{h}:read-only\n")
        )
        self.assertEqual(users["alice"][1], Access("alice", False, ("web-*",), control=True))
        self.assertTrue(users["alice"][1].may_control)
        self.assertFalse(users["bob"][1].may_control)
        self.assertFalse(users["carol"][1].may_control)
        tokens = load_token_file(self.write("0123456789abcdef consoles=db1 control\n1123456789abcdef\n"))
        self.assertTrue(tokens[0][1].may_control)
        self.assertEqual(tokens[0][1].consoles, ("db1",))
        self.assertFalse(tokens[1][1].may_control)
        e = self.assertRaises(CredentialFileError, load_password_file, self.write(f"dave:{h}:control:ro\n"))
        self.assertIn("control and read-only together", str(e))

    def test_read_only_never_controls(self) -> None:
        """An Access built read-only with control asked still may not control, and its
        scope (the tree it is served) is the read-only one."""
        access = Access("x", True, (), control=True)
        self.assertFalse(access.may_control)
        self.assertEqual(access.scope, Access("y", True).scope)
        self.assertNotEqual(Access("x", False, control=True).scope, Access("y", False).scope)

    def test_checkers_carry_consoles(self) -> None:
        """A password and a token each yield their restricted access."""
        h = hash_password("pw", FAST)
        users = load_password_file(self.write(f"alice:{h}:consoles=web-*\n"))
        alice = credentials.UsernamePassword(b"alice", b"pw")
        got = self.successResultOf(PasswordChecker(users).requestAvatarId(alice))
        self.assertEqual(got, Access("alice", False, ("web-*",)))
        self.assertFalse(got.may_see("db1"))
        # The remembered success keeps the restriction too.
        checker = PasswordChecker(users)
        for _ in range(2):
            got = self.successResultOf(checker.requestAvatarId(alice))
            self.assertEqual(got.consoles, ("web-*",))
        tokens = load_token_file(self.write("0123456789abcdef read-only consoles=db1\n"))
        got = self.successResultOf(TokenChecker(tokens).requestAvatarId(BearerToken(b"0123456789abcdef")))
        self.assertEqual(got, Access("token #1", True, ("db1",)))

    def test_passwd_consoles(self) -> None:
        """cloud-console-passwd --consoles writes the field, and the line loads back."""
        path = self.mktemp()
        self.patch(sys, "stdin", io.StringIO("pw\n"))
        self.assertEqual(passwd.main([path, "alice", "--consoles", "web-*,db1", "--read-only"]), 0)
        self.patch(sys, "stdin", io.StringIO("pw2\n"))
        self.assertEqual(passwd.main([path, "bob", "--consoles=vm[0-3]"]), 0)
        self.assertIn(":read-only:consoles=web-*,db1\n", open(path).read())
        users = load_password_file(path)
        self.assertEqual(users["alice"][1], Access("alice", True, ("web-*", "db1")))
        self.assertEqual(users["bob"][1], Access("bob", False, ("vm[0-3]",)))
        self.assertTrue(verify_password("pw2", users["bob"][0]))

    def test_passwd_bad_consoles(self) -> None:
        """A bad --consoles value (or none) is a usage error, and the file is untouched."""
        path = self.mktemp()
        for args in (["--consoles", "web 1"], ["--consoles", "a/b"], ["--consoles=,"], ["--consoles"]):
            stderr = io.StringIO()
            self.patch(sys, "stderr", stderr)
            self.patch(sys, "stdin", io.StringIO("pw\n"))
            self.assertEqual(passwd.main([path, "alice", *args]), 1, args)
            self.assertTrue(stderr.getvalue(), args)
            self.assertFalse(os.path.exists(path), args)


class _Tree(resource.Resource):
    """A stand-in site tree that says whom it was built for."""

    isLeaf = True

    def __init__(self, access: Access) -> None:
        resource.Resource.__init__(self)
        self.access = access

    def render_GET(self, request: Request) -> bytes:
        return f"tree ro={self.access.read_only} consoles={','.join(self.access.consoles)}".encode()


class RealmAndGateTests(SynchronousTestCase):
    """The realm's trees per access, and the gate's identify() and refusal counts."""

    def setUp(self) -> None:
        self.built: list[Access] = []
        self.refused: list[str] = []
        self.password = self.mktemp()
        with open(self.password, "w") as f:
            f.write(f"alice:{hash_password('wonderland', FAST)}:consoles=web-*,db1\n")
            f.write(f"carol:{hash_password('carol', FAST)}:consoles=db1,web-*\n")
            f.write(f"bob:{hash_password('builder', FAST)}:read-only\n")
        self.tokens = self.mktemp()
        with open(self.tokens, "w") as f:
            f.write("tok-0123456789abcdef consoles=db1,web-*\n")
            f.write("tok-readonly-0123456789 read-only consoles=vm?\n")
        self.gate = build_gate(self.build, self.password, self.tokens, on_refused=self.refused.append)
        root = resource.Resource()
        root.putChild(b"c", self.gate)
        root.putChild(b"healthz", _Identify(self.gate))
        # The channels' timeouts go on a memory clock, not the global reactor (where they
        # would be left for the next real-reactor test to find).
        self.site = Site(root, reactor=MemoryReactorClock())

    def build(self, access: Access) -> resource.IResource:
        self.built.append(access)
        return _Tree(access)

    def request(self, path: bytes, headers: dict[str, str] | None = None) -> tuple[bytes, bytes]:
        client = WebClient(self.site, 5)
        lines = [b"GET " + path + b" HTTP/1.1", b"Host: 127.0.0.1:8080"]
        lines += [f"{k}: {v}".encode() for k, v in (headers or {}).items()]
        client.send_raw(b"\r\n".join(lines) + b"\r\n\r\n")
        head, _, body = client.transport.value().partition(b"\r\n\r\n")
        return head.split(b"\r\n")[0], body

    basic = staticmethod(GateTestCase.basic)

    def test_realm_shares_trees_by_access(self) -> None:
        """One tree per distinct (read-only, consoles), built with the scope, not the user."""
        realm = ConsoleRealm(self.build)
        alice = realm.tree(Access("alice", False, ("web-*", "db1")))
        self.assertIs(realm.tree(Access("carol", False, ("db1", "web-*"))), alice)
        self.assertIs(realm.tree(Access("token #1", False, ("web-*", "db1", "db1"))), alice)
        self.assertIsNot(realm.tree(Access("dave", True, ("web-*", "db1"))), alice)
        self.assertIsNot(realm.tree(Access("erin", False, ("web-*",))), alice)
        everyone = realm.tree(Access("frank", False))
        self.assertIs(realm.tree(Access("gina", False, ("*",))), everyone)
        self.assertEqual(len(self.built), 4)
        self.assertEqual((self.built[0].read_only, self.built[0].consoles), (False, ("db1", "web-*")))
        self.assertNotIn("alice", self.built[0].name)
        for n in range(1000):
            realm.tree(Access(f"user{n}", True, ("vm*",)))
        self.assertEqual(len(self.built), 5)

    def test_gate_serves_the_tree_of_the_access(self) -> None:
        """Through the gate, a password and a token with the same consoles share one tree."""
        status, body = self.request(b"/c/", self.basic("alice", "wonderland"))
        self.assertIn(b"200", status)
        self.assertEqual(body, b"tree ro=False consoles=db1,web-*")
        self.assertEqual(self.request(b"/c/", self.basic("carol", "carol"))[1], body)
        self.assertEqual(self.request(b"/c/x", {"Authorization": "Bearer tok-0123456789abcdef"})[1], body)
        self.assertEqual(
            self.request(b"/c/", {"Authorization": "Bearer tok-readonly-0123456789"})[1],
            b"tree ro=True consoles=vm?",
        )
        self.assertEqual(self.request(b"/c/", self.basic("bob", "builder"))[1], b"tree ro=True consoles=")
        self.assertEqual(len(self.built), 3)
        self.assertEqual(self.refused, [])

    def test_refusals_counted(self) -> None:
        """Every 401 (no credential, a wrong password, an unknown token) counts as 'auth'."""
        self.assertIn(b"401", self.request(b"/c/")[0])
        self.assertIn(b"401", self.request(b"/c/", self.basic("alice", "wrong"))[0])
        self.assertIn(b"401", self.request(b"/c/", {"Authorization": "Bearer tok-0123456789abcdeX"})[0])
        self.assertEqual(self.refused, ["auth", "auth", "auth"])
        self.assertIn(b"200", self.request(b"/c/", self.basic("alice", "wonderland"))[0])
        self.assertEqual(len(self.refused), 3)
        # Without a counter, refusals are still 401.
        plain = build_gate(self.build, self.password, None)
        self.assertIsNone(plain.on_refused)

    def test_identify_without_credentials(self) -> None:
        """identify(): no credential is None, never a 401 and not counted."""
        status, body = self.request(b"/healthz")
        self.assertIn(b"200", status)
        self.assertEqual(body, b"anonymous")
        self.assertEqual(self.refused, [])

    def test_identify_bad_credentials(self) -> None:
        """A bad credential is None too, logged like the gate logs it, not counted."""
        for headers in (self.basic("alice", "wrong"), self.basic("mallory", "x"),
                        {"Authorization": "Bearer tok-0123456789abcdeX"}):
            with capturedLogs() as events:
                status, body = self.request(b"/healthz", headers)
            self.assertIn(b"200", status)
            self.assertEqual(body, b"anonymous")
            failures = [e for e in events if e.get("log_format", "").startswith("authentication failed")]
            self.assertEqual(len(failures), 1)
            self.assertIn("127.0.0.1", failures[0]["peer"])
        self.assertEqual(self.refused, [])

    def test_identify_good_credentials(self) -> None:
        """A good credential gives its Access, consoles and all, with no cookie set."""
        _, body = self.request(b"/healthz", self.basic("alice", "wonderland"))
        self.assertEqual(body, b"alice ro=False consoles=web-*,db1")
        _, body = self.request(b"/healthz", {"Authorization": "Bearer tok-readonly-0123456789"})
        self.assertEqual(body, b"token #2 ro=True consoles=vm?")
        client = WebClient(self.site, 5)
        client.send_raw(b"GET /healthz?token=tok-0123456789abcdef HTTP/1.1\r\nHost: x\r\n\r\n")
        response = client.transport.value()
        self.assertTrue(response.endswith(b"token #1 ro=False consoles=db1,web-*"))
        self.assertNotIn(b"set-cookie", response.lower())
        _, body = self.request(b"/healthz", {"Cookie": "cloud-console-token=tok-0123456789abcdef"})
        self.assertEqual(body, b"token #1 ro=False consoles=db1,web-*")
        self.assertEqual(self.built, [])


class _Identify(resource.Resource):
    """A resource outside the gate that only asks who is there (as /healthz does)."""

    isLeaf = True

    def __init__(self, gate: AuthGate) -> None:
        resource.Resource.__init__(self)
        self.gate = gate

    def render_GET(self, request: Request) -> Any:
        def answer(access: Access | None) -> None:
            body = b"anonymous"
            if access is not None:
                body = f"{access.name} ro={access.read_only} consoles={','.join(access.consoles)}".encode()
            request.setHeader(b"content-length", b"%d" % len(body))
            request.write(body)
            request.finish()

        self.gate.identify(request).addCallback(answer)
        return NOT_DONE_YET
