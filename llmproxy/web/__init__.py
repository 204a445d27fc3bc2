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
import time
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from llmproxy import __version__
from llmproxy.config import Config, ConfigError
from llmproxy.egress import Egress
from llmproxy.net import NetworkSet
from llmproxy.limits import KeyStore, Limits, budget_window
from llmproxy.metrics import Metrics, MetricsResource
from llmproxy.proxy import Guard, ProxyResource
from llmproxy.proxy._errors import reason_phrase
from llmproxy.routing import Router
from llmproxy.web._site import LLMProxySite, build_site

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
        old_limits, new_limits = old_proxy.guard.limits, other.proxy.guard.limits
        if old_limits is not None and new_limits is not None:
            # Budgets kept in this process survive the reload.
            new_limits.carry_over(old_limits)
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


class _Budgets(Resource):
    """``/budgets`` of the admin site: each named key's use and budget."""

    isLeaf = True

    def __init__(self, root: RootResource) -> None:
        super().__init__()
        self._root = root

    def render_GET(self, request: Request) -> Any:
        guard = self._root.proxy.guard
        keys = guard.keys.named() if guard.keys is not None else []
        limits = guard.limits
        now = time.time()
        rows: list[dict[str, Any]] = []
        asked: list[Deferred[Any]] = []
        for key in keys:
            row: dict[str, Any] = {"name": key.name, "key": key.id, "budget": None}
            rows.append(row)
            if key.budget is None or limits is None:
                continue
            window, ends = budget_window(key.budget.per, now)
            row.update(budget={"tokens": key.budget.tokens, "per": key.budget.per},
                       window=window, resets_at=ends, used=None)
            used = limits.store.budget_used(key.name, window)
            if isinstance(used, Deferred):
                asked.append(used.addCallbacks(
                    lambda n, row=row: row.update(used=n),
                    lambda failure, row=row: row.update(error=_store_error(failure)),
                ))
            else:
                row["used"] = used
        if not asked:
            return _json(request, _budget_rows(rows))
        gone: list[bool] = []
        request.notifyFinish().addBoth(lambda _: gone.append(True))

        def answer(_: Any) -> None:
            if not gone:
                request.write(_json(request, _budget_rows(rows)))
                request.finish()

        gatherResults(asked).addCallback(answer).addErrback(
            lambda failure: log.failure("/budgets failed", failure)
        )
        return NOT_DONE_YET


def _budget_rows(rows: list[dict[str, Any]]) -> bytes:
    """The ``/budgets`` body, with what is left of each budget."""
    for row in rows:
        if row["budget"] is not None and row.get("used") is not None:
            row["remaining"] = max(0, row["budget"]["tokens"] - row["used"])
    return json.dumps({"keys": rows}).encode()


def _store_error(failure: Any) -> str:
    return "store unavailable: " + " ".join(str(failure.value).split())[:200]


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
    admin.putChild(b"budgets", _Budgets(root))
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
    closing = []
    if egress is None:
        egress = Egress(config, reactor)
        closing.append(egress.close)
    resolver = egress.resolver
    if not config.metrics:
        metrics = None
    elif metrics is None:
        metrics = Metrics(config, resolver=resolver)
    else:
        metrics.configure(config, resolver)
    guard = build_guard(config, reactor, metrics)
    if guard.limits is not None:
        guard.limits.store.startService()
        closing.append(guard.limits.close)
    proxy = ProxyResource(
        Router.from_config(config, clock=reactor), egress, reactor, config.timeouts, metrics,
        access_log=config.log.access, guard=guard,
        max_retry_wait=config.max_retry_wait,
    )

    def close() -> Deferred[Any]:
        return gatherResults([maybeDeferred(c) for c in closing]).addCallback(lambda _: None)

    return RootResource(proxy, close if closing else None, metrics)


def build_guard(config: Config, clock: Any, metrics: Metrics | None = None) -> Guard:
    """Client addresses, keys, rate limits and budgets for a config.

    Args:
        config: The validated configuration.
        clock: For the token buckets (the reactor; a Redis store connects
            with it).
        metrics: Where limit store failures and budgets are counted.

    Returns:
        The guard.

    Raises:
        ConfigError: A key is malformed (only in a config made by hand).
    """
    keys = None
    if config.auth is not None:
        try:
            keys = KeyStore.from_config(config.auth)
        except ValueError as e:
            raise ConfigError("auth", str(e)) from None
    rate_limit = config.rate_limit
    budgets = keys is not None and any(k.budget is not None for k in keys.named())
    return Guard(
        trusted=NetworkSet(config.trusted_proxies),
        keys=keys,
        limits=Limits.from_config(rate_limit, budgets, clock, metrics),
        limit_by_key=rate_limit is not None and rate_limit.key == "api_key",
    )

