"""
The WebSocket upgrade's origin check: refused unless its C{Origin} is the page's own host
(or an origin the operator allowed), or any web page an operator visits could open a
WebSocket to the console and type into the VM (cross-site WebSocket hijacking).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def normalize_origin(origin: str) -> tuple[str, str, int] | None:
    """
    C{scheme://host[:port]} as (scheme, host, port) with the scheme's default port filled
    in, so C{https://a} and C{https://a:443} compare equal; C{None} if it is not one.
    """
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[scheme]


def _host_and_port(host: str, default_port: int) -> tuple[str, int] | None:
    """A Host header value as (host, port)."""
    try:
        parts = urlsplit("//" + host.strip())
        return (parts.hostname or "").lower(), parts.port or default_port
    except ValueError:
        return None


@dataclass(frozen=True)
class OriginPolicy:
    """
    Which browser origins may open the console's WebSocket.

    Allowed: a request without C{Origin} (not a browser: a browser always sends one, so
    no web page can leave it out), an origin whose host and port are the C{Host} the
    request was sent to (or the C{X-Forwarded-Host} a reverse proxy set, which a web page
    cannot set on a WebSocket), and any origin in C{allowed}. C{"*"} allows every origin.
    """

    allowed: tuple[str, ...] = ()

    @property
    def allow_any(self) -> bool:
        return "*" in self.allowed

    def permits(self, origin: str | None, hosts: Iterable[str | None]) -> bool:
        if self.allow_any or not origin:
            return True
        if origin.strip() == "null":
            return "null" in self.allowed
        parsed = normalize_origin(origin)
        if parsed is None:
            return False
        for allowed in self.allowed:
            if normalize_origin(allowed) == parsed:
                return True
        scheme, host, port = parsed
        # A Host (or X-Forwarded-Host) without a port means the scheme's default one, as a
        # browser sends it: not "whatever port the Origin has", which would let a page on
        # another port of the same name through.
        default = _DEFAULT_PORTS[scheme]
        for candidate in hosts:
            if candidate and _host_and_port(candidate, default) == (host, port):
                return True
        return False
