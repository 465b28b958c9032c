"""
The fleet's guest: one process holding the pty pairs of many consoles (a host's VMs).

    python fleetguest.py CONTROL_SOCKET WORKLOAD_FILE

It opens the pairs itself (raw, both ends held, so a server closing its end never hangs
one up) and tells the benchmark the slave paths; the servers under test open those.
One event loop (epoll, through selectors: select() stops at fd 1,024) drains every
master, so output a server writes to a console never fills its pty, and runs the orders,
JSON lines over CONTROL_SOCKET, each answered with one line carrying its C{op}:

 - C{open}: C{n} more pairs; the reply lists their slave paths (C{paths});
 - C{stream}: on the consoles C{indices}: the marker C{sync}, then the first C{size}
   workload bytes at C{rate} bytes/s each, then the marker C{end}; answered at once, and
   again with C{op} C{streamed} once every byte went into the ptys;
 - C{finish}: the streams going on write the rest at full speed;
 - C{stats}: bytes read from the masters (what the servers wrote to the consoles);
 - C{quit}.

The soft limit on open files is raised to the hard limit first: 1,000 consoles are 2,000
descriptors here. Standard library only.
"""

from __future__ import annotations

import json
import os
import resource
import selectors
import socket
import sys
import time
import tty

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workload import load, marker  # noqa: E402

TICK = 0.01


class Pair:
    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self.slave)
        self.pending = bytearray()
        self.writing = False  # registered for EVENT_WRITE
        # a paced stream: workload[pos:size] still to queue, then the end marker
        self.pos = self.size = 0
        self.rate = 0.0
        self.end = b""
        self.streaming = False


class Guest:
    def __init__(self, control: socket.socket, workload: bytes) -> None:
        self.control = control
        self.workload = workload
        self.sel = selectors.DefaultSelector()
        self.pairs: list[Pair] = []
        self.by_fd: dict[int, Pair] = {}
        self.read_back = 0
        self.streams_left = 0
        self.buf = b""
        self.sel.register(control, selectors.EVENT_READ, None)

    def reply(self, message: dict) -> None:
        self.control.sendall(json.dumps(message).encode() + b"\n")

    def _events(self, pair: Pair) -> None:
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if pair.pending else 0)
        if bool(pair.pending) != pair.writing:
            pair.writing = bool(pair.pending)
            self.sel.modify(pair.master, want, pair)

    def _flush(self, pair: Pair) -> None:
        while pair.pending:
            try:
                n = os.write(pair.master, pair.pending[:65536])
            except (BlockingIOError, InterruptedError):
                break
            del pair.pending[:n]
        self._events(pair)

    def _queue_stream(self, pair: Pair, budget: int) -> None:
        """Queue up to C{budget} more stream bytes (and the end marker after the last)."""
        take = min(budget, pair.size - pair.pos)
        if take > 0:
            pair.pending += self.workload[pair.pos:pair.pos + take]
            pair.pos += take
        if pair.pos >= pair.size and pair.streaming:
            pair.pending += pair.end
            pair.streaming = False
            self.streams_left -= 1

    # -- orders --------------------------------------------------------------------------

    def op_open(self, order: dict) -> dict:
        made = []
        for _ in range(order["n"]):
            pair = Pair()
            self.pairs.append(pair)
            self.by_fd[pair.master] = pair
            self.sel.register(pair.master, selectors.EVENT_READ, pair)
            made.append(pair.path)
        return {"paths": made, "total": len(self.pairs)}

    def op_stream(self, order: dict) -> dict:
        sync = marker(order["sync"])
        for i in order["indices"]:
            pair = self.pairs[i]
            pair.pending += sync
            pair.pos, pair.size = 0, order["size"]
            pair.rate = float(order["rate"])
            pair.end = marker(order["end"])
            pair.streaming = True
            self.streams_left += 1
            self._flush(pair)
        return {"streams": len(order["indices"])}

    def op_finish(self, order: dict) -> dict:
        for pair in self.pairs:
            if pair.streaming:
                pair.rate = 0.0  # no pacing
        return {}

    def op_stats(self, order: dict) -> dict:
        return {"read_back": self.read_back, "pairs": len(self.pairs)}

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        next_tick = time.monotonic() + TICK
        streaming_before = 0
        while True:
            timeout = max(0.0, next_tick - time.monotonic()) if self.streams_left else None
            for key, events in self.sel.select(timeout):
                pair = key.data
                if pair is None:
                    if not self._control():
                        return
                    continue
                if events & selectors.EVENT_READ:
                    try:
                        data = os.read(pair.master, 65536)
                        self.read_back += len(data)
                    except (BlockingIOError, InterruptedError):
                        pass
                    except OSError:
                        self.sel.unregister(pair.master)
                        continue
                if events & selectors.EVENT_WRITE:
                    self._flush(pair)
            if self.streams_left and time.monotonic() >= next_tick:
                next_tick += TICK
                for pair in self.pairs:
                    if pair.streaming and len(pair.pending) < 1 << 20:
                        budget = (1 << 20) if pair.rate <= 0 else max(1, int(pair.rate * TICK))
                        self._queue_stream(pair, budget)
                        self._flush(pair)
                if not self.streams_left:
                    streaming_before = 1
            if streaming_before and not self.streams_left and not any(
                    p.pending for p in self.pairs):
                streaming_before = 0
                self.reply({"op": "streamed", "t": time.monotonic()})

    def _control(self) -> bool:
        data = self.control.recv(1 << 16)  # readable: this does not block
        if not data:
            return False
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            order = json.loads(line)
            op = order["op"]
            if op == "quit":
                self.reply({"op": "quit"})
                return False
            try:
                result = getattr(self, "op_" + op)(order)
            except Exception as e:  # noqa: BLE001 - the benchmark reports it
                result = {"error": repr(e)}
            result["op"] = op
            self.reply(result)
        return True


def main(argv: list[str]) -> int:
    control_path, workload_path = argv[1:3]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    workload = load(workload_path)
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    control.connect(control_path)
    control.sendall(json.dumps({"hello": "fleet-guest", "pid": os.getpid(),
                                "nofile": [soft, hard]}).encode() + b"\n")
    Guest(control, workload).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
