"""
An SSH session on a console: the user name is the console, the channel is a viewer.

An attached session is one more client of the console's multiplexer, exactly as a page
is: it gets the boot's head, the "not kept" line and the tail, then every new byte; what
it types goes to the guest through the same input path (read-only credentials refused,
the backlog bounded); it shares flow control with the pages. The channel's window closing
(the user's C{ssh} stopped reading) pauses the session, as a full socket pauses a page;
the console waits for it at most C{--max-stall}, then it falls behind, catches up from the
history, and is told in one line how many bytes it lost.

C{history} and C{status} as the command (C{ssh -T NAME@host history}) print the history
or the status and exit; no command attaches. Escape commands (L{cloud_console.ssh.escape})
are handled here.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.conch.avatar import ConchUser
from twisted.conch.error import ConchError
from twisted.conch.ssh import connection, session
from twisted.conch.ssh.channel import SSHChannel
from twisted.conch.ssh.common import getNS
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..access.audit import NO_AUDIT, Audit, Trail
from ..access.policy import Access
from ..console.actions import ActionError, ActionRequest
from ..console.console import Console
from ..console.multiplexer import (
    CLOSE_CONSOLE_CLOSED,
    Attachment,
    Chunk,
    ClientLabel,
    IActionNotices,
    IConsoleClient,
    skip_marker,
)
from . import CONCH_LOG
from .auth import AuthFailures, SSHLogin
from .escape import Command, EscapeReader, describe_escape

#: Output this small is handed to the socket at once (an echo, a prompt); see
#: L{ConsoleChannel.output}.
INTERACTIVE_OUTPUT = 1024

_log = Logger()

#: Seconds a closed session's client has to close the channel before the connection is
#: dropped (as the WebSocket side's close handshake timeout).
CLOSE_TIMEOUT = 5.0

#: Exit statuses: a console this key may not open (or none of that name), and a command
#: this door does not know.
EXIT_NO_CONSOLE = 1
EXIT_UNKNOWN_COMMAND = 2


class ConsoleDirectory(Protocol):
    """What the SSH door needs of the consoles: find one by the name a user asked for."""

    @property
    def single(self) -> bool:
        """One console (the original command line): any user name opens it."""

    def find(self, name: str) -> Console | None: ...

    def names(self) -> list[str]: ...

    def total_viewers(self) -> int: ...


@dataclass
class SSHSettings:
    """What every SSH session of one server shares."""

    #: The escape prefix (two bytes: a control character and a letter).
    escape: bytes = b"\x05c"
    #: Viewers at once on one console (pages and SSH sessions together).
    max_clients: int = 256
    #: Viewers at once over every console (0: no limit).
    max_clients_total: int = 0


class SSHDoor:
    """The SSH door's shared state: the consoles, settings, clock and counts."""

    def __init__(
        self,
        consoles: ConsoleDirectory,
        settings: SSHSettings,
        clock: IReactorTime,
        failures: AuthFailures | None = None,
        audit: Audit = NO_AUDIT,
    ) -> None:
        self.consoles = consoles
        self.settings = settings
        self.clock = clock
        self.failures = failures if failures is not None else AuthFailures()
        #: Where logins refused, sessions and their input are audited (C{--audit-log}).
        self.audit = audit
        #: Sessions refused for a limit.
        self.refused_limit = 0


class ConsoleUser(ConchUser):
    """
    The avatar of an authenticated connection: it may open one session channel (one
    console session per connection), and nothing else (no forwarding of any kind).
    """

    _log = CONCH_LOG

    def __init__(self, login: SSHLogin, door: SSHDoor) -> None:
        ConchUser.__init__(self)
        self.login = login
        self.door = door
        self.sessions = 0
        self.channelLookup[b"session"] = self._session

    def _session(self, **kwargs: Any) -> ConsoleChannel:
        if self.sessions:
            raise ConchError(
                "one console session per connection", connection.OPEN_ADMINISTRATIVELY_PROHIBITED
            )
        self.sessions += 1
        return ConsoleChannel(**kwargs)


@implementer(IPushProducer)
class _SocketFlow:
    """Pauses the session while the connection's socket holds more than its buffer."""

    def __init__(self, channel: ConsoleChannel) -> None:
        self.channel = channel

    def pauseProducing(self) -> None:
        if self.channel.attachment is not None:
            self.channel.attachment.pause("transport")

    def resumeProducing(self) -> None:
        if self.channel.attachment is not None:
            self.channel.attachment.resume("transport")

    def stopProducing(self) -> None:
        self.channel.detach()


@implementer(IConsoleClient, IActionNotices)
class ConsoleChannel(SSHChannel):
    """One SSH session channel: a console viewer, or a command's output."""

    _log = CONCH_LOG
    name = b"session"

    def __init__(self, avatar: ConsoleUser, **kwargs: Any) -> None:
        SSHChannel.__init__(self, avatar=avatar, **kwargs)
        self.user = avatar
        self.door = avatar.door
        self.window: tuple[int, int] | None = None
        self.attachment: Attachment | None = None
        self.trail: Trail | None = None
        self.console: Console | None = None
        self.reader = EscapeReader(self.door.settings.escape)
        self.started = False
        self._told: set[str] = set()
        self._exit_status: int | None = None
        self._finished = False
        self._closed: Deferred[None] | None = None
        self._close_timer: IDelayedCall | None = None
        #: The identity's access to the console attached (for the control right).
        self.access: Access | None = None
        #: The escape C{k} was typed: the next byte is the SysRq key.
        self._sysrq_next = False

    # -- requests ------------------------------------------------------------------

    def request_pty_req(self, data: bytes) -> int:
        _term, (rows, cols, _x, _y), _modes = session.parseRequest_pty_req(data)
        self.window = (rows, cols)
        return 1

    def request_window_change(self, data: bytes) -> int:
        rows, cols, _x, _y = session.parseRequest_window_change(data)
        self.window = (rows, cols)
        return 1

    def request_shell(self, data: bytes) -> int:
        return self._begin(b"")

    def request_exec(self, data: bytes) -> int:
        return self._begin(getNS(data)[0])

    def _begin(self, command: bytes) -> int:
        if self.started:
            return 0
        self.started = True
        # After the request's reply: output before it would reach the client first.
        self.door.clock.callLater(0, self._run, command.strip())
        return 1

    def _run(self, command: bytes) -> None:
        if self.closing:
            return
        login = self.user.login
        console = self._console(login)
        if console is None:
            return
        if command == b"":
            self._attach(console, login)
        elif command == b"history":
            self.write(console.multiplexer.replay())
            self._finish(0)
        elif command == b"status":
            body = json.dumps(console.status().to_json(), indent=2) + "\n"
            self.write(body.encode("utf-8"))
            self._finish(0)
        else:
            shown = command.decode("utf-8", "replace")[:80]
            self._error(
                f"unknown command {shown!r}: use 'history', 'status', or no command to attach",
                EXIT_UNKNOWN_COMMAND,
            )

    def _console(self, login: SSHLogin) -> Console | None:
        """The console the user name names, if this identity may open it; else say so."""
        consoles = self.door.consoles
        name = None if consoles.single else login.username
        identity = login.identity
        console = consoles.find(login.username)
        if console is not None and identity.access_for(name) is not None:
            return console
        if consoles.single:
            self._error("this key may not open this console", EXIT_NO_CONSOLE)
            return None
        visible = identity.visible(consoles.names())
        self._error(
            f"no console {login.username!r} for this key; it may open: "
            + (", ".join(visible) or "none"),
            EXIT_NO_CONSOLE,
        )
        return None

    def _attach(self, console: Console, login: SSHLogin) -> None:
        settings = self.door.settings
        multiplexer = console.multiplexer
        if multiplexer.closed_reason is not None:
            self._error(f"console closed: {multiplexer.closed_reason}", EXIT_NO_CONSOLE)
            return
        if multiplexer.viewer_count >= settings.max_clients:
            self._refused_limit(console, login)
            self._error(f"{settings.max_clients} clients on this console already", EXIT_NO_CONSOLE)
            return
        total = settings.max_clients_total
        if total and self.door.consoles.total_viewers() >= total:
            self._refused_limit(console, login)
            self._error(f"{total} clients on all consoles already", EXIT_NO_CONSOLE)
            return
        identity = login.identity
        access = identity.access_for(None if self.door.consoles.single else console.name)
        read_only = access is not None and access.read_only
        self.access = access
        self.console = console
        label = ClientLabel("ssh", identity.name, login.address, self.door.clock.seconds())
        self.attachment = multiplexer.attach(
            self, None, start=False, read_only=read_only, label=label
        )
        self.trail = self.door.audit.attached(
            console.name, label, read_only or multiplexer.read_only
        )
        tcp = getattr(getattr(self.conn, "transport", None), "transport", None)
        if tcp is not None and getattr(tcp, "producer", None) is None:
            tcp.registerProducer(_SocketFlow(self), True)
        self._closed = Deferred()
        _log.info(
            "SSH session on console {console}: {identity} ({fingerprint}) from {address}"
            "{mode}",
            console=console.name or "-",
            identity=identity.name,
            fingerprint=identity.fingerprint,
            address=login.address,
            mode=", read-only" if read_only else "",
            front="ssh",
        )
        multiplexer.start(self.attachment)

    def _refused_limit(self, console: Console, login: SSHLogin) -> None:
        self.door.refused_limit += 1
        self.door.audit.refused("ssh", "limit", login.address, login.identity.name, console.name)

    # -- what the user types -------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.attachment is None:
            return
        for item in self.reader.feed(data):
            if isinstance(item, Command):
                if self._sysrq_next:
                    self._sysrq_next = False
                    self._line("SysRq cancelled")
                self._escape(item.letter)
                continue
            if self._sysrq_next and item:
                # The escape k took the next byte as the SysRq key, not as input.
                self._sysrq_next = False
                self._act(ActionRequest("sysrq", chr(item[0])))
                item = item[1:]
            if item:
                self._send(item)

    def _send(self, data: bytes) -> None:
        attachment = self.attachment
        if attachment is None:
            return
        refused = attachment.send_input(data)
        if self.trail is not None:
            self.trail.input(data, refused)
        if refused is not None and refused not in self._told:
            self._told.add(refused)  # once per reason, not per keystroke
            self._line(f"input not sent: {refused}")

    def _escape(self, letter: str) -> None:
        prefix = describe_escape(self.door.settings.escape)
        if letter == ".":
            self._line("disconnected")
            self._finish(0)
        elif letter == "?":
            self._help(prefix)
        elif letter == "w":
            self._who()
        elif letter == "r":
            if self.console is not None:
                self._line("replaying the history")
                self.write(self.console.multiplexer.replay())
                self._line("end of the history")
        elif letter == "b":
            self._act(ActionRequest("break"))
        elif letter == "k":
            if self._may_control():
                self._sysrq_next = True
                self._line("SysRq: type the key (h: the kernel's help, t: tasks, w: blocked tasks)")
        elif letter == "s":
            if self.window is None:
                self._line("no window size known (ssh did not ask for a terminal; try ssh -t)")
                return
            rows, cols = self.window
            self._send(f"stty rows {rows} cols {cols}\r".encode("ascii"))
        else:
            self._line(f"unknown escape {letter!r}; {prefix}? for help")

    def _may_control(self) -> bool:
        """Whether this session has the control right on its console; else say so."""
        if self.access is not None and self.access.may_control:
            return True
        self._line("this key has no control right on this console (authorized_keys option control, or a control: principal)")
        return False

    def _act(self, request: ActionRequest) -> None:
        """Do an action for this session's identity; a failure is told here, success to all."""
        console = self.console
        if console is None or not self._may_control():
            return
        d = console.actions.perform(request, self.user.login.identity.name, "ssh")

        def failed(failure: Failure) -> None:
            failure.trap(ActionError)
            self._line(f"{request.describe()} not sent: {failure.getErrorMessage()}")

        d.addCallbacks(lambda at: None, failed)
        d.addErrback(lambda failure: _log.failure("action {action}", failure, action=request.describe()))

    def _help(self, prefix: str) -> None:
        lines = [
            f"escapes: {prefix} then",
            "  .  disconnect",
            "  ?  this help",
            "  w  who is on this console",
            "  r  replay the history",
            "  s  set the guest's terminal size to this window (stty rows R cols C)",
            "  b  send a serial BREAK (where the console can; needs the control right)",
            "  k  then a key: Magic SysRq (k h: the kernel's help; needs the control right)",
            f"  {prefix} typed twice sends it to the guest",
        ]
        self.write(("\r\n" + "\r\n".join(lines) + "\r\n").encode("utf-8"))

    def _who(self) -> None:
        if self.console is None:
            return
        rows = []
        for label, read_only in self.console.multiplexer.viewers():
            mode = "read-only" if read_only else "read-write"
            if label is None:
                rows.append(f"  ?     -  -  {mode}")
                continue
            since = time.strftime("%H:%M:%S", time.gmtime(label.since))
            rows.append(f"  {label.front:<4} {label.identity}  {label.address}  {mode}  since {since}Z")
        self.write(("\r\n[-- on this console --]\r\n" + "\r\n".join(rows) + "\r\n").encode("utf-8"))

    # -- IConsoleClient ------------------------------------------------------------

    def output(self, chunk: Chunk) -> None:
        self.write(chunk.data)
        if len(chunk.data) <= INTERACTIVE_OUTPUT:
            self._write_now()

    def _write_now(self) -> None:
        """
        Hand a small write to the socket in this reactor turn, not the next (a console
        flooding beside this one makes turns long); bulk output keeps the socket's pace.
        """
        tcp: Any = getattr(getattr(self.conn, "transport", None), "transport", None)
        write = getattr(tcp, "doWrite", None)
        if write is not None and tcp.connected and not tcp.disconnecting:
            write()

    def gap(self, lost_from: int, lost_to: int, reason: str) -> bool:
        lost = lost_to - lost_from
        _log.info(
            "SSH session from {address} lost {lost} bytes ({reason})",
            address=self.user.login.address,
            lost=lost,
            reason=reason,
        )
        self._line(f"{lost:,} bytes lost: this session fell behind the history")
        return True

    def skip(self, skip_from: int, skip_to: int) -> None:
        self.write(skip_marker(skip_to - skip_from))

    def clients_changed(self, count: int) -> None:
        pass

    def console_state(self, up: bool, reason: str, since: str) -> None:
        self._line(f"console {'up' if up else 'down'}: {reason} -- {since}")

    def action_done(self, who: str, description: str, at: str) -> None:
        """Someone used an action on this console: one line, as the page says it."""
        self._line(f"{who} sent {description} at {at[11:19]}Z")

    def close(self, code: int, reason: str) -> Deferred[None]:
        """
        Say why, exit, and fire once the client has closed the channel, or after
        L{CLOSE_TIMEOUT} seconds, when the connection is dropped (a client that stopped
        reading never would, and a server stopping waits for this).
        """
        closed = self._closed
        self.detach()
        if closed is None or self._finished:
            return succeed(None)
        self._line(reason)
        self._finish(2 if code == CLOSE_CONSOLE_CLOSED else 0)
        if self._closed is not None and self._close_timer is None:
            self._close_timer = self.door.clock.callLater(CLOSE_TIMEOUT, self._drop)
        return closed

    def _drop(self) -> None:
        self._close_timer = None
        _log.info(
            "SSH session from {address} did not close within {seconds} s; dropped",
            address=self.user.login.address,
            seconds=CLOSE_TIMEOUT,
        )
        tcp: Any = getattr(getattr(self.conn, "transport", None), "transport", None)
        if tcp is not None:
            tcp.abortConnection()
        self.closed()

    # -- flow control and the end ------------------------------------------------

    def stopWriting(self) -> None:
        if self.attachment is not None:
            self.attachment.pause("channel")

    def startWriting(self) -> None:
        if self.attachment is not None:
            self.attachment.resume("channel")

    def addWindowBytes(self, data: int) -> None:
        SSHChannel.addWindowBytes(self, data)
        self._finish_when_sent()

    def _line(self, text: str) -> None:
        """A line of ours in the stream, set apart from the guest's (conserver's style)."""
        self.write(f"\r\n[-- {text} --]\r\n".encode("utf-8", "replace"))

    def _error(self, text: str, status: int) -> None:
        self.writeExtended(connection.EXTENDED_DATA_STDERR, (text + "\n").encode("utf-8", "replace"))
        self._finish(status)

    def _finish(self, status: int) -> None:
        """Exit with C{status} once what was written has gone out."""
        self.detach()
        if self._exit_status is None:
            self._exit_status = status
        self._finish_when_sent()

    def _finish_when_sent(self) -> None:
        if self._exit_status is None or self._finished or self.buf or self.extBuf:
            return
        self._finished = True
        conn = self.conn
        assert conn is not None
        conn.sendRequest(self, b"exit-status", struct.pack(">L", self._exit_status))
        conn.sendEOF(self)
        self.loseConnection()

    def detach(self) -> None:
        """Stop getting output (idempotent)."""
        attachment, self.attachment = self.attachment, None
        if attachment is None:
            return
        attachment.detach()
        trail, self.trail = self.trail, None
        if trail is not None:
            trail.detached()
        login = self.user.login
        _log.info(
            "SSH session left console {console}: {identity} ({fingerprint}) from {address}",
            console=self.console.name if self.console is not None else "-",
            identity=login.identity.name,
            fingerprint=login.identity.fingerprint,
            address=login.address,
            front="ssh",
        )
        tcp = getattr(getattr(self.conn, "transport", None), "transport", None)
        if tcp is not None and isinstance(getattr(tcp, "producer", None), _SocketFlow):
            tcp.unregisterProducer()

    def eofReceived(self) -> None:
        """The user's input ended (C{ssh < file}): the session goes on showing output."""

    def closed(self) -> None:
        self.detach()
        if self._close_timer is not None:
            if self._close_timer.active():
                self._close_timer.cancel()
            self._close_timer = None
        closed, self._closed = self._closed, None
        if closed is not None:
            closed.callback(None)
