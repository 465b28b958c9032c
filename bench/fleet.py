"""
The fleet scenario: one cloud-console process serving a host's consoles, measured
against one process per console, with real ptys (held by L{fleetguest}), real servers and
real WebSocket clients in client processes.

 - L{host}: the resident memory of one process serving 1, 10, 100 and 1,000 idle
   consoles, and of 10 single-console processes (extrapolated to N); the time from spawn
   to C{/api/consoles} answering with every console up; idle CPU with the most consoles;
   a SIGHUP reload of those with some sources changed, while clients of a sample of the
   unchanged consoles verify that their stream goes on byte-exact, unclosed;
 - L{neighbour}: one console flooding one client at full speed while an operator types
   on another console of the same process (echo round trips through the guest), against
   the same two consoles served by two single-console processes.

Figures are returned (printed by report.py), never asserted: a server that fails
(exits, refuses, is slow) is reported as it was measured.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import tty
import urllib.error
import urllib.request
from dataclasses import dataclass

import psutil

from procs import BENCH, HOST, BenchError, Channel, free_port, quit_guest, wait_listening
from scenarios import MiB, Context, _tag, percentile

KiB = 1 << 10

#: The soft RLIMIT_NOFILE the fleet's servers are started with.
SOFT_NOFILE = 1024


@dataclass
class FleetOptions:
    sizes: list[int]  # console counts for one process, ascending; the last is "the fleet"
    singles: int  # single-console processes measured (extrapolated to each size)
    idle_seconds: float
    settle: float  # seconds between serving and reading RSS
    watched: int  # unchanged consoles with a client verifying its stream across the reload
    changed: int  # consoles given a new source by the reload
    samples: int  # echo round trips in the neighbour scenario
    warmup: int
    flood_seconds: float  # the flood alone, measured for this long


# -- processes ---------------------------------------------------------------------------


def _env(ctx: Context) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ctx.pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _log_tail(proc, lines: int = 6) -> str:
    try:
        with open(proc.log_path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def _api(port: int, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(f"http://{HOST}:{port}/api/consoles", timeout=timeout) as r:
        return json.loads(r.read())


def _cpu(ps: psutil.Process) -> float:
    t = ps.cpu_times()
    return t.user + t.system


def _name(i: int) -> str:
    return f"c{i:04d}"


def write_config(path: str, sources: dict[str, str]) -> None:
    """A --config file, one [console.NAME] table each; replaced atomically."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for name, source in sources.items():
            f.write(f'[console.{name}]\nsource = "{source}"\n\n')
    os.replace(tmp, path)


class FleetServer:
    """One cloud-console process serving the consoles of a --config file."""

    def __init__(self, ctx: Context, config: str, n: int, label: str) -> None:
        self.ctx = ctx
        self.n = n
        self.port = free_port()
        argv = [ctx.python, "-m", "cloud_console.cli", "--config", config,
                "--port", f"tcp:port={self.port}:interface={HOST}"]
        self.t_spawn = time.monotonic()
        # started with the usual soft limit of 1,024 descriptors (a login shell's, or
        # systemd's default): 1,000 consoles need more, and the server must raise it
        self.proc = ctx.registry.start(argv, label, env=_env(ctx), nofile=SOFT_NOFILE)
        self.ps = psutil.Process(self.proc.pid)

    def wait_serving(self, timeout: float) -> dict:
        """
        Poll /api/consoles until it answers with all n consoles up; the times (from
        spawn) of the first answer and of the answer with every console up.
        """
        first = None
        last: dict = {}
        deadline = self.t_spawn + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"the server with {self.n} consoles exited with status "
                                 f"{self.proc.returncode} before serving them all (log: "
                                 f"{_log_tail(self.proc)})")
            try:
                last = _api(self.port, 5.0)
            except (urllib.error.URLError, OSError, ValueError):
                time.sleep(0.01)
                continue
            t = time.monotonic() - self.t_spawn
            if first is None:
                first = {"t": t, "up": last["totals"]["up"]}
            if last["totals"]["consoles"] == self.n and last["totals"]["up"] == self.n:
                return {"serving_s": t, "first_answer_s": first["t"],
                        "first_answer_up": first["up"]}
            time.sleep(0.02)
        down = [c for c in last.get("consoles", []) if c["state"] != "up"]
        raise BenchError(
            f"the server with {self.n} consoles was not serving them all after {timeout:.0f} s: "
            f"last answer {last.get('totals')}, first down {down[:2]} (log: "
            f"{_log_tail(self.proc)})")

    def stop(self) -> None:
        self.ctx.registry.stop(self.proc)


def _fleet_guest(ctx: Context) -> Channel:
    proc = ctx.registry.start([sys.executable, os.path.join(BENCH, "fleetguest.py"),
                               ctx.control.path, ctx.workload_path], "fleet-guest")
    return ctx.control.accept(proc, what="the fleet guest")


def _clients(ctx: Context, port: int, name: str, path: str = "/",
             protocol: str = "raw") -> Channel:
    proc = ctx.registry.start([sys.executable, os.path.join(BENCH, "clientproc.py"),
                               ctx.control.path, ctx.workload_path, HOST, str(port), path,
                               protocol], name)
    return ctx.control.accept(proc, what="a client process")


def _nofile(ps: psutil.Process) -> list[int] | None:
    try:
        return list(ps.rlimit(psutil.RLIMIT_NOFILE))
    except (psutil.Error, AttributeError):
        return None


# -- the host: memory, start-up, idle CPU, reload -----------------------------------------


def host(ctx: Context, opts: FleetOptions) -> dict:
    """
    Every figure of a host's consoles that needs many ptys; one that cannot be measured
    is named in C{failed} (by part) and the others are still measured where they can be.
    """
    out: dict = {"sizes": opts.sizes, "problems": {}, "soft_nofile": SOFT_NOFILE}
    biggest = opts.sizes[-1]
    workdir = ctx.registry.logdir
    guest = _fleet_guest(ctx)
    try:
        out["guest_nofile"] = guest.hello.get("nofile")
        paths = guest.call("open", n=biggest + opts.changed, timeout=60)["paths"]
        out["singles"] = _singles(ctx, paths[:opts.singles], opts)
        out["memory"] = {}
        server = None
        for n in opts.sizes:
            config = os.path.join(workdir, f"fleet-{n}.toml")
            write_config(config, {_name(i): paths[i] for i in range(n)})
            server = FleetServer(ctx, config, n, f"fleet-{n}")
            try:
                timing = server.wait_serving(ctx.timeout)
                time.sleep(opts.settle)
                m = server.ps.memory_full_info()
                out["memory"][n] = {"rss": m.rss, "uss": m.uss, "pss": m.pss,
                                    "fds": server.ps.num_fds(), "threads": server.ps.num_threads(),
                                    "nofile": _nofile(server.ps), **timing}
            except BenchError as e:
                out["problems"][f"{n} consoles"] = str(e)
                server.stop()
                server = None
                break
            if n != biggest:
                server.stop()
                server = None
        if server is None:
            return out
        try:
            out["idle"] = _idle(server, opts.idle_seconds)
            out["reload"] = _reload(ctx, server, guest, paths, opts)
            time.sleep(2 * opts.settle)  # what the reload's streams left behind, settled
            out["rss_after_all"] = server.ps.memory_info().rss
        except (BenchError, psutil.Error) as e:
            out["problems"]["idle/reload"] = str(e)
        finally:
            if server.proc.poll() is not None:
                out["problems"]["server"] = (f"exited with status {server.proc.returncode} (log: "
                                           f"{_log_tail(server.proc)})")
            server.stop()
        return out
    finally:
        quit_guest(ctx.registry, guest)


def _singles(ctx: Context, paths: list[str], opts: FleetOptions) -> dict:
    """C{cloud-console PTY 127.0.0.1 PORT} once per pty, all running together."""
    procs = []
    try:
        for i, path in enumerate(paths):
            port = free_port()
            argv = [ctx.python, "-m", "cloud_console.cli", path, HOST, str(port)]
            procs.append((ctx.registry.start(argv, f"single-{i}", env=_env(ctx)), port,
                          time.monotonic()))
        listening = []
        for proc, port, t0 in procs:
            wait_listening(proc, port, ctx.timeout)
            listening.append(time.monotonic() - t0)
        time.sleep(opts.settle)
        rss, pss = [], []
        for proc, _, _ in procs:
            m = psutil.Process(proc.pid).memory_full_info()
            rss.append(m.rss)
            pss.append(m.pss)
        return {"n": len(procs), "rss": rss, "pss": pss, "rss_mean": sum(rss) / len(rss),
                "pss_mean": sum(pss) / len(pss), "listening_s_max": max(listening)}
    finally:
        for proc, _, _ in procs:
            ctx.registry.stop(proc)


def _idle(server: FleetServer, seconds: float) -> dict:
    ps = server.ps
    time.sleep(0.5)
    rss0 = ps.memory_info().rss
    cpu0, sw0 = _cpu(ps), ps.num_ctx_switches()
    t0 = time.monotonic()
    time.sleep(seconds)
    cpu1, sw1 = _cpu(ps), ps.num_ctx_switches()
    elapsed = time.monotonic() - t0
    return {"consoles": server.n, "seconds": elapsed, "cpu_s": cpu1 - cpu0,
            "cores": (cpu1 - cpu0) / elapsed,
            "wakeups_per_s": (sw1.voluntary + sw1.involuntary - sw0.voluntary - sw0.involuntary)
            / elapsed,
            "rss_growth": ps.memory_info().rss - rss0}


def _spread(n: int, k: int, offset: int, avoid: set[int] = frozenset()) -> list[int]:
    picked: list[int] = []
    for j in range(k):
        i = (j * n // max(1, k) + offset) % n
        while i in avoid or i in picked:
            i = (i + 1) % n
        picked.append(i)
    return picked


def _reload(ctx: Context, server: FleetServer, guest: Channel, paths: list[str],
            opts: FleetOptions) -> dict:
    """
    SIGHUP with C{changed} consoles given new ptys: the time until /api/consoles shows
    every one of them up on its new pty, and what the clients of C{watched} unchanged
    consoles received meanwhile (their stream must go on byte-exact, unclosed).
    """
    n = server.n
    changed = _spread(n, min(opts.changed, n // 2), 5)
    watched = _spread(n, min(opts.watched, n - len(changed)), 20, set(changed))
    watchers = _clients(ctx, server.port, "reload-watched")
    r = watchers.call("connect", paths=[f"/c/{_name(i)}/ws" for i in watched],
                      timeout=ctx.timeout)
    if r["failed"]:
        raise BenchError(f"{r['failed']} watchers could not connect: {r['errors']}")
    leavers = _clients(ctx, server.port, "reload-changed")
    r = leavers.call("connect", paths=[f"/c/{_name(i)}/ws" for i in changed],
                     timeout=ctx.timeout)
    if r["failed"]:
        raise BenchError(f"{r['failed']} clients of changed consoles could not connect")
    leavers.call("discard")
    # Each watched console streams at a trickle for far longer than any reload should
    # take; once the reload is seen the rest is written at full speed.
    rate = 20 * KiB
    size = int(rate * 60)
    sync, end = _tag("FLEETSYNC"), _tag("FLEETEND")
    watchers.call("arm", sync=sync, end=end, size=size, timeout=ctx.timeout)
    guest.call("stream", indices=watched, sync=sync, end=end, size=size, rate=rate)
    watchers.recv("synced", ctx.timeout)
    time.sleep(1.0)
    new = {i: paths[n + k] for k, i in enumerate(changed)}
    sources = {_name(i): new.get(i, paths[i]) for i in range(n)}
    config = os.path.join(ctx.registry.logdir, f"fleet-{n}.toml")
    write_config(config, sources)
    cpu0 = _cpu(server.ps)
    t0 = time.monotonic()
    os.kill(server.proc.pid, signal.SIGHUP)
    polls = 0
    seen = None
    last: dict = {}
    names = {_name(i): path for i, path in new.items()}
    while time.monotonic() - t0 < ctx.timeout:
        if server.proc.poll() is not None:
            break
        try:
            last = _api(server.port, 10.0)
        except (urllib.error.URLError, OSError, ValueError):
            time.sleep(0.01)
            continue
        polls += 1
        by_name = {c["name"]: c for c in last["consoles"]}
        if all(by_name.get(name, {}).get("state") == "up"
               and by_name[name]["reason"].endswith(path) for name, path in names.items()):
            seen = time.monotonic() - t0
            break
        time.sleep(0.01)
    reload_cpu = _cpu(server.ps) - cpu0 if server.proc.poll() is None else None
    out: dict = {"consoles": n, "changed": len(changed), "watched": len(watched),
                 "reload_s": seen, "polls": polls, "reload_cpu_s": reload_cpu,
                 "totals_after": last.get("totals")}
    time.sleep(1.0)  # the watched streams go on after the reload, too
    guest.call("finish")
    guest.recv("streamed", ctx.timeout)
    results = watchers.recv("done", ctx.timeout + 10)["results"]
    errors = [r["error"] for r in results if r["error"]]
    out.update(watched_exact=len(results) - len(errors), watched_errors=errors[:3],
               watched_bytes=size)
    stats = watchers.call("stats")
    out["watched_closed"] = stats["lost"]
    closes = leavers.call("stats")["closes"]
    out["changed_closes"] = sorted({f"{c} {reason!r}" for c, reason in closes})
    out["changed_closed"] = len(closes)
    with open(server.proc.log_path, "rb") as f:
        lines = [ln for ln in f.read().decode("utf-8", "replace").splitlines()
                 if "consoles reloaded" in ln]
    out["log_line"] = lines[-1].split("] ", 1)[-1] if lines else None
    for w in (watchers, leavers):
        w.send(op="quit")
    return out


# -- the noisy neighbour -----------------------------------------------------------------


class PtyGuest:
    """A pty pair of ours, its master driven by a guest.py."""

    def __init__(self, ctx: Context, name: str) -> None:
        self.ctx = ctx
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.path = os.ttyname(self.slave)
        argv = [sys.executable, os.path.join(BENCH, "guest.py"), ctx.control.path,
                f"fd:{self.master}", ctx.workload_path]
        self.proc = ctx.registry.start(argv, name, pass_fds=(self.master,))
        self.chan = ctx.control.accept(self.proc, what=name)

    def close(self) -> None:
        try:
            self.chan.send(op="quit")
        except OSError:
            pass
        self.ctx.registry.stop(self.proc)
        self.chan.sock.close()
        os.close(self.master)
        os.close(self.slave)


def neighbour(ctx: Context, opts: FleetOptions) -> dict:
    """The same two consoles, served by one process, then by two, in the same run."""
    out: dict = {}
    for layout in ("two", "one"):
        flood, typist = PtyGuest(ctx, f"flood-guest-{layout}"), PtyGuest(ctx, f"typist-guest-{layout}")
        servers = []
        try:
            if layout == "one":
                config = os.path.join(ctx.registry.logdir, "neighbours.toml")
                write_config(config, {"flood": flood.path, "typist": typist.path})
                server = FleetServer(ctx, config, 2, "neighbours")
                servers.append(server.proc)
                server.wait_serving(ctx.timeout)
                ends = [(server.port, "/c/flood/ws"), (server.port, "/c/typist/ws")]
            else:
                ends = []
                for guest, what in ((flood, "flood"), (typist, "typist")):
                    port = free_port()
                    proc = ctx.registry.start([ctx.python, "-m", "cloud_console.cli",
                                               guest.path, HOST, str(port)],
                                              f"single-{what}", env=_env(ctx))
                    servers.append(proc)
                    wait_listening(proc, port, ctx.timeout)
                    ends.append((port, "/ws"))
            out[layout] = _neighbours(ctx, opts, flood, typist, ends,
                                      [psutil.Process(p.pid) for p in servers])
        except BenchError as e:
            out[layout] = {"failed": str(e)}
        finally:
            for proc in servers:
                if proc.poll() is not None and layout in out and "failed" not in out[layout]:
                    out[layout]["server_exited"] = proc.returncode
                ctx.registry.stop(proc)
            flood.close()
            typist.close()
    return out


def _neighbours(ctx: Context, opts: FleetOptions, flood: PtyGuest, typist: PtyGuest,
                ends: list[tuple[int, str]], servers: list[psutil.Process]) -> dict:
    (fport, fpath), (tport, tpath) = ends
    viewer = _clients(ctx, fport, "flood-viewer", fpath)
    viewer.call("connect", n=1)
    viewer.call("discard")
    prober = _clients(ctx, tport, "operator", tpath)
    prober.call("connect", n=1)
    typist.chan.send(op="echo", rate=0)
    typist.chan.recv("echo")

    def cpu() -> float:
        return sum(_cpu(p) for p in servers)

    # the operator alone: the echo with no flood
    idle = prober.call("latency", timeout=ctx.timeout, samples=max(100, opts.samples // 4),
                       warmup=opts.warmup)["rtts_us"]
    flood.chan.send(op="flood")
    flood.chan.recv("flood")
    time.sleep(1.0)

    def received() -> tuple[int, float]:
        stats = viewer.call("stats")
        if stats["lost"]:
            raise BenchError(f"the flood's viewer was closed: {stats['closes']}")
        return stats["received"][0], time.monotonic()

    b0, t0 = received()
    c0 = cpu()
    time.sleep(opts.flood_seconds)
    b1, t1 = received()
    c1 = cpu()
    alone = (b1 - b0) / MiB / (t1 - t0)
    alone_cores = (c1 - c0) / (t1 - t0)
    r = prober.call("latency", timeout=ctx.timeout, samples=opts.samples, warmup=opts.warmup)
    b2, t2 = received()
    c2 = cpu()
    during = (b2 - b1) / MiB / (t2 - t1)
    time.sleep(opts.flood_seconds)  # alone again: the mean of before and after is "alone"
    b3, t3 = received()
    after = (b3 - b2) / MiB / (t3 - t2)
    alone_cores = (alone_cores + (cpu() - c2) / (t3 - t2)) / 2
    before, alone = alone, (alone + after) / 2
    flood.chan.send(op="stop")
    flood.chan.recv("stop", ctx.timeout)
    typist.chan.send(op="stop")
    typist.chan.recv("stop")
    rtts = r["rtts_us"]
    out = {"processes": len(servers), "flood_alone": alone, "flood_during": during,
           "flood_before": before, "flood_after": after,
           "flood_ratio": during / alone if alone else None, "cores_alone": alone_cores,
           "cores_during": (c2 - c1) / (t2 - t1), "n": len(rtts), "timeouts": r["timeouts"],
           "idle_p50": percentile(idle, 50), "idle_p99": percentile(idle, 99)}
    if rtts:
        out.update(p50=percentile(rtts, 50), p99=percentile(rtts, 99), max=max(rtts))
    viewer.send(op="quit")
    prober.send(op="quit")
    return out
