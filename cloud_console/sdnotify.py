"""
systemd's notification protocol and file descriptor store, for a restart that loses
nothing.

sd_notify(3) is one datagram of C{KEY=VALUE} lines sent to the unix socket named by
C{NOTIFY_SOCKET} (a leading C{@} stands for the NUL byte of an abstract address), with
descriptors attached as C{SCM_RIGHTS} for C{FDSTORE=1}. The protocol is this small, so
it is implemented here rather than brought in as a dependency. Outside systemd
(C{NOTIFY_SOCKET} unset) every call is a no-op.

The store (systemd.io, "The File Descriptor Store"): each console's open descriptor is
handed to PID 1 under a name (L{console_fd_name}); when the service restarts, PID 1
passes the descriptors back as C{LISTEN_FDS}/C{LISTEN_FDNAMES} beside the socket
activated ports, and the console adopts its descriptor instead of opening its source
again: what the guest wrote meanwhile waits in the kernel's buffer.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from typing import Mapping, Sequence

from twisted.logger import Logger

#: The name prefix of a console's descriptor in the store (C{console.vm1}); the one
#: console of the original command line is C{console} (named in
#: L{cloud_console.console.console.build_console}, which imports nothing above it).
CONSOLE_PREFIX = "console"

#: The name of the memfd that holds the consoles' state (history, session, offsets).
STATE_FD_NAME = "state"


def inherited_named_fds() -> dict[str, int]:
    """
    The descriptors systemd passed at start, by name: the listening sockets and the
    store's descriptors alike.

    Read from the object Twisted built when C{twisted.internet.endpoints} was imported
    (it deletes C{LISTEN_PID} and C{LISTEN_FDS} from the environment then, so reading
    the environment now would find nothing).
    """
    from twisted.internet import endpoints

    parser = getattr(endpoints, "_SystemdParser", None)
    descriptors = getattr(parser, "_sddaemon", None)
    if descriptors is None:  # a Twisted that keeps them elsewhere: none are found
        return {}
    named: dict[str, int] = descriptors.inheritedNamedDescriptors()
    return named


class Notifier:
    """
    Sends sd_notify messages to the service manager, if there is one.

    @ivar address: the socket's address (C{None}: not under systemd, nothing is sent).
    """

    _log = Logger()

    def __init__(self, address: str | None) -> None:
        if address and address.startswith("@"):
            address = "\0" + address[1:]
        if address and not address.startswith(("/", "\0")):
            self._log.warn("NOTIFY_SOCKET {address!r} is not a unix socket: ignored", address=address)
            address = None
        self.address = address or None
        self._socket: socket.socket | None = None
        self._failed = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """The notifier C{NOTIFY_SOCKET} names (left in the environment: sent to often)."""
        return cls((environ if environ is not None else os.environ).get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        """Whether a service manager listens (and so whether there is a store)."""
        return self.address is not None

    def send(self, *fields: str, fds: Sequence[int] = ()) -> bool:
        """
        Send one message of C{fields} (C{"READY=1"}...), with C{fds} attached.

        @return: whether it was sent. A failure is logged once, never raised: a daemon
            serving its consoles does not stop because its manager went deaf.
        """
        if self.address is None:
            return False
        message = ("\n".join(fields) + "\n").encode("utf-8")
        try:
            if self._socket is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.connect(self.address)
                self._socket = sock
            if fds:
                socket.send_fds(self._socket, [message], list(fds))
            else:
                self._socket.send(message)
        except OSError as e:
            if not self._failed:
                self._failed = True
                self._log.warn(
                    "cannot notify the service manager at {address!r}: {error}",
                    address=self.address,
                    error=os.strerror(e.errno) if e.errno else str(e),
                )
            if self._socket is not None and e.errno not in (errno.EAGAIN, errno.ENOBUFS):
                self._socket.close()
                self._socket = None
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Start-up (or a reload) is done: the consoles are open and the ports listen."""
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        """A reload (SIGHUP) starts; L{ready} says when it is done."""
        usec = int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1_000_000)
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


class FdStore:
    """
    The service manager's descriptor store, as the consoles use it: hand a descriptor
    over under a name, take it back from it, and what was passed at start.

    @ivar inherited: descriptors passed back at start and not yet taken, by name.
    """

    _log = Logger()

    def __init__(self, notifier: Notifier, inherited: dict[str, int]) -> None:
        self.notifier = notifier
        self.inherited = dict(inherited)

    def store(self, name: str, fd: int) -> bool:
        """Keep a copy of C{fd} in the store under C{name} (replacing what it held)."""
        self.notifier.send("FDSTOREREMOVE=1", f"FDNAME={name}")
        return self.notifier.send("FDSTORE=1", f"FDNAME={name}", fds=[fd])

    def remove(self, name: str) -> bool:
        """Drop C{name}'s descriptor from the store (PID 1 closes its copy)."""
        return self.notifier.send("FDSTOREREMOVE=1", f"FDNAME={name}")

    def take(self, name: str) -> int | None:
        """The descriptor passed back under C{name}, if any (once)."""
        return self.inherited.pop(name, None)

    def discard_leftovers(self, prefix: str) -> list[str]:
        """
        Close every descriptor passed back under C{prefix} that no one took (a console
        no longer configured) and remove it from the store.

        @return: their names.
        """
        names = [
            n for n in self.inherited if n == prefix or n.startswith(prefix + ".")
        ]
        for name in names:
            fd = self.inherited.pop(name)
            try:
                os.close(fd)
            except OSError:
                pass
            self.remove(name)
            self._log.info(
                "stored descriptor {name} belongs to no configured console: closed and removed",
                name=name,
            )
        return names
