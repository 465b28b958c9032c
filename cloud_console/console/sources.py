"""
Where a console is: the C{--console SOURCE} forms, and resolving one into a L{Target}.

A VM's serial console is not always at a fixed path. QEMU and cloud-hypervisor allocate a
fresh pty (C{/dev/pts/N}) when they start, and cloud-hypervisor may allocate another when
the guest reboots; only the VMM knows the current one. So a source names I{how to find}
the console, and it is resolved again every time the console has to be (re)opened: at
start-up, after the guest reboots, after the VMM restarts.

Forms (L{ACCEPTED_FORMS}):

  - C{pty:PATH} or a bare path: a pty slave, or a symlink to one. Resolving returns the
    path as given; whoever opens it follows the symlink then, so a symlink that a VMM
    or udev re-points is followed at each reopen.
  - C{unix:PATH}: a unix stream socket the VMM listens on (QEMU's socket chardev with
    C{server=on}, cloud-hypervisor's C{--serial socket=PATH}, Proxmox's C{serial0: socket}).
  - C{telnet+unix:PATH}: the same, in telnet mode (QEMU's socket chardev with
    C{telnet=on}): spoken to in telnet (L{cloud_console.console.telnet}), which is how a
    serial BREAK reaches the guest.
  - C{cloud-hypervisor:API_SOCKET}: ask cloud-hypervisor's REST API (C{GET
    /api/v1/vm.info}) for the serial port's pty or socket.
  - C{qmp:QMP_SOCKET[:chardev=LABEL]}: ask QEMU over QMP (C{query-chardev}) for the
    chardev's pty or socket.

Resolution is B{blocking} code with short timeouts, on purpose: it runs once at start-up,
before the reactor runs (so a bad source fails start-up with a clear message), and later
in a worker thread (C{deferToThread}) when the console must be reopened. Nothing here
touches the reactor, and nothing here opens the target itself: that, and deciding when to
resolve again, belongs to the caller.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import re
import socket
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal

#: One line naming every accepted SOURCE form, for usage errors.
ACCEPTED_FORMS = (
    "pty:PATH (or a bare PATH), unix:PATH, telnet+unix:PATH, cloud-hypervisor:API_SOCKET, "
    "qmp:QMP_SOCKET[:chardev=LABEL]"
)

#: What a URL-like scheme looks like. Anything starting like this is taken as a scheme
#: and must be a known one: a typo such as C{tpc:...} or an unsupported C{tcp:host:1}
#: must fail loudly rather than be opened as a relative file named "tcp:host:1".
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")

#: A pty numbered by the kernel. After a hang-up the number is free for the next pty
#: anyone allocates, so reopening it could attach to another VM or a user's terminal.
_NUMBERED_PTY = re.compile(r"/dev/pts/[0-9]+")

#: cloud-hypervisor states in which the serial device may exist. C{Created} included:
#: current releases make the pty at vm.create, and holding it before vm.boot is how the
#: boot's very first bytes are kept. C{BreakPoint} is a guest stopped in the gdb stub.
_CH_LIVE_STATES = ("Created", "Running", "Paused", "BreakPoint")

#: Answers larger than this are not a vm.info or a QMP reply: refuse rather than buffer.
_MAX_ANSWER = 1 << 20


class SourceError(Exception):
    """
    A source that exists but is not usable now: one line an operator can act on.

    Raised by L{Source.resolve}; the message names the source and what is wrong (not
    reachable, the VM is not running, the serial port goes elsewhere...), never a
    traceback, since it goes straight to the log or the terminal.
    """


@dataclass(frozen=True)
class Target:
    """
    What a source resolved to: a pty path to open, or a unix socket path to connect to.

    A pty path may be a symlink; the opener follows it at open time.
    """

    kind: Literal["pty", "unix"]
    path: str
    #: A unix socket that speaks telnet (QEMU's C{telnet=on}).
    telnet: bool = False

    def __str__(self) -> str:
        """
        Render for logs: C{pty /dev/pts/4}, C{unix socket /run/vm.sock}.
        """
        if self.kind == "unix":
            return f"{'telnet ' if self.telnet else ''}unix socket {self.path}"
        return f"pty {self.path}"


class Source(ABC):
    """
    A parsed C{--console SOURCE}: knows how to find the console, again each time.

    @ivar text: the SOURCE as given, for logs (also C{str(source)}).
    """

    text: str

    @property
    def follows_reboots(self) -> bool:
        """
        Whether resolving again after the console hung up can find the same VM's console.

        True except for a literal C{/dev/pts/N}, whose number the kernel hands to the next
        pty allocated: the caller uses this to refuse C{--reopen} on such a source.
        """
        return True

    @abstractmethod
    def resolve(self, timeout: float = 2.0) -> Target:
        """
        Find the console now. Blocking; each wait on a peer is bounded by C{timeout}.

        @raise SourceError: the source cannot give a usable console now.
        """

    def __str__(self) -> str:
        """
        The SOURCE as the operator wrote it.
        """
        return self.text


@dataclass(frozen=True)
class PtySource(Source):
    """
    C{pty:PATH} or a bare path: a pty slave or a symlink to one.
    """

    text: str
    path: str

    @property
    def follows_reboots(self) -> bool:
        """
        False for a literal C{/dev/pts/N} (its number is reused); true for a symlink or
        any other name, which whoever maintains it can point at the VM's new pty.
        """
        return _NUMBERED_PTY.fullmatch(os.path.normpath(self.path)) is None

    def resolve(self, timeout: float = 2.0) -> Target:
        """
        The path as given: not dereferenced here, so a re-pointed symlink is followed
        when the opener opens it. Errors opening it are the opener's to report.
        """
        return Target("pty", self.path)


@dataclass(frozen=True)
class UnixSource(Source):
    """
    C{unix:PATH}: a unix stream socket the VMM listens on for the serial console.
    """

    text: str
    path: str

    def resolve(self, timeout: float = 2.0) -> Target:
        """
        The socket path as given; connecting (and its errors) is the opener's.
        """
        return Target("unix", self.path)


@dataclass(frozen=True)
class TelnetUnixSource(Source):
    """
    C{telnet+unix:PATH}: a unix stream socket the VMM speaks telnet on (QEMU's socket
    chardev with C{server=on,telnet=on}); it can carry a serial BREAK.
    """

    text: str
    path: str

    def resolve(self, timeout: float = 2.0) -> Target:
        """The socket path as given, in telnet mode; connecting is the opener's."""
        return Target("unix", self.path, telnet=True)


@dataclass(frozen=True)
class CloudHypervisorSource(Source):
    """
    C{cloud-hypervisor:API_SOCKET}: ask cloud-hypervisor where its serial port is.

    cloud-hypervisor (C{--serial pty}) allocates the pty when the VM is created or
    booted and reports its path in C{vm.info}'s C{config.serial.file}; with C{--serial
    socket=PATH} (v36.0 and later) it listens on C{config.serial.socket}. Both can
    change across a shutdown and boot, or a VMM restart, hence asking each time.
    """

    text: str
    api_socket: str

    def resolve(self, timeout: float = 2.0) -> Target:
        """
        C{GET /api/v1/vm.info} over the API socket, then read C{state} and
        C{config.serial}.

        @raise SourceError: the API is unreachable or answers something unexpected, no
            VM is created, the VM is not running, or its serial port is not a pty or a
            socket.
        """
        status, reason, body = self._get_vm_info(timeout)
        where = f"cloud-hypervisor API {self.api_socket}"
        if status == 404 or (status == 500 and b"not created" in body.lower()):
            # The documented answer for "no VM" is 404; releases before that answered
            # 500 with the same message ("VM is not created").
            raise SourceError(f"{where}: no VM is created (vm.info: HTTP {status})")
        if status != 200:
            raise SourceError(
                f"{where}: vm.info failed with HTTP {status} {reason}: {_brief(body)}"
            )
        try:
            info = json.loads(body)
        except ValueError:
            raise SourceError(f"{where}: vm.info answer is not JSON: {_brief(body)}") from None
        return _serial_target(info, where)

    def _get_vm_info(self, timeout: float) -> tuple[int, str, bytes]:
        """
        One HTTP/1.1 request over the unix socket; the connection is always closed.

        @return: status, reason phrase, body (at most L{_MAX_ANSWER} bytes).
        """
        connection = _UnixHTTPConnection(self.api_socket, timeout)
        try:
            connection.request(
                "GET", "/api/v1/vm.info", headers={"Accept": "application/json"}
            )
            response = connection.getresponse()
            body = response.read(_MAX_ANSWER + 1)
        except OSError as e:
            raise SourceError(
                f"cannot reach cloud-hypervisor API socket {self.api_socket}: "
                f"{_os_reason(e, timeout)}"
            ) from None
        except http.client.HTTPException as e:
            raise SourceError(
                f"cloud-hypervisor API socket {self.api_socket} did not answer in HTTP: "
                f"{type(e).__name__} {_brief(str(e))}"
            ) from None
        finally:
            connection.close()
        if len(body) > _MAX_ANSWER:
            raise SourceError(
                f"cloud-hypervisor API socket {self.api_socket}: vm.info answer is "
                f"larger than {_MAX_ANSWER} bytes"
            )
        return response.status, response.reason, body


@dataclass(frozen=True)
class QmpSource(Source):
    """
    C{qmp:QMP_SOCKET[:chardev=LABEL]}: ask QEMU which pty or socket a chardev has.

    Without a label, C{charserial0} (the name libvirt gives the first serial port's
    chardev) is preferred, then C{serial0} (what C{-serial pty} creates).
    """

    text: str
    qmp_socket: str
    label: str | None = None

    def resolve(self, timeout: float = 2.0) -> Target:
        """
        Greeting, C{qmp_capabilities}, C{query-chardev}, and hang up.

        The whole exchange is bounded by C{timeout}, and the connection is closed
        before returning: QEMU serves one client at a time on a QMP socket, so holding
        it would lock out the operator's own tools.

        @raise SourceError: the socket is unreachable or silent, the peer does not speak
            QMP, or the chardev is missing or not a pty or a unix socket server.
        """
        chardevs = self._query_chardevs(timeout)
        label = self._choose_label(chardevs)
        return _chardev_target(label, chardevs[label], self.qmp_socket)

    def _choose_label(self, chardevs: dict[str, str]) -> str:
        """
        The label asked for, or the default preference; an error lists what exists.
        """
        available = ", ".join(sorted(chardevs)) or "none"
        if self.label is not None:
            if self.label not in chardevs:
                raise SourceError(
                    f"QEMU at {self.qmp_socket} has no chardev {self.label!r}; "
                    f"it has: {available}"
                )
            return self.label
        for label in ("charserial0", "serial0"):
            if label in chardevs:
                return label
        raise SourceError(
            f"QEMU at {self.qmp_socket} has neither chardev charserial0 nor serial0 "
            f"(it has: {available}); name one with qmp:{self.qmp_socket}:chardev=LABEL"
        )

    def _query_chardevs(self, timeout: float) -> dict[str, str]:
        """
        Run the QMP exchange and return C{{label: filename}}.
        """
        deadline = time.monotonic() + timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            try:
                sock.connect(self.qmp_socket)
            except OSError as e:
                raise SourceError(
                    f"cannot reach QMP socket {self.qmp_socket}: {_os_reason(e, timeout)}"
                ) from None
            conversation = _QmpConversation(sock, self.qmp_socket, deadline, timeout)
            greeting = conversation.read_message("greeting")
            if not isinstance(greeting.get("QMP"), dict):
                raise SourceError(
                    f"QMP socket {self.qmp_socket} did not greet like QEMU: "
                    f"{_brief(json.dumps(greeting))}"
                )
            conversation.execute("qmp_capabilities")
            chardevs = conversation.execute("query-chardev")
        finally:
            sock.close()
        return _chardev_filenames(chardevs, self.qmp_socket)


def parse_source(text: str) -> Source:
    """
    Parse a C{--console SOURCE}.

    A bare path is anything not starting with a scheme (C{/tmp/a:b}, C{vm1.console});
    a relative path that looks like one needs a C{./} in front.

    @raise ValueError: an empty source, an empty path, or an unknown scheme; the
        message names the accepted forms.
    """
    if not text:
        raise ValueError(f"empty console source; accepted: {ACCEPTED_FORMS}")
    match = _SCHEME.match(text)
    if match is None:
        return PtySource(text, text)
    scheme = match.group()[:-1]
    rest = text[match.end() :]
    if scheme == "pty":
        return PtySource(text, _nonempty(rest, text))
    if scheme == "unix":
        return UnixSource(text, _nonempty(rest, text))
    if scheme == "telnet+unix":
        return TelnetUnixSource(text, _nonempty(rest, text))
    if scheme == "cloud-hypervisor":
        return CloudHypervisorSource(text, _nonempty(rest, text))
    if scheme == "qmp":
        path, sep, label = rest.rpartition(":chardev=")
        if not sep:
            return QmpSource(text, _nonempty(rest, text))
        if not label:
            raise ValueError(
                f"empty chardev label in console source {text!r}; accepted: {ACCEPTED_FORMS}"
            )
        return QmpSource(text, _nonempty(path, text), label)
    raise ValueError(
        f"unknown console source scheme {scheme + ':'!r} in {text!r} (a relative path "
        f"containing ':' needs ./ in front); accepted: {ACCEPTED_FORMS}"
    )


def _nonempty(path: str, text: str) -> str:
    """
    The path of a C{scheme:PATH} source, refused when empty.
    """
    if not path:
        raise ValueError(f"no path in console source {text!r}; accepted: {ACCEPTED_FORMS}")
    return path


class _UnixHTTPConnection(http.client.HTTPConnection):
    """
    HTTP/1.1 over a unix stream socket (cloud-hypervisor's API has no TCP listener).
    """

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._socket_path = path

    def connect(self) -> None:
        """
        Connect to the unix socket instead of resolving a host name.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _serial_target(info: Any, where: str) -> Target:
    """
    Read a vm.info body: the VM must be live and its serial a pty or a socket.
    """
    if not isinstance(info, dict):
        raise SourceError(f"{where}: vm.info answer is not an object: {_brief(json.dumps(info))}")
    state = info.get("state")
    config = info.get("config")
    serial = config.get("serial") if isinstance(config, dict) else None
    if not isinstance(state, str) or not isinstance(serial, dict):
        raise SourceError(
            f"{where}: vm.info answer lacks state or config.serial: {_brief(json.dumps(info))}"
        )
    if state not in _CH_LIVE_STATES:
        raise SourceError(f"{where}: the VM is {state}, not running")
    mode = serial.get("mode")
    if mode == "Pty":
        path = serial.get("file")
        if not isinstance(path, str) or not path:
            raise SourceError(f"{where}: the serial port is a pty but vm.info gives no path")
        return Target("pty", path)
    if mode == "Socket":
        path = serial.get("socket")
        if not isinstance(path, str) or not path:
            raise SourceError(
                f"{where}: the serial port is a socket but vm.info gives no path"
            )
        return Target("unix", path)
    where_it_goes = {
        "Off": "the VM has no serial port",
        "Null": "its output is discarded",
        "Tty": "it is cloud-hypervisor's own terminal",
        "File": f"its output goes to the file {serial.get('file')}",
    }.get(mode if isinstance(mode, str) else "", "a mode cloud-console does not know")
    raise SourceError(
        f"{where}: the serial port is in mode {mode} ({where_it_goes}); "
        f"start cloud-hypervisor with --serial pty or --serial socket=PATH"
    )


class _QmpConversation:
    """
    Newline-delimited JSON over a connected QMP socket, all under one deadline.
    """

    def __init__(self, sock: socket.socket, path: str, deadline: float, timeout: float):
        self._sock = sock
        self._path = path
        self._deadline = deadline
        self._timeout = timeout
        self._buffer = b""

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """
        Send one command (with its C{arguments}, if any) and return its C{return}
        value, skipping events.
        """
        message: dict[str, Any] = {"execute": command}
        if arguments is not None:
            message["arguments"] = arguments
        self._sock.sendall(json.dumps(message).encode() + b"\n")
        while True:
            message = self.read_message(f"answer to {command}")
            if "event" in message:
                continue
            if "return" in message:
                return message["return"]
            if "error" in message:
                error = message["error"]
                desc = error.get("desc") if isinstance(error, dict) else error
                raise SourceError(f"QEMU at {self._path} refused {command}: {desc}")
            raise SourceError(
                f"QMP socket {self._path} answered {command} with "
                f"{_brief(json.dumps(message))}"
            )

    def read_message(self, what: str) -> dict[str, Any]:
        """
        The next JSON object, one per line.
        """
        line = self._read_line(what)
        try:
            message = json.loads(line)
        except ValueError:
            raise SourceError(
                f"QMP socket {self._path} sent something that is not JSON as its {what}: "
                f"{_brief(line)}"
            ) from None
        if not isinstance(message, dict):
            raise SourceError(
                f"QMP socket {self._path} sent {_brief(line)} as its {what}"
            )
        return message

    def _read_line(self, what: str) -> bytes:
        """
        Receive until a newline, never past the deadline nor L{_MAX_ANSWER} bytes.
        """
        while b"\n" not in self._buffer:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                raise self._silent(what)
            self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                raise self._silent(what) from None
            except OSError as e:
                raise SourceError(
                    f"QMP socket {self._path} failed while waiting for its {what}: "
                    f"{_os_reason(e, self._timeout)}"
                ) from None
            if not data:
                raise SourceError(
                    f"QMP socket {self._path} closed the connection before its {what}"
                )
            self._buffer += data
            if len(self._buffer) > _MAX_ANSWER:
                raise SourceError(
                    f"QMP socket {self._path} sent more than {_MAX_ANSWER} bytes "
                    f"without a newline"
                )
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def _silent(self, what: str) -> SourceError:
        """
        The error for a peer that let the deadline pass.
        """
        hint = ""
        if what == "greeting":
            hint = " (QEMU serves one QMP client at a time: is another one connected?)"
        return SourceError(
            f"QMP socket {self._path} sent no {what} within {self._timeout:g} s{hint}"
        )


def _chardev_filenames(chardevs: Any, path: str) -> dict[str, str]:
    """
    C{query-chardev}'s list of C{{label, filename, ...}} as a C{{label: filename}} map.
    """
    if not isinstance(chardevs, list):
        raise SourceError(
            f"QMP socket {path}: query-chardev returned {_brief(json.dumps(chardevs))}"
        )
    found: dict[str, str] = {}
    for chardev in chardevs:
        if (
            not isinstance(chardev, dict)
            or not isinstance(chardev.get("label"), str)
            or not isinstance(chardev.get("filename"), str)
        ):
            raise SourceError(
                f"QMP socket {path}: query-chardev returned an entry without label "
                f"and filename: {_brief(json.dumps(chardev))}"
            )
        found[chardev["label"]] = chardev["filename"]
    return found


def _chardev_target(label: str, filename: str, qmp_path: str) -> Target:
    """
    Interpret a chardev's C{filename} as QEMU reports it.

    A pty chardev reads C{pty:/dev/pts/N}. A unix socket chardev QEMU listens on reads
    C{disconnected:unix:PATH,server=on} while no client is connected and
    C{unix:PATH,server=on} while one is (older QEMU wrote C{,server}). Others read
    C{file}, C{null}, C{stdio}, C{disconnected:tcp:HOST:PORT,server=on}...
    """
    where = f"QEMU at {qmp_path}: chardev {label}"
    if filename.startswith("pty:") and len(filename) > len("pty:"):
        return Target("pty", filename[len("pty:") :])
    address = filename.removeprefix("disconnected:")
    if address.startswith("unix:"):
        path, *options = address[len("unix:") :].split(",")
        if "abstract=on" in options:
            raise SourceError(f"{where} is an abstract unix socket, which has no path")
        if not {"server", "server=on"} & set(options):
            # QEMU 7.2 reports a connected client as a bare "unix:" (no path).
            raise SourceError(
                f"{where} is a unix socket client ({filename}): QEMU connects out "
                f"instead of listening; give the chardev server=on"
            )
        if not path:
            raise SourceError(f"{where} is a unix socket without a path: {filename}")
        return Target("unix", path)
    raise SourceError(
        f"{where} reports {filename!r}: not a pty or a unix socket QEMU listens on"
    )


def _os_reason(e: OSError, timeout: float) -> str:
    """
    A short human reason for a socket error ("Connection refused", "no such file").
    """
    if isinstance(e, TimeoutError):
        return f"no answer within {timeout:g} s"
    if e.errno == errno.ENOENT:
        return "no such file"
    if e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _brief(data: bytes | str, limit: int = 80) -> str:
    """
    A peer's answer quoted for an error line: at most C{limit} characters, as a repr.
    """
    if isinstance(data, bytes):
        data = data.decode("utf-8", "replace")
    if len(data) > limit:
        return repr(data[:limit]) + "..."
    return repr(data)
