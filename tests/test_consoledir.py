"""
Tests for L{cloud_console.fleet.consoledir}: scanning a real directory (a real pty behind a
symlink, a real bound unix socket, SOURCE files, bad and ignored names), and the watcher
against a real directory: real inotify on the real reactor, real inotify driven by hand
on a memory reactor, and the rescan fallback on a clock.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cloud_console.fleet import consoledir
from cloud_console.fleet.consoledir import MAX_SOURCE_FILE, ConsoleDirWatcher, scan_console_dir
from cloud_console.console.sources import PtySource, QmpSource, UnixSource


def _short_tempdir(case: SynchronousTestCase) -> str:
    """
    A fresh directory under /tmp with a short path (unix socket paths are limited to
    about 107 bytes), removed after the test.
    """
    path = tempfile.mkdtemp(prefix="ccdir", dir="/tmp")
    case.addCleanup(shutil.rmtree, path, True)
    return path


def _write(path: str, data: str | bytes) -> None:
    """
    Write a file whole.
    """
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def _pty(case: SynchronousTestCase) -> str:
    """
    A real pty pair, closed after the test; the slave's path.
    """
    master, slave = os.openpty()
    case.addCleanup(os.close, master)
    case.addCleanup(os.close, slave)
    return os.ttyname(slave)


def _bound_socket(case: SynchronousTestCase, path: str) -> None:
    """
    A real unix stream socket listening at C{path}.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    case.addCleanup(sock.close)
    sock.bind(path)
    sock.listen(1)


class ScanTests(SynchronousTestCase):
    """
    L{scan_console_dir} on a real directory.
    """

    def setUp(self) -> None:
        self.dir = _short_tempdir(self)

    def scan(
        self, defaults: dict[str, Any] | None = None
    ) -> tuple[dict[str | None, Any], list[str]]:
        """
        Scan; specs by name, and the warnings.
        """
        specs, warnings = scan_console_dir(self.dir, defaults or {})
        self.assertEqual([s.name for s in specs], sorted(s.name for s in specs))
        return {s.name: s for s in specs}, warnings

    def test_pty_symlink(self) -> None:
        """
        A symlink to a real pty is a pty: console of the entry itself (re-resolved at
        each open), reopened after hang-ups, named and titled after the entry.
        """
        tty = _pty(self)
        os.symlink(tty, os.path.join(self.dir, "vm1"))
        specs, warnings = self.scan()
        self.assertEqual(warnings, [])
        entry = os.path.join(self.dir, "vm1")
        spec = specs["vm1"]
        self.assertEqual(spec.source, PtySource(f"pty:{entry}", entry))
        self.assertEqual(os.path.realpath(spec.source.resolve().path), os.path.realpath(tty))
        self.assertEqual(
            (spec.title, spec.origin, spec.reopen, spec.history_size),
            ("vm1", "directory", True, 80_000),
        )

    def test_unix_socket(self) -> None:
        """
        A bound unix socket is a unix: console of its path.
        """
        entry = os.path.join(self.dir, "web-1")
        _bound_socket(self, entry)
        specs, warnings = self.scan()
        self.assertEqual(warnings, [])
        self.assertEqual(specs["web-1"].source, UnixSource(f"unix:{entry}", entry))

    def test_source_file(self) -> None:
        """
        A small file with one SOURCE line among comments and blank lines.
        """
        _write(
            os.path.join(self.dir, "db1"),
            "# the build VM\n\n  qmp:/run/qemu/db1.qmp:chardev=serial1  \n# end\n",
        )
        specs, warnings = self.scan()
        self.assertEqual(warnings, [])
        self.assertEqual(
            specs["db1"].source,
            QmpSource("qmp:/run/qemu/db1.qmp:chardev=serial1", "/run/qemu/db1.qmp", "serial1"),
        )

    def test_numbered_pty_in_file(self) -> None:
        """
        A SOURCE file naming /dev/pts/N gives a console that is not reopened.
        """
        _write(os.path.join(self.dir, "old"), "/dev/pts/42\n")
        specs, _ = self.scan()
        self.assertFalse(specs["old"].reopen)

    def test_symlink_to_source_file(self) -> None:
        """
        A symlink to a SOURCE file is read through.
        """
        target = os.path.join(self.dir, ".vm3.source")
        _write(target, "unix:/run/vm3.sock\n")
        os.symlink(target, os.path.join(self.dir, "vm3"))
        specs, warnings = self.scan()
        self.assertEqual(warnings, [])
        self.assertEqual(list(specs), ["vm3"])
        self.assertEqual(specs["vm3"].source, UnixSource("unix:/run/vm3.sock", "/run/vm3.sock"))

    def test_dangling_symlink(self) -> None:
        """
        A symlink to nothing (yet) is a pty: console, down until its target exists.
        """
        entry = os.path.join(self.dir, "later")
        os.symlink(os.path.join(self.dir, "nothing-here"), entry)
        specs, warnings = self.scan()
        self.assertEqual(warnings, [])
        self.assertEqual(specs["later"].source, PtySource(f"pty:{entry}", entry))

    def test_bad_names(self) -> None:
        """
        Entries whose names are not console names are skipped, each with a warning
        naming it.
        """
        tty = _pty(self)
        for name in ["VM1", "has space", "_x", "a" * 65]:
            os.symlink(tty, os.path.join(self.dir, name))
        specs, warnings = self.scan()
        self.assertEqual(specs, {})
        self.assertEqual(len(warnings), 4)
        for name, warning in zip(sorted(["VM1", "has space", "_x", "a" * 65]), warnings):
            self.assertIn(f"{name!r} is not a console name", warning)
            self.assertIn("[a-z0-9][a-z0-9._-]{0,63}", warning)

    def test_ignored_silently(self) -> None:
        """
        Dotfiles and editor leftovers make neither consoles nor warnings.
        """
        for name in [".hidden", ".#vm1", "vm1~", "vm1.swp", ".vm1.swp"]:
            _write(os.path.join(self.dir, name), "/dev/pts/1\n")
        self.assertEqual(self.scan(), ({}, []))

    def test_unusable_entries(self) -> None:
        """
        Each unusable entry is skipped with a warning naming it and why.
        """
        os.mkdir(os.path.join(self.dir, "adir"))
        os.mkfifo(os.path.join(self.dir, "fifo"))
        _write(os.path.join(self.dir, "big"), "#" * MAX_SOURCE_FILE + "\n/dev/pts/1\n")
        _write(os.path.join(self.dir, "empty"), "# nothing\n\n")
        _write(os.path.join(self.dir, "two"), "/dev/pts/1\n/dev/pts/2\n")
        _write(os.path.join(self.dir, "relative"), "unix:run/vm.sock\n")
        _write(os.path.join(self.dir, "badsource"), "tpc:host:1\n")
        _write(os.path.join(self.dir, "binary"), b"\xff\xfe\n")
        _write(os.path.join(self.dir, "ok"), "/dev/pts/1\n")
        specs, warnings = self.scan()
        self.assertEqual(list(specs), ["ok"])
        expected = {
            "adir": "the entry is a directory, not a pty, a unix socket or a file",
            "badsource": "unknown console source scheme 'tpc:'",
            "big": f"more than {MAX_SOURCE_FILE} bytes",
            "binary": "not UTF-8 text",
            "empty": "holds no SOURCE line",
            "fifo": "the entry is a fifo",
            "relative": "has a relative path; give an absolute one",
            "two": "holds 2 lines; one SOURCE line expected",
        }
        self.assertEqual(len(warnings), len(expected), warnings)
        for (name, reason), warning in zip(sorted(expected.items()), warnings):
            self.assertTrue(
                warning.startswith(os.path.join(self.dir, name) + ": ignored: "), warning
            )
            self.assertIn(reason, warning)

    def test_symlink_to_directory(self) -> None:
        """
        A symlink whose target is a directory says so.
        """
        os.symlink("/", os.path.join(self.dir, "root"))
        specs, (warning,) = self.scan()
        self.assertEqual(specs, {})
        self.assertIn("the symlink target is a directory", warning)

    def test_unreadable_file(self) -> None:
        """
        A SOURCE file that cannot be read is skipped with the reason.
        """
        if os.geteuid() == 0:
            self.skipTest("root reads any file")
        path = os.path.join(self.dir, "secret")
        _write(path, "/dev/pts/1\n")
        os.chmod(path, 0)
        specs, (warning,) = self.scan()
        self.assertEqual(specs, {})
        self.assertIn("cannot read it: Permission denied", warning)

    def test_defaults(self) -> None:
        """
        Server-wide defaults apply, log-dir giving LOG_DIR/NAME.log.
        """
        _write(os.path.join(self.dir, "vm1"), "unix:/run/vm1.sock\n")
        specs, _ = self.scan(
            {"history-size": 9, "head-size": 0, "read-only": True, "raw": False,
             "log-dir": "/var/log/cc"}
        )
        spec = specs["vm1"]
        self.assertEqual(
            (spec.history_size, spec.head_size, spec.read_only, spec.raw, spec.log_file),
            (9, 0, True, False, "/var/log/cc/vm1.log"),
        )

    def test_relative_directory(self) -> None:
        """
        Entry paths are absolute even when the directory was given relative, so a
        later change of working directory does not lose them.
        """
        _bound_socket(self, os.path.join(self.dir, "s"))
        cwd = os.getcwd()
        os.chdir("/tmp")
        self.addCleanup(os.chdir, cwd)
        specs, _ = scan_console_dir(os.path.basename(self.dir), {})
        self.assertEqual(specs[0].source.text, f"unix:{self.dir}/s")

    def test_missing_directory(self) -> None:
        """
        A directory that is not there gives no consoles and a warning.
        """
        path = os.path.join(self.dir, "nope")
        self.assertEqual(
            scan_console_dir(path, {}),
            ([], [f"console directory {path}: cannot list it: No such file or directory"]),
        )


class MaskTests(SynchronousTestCase):
    """
    The inotify bits repeated in consoledir are Twisted's (the kernel's).
    """

    def test_same_values(self) -> None:
        """
        Each constant equals twisted.internet.inotify's.
        """
        from twisted.internet import inotify

        for name in ["IN_ATTRIB", "IN_CLOSE_WRITE", "IN_MOVED_FROM", "IN_MOVED_TO",
                     "IN_CREATE", "IN_DELETE", "IN_DELETE_SELF", "IN_MOVE_SELF",
                     "IN_UNMOUNT", "IN_IGNORED", "IN_ONLYDIR"]:
            self.assertEqual(getattr(consoledir, name), getattr(inotify, name), name)


def _stop(watcher: ConsoleDirWatcher) -> None:
    """
    Stop a watcher the test has not stopped itself.
    """
    if watcher.running:
        watcher.stopService()


class _Calls:
    """
    Counts on_change calls.
    """

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def _refuse_inotify(error: Exception) -> Callable[[Any], Any]:
    """
    An inotify factory that fails like an unavailable or exhausted inotify.
    """

    def factory(reactor: Any) -> Any:
        raise error

    return factory


class MemoryReactorWatcherTests(SynchronousTestCase):
    """
    The watcher on a memory reactor: real inotify read by hand, and the fallback.
    """

    def setUp(self) -> None:
        self.dir = _short_tempdir(self)
        self.clock = MemoryReactorClock()
        self.calls = _Calls()

    def watcher(self, path: str | None = None, **kwargs: Any) -> ConsoleDirWatcher:
        """
        A started watcher, stopped after the test.
        """
        watcher = ConsoleDirWatcher(path or self.dir, self.calls, self.clock, **kwargs)
        watcher.startService()
        self.addCleanup(_stop, watcher)
        return watcher

    def read_events(self) -> None:
        """
        What the reactor would do when the inotify descriptor is readable.
        """
        (reader,) = self.clock.getReaders()
        reader.doRead()

    def test_no_timer_while_idle(self) -> None:
        """
        With inotify, a quiet directory has no timer and one reader.
        """
        watcher = self.watcher()
        self.assertEqual(watcher.mode, "inotify")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.clock.getReaders()), 1)

    def test_burst_coalesced(self) -> None:
        """
        A burst of real events gives one call, once they settle.
        """
        self.watcher(settle=0.25, max_wait=1.0)
        for i in range(50):
            _write(os.path.join(self.dir, f"vm{i}"), "/dev/pts/1\n")
        self.read_events()
        self.clock.advance(0.125)
        self.assertEqual(self.calls.count, 0)
        self.clock.advance(0.125)
        self.assertEqual(self.calls.count, 1)
        self.clock.advance(10)
        self.assertEqual(self.calls.count, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_long_burst_bounded(self) -> None:
        """
        Events that keep coming delay the call, but never past max_wait after the first.
        """
        # Binary-exact times: events every 0.125 s from 0 to 0.875, each pushing the
        # call to 0.25 s later; without the bound it would come at 1.125 s.
        self.watcher(settle=0.25, max_wait=1.0)
        for i in range(8):
            self.assertEqual(self.calls.count, 0)
            os.symlink("/dev/null", os.path.join(self.dir, f"vm{i}"))
            self.read_events()
            self.clock.advance(0.125)
        self.assertEqual(self.clock.seconds(), 1.0)
        self.assertEqual(self.calls.count, 1)

    def test_each_kind_of_event(self) -> None:
        """
        Create, rewrite, chmod, rename and delete each bring a call.
        """
        entry = os.path.join(self.dir, "vm1")
        self.watcher()
        actions: list[Callable[[], None]] = [
            lambda: _write(entry, "/dev/pts/1\n"),
            lambda: _write(entry, "/dev/pts/2\n"),
            lambda: os.chmod(entry, 0o600),
            lambda: os.rename(entry, entry + "x"),
            lambda: os.unlink(entry + "x"),
        ]
        for number, action in enumerate(actions, start=1):
            action()
            self.read_events()
            self.clock.advance(1)
            self.assertEqual(self.calls.count, number)

    def test_fallback_when_unavailable(self) -> None:
        """
        Without inotify, the directory is rescanned every 2 s and a change reported;
        the log says why.
        """
        with capturedLogs() as events:
            watcher = self.watcher(inotify_factory=_refuse_inotify(ImportError("no inotify")))
        self.assertEqual(watcher.mode, "polling")
        (event,) = [e for e in events if "reason" in e]
        self.assertEqual((event["reason"], event["interval"]), ("no inotify", 2.0))
        self.clock.advance(2)
        self.clock.advance(1)
        self.assertEqual(self.calls.count, 0)
        _write(os.path.join(self.dir, "vm1"), "/dev/pts/1\n")
        self.clock.advance(1.0)
        self.assertEqual(self.calls.count, 0)
        self.clock.advance(1.0)
        self.clock.advance(0.5)
        self.assertEqual(self.calls.count, 1)
        for _ in range(5):
            self.clock.advance(2)
        self.assertEqual(self.calls.count, 1)
        os.unlink(os.path.join(self.dir, "vm1"))
        self.clock.advance(2)
        self.clock.advance(0.5)
        self.assertEqual(self.calls.count, 2)

    def test_fallback_sees_rewrite(self) -> None:
        """
        The rescan notices a SOURCE file rewritten in place, and a re-pointed symlink.
        """
        entry = os.path.join(self.dir, "vm1")
        link = os.path.join(self.dir, "vm2")
        _write(entry, "/dev/pts/1\n")
        os.symlink("/dev/null", link)
        self.watcher(inotify_factory=_refuse_inotify(OSError("too many instances")))
        _write(entry, "/dev/pts/12\n")
        self.clock.advance(2)
        self.clock.advance(0.5)
        self.assertEqual(self.calls.count, 1)
        os.unlink(link)
        os.symlink("/dev/zero", link)
        self.clock.advance(2)
        self.clock.advance(0.5)
        self.assertEqual(self.calls.count, 2)

    def test_fallback_does_not_retry_inotify(self) -> None:
        """
        Once inotify failed, the watcher keeps polling rather than retrying it.
        """
        attempts = []

        def factory(reactor: Any) -> Any:
            attempts.append(reactor)
            raise OSError("no more instances")

        watcher = self.watcher(inotify_factory=factory)
        for _ in range(5):
            self.clock.advance(2)
        self.assertEqual((len(attempts), watcher.mode), (1, "polling"))

    def test_directory_appears(self) -> None:
        """
        A directory missing at start is waited for, then watched with inotify; its
        appearing is a change.
        """
        path = os.path.join(self.dir, "later")
        with capturedLogs() as events:
            watcher = self.watcher(path)
        self.assertEqual(watcher.mode, "polling")
        self.assertTrue(any(e.get("path") == path and "does not exist" in e["log_format"]
                            for e in events))
        self.clock.advance(4)
        self.assertEqual(self.calls.count, 0)
        os.mkdir(path)
        self.clock.advance(2)
        self.assertEqual(watcher.mode, "inotify")
        self.clock.advance(0.5)
        self.assertEqual(self.calls.count, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop(self) -> None:
        """
        Stopping closes the inotify reader, and cancels a pending call.
        """
        watcher = self.watcher()
        _write(os.path.join(self.dir, "vm1"), "/dev/pts/1\n")
        self.read_events()
        watcher.stopService()
        self.assertEqual(self.clock.getReaders(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(watcher.mode, "stopped")
        self.clock.advance(5)
        self.assertEqual(self.calls.count, 0)

    def test_on_change_failure_logged(self) -> None:
        """
        An exception from on_change is logged and the watching goes on.
        """
        failures = []

        def broken() -> None:
            failures.append(1)
            raise RuntimeError("owner bug")

        watcher = ConsoleDirWatcher(self.dir, broken, self.clock)
        watcher.startService()
        self.addCleanup(watcher.stopService)
        for name in ["a", "b"]:
            _write(os.path.join(self.dir, name), "/dev/pts/1\n")
            self.read_events()
            with capturedLogs() as events:
                self.clock.advance(1)
            self.assertTrue(any("log_failure" in e for e in events))
        self.assertEqual(len(failures), 2)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)


class RealReactorWatcherTests(TestCase):
    """
    The watcher with real inotify on the real reactor, against a real directory.
    """

    timeout = 20

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.dir = _short_tempdir(self)
        self._waiting: defer.Deferred[None] | None = None
        self.calls = 0

    def on_change(self) -> None:
        """
        Count, and fire whoever waits for the next call.
        """
        self.calls += 1
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(None)

    def next_change(self) -> defer.Deferred[None]:
        """
        A Deferred fired by the next on_change; ask for it before making the change.
        """
        self._waiting = defer.Deferred()
        return self._waiting

    def watcher(self, path: str | None = None, **kwargs: Any) -> ConsoleDirWatcher:
        """
        A started watcher on the real reactor, stopped after the test.
        """
        watcher = ConsoleDirWatcher(path or self.dir, self.on_change, self.reactor, **kwargs)
        watcher.startService()
        self.addCleanup(_stop, watcher)
        return watcher

    async def test_create_delete_rename(self) -> None:
        """
        An entry appearing, renamed and deleted: each is reported, and a rescan sees it.
        """
        tty = _pty(self)
        watcher = self.watcher()
        self.assertEqual(watcher.mode, "inotify")
        entry = os.path.join(self.dir, "vm1")

        changed = self.next_change()
        os.symlink(tty, entry)
        await changed
        self.assertEqual([s.name for s in scan_console_dir(self.dir, {})[0]], ["vm1"])

        changed = self.next_change()
        os.rename(entry, os.path.join(self.dir, "vm2"))
        await changed
        self.assertEqual([s.name for s in scan_console_dir(self.dir, {})[0]], ["vm2"])

        changed = self.next_change()
        os.unlink(os.path.join(self.dir, "vm2"))
        await changed
        self.assertEqual(scan_console_dir(self.dir, {})[0], [])

    async def test_socket_and_source_file(self) -> None:
        """
        A socket bound in the directory and a SOURCE file written are reported.
        """
        self.watcher()
        changed = self.next_change()
        _bound_socket(self, os.path.join(self.dir, "s1"))
        await changed
        changed = self.next_change()
        _write(os.path.join(self.dir, "f1"), "unix:/run/f1.sock\n")
        await changed
        self.assertEqual([s.name for s in scan_console_dir(self.dir, {})[0]], ["f1", "s1"])

    async def test_moved_in_from_outside(self) -> None:
        """
        An entry moved in from another directory (an atomic install) is reported.
        """
        self.watcher()
        outside = _short_tempdir(self)
        staged = os.path.join(outside, "vm9")
        _write(staged, "/dev/pts/3\n")
        changed = self.next_change()
        os.rename(staged, os.path.join(self.dir, "vm9"))
        await changed
        self.assertEqual([s.name for s in scan_console_dir(self.dir, {})[0]], ["vm9"])

    async def test_directory_deleted_and_back(self) -> None:
        """
        The directory deleted: reported, then polled for; back: reported and watched
        with inotify again, entries included.
        """
        path = os.path.join(self.dir, "consoles")
        os.mkdir(path)
        watcher = self.watcher(path, interval=0.05)
        changed = self.next_change()
        os.rmdir(path)
        await changed
        self.assertEqual(watcher.mode, "polling")

        os.mkdir(path + ".new")
        _write(os.path.join(path + ".new", "vm1"), "/dev/pts/1\n")
        changed = self.next_change()
        os.rename(path + ".new", path)
        await changed
        self.assertEqual(watcher.mode, "inotify")
        self.assertEqual([s.name for s in scan_console_dir(path, {})[0]], ["vm1"])

        changed = self.next_change()
        os.unlink(os.path.join(path, "vm1"))
        await changed

    async def test_directory_moved_away(self) -> None:
        """
        The directory renamed away is the directory gone: polled for until one is back.
        """
        path = os.path.join(self.dir, "consoles")
        os.mkdir(path)
        watcher = self.watcher(path, interval=0.05)
        changed = self.next_change()
        os.rename(path, path + ".old")
        await changed
        self.assertEqual(watcher.mode, "polling")
        changed = self.next_change()
        os.mkdir(path)
        await changed
        self.assertEqual(watcher.mode, "inotify")

    async def test_directory_created_later(self) -> None:
        """
        A directory missing at start is picked up when it is created.
        """
        path = os.path.join(self.dir, "later")
        watcher = self.watcher(path, interval=0.05)
        self.assertEqual(watcher.mode, "polling")
        changed = self.next_change()
        os.mkdir(path)
        await changed
        self.assertEqual(watcher.mode, "inotify")
        changed = self.next_change()
        os.symlink("/dev/null", os.path.join(path, "x"))
        await changed
