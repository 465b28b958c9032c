"""
TLS through an endpoint description: a real server on C{ssl:...} with a generated
self-signed certificate, a real client over C{wss:} verifying it (service-identity).
"""

from __future__ import annotations

import datetime
import ipaddress
import os

from autobahn.twisted.websocket import WebSocketClientFactory
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor, ssl
from twisted.internet.endpoints import SSL4ClientEndpoint
from twisted.trial.unittest import TestCase

from .test_integration import Client, free_port, spawn


def self_signed(directory: str) -> tuple[str, str, bytes]:
    """A key and certificate for localhost; returns their paths and the PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    os.makedirs(directory)
    key_path = os.path.join(directory, "key.pem")
    cert_path = os.path.join(directory, "cert.pem")
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    with open(cert_path, "wb") as f:
        f.write(pem)
    return key_path, cert_path, pem


class TLSTests(TestCase):
    """wss: works with a verified certificate, and a wrong name is refused."""

    timeout = 60

    async def test_wss(self) -> None:
        """A client trusting the generated certificate gets the history over wss:."""
        key, cert, pem = self_signed(os.path.abspath(self.mktemp()))
        master, slave = os.openpty()
        self.addCleanup(os.close, master)
        self.addCleanup(os.close, slave)
        os.write(master, b"over tls")
        port = free_port()
        server = spawn([
            "-c", "from twisted.scripts.twistd import run; run()", "--pidfile",
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
