"""The one place that wires: a config in, the working gateway out.

:class:`Gateway` is a service holding what one configuration builds: the
resource tree (:class:`~llmproxy.web.RootResource` and the admin resource),
the guard (keys, rate limits, budgets), and the parts that hold connections
as child services (the :class:`~llmproxy.egress.Egress` agent with its pools,
the limit store). :meth:`Gateway.reload` builds them again from a new config
and swaps them in; requests in flight finish on the old parts, which are
stopped once drained. Stopping the gateway drains it too.

:func:`build_daemon` builds a process's whole service tree (the log file,
the demo upstream, the gateway, the public and admin listeners) inside a
:class:`~llmproxy.daemon.Daemon`.

Embedding in another twisted.web application::

    gateway = Gateway(config, reactor)
    gateway.setServiceParent(application)     # pools, the limit store
    root.putChild(b"llm", gateway.resource)    # /llm/chat/completions ...
    admin.putChild(b"llm", gateway.admin_resource())  # metrics, health
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    FirstError,
    TimeoutError,
    gatherResults,
    succeed,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource

from llmproxy.config import Config, ConfigError, config_warnings, load_config
from llmproxy.daemon import AdoptedListener, Daemon, Listener
from llmproxy.egress import Egress
from llmproxy.limits import KeyStore, Limits, Prices
from llmproxy.logs import file_log_service
from llmproxy.metrics import Metrics
from llmproxy.net import NetworkSet
from llmproxy.proxy import Guard, ProxyResource
from llmproxy.routing import Router
from llmproxy.testing.upstream import FakeUpstreamService
from llmproxy.web import RootResource, build_admin_resource, build_site

__all__ = ["Gateway", "build_daemon", "build_guard", "log_file_of"]

log = Logger(namespace="llmproxy.app")

#: Keys a reload cannot change: they take effect on restart.
RESTART_ONLY = ("listen", "admin_listen", "log", "demo_upstream", "workers")


def build_guard(config: Config, clock: Any, metrics: Metrics | None = None) -> Guard:
    """Client addresses, keys, rate limits and budgets for a config.

    Args:
        config: The validated configuration.
        clock: For the token buckets (the reactor; a Redis store connects
            with it).
        metrics: Where limit store failures and budgets are counted.

    Returns:
        The guard.
    """
    keys = KeyStore.from_config(config.auth) if config.auth is not None else None
    rate_limit = config.rate_limit
    return Guard(
        trusted=NetworkSet(config.trusted_proxies),
        keys=keys,
        limits=Limits.from_config(config, clock, metrics),
        limit_by_key=rate_limit is not None and rate_limit.key == "api_key",
    )


class _Parts(MultiService):
    """What one config builds that holds connections or counts: the proxy
    resource, and as child services its agent and its limit store."""

    def __init__(
        self, config: Config, reactor: Any, metrics: Metrics | None, worker: int | None,
        agent: IAgent | None,
    ) -> None:
        super().__init__()
        via_agents: dict[str, IAgent] = {}
        if agent is None:
            egress = agent = Egress(config, reactor)
            egress.setServiceParent(self)
            via_agents = {via: egress.forced(via) for via in ("direct", "proxy")}
            resolver = egress.resolver
        else:
            resolver = None
        guard = build_guard(config, reactor, metrics)
        if guard.limits is not None:
            guard.limits.store.setServiceParent(self)
            prices = guard.limits.prices
        else:
            prices = Prices.from_config(config.prices)
        if metrics is not None:
            metrics.configure(config, resolver, price_label=prices.label)
        self.proxy = ProxyResource(
            Router.from_config(config, clock=reactor), agent, reactor, config.timeouts,
            metrics, access_log=config.log.access, guard=guard,
            max_retry_wait=config.max_retry_wait, via_agents=via_agents, worker=worker,
            stream_usage=config.stream_usage, prices=prices if len(prices) else None,
        )


class Gateway(MultiService):
    """A configuration's gateway: resources, guard, agent and limit store.

    Attributes:
        config: The config in force.
        reactor: The reactor it runs on.
        resource: The public root resource (health checks and the proxy).
        metrics: The Prometheus instruments, kept across reloads (None when
            ``metrics`` is off).
    """

    def __init__(
        self, config: Config, reactor: Any, worker: int | None = None,
        agent: IAgent | None = None,
    ) -> None:
        """Build everything ``config`` asks for (nothing connects before the
        service starts).

        Args:
            config: The validated configuration.
            reactor: The reactor to run on.
            worker: This process's worker number, put in access records
                (only with several workers).
            agent: Send upstream requests through this ``IAgent`` instead
                of an :class:`~llmproxy.egress.Egress` built from the
                config (which then owns no pools).
        """
        super().__init__()
        self.setName("gateway")
        self.config = config
        self.reactor = reactor
        self.worker = worker
        self.metrics = Metrics(config) if config.metrics else None
        self._agent = agent
        self._parts = _Parts(config, reactor, self.metrics, worker, agent)
        self._parts.setServiceParent(self)
        self._retired: list[_Parts] = []
        self.resource = RootResource(self._parts.proxy, self.metrics)
        self._stopping: Deferred[Any] | None = None

    def admin_resource(self) -> Resource:
        """A new admin resource: ``/metrics``, ``/budgets``, ``/healthz``,
        ``/readyz``. Serve it on a listener the public cannot reach."""
        return build_admin_resource(self.resource, self.reactor)

    def proxies(self) -> list[ProxyResource]:
        """The proxy serving new requests, then those still draining."""
        return [self._parts.proxy, *(parts.proxy for parts in self._retired)]

    def reload(self, config: Config) -> None:
        """Serve new requests with what ``config`` builds.

        Requests in flight finish on the old parts, which are stopped (their
        pools and store closed) once those requests are done.

        Args:
            config: The new, validated configuration.
        """
        parts = _Parts(config, self.reactor, self.metrics, self.worker, self._agent)
        old = self._parts
        old_limits, new_limits = old.proxy.guard.limits, parts.proxy.guard.limits
        if old_limits is not None and new_limits is not None:
            # Budgets kept in this process survive the reload.
            new_limits.carry_over(old_limits)
        parts.setServiceParent(self)
        self._parts, self.config = parts, config
        self.resource.proxy = parts.proxy
        self._retired.append(old)

        def retire(_: object) -> Any:
            self._retired.remove(old)
            return old.disownServiceParent()

        old.proxy.drain().addCallback(retire).addErrback(
            lambda failure: log.failure("retiring the old config failed", failure)
        )

    def reload_file(self, path: str) -> bool:
        """Re-read the config file; apply it to new requests if valid.

        Args:
            path: The config file.

        Returns:
            Whether the new config was applied.
        """
        try:
            config = load_config(path)
            for key in RESTART_ONLY:
                if getattr(config, key) != getattr(self.config, key):
                    log.warn("config reload: {key} changes only on restart", key=key)
            self.reload(config)
        except ConfigError as e:
            log.error("config reload refused, the running config stays in force: {error}",
                      error=e.describe())
            return False
        log.info("config reloaded from {path}", path=path)
        warn_about(config)
        return True

    def stopService(self) -> Deferred[Any]:
        """Let requests in flight finish (up to ``shutdown_grace``), close the
        rest, then stop the agents and stores.

        Returns:
            Fires once everything is stopped.
        """
        if self._stopping is None:
            self._stopping = self._drain().addCallback(lambda _: super(Gateway, self).stopService())
        return self._stopping

    def _drain(self) -> Deferred[Any]:
        proxies = self.proxies()
        grace = self.config.shutdown_grace
        if not any(p.inflight for p in proxies):
            return succeed(None)
        log.info("stopped accepting; waiting up to {grace} s for requests in flight",
                 grace=grace)
        drained = gatherResults([p.drain() for p in proxies], consumeErrors=True)

        def timed_out(failure: Failure) -> None:
            # The timeout cancels each proxy's drain: gatherResults then
            # fails with the first CancelledError.
            failure.trap(CancelledError, TimeoutError, FirstError)
            log.warn(
                "shutdown_grace ({grace} s) is over: closing the requests still in flight",
                grace=grace,
            )
            for proxy in proxies:
                proxy.abort_inflight()

        return drained.addTimeout(grace, self.reactor).addErrback(timed_out)


def build_daemon(
    config: Config, reactor: Any, path: str | None = None, worker: int = 1,
    listen_fd: int | None = None, on_listening: Any = None,
) -> Daemon:
    """A process's whole service tree for a config.

    Args:
        config: The validated configuration.
        reactor: The reactor to run on.
        path: The config file, re-read on SIGHUP (None: no reloads).
        worker: This process's worker number; workers after the first write
            their own log file, serve an inherited listening socket
            (``listen_fd``) and run no admin listener or demo upstream.
        listen_fd: The inherited listening socket (workers 2..N).
        on_listening: Called once the public listener listens.

    Returns:
        The daemon: the log file (if configured), the demo upstream (if
        configured), the gateway, the public listener and the admin
        listener, in that order.
    """
    gateway = Gateway(config, reactor, worker if config.workers > 1 else None)
    daemon = Daemon(reactor, gateway.reload_file if path is not None else None, path)
    if config.log.file:
        logs = file_log_service(
            log_file_of(config.log.file, worker),
            max_bytes=config.log.max_bytes,
            backups=config.log.backups,
            compress=config.log.compress,
            level=config.log.level,
            reactor=reactor,
        )
        logs.setName("log-file")
        logs.setServiceParent(daemon)
    if config.demo_upstream is not None and worker == 1:
        demo = FakeUpstreamService(reactor, config.demo_upstream)
        demo.setName("demo-upstream")
        demo.setServiceParent(daemon)
    gateway.setServiceParent(daemon)
    root = gateway.resource
    root.ready = False

    def listening() -> None:
        root.ready = True
        if on_listening is not None:
            on_listening()

    site = build_site(config, reactor, root)
    if listen_fd is None:
        listener: Listener = Listener(reactor, config.listen, site, "listen", listening)
    else:
        listener = AdoptedListener(
            reactor, listen_fd, site, listening, proxy_protocol=site.proxy_protocol
        )
    listener.setName("web")
    listener.setServiceParent(daemon)
    if config.admin_listen is not None and worker == 1:
        admin_site = build_site(config, reactor, gateway.admin_resource())
        admin = Listener(reactor, config.admin_listen, admin_site, "admin_listen")
        admin.setName("admin")
        admin.setServiceParent(daemon)
    return daemon


def warn_about(config: Config) -> None:
    """Log what a valid config probably gets wrong (``--check``'s warnings)."""
    for warning in config_warnings(config):
        log.warn("config warning: {warning}", warning=warning)


def log_file_of(path: str, worker: int) -> str:
    """Worker N's log file: ``logs/llmproxy.log`` -> ``logs/llmproxy-worker2.log``.

    Args:
        path: The configured ``log.file``.
        worker: The worker number (1 keeps the configured name).

    Returns:
        The file this worker writes (each rotates its own).
    """
    if worker == 1:
        return path
    base, ext = os.path.splitext(path)
    return f"{base}-worker{worker}{ext}"
