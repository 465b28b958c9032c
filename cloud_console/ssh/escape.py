"""
The SSH door's escape sequence: a prefix (conserver's C{Ctrl-E c} by default) and a
command letter, read out of what the user types before it goes to the guest.

OpenSSH's own escape is C{~} after a newline; ours is a control character and a letter,
so neither eats the other's. Typed twice, the prefix goes to the guest as it is; a
prefix not followed by the rest of it goes to the guest too, so nothing typed is lost.
"""

from __future__ import annotations

from dataclasses import dataclass

#: conserver's: Ctrl-E, then c.
DEFAULT_ESCAPE = "^Ec"


class EscapeSpecError(ValueError):
    """An C{--ssh-escape} value that cannot be used (the message says why)."""


def parse_escape(text: str) -> bytes:
    """
    C{^Ec} (caret notation for the control character, then a character) as C{b"\\x05c"}.

    Two characters in all, the first a control character (so that ordinary typing never
    starts it), the second printable and not the first again.

    @raise EscapeSpecError: anything else.
    """
    chars = list(text)
    if len(chars) >= 2 and chars[0] == "^":
        letter = chars[1].upper()
        if not ("@" <= letter <= "_"):
            raise EscapeSpecError(f"--ssh-escape {text!r}: ^{chars[1]} is not a control character")
        chars = [chr(ord(letter) - 64), *chars[2:]]
    if len(chars) != 2:
        raise EscapeSpecError(
            f"--ssh-escape {text!r}: expected a control character and one more, e.g. ^Ec"
        )
    first, second = chars
    if not (ord(first) < 32):
        raise EscapeSpecError(f"--ssh-escape {text!r}: it must start with a control character (^A to ^_)")
    if not (32 < ord(second) < 127):
        raise EscapeSpecError(f"--ssh-escape {text!r}: the second character must be printable")
    return (first + second).encode("ascii")


def describe_escape(prefix: bytes) -> str:
    """C{b"\\x05c"} as C{^Ec}, for help lines."""
    return f"^{chr(prefix[0] + 64)}{chr(prefix[1])}"


@dataclass(frozen=True)
class Command:
    """A command letter typed after the prefix."""

    letter: str


class EscapeReader:
    """
    Splits typed bytes into input for the guest and escape commands, across reads (the
    prefix and its letter may come in separate packets).

    L{feed} returns, in order, C{bytes} to send and L{Command}s to run.
    """

    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix
        #: Bytes of the prefix matched so far (held back until we know).
        self._held = 0
        #: The whole prefix was typed: the next byte is the command.
        self._command = False
        #: The prefix being matched follows a whole one (typed twice: for the guest).
        self._second = False

    def feed(self, data: bytes) -> list[bytes | Command]:
        out: list[bytes | Command] = []
        plain = bytearray()
        prefix = self.prefix
        for byte in data:
            if self._command:
                self._command = False
                if byte == prefix[0]:
                    self._held, self._second = 1, True
                    continue
                if plain:
                    out.append(bytes(plain))
                    plain.clear()
                out.append(Command(chr(byte)))
                continue
            if self._held:
                if byte == prefix[self._held]:
                    self._held += 1
                    if self._held == len(prefix):
                        self._held = 0
                        if self._second:
                            self._second = False
                            plain += prefix
                        else:
                            self._command = True
                    continue
                # Not the prefix after all: what was held goes to the guest, and this
                # byte is read afresh (it may start the prefix).
                plain += prefix[: self._held]
                self._held, self._second = 0, False
            if byte == prefix[0]:
                self._held = 1
                continue
            plain.append(byte)
        if plain:
            out.append(bytes(plain))
        return out
