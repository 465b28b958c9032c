"""
Where the consoles' state (L{cloud_console.console.state}) waits while the daemon
restarts: a journal in a memfd in systemd's descriptor store (named C{state}), or a file
in C{--state-dir}.

Under systemd the journal follows the histories as they are written (a snapshot, then a
record per read burst, see L{cloud_console.console.state}), so even a process killed
outright (kill -9) leaves a state that is exactly what its histories held; it is
compacted (a fresh snapshot) when it grows past twice its snapshot plus
L{JOURNAL_SLACK}, after a reload, and at a clean stop. The file of C{--state-dir} is
written at a clean stop only; it is read once, at start, and set aside there, since a
file from before a later crash would name offsets the console has since moved past.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from twisted.logger import Logger

from .console.console import Console, console_state
from .console.state import (
    RECORD_SNAPSHOT,
    ConsoleState,
    StateError,
    add_record,
    boot_record,
    decode,
    encode,
    journal_header,
    journal_record,
    output_record,
    replay_journal,
)
from .sdnotify import STATE_FD_NAME, FdStore

#: Journal bytes past twice the snapshot before it is compacted.
JOURNAL_SLACK = 64 * 1024 * 1024

#: The file in C{--state-dir}.
STATE_FILE = "state"


class StateKeeper:
    """Reads the state at start and writes it at shutdown, to the store and/or a directory."""

    _log = Logger()

    def __init__(self, store: FdStore | None, directory: str | None) -> None:
        self.store = store
        self.directory = Path(directory) if directory else None
        #: The journal's generation (one more for each journal written).
        self.generation = 0
        self.journal: Journal | None = None

    @property
    def enabled(self) -> bool:
        return self.store is not None or self.directory is not None

    def load(self) -> dict[str, ConsoleState]:
        """
        The saved consoles' states, by name, consumed; empty (with a log line saying
        why) when there is none or it does not check out.
        """
        found: list[tuple[str, bytes]] = []
        found_states: dict[str, ConsoleState] | None = None
        if self.store is not None:
            fd = self.store.take(STATE_FD_NAME)
            if fd is not None:
                try:
                    data = _read_all(fd)
                except OSError as e:
                    self._log.warn("saved state unreadable in the descriptor store: {error}", error=str(e))
                else:
                    try:
                        replayed = replay_journal(data)
                    except StateError as e:
                        self._log.warn(
                            "saved state in the descriptor store discarded ({error}); "
                            "the consoles start empty",
                            error=str(e),
                        )
                    else:
                        self.generation = replayed.generation
                        if replayed.torn:
                            self._log.info(
                                "saved state: a last record of {torn} bytes was cut short "
                                "(the process was killed while writing it); what it held is lost",
                                torn=replayed.torn,
                            )
                        found_states = replayed.states
                finally:
                    os.close(fd)
        if found_states is not None:
            self._log.info(
                "saved state of {count} consoles read from the descriptor store",
                count=len(found_states),
            )
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
        if found_states is not None:
            return found_states
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

    def start_journal(self, consoles: list[Console]) -> None:
        """
        Under systemd: from now on, keep the journal of C{consoles}' histories in the
        store (consoles added later join with L{Journal.add}).
        """
        if self.store is None:
            return
        self.journal = Journal(self.store, self, consoles)
        self.journal.compact()

    def save(self, consoles: Iterable[ConsoleState]) -> None:
        """Write the state for the next start (errors are logged: a stop still stops)."""
        states = list(consoles)
        data = encode(states)
        if self.store is not None:
            journal, self.journal = self.journal, None
            if journal is not None:
                journal.stop()
            self.generation += 1
            fd = _snapshot_memfd(self.generation, data)
            if fd is not None:
                try:
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


def _snapshot_memfd(generation: int, data: bytes) -> int | None:
    """A memfd holding a journal of one snapshot (C{data}, see L{encode})."""
    try:
        fd = os.memfd_create("cloud-console-state", os.MFD_CLOEXEC)
    except OSError as e:
        StateKeeper._log.warn("cannot make the state's memfd: {error}", error=str(e))
        return None
    try:
        _write_all(fd, journal_header(generation) + b"".join(journal_record(RECORD_SNAPSHOT, data)))
    except OSError as e:
        os.close(fd)
        StateKeeper._log.warn("cannot write the state's memfd: {error}", error=str(e))
        return None
    return fd


class _Recorder:
    """One console's history, recorded in the journal as it changes."""

    def __init__(self, journal: Journal, number: int) -> None:
        self.journal = journal
        self.number = number

    def appended(self, offset: int, data: bytes, now: float) -> None:
        self.journal.write(output_record(self.number, offset, now, data))

    def boot(self, offset: int) -> None:
        self.journal.write(boot_record(self.number, offset))


class Journal:
    """
    The consoles' histories, as they are written, in a memfd kept in systemd's store.

    One C{writev} per read burst (the record's header and the bytes): a copy of what the
    history keeps, in memory systemd holds for the service.
    """

    _log = Logger()

    def __init__(self, store: FdStore, keeper: StateKeeper, consoles: list[Console]) -> None:
        self.store = store
        self.keeper = keeper
        self.consoles: dict[int, Console] = {}
        self._next = 0
        self.fd = -1
        self.size = 0
        self.limit = 0
        for console in consoles:
            self._number(console)

    def _number(self, console: Console) -> int:
        number = self._next
        self._next += 1
        self.consoles[number] = console
        console.multiplexer.recorder = _Recorder(self, number)
        return number

    def compact(self) -> None:
        """Start a fresh journal: a snapshot of every console (now), handed to the store."""
        consoles = {n: c for n, c in self.consoles.items() if c.running or c.parent is not None}
        self.consoles = {}
        self._next = 0
        ordered = sorted(consoles.items())
        for _, console in ordered:
            self._number(console)
        data = encode([console_state(console) for _, console in ordered])
        self.keeper.generation += 1
        fd = _snapshot_memfd(self.keeper.generation, data)
        if fd is None:
            self.stop(stale=True)
            return
        old, self.fd = self.fd, fd
        self.size = os.fstat(fd).st_size
        self.limit = 2 * self.size + JOURNAL_SLACK
        self.store.store(STATE_FD_NAME, fd)
        if old >= 0:
            os.close(old)

    def add(self, console: Console) -> None:
        """A console added by a reload (or replacing one of the same name) joins."""
        if self.fd < 0:
            return
        number = self._number(console)
        self.write(add_record(number, console_state(console)))

    def write(self, pieces: list[bytes]) -> None:
        if self.fd < 0:
            return
        try:
            written = os.writev(self.fd, pieces)
        except OSError as e:
            self._log.warn("cannot write the state journal: {error}; it stops", error=str(e))
            self.stop(stale=True)
            return
        self.size += written
        if written != sum(len(p) for p in pieces):
            self._log.warn("the state journal took a short write; it stops")
            self.stop(stale=True)
            return
        if self.size > self.limit:
            self.compact()

    def stop(self, stale: bool = False) -> None:
        """
        Record no more. The journal in the store stays as it is, unless C{stale}: one
        that no longer follows the histories is removed, never to be replayed.
        """
        for console in self.consoles.values():
            console.multiplexer.recorder = None
        self.consoles = {}
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if stale:
            self.store.remove(STATE_FD_NAME)
