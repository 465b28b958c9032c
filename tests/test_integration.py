"""
End to end: a real C{cloud-console} process (and C{twistd cloudconsole}) on a real pty,
real WebSocket clients over 127.0.0.1, exit statuses.

Every wait is on a Deferred fired by an event (a message, a close, the process ending),
never a sleep; the class timeout is only a safety net.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any, Callable

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.trial.unittest import TestCase

from tests.helpers import ROOT, TWISTD, Server, free_port, spawn_python


class Client(WebSocketClientProtocol):  # type: ignore[misc]
    """Collects binary output; fires Deferreds when conditions on it hold."""

    def __init__(self) -> None:
        super().__init__()
        self.received = bytearray()
        self.text: list[str] = []
        self.opened: defer.Deferred[None] = defer.Deferred()
        self.closed: defer.Deferred[tuple[int | None, str | None]] = defer.Deferred()
        self._waiters: list[tuple[Callable[[bytes], bool], defer.Deferred[bytes]]] = []

    def onOpen(self) -> None:
        self.opened.callback(None)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self.received += payload
        else:
            self.text.append(payload.decode())
        self._check()

    def _check(self) -> None:
        for waiter in list(self._waiters):
            condition, d = waiter
            if condition(bytes(self.received)):
                self._waiters.remove(waiter)
                d.callback(bytes(self.received))

    def wait_for(self, condition: Callable[[bytes], bool]) -> defer.Deferred[bytes]:
        d: defer.Deferred[bytes] = defer.Deferred()
        self._waiters.append((condition, d))
        self._check()
        return d

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.opened.called:
            self.opened.errback(RuntimeError(f"not opened: {code} {reason}"))
        self.closed.callback((code, reason))


async def connect(port: int, host: str = "127.0.0.1") -> Client:
    url_host = f"[{host}]" if ":" in host else host
    factory = WebSocketClientFactory(f"ws://{url_host}:{port}/ws")
    factory.protocol = Client
    if ":" in host:
        endpoint: Any = TCP6ClientEndpoint(reactor, host, port)
    else:
        endpoint = TCP4ClientEndpoint(reactor, host, port)
    client: Client = await endpoint.connect(factory)
    await client.opened
    return client


class ConsoleProcessTests(TestCase):
    """The positional command on a real pty with real clients."""

    timeout = 60

    def setUp(self) -> None:
        self.master, slave = os.openpty()
        self.pty_path = os.ttyname(slave)
        self.addCleanup(os.close, slave)
        os.set_blocking(self.master, False)
        self.master_open = True
        self.addCleanup(self.close_master)
        self.port = free_port()
        self.log_path = os.path.abspath(self.mktemp())
        self.guest_input = bytearray()
        self.input_waiters: list[tuple[bytes, defer.Deferred[None]]] = []

    def close_master(self) -> None:
        if self.master_open:
            reactor.removeReader(self)  # type: ignore[attr-defined]
            os.close(self.master)
            self.master_open = False

    # The test is the guest's side: read the master through the reactor.
    def fileno(self) -> int:
        return self.master

    def doRead(self) -> None:
        try:
            self.guest_input += os.read(self.master, 65536)
        except OSError:
            return
        for waiter in list(self.input_waiters):
            if waiter[0] in self.guest_input:
                self.input_waiters.remove(waiter)
                waiter[1].callback(None)

    def logPrefix(self) -> str:
        return "guest"

    def connectionLost(self, reason: Any) -> None:
        pass

    def guest_receives(self, data: bytes) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self.input_waiters.append((data, d))
        return d

    def guest_writes(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.master, view) :]

    async def start_server(self, *extra: str) -> Server:
        server = spawn_python(["-m", "cloud_console.cli", self.pty_path, "127.0.0.1", str(self.port), self.log_path, *extra])
        self.addCleanup(self.stop_server, server)
        await server.listening
        reactor.addReader(self)  # type: ignore[attr-defined]
        return server

    async def stop_server(self, server: Server) -> None:
        if server.status is None:
            server.transport.signalProcess("KILL")  # type: ignore[union-attr]
            await server.ended

    async def test_history_live_input_log_and_exit_status(self) -> None:
        """
        The whole contract: history (no NUL padding) then live output to two clients,
        input from either reaching the pty, a byte-identical log file, and exit status 2
        with close frames when the guest side closes.
        """
        server = await self.start_server()
        early = b"\x1b[1mboot\x1b[0m \x00 \xff\r\n"
        self.guest_writes(early)
        first = await connect(self.port)
        await first.wait_for(lambda got: got == early)
        second = await connect(self.port)
        await second.wait_for(lambda got: got == early)
        live = "živý výstup\r\n".encode() * 100
        self.guest_writes(live)
        await first.wait_for(lambda got: got == early + live)
        await second.wait_for(lambda got: got == early + live)
        first.sendMessage(b"from first\r", isBinary=True)
        await self.guest_receives(b"from first\r")
        second.sendMessage("from second ✓\r".encode(), isBinary=False)
        await self.guest_receives("from second ✓\r".encode())
        self.close_master()
        codes = await defer.gatherResults([first.closed, second.closed])
        self.assertEqual([code for code, _ in codes], [4001, 4001])
        self.assertIn("hung up", codes[0][1])
        status = await server.ended
        self.assertEqual(status, 2)
        self.assertEqual(Path(self.log_path).read_bytes(), early + live)
        self.assertIn(b"exiting with status 2", server.stderr)

    async def test_history_capped(self) -> None:
        """With the head off, a new client gets exactly the last --history-size bytes."""
        await self.start_server("--history-size", "1000", "--head-size", "0")
        witness = await connect(self.port)
        data = bytes(i % 200 + 32 for i in range(5000))
        self.guest_writes(data)
        await witness.wait_for(lambda got: got == data)
        late = await connect(self.port)
        got = await late.wait_for(lambda got: len(got) >= 1000)
        self.assertEqual(got, data[-1000:])

    async def test_head_marker_tail(self) -> None:
        """
        With a head, a new client of the original protocol gets the boot's first bytes,
        one marker line for what is not sent, and the last --history-size bytes.
        """
        await self.start_server("--history-size", "1000", "--head-size", "300")
        witness = await connect(self.port)
        data = bytes(i % 200 + 32 for i in range(5000))
        self.guest_writes(data)
        await witness.wait_for(lambda got: got == data)
        late = await connect(self.port)
        expected = data[:300] + b"\r\n[... 3,700 bytes not kept ...]\r\n" + data[-1000:]
        got = await late.wait_for(lambda got: len(got) >= len(expected))
        self.assertEqual(got, expected)

    async def test_sigterm_closes_clients_exit_0(self) -> None:
        """SIGTERM closes every client with 1001 and the process exits 0."""
        server = await self.start_server()
        client = await connect(self.port)
        server.transport.signalProcess("TERM")  # type: ignore[union-attr]
        code, reason = await client.closed
        self.assertEqual(code, 1001)
        self.assertEqual(await server.ended, 0)

    async def test_sighup_reopens_log(self) -> None:
        """After the log is moved away, SIGHUP makes the server write a new one."""
        server = await self.start_server()
        client = await connect(self.port)
        self.guest_writes(b"before\r\n")
        await client.wait_for(lambda got: got.endswith(b"before\r\n"))
        os.rename(self.log_path, self.log_path + ".1")
        server.transport.signalProcess("HUP")  # type: ignore[union-attr]
        # The reopen is logged; wait for that line, then write more.
        while b"reopened" not in server.stderr:
            await self.next_stderr(server)
        self.guest_writes(b"after\r\n")
        await client.wait_for(lambda got: got.endswith(b"after\r\n"))
        server.transport.signalProcess("TERM")  # type: ignore[union-attr]
        await server.ended
        self.assertEqual(Path(self.log_path + ".1").read_bytes(), b"before\r\n")
        self.assertEqual(Path(self.log_path).read_bytes(), b"after\r\n")

    def next_stderr(self, server: Server) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        original = server.errReceived

        def received(data: bytes) -> None:
            server.errReceived = original  # type: ignore[method-assign]
            original(data)
            d.callback(None)

        server.errReceived = received  # type: ignore[method-assign]
        return d


class ExitStatusTests(TestCase):
    """Bad arguments exit 1 with a message; a pty that cannot be opened exits 2."""

    timeout = 60

    async def run_cli(self, *args: str) -> Server:
        server = spawn_python(["-m", "cloud_console.cli", *args])
        server.listening.addErrback(lambda f: None)
        await server.ended
        return server

    async def test_missing_arguments(self) -> None:
        """Fewer than three arguments: usage on stderr, status 1."""
        server = await self.run_cli("/dev/pts/0", "127.0.0.1")
        self.assertEqual(server.status, 1)
        self.assertIn(b"usage: cloud-console <path_to_pty> <bind_ip> <bind_port>", server.stderr)

    async def test_invalid_ip(self) -> None:
        """An invalid bind IP: status 1, naming it."""
        server = await self.run_cli("/dev/pts/0", "300.1.2.3", "8080")
        self.assertEqual(server.status, 1)
        self.assertIn(b"invalid bind_ip '300.1.2.3'", server.stderr)

    async def test_invalid_port(self) -> None:
        """An invalid port: status 1, naming it."""
        for port in ("http", "0", "70000"):
            server = await self.run_cli("/dev/pts/0", "127.0.0.1", port)
            self.assertEqual(server.status, 1, port)
            self.assertIn(f"invalid bind_port '{port}'".encode(), server.stderr)

    async def test_missing_pty(self) -> None:
        """A pty path that does not exist: status 2, naming it."""
        path = os.path.abspath(self.mktemp())
        server = await self.run_cli(path, "127.0.0.1", str(free_port()))
        self.assertEqual(server.status, 2)
        self.assertIn(f"cannot open {path}".encode(), server.stderr)

    async def test_not_a_tty(self) -> None:
        """A path that is not a terminal: status 2."""
        server = await self.run_cli("/dev/null", "127.0.0.1", str(free_port()))
        self.assertEqual(server.status, 2)
        self.assertIn(b"not a terminal", server.stderr)

    async def test_log_file_unwritable(self) -> None:
        """A log file that cannot be opened: status 2, naming it."""
        master, slave = os.openpty()
        self.addCleanup(os.close, master)
        self.addCleanup(os.close, slave)
        log = os.path.join(os.path.abspath(self.mktemp()), "missing-dir", "console.log")
        server = await self.run_cli(os.ttyname(slave), "127.0.0.1", str(free_port()), log)
        self.assertEqual(server.status, 2)
        self.assertIn(b"cannot open log file", server.stderr)

    async def test_ipv6(self) -> None:
        """An IPv6 bind address works."""
        try:
            port = free_port(socket.AF_INET6, "::1")
        except OSError:
            raise self.skipTest("no IPv6 loopback here") from None
        master, slave = os.openpty()
        self.addCleanup(os.close, master)
        self.addCleanup(os.close, slave)
        server = spawn_python(["-m", "cloud_console.cli", os.ttyname(slave), "::1", str(port)])
        await server.listening
        os.write(master, b"over v6")
        client = await connect(port, "::1")
        await client.wait_for(lambda got: got == b"over v6")
        server.transport.signalProcess("TERM")  # type: ignore[union-attr]
        self.assertEqual(await server.ended, 0)


class TwistdPluginTests(TestCase):
    """The twistd plugin lists its options, serves, and exits 2 when the console goes."""

    timeout = 60

    async def test_help_lists_options(self) -> None:
        """`twistd cloudconsole --help` lists every option."""
        server = spawn_python([*TWISTD, "cloudconsole", "--help"])
        server.listening.addErrback(lambda f: None)
        await server.ended
        for option in (b"--pty", b"--port", b"--log-file", b"--history-size",
                       b"--client-buffer", b"--static-dir", b"--no-raw"):
            self.assertIn(option, server.stderr)

    async def test_serves_and_exits_2_on_hangup(self) -> None:
        """The plugin serves the console, and exits 2 when the pty hangs up."""
        master, slave = os.openpty()
        self.addCleanup(os.close, slave)
        port = free_port()
        pidfile = os.path.abspath(self.mktemp())
        server = spawn_python([*TWISTD, "--pidfile", pidfile, "-n", "cloudconsole",
                        "--pty", os.ttyname(slave), "--port", f"tcp:{port}:interface=127.0.0.1"])
        await server.listening
        os.write(master, b"via twistd")
        client = await connect(port)
        await client.wait_for(lambda got: got == b"via twistd")
        os.close(master)
        code, reason = await client.closed
        self.assertEqual(code, 4001)
        self.assertEqual(await server.ended, 2)

    async def test_bad_pty_exits_2(self) -> None:
        """A pty that cannot be opened ends twistd with status 2 and a message."""
        pidfile = os.path.abspath(self.mktemp())
        server = spawn_python([*TWISTD, "--pidfile", pidfile, "-n", "cloudconsole",
                        "--pty", "/dev/null", "--port", f"tcp:{free_port()}:interface=127.0.0.1"])
        server.listening.addErrback(lambda f: None)
        self.assertEqual(await server.ended, 2)
        self.assertIn(b"not a terminal", server.stderr)


class DemoTests(TestCase):
    """`cloud-console --demo` serves a local shell on a fresh pty."""

    timeout = 60

    async def test_demo_shell(self) -> None:
        """Typing a command in a client runs it in the demo shell, and its output comes back."""
        port = free_port()
        process = Server()
        env = dict(os.environ, SHELL="/bin/sh", PYTHONPATH=str(ROOT))
        reactor.spawnProcess(  # type: ignore[attr-defined]
            process, sys.executable,
            [sys.executable, "-m", "cloud_console.cli", "--demo", "127.0.0.1", str(port)],
            env=env, path=str(ROOT),
        )
        await process.listening
        client = await connect(port)
        client.sendMessage(b"echo $((6*7))x\r", isBinary=True)
        await client.wait_for(lambda got: b"42x" in got)
        client.sendMessage(b"exit\r", isBinary=True)
        code, reason = await client.closed
        self.assertEqual(code, 4001)
        self.assertEqual(await process.ended, 2)
