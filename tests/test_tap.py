"""
Tests for the twistd plugin's options, the shared service builder and the positional
command line's rewriting.
"""

from __future__ import annotations

import os

from twisted.application.service import IServiceMaker
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from cloud_console.cli import CommandLineError, positional_to_options
from cloud_console.console.console import Console
from cloud_console.service import ConsoleService, StartupError, build_service
from cloud_console.tap import DEFAULT_PORT, Options
from cloud_console.web.websocket import ConsoleServerFactory


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


class OptionsTests(SynchronousTestCase):
    """Every option parses, and every mistake is a UsageError an operator can act on."""

    def test_defaults(self) -> None:
        """Only --pty is required; the defaults match the documented ones."""
        options = parse("--pty", "/dev/pts/7")
        self.assertEqual(options["port"], [DEFAULT_PORT])
        self.assertEqual(options["history-size"], 80000)
        self.assertEqual(options["client-buffer"], 256 * 1024)
        self.assertEqual(options["ack-window"], 1024 * 1024)
        self.assertEqual(options["title"], "/dev/pts/7")
        self.assertFalse(options["no-raw"])
        self.assertFalse(options["read-only"])
        self.assertFalse(options["allow-control"])
        self.assertIsNone(options["log-file"])

    def test_every_option(self) -> None:
        """Each option lands where the builder reads it; --port repeats."""
        static_dir = self.mktemp()
        os.mkdir(static_dir)
        options = parse(
            "--pty", "/dev/pts/7", "--port", "tcp:8080", "--port", "unix:/tmp/cc.sock",
            "--log-file", "/var/log/c.log", "--history-size", "1000", "--client-buffer", "4096",
            "--ack-window", "9999", "--static-dir", static_dir, "--title", "vm1", "--no-raw",
            "--read-only", "--allow-control",
        )
        self.assertEqual(options["port"], ["tcp:8080", "unix:/tmp/cc.sock"])
        self.assertEqual(
            (options["history-size"], options["client-buffer"], options["ack-window"]),
            (1000, 4096, 9999),
        )
        self.assertEqual((options["log-file"], options["title"]), ("/var/log/c.log", "vm1"))
        self.assertTrue(options["no-raw"])
        self.assertTrue(options["read-only"])
        self.assertTrue(options["allow-control"])

    def test_pty_required(self) -> None:
        """Without --pty: a usage error saying so."""
        e = self.assertRaises(UsageError, parse, "--port", "tcp:8080")
        self.assertIn("--pty", str(e))

    def test_bad_numbers(self) -> None:
        """Sizes must be positive whole numbers."""
        for option in ("--history-size", "--client-buffer", "--ack-window"):
            for value in ("0", "-5", "lots", "1.5"):
                e = self.assertRaises(UsageError, parse, "--pty", "/dev/pts/1", option, value)
                self.assertIn(option, str(e))

    def test_bad_endpoint(self) -> None:
        """A --port that is not an endpoint description is refused, naming it."""
        for description in ("tcp:notaport", "carrierpigeon:7", "ssl:8443:privateKey=/nonexistent.pem"):
            e = self.assertRaises(UsageError, parse, "--pty", "/dev/pts/1", "--port", description)
            self.assertIn(description, str(e))

    def test_static_dir_must_exist(self) -> None:
        """--static-dir must be a directory."""
        e = self.assertRaises(UsageError, parse, "--pty", "/dev/pts/1", "--static-dir", "/nonexistent")
        self.assertIn("--static-dir", str(e))

    def test_read_workers(self) -> None:
        """--read-workers: auto by default, a count from 0 to 64, nothing else."""
        self.assertEqual(parse("--pty", "/dev/pts/1")["read-workers"], "auto")
        for value, count in (("0", 0), ("3", 3), ("64", 64), ("auto", "auto")):
            self.assertEqual(parse("--pty", "/dev/pts/1", "--read-workers", value)["read-workers"], count)
        for value in ("-1", "65", "two", "1.5", "Auto"):
            e = self.assertRaises(UsageError, parse, "--pty", "/dev/pts/1", "--read-workers", value)
            self.assertIn("--read-workers", str(e))
            self.assertIn(value, str(e))

    def test_state_dir(self) -> None:
        """--state-dir must be a writable directory; it is kept as given."""
        e = self.assertRaises(UsageError, parse, "--pty", "/dev/pts/1", "--state-dir", "/nonexistent")
        self.assertIn("--state-dir", str(e))
        directory = self.mktemp()
        os.mkdir(directory)
        self.assertEqual(parse("--pty", "/dev/pts/1", "--state-dir", directory)["state-dir"], directory)

    def test_plugin_found(self) -> None:
        """twistd finds the cloudconsole plugin, and it uses these options."""
        makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
        self.assertIn("cloudconsole", makers)
        self.assertIsInstance(makers["cloudconsole"].options(), Options)



class ConsoleOptionTests(SynchronousTestCase):
    """--console SOURCE, --pty, --reopen, --head-size and --ping-interval."""

    def test_systemd_port_without_a_socket(self) -> None:
        """A systemd: port with no socket passed is a usage error saying so, not a traceback."""
        for description in ("systemd:domain=INET:index=0", "systemd:domain=INET:name=web"):
            e = self.assertRaises(UsageError, parse, "--pty", "/dev/pts/7", "--port", description)
            self.assertIn("systemd passed no such socket", str(e))

    def test_console_forms(self) -> None:
        """Every SOURCE form parses into its source; the title defaults to the SOURCE."""
        for text in ("/dev/pts/7", "pty:/run/vm1.console", "unix:/run/vm1.serial",
                     "cloud-hypervisor:/run/ch.sock", "qmp:/run/vm1.qmp:chardev=serial1"):
            options = parse("--console", text)
            self.assertEqual(str(options["source"]), text)
            self.assertEqual(options["title"], text)

    def test_pty_is_a_synonym(self) -> None:
        """--pty PATH is --console pty:PATH; giving both is a mistake."""
        self.assertEqual(str(parse("--pty", "/dev/pts/7")["source"]), "/dev/pts/7")
        e = self.assertRaises(UsageError, parse, "--pty", "/dev/pts/7", "--console", "/dev/pts/8")
        self.assertIn("not both", str(e))

    def test_console_required(self) -> None:
        """Without a console the usage error says how to name one."""
        e = self.assertRaises(UsageError, parse)
        self.assertIn("--console SOURCE", str(e))

    def test_unknown_scheme(self) -> None:
        """An unknown SOURCE form is a usage error listing the accepted ones."""
        e = self.assertRaises(UsageError, parse, "--console", "tcp:localhost:4555")
        for form in ("pty:", "unix:", "cloud-hypervisor:", "qmp:"):
            self.assertIn(form, str(e))

    def test_reopen_refused_on_a_numbered_pty(self) -> None:
        """--reopen on a bare /dev/pts/N is refused, with the reason."""
        e = self.assertRaises(UsageError, parse, "--console", "/dev/pts/7", "--reopen")
        self.assertIn("another VM", str(e))
        self.assertTrue(parse("--console", "pty:/run/vm1.console", "--reopen")["reopen"])
        self.assertTrue(parse("--console", "qmp:/run/vm1.qmp", "--reopen")["reopen"])

    def test_head_size(self) -> None:
        """--head-size defaults to 256 KiB; 0 turns it off; negative is refused."""
        self.assertEqual(parse("--pty", "/dev/pts/7")["head-size"], 256 * 1024)
        self.assertEqual(parse("--pty", "/dev/pts/7", "--head-size", "0")["head-size"], 0)
        self.assertRaises(UsageError, parse, "--pty", "/dev/pts/7", "--head-size", "-1")
        self.assertRaises(UsageError, parse, "--pty", "/dev/pts/7", "--head-size", "lots")

    def test_ping_interval(self) -> None:
        """--ping-interval defaults to 30 s and must be more than 0."""
        self.assertEqual(parse("--pty", "/dev/pts/7")["ping-interval"], 30.0)
        self.assertEqual(parse("--pty", "/dev/pts/7", "--ping-interval", "0.5")["ping-interval"], 0.5)
        self.assertRaises(UsageError, parse, "--pty", "/dev/pts/7", "--ping-interval", "0")

    def test_positional_source(self) -> None:
        """The positional path_to_pty may be any SOURCE."""
        rewritten = positional_to_options(["qmp:/run/vm1.qmp", "127.0.0.1", "8080", "--reopen"])
        self.assertEqual(rewritten[:2], ["--console", "qmp:/run/vm1.qmp"])
        self.assertIn("--reopen", rewritten)

class BuildServiceTests(SynchronousTestCase):
    """build_service wires the console on any reactor."""

    def setUp(self) -> None:
        master, slave = os.openpty()
        self.addCleanup(os.close, master)
        self.addCleanup(os.close, slave)
        self.path = os.ttyname(slave)
        self.reactor = MemoryReactorClock()

    def test_listens_on_each_port(self) -> None:
        """Started, the service listens on every --port, serving the console's site."""
        options = parse("--pty", self.path, "--port", "tcp:8081:interface=127.0.0.1",
                        "--port", "tcp:8082:interface=127.0.0.1")
        console = build_service(options, self.reactor)
        self.assertIsInstance(console, ConsoleService)
        console.startService()
        self.addCleanup(console.stopService)
        ports = [(port, interface) for port, _, _, interface in self.reactor.tcpServers]
        self.assertEqual(ports, [(8081, "127.0.0.1"), (8082, "127.0.0.1")])
        site = self.reactor.tcpServers[0][1]
        self.assertIs(site, console.site)
        self.assertIsInstance(console.websocket_factory, ConsoleServerFactory)

    def test_service_order(self) -> None:
        """
        Services stop in reverse order: the ports first, then the console: its follower
        (no more reopening), its multiplexer (the clients, then the device), and its log
        sink last, so it still logs what the console says while the clients close.
        """
        console = build_service(parse("--pty", self.path, "--log-file", self.mktemp()), self.reactor)
        [console_service, *ports] = list(console)
        self.assertIsInstance(console_service, Console)
        self.assertTrue(ports)
        self.assertEqual(
            list(console_service),
            [console.log_sink, console.multiplexer, console_service.follower],
        )

    def test_reopen_waits_for_a_missing_console(self) -> None:
        """
        With --reopen, a console that is not there yet is no start-up error: the
        service starts with it down, retrying; without, it is a StartupError.
        """
        missing = os.path.join(self.mktemp(), "vm1.console")
        self.assertRaises(StartupError, build_service, parse("--console", missing), self.reactor)
        console = build_service(parse("--console", missing, "--reopen"), self.reactor)
        console.startService()
        self.addCleanup(console.stopService)
        self.assertFalse(console.multiplexer.up)
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)

    def test_head_size_reaches_the_history(self) -> None:
        """--head-size sets the history's head."""
        console = build_service(parse("--pty", self.path, "--head-size", "123"), self.reactor)
        self.assertEqual(console.multiplexer.history.head_size, 123)

    def test_log_timestamps_reach_the_log_file(self) -> None:
        """
        --log-timestamps MINUTES gives the log file its silence (in seconds); off by
        default; negative or not a number is a usage error.
        """
        log = self.mktemp()
        console = build_service(
            parse("--pty", self.path, "--log-file", log, "--log-timestamps", "1.5"), self.reactor
        )
        assert console.log_sink is not None
        self.assertEqual(console.log_sink.mark_after, 90)
        self.assertEqual(parse("--pty", self.path)["log-timestamps"], 0)
        self.assertRaises(UsageError, parse, "--pty", self.path, "--log-timestamps", "-1")
        self.assertRaises(UsageError, parse, "--pty", self.path, "--log-timestamps", "soon")

    def test_bad_pty(self) -> None:
        """A pty that cannot be opened is a StartupError naming it."""
        e = self.assertRaises(StartupError, build_service, parse("--pty", "/dev/null"), self.reactor)
        self.assertIn("/dev/null", str(e))

    def test_console_lost_sets_status_and_stops(self) -> None:
        """When the console goes away the status becomes 2 and the reactor is stopped."""
        console = build_service(parse("--pty", self.path), self.reactor)
        console.startService()
        self.reactor.running = True
        console.multiplexer.console_lost("pty hung up")
        self.assertEqual(console.exit_status, 2)
        self.reactor.advance(0)
        self.assertFalse(self.reactor.running)


class PositionalTests(SynchronousTestCase):
    """The original's positional command line, rewritten as options."""

    def test_rewrite(self) -> None:
        """PTY IP PORT LOG becomes --pty/--port/--log-file."""
        self.assertEqual(
            positional_to_options(["/dev/pts/7", "10.0.0.1", "8080", "/tmp/c.log"]),
            ["--console", "/dev/pts/7", "--port", "tcp:port=8080:interface=10.0.0.1",
             "--log-file", "/tmp/c.log"],
        )

    def test_ipv6_escaped(self) -> None:
        """An IPv6 address has its colons escaped for the endpoint description."""
        rewritten = positional_to_options(["/dev/pts/7", "::1", "8080"])
        self.assertEqual(rewritten[3], "tcp:port=8080:interface=\\:\\:1")
        options = parse(*rewritten)
        self.assertEqual(options["port"], ["tcp:port=8080:interface=\\:\\:1"])

    def test_options_mixed_in(self) -> None:
        """Options may come before, between or after the positional arguments."""
        rewritten = positional_to_options(["--history-size", "10", "/dev/pts/7", "--no-raw", "127.0.0.1", "80"])
        self.assertEqual(rewritten[:4], ["--console", "/dev/pts/7", "--port", "tcp:port=80:interface=127.0.0.1"])
        self.assertEqual(rewritten[4:], ["--history-size", "10", "--no-raw"])

    def test_errors(self) -> None:
        """Missing, extra or invalid arguments are CommandLineErrors."""
        for argv in (
            [], ["/dev/pts/1"], ["/dev/pts/1", "127.0.0.1"],
            ["/dev/pts/1", "127.0.0.1", "80", "log", "extra"],
            ["/dev/pts/1", "localhost", "80"], ["/dev/pts/1", "127.0.0.1", "65536"],
            ["/dev/pts/1", "127.0.0.1", "-1"], ["/dev/pts/1", "127.0.0.1", "80", "--title"],
        ):
            self.assertRaises(CommandLineError, positional_to_options, argv)
