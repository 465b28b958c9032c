"""
The audit log's cost (issue 15), measured in the server's own Python (the checkout's
package, run with --server-python), on the paths it touches, with and without it.

 - output: output_received for 64 MiB of 4 KiB reads to 10 attached viewers whose
   attaches were audited, and to 10 that were not: the audit log is not on the output
   path (nothing is called per byte or per read), so this is the check that it stays so.
 - input: what viewers type, through the console's input path (queued for a device that
   takes everything), as 64-byte messages (typing, escape sequences) and 4 KiB ones
   (pastes): without an audit log, with one (a count per 1 s burst), and with
   --audit-input (the bytes too, base64), the file on a real file system: CPU per MiB.

CPU is process time, best of 5. Run alone (prints JSON):
PYTHONPATH=. .venv/bin/python bench/audit.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from standin import QuietPty

MiB = 1 << 20


class _Viewer:
    """A viewer that keeps up and does nothing with what it is sent."""

    def output(self, chunk) -> None: ...
    def gap(self, lost_from: int, lost_to: int, reason: str) -> bool: return True
    def skip(self, skip_from: int, skip_to: int) -> None: ...
    def clients_changed(self, count: int) -> None: ...
    def console_state(self, up: bool, reason: str, since: str) -> None: ...
    def close(self, code: int, reason: str): ...


def _console(clock, audit, viewers: int = 10):
    from cloud_console.console.multiplexer import ClientLabel, Multiplexer

    multiplexer = Multiplexer(80_000, clock=clock, lag_window=MiB)
    multiplexer.console_up(QuietPty())
    trails = []
    for n in range(viewers):
        label = ClientLabel("web", f"user{n}", "10.0.0.1", clock.seconds())
        attachment = multiplexer.attach(_Viewer(), label=label)
        trails.append((attachment, audit.attached("vm1", label, False)))
    return multiplexer, trails


def _best(runs: int, once) -> float:
    best = None
    for _ in range(runs):
        spent = once()
        best = spent if best is None else min(best, spent)
    assert best is not None
    return best


def _audits(directory: str, clock):
    from cloud_console.access.audit import NO_AUDIT, AuditLog

    return {
        "without": lambda: NO_AUDIT,
        "audit": lambda: AuditLog(os.path.join(directory, "audit.log"), clock),
        "audit_input": lambda: AuditLog(os.path.join(directory, "audit.log"), clock, True),
    }


def output(size: int = 64 * MiB, runs: int = 5) -> dict:
    from twisted.internet.task import Clock

    block = os.urandom(4096)
    out = {}
    with tempfile.TemporaryDirectory() as directory:
        for name in ("without", "audit"):

            def once() -> float:
                clock = Clock()
                clock.advance(1_800_000_000)
                audit = _audits(directory, clock)[name]()
                multiplexer, _ = _console(clock, audit)
                started = time.process_time()
                for _ in range(size // len(block)):
                    clock.advance(0.00002)
                    multiplexer.output_received(block)
                return time.process_time() - started

            out[name] = _best(runs, once) * 1000 / (size / MiB)
    out["audit_ms_per_mib"] = out["audit"] - out["without"]
    return out


def input_path(size: int = 16 * MiB, runs: int = 5) -> dict:
    from twisted.internet.task import Clock

    out: dict = {}
    with tempfile.TemporaryDirectory() as directory:
        for message in (64, 4096):
            data = os.urandom(message)
            row = {}
            for name in ("without", "audit", "audit_input"):

                def once() -> float:
                    clock = Clock()
                    clock.advance(1_800_000_000)
                    audit = _audits(directory, clock)[name]()
                    _, trails = _console(clock, audit, viewers=1)
                    attachment, trail = trails[0]
                    send, typed = attachment.send_input, trail.input
                    count = size // message
                    # A typist at 1 MiB/s: a burst per second, the clock moving with the bytes.
                    step = message / MiB
                    started = time.process_time()
                    for _ in range(count):
                        clock.advance(step)
                        typed(data, send(data))
                    trail.detached()
                    return time.process_time() - started

                row[name] = _best(runs, once) * 1000 / (size / MiB)
            out[f"{message}B"] = row
    return out


def measure(ctx) -> dict:
    """The scenario, for bench/run.py: this file run by the server's python, JSON back."""
    from procs import run_in_server_python  # the bench's side only (procs needs psutil)

    return run_in_server_python(ctx, os.path.abspath(__file__))


def main() -> None:
    print(json.dumps({"output": output(), "input": input_path()}))


if __name__ == "__main__":
    sys.exit(main())
