"""
The SSH door's cost: server CPU per MiB delivered to 1 and to 10 viewers over SSH, against
1 and 10 WebSocket viewers of the same server, and against OpenSSH's sshd relaying the same
pty with C{cat} (the way one would serve a console over plain ssh).

Every run is a fresh server on a fresh pty written by the bench's guest (L{guest}), with
the same workload, the same sync and end markers, and the same window: from just before
the guest writes the workload to the moment the last viewer has all of it.

 - C{websocket}: cloud-console (both doors on), L{scenarios._stream}'s clients;
 - C{ssh}: the same server; each viewer is a real C{ssh -T vm1@127.0.0.1} (no command:
   it attaches) with the console's bytes on its stdout;
 - C{sshd}: a private instance of OpenSSH's sshd (its own config, host key and
   authorized_keys in the run's directory, a high loopback port, C{-D -e}); each viewer is
   C{ssh USER@127.0.0.1 'exec cat PTY'}. Several C{cat}s on one pty would share its bytes
   out between them, so with more than one viewer a C{tee} reads the pty into one FIFO per
   session (C{exec cat FIFO}); it is part of the server side, as cloud-console's own
   fan-out is, and shown apart.

The C{ssh} processes run under a reader process (this file run as a script), which keeps
their stdin open (a user's terminal), reads their stdout and checks every viewer got the
whole workload: its length and its SHA-256, from the sync marker to the end marker.

Server CPU (user+system): cloud-console is its one process (L{procs.TreeCpu} over it and
any children, the guest excluded); sshd is its listener and every descendant (per
connection the privileged monitor, the session process that relays the channel, and
C{cat}) plus the C{tee}, all sampled by L{procs.TreeCpu} (connections are made and
authenticated before the window, so their set-up is not counted, as a page's handshake is
not). Clients' CPU (ssh, its decryption, the reader) is never counted.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import psutil  # noqa: E402

from procs import (  # noqa: E402
    HOST, BenchError, ServerSpec, Session, TreeCpu, free_port, wait_listening)
from scenarios import Context, MiB, _stream, _tag  # noqa: E402
from workload import load, marker  # noqa: E402

#: The doors, in the order each round runs them ("beside-stopped-ssh": the WebSocket
#: viewers again, with a stopped ssh viewer on the console).
DOORS = ("websocket", "ssh", "sshd", "beside-stopped-ssh")
CONSOLE = "vm1"


def sshd_path(given: str | None = None) -> str | None:
    """OpenSSH's sshd (not usually on a user's PATH), or None."""
    if given:
        return given if os.access(given, os.X_OK) else None
    return shutil.which("sshd") or next(
        (p for p in ("/usr/sbin/sshd", "/usr/local/sbin/sshd") if os.access(p, os.X_OK)), None)


SSHD_MISSING = ("OpenSSH's sshd not found: apt-get install openssh-server (its service need "
                "not run: the bench starts its own instance; where the package started one on "
                "port 22, stop it), or name it with --sshd PATH")


def missing_clients() -> list[str]:
    """OpenSSH's client tools the scenario cannot run without, each with how to get it."""
    return [f"{tool} not found: apt-get install openssh-client"
            for tool in ("ssh", "ssh-keygen") if not shutil.which(tool)]


# -- the bench side ----------------------------------------------------------------------


@dataclass
class SshOptions:
    clients: list[int]
    repeat: int
    sshd: str | None = None
    cipher: str | None = None  # ssh -c for every viewer (default: what each server picks)


class Kit:
    """Keys and sshd's config, made once per scenario in the run's directory."""

    def __init__(self, ctx: Context, opts: SshOptions) -> None:
        self.dir = os.path.join(ctx.registry.logdir, "ssh")
        os.makedirs(self.dir, exist_ok=True)
        self.sshd = sshd_path(opts.sshd)
        self.cipher = opts.cipher
        self.user = getpass.getuser()
        self.client_key = self._keygen("client_key")
        self.cc_host_key = self._keygen("cc_host_key")
        self.sshd_host_key = self._keygen("sshd_host_key")
        self.authorized_keys = os.path.join(self.dir, "authorized_keys")
        with open(self.client_key + ".pub") as f, open(self.authorized_keys, "w") as out:
            out.write(f.read())
        self.sshd_config = os.path.join(self.dir, "sshd_config")
        with open(self.sshd_config, "w") as f:
            f.write(SSHD_CONFIG.format(host=HOST, host_key=self.sshd_host_key,
                                       authorized_keys=self.authorized_keys, user=self.user))
        # As root, sshd separates privileges (a monitor and an unprivileged pre-auth child
        # per connection, as a system's sshd does) and needs its empty chroot directory,
        # which Debian's service makes at start; as anyone else it runs unseparated.
        self.privsep = os.geteuid() == 0
        if self.sshd and self.privsep and not os.path.isdir("/run/sshd"):
            os.makedirs("/run/sshd", 0o755, exist_ok=True)

    def _keygen(self, name: str) -> str:
        path = os.path.join(self.dir, name)
        if not os.path.exists(path):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name,
                            "-f", path], check=True, stdout=subprocess.DEVNULL)
        return path

    def ssh_argv(self, port: int, user: str, command: str | None, verbose: bool) -> list[str]:
        argv = ["ssh", "-p", str(port), "-i", self.client_key, "-F", "/dev/null",
                "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-e", "none", "-T",
                "-v" if verbose else "-q"]
        if self.cipher:
            argv += ["-c", self.cipher]
        argv.append(f"{user}@{HOST}")
        return argv + ([command] if command else [])


SSHD_CONFIG = """\
# the bench's own sshd: loopback, a high port (-p), its own keys; nothing of the system's
ListenAddress {host}
HostKey {host_key}
AuthorizedKeysFile {authorized_keys}
AllowUsers {user}
PidFile none
UsePAM no
StrictModes no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UseDNS no
PrintMotd no
PrintLastLog no
X11Forwarding no
AllowTcpForwarding no
MaxStartups 100
MaxSessions 100
LogLevel INFO
"""


def _cc_spec(kit: Kit, ssh_port: int, history: int) -> ServerSpec:
    command = ("{python} -m cloud_console.cli --console " + CONSOLE + "={pty} "
               "--port tcp:port={port}:interface={host} "
               f"--ssh-port tcp:port={ssh_port}:interface={HOST} "
               f"--ssh-host-key {kit.cc_host_key} --ssh-authorized-keys {kit.authorized_keys} "
               "--history-size {history} --head-size 0")
    return ServerSpec("cloud-console", "attach", "raw", f"/c/{CONSOLE}/ws", command, history)


def _sshd_spec(kit: Kit) -> ServerSpec:
    return ServerSpec("sshd", "attach", "-", "-",
                      f"{kit.sshd} -f {kit.sshd_config} -D -e -p {{port}}")


class Viewers:
    """A reader process and its C{ssh} viewers."""

    def __init__(self, ctx: Context, kit: Kit, port: int, user: str,
                 commands: list[str | None]) -> None:
        self.ctx = ctx
        proc = ctx.registry.start([sys.executable, os.path.abspath(__file__),
                                   ctx.control.path, ctx.workload_path, kit.dir], "ssh-viewers")
        self.chan = ctx.control.accept(proc, what="the ssh reader")
        argvs = [kit.ssh_argv(port, user, c, verbose=i == 0) for i, c in enumerate(commands)]
        r = self.chan.call("spawn", argvs=argvs)
        self.logs = r["logs"]

    def cipher(self) -> str:
        """What the first viewer negotiated (it runs with -v)."""
        try:
            with open(self.logs[0], errors="replace") as f:
                m = re.search(r"kex: server->client cipher: (\S+) MAC: (\S+)", f.read())
        except OSError:
            return "?"
        if not m:
            return "?"
        return m.group(1) + ("" if m.group(2) == "<implicit>" else "+" + m.group(2))

    def stderr_tail(self) -> str:
        lines = []
        for path in self.logs[:3]:
            try:
                with open(path, errors="replace") as f:
                    lines += [ln.strip() for ln in f if not ln.startswith("debug")][-2:]
            except OSError:
                pass
        return " | ".join(lines)

    def quit(self) -> None:
        try:
            self.chan.call("quit", timeout=15)
        except (BenchError, OSError):
            pass
        if self.chan.proc is not None:
            self.ctx.registry.stop(self.chan.proc)
        self.chan.sock.close()


def _ssh_stream(ctx: Context, session: Session, roots: list[psutil.Process],
                viewers: Viewers) -> dict:
    """The guest writes the workload; every ssh viewer must get all of it."""
    size = ctx.size
    n = len(viewers.logs)
    guest = session.need_guest()
    sync, end = _tag("SYNC"), _tag("END")
    viewers.chan.call("arm", sync=sync, end=end, size=size, limit=ctx.timeout)
    guest.call("write", marker=sync)
    try:
        synced = viewers.chan.recv("synced", ctx.timeout)
    except BenchError as e:
        raise BenchError(f"{e} (viewers' stderr: {viewers.stderr_tail()})") from None
    if synced.get("errors"):
        raise BenchError(f"viewers failed before the workload: {synced['errors'][:2]} "
                         f"(stderr: {viewers.stderr_tail()})")
    meter = TreeCpu(roots, session.guest_pids)
    meter.start()
    t0 = time.monotonic()
    guest.send(op="write", size=size, end=end)
    results = viewers.chan.recv("done", ctx.timeout + 10)["results"]
    cpu = meter.stop()
    guest.recv("write", ctx.timeout)
    errors = [r["error"] for r in results if r["error"]]
    out: dict = {"clients": n, "size": size, "errors": errors[:3], "n_errors": len(errors),
                 "pre_sync": sorted({r["pre_sync"] for r in results}),
                 "cipher": viewers.cipher()}
    good = [r for r in results if not r["error"]]
    if good:
        last = max(r["t_end"] for r in good)
        delivered = size * len(good) / MiB
        out.update(per_client=statistics.median(size / MiB / (r["t_end"] - t0) for r in good),
                   slowest=min(size / MiB / (r["t_end"] - t0) for r in good),
                   aggregate=delivered / (last - t0), seconds=last - t0, cpu_s=cpu["cpu_s"],
                   cpu_ms_per_mib=cpu["cpu_s"] * 1e3 / delivered,
                   cpu_cores=cpu["cpu_s"] / (last - t0),
                   by_name={k: v * 1e3 / delivered for k, v in cpu["by_name"].items()},
                   processes=cpu["processes"], exited=cpu["exited"])
    return out


def _run_websocket(ctx: Context, kit: Kit, n: int, procs: int) -> dict:
    session = ctx.session(_cc_spec(kit, free_port(), ctx.history))
    try:
        return _stream(ctx, session, n, procs)
    finally:
        session.close()


def _run_ssh(ctx: Context, kit: Kit, n: int, procs: int) -> dict:
    port = free_port()
    session = ctx.session(_cc_spec(kit, port, ctx.history))
    viewers = None
    try:
        wait_listening(session.proc, port)
        viewers = Viewers(ctx, kit, port, CONSOLE, [None] * n)
        out = _ssh_stream(ctx, session, [session.ps], viewers)
        if session.proc.poll() is not None:
            out["server_exited"] = session.proc.returncode
        return out
    finally:
        if viewers is not None:
            viewers.quit()
        session.close()


def _run_sshd(ctx: Context, kit: Kit, n: int, procs: int) -> dict:
    if not kit.sshd:
        raise BenchError(SSHD_MISSING)
    session = ctx.session(_sshd_spec(kit))
    pty = os.ttyname(session.slave)
    fan = viewers = None
    family: list[psutil.Process] = []
    try:
        if n == 1:
            commands = [f"exec cat {pty}"]
        else:
            fifos = [os.path.join(kit.dir, f"fifo-{session.port}-{i}") for i in range(n)]
            for path in fifos:
                os.mkfifo(path)
            commands = [f"exec cat {path}" for path in fifos]
        viewers = Viewers(ctx, kit, session.port, kit.user, commands)
        roots = [session.ps]
        if n > 1:
            # opens each FIFO once its session's cat has: started after the viewers
            fan = ctx.registry.start(
                ["sh", "-c", 'out=$1; shift; exec tee "$@" <"$0" >"$out"', pty, *fifos], "tee")
            roots.append(psutil.Process(fan.pid))
        out = _ssh_stream(ctx, session, roots, viewers)
        try:
            family = session.ps.children(recursive=True)
        except psutil.Error:
            pass
        out["privsep"] = kit.privsep
        return out
    finally:
        if viewers is not None:
            viewers.quit()
        if fan is not None:
            ctx.registry.stop(fan)
        session.close()
        # the listener is gone; a connection's processes end with their ssh, or here
        for p in family:
            try:
                p.terminate()
            except psutil.Error:
                pass


def _run_beside_stopped(ctx: Context, kit: Kit, n: int, procs: int) -> dict:
    """
    The WebSocket viewers' pace with an ssh viewer attached and stopped (SIGSTOP, as a
    suspended terminal): the console waits for it at most --max-stall, once, then no
    longer; the pages should keep their pace alone (compare with C{websocket} at C{n}).
    """
    port = free_port()
    session = ctx.session(_cc_spec(kit, port, ctx.history))
    stopped = None
    try:
        wait_listening(session.proc, port)
        stopped = subprocess.Popen(kit.ssh_argv(port, CONSOLE, None, verbose=False),
                                   stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + ctx.timeout
        while _viewers(session.port) < 1:
            if time.monotonic() > deadline or stopped.poll() is not None:
                raise BenchError("the ssh viewer did not attach")
            time.sleep(0.05)  # polling the API for the attach; not a measured wait
        stopped.send_signal(signal.SIGSTOP)
        out = _stream(ctx, session, n, procs)
        out["stalls"] = _count_in_log(session, "the console no longer waits for it")
        return out
    finally:
        if stopped is not None:
            stopped.send_signal(signal.SIGCONT)
            stopped.kill()
            stopped.wait()
        session.close()


def _viewers(port: int) -> int:
    """Viewers of the console now, from the server's API (0 while it is not answering)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/api/consoles", timeout=2) as r:
            return int(json.loads(r.read())["consoles"][0]["viewers"])
    except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError):
        return 0


def _count_in_log(session: Session, text: str) -> int | None:
    """How often C{text} is in the server's log (C{None} if it cannot be read)."""
    try:
        with open(session.proc.log_path, errors="replace") as f:  # type: ignore[attr-defined]
            return f.read().count(text)
    except (OSError, AttributeError):
        return None


RUNNERS = {"websocket": _run_websocket, "ssh": _run_ssh, "sshd": _run_sshd,
           "beside-stopped-ssh": _run_beside_stopped}


def ssh(ctx: Context, opts: SshOptions, client_procs: int = 2) -> dict:
    """
    Every door at every client count, C{repeat} rounds (a round runs each once, so that
    a machine that gets busier weighs on all of them alike); the median run of each kept,
    every run listed. A door that fails a run is not run again at that count.
    """
    kit = Kit(ctx, opts)
    runs: dict[tuple[str, int], list[dict]] = {(d, n): [] for n in opts.clients for d in DOORS}
    failed: dict[tuple[str, int], dict] = {}
    for _ in range(opts.repeat):
        for n in opts.clients:
            for door in DOORS:
                if (door, n) in failed:
                    continue
                try:
                    r = RUNNERS[door](ctx, kit, n, client_procs)
                except (BenchError, OSError) as e:
                    failed[(door, n)] = {"failed": str(e)}
                    continue
                if r["n_errors"] or "cpu_ms_per_mib" not in r:
                    failed[(door, n)] = r
                    continue
                runs[(door, n)].append(r)
    out: dict = {"size": ctx.size, "history": ctx.history, "privsep": kit.privsep,
                 "sshd": kit.sshd, "user": kit.user, "figures": {}}
    for (door, n), rs in runs.items():
        if (door, n) in failed:
            out["figures"][f"{door} {n}"] = failed[(door, n)]
            continue
        best = dict(sorted(rs, key=lambda r: r["cpu_ms_per_mib"])[len(rs) // 2])
        for key in ("per_client", "aggregate", "cpu_ms_per_mib", "slowest"):
            best[key] = statistics.median(r[key] for r in rs)
        best["runs"] = [{k: r[k] for k in ("per_client", "aggregate", "cpu_ms_per_mib")}
                        for r in rs]
        out["figures"][f"{door} {n}"] = best
    return out


# -- the reader process ------------------------------------------------------------------


class _Viewer:
    def __init__(self, proc: subprocess.Popen, log: str) -> None:
        self.proc = proc
        self.fd = proc.stdout.fileno()
        self.log = log
        self.pre = b""
        self.synced = False
        self.received = 0
        self.hash = hashlib.sha256()
        self.tail = b""
        self.error: str | None = None
        self.t_end: float | None = None
        self.reads = 0


def _arm(control: socket.socket, viewers: list[_Viewer], workload: bytes, order: dict) -> None:
    """Sync marker, then the workload and the end marker on every viewer; length and hash."""
    sync, end = marker(order["sync"]), marker(order["end"])
    expected = workload[:order["size"]] + end
    want_len, want_hash = len(expected), hashlib.sha256(expected).hexdigest()
    deadline = time.monotonic() + order["limit"]
    said_synced = False

    def send(message: dict) -> None:
        control.sendall(json.dumps(message).encode() + b"\n")

    def finish(v: _Viewer, error: str | None) -> None:
        v.error, v.t_end = error, time.monotonic()

    for v in viewers:
        v.pre, v.synced, v.received, v.hash, v.tail = b"", False, 0, hashlib.sha256(), b""
        v.error = v.t_end = None
    while True:
        open_ = [v for v in viewers if v.t_end is None]
        if not said_synced and all(v.synced or v.t_end is not None for v in viewers):
            said_synced = True
            send({"op": "synced", "errors": [v.error for v in viewers if v.error]})
        if not open_:
            break
        left = deadline - time.monotonic()
        if left <= 0:
            for v in open_:
                finish(v, f"timeout: {'synced' if v.synced else 'never synced'}, "
                          f"{v.received} of {want_len} bytes")
            continue
        ready, _, _ = select.select([v.fd for v in open_], [], [], min(left, 1.0))
        for v in open_:
            if v.fd not in ready:
                continue
            data = os.read(v.fd, 1 << 18)
            v.reads += 1
            if not data:
                status = v.proc.poll()
                finish(v, f"EOF ({'synced' if v.synced else 'never synced'}, {v.received} of "
                          f"{want_len} bytes, ssh status {status})")
                continue
            if not v.synced:
                v.pre += data
                i = v.pre.find(sync)
                if i < 0:
                    continue
                data, v.pre = v.pre[i + len(sync):], v.pre[:i]
                v.synced = True
            v.hash.update(data)
            v.received += len(data)
            seen_end = end in v.tail + data
            v.tail = (v.tail + data)[-len(end):]
            if v.received == want_len or seen_end or v.received > want_len:
                if v.received != want_len:
                    finish(v, f"the end marker came after {v.received} bytes, not {want_len}"
                              if seen_end else f"more than {want_len} bytes")
                elif v.hash.hexdigest() != want_hash:
                    finish(v, f"{want_len} bytes but not the workload's (SHA-256 differs)")
                else:
                    finish(v, None)
    send({"op": "done", "results": [
        {"error": v.error, "t_end": v.t_end, "received": v.received, "reads": v.reads,
         "pre_sync": repr(v.pre[:120])} for v in viewers]})


def _reader(argv: list[str]) -> int:
    control_path, workload_path, logdir = argv[1:4]
    workload = load(workload_path)
    viewers: list[_Viewer] = []

    def stop_all(*_: object) -> None:
        for v in viewers:
            if v.proc.poll() is None:
                v.proc.terminate()
        for v in viewers:
            try:
                v.proc.wait(3)
            except subprocess.TimeoutExpired:
                v.proc.kill()
                v.proc.wait()

    def on_term(*_: object) -> None:
        stop_all()
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    control.connect(control_path)
    control.sendall(json.dumps({"hello": "ssh-viewers", "pid": os.getpid()}).encode() + b"\n")
    for line in control.makefile("rb"):
        order = json.loads(line)
        op = order["op"]
        if op == "spawn":
            logs = []
            for argv_ in order["argvs"]:
                log = os.path.join(logdir, f"viewer-{os.getpid()}-{len(viewers)}.log")
                with open(log, "wb") as err:
                    # stdin: a pipe kept open, as a user's terminal is (EOF would end it)
                    proc = subprocess.Popen(argv_, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=err, start_new_session=True)
                viewers.append(_Viewer(proc, log))
                logs.append(log)
            control.sendall(json.dumps({"op": op, "logs": logs}).encode() + b"\n")
        elif op == "arm":
            control.sendall(json.dumps({"op": op}).encode() + b"\n")
            _arm(control, viewers, workload, order)
        elif op == "quit":
            stop_all()
            control.sendall(json.dumps({"op": op}).encode() + b"\n")
            return 0
    stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(_reader(sys.argv))
