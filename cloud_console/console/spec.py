"""
What one console is, as configured (the command line, C{--config}, C{--console-dir}): the
record the fleet builds and L{cloud_console.console.console.build_console} consumes.
"""

from __future__ import annotations

from dataclasses import dataclass

from .sources import Source

DEFAULT_HISTORY_SIZE = 80_000
DEFAULT_HEAD_SIZE = 256 * 1024


@dataclass(frozen=True)
class ConsoleSpec:
    """What one console is, as configured (command line, --config, --console-dir)."""

    name: str | None  # None only for the single console of the original command line
    source: Source  # cloud_console.console.sources.parse_source(text)
    title: str  # default: the name (or the SOURCE text in single mode)
    log_file: str | None = None
    history_size: int = DEFAULT_HISTORY_SIZE
    head_size: int = DEFAULT_HEAD_SIZE
    read_only: bool = False
    reopen: bool = True  # multi-console mode: True unless the source is a bare /dev/pts/N
    raw: bool = True
    #: Minutes of silence after which the log file gets a MARK line (0: never).
    log_timestamps: float = 0.0
    origin: str = "command line"  # "command line" | "config" | "directory"
