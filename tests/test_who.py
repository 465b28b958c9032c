"""
Who is on a console: the v1 C{clients} message's list and C{/api/consoles}' C{watchers},
told to credentials only, from a real server with real pages.
"""

from __future__ import annotations

import json
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase, TestCase

from cloud_console.console.multiplexer import ClientLabel
from cloud_console.web.dialects import who_is_on
from tests.helpers import Guest, connect_v1, free_port, http_get, serve_process


class WhoIsOnTests(SynchronousTestCase):
    """The list from the multiplexer's viewers."""

    def test_named_listed_anonymous_counted(self) -> None:
        """Named viewers are listed oldest first, with door, address, mode, since; the others counted."""
        viewers = [
            (ClientLabel("web", "anonymous", "10.0.0.9", 0.0), False),
            (ClientLabel("ssh", "alice@laptop", "10.0.0.1", 60.0), False),
            (None, True),
            (ClientLabel("web", "bob", "10.0.0.2", 3600.5), True),
        ]
        self.assertEqual(who_is_on(viewers), {
            "watchers": [
                {"identity": "alice@laptop", "front": "ssh", "address": "10.0.0.1", "readOnly": False,
                 "since": "1970-01-01T00:01:00Z"},
                {"identity": "bob", "front": "web", "address": "10.0.0.2", "readOnly": True,
                 "since": "1970-01-01T01:00:00Z"},
            ],
            "anonymous": 2,
        })


class WhoServerTests(TestCase):
    """A real server: who sees the list, and what it says."""

    timeout = 60

    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir()
        self.guests = [Guest(), Guest()]
        for guest in self.guests:
            self.addCleanup(guest.close)
            guest.start_reading()

    async def serve(self, *more: str) -> int:
        port = free_port()
        await serve_process(self, [
            "--console", f"vm1=pty:{self.guests[0].path}", "--console", f"vm2=pty:{self.guests[1].path}",
            "--port", f"tcp:port={port}:interface=127.0.0.1", *more,
        ])
        return port

    async def test_credentials_see_who(self) -> None:
        """Two named pages: each is told both (the read-only one too), and the API lists them."""
        tokens = self.dir / "tokens"
        tokens.write_text("alice-0123456789abcdef name=alice\nbob-0123456789abcdef read-only name=bob\n")
        port = await self.serve("--token-file", str(tokens))
        alice = await connect_v1(port, "/c/vm1/ws", {"Authorization": "Bearer alice-0123456789abcdef"})
        bob = await connect_v1(port, "/c/vm1/ws", {"Authorization": "Bearer bob-0123456789abcdef"})
        for page in (alice, bob):
            await page.wait_for(lambda c: any(e["count"] == 2 for e in c.events_of("clients")))
            last = page.events_of("clients")[-1]
            self.assertEqual(
                [(w["identity"], w["front"], w["address"], w["readOnly"]) for w in last["watchers"]],
                [("alice", "web", "127.0.0.1", False), ("bob", "web", "127.0.0.1", True)],
            )
            self.assertEqual(last["anonymous"], 0)
            self.assertRegex(last["watchers"][0]["since"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        code, body = await http_get(port, "/api/consoles", {"Authorization": "Bearer bob-0123456789abcdef"})
        self.assertEqual(code, 200)
        consoles = {c["name"]: c for c in json.loads(body)["consoles"]}
        self.assertEqual(consoles["vm1"]["watchers"], ["alice", "bob"])
        self.assertEqual(consoles["vm2"]["watchers"], [])
        bob.sendClose()
        await bob.closed
        await alice.wait_for(lambda c: c.events_of("clients")[-1]["count"] == 1)
        self.assertEqual([w["identity"] for w in alice.events_of("clients")[-1]["watchers"]], ["alice"])

    async def test_anonymous_not_told(self) -> None:
        """Without credentials the pages get the count only, and the API no watchers."""
        port = await self.serve()
        first = await connect_v1(port, "/c/vm1/ws")
        second = await connect_v1(port, "/c/vm1/ws")
        await first.wait_for(lambda c: any(e["count"] == 2 for e in c.events_of("clients")))
        for page in (first, second):
            for event in page.events_of("clients"):
                self.assertEqual(set(event), {"type", "count"})
        code, body = await http_get(port, "/api/consoles")
        self.assertEqual(code, 200)
        for console in json.loads(body)["consoles"]:
            self.assertNotIn("watchers", console)
