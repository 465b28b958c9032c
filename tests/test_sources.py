"""
Tests for L{cloud_console.console.sources}: parsing every SOURCE form, and resolving against real
unix sockets: the cloud-hypervisor stand-in, and a small scripted QMP server (real QEMU
is exercised by the integration tests).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable

from twisted.trial.unittest import SynchronousTestCase

from cloud_console.console.sources import (
    ACCEPTED_FORMS,
    CloudHypervisorSource,
    PtySource,
    QmpSource,
    SourceError,
    Target,
    UnixSource,
    parse_source,
)
from tests.cloud_hypervisor_standin import CloudHypervisorStandIn


def _short_tempdir(case: SynchronousTestCase) -> str:
    """
    A temporary directory with a short path (unix socket paths are limited to ~107 bytes).
    """
    path = tempfile.mkdtemp(prefix="ccsrc", dir="/tmp")

    def remove() -> None:
        for name in os.listdir(path):
            os.unlink(os.path.join(path, name))
        os.rmdir(path)

    case.addCleanup(remove)
    return path


class ParseTests(SynchronousTestCase):
    """
    L{parse_source} accepts the documented forms and refuses the rest by name.
    """

    def test_bare_paths(self) -> None:
        """
        Anything not starting with a scheme is a pty path, colons and all.
        """
        for text in ["/dev/pts/4", "/tmp/a:b", "vm1.console", "./tcp:1", "/run/vm1/console"]:
            source = parse_source(text)
            self.assertEqual(source, PtySource(text, text))
            self.assertEqual(str(source), text)

    def test_pty(self) -> None:
        """
        C{pty:PATH} is a pty path.
        """
        self.assertEqual(parse_source("pty:/dev/vm1"), PtySource("pty:/dev/vm1", "/dev/vm1"))

    def test_unix(self) -> None:
        """
        C{unix:PATH} is a socket path.
        """
        self.assertEqual(
            parse_source("unix:/run/vm1.serial"), UnixSource("unix:/run/vm1.serial", "/run/vm1.serial")
        )

    def test_cloud_hypervisor(self) -> None:
        """
        C{cloud-hypervisor:API_SOCKET} names the API socket.
        """
        self.assertEqual(
            parse_source("cloud-hypervisor:/run/ch/vm1.sock"),
            CloudHypervisorSource("cloud-hypervisor:/run/ch/vm1.sock", "/run/ch/vm1.sock"),
        )

    def test_qmp(self) -> None:
        """
        C{qmp:PATH} has no label; C{:chardev=} is split from the right, so the path may
        itself contain colons.
        """
        self.assertEqual(parse_source("qmp:/run/vm1.qmp"), QmpSource("qmp:/run/vm1.qmp", "/run/vm1.qmp"))
        self.assertEqual(
            parse_source("qmp:/run/a:b.qmp:chardev=serial1"),
            QmpSource("qmp:/run/a:b.qmp:chardev=serial1", "/run/a:b.qmp", "serial1"),
        )

    def test_bad_forms(self) -> None:
        """
        Unknown schemes, empty sources, paths and labels are ValueErrors whose message
        names the accepted forms.
        """
        for text in [
            "",
            "tcp:host:1",
            "tpc:/run/x",
            "PTY:/dev/pts/1",
            "pty:",
            "unix:",
            "cloud-hypervisor:",
            "qmp:",
            "qmp::chardev=serial0",
            "qmp:/run/vm.qmp:chardev=",
        ]:
            with self.assertRaises(ValueError, msg=text) as caught:
                parse_source(text)
            self.assertIn(ACCEPTED_FORMS, str(caught.exception), text)

    def test_unknown_scheme_named(self) -> None:
        """
        The message quotes the scheme it did not know.
        """
        with self.assertRaises(ValueError) as caught:
            parse_source("tcp:host:1")
        self.assertIn("'tcp:'", str(caught.exception))

    def test_follows_reboots(self) -> None:
        """
        Only a literal numbered pty cannot be followed across a hang-up.
        """
        for text in ["/dev/pts/4", "pty:/dev/pts/12", "/dev/pts//4", "/dev/../dev/pts/0"]:
            self.assertFalse(parse_source(text).follows_reboots, text)
        for text in [
            "/dev/pts/ptmx4x",
            "/run/vm1.console",
            "pty:/dev/serial/by-vm/vm1",
            "unix:/run/vm1.serial",
            "cloud-hypervisor:/run/ch.sock",
            "qmp:/run/vm.qmp",
        ]:
            self.assertTrue(parse_source(text).follows_reboots, text)

    def test_pty_resolves_as_given(self) -> None:
        """
        A symlink is not dereferenced when resolving: the opener follows it each time.
        """
        directory = _short_tempdir(self)
        link = os.path.join(directory, "console")
        os.symlink("/dev/null", link)
        self.assertEqual(parse_source(link).resolve(), Target("pty", link))
        self.assertEqual(parse_source("unix:/run/x.sock").resolve(), Target("unix", "/run/x.sock"))

    def test_target_str(self) -> None:
        """
        Targets render for logs.
        """
        self.assertEqual(str(Target("pty", "/dev/pts/4")), "pty /dev/pts/4")
        self.assertEqual(str(Target("unix", "/run/vm.sock")), "unix socket /run/vm.sock")


class CloudHypervisorTests(SynchronousTestCase):
    """
    C{cloud-hypervisor:} against the stand-in of its vm.info API.
    """

    def setUp(self) -> None:
        self.directory = _short_tempdir(self)
        self.api = os.path.join(self.directory, "ch.sock")
        self.standin = CloudHypervisorStandIn(self.api)
        self.standin.start()
        self.addCleanup(self.standin.stop)
        self.source = parse_source("cloud-hypervisor:" + self.api)

    def assertSourceError(self, *fragments: str) -> str:
        """
        Resolving fails with a message containing every fragment.
        """
        with self.assertRaises(SourceError) as caught:
            self.source.resolve(timeout=2)
        message = str(caught.exception)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message

    def test_pty(self) -> None:
        """
        Pty mode: the pty path from config.serial.file; the request is vm.info.
        """
        self.standin.boot(pty_path="/dev/pts/7")
        self.assertEqual(self.source.resolve(), Target("pty", "/dev/pts/7"))
        self.assertEqual(self.standin.requests, ["GET /api/v1/vm.info HTTP/1.1"])

    def test_reboots(self) -> None:
        """
        Each resolution asks again: a new boot's pty is found.
        """
        self.standin.boot(pty_path="/dev/pts/7")
        self.assertEqual(self.source.resolve(), Target("pty", "/dev/pts/7"))
        self.standin.shutdown()
        self.assertSourceError("the VM is Shutdown, not running")
        self.standin.boot(pty_path="/dev/pts/9")
        self.assertEqual(self.source.resolve(), Target("pty", "/dev/pts/9"))

    def test_paused(self) -> None:
        """
        A paused VM still has its serial device.
        """
        self.standin.boot(pty_path="/dev/pts/7")
        self.standin.set_state("Paused")
        self.assertEqual(self.source.resolve(), Target("pty", "/dev/pts/7"))

    def test_socket(self) -> None:
        """
        Socket mode: the socket path from config.serial.socket.
        """
        self.standin.boot(socket_path="/run/ch/vm1.serial")
        self.assertEqual(self.source.resolve(), Target("unix", "/run/ch/vm1.serial"))

    def test_other_modes(self) -> None:
        """
        Off, Null, Tty and File are refused, naming the mode and the fix.
        """
        for mode in ["Off", "Null", "Tty", "File"]:
            self.standin.boot(serial={"mode": mode, "file": "/tmp/serial.log" if mode == "File" else None})
            self.assertSourceError(f"mode {mode}", "--serial pty")
        self.standin.boot(serial={"mode": "File", "file": "/tmp/serial.log"})
        self.assertSourceError("/tmp/serial.log")

    def test_pty_without_path(self) -> None:
        """
        A Pty mode without a path yet is an error, not a Target with no path.
        """
        self.standin.boot(serial={"mode": "Pty", "file": None})
        self.assertSourceError("gives no path")

    def test_not_created(self) -> None:
        """
        No VM created: 404 (current releases) or 500 "VM is not created" (older ones).
        """
        self.standin.delete()
        self.assertSourceError("no VM is created", "HTTP 404")
        self.standin.legacy_not_created = True
        self.assertSourceError("no VM is created", "HTTP 500")

    def test_created_not_booted(self) -> None:
        """
        A created VM not booted yet already has its pty (current releases make it at
        vm.create): it is used, so the boot's first bytes are not missed.
        """
        self.standin.create({"mode": "Pty", "file": "/dev/pts/3"})
        self.assertEqual(self.source.resolve(), Target("pty", "/dev/pts/3"))

    def test_garbage_json(self) -> None:
        """
        A 200 that is not JSON is quoted briefly.
        """
        self.standin.answer_with(200, b"<html>hello" + b"x" * 500)
        message = self.assertSourceError("not JSON", "'<html>hello")
        self.assertLess(len(message), 250)

    def test_missing_keys(self) -> None:
        """
        JSON of the wrong shape is refused.
        """
        for body in [b"[]", b'{"state": "Running"}', b'{"state": "Running", "config": {}}']:
            self.standin.answer_with(200, body)
            self.assertSourceError(self.api)

    def test_http_500(self) -> None:
        """
        A server error is reported with its status and body.
        """
        self.standin.answer_with(500, b'["Error from API", "boom"]')
        self.assertSourceError("HTTP 500", "boom")

    def test_socket_missing(self) -> None:
        """
        No socket file.
        """
        self.source = parse_source("cloud-hypervisor:" + self.api + ".missing")
        self.assertSourceError("cannot reach cloud-hypervisor API socket", "no such file")

    def test_refused(self) -> None:
        """
        A socket file nobody listens on.
        """
        path = _dead_socket(self.directory)
        self.source = parse_source("cloud-hypervisor:" + path)
        self.assertSourceError(f"cannot reach cloud-hypervisor API socket {path}: Connection refused")

    def test_not_http(self) -> None:
        """
        A peer that answers something other than HTTP.
        """
        path = os.path.join(self.directory, "nothttp.sock")
        def script(conn: socket.socket) -> None:
            conn.recv(65536)  # the request first, so the client's send cannot hit EPIPE
            conn.sendall(b"SSH-2.0-OpenSSH\r\n")

        server = _ScriptedServer(path, script)
        self.addCleanup(server.stop)
        self.source = parse_source("cloud-hypervisor:" + path)
        self.assertSourceError("did not answer in HTTP")

    def test_silent(self) -> None:
        """
        A peer that accepts and never answers: the timeout is honoured.
        """
        path = os.path.join(self.directory, "silent.sock")
        server = _ScriptedServer(path, lambda conn: server.release.wait(10))
        self.addCleanup(server.stop)
        self.source = parse_source("cloud-hypervisor:" + path)
        started = time.monotonic()
        with self.assertRaises(SourceError) as caught:
            self.source.resolve(timeout=0.3)
        self.assertLess(time.monotonic() - started, 2)
        self.assertIn("no answer within 0.3 s", str(caught.exception))

    def test_separate_process(self) -> None:
        """
        The stand-in runs as its own process, its state read from a file per request.
        """
        api = os.path.join(self.directory, "proc.sock")
        state = os.path.join(self.directory, "state.json")
        with open(state, "w") as f:
            json.dump({"state": "Running", "serial": {"mode": "Pty", "file": "/dev/pts/5"}}, f)
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.cloud_hypervisor_standin", api, state],
            stdout=subprocess.PIPE,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        self.addCleanup(process.wait, 10)
        self.addCleanup(process.terminate)
        assert process.stdout is not None
        self.addCleanup(process.stdout.close)
        self.assertEqual(process.stdout.readline(), b"ready\n")
        source = parse_source("cloud-hypervisor:" + api)
        self.assertEqual(source.resolve(), Target("pty", "/dev/pts/5"))
        with open(state, "w") as f:
            json.dump(None, f)
        with self.assertRaises(SourceError):
            source.resolve()


class QmpTests(SynchronousTestCase):
    """
    C{qmp:} against a scripted QMP server.
    """

    def setUp(self) -> None:
        self.directory = _short_tempdir(self)
        self.path = os.path.join(self.directory, "vm.qmp")

    def serve(
        self,
        chardevs: list[dict[str, Any]],
        greeting: bytes = b'{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}, "capabilities": ["oob"]}}\r\n',
        events: int = 0,
    ) -> _ScriptedServer:
        """
        A QMP server that greets, accepts qmp_capabilities, answers query-chardev with
        C{chardevs}, sending C{events} events before each answer.
        """
        event = b'{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "NIC_RX_FILTER_CHANGED", "data": {}}\r\n'

        def script(conn: socket.socket) -> None:
            conn.sendall(greeting)
            lines = conn.makefile("rb")
            for line in lines:
                command = json.loads(line)["execute"]
                server.commands.append(command)
                conn.sendall(event * events)
                if command == "query-chardev":
                    conn.sendall(json.dumps({"return": chardevs}).encode() + b"\r\n")
                else:
                    conn.sendall(b'{"return": {}}\r\n')
            server.closed_by_client.set()

        server = _ScriptedServer(self.path, script)
        self.addCleanup(server.stop)
        return server

    def resolve(self, text: str | None = None, timeout: float = 2.0) -> Target:
        """
        Resolve C{qmp:PATH} (or the given source text).
        """
        return parse_source(text or "qmp:" + self.path).resolve(timeout=timeout)

    def assertSourceError(self, *fragments: str, text: str | None = None) -> None:
        """
        Resolving fails with a message containing every fragment.
        """
        with self.assertRaises(SourceError) as caught:
            self.resolve(text)
        for fragment in fragments:
            self.assertIn(fragment, str(caught.exception))

    def test_default_prefers_charserial0(self) -> None:
        """
        charserial0 (libvirt's name) wins over serial0; the exchange is greeting,
        qmp_capabilities, query-chardev, and the connection is closed after.
        """
        server = self.serve(
            [
                {"label": "serial0", "filename": "pty:/dev/pts/1", "frontend-open": True},
                {"label": "charserial0", "filename": "pty:/dev/pts/2", "frontend-open": True},
            ]
        )
        self.assertEqual(self.resolve(), Target("pty", "/dev/pts/2"))
        self.assertTrue(server.closed_by_client.wait(2))
        self.assertEqual(server.commands, ["qmp_capabilities", "query-chardev"])

    def test_default_serial0(self) -> None:
        """
        Without charserial0, serial0 (what C{-serial pty} creates).
        """
        self.serve(
            [
                {"label": "compat_monitor0", "filename": "unix:/x.qmp,server=on"},
                {"label": "serial0", "filename": "pty:/dev/pts/1"},
            ]
        )
        self.assertEqual(self.resolve(), Target("pty", "/dev/pts/1"))

    def test_default_missing(self) -> None:
        """
        Neither default: the message lists what exists and how to name one.
        """
        self.serve([{"label": "mon", "filename": "stdio"}, {"label": "con1", "filename": "pty:/dev/pts/1"}])
        self.assertSourceError("neither chardev charserial0 nor serial0", "con1, mon", ":chardev=LABEL")

    def test_explicit_label(self) -> None:
        """
        C{:chardev=LABEL} picks that chardev even when a default exists.
        """
        self.serve(
            [
                {"label": "charserial0", "filename": "pty:/dev/pts/2"},
                {"label": "charserial1", "filename": "pty:/dev/pts/3"},
            ]
        )
        self.assertEqual(self.resolve(f"qmp:{self.path}:chardev=charserial1"), Target("pty", "/dev/pts/3"))

    def test_missing_label(self) -> None:
        """
        A label QEMU does not have: the message lists the available labels.
        """
        self.serve([{"label": "charserial0", "filename": "pty:/dev/pts/2"}, {"label": "mon", "filename": "stdio"}])
        self.assertSourceError("no chardev 'ttyS1'", "charserial0, mon", text=f"qmp:{self.path}:chardev=ttyS1")

    def test_socket_chardev(self) -> None:
        """
        A unix socket server chardev, with or without a client connected, old or new
        spelling, resolves to its path.
        """
        for filename in [
            "disconnected:unix:/run/vm1.serial,server=on",
            "unix:/run/vm1.serial,server=on",
            "disconnected:unix:/run/vm1.serial,server",
        ]:
            directory = _short_tempdir(self)
            self.path = os.path.join(directory, "vm.qmp")
            self.serve([{"label": "charserial0", "filename": filename}])
            self.assertEqual(self.resolve(), Target("unix", "/run/vm1.serial"), filename)

    def test_unusable_chardevs(self) -> None:
        """
        Files, stdio, null, TCP and client sockets are refused, naming what they are.
        """
        for filename, fragment in [
            ("file", "'file'"),
            ("stdio", "'stdio'"),
            ("null", "'null'"),
            ("disconnected:tcp:127.0.0.1:4555,server=on", "tcp:127.0.0.1:4555"),
            ("unix:", "client"),
            ("unix:/run/other.sock", "client"),
            ("disconnected:unix:@vm,abstract=on,server=on", "abstract"),
        ]:
            directory = _short_tempdir(self)
            self.path = os.path.join(directory, "vm.qmp")
            self.serve([{"label": "charserial0", "filename": filename}])
            self.assertSourceError("chardev charserial0", fragment)

    def test_events_interleaved(self) -> None:
        """
        Asynchronous events before each answer are skipped.
        """
        self.serve([{"label": "serial0", "filename": "pty:/dev/pts/1"}], events=3)
        self.assertEqual(self.resolve(), Target("pty", "/dev/pts/1"))

    def test_garbage_greeting(self) -> None:
        """
        A peer that is not QMP.
        """
        self.serve([], greeting=b"220 smtp.example ESMTP\r\n")
        self.assertSourceError("not JSON", "greeting", "'220 smtp")

    def test_json_not_qmp(self) -> None:
        """
        JSON that is not a QMP greeting.
        """
        self.serve([], greeting=b'{"hello": 1}\n')
        self.assertSourceError("did not greet like QEMU")

    def test_command_error(self) -> None:
        """
        A QMP error answer is reported with its description.
        """

        def script(conn: socket.socket) -> None:
            conn.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\n')
            conn.recv(1000)
            conn.sendall(b'{"error": {"class": "CommandNotFound", "desc": "nope, not here"}}\n')
            server.release.wait(5)

        server = _ScriptedServer(self.path, script)
        self.addCleanup(server.stop)
        self.assertSourceError("refused qmp_capabilities: nope, not here")

    def test_closed_early(self) -> None:
        """
        A peer that hangs up before answering.
        """
        server = _ScriptedServer(self.path, lambda conn: None)
        self.addCleanup(server.stop)
        self.assertSourceError("closed the connection before its greeting")

    def test_socket_missing(self) -> None:
        """
        No socket file.
        """
        self.assertSourceError(f"cannot reach QMP socket {self.path}: no such file")

    def test_refused(self) -> None:
        """
        A socket file nobody listens on.
        """
        path = _dead_socket(self.directory)
        self.assertSourceError(f"cannot reach QMP socket {path}: Connection refused", text="qmp:" + path)

    def test_never_answers(self) -> None:
        """
        A server that accepts and says nothing: the timeout is honoured and the
        message hints at QEMU's one-client limit.
        """
        server = _ScriptedServer(self.path, lambda conn: server.release.wait(10))
        self.addCleanup(server.stop)
        started = time.monotonic()
        with self.assertRaises(SourceError) as caught:
            self.resolve(timeout=0.3)
        self.assertLess(time.monotonic() - started, 2)
        self.assertIn("sent no greeting within 0.3 s", str(caught.exception))
        self.assertIn("one QMP client at a time", str(caught.exception))

    def test_endless_events(self) -> None:
        """
        A server that sends events forever and never answers: the whole exchange is
        bounded by the timeout, not each read.
        """

        def script(conn: socket.socket) -> None:
            conn.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\n')
            while not server.release.is_set():
                try:
                    conn.sendall(b'{"event": "TICK", "data": {}}\n')
                except OSError:
                    return
                time.sleep(0.05)

        server = _ScriptedServer(self.path, script)
        self.addCleanup(server.stop)
        started = time.monotonic()
        with self.assertRaises(SourceError) as caught:
            self.resolve(timeout=0.5)
        self.assertLess(time.monotonic() - started, 2)
        self.assertIn("sent no answer to qmp_capabilities within 0.5 s", str(caught.exception))


def _dead_socket(directory: str) -> str:
    """
    A unix socket file with no listener: connecting is refused.
    """
    path = os.path.join(directory, "dead.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.close()
    return path


class _ScriptedServer:
    """
    A unix socket server that runs C{script(connection)} for each client in a thread.

    @ivar release: set at stop, so scripts that wait give up.
    @ivar commands: QMP commands received, for scripts that record them.
    @ivar closed_by_client: set by scripts that saw the client hang up.
    """

    def __init__(self, path: str, script: Callable[[socket.socket], object]) -> None:
        self.path = path
        self.release = threading.Event()
        self.closed_by_client = threading.Event()
        self.commands: list[str] = []
        self._script = script
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(5)
        self._threads: list[threading.Thread] = []
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        self._threads.append(accept)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._run, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _run(self, conn: socket.socket) -> None:
        with conn:
            try:
                self._script(conn)
            except OSError:
                pass

    def stop(self) -> None:
        """
        Release waiting scripts, stop accepting, remove the socket file.
        """
        self.release.set()
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for thread in self._threads:
            thread.join(5)
        os.unlink(self.path)
