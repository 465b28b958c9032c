"""
The guest: the program on the other side of the console, driven by the benchmark.

    python guest.py CONTROL_SOCKET FD WORKLOAD_FILE

FD is C{fd:N} (a pty master inherited from the benchmark, the attach case) or C{stdio}
(the guest runs inside a server's own pty, the terminado case; fd 0 is set raw). Orders
come as JSON lines over the UNIX socket CONTROL_SOCKET, never in-band, and each gets one
JSON line back:

 - C{write}: write C{marker} and/or the first C{size} bytes of the workload followed by
   C{end} (a marker), blocking until the pty took them all;
 - C{echo}: until C{stop}, echo every byte read and stream the workload at C{rate}
   bytes/s (0 = no background stream);
 - C{flood}: until C{stop}, write the workload over and over at full speed (and read
   and drop whatever comes back);
 - C{read}: the baseline's reader: read until the workload and C{end} arrived, verify;
 - C{quit}.

Standard library only.
"""

from __future__ import annotations

import json
import os
import select
import socket
import sys
import time
import tty

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workload import load, marker  # noqa: E402

CHUNK = 64 * 1024


def write_all(fd: int, data: bytes | memoryview) -> None:
    os.set_blocking(fd, True)
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view[:CHUNK])
        except InterruptedError:
            continue
        view = view[n:]


def echo(fd: int, control: socket.socket, workload: bytes, rate: float) -> dict:
    """Echo input and stream C{rate} bytes/s of workload until the control socket speaks."""
    os.set_blocking(fd, False)
    pending = bytearray()
    echoed = streamed = 0
    pos = 0
    tick = 0.01
    next_tick = time.monotonic()
    per_tick = int(rate * tick)
    while True:
        timeout = max(0.0, next_tick - time.monotonic()) if per_tick else None
        readable, writable, _ = select.select(
            [fd, control], [fd] if pending else [], [], timeout)
        if control in readable:
            break
        if fd in readable:
            try:
                data = os.read(fd, 65536)
            except (BlockingIOError, InterruptedError):
                data = b""
            except OSError:
                break
            if data:
                pending += data
                echoed += len(data)
        if per_tick and time.monotonic() >= next_tick:
            next_tick += tick
            if len(pending) < 1 << 20:  # clients too slow: do not queue without bound
                if pos + per_tick > len(workload):
                    pos = 0
                pending += workload[pos:pos + per_tick]
                pos += per_tick
                streamed += per_tick
        if pending:
            try:
                n = os.write(fd, pending)
                del pending[:n]
            except (BlockingIOError, InterruptedError):
                pass
    return {"echoed": echoed, "streamed": streamed}


def flood(fd: int, control: socket.socket, workload: bytes) -> dict:
    """Write the workload again and again, as fast as the pty takes it, until told to stop."""
    os.set_blocking(fd, False)
    view = memoryview(workload)
    pos = written = 0
    while True:
        readable, writable, _ = select.select([fd, control], [fd], [])
        if control in readable:
            break
        if fd in readable:
            try:
                os.read(fd, 65536)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                break
        if fd in writable:
            try:
                n = os.write(fd, view[pos:pos + CHUNK])
            except (BlockingIOError, InterruptedError):
                continue
            written += n
            pos = (pos + n) % len(workload)
    return {"flooded": written}


def read_expected(fd: int, expected: bytes) -> dict:
    """Read until C{expected} arrived; stop at the first wrong byte."""
    os.set_blocking(fd, True)
    pos = 0
    reads = 0
    total = len(expected)
    while pos < total:
        data = os.read(fd, 65536)
        reads += 1
        if not data:
            return {"ok": False, "error": f"EOF at {pos}", "t_end": time.monotonic()}
        if not expected.startswith(data, pos):
            return {"ok": False, "error": f"corrupt at {pos}", "t_end": time.monotonic()}
        pos += len(data)
    return {"ok": True, "t_end": time.monotonic(), "reads": reads}


def main(argv: list[str]) -> int:
    control_path, fd_spec, workload_path = argv[1:4]
    if fd_spec == "stdio":
        fd = 0
        tty.setraw(0)
    else:
        fd = int(fd_spec.split(":", 1)[1])
    workload = load(workload_path)
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    control.connect(control_path)
    control.sendall(json.dumps({"hello": "guest", "pid": os.getpid()}).encode() + b"\n")
    reader = control.makefile("rb")
    for line in reader:
        order = json.loads(line)
        op = order["op"]
        reply: dict = {"op": op}
        if op == "write":
            reply["t_start"] = time.monotonic()
            if order.get("marker"):
                write_all(fd, marker(order["marker"]))
            size = order.get("size", 0)
            if size:
                write_all(fd, memoryview(workload)[:size])
            if order.get("end"):
                write_all(fd, marker(order["end"]))
            reply["t_end"] = time.monotonic()
        elif op == "echo":
            control.sendall(json.dumps({"op": "echo", "started": True}).encode() + b"\n")
            reply.update(echo(fd, control, workload, order.get("rate", 0)))
            stop = json.loads(reader.readline())
            assert stop["op"] == "stop", stop
            reply["op"] = "stop"
        elif op == "flood":
            control.sendall(json.dumps({"op": "flood", "started": True}).encode() + b"\n")
            reply.update(flood(fd, control, workload))
            stop = json.loads(reader.readline())
            assert stop["op"] == "stop", stop
            reply["op"] = "stop"
        elif op == "read":
            expected = workload[:order["size"]] + marker(order["end"])
            control.sendall(json.dumps({"op": "read", "ready": True}).encode() + b"\n")
            reply.update(read_expected(fd, expected))
        elif op == "quit":
            control.sendall(json.dumps(reply).encode() + b"\n")
            return 0
        control.sendall(json.dumps(reply).encode() + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
