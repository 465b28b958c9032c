"""
The one access policy both doors use: who a credential is, whether it may type, and which
consoles it may see (fnmatch patterns over console names; the others do not exist for it).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass


class CredentialFileError(Exception):
    """A password or token file cannot be read or has a bad line (which one, and why)."""


#: What a console pattern may contain: the console-name alphabet and fnmatch's C{*?[]!}.
_PATTERN_CHARS = re.compile(r"[a-z0-9._\-*?\[\]!]+")


def parse_console_patterns(text: str) -> tuple[str, ...]:
    """
    C{web-*,db1} as C{("web-*", "db1")}: comma-separated fnmatch patterns over console
    names, each non-empty and made only of C{a-z 0-9 . _ -} and C{* ? [ ] !}.

    @raise ValueError: an empty pattern or a character a console name cannot hold (the
        message says which).
    """
    patterns = tuple(text.split(","))
    for pattern in patterns:
        if not pattern:
            raise ValueError(f"empty console pattern in {text!r} (expected e.g. web-*,db1)")
        if not _PATTERN_CHARS.fullmatch(pattern):
            bad = sorted({c for c in pattern if not _PATTERN_CHARS.fullmatch(c)})
            raise ValueError(
                f"console pattern {pattern!r} holds {''.join(bad)!r}: patterns use a-z 0-9 . _ - "
                "and * ? [ ] ! only"
            )
    return patterns


@dataclass(frozen=True)
class Access:
    """
    Who logged in, whether they may type, whether they may control the VM, and which
    consoles they may see.

    C{consoles} holds fnmatch patterns over console names; empty means every console.
    C{link} is set for a signed link (L{cloud_console.access.links}): C{name} is then its C{sub},
    and the gate answers 401, not 404, for a console the link is not for.
    C{control} is the right to the console's actions (SysRq, BREAK, reset, power button;
    L{cloud_console.console.actions}) on the consoles it may see; a read-only credential
    never has it, whatever was asked (L{may_control}).
    """

    name: str
    read_only: bool
    consoles: tuple[str, ...] = ()
    link: bool = False
    control: bool = False

    @property
    def may_control(self) -> bool:
        """Whether this credential may use a console's actions (never when read-only)."""
        return self.control and not self.read_only

    def may_see(self, console_name: str) -> bool:
        """Whether this credential may see the console of that name (at all)."""
        if not self.consoles:
            return True
        return any(fnmatch.fnmatchcase(console_name, pattern) for pattern in self.consoles)

    @property
    def scope(self) -> tuple[bool, tuple[str, ...], bool]:
        """
        What the credential may do, without who it is: two credentials with equal scopes
        are served the same tree (the patterns sorted, duplicates and order ignored, and
        any C{*} pattern meaning every console): read-only, the patterns, and control.
        """
        if "*" in self.consoles:
            return self.read_only, (), self.may_control
        return self.read_only, tuple(sorted(set(self.consoles))), self.may_control
