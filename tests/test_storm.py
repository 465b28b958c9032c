"""
A host's boot storm in one process, driven by hand: 100 real ptys print at once, each
read by its L{ConsoleDevice} into its multiplexer, its log file and a recording client,
the consoles sharing one L{TurnShare} as they share the reactor.

No reactor runs and no time passes: the test writes what each pty takes, then gives every
console one read (a reactor turn), until every byte is through; so the checks are exact,
not timed.
"""

from __future__ import annotations

import os
import random
import tty

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from cloud_console.console.device import READ_PER_TURN_SHARED, ConsoleDevice, TurnShare
from cloud_console.console.logfile import LogFileSink
from cloud_console.console.multiplexer import Chunk, IConsoleClient, Multiplexer

CONSOLES = 100


def boot_log(size: int, seed: int) -> bytes:
    """A boot log of C{size} bytes unlike any other console's (its number in every line)."""
    rng = random.Random(seed)
    lines = []
    total = 0
    while total < size:
        line = f"[{seed:03d}] kernel subsystem {rng.randint(0, 10**6)} \x1b[32mOK\x1b[0m\r\n".encode()
        lines.append(line)
        total += len(line)
    return b"".join(lines)[:size]


@implementer(IConsoleClient)
class Recorder:
    """Keeps every chunk it is sent, with its offset."""

    def __init__(self) -> None:
        self.chunks: list[tuple[int, bytes]] = []

    def output(self, chunk: Chunk) -> None:
        self.chunks.append((chunk.offset, chunk.data))

    def gap(self, lost_from: int, lost_to: int, reason: str) -> bool:
        raise AssertionError(f"a live client was sent a gap {lost_from}-{lost_to}")

    def skip(self, skip_from: int, skip_to: int) -> None:
        pass

    def clients_changed(self, count: int) -> None:
        pass

    def console_state(self, up: bool, reason: str, since: str) -> None:
        pass

    def close(self, code: int, reason: str) -> Deferred[None]:
        return succeed(None)


class StormTests(SynchronousTestCase):
    """Every console's log and stream stay exact and in order while all print at once."""

    def test_hundred_consoles_at_once(self) -> None:
        """
        100 consoles each print 30,000 bytes at once (more than their 8 KiB history, so
        every ring wraps): every log file holds exactly its console's bytes, every
        client gets them in order with no offset skipped or repeated, and no console
        reads more than its shared bite in a turn, however full its pty is.
        """
        directory = self.mktemp()
        os.mkdir(directory)
        reactor = MemoryReactorClock()
        share = TurnShare(Clock().seconds)  # time stands still: every console is "active"
        masters: list[int] = []
        devices: list[ConsoleDevice] = []
        sinks: list[LogFileSink] = []
        recorders: list[Recorder] = []
        datas = [boot_log(30000, i) for i in range(CONSOLES)]
        for i in range(CONSOLES):
            master, slave = os.openpty()
            tty.setraw(master)
            os.set_blocking(master, False)
            self.addCleanup(os.close, master)
            multiplexer = Multiplexer(8192)
            sink = LogFileSink(os.path.join(directory, f"vm{i}.log"), multiplexer)
            sink.startService()
            self.addCleanup(sink.close, 1001, "test over")
            recorder = Recorder()
            multiplexer.attach(recorder, viewer=False)
            device = ConsoleDevice.open(
                os.ttyname(slave), True, multiplexer.output_received, self.fail, reactor,
                turn_share=share,
            )
            os.close(slave)  # the device holds the console now, as in production
            self.addCleanup(device.close)
            masters.append(master)
            devices.append(device)
            sinks.append(sink)
            recorders.append(recorder)

        written = [0] * CONSOLES
        turns = 0
        while True:
            for i, master in enumerate(masters):
                if written[i] < len(datas[i]):
                    try:
                        written[i] += os.write(master, datas[i][written[i] : written[i] + 65536])
                    except BlockingIOError:
                        pass
            before = [len(r.chunks) for r in recorders]
            for device in devices:
                device.doRead()
            turns += 1
            for recorder, count in zip(recorders, before):
                # One read per console per turn: one chunk, bounded by the shared bite.
                self.assertLessEqual(len(recorder.chunks) - count, 1)
                for _, data in recorder.chunks[count:]:
                    self.assertLessEqual(len(data), READ_PER_TURN_SHARED)
            done = all(s.bytes_written == len(d) for s, d in zip(sinks, datas))
            if done and written == [len(d) for d in datas]:
                break
            self.assertLess(turns, 10000, "the storm never drained")

        for i in range(CONSOLES):
            with open(os.path.join(directory, f"vm{i}.log"), "rb") as f:
                self.assertEqual(f.read(), datas[i], f"log of console {i}")
            offset = 0
            for chunk_offset, data in recorders[i].chunks:
                self.assertEqual(chunk_offset, offset, f"console {i}: chunks out of order")
                offset += len(data)
            self.assertEqual(b"".join(d for _, d in recorders[i].chunks), datas[i])
