"""
The peer: terminado serving one shared terminal at /websocket.

    python terminado_server.py PORT GUEST_COMMAND...

terminado's own SingleTermManager and TermSocket on a tornado application, with default
settings: every client shares one pty running GUEST_COMMAND (started when the first
client connects), output goes out as JSON text ["stdout", text].
"""

from __future__ import annotations

import asyncio
import signal
import sys

import tornado.web
from terminado import SingleTermManager, TermSocket


async def main(port: int, command: list[str]) -> None:
    manager = SingleTermManager(shell_command=command)
    app = tornado.web.Application([(r"/websocket", TermSocket, {"term_manager": manager})])
    app.listen(port, address="127.0.0.1")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await manager.shutdown()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2:]))
