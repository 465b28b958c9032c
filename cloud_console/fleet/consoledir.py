"""
C{--console-dir DIR}: every entry of a directory is a console named after the entry.

An entry is one of:

  - a symlink to a pty (what QEMU's or libvirt's hooks, or udev, make): the console's
    source is C{pty:DIR/NAME}, the entry itself, so the symlink is resolved again at
    each (re)open and a VMM re-pointing it after a restart is followed;
  - a unix socket (a VMM's serial socket, created or bind-mounted there): C{unix:DIR/NAME};
  - a small regular file (at most L{MAX_SOURCE_FILE} bytes) holding one SOURCE line, as
    C{--console} takes it (C{qmp:/run/qemu/vm1.qmp}); blank lines and lines starting
    with C{#} are allowed around it. Paths in it must be absolute: the daemon's working
    directory is nobody's business.

A dangling symlink is still a console (a C{pty:} one): the VMM that owns its target may
simply not be running yet, and the console shows as down, and is retried, until it is.
(A symlink that will point at a socket once its target exists is taken for a pty until
the next rescan after it resolves; a directory event or a reload does that.)

Entries whose names are not console names, or that cannot be used (a directory, a fifo,
an unreadable or oversized file, a bad SOURCE), are skipped with a warning the caller logs.
Dotfiles and editor leftovers (C{*~}, C{.#*}, C{*.swp}) are ignored silently, so editing
a SOURCE file in place does not log noise.

L{ConsoleDirWatcher} tells its owner when the directory changed; the owner rescans with
L{scan_console_dir} and applies the difference.
"""

from __future__ import annotations

import os
import stat
from typing import Any, Callable, Mapping

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.filepath import FilePath

from ..console.sources import parse_source
from ..console.spec import ConsoleSpec
from .config import NAME_RULE, spec_defaults, spec_for, valid_name

#: The largest SOURCE file read; anything bigger is not one SOURCE line.
MAX_SOURCE_FILE = 4096

# inotify event bits (linux/inotify.h; the values twisted.internet.inotify defines,
# repeated here so that importing this module works where inotify does not exist).
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000

#: What changes a console entry: appearing, disappearing, a renamed entry, a SOURCE file
#: written, a re-permissioned entry; and the directory itself going away.
WATCH_MASK = (
    IN_CREATE
    | IN_DELETE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CLOSE_WRITE
    | IN_ATTRIB
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
)

#: Events meaning the watched directory is no longer what the path names.
_GONE = IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT | IN_IGNORED


def ignored_silently(name: str) -> bool:
    """
    Dotfiles and editor leftovers: C{.*} (which covers Emacs' C{.#*} locks and Vim's
    C{.NAME.swp}), C{*~} backups, C{*.swp}.
    """
    return name.startswith(".") or name.endswith("~") or name.endswith(".swp")


def scan_console_dir(
    path: str, defaults: Mapping[str, Any]
) -> tuple[list[ConsoleSpec], list[str]]:
    """
    The consoles a directory names now, sorted by name, and why entries were skipped.

    Each spec has origin C{"directory"}, the entry's name as name and title, and the
    server-wide C{defaults} (as L{cloud_console.fleet.config.spec_defaults} reads them: sizes,
    read-only, raw, log-dir). A directory that cannot be listed gives no consoles and a
    warning. Entries vanishing during the scan are left out silently (the change that
    removed them brings another rescan).
    """
    directory = os.path.abspath(path)
    try:
        names = sorted(os.listdir(directory))
    except OSError as e:
        return [], [f"console directory {path}: cannot list it: {e.strerror or e}"]
    specs: list[ConsoleSpec] = []
    warnings: list[str] = []
    for name in names:
        found = _entry(directory, name, defaults)
        if isinstance(found, ConsoleSpec):
            specs.append(found)
        elif found is not None:
            warnings.append(found)
    return specs, warnings


def _entry(directory: str, name: str, defaults: Mapping[str, Any]) -> ConsoleSpec | str | None:
    """
    One entry as a spec, a warning, or C{None} to skip it without a word.
    """
    if ignored_silently(name):
        return None
    entry = os.path.join(directory, name)
    if not valid_name(name):
        return f"{entry}: ignored: {name!r} is not a console name; {NAME_RULE}"
    try:
        mode = os.lstat(entry).st_mode
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"{entry}: ignored: {e.strerror or e}"
    what = "entry"
    if stat.S_ISLNK(mode):
        what = "symlink target"
        try:
            mode = os.stat(entry).st_mode
        except FileNotFoundError:
            # Dangling: its target (a VMM's pty link) may appear later.
            return _spec(name, f"pty:{entry}", defaults)
        except OSError as e:
            return f"{entry}: ignored: cannot follow the symlink: {e.strerror or e}"
    if stat.S_ISCHR(mode):
        return _spec(name, f"pty:{entry}", defaults)
    if stat.S_ISSOCK(mode):
        return _spec(name, f"unix:{entry}", defaults)
    if stat.S_ISREG(mode):
        return _source_file(entry, name, defaults)
    kind = (
        "a directory" if stat.S_ISDIR(mode)
        else "a fifo" if stat.S_ISFIFO(mode)
        else "a block device" if stat.S_ISBLK(mode)
        else "of an unknown type"
    )
    return (
        f"{entry}: ignored: the {what} is {kind}, not a pty, a unix socket or a file "
        "holding a SOURCE"
    )


def _source_file(entry: str, name: str, defaults: Mapping[str, Any]) -> ConsoleSpec | str | None:
    """
    A small regular file holding one SOURCE line.
    """
    try:
        with open(entry, "rb") as f:
            data = f.read(MAX_SOURCE_FILE + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"{entry}: ignored: cannot read it: {e.strerror or e}"
    if len(data) > MAX_SOURCE_FILE:
        return (
            f"{entry}: ignored: more than {MAX_SOURCE_FILE} bytes, so not a file holding "
            "one SOURCE line"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return f"{entry}: ignored: not UTF-8 text, so not a SOURCE line"
    lines = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    if not lines:
        return f"{entry}: ignored: the file holds no SOURCE line (only blank lines or comments)"
    if len(lines) > 1:
        return f"{entry}: ignored: the file holds {len(lines)} lines; one SOURCE line expected"
    try:
        source = parse_source(lines[0])
    except ValueError as e:
        return f"{entry}: ignored: {e}"
    target = _source_path(source)
    if target is not None and not os.path.isabs(target):
        return (
            f"{entry}: ignored: the SOURCE {lines[0]!r} has a relative path; give an "
            "absolute one"
        )
    return _spec(name, lines[0], defaults)


def _source_path(source: Any) -> str | None:
    """
    The path a source names (pty, socket, API or QMP socket), whichever kind it is.
    """
    for attribute in ("path", "api_socket", "qmp_socket"):
        value = getattr(source, attribute, None)
        if isinstance(value, str):
            return value
    return None


def _spec(name: str, source_text: str, defaults: Mapping[str, Any]) -> ConsoleSpec | str:
    """
    The spec for a usable entry, or a warning if spec_for still refuses it.
    """
    try:
        return spec_for(name, source_text, "directory", **spec_defaults(defaults, name))
    except ValueError as e:
        return f"{source_text}: ignored: {e}"


def _fingerprint(path: str) -> frozenset[tuple[Any, ...]] | None:
    """
    What the fallback rescan compares: each entry's name and lstat identity, or C{None}
    while the directory cannot be listed.
    """
    try:
        scanner = os.scandir(path)
    except OSError:
        return None
    items = []
    with scanner:
        for entry in scanner:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            items.append(
                (entry.name, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            )
    return frozenset(items)


def _real_inotify(reactor: Any) -> Any:
    """
    Twisted's inotify reader (Linux only: elsewhere the import fails).
    """
    from twisted.internet.inotify import INotify

    return INotify(reactor)


class ConsoleDirWatcher(Service):
    """
    Call C{on_change()} soon after the entries of a directory change.

    With inotify (C{twisted.internet.inotify}) nothing runs while the directory is
    quiet: no timer at all, so a host with a thousand idle consoles costs no CPU here.
    A burst of events (a script creating a thousand links) gives one call: the call
    waits until events stop for C{settle} seconds, but never more than C{max_wait}
    after the first, so a change is reported within C{max_wait + settle} (1.2 s by
    default; the spec allows 2 s).

    Without inotify (not Linux, out of inotify instances or watches), the directory is
    listed every C{interval} seconds and C{on_change()} called when an entry's name or
    lstat changed. The same polling waits for the directory while it does not exist
    (at start, or after it was deleted or moved away), then goes back to inotify; the
    directory appearing or going away is a change too.

    The watcher does not diff specs: the owner rescans on each call. Start it before
    the owner's first scan so that nothing changed in between is missed (an extra call
    is harmless). C{on_change} exceptions are logged, and the watching goes on.
    """

    _log = Logger()

    def __init__(
        self,
        path: str,
        on_change: Callable[[], None],
        reactor: IReactorTime,
        *,
        interval: float = 2.0,
        settle: float = 0.2,
        max_wait: float = 1.0,
        inotify_factory: Callable[[Any], Any] = _real_inotify,
    ) -> None:
        self.path = path
        self._on_change = on_change
        self._reactor = reactor
        self._interval = interval
        self._settle = settle
        self._max_wait = max_wait
        self._inotify_factory = inotify_factory
        self._notifier: Any = None
        self._try_inotify = True
        self._poller: LoopingCall | None = None
        self._fingerprint: frozenset[tuple[Any, ...]] | None = None
        self._pending: IDelayedCall | None = None
        self._burst_start = 0.0
        self._gone_scheduled = False

    @property
    def mode(self) -> str:
        """
        C{"inotify"}, C{"polling"} or C{"stopped"}: for tests and logs.
        """
        if self._notifier is not None:
            return "inotify"
        if self._poller is not None:
            return "polling"
        return "stopped"

    def startService(self) -> None:
        """
        Watch with inotify if possible, else poll (and say why).
        """
        super().startService()
        self._try_inotify = True
        self._fingerprint = _fingerprint(self.path)
        if os.path.isdir(self.path):
            if self._start_inotify():
                return
        else:
            self._log.warn(
                "console directory {path} does not exist or is not a directory; "
                "checking every {interval} s until it is",
                path=self.path,
                interval=self._interval,
            )
        self._start_polling()

    def stopService(self) -> None:
        """
        Stop watching; no call comes after this.
        """
        super().stopService()
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        self._stop_polling()
        self._close_notifier()

    def _start_inotify(self) -> bool:
        """
        Watch the directory with inotify; C{False} (polling to be used) if that fails.
        """
        try:
            notifier = self._inotify_factory(self._reactor)
        except Exception as e:
            self._inotify_failed(e)
            return False
        try:
            notifier.startReading()
            notifier.watch(FilePath(self.path), mask=WATCH_MASK, callbacks=[self._event])
        except Exception as e:
            notifier.loseConnection()
            if os.path.isdir(self.path):
                self._inotify_failed(e)
            return False
        self._notifier = notifier
        self._gone_scheduled = False
        self._log.info("watching console directory {path} with inotify", path=self.path)
        return True

    def _inotify_failed(self, error: Exception) -> None:
        """
        Log why inotify cannot be used; poll from now on.
        """
        self._try_inotify = False
        self._log.warn(
            "cannot watch console directory {path} with inotify ({reason}); "
            "rescanning it every {interval} s instead",
            path=self.path,
            reason=str(error) or type(error).__name__,
            interval=self._interval,
        )

    def _close_notifier(self) -> None:
        """
        Close the inotify descriptor, if one is open.
        """
        notifier, self._notifier = self._notifier, None
        if notifier is not None and notifier.connected:
            notifier.loseConnection()

    def _start_polling(self) -> None:
        """
        List the directory every C{interval} seconds.
        """
        if self._poller is None:
            self._poller = LoopingCall(self._poll)
            self._poller.clock = self._reactor
            self._poller.start(self._interval, now=False)

    def _stop_polling(self) -> None:
        """
        Stop the periodic listing.
        """
        poller, self._poller = self._poller, None
        if poller is not None and poller.running:
            poller.stop()

    def _poll(self) -> None:
        """
        One rescan: back to inotify if the directory is back, else compare listings.
        """
        fingerprint = _fingerprint(self.path)
        if self._try_inotify and fingerprint is not None and os.path.isdir(self.path):
            if self._start_inotify():
                self._stop_polling()
                self._fingerprint = fingerprint
                self._changed()
                return
        if fingerprint != self._fingerprint:
            self._fingerprint = fingerprint
            self._changed()

    def _event(self, ignored: object, filepath: FilePath[bytes], mask: int) -> None:
        """
        An inotify event on the directory or one of its entries.
        """
        if mask & _GONE and not self._gone_scheduled:
            # Twisted's reader closes itself after this callback on IN_DELETE_SELF:
            # leave it be until it has, then decide what to do.
            self._gone_scheduled = True
            self._reactor.callLater(0, self._directory_gone)
        self._changed()

    def _directory_gone(self) -> None:
        """
        The directory was deleted, moved away or unmounted: wait for it to be back.
        """
        self._close_notifier()
        if not self.running:
            return
        self._log.warn(
            "console directory {path} went away; checking every {interval} s for it",
            path=self.path,
            interval=self._interval,
        )
        self._fingerprint = None
        self._start_polling()

    def _changed(self) -> None:
        """
        Coalesce: one call once events settle, at most C{max_wait} after the first.
        """
        now = self._reactor.seconds()
        if self._pending is None or not self._pending.active():
            self._burst_start = now
            self._pending = self._reactor.callLater(self._settle, self._fire)
            return
        when = min(now + self._settle, self._burst_start + self._max_wait)
        self._pending.reset(max(0.0, when - now))

    def _fire(self) -> None:
        """
        Tell the owner.
        """
        self._pending = None
        with self._log.failuresHandled(
            "on_change for console directory {path} failed", path=self.path
        ):
            self._on_change()
