"""
TLS through an endpoint description: a real server on C{ssl:...} with a generated
self-signed certificate, a real client over C{wss:} verifying it (service-identity).
"""

from __future__ import annotations

import os
from pathlib import Path

from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import reactor, ssl
from twisted.internet.endpoints import SSL4ClientEndpoint
from twisted.trial.unittest import TestCase

from .helpers import TWISTD, free_port, spawn_python, write_self_signed
from .test_integration import Client


class TLSTests(TestCase):
    """wss: works with a verified certificate, and a wrong name is refused."""

    timeout = 60

    async def test_wss(self) -> None:
        """A client trusting the generated certificate gets the history over wss:."""
        key, cert, pem = write_self_signed(Path(os.path.abspath(self.mktemp())))
        master, slave = os.openpty()
        self.addCleanup(os.close, master)
        self.addCleanup(os.close, slave)
        os.write(master, b"over tls")
        port = free_port()
        server = spawn_python([
            *TWISTD, "--pidfile",
            os.path.abspath(self.mktemp()), "-n", "cloudconsole", "--pty", os.ttyname(slave),
            "--port", f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}",
        ])
        self.addCleanup(self._stop, server)
        await server.listening
        trust = ssl.Certificate.loadPEM(pem)
        factory = WebSocketClientFactory(f"wss://localhost:{port}/ws")
        factory.protocol = Client
        options = ssl.optionsForClientTLS("localhost", trustRoot=trust)
        client: Client = await SSL4ClientEndpoint(reactor, "127.0.0.1", port, options).connect(factory)
        await client.opened
        await client.wait_for(lambda got: got == b"over tls")
        client.sendClose()
        await client.closed

        # The same certificate presented for another name is refused by the client.
        wrong = ssl.optionsForClientTLS("console.example.com", trustRoot=trust)
        factory = WebSocketClientFactory(f"wss://console.example.com:{port}/ws")
        factory.protocol = Client
        refused: Client = await SSL4ClientEndpoint(reactor, "127.0.0.1", port, wrong).connect(factory)
        with self.assertRaises(RuntimeError):
            await refused.opened
        code, reason = await refused.closed
        self.assertNotEqual(code, 1000)

    async def _stop(self, server: object) -> None:
        if server.status is None:  # type: ignore[attr-defined]
            server.transport.signalProcess("TERM")  # type: ignore[attr-defined]
            await server.ended  # type: ignore[attr-defined]
