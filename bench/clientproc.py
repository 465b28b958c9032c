"""
A client process: many WebSocket clients in one asyncio loop, driven by the benchmark.

    python clientproc.py CONTROL_SOCKET WORKLOAD_FILE HOST PORT PATH PROTOCOL

PROTOCOL is a WebSocket one (C{raw}, C{terminado}: see wsclient), or C{conserver}:
conserver's own client protocol (conserverclient), PORT its master's and PATH the
console's name.

Orders come as JSON lines over the UNIX socket; every order is answered with one JSON
line carrying the same C{op} (plus asynchronous C{synced}/C{done} events after C{arm}).
Clients run apart from the server so their CPU is never counted as the server's.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import conserverclient  # noqa: E402
from workload import PROBE, load, marker  # noqa: E402
from wsclient import COLLECT, DISCARD, DONE, PROBING, VERIFY, WSClient, connect  # noqa: E402


class Worker:
    def __init__(self, workload: bytes, host: str, port: int, path: str, protocol: str,
                 writer: asyncio.StreamWriter) -> None:
        self.workload = workload
        self.host, self.port, self.path, self.protocol = host, port, path, protocol
        self.writer = writer
        self.clients: list[WSClient] = []
        self.stalled: WSClient | None = None

    def reply(self, message: dict) -> None:
        self.writer.write(json.dumps(message).encode() + b"\n")

    async def _connect(self, n: int, concurrency: int = 50,
                       paths: list[str] | None = None) -> tuple[list[WSClient], list[str]]:
        gate = asyncio.Semaphore(concurrency)
        errors: list[str] = []

        async def one(path: str) -> WSClient | None:
            async with gate:
                try:
                    return await self._open(path)
                except Exception as e:  # noqa: BLE001 - reported, not raised
                    errors.append(repr(e))
                    return None

        made = await asyncio.gather(*(one(p) for p in (paths or [self.path] * n)))
        return [c for c in made if c is not None], errors

    async def _open(self, path: str):
        """A WebSocket client, or for C{conserver} a console client (C{path}: its name)."""
        if self.protocol == "conserver":
            return await conserverclient.connect(self.host, self.port, path)
        return await connect(self.host, self.port, path, self.protocol)

    # -- orders --------------------------------------------------------------------------

    async def op_connect(self, order: dict) -> dict:
        """C{n} clients on the process's path, or one on each of C{paths} (the fleet's)."""
        made, errors = await self._connect(order.get("n", 0), paths=order.get("paths"))
        self.clients += made
        return {"open": len(made), "failed": len(errors), "errors": errors[:3]}

    async def op_arm(self, order: dict) -> dict:
        """Expect C{sync}, then the first C{size} workload bytes and C{end}, on every client."""
        expected = self.workload[:order["size"]] + marker(order["end"])
        sync = marker(order["sync"])
        stall = order.get("stall")
        clients = self.clients
        loop = asyncio.get_running_loop()
        synced = loop.create_future()
        done = loop.create_future()
        waiting = {"sync": len(clients), "done": len(clients) - (stall is not None)}

        def on_synced(client: WSClient) -> None:
            if client is self.stalled:
                client.transport.pause_reading()
            waiting["sync"] -= 1
            if waiting["sync"] == 0 and not synced.done():
                synced.set_result(None)

        def on_done(client: WSClient) -> None:
            if client is self.stalled:
                return
            waiting["done"] -= 1
            if waiting["done"] == 0 and not done.done():
                done.set_result(None)

        def _lost(c: WSClient) -> None:
            if c.stream.mode not in (DONE,) and c.stream.t_end is None:
                c.stream.error = c.stream.error or (
                    f"CLOSED ({c.close_code} {c.close_reason!r}) after {c.stream.pos} bytes")
                c.stream.t_end = time.monotonic()
                if c.stream.mode != VERIFY:
                    on_synced(c)
                on_done(c)

        self.stalled = clients[stall] if stall is not None else None
        frames0 = {id(c): c.frames for c in clients}
        for c in clients:
            c.stream.arm(sync, expected, lambda c=c: on_synced(c), lambda c=c: on_done(c))
            if not c.lost.done():
                c.lost.add_done_callback(lambda _f, c=c: _lost(c))

        async def watch() -> None:
            timeout = order.get("timeout", 300)
            try:
                await asyncio.wait_for(asyncio.shield(synced), timeout)
                self.reply({"op": "synced", "t": time.monotonic()})
                await asyncio.wait_for(asyncio.shield(done), timeout)
            except asyncio.TimeoutError:
                pass
            results = []
            for c in clients:
                if c is self.stalled:
                    continue
                s = c.stream
                error = s.error
                if error is None and s.mode != DONE:
                    error = f"STALLED after {s.pos} of {len(s.expected)} bytes"
                results.append({"t_end": s.t_end, "pos": s.pos, "error": error,
                                "frames": c.frames - frames0[id(c)]})
            self.reply({"op": "done", "results": results})

        asyncio.ensure_future(watch())
        return {"armed": len(clients)}

    async def op_resume(self, order: dict) -> dict:
        """The stalled client reads again: what does it get?"""
        c = self.stalled
        assert c is not None
        s = c.stream
        pos_before = s.pos
        if not c.lost.done():
            c.transport.resume_reading()
        quiet = order.get("quiet", 5.0)
        while not c.lost.done() and s.mode not in (DONE,) and s.error is None:
            await asyncio.sleep(0.1)
            if time.monotonic() - c.last_data > quiet:
                break
        return {"pos_at_stall_end": pos_before, "pos": s.pos, "total": len(s.expected),
                "complete": s.mode == DONE, "problem": s.error if s.mode != DONE else None,
                "close_code": c.close_code, "close_reason": c.close_reason,
                "closed": c.lost.done()}

    async def op_discard(self, order: dict) -> dict:
        for c in self.clients:
            c.stream.mode = DISCARD
        return {}

    async def op_stats(self, order: dict) -> dict:
        return {"received": [c.stream.received for c in self.clients],
                "lost": sum(c.lost.done() for c in self.clients),
                "closes": [[c.close_code, c.close_reason] for c in self.clients
                           if c.lost.done()]}

    async def op_latency(self, order: dict) -> dict:
        """
        One client: send the probe byte, wait for the guest's echo, repeat (every
        C{interval} seconds, if given).
        """
        c = self.clients[order.get("index", 0)]
        loop = asyncio.get_running_loop()
        rtts: list[float] = []
        timeouts = 0
        c.stream.mode = PROBING
        for i in range(order["warmup"] + order["samples"]):
            waiter = loop.create_future()
            c.stream.on_probe = lambda w=waiter: w.done() or w.set_result(time.monotonic())
            t0 = time.monotonic()
            c.send_input(PROBE)
            try:
                t1 = await asyncio.wait_for(waiter, 5.0)
            except asyncio.TimeoutError:
                timeouts += 1
                continue
            if i >= order["warmup"]:
                rtts.append((t1 - t0) * 1e6)
            # let a probe's echo leave the pipe before the next; or type at a human's pace
            await asyncio.sleep(order.get("interval", 0.0005))
        c.stream.mode = DISCARD
        return {"rtts_us": rtts, "timeouts": timeouts}

    async def op_close_all(self, order: dict) -> dict:
        await asyncio.gather(*(c.close() for c in self.clients))
        n = len(self.clients)
        self.clients = []
        return {"closed": n}

    async def op_cycles(self, order: dict) -> dict:
        """C{count} connect, open, close cycles, C{parallel} at a time."""
        count, parallel = order["count"], order.get("parallel", 10)
        errors: list[str] = []
        left = [count]

        async def lane() -> None:
            while left[0] > 0:
                left[0] -= 1
                try:
                    c = await connect(self.host, self.port, self.path, self.protocol)
                    await c.close()
                except Exception as e:  # noqa: BLE001
                    errors.append(repr(e))

        t0 = time.monotonic()
        await asyncio.gather(*(lane() for _ in range(parallel)))
        return {"elapsed": time.monotonic() - t0, "failed": len(errors), "errors": errors[:3]}

    async def op_history(self, order: dict) -> dict:
        """
        New clients after C{written} workload bytes: time to the first byte, and whether
        the first one got exactly the last C{history} bytes.
        """
        expected = self.workload[:order["written"]][-order["history"]:]
        first_ms, full_ms = [], []
        detail: dict = {}
        for n in range(order.get("repeats", 10)):
            t0 = time.monotonic()
            c = await connect(self.host, self.port, self.path, self.protocol, mode=COLLECT)
            deadline = t0 + 5.0
            full = None
            while time.monotonic() < deadline:
                if len(c.stream.collected) >= len(expected):
                    if full is None:
                        full = (c.last_data - t0) * 1e3
                        full_ms.append(full)
                    if time.monotonic() - c.last_data > 0.3:
                        break
                await asyncio.sleep(0.002)
            if c.stream.first_byte is not None:
                first_ms.append((c.stream.first_byte - t0) * 1e3)
            if n == 0:
                data = bytes(c.stream.collected)
                detail = {"received": len(data), "expected": len(expected),
                          "exact": data == expected, "nul": data.count(0),
                          "is_suffix": data.endswith(expected) or expected.endswith(data)}
            await c.close()
        return {"first_byte_ms": first_ms, "full_ms": full_ms,
                "first_byte_p50_ms": statistics.median(first_ms) if first_ms else None,
                **detail}


async def main(argv: list[str]) -> None:
    control_path, workload_path, host, port, path, protocol = argv[1:7]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    workload = load(workload_path)
    reader, writer = await asyncio.open_unix_connection(control_path)
    writer.write(json.dumps({"hello": "clients", "pid": os.getpid()}).encode() + b"\n")
    worker = Worker(workload, host, int(port), path, protocol, writer)
    tasks = set()

    async def run(order: dict) -> None:
        try:
            result = await getattr(worker, "op_" + order["op"])(order)
        except Exception as e:  # noqa: BLE001 - the benchmark reports it
            result = {"error": repr(e)}
        result["op"] = order["op"]
        worker.reply(result)

    while True:
        line = await reader.readline()
        if not line:
            break
        order = json.loads(line)
        if order["op"] == "quit":
            break
        task = asyncio.ensure_future(run(order))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    for c in worker.clients:
        if c.transport is not None:
            c.transport.abort()


if __name__ == "__main__":
    asyncio.run(main(sys.argv))
