"""
C{POST /c/NAME/actions/ACTION}: the web door to a console's actions (SysRq, reset, power
button; L{cloud_console.console.actions}).

Checked like the WebSocket upgrade: the gate has checked the credential and
L{cloud_console.web.site.ConsolePages} the console (404 for one it may not see); here
come the origin (a page elsewhere must not act through an operator's browser), a JSON
content type (a cross-site HTML form can only send form encodings or text, and a JSON
one needs a CORS preflight this server never answers), and the C{control} right (403).
Only then is the source asked whether it can (409 with the reason) and the VMM told.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.server import Request

from ..console.actions import (
    ACTIONS,
    ActionError,
    ActionInvalid,
    ActionRequest,
    ActionUnsupported,
    ConsoleActions,
)
from .gate import access_of
from .origin import OriginPolicy

#: Largest request body read: an action's arguments are a few bytes.
MAX_BODY = 4096


def _answer(request: Request, code: int, body: dict[str, Any]) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body).encode("utf-8")


class ActionsPage(resource.Resource):
    """
    C{/c/NAME/actions/ACTION} for one console and one scope (whether it may control).
    """

    isLeaf = True
    _log = Logger()

    def __init__(self, actions: ConsoleActions, control: bool, origins: OriginPolicy) -> None:
        resource.Resource.__init__(self)
        self.actions = actions
        self.control = control
        self.origins = origins

    def render_GET(self, request: Request) -> bytes:
        """
        C{GET actions/}: the actions this credential may use here (the page asks this,
        under the console's own path, where a signed link's cookie is sent). An action's
        own URL takes only POST.
        """
        postpath = request.postpath or []
        if postpath not in ([], [b""]):
            request.setHeader(b"allow", b"POST")
            return _answer(request, 405, {"ok": False, "error": "an action is a POST"})
        return _answer(request, 200, {"actions": list(self.actions.available) if self.control else []})

    def render_POST(self, request: Request) -> Any:
        """Check, act, and answer JSON (C{ok}, and C{error} or C{at})."""
        postpath = request.postpath or []
        name = postpath[0].decode("latin-1") if len(postpath) == 1 else ""
        if name not in ACTIONS:
            return _answer(request, 404, {"ok": False, "error": f"no action {name!r}; actions: {', '.join(ACTIONS)}"})
        access = access_of(request)
        who = access.name if access is not None else "anonymous"
        peer = request.getClientAddress()
        origin = request.getHeader(b"origin")
        hosts = (request.getHeader(b"host"), request.getHeader(b"x-forwarded-host"))
        if not self.origins.permits(
            origin.decode("latin-1") if origin is not None else None,
            tuple(h.decode("latin-1") if h is not None else None for h in hosts),
        ):
            self._refused(name, who, peer, "origin not allowed")
            return _answer(request, 403, {"ok": False, "error": "origin not allowed"})
        content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if content_type != b"application/json":
            self._refused(name, who, peer, "not JSON")
            return _answer(request, 415, {"ok": False, "error": "the body must be JSON (Content-Type: application/json)"})
        if not self.control or (access is not None and not access.may_control):
            self._refused(name, who, peer, "no control right")
            return _answer(request, 403, {"ok": False, "error": "this credential may not control this console"})
        content = request.content
        raw = content.read(MAX_BODY + 1) if content is not None else b""
        try:
            body = json.loads(raw or b"{}")
            if not isinstance(body, dict):
                raise ValueError("not an object")
            key = body.get("key")
            if key is not None and not isinstance(key, str):
                raise ValueError("key is not a string")
        except ValueError as e:
            return _answer(request, 400, {"ok": False, "error": f"the body must be a JSON object: {e}"})
        action = ActionRequest(name, key)
        d: defer.Deferred[str] = self.actions.perform(action, who, "web")

        def done(at: str) -> None:
            request.write(_answer(request, 200, {
                "ok": True, "action": name, "key": key, "description": action.describe(), "by": who, "at": at,
            }))
            request.finish()

        def failed(failure: Failure) -> None:
            failure.trap(ActionError)
            error = failure.value
            code = 409 if isinstance(error, ActionUnsupported) else 400 if isinstance(error, ActionInvalid) else 502
            request.write(_answer(request, code, {"ok": False, "error": str(error)}))
            request.finish()

        d.addCallbacks(done, failed)
        d.addErrback(request.processingFailed)
        return server.NOT_DONE_YET

    def _refused(self, action: str, who: str, peer: Any, why: str) -> None:
        self._log.warn(
            "console {console}: {action} by {who} from {peer} refused: {why}",
            console=self.actions.name, action=action, who=who, peer=str(peer), why=why,
        )
