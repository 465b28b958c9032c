"""
A stand-in for cloud-hypervisor's REST API, as far as C{GET /api/v1/vm.info} goes.

cloud-hypervisor itself cannot run here (no package, no KVM), so the
C{cloud-hypervisor:API_SOCKET} source is tested against this: an HTTP/1.1 server on a
unix socket answering vm.info the way cloud-hypervisor does. What it follows, and where
that is documented or implemented in cloud-hypervisor/cloud-hypervisor:

  - C{vmm/src/api/openapi/cloud-hypervisor.yaml}: C{/vm.info} answers 200 with a
    C{VmInfo} (C{config}, C{state}, C{memory_actual_size}, C{device_tree}) or 404 when
    "the VM is not created"; C{VmState} is one of Created, Running, Shutdown, Paused,
    BreakPoint; C{SerialConfig} has C{file}, C{socket} and C{mode} (Off, Pty, Tty, File,
    Socket, Null).
  - C{vmm/src/console_devices.rs} (older releases: C{vmm/src/device_manager.rs}): in Pty
    mode cloud-hypervisor allocates the pty and stores its path in C{config.serial.file},
    which is how vm.info reports it; in Socket mode it listens on C{config.serial.socket}
    (C{--serial socket=PATH}, since v36.0 per C{release-notes.md}).
  - C{vmm/src/api/http/mod.rs}: errors are a JSON array of messages from the outermost
    error inward, e.g. C{["Error from API", "The VM info is not available", "VM is not
    created"]}, with C{Content-Type: application/json} and C{Server: Cloud Hypervisor
    API}. Older releases sent the same with status 500 instead of 404
    (C{vmm/src/api/http/http_endpoint.rs}, whose vm.info handler mapped every error to
    500): C{legacy_not_created=True} imitates them.
  - Options serialize as JSON C{null} when unset (serde's default for C{Option}), so an
    unset C{file} or C{socket} is C{null}, not absent.

It also takes C{PUT /api/v1/vm.reboot} and C{PUT /api/v1/vm.power-button} as the
OpenAPI document gives them: 204 when done, 404 when the VM is not created, 405 when it
is not booted (a JSON array of messages, as above). Each one done is appended to
C{actions} (C{"vm.reboot"}, C{"vm.power-button"}), which is what tests check on the VMM's
side; a reboot leaves the VM Running.

The body is small but of the same shape: cpus, memory, payload, serial, console, and the
top-level state and memory_actual_size.

In-process use (a thread)::

    standin = CloudHypervisorStandIn(path)
    standin.start()
    standin.boot(pty_path="/dev/pts/3")       # or boot(socket_path=...)
    standin.shutdown()                        # state Shutdown
    standin.delete()                          # no VM created: 404
    standin.stop()

As a separate process, for integration tests (state re-read from the file at every
request, so the test changes it by rewriting the file; C{null} means no VM is created)::

    python -m tests.cloud_hypervisor_standin SOCKET STATE_JSON

where STATE_JSON holds e.g. C{{"state": "Running", "serial": {"mode": "Pty", "file":
"/dev/pts/3"}}}. It prints C{ready} on stdout once listening.
"""

from __future__ import annotations

import copy
import http.server
import json
import os
import signal
import socketserver
import sys
import threading
from typing import Any

NOT_CREATED = ["Error from API", "The VM info is not available", "VM is not created"]


def vm_info_body(state: str, serial: dict[str, Any]) -> dict[str, Any]:
    """
    A vm.info body of cloud-hypervisor's shape for this state and serial config.
    """
    full_serial = {"file": None, "socket": None, "mode": "Off"}
    full_serial.update(serial)
    return {
        "config": {
            "cpus": {"boot_vcpus": 1, "max_vcpus": 1, "kvm_hyperv": False},
            "memory": {"size": 536870912, "mergeable": False, "shared": False},
            "payload": {"kernel": "/opt/vm/vmlinux", "cmdline": "console=ttyS0 root=/dev/vda1"},
            "disks": [{"path": "/opt/vm/disk.raw", "readonly": False, "id": "_disk0"}],
            "serial": full_serial,
            "console": {"file": None, "socket": None, "mode": "Off", "iommu": False},
            "iommu": False,
            "watchdog": False,
            "pvpanic": False,
        },
        "state": state,
        "memory_actual_size": 536870912,
        "device_tree": {},
    }


class CloudHypervisorStandIn:
    """
    The settable state of one cloud-hypervisor VMM, served on a unix socket.

    @ivar requests: the request lines received, for assertions.
    """

    def __init__(self, socket_path: str, state_file: str | None = None) -> None:
        self.socket_path = socket_path
        self.state_file = state_file
        self.legacy_not_created = False
        self.requests: list[str] = []
        #: The power actions done (vm.reboot, vm.power-button), in order.
        self.actions: list[str] = []
        self._lock = threading.Lock()
        self._vm: dict[str, Any] | None = None
        self._override: tuple[int, bytes, str] | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # State changes, as the VMM's lifecycle would make them.

    def create(self, serial: dict[str, Any] | None = None) -> None:
        """
        vm.create: the VM exists, not booted.
        """
        with self._lock:
            self._vm = {"state": "Created", "serial": dict(serial or {"mode": "Off"})}

    def boot(
        self,
        pty_path: str | None = None,
        socket_path: str | None = None,
        serial: dict[str, Any] | None = None,
    ) -> None:
        """
        The VM runs, its serial a pty at C{pty_path}, a socket at C{socket_path}, or as
        C{serial} gives (e.g. C{{"mode": "File", "file": "/tmp/log"}}).
        """
        if serial is None:
            if pty_path is not None:
                serial = {"mode": "Pty", "file": pty_path}
            elif socket_path is not None:
                serial = {"mode": "Socket", "socket": socket_path}
            else:
                serial = {"mode": "Off"}
        with self._lock:
            self._vm = {"state": "Running", "serial": dict(serial)}

    def set_state(self, state: str) -> None:
        """
        Any VmState (Paused, BreakPoint...), keeping the serial config.
        """
        with self._lock:
            if self._vm is None:
                self._vm = {"state": state, "serial": {"mode": "Off"}}
            else:
                self._vm["state"] = state

    def shutdown(self) -> None:
        """
        vm.shutdown: the config stays, the VM is Shutdown.
        """
        self.set_state("Shutdown")

    def delete(self) -> None:
        """
        vm.delete: no VM created any more.
        """
        with self._lock:
            self._vm = None

    def answer_with(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        """
        Answer every request with this instead (garbage, server errors).
        """
        with self._lock:
            self._override = (status, body, content_type)

    # Serving.

    def start(self) -> None:
        """
        Listen on the socket and serve in a daemon thread.
        """
        self._server = _Server(self.socket_path, self)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """
        Stop serving and remove the socket.
        """
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    def answer(self, method: str, path: str) -> tuple[int, bytes, str]:
        """
        The status, body and content type cloud-hypervisor would send.
        """
        with self._lock:
            if self._override is not None:
                return self._override
            vm = copy.deepcopy(self._vm)
        if self.state_file is not None:
            with open(self.state_file) as f:
                vm = json.load(f)
        if path in ("/api/v1/vm.reboot", "/api/v1/vm.power-button"):
            return self._power(method, path[len("/api/v1/") :], vm)
        if path != "/api/v1/vm.info":
            return 404, json.dumps(["Not Found"]).encode(), "application/json"
        if method != "GET":
            return 400, json.dumps(["Bad Request"]).encode(), "application/json"
        if vm is None:
            status = 500 if self.legacy_not_created else 404
            return status, json.dumps(NOT_CREATED).encode(), "application/json"
        body = vm_info_body(vm["state"], vm["serial"])
        return 200, json.dumps(body).encode(), "application/json"


    def _power(self, method: str, verb: str, vm: dict[str, Any] | None) -> tuple[int, bytes, str]:
        """
        vm.reboot or vm.power-button: 204 and recorded on a booted VM, else its error.
        """
        if method != "PUT":
            return 405, json.dumps(["Method Not Allowed"]).encode(), "application/json"
        if vm is None:
            return 404, json.dumps(["Error from API", "VM is not created"]).encode(), "application/json"
        if vm["state"] not in ("Running", "Paused", "BreakPoint"):
            return 405, json.dumps(["Error from API", "VM is not booted"]).encode(), "application/json"
        with self._lock:
            self.actions.append(verb)
        return 204, b"", "application/json"


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """
    One thread per connection, as the tests may leave one open.
    """

    daemon_threads = True

    def __init__(self, path: str, standin: CloudHypervisorStandIn) -> None:
        self.standin = standin
        super().__init__(path, _Handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    """
    HTTP/1.1, JSON bodies, cloud-hypervisor's Server header.
    """

    protocol_version = "HTTP/1.1"
    server_version = "Cloud Hypervisor API"
    sys_version = ""
    server: _Server

    def _reply(self) -> None:
        self.server.standin.requests.append(self.requestline)
        status, body, content_type = self.server.standin.answer(self.command, self.path)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:  # a 204 has none, and its client may be gone already
            self.wfile.write(body)

    do_GET = _reply
    do_PUT = _reply

    def log_message(self, format: str, *args: Any) -> None:
        """
        Quiet: unix sockets have no client address to log, and tests read C{requests}.
        """


def main(argv: list[str]) -> int:
    """
    C{python -m tests.cloud_hypervisor_standin SOCKET STATE_JSON}: serve until killed.
    """
    if len(argv) != 2:
        print("usage: python -m tests.cloud_hypervisor_standin SOCKET STATE_JSON", file=sys.stderr)
        return 1
    standin = CloudHypervisorStandIn(argv[0], state_file=argv[1])
    server = _Server(argv[0], standin)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    print("ready", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        os.unlink(argv[0])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
