"""
contrib/nginx/cloud-console.conf for real: Debian's nginx in front of two cloud-console
processes standing for two hosts, and Debian's Chromium opening console links through it.

The nginx configuration is the shipped file itself, with only what a machine-local run
must change substituted (listen ports, certificate, access log, the host list, the
redirect's port); each substitution must match exactly once, so a change to the shipped
file that the test no longer understands fails here instead of testing something else.
nginx runs unprivileged paths only (-p PREFIX, its own pid file, temp paths and logs in
the test's directory) and in the foreground.

Waits are on events: Playwright predicates in the page, bytes on a pty (with deadlines),
the server's and nginx's log lines. No sleeps.
"""

from __future__ import annotations

import base64
import os
import re
import socket
import ssl
import subprocess
import threading
import http.client
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest

from tests.helpers import free_port, handshake, write_self_signed
from tests.test_browser import SHOWS_TEXT, BrowserHarness, ConsoleServer, Guest, Watched

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
        site = directory / "cloud-console.conf"
        site.write_text(site_config(directory, self.https_port, self.http_port, hosts))
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
            + f"    include {site};\n"
            "}\n"
        )
        self.access_log = directory / "access.log"
        self.error_log = directory / "error.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._started = threading.Event()
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
                    # The master logs this once its sockets are bound and workers forked.
                    if b"start worker process" in line:
                        self._started.set()
            self._started.set()

        self._reader = threading.Thread(target=copy_log, args=(self.process.stderr,), daemon=True)
        self._reader.start()
        self._started.wait(30)
        if self.process.poll() is not None or not self._started.is_set():
            self.stop()
            raise AssertionError(f"nginx did not start:\n{self.error_log.read_text()}")

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
    guest side the test holds), with credentials of its own, restartable on its port.
    """

    def __init__(self, test: NginxFleetTests, name: str, consoles: list[str]) -> None:
        self.test = test
        self.name = name
        self.port = free_port()
        self.guests = {console: Guest() for console in consoles}
        for guest in self.guests.values():
            test.addCleanup(guest.hang_up)
        self.log = test.tmp / f"{name}.log"
        # Each host its own credential: a link for one host must not open the other.
        self.token = base64.urlsafe_b64encode(os.urandom(24)).decode().rstrip("=")
        tokens = test.tmp / f"{name}.tokens"
        tokens.write_text(f"{self.token}\n")
        self.options = ["--token-file", str(tokens)]
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

    def link(self, nginx: Nginx, console: str | None = None) -> str:
        """The public URL that opens C{console} (C{None}: the host's index) through nginx."""
        path = f"c/{console}/" if console else ""
        return f"{nginx.origin}/h/{self.name}/{path}?token={self.token}"

    @property
    def bearer(self) -> str:
        return self.token

    def refusals(self) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if REFUSED_ORIGIN in line]


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
        A link to vm1 on each host, through nginx: each page shows its own guest's output,
        typing reaches its own pty only (the two consoles share a name), the origin check
        passed on both hosts without --allow-origin, each host's cookie is its own, and
        no credential reaches nginx's access log.
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
        for watched in (page_a, page_b):
            self.assertEqual(watched.state()["lastStatus"], "connected")
            self.assertEqual(watched.errors, [])
            self.assertEqual(
                [u for u in watched.requests if not u.startswith(self.nginx.origin + "/h/")], []
            )

        cookies = {c["path"]: c for c in self.browser().cookies()}
        self.assertEqual(sorted(cookies), ["/h/host-a/", "/h/host-b/"])
        for cookie in cookies.values():
            self.assertTrue(cookie["secure"] and cookie["httpOnly"], cookie)
            self.assertEqual(cookie["sameSite"], "Strict")

        access = self.nginx.access_log.read_text()
        # (A WebSocket is logged when it ends: these are the pages' loads, over HTTP/2.)
        self.assertIn('"GET /h/host-a/c/vm1/ HTTP/2.0" 200', access)
        self.assertIn("upstream=127.0.0.1:%d" % self.host_b.port, access)
        for host in (self.host_a, self.host_b):
            self.assertNotIn(host.bearer, access)

        shot = self.tmp / "host-a-vm1.png"
        page_a.page.screenshot(path=str(shot))
        print(f"\nscreenshot: {shot}")

    def test_index_of_a_host(self) -> None:
        """
        /h/HOST/ is that host's index (its relative URLs resolve under the prefix): it
        lists the host's consoles, and choosing one opens it under the same prefix.
        """
        self.host_a.guests["vm2"].print("vm2 on host-a here")
        index = self.browser().new_page()
        index.goto(self.host_a.link(self.nginx))
        index.wait_for_function(INDEX_ROWS, arg=["vm1", "vm2"])
        index.keyboard.type("vm2")
        index.keyboard.press("Enter")
        index.wait_for_url(f"{self.nginx.origin}/h/host-a/c/vm2/")
        index.wait_for_function(SHOWS_TEXT, arg="vm2 on host-a here")
        shot = self.tmp / "index.png"
        index.go_back()
        index.wait_for_function(INDEX_ROWS, arg=["vm1", "vm2"])
        index.screenshot(path=str(shot))
        print(f"\nscreenshot: {shot}")

    def test_restart_of_one_host(self) -> None:
        """
        host-a's process is killed and started again on its port: its page reconnects by
        itself (through nginx, with host-a's cookie although host-b's link was opened
        after it) and shows the new output; host-b's page works all along.
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
        self.assertEqual(self.host_a.refusals(), [])
        # The reconnect carried host-a's own cookie: no credential was refused there.
        self.assertNotIn("authentication failed", self.host_a.log.read_text())
        self.assertNotIn("no credentials", self.host_a.log.read_text())
        shot = self.tmp / "restarted.png"
        page_a.page.screenshot(path=str(shot))
        print(f"\nscreenshot: {shot}")

    def test_origin_check_needs_the_forwarded_host(self) -> None:
        """
        The proxy is what makes the origin check pass: the page's origin sent straight to
        a host (no X-Forwarded-Host) is refused 403, as is a foreign origin; through nginx
        the page's origin is accepted and another port of the same name is refused.
        """
        host, nginx = self.host_a, self.nginx
        path = "/c/vm1/ws"
        self.assertEqual(upgrade_status(host.port, path, nginx.origin, host.bearer, False), 403)
        self.assertEqual(upgrade_status(host.port, path, "https://evil.example", host.bearer, False), 403)
        self.assertEqual(len(host.refusals()), 2)
        # What nginx adds, added by hand: accepted (so it is the header that decides).
        self.assertEqual(
            upgrade_status(
                host.port, path, nginx.origin, host.bearer, False,
                {"X-Forwarded-Host": f"127.0.0.1:{nginx.https_port}"},
            ),
            101,
        )

        proxied = f"/h/{host.name}{path}"
        self.assertEqual(upgrade_status(nginx.https_port, proxied, nginx.origin, host.bearer, True), 101)
        other_port = f"https://127.0.0.1:{nginx.http_port}"
        self.assertEqual(upgrade_status(nginx.https_port, proxied, other_port, host.bearer, True), 403)
        self.assertEqual(
            upgrade_status(nginx.https_port, proxied, "https://evil.example", host.bearer, True), 403
        )
        self.assertEqual(len(host.refusals()), 4)
        # host-b's credential does not open host-a's console.
        self.assertEqual(
            upgrade_status(nginx.https_port, proxied, nginx.origin, self.host_b.bearer, True), 401
        )

    def test_routes_and_headers(self) -> None:
        """
        Plain HTTP redirects to HTTPS; an unknown host and anything outside /h/ is 404;
        /h/HOST and a host's own redirects stay under the prefix; the server's security
        headers arrive once, with HSTS added.
        """
        nginx, host = self.nginx, self.host_a
        plain = http.client.HTTPConnection("127.0.0.1", nginx.http_port, timeout=15)
        plain.request("GET", "/h/host-a/c/vm1/?x=1")
        response = plain.getresponse()
        self.assertEqual(response.status, 301)
        self.assertEqual(
            response.getheader("location"), f"https://127.0.0.1:{nginx.https_port}/h/host-a/c/vm1/?x=1"
        )
        plain.close()

        auth = {"Authorization": f"Bearer {host.bearer}"}
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
        api = https_get(
            nginx.https_port, "/h/host-b/api/consoles", {"Authorization": f"Bearer {self.host_b.bearer}"}
        )
        self.assertEqual(api.status, 200)
