"""
The history's time index (issue 15), measured in the server's own Python (the checkout's
package, run with --server-python): what it holds and costs, beside the bytes it times.

 - idle: 1,000 consoles, each after a boot (8 KiB of boot log in reads 50 ms to 2 s
   apart, then a login prompt), idle since: the history's memory per console and the
   index's share (tracemalloc, so the figures are Python's allocations, not RSS noise).
 - flood: one console after 100 MiB in 4 KiB reads at ~300 MiB/s, then the worst case
   for the index (a read every 100 ms for longer than the cap holds): marks and bytes.
 - cpu: output_received for 64 MiB of 4 KiB reads with and without the index (the
   multiplexer alone, no clients): CPU per MiB, best of 5, and the difference.

Run alone (prints JSON): PYTHONPATH=. .venv/bin/python bench/timeindex.py
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import tracemalloc

from standin import QuietPty

MiB = 1 << 20


def _console(clock, timed: bool = True):
    from cloud_console.console.multiplexer import Multiplexer

    multiplexer = Multiplexer(80_000, clock=clock, lag_window=MiB, head_size=256 * 1024)
    multiplexer.console_up(QuietPty())
    if not timed:
        # The same path without the index: append without a time.
        history = multiplexer.history
        append = history.append
        history.append = lambda data, now=None: append(data)  # type: ignore[method-assign]
    return multiplexer


def idle(count: int = 1000) -> dict:
    from twisted.internet.task import Clock

    clock = Clock()
    clock.advance(1_800_000_000)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    consoles = []
    line = b"[    0.123456] kernel: a line of boot log, some seventy bytes long.....\r\n"
    for i in range(count):
        multiplexer = _console(clock)
        for n in range(110):  # ~8 KiB of boot log
            clock.advance(0.05 if n % 10 else 2.0)
            multiplexer.output_received(line)
        multiplexer.output_received(b"\r\nDebian GNU/Linux 13 vm%d ttyS0\r\n\r\nvm%d login: " % (i, i))
        consoles.append(multiplexer)
    gc.collect()
    total = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    histories = [m.history for m in consoles]
    index = sum(sys.getsizeof(t) + sys.getsizeof(t._offsets) + sys.getsizeof(t._times)
                for h in histories for t in (h.times, h.head_times))
    held = sum(len(h) + len(h._head) for h in histories)
    marks = sum(len(h.times) + len(h.head_times) for h in histories)
    return {"consoles": count, "python_bytes": total, "history_bytes": held,
            "index_bytes": index, "marks": marks,
            "per_console": total / count, "index_per_console": index / count}


def flood(size: int = 100 * MiB) -> dict:
    from twisted.internet.task import Clock

    clock = Clock()
    clock.advance(1_800_000_000)
    multiplexer = _console(clock)
    block = b"y" * 4095 + b"\n"
    for _ in range(size // len(block)):
        clock.advance(len(block) / (300 * MiB))
        multiplexer.output_received(block)
    h = multiplexer.history
    after_flood = {"marks": len(h.times) + len(h.head_times), "index_bytes": h.times_allocated,
                   "ring_bytes": len(h._ring), "head_bytes": len(h._head)}
    for _ in range(3 * 4096):  # a read every 100 ms for 20 minutes: the cap holds it
        clock.advance(0.1)
        multiplexer.output_received(b"tick\r\n")
    worst = {"marks": len(h.times) + len(h.head_times), "index_bytes": h.times_allocated}
    return {"flood_mib": size / MiB, "after_flood": after_flood, "worst_case": worst}


def cpu(size: int = 64 * MiB, runs: int = 5) -> dict:
    from twisted.internet.task import Clock

    block = os.urandom(4096)
    out = {}
    for timed in (False, True):
        best = None
        for _ in range(runs):
            clock = Clock()
            multiplexer = _console(clock, timed)
            started = time.process_time()
            for _ in range(size // len(block)):
                clock.advance(0.00002)
                multiplexer.output_received(block)
            spent = time.process_time() - started
            best = spent if best is None else min(best, spent)
        out["with_index" if timed else "without_index"] = best * 1000 / (size / MiB)
    out["index_ms_per_mib"] = out["with_index"] - out["without_index"]
    return out


def measure(ctx) -> dict:
    """The scenario, for bench/run.py: this file run by the server's python, JSON back."""
    from procs import run_in_server_python  # the bench's side only (procs needs psutil)

    return run_in_server_python(ctx, os.path.abspath(__file__))


def main() -> None:
    print(json.dumps({"idle": idle(), "flood": flood(), "cpu": cpu()}))


if __name__ == "__main__":
    main()
