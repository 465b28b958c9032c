"""
The restart scenario: one process serving 1,000 consoles restarted the way systemd
restarts it with the descriptor store, timed.

A stand-in for PID 1 (a datagram socket here, C{NOTIFY_SOCKET}) receives C{READY=1}
and the stored descriptors (C{FDSTORE=1} with C{SCM_RIGHTS}: one per console, and the
state's memfd); the server is stopped with SIGTERM and started again with every stored
descriptor at 3.. and C{LISTEN_FDS}/C{LISTEN_FDNAMES}/C{LISTEN_PID}, as systemd does.
Each console first gets C{--size} bytes of output (so the state has histories to carry).

Figures: the first start to READY=1 (opening 1,000 ptys), the stop (SIGTERM to exit,
the state written), the start again to READY=1 (adopting the kept descriptors and
replaying the state), and to C{/api/consoles} answering with every console up; the
state's size and the store's count. Returned, never asserted.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from dataclasses import dataclass

from fleet import _api, _env, _fleet_guest, _log_tail, _name, write_config
from procs import HOST, BenchError, free_port, quit_guest
from scenarios import Context

#: Between fork and exec, as PID 1 does: the stored descriptors moved to 3.., the
#: variables set (LISTEN_PID is the daemon's own pid, known only after the fork).
WRAPPER = r"""
import fcntl, os, sys
fds = [int(x) for x in sys.argv[1].split(",") if x]
floor = 3 + len(fds) + 16
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, floor) for fd in fds]
for fd in fds:
    if fd >= 3 + len(fds):
        os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
if fds:
    os.environ["LISTEN_FDS"] = str(len(fds))
    os.environ["LISTEN_FDNAMES"] = sys.argv[2]
    os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[3], sys.argv[3:])
"""


@dataclass
class RestartOptions:
    consoles: int
    size: int  # bytes of output per console before the restart


class Manager:
    """PID 1's side: the notification socket and the store."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.store: dict[str, int] = {}
        self.ready = 0

    def pump(self, until, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError("the service manager waited in vain (READY=1, or the store)")
            self.sock.settimeout(left)
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, 4096, 16)
            except socket.timeout:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            name = fields.get("FDNAME", "stored")
            if fields.get("FDSTOREREMOVE") == "1" and name in self.store:
                os.close(self.store.pop(name))
            if fields.get("FDSTORE") == "1":
                for fd in fds:
                    if name in self.store:
                        os.close(self.store.pop(name))
                    self.store[name] = fd
            else:
                for fd in fds:
                    os.close(fd)
            if fields.get("READY") == "1":
                self.ready += 1

    def close(self) -> None:
        for fd in self.store.values():
            os.close(fd)
        self.sock.close()
        os.unlink(self.path)


def restart(ctx: Context, opts: RestartOptions) -> dict:
    """Start, fill, stop and start again 1,000 consoles under the stand-in; the times."""
    workdir = ctx.registry.logdir
    guest = _fleet_guest(ctx)
    manager = Manager(os.path.join(workdir, "notify"))
    out: dict = {"consoles": opts.consoles, "bytes_each": opts.size}
    try:
        paths = guest.call("open", n=opts.consoles, timeout=60)["paths"]
        config = os.path.join(workdir, "restart.toml")
        write_config(config, {_name(i): paths[i] for i in range(opts.consoles)})
        port = free_port()
        env = _env(ctx)
        env["NOTIFY_SOCKET"] = manager.path
        for key in ("LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID"):
            env.pop(key, None)
        argv = [ctx.python, "-m", "cloud_console.cli", "--config", config,
                "--port", f"tcp:port={port}:interface={HOST}"]

        def start(label: str) -> tuple[object, float]:
            names = list(manager.store)
            fds = [manager.store[n] for n in names]
            wrapped = [sys.executable, "-c", WRAPPER, ",".join(map(str, fds)), ":".join(names), *argv]
            t0 = time.monotonic()
            proc = ctx.registry.start(wrapped, label, env=env, pass_fds=tuple(fds))
            return proc, t0

        def wait_ready(proc, t0: float, count: int) -> float:
            def done() -> bool:
                if proc.poll() is not None:
                    raise BenchError(f"the server exited with {proc.returncode}: {_log_tail(proc)}")
                return manager.ready >= count
            manager.pump(done, ctx.timeout)
            return time.monotonic() - t0

        proc, t0 = start("restart-first")
        out["first_ready_s"] = wait_ready(proc, t0, 1)
        if opts.size:
            guest.call("stream", indices=list(range(opts.consoles)), size=opts.size, rate=0,
                       sync="RESTARTSYNC", end="RESTARTEND")
            guest.recv("streamed", ctx.timeout)
            deadline = time.monotonic() + ctx.timeout
            while True:  # every console's output read by the server
                totals = _api(port, 10.0)
                if sum(c["bytesOut"] for c in totals["consoles"]) >= opts.consoles * opts.size:
                    break
                if time.monotonic() > deadline:
                    raise BenchError(f"the output did not all arrive: {totals['totals']}")
                time.sleep(0.05)
        t_stop = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(ctx.timeout)
        out["stop_s"] = time.monotonic() - t_stop
        out["stop_status"] = proc.returncode
        manager.pump(lambda: True, 1)
        out["stored"] = len(manager.store)
        if "state" in manager.store:
            out["state_bytes"] = os.fstat(manager.store["state"]).st_size
        proc, t0 = start("restart-again")
        out["again_ready_s"] = wait_ready(proc, t0, 2)
        while True:
            try:
                totals = _api(port, 10.0)["totals"]
            except OSError:
                time.sleep(0.01)
                continue
            if totals["up"] == opts.consoles:
                break
            time.sleep(0.01)
        out["again_serving_s"] = time.monotonic() - t0
        with open(proc.log_path, "rb") as f:  # type: ignore[attr-defined]
            log = f.read()
        out["adopted"] = log.count(b"adopted across the restart")
        out["state_taken"] = log.count(b"state taken over")
        ctx.registry.stop(proc)
        return out
    finally:
        quit_guest(ctx.registry, guest)
        manager.close()


