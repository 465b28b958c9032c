"""
The scenarios: raw pty baseline, throughput, echo latency, stalled client, memory,
history. Each returns a plain dict (printed by run.py, and saved with --json).
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import sys
import time
import tty
from dataclasses import dataclass

import psutil

from procs import BenchError, Control, Registry, RssSampler, ServerSpec, Session
from workload import cut_at_line_end, load

MiB = 1 << 20


@dataclass
class Context:
    registry: Registry
    control: Control
    workload_path: str
    python: str
    history: int
    size: int
    timeout: float
    pythonpath: str

    def session(self, spec: ServerSpec) -> Session:
        return Session(spec, self.registry, self.control, self.workload_path, self.python,
                       self.history, self.pythonpath)


_tags = iter(range(1, 1 << 30))


def _tag(what: str) -> str:
    return f"{what}-{next(_tags)}"


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


# -- raw pty -----------------------------------------------------------------------------


def baseline(ctx: Context, direction: str, runs: int) -> dict:
    """
    The workload through a bare pty pair: a guest writes, another guest reads (64 KiB
    blocking reads); also the reader's CPU per MiB, the floor for a server's at 1 client.
    """
    rates, cpus, reads = [], [], []
    for _ in range(runs):
        master, slave = os.openpty()
        tty.setraw(slave)
        src, dst = (master, slave) if direction == "master->slave" else (slave, master)
        try:
            procs, chans = [], []
            for fd, name in ((dst, "pty-reader"), (src, "pty-writer")):
                argv = [sys.executable, os.path.join(os.path.dirname(__file__), "guest.py"),
                        ctx.control.path, f"fd:{fd}", ctx.workload_path]
                proc = ctx.registry.start(argv, name, pass_fds=(fd,))
                procs.append(proc)
                chans.append(ctx.control.accept(proc, what=name))
            reader, writer = chans
            meter = psutil.Process(reader.pid)
            end = _tag("END")
            reader.send(op="read", size=ctx.size, end=end)
            reader.recv("read")  # ready
            cpu0 = sum(meter.cpu_times()[:2])
            t0 = time.monotonic()
            writer.send(op="write", size=ctx.size, end=end)
            result = reader.recv("read", ctx.timeout)
            if not result["ok"]:
                raise BenchError(f"raw pty: {result['error']}")
            rates.append(ctx.size / MiB / (result["t_end"] - t0))
            cpus.append((sum(meter.cpu_times()[:2]) - cpu0) * 1e3 / (ctx.size / MiB))
            reads.append(ctx.size / result["reads"])
            for ch in chans:
                ch.send(op="quit")
                ch.sock.close()
            for proc in procs:
                ctx.registry.stop(proc)
        finally:
            os.close(master)
            os.close(slave)
    return {"direction": direction, "median": statistics.median(rates), "best": max(rates),
            "runs": rates, "reader_cpu_ms_per_mib": statistics.median(cpus),
            "bytes_per_read": statistics.median(reads)}


def pty_echo(ctx: Context, samples: int, warmup: int) -> dict:
    """Round trips through a bare pty: we write a byte to the slave, a guest echoes it."""
    master, slave = os.openpty()
    tty.setraw(slave)
    try:
        argv = [sys.executable, os.path.join(os.path.dirname(__file__), "guest.py"),
                ctx.control.path, f"fd:{master}", ctx.workload_path]
        proc = ctx.registry.start(argv, "pty-echo", pass_fds=(master,))
        guest = ctx.control.accept(proc, what="pty-echo")
        guest.send(op="echo", rate=0)
        guest.recv("echo")
        rtts = []
        for i in range(warmup + samples):
            t0 = time.monotonic()
            os.write(slave, b"\x06")
            os.read(slave, 64)
            if i >= warmup:
                rtts.append((time.monotonic() - t0) * 1e6)
            time.sleep(0.0005)
        guest.send(op="stop")
        guest.recv("stop")
        guest.send(op="quit")
        ctx.registry.stop(proc)
    finally:
        os.close(master)
        os.close(slave)
    return {"n": len(rtts), "p50": percentile(rtts, 50), "p99": percentile(rtts, 99),
            "max": max(rtts), "timeouts": 0, "server_cores": 0.0, "background": 0, "rate": 0}


# -- throughput and stalled client -------------------------------------------------------


def _stream(ctx: Context, session: Session, n: int, procs: int, stall: bool = False,
            size: int | None = None) -> dict:
    """
    n clients (over C{procs} client processes) must each receive C{size} bytes; with
    C{stall}, the last client stops reading once it has seen the sync marker.
    """
    size = size or ctx.size
    workers = [session.clients(f"clients{i}") for i in range(min(procs, n))]
    shares = [n // len(workers) + (i < n % len(workers)) for i in range(len(workers))]
    for w, k in zip(workers, shares):
        w.send(op="connect", n=k)
    for w in workers:
        r = w.recv("connect", ctx.timeout)
        if r["failed"]:
            raise BenchError(f"{r['failed']} clients could not connect: {r['errors']}")
    guest = session.need_guest()
    sync, end = _tag("SYNC"), _tag("END")
    for i, w in enumerate(workers):
        w.call("arm", sync=sync, end=end, size=size, timeout=ctx.timeout,
               stall=shares[i] - 1 if (stall and i == len(workers) - 1) else None)
    guest.call("write", marker=sync)
    for w in workers:
        w.recv("synced", ctx.timeout)
    rss0 = session.rss()
    sampler = RssSampler(session)
    sampler.start()
    cpu0 = session.cpu()
    t0 = time.monotonic()
    guest.send(op="write", size=size, end=end)
    results = []
    for w in workers:
        results += w.recv("done", ctx.timeout + 10)["results"]
    cpu1 = session.cpu()
    rss_peak = sampler.stop()
    guest.recv("write", ctx.timeout)
    errors = [r["error"] for r in results if r["error"]]
    out: dict = {"clients": n, "size": size, "errors": errors[:3], "n_errors": len(errors)}
    good = [r for r in results if not r["error"]]
    if good:
        rates = [size / MiB / (r["t_end"] - t0) for r in good]
        last = max(r["t_end"] for r in good)
        delivered = size * len(good) / MiB
        frame = statistics.median(size / max(1, r["frames"]) for r in good)
        out.update(per_client=statistics.median(rates), slowest=min(rates), frame_bytes=frame,
                   aggregate=delivered / (last - t0), seconds=last - t0,
                   cpu_s=cpu1 - cpu0, cpu_ms_per_mib=(cpu1 - cpu0) * 1e3 / delivered,
                   cpu_cores=(cpu1 - cpu0) / (last - t0))
    out["rss_before"], out["rss_peak"] = rss0, rss_peak
    out["rss_growth"] = rss_peak - rss0
    if stall:
        out["stalled"] = workers[-1].call("resume", timeout=60, quiet=5.0)
    for w in workers:
        w.send(op="quit")
    return out


def throughput(ctx: Context, spec: ServerSpec, n: int, procs: int, repeat: int = 1,
               profile: str | None = None, stall: bool = False) -> dict:
    """
    The median of C{repeat} runs, each on a fresh server; every run is listed. With
    C{profile} (a file name), py-spy samples the server during the first run.
    """
    runs = []
    for i in range(repeat):
        session = ctx.session(spec)
        try:
            spy = _profiler(ctx, session, profile) if profile and i == 0 else None
            try:
                runs.append(_stream(ctx, session, n, procs, stall=stall))
            finally:
                if spy is not None:
                    _stop_profiler(ctx, spy)
        finally:
            session.close()
        if runs[-1]["n_errors"] or "per_client" not in runs[-1]:
            return runs[-1]  # a server that loses bytes is not scored, once is enough
    out = dict(sorted(runs, key=lambda r: r["cpu_ms_per_mib"])[len(runs) // 2])
    for key in ("per_client", "aggregate", "cpu_ms_per_mib", "slowest", "frame_bytes",
                "rss_growth"):
        out[key] = statistics.median(r[key] for r in runs)
    out["runs"] = [{k: r[k] for k in ("per_client", "aggregate", "cpu_ms_per_mib")} for r in runs]
    if stall:
        out["stalled_runs"] = [r["stalled"] for r in runs]
    if profile:
        out["profile"] = profile
    return out


def _profiler(ctx: Context, session: Session, path: str):
    """py-spy record on the server (raw collapsed stacks), or None if py-spy is missing."""
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(spy):
        print("  (py-spy not found: pip install py-spy; no profile)", flush=True)
        return None
    proc = ctx.registry.start([spy, "record", "--pid", str(session.proc.pid), "--rate", "250", "--function", "--nonblocking",
                               "--format", "raw", "--output", path], "py-spy")
    time.sleep(1.0)  # let it attach
    return proc


def _stop_profiler(ctx: Context, proc) -> None:
    os.kill(proc.pid, signal.SIGINT)
    try:
        proc.wait(20)
    finally:
        ctx.registry.stop(proc)


def stalled(ctx: Context, spec: ServerSpec, n: int, procs: int, repeat: int = 1) -> dict:
    """n clients, the last stops reading once synced; the median of C{repeat} runs."""
    return throughput(ctx, spec, n, procs, repeat, stall=True)


# -- latency -----------------------------------------------------------------------------


def latency(ctx: Context, spec: ServerSpec, samples: int, warmup: int, background: int,
            rate: float) -> dict:
    session = ctx.session(spec)
    try:
        prober = session.clients("prober")
        prober.call("connect", n=1)
        guest = session.need_guest()
        bg = None
        if background:
            bg = session.clients("background")
            bg.call("connect", n=background, timeout=ctx.timeout)
            bg.call("discard")
        guest.send(op="echo", rate=rate if background else 0)
        guest.recv("echo")
        cpu0 = session.cpu()
        t0 = time.monotonic()
        r = prober.call("latency", timeout=ctx.timeout, samples=samples, warmup=warmup)
        elapsed = time.monotonic() - t0
        cpu = session.cpu() - cpu0
        guest.send(op="stop")
        guest.recv("stop")
        rtts = r["rtts_us"]
        out = {"background": background, "rate": rate if background else 0, "n": len(rtts),
               "timeouts": r["timeouts"], "server_cores": cpu / elapsed}
        if rtts:
            out.update(p50=percentile(rtts, 50), p99=percentile(rtts, 99), max=max(rtts))
        if bg is not None:
            stats = bg.call("stats")
            out["background_received_min"] = min(stats["received"])
            bg.send(op="quit")
        prober.send(op="quit")
        return out
    finally:
        session.close()


# -- memory ------------------------------------------------------------------------------


def _settled_rss(session: Session, wait: float = 1.0) -> int:
    time.sleep(wait)
    return session.rss()


def memory(ctx: Context, spec: ServerSpec, idle: list[int], cycles: int) -> dict:
    out: dict = {}
    # per-client cost: a fresh server, then idle clients in steps
    session = ctx.session(spec)
    try:
        w = session.clients("idle")
        w.call("connect", n=1)
        session.need_guest()
        w.call("close_all")
        out["idle"] = _settled_rss(session)
        have = 0
        for n in idle:
            r = w.call("connect", n=n - have, timeout=ctx.timeout)
            if r["failed"]:
                raise BenchError(f"{r['failed']} of {n} idle clients failed: {r['errors']}")
            have = n
            out[f"clients_{n}"] = _settled_rss(session)
        w.call("close_all", timeout=ctx.timeout)
        w.send(op="quit")
    finally:
        session.close()
    out["per_client"] = {n: (out[f"clients_{n}"] - out["idle"]) / n for n in idle}
    if len(idle) > 1:
        a, b = idle[-2], idle[-1]
        out["per_client_marginal"] = (out[f"clients_{b}"] - out[f"clients_{a}"]) / (b - a)
    # growth: a fresh server, connect/close cycles
    session = ctx.session(spec)
    try:
        w = session.clients("cycles")
        w.call("connect", n=1)
        session.need_guest()
        w.call("close_all")
        before = _settled_rss(session)
        r = w.call("cycles", timeout=ctx.timeout, count=cycles, parallel=10)
        after = _settled_rss(session, 2.0)
        w.send(op="quit")
        out.update(cycles=cycles, cycles_failed=r["failed"], cycles_per_s=cycles / r["elapsed"],
                   before_cycles=before, after_cycles=after, growth=after - before)
    finally:
        session.close()
    return out


# -- history -----------------------------------------------------------------------------


def history(ctx: Context, spec: ServerSpec, write: int, repeats: int) -> dict:
    workload = load(ctx.workload_path)
    written = cut_at_line_end(workload, write)
    session = ctx.session(spec)
    try:
        witness = session.clients("witness")
        witness.call("connect", n=1)
        guest = session.need_guest()
        guest.call("write", size=written)
        deadline = time.monotonic() + 20
        while witness.call("stats")["received"][0] < written:
            if time.monotonic() > deadline:
                raise BenchError("the witness did not receive everything written")
            time.sleep(0.05)
        probe = session.clients("history")
        r = probe.call("history", timeout=ctx.timeout, written=written, history=ctx.history,
                       repeats=repeats)
        witness.send(op="quit")
        probe.send(op="quit")
        r["written"] = written
        r["history"] = ctx.history
        return r
    finally:
        session.close()
