"""
A host's consoles in one real C{cloud-console} process: named consoles on the command
line, a C{--config} file reloaded on SIGHUP with a real edit, a C{--console-dir} watched
with inotify, the index API, C{/healthz}, C{/metrics} parsed with prometheus_client, access
per console, and the limits.

Guests are real ptys; clients are real v1 WebSocket clients and HTTP requests; waits are
on events (bytes, messages, lines in the server's log).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import TestCase

from tests.helpers import Guest, Server, V1Client, connect_v1, free_port, http_get, serve_process, spawn_server


async def get_json(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    code, body = await http_get(port, path, headers)
    return code, json.loads(body)


class FleetTestCase(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir()

    def guest(self) -> Guest:
        guest = Guest()
        self.addCleanup(guest.close)
        guest.start_reading()
        return guest

    def link(self, name: str, guest: Guest, where: Path | None = None) -> Path:
        """A symlink (as a VMM keeps one) named C{name} to C{guest}'s pty."""
        path = (where or self.dir) / name
        if path.is_symlink():
            path.unlink()
        path.symlink_to(guest.path)
        return path

    async def serve(self, *args: str) -> Server:
        """A server on a port of its own; returns once every port it has is listening."""
        self.port = free_port()
        server = await serve_process(self, [*args, "--port", f"tcp:port={self.port}:interface=127.0.0.1"])
        ports = 1 + args.count("--metrics-port")
        await server.log_line(lambda err: err.count(b"starting on") >= ports)
        return server

    async def v1(self, name: str) -> V1Client:
        client = await connect_v1(self.port, f"/c/{name}/ws")
        self.addCleanup(lambda: None if client.close_status else client.transport.abortConnection())
        return client

    async def reloaded(self, server: Server, since: int) -> None:
        """Wait for a "consoles reloaded" log line after the first C{since} of them."""
        await server.log_line(lambda err: err.count(b"consoles reloaded") > since)


class ConsolesTests(FleetTestCase):
    """Named consoles: each its own stream, input, state and URL; none disturbs another."""

    async def test_two_consoles_isolated(self) -> None:
        """
        Output and input stay with their console; the API lists both with their state;
        one hanging up (a bare /dev/pts/N: not reopened) is shown down, /healthz says
        503 naming it, and the other console and the process carry on.
        """
        a, b = self.guest(), self.guest()
        server = await self.serve("--console", f"vm-a={a.path}", "--console", f"vm-b={b.path}")
        client_a, client_b = await self.v1("vm-a"), await self.v1("vm-b")
        self.assertEqual(client_a.events_of("hello")[0]["title"], "vm-a")
        await a.write(b"from a\r\n")
        await b.write(b"from b\r\n")
        await client_a.wait_text("from a\r\n")
        await client_b.wait_text("from b\r\n")
        self.assertNotIn("from b", client_a.text())
        client_b.type(b"typed in b\r")
        await b.receives(lambda got: got == b"typed in b\r")
        self.assertEqual(bytes(a.input), b"")
        code, listing = await get_json(self.port, "/api/consoles")
        self.assertEqual(code, 200)
        self.assertEqual([c["name"] for c in listing["consoles"]], ["vm-a", "vm-b"])
        self.assertEqual(listing["totals"], {"consoles": 2, "up": 2, "down": 0, "viewers": 2})
        [first, _] = listing["consoles"]
        self.assertEqual((first["state"], first["bytesOut"], first["url"]), ("up", 8, "c/vm-a/"))
        code, health = await get_json(self.port, "/healthz")
        self.assertEqual((code, health["status"]), (200, "ok"))

        b.hang_up()
        code, _ = await client_b.closed
        self.assertEqual(code, 4001)
        code, health = await get_json(self.port, "/healthz")
        self.assertEqual((code, health["down"]), (503, 1))
        self.assertEqual([c["name"] for c in health["downConsoles"]], ["vm-b"])
        await a.write(b"still here\r\n")
        await client_a.wait_text("still here\r\n")
        self.assertIsNone(server.status)
        code, _ = await http_get(self.port, "/c/nope/")
        self.assertEqual(code, 404)

    async def test_metrics(self) -> None:
        """/metrics parses as Prometheus text and counts each console's bytes and viewers."""
        a = self.guest()
        await self.serve("--console", f"vm1={a.path}")
        client = await self.v1("vm1")
        await a.write(b"12345")
        await client.wait_text("12345")
        code, body = await http_get(self.port, "/metrics")
        self.assertEqual(code, 200)
        samples = {
            (sample.name, sample.labels.get("console")): sample.value
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
        }
        self.assertEqual(samples[("cloud_console_read_bytes_total", "vm1")], 5)
        self.assertEqual(samples[("cloud_console_clients", "vm1")], 1)
        self.assertEqual(samples[("cloud_console_up", "vm1")], 1)

    async def test_max_clients_total(self) -> None:
        """--max-clients-total holds over every console: the next upgrade anywhere is 503."""
        a, b = self.guest(), self.guest()
        await self.serve("--console", f"a={a.path}", "--console", f"b={b.path}", "--max-clients-total", "1")
        await self.v1("a")
        with self.assertRaises(AssertionError):
            await self.v1("b")
        code, body = await http_get(self.port, "/metrics")
        self.assertIn(b'cloud_console_refused_upgrades_total{reason="limit"} 1.0', body)


class ConfigTests(FleetTestCase):
    """--config: consoles from a TOML file, reloaded on SIGHUP by difference."""

    def write_config(self, consoles: dict[str, dict[str, Any]]) -> Path:
        lines = []
        for name, table in consoles.items():
            lines.append(f"[console.{name}]")
            lines.extend(f"{key} = {json.dumps(value)}" for key, value in table.items())
        path = self.dir / "consoles.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    async def test_sighup_reload(self) -> None:
        """
        A real edit then SIGHUP: a removed console's client is closed with 4001
        "console removed"; an added one is served; an unchanged one keeps its client,
        history and offsets; a changed title applies in place; a bad edit is logged and
        the last good config stays.
        """
        a, b, c = self.guest(), self.guest(), self.guest()
        config = self.write_config({
            "vm-a": {"source": str(self.link("a", a)), "title": "A"},
            "vm-b": {"source": str(self.link("b", b))},
        })
        server = await self.serve("--config", str(config), "--log-dir", str(self.dir))
        client_a, client_b = await self.v1("vm-a"), await self.v1("vm-b")
        await a.write(b"before\r\n")
        await client_a.wait_text("before\r\n")
        self.write_config({
            "vm-a": {"source": str(self.link("a", a)), "title": "A again"},
            "vm-c": {"source": str(self.link("c", c))},
        })
        reloads = server.count(b"consoles reloaded")
        server.signal("HUP")
        code, reason = await client_b.closed
        self.assertEqual((code, reason), (4001, "console removed"))
        await self.reloaded(server, reloads)
        code, listing = await get_json(self.port, "/api/consoles")
        self.assertEqual(
            [(x["name"], x["title"]) for x in listing["consoles"]], [("vm-a", "A again"), ("vm-c", "vm-c")]
        )
        await a.write(b"after\r\n")
        await client_a.wait_text("after\r\n")
        self.assertEqual(bytes(client_a.stream), b"before\r\nafter\r\n")
        self.assertIsNone(client_a.close_status)
        client_c = await self.v1("vm-c")
        await c.write(b"new console")
        await client_c.wait_text("new console")
        self.assertEqual((self.dir / "vm-a.log").read_bytes(), b"before\r\nafter\r\n")

        (self.dir / "consoles.toml").write_text("[console.vm-a]\nsource = 42\n")
        server.signal("HUP")
        await server.log_line(lambda err: b"config not reloaded" in err)
        code, listing = await get_json(self.port, "/api/consoles")
        self.assertEqual([x["name"] for x in listing["consoles"]], ["vm-a", "vm-c"])
        self.assertIn(b"consoles.toml:2:", server.stderr)

    async def test_bad_config_is_a_usage_error(self) -> None:
        """A bad file at start-up is exit status 1, naming the line and the key."""
        path = self.dir / "bad.toml"
        path.write_text('[console.vm1]\nsource = "/dev/pts/9"\nhistroy-size = 5\n')
        server = spawn_server(["--config", str(path)])
        server.listening.addErrback(lambda failure: None)
        self.assertEqual(await server.ended, 1)
        self.assertIn(b"histroy-size", server.stderr)
        self.assertIn(b"bad.toml:3:", server.stderr)

    async def test_name_on_command_line_and_in_config(self) -> None:
        """A name given both on the command line and in the config is a usage error."""
        a = self.guest()
        config = self.write_config({"vm1": {"source": a.path}})
        server = spawn_server(["--config", str(config), "--console", f"vm1={a.path}"])
        server.listening.addErrback(lambda failure: None)
        self.assertEqual(await server.ended, 1)
        self.assertIn(b"vm1", server.stderr)


class ConsoleDirTests(FleetTestCase):
    """--console-dir: entries appearing and disappearing are picked up (inotify)."""

    async def test_entries_come_and_go(self) -> None:
        """
        A symlink added to the directory becomes a console; removing one closes its
        clients with 4001 "console removed"; names not matching the pattern are ignored.
        """
        consoles = self.dir / "consoles"
        consoles.mkdir()
        a, b = self.guest(), self.guest()
        self.link("vm-a", a, consoles)
        server = await self.serve("--console-dir", str(consoles))
        client_a = await self.v1("vm-a")
        reloads = server.count(b"consoles reloaded")
        self.link("vm-b", b, consoles)
        self.link("Not A Name", b, consoles)
        await self.reloaded(server, reloads)
        code, listing = await get_json(self.port, "/api/consoles")
        self.assertEqual([x["name"] for x in listing["consoles"]], ["vm-a", "vm-b"])
        client_b = await self.v1("vm-b")
        await b.write(b"b here")
        await client_b.wait_text("b here")
        (consoles / "vm-a").unlink()
        code, reason = await client_a.closed
        self.assertEqual((code, reason), (4001, "console removed"))
        self.assertIsNone(client_b.close_status)


class AccessTests(FleetTestCase):
    """Credentials limited to some consoles: the others are 404, not 403."""

    async def test_tokens_per_console(self) -> None:
        """
        A token for web-* sees web-1 (page, API, WebSocket) and not db1 (404); no token
        is 401 whatever the console; /healthz without a credential gives counts only;
        /metrics needs a credential and shows its consoles; --metrics-port serves both in
        full without one.
        """
        web, db = self.guest(), self.guest()
        tokens = self.dir / "tokens"
        tokens.write_text("web-operator-token-0123456789 consoles=web-*\n")
        metrics_port = free_port()
        await self.serve(
            "--console", f"web-1={web.path}", "--console", f"db1={db.path}",
            "--token-file", str(tokens),
            "--metrics-port", f"tcp:port={metrics_port}:interface=127.0.0.1",
        )
        auth = {"Authorization": "Bearer web-operator-token-0123456789"}
        self.assertEqual((await http_get(self.port, "/c/web-1/", auth))[0], 200)
        self.assertEqual((await http_get(self.port, "/c/db1/", auth))[0], 404)
        self.assertEqual((await http_get(self.port, "/c/db1/"))[0], 401)
        self.assertEqual((await http_get(self.port, "/c/nothing/"))[0], 401)
        code, listing = await get_json(self.port, "/api/consoles", auth)
        self.assertEqual([x["name"] for x in listing["consoles"]], ["web-1"])
        code, health = await get_json(self.port, "/healthz")
        self.assertEqual((code, health["consoles"]), (200, 2))
        self.assertNotIn("downConsoles", health)
        self.assertEqual((await http_get(self.port, "/metrics"))[0], 401)
        code, body = await http_get(self.port, "/metrics", auth)
        self.assertIn(b'console="web-1"', body)
        self.assertNotIn(b'console="db1"', body)
        code, body = await http_get(metrics_port, "/metrics")
        self.assertEqual(code, 200)
        self.assertIn(b'console="db1"', body)
        code, health = await get_json(metrics_port, "/healthz")
        self.assertEqual(health["downConsoles"], [])

