"""
The fleet's guest: one process holding the pty pairs of many consoles (a host's VMs).

    python fleetguest.py CONTROL_SOCKET WORKLOAD_FILE

It opens the pairs itself (raw, both ends held, so a server closing its end never hangs
one up, and the same ptys serve one server after another) and tells the benchmark the
slave paths; the servers under test open those. One event loop (epoll, through
selectors: select() stops at fd 1,024) drains every master, so output a server writes to
a console never fills its pty, and runs the orders, JSON lines over CONTROL_SOCKET, each
answered with one line carrying its C{op}:

 - C{open}: C{n} more pairs; the reply lists their slave paths (C{paths});
 - C{flush}: drop what the first C{n} consoles (all by default) hold unread for a
   server (tcflush), so a server starts on an empty line whatever the last one left;
 - C{write}: C{data} (a latin-1 string) into the first C{n} consoles at once (a probe:
   it must fit in the pty, C{short} counts those where it did not);
 - C{stream}: on the consoles C{indices}: the marker C{sync} (and CRLF after it if
   C{sync_line}), then C{size} workload bytes (from C{offset}: either may be one number
   or a list, one per index), then the marker C{end} if given, paced at C{rate} bytes/s
   (a number or a list; 0: as fast as the pty takes them); answered at once, and again
   with C{op} C{streamed} and the C{seconds} it took once every byte went into the ptys;
 - C{finish}: the streams going on write the rest at full speed;
 - C{drop}: the streams going on end now, what the ptys did not take dropped (for a
   server that stopped reading; no C{streamed} follows);
 - C{stats}: bytes read from the masters (what the servers wrote to the consoles);
 - C{quit}.

The writer is meant to cost little beside the servers it feeds (it shares their cores):
a stream's bytes are built once and written from a memoryview; a paced console is topped
up to its due offset (C{rate} x the time since the start, so a late tick catches up)
every 10 ms; a console whose pty is full waits for epoll to say it has room, so nothing
is dropped and no console is polled in vain.

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
import termios
import time
import tty

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workload import load, marker  # noqa: E402

TICK = 0.01
READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE


class Pair:
    __slots__ = (
        "data",
        "head",
        "master",
        "path",
        "pos",
        "rate",
        "slave",
        "streaming",
        "view",
        "writing",
    )

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self.slave)
        self.data = b""  # the stream: sync marker, workload bytes, end marker
        self.view = memoryview(self.data)
        self.pos = 0  # bytes of it in the pty
        self.head = 0  # bytes due at once (the sync marker), before the pacing
        self.rate = 0.0  # bytes/s; 0: as fast as the pty takes them
        self.streaming = False
        self.writing = False  # registered for EVENT_WRITE (the pty was full)


def _each(value, k: int):
    """An order's per-console value: one for all, or a list with one per index."""
    return value[k] if isinstance(value, list) else value


class Guest:
    def __init__(self, control: socket.socket, workload: bytes) -> None:
        self.control = control
        self.workload = workload
        self.sel = selectors.DefaultSelector()
        self.pairs: list[Pair] = []
        self.streams: list[Pair] = []
        self.t0 = 0.0  # when the current streams started
        self.read_back = 0
        self.buf = b""
        self.sel.register(control, READ, None)

    def reply(self, message: dict) -> None:
        self.control.sendall(json.dumps(message).encode() + b"\n")

    # -- writing -------------------------------------------------------------------------

    def _due(self, pair: Pair, now: float) -> int:
        if pair.rate <= 0:
            return len(pair.data)
        return min(len(pair.data), pair.head + int(pair.rate * (now - self.t0)))

    def _pump(self, pair: Pair, now: float) -> None:
        """Write what is due; a pty that took less is watched for room (EVENT_WRITE)."""
        due = self._due(pair, now)
        if due > pair.pos:
            try:
                pair.pos += os.write(pair.master, pair.view[pair.pos:due])
            except (BlockingIOError, InterruptedError):
                pass
        full = pair.pos < due
        if full != pair.writing:
            pair.writing = full
            self.sel.modify(pair.master, READ | (WRITE if full else 0), pair)

    def _tick(self, now: float) -> None:
        """Top up the paced consoles; tell the benchmark when every stream is written."""
        left = []
        for pair in self.streams:
            if pair.pos < len(pair.data):
                if not pair.writing:
                    self._pump(pair, now)
                left.append(pair)
            else:
                pair.streaming = False
        self.streams = left
        if not left:
            self.reply({"op": "streamed", "t": now, "seconds": now - self.t0})

    # -- orders --------------------------------------------------------------------------

    def op_open(self, order: dict) -> dict:
        made = []
        for _ in range(order["n"]):
            pair = Pair()
            self.pairs.append(pair)
            self.sel.register(pair.master, READ, pair)
            made.append(pair.path)
        return {"paths": made, "total": len(self.pairs)}

    def op_flush(self, order: dict) -> dict:
        for pair in self.pairs[:order.get("n", len(self.pairs))]:
            termios.tcflush(pair.slave, termios.TCIFLUSH)
        return {}

    def op_write(self, order: dict) -> dict:
        data = order["data"].encode("latin-1")
        short = 0
        for pair in self.pairs[:order.get("n", len(self.pairs))]:
            try:
                short += os.write(pair.master, data) < len(data)
            except BlockingIOError:
                short += 1
        return {"short": short}

    def op_stream(self, order: dict) -> dict:
        sync = marker(order["sync"]) + (b"\r\n" if order.get("sync_line") else b"")
        end = marker(order["end"]) if order.get("end") else b""
        self.t0 = time.monotonic()
        for k, i in enumerate(order["indices"]):
            pair = self.pairs[i]
            offset, size = _each(order.get("offset", 0), k), _each(order["size"], k)
            pair.data = sync + self.workload[offset:offset + size] + end
            pair.view = memoryview(pair.data)
            pair.pos, pair.head = 0, len(sync)
            pair.rate = float(_each(order["rate"], k))
            if not pair.streaming:
                pair.streaming = True
                self.streams.append(pair)
            self._pump(pair, self.t0)
        return {"streams": len(order["indices"])}

    def op_finish(self, order: dict) -> dict:
        now = time.monotonic()
        for pair in self.streams:
            pair.rate = 0.0  # no pacing
            if not pair.writing:
                self._pump(pair, now)
        return {}

    def op_drop(self, order: dict) -> dict:
        """End every stream now (a server stopped reading); C{unwritten} bytes dropped."""
        unwritten = sum(len(pair.data) - pair.pos for pair in self.streams)
        for pair in self.streams:
            pair.data, pair.view, pair.pos, pair.streaming = b"", memoryview(b""), 0, False
            if pair.writing:
                pair.writing = False
                self.sel.modify(pair.master, READ, pair)
        self.streams = []
        return {"unwritten": unwritten}

    def op_stats(self, order: dict) -> dict:
        return {"read_back": self.read_back, "pairs": len(self.pairs)}

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        next_tick = time.monotonic() + TICK
        while True:
            timeout = max(0.0, next_tick - time.monotonic()) if self.streams else None
            for key, events in self.sel.select(timeout):
                pair = key.data
                if pair is None:
                    if not self._control():
                        return
                    continue
                if events & READ:
                    try:
                        self.read_back += len(os.read(pair.master, 65536))
                    except (BlockingIOError, InterruptedError):
                        pass
                    except OSError:
                        self.sel.unregister(pair.master)
                        continue
                if events & WRITE:
                    self._pump(pair, time.monotonic())
            now = time.monotonic()
            if now >= next_tick:
                next_tick = max(next_tick + TICK, now)
                if self.streams:
                    self._tick(now)

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
