"""
Telnet on a VMM's serial socket, as far as a console needs it: QEMU's socket chardev with
C{telnet=on} (the C{telnet+unix:PATH} source), which is how a serial BREAK reaches the
guest (Linux: BREAK then a key is Magic SysRq on that serial console).

What QEMU does there, measured (QEMU 8-10, tests/test_telnet.py and the README):

  - on each connection it sends C{IAC WILL ECHO, IAC WILL SGA, IAC WILL BINARY,
    IAC DO BINARY} first, and nothing telnet after that;
  - the guest's output is passed on I{verbatim}: a 0xFF the guest writes is not doubled;
  - in input, C{IAC IAC} is one 0xFF for the guest, C{IAC BRK} a serial break, other
    commands and options are dropped.

So the output filter (L{TelnetOutput}) strips the telnet commands and options that open
the connection and then passes every byte on as it came, so the history holds the
guest's bytes exactly; input is escaped (L{escape_input}); a BREAK is L{BREAK}. No
Twisted here: the device (L{cloud_console.console.device}) feeds it.
"""

from __future__ import annotations

IAC = 0xFF
#: Commands that take an option byte: WILL, WONT, DO, DONT.
_WITH_OPTION = frozenset({251, 252, 253, 254})
SB = 250
SE = 240

#: A telnet BREAK: QEMU hands the guest a serial break.
BREAK = bytes([IAC, 243])


def escape_input(data: bytes) -> bytes:
    """Input for the guest with every 0xFF doubled (else QEMU takes it for a command)."""
    return data.replace(b"\xff", b"\xff\xff")


class TelnetOutput:
    """
    Strips the telnet negotiation at the start of a connection, then passes everything.

    States: before any guest byte (C{"start"}), inside a command (C{"iac"}: after IAC;
    C{"option"}: after WILL/WONT/DO/DONT; C{"sb"}/C{"sb-iac"}: a subnegotiation), and
    passing (C{"data"}: every byte is the guest's). A sequence split across reads is
    carried over. If the first bytes after an IAC are not a telnet command, that IAC and
    what follows are the guest's and are kept.
    """

    def __init__(self) -> None:
        self.state = "start"

    def feed(self, data: bytes) -> bytes:
        """The guest's bytes among C{data}."""
        if self.state == "data":
            return data
        out = bytearray()
        for index, byte in enumerate(data):
            state = self.state
            if state == "data":
                out += data[index:]
                break
            if state == "start":
                if byte == IAC:
                    self.state = "iac"
                else:
                    self.state = "data"
                    out += data[index:]
                    break
            elif state == "iac":
                if byte in _WITH_OPTION:
                    self.state = "option"
                elif byte == SB:
                    self.state = "sb"
                elif byte == IAC or byte < SE:
                    # Not a command: this IAC was the guest's, as is what follows.
                    self.state = "data"
                    out.append(IAC)
                    out += data[index:]
                    break
                else:
                    self.state = "start"  # a two-byte command (NOP, GA...)
            elif state == "option":
                self.state = "start"
            elif state == "sb":
                if byte == IAC:
                    self.state = "sb-iac"
            elif state == "sb-iac":
                self.state = "start" if byte == SE else "sb"
        return bytes(out)
