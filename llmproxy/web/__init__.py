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
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

from llmproxy import __version__
from llmproxy.config import Config, ConfigError
from llmproxy.egress import Egress
from llmproxy.egress._noproxy import NetworkSet
from llmproxy.limits import KeyStore, RateLimiter
from llmproxy.metrics import Metrics, MetricsResource
from llmproxy.proxy import Guard, ProxyResource
from llmproxy.proxy._errors import reason_phrase
from llmproxy.routing import Router

__all__ = [
    "LLMProxySite",
    "RootResource",
    "build_admin_resource",
    "build_resource",
    "build_site",
]

log = Logger()

_HEALTH = json.dumps({"status": "ok", "version": __version__}).encode()


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
        self.retired: list[ProxyResource] = []
        self._close = close

    def close(self) -> Deferred[None] | None:
        """Close the upstream connections this resource owns.

        Returns:
            A Deferred that fires when they are closed, or None.
        """
        return self._close() if self._close is not None else None

    def replace(self, other: RootResource) -> Deferred[Any]:
        """Serve new requests with ``other``'s proxy (a config reload).

        Requests in flight finish on the old proxy, whose upstream
        connections are closed once they are done.

        Args:
            other: A root built from the new config (with these metrics).

        Returns:
            A Deferred that fires once the old proxy is retired.
        """
        old_proxy, old_close = self.proxy, self._close
        self.proxy, self._close = other.proxy, other._close
        self.retired.append(old_proxy)

        def retire(_: Any) -> Any:
            if old_proxy in self.retired:
                self.retired.remove(old_proxy)
            return old_close() if old_close is not None else None

        return old_proxy.drain().addCallback(retire)

    def proxies(self) -> list[ProxyResource]:
        """The current proxy and those retired by reloads, still draining."""
        return [self.proxy, *self.retired]

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
            return _json(request, json.dumps({"status": "starting", "pools": pools}).encode())
        return _json(request, json.dumps({"status": "ready", "pools": pools}).encode())


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
        admin.putChild(b"metrics", MetricsResource(root.metrics.registry, root.proxy.reactor))
    admin.putChild(b"healthz", _Health(root, ready=False))
    admin.putChild(b"readyz", _Health(root, ready=True))
    return admin


def _json(request: Request, body: bytes) -> bytes:
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return body


def build_resource(
    config: Config,
    reactor: Any,
    egress: Egress | None = None,
    metrics: Metrics | None = None,
) -> RootResource:
    """Build llmproxy's root resource for a configuration.

    Args:
        config: The validated configuration.
        reactor: The reactor for connections and timers.
        egress: Send upstream requests through this instead of building
            one (and its pool) from the config.
        metrics: Keep counting in these instruments (a reload) instead of
            new ones.

    Returns:
        The root resource; mount it anywhere in a twisted.web tree.
    """
    close = None
    if egress is None:
        egress = Egress(config, reactor)
        close = egress.close
    resolver = egress.resolver
    if not config.metrics:
        metrics = None
    elif metrics is None:
        metrics = Metrics(config, resolver=resolver)
    else:
        metrics.configure(config, resolver)
    proxy = ProxyResource(
        Router.from_config(config, clock=reactor), egress, reactor, config.timeouts, metrics,
        access_log=config.log.access, guard=build_guard(config, reactor),
        max_retry_wait=config.max_retry_wait,
    )
    return RootResource(proxy, close, metrics)


def build_guard(config: Config, clock: Any) -> Guard:
    """Client addresses, keys and rate limits for a config.

    Args:
        config: The validated configuration.
        clock: For the token buckets.

    Returns:
        The guard.

    Raises:
        ConfigError: The keys file is malformed (naming ``auth.keys_file``).
    """
    keys = None
    if config.auth is not None:
        try:
            keys = KeyStore.from_config(config.auth.keys, config.auth.keys_file)
        except ValueError as e:
            raise ConfigError("auth.keys_file", str(e)) from None
    limiter = None
    if config.rate_limit is not None:
        limiter = RateLimiter(config.rate_limit.rate, config.rate_limit.burst, clock)
    return Guard(
        trusted=NetworkSet(config.trusted_proxies),
        keys=keys,
        limiter=limiter,
        limit_by_key=config.rate_limit is not None and config.rate_limit.key == "api_key",
    )


from llmproxy.web._site import LLMProxySite, build_site  # noqa: E402 (needs build_resource)
