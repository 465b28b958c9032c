"""
cloud-console's own benchmark: real server processes, a real pty, real WebSocket clients.

Install the bench's dependencies into a venv of their own; the server runs from the
checkout with the project's python (one that has twisted and autobahn):

    python3 -m venv /tmp/ccbench-venv
    /tmp/ccbench-venv/bin/pip install -r bench/requirements.txt   # + py-spy for --profile
    apt-get install conserver-server   # the storm scenario's peer (pip cannot install it)
    /tmp/ccbench-venv/bin/python bench/run.py --server-python /path/to/project-venv/bin/python
    ... --quick          # smoke run: 8 MiB, 300 latency samples, 200 cycles, 1 run each
    ... --profile 10     # py-spy the server during the 10-client run, print the top costs

Scenarios, each on a fresh server and pty: the raw pty baseline (throughput, reader CPU,
echo round trip), throughput at 1/10/100 clients (every byte verified), echo latency
(idle, and with 10 clients receiving a 1 MiB/s stream), a stalled client among 10,
memory (idle clients, connect/close cycles), history (exactness, first byte). terminado
runs the same scenarios in the same run; ratios and the design goals come last.

"fleet" (bench/fleet.py; alone: --scenarios fleet) is one process serving a host's
consoles: RSS at 1/10/100/1000 idle consoles against 10 single-console processes, start-up
to serving 1,000, idle CPU, a SIGHUP reload of 1,000 with 10 sources changed while clients
of 20 unchanged consoles verify their streams, and a noisy neighbour (a flood and an
operator's echo on two consoles of one process, against two processes).

"ssh" (bench/ssh.py; alone: --scenarios ssh) is the SSH door's cost: server CPU per MiB
delivered to 1 and 10 ssh viewers, against 1 and 10 WebSocket viewers of the same server
and against OpenSSH's sshd relaying the same pty with cat (needs openssh-client and
openssh-server's sshd; the bench starts its own instance: own config, host key and
authorized_keys in the run's directory, a loopback port).

"restart" (bench/restart.py) restarts one process serving the largest --fleet-sizes
consoles (1,000) as systemd does with the descriptor store (a stand-in PID 1 keeps the
descriptors and the state's memfd): the times to READY=1 at the first start, to stop, and
to READY=1 and serving again, and the state's size, with 64 KiB of output per console.

"audit" (bench/audit.py) is the audit log's cost: the output path with and without it (10
audited viewers), the input path (typing and pastes) without it, with it and with
--audit-input, in the server's Python; and the throughput runs again on a server with
--audit-log FILE --audit-input (cc-audit), server CPU per MiB beside cloud-console's.

"timeindex" (bench/timeindex.py) measures the history's time index in the server's
Python: its memory at 1,000 idle consoles and after a 100 MB flood (and at its cap), and
its CPU per MiB on the output path, with and without it.

"storm" (bench/storm.py; alone: --scenarios storm) is a host's consoles all busy at once,
cloud-console (--config, --log-dir) beside conserver (Debian's conserver-server, run in the
foreground with a config of its own; skipped, with a message, where /usr/sbin/conserver is
missing), one after the other on the same ptys: at each of --storm-sizes consoles, the
time until every console is logging, the idle memory (PSS, RSS) and CPU of the server's
process tree, its CPU per MiB logged when every console writes its boot log at once and
when the same volume comes paced (--storm-rate), every log checked byte-exact, and an
operator's echo on one more console, idle and while every console writes. A table puts
the servers side by side (cloud-console/conserver ratios) and checks the issue's goals.
--storm-servers names the columns: e.g. cloud-console,cloud-console:--read-workers=2,conserver
compares two configurations of cloud-console with conserver in one run.

"cc-bighist" is the same server with --history-size larger than the workload: when the
default server closes clients as lagging (so its throughput is not scored), this is
where its per-byte cost is measured. --server-pythonpath runs another copy of the
package (e.g. a snapshot: git archive HEAD cloud_console | tar -x -C DIR). Process logs,
the workload and profiles go to a fresh /tmp/ccbench-* directory named on the first line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

try:
    import psutil  # noqa: F401
except ImportError:
    sys.exit("bench/run.py needs psutil and terminado: pip install -r bench/requirements.txt")

import fleet  # noqa: E402
import report  # noqa: E402
import restart  # noqa: E402
import scenarios  # noqa: E402
import timeindex  # noqa: E402
import audit  # noqa: E402
import procs  # noqa: E402
import ssh  # noqa: E402
import storm  # noqa: E402
from procs import BenchError, Control, Registry, ServerSpec  # noqa: E402
from workload import cached  # noqa: E402

#: --head-size 0: the history scenario checks the tail's contract (a new client gets exactly
#: the last --history-size bytes); the boot's head, replayed before it by default, costs
#: nothing on the paths measured here and is checked by the tests.
CC_COMMAND = (
    "{python} -m cloud_console.cli {pty} {host} {port} --history-size {history} --head-size 0"
)
TERMINADO_COMMAND = f"{sys.executable} {{bench}}/terminado_server.py {{port}} {{guest}}"
ALL = ("baseline", "throughput", "latency", "stalled", "memory", "history", "fleet", "ssh", "timeindex",
       "restart", "audit", "storm")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 8 MiB, 300 latency samples, 200 cycles, 1 baseline run")
    p.add_argument("--mb", type=int, help="workload MiB (default 64, quick 8)")
    p.add_argument("--clients", default="1,10,100", help="throughput client counts")
    p.add_argument("--repeat", type=int,
                   help="throughput runs per figure, median kept (default 3, quick 1)")
    p.add_argument("--profile", type=int, metavar="N",
                   help="py-spy the server during the N-client throughput run "
                        "(of the big-history variant if there is one); top costs printed")
    p.add_argument("--client-procs", type=int, default=2,
                   help="client processes sharing the clients of a run (default 2)")
    p.add_argument("--samples", type=int, help="latency samples (default 2000, quick 300)")
    p.add_argument("--warmup", type=int, help="latency warm-up round trips (default 200)")
    p.add_argument("--background", type=int, default=10, help="clients in the loaded latency run")
    p.add_argument("--background-rate", type=float, default=1.0,
                   help="MiB/s the guest streams in the loaded latency run")
    p.add_argument("--idle", default="100,1000", help="idle client counts for memory")
    p.add_argument("--cycles", type=int, help="connect/close cycles (default 1000, quick 200)")
    p.add_argument("--history-size", type=int, default=80000,
                   help="the server's --history-size, and what a new client must get")
    p.add_argument("--history-write", type=int, default=200000,
                   help="bytes written before the history check (cut at a line end)")
    p.add_argument("--history-repeats", type=int, default=20)
    p.add_argument("--baseline-runs", type=int, help="raw pty runs per direction (default 5)")
    p.add_argument("--scenarios", default=",".join(ALL), help="subset of " + ",".join(ALL))
    p.add_argument("--server-python", default=sys.executable,
                   help="python that runs cloud-console (needs twisted, autobahn)")
    p.add_argument("--server-cmd", default=CC_COMMAND,
                   help="cloud-console command; placeholders {python} {pty} {host} {port} "
                        "{history} {repo} {bench} (default: %(default)s)")
    p.add_argument("--server-pythonpath", default=None,
                   help="directory holding the cloud_console package to run (default: this "
                        "checkout); e.g. a snapshot: git archive HEAD | tar -x -C DIR")
    p.add_argument("--big-history", type=int, default=-1,
                   help="also run throughput and stalled with this --history-size in MiB, "
                        "so that no client can fall out of the history (default: workload "
                        "+ 4 MiB; 0 = off)")
    p.add_argument("--no-peer", action="store_true", help="skip terminado")
    p.add_argument("--peer-clients", default="1,10",
                   help="throughput client counts for terminado (default 1,10)")
    p.add_argument("--ttyd-ms-per-mib", type=float, default=3.4,
                   help="ttyd's server CPU per MiB at 1 client, for the goal check "
                        "(from the shared harness; default 3.4)")
    p.add_argument("--fleet-sizes", help="fleet: console counts in one process "
                   "(default 1,10,100,1000; quick 1,10,100)")
    p.add_argument("--fleet-singles", type=int, default=10,
                   help="fleet: single-console processes measured (default 10)")
    p.add_argument("--fleet-idle", type=float, help="fleet: idle CPU seconds (default 10, quick 3)")
    p.add_argument("--fleet-watched", type=int, default=20,
                   help="fleet: unchanged consoles watched across the reload (default 20)")
    p.add_argument("--fleet-changed", type=int, default=10,
                   help="fleet: consoles the reload gives a new source (default 10)")
    p.add_argument("--fleet-flood", type=float,
                   help="fleet: seconds the flood is measured alone (default 5, quick 2)")
    p.add_argument("--ssh-clients", default="1,10", help="ssh: viewer counts (default 1,10)")
    p.add_argument("--sshd", help="ssh: OpenSSH's sshd (default: found on PATH or in /usr/sbin)")
    p.add_argument("--ssh-cipher", help="ssh: force this cipher on every ssh viewer (ssh -c; "
                   "default: what each server negotiates with OpenSSH's client)")
    p.add_argument("--storm-sizes", help="storm: console counts (default 100,500,1000; "
                   "quick 100)")
    p.add_argument("--storm-repeats", type=int, default=1,
                   help="storm: runs of every server at each size, the order rotating "
                        "(default 1)")
    p.add_argument("--storm-servers", default="cloud-console,conserver",
                   help="storm: the servers, one after the other on the same ptys, one "
                        "column each: cloud-console, conserver, or cloud-console:ARGS, a "
                        "variant with ARGS (split as by a shell) on its command line, e.g. "
                        "cloud-console,cloud-console:--read-workers=2,conserver "
                        "(default %(default)s)")
    p.add_argument("--storm-cc-args", default="",
                   help="storm: arguments added to every cloud-console's command, before a "
                        "variant's own; give it with '=': --storm-cc-args='--read-workers 2'")
    p.add_argument("--storm-rate", type=float, default=8.0,
                   help="storm: MiB/s of the paced phase, all consoles together (default 8)")
    p.add_argument("--timeout", type=float, default=180, help="bound on any one phase, s")
    p.add_argument("--json", help="write every result as JSON to this file")
    a = p.parse_args(argv)
    # Servers run from another directory: a relative interpreter path must not break.
    if os.sep in a.server_python:
        a.server_python = os.path.abspath(a.server_python)
    a.mb = a.mb or (8 if a.quick else 64)
    a.samples = a.samples or (300 if a.quick else 2000)
    a.warmup = a.warmup or (50 if a.quick else 200)
    a.cycles = a.cycles or (200 if a.quick else 1000)
    a.baseline_runs = a.baseline_runs or (2 if a.quick else 5)
    a.repeat = a.repeat or (1 if a.quick else 3)
    a.scenarios = [s for s in a.scenarios.split(",") if s]
    a.clients = [int(n) for n in a.clients.split(",") if n]
    a.ssh_clients = [int(n) for n in a.ssh_clients.split(",") if n]
    a.peer_clients = [int(n) for n in a.peer_clients.split(",") if n]
    a.idle = [int(n) for n in a.idle.split(",") if n]
    a.fleet_sizes = sorted({int(n) for n in (a.fleet_sizes or (
        "1,10,100" if a.quick else "1,10,100,1000")).split(",") if n})
    a.fleet_idle = a.fleet_idle or (3.0 if a.quick else 10.0)
    a.fleet_flood = a.fleet_flood or (2.0 if a.quick else 5.0)
    a.storm_sizes = sorted({int(n) for n in (a.storm_sizes or (
        "100" if a.quick else "100,500,1000")).split(",") if n})
    try:
        a.storm_servers = storm.parse_servers(a.storm_servers, a.storm_cc_args)
    except ValueError as e:
        p.error(str(e))
    return a


def check_server(args: argparse.Namespace) -> None:
    """Fail early with a useful message; raise the server's client limit if it has one."""
    try:
        import terminado  # noqa: F401
    except ImportError:
        sys.exit("terminado is missing: pip install -r bench/requirements.txt")
    if "ssh" in args.scenarios:
        missing = ssh.missing_clients()
        if missing:
            sys.exit("the ssh scenario needs OpenSSH's client: " + "; ".join(missing)
                     + " (or leave it out: --scenarios without ssh)")
        if not ssh.sshd_path(args.sshd):
            print(f"note: {ssh.SSHD_MISSING}; the ssh scenario runs without it", flush=True)
    if "storm" in args.scenarios:
        args.storm_servers = storm.installed(args.storm_servers)
    if args.server_cmd != CC_COMMAND:
        return
    package_root = args.server_pythonpath or procs.REPO
    env = dict(os.environ, PYTHONPATH=package_root)
    # The server runs byte-compiled, as an installed package does (pip compiles it): a
    # checkout run under PYTHONDONTWRITEBYTECODE would compile its modules again at every
    # start, 50-65 ms of CPU in each start-up figure.
    compiled = subprocess.run([args.server_python, "-m", "compileall", "-q",
                               os.path.join(package_root, "cloud_console")],
                              capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    if compiled.returncode:
        print(f"note: cloud_console could not be byte-compiled, so each start compiles it "
              f"({(compiled.stderr or compiled.stdout).strip()[-300:]})", flush=True)
    probe = subprocess.run([args.server_python, "-m", "cloud_console.cli", "--help"],
                           capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    if probe.returncode:
        sys.exit(f"{args.server_python} cannot run cloud_console.cli ({probe.stderr.strip()[-300:]})"
                 ": name the project's venv with --server-python")
    if "--max-clients" in probe.stdout:
        limit = max(args.idle + args.clients + [args.background + 1]) + 16
        args.server_cmd += f" --max-clients {limit}"


def run_storm(ctx: scenarios.Context, args: argparse.Namespace, out: report.Report,
              attempt) -> None:
    """Every storm run, each an attempt of its own; the ptys and the echo shared by all."""
    opts = storm.StormOptions(sizes=args.storm_sizes, repeats=args.storm_repeats,
                              servers=args.storm_servers, rate=args.storm_rate * scenarios.MiB,
                              idle_seconds=3.0 if args.quick else 5.0,
                              settle=1.0 if args.quick else 3.0)
    try:
        host = storm.Storm(ctx, opts)
    except (BenchError, OSError) as e:
        out.add(("storm", "set-up"), {"failed": str(e)})
        return
    try:
        for n, rep, server, order in host.plan():
            attempt(("storm", server.label, n, rep),
                    lambda _ctx, s=server, n=n, rep=rep, o=order: host.measure(s, n, rep, o))
    finally:
        host.close()


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    check_server(args)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 8192)), hard))
    workdir = tempfile.mkdtemp(prefix="ccbench-")
    registry = Registry(workdir)
    control = Control(os.path.join(workdir, "control.sock"))
    size = args.mb * scenarios.MiB
    ctx = scenarios.Context(registry, control, cached(size), args.server_python,
                            args.history_size, size, args.timeout,
                            args.server_pythonpath or procs.REPO)
    servers = [ServerSpec("cloud-console", "attach", "raw", "/ws", args.server_cmd)]
    if args.big_history:
        big = (args.big_history if args.big_history > 0 else args.mb + 4) * scenarios.MiB
        servers.append(ServerSpec(report.BIG, "attach", "raw", "/ws", args.server_cmd, big))
    if "audit" in args.scenarios:
        # The same server writing an audit log (throughput only): CPU per MiB beside it.
        servers.append(ServerSpec(report.AUDITED, "attach", "raw", "/ws", args.server_cmd
                                  + f" --audit-log {os.path.join(workdir, 'audit.log')} --audit-input"))
    if not args.no_peer:
        servers.append(ServerSpec("terminado", "spawn", "terminado", "/websocket",
                                  TERMINADO_COMMAND))
    out = report.Report(args)
    out.header(workdir)
    started = time.monotonic()

    def attempt(key: tuple, fn, *fn_args) -> None:
        try:
            result = fn(ctx, *fn_args)
        except (BenchError, OSError) as e:
            result = {"failed": str(e)}
            with open(os.path.join(workdir, "errors.log"), "a") as log:
                log.write(f"{key}\n{traceback.format_exc()}\n")
        out.add(key, result)

    try:
        if "baseline" in args.scenarios:
            for direction in ("master->slave", "slave->master"):
                attempt(("baseline", "raw pty", direction), scenarios.baseline, direction,
                        args.baseline_runs)
            attempt(("latency", "raw pty", 0), scenarios.pty_echo, args.samples, args.warmup)
        for spec in servers:
            peer = spec.name == report.PEER
            big = spec.name == report.BIG
            if spec.name == report.AUDITED:
                for n in args.clients:
                    attempt(("throughput", spec.name, n), scenarios.throughput, spec, n,
                            args.client_procs, args.repeat, None)
                continue
            if "throughput" in args.scenarios:
                for n in (args.peer_clients if peer else args.clients):
                    profile = None
                    if n == args.profile and spec.name == (report.BIG if args.big_history
                                                           else report.CC):
                        profile = os.path.join(workdir, f"profile-{n}.txt")
                    attempt(("throughput", spec.name, n), scenarios.throughput, spec, n,
                            args.client_procs, args.repeat, profile)
                    if profile and os.path.exists(profile):
                        report.print_profile(profile)
            if "latency" in args.scenarios and not big:
                for bg in (0, args.background):
                    attempt(("latency", spec.name, bg), scenarios.latency, spec, args.samples,
                            args.warmup, bg, args.background_rate * scenarios.MiB)
            if "stalled" in args.scenarios:
                attempt(("stalled", spec.name, 10), scenarios.stalled, spec, 10,
                        args.client_procs, args.repeat)
            if "memory" in args.scenarios and not big:
                attempt(("memory", spec.name), scenarios.memory, spec, args.idle, args.cycles)
            if "history" in args.scenarios and not big:
                attempt(("history", spec.name), scenarios.history, spec, args.history_write,
                        args.history_repeats)
        if "fleet" in args.scenarios:
            opts = fleet.FleetOptions(
                sizes=args.fleet_sizes, singles=args.fleet_singles, idle_seconds=args.fleet_idle,
                settle=0.5 if args.quick else 1.0, watched=args.fleet_watched,
                changed=args.fleet_changed, samples=args.samples, warmup=args.warmup,
                flood_seconds=args.fleet_flood)
            attempt(("fleet", report.CC, "host"), fleet.host, opts)
            attempt(("fleet", report.CC, "neighbour"), fleet.neighbour, opts)
        if "ssh" in args.scenarios:
            attempt(("ssh", report.CC), ssh.ssh,
                    ssh.SshOptions(args.ssh_clients, args.repeat, args.sshd, args.ssh_cipher),
                    args.client_procs)

        if "storm" in args.scenarios:
            run_storm(ctx, args, out, attempt)
        if "timeindex" in args.scenarios:
            attempt(("timeindex", report.CC), timeindex.measure)
        if "restart" in args.scenarios:
            attempt(("restart", report.CC), restart.restart,
                    restart.RestartOptions(args.fleet_sizes[-1], 64 * 1024))
        if "audit" in args.scenarios:
            attempt(("audit", report.CC), audit.measure)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    finally:
        registry.stop_all()
    out.summary(time.monotonic() - started)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out.as_json(), f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
