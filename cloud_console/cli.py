"""
The original's command line: C{cloud-console <path_to_pty> <bind_ip> <bind_port>
[<log_file>]} (C{path_to_pty} may be any console SOURCE).

The positional form is rewritten as options and parsed by the plugin's
L{cloud_console.tap.Options}, then built by the same
L{cloud_console.service.build_service}. Options (C{--history-size} and the rest) may be
given as well. Exit status: 0 after SIGTERM/SIGINT, 1 for a usage error, 2 when the pty
(or the log file) cannot be opened or the console goes away.
"""

from __future__ import annotations

import ipaddress
import sys
from typing import Sequence

from twisted.internet.endpoints import quoteStringArgument
from twisted.python import usage

USAGE = """\
usage: cloud-console <path_to_pty> <bind_ip> <bind_port> [<log_file>] [options]
       cloud-console --console NAME=SOURCE ... | --config FILE | --console-dir DIR [options]
       cloud-console --demo [<bind_ip> <bind_port>]

  path_to_pty  the pty slave to serve, e.g. /dev/pts/7, or any console SOURCE:
               pty:PATH, unix:PATH, telnet+unix:PATH, cloud-hypervisor:API_SOCKET,
               qmp:QMP_SOCKET[:chardev=LABEL]
  bind_ip      the address to listen on (IPv4 or IPv6), e.g. 127.0.0.1 or ::1
  bind_port    the TCP port to listen on (1-65535)
  log_file     optional: append all console output to this file
  --demo       serve a local shell on a fresh pty (default 127.0.0.1 8080), to try
               cloud-console without a VM

Options (as for `twistd cloudconsole`): --reopen, --head-size N, --history-size N,
--ping-interval S, --client-buffer N,
--ack-window N, --static-dir DIR, --title T, --no-raw, --read-only, --port ENDPOINT
(listen on more endpoints), --allow-origin ORIGIN, --max-clients N,
--password-file F, --token-file F, --link-secret F; for many consoles: --console NAME=SOURCE
(repeatable), --config FILE, --console-dir DIR, --log-dir DIR, --max-clients-total N,
--metrics-port ENDPOINT; the SSH door: --ssh-port ENDPOINT, --ssh-host-key F,
--ssh-authorized-keys F, --ssh-user-ca F. `cloud-console --help` lists them all.
"""

EXIT_USAGE = 1


class CommandLineError(Exception):
    """A usage error in the positional arguments."""


def _options_with_values() -> set[str]:
    """
    Every option that takes a value, read from the plugin's options (so that a new one
    is never taken for a positional argument here): its parameters and its C{opt_}
    methods that take an argument (--console, --port, --ssh-port, ...).
    """
    import inspect

    from .tap import Options

    names = {"--" + parameter[0] for parameter in Options.optParameters}
    for attribute in dir(Options):
        if attribute.startswith("opt_"):
            method = getattr(Options, attribute)
            if len(inspect.signature(method).parameters) == 2:
                names.add("--" + attribute[4:].replace("_", "-"))
    return names


def positional_to_options(argv: Sequence[str]) -> list[str]:
    """
    Rewrite C{PTY IP PORT [LOG]} (options may be mixed in) as the plugin's options.

    @raise CommandLineError: missing or extra arguments, a bad address or port.
    """
    positional: list[str] = []
    options: list[str] = []
    takes_value = _options_with_values()
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--":
            positional.extend(args)
            break
        if arg.startswith("--"):
            options.append(arg)
            if arg in takes_value:
                if not args:
                    raise CommandLineError(f"{arg} needs a value")
                options.append(args.pop(0))
        else:
            positional.append(arg)
    if not positional and any(
        option in options for option in ("--console", "--pty", "--config", "--console-dir")
    ):
        return options  # the option form: cloud-console --console vm1=SOURCE --port ...
    if len(positional) < 3:
        raise CommandLineError("missing arguments")
    if len(positional) > 4:
        raise CommandLineError(f"too many arguments: {' '.join(positional[4:])}")
    pty, ip, port = positional[:3]
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        raise CommandLineError(f"invalid bind_ip {ip!r}: not an IPv4 or IPv6 address")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise CommandLineError(f"invalid bind_port {port!r}: must be a number from 1 to 65535")
    endpoint = f"tcp:port={int(port)}:interface={quoteStringArgument(str(address))}"
    rewritten = ["--console", pty, "--port", endpoint]
    if len(positional) == 4:
        rewritten += ["--log-file", positional[3]]
    return rewritten + options


def main(argv: Sequence[str] | None = None) -> int:
    """Run the console until it is stopped or goes away; return the exit status."""
    from .tap import Options

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE + "\n" + str(Options()))
        return 0
    demo = "--demo" in args
    if demo:
        args.remove("--demo")
        from twisted.internet import reactor

        from .demo import start_demo_console

        if not [a for a in args if not a.startswith("--")]:
            args += ["127.0.0.1", "8080"]
        if "--title" not in args:
            args += ["--title", "cloud-console demo"]
        args.insert(0, start_demo_console(reactor))
    try:
        option_argv = positional_to_options(args)
        options = Options()
        options.parseOptions(option_argv)
    except (CommandLineError, usage.UsageError) as e:
        sys.stderr.write(f"cloud-console: {e}\n\n{USAGE}")
        return EXIT_USAGE
    return run(options)


def run(options: usage.Options) -> int:
    """Build the service with the global reactor, log to stderr, run it."""
    from twisted.internet import reactor
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    from .service import EXIT_CONSOLE_FAILED, StartupError, build_service

    levels = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
    observer = FilteringLogObserver(textFileLogObserver(sys.stderr), [levels])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    try:
        console = build_service(options, reactor)
    except StartupError as e:
        sys.stderr.write(f"cloud-console: {e}\n")
        return EXIT_CONSOLE_FAILED
    failed: list[BaseException] = []

    def start() -> None:
        try:
            console.startService()
        except Exception as e:  # a port that cannot be bound, for one
            failed.append(e)
            sys.stderr.write(f"cloud-console: cannot start: {e}\n")
            reactor.stop()

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", console.stopService)
    reactor.run()
    if failed:
        return EXIT_CONSOLE_FAILED
    return console.exit_status


if __name__ == "__main__":
    sys.exit(main())
