"""
A console to try without a VM: a local shell on a fresh pty, as a VM monitor would offer.

The demo plays the VM monitor's part: it makes a pty pair whose slave path is served
exactly as a guest console would be, and relays the master to a shell running on a pty
of its own (so the shell has a normal, cooked terminal with echo and line editing). When
the shell exits, the "VM" stops: the master closes and the console ends as it would for a
real guest.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import fdesc
from twisted.internet.abstract import FileDescriptor
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure


class _MonitorSide(FileDescriptor):
    """The master end of the demo's console pty: what the served slave reads and writes."""

    def __init__(self, fd: int, shell: _Shell, reactor: Any) -> None:
        FileDescriptor.__init__(self, reactor)
        self.fd = fd
        self.shell = shell
        self.connected = 1
        fdesc.setNonBlocking(fd)

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> Any:
        # Keystrokes typed in a browser, on their way to the shell.
        return fdesc.readFromFD(self.fd, self.shell.type_in)

    def writeSomeData(self, data: bytes) -> Any:
        return fdesc.writeToFD(self.fd, data)

    def connectionLost(self, reason: Failure) -> None:
        FileDescriptor.connectionLost(self, reason)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Shell(ProcessProtocol):
    """The demo's guest: a shell whose output goes to the console pty."""

    _log = Logger()
    monitor: _MonitorSide | None = None

    def type_in(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def outReceived(self, data: bytes) -> None:
        if self.monitor is not None:
            self.monitor.write(data)

    def processEnded(self, reason: Failure) -> None:
        self._log.info("demo shell exited; the demo console closes")
        if self.monitor is not None:
            self.monitor.loseConnection()


def start_demo_console(reactor: Any, shell: str | None = None) -> str:
    """
    Start a shell behind a fresh pty pair and return the slave path to serve.

    The slave's descriptor is closed here on purpose: the server opens it by path, as it
    would a VM's console; the master (kept by the relay) keeps the pty alive.
    """
    shell = shell or os.environ.get("SHELL") or "/bin/sh"
    master, slave = os.openpty()
    path = os.ttyname(slave)
    protocol = _Shell()
    env = dict(os.environ, TERM="xterm-256color")
    reactor.spawnProcess(protocol, shell, [shell, "-i"], env=env, usePTY=True)
    protocol.monitor = _MonitorSide(master, protocol, reactor)
    protocol.monitor.startReading()
    # Keep the slave open until the server has opened it, so the first bytes the shell
    # writes are not lost to a hang-up; the server's open happens before the reactor runs.
    reactor.callWhenRunning(os.close, slave)
    return path
