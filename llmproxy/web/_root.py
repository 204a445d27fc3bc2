"""The public root resource: health checks, and the proxy for the rest."""

from __future__ import annotations

import json
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request

from llmproxy import __version__
from llmproxy.metrics import Metrics
from llmproxy.proxy import ProxyResource, reason_phrase

__all__ = ["HEALTH", "RootResource", "json_body"]

#: The body of ``/healthz``.
HEALTH = json.dumps({"status": "ok", "version": __version__}).encode()


def json_body(request: Request, body: bytes) -> bytes:
    """Mark ``request``'s response as uncached JSON; return ``body``."""
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return body


class RootResource(Resource):
    """llmproxy's root: health checks, and the proxy for everything else.

    Attributes:
        proxy: The proxy resource serving new requests.
        metrics: The Prometheus instruments (serve them with
            :func:`build_admin_resource`).
        ready: Whether ``/readyz`` says ready: true once the daemon listens
            (an embedding app's resource is ready when built).
    """

    isLeaf = True

    def __init__(self, proxy: ProxyResource, metrics: Metrics | None = None) -> None:
        """Wrap the proxy.

        Args:
            proxy: The proxy resource (a reload puts another in its place).
            metrics: The instruments the proxy updates.
        """
        super().__init__()
        self.proxy = proxy
        self.metrics = metrics
        self.ready = True

    def render(self, request: Request) -> Any:
        """Answer health checks, proxy the rest.

        Args:
            request: The request; ``postpath`` is the path below this
                resource.

        Returns:
            The body for health checks, else ``NOT_DONE_YET``.
        """
        postpath = request.postpath
        if len(postpath) == 1 and request.method in (b"GET", b"HEAD"):
            if postpath[0] == b"healthz":
                return json_body(request, HEALTH)
            if postpath[0] == b"readyz":
                return self.render_public_ready(request)
        return self.proxy.render(request)

    def render_public_ready(self, request: Request) -> bytes:
        """``/readyz`` on the public port: 200 ``ready`` or 503 ``starting``.

        Only the word: the upstreams and their health are for the admin
        listener (:meth:`render_ready`), never for anyone who can reach the
        proxy.
        """
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        if not self.ready:
            request.setResponseCode(503, reason_phrase(503))
            return b"starting\n"
        return b"ready\n"

    def render_ready(self, request: Request) -> bytes:
        """``/readyz`` on the admin listener: 200 once listening with a loaded
        config, else 503.

        The body lists every pool and its upstreams' health.
        """
        pools = [
            {"pool": pool.name, "upstreams": pool.state()}
            for pool in self.proxy.router.pools()
        ]
        if not self.ready:
            request.setResponseCode(503, reason_phrase(503))
            return json_body(request, json.dumps({"status": "starting", "pools": pools}).encode())
        return json_body(request, json.dumps({"status": "ready", "pools": pools}).encode())
