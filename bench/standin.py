"""
The console device as the multiplexer sees it, for bench scripts that drive a
multiplexer in the server's Python without a pty: it takes every byte at once and
reads nothing (no read worker ever takes it).
"""

from __future__ import annotations


class QuietPty:
    """Stands in for the console device: input is taken at once, output is fed by hand."""

    pending_input = 0

    def write(self, data: bytes) -> None: ...
    def startReading(self) -> None: ...
    def stopReading(self) -> None: ...
    def set_watched(self, watched: bool) -> None: ...
    def close(self) -> None: ...
