"""
contrib/nginx/cloud-console.conf for real: Debian's nginx in front of two cloud-console
processes standing for two hosts, and Debian's Chromium opening console links through it.

The nginx configuration is the shipped file itself, with only what a machine-local run
must change substituted (listen ports, certificate, access log, the host list, the
redirect's port); each substitution must match exactly once, so a change to the shipped
file that the test no longer understands fails here instead of testing something else.
nginx needs no root paths (-p PREFIX, its own pid file, temp paths and logs in the test's
directory) and runs in the foreground.

The consoles are opened with signed links from cloud-console-link, minted per host (each
host has its own secret). Waits are on events: Playwright predicates in the page, bytes
on a pty (with deadlines), the server's and nginx's log lines; the one sleep is the
expired link's wait for the clock (see test_expired_link_refused).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest

from cloud_console.access.links import LEEWAY
from tests.helpers import ThreadedGuest, free_port, handshake, write_self_signed
from tests.test_browser import SHOWS_TEXT, BrowserHarness, ConsoleServer, Watched

ROOT = Path(__file__).resolve().parent.parent
NGINX = "/usr/sbin/nginx"
SHIPPED = ROOT / "contrib" / "nginx" / "cloud-console.conf"
REFUSED_ORIGIN = "refused WebSocket from"
INDEX_ROWS = """names => {
    const hook = window.cloudConsoleIndex;
    return Boolean(hook) && JSON.stringify(hook.state().rows) === JSON.stringify(names);
}"""


def substitute(text: str, pattern: str, replacement: str, flags: int = 0) -> str:
    """C{pattern} replaced once; an error unless it matches exactly once."""
    result, count = re.subn(pattern, lambda _: replacement, text, flags=flags)
    if count != 1:
        raise AssertionError(
            f"{pattern!r} matched {count} times in {SHIPPED} (expected once): "
            "the test no longer knows how to run the shipped file"
        )
    return result


def site_config(
    directory: Path, https_port: int, http_port: int, hosts: dict[str, int]
) -> str:
    """The shipped configuration, for this machine: loopback ports, a fresh certificate."""
    key, cert, _ = write_self_signed(directory / "tls")
    text = SHIPPED.read_text()
    # IPv6 listeners are left out (a container may have no ::1); the IPv4 ones move to
    # loopback ports.
    text = substitute(text, r"\n *listen \[::\]:80;", "")
    text = substitute(text, r"\n *listen \[::\]:443 ssl http2;", "")
    text = substitute(text, r"listen 80;", f"listen 127.0.0.1:{http_port};")
    text = substitute(text, r"listen 443 ssl http2;", f"listen 127.0.0.1:{https_port} ssl http2;")
    text = substitute(text, r"ssl_certificate +\S+;", f"ssl_certificate {cert};")
    text = substitute(text, r"ssl_certificate_key +\S+;", f"ssl_certificate_key {key};")
    # The redirect to https names no port (443); here it is another.
    text = substitute(
        text, r"return 301 https://\$host\$request_uri;",
        f"return 301 https://$host:{https_port}$request_uri;",
    )
    text, logs = re.subn(
        r"access_log /var/log/nginx/cloud-console\.access\.log",
        f"access_log {directory}/access.log",
        text,
    )
    assert logs == 2, f"{logs} access_log lines in {SHIPPED}"
    # The host list: the shipped examples out, this test's two "hosts" in.
    head = 'map $cloud_console_host $cloud_console_backend {\n    default     "";\n'
    text = substitute(
        text, re.escape(head) + r"(?: *[a-z0-9.-]+ +\S+;\n)+",
        head + "".join(f"    {name} 127.0.0.1:{port};\n" for name, port in hosts.items()),
    )
    return text


class Nginx:
    """
    Debian's nginx in the foreground with the shipped configuration, its error log on
    stderr (kept in a file and watched), everything it writes in C{directory}.
    """

    def __init__(self, directory: Path, hosts: dict[str, int]) -> None:
        self.directory = directory
        self.https_port = free_port()
        self.http_port = free_port()
        directory.mkdir(parents=True, exist_ok=True)
        self.site = directory / "cloud-console.conf"
        self.site.write_text(site_config(directory, self.https_port, self.http_port, hosts))
        temp = directory / "temp"
        temp.mkdir()
        temp.chmod(0o777)  # workers (as nobody when the test runs as root) may write here
        self.conf = directory / "nginx.conf"
        self.conf.write_text(
            f"pid {directory}/nginx.pid;\n"
            "error_log stderr notice;\n"
            "worker_processes 1;\n"
            "events { worker_connections 512; }\n"
            "http {\n"
            + "".join(
                f"    {kind}_temp_path {temp}/{kind};\n"
                for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
            )
            + f"    include {self.site};\n"
            "}\n"
        )
        self.access_log = directory / "access.log"
        self.error_log = directory / "error.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._started = threading.Event()
        self._events: list[bytes] = []
        self._workers_changed = threading.Condition()
        self._reader: threading.Thread | None = None

    def check(self) -> str:
        """C{nginx -t} on the configuration; its output."""
        done = subprocess.run(
            [NGINX, "-t", "-p", str(self.directory), "-c", str(self.conf)],
            capture_output=True, text=True, timeout=30,
        )
        if done.returncode != 0:
            raise AssertionError(f"nginx -t refused the configuration:\n{done.stderr}")
        return done.stderr

    def start(self) -> None:
        self.process = subprocess.Popen(
            [NGINX, "-p", str(self.directory), "-c", str(self.conf), "-g", "daemon off;"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

        def copy_log(stream: Any) -> None:
            with self.error_log.open("ab") as log:
                for line in stream:
                    log.write(line)
                    log.flush()
                    # The master logs this once its sockets are bound and a worker forked
                    # (at the start, and again at each reload).
                    if b"start worker process " in line:
                        self._started.set()
                    # At a reload, an old worker logs this as it stops accepting (it
                    # closes its listening sockets next, and keeps its open connections).
                    if b"start worker process " in line or b"gracefully shutting down" in line:
                        with self._workers_changed:
                            self._events.append(line)
                            self._workers_changed.notify_all()
            self._started.set()

        self._reader = threading.Thread(target=copy_log, args=(self.process.stderr,), daemon=True)
        self._reader.start()
        self._started.wait(30)
        if self.process.poll() is not None or not self._started.is_set():
            self.stop()
            raise AssertionError(f"nginx did not start:\n{self.error_log.read_text()}")

    def reload(self, hosts: dict[str, int]) -> None:
        """
        The host list changed, as an operator adds a host: the site rewritten, checked,
        and SIGHUP to the master; returns once the new worker has started.
        """
        assert self.process is not None
        self.site.write_text(site_config(self.directory, self.https_port, self.http_port, hosts))
        self.check()
        def count(what: bytes) -> int:
            return sum(what in line for line in self._events)

        with self._workers_changed:
            started, stopping = count(b"start worker"), count(b"gracefully")
            self.process.send_signal(signal.SIGHUP)
            if not self._workers_changed.wait_for(
                lambda: count(b"start worker") > started and count(b"gracefully") > stopping, 30
            ):
                raise AssertionError(f"nginx did not reload:\n{self.error_log.read_text()}")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()  # SIGTERM: nginx's fast shutdown
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self._reader is not None:
            self._reader.join(10)
        self.process = None

    @property
    def origin(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"


class Host:
    """
    One "host": a cloud-console process serving its consoles (each a real pty whose
    guest side the test holds), with a link secret and a token file of its own (a link
    or token for one host opens nothing on the other), restartable on its port.
    """

    def __init__(self, test: NginxFleetTests, name: str, consoles: list[str]) -> None:
        self.test = test
        self.name = name
        self.port = free_port()
        self.guests = {console: ThreadedGuest() for console in consoles}
        for guest in self.guests.values():
            test.addCleanup(guest.hang_up)
        self.log = test.tmp / f"{name}.log"
        self.secret = test.tmp / f"{name}.secret"
        self.secret.touch(0o600)
        self.secret.write_bytes(os.urandom(32))
        # An operator's long-lived bearer token, beside the links.
        self.token = base64.urlsafe_b64encode(os.urandom(24)).decode().rstrip("=")
        tokens = test.tmp / f"{name}.tokens"
        tokens.write_text(f"{self.token}\n")
        self.options = ["--link-secret", str(self.secret), "--token-file", str(tokens)]
        for console, guest in self.guests.items():
            self.options += ["--console", f"{console}={guest.path}"]
        self.server: ConsoleServer | None = None

    def start(self) -> None:
        self.server = ConsoleServer(None, self.port, self.log, *self.options)
        self.server.start()
        self.test.addCleanup(self.server.stop)

    def kill(self) -> None:
        """SIGKILL, as a host that crashed or lost power: nothing is closed cleanly."""
        assert self.server is not None and self.server.process is not None
        self.server.process.kill()
        self.server.stop()

    def base(self, nginx: Nginx) -> str:
        return f"{nginx.origin}/h/{self.name}/"

    def link(self, nginx: Nginx, console: str, ttl: int = 600) -> str:
        """
        A signed link to C{console} (C{*}: the index) through nginx, printed by
        cloud-console-link as a control plane would call it.
        """
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        done = subprocess.run(
            [
                sys.executable, "-m", "cloud_console.access.links", "--secret", str(self.secret),
                "--console", console, "--ttl", str(ttl), "--user", "alice",
                "--base", self.base(nginx),
            ],
            capture_output=True, text=True, env=env, cwd=ROOT, timeout=30,
        )
        if done.returncode != 0:
            raise AssertionError(f"cloud-console-link failed: {done.stderr}")
        url = done.stdout.strip()
        expected = self.base(nginx) + ("" if console == "*" else f"c/{console}/") + "?token="
        assert url.startswith(expected), url
        return url

    @staticmethod
    def token_of(url: str) -> str:
        return url.partition("?token=")[2]

    def refusals(self) -> list[str]:
        """The origin refusals logged so far."""
        assert self.server is not None
        return self.server.lines_with(REFUSED_ORIGIN)

    def wait_for_log(self, text: str, count: int = 1) -> list[str]:
        """The lines with C{text}, once C{count} of them have reached the log."""
        assert self.server is not None
        return self.server.wait_for_log(text, count)


def upgrade_status(
    port: int, path: str, origin: str, bearer: str, tls: bool, extra: dict[str, str] | None = None
) -> int:
    """The status of a raw WebSocket upgrade (a browser's, with C{origin}) to 127.0.0.1:C{port}."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=15)
    sock: socket.socket = raw
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        sock = context.wrap_socket(raw, server_hostname="localhost")
    with sock:
        headers = {"Authorization": f"Bearer {bearer}", **(extra or {})}
        sock.sendall(
            handshake(path, ["cloud-console.v1"], origin, f"127.0.0.1:{port}", headers)
        )
        head = b""
        while b"\r\n" not in head:
            data = sock.recv(4096)
            if not data:
                break
            head += data
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", head)
    assert match, f"not an HTTP response: {head!r}"
    return int(match.group(1))


def https_get(port: int, path: str, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=15, context=context)
    connection.request("GET", path, headers=headers or {})
    response = connection.getresponse()
    response.read()
    connection.close()
    return response


class NginxFleetTests(BrowserHarness):
    """Two hosts behind the shipped nginx configuration, in Chromium."""

    def setUp(self) -> None:
        super().setUp()
        if not os.access(NGINX, os.X_OK):
            raise SkipTest(f"{NGINX} is missing (tests/run.sh installs Debian's nginx)")
        self.host_a = Host(self, "host-a", ["vm1", "vm2"])
        self.host_b = Host(self, "host-b", ["vm1"])
        for host in (self.host_a, self.host_b):
            host.start()
        self.nginx = Nginx(
            self.tmp / "nginx", {h.name: h.port for h in (self.host_a, self.host_b)}
        )
        self.nginx.check()
        self.nginx.start()
        self.addCleanup(self.nginx.stop)

    def open_console(self, host: Host, console: str) -> Watched:
        watched = self.open_page(host.link(self.nginx, console))
        self.assertEqual(
            watched.sockets, [f"wss://127.0.0.1:{self.nginx.https_port}/h/{host.name}/c/{console}/ws"]
        )
        return watched

    def test_a_console_on_each_host(self) -> None:
        """
        A signed link to vm1 on each host, through nginx: each page shows its own guest's
        output, typing reaches its own pty only (the two consoles share a name), the
        origin check passed on both hosts without --allow-origin, each link's cookie is
        its own, and no link reaches nginx's access log.
        """
        a, b = self.host_a.guests["vm1"], self.host_b.guests["vm1"]
        a.print("host-a vm1 booted", "host-a login: ")
        b.print("host-b vm1 booted", "host-b login: ")
        page_a = self.open_console(self.host_a, "vm1")
        page_b = self.open_console(self.host_b, "vm1")
        page_a.wait_for_text("host-a login:")
        page_b.wait_for_text("host-b login:")
        self.assertFalse(page_a.page.evaluate(SHOWS_TEXT, "host-b"))
        self.assertFalse(page_b.page.evaluate(SHOWS_TEXT, "host-a"))

        page_a.page.click("#terminal")
        page_a.page.keyboard.type("root typed on a\r")
        a.wait_for_input(b"root typed on a\r")
        page_b.page.click("#terminal")
        page_b.page.keyboard.type("admin typed on b\r")
        b.wait_for_input(b"admin typed on b\r")
        self.assertNotIn(b"typed on b", bytes(a.received))
        self.assertNotIn(b"typed on a", bytes(b.received))
        a.print("", "Password: ")
        page_a.wait_for_text("Password:")

        # The WebSockets were upgraded by the hosts themselves: Origin https://127.0.0.1:P
        # matched the X-Forwarded-Host nginx set, not the Host (the host's own address).
        for host in (self.host_a, self.host_b):
            self.assertEqual(host.refusals(), [])
            self.assertIn("client attached", host.log.read_text())
            self.assertIn("alice", host.log.read_text())  # the link's sub, logged
        for watched in (page_a, page_b):
            self.assertEqual(watched.state()["lastStatus"], "connected")
            self.assertEqual(watched.errors, [])
            self.assertEqual(
                [u for u in watched.requests if not u.startswith(self.nginx.origin + "/h/")], []
            )

        # A link's cookie has no Path: the browser scopes it to the console's directory
        # as it sees it, prefix included; Secure added by nginx (the host speaks HTTP).
        cookies = {c["path"]: c for c in self.browser().cookies()}
        self.assertEqual(sorted(cookies), ["/h/host-a/c/vm1", "/h/host-b/c/vm1"])
        for cookie in cookies.values():
            self.assertTrue(cookie["secure"] and cookie["httpOnly"], cookie)
            self.assertEqual(cookie["sameSite"], "Strict")

        access = self.nginx.access_log.read_text()
        # (A WebSocket is logged when it ends: these are the pages' loads, over HTTP/2.)
        self.assertIn('"GET /h/host-a/c/vm1/ HTTP/2.0" 200', access)
        self.assertIn("upstream=127.0.0.1:%d" % self.host_b.port, access)
        self.assertNotIn("token=", access)
        for cookie in cookies.values():
            self.assertNotIn(cookie["value"], access)

        shot = self.tmp / "host-a-vm1.png"
        page_a.page.screenshot(path=str(shot))
        print(f"\nscreenshot: {shot}")

    def test_index_of_a_host(self) -> None:
        """
        /h/HOST/ is that host's index (its relative URLs resolve under the prefix): a link
        for every console there lists the host's consoles, and choosing one opens it
        under the same prefix.
        """
        self.host_a.guests["vm2"].print("vm2 on host-a here")
        index = self.browser().new_page()
        index.goto(self.host_a.link(self.nginx, "*"))
        index.wait_for_function(INDEX_ROWS, arg=["vm1", "vm2"])
        index.keyboard.type("vm2")
        index.keyboard.press("Enter")
        index.wait_for_url(f"{self.nginx.origin}/h/host-a/c/vm2/")
        index.wait_for_function(SHOWS_TEXT, arg="vm2 on host-a here")
        index.go_back()
        index.wait_for_function(INDEX_ROWS, arg=["vm1", "vm2"])
        shot = self.tmp / "index.png"
        index.screenshot(path=str(shot))
        print(f"\nscreenshot: {shot}")

    def test_token_cookies_per_host(self) -> None:
        """
        A --token-file token's cookie is Path=/ on its host; nginx scopes it to /h/HOST/,
        so host-b's token opened after host-a's does not replace it: host-a's index,
        loaded again without a token, still gets in.
        """
        index = self.browser().new_page()
        for host in (self.host_a, self.host_b):
            index.goto(f"{host.base(self.nginx)}?token={host.token}")
            index.wait_for_function(INDEX_ROWS, arg=sorted(host.guests))
        self.assertEqual(
            sorted(c["path"] for c in self.browser().cookies()), ["/h/host-a/", "/h/host-b/"]
        )
        response = index.goto(self.host_a.base(self.nginx))
        assert response is not None
        self.assertEqual(response.status, 200)
        index.wait_for_function(INDEX_ROWS, arg=["vm1", "vm2"])
        self.assertNotIn("authentication failed", self.host_a.log.read_text())

    def test_adding_a_host_is_a_reload(self) -> None:
        """
        A host added to the map and nginx reloaded (SIGHUP): the new name routes, and a
        console page open through nginx all along is not cut (its WebSocket stays on the
        old worker until it ends) and still types into its pty.
        """
        nginx, a, b = self.nginx, self.host_a, self.host_b
        page_a = self.open_console(a, "vm1")
        # host-c: host-b's process under a second name, standing for a new host.
        self.assertEqual(https_get(nginx.https_port, "/h/host-c/api/consoles").status, 404)
        nginx.reload({a.name: a.port, b.name: b.port, "host-c": b.port})
        response = https_get(nginx.https_port, "/h/host-c/api/consoles")
        self.assertEqual(response.status, 401)  # host-b's cloud-console answered
        self.assertEqual(response.getheader("www-authenticate"), "Bearer")

        a.guests["vm1"].print("after the reload")
        page_a.wait_for_text("after the reload")
        page_a.page.click("#terminal")
        page_a.page.keyboard.type("still typing")
        a.guests["vm1"].wait_for_input(b"still typing")
        state = page_a.state()
        self.assertEqual((state["connects"], state["connected"]), (1, True))

    def test_restart_of_one_host(self) -> None:
        """
        host-a's process is killed and started again on its port: its page reconnects by
        itself (through nginx, with its link's cookie) and shows the new output; host-b's
        page works all along.
        """
        a, b = self.host_a.guests["vm1"], self.host_b.guests["vm1"]
        page_a = self.open_console(self.host_a, "vm1")
        page_b = self.open_console(self.host_b, "vm1")
        a.print("before the restart")
        page_a.wait_for_text("before the restart")

        self.host_a.kill()
        page_a.wait_for("() => !window.cloudConsole.state().connected")
        # host-b meanwhile: output and input both ways.
        b.print("host-b still here")
        page_b.wait_for_text("host-b still here")
        page_b.page.click("#terminal")
        page_b.page.keyboard.type("while a is down")
        b.wait_for_input(b"while a is down")
        self.assertTrue(page_b.state()["connected"])

        self.host_a.start()
        a.print("after the restart")
        page_a.wait_for("() => window.cloudConsole.state().connects === 2", timeout=30_000)
        page_a.wait_for_text("after the restart")
        page_a.page.click("#terminal")
        page_a.page.keyboard.type("back on a")
        a.wait_for_input(b"back on a")
        self.assertNotIn(b"back on a", bytes(b.received))
        self.assertEqual(page_b.state()["connects"], 1)
        self.assertTrue(page_b.state()["connected"])
        self.assertEqual(self.host_a.refusals(), [])
        self.assertNotIn("authentication failed", self.host_a.log.read_text())
        shot = self.tmp / "restarted.png"
        page_a.page.screenshot(path=str(shot))
        print(f"\nscreenshot: {shot}")

    def test_expired_link_refused(self) -> None:
        """
        A link minted with --ttl 1 opens nothing once it has expired: the page is 401
        through nginx and the host logs why; a fresh link for the same console opens it;
        one host's link opens nothing on the other (its own secret).
        """
        expiring = self.host_a.link(self.nginx, "vm1", ttl=1)
        token = self.host_a.token_of(expiring)
        payload = token.split(".")[1]
        exp = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"]
        # The one wait on time in this module: expiry is a matter of the clock, and the
        # server accepts a link for LEEWAY seconds past its exp (for hosts whose clocks
        # differ from the control plane's), so nothing but the clock passing that point
        # can make it expire. One second more, as exp is in whole seconds.
        time.sleep(max(0.0, exp + LEEWAY + 1 - time.time()))

        page = self.browser().new_page()
        response = page.goto(expiring)
        assert response is not None
        self.assertEqual(response.status, 401)
        self.assertNotIn("expired", page.content())  # the reason is for the log only
        self.host_a.wait_for_log("signed link for alice has expired")
        self.assertEqual(
            upgrade_status(self.nginx.https_port, "/h/host-a/c/vm1/ws", self.nginx.origin, token, True),
            401,
        )
        self.assertEqual(self.browser().cookies(), [])

        # host-a's link on host-b: a wrong signature there.
        fresh = self.host_a.link(self.nginx, "vm1")
        response = page.goto(fresh.replace("/h/host-a/", "/h/host-b/"))
        assert response is not None
        self.assertEqual(response.status, 401)
        self.host_b.wait_for_log("wrong signature")

        self.host_a.guests["vm1"].print("a fresh link works")
        watched = self.open_page(fresh)
        watched.wait_for_text("a fresh link works")

    def test_origin_check_needs_the_forwarded_host(self) -> None:
        """
        The proxy is what makes the origin check pass: the page's origin sent straight to
        a host (no X-Forwarded-Host) is refused 403, as is a foreign origin; through nginx
        the page's origin is accepted and another port of the same name is refused.
        """
        host, nginx = self.host_a, self.nginx
        bearer = host.token_of(host.link(nginx, "vm1"))
        path = "/c/vm1/ws"
        self.assertEqual(upgrade_status(host.port, path, nginx.origin, bearer, False), 403)
        self.assertEqual(upgrade_status(host.port, path, "https://evil.example", bearer, False), 403)
        self.assertEqual(len(host.wait_for_log(REFUSED_ORIGIN, 2)), 2)
        # What nginx adds, added by hand: accepted (so it is the header that decides).
        self.assertEqual(
            upgrade_status(
                host.port, path, nginx.origin, bearer, False,
                {"X-Forwarded-Host": f"127.0.0.1:{nginx.https_port}"},
            ),
            101,
        )

        proxied = f"/h/{host.name}{path}"
        self.assertEqual(upgrade_status(nginx.https_port, proxied, nginx.origin, bearer, True), 101)
        other_port = f"https://127.0.0.1:{nginx.http_port}"
        self.assertEqual(upgrade_status(nginx.https_port, proxied, other_port, bearer, True), 403)
        self.assertEqual(upgrade_status(nginx.https_port, proxied, "https://evil.example", bearer, True), 403)
        self.assertEqual(len(host.wait_for_log(REFUSED_ORIGIN, 4)), 4)

    def test_routes_and_headers(self) -> None:
        """
        Plain HTTP redirects to HTTPS; an unknown host and anything outside /h/ is 404;
        /h/HOST and a host's own redirects stay under the prefix; the server's security
        headers arrive once, with HSTS added.
        """
        nginx = self.nginx
        plain = http.client.HTTPConnection("127.0.0.1", nginx.http_port, timeout=15)
        plain.request("GET", "/h/host-a/c/vm1/?x=1")
        response = plain.getresponse()
        self.assertEqual(response.status, 301)
        self.assertEqual(
            response.getheader("location"), f"https://127.0.0.1:{nginx.https_port}/h/host-a/c/vm1/?x=1"
        )
        plain.close()

        def bearer(host: Host) -> dict[str, str]:
            return {"Authorization": f"Bearer {host.token_of(host.link(nginx, '*'))}"}

        auth = bearer(self.host_a)
        self.assertEqual(https_get(nginx.https_port, "/h/nowhere/c/vm1/", auth).status, 404)
        self.assertEqual(https_get(nginx.https_port, "/c/vm1/", auth).status, 404)
        self.assertEqual(https_get(nginx.https_port, "/h/", auth).status, 404)
        self.assertEqual(https_get(nginx.https_port, "/h/host-a/c/vm1/").status, 401)

        bare = https_get(nginx.https_port, "/h/host-a", auth)
        self.assertEqual((bare.status, bare.getheader("location")), (301, "/h/host-a/"))
        slashless = https_get(nginx.https_port, "/h/host-a/c/vm1", auth)
        self.assertEqual(slashless.status, 302)
        self.assertEqual(slashless.getheader("location"), "/h/host-a/c/vm1/")

        page = https_get(nginx.https_port, "/h/host-a/c/vm1/", auth)
        self.assertEqual(page.status, 200)
        self.assertEqual(len(page.headers.get_all("content-security-policy") or []), 1)
        self.assertIn("frame-ancestors 'none'", page.getheader("content-security-policy") or "")
        self.assertEqual(page.getheader("x-frame-options"), "DENY")
        self.assertEqual(page.getheader("strict-transport-security"), "max-age=63072000")
        api = https_get(nginx.https_port, "/h/host-b/api/consoles", bearer(self.host_b))
        self.assertEqual(api.status, 200)
