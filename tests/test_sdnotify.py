"""
Tests for L{cloud_console.sdnotify}: sd_notify's datagrams, descriptors attached with
SCM_RIGHTS, abstract addresses, and the store's bookkeeping, on real sockets.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from cloud_console.sdnotify import FdStore, Notifier


class NotifierTests(SynchronousTestCase):
    """What the notifier sends, and where."""

    def setUp(self) -> None:
        directory = tempfile.mkdtemp(prefix="cc-")
        self.addCleanup(os.rmdir, directory)
        self.path = str(Path(directory) / "notify")
        self.receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.receiver.bind(self.path)
        self.addCleanup(os.unlink, self.path)
        self.addCleanup(self.receiver.close)

    def receive(self) -> tuple[list[str], list[int]]:
        data, fds, _, _ = socket.recv_fds(self.receiver, 4096, 8)
        for fd in fds:
            self.addCleanup(os.close, fd)
        return data.decode().splitlines(), fds

    def test_no_socket_no_op(self) -> None:
        """Without NOTIFY_SOCKET nothing is sent and nothing fails."""
        notifier = Notifier.from_environment({})
        self.assertFalse(notifier.enabled)
        self.assertFalse(notifier.ready())

    def test_ready_and_reloading(self) -> None:
        """READY=1 with a status; RELOADING=1 with the monotonic time systemd wants."""
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": self.path})
        self.addCleanup(notifier.close)
        self.assertTrue(notifier.ready("serving 2 consoles"))
        self.assertEqual(self.receive()[0], ["READY=1", "STATUS=serving 2 consoles"])
        notifier.reloading()
        lines = self.receive()[0]
        self.assertEqual(lines[0], "RELOADING=1")
        self.assertTrue(lines[1].startswith("MONOTONIC_USEC="))

    def test_store_sends_the_descriptor(self) -> None:
        """
        FDSTORE=1 carries the descriptor (the receiver's copy is the same open file),
        after an FDSTOREREMOVE=1 of the name so the store holds one per console.
        """
        store = FdStore(Notifier(self.path), {})
        self.addCleanup(store.notifier.close)
        reader, writer = os.pipe()
        self.addCleanup(os.close, reader)
        self.addCleanup(os.close, writer)
        store.store("console.vm1", writer)
        self.assertEqual(self.receive(), (["FDSTOREREMOVE=1", "FDNAME=console.vm1"], []))
        lines, fds = self.receive()
        self.assertEqual(lines, ["FDSTORE=1", "FDNAME=console.vm1"])
        os.write(fds[0], b"through the copy")
        self.assertEqual(os.read(reader, 100), b"through the copy")

    def test_abstract_address(self) -> None:
        """An address starting with '@' is abstract (a NUL byte first)."""
        name = f"cloud-console-test-{os.getpid()}"
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(receiver.close)
        receiver.bind("\0" + name)
        notifier = Notifier("@" + name)
        self.addCleanup(notifier.close)
        self.assertTrue(notifier.send("READY=1"))
        self.assertEqual(receiver.recv(100), b"READY=1\n")

    def test_failure_logged_once(self) -> None:
        """A manager that went away is logged once; the caller goes on."""
        notifier = Notifier(self.path + ".gone")
        with capturedLogs() as events:
            self.assertFalse(notifier.ready())
            self.assertFalse(notifier.ready())
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)


class FdStoreTests(SynchronousTestCase):
    """Taking descriptors back, and discarding those no one wants."""

    def test_take_once_and_discard_leftovers(self) -> None:
        """
        A passed-back descriptor is taken once; those of no configured console are
        closed and removed from the store; the listening sockets' names are left alone.
        """
        sent: list[tuple[str, ...]] = []

        class Recorder(Notifier):
            def send(self, *fields: str, fds: object = ()) -> bool:
                sent.append(fields)
                return True

        a, b = os.pipe()
        self.addCleanup(os.close, a)
        store = FdStore(Recorder(None), {"web": 3, "console.vm1": a, "console.old": b})
        self.assertEqual(store.take("console.vm1"), a)
        self.assertIsNone(store.take("console.vm1"))
        self.assertEqual(store.discard_leftovers("console"), ["console.old"])
        self.assertRaises(OSError, os.fstat, b)
        self.assertEqual(sent, [("FDSTOREREMOVE=1", "FDNAME=console.old")])
        self.assertEqual(store.inherited, {"web": 3})
