"""Access rules (the API key of every ``/v1`` route included), and responses counted by route
and status."""

from __future__ import annotations

import ipaddress
from collections.abc import MutableMapping
from typing import Any

from app.api.deps import authorize
from app.api.responses import error_response
from app.jobs import metrics
from app.jobs.errors import (
    Forbidden,
    OpenAccessRefused,
    ServiceError,
)
from app.jobs.settings import Settings

__all__ = [
    "Guard",
]


_DOCS = frozenset({"/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"})
_HEALTH = frozenset({"/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready"})


def _loopback(host: str | None) -> bool:
    """Whether the local address a request arrived on is loopback (servers report IPs; a unix
    socket or an in-process test transport has no IP and counts as local)."""
    try:
        return host is None or ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return True


class Guard:
    """Pure ASGI middleware: access rules, and responses by status.

    - No API key and no ALLOW_OPEN: requests that arrive on a non-loopback address are refused
      (403), health checks excepted (``python -m app`` refuses to start in that configuration).
    - With a key, every ``/v1/`` path needs it (401 otherwise, before routing: an unknown
      ``/v1`` path is 401 too, not 404); PROTECT_METRICS / PROTECT_DOCS extend it to /metrics
      and the OpenAPI pages.
    """

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        refusal = self._refusal(scope, path)
        status_box = [500]

        async def sending(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status_box[0] = int(message["status"])
            await send(message)

        try:
            if refusal is not None:
                await error_response(refusal)(scope, receive, sending)
            else:
                await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or ("other" if path not in _HEALTH else path)
            metrics.child(metrics.HTTP_RESPONSES, template, str(status_box[0])).inc()

    def _refusal(self, scope: MutableMapping[str, Any], path: str) -> ServiceError | None:
        """Why the request is refused, or None; every ``/v1`` request that passes carries its
        caller's owner id in ``scope["state"]["owner"]`` (``app.api.deps.context``)."""
        s = self.settings
        if path in _HEALTH:
            return None
        api = path.startswith("/v1/")
        if not s.api_keys:
            server = scope.get("server")
            if not s.allow_open and not _loopback(server[0] if server else None):
                return OpenAccessRefused(
                    "this service has no API_KEY and refuses requests that arrive on a "
                    "non-loopback address; set API_KEY (or ALLOW_OPEN=1 to serve openly)"
                )
            if api:
                scope.setdefault("state", {})["owner"] = ""
            return None
        protected = (path == "/metrics" and s.protect_metrics) or (path in _DOCS and s.protect_docs)
        if protected or api:
            headers = {
                k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]
            }
            try:
                owner = authorize(headers, s)
            except Forbidden as exc:
                return exc
            if api:
                scope.setdefault("state", {})["owner"] = owner
        return None
