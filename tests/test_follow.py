"""
Tests for L{cloud_console.console.follow}: opening the console from its source, and following it
through hang-ups, reboots that make a new pty, and a VMM that is not there yet.

Real ptys from C{os.openpty()} and real unix sockets stand for the VMM's side; time is a
L{MemoryReactorClock}, and opening runs synchronously (no thread pool), so each retry
happens exactly when the clock is advanced to it.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from cloud_console.console.device import ConsoleDevice, ConsoleOpenError
from cloud_console.console.follow import RETRY_FIRST, RETRY_MAX, ConsoleFollower
from cloud_console.console.multiplexer import Multiplexer
from cloud_console.console.sources import SourceError, parse_source

from .test_multiplexer import FakeClient, attach


def pump(device: ConsoleDevice) -> None:
    """Do what the reactor would on a readable console: read, and end it if it ended."""
    result = device.doRead()
    if isinstance(result, Failure):
        device.connectionLost(result)
    elif isinstance(result, Exception):
        device.connectionLost(Failure(result))


class FollowerTestCase(SynchronousTestCase):
    """A multiplexer with one viewer, a memory reactor, and pty pairs made on demand."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.multiplexer = Multiplexer(1000, clock=self.reactor)
        self.client = FakeClient()
        attach(self.multiplexer, self.client)
        self.dir = self.mktemp()
        os.mkdir(self.dir)

    def pty_pair(self) -> tuple[int, str]:
        """A new pty (as a VMM makes one per boot): its master, and the slave's path."""
        master, slave = os.openpty()
        path = os.ttyname(slave)
        os.close(slave)  # the follower opens it by path; the master keeps it alive
        os.set_blocking(master, False)
        self.addCleanup(_close_quietly, master)
        return master, path

    def follower(self, source: str, reopen: bool = True) -> ConsoleFollower:
        follower = ConsoleFollower(
            parse_source(source), self.multiplexer, self.reactor, reopen=reopen
        )
        self.addCleanup(self._stop, follower)
        return follower

    def _stop(self, follower: ConsoleFollower) -> None:
        if follower.running:
            follower.stopService()
        if follower.device is not None:
            follower.device.close()

    def start(self, follower: ConsoleFollower) -> None:
        follower.open_now()
        self.multiplexer.startService()
        follower.startService()

    def link(self, target: str) -> str:
        """Point the symlink C{console} (as a VMM or udev keeps one) at C{target}."""
        path = os.path.join(self.dir, "console")
        if os.path.lexists(path):
            os.unlink(path)
        os.symlink(target, path)
        return path


class OpenTests(FollowerTestCase):
    """The first open, before the reactor runs."""

    def test_opens_a_pty(self) -> None:
        """A pty source is opened, read, and its output reaches the clients."""
        master, path = self.pty_pair()
        follower = self.follower(path, reopen=False)
        self.start(follower)
        assert follower.device is not None
        self.assertIn(follower.device, self.reactor.getReaders())
        os.write(master, b"hello")
        pump(follower.device)
        self.assertEqual(bytes(self.client.received), b"hello")
        self.assertEqual(self.multiplexer.state_reason, f"opened pty {path}")

    def test_missing_without_reopen_is_an_error(self) -> None:
        """Without reopen, a console that cannot be opened is an error naming it."""
        follower = self.follower(os.path.join(self.dir, "absent"), reopen=False)
        e = self.assertRaises(ConsoleOpenError, follower.open_now)
        self.assertIn("absent", str(e))

    def test_api_error_without_reopen(self) -> None:
        """Without reopen, a VMM API that cannot be reached is a SourceError."""
        follower = self.follower("qmp:" + os.path.join(self.dir, "vm.qmp"), reopen=False)
        e = self.assertRaises(SourceError, follower.open_now)
        self.assertIn("vm.qmp", str(e))

    def test_missing_with_reopen_waits(self) -> None:
        """
        With reopen, a console not there yet is shown as down and waited for; it is
        opened at a retry once it appears.
        """
        path = os.path.join(self.dir, "console")
        follower = self.follower(path)
        self.start(follower)
        self.assertFalse(self.multiplexer.up)
        self.assertIn("waiting for", self.multiplexer.state_reason)
        self.assertEqual(self.client.states[-1][0], False)
        master, pty = self.pty_pair()
        self.link(pty)
        self.reactor.advance(RETRY_FIRST)
        self.assertTrue(self.multiplexer.up)
        self.assertEqual(self.client.states[-1][:2], (True, f"opened pty {path}"))


class FollowTests(FollowerTestCase):
    """A console that goes away and comes back."""

    def test_hang_up_without_reopen_is_the_end(self) -> None:
        """Without reopen, a hang-up loses the console for good (the clients are closed)."""
        master, path = self.pty_pair()
        follower = self.follower(path, reopen=False)
        self.start(follower)
        assert follower.device is not None
        device = follower.device
        os.close(master)
        pump(device)
        self.assertEqual(self.multiplexer.closed_reason, f"pty {path} hung up")
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_new_pty_behind_the_symlink(self) -> None:
        """
        The guest rebooted and the VMM made a new pty: the symlink is followed anew,
        the clients hear down then up, and the stream goes on at the next offset.
        """
        first, first_path = self.pty_pair()
        follower = self.follower(self.link(first_path))
        self.start(follower)
        assert follower.device is not None
        os.write(first, b"boot one\r\n")
        pump(follower.device)
        device = follower.device
        os.close(first)
        pump(device)
        self.assertFalse(self.multiplexer.up)
        self.assertIsNone(self.multiplexer.closed_reason)
        self.assertEqual(self.client.states[-1][:2], (False, f"pty {self.dir}/console hung up"))
        second, second_path = self.pty_pair()
        self.link(second_path)
        self.reactor.advance(RETRY_FIRST)
        self.assertTrue(self.multiplexer.up)
        assert follower.device is not None
        os.write(second, b"boot two")
        pump(follower.device)
        self.assertEqual(bytes(self.client.received), b"boot one\r\nboot two")
        self.assertEqual(self.client.chunks[-1].offset, 10)
        self.assertEqual(self.client.closes, [])
        self.assertEqual(self.multiplexer.history.head_start, 10)
        self.assertEqual(self.multiplexer.reopen_count, 1)

    def test_backoff_doubles_up_to_the_most(self) -> None:
        """
        Retries start near L{RETRY_FIRST}, double, and never wait more than
        L{RETRY_MAX}; each new reason is logged once, not every retry.
        """
        follower = self.follower(os.path.join(self.dir, "console"))
        with capturedLogs() as events:
            self.start(follower)
            delays = []
            for _ in range(9):
                [call] = self.reactor.getDelayedCalls()
                delay = call.getTime() - self.reactor.seconds()
                delays.append(delay)
                self.reactor.advance(delay)
        self.assertTrue(RETRY_FIRST * 0.9 <= delays[0] <= RETRY_FIRST)
        for before, after in zip(delays, delays[1:]):
            self.assertTrue(after >= before * 1.5 or after >= RETRY_MAX * 0.9, delays)
        self.assertTrue(all(d <= RETRY_MAX for d in delays))
        self.assertGreaterEqual(delays[-1], RETRY_MAX * 0.9)
        retries = [e for e in events if "not back yet" in (e.get("log_format") or "")]
        self.assertEqual(retries, [])  # the same reason as when it went down: said once

    def test_unix_socket_reconnected(self) -> None:
        """A unix socket source is reconnected after the VMM closed it, when it listens again."""
        path = os.path.join(self.dir, "serial.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        follower = self.follower("unix:" + path)
        self.start(follower)
        assert follower.device is not None
        vmm, _ = listener.accept()
        vmm.sendall(b"from the socket")
        pump(follower.device)
        self.assertEqual(bytes(self.client.received), b"from the socket")
        follower.device.write(b"typed")
        follower.device.doWrite()
        self.assertEqual(vmm.recv(100), b"typed")
        device = follower.device
        vmm.close()
        listener.close()
        os.unlink(path)
        pump(device)
        self.assertFalse(self.multiplexer.up)
        self.assertEqual(self.client.states[-1][1], f"unix socket {path} hung up")
        self.reactor.advance(RETRY_FIRST)  # nobody listens yet: still down
        self.assertFalse(self.multiplexer.up)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        listener.bind(path)
        listener.listen(1)
        self.reactor.advance(RETRY_MAX)
        self.assertTrue(self.multiplexer.up)
        self.addCleanup(lambda: listener.accept()[0].close())

    def test_stop_cancels_retries(self) -> None:
        """Stopping the service leaves no retry behind."""
        follower = self.follower(os.path.join(self.dir, "console"))
        self.start(follower)
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        follower.stopService()
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_open_finishing_after_stop_is_closed(self) -> None:
        """
        An open that finishes (in the thread pool) after the service stopped is closed
        again, not connected.
        """
        pending: list[Any] = []

        def later(function: Any) -> Any:
            from twisted.internet.defer import Deferred

            d: Deferred[Any] = Deferred()
            pending.append((function, d))
            return d

        follower = ConsoleFollower(
            parse_source(os.path.join(self.dir, "console")),
            self.multiplexer,
            self.reactor,
            reopen=True,
            run_blocking=later,
        )
        self.start(follower)
        master, pty = self.pty_pair()
        self.link(pty)
        self.reactor.advance(RETRY_FIRST)
        [(function, d)] = pending
        opened = function()
        follower.stopService()
        d.callback(opened)
        self.assertIsNone(follower.device)
        self.assertFalse(self.multiplexer.up)
        self.assertRaises(OSError, os.fstat, opened.fd)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
