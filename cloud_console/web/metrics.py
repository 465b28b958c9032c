"""
Prometheus metrics for C{/metrics}: every console's counters and gauges, read on scrape.

Nothing here is paid per byte or per event, and no timer runs: the consoles already keep
their counts (L{ConsoleStatusLike}, one status per console), and a custom collector turns
them into metric families only when Prometheus asks. The exposition format is
C{prometheus_client}'s own (the issue rules out writing it by hand).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple, Protocol, cast

from prometheus_client import ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry
from twisted.web import pages, resource
from twisted.web.iweb import IRequest

__all__ = [
    "ConsoleCollector",
    "ConsoleStatusLike",
    "FrontCounts",
    "MetricsPage",
    "RefusalCounts",
    "metrics_registry",
]

PREFIX = "cloud_console_"

#: The refusal reasons the WebSocket side counts; always exposed (as 0 until the first
#: refusal) so that C{rate()} and alerts see the series from the first scrape on.
KNOWN_REFUSALS = ("origin", "auth", "limit")


class ConsoleStatusLike(Protocol):
    """
    What this module reads from C{cloud_console.console.console.ConsoleStatus}.

    A protocol rather than an import so that metrics stay free of the console machinery
    (and testable with a plain dataclass). Properties, so a frozen dataclass satisfies it.
    """

    @property
    def name(self) -> str: ...
    @property
    def title(self) -> str: ...
    @property
    def up(self) -> bool: ...
    @property
    def reason(self) -> str: ...
    @property
    def since(self) -> str: ...
    @property
    def viewers(self) -> int: ...
    @property
    def bytes_out(self) -> int: ...
    @property
    def bytes_in(self) -> int: ...
    @property
    def last_output(self) -> str | None: ...
    @property
    def lagging(self) -> int: ...
    @property
    def gaps(self) -> int: ...
    @property
    def reopens(self) -> int: ...
    @property
    def history_bytes(self) -> int: ...
    @property
    def head_bytes(self) -> int: ...


class RefusalCounts:
    """
    Refused WebSocket upgrades, by reason ("origin", "auth", "limit", or any other).

    One object shared by the WebSocket factory and the auth gate, read by the collector on
    scrape. Plain ints without a lock: every caller runs in the reactor thread.
    """

    def __init__(self) -> None:
        self._counts: dict[str, int] = dict.fromkeys(KNOWN_REFUSALS, 0)

    def count(self, reason: str) -> None:
        """Record one refused upgrade for C{reason}."""
        self._counts[reason] = self._counts.get(reason, 0) + 1

    def snapshot(self) -> dict[str, int]:
        """
        The counts now, the known reasons always present (0 until counted).

        A copy, so a caller cannot change the counts or see them move under it.
        """
        return dict(self._counts)


class WorkerCounts(NamedTuple):
    """The read workers now: how many run, and how many consoles they read."""

    running: int
    consoles: int


class FrontCounts(NamedTuple):
    """
    The front doors' figures now: sessions attached by door (C{"web"}, C{"ssh"}) and
    authentication failures by door and reason. Read on scrape from the doors' own counts.
    """

    sessions: dict[str, int]
    auth_failures: dict[tuple[str, str], int]


class _PerConsole(NamedTuple):
    """One per-console metric: its name after the prefix, help, family type, unit, reader."""

    name: str
    documentation: str
    family: type[CounterMetricFamily] | type[GaugeMetricFamily]
    unit: str
    read: Callable[[ConsoleStatusLike], float]


_COUNTER = CounterMetricFamily
_GAUGE = GaugeMetricFamily

# Counters get "_total" from prometheus_client; units are the name's last part, as the
# Prometheus naming conventions ask (and OpenMetrics' UNIT line checks).
_PER_CONSOLE = (
    _PerConsole(
        "read_bytes",
        "Bytes read from the console (what the guest wrote) since the server started.",
        _COUNTER,
        "bytes",
        lambda s: s.bytes_out,
    ),
    _PerConsole(
        "written_bytes",
        "Bytes of input written to the console since the server started.",
        _COUNTER,
        "bytes",
        lambda s: s.bytes_in,
    ),
    _PerConsole(
        "clients",
        "WebSocket clients connected to the console now.",
        _GAUGE,
        "",
        lambda s: s.viewers,
    ),
    _PerConsole(
        "lagging",
        "Times a client fell behind the history it needed (a gap notice or a close).",
        _COUNTER,
        "",
        lambda s: s.lagging,
    ),
    _PerConsole(
        "gaps",
        "Gap notices or gap closes sent to clients, for any reason.",
        _COUNTER,
        "",
        lambda s: s.gaps,
    ),
    _PerConsole(
        "up", "Whether the console is open (1) or down (0).", _GAUGE, "", lambda s: 1 if s.up else 0
    ),
    _PerConsole(
        "reopens",
        "Times the console came back after going down.",
        _COUNTER,
        "",
        lambda s: s.reopens,
    ),
    _PerConsole(
        "history_bytes",
        "Bytes held in the console's history ring.",
        _GAUGE,
        "bytes",
        lambda s: s.history_bytes,
    ),
    _PerConsole(
        "head_bytes",
        "Bytes held in the console's boot head.",
        _GAUGE,
        "bytes",
        lambda s: s.head_bytes,
    ),
)


class ConsoleCollector(Collector):
    """
    Builds every metric family from live state on each scrape (the "custom collector" of
    C{prometheus_client}).

    Instrumenting the byte paths with C{Counter.inc()} would cost a call and a lock per
    read and per write on the hottest path; the consoles count anyway, so reading their
    statuses when asked costs nothing between scrapes. Consoles added or removed simply
    appear or vanish on the next scrape: no registration follows them.
    """

    def __init__(
        self,
        statuses: Callable[[], Iterable[ConsoleStatusLike]],
        refusals: RefusalCounts,
        fronts: Callable[[], FrontCounts] | None = None,
        workers: Callable[[], WorkerCounts] | None = None,
    ) -> None:
        """
        @param statuses: returns the statuses of the consoles to show now (already
            filtered for the credential, where there is one).
        @param refusals: the refused-upgrade counts of the process.
        @param fronts: the front doors' sessions and authentication failures (the whole
            process's; left out where a credential sees only its consoles).
        @param workers: the read workers' figures (the process's, likewise).
        """
        self.statuses = statuses
        self.refusals = refusals
        self.fronts = fronts
        self.workers = workers

    def collect(self) -> Iterator[Metric]:
        """Yield the metric families for the consoles and refusals as they are now."""
        current = list(self.statuses())
        yield GaugeMetricFamily(
            PREFIX + "consoles",
            "Consoles configured (and visible to this scrape).",
            value=len(current),
        )
        for metric in _PER_CONSOLE:
            family = metric.family(
                PREFIX + metric.name, metric.documentation, labels=["console"], unit=metric.unit
            )
            for status in current:
                family.add_metric([status.name], metric.read(status))
            yield family
        actions = CounterMetricFamily(
            PREFIX + "actions",
            "Console actions (sysrq, break, reset, power-button) tried, by outcome: done, "
            "failed (the VMM could not), refused (the source cannot).",
            labels=["console", "action", "outcome"],
        )
        for status in current:
            counts: dict[tuple[str, str], int] = getattr(status, "action_counts", {})
            for (action, outcome), count in sorted(counts.items()):
                actions.add_metric([status.name, action, outcome], count)
        yield actions
        if self.workers is not None:
            running, read = self.workers()
            yield GaugeMetricFamily(
                PREFIX + "read_workers",
                "Read worker processes running (they read the consoles nobody watches).",
                value=running,
            )
            yield GaugeMetricFamily(
                PREFIX + "consoles_read_by_workers",
                "Consoles a read worker reads now (the others: the main process).",
                value=read,
            )
        refused = CounterMetricFamily(
            PREFIX + "refused_upgrades",
            "WebSocket upgrades refused, by reason (origin, auth, limit).",
            labels=["reason"],
        )
        for reason, count in sorted(self.refusals.snapshot().items()):
            refused.add_metric([reason], count)
        yield refused
        if self.fronts is None:
            return
        fronts = self.fronts()
        sessions = GaugeMetricFamily(
            PREFIX + "sessions",
            "Viewers attached now, by front door (web: pages and WebSocket clients; ssh).",
            labels=["front"],
        )
        for front, count in sorted(fronts.sessions.items()):
            sessions.add_metric([front], count)
        yield sessions
        failures = CounterMetricFamily(
            PREFIX + "auth_failures",
            "Authentications refused, by front door and reason.",
            labels=["front", "reason"],
        )
        for (front, reason), count in sorted(fronts.auth_failures.items()):
            failures.add_metric([front, reason], count)
        yield failures


def metrics_registry(
    statuses: Callable[[], Iterable[ConsoleStatusLike]],
    refusals: RefusalCounts,
    *,
    process: bool = True,
    fronts: Callable[[], FrontCounts] | None = None,
    workers: Callable[[], WorkerCounts] | None = None,
) -> CollectorRegistry:
    """
    A fresh registry holding our collector (not the global C{REGISTRY}).

    A registry of our own so that several can coexist (one per credential on the main
    port, a full one on C{--metrics-port}) and tests never see each other's collectors.

    The process collector is added by default: with hundreds of consoles in one process,
    its resident memory, CPU seconds and open file descriptors (each console holds one or
    more) are what an operator watches for, and it too reads C{/proc} only on scrape. The
    platform and GC collectors are left out: the Python version is no operational signal
    here, and GC counts are noise next to RSS. C{process=False} leaves the process
    collector out (for instance where a credential should see its consoles only).
    """
    registry = CollectorRegistry()
    registry.register(ConsoleCollector(statuses, refusals, fronts, workers))
    if process:
        ProcessCollector(registry=registry)
    return registry


class MetricsPage(resource.Resource):
    """
    C{GET /metrics}: the Prometheus text format from C{prometheus_client}.

    The caller decides what a request may see: C{registry_for(request)} returns the
    registry to render (consoles filtered by the request's credential), or C{None} for a
    404 (so a request that may see nothing learns nothing, as elsewhere).
    """

    isLeaf = True
    allowed = (b"GET", b"HEAD")

    def __init__(self, registry_for: Callable[[IRequest], CollectorRegistry | None]) -> None:
        resource.Resource.__init__(self)
        self.registry_for = registry_for

    def render(self, request: IRequest) -> bytes | int:
        """
        Render the registry for GET and HEAD (twisted.web drops the body of a HEAD);
        405 with C{Allow} otherwise, since a scrape never posts.
        """
        if request.method not in self.allowed:
            request.setHeader(b"allow", b", ".join(self.allowed))
            refusal = pages.errorPage(405, "Method Not Allowed", "GET or HEAD only.")
            return self._error(refusal, request)
        registry = self.registry_for(request)
        if registry is None:
            return self._error(pages.notFound(), request)
        body: bytes = generate_latest(registry)
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        # A scrape is the state now: a cached copy would show a proxy's idea of it.
        request.setHeader(b"cache-control", b"no-store")
        return body

    @staticmethod
    def _error(page: resource.IResource, request: IRequest) -> bytes | int:
        """
        Render one of C{twisted.web.pages}' error pages, which set the code and type and
        write the page themselves (returning C{NOT_DONE_YET}).
        """
        return cast("bytes | int", page.render(request))
