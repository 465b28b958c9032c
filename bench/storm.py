"""
The storm scenario (issue 18): a host's consoles all busy at once, cloud-console (one
process: --config, --log-dir) beside conserver 8.2.7 (Debian's conserver-server: a master
and a child process per 16 consoles, a log file per console), in the same run, on the
same ptys, one server after the other (the order rotating between repeats).

One fleet guest (fleetguest.py) holds every pty pair, both ends, so the same consoles
serve each server in turn. Per server, at N consoles:

 1. start-up: a probe line waits in every console before the server starts; the time
    until every console's log file holds it (and until the port accepts a connection);
 2. idle: PSS and RSS of the server's whole process tree, and its CPU over a few seconds;
 3. at once: every console writes its boot log (100-200 KB of whole workload lines, the
    same bytes for a console in every run) as fast as its pty takes it; the server
    tree's CPU from the first write until every log holds its payload, per MiB logged;
 4. paced: the same volume at an aggregate rate (--storm-rate), each console topped up
    every 10 ms in proportion to its size, so all of them end together; CPU per MiB;
 5. echo: one more console, C{echo}, whose guest (guest.py's echo) sends back every byte
    at once; a read-write client (WebSocket /c/echo/ws, raw frames; conserver's own
    protocol, conserverclient.py) types a byte every 20 ms and times its echo: 100
    samples idle, then 250 while all N consoles write at 4 MiB/s aggregate, paced.

After every phase each log is checked byte-exact: after the phase's sync marker line (what
came before it, such as conserver's "[-- Console up --]" line and the probe, does not
count) it must hold the console's payload, no more, no less.

conserver's start-up grows with N by design: its master forks a child per 16 consoles
(-m, left at the package's default) and sleeps 0.75 s after each fork (seen with strace),
so 1,000 consoles take some 47 s to open; it listens once every child is started.

Figures are returned (printed by report.py), never asserted. conserver is skipped, with a
message, where it is not installed (apt-get install conserver-server).
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import time
from dataclasses import dataclass

import psutil

from fleet import (
    SOFT_NOFILE,
    PtyGuest,
    _clients,
    _env,
    _fleet_guest,
    _log_tail,
    _name,
    write_config,
)
from procs import HOST, BenchError, TreeCpu, cpu_seconds, free_port, quit_guest, tree_memory
from scenarios import Context, MiB, _tag, percentile
from workload import load, marker

CC, CONSERVER = "cloud-console", "conserver"
CONSERVER_PATH = "/usr/sbin/conserver"
CONSERVER_MISSING = (f"conserver is not installed ({CONSERVER_PATH} is missing): "
                     "apt-get install conserver-server; the storm scenario measures "
                     "cloud-console without it")
ECHO = "echo"
#: a console's boot log: whole workload lines, this many bytes or a line less
BOOT_MIN, BOOT_MAX = 100_000, 200_000


@dataclass(frozen=True)
class StormServer:
    """A column of the storm's table: cloud-console (with C{extra} arguments) or conserver."""

    label: str
    kind: str
    extra: tuple[str, ...] = ()


def parse_servers(spec: str, cc_args: str = "") -> list[StormServer]:
    """
    --storm-servers: a comma-separated list of C{cloud-console}, C{conserver} and
    C{cloud-console:ARGS}, a variant of cloud-console with ARGS (split as a shell would)
    after --storm-cc-args on its command line; each entry, as written, names a column.
    """
    servers: list[StormServer] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        kind, _, args = item.partition(":")
        if kind == CONSERVER and not args:
            servers.append(StormServer(item, kind))
        elif kind == CC:
            servers.append(StormServer(item, kind, tuple(shlex.split(cc_args))
                                       + tuple(shlex.split(args))))
        else:
            raise ValueError(f"unknown storm server {item!r}: cloud-console, "
                             "cloud-console:ARGS or conserver")
    labels = [s.label for s in servers]
    if len(set(labels)) != len(labels):
        raise ValueError(f"a storm server named twice: {spec!r}")
    return servers


def installed(servers: list[StormServer]) -> list[StormServer]:
    """The servers that can run here; conserver left out, and said so, where missing."""
    if any(s.kind == CONSERVER for s in servers) and not os.access(CONSERVER_PATH, os.X_OK):
        print(f"note: {CONSERVER_MISSING}", flush=True)
        return [s for s in servers if s.kind != CONSERVER]
    return servers


@dataclass
class StormOptions:
    sizes: list[int]  # console counts
    repeats: int
    servers: list[StormServer]
    rate: float  # bytes/s of the paced phase, all consoles together
    idle_seconds: float
    settle: float  # seconds between start-up and the idle figures
    flood_rate: float = 4 * MiB  # bytes/s of every console together while the echo is timed
    echo_idle: int = 100
    echo_flood: int = 250
    echo_interval: float = 0.02
    echo_warmup: int = 10


# -- the payloads --------------------------------------------------------------------------


def slices(workload: bytes, sizes: list[int]) -> tuple[list[int], list[int]]:
    """
    Where each console's bytes start in the workload and how many there are: whole
    lines (from a line's start to a line's end, at most C{sizes[i]}), at places spread
    over the workload by the console's index, so consoles differ and each one writes the
    same bytes in every run.
    """
    offsets, lengths = [], []
    for i, size in enumerate(sizes):
        span = len(workload) - size - 1
        if span <= 0:
            raise BenchError(f"the workload ({len(workload)} B) is too small for {size} B")
        start = workload.index(b"\n", (i * 1_000_003) % span) + 1
        end = workload.rindex(b"\n", start, start + size) + 1
        offsets.append(start)
        lengths.append(end - start)
    return offsets, lengths


def boot_sizes(n: int) -> list[int]:
    """Each console's boot log size, between BOOT_MIN and BOOT_MAX, by its index."""
    return [BOOT_MIN + (i * 65_537) % (BOOT_MAX - BOOT_MIN) for i in range(n)]


def _difference(got: bytes, want: memoryview) -> str:
    if len(got) < len(want) and want[:len(got)] == got:
        return f"short by {len(want) - len(got)} bytes"
    if len(got) > len(want) and got[:len(want)] == want:
        return f"{len(got) - len(want)} bytes too many: {got[len(want):][:40]!r}"
    at = next(i for i in range(min(len(got), len(want))) if got[i] != want[i])
    return (f"differs at byte {at} of {len(want)}: got {got[at:at + 20]!r}, expected "
            f"{bytes(want[at:at + 20])!r}")


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _accepts(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), 0.2).close()
        return True
    except OSError:
        return False


# -- one server ----------------------------------------------------------------------------


@dataclass
class Served:
    """A server running on the first C{n} consoles (and C{echo}), its logs in C{logdir}."""

    server: StormServer
    proc: subprocess.Popen
    ps: psutil.Process
    port: int
    logdir: str
    n: int
    t_spawn: float

    def log(self, i: int | str) -> str:
        return os.path.join(self.logdir, f"{_name(i) if isinstance(i, int) else i}.log")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"{self.server.label} exited with status {self.proc.returncode} "
                             f"(log: {_log_tail(self.proc)})")


def _conserver_config(path: str, logdir: str, consoles: dict[str, str]) -> None:
    """The brief's conserver.cf: a device console per pty, raw logs, no timestamps."""
    with open(path, "w") as f:
        f.write("default * {\n    master localhost; type device; baud 115200; parity none;\n"
                "    options !ixon,!ixoff;\n"
                f"    logfile {logdir}/&.log; timestamp \"\"; rw *;\n}}\n"
                "access * { trusted 127.0.0.1; }\n"
                "config * { autocomplete no; initdelay 0; }\n")
        f.writelines(f"console {name} {{ device {source}; }}\n" for name, source in consoles.items())


class Storm:
    """The ptys, the echo console and the payloads, shared by every server run."""

    def __init__(self, ctx: Context, opts: StormOptions) -> None:
        self.ctx, self.opts = ctx, opts
        self.workload = load(ctx.workload_path)
        self.echo: PtyGuest | None = None
        self.guest = _fleet_guest(ctx)
        self.writer = psutil.Process(self.guest.pid)  # its CPU: what the load costs
        try:
            self.paths = self.guest.call("open", n=max(opts.sizes), timeout=120)["paths"]
            self.echo = PtyGuest(ctx, "storm-echo-guest")
            self.echo.chan.send(op="echo", rate=0)
            self.echo.chan.recv("echo")
        except BaseException:
            self.close()
            raise

    def plan(self) -> list[tuple[int, int, StormServer, list[str]]]:
        """(N, repeat, server, that repeat's order) for every run, the order rotating."""
        runs = []
        servers = self.opts.servers
        for n in self.opts.sizes:
            for rep in range(self.opts.repeats):
                k = rep % len(servers)
                order = servers[k:] + servers[:k]
                runs += [(n, rep, s, [o.label for o in order]) for s in order]
        return runs

    def close(self) -> None:
        if self.echo is not None:
            try:
                self.echo.chan.send(op="stop")
                self.echo.chan.recv("stop", 5)
            except (BenchError, OSError):
                pass
            self.echo.close()
            self.echo = None
        quit_guest(self.ctx.registry, self.guest)

    # -- a run ---------------------------------------------------------------------------

    def measure(self, server: StormServer, n: int, rep: int, order: list[str]) -> dict:
        """Every figure of one server at N consoles; a phase that fails is named in problems."""
        # the machine's load average before and after: the cores are shared, and a busy
        # neighbour shows in the latencies first
        out: dict = {"server": server.label, "consoles": n, "rep": rep, "order": order,
                     "problems": {}, "load": [os.getloadavg()[0]]}
        probe = f"<storm probe {_tag('p')}>\r\n"
        self.guest.call("flush")
        short = self.guest.call("write", n=n, data=probe)["short"]
        if short:
            raise BenchError(f"the probe did not fit in {short} ptys")
        served = self._start(server, n, rep)
        try:
            out["startup"] = self._startup(served, probe.encode())
            out["idle"] = self._idle(served)
            phases = (("at_once", self._at_once), ("paced", self._paced), ("echo", self._echo))
            for phase, fn in phases:
                try:
                    out[phase] = fn(served)
                except BenchError as e:
                    out["problems"][phase] = str(e)
                    served.check_alive()
            out["memory_end"] = tree_memory(served.ps)
        finally:
            out["stop"] = self.ctx.registry.stop_tree(served.proc)
            out["load"].append(os.getloadavg()[0])
        return out

    def _start(self, server: StormServer, n: int, rep: int) -> Served:
        ctx = self.ctx
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", server.label)
        home = os.path.join(ctx.registry.logdir, f"storm-{n}-{rep}-{slug}")
        logdir = os.path.join(home, "logs")
        os.makedirs(logdir)
        consoles = {_name(i): self.paths[i] for i in range(n)}
        consoles[ECHO] = self.echo.path
        port = free_port()
        env = None
        if server.kind == CONSERVER:
            config, passwd = os.path.join(home, "conserver.cf"), os.path.join(home, "passwd")
            _conserver_config(config, logdir, consoles)
            open(passwd, "w").close()  # no passwords: 127.0.0.1 is trusted
            argv = [CONSERVER_PATH, "-C", config, "-P", passwd, "-p", str(port), "-M", HOST,
                    "-E"]
        else:
            config = os.path.join(home, "consoles.toml")
            write_config(config, consoles)
            argv = [ctx.python, "-m", "cloud_console.cli", "--config", config, "--log-dir",
                    logdir, "--port", f"tcp:port={port}:interface={HOST}", *server.extra]
            env = _env(ctx)
        t_spawn = time.monotonic()
        # started as a service manager would, with a soft limit of 1,024 descriptors
        proc = ctx.registry.start(argv, f"storm-{n}-{slug}", env=env, nofile=SOFT_NOFILE)
        return Served(server, proc, psutil.Process(proc.pid), port, logdir, n, t_spawn)

    def _startup(self, served: Served, probe: bytes) -> dict:
        """Until every console's log holds the probe written before the server started."""
        pending = set(range(served.n))
        read = dict.fromkeys(pending, 0)  # a log is read again only once it grew
        listening = None
        pause = 0.01 if served.n <= 100 else 0.05
        while True:
            served.check_alive()
            now = time.monotonic()
            if listening is None and _accepts(served.port):
                listening = now - served.t_spawn
            for i in list(pending):
                path = served.log(i)
                size = _size(path)
                if size >= len(probe) and size != read[i]:
                    read[i] = size
                    with open(path, "rb") as f:
                        if probe in f.read():
                            pending.discard(i)
            if not pending:
                opened = time.monotonic() - served.t_spawn
                # conserver listens once every child is started
                while listening is None and time.monotonic() - served.t_spawn < opened + 10:
                    if _accepts(served.port):
                        listening = time.monotonic() - served.t_spawn
                    else:
                        time.sleep(0.01)
                return {"open_s": opened, "listening_s": listening}
            if now - served.t_spawn > self.ctx.timeout:
                raise BenchError(f"{len(pending)} of {served.n} consoles never logged the probe "
                                 f"in {self.ctx.timeout:.0f} s")
            time.sleep(pause)

    def _idle(self, served: Served) -> dict:
        time.sleep(self.opts.settle)
        memory = tree_memory(served.ps)
        meter = TreeCpu([served.ps], interval=1.0)
        meter.start()
        t0 = time.monotonic()
        time.sleep(self.opts.idle_seconds)
        cpu = meter.stop()
        elapsed = time.monotonic() - t0
        return {**memory, "cpu_s": cpu["cpu_s"], "seconds": elapsed,
                "cores": cpu["cpu_s"] / elapsed}

    def _at_once(self, served: Served) -> dict:
        offsets, sizes = slices(self.workload, boot_sizes(served.n))
        return self._stream(served, "ATONCE", offsets, sizes, [0] * served.n)

    def _paced(self, served: Served) -> dict:
        offsets, sizes = slices(self.workload, boot_sizes(served.n))
        total = sum(sizes)
        rates = [self.opts.rate * size / total for size in sizes]
        return {"rate": self.opts.rate,
                **self._stream(served, "PACED", offsets, sizes, rates)}

    def _echo(self, served: Served) -> dict:
        """The operator's echo, idle and while every console writes (paced)."""
        opts = self.opts
        if served.server.kind == CONSERVER:
            protocol, path = "conserver", ECHO
        else:
            protocol, path = "raw", f"/c/{ECHO}/ws"
        prober = _clients(self.ctx, served.port, "storm-echo-probe", path, protocol)
        try:
            r = prober.call("connect", paths=[path], timeout=60)
            if r["failed"]:
                raise BenchError(f"the echo client could not attach: {r['errors']}")

            def probe(samples: int, warmup: int) -> dict:
                t0 = time.monotonic()
                got = prober.call("latency", samples=samples, warmup=warmup,
                                  interval=opts.echo_interval, timeout=self.ctx.timeout)
                rtts = got["rtts_us"]
                out = {"n": len(rtts), "timeouts": got["timeouts"],
                       "seconds": time.monotonic() - t0}
                if rtts:
                    out.update(p50=percentile(rtts, 50), p99=percentile(rtts, 99),
                               max=max(rtts))
                return out

            idle = probe(opts.echo_idle, opts.echo_warmup)
            # the flood outlasts the probing: 20 ms a sample, a few ms each, 3 s to spare
            seconds = opts.echo_flood * (opts.echo_interval + 0.002) + 3.0
            each = int(opts.flood_rate * seconds / served.n)
            offsets, sizes = slices(self.workload, [each] * served.n)
            rates = [opts.flood_rate / served.n] * served.n
            during: dict = {}
            flood = self._stream(served, "FLOOD", offsets, sizes, rates,
                                 during=lambda: during.update(probe(opts.echo_flood, 0)))
            return {"idle": idle, "flood": {**during, "load": {"rate": opts.flood_rate,
                                                                **flood}}}
        finally:
            try:
                prober.send(op="quit")
            except OSError:
                pass
            self.ctx.registry.stop(prober.proc)
            prober.sock.close()

    # -- streams and logs ----------------------------------------------------------------

    def _stream(self, served: Served, what: str, offsets: list[int], sizes: list[int],
                rates: list[float], during=None) -> dict:
        """
        Every console writes the sync line, then its slice of the workload, at its rate
        (0: at once); the server tree's CPU until every log holds it all, then the check.
        C{during}, if given, runs once the writing has begun (the echo probe).
        """
        n = served.n
        tag = _tag(f"STORM-{what}")
        sync = marker(tag) + b"\r\n"
        bases = [_size(served.log(i)) for i in range(n)]
        want = {i: bases[i] + len(sync) + sizes[i] for i in range(n)}
        meter = TreeCpu([served.ps], interval=1.0)
        meter.start()
        writer0 = cpu_seconds(self.writer)
        t0 = time.monotonic()
        self.guest.call("stream", indices=list(range(n)), sync=tag, sync_line=True,
                        offset=offsets, size=sizes, rate=rates)
        if during is not None:
            during()
        missing = self._wait_logs(served, want)
        wall = time.monotonic() - t0
        cpu = meter.stop()
        writer = cpu_seconds(self.writer) - writer0
        written = self._streamed(bool(missing))
        mib = sum(sizes) / MiB
        out = {"consoles": n, "mib": mib, "wall_s": wall, "cpu_s": cpu["cpu_s"],
               "cores": cpu["cpu_s"] / wall, "processes": cpu["processes"],
               "cpu_s_by_pid": cpu["by_pid"],
               "write_s": written, "writer_cpu_s": writer, "incomplete": len(missing),
               "cpu_ms_per_mib": None if missing else cpu["cpu_s"] * 1e3 / mib}
        out.update(self._check(served, bases, sync, offsets, sizes))
        return out

    def _wait_logs(self, served: Served, want: dict[int, int]) -> list[int]:
        """
        Until every log reached its size; the consoles whose logs did not, if nothing
        moved for 15 s or the run's --timeout passed.
        """
        pending = dict(want)
        pause = 0.01 if served.n <= 100 else 0.05
        t0 = moved = time.monotonic()
        last = -1
        while pending:
            served.check_alive()
            total = 0
            for i, size in list(pending.items()):
                got = _size(served.log(i))
                if got >= size:
                    del pending[i]
                total += got
            now = time.monotonic()
            if total != last:
                last, moved = total, now
            if pending and (now - moved > 15 or now - t0 > self.ctx.timeout):
                break
            time.sleep(pause)
        return sorted(pending)

    def _streamed(self, abandon: bool) -> float | None:
        """The guest's time to write it all; with C{abandon}, what is left is dropped."""
        guest = self.guest
        if not abandon:
            return guest.recv("streamed", 30)["seconds"]
        guest.call("drop")
        guest.forget("streamed")  # if it came before the order
        return None

    def _check(self, served: Served, bases: list[int], sync: bytes, offsets: list[int],
               sizes: list[int]) -> dict:
        """Each log, after the sync line, holds exactly its console's payload."""
        view = memoryview(self.workload)
        errors = []
        for i in range(served.n):
            with open(served.log(i), "rb") as f:
                f.seek(bases[i])
                got = f.read()
            at = got.rfind(sync)
            if at < 0:
                errors.append(f"{_name(i)}: no sync line")
                continue
            want = view[offsets[i]:offsets[i] + sizes[i]]
            got = got[at + len(sync):]
            if got != want:
                errors.append(f"{_name(i)}: {_difference(got, want)}")
        return {"exact": served.n - len(errors), "errors": errors[:3]}
