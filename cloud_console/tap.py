"""
The twistd plugin's options and service: C{twistd -n cloudconsole --pty PATH ...}.

The positional command line (L{cloud_console.cli}) parses with the same L{Options} and
builds with the same L{cloud_console.service.build_service}.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.application.service import IService
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

DEFAULT_PORT = "tcp:port=8080:interface=127.0.0.1"
DEFAULT_HISTORY_SIZE = 80_000
DEFAULT_CLIENT_BUFFER = 256 * 1024
DEFAULT_ACK_WINDOW = 1024 * 1024
DEFAULT_MAX_CLIENTS = 256
DEFAULT_HEAD_SIZE = 256 * 1024
DEFAULT_PING_INTERVAL = 30.0
DEFAULT_MAX_CLIENTS_TOTAL = 4096


def _number(name: str, kind: type, unit: str, zero_allowed: bool) -> Any:
    """
    A parser for C{--name}: a finite C{kind} (int or float) above 0, or from 0 with
    C{zero_allowed}; anything else is a UsageError naming the option and the value.
    """

    def parse(value: str) -> Any:
        try:
            number = kind(value)
        except ValueError:
            raise usage.UsageError(f"--{name} must be a number of {unit}, not {value!r}")
        if not (0 <= number if zero_allowed else 0 < number) or number == float("inf"):
            bound = "0 or more" if zero_allowed else "more than 0"
            raise usage.UsageError(f"--{name} must be {bound}, not {value}")
        return number

    return parse


def _bytes(name: str, zero_allowed: bool = False) -> Any:
    return _number(name, int, "bytes (a whole number)", zero_allowed)


def _seconds(name: str, zero_allowed: bool = False) -> Any:
    return _number(name, float, "seconds", zero_allowed)


#: Most read workers a process starts (more than the cores only adds switching).
MAX_READ_WORKERS = 64


def _read_workers(value: str) -> int | str:
    """C{--read-workers}: C{auto} or a whole number from 0 to L{MAX_READ_WORKERS}."""
    if value == "auto":
        return value
    count = _number("read-workers", int, "processes (a whole number) or auto", True)(value)
    if count > MAX_READ_WORKERS:
        raise usage.UsageError(f"--read-workers must be at most {MAX_READ_WORKERS}, not {value}")
    return int(count)


class Options(usage.Options):
    """Everything an operator can set; checked here so mistakes are usage errors."""

    synopsis = "--console SOURCE [--port ENDPOINT ...] [options]"
    longdesc = (
        "Serve a console (a virtual machine's serial console, or any program's pty) as a "
        "web terminal shared by every browser that connects. SOURCE is pty:PATH (or a "
        "bare path), unix:PATH, telnet+unix:PATH, cloud-hypervisor:API_SOCKET or "
        "qmp:QMP_SOCKET[:chardev=LABEL]. --port takes a Twisted "
        "endpoint description, e.g. tcp:port=8080:interface=127.0.0.1, "
        "ssl:port=8443:privateKey=key.pem:certKey=cert.pem, unix:/run/console.sock, "
        "systemd:domain=INET:index=0; give it more than once to listen on several."
    )

    optFlags = [
        ["no-raw", None, "Leave the pty's line discipline alone (default: raw mode)."],
        ["read-only", None, "Discard every client's input (counted, and the page says so)."],
        [
            "reopen",
            None,
            "Follow the console: when it goes away (reboot, VMM restart), keep the clients "
            "and the history and open the source again (resolved anew) until it is back.",
        ],
        [
            "audit-input",
            None,
            "With --audit-log, log what is typed too (base64), not only how many bytes.",
        ],
        [
            "allow-control",
            None,
            "Without credentials (no --password-file, --token-file, --link-secret), offer "
            "the consoles' actions (SysRq, reset, power button) to anyone who reaches the port.",
        ],
    ]
    optParameters = [
        ["pty", None, None, "Same as --console pty:PATH."],
        ["log-file", None, None, "Append all console output to this file (reopened on SIGHUP)."],
        [
            "history-size",
            None,
            DEFAULT_HISTORY_SIZE,
            "Bytes of output kept and replayed to new clients.",
            _bytes("history-size"),
        ],
        [
            "head-size",
            None,
            DEFAULT_HEAD_SIZE,
            "Also keep the first N bytes of each boot (the boot log), replayed before the "
            "history; 0 turns it off.",
            _bytes("head-size", zero_allowed=True),
        ],
        [
            "log-timestamps",
            None,
            0.0,
            "Write a MARK line with the time into the log file after this many minutes "
            "of silence, and when output resumes after it; 0 (the default) never.",
            _number("log-timestamps", float, "minutes", zero_allowed=True),
        ],
        [
            "ping-interval",
            None,
            DEFAULT_PING_INTERVAL,
            "Seconds between WebSocket pings; a peer silent for twice that is dropped.",
            _seconds("ping-interval"),
        ],
        [
            "client-buffer",
            None,
            DEFAULT_CLIENT_BUFFER,
            "Unsent bytes per client before it is paused and catches up from the history.",
            _bytes("client-buffer"),
        ],
        [
            "ack-window",
            None,
            DEFAULT_ACK_WINDOW,
            "Bytes a page may have unrendered (cloud-console.v1) before it is paused.",
            _bytes("ack-window"),
        ],
        [
            "max-clients",
            None,
            DEFAULT_MAX_CLIENTS,
            "Viewers at once; the next WebSocket upgrade is refused (503).",
            _number("max-clients", int, "clients", False),
        ],
        ["password-file", None, None, "Require HTTP Basic credentials from this file (see cloud-console-passwd)."],
        ["token-file", None, None, "Require (or also accept) bearer tokens from this file."],
        [
            "link-secret",
            None,
            None,
            "Require (or also accept) signed, expiring links (HS256 JSON Web Tokens, see "
            "cloud-console-link) made with the key in this file (32 bytes or more, mode 0600).",
        ],
        [
            "max-stall",
            None,
            0.1,
            "Seconds the guest's output waits for a viewer that stopped making progress "
            "(then it no longer waits for that viewer); 0 never waits.",
            _seconds("max-stall", zero_allowed=True),
        ],
        [
            "read-workers",
            None,
            "auto",
            "Processes that read the consoles nobody watches, on the host's other cores "
            "(a watched console is read by the main process); 0 reads all in one process; "
            "auto: one per core beyond the first when serving many consoles, else 0.",
            _read_workers,
        ],
        ["static-dir", None, None, "Serve the page from this directory instead of the packaged build."],
        ["title", None, None, "The page's title (default: the console source)."],
        ["config", None, None, "Serve the consoles of this TOML file ([console.NAME] tables; reloaded on SIGHUP)."],
        ["console-dir", None, None, "Serve every entry of this directory as a console named after it (watched)."],
        ["log-dir", None, None, "Each console (of several) logs to DIR/NAME.log."],
        [
            "state-dir",
            None,
            None,
            "Keep the consoles' history and sessions across a restart in DIR (written at "
            "shutdown, read at start); under systemd its descriptor store is used anyway.",
        ],
        [
            "max-clients-total",
            None,
            DEFAULT_MAX_CLIENTS_TOTAL,
            "Viewers at once over all consoles of the process.",
            _number("max-clients-total", int, "clients", False),
        ],
        ["metrics-port", None, None, "Also serve /metrics and /healthz, without credentials, on this endpoint."],
        [
            "ssh-host-key",
            None,
            None,
            "The SSH door's host key (an OpenSSH private key, mode 0600); made (ed25519) if missing.",
        ],
        [
            "ssh-authorized-keys",
            None,
            None,
            "OpenSSH authorized_keys of the keys that may use the SSH door (options consoles=, "
            "read-only, from=); reloaded on SIGHUP.",
        ],
        [
            "ssh-user-ca",
            None,
            None,
            "Trusted user CA public keys: certificates they sign open the consoles their "
            "principals name (read-only:PATTERN for read-only); reloaded on SIGHUP.",
        ],
        [
            "ssh-revoked-keys",
            None,
            None,
            "Keys and certificates refused at the SSH door, whatever else says (public keys, "
            "serial: N, id: KEY_ID lines); reloaded on SIGHUP.",
        ],
        ["ssh-escape", None, "^Ec", "The SSH door's escape prefix (a control character and a letter)."],
        [
            "audit-log",
            None,
            None,
            "Append who attached, typed (bytes per burst), detached or was refused, as JSON "
            "lines, to this file (reopened on SIGHUP).",
        ],
    ]

    def __init__(self) -> None:
        usage.Options.__init__(self)
        self["port"] = []
        self["allow-origin"] = []
        self["console"] = None
        self["consoles"] = []
        self["ssh-port"] = []

    def opt_console(self, value: str) -> None:
        """
        Where a console is: SOURCE for the one console (pty:PATH or a bare path,
        unix:PATH, telnet+unix:PATH, cloud-hypervisor:API_SOCKET,
        qmp:QMP_SOCKET[:chardev=LABEL]), or
        NAME=SOURCE, repeatable, for a host's consoles in one process.
        """
        from .fleet.config import split_console_option

        try:
            self["consoles"].append(split_console_option(value))
        except ValueError as e:
            raise usage.UsageError(str(e))

    def opt_allow_origin(self, origin: str) -> None:
        """
        Also accept WebSocket upgrades from this browser origin (scheme://host[:port],
        repeatable); * accepts any origin (not recommended).
        """
        from .web.origin import normalize_origin

        if origin not in ("*", "null") and normalize_origin(origin) is None:
            raise usage.UsageError(
                f"--allow-origin {origin!r} is not an origin like https://console.example.com"
            )
        self["allow-origin"].append(origin)

    def opt_port(self, description: str) -> None:
        """
        Listen on this Twisted endpoint (repeatable);
        default tcp:port=8080:interface=127.0.0.1.
        """
        self._check_endpoint("--port", description)
        self["port"].append(description)

    def opt_ssh_port(self, description: str) -> None:
        """
        Also serve the consoles over SSH on this Twisted endpoint (repeatable), e.g.
        tcp:port=2222:interface=127.0.0.1 or systemd:domain=INET:name=ssh.
        """
        self._check_endpoint("--ssh-port", description)
        self["ssh-port"].append(description)

    def postOptions(self) -> None:
        if self["audit-input"] and not self["audit-log"]:
            raise usage.UsageError("--audit-input needs --audit-log FILE")
        if not self["port"]:
            self["port"] = [DEFAULT_PORT]
        self._ssh()
        if self["static-dir"] is not None:
            from pathlib import Path

            if not Path(self["static-dir"]).is_dir():
                raise usage.UsageError(f"--static-dir {self['static-dir']!r} is not a directory")
        if self["metrics-port"] is not None:
            self._check_endpoint("--metrics-port", self["metrics-port"])
        if self["state-dir"] is not None:
            import os

            if not os.path.isdir(self["state-dir"]) or not os.access(self["state-dir"], os.W_OK):
                raise usage.UsageError(f"--state-dir {self['state-dir']!r} is not a writable directory")
        named = [name for name, _ in self["consoles"] if name is not None]
        self["multi"] = bool(named or self["config"] or self["console-dir"])
        if self["multi"]:
            self._multi_console()
        else:
            self._single_console()

    def _single_console(self) -> None:
        """The original's mode: one console, served at /."""
        from .console.sources import parse_source

        consoles = [source for _, source in self["consoles"]]
        if len(consoles) > 1:
            raise usage.UsageError(
                "several --console SOURCE without names: name them (--console "
                "vm1=SOURCE --console vm2=SOURCE) to serve several consoles"
            )
        if self["pty"] and consoles:
            raise usage.UsageError("give --console SOURCE or --pty PATH, not both")
        self["console"] = self["pty"] or (consoles[0] if consoles else None)
        if not self["console"]:
            raise usage.UsageError("--console SOURCE (or --pty PATH) is required")
        try:
            self["source"] = parse_source(self["console"])
        except ValueError as e:
            raise usage.UsageError(f"--console: {e}")
        if self["reopen"] and not self["source"].follows_reboots:
            raise usage.UsageError(
                f"--reopen with {self['console']!r}: after a hang-up that pty number may "
                "belong to another VM or a user's terminal. Follow a symlink the VMM "
                "keeps (pty:/run/vm1.console), or ask the VMM (qmp:..., "
                "cloud-hypervisor:...), or a unix: socket."
            )
        if self["title"] is None:
            self["title"] = self["console"]
        for option in ("log-dir",):
            if self[option]:
                raise usage.UsageError(f"--{option} is for several consoles (NAME=SOURCE, --config)")

    def _multi_console(self) -> None:
        """A host's consoles: named on the command line, in --config, in --console-dir."""
        from .fleet.config import ConfigError, load_config, spec_defaults, spec_for

        for name, source in self["consoles"]:
            if name is None:
                raise usage.UsageError(
                    f"--console {source!r} has no name: with several consoles (NAME=SOURCE, "
                    "--config, --console-dir) every one is named, e.g. --console vm1=" + source
                )
        for option, instead in (("pty", "--console NAME=SOURCE"), ("log-file", "--log-dir or a console's log-file"),
                                ("title", "a console's title in --config")):
            if self[option]:
                raise usage.UsageError(f"--{option} is for one console; with several use {instead}")
        self["defaults"] = {
            "history-size": self["history-size"],
            "head-size": self["head-size"],
            "log-timestamps": self["log-timestamps"],
            "read-only": bool(self["read-only"]),
            "raw": not self["no-raw"],
            "log-dir": self["log-dir"],
        }
        specs = []
        seen: set[str] = set()
        for name, source in self["consoles"]:
            assert name is not None
            if name in seen:
                raise usage.UsageError(f"--console {name}=...: the name {name} is given twice")
            seen.add(name)
            try:
                specs.append(spec_for(name, source, "command line", **spec_defaults(self["defaults"], name)))
            except ValueError as e:
                raise usage.UsageError(f"--console {name}={source}: {e}")
        self["command-line-consoles"] = specs
        if self["config"]:
            try:
                from_config = load_config(self["config"], self["defaults"])
            except ConfigError as e:
                raise usage.UsageError(str(e))
            both = sorted(seen & {spec.name or "" for spec in from_config})
            if both:
                raise usage.UsageError(
                    f"console {', '.join(both)} is named both on the command line and in {self['config']}"
                )

    def _ssh(self) -> None:
        """The SSH door's options: all or nothing, and a way in."""
        from .ssh.escape import EscapeSpecError, parse_escape

        try:
            self["ssh-escape-bytes"] = parse_escape(self["ssh-escape"])
        except EscapeSpecError as e:
            raise usage.UsageError(str(e))
        given = [
            f"--{name}"
            for name in ("ssh-host-key", "ssh-authorized-keys", "ssh-user-ca", "ssh-revoked-keys")
            if self[name]
        ]
        if not self["ssh-port"]:
            if given:
                raise usage.UsageError(f"{', '.join(given)} without --ssh-port: say where SSH listens")
            return
        if not self["ssh-host-key"]:
            raise usage.UsageError("--ssh-port needs --ssh-host-key FILE (made there if missing)")
        if not (self["ssh-authorized-keys"] or self["ssh-user-ca"]):
            raise usage.UsageError(
                "--ssh-port needs --ssh-authorized-keys FILE or --ssh-user-ca FILE: the SSH "
                "door takes public keys and certificates only"
            )

    @staticmethod
    def _check_endpoint(option: str, description: str) -> None:
        try:
            serverFromString(None, description)
        except (IndexError, KeyError) as e:
            if description.startswith("systemd:"):
                # Twisted looks the socket up as it parses: none was passed by systemd.
                raise usage.UsageError(
                    f"{option} {description!r}: systemd passed no such socket "
                    f"(LISTEN_FDS, LISTEN_FDNAMES: start it through its .socket unit)"
                )
            raise usage.UsageError(f"{option} {description!r} is not a valid endpoint: {e!r}")
        except (ValueError, TypeError, OSError) as e:
            raise usage.UsageError(f"{option} {description!r} is not a valid endpoint: {e}")


def makeService(options: Options) -> IService:
    """
    twistd's entry point. A console that cannot be opened ends twistd with status 2 and
    a message (as the positional command does), not a traceback.
    """
    from twisted.internet import reactor

    from .service import StartupError, build_service, exit_with_status_after_twistd

    try:
        console = build_service(options, reactor)
    except StartupError as e:
        sys.stderr.write(f"cloud-console: {e}\n")
        raise SystemExit(2)
    exit_with_status_after_twistd(console)
    return console
