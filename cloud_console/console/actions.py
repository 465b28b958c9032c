"""
What an operator can do to a VM besides typing: Magic SysRq, a serial BREAK, a reset and
the ACPI power button, per console source.

The serial console is what is left when a guest hangs; these are what is left to do then.
Each source says which it can (L{actions_for}), and L{perform} does one:

  - C{qmp:} (QEMU): SysRq as QMP C{send-key} with C{alt}, C{sysrq} and the key as
    qcodes (what C{virsh send-key} does; Linux acts on it through the emulated keyboard
    when SysRq is enabled), C{system_reset}, C{system_powerdown}.
  - C{cloud-hypervisor:}: C{PUT /api/v1/vm.reboot} and C{PUT /api/v1/vm.power-button}
    on its API socket (204 when done). It has no way to press a key, so no SysRq.
  - C{telnet+unix:} (QEMU's socket chardev with C{telnet=on}): a serial BREAK, as a
    telnet BREAK on the console's own connection (L{cloud_console.console.telnet}).
  - C{pty:} and C{unix:}: nothing; a pty cannot carry a BREAK to QEMU (measured: Linux
    ptys ignore C{tcsendbreak}, and the guest saw nothing; tests/test_telnet.py), and a
    plain socket has no out-of-band signal.

Like source resolution (L{cloud_console.console.sources}), this is B{blocking} code with
short timeouts, to be run in a worker thread: QEMU serves one QMP client at a time, so
each action opens, acts and hangs up. L{ConsoleActions} is the one console's side of it,
shared by both doors: it runs the blocking part through the console's thread runner,
tells everyone on the console, counts (for C{/metrics}) and logs each action. Whether a
credential may act is the door's to check (the C{control} right of
L{cloud_console.access.policy.Access}); nothing here imports a door or the policy.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from .multiplexer import Multiplexer

from .sources import (
    CloudHypervisorSource,
    QmpSource,
    Source,
    SourceError,
    TelnetUnixSource,
    _brief,
    _os_reason,
    _QmpConversation,
    _UnixHTTPConnection,
)

#: Every action name, in the order the page lists them.
ACTIONS = ("sysrq", "break", "reset", "power-button")

#: Magic SysRq keys and what Linux does on each (Documentation/admin-guide/sysrq.rst),
#: for the page's menu, the SSH help and error messages.
SYSRQ_KEYS: dict[str, str] = {
    "b": "reboot at once, without syncing or unmounting",
    "c": "crash the kernel (kdump if configured)",
    "e": "send SIGTERM to every process but init",
    "f": "call the OOM killer",
    "h": "print the SysRq help",
    "i": "send SIGKILL to every process but init",
    "j": "thaw frozen filesystems",
    "k": "kill every process on the current virtual console (SAK)",
    "l": "show a backtrace of every active CPU",
    "m": "show memory usage",
    "n": "make real-time tasks niceable",
    "o": "power off",
    "p": "show registers and flags",
    "q": "show armed hrtimers and clock event devices",
    "r": "switch the keyboard out of raw mode",
    "s": "sync every mounted filesystem",
    "t": "show every task and its state",
    "u": "remount every filesystem read-only",
    "w": "show blocked (uninterruptible) tasks",
    "z": "dump the ftrace buffer",
    **{str(n): f"set the console log level to {n}" for n in range(10)},
}


class ActionError(Exception):
    """
    An action that was tried and failed: the VMM is unreachable or refused it. One line
    an operator can act on, naming the VMM and its answer.
    """


class ActionUnsupported(ActionError):
    """This console's source cannot do that action (the message says why)."""


class ActionInvalid(ActionError):
    """The action's arguments are wrong (an unknown SysRq key, say)."""


@dataclass(frozen=True)
class ActionRequest:
    """
    One action to perform: its name and, for SysRq, the key.
    """

    action: str
    key: str | None = None

    def describe(self) -> str:
        """How the action is told to everyone on the console: C{SysRq t}, C{reset}."""
        if self.action == "sysrq":
            return f"SysRq {self.key}"
        if self.action == "break":
            return "BREAK"
        return self.action


def actions_for(source: Source) -> tuple[str, ...]:
    """The actions this source can perform, in L{ACTIONS} order (empty: none)."""
    if isinstance(source, QmpSource):
        return ("sysrq", "reset", "power-button")
    if isinstance(source, CloudHypervisorSource):
        return ("reset", "power-button")
    if isinstance(source, TelnetUnixSource):
        return ("break",)
    return ()


def check(source: Source, request: ActionRequest) -> None:
    """
    Whether the action can be attempted at all, without reaching the VMM: called before
    anything is sent, so a refusal sends nothing.

    @raise ActionUnsupported: the source cannot do it.
    @raise ActionInvalid: an unknown action or SysRq key, or a key where none is taken.
    """
    if request.action not in ACTIONS:
        raise ActionInvalid(
            f"unknown action {request.action!r}; actions are {', '.join(ACTIONS)}"
        )
    if request.action not in actions_for(source):
        can = ", ".join(actions_for(source)) or "none"
        raise ActionUnsupported(
            f"console source {source} cannot do {request.action} (it can: {can})"
            + _why_not(source, request.action)
        )
    if request.action == "sysrq":
        if request.key is None or request.key not in SYSRQ_KEYS:
            raise ActionInvalid(
                f"SysRq needs a key, one of {''.join(sorted(SYSRQ_KEYS))} (h prints the help)"
            )
    elif request.key is not None:
        raise ActionInvalid(f"{request.action} takes no key")


def _why_not(source: Source, action: str) -> str:
    """A hint on why a source lacks an action."""
    if action == "break":
        return "; a BREAK needs a telnet+unix: source (QEMU telnet=on), and a pty cannot carry one"
    if action == "sysrq" and isinstance(source, CloudHypervisorSource):
        return "; cloud-hypervisor's API cannot press keys (send BREAK then the key instead)"
    if not isinstance(source, (QmpSource, CloudHypervisorSource, TelnetUnixSource)):
        return "; use a qmp: or cloud-hypervisor: source to reach the VMM"
    return ""


def perform(source: Source, request: ActionRequest, timeout: float = 2.0) -> None:
    """
    Do the action now. Blocking; the whole exchange is bounded by C{timeout}.

    @raise ActionUnsupported: see L{check}.
    @raise ActionInvalid: see L{check}.
    @raise ActionError: the VMM is unreachable, silent, or refused.
    """
    check(source, request)
    if request.action == "break":
        raise ActionError("a BREAK goes on the console's own connection, not to the VMM")
    if isinstance(source, QmpSource):
        _perform_qmp(source.qmp_socket, request, timeout)
    elif isinstance(source, CloudHypervisorSource):
        _perform_cloud_hypervisor(source.api_socket, request, timeout)


def sysrq_keys(key: str) -> list[dict[str, str]]:
    """QMP C{send-key}'s C{keys} for SysRq C{key}: C{alt}, C{sysrq}, then the key."""
    return [
        {"type": "qcode", "data": "alt"},
        {"type": "qcode", "data": "sysrq"},
        {"type": "qcode", "data": key},
    ]


def _perform_qmp(path: str, request: ActionRequest, timeout: float) -> None:
    """Greeting, C{qmp_capabilities}, the command, and hang up."""
    if request.action == "sysrq":
        assert request.key is not None
        command, arguments = "send-key", {"keys": sysrq_keys(request.key)}
    elif request.action == "reset":
        command, arguments = "system_reset", None
    else:
        command, arguments = "system_powerdown", None
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as e:
            raise ActionError(f"cannot reach QMP socket {path}: {_os_reason(e, timeout)}") from None
        conversation = _QmpConversation(sock, path, deadline, timeout)
        try:
            greeting = conversation.read_message("greeting")
            if not isinstance(greeting.get("QMP"), dict):
                raise ActionError(
                    f"QMP socket {path} did not greet like QEMU: {_brief(json.dumps(greeting))}"
                )
            conversation.execute("qmp_capabilities")
            conversation.execute(command, arguments)
        except SourceError as e:
            raise ActionError(str(e)) from None
        except OSError as e:
            raise ActionError(f"QMP socket {path} failed: {_os_reason(e, timeout)}") from None
    finally:
        sock.close()


#: cloud-hypervisor's endpoint for each action.
_CH_ENDPOINTS = {"reset": "/api/v1/vm.reboot", "power-button": "/api/v1/vm.power-button"}


def _perform_cloud_hypervisor(api_socket: str, request: ActionRequest, timeout: float) -> None:
    """
    One C{PUT} on the API socket. 204 (or 200) is done; 404 means no VM is created,
    405 that it is not booted (as the API's OpenAPI document says); other answers are
    reported with their body (a JSON array of messages).
    """
    endpoint = _CH_ENDPOINTS[request.action]
    connection = _UnixHTTPConnection(api_socket, timeout)
    try:
        connection.request("PUT", endpoint, headers={"Accept": "application/json"})
        response = connection.getresponse()
        body = response.read(4096)
    except OSError as e:
        raise ActionError(
            f"cannot reach cloud-hypervisor API socket {api_socket}: {_os_reason(e, timeout)}"
        ) from None
    except http.client.HTTPException as e:
        raise ActionError(
            f"cloud-hypervisor API socket {api_socket} did not answer in HTTP: "
            f"{type(e).__name__} {_brief(str(e))}"
        ) from None
    finally:
        connection.close()
    where = f"cloud-hypervisor API {api_socket}"
    verb = endpoint.rsplit("/", 1)[1]
    if response.status in (200, 204):
        return
    if response.status == 404:
        raise ActionError(f"{where}: {verb} refused: no VM is created")
    if response.status == 405:
        raise ActionError(f"{where}: {verb} refused: the VM is not booted")
    raise ActionError(
        f"{where}: {verb} failed with HTTP {response.status} {response.reason}: {_brief(body)}"
    )


#: Told of an action's outcome: (console name, request, who, door, outcome, reason).
ActionObserver = Callable[[str, "ActionRequest", str, str, str, str], None]


class ConsoleActions:
    """
    One console's actions, as both doors use them: check, run off the reactor thread,
    tell everyone on the console, count and log.

    @ivar counts: actions by (action, outcome), outcome one of C{done}, C{failed}
        (the VMM could not), C{refused} (the source cannot, or bad arguments); read by
        C{/metrics}.
    """

    _log = Logger()

    def __init__(
        self,
        name: str,
        source: Callable[[], Source],
        multiplexer: Multiplexer,
        run_blocking: Callable[[Callable[[], Any]], Deferred[Any]],
        timeout: float = 2.0,
        device: Callable[[], Any] | None = None,
    ) -> None:
        """
        @param source: the console's source now (a reload may change it in place).
        @param run_blocking: runs a blocking call in a worker thread (the console's).
        @param device: the console's open device now, or C{None} (for a BREAK, which
            goes on the console's own connection).
        """
        self._device = device
        self.name = name
        self._source = source
        self.multiplexer = multiplexer
        self._run_blocking = run_blocking
        self.timeout = timeout
        self.counts: dict[tuple[str, str], int] = {}
        #: Told of every outcome (the audit log, wired by the service): called with the
        #: console's name, the request, who, the door, the outcome and the reason. A list the service may share
        #: between consoles, so that consoles a reload adds are told too.
        self.observers: list[ActionObserver] = []

    @property
    def available(self) -> tuple[str, ...]:
        """The actions this console's source can do (see L{actions_for})."""
        return actions_for(self._source())

    def perform(self, request: ActionRequest, who: str, via: str) -> Deferred[str]:
        """
        Do C{request} for C{who} (coming through door C{via}: C{"web"}, C{"ssh"}).

        Refusals (L{ActionUnsupported}, L{ActionInvalid}) fail the Deferred before
        anything is sent to the VMM. On success everyone on the console is told, and the
        Deferred fires with the time told (ISO 8601, UTC).
        """
        source = self._source()
        try:
            check(source, request)
        except ActionError as e:
            self._outcome(request, who, via, "refused", str(e))
            return fail(e)
        d: Deferred[Any]
        if request.action == "break":
            d = self._send_break()
        else:
            d = self._run_blocking(lambda: perform(source, request, self.timeout))

        def done(_: object) -> str:
            at = self.multiplexer.announce_action(who, request.describe())
            self._outcome(request, who, via, "done", "")
            return at

        def failed(failure: Failure) -> Failure:
            failure.trap(ActionError)
            self._outcome(request, who, via, "failed", failure.getErrorMessage())
            return failure

        return d.addCallbacks(done, failed)

    def _send_break(self) -> Deferred[None]:
        """A BREAK on the console's connection, now (in order with the input before it)."""
        device = self._device() if self._device is not None else None
        if device is None or not getattr(device, "can_break", False):
            return fail(ActionError("the console is not open now: no BREAK sent"))
        device.send_break()
        return succeed(None)

    def _outcome(self, request: ActionRequest, who: str, via: str, outcome: str, reason: str) -> None:
        """Count and log one action's outcome, with structured fields (for the audit)."""
        key = (request.action, outcome)
        self.counts[key] = self.counts.get(key, 0) + 1
        fields = dict(
            console=self.name, action=request.action, key=request.key, who=who, via=via,
            outcome=outcome, reason=reason, description=request.describe(),
        )
        for observer in self.observers:
            observer(self.name, request, who, via, outcome, reason)
        if outcome == "done":
            self._log.info("console {console}: {who} sent {description} ({via})", **fields)
        else:
            self._log.warn(
                "console {console}: {description} by {who} ({via}) {outcome}: {reason}", **fields
            )
