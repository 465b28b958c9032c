"""
The audit log (C{--audit-log FILE}): who came to which console, typed how much, and who
was turned away, one JSON object a line.

The doors call it (the web door's gate and WebSocket, the SSH door's user-auth and
session); the console core knows nothing of it. The service makes one L{AuditLog} (or
none: L{NO_AUDIT}, which does nothing) and hands it to both doors.

Events (C{event}), each with C{time} (ISO 8601 UTC, milliseconds), C{console} (C{null}
with one console), C{front} (C{web}, C{ssh}), C{identity} and C{address}:

 - C{attach} (C{readOnly}), C{detach} (C{seconds} attached, C{typed} bytes);
 - C{input}: bytes typed in one burst (C{bytes}; C{data}, base64, with
   C{--audit-input}); a burst is what one attachment typed within L{BURST} seconds of its
   first byte, written when those seconds are up (or at the detach), timed at its first
   byte: one line a second at most per typist, nothing per keystroke;
 - C{input-refused} (C{reason}: read-only, backlog full...; C{bytes}): once per burst
   and reason, so a read-only viewer leaning on a key is one line a second;
 - C{refused}: a refused authentication or upgrade (C{reason}: C{credential} for a web
   401, C{origin}, C{limit}, or the SSH door's reasons), before any console is attached;
 - C{action}: what an operator did to a console beyond typing (see L{AuditLog.action}).

Written unbuffered (one write per event: events are few, and a crash loses none),
reopened by name on SIGHUP (after a rotation). A write that fails (a full disk, a
read-only file system) is logged once, until one succeeds again, and counted; it never
stops or slows a console.
"""

from __future__ import annotations

import base64
import json
import os
from datetime import datetime, timezone
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from ..console.multiplexer import ClientLabel
from ..console.writing import write_all

#: Seconds of typing coalesced into one C{input} event per attachment.
BURST = 1.0


class AuditLogError(Exception):
    """The audit log cannot be opened (at start-up: the message says which and why)."""


def audit_time(seconds: float) -> str:
    """C{seconds} since the epoch as ISO 8601 UTC to the millisecond."""
    moment = datetime.fromtimestamp(seconds, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AuditTrail:
    """
    One attachment's part of the audit log: its input, coalesced in bursts, and its
    detach. A door makes one with L{AuditLog.attached} and calls L{input} with every
    message it passes on (and the console's answer), L{detached} once.
    """

    def __init__(
        self, audit: AuditLog, console: str | None, label: ClientLabel, read_only: bool
    ) -> None:
        self.audit = audit
        self.console = console
        self.label = label
        self.typed = 0
        self._burst_at = 0.0
        self._bytes = 0
        self._data: list[bytes] = []
        self._refused: dict[str, int] = {}
        self._timer: IDelayedCall | None = None
        self._gone = False
        audit.write("attach", console, label, readOnly=read_only)

    def input(self, data: bytes, refused: str | None) -> None:
        """C{data} was typed; C{refused} says why the console did not take it, if not."""
        if self._gone or not data:
            return
        if refused is None:
            self._bytes += len(data)
            self.typed += len(data)
            if self.audit.record_input:
                self._data.append(data)
        else:
            self._refused[refused] = self._refused.get(refused, 0) + len(data)
        if self._timer is None:
            self._burst_at = self.audit.seconds()
            self._timer = self.audit.clock.callLater(BURST, self.flush)

    def flush(self) -> None:
        """Write the burst so far (its time is its first byte's)."""
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        at = self._burst_at
        if self._bytes:
            extra: dict[str, Any] = {"bytes": self._bytes}
            if self._data:
                extra["data"] = base64.b64encode(b"".join(self._data)).decode("ascii")
            self.audit.write("input", self.console, self.label, at=at, **extra)
        for reason, count in self._refused.items():
            self.audit.write(
                "input-refused", self.console, self.label, at=at, reason=reason, bytes=count
            )
        self._bytes = 0
        self._data = []
        self._refused = {}

    def detached(self) -> None:
        """The attachment ended: the burst in progress, then C{detach} (idempotent)."""
        if self._gone:
            return
        self.flush()
        self._gone = True
        seconds = round(max(0.0, self.audit.seconds() - self.label.since), 3)
        self.audit.write("detach", self.console, self.label, seconds=seconds, typed=self.typed)


class AuditLog:
    """
    The audit log file: JSON lines, appended, reopened on SIGHUP.

    @ivar record_input: log typed bytes too (base64), not only their count.
    @ivar dropped: events not written because the file refused them.
    """

    _log = Logger()

    def __init__(self, path: str, clock: IReactorTime, record_input: bool = False) -> None:
        """
        Open C{path} for append (created mode 0600 if missing: it may hold keystrokes).

        @raise AuditLogError: it cannot be opened.
        """
        self.path = path
        self.clock = clock
        self.record_input = record_input
        self.dropped = 0
        self.written = 0
        self._failing = False
        self._fd = self._open()

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise AuditLogError(f"cannot open audit log {self.path}: {e.strerror}") from e

    def seconds(self) -> float:
        """Now, on the audit log's clock."""
        return self.clock.seconds()

    # -- what the doors call ----------------------------------------------------------

    def attached(self, console: str | None, label: ClientLabel, read_only: bool) -> AuditTrail:
        """A viewer attached (logged now); its trail takes its input and its detach."""
        return AuditTrail(self, console, label, read_only)

    def refused(
        self,
        front: str,
        reason: str,
        address: str,
        identity: str | None = None,
        console: str | None = None,
        **detail: Any,
    ) -> None:
        """An authentication or an upgrade was refused (C{identity}: who it claimed)."""
        label = ClientLabel(front, identity or "anonymous", address, self.seconds())
        self.write("refused", console, label, reason=reason, **detail)

    def action(self, console: str | None, label: ClientLabel, action: str, **detail: Any) -> None:
        """
        Someone did C{action} to a console beyond typing (a SysRq, a power action...):
        the hook for the doors' actions; C{detail} says what (JSON-serialisable values).
        """
        self.write("action", console, label, action=action, **detail)

    # -- the file ---------------------------------------------------------------------

    def write(
        self, event: str, console: str | None, label: ClientLabel, at: float | None = None, **fields: Any
    ) -> None:
        """Append one event; never raises for the file's sake."""
        record = {
            "time": audit_time(self.seconds() if at is None else at),
            "event": event,
            "console": console,
            "front": label.front,
            "identity": label.identity,
            "address": label.address,
            **fields,
        }
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode("utf-8")
        if self._fd < 0:
            self.dropped += 1
            return
        _written, error = write_all(self._fd, line)
        if error is not None:
            self._failed(error.strerror or str(error))
            return
        self.written += 1
        if self._failing:
            self._failing = False
            self._log.info("audit log {path} written again", path=self.path, dropped=self.dropped)

    def _failed(self, why: str) -> None:
        self.dropped += 1
        if not self._failing:
            self._failing = True
            self._log.error(
                "audit log {path} not written: {error} (said once until a write succeeds; "
                "the consoles carry on)",
                path=self.path,
                error=why,
            )

    def reopen(self) -> None:
        """
        Open the file again by name (SIGHUP, after logrotate moved it); if that fails,
        keep writing to the old one and say so.
        """
        try:
            new_fd = self._open()
        except AuditLogError as e:
            self._log.error("audit log not reopened: {error}", error=str(e))
            return
        old_fd, self._fd = self._fd, new_fd
        if old_fd >= 0:
            os.close(old_fd)
        self._log.info("audit log {path} reopened", path=self.path)

    def close(self) -> None:
        """Close the file (after the consoles, whose clients' detaches it logs)."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


class _NoTrail:
    """The trail of an attachment when nothing is audited."""

    def input(self, data: bytes, refused: str | None) -> None:
        pass

    def flush(self) -> None:
        pass

    def detached(self) -> None:
        pass


class NoAudit:
    """No audit log: every call does nothing (so the doors need no branches)."""

    _trail = _NoTrail()

    def attached(self, console: str | None, label: ClientLabel, read_only: bool) -> _NoTrail:
        return self._trail

    def refused(
        self,
        front: str,
        reason: str,
        address: str,
        identity: str | None = None,
        console: str | None = None,
        **detail: Any,
    ) -> None:
        pass

    def action(self, console: str | None, label: ClientLabel, action: str, **detail: Any) -> None:
        pass


#: What the doors use when there is no audit log.
NO_AUDIT = NoAudit()

#: Either of the two: what a door is given.
Audit = AuditLog | NoAudit

#: An attachment's trail, audited or not.
Trail = AuditTrail | _NoTrail
