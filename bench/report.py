"""One line per result as it comes in; at the end the ratio table and the design goals."""

from __future__ import annotations

import functools
import os
import statistics
import time

MiB = 1 << 20
CC = "cloud-console"
PEER = "terminado"
BIG = "cc-bighist"  # cloud-console with a history as large as the workload
AUDITED = "cc-audit"  # cloud-console with --audit-log FILE --audit-input
SSH_DOORS = {"websocket": "cc websocket", "ssh": "cc ssh", "sshd": "sshd + cat",
             "beside-stopped-ssh": "ws + stopped ssh"}


def _mib(n: float) -> str:
    return f"{n / MiB:.1f} MiB"


class Report:
    def __init__(self, args) -> None:
        self.args = args
        self.results: dict[tuple, dict] = {}

    def header(self, workdir: str) -> None:
        load = "/".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"cloud-console bench: {self.args.mb} MiB workload, {os.cpu_count()} cores, "
              f"load {load}, logs in {workdir}", flush=True)
        print(f"  {CC}: --history-size {self.args.history_size}; {BIG}: the same server "
              f"with a history larger than the workload (no client can fall out of it)",
              flush=True)

    def get(self, *key) -> dict:
        r = self.results.get(tuple(key)) or {}
        return {} if "failed" in r else r

    def add(self, key: tuple, r: dict) -> None:
        self.results[key] = r
        kind, name, *rest = key
        label = f"{kind:<11} {name:<14}"
        if "failed" in r:
            print(f"{label} {' '.join(map(str, rest))} FAILED: {r['failed']}", flush=True)
            return
        line = getattr(self, "_" + kind)(r, *rest)
        for one in ([line] if isinstance(line, str) else line):
            print(f"{label} {one}", flush=True)

    # -- one line per scenario -----------------------------------------------------------

    def _baseline(self, r: dict, direction: str) -> str:
        runs = "/".join(f"{x:.0f}" for x in r["runs"])
        return (f"{direction}  median {r['median']:6.1f} MiB/s  best {r['best']:6.1f} MiB/s"
                f"  runs {runs}  reader CPU {r['reader_cpu_ms_per_mib']:.2f} ms/MiB"
                f" ({r['bytes_per_read']:.0f} B/read)")

    def _throughput(self, r: dict, n: int) -> str:
        head = f"clients={n:<4}"
        if r["n_errors"] or "per_client" not in r:
            return f"{head} NOT SCORED: {r['n_errors']} of {n} clients failed: {r['errors'][:1]}"
        runs = ""
        if len(r.get("runs", ())) > 1:
            runs = "  runs " + " ".join(f"{x['per_client']:.0f}/{x['cpu_ms_per_mib']:.2f}"
                                        for x in r["runs"])
        return (f"{head} per-client {r['per_client']:6.1f} MiB/s (slowest {r['slowest']:.1f})"
                f"  aggregate {r['aggregate']:6.1f} MiB/s  server CPU {r['cpu_ms_per_mib']:5.2f}"
                f" ms/MiB ({r['cpu_cores']:.2f} cores)  frames {r['frame_bytes'] / 1024:.1f} KiB"
                f"  [exact]{runs}")

    def _latency(self, r: dict, bg: int) -> str:
        head = "idle        " if not bg else f"background={bg} @{r['rate'] / MiB:g} MiB/s"
        if "p50" not in r:
            return f"{head} no samples ({r['timeouts']} timeouts)"
        extra = f", {r['timeouts']} timeouts" if r["timeouts"] else ""
        extra += f"; server {r['server_cores']:.2f} cores" if r["server_cores"] else ""
        return (f"{head}  p50 {r['p50']:7.0f} us  p99 {r['p99']:7.0f} us  max {r['max']:7.0f}"
                f" us  (n={r['n']}{extra})")

    def _stalled(self, r: dict, n: int) -> str:
        base = self.get("throughput", self._current, 10).get("per_client")
        line = f"clients={n - 1}+1 "
        if "per_client" in r:
            vs = f" ({r['per_client'] / base:.2f}x of unstalled)" if base else ""
            line += (f"others per-client {r['per_client']:6.1f} MiB/s{vs}  server CPU "
                     f"{r['cpu_ms_per_mib']:.2f} ms/MiB  frames {r['frame_bytes'] / 1024:.1f} KiB")
        if r["n_errors"]:
            line += f"  {r['n_errors']} readers FAILED: {r['errors']}"
        line += f"  rss +{_mib(r['rss_growth'])}"
        s = (r.get("stalled_runs") or [r.get("stalled", {})])[0]
        got = f"got {_mib(s.get('pos', 0))} of {_mib(s.get('total', 0))} intact"
        if s.get("complete"):
            what = f"{got}: caught up, complete"
        elif s.get("close_code") is not None:
            what = f"{got}, then closed {s['close_code']} {s['close_reason']!r}"
        elif s.get("problem"):
            what = f"{got}, then {s['problem']}"
        else:
            what = f"{got}, then nothing for 5 s (open: {not s.get('closed')})"
        others = r.get("stalled_runs", [])[1:]
        if others:
            what += " (other runs: " + ", ".join(
                "complete" if o.get("complete") else f"closed {o.get('close_code')}"
                for o in others) + ")"
        return f"{line}  | stalled client: {what}"

    def _memory(self, r: dict) -> str:
        parts = [f"idle {_mib(r['idle'])}"]
        for n, each in r["per_client"].items():
            parts.append(f"+{n} clients {_mib(r[f'clients_{n}'])} ({each / 1024:.1f} KiB each)")
        if "per_client_marginal" in r:
            parts.append(f"marginal {r['per_client_marginal'] / 1024:.1f} KiB/client")
        parts.append(f"after {r['cycles']} cycles growth {r['growth'] / MiB:+.2f} MiB "
                     f"({r['cycles_per_s']:.0f} cycles/s, {r['cycles_failed']} failed)")
        return "  ".join(parts)

    def _history(self, r: dict) -> str:
        ok = "exact" if r.get("exact") else (
            f"FAIL: got {r.get('received')} bytes for a {r['history']}-byte history")
        fb = r["first_byte_ms"]
        full = r["full_ms"]
        timing = (f"first byte p50 {statistics.median(fb):.2f} ms max {max(fb):.2f} ms"
                  if fb else "no bytes")
        if full:
            timing += f"; all {r['history']} bytes p50 {statistics.median(full):.2f} ms"
        return (f"{ok} ({r.get('received')} B of {r['written']} written, {r.get('nul')} NUL)"
                f"  {timing}  (n={len(fb)})")

    def _ssh(self, r: dict) -> list[str]:
        sep = ("privilege-separated, as root" if r["privsep"] else f"as {r['user']}, unseparated")
        lines = [(f"{_mib(r['size'])} to each viewer, fresh server and pty per run; cloud-console "
                  f"--history-size {r['history']}; sshd {r['sshd']} ({sep}) relaying the pty "
                  "with cat (10 viewers: a tee into a FIFO per session)")]
        for key, x in r["figures"].items():
            door, n = key.split()
            head = f"{SSH_DOORS[door]:<16} clients={n:<3}"
            if "failed" in x:
                lines.append(f"{head} FAILED: {x['failed']}")
                continue
            if x.get("n_errors") or "cpu_ms_per_mib" not in x:
                lines.append(f"{head} NOT SCORED: {x.get('n_errors')} of {n} viewers failed: "
                             f"{x.get('errors', [])[:2]}")
                continue
            runs = " ".join(f"{y['per_client']:.0f}/{y['cpu_ms_per_mib']:.2f}" for y in x["runs"])
            line = (f"{head} per-client {x['per_client']:6.1f} MiB/s (slowest {x['slowest']:.1f})"
                    f"  aggregate {x['aggregate']:6.1f} MiB/s  server CPU "
                    f"{x['cpu_ms_per_mib']:5.2f} ms/MiB ({x['cpu_cores']:.2f} cores)  [exact]"
                    f"  runs {runs}")
            if "cipher" in x:
                line += f"  {x['cipher']}"
            if x.get("pre_sync", ["b''"]) != ["b''"]:
                line += f"  before the workload: {', '.join(x['pre_sync'])[:160]}"
            if door == "sshd":
                parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(
                    x["by_name"].items(), key=lambda kv: -kv[1]))
                line += f"  ({parts} ms/MiB; {x['processes']} processes, {x['exited']} exited)"
            lines.append(line)
        return lines

    def _restart(self, r: dict) -> list[str]:
        return [
            f"{r['consoles']} consoles, {r['bytes_each'] // 1024} KiB of output each: first start "
            f"to READY=1 {r['first_ready_s']:.2f} s; stop (SIGTERM to exit, status "
            f"{r['stop_status']}) {r['stop_s']:.2f} s",
            f"start again with {r['stored']} stored descriptors (state "
            f"{_mib(r.get('state_bytes', 0))}): READY=1 {r['again_ready_s']:.2f} s, every "
            f"console up {r['again_serving_s']:.2f} s; {r['adopted']} descriptors adopted, "
            f"{r['state_taken']} histories taken over",
        ]

    def _timeindex(self, r: dict) -> list[str]:
        idle, flood, cpu = r["idle"], r["flood"], r["cpu"]
        return [
            f"{idle['consoles']} idle consoles: history {idle['per_console'] / 1024:.1f} KiB "
            f"each, of which the time index {idle['index_per_console']:.0f} B "
            f"({idle['marks'] // idle['consoles']} marks)",
            f"after a {flood['flood_mib']:.0f} MiB flood: {flood['after_flood']['marks']} marks, "
            f"{flood['after_flood']['index_bytes']} B (ring {_mib(flood['after_flood']['ring_bytes'])}); "
            f"at the cap: {flood['worst_case']['marks']} marks, "
            f"{flood['worst_case']['index_bytes'] / 1024:.0f} KiB",
            f"output path CPU {cpu['without_index']:.3f} -> {cpu['with_index']:.3f} ms/MiB "
            f"(index +{cpu['index_ms_per_mib']:.3f} ms/MiB, no clients)",
        ]

    def _audit(self, r: dict) -> list[str]:
        out, typed = r["output"], r["input"]
        lines = [
            f"output path CPU {out['without']:.3f} -> {out['audit']:.3f} ms/MiB with an audit log "
            f"({out['audit_ms_per_mib']:+.3f}; 10 audited viewers, nothing per read)",
        ]
        for size, row in typed.items():
            lines.append(
                f"input path, {size} messages: {row['without']:.2f} ms/MiB, with an audit log "
                f"{row['audit']:.2f}, with --audit-input {row['audit_input']:.2f}"
            )
        return lines

    def _fleet(self, r: dict, part: str) -> list[str]:
        return self._fleet_host(r) if part == "host" else self._fleet_neighbour(r)

    def _fleet_host(self, r: dict) -> list[str]:
        lines = []
        g = r.get("guest_nofile")
        if g:
            lines.append(f"ptys held by one guest process (its RLIMIT_NOFILE soft {g[0]} raised "
                         f"to the hard {g[1]})")
        s = r.get("singles")
        if s:
            lines.append(f"{s['n']} single-console processes: RSS {_mib(s['rss_mean'])} each "
                         f"(PSS {_mib(s['pss_mean'])}), all listening {s['listening_s_max']:.2f} s "
                         "after spawn")
        mem = r.get("memory", {})
        one = mem.get(1)
        if mem:
            lines.append(f"servers started with a soft RLIMIT_NOFILE of {r.get('soft_nofile')}; "
                         "nofile below is what the server had once serving")
        for n, m in mem.items():
            line = f"{n:>4} console{'s' if n > 1 else ' '}: RSS {_mib(m['rss'])}"
            if one and n > 1:
                per = (m["rss"] - one["rss"]) / (n - 1)
                line += f" ({per / 1024:+.1f} KiB per console beyond the first)"
            if s and n > 1:
                many = sum(s["rss"]) if n == s["n"] else s["rss_mean"] * n
                how = "" if n == s["n"] else ", extrapolated"
                line += f"; {n} single processes {_mib(many)}{how} ({many / m['rss']:.1f}x)"
            line += (f"  serving {m['serving_s']:.2f} s after spawn (first answer "
                     f"{m['first_answer_s']:.2f} s, {m['first_answer_up']} up)  {m['fds']} fds, "
                     f"{m['threads']} threads, nofile {m['nofile']}")
            lines.append(line)
        if mem:
            lines.append("  (idle consoles: nothing written since start, so nothing replayed: "
                         "the per-console figure is all overhead)")
        i = r.get("idle")
        if i:
            lines.append(f"idle CPU, {i['consoles']} consoles: {i['cores'] * 100:.2f} % of a core "
                         f"over {i['seconds']:.1f} s ({i['wakeups_per_s']:.1f} context switches/s), "
                         f"RSS {i['rss_growth'] / 1024:+.0f} KiB")
        rl = r.get("reload")
        if rl:
            shown = (f"shown on /api/consoles {rl['reload_s']:.2f} s after SIGHUP"
                     if rl["reload_s"] is not None else "NEVER shown on /api/consoles")
            cpu = f"{rl['reload_cpu_s']:.2f} s" if rl["reload_cpu_s"] is not None else "-"
            lines.append(f"reload of {rl['consoles']} consoles, {rl['changed']} with a new source: "
                         f"{shown} ({rl['polls']} polls; server CPU {cpu}); after: "
                         f"{rl['totals_after']}")
            ok = rl["watched_exact"] == rl["watched"] and not rl["watched_closed"]
            lines.append(f"reload: {rl['watched']} clients of unchanged consoles, streaming "
                         f"{rl['watched_bytes'] // 1024} KiB each across it: "
                         f"{rl['watched_exact']} byte-exact, {rl['watched_closed']} closed"
                         f"{'' if ok else ' FAILED: ' + str(rl['watched_errors'])}; clients of "
                         f"changed consoles: {rl['changed_closed']} closed {rl['changed_closes']}")
            if rl.get("log_line"):
                lines.append(f"reload: server log: {rl['log_line'][:160]}")
        if "rss_after_all" in r and mem:
            biggest = mem[max(mem)]
            lines.append(f"RSS after idle and reload {_mib(r['rss_after_all'])} "
                         f"({(r['rss_after_all'] - biggest['rss']) / MiB:+.2f} MiB; the reload's "
                         "clients gone, the watched consoles holding what they streamed as "
                         "history and head)")
        for part, why in r.get("problems", {}).items():
            lines.append(f"PROBLEM ({part}): {why}")
        return lines

    def _fleet_neighbour(self, r: dict) -> list[str]:
        lines = []
        two = r.get("two", {})
        for layout in ("two", "one"):
            x = r.get(layout, {})
            head = f"noisy neighbour, {'one process' if layout == 'one' else 'two processes'}:"
            if "failed" in x:
                lines.append(f"{head} FAILED: {x['failed']}")
                continue
            if "p99" not in x:
                lines.append(f"{head} no echo ({x.get('timeouts')} timeouts)")
                continue
            vs = (f" ({x['p99'] / two['p99']:.2f}x two processes')"
                  if layout == "one" and "p99" in two else "")
            lines.append(
                f"{head} echo p50 {x['p50']:.0f} us p99 {x['p99']:.0f} us{vs} max {x['max']:.0f} us"
                f" (n={x['n']}, {x['timeouts']} timeouts) while the flood gets "
                f"{x['flood_during']:.1f} MiB/s ({x['flood_ratio']:.2f}x of {x['flood_alone']:.1f} "
                f"alone: {x['flood_before']:.1f} before, {x['flood_after']:.1f} after); operator alone p50 {x['idle_p50']:.0f} p99 {x['idle_p99']:.0f} us; "
                f"server CPU {x['cores_during']:.2f} cores")
        return lines

    def _storm(self, r: dict, n: int, rep: int) -> list[str]:
        head = f"N={n} run {rep + 1}:"
        lines = []
        s, i = r.get("startup"), r.get("idle")
        if s and i:
            port = f"{s['listening_s']:.2f} s" if s["listening_s"] is not None else "-"
            loadavg = "/".join(f"{x:.1f}" for x in r["load"])
            lines.append(f"{head} (load average {loadavg} before/after) "
                         f"every console logging {s['open_s']:.2f} s after the start "
                         f"(port open {port}); idle PSS {_mib(i['pss'])}, RSS {_mib(i['rss'])} "
                         f"({_count(i['processes'], 'process')}, "
                         f"{_count(i['threads'], 'thread')}), CPU "
                         f"{i['cores'] * 100:.2f} % of a core over {i['seconds']:.0f} s")
        for key, what in (("at_once", "at once"), ("paced", "paced")):
            if key in r:
                lines.append(f"{head} {what}: {_storm_stream(r[key])}")
        e = r.get("echo")
        if e:
            load = e["flood"]["load"]
            lines.append(f"{head} echo idle {_rtts(e['idle'])}; while the {n} consoles write "
                         f"{load['rate'] / MiB:g} MiB/s {_rtts(e['flood'])}, probing "
                         f"{e['flood'].get('seconds', 0):.1f} s (the load: {_storm_stream(load)})")
        for part, why in r.get("problems", {}).items():
            lines.append(f"{head} PROBLEM ({part}): {why}")
        stop = r.get("stop", {})
        if stop.get("leftovers"):
            lines.append(f"{head} stopped (status {stop['status']}), {len(stop['leftovers'])} "
                         "processes of its tree ended by hand")
        return lines

    def _storm_median(self, label: str, n: int, figure) -> float | None:
        """The median over repeats of C{figure(result)} (None where it has none)."""
        values = []
        for (kind, name, *rest), r in self.results.items():
            if kind == "storm" and name == label and rest[:1] == [n] and "failed" not in r:
                try:
                    value = figure(r)
                except (KeyError, TypeError):
                    value = None
                if value is not None:
                    values.append(value)
        return statistics.median(values) if values else None

    def _storm_pair(self, cc: str, n: int, figure) -> tuple[float | None, float | None]:
        return self._storm_median(cc, n, figure), self._storm_median("conserver", n, figure)

    def _storm_table(self) -> None:
        if not any(k[0] == "storm" for k in self.results):
            return
        servers = self.args.storm_servers
        labels = [s.label for s in servers]
        ccs = [s.label for s in servers if s.kind == CC]
        peer = "conserver" if "conserver" in labels else None
        ratios = [(cc, f"{_short(cc)}/conserver") for cc in ccs] if peer else []
        width = [max(12, len(x) + 2) for x in labels + [r for _, r in ratios]]
        note = "; ratios: cloud-console's figure over conserver's" if ratios else ""
        print(f"\nstorm: {', '.join(labels)} on the same ptys, one after the other (median of "
              f"{self.args.storm_repeats} run(s){note})")
        for n in self.args.storm_sizes:
            print(f"  {f'N={n}':<30}" + "".join(f"{x:>{w}}" for x, w in
                                                 zip(labels + [r for _, r in ratios], width)))
            for what, figure, form in STORM_FIGURES:
                cells = [self._storm_median(label, n, figure) for label in labels]
                row = [format(v, form) if v is not None else "-" for v in cells]
                for cc, _ in ratios:
                    a, b = cells[labels.index(cc)], cells[labels.index(peer)]
                    row.append(f"{a / b:.2f}" if a is not None and b else "-")
                print(f"  {what:<30}" + "".join(f"{x:>{w}}" for x, w in zip(row, width)))

    def _storm_goals(self) -> list[tuple]:
        """The issue's goals for each cloud-console of the storm (against conserver)."""
        rows: list[tuple] = []
        if not any(k[0] == "storm" for k in self.results):
            return rows
        ccs = [s.label for s in self.args.storm_servers if s.kind == CC]
        for cc in ccs:
            tag = f" [{_short(cc)}]" if len(ccs) > 1 else ""
            for n in self.args.storm_sizes:
                both = functools.partial(self._storm_pair, cc, n)
                for key, what in (("at_once", "at once"), ("paced", "paced")):
                    c, p = both(lambda r, key=key: r[key]["cpu_ms_per_mib"])
                    if c is not None and p is not None:
                        rows.append((f"storm {n}: CPU/MiB {what} <= conserver's{tag}",
                                     f"{c:.2f} ms", f"<= {p:.2f} ms", c <= p))
                if n == 1000:
                    c, p = both(lambda r: r["idle"]["pss"])
                    if c is not None and p is not None:
                        rows.append((f"storm {n}: idle PSS < conserver's{tag}", _mib(c),
                                     f"< {_mib(p)}", c < p))
                c, _ = both(lambda r: r["startup"]["open_s"])
                if c is not None:
                    rows.append((f"storm {n}: every console open < 1 s after start{tag}",
                                 f"{c:.2f} s", "< 1 s", c < 1))
                c, p = both(lambda r: r["echo"]["flood"]["p99"] / 1e3)
                if c is not None and p is not None:
                    rows.append((f"storm {n}: echo p99 under flood <= conserver's{tag}",
                                 f"{c:.2f} ms", f"<= {p:.2f} ms", c <= p))
                if c is not None and n == 100:
                    rows.append((f"storm {n}: echo p99 under flood < 10 ms{tag}",
                                 f"{c:.2f} ms", "< 10 ms", c < 10))
                bad = self._storm_median(cc, n, _storm_inexact)
                if bad is not None:
                    rows.append((f"storm {n}: every log byte-exact{tag}", f"{bad:.0f} inexact",
                                 "0", bad == 0))
        return rows

    @property
    def _current(self) -> str:
        return next(reversed(self.results))[1]

    # -- the end -------------------------------------------------------------------------

    def summary(self, elapsed: float) -> None:
        print(f"\nratios (same run; per-client throughput; server CPU per MiB delivered)")
        print(f"  {'':<26}{'MiB/s':>8}{'vs raw pty':>12}{'vs terminado':>14}"
              f"{'ms/MiB':>9}{'CPU: terminado/this':>21}")
        ceiling = {CC: self.get("baseline", "raw pty", "master->slave"),
                   BIG: self.get("baseline", "raw pty", "master->slave"),
                   AUDITED: self.get("baseline", "raw pty", "master->slave"),
                   PEER: self.get("baseline", "raw pty", "slave->master")}
        for (kind, name, *rest), r in self.results.items():
            if kind != "throughput" or "per_client" not in r or r["n_errors"]:
                continue
            n = rest[0]
            peer = self.get("throughput", PEER, n)
            raw = ceiling[name].get("best")
            vs_raw = f"{r['per_client'] / raw:.2f}" if raw else "-"
            vs_peer = f"{r['per_client'] / peer['per_client']:.2f}" if peer.get("per_client") else "-"
            cpu_peer = (f"{peer['cpu_ms_per_mib'] / r['cpu_ms_per_mib']:.2f}"
                        if peer.get("cpu_ms_per_mib") else "-")
            print(f"  {name + f' clients={n}':<26}{r['per_client']:8.1f}{vs_raw:>12}{vs_peer:>14}"
                  f"{r['cpu_ms_per_mib']:9.2f}{cpu_peer:>21}")
        print("  (vs raw pty: the best bare-pty run in the direction the server reads)")
        self._ssh_table()
        self._storm_table()
        self._goals()
        print(f"\nbench took {elapsed:.0f} s", flush=True)

    def _scored(self, kind: str, *rest) -> tuple[dict, str]:
        """cloud-console's result, or the big-history variant's if the default lost bytes."""
        r = self.get(kind, CC, *rest)
        if "per_client" in r and not r["n_errors"]:
            return r, ""
        return self.get(kind, BIG, *rest), " [big hist.]"

    def _goals(self) -> None:
        rows = []
        for n in self.args.clients:
            r = self.get("throughput", CC, n)
            if r:
                ok = not r["n_errors"]
                rows.append((f"every byte to {n} client(s), default history",
                             "yes" if ok else f"{r['n_errors']} closed", "yes", ok))
        (t1, note1), (t10, note10) = self._scored("throughput", 1), self._scored("throughput", 10)
        p1, p10 = self.get("throughput", PEER, 1), self.get("throughput", PEER, 10)
        ttyd = self.args.ttyd_ms_per_mib
        if "cpu_ms_per_mib" in t1:
            c = t1["cpu_ms_per_mib"]
            rows.append((f"CPU/MiB, 1 client <= ttyd{note1}", f"{c:.2f} ms", f"<= {ttyd:.2f} ms",
                         c <= ttyd))
            if "cpu_ms_per_mib" in p1:
                lim = p1["cpu_ms_per_mib"] / 4
                rows.append((f"CPU/MiB, 1 client <= terminado/4{note1}", f"{c:.2f} ms",
                             f"<= {lim:.2f} ms", c <= lim))
        if "cpu_ms_per_mib" in t10 and "cpu_ms_per_mib" in p10:
            c, lim = t10["cpu_ms_per_mib"], p10["cpu_ms_per_mib"] / 8
            rows.append((f"CPU/MiB, 10 clients <= terminado/8{note10}", f"{c:.2f} ms",
                         f"<= {lim:.2f} ms", c <= lim))
        for bg in (0, self.args.background):
            lat = self.get("latency", CC, bg)
            if "p99" in lat:
                rows.append((f"echo p99 < 1 ms ({'idle' if not bg else f'{bg} streaming'})",
                             f"{lat['p99']:.0f} us", "< 1000 us", lat["p99"] < 1000))
        st, note = self._scored("stalled", 10)
        base = self.get("throughput", BIG if note else CC, 10)
        if "per_client" in st and "per_client" in base:
            loss = 1 - st["per_client"] / base["per_client"]
            rows.append((f"stalled client: others lose < 10 %{note}", f"{loss * 100:.1f} %",
                         "< 10 %", loss < 0.10))
        if "rss_growth" in st:
            g = st["rss_growth"] / 1e6
            rows.append((f"stalled client: server RSS < +5 MB{note}", f"+{g:.2f} MB", "< 5 MB",
                         g < 5))
        mem = self.get("memory", CC)
        if mem:
            per = max(mem["per_client"].values()) / 1024
            rows.append(("idle client < 32 KiB", f"{per:.1f} KiB", "< 32 KiB", per < 32))
            g = mem["growth"] / 1e6
            rows.append((f"growth after {mem['cycles']} cycles < 2 MB", f"{g:+.2f} MB", "< 2 MB",
                         g < 2))
        h = self.get("history", CC)
        if h.get("first_byte_ms"):
            fb = statistics.median(h["first_byte_ms"])
            rows.append(("history first byte < 5 ms (p50)", f"{fb:.2f} ms", "< 5 ms", fb < 5))
            rows.append(("history exact (last --history-size bytes)",
                         "exact" if h.get("exact") else "wrong", "exact", bool(h.get("exact"))))
        rows += self._fleet_goals()
        rows += self._ssh_goals()
        rows += self._incident_goals()
        rows += self._storm_goals()
        raw = self.get("latency", "raw pty", 0)
        print("\ndesign goals (cloud-console)" + (
            f"; bare pty echo p99 now: {raw['p99']:.0f} us" if "p99" in raw else ""))
        for what, got, want, ok in rows:
            print(f"  {what:<54}{got:>12}  {want:<12}{'met' if ok else 'MISSED'}")
        print("  [big hist.]: measured on cc-bighist, because the default history closed "
              "clients")

    def _incident_goals(self) -> list[tuple[str, str, str, bool]]:
        """
        The time index and the audit log together: at most 5 % more CPU per MiB of the
        guest's output than the server spends on it for one viewer (their per-MiB costs
        in the server's Python, against the end-to-end figure of the same run).
        """
        index = self.get("timeindex", CC).get("cpu", {}).get("index_ms_per_mib")
        audit = self.get("audit", CC).get("output", {}).get("audit_ms_per_mib")
        base = self.get("throughput", CC, 1).get("cpu_ms_per_mib")
        if index is None or audit is None or not base:
            return []
        share = (index + max(audit, 0.0)) / base
        return [("time index + audit log <= +5 % CPU/MiB (1 client)",
                 f"{share * 100:.1f} %", "<= 5 %", share <= 0.05)]

    def _ssh_figure(self, door: str, n: int) -> float | None:
        x = self.get("ssh", CC).get("figures", {}).get(f"{door} {n}", {})
        return None if x.get("n_errors") else x.get("cpu_ms_per_mib")

    def _ssh_table(self) -> None:
        ns = self.args.ssh_clients if self.get("ssh", CC) else []
        if not ns:
            return
        print("\nthe SSH door (server CPU ms per MiB delivered; same workload, fresh pty per run)")
        print(f"  {'':<12}{'cc websocket':>14}{'cc ssh':>10}{'sshd + cat':>12}"
              f"{'ssh/websocket':>15}{'ssh/sshd':>10}")
        for n in ns:
            ws, ss, od = (self._ssh_figure(d, n) for d in ("websocket", "ssh", "sshd"))
            cells = [f"{v:.2f}" if v is not None else "-" for v in (ws, ss, od)]
            ratios = [f"{ss / v:.2f}" if ss is not None and v else "-" for v in (ws, od)]
            print(f"  {f'clients={n}':<12}{cells[0]:>14}{cells[1]:>10}{cells[2]:>12}"
                  f"{ratios[0]:>15}{ratios[1]:>10}")

    def _ssh_goals(self) -> list[tuple]:
        rows = []
        for n in (self.args.ssh_clients if self.get("ssh", CC) else []):
            ws, ss, od = (self._ssh_figure(d, n) for d in ("websocket", "ssh", "sshd"))
            if ss is None:
                rows.append((f"ssh: every byte to {n} viewer(s)", "failed", "yes", False))
                continue
            if ws is not None:
                rows.append((f"ssh: CPU/MiB, {n} viewer(s) <= 1.5x websocket's", f"{ss:.2f} ms",
                             f"<= {1.5 * ws:.2f} ms", ss <= 1.5 * ws))
            if od is not None:
                rows.append((f"ssh: CPU/MiB, {n} viewer(s) <= sshd + cat", f"{ss:.2f} ms",
                             f"<= {od:.2f} ms", ss <= od))
            figures = self.get("ssh", CC).get("figures", {})
            alone, beside = figures.get(f"websocket {n}", {}), figures.get(f"beside-stopped-ssh {n}", {})
            if alone.get("per_client") and beside.get("per_client"):
                ratio = beside["per_client"] / alone["per_client"]
                rows.append((f"ssh: {n} page(s) beside a stopped ssh keep their pace", f"{ratio:.2f}x",
                             ">= 0.9x", ratio >= 0.9))
        return rows

    def _fleet_goals(self) -> list[tuple]:
        rows = []
        h = self.get("fleet", CC, "host")
        mem, single = h.get("memory", {}), h.get("singles")
        if len(mem) > 1 and 1 in mem:
            n = max(mem)
            per = (mem[n]["rss"] - mem[1]["rss"]) / (n - 1) / 1024
            rows.append((f"fleet: idle console <= 200 KiB ({n} in one process)",
                         f"{per:.1f} KiB", "<= 200 KiB", per <= 200))
        if 100 in mem and single:
            got, lim = mem[100]["rss"], 3 * single["rss_mean"]
            rows.append(("fleet: 100 consoles < 3 single-console processes", _mib(got),
                         f"< {lim / MiB:.0f} MiB", got < lim))
        for n, m in mem.items():
            if n == max(mem):
                rows.append((f"fleet: start-up to serving {n} consoles < 2 s",
                             f"{m['serving_s']:.2f} s", "< 2 s", m["serving_s"] < 2))
        failed = [p for p in h.get("problems", {}) if p.endswith(" consoles")]
        for part in failed:
            rows.append((f"fleet: serving {part}", "failed", "serving", False))
        i = h.get("idle")
        if i:
            pct = i["cores"] * 100
            rows.append((f"fleet: idle CPU, {i['consoles']} consoles < 1 % of a core",
                         f"{pct:.2f} %", "< 1 %", pct < 1))
        rl = h.get("reload")
        if rl:
            ok = rl["watched_exact"] == rl["watched"] and not rl["watched_closed"]
            rows.append((f"fleet: reload of {rl['consoles']}: the unchanged notice nothing",
                         f"{rl['watched_exact']}/{rl['watched']} exact",
                         "all exact", ok))
        nb = self.get("fleet", CC, "neighbour")
        one, two = nb.get("one", {}), nb.get("two", {})
        if "p99" in one and "p99" in two:
            x = one["p99"] / two["p99"]
            rows.append(("fleet: neighbour echo p99 <= 1.5x two processes'",
                         f"{x:.2f}x", "<= 1.5x", x <= 1.5))
        if one.get("flood_ratio") is not None:
            x = one["flood_ratio"]
            rows.append(("fleet: flood keeps >= 80 % of its throughput alone",
                         f"{x * 100:.0f} %", ">= 80 %", x >= 0.8))
        return rows

    def as_json(self) -> dict:
        return {"args": vars(self.args), "time": time.time(),
                "results": [{"key": list(k), **v} for k, v in self.results.items()]}


def _rtts(x: dict) -> str:
    """Echo round trips (microseconds in the result) in ms."""
    if "p50" not in x:
        return f"no samples ({x.get('timeouts')} timeouts)"
    lost = f", {x['timeouts']} timeouts" if x["timeouts"] else ""
    return (f"p50 {x['p50'] / 1e3:.2f} p99 {x['p99'] / 1e3:.2f} max {x['max'] / 1e3:.2f} ms "
            f"(n={x['n']}{lost})")


def _storm_stream(x: dict) -> str:
    if x["cpu_ms_per_mib"] is not None:
        cost = f"{x['cpu_ms_per_mib']:.2f} ms/MiB"
    else:
        cost = f"not scored: {x['incomplete']} logs incomplete"
    rate = f" at {x['rate'] / MiB:g} MiB/s" if "rate" in x else ""
    exact = ("every log exact" if x["exact"] == x["consoles"] else
             f"{x['consoles'] - x['exact']} logs NOT exact: {'; '.join(x['errors'])}")
    return (f"{x['mib']:.1f} MiB{rate} logged in {x['wall_s']:.2f} s, server CPU "
            f"{x['cpu_s']:.2f} s = {cost} ({x['cores']:.2f} cores, "
            f"{_count(x['processes'], 'process')}; the writer {x['writer_cpu_s']:.2f} s); {exact}")


def _short(label: str) -> str:
    """A storm server's label, cloud-console said cc (a variant's arguments kept)."""
    return "cc" + label[len(CC):] if label.startswith(CC) else label


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}es" if what.endswith("s") else f"{n} {what}s"


def _storm_inexact(r: dict) -> int | None:
    """Logs not byte-exact after a phase, over the phases measured (None: none was)."""
    phases = [r.get("at_once"), r.get("paced"), r.get("echo", {}).get("flood", {}).get("load")]
    phases = [x for x in phases if x]
    return sum(x["consoles"] - x["exact"] for x in phases) if phases else None


#: the storm table's rows: what, the figure of one run, its format
STORM_FIGURES = (
    ("all consoles logging, s", lambda r: r["startup"]["open_s"], ".2f"),
    ("idle PSS, MiB", lambda r: r["idle"]["pss"] / MiB, ".1f"),
    ("idle RSS, MiB", lambda r: r["idle"]["rss"] / MiB, ".1f"),
    ("idle CPU, % of a core", lambda r: r["idle"]["cores"] * 100, ".2f"),
    ("at once: CPU ms/MiB", lambda r: r["at_once"]["cpu_ms_per_mib"], ".2f"),
    ("at once: wall, s", lambda r: r["at_once"]["wall_s"], ".2f"),
    ("paced: CPU ms/MiB", lambda r: r["paced"]["cpu_ms_per_mib"], ".2f"),
    ("echo idle p50, ms", lambda r: r["echo"]["idle"]["p50"] / 1e3, ".2f"),
    ("echo idle p99, ms", lambda r: r["echo"]["idle"]["p99"] / 1e3, ".2f"),
    ("echo idle max, ms", lambda r: r["echo"]["idle"]["max"] / 1e3, ".2f"),
    ("echo under flood p50, ms", lambda r: r["echo"]["flood"]["p50"] / 1e3, ".2f"),
    ("echo under flood p99, ms", lambda r: r["echo"]["flood"]["p99"] / 1e3, ".2f"),
    ("echo under flood max, ms", lambda r: r["echo"]["flood"]["max"] / 1e3, ".2f"),
    ("logs not byte-exact", _storm_inexact, ".0f"),
)


def print_profile(path: str, top: int = 12) -> None:
    """Top functions of a py-spy raw (collapsed stacks) file, by self and total samples."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            samples += n
            frames = stack.split(";")
            own[frames[-1]] = own.get(frames[-1], 0) + n
            for frame in set(frames):
                total[frame] = total.get(frame, 0) + n
    if not samples:
        return
    print(f"  profile ({samples} samples while busy; {path})")
    for title, table in (("self", own), ("total", total)):
        print(f"    top by {title}:")
        ranked = sorted(table.items(), key=lambda kv: -kv[1])
        if title == "total":  # skip the main loop's frames, in (nearly) every sample
            ranked = [kv for kv in ranked if kv[1] < 0.9 * samples]
        for frame, n in ranked[:top]:
            print(f"      {100 * n / samples:5.1f} %  {frame[:110]}")
