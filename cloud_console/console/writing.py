"""
Writing all of a buffer to a file: one loop for the log files, the audit log and the read
workers' log writes. It imports nothing but the standard library, so a read worker (no
Twisted) can use it too.
"""

from __future__ import annotations

import os


def write_all(fd: int, data: bytes | bytearray) -> tuple[int, OSError | None]:
    """
    Write all of C{data} to C{fd} (a blocking file: short writes go on, EINTR is
    retried); the bytes written, and the error that stopped it, if one did.
    """
    view = memoryview(data)
    done = 0
    while done < len(data):
        try:
            done += os.write(fd, view[done:])
        except InterruptedError:
            continue
        except OSError as e:
            return done, e
    return done, None
