"""
Processes of a benchmark run: the server under test, the guest, the client processes,
their JSON-lines control channels, and the meters (server CPU and RSS).

Every process started here is recorded and stopped by its pid at the end of the run.
"""

from __future__ import annotations

import json
import os
import resource
import select
import shlex
import signal
import socket
import subprocess
import sys
from typing import Protocol
import threading
import time
import tty
from dataclasses import dataclass

import psutil

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
HOST = "127.0.0.1"


def cpu_seconds(p: psutil.Process) -> float:
    """
    User+system CPU seconds of one process: the scheduler's run time of each of its
    threads (/proc/PID/task/TID/schedstat, nanoseconds; a thread that has exited is no
    longer counted), else psutil's user+system (clock ticks of 10 ms: coarse for a short
    window, such as 8 MiB to one client).
    """
    try:
        total = 0
        for tid in os.listdir(f"/proc/{p.pid}/task"):
            with open(f"/proc/{p.pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        t = p.cpu_times()
        return t.user + t.system


def tree_memory(root: psutil.Process) -> dict:
    """
    Proportional and resident set sizes (bytes) of a process and its descendants, summed
    from /proc/PID/smaps_rollup: PSS, because forked children (conserver's) share pages
    that RSS would count once per process; and the process and thread counts.
    """
    try:
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        procs = [root]
    out = {"pss": 0, "rss": 0, "processes": 0, "threads": 0}
    for p in procs:
        try:
            with open(f"/proc/{p.pid}/smaps_rollup") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key in ("Pss", "Rss"):
                        out[key.lower()] += int(value.split()[0]) * 1024
            out["threads"] += p.num_threads()
        except (OSError, psutil.Error):
            continue
        out["processes"] += 1
    return out


class BenchError(Exception):
    """A scenario could not be run (a server that did not start, a peer that hung)."""


class Registry:
    """Every child process, stopped by pid (SIGTERM, then SIGKILL) when the run ends."""

    def __init__(self, logdir: str) -> None:
        self.logdir = logdir
        self.procs: list[subprocess.Popen] = []
        self._n = 0

    def start(self, argv: list[str], name: str, env: dict | None = None,
              pass_fds: tuple[int, ...] = (), nofile: int | None = None) -> subprocess.Popen:
        """C{nofile}: start it with this soft RLIMIT_NOFILE (as a service manager might)."""
        self._n += 1
        log_path = os.path.join(self.logdir, f"{self._n:03d}-{name}.log")
        log = open(log_path, "wb")
        # cwd: not the checkout, or `python -m` would import the package from there
        # rather than from --server-pythonpath
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                env=env, pass_fds=pass_fds, start_new_session=True,
                                cwd=self.logdir,
                                preexec_fn=None if nofile is None else lambda: _soft_nofile(nofile))
        log.close()
        proc.log_path = log_path  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 5.0) -> int | None:
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGTERM)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
            except ProcessLookupError:
                pass
        if proc in self.procs:
            self.procs.remove(proc)
        return proc.returncode

    def stop_tree(self, proc: subprocess.Popen, timeout: float = 5.0) -> dict:
        """
        Stop a server that forks (conserver: a child per 16 consoles): its descendants
        are noted first, the root is stopped as by L{stop}, then each descendant still
        there gets SIGTERM and, if it lingers, SIGKILL, by pid. The root's status and the
        pids that had to be ended by hand.
        """
        try:
            kids = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            kids = []
        status = self.stop(proc, timeout)
        _, alive = psutil.wait_procs(kids, timeout=2.0)
        for p in alive:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(alive, timeout=2.0)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        return {"status": status, "leftovers": [p.pid for p in alive]}

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc, 2.0)


def _soft_nofile(soft: int) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, hard), hard))


class Channel:
    """A JSON-lines control connection to a guest or a client process."""

    def __init__(self, sock: socket.socket, hello: dict, proc: subprocess.Popen | None) -> None:
        self.sock = sock
        self.hello = hello
        self.pid = hello.get("pid")
        self.proc = proc
        self._buf = b""
        self._pending: list[dict] = []

    def send(self, **order) -> None:
        self.sock.sendall(json.dumps(order).encode() + b"\n")

    def recv(self, op: str | None = None, timeout: float = 60.0) -> dict:
        """The next message (with C{op}, keeping others for later)."""
        for i, message in enumerate(self._pending):
            if op is None or message.get("op") == op:
                return self._pending.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                message = json.loads(line)
                if op is None or message.get("op") == op:
                    return message
                self._pending.append(message)
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"no {op or 'reply'} from pid {self.pid} in {timeout:.0f} s")
            readable, _, _ = select.select([self.sock], [], [], min(left, 1.0))
            if readable:
                data = self.sock.recv(1 << 20)
                if not data:
                    raise BenchError(f"pid {self.pid} hung up while we waited for {op}")
                self._buf += data
            elif self.proc is not None and self.proc.poll() is not None:
                raise BenchError(f"pid {self.pid} exited ({self.proc.returncode})")

    def forget(self, op: str) -> None:
        """Drop the messages with C{op} kept for later (a reply that no longer matters)."""
        self._pending = [m for m in self._pending if m.get("op") != op]

    def call(self, op: str, timeout: float = 60.0, **order) -> dict:
        self.send(op=op, **order)
        reply = self.recv(op, timeout)
        if "error" in reply and op != "done":
            raise BenchError(f"{op}: {reply['error']}")
        return reply


class Control:
    """The UNIX socket every guest and client process dials back to."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(64)

    def accept(self, proc: subprocess.Popen | None, timeout: float = 20.0,
               what: str = "a process") -> Channel:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{what} did not connect in {timeout:.0f} s")
            readable, _, _ = select.select([self.sock], [], [], min(left, 0.5))
            if readable:
                conn, _ = self.sock.accept()
                break
            if proc is not None and proc.poll() is not None:
                raise BenchError(f"{what} exited ({proc.returncode}) before connecting")
        buf = b""
        while b"\n" not in buf:
            data = conn.recv(4096)
            if not data:
                raise BenchError(f"{what} hung up before saying hello")
            buf += data
        line, rest = buf.split(b"\n", 1)
        channel = Channel(conn, json.loads(line), proc)
        channel._buf = rest
        return channel


class ServerPython(Protocol):
    """What running a script in the server's python needs of a run (its Context)."""

    python: str
    pythonpath: str
    timeout: float


def quit_guest(registry: Registry, guest: Channel) -> None:
    """Ask a guest process to quit, stop it whatever it says, close its channel."""
    try:
        guest.send(op="quit")
    except OSError:
        pass
    if guest.proc is not None:
        registry.stop(guest.proc)
    guest.sock.close()


def run_in_server_python(ctx: ServerPython, script: str) -> dict:
    """
    Run a bench script (a path) with the server's python and package (it imports
    cloud_console, which the bench's own venv lacks); its JSON on stdout is the result.
    """
    env = dict(os.environ, PYTHONPATH=ctx.pythonpath)
    done = subprocess.run([ctx.python, script], capture_output=True, text=True, env=env,
                          timeout=max(ctx.timeout, 600))
    if done.returncode:
        raise OSError(f"{os.path.basename(script)} failed: {done.stderr.strip()[-500:]}")
    result: dict = json.loads(done.stdout)
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_listening(proc: subprocess.Popen, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"server exited with status {proc.returncode} before listening")
        try:
            socket.create_connection((HOST, port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"server not listening on port {port} after {timeout:.0f} s")


@dataclass
class ServerSpec:
    """A server to benchmark: C{kind} attach (serves our pty) or spawn (runs the guest)."""

    name: str
    kind: str
    protocol: str
    path: str
    command: str
    #: the server's --history-size, if not the run's (see run.py --big-history)
    history: int | None = None

    def argv(self, **values: str) -> list[str]:
        quoted = {k: shlex.quote(v) for k, v in values.items() if k != "guest"}
        quoted["guest"] = values.get("guest", "")
        return shlex.split(self.command.format(**quoted))


class Session:
    """
    One fresh server (with a fresh pty pair for an attach server) and its guest: every
    scenario gets its own, so no history or memory carries over.
    """

    def __init__(self, spec: ServerSpec, registry: Registry, control: Control,
                 workload_path: str, python: str, history: int, pythonpath: str) -> None:
        self.spec = spec
        self.registry = registry
        self.control = control
        self.workload_path = workload_path
        self.port = free_port()
        self.guest: Channel | None = None
        self.guest_pids: set[int] = set()
        self.master = self.slave = -1
        values = {"host": HOST, "port": str(self.port), "python": python, "bench": BENCH,
                  "history": str(spec.history or history), "repo": REPO}
        if spec.kind == "attach":
            self.master, self.slave = os.openpty()
            tty.setraw(self.slave)
            values["pty"] = os.ttyname(self.slave)
            guest = registry.start(self.guest_argv(f"fd:{self.master}"), "guest",
                                   pass_fds=(self.master,))
            self.guest = control.accept(guest, what="the guest")
            self.guest_pids.add(self.guest.pid)
        else:
            values["guest"] = shlex.join(self.guest_argv("stdio"))
        env = dict(os.environ)
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = registry.start(spec.argv(**values), spec.name, env=env)
        self.ps = psutil.Process(self.proc.pid)
        try:
            wait_listening(self.proc, self.port)
        except BenchError:
            self.close()
            raise
        # the server has the slave open now; the pair stays ours until close()

    def guest_argv(self, fd_spec: str) -> list[str]:
        return [sys.executable, os.path.join(BENCH, "guest.py"), self.control.path, fd_spec,
                self.workload_path]

    def need_guest(self) -> Channel:
        """The guest (a spawn server starts it when the first client attaches)."""
        if self.guest is None:
            self.guest = self.control.accept(None, what="the guest (spawned by the server)")
            self.guest_pids.add(self.guest.pid)
        return self.guest

    def clients(self, name: str = "clients") -> Channel:
        """A new client process for this server."""
        proc = self.registry.start(
            [sys.executable, os.path.join(BENCH, "clientproc.py"), self.control.path,
             self.workload_path, HOST, str(self.port), self.spec.path, self.spec.protocol],
            name)
        return self.control.accept(proc, what="a client process")

    def cpu(self) -> float:
        """User+system CPU seconds of the server and its descendants, guests excluded."""
        total = 0.0
        try:
            procs = [self.ps] + self.ps.children(recursive=True)
        except psutil.Error:
            return total
        for p in procs:
            if p.pid in self.guest_pids:
                continue
            try:
                total += cpu_seconds(p)
            except psutil.Error:
                pass
        return total

    def rss(self) -> int:
        return self.ps.memory_info().rss

    def close(self) -> int | None:
        status = self.registry.stop(self.proc)
        if self.guest is not None:
            quit_guest(self.registry, self.guest)
        for fd in (self.master, self.slave):
            if fd >= 0:
                os.close(fd)
        self.master = self.slave = -1
        return status


class RssSampler(threading.Thread):
    """The server's peak RSS, sampled every 50 ms until stopped."""

    def __init__(self, session: Session) -> None:
        super().__init__(daemon=True)
        self.session = session
        self.peak = session.rss()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(0.05):
            try:
                self.peak = max(self.peak, self.session.rss())
            except psutil.Error:
                return

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


class TreeCpu(threading.Thread):
    """
    User+system CPU seconds of some processes and all their descendants over a window,
    descendants that come and go included (OpenSSH's sshd forks a monitor, a session
    process and the command for every connection).

    Sampled every C{interval} from L{start} to L{stop}, each process keyed by pid and
    start time: one alive at the start counts from its first sample, one born in the
    window from zero; one that exits in the window counts up to its last sample (at most
    C{interval} of its CPU is missed, and such processes are counted in C{exited}). The
    exact alternative, a parent's C{children_*} times, only holds children it has reaped,
    and it would charge them for their whole life (key exchange, authentication) instead of
    the window.
    """

    def __init__(self, roots: list[psutil.Process], exclude: set[int] = frozenset(),
                 interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.roots = roots
        self.exclude = exclude
        self.interval = interval
        self._first: dict[tuple, float] = {}
        self._last: dict[tuple, float] = {}
        self._names: dict[tuple, str] = {}
        self._alive: set[tuple] = set()
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._t0 = 0.0

    def _sample(self, initial: bool = False) -> None:
        procs: list[psutil.Process] = []
        for root in self.roots:
            try:
                procs += [root] + root.children(recursive=True)
            except psutil.Error:
                pass
        alive = set()
        with self._lock:
            for p in procs:
                if p.pid in self.exclude:
                    continue
                try:
                    with p.oneshot():
                        key = (p.pid, p.create_time())
                        name = p.name()
                    cpu = cpu_seconds(p)
                except psutil.Error:
                    continue
                alive.add(key)
                if key not in self._first:
                    self._first[key] = cpu if initial or key[1] < self._t0 else 0.0
                    self._names[key] = name
                self._last[key] = cpu
            self._alive = alive

    def start(self) -> None:
        self._t0 = time.time()
        self._sample(initial=True)
        super().start()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self._sample()

    def stop(self) -> dict:
        """
        C{cpu_s} in all, C{by_name} (process name: seconds), C{by_pid} (pid: seconds, to
        tell a main process from its workers of the same name), C{processes}, C{exited}.
        """
        self._stop_event.set()
        self.join()
        self._sample()
        by_name: dict[str, float] = {}
        by_pid: dict[int, float] = {}
        for key, first in self._first.items():
            name = self._names[key]
            by_name[name] = by_name.get(name, 0.0) + self._last[key] - first
            by_pid[key[0]] = by_pid.get(key[0], 0.0) + self._last[key] - first
        return {"cpu_s": sum(by_name.values()), "by_name": by_name, "by_pid": by_pid,
                "processes": len(self._first), "exited": len(set(self._first) - self._alive)}
