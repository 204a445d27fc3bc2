"""The HTTP face: the root resource and the Site.

:func:`build_resource` is the public entry for embedding llmproxy in an
existing twisted.web application::

    root = build_resource(config, reactor)
    my_root.putChild(b"llm", root)          # serves /llm/chat/completions ...

The resource answers ``/healthz`` and ``/readyz`` itself and proxies every
other path, routed by the part of the path below where it is mounted.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from llmproxy import __version__
from llmproxy.config import Config
from llmproxy.egress import Egress
from llmproxy.metrics import Metrics, MetricsResource
from llmproxy.proxy import ProxyResource
from llmproxy.routing import Router

__all__ = [
    "LLMProxySite",
    "RootResource",
    "build_admin_resource",
    "build_resource",
    "build_site",
]

_HEALTH = json.dumps({"status": "ok", "version": __version__}).encode()
_READY = json.dumps({"status": "ready"}).encode()
_NOT_READY = json.dumps({"status": "starting"}).encode()


class RootResource(Resource):
    """llmproxy's root: health checks, and the proxy for everything else.

    Attributes:
        proxy: The proxy resource.
        metrics: The Prometheus instruments (serve them with
            :func:`build_admin_resource`).
        ready: Whether ``/readyz`` says ready: true once the daemon listens
            (an embedding app's resource is ready when built).
    """

    isLeaf = True

    def __init__(
        self, proxy: ProxyResource, close: Any = None, metrics: Metrics | None = None
    ) -> None:
        """Wrap the proxy.

        Args:
            proxy: The proxy resource.
            close: A callable closing owned upstream connections.
            metrics: The instruments the proxy updates.
        """
        super().__init__()
        self.proxy = proxy
        self.metrics = metrics
        self.ready = True
        self._close = close

    def close(self) -> Deferred[None] | None:
        """Close the upstream connections this resource owns.

        Returns:
            A Deferred that fires when they are closed, or None.
        """
        return self._close() if self._close is not None else None

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
                return _json(request, _HEALTH)
            if postpath[0] == b"readyz":
                return self.render_ready(request)
        return self.proxy.render(request)

    def render_ready(self, request: Request) -> bytes:
        """``/readyz``: 200 once listening with a loaded config, else 503."""
        if not self.ready:
            request.setResponseCode(503)
            return _json(request, _NOT_READY)
        return _json(request, _READY)


class _Health(Resource):
    """``/healthz`` or ``/readyz`` of the admin site."""

    isLeaf = True

    def __init__(self, root: RootResource, ready: bool) -> None:
        super().__init__()
        self._root = root
        self._ready = ready

    def render_GET(self, request: Request) -> bytes:
        if self._ready:
            return self._root.render_ready(request)
        return _json(request, _HEALTH)


def build_admin_resource(root: RootResource) -> Resource:
    """The admin site's root: ``/metrics``, ``/healthz`` and ``/readyz``.

    Args:
        root: The proxy's root resource (its metrics and readiness).

    Returns:
        A resource to serve on the admin endpoint, never on the public one.
    """
    admin = Resource()
    if root.metrics is not None:
        admin.putChild(b"metrics", MetricsResource(root.metrics.registry))
    admin.putChild(b"healthz", _Health(root, ready=False))
    admin.putChild(b"readyz", _Health(root, ready=True))
    return admin


def _json(request: Request, body: bytes) -> bytes:
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return body


def build_resource(
    config: Config, reactor: Any, agent: IAgent | None = None
) -> RootResource:
    """Build llmproxy's root resource for a configuration.

    Args:
        config: The validated configuration.
        reactor: The reactor for connections and timers.
        agent: Send upstream requests with this agent instead of building
            one (and a pool) from the config.

    Returns:
        The root resource; mount it anywhere in a twisted.web tree.
    """
    close = None
    resolver = None
    if agent is None:
        egress = Egress(config, reactor)
        agent, close, resolver = egress, egress.close, egress.resolver
    metrics = Metrics(config, resolver=resolver) if config.metrics else None
    proxy = ProxyResource(
        Router.from_config(config), agent, reactor, config.timeouts, metrics,
        access_log=config.log.access,
    )
    return RootResource(proxy, close, metrics)


class LLMProxySite(Site):
    """The Site llmproxy listens with: no tracebacks, no server banner."""

    displayTracebacks = False

    def log(self, request: Request) -> None:
        """Proxied requests log one event of their own (see proxy.py)."""


def build_site(config: Config, reactor: Any, resource: Resource | None = None) -> LLMProxySite:
    """Build the public Site.

    Args:
        config: The validated configuration.
        reactor: The reactor.
        resource: The root resource (default: :func:`build_resource`).

    Returns:
        The Site to listen with.
    """
    root = resource if resource is not None else build_resource(config, reactor)
    site = LLMProxySite(root, reactor=reactor)
    return site
