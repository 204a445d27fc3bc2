"""Prometheus instruments (served by :class:`llmproxy.web.MetricsResource`).

Every instrument lives in one :class:`Metrics` object with its own
``CollectorRegistry``, so that several proxies in one process (tests, an
embedding app) never collide. Labels stay bounded: models that no route
names count as ``other``, routes and upstreams come from the config, and
client addresses are never labels.

With ``workers: N`` above 1 the instruments use prometheus_client's
multiprocess mode: each process writes its values to files in the
directory named by :data:`MULTIPROC_DIR_ENV` (made per run by
:mod:`llmproxy.workers`), and the first process's ``/metrics`` reads them
all (:attr:`Metrics.multiprocess_dir`). prometheus_client chooses that mode
once, when it is first imported (``prometheus_client.values.ValueClass``),
so this module imports it lazily: only when the first :class:`Metrics` is
built, after the daemon has set the variable.

Importing this module has no side effects: no reactor is installed (the
resource takes the reactor it runs on as an argument), and prometheus_client
is not imported.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from llmproxy.config import Config

if TYPE_CHECKING:
    from prometheus_client.core import CounterMetricFamily

__all__ = [
    "MULTIPROC_DIR_ENV",
    "Metrics",
    "forget_process",
    "multiprocess_possible",
]

#: The environment variable that puts prometheus_client in multiprocess mode
#: (read when it is first imported, and when each value is created).
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)


def multiprocess_possible() -> bool:
    """Say whether prometheus_client can still run in multiprocess mode here.

    Returns:
        True when prometheus_client is not imported yet (setting
        :data:`MULTIPROC_DIR_ENV` now is in time), or was imported in
        multiprocess mode; False when it was imported without the variable
        and keeps every value in this process's memory.
    """
    values = sys.modules.get("prometheus_client.values")
    if values is None:
        return True
    return values.ValueClass is not values.MutexValue


def forget_process(pid: int, path: str) -> None:
    """Drop an ended process's live gauges from the shared metrics.

    prometheus_client's ``mark_process_dead``: its ``livesum`` gauges (in
    flight, connections) stop counting; its counters and histograms stay in
    the sums.

    Args:
        pid: The process that ended.
        path: The multiprocess directory.
    """
    from prometheus_client.multiprocess import mark_process_dead

    mark_process_dead(pid, path)


def _multiprocess_dir(config: Config) -> str | None:
    """The multiprocess directory these instruments should use, if any.

    Args:
        config: ``workers`` above 1 asks for the shared files.

    Returns:
        The directory, when ``workers`` is above 1, :data:`MULTIPROC_DIR_ENV`
        names a directory and prometheus_client runs in multiprocess mode;
        else None (this process's values, served as they are).
    """
    if getattr(config, "workers", 1) <= 1:
        return None
    path = os.environ.get(MULTIPROC_DIR_ENV)
    if not path or not os.path.isdir(path) or not multiprocess_possible():
        return None
    return path


class _DNSCollector:
    """Reports the caching resolver's hit and miss counters.

    A prometheus_client collector (its ``Collector`` is a protocol: a
    ``collect`` method is all it takes).
    """

    def __init__(self, resolver: Any) -> None:
        self.resolver = resolver
        self._base = {"hits": 0, "misses": 0}
        self._seen: Any = None
        # Scrapes run in the reactor's thread pool, possibly two at once.
        self._lock = threading.Lock()

    def collect(self) -> Iterator[CounterMetricFamily]:
        """Yield the hit and miss counters (monotonic across reloads)."""
        from prometheus_client.core import CounterMetricFamily

        with self._lock:
            resolver = self.resolver
            if resolver is not self._seen:
                # A reload brought a new cache: keep the counters monotonic.
                if self._seen is not None:
                    for name in self._base:
                        self._base[name] += getattr(self._seen, name, 0)
                self._seen = resolver
            hits = self._base["hits"] + getattr(resolver, "hits", 0)
            misses = self._base["misses"] + getattr(resolver, "misses", 0)
        yield CounterMetricFamily(
            "llmproxy_dns_cache_hits", "DNS lookups answered from the cache.", value=hits
        )
        yield CounterMetricFamily(
            "llmproxy_dns_cache_misses", "DNS lookups that needed a query.", value=misses
        )


class Metrics:
    """llmproxy's Prometheus instruments.

    The per-request series are prometheus_client instruments; their
    labelled children are cached per label tuple, so a finished request
    costs one dict lookup rather than several ``.labels(...)`` calls. The
    caches are bounded because the label values are.

    Attributes:
        registry: The registry holding them (serve it with
            :class:`llmproxy.web.MetricsResource`).
        requests: Requests answered, by route, model, upstream, status class.
        duration: Time to the response's last byte, by route and model.
        ttfb: Time to the upstream's response headers, by route, model and
            upstream.
        inflight: Requests being proxied now.
        tokens: Usage tokens, by type (prompt, completion) and model.
        upstream_errors: Upstream failures, by kind and upstream.
        retries: Retries to another upstream, by route.
        ejections: Upstreams taken out of rotation, by upstream.
        fallbacks: Requests sent to a fallback model, by that model.
        rate_limited: Requests refused by the rate limit.
        client_connections: Client connections open now.
        connection_limit_reached: Times accepting paused at max_connections.
        connections_refused: Connections closed at accept, by the limit
            reached.
        idle_connections_closed: Idle connections closed to make room, by
            the limit reached.
        store_errors: Limit store failures, by operation.
        budget_tokens: Tokens counted against budgets, by key name.
        budget_refused: Requests refused over budget, by key name.
        budget_usage_missing: Budgeted answers without usage, by key name.
        multiprocess_dir: With ``workers`` above 1, the directory where
            every worker's values are shared (:attr:`registry` then reads
            them all); None in a single process.
    """

    def __init__(self, config: Config, resolver: Any = None) -> None:
        """Create the instruments.

        Args:
            config: Names the models that get their own label value.
            resolver: The caching resolver whose hits and misses to report.
        """
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess_dir = _multiprocess_dir(config)
        self._models = frozenset(config.model_routes)
        # Shared between workers, each instrument writes its values to this
        # process's files and is registered nowhere: the registry serves
        # what MultiProcessCollector reads from every worker's files.
        r = self.registry if self.multiprocess_dir is None else None
        self.requests = Counter(
            "llmproxy_requests",
            "Requests answered, by route, model, upstream and status class.",
            ["route", "model", "upstream", "status_class"],
            registry=r,
        )
        self.duration = Histogram(
            "llmproxy_request_duration_seconds",
            "Time from request to the last byte of the response.",
            ["route", "model"],
            buckets=_SECONDS,
            registry=r,
        )
        self.ttfb = Histogram(
            "llmproxy_upstream_ttfb_seconds",
            "Time from request until the upstream's response headers.",
            ["route", "model", "upstream"],
            buckets=_SECONDS,
            registry=r,
        )
        # Gauges: summed over the workers still running ("livesum"; the
        # mode is ignored in a single process).
        self.inflight = Gauge(
            "llmproxy_inflight_requests", "Requests being proxied now.", registry=r,
            multiprocess_mode="livesum",
        )
        self.upstream_errors = Counter(
            "llmproxy_upstream_errors",
            "Upstream failures, by kind (the error code) and upstream.",
            ["kind", "upstream"],
            registry=r,
        )
        self.tokens = Counter(
            "llmproxy_tokens",
            "Tokens reported by upstreams, by type (prompt, completion) and model.",
            ["type", "model"],
            registry=r,
        )
        self.retries = Counter(
            "llmproxy_upstream_retries",
            "Requests sent to another upstream after a failure before the first byte.",
            ["route"],
            registry=r,
        )
        self.stale_retries = Counter(
            "llmproxy_upstream_stale_retries",
            "Requests sent once more on a new connection after a pooled connection "
            "closed before answering them, by upstream.",
            ["upstream"],
            registry=r,
        )
        self.ejections = Counter(
            "llmproxy_upstream_ejections",
            "Upstreams taken out of rotation after consecutive failures.",
            ["upstream"],
            registry=r,
        )
        self.fallbacks = Counter(
            "llmproxy_fallbacks",
            "Requests sent to a fallback model, by that model.",
            ["model"],
            registry=r,
        )
        self.rate_limited = Counter(
            "llmproxy_rate_limited", "Requests refused by the rate limit.", registry=r
        )
        self.client_connections = Gauge(
            "llmproxy_client_connections", "Client connections open now.", registry=r,
            multiprocess_mode="livesum",
        )
        self.connection_limit_reached = Counter(
            "llmproxy_max_connections_reached",
            "Times max_connections was reached and accepting paused.",
            registry=r,
        )
        self.connections_refused = Counter(
            "llmproxy_connections_refused",
            "Client connections closed as soon as they were accepted, by the limit "
            "reached (per_client, max_connections).",
            ["reason"],
            registry=r,
        )
        self.idle_connections_closed = Counter(
            "llmproxy_idle_connections_closed",
            "Idle keep-alive client connections closed to make room for a new one, "
            "by the limit reached (per_client, max_connections).",
            ["reason"],
            registry=r,
        )
        self.store_errors = Counter(
            "llmproxy_limit_store_errors",
            "Rate-limit store calls that failed or timed out, by what was asked "
            "(check, add_usage).",
            ["op"],
            registry=r,
        )
        self.budget_tokens = Counter(
            "llmproxy_budget_tokens",
            "Tokens counted against client keys' budgets, by key name.",
            ["key"],
            registry=r,
        )
        self.budget_refused = Counter(
            "llmproxy_budget_refused",
            "Requests refused because their key's budget was spent, by key name.",
            ["key"],
            registry=r,
        )
        self.budget_usage_missing = Counter(
            "llmproxy_budget_usage_missing",
            "Answers to keys with a budget that reported no token usage, by key name.",
            ["key"],
            registry=r,
        )
        if self.multiprocess_dir is not None:
            from prometheus_client.multiprocess import MultiProcessCollector

            MultiProcessCollector(self.registry, path=self.multiprocess_dir)
        # The DNS cache counters are read from this process's resolver at
        # scrape time, which the multiprocess files cannot sum: with workers
        # they are worker 1's (the only registry served is worker 1's).
        self._dns = _DNSCollector(resolver)
        self.registry.register(self._dns)
        # Labelled children by label values (bounded: the labels are).
        self._children: dict[tuple[str, str, str, str], tuple[Any, ...]] = {}
        self._errors: dict[tuple[str, str], Any] = {}

    def configure(self, config: Config, resolver: Any = None) -> None:
        """Follow a reloaded config: its models and its DNS cache.

        Args:
            config: The new configuration.
            resolver: The new caching resolver, if any.
        """
        self._models = frozenset(config.model_routes)
        self._dns.resolver = resolver

    def model_label(self, model: str | None) -> str:
        """The bounded label value for a request's model.

        Args:
            model: The model the request named, if any.

        Returns:
            The model when a route names it, ``none`` without a model, else
            ``other``.
        """
        if model is None:
            return "none"
        return model if model in self._models else "other"

    def started(self) -> None:
        """Count a request in flight (until :meth:`observe` sees it end)."""
        self.inflight.inc()

    def observe(self, record: dict[str, Any]) -> None:
        """Count one finished request from its access record.

        Args:
            record: The access record's fields (see proxy/_exchange.py).
        """
        self.inflight.dec()
        route = record.get("route") or "none"
        model = self.model_label(record.get("model"))
        upstream = record.get("upstream") or "none"
        status = record.get("status")
        status_class = f"{status // 100}xx" if isinstance(status, int) else "none"
        key = (route, model, upstream, status_class)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.requests.labels(route, model, upstream, status_class),
                self.duration.labels(route, model),
                self.ttfb.labels(route, model, upstream),
                self.tokens.labels("prompt", model),
                self.tokens.labels("completion", model),
            )
        requests, duration, ttfb_histogram, prompt, completion = children
        requests.inc()
        latency = record.get("latency_ms")
        if latency is not None:
            duration.observe(latency / 1000.0)
        ttfb = record.get("ttfb_ms")
        if ttfb is not None:
            ttfb_histogram.observe(ttfb / 1000.0)
        error = record.get("error_code")
        if error:
            error_key = (error, upstream)
            errors = self._errors.get(error_key)
            if errors is None:
                errors = self._errors[error_key] = self.upstream_errors.labels(error, upstream)
            errors.inc()
        count = record.get("prompt_tokens")
        if count:
            prompt.inc(count)
        count = record.get("completion_tokens")
        if count:
            completion.inc(count)
