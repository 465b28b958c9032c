"""
Tests for L{cloud_console.fleet.config}: C{--console NAME=SOURCE}, L{spec_for}'s defaults and
refusals, and C{--config} TOML files (every key, every mistake with its line and key).
"""

from __future__ import annotations

import os
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from cloud_console.console.spec import ConsoleSpec
from cloud_console.fleet.config import (
    NAME_PATTERN,
    ConfigError,
    load_config,
    spec_defaults,
    spec_for,
    split_console_option,
    valid_name,
)
from cloud_console.console.sources import PtySource, QmpSource, UnixSource, parse_source


class NameTests(SynchronousTestCase):
    """
    The console name pattern.
    """

    def test_accepted(self) -> None:
        """
        Lowercase letters, digits, '.', '_', '-' after a letter or digit, up to 64.
        """
        for name in ["vm1", "0", "web-1", "db_2.prod", "a" * 64, "9-x.y_z"]:
            self.assertTrue(valid_name(name), name)

    def test_refused(self) -> None:
        """
        Uppercase, a leading separator, other characters, 65 characters, empty.
        """
        for name in ["", "VM1", "-vm", ".vm", "_vm", "vm 1", "vm/1", "vm:1", "a" * 65, "vé"]:
            self.assertFalse(valid_name(name), name)

    def test_pattern_is_the_spec(self) -> None:
        """
        The pattern is the one the spec gives, for the lead's import.
        """
        self.assertEqual(NAME_PATTERN.pattern, r"[a-z0-9][a-z0-9._-]{0,63}")


class SplitTests(SynchronousTestCase):
    """
    L{split_console_option}: NAME=SOURCE only when the part before the first '=' is a name.
    """

    def test_named(self) -> None:
        """
        NAME=SOURCE splits at the first '=', the rest (with its own '=') is the SOURCE.
        """
        self.assertEqual(
            split_console_option("vm1=qmp:/run/vm1.qmp:chardev=serial1"),
            ("vm1", "qmp:/run/vm1.qmp:chardev=serial1"),
        )
        self.assertEqual(split_console_option("web-1=/dev/pts/3"), ("web-1", "/dev/pts/3"))
        self.assertEqual(split_console_option("a=b=c"), ("a", "b=c"))

    def test_bare(self) -> None:
        """
        No '=', or what precedes it is not a name: the whole value is the SOURCE.
        """
        for value in [
            "qmp:/run/vm.qmp:chardev=serial1",
            "/dev/pts/3",
            "pty:/run/x=y",
            "/run/a=b",
            "VM1=/dev/pts/3",
            "=/dev/pts/3",
            "unix:/run/vm.sock",
            ("a" * 65) + "=/dev/pts/1",
        ]:
            self.assertEqual(split_console_option(value), (None, value), value)

    def test_empty_source(self) -> None:
        """
        NAME= with nothing after it is an error naming the option and the name.
        """
        with self.assertRaises(ValueError) as caught:
            split_console_option("vm1=")
        self.assertIn("'vm1='", str(caught.exception))
        self.assertIn("no SOURCE after vm1=", str(caught.exception))


class SpecForTests(SynchronousTestCase):
    """
    L{spec_for}: defaults, overrides and refusals.
    """

    def test_named_defaults(self) -> None:
        """
        A named console: title is the name, reopen follows the source, the rest as
        ConsoleSpec says.
        """
        spec = spec_for("vm1", "qmp:/run/vm1.qmp", "command line")
        self.assertEqual(
            spec,
            ConsoleSpec(
                name="vm1",
                source=QmpSource("qmp:/run/vm1.qmp", "/run/vm1.qmp"),
                title="vm1",
                log_file=None,
                history_size=80_000,
                head_size=256 * 1024,
                read_only=False,
                reopen=True,
                raw=True,
                origin="command line",
            ),
        )

    def test_bare_numbered_pty_named(self) -> None:
        """
        A named /dev/pts/N is not reopened (its number may be reused) by default.
        """
        spec = spec_for("vm1", "/dev/pts/7", "config")
        self.assertFalse(spec.reopen)
        self.assertTrue(spec_for("vm1", "pty:/run/vm1.console", "config").reopen)

    def test_unnamed(self) -> None:
        """
        The single console: title is the SOURCE text, reopen off (today's --reopen default).
        """
        spec = spec_for(None, "unix:/run/vm.sock", "command line")
        self.assertIsNone(spec.name)
        self.assertEqual(spec.title, "unix:/run/vm.sock")
        self.assertFalse(spec.reopen)
        self.assertEqual(spec.source, UnixSource("unix:/run/vm.sock", "/run/vm.sock"))

    def test_overrides(self) -> None:
        """
        Every field can be given.
        """
        spec = spec_for(
            "vm1",
            "/dev/pts/2",
            "config",
            title="T",
            log_file="/var/log/x",
            history_size=5,
            head_size=0,
            read_only=True,
            reopen=False,
            raw=False,
        )
        self.assertEqual(
            (spec.title, spec.log_file, spec.history_size, spec.head_size, spec.read_only,
             spec.reopen, spec.raw, spec.origin),
            ("T", "/var/log/x", 5, 0, True, False, False, "config"),
        )

    def test_bad_source(self) -> None:
        """
        The message is parse_source's.
        """
        with self.assertRaises(ValueError) as caught:
            spec_for("vm1", "tpc:host:1", "config")
        with self.assertRaises(ValueError) as expected:
            parse_source("tpc:host:1")
        self.assertEqual(str(caught.exception), str(expected.exception))

    def test_bad_name(self) -> None:
        """
        A name outside the pattern is refused, saying what names look like.
        """
        with self.assertRaises(ValueError) as caught:
            spec_for("Vm1", "/dev/pts/2", "config")
        self.assertIn("'Vm1'", str(caught.exception))
        self.assertIn("[a-z0-9][a-z0-9._-]{0,63}", str(caught.exception))

    def test_reopen_numbered_pty(self) -> None:
        """
        reopen=True on a literal /dev/pts/N is refused with the reason.
        """
        with self.assertRaises(ValueError) as caught:
            spec_for("vm1", "/dev/pts/2", "config", reopen=True)
        self.assertIn("may belong to another VM", str(caught.exception))

    def test_frozen(self) -> None:
        """
        Specs are values: compared by content, not changed in place.
        """
        spec = spec_for("vm1", "/dev/pts/2", "config")
        self.assertEqual(spec, spec_for("vm1", "/dev/pts/2", "config"))
        with self.assertRaises(AttributeError):
            spec.title = "x"  # type: ignore[misc]


class SpecDefaultsTests(SynchronousTestCase):
    """
    L{spec_defaults}: the server-wide defaults as spec fields.
    """

    def test_all(self) -> None:
        """
        Sizes, read-only, raw, and log-dir as DIR/NAME.log.
        """
        self.assertEqual(
            spec_defaults(
                {"history-size": 10, "head-size": 0, "read-only": True, "raw": False,
                 "log-dir": "/var/log/cc"},
                "vm1",
            ),
            {"history_size": 10, "head_size": 0, "read_only": True, "raw": False,
             "log_file": "/var/log/cc/vm1.log"},
        )

    def test_none(self) -> None:
        """
        Missing or None defaults leave the spec's own.
        """
        self.assertEqual(spec_defaults({}, "vm1"), {})
        self.assertEqual(spec_defaults({"log-dir": None, "history-size": None}, "vm1"), {})


def _write(case: SynchronousTestCase, text: str | bytes, name: str = "consoles.toml") -> str:
    """
    Write a config file in a fresh directory and return its path.
    """
    directory = case.mktemp()
    os.mkdir(directory)
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)
    return path


class LoadTests(SynchronousTestCase):
    """
    L{load_config} on good files.
    """

    def test_every_key(self) -> None:
        """
        Every key lands in its field; origin is "config".
        """
        path = _write(
            self,
            """
            [console.vm1]
            source = "pty:/run/vm1.console"
            title = "vm1 <build>"
            log-file = "/var/log/vm1.log"
            history-size = 1000
            head-size = 0
            read-only = true
            reopen = false
            log-timestamps = 15
            """,
        )
        (spec,) = load_config(path, {})
        self.assertEqual(
            spec,
            ConsoleSpec(
                name="vm1",
                source=PtySource("pty:/run/vm1.console", "/run/vm1.console"),
                title="vm1 <build>",
                log_file="/var/log/vm1.log",
                history_size=1000,
                head_size=0,
                read_only=True,
                reopen=False,
                raw=True,
                origin="config",
                log_timestamps=15,
            ),
        )

    def test_log_timestamps_checked_and_defaulted(self) -> None:
        """
        log-timestamps is minutes, 0 or more; a table without it takes the option's.
        """
        path = _write(self, '[console.vm1]\nsource = "/run/a"\nlog-timestamps = -1\n')
        error = self.assertRaises(ConfigError, load_config, path, {})
        self.assertIn("log-timestamps must be a number of minutes", str(error))
        path = _write(self, '[console.vm1]\nsource = "/run/a"\n')
        (spec,) = load_config(path, {"log-timestamps": 2.5})
        self.assertEqual(spec.log_timestamps, 2.5)

    def test_defaults(self) -> None:
        """
        What a table leaves out comes from the server-wide defaults, then ConsoleSpec's.
        """
        path = _write(
            self,
            '[console.vm1]\nsource = "qmp:/run/vm1.qmp"\n'
            '[console.vm2]\nsource = "/dev/pts/9"\nhistory-size = 7\n',
        )
        vm1, vm2 = load_config(
            path, {"history-size": 500, "head-size": 100, "read-only": True, "raw": False,
                   "log-dir": None},
        )
        self.assertEqual(
            (vm1.name, vm1.title, vm1.history_size, vm1.head_size, vm1.read_only, vm1.raw,
             vm1.reopen, vm1.log_file),
            ("vm1", "vm1", 500, 100, True, False, True, None),
        )
        self.assertEqual((vm2.name, vm2.history_size, vm2.reopen), ("vm2", 7, False))

    def test_order_and_forms(self) -> None:
        """
        Consoles come in the file's order, whatever TOML form defines them.
        """
        path = _write(
            self,
            '[console]\nzz.source = "unix:/run/zz.sock"\n'
            'aa = { source = "/dev/pts/1" }\n'
            '[console."m-1"]\nsource = "/dev/pts/2"\n',
        )
        self.assertEqual([s.name for s in load_config(path, {})], ["zz", "aa", "m-1"])

    def test_log_dir(self) -> None:
        """
        log-dir gives LOG_DIR/NAME.log; a console's log-file wins.
        """
        path = _write(
            self,
            '[console.vm1]\nsource = "/dev/pts/1"\n'
            '[console.vm2]\nsource = "/dev/pts/2"\nlog-file = "/srv/vm2.out"\n',
        )
        vm1, vm2 = load_config(path, {"log-dir": "/var/log/cc"})
        self.assertEqual(vm1.log_file, "/var/log/cc/vm1.log")
        self.assertEqual(vm2.log_file, "/srv/vm2.out")

    def test_empty(self) -> None:
        """
        A file with no consoles is valid (every config console was removed).
        """
        self.assertEqual(load_config(_write(self, "# nothing yet\n"), {}), [])


class LoadErrorTests(SynchronousTestCase):
    """
    L{load_config} on bad files: a ConfigError naming file, line and key.
    """

    def error(self, text: str | bytes, defaults: dict[str, Any] | None = None) -> tuple[str, str]:
        """
        Load C{text} expecting a ConfigError; return its message and the file path.
        """
        path = _write(self, text)
        with self.assertRaises(ConfigError) as caught:
            load_config(path, defaults or {})
        return str(caught.exception), path

    def test_missing_file(self) -> None:
        """
        An unreadable file names itself and why.
        """
        path = os.path.join(self.mktemp(), "nope.toml")
        with self.assertRaises(ConfigError) as caught:
            load_config(path, {})
        self.assertEqual(
            str(caught.exception),
            f"{path}: cannot read the config file: No such file or directory",
        )

    def test_not_toml(self) -> None:
        """
        A syntax error gives the line and column tomllib reports.
        """
        message, path = self.error('[console.vm1]\nsource = "/dev/pts/1"\ntitle = \n')
        self.assertEqual(message, f"{path}:3:9: not valid TOML: Invalid value")

    def test_duplicate_table(self) -> None:
        """
        A console defined twice is a TOML error, at the second definition.
        """
        message, path = self.error(
            '[console.vm1]\nsource = "/dev/pts/1"\n\n[console.vm1]\nsource = "/dev/pts/2"\n'
        )
        self.assertTrue(message.startswith(f"{path}:4:"), message)
        self.assertIn("not valid TOML", message)

    def test_not_utf8(self) -> None:
        """
        Bytes that are not UTF-8 are refused by name.
        """
        message, path = self.error(b'[console.vm1]\nsource = "\xff"\n')
        self.assertEqual(message, f"{path}: not UTF-8 text (byte 24), so not TOML")

    def test_value_errors(self) -> None:
        """
        Each bad value: its line, the console, the key, what was expected, what was given.
        """
        message, path = self.error(
            "[console.web-1]\n"  # 1
            'source = "/dev/pts/1"\n'  # 2
            'history-size = "big"\n'  # 3
            "head-size = -1\n"  # 4
            'read-only = "yes"\n'  # 5
            "reopen = 1\n"  # 6
            "title = 3\n"  # 7
            'log-file = ""\n'  # 8
        )
        self.assertEqual(
            message.splitlines(),
            [
                f'{path}:7: [console.web-1] title must be text (not empty), not 3',
                f'{path}:8: [console.web-1] log-file must be a file path, not ""',
                f'{path}:3: [console.web-1] history-size must be a whole number above 0, '
                'not "big"',
                f"{path}:4: [console.web-1] head-size must be a whole number, 0 or more, not -1",
                f'{path}:5: [console.web-1] read-only must be true or false, not "yes"',
                f"{path}:6: [console.web-1] reopen must be true or false, not 1",
            ],
        )

    def test_size_edge_values(self) -> None:
        """
        history-size 0, a boolean or a float are refused; head-size 0 is fine.
        """
        for bad in ["0", "true", "1.5"]:
            message, path = self.error(
                f'[console.vm1]\nsource = "/dev/pts/1"\nhistory-size = {bad}\n'
            )
            self.assertEqual(
                message,
                f"{path}:3: [console.vm1] history-size must be a whole number above 0, "
                f"not {bad}",
            )

    def test_unknown_key(self) -> None:
        """
        A typo is an error with a suggestion and the known keys.
        """
        message, path = self.error(
            '[console.vm1]\nsource = "/dev/pts/1"\n# a comment\nhistroy-size = 10\n'
        )
        self.assertEqual(
            message,
            f'{path}:4: [console.vm1] unknown key "histroy-size" (did you mean '
            '"history-size"?); known keys: source, title, log-file, history-size, '
            "head-size, read-only, reopen, log-timestamps",
        )

    def test_raw_is_not_per_console(self) -> None:
        """
        raw is a server-wide option, not a console key.
        """
        message, path = self.error('[console.vm1]\nsource = "/dev/pts/1"\nraw = false\n')
        self.assertTrue(message.startswith(f'{path}:3: [console.vm1] unknown key "raw"'))

    def test_top_level_key(self) -> None:
        """
        Server-wide settings are options, and the message says so.
        """
        message, path = self.error('port = "tcp:8080"\n[console.vm1]\nsource = "/dev/pts/1"\n')
        self.assertEqual(
            message,
            f'{path}:1: unknown setting "port": a config file holds only [console.NAME] '
            "tables; server-wide settings stay command-line options (see cloud-console "
            "--help)",
        )

    def test_console_not_a_table(self) -> None:
        """
        console = VALUE is refused.
        """
        message, path = self.error('console = "vm1"\n')
        self.assertEqual(
            message, f'{path}:1: console must be tables like [console.vm1], not "vm1"'
        )

    def test_console_entry_not_a_table(self) -> None:
        """
        console.NAME = VALUE is refused.
        """
        message, path = self.error('[console]\nvm1 = "/dev/pts/1"\n')
        self.assertEqual(
            message, f"{path}:2: [console.vm1] must be a table of settings, not \"/dev/pts/1\""
        )

    def test_bad_name(self) -> None:
        """
        A name outside the pattern, quoted as written, at its header line.
        """
        message, path = self.error('\n[console."Web 1"]\nsource = "/dev/pts/1"\n')
        self.assertTrue(
            message.startswith(
                f'{path}:2: [console."Web 1"] console name "Web 1" is not allowed; names '
                "match [a-z0-9][a-z0-9._-]{0,63}"
            ),
            message,
        )

    def test_missing_source(self) -> None:
        """
        source is required; the error points at the table.
        """
        message, path = self.error('[console.vm1]\n\n[console.vm2]\ntitle = "x"\n')
        self.assertEqual(
            message.splitlines(),
            [
                f'{path}:1: [console.vm1] has no source; add source = "SOURCE"',
                f'{path}:3: [console.vm2] has no source; add source = "SOURCE"',
            ],
        )

    def test_bad_source(self) -> None:
        """
        A SOURCE parse_source refuses, with its message; a non-text source.
        """
        message, path = self.error(
            '[console.vm1]\nsource = "tpc:host:1"\n[console.vm2]\nsource = 5\n'
        )
        first, second = message.splitlines()
        self.assertTrue(
            first.startswith(
                f"{path}:2: [console.vm1] source: unknown console source scheme 'tpc:'"
            ),
            first,
        )
        self.assertEqual(second, f"{path}:4: [console.vm2] source must be text, not 5")

    def test_reopen_numbered_pty(self) -> None:
        """
        reopen = true on a literal /dev/pts/N, with the reason, at the reopen line.
        """
        message, path = self.error(
            '[console.vm1]\nsource = "/dev/pts/4"\nreopen = true\n'
        )
        self.assertTrue(
            message.startswith(
                f"{path}:3: [console.vm1] reopen with '/dev/pts/4': after a hang-up that "
                "pty number may belong to another VM"
            ),
            message,
        )

    def test_inline_table_line(self) -> None:
        """
        A mistake inside an inline table points at the line holding it.
        """
        message, path = self.error(
            '[console]\nvm1 = { source = "/dev/pts/1" }\nvm2 = { source = "/dev/pts/2", '
            "head-size = -5 }\n"
        )
        self.assertEqual(
            message,
            f"{path}:3: [console.vm2] head-size must be a whole number, 0 or more, not -5",
        )

    def test_dotted_key_line(self) -> None:
        """
        Dotted and quoted keys are found on their line.
        """
        message, path = self.error(
            'console.vm1.source = "/dev/pts/1"\n'
            'console."vm1".history-size = 0\n'
        )
        self.assertEqual(
            message,
            f"{path}:2: [console.vm1] history-size must be a whole number above 0, not 0",
        )

    def test_every_mistake_listed(self) -> None:
        """
        All mistakes are reported at once, in file order of consoles.
        """
        message, path = self.error(
            'x = 1\n[console.a]\nsource = "/dev/pts/1"\nbogus = 1\n'
            '[console.b]\nsource = "/dev/pts/2"\nread-only = 2\n'
        )
        lines = message.splitlines()
        self.assertEqual(len(lines), 3)
        self.assertEqual(
            [line.split(": ", 1)[0] for line in lines], [f"{path}:1", f"{path}:4", f"{path}:7"]
        )

    def test_error_attribute(self) -> None:
        """
        ConfigError.errors has the lines one by one.
        """
        path = _write(self, "a = 1\nb = 2\n")
        with self.assertRaises(ConfigError) as caught:
            load_config(path, {})
        self.assertEqual(len(caught.exception.errors), 2)
        self.assertEqual(str(caught.exception), "\n".join(caught.exception.errors))
