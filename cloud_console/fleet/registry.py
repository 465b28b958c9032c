"""
A host's consoles, by name: what the site routes C{/c/NAME/} through, and what a reload
changes.

Consoles come from the command line, C{--config} and C{--console-dir}; a reload (SIGHUP,
or the directory changing) hands the registry the whole new list and it works out the
difference: consoles added start, consoles removed stop (their clients are closed with
4001 "console removed"), a console whose source changed is replaced, and one whose
source is unchanged keeps its clients, history and offsets (a changed title or limit
applies in place). One console failing never stops the process or disturbs another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

from twisted.application.service import MultiService
from twisted.logger import Logger

from ..console.console import Console, ConsoleStatus
from ..console.logfile import LogFileError
from ..console.spec import ConsoleSpec

#: Close reason for the clients of a console a reload removed.
REMOVED = "console removed"


@dataclass
class ReloadResult:
    """What a reload did, by console name (for the log and the tests)."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def _same_source(a: ConsoleSpec, b: ConsoleSpec) -> bool:
    """Whether a console can stay as it is: the same console device, opened the same way."""
    return (str(a.source), a.raw, a.reopen, a.log_file) == (str(b.source), b.raw, b.reopen, b.log_file)


class ConsoleRegistry(MultiService):
    """The consoles of one process, by name; each is a child service."""

    _log = Logger()

    def __init__(self, build: Callable[[ConsoleSpec], Console]) -> None:
        MultiService.__init__(self)
        self._build = build
        self._consoles: dict[str, Console] = {}

    def get(self, name: str) -> Console | None:
        return self._consoles.get(name)

    def __iter__(self) -> Iterator[Console]:
        """The consoles, by name."""
        return iter([self._consoles[name] for name in sorted(self._consoles)])

    def __len__(self) -> int:
        return len(self._consoles)

    def statuses(self) -> list[ConsoleStatus]:
        return [console.status() for console in self]

    @property
    def viewer_count(self) -> int:
        """Viewers of every console (for --max-clients-total)."""
        return sum(console.multiplexer.viewer_count for console in self._consoles.values())

    def apply(self, specs: list[ConsoleSpec], at_start: bool = False) -> ReloadResult:
        """
        Make the registry hold exactly C{specs}.

        @param at_start: open new consoles now, blocking (before the ports listen, so the
            first request finds them up); otherwise they are opened off the reactor.
        """
        result = ReloadResult()
        wanted = {spec.name or "": spec for spec in specs}
        for name in sorted(set(self._consoles) - set(wanted)):
            self._remove(name, REMOVED)
            result.removed.append(name)
        for name, spec in sorted(wanted.items()):
            current = self._consoles.get(name)
            if current is not None and current.multiplexer.closed_reason is None:
                if _same_source(current.spec, spec):
                    if current.spec != spec:
                        current.apply(spec)
                        result.updated.append(name)
                    else:
                        result.kept.append(name)
                    continue
                self._remove(name, f"{REMOVED}: its source changed")
                result.replaced.append(name)
            elif current is not None:
                # Lost for good (a bare /dev/pts/N that hung up): named again, so tried again.
                self._remove(name, REMOVED)
                result.replaced.append(name)
            try:
                console = self._build(spec)
            except LogFileError as e:
                result.failed[name] = str(e)
                self._log.error("console {name} not added: {error}", name=name, error=str(e))
                continue
            self._consoles[name] = console
            if at_start:
                console.open_or_show_down()
            console.setServiceParent(self)
            if not at_start:
                console.follower.open_in_background()
            if name not in result.replaced:
                result.added.append(name)
        if not at_start:
            self._log.info(
                "consoles reloaded: {added} added, {removed} removed, {replaced} replaced, "
                "{updated} updated, {kept} unchanged",
                added=len(result.added),
                removed=len(result.removed),
                replaced=len(result.replaced),
                updated=len(result.updated),
                kept=len(result.kept),
                result=result,
            )
        return result

    def _remove(self, name: str, reason: str) -> None:
        console = self._consoles.pop(name)
        console.remove(reason)
        if console.parent is self:
            console.disownServiceParent()

    def reopen_logs(self) -> None:
        """SIGHUP: every console's log file is reopened (logrotate)."""
        for console in self._consoles.values():
            console.reopen_log()


__all__ = ["ConsoleRegistry", "ReloadResult", "REMOVED"]
