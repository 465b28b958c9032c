"""
The benchmark's workload: realistic terminal output, the same bytes for every run.

Numbered text lines, tabs, CRLF, SGR colours, cursor movement, multi-byte UTF-8 and
progress lines redrawn with CR, generated from a fixed seed and cached in a file so that
the guest and every client process hold identical bytes. NUL, STX, ETX and ACK never
occur: STX/ETX frame the in-band markers and ACK is the latency probe. Standard library only
(the guest imports it inside the server's pty).
"""

from __future__ import annotations

import os
import random
import tempfile

STX, ETX = b"\x02", b"\x03"
PROBE = b"\x06"

_WORDS = (
    "kernel systemd network eth0 link up DHCPACK from 10.0.2.2 mounted filesystem ext4 "
    "journal started Starting Finished Reached target OpenSSH cloud-init modules config "
    "apt update installing package unpacking setting up processing triggers for man-db "
    "warning error failed succeeded retrying connection timed out listening on port"
).split()
_UNICODE = ("café", "naïve", "Grüße", "日本語の出力", "中文字符", "✓ done", "→", "🚀 deploy",
            "Ωμέγα", "ёлка", "½ ¼ ¾", "⚠ warning", "░▒▓█")
_COLOURS = (b"\x1b[0m", b"\x1b[1m", b"\x1b[31m", b"\x1b[32m", b"\x1b[33m", b"\x1b[1;34m",
            b"\x1b[38;5;208m", b"\x1b[38;2;10;200;30m", b"\x1b[7m", b"\x1b[4m")
_CURSOR = (b"\x1b[2K", b"\x1b[1A", b"\x1b[10G", b"\x1b[s", b"\x1b[u", b"\x1b[?25l",
           b"\x1b[?25h", b"\x1b]0;cloud-init\x07")


def marker(name: str) -> bytes:
    """An in-band marker: STX name ETX (never produced by the workload)."""
    return STX + name.encode("ascii") + ETX


def generate(size: int, seed: int = 1) -> bytes:
    """C{size} bytes of terminal output (the last line may be cut)."""
    rng = random.Random(seed)
    out = bytearray()
    line = 0
    while len(out) < size:
        line += 1
        kind = rng.random()
        if kind < 0.08:
            # a progress bar redrawn in place, ended by CRLF
            for pct in range(0, 101, rng.choice((5, 10, 20))):
                bar = "#" * (pct // 5) + " " * (20 - pct // 5)
                out += f"\rDownloading layer {line:08d} [{bar}] {pct:3d}%".encode()
            out += b"\r\n"
            continue
        parts = [f"[{line:8d}.{rng.randrange(1000000):06d}] ".encode()]
        for _ in range(rng.randrange(3, 14)):
            r = rng.random()
            if r < 0.12:
                parts.append(rng.choice(_COLOURS))
            elif r < 0.17:
                parts.append(rng.choice(_CURSOR))
            elif r < 0.27:
                parts.append(rng.choice(_UNICODE).encode("utf-8"))
            elif r < 0.32:
                parts.append(b"\t")
            else:
                parts.append(rng.choice(_WORDS).encode())
            parts.append(b" ")
        parts.append(b"\x1b[0m\r\n")
        out += b"".join(parts)
    del out[size:]
    # never end inside a UTF-8 sequence (terminado decodes the stream as UTF-8)
    i = len(out) - 1
    while i >= 0 and out[i] & 0xC0 == 0x80:
        i -= 1
    if i >= 0 and out[i] >= 0xC0:
        need = 2 if out[i] < 0xE0 else 3 if out[i] < 0xF0 else 4
        if len(out) - i < need:
            out[i:] = b" " * (len(out) - i)
    return bytes(out)


def cut_at_line_end(data: bytes, size: int) -> int:
    """The length of the longest prefix of C{data} no longer than C{size} ending in LF."""
    return data.rindex(b"\n", 0, size) + 1


def cached(size: int, seed: int = 1, directory: str | None = None) -> str:
    """Path of a file holding L{generate}C{(size, seed)}, written once."""
    directory = directory or tempfile.gettempdir()
    path = os.path.join(directory, f"ccbench-workload-{size}-{seed}.bin")
    if not os.path.exists(path) or os.path.getsize(path) != size:
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(generate(size, seed))
        os.replace(tmp, path)
    return path


def load(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
