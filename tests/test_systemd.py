"""
contrib/systemd: cloud-console started exactly as systemd starts it for
cloud-console.socket (the listening socket inherited as fd 3, LISTEN_FDS, LISTEN_FDNAMES,
LISTEN_PID), with the command line of cloud-console.service; the hardening the unit asks
for checked against what the daemon really does (the kernel's PR_SET_MDWE for
MemoryDenyWriteExecute=, a trace of its system calls for SystemCallFilter=); and
C{systemd-analyze verify} on the units where it is installed. Restarts under a stand-in for
PID 1 (L{tests.helpers.ServiceManager}: the notification socket and the descriptor store,
the stored descriptors passed back at 4.. after the socket) with a QEMU-like socket
console: SIGTERM and kill -9 while the guest writes lose no byte and an open page resumes;
the same without the store shows the loss; C{--state-dir}; states refused.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.protocol import ProcessProtocol
from twisted.trial.unittest import SkipTest, TestCase

from tests.helpers import ROOT, Guest, Server, ServiceManager, SocketGuest, V1Client, connect_v1, http_get

UNITS = ROOT / "contrib" / "systemd"
SERVICE = UNITS / "cloud-console.service"
SOCKET = UNITS / "cloud-console.socket"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"

# The step systemd takes between fork and exec, in the process that becomes the daemon:
# LISTEN_PID is that process's own pid (known only after the fork), then exec, so the pid
# is still the daemon's. With "mdwe" first, the kernel's PR_SET_MDWE
# (PR_MDWE_REFUSE_EXEC_GAIN) is set before the exec: memory that is writable and
# executable, or made executable later, is refused from then on, as systemd's
# MemoryDenyWriteExecute= refuses it. It reports its pid (for a test under strace).
WRAPPER = r"""
import ctypes, os, sys
args = sys.argv[1:]
if args[0] == "mdwe":
    args = args[1:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
        sys.exit("PR_SET_MDWE: " + os.strerror(ctypes.get_errno()))
os.environ["LISTEN_PID"] = str(os.getpid())
sys.stderr.write("daemon pid %d\n" % os.getpid())
sys.stderr.flush()
os.execv(args[0], args)
"""


def unit_settings(path: Path) -> dict[str, list[str]]:
    """C{Key=value} lines of a unit file (continuations joined, comments dropped)."""
    settings: dict[str, list[str]] = {}
    logical = ""
    for line in path.read_text().splitlines():
        if not logical and line.lstrip().startswith(("#", ";")):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        if "=" in logical and not logical.startswith("["):
            key, _, value = logical.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
        logical = ""
    return settings


def service_argv() -> list[str]:
    """cloud-console.service's ExecStart, split as systemd splits it."""
    (exec_start,) = unit_settings(SERVICE)["ExecStart"]
    return shlex.split(exec_start)


def fd_name() -> str:
    (name,) = unit_settings(SOCKET)["FileDescriptorName"]
    return name


def listening_inodes() -> set[int]:
    """The inodes of every listening TCP (v4, v6) and unix socket of this host."""
    inodes = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/net/{table}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # TCP_LISTEN
                    inodes.add(int(fields[9]))
    with open("/proc/net/unix") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if int(fields[3], 16) & 0x10000:  # __SO_ACCEPTCON: listening
                inodes.add(int(fields[6]))
    return inodes


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets process C{pid} holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        match = re.fullmatch(r"socket:\[(\d+)\]", target)
        if match:
            inodes.add(int(match.group(1)))
    return inodes


class Collect(ProcessProtocol):
    """A short helper process's output and status."""

    def __init__(self) -> None:
        self.output = b""
        self.ended: defer.Deferred[int] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value.exitCode)


class Activated:
    """One daemon started as systemd starts it for cloud-console.socket."""

    def __init__(self, server: Server, listener: socket.socket) -> None:
        self.server = server
        self.listener = listener
        self.port = int(listener.getsockname()[1])
        self.pid = 0  # the daemon's, once it said so


class SystemdCase(TestCase):
    """Starting the daemon as systemd does, and what every such test checks."""

    timeout = 60

    def setUp(self) -> None:
        self.temp = Path(self.mktemp()).resolve()
        self.temp.mkdir()
        # Unix socket paths are short (108 bytes): those live here.
        self.sockets = Path(tempfile.mkdtemp(prefix="cc-"))
        self.addCleanup(shutil.rmtree, self.sockets, True)

    def guest(self) -> Guest:
        guest = Guest()
        guest.start_reading()
        self.addCleanup(guest.close)
        return guest

    def write_config(self, consoles: dict[str, str]) -> Path:
        config = self.temp / "consoles.toml"
        config.write_text(
            "".join(f'[console.{name}]\nsource = "{source}"\n\n' for name, source in consoles.items())
        )
        return config

    def command(self, config: Path, port: str | None = None) -> list[str]:
        """
        The unit's ExecStart with this checkout's daemon, the test's config and log
        directory, and (if given) another C{--port}.
        """
        argv = service_argv()
        argv[argv.index("--config") + 1] = str(config)
        argv[argv.index("--log-dir") + 1] = str(self.temp / "logs")
        (self.temp / "logs").mkdir(exist_ok=True)
        if port is not None:
            argv[argv.index("--port") + 1] = port
        return [sys.executable, "-m", "cloud_console.cli", *argv[1:]]

    async def activate(
        self,
        command: list[str],
        mdwe: bool = False,
        trace: Path | None = None,
        manager: ServiceManager | None = None,
        listener: socket.socket | None = None,
    ) -> Activated:
        """
        Bind a listening socket as cloud-console.socket does (or reuse C{listener}, as
        the socket unit keeps it across a restart), start C{command} with it as fd 3 and
        systemd's variables; returns once the daemon has said it listens.

        With a C{manager}, C{NOTIFY_SOCKET} names it and the descriptors in its store
        follow the socket at 4.., named in C{LISTEN_FDNAMES}, as systemd passes a
        service's store back when it starts it again.
        """
        if listener is None:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.addCleanup(listener.close)
            listener.bind(("127.0.0.1", 0))
            listener.listen(128)
        stored = list(manager.store.items()) if manager is not None else []
        env = dict(
            os.environ,
            PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            LISTEN_FDS=str(1 + len(stored)),
            LISTEN_FDNAMES=":".join([fd_name(), *(name for name, _ in stored)]),
        )
        env.pop("LISTEN_PID", None)
        env.pop("NOTIFY_SOCKET", None)
        if manager is not None:
            env["NOTIFY_SOCKET"] = manager.path
        argv = [sys.executable, "-c", WRAPPER, *(["mdwe"] if mdwe else []), *command]
        if trace is not None:
            strace = shutil.which("strace")
            assert strace is not None
            argv = [strace, "-f", "-qq", "-o", str(trace), *argv]
        server = Server()
        reactor.spawnProcess(
            server, argv[0], argv, env=env, path=str(ROOT),
            childFDs={
                0: "w", 1: "r", 2: "r", 3: listener.fileno(),
                **{4 + i: fd for i, (_, fd) in enumerate(stored)},
            },
        )
        activated = Activated(server, listener)

        async def kill() -> None:
            if server.status is None:
                if activated.pid:
                    os.kill(activated.pid, signal.SIGKILL)
                server.signal("KILL")
                await server.ended

        self.addCleanup(kill)
        await server.log_line(lambda log: b"daemon pid " in log)
        activated.pid = int(re.search(rb"daemon pid (\d+)", server.stderr).group(1))  # type: ignore[union-attr]
        await server.listening
        return activated

    async def serves(self, activated: Activated, guest: Guest, name: str) -> None:
        """The console's API, its page and a WebSocket round trip, on the inherited port."""
        code, body = await http_get(activated.port, "/api/consoles")
        self.assertEqual(code, 200, body)
        consoles = json.loads(body)["consoles"]
        self.assertEqual([(c["name"], c["state"]) for c in consoles], [(name, "up")])
        code, body = await http_get(activated.port, f"/c/{name}/")
        self.assertEqual(code, 200)
        client = await connect_v1(activated.port, f"/c/{name}/ws")
        await guest.write(b"output from the guest\r\n")
        await client.wait_text("output from the guest")
        client.type(b"typed by a viewer\r")
        await guest.receives(lambda data: b"typed by a viewer" in data)
        client.sendClose()
        await client.closed

    def assert_only_inherited_listener(self, activated: Activated) -> None:
        """The daemon listens on the socket it inherited, and on nothing else."""
        inherited = os.fstat(activated.listener.fileno()).st_ino
        listening = socket_inodes(activated.pid) & listening_inodes()
        self.assertEqual(listening, {inherited})

    async def stop(self, activated: Activated) -> None:
        """systemd's stop: SIGTERM to the main process, which ends with status 0."""
        os.kill(activated.pid, signal.SIGTERM)
        self.assertEqual(await activated.server.ended, 0, activated.server.stderr.decode())



class SocketActivationTests(SystemdCase):
    """The unit's command line on the socket unit's socket."""

    async def test_the_units_command_line_serves_on_the_socket(self) -> None:
        """
        cloud-console.service's ExecStart (its --port systemd:domain=INET:name=...) with
        the socket named as cloud-console.socket names it serves on that socket, opens
        no port of its own, and ends with 0 on SIGTERM.
        """
        self.assertIn("systemd:domain=INET:name=" + fd_name(), service_argv())
        guest = self.guest()
        activated = await self.activate(self.command(self.write_config({"vm1": guest.path})))
        await self.serves(activated, guest, "vm1")
        self.assert_only_inherited_listener(activated)
        await self.stop(activated)
        # The unit's --log-dir: each console logs to DIR/NAME.log.
        self.assertIn(b"output from the guest", (self.temp / "logs" / "vm1.log").read_bytes())

    async def test_by_index(self) -> None:
        """The README's --port systemd:domain=INET:index=0 adopts the same socket."""
        guest = self.guest()
        command = self.command(self.write_config({"vm1": guest.path}), "systemd:domain=INET:index=0")
        activated = await self.activate(command)
        await self.serves(activated, guest, "vm1")
        self.assert_only_inherited_listener(activated)
        await self.stop(activated)

    async def test_memory_deny_write_execute(self) -> None:
        """
        MemoryDenyWriteExecute=yes: the daemon, under the kernel's PR_SET_MDWE (memory
        both writable and executable, or made executable later, refused), starts, serves
        and reloads. A control first: a W+X mapping in the same wrapper is refused, so the
        policy really holds after the exec.
        """
        control = Collect()
        code = "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)"
        reactor.spawnProcess(
            control, sys.executable, [sys.executable, "-c", WRAPPER, "mdwe", sys.executable, "-c", code],
            env=dict(os.environ),
        )
        status = await control.ended
        if b"PR_SET_MDWE: Invalid argument" in control.output:
            raise SkipTest("this kernel has no PR_SET_MDWE (Linux 6.3 or later)")
        self.assertNotEqual(status, 0, control.output)
        self.assertIn(b"PermissionError", control.output)

        guest = self.guest()
        consoles = {"vm1": guest.path}
        activated = await self.activate(self.command(self.write_config(consoles)), mdwe=True)
        await self.serves(activated, guest, "vm1")
        await self.reload_adds_a_console(activated, consoles)
        await self.stop(activated)

    async def reload_adds_a_console(self, activated: Activated, consoles: dict[str, str]) -> None:
        """ExecReload (SIGHUP) with a console added to the config: it comes up and serves."""
        second = self.guest()
        self.write_config({**consoles, "vm2": second.path})
        os.kill(activated.pid, signal.SIGHUP)
        await activated.server.log_line(lambda log: b"consoles reloaded: 1 added" in log)
        client = await connect_v1(activated.port, "/c/vm2/ws")
        await second.write(b"the second console\r\n")
        await client.wait_text("the second console")
        client.sendClose()
        await client.closed

    async def test_system_calls_within_the_filter(self) -> None:
        """
        Under strace, through start, a WebSocket round trip, a reload (SIGHUP) and a stop
        (SIGTERM), every system call the daemon makes is in SystemCallFilter=@system-service
        (with @default, always allowed), and none of them would trip systemd's
        MemoryDenyWriteExecute= filter: no mapping both writable and executable, no
        mprotect that makes memory executable.
        """
        if shutil.which("strace") is None:
            raise SkipTest("strace is not installed (Debian: apt-get install strace)")
        if not os.access(SYSTEMD_ANALYZE, os.X_OK):
            raise SkipTest("systemd-analyze is not installed (Debian: apt-get install systemd)")
        (filter_,) = unit_settings(SERVICE)["SystemCallFilter"]
        groups = syscall_groups()
        allowed = expand("@default", groups)
        for entry in filter_.split():
            allowed |= expand(entry, groups) if entry.startswith("@") else {entry}

        trace = self.temp / "trace"
        guest = self.guest()
        consoles = {"vm1": guest.path}
        activated = await self.activate(self.command(self.write_config(consoles)), trace=trace)
        await self.serves(activated, guest, "vm1")
        await self.reload_adds_a_console(activated, consoles)
        await self.stop(activated)

        lines = trace.read_bytes().splitlines()
        made = {m.group(1).decode() for m in map(CALL.match, lines) if m}
        self.assertIn("epoll_wait", made)  # the trace holds the daemon's calls
        self.assertEqual(sorted(made - allowed), [])
        refused = []
        for line in lines:
            match = MAP_CALL.match(line)
            if match is None:
                continue
            call, args = match.groups()
            if b"PROT_EXEC" in args and (call != b"mmap" or b"PROT_WRITE" in args):
                refused.append(line.decode(errors="replace"))
        self.assertEqual(refused, [])


class SteadyWriter:
    """The guest printing numbered lines at a steady rate (one every 2 ms), as a boot does."""

    def __init__(self, guest: SocketGuest) -> None:
        self.guest = guest
        self.lines: list[bytes] = []
        self._waiters: list[tuple[int, defer.Deferred[None]]] = []
        self.loop = task.LoopingCall(self.write)
        self.loop.start(0.002)

    def write(self) -> None:
        line = b"line %06d\r\n" % len(self.lines)
        self.lines.append(line)
        self.guest.write(line)
        for waiter in [w for w in self._waiters if len(self.lines) >= w[0]]:
            self._waiters.remove(waiter)
            waiter[1].callback(None)

    def written(self, count: int) -> defer.Deferred[None]:
        """Fires once C{count} more lines have been written."""
        d: defer.Deferred[None] = defer.Deferred()
        self._waiters.append((len(self.lines) + count, d))
        return d

    def stop(self) -> bytes:
        """Stop writing; the last line written."""
        if self.loop.running:
            self.loop.stop()
        return self.lines[-1]


def without_markers(log: bytes) -> bytes:
    """A console's log without the console up/down marker lines (C{[-- ... --]})."""
    return re.sub(rb"\[-- [^\n]* --\]\r?\n", b"", log)


class RestartTests(SystemdCase):
    """
    A restart (SIGTERM, or kill -9) under a stand-in for PID 1 that keeps the service's
    descriptor store and passes it back, as systemd does; the console is a unix socket,
    on which a reopen cannot be mistaken for a kept descriptor (a new connection; what was
    written to the old one is gone, as with QEMU's socket chardev).
    """

    async def restart_while_writing(
        self, keep: bool, kill: bool, state_dir: Path | None = None
    ) -> tuple[bytes, SteadyWriter, SocketGuest, V1Client, V1Client]:
        """
        Start, open a page, have the guest write steadily, stop the daemon (SIGTERM or
        SIGKILL) while it writes, wait for 50 lines written while it is down, start it
        again (with the store if C{keep}), and reconnect the page as it does by itself
        (C{?session=S&from=N}, the next offset it wants); then stop writing and wait for
        the last line on it. Returns the log file, the writer, the guest and the page's
        two connections.
        """
        manager = None
        if keep:
            manager = ServiceManager(self.sockets / "notify")
            self.addCleanup(manager.close)
        guest = SocketGuest(self.sockets / "vm1.sock")
        self.addCleanup(guest.close)
        command = self.command(self.write_config({"vm1": f"unix:{guest.path}"}))
        if state_dir is not None:
            command += ["--state-dir", str(state_dir)]
        first = await self.activate(command, manager=manager)
        if manager is not None:
            await manager.wait_for(lambda m: m.count("READY") >= 1 and "console.vm1" in m.store)
        page = await connect_v1(first.port, "/c/vm1/ws")
        writer = SteadyWriter(guest)
        self.addCleanup(writer.stop)
        await page.wait_text("line 000050")
        if kill:
            os.kill(first.pid, signal.SIGKILL)
            self.assertEqual(await first.server.ended, -signal.SIGKILL)
        else:
            await self.stop(first)
        await page.closed
        await writer.written(50)
        second = await self.activate(command, manager=manager, listener=first.listener)
        if manager is not None:
            await manager.wait_ready(2)
        (hello,) = page.events_of("hello")
        resumed = await connect_v1(
            second.port, f"/c/vm1/ws?session={hello['session']}&from={page.next_offset}"
        )
        await writer.written(50)
        last = writer.stop()
        await resumed.wait_text(last.decode())
        await self.stop(second)
        log = (self.temp / "logs" / "vm1.log").read_bytes()
        return log, writer, guest, page, resumed

    def assert_resumed(self, page: V1Client, resumed: V1Client, lines: list[bytes]) -> None:
        """The page's second connection went on at its offset: no gap, no byte twice."""
        (hello,) = page.events_of("hello")
        (again,) = resumed.events_of("hello")
        self.assertEqual(again["session"], hello["session"])
        self.assertEqual(again["offset"], page.next_offset)
        self.assertEqual(resumed.events_of("gap"), [])
        self.assertEqual(page.first_offset, 0)
        self.assertEqual(bytes(page.stream + resumed.stream), b"".join(lines))

    async def test_restart_keeps_every_byte(self) -> None:
        """
        SIGTERM and a start again with the store: the console's connection is the same
        one (no reconnect); the log file and the page (its two connections) hold every
        line the guest wrote, once, in order, those written while the daemon was down
        included; the page resumed in the same session with no gap.
        """
        log, writer, guest, page, resumed = await self.restart_while_writing(keep=True, kill=False)
        self.assertEqual(len(guest.connections), 1)
        self.assertEqual(guest.dropped, 0)
        self.assertEqual(without_markers(log), b"".join(writer.lines))
        self.assert_resumed(page, resumed, writer.lines)

    async def test_kill_keeps_every_byte(self) -> None:
        """
        kill -9 and a start again with the store: the connection is the same one, the
        log file holds every line once, in order, and the page resumes in the same
        session at its offset with no gap: the state journal in the store followed the
        history up to the kill.
        """
        log, writer, guest, page, resumed = await self.restart_while_writing(keep=True, kill=True)
        self.assertEqual(len(guest.connections), 1)
        self.assertEqual(without_markers(log), b"".join(writer.lines))
        self.assert_resumed(page, resumed, writer.lines)

    async def test_restart_without_store_loses(self) -> None:
        """
        The control: the same restart without a service manager reconnects, and what the
        guest wrote while the daemon was down is not in the log (what the store buys),
        and the page cannot resume (another session).
        """
        log, writer, guest, page, resumed = await self.restart_while_writing(keep=False, kill=False)
        self.assertEqual(len(guest.connections), 2)
        self.assertGreaterEqual(guest.dropped, 50 * len(writer.lines[0]))
        self.assertNotEqual(without_markers(log), b"".join(writer.lines))
        self.assertEqual([g["reason"] for g in resumed.events_of("gap")], ["restart"])

    async def test_state_dir_without_systemd(self) -> None:
        """
        --state-dir without a service manager: the history and the session survive a
        restart (the page resumes at its offset, no gap), but not what the guest wrote
        while the daemon was down (the socket was reconnected; QEMU drops it too): the
        page's bytes are every line but exactly those.
        """
        state_dir = self.sockets / "state"
        state_dir.mkdir()
        log, writer, guest, page, resumed = await self.restart_while_writing(
            keep=False, kill=False, state_dir=state_dir
        )
        self.assertEqual(len(guest.connections), 2)
        (hello,) = page.events_of("hello")
        (again,) = resumed.events_of("hello")
        self.assertEqual(again["session"], hello["session"])
        self.assertEqual(again["offset"], page.next_offset)
        self.assertEqual(resumed.events_of("gap"), [])
        kept = bytes(page.stream + resumed.stream)
        numbers = [int(n) for n in re.findall(rb"line (\d{6})\r\n", kept)]
        self.assertEqual(kept, b"".join(b"line %06d\r\n" % n for n in numbers))
        # Every line but one run: those written while the daemon was down (dropped), and
        # at most two more that the guest's side had queued for the connection as it
        # closed (written to a live connection, but never sent: this harness's Twisted
        # transport drops them with the connection, and counts them as neither).
        gap = [(a, b) for a, b in zip(numbers, numbers[1:]) if b != a + 1]
        self.assertLessEqual(len(gap), 1)
        self.assertEqual(numbers[0], 0)
        self.assertEqual(numbers[-1], len(writer.lines) - 1)
        missing = len(b"".join(writer.lines)) - len(kept)
        self.assertGreaterEqual(missing, guest.dropped)
        self.assertLessEqual(missing, guest.dropped + 2 * len(writer.lines[0]))
        self.assertEqual(without_markers(log), kept)

    async def test_foreign_state_refused(self) -> None:
        """
        A state file that does not check out (altered, or not a state at all) is refused
        with a log line saying why; the console serves, empty, in a new session.
        """
        state_dir = self.sockets / "state"
        state_dir.mkdir()
        guest = self.guest()
        command = self.command(self.write_config({"vm1": guest.path}))
        command += ["--state-dir", str(state_dir)]
        first = await self.activate(command)
        await guest.write(b"before the restart\r\n")
        page = await connect_v1(first.port, "/c/vm1/ws")
        await page.wait_text("before the restart")
        await self.stop(first)
        state = state_dir / "state"
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 0xFF
        state.write_bytes(bytes(data))
        second = await self.activate(command, listener=first.listener)
        self.assertIn(b"discarded (its checksum does not match", second.server.stderr)
        await self.serves(second, guest, "vm1")
        await self.stop(second)
        state.write_bytes(b"not a state at all\n" * 200)
        third = await self.activate(command, listener=first.listener)
        self.assertIn(b"discarded (not a cloud-console state)", third.server.stderr)
        client = await connect_v1(third.port, "/c/vm1/ws")
        await client.wait_for(lambda c: bool(c.events_of("hello")))
        self.assertNotEqual(client.events_of("hello")[0]["session"], page.events_of("hello")[0]["session"])
        self.assertNotIn("before the restart", client.text())
        await self.serves(third, guest, "vm1")
        await self.stop(third)

    async def test_removed_console_leaves_the_store(self) -> None:
        """
        A console removed by a reload leaves the store (FDSTOREREMOVE=1); a stored
        descriptor whose console is no longer configured at start is closed and removed;
        the reload is framed by RELOADING=1 and READY=1.
        """
        manager = ServiceManager(self.sockets / "notify")
        self.addCleanup(manager.close)
        one, two = self.guest(), self.guest()
        command = self.command(self.write_config({"vm1": one.path, "vm2": two.path}))
        first = await self.activate(command, manager=manager)
        await manager.wait_for(lambda m: m.count("READY") >= 1 and "console.vm2" in m.store)
        self.assertEqual(sorted(manager.store), ["console.vm1", "console.vm2", "state"])
        self.write_config({"vm1": one.path})
        os.kill(first.pid, signal.SIGHUP)
        await manager.wait_ready(2)
        self.assertEqual(sorted(manager.store), ["console.vm1", "state"])
        reloading = next(i for i, m in enumerate(manager.messages) if m.get("RELOADING") == "1")
        self.assertIn("MONOTONIC_USEC", manager.messages[reloading])
        self.assertTrue(any(m.get("READY") == "1" for m in manager.messages[reloading:]))
        await self.stop(first)
        # vm2 comes back into the store by hand: at the next start nobody wants it.
        manager.store["console.vm2"] = os.dup(two.slave)
        second = await self.activate(command, manager=manager, listener=first.listener)
        await manager.wait_ready(3)
        await second.server.log_line(lambda log: b"console.vm2 belongs to no configured console" in log)
        self.assertEqual(sorted(manager.store), ["console.vm1", "state"])
        self.assertIn(b"kept pty", second.server.stderr)
        await self.serves(second, one, "vm1")
        await self.stop(second)


def syscall_groups() -> dict[str, list[str]]:
    """systemd's system call groups (C{systemd-analyze syscall-filter}), as listed."""
    output = subprocess.run(
        [SYSTEMD_ANALYZE, "syscall-filter"], capture_output=True, text=True, check=True
    ).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] = []
    for line in output.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.strip() and not line.strip().startswith("#") and line.startswith(" "):
            current.append(line.strip())
    return groups


def expand(group: str, groups: dict[str, list[str]]) -> set[str]:
    calls: set[str] = set()
    for member in groups[group]:
        calls |= expand(member, groups) if member.startswith("@") else {member}
    return calls


# strace lines: "PID name(args) = result", "PID <... name resumed>...", signals, exits.
CALL = re.compile(rb"^\d+\s+(?:<\.\.\. )?([a-z0-9_]+)(?:\(| resumed>)")
MAP_CALL = re.compile(rb"^\d+\s+(mmap|mprotect|pkey_mprotect)\((.*)")


class UnitTests(TestCase):
    timeout = 60

    def test_analyze_verify(self) -> None:
        """
        C{systemd-analyze verify} finds nothing wrong with the units once ExecStart names
        a binary that exists (this checkout's); on the units as shipped it says only
        that /opt/cloud-console/bin/cloud-console does not exist here.
        """
        if not os.access(SYSTEMD_ANALYZE, os.X_OK):
            raise SkipTest("systemd-analyze is not installed (Debian: apt-get install systemd)")
        binary = Path(sys.executable).parent / "cloud-console"
        if not os.access(binary, os.X_OK):
            raise SkipTest(f"no {binary}: the package is not installed in this Python's environment")
        shipped = service_argv()[0]
        units = Path(self.mktemp()).resolve()
        units.mkdir()
        (units / SERVICE.name).write_text(SERVICE.read_text().replace(shipped, str(binary), 1))
        shutil.copy(SOCKET, units / SOCKET.name)

        def verify(directory: Path, **env: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [SYSTEMD_ANALYZE, "verify", str(directory / SERVICE.name), str(directory / SOCKET.name)],
                capture_output=True, text=True, env=dict(os.environ, **env),
            )

        result = verify(units)
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""))
        # At the default level verify keeps quiet about settings it ignores (a bad value,
        # an unknown key): at debug level each is a line "FILE:LINE: ...".
        result = verify(units, SYSTEMD_LOG_LEVEL="debug")
        service, socket_ = str(units / SERVICE.name), str(units / SOCKET.name)
        filter_line = next(
            number for number, line in enumerate(SERVICE.read_text().splitlines(), 1)
            if line.startswith("SystemCallFilter=")
        )
        # The one such line that is not the unit's: a name in systemd's @system-service
        # that this machine's libseccomp is too old to know is skipped.
        libseccomp = re.compile(
            rf"{re.escape(service)}:{filter_line}: Failed to parse system call, ignoring: \w+"
        )
        ignored = [
            line for line in (result.stdout + result.stderr).splitlines()
            if line.startswith((service + ":", socket_ + ":")) and not libseccomp.fullmatch(line)
        ]
        self.assertEqual(ignored, [])
        if not os.path.exists(shipped):
            result = verify(UNITS)
            self.assertEqual(
                (result.stdout + result.stderr).strip(),
                f"cloud-console.service: Command {shipped} is not executable: No such file or directory",
            )

    test_analyze_verify.timeout = 30  # type: ignore[attr-defined]


#: The guest's shell prints a numbered line every 20 ms, for ever (busybox's sleep takes
#: fractions of a second).
TICKING = b"i=0; while true; do echo tick:$i; i=$((i+1)); sleep 0.02; done\r"
TICK = re.compile(rb"tick:(\d+)\r\n")


class QemuRestartTests(SystemdCase):
    """
    A real QEMU guest (qmp: source, a pty) printing without pause while the daemon
    restarts: QEMU drops what its guest writes while nobody holds the pty, so only a
    descriptor kept in the store (here by the stand-in PID 1) keeps those lines.
    """

    timeout = 240

    async def restart_while_ticking(self, keep: bool) -> list[int]:
        """The tick numbers a page saw, through a SIGTERM and a start again."""
        from twisted.trial.unittest import SkipTest

        from tests.guest import KERNEL_LINE, PROMPT, GuestUnavailable, QemuGuest

        try:
            guest = QemuGuest("chardev-pty").start()
        except (GuestUnavailable, FileNotFoundError) as e:
            raise SkipTest(f"no QEMU guest here: {e} (tests/run.sh installs it)")
        self.addCleanup(guest.close)
        manager = None
        if keep:
            manager = ServiceManager(self.sockets / "notify")
            self.addCleanup(manager.close)
        command = self.command(self.write_config({"vm1": f"qmp:{guest.qmp_path}"}))
        first = await self.activate(command, manager=manager)
        page = await connect_v1(first.port, "/c/vm1/ws")
        guest.cont()
        await page.wait_for(lambda p: PROMPT in bytes(p.stream))
        page.type(TICKING)
        await page.wait_text("tick:50\r\n")
        await self.stop(first)
        await page.closed
        second = await self.activate(command, manager=manager, listener=first.listener)
        (hello,) = page.events_of("hello")
        resumed = await connect_v1(
            second.port, f"/c/vm1/ws?session={hello['session']}&from={page.next_offset}"
        )
        self.addCleanup(lambda: None if resumed.close_status else resumed.transport.abortConnection())
        last = max(int(n) for n in TICK.findall(bytes(page.stream)))
        # Well past what the guest printed while the daemon was down (a start takes
        # longer than a tick), then the whole run is read.
        await resumed.wait_for(lambda r: any(int(n) > last + 200 for n in TICK.findall(bytes(r.stream))))
        await self.stop(second)
        # Without the kernel's own lines: one printed a second or two after boot (the TSC's
        # refined calibration) can land inside a tick line and hide its number.
        seen = TICK.findall(KERNEL_LINE.sub(b"", bytes(page.stream) + bytes(resumed.stream)))
        return [int(n) for n in seen]

    async def test_store_keeps_what_the_guest_printed_while_down(self) -> None:
        ticks = await self.restart_while_ticking(keep=True)
        self.assertEqual(ticks, list(range(ticks[0], ticks[-1] + 1)))

    async def test_without_the_store_qemu_drops_it(self) -> None:
        """The control: without the store the numbers printed while down are gone."""
        ticks = await self.restart_while_ticking(keep=False)
        missing = sorted(set(range(ticks[0], ticks[-1] + 1)) - set(ticks))
        self.assertGreater(len(missing), 0)
