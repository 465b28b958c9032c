"""
Where the consoles' state (L{cloud_console.console.state}) waits while the daemon
restarts: a memfd in systemd's descriptor store (named C{state}), or a file in
C{--state-dir}.

A state is read once, at start, and consumed there (removed from the store, the file
renamed away): a process killed later (kill -9) leaves no state behind, since one from
before would name offsets the kept console has since moved past; the next start then
begins empty histories and sessions (the kept descriptors and the log files lose
nothing). It is written at a clean shutdown, after every console has stopped reading,
so it holds every byte read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from twisted.logger import Logger

from .console.state import ConsoleState, StateError, decode, encode
from .sdnotify import STATE_FD_NAME, FdStore

#: The file in C{--state-dir}.
STATE_FILE = "state"


class StateKeeper:
    """Reads the state at start and writes it at shutdown, to the store and/or a directory."""

    _log = Logger()

    def __init__(self, store: FdStore | None, directory: str | None) -> None:
        self.store = store
        self.directory = Path(directory) if directory else None

    @property
    def enabled(self) -> bool:
        return self.store is not None or self.directory is not None

    def load(self) -> dict[str, ConsoleState]:
        """
        The saved consoles' states, by name, consumed; empty (with a log line saying
        why) when there is none or it does not check out.
        """
        found: list[tuple[str, bytes]] = []
        if self.store is not None:
            fd = self.store.take(STATE_FD_NAME)
            if fd is not None:
                try:
                    found.append(("the descriptor store", _read_all(fd)))
                except OSError as e:
                    self._log.warn("saved state unreadable in the descriptor store: {error}", error=str(e))
                finally:
                    os.close(fd)
                    self.store.remove(STATE_FD_NAME)
        if self.directory is not None:
            path = self.directory / STATE_FILE
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                pass
            except OSError as e:
                self._log.warn("saved state {path} unreadable: {error}", path=str(path), error=str(e))
            else:
                found.append((str(path), data))
                try:
                    os.replace(path, self.directory / (STATE_FILE + ".used"))
                except OSError as e:
                    self._log.warn("cannot set {path} aside: {error}", path=str(path), error=str(e))
        for where, data in found:
            try:
                states = decode(data)
            except StateError as e:
                self._log.warn(
                    "saved state in {where} discarded ({error}); the consoles start empty",
                    where=where,
                    error=str(e),
                )
                continue
            self._log.info("saved state of {count} consoles read from {where}", count=len(states), where=where)
            return states
        return {}

    def save(self, consoles: Iterable[ConsoleState]) -> None:
        """Write the state for the next start (errors are logged: a stop still stops)."""
        states = list(consoles)
        data = encode(states)
        if self.store is not None:
            try:
                fd = os.memfd_create("cloud-console-state", os.MFD_CLOEXEC)
            except OSError as e:
                self._log.warn("cannot make the state's memfd: {error}", error=str(e))
            else:
                try:
                    _write_all(fd, data)
                    if self.store.store(STATE_FD_NAME, fd):
                        self._log.info(
                            "state of {count} consoles ({bytes} bytes) handed to the descriptor store",
                            count=len(states),
                            bytes=len(data),
                        )
                finally:
                    os.close(fd)
        if self.directory is not None:
            path = self.directory / STATE_FILE
            temporary = self.directory / (STATE_FILE + ".new")
            try:
                fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                try:
                    _write_all(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(temporary, path)
                directory = os.open(self.directory, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(directory)
                finally:
                    os.close(directory)
            except OSError as e:
                self._log.warn("cannot write the state to {path}: {error}", path=str(path), error=str(e))
                return
            self._log.info(
                "state of {count} consoles ({bytes} bytes) written to {path}",
                count=len(states),
                bytes=len(data),
                path=str(path),
            )


def _read_all(fd: int) -> bytes:
    pieces: list[bytes] = []
    offset = 0
    while True:
        piece = os.pread(fd, 1 << 20, offset)
        if not piece:
            return b"".join(pieces)
        pieces.append(piece)
        offset += len(piece)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
