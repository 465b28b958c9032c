"""
A real Linux guest under QEMU, for tests that need a real serial console.

cloud-console's job is to serve a VM's serial console; the unit tests fake that with
``os.openpty()``, which cannot show what a real VMM does: QEMU's pty chardev drops what
the guest writes while nobody holds the slave open, the pty number changes when QEMU is
restarted, a guest reset prints a new boot log on the same chardev, and the console can be
a unix socket rather than a pty. This module boots a real (tiny) guest so tests can see it.

The guest is Debian's kernel (fetched by ``tests/run.sh`` into :func:`cache_dir`) and an
initramfs built here, in Python, holding Debian's static busybox and an ``/init`` script
that mounts proc, sys and devtmpfs, prints :data:`BANNER` and runs an interactive shell on
ttyS0 with job control (busybox ``cttyhack`` makes ttyS0 the shell's controlling tty), so
``echo $((6*7))`` prints ``42`` and ``reboot -f`` resets the machine (QEMU then boots the
kernel again on the same chardev).

Typical use (open the console *before* ``cont()``, or the first output is lost)::

    guest = QemuGuest(serial="chardev-pty").start()   # paused (-S)
    console = Console.open_pty(guest.pty_path())
    guest.cont()
    console.expect(PROMPT, timeout=BOOT_TIMEOUT)
    console.write(b"echo $((6*7))\\n")
    console.expect(b"\\r\\n42\\r\\n")
    guest.close()

Everything is blocking with deadlines (sockets with timeouts, ``select`` on fds): the
tests using it are synchronous (``SynchronousTestCase``), never touching the reactor. Several guests
may run at once (each has its own temporary directory of sockets and a QEMU log), so
trial's ``--jobs=2`` can boot two in parallel; :class:`SharedGuest` lets the tests of one
class share a booted guest, as trial has no ``setUpClass``.
"""

from __future__ import annotations

import atexit
import ctypes
import gzip
import hashlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import tty
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

#: Printed by the guest's /init just before it starts the shell.
BANNER = b"cloud-console test guest: init ready"

#: A kernel log line as the serial console prints it (``[    2.073674] tsc: ...``). The
#: kernel writes these whenever it likes, even between a command's echo and its output
#: (the TSC's refined calibration lands a second or two after boot, later under load).
KERNEL_LINE = re.compile(rb"\[ *[0-9]+\.[0-9]+\] [^\r\n]*\r?\n")
#: The guest shell's prompt (PS1), distinctive so it cannot match boot messages.
PROMPT = b"guest# "
#: Seconds allowed from cont() to the shell prompt. Under TCG a boot of Debian's cloud
#: kernel takes 2-4 s alone and about 5 s with three guests on 2 cores; this is a safety
#: net for slow CI machines, not a synchronisation.
BOOT_TIMEOUT = 120.0
#: Seconds allowed for one QMP reply or one QEMU start/exit.
QMP_TIMEOUT = 30.0

SerialKind = Literal["pty", "chardev-pty", "socket", "telnet"]

# Bumped whenever the initramfs layout changes, so cached archives are not reused.
_INITRAMFS_FORMAT = b"cloud-console-initramfs-1"

# The guest's /init. Not `exec`ed into the shell: busybox's setsid forks when its caller
# leads a process group and its parent then exits, which for PID 1 is a kernel panic. A
# loop also brings a new shell back if a test types `exit`.
INIT_SCRIPT = """\
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts
mount -t devpts devpts /dev/pts
export PATH=/bin HOME=/root PS1='{prompt}'
cd /root
echo '{banner}'
while true; do
    setsid cttyhack sh -i
    echo 'cloud-console test guest: shell exited, starting another'
done
""".format(prompt=PROMPT.decode(), banner=BANNER.decode())


class GuestUnavailable(Exception):
    """QEMU, the kernel or busybox is missing: run ``bash tests/run.sh`` to install them."""


class QmpError(Exception):
    """A QMP command answered with an ``error`` (its class and description)."""


class ConsoleTimeout(AssertionError):
    """The console did not show the expected bytes in time; carries what it did show."""

    def __init__(self, needle: bytes, received: bytes, timeout: float) -> None:
        super().__init__(
            f"{needle!r} not seen within {timeout:.0f} s; the last bytes were:\n"
            f"{received[-3000:].decode('utf-8', 'replace')}"
        )
        self.needle = needle
        self.received = received


class ConsoleClosed(AssertionError):
    """The console reached end of file (EOF, or EIO on a pty slave) before the bytes."""

    def __init__(self, needle: bytes, received: bytes, reason: str) -> None:
        super().__init__(
            f"console closed ({reason}) before {needle!r}; the last bytes were:\n"
            f"{received[-3000:].decode('utf-8', 'replace')}"
        )
        self.needle = needle
        self.received = received
        self.reason = reason


# -- files: kernel, busybox, initramfs ------------------------------------------------------


def cache_dir() -> Path:
    """
    Where ``tests/run.sh`` puts the kernel and this module the initramfs.

    Outside the checkout (so ``git clean`` and fresh clones keep it) and shared by every
    checkout on the machine; ``CLOUD_CONSOLE_GUEST_CACHE`` overrides it, as in run.sh.
    """
    configured = os.environ.get("CLOUD_CONSOLE_GUEST_CACHE")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "cloud-console" / "guest"


def find_kernel() -> Path:
    """
    The guest kernel: ``CLOUD_CONSOLE_GUEST_KERNEL`` if set, else run.sh's ``vmlinuz``.

    run.sh keeps ``vmlinuz`` as a symlink to the current Debian package's kernel in the
    cache, so a kernel update there is picked up without changing this code.
    """
    configured = os.environ.get("CLOUD_CONSOLE_GUEST_KERNEL")
    kernel = Path(configured) if configured else cache_dir() / "vmlinuz"
    if not kernel.is_file():
        raise GuestUnavailable(f"no guest kernel at {kernel}: run `bash tests/run.sh` first")
    return kernel


def find_busybox() -> Path:
    """Debian's busybox-static (``CLOUD_CONSOLE_GUEST_BUSYBOX`` overrides the path)."""
    busybox = Path(os.environ.get("CLOUD_CONSOLE_GUEST_BUSYBOX", "/bin/busybox"))
    if not busybox.is_file():
        raise GuestUnavailable(f"no busybox at {busybox}: run `bash tests/run.sh` first")
    return busybox


def find_qemu() -> str:
    """The ``qemu-system-x86_64`` binary on PATH."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise GuestUnavailable("no qemu-system-x86_64 on PATH: run `bash tests/run.sh` first")
    return qemu


def _newc_entry(
    name: str,
    mode: int,
    ino: int,
    data: bytes = b"",
    nlink: int = 1,
    rdev: tuple[int, int] = (0, 0),
) -> bytes:
    """
    One entry of a "newc" cpio archive (the format the kernel unpacks as an initramfs).

    The format (see the kernel's Documentation/driver-api/early-userspace/buffer-format.rst):
    the magic ``070701``, then thirteen 8-digit hexadecimal fields (inode, mode, uid, gid,
    nlink, mtime, file size, device major and minor, rdev major and minor, name size
    including its NUL, checksum 0), the NUL-terminated name padded with NULs to a multiple
    of 4 bytes counted from the start of the header, then the data padded likewise.
    Owner root, mtime 0: the archive depends only on its contents, so it can be cached.
    """
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
    header = b"070701" + b"".join(b"%08X" % field for field in fields)
    entry = header + encoded
    entry += b"\0" * (-len(entry) % 4)
    return entry + data + b"\0" * (-len(data) % 4)


def newc_archive(entries: list[tuple[str, int, bytes]]) -> bytes:
    """
    A newc cpio archive of ``(name, mode, data)`` entries, ending with its trailer.

    Names are relative (``bin/busybox``); a symlink's data is its target; a device node's
    data is ``b"major:minor"`` (only used for /dev/console, so the kernel can open it
    for /init's stdin and stdout before devtmpfs is mounted).
    """
    out = []
    for ino, (name, mode, data) in enumerate(entries, start=1):
        kind = mode & 0o170000
        if kind == 0o020000:  # character device
            major, minor = (int(part) for part in data.decode().split(":"))
            out.append(_newc_entry(name, mode, ino, rdev=(major, minor)))
        elif kind == 0o040000:  # directory
            out.append(_newc_entry(name, mode, ino, nlink=2))
        else:
            out.append(_newc_entry(name, mode, ino, data))
    out.append(_newc_entry("TRAILER!!!", 0, 0))
    return b"".join(out)


def build_initramfs(busybox: Path | None = None, directory: Path | None = None) -> Path:
    """
    The guest's gzip'd initramfs, built once and cached by content in :func:`cache_dir`.

    The file name carries a hash of busybox, /init and the layout, so a new busybox or init
    script makes a new archive and concurrent test processes (trial --jobs) never see a
    half-written one: each writes a temporary file and renames it into place.
    """
    busybox = busybox or find_busybox()
    directory = directory or cache_dir()
    program = busybox.read_bytes()
    init = INIT_SCRIPT.encode()
    digest = hashlib.sha256(_INITRAMFS_FORMAT + b"\0" + init + b"\0" + program).hexdigest()
    target = directory / f"initramfs-{digest[:16]}.cpio.gz"
    if target.is_file():
        return target
    directories = ["bin", "dev", "etc", "proc", "root", "sys", "tmp"]
    entries: list[tuple[str, int, bytes]] = [(d, 0o040755, b"") for d in directories]
    entries[-1] = ("tmp", 0o041777, b"")
    entries += [
        ("dev/console", 0o020600, b"5:1"),
        ("bin/busybox", 0o100755, program),
        ("bin/sh", 0o120777, b"busybox"),
        ("init", 0o100755, init),
    ]
    archive = gzip.compress(newc_archive(entries), compresslevel=6, mtime=0)
    directory.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".initramfs-")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide it from other users of the cache
        with os.fdopen(fd, "wb") as out:
            out.write(archive)
        os.replace(temporary, target)
    except BaseException:
        os.unlink(temporary)
        raise
    return target


# -- reading a console ---------------------------------------------------------------------


def read_until(fd: int, needle: bytes, timeout: float, initial: bytes = b"") -> bytes:
    """
    Read ``fd`` (a pty slave or a socket) until ``needle`` appears; return all bytes read.

    ``initial`` is searched too and starts the result. Waits with ``select`` up to
    ``timeout`` seconds in all; raises :class:`ConsoleTimeout` or :class:`ConsoleClosed`
    (EOF, or the EIO a pty slave reads once its master is gone) carrying what was read.
    The result may extend past the needle: it is everything read, not a split.
    """
    received = bytearray(initial)
    deadline = time.monotonic() + timeout
    while needle not in received:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ConsoleTimeout(needle, bytes(received), timeout)
        readable, _, _ = select.select([fd], [], [], remaining)
        if not readable:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError as e:
            raise ConsoleClosed(needle, bytes(received), os.strerror(e.errno or 0)) from e
        if not chunk:
            raise ConsoleClosed(needle, bytes(received), "end of file")
        received += chunk
    return bytes(received)


class Console:
    """
    A guest's serial console as the test sees it: a pty slave or a connected socket.

    Keeps everything it has read in ``transcript``; :meth:`expect` returns the bytes up to
    and including the needle and keeps the rest for the next call, so consecutive expects
    never lose output that arrived in the same read.
    """

    def __init__(self, fd: int, close: Callable[[], None]) -> None:
        self.fd = fd
        self._close = close
        self.transcript = bytearray()
        self._pending = b""

    @classmethod
    def open_pty(cls, path: str) -> Console:
        """
        Open a pty slave as a VMM console client would: read-write, not as our controlling
        tty, in raw mode (no echo, no line editing, no CR/NL mapping by our side).
        """
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(fd)
        return cls(fd, lambda: os.close(fd))

    @classmethod
    def connect_unix(cls, path: str, timeout: float = QMP_TIMEOUT) -> Console:
        """Connect to a unix socket chardev (QEMU ``server=on``) as its one client."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(path)
        sock.setblocking(True)
        return cls(sock.fileno(), sock.close)

    def expect(self, needle: bytes, timeout: float = 30.0) -> bytes:
        """Read until ``needle``; return the output up to and including it."""
        received = read_until(self.fd, needle, timeout, self._pending)
        self.transcript += received[len(self._pending) :]
        end = received.index(needle) + len(needle)
        self._pending = received[end:]
        return received[:end]

    def write(self, data: bytes) -> None:
        """Type ``data`` on the console (all of it; the guest's UART is slow to drain)."""
        view = memoryview(data)
        while view:
            select.select([], [self.fd], [], QMP_TIMEOUT)
            view = view[os.write(self.fd, view) :]

    def run(self, command: str, timeout: float = 30.0) -> bytes:
        """
        Type a shell command and return its output (the lines between the echoed command
        and the next prompt), CR/LF as the guest's tty sent them, without the kernel log
        lines the console interleaved (they are the kernel's, not the command's).
        """
        self.write(command.encode() + b"\n")
        self.expect(command.encode() + b"\r\n", timeout)
        return KERNEL_LINE.sub(b"", self.expect(PROMPT, timeout)[: -len(PROMPT)])

    def close(self) -> None:
        """Close our end (idempotent)."""
        if self.fd >= 0:
            self._close()
            self.fd = -1


# -- QEMU ----------------------------------------------------------------------------------


class _Qmp:
    """
    A blocking QMP client over one connected socket, with a timeout on every read.

    QMP interleaves asynchronous events with replies; events are kept in ``events``
    (oldest first) so a test can look for e.g. ``RESET``.
    """

    def __init__(self, sock: socket.socket, timeout: float = QMP_TIMEOUT) -> None:
        sock.settimeout(timeout)
        self.sock = sock
        self.file = sock.makefile("rwb")
        self.events: list[dict[str, Any]] = []
        self.greeting = self._read()
        if "QMP" not in self.greeting:
            raise QmpError(f"not a QMP greeting: {self.greeting!r}")
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise EOFError("QMP connection closed")
        message: dict[str, Any] = json.loads(line)
        return message

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run one command; return its ``return`` value or raise :class:`QmpError`."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self.file.write(json.dumps(request).encode() + b"\n")
        self.file.flush()
        while True:
            message = self._read()
            if "event" in message:
                self.events.append(message)
            elif "error" in message:
                error = message["error"]
                raise QmpError(f"{command}: {error.get('class')}: {error.get('desc')}")
            elif "return" in message:
                return message["return"]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _die_with_parent() -> None:
    """
    In QEMU's child process before exec: get SIGKILL when the parent thread dies, so a
    test process killed by trial or a crash leaves no guest spinning a core.

    (Linux delivers it when the *thread* that forked exits, so start guests from the main
    thread.)
    """
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class QemuGuest:
    """
    One QEMU process running the test guest, started paused, with two QMP monitors.

    ``qmp_path`` is a unix socket QMP monitor for cloud-console (pass it ``qmp:PATH``);
    the test's own control monitor is a separate one (a socketpair whose other end QEMU
    inherits), so the two never contend: QEMU serves one client at a time per monitor.
    Because the control connection exists before QEMU starts, :meth:`start` needs no
    polling: QEMU's greeting on it means its initialisation, and so the creation of every
    other socket (``qmp_path``, ``serial_path``), is done.

    ``serial`` chooses the console's chardev:

    - ``"chardev-pty"``: ``-chardev pty,id=charserial0 -serial chardev:charserial0``, as
      libvirt does (query-chardev label ``charserial0``);
    - ``"pty"``: QEMU's own ``-serial pty`` (label ``serial0``);
    - ``"socket"``: a unix socket server at ``serial_path`` (label ``charserial0``);
    - ``"telnet"``: the same socket in telnet mode (``telnet=on``: QEMU speaks telnet on
      it and hands the guest a serial break for a telnet BREAK).
    """

    def __init__(
        self,
        serial: SerialKind = "chardev-pty",
        *,
        directory: Path | None = None,
        kernel: Path | None = None,
        initramfs: Path | None = None,
        memory_mb: int = 256,
        append: str = "",
    ) -> None:
        self.serial: SerialKind = serial
        self.kernel = kernel or find_kernel()
        self.initramfs = initramfs or build_initramfs()
        self.qemu = find_qemu()
        self.memory_mb = memory_mb
        self.append = append
        # Short paths under /tmp: a unix socket path is limited to 107 bytes, which trial's
        # _trial_temp/... could exceed.
        self._owns_directory = directory is None
        self.directory = directory or Path(tempfile.mkdtemp(prefix="cloud-console-guest-"))
        self.qmp_path = str(self.directory / "qmp.sock")
        self.serial_path = str(self.directory / "serial.sock")
        self.log_path = self.directory / "qemu.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._control: _Qmp | None = None

    def command_line(self, control_fd: int) -> list[str]:
        """QEMU's argv; ``control_fd`` is QEMU's end of the control QMP socketpair."""
        if self.serial == "pty":
            serial = ["-serial", "pty"]
        elif self.serial == "chardev-pty":
            serial = ["-chardev", "pty,id=charserial0", "-serial", "chardev:charserial0"]
        else:
            telnet = ",telnet=on" if self.serial == "telnet" else ""
            serial = [
                "-chardev",
                f"socket,id=charserial0,path={self.serial_path},server=on,wait=off{telnet}",
                "-serial",
                "chardev:charserial0",
            ]
        append = "console=ttyS0 " + self.append
        return [
            self.qemu,
            "-accel", "tcg",
            "-m", str(self.memory_mb),
            "-smp", "1",
            "-nodefaults",
            "-no-user-config",
            "-display", "none",
            "-S",
            "-kernel", str(self.kernel),
            "-initrd", str(self.initramfs),
            "-append", append.strip(),
            *serial,
            "-chardev", f"socket,id=qmp-control,fd={control_fd}",
            "-mon", "chardev=qmp-control,mode=control",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]  # fmt: skip

    def start(self) -> QemuGuest:
        """
        Start QEMU paused (``-S``) and connect the control monitor; return ``self``.

        Open the console (:meth:`pty_path` or ``serial_path``) before :meth:`cont`: QEMU
        drops what the guest writes while no one holds the pty slave or socket.
        """
        if self.running:
            raise RuntimeError("QEMU is already running")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    self.command_line(theirs.fileno()),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    pass_fds=[theirs.fileno()],
                    preexec_fn=_die_with_parent,
                )
        finally:
            theirs.close()
        _live_guests.add(self)
        try:
            self._control = _Qmp(ours)
        except (OSError, EOFError, ValueError, QmpError) as e:
            ours.close()
            self.kill()
            raise GuestUnavailable(f"QEMU did not start ({e}); its log:\n{self.log()}") from e
        return self

    @property
    def running(self) -> bool:
        """Whether our QEMU process exists and has not exited."""
        return self.process is not None and self.process.poll() is None

    @property
    def events(self) -> list[dict[str, Any]]:
        """QMP events seen on the control monitor so far (this process only)."""
        return self._control.events if self._control else []

    def log(self) -> str:
        """QEMU's stdout and stderr so far, across restarts (for failure messages)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def qmp(self, command: str, **arguments: Any) -> Any:
        """Run a QMP command on the control monitor; return its parsed ``return``."""
        if self._control is None:
            raise RuntimeError("QEMU is not started")
        return self._control.execute(command, **arguments)

    def chardevs(self) -> dict[str, str]:
        """``query-chardev`` as ``{label: filename}``, e.g. ``{"serial0": "pty:/dev/pts/3"}``."""
        return {c["label"]: c["filename"] for c in self.qmp("query-chardev")}

    def pty_path(self) -> str:
        """The console's pty slave path, from ``query-chardev`` (``pty:/dev/pts/N``)."""
        label = "serial0" if self.serial == "pty" else "charserial0"
        filename = self.chardevs()[label]
        if not filename.startswith("pty:"):
            raise ValueError(f"{label} is not a pty: {filename}")
        return filename[len("pty:") :]

    def cont(self) -> None:
        """Let the paused guest run (QMP ``cont``)."""
        self.qmp("cont")

    def system_reset(self) -> None:
        """Reset the machine, as the reset button would (QMP ``system_reset``)."""
        self.qmp("system_reset")

    def quit(self, timeout: float = QMP_TIMEOUT) -> int:
        """Ask QEMU to exit (QMP ``quit``) and wait for it; return its exit status."""
        if self.running:
            try:
                self.qmp("quit")
            except (OSError, EOFError):
                pass  # QEMU may close the monitor before its reply is read.
        return self.wait_exit(timeout)

    def kill(self) -> int:
        """SIGKILL QEMU (a VMM crash) and reap it; return its exit status."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        return self.wait_exit()

    def wait_exit(self, timeout: float = QMP_TIMEOUT) -> int:
        """Wait for QEMU to exit; close the control monitor; return its exit status."""
        if self.process is None:
            raise RuntimeError("QEMU was never started")
        status = self.process.wait(timeout)
        if self._control is not None:
            self._control.close()
        _live_guests.discard(self)
        return status

    def restart(self) -> QemuGuest:
        """
        Quit QEMU and start a new process with the same socket paths, paused again, as a
        VMM restarting the VM would; the new QEMU recreates ``qmp_path`` and
        ``serial_path`` (QEMU unlinks them when it quits, and binds over stale ones left
        by a kill). A pty chardev gets a new ``/dev/pts/N`` only while someone still holds
        the old slave open (as cloud-console would): otherwise the kernel hands out the
        freed number again.
        """
        if self.running:
            self.quit()
        return self.start()

    def close(self) -> None:
        """Stop QEMU (quit, else kill) and remove the temporary directory (idempotent)."""
        if self.running:
            try:
                self.quit(timeout=10)
            except (OSError, EOFError, QmpError, subprocess.TimeoutExpired):
                self.kill()
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> QemuGuest:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


# Guests still running; killed at interpreter exit, so a trial worker that ends (or a
# test that forgets close()) leaves no QEMU behind.
_live_guests: set[QemuGuest] = set()


@atexit.register
def _kill_live_guests() -> None:
    for guest in list(_live_guests):
        guest.kill()


class BootedGuest:
    """A started guest, its open console, the boot transcript and the boot-to-shell time."""

    def __init__(self, guest: QemuGuest, console: Console, boot: bytes, seconds: float) -> None:
        self.guest = guest
        self.console = console
        self.boot = boot
        self.seconds = seconds

    def close(self) -> None:
        """Close the console, then stop QEMU."""
        self.console.close()
        self.guest.close()


def open_console(guest: QemuGuest) -> Console:
    """The console of a started guest, as its chardev kind requires."""
    if guest.serial in ("socket", "telnet"):
        return Console.connect_unix(guest.serial_path)
    return Console.open_pty(guest.pty_path())


def boot(guest: QemuGuest, timeout: float = BOOT_TIMEOUT) -> BootedGuest:
    """
    Start ``guest`` if needed, open its console, ``cont`` and wait for the shell prompt.

    The console is opened while QEMU is still paused, so nothing of the boot is lost.
    """
    if not guest.running:
        guest.start()
    console = open_console(guest)
    try:
        started = time.monotonic()
        guest.cont()
        transcript = console.expect(PROMPT, timeout)
    except BaseException:
        console.close()
        guest.close()
        raise
    return BootedGuest(guest, console, transcript, time.monotonic() - started)


class SharedGuest:
    """
    A booted guest shared by the tests of one class: trial's stand-in for setUpClass.

    Trial has no ``setUpClass``, and with ``--jobs`` the tests of one class may be spread
    over worker processes, so the guest is booted lazily by the first test in each process
    that calls :meth:`get` and stopped at interpreter exit (or by :meth:`close`). A boot
    that failed is not retried: each later :meth:`get` re-raises its error at once.
    """

    def __init__(self, factory: Callable[[], QemuGuest]) -> None:
        self._factory = factory
        self._booted: BootedGuest | None = None
        self._error: BaseException | None = None
        atexit.register(self.close)

    def get(self) -> BootedGuest:
        """The booted guest (booting it on first use in this process)."""
        if self._error is not None:
            raise self._error
        if self._booted is None:
            try:
                self._booted = boot(self._factory())
            except BaseException as e:
                self._error = e
                raise
        return self._booted

    def close(self) -> None:
        """Stop the guest if it was booted."""
        if self._booted is not None:
            self._booted.close()
            self._booted = None
