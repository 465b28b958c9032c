"""
Tests for L{cloud_console.web.metrics}: the refusal counts, the collector read through a real
Prometheus text parse (C{prometheus_client.parser}), and the C{/metrics} resource.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import cast

from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IRequest
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest

from cloud_console.web.metrics import MetricsPage, RefusalCounts, WorkerCounts, metrics_registry


@dataclass(frozen=True)
class FakeStatus:
    """Has the attributes of C{ConsoleStatus} that the collector reads, and no more."""

    name: str
    title: str = "a title"
    up: bool = True
    reason: str = "opened pty /dev/pts/3"
    since: str = "2026-12-01T20:00:00Z"
    viewers: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    last_output: str | None = None
    lagging: int = 0
    gaps: int = 0
    reopens: int = 0
    history_bytes: int = 0
    head_bytes: int = 0


PER_CONSOLE = {
    # family name as the parser gives it: (type, attribute of the status)
    "cloud_console_read_bytes": ("counter", "bytes_out"),
    "cloud_console_written_bytes": ("counter", "bytes_in"),
    "cloud_console_clients": ("gauge", "viewers"),
    "cloud_console_lagging": ("counter", "lagging"),
    "cloud_console_gaps": ("counter", "gaps"),
    "cloud_console_up": ("gauge", "up"),
    "cloud_console_reopens": ("counter", "reopens"),
    "cloud_console_history_bytes": ("gauge", "history_bytes"),
    "cloud_console_head_bytes": ("gauge", "head_bytes"),
}


def scrape(registry: CollectorRegistry) -> dict[str, Metric]:
    """Expose C{registry} as text and parse it back, as a Prometheus server would."""
    text = generate_latest(registry).decode("utf-8")
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(family: Metric) -> dict[tuple[tuple[str, str], ...], float]:
    """A family's values keyed by their sorted labels (the C{_created} samples left out)."""
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


class RefusalCountsTests(SynchronousTestCase):
    """L{RefusalCounts} adds up refusals by reason."""

    def test_known_reasons_start_at_zero(self) -> None:
        """The three reasons the server counts are present before any refusal."""
        self.assertEqual(RefusalCounts().snapshot(), {"origin": 0, "auth": 0, "limit": 0})

    def test_count(self) -> None:
        """Each count adds one to its reason; an unforeseen reason gets its own count."""
        refusals = RefusalCounts()
        refusals.count("auth")
        refusals.count("auth")
        refusals.count("limit")
        refusals.count("something-else")
        self.assertEqual(
            refusals.snapshot(), {"origin": 0, "auth": 2, "limit": 1, "something-else": 1}
        )

    def test_snapshot_is_a_copy(self) -> None:
        """Changing a snapshot changes nothing counted, and a snapshot does not move later."""
        refusals = RefusalCounts()
        snapshot = refusals.snapshot()
        snapshot["auth"] = 99
        refusals.count("origin")
        self.assertEqual(snapshot["origin"], 0)
        self.assertEqual(refusals.snapshot()["auth"], 0)


class CollectorTests(SynchronousTestCase):
    """The collector shows the consoles' statuses as they are at each scrape."""

    def setUp(self) -> None:
        self.statuses: list[FakeStatus] = [
            FakeStatus(
                name="vm1",
                viewers=2,
                bytes_out=12345,
                bytes_in=67,
                lagging=3,
                gaps=4,
                reopens=5,
                history_bytes=8000,
                head_bytes=4096,
            ),
            FakeStatus(name="db-2.example", up=False, reason="no such file", bytes_out=1),
        ]
        self.refusals = RefusalCounts()
        self.registry = metrics_registry(lambda: self.statuses, self.refusals)

    def test_every_metric_with_values_and_labels(self) -> None:
        """
        Each per-console metric has the expected type and one sample per console, labelled
        C{console}, with the status's value (C{up} as 1/0); counters carry C{_total}.
        """
        families = scrape(self.registry)
        for name, (kind, attribute) in PER_CONSOLE.items():
            family = families[name]
            self.assertEqual(family.type, kind, name)
            expected = {
                (("console", status.name),): float(getattr(status, attribute))
                for status in self.statuses
            }
            self.assertEqual(samples(family), expected, name)
            sample_names = {s.name for s in family.samples if not s.name.endswith("_created")}
            self.assertEqual(sample_names, {name + "_total" if kind == "counter" else name})
        self.assertEqual(samples(families["cloud_console_up"])[(("console", "db-2.example"),)], 0.0)
        self.assertEqual(
            samples(families["cloud_console_read_bytes"])[(("console", "vm1"),)], 12345.0
        )

    def test_console_count(self) -> None:
        """C{cloud_console_consoles} is the number of consoles the scrape is given."""
        family = scrape(self.registry)["cloud_console_consoles"]
        self.assertEqual(family.type, "gauge")
        self.assertEqual(samples(family), {(): 2.0})

    def test_odd_names_label_fine(self) -> None:
        """Names with dots, dashes and underscores come back as the same label value."""
        self.statuses = [FakeStatus(name=name) for name in ("a.b-c_d", "0", "x--y..z")]
        family = scrape(self.registry)["cloud_console_up"]
        self.assertEqual(
            {dict(key)["console"] for key in samples(family)}, {"a.b-c_d", "0", "x--y..z"}
        )

    def test_values_change_between_scrapes(self) -> None:
        """
        A second scrape of the same registry shows new values, a new console and no
        removed one: nothing is registered again.
        """
        scrape(self.registry)
        self.statuses = [
            replace(self.statuses[0], bytes_out=20000, viewers=0, up=False),
            FakeStatus(name="new1", viewers=1),
        ]
        families = scrape(self.registry)
        self.assertEqual(
            samples(families["cloud_console_read_bytes"]),
            {(("console", "vm1"),): 20000.0, (("console", "new1"),): 0.0},
        )
        self.assertEqual(
            samples(families["cloud_console_clients"]),
            {(("console", "vm1"),): 0.0, (("console", "new1"),): 1.0},
        )
        self.assertEqual(samples(families["cloud_console_up"])[(("console", "vm1"),)], 0.0)

    def test_refusals_by_reason(self) -> None:
        """Refused upgrades appear by C{reason}, not per console, and follow the counts."""
        self.refusals.count("origin")
        self.refusals.count("limit")
        self.refusals.count("limit")
        family = scrape(self.registry)["cloud_console_refused_upgrades"]
        self.assertEqual(family.type, "counter")
        self.assertEqual(
            samples(family),
            {(("reason", "auth"),): 0.0, (("reason", "limit"),): 2.0, (("reason", "origin"),): 1.0},
        )
        self.refusals.count("auth")
        family = scrape(self.registry)["cloud_console_refused_upgrades"]
        self.assertEqual(samples(family)[(("reason", "auth"),)], 1.0)

    def test_read_workers(self) -> None:
        """
        With read workers, how many run and how many consoles they read, as gauges read
        at each scrape; without them (one console, or --read-workers 0) neither family.
        """
        self.assertNotIn("cloud_console_read_workers", scrape(self.registry))
        figures = [WorkerCounts(2, 7)]
        registry = metrics_registry(
            lambda: self.statuses, self.refusals, process=False, workers=lambda: figures[0]
        )
        families = scrape(registry)
        self.assertEqual(families["cloud_console_read_workers"].type, "gauge")
        self.assertEqual(samples(families["cloud_console_read_workers"]), {(): 2.0})
        self.assertEqual(samples(families["cloud_console_consoles_read_by_workers"]), {(): 7.0})
        figures[0] = WorkerCounts(1, 0)
        families = scrape(registry)
        self.assertEqual(samples(families["cloud_console_read_workers"]), {(): 1.0})
        self.assertEqual(samples(families["cloud_console_consoles_read_by_workers"]), {(): 0.0})

    def test_no_consoles(self) -> None:
        """With no consoles the families are still described, with no samples."""
        self.statuses = []
        families = scrape(self.registry)
        self.assertEqual(samples(families["cloud_console_consoles"]), {(): 0.0})
        self.assertEqual(samples(families["cloud_console_up"]), {})

    def test_process_metrics(self) -> None:
        """
        The process collector is in by default (resident memory is what a fleet operator
        watches) and left out on request.
        """
        self.assertIn("process_resident_memory_bytes", scrape(self.registry))
        bare = scrape(metrics_registry(lambda: self.statuses, self.refusals, process=False))
        self.assertEqual({name for name in bare if not name.startswith("cloud_console_")}, set())

    def test_registries_are_separate(self) -> None:
        """Two registries show their own consoles only (one per credential is possible)."""
        other = metrics_registry(lambda: [FakeStatus(name="other")], self.refusals)
        self.assertEqual(
            set(samples(scrape(other)["cloud_console_up"])), {(("console", "other"),)}
        )
        self.assertEqual(
            set(samples(scrape(self.registry)["cloud_console_up"])),
            {(("console", "vm1"),), (("console", "db-2.example"),)},
        )


@dataclass
class Response:
    """One HTTP response as the client saw it."""

    status: int
    headers: dict[bytes, list[bytes]]
    body: bytes


class MetricsPageTests(SynchronousTestCase):
    """
    L{MetricsPage} renders a registry, or refuses; served by a real twisted.web C{Site}
    on a C{StringTransport}, so headers, HEAD and error pages are what a client gets.
    """

    def setUp(self) -> None:
        self.registry = metrics_registry(
            lambda: [FakeStatus(name="vm1", bytes_out=42)], RefusalCounts(), process=False
        )
        self.asked: list[IRequest] = []

    def page(self, registry: CollectorRegistry | None) -> MetricsPage:
        """A page whose C{registry_for} records the request and returns C{registry}."""

        def registry_for(request: IRequest) -> CollectorRegistry | None:
            self.asked.append(request)
            return registry

        return MetricsPage(registry_for)

    def fetch(self, page: MetricsPage, method: bytes, path: bytes = b"/metrics") -> Response:
        """
        Send one HTTP/1.0 request for C{path} to a C{Site} serving C{page} and parse
        the response (HTTP/1.0, so the body is plain, up to the close).
        """
        site = Site(page, timeout=None, reactor=MemoryReactorClock())
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 0))
        assert channel is not None
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(method + b" " + path + b" HTTP/1.0\r\nHost: localhost\r\n\r\n")
        head, _, body = transport.value().partition(b"\r\n\r\n")
        status_line, *header_lines = head.split(b"\r\n")
        headers: dict[bytes, list[bytes]] = {}
        for line in header_lines:
            name, _, value = line.partition(b":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        return Response(int(status_line.split()[1]), headers, body)

    def test_get(self) -> None:
        """
        GET gives 200, the exposition content type, C{no-store}, and the registry's text;
        C{registry_for} is asked once.
        """
        response = self.fetch(self.page(self.registry), b"GET")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.headers[b"content-type"], [CONTENT_TYPE_LATEST.encode("ascii")])
        self.assertTrue(CONTENT_TYPE_LATEST.startswith("text/plain; version="))
        self.assertEqual(response.headers[b"cache-control"], [b"no-store"])
        text = response.body.decode("utf-8")
        families = {f.name: f for f in text_string_to_metric_families(text)}
        self.assertEqual(
            samples(families["cloud_console_read_bytes"]), {(("console", "vm1"),): 42.0}
        )
        self.assertEqual(len(self.asked), 1)
        self.assertEqual(self.asked[0].uri, b"/metrics")

    def test_head(self) -> None:
        """HEAD is allowed: 200, the same type and length as GET, and no body."""
        get = self.fetch(self.page(self.registry), b"GET")
        head = self.fetch(self.page(self.registry), b"HEAD")
        self.assertEqual(head.status, 200)
        self.assertEqual(head.headers[b"content-type"], [CONTENT_TYPE_LATEST.encode("ascii")])
        self.assertEqual(head.headers[b"content-length"], [str(len(get.body)).encode("ascii")])
        self.assertEqual(head.body, b"")

    def test_not_found(self) -> None:
        """C{registry_for} returning None gives a 404 that shows no metrics."""
        response = self.fetch(self.page(None), b"GET")
        self.assertEqual(response.status, 404)
        self.assertNotIn(b"cloud_console", response.body)
        self.assertEqual(response.headers[b"content-type"], [b"text/html; charset=utf-8"])
        self.assertEqual(len(self.asked), 1)

    def test_post_not_allowed(self) -> None:
        """Other methods are 405 with C{Allow: GET, HEAD}, and no registry is asked for."""
        for method in (b"POST", b"PUT", b"DELETE"):
            response = self.fetch(self.page(self.registry), method)
            self.assertEqual(response.status, 405, method)
            self.assertEqual(response.headers[b"allow"], [b"GET, HEAD"])
            self.assertNotIn(b"cloud_console", response.body)
        self.assertEqual(self.asked, [])

    def test_dummy_request(self) -> None:
        """Rendered directly (as a parent resource would), GET returns the text itself."""
        request = DummyRequest([b"metrics"])
        # DummyRequest provides IRequest in practice but does not declare it to mypy.
        body = self.page(self.registry).render(cast(IRequest, request))
        assert isinstance(body, bytes)
        self.assertIn(b'cloud_console_read_bytes_total{console="vm1"} 42.0', body)
        self.assertEqual(
            request.responseHeaders.getRawHeaders(b"content-type"),
            [CONTENT_TYPE_LATEST.encode("ascii")],
        )

    def test_is_leaf(self) -> None:
        """
        The page is a leaf: it answers for paths below it too (no child lookup, which on
        a plain C{Resource} would be a 404), so it can be mounted at C{/metrics} as is.
        """
        response = self.fetch(self.page(self.registry), b"GET", b"/metrics/below")
        self.assertEqual(response.status, 200)
        self.assertIn(b"cloud_console_up", response.body)
