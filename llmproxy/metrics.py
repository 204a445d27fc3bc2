"""Prometheus instruments, and the resource that serves them.

Every instrument lives in one :class:`Metrics` object with its own
``CollectorRegistry``, so that several proxies in one process (tests, an
embedding app) never collide. Labels stay bounded: models that no route
names count as ``other``, routes and upstreams come from the config, and
client addresses are never labels.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString
from prometheus_client.twisted import MetricsResource

from llmproxy.config import Config

__all__ = ["Metrics", "MetricsResource"]

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)


class _DNSCollector(Collector):
    """Reports the caching resolver's hit and miss counters."""

    def __init__(self, resolver: Any) -> None:
        self.resolver = resolver
        self._base = {"hits": 0, "misses": 0}
        self._seen: Any = None

    def collect(self) -> Iterator[CounterMetricFamily]:
        resolver = self.resolver
        if resolver is not self._seen:
            # A reload brought a new cache: keep the counters monotonic.
            if self._seen is not None:
                for name in self._base:
                    self._base[name] += getattr(self._seen, name, 0)
            self._seen = resolver
        yield CounterMetricFamily(
            "llmproxy_dns_cache_hits",
            "DNS lookups answered from the cache.",
            value=self._base["hits"] + getattr(resolver, "hits", 0),
        )
        yield CounterMetricFamily(
            "llmproxy_dns_cache_misses",
            "DNS lookups that needed a query.",
            value=self._base["misses"] + getattr(resolver, "misses", 0),
        )


#: Bucket labels, as prometheus_client writes them.
_LE = [floatToGoString(b) for b in _SECONDS] + ["+Inf"]


def _observe(histogram: list[float], seconds: float) -> None:
    """Add one observation to a histogram series: [count per bucket..., sum]."""
    histogram[bisect_left(_SECONDS, seconds)] += 1
    histogram[-1] += seconds


class _Requests(Collector):
    """The per-request instruments, counted in plain dicts.

    prometheus_client's Counter and Histogram take a lock and a few calls per
    update; counting every request that way measured tens of microseconds
    per request inside the daemon. Here a finished request is a few dict
    and list updates on the reactor thread, and :meth:`collect` (run in a
    thread by the /metrics resource) turns copies of them into the same
    metric families: ``llmproxy_requests``,
    ``llmproxy_request_duration_seconds``, ``llmproxy_upstream_ttfb_seconds``,
    ``llmproxy_tokens`` and ``llmproxy_inflight_requests``. Copying a dict or
    list of plain values holds the GIL throughout, so a scrape never sees
    one half-changed.
    """

    def __init__(self) -> None:
        self.inflight = 0
        # Label values -> count, or -> [count per bucket..., sum].
        self.requests: dict[tuple[str, ...], int] = {}
        self.duration: dict[tuple[str, ...], list[float]] = {}
        self.ttfb: dict[tuple[str, ...], list[float]] = {}
        self.tokens: dict[tuple[str, ...], int] = {}
        # When each label set was first seen (the _created samples).
        self.created: dict[tuple[str, tuple[str, ...]], float] = {}

    def first_seen(self, name: str, key: tuple[str, ...]) -> None:
        """Note the time ``key`` first appeared in the table ``name``."""
        self.created[(name, key)] = time.time()

    def new_request_key(self, route: str, model: str, upstream: str,
                        key: tuple[str, ...]) -> None:
        """Start every series a request with these labels counts in at 0.

        As prometheus_client's labelled children do, the series exist (at
        0) from the first such request on.
        """
        self.requests[key] = 0
        self.first_seen("requests", key)
        for table, name, labels in (
            (self.duration, "llmproxy_request_duration_seconds", (route, model)),
            (self.ttfb, "llmproxy_upstream_ttfb_seconds", (route, model, upstream)),
        ):
            if labels not in table:
                table[labels] = [0.0] * (len(_SECONDS) + 2)
                self.first_seen(name, labels)
        for kind in ("prompt", "completion"):
            if (kind, model) not in self.tokens:
                self.tokens[(kind, model)] = 0
                self.first_seen("tokens", (kind, model))

    def _histogram(self, name: str, documentation: str, labels: list[str],
                   table: dict[tuple[str, ...], list[float]]) -> Metric:
        family = HistogramMetricFamily(name, documentation, labels=labels)
        created = self.created
        for key, values in list(table.items()):
            values = list(values)
            cumulative, buckets = 0.0, []
            for le, n in zip(_LE, values[:-1]):
                cumulative += n
                buckets.append((le, cumulative))
            family.add_metric(list(key), buckets, values[-1])
            when = created.get((name, key))
            if when is not None:
                family.samples.append(
                    Sample(f"{name}_created", dict(zip(labels, key)), when)
                )
        return family

    def collect(self) -> Iterator[Metric]:
        created = self.created
        family: Metric = CounterMetricFamily(
            "llmproxy_requests",
            "Requests answered, by route, model, upstream and status class.",
            labels=["route", "model", "upstream", "status_class"],
        )
        for key, n in list(self.requests.items()):
            family.add_metric(list(key), n, created=created.get(("requests", key)))
        yield family
        yield self._histogram(
            "llmproxy_request_duration_seconds",
            "Time from request to the last byte of the response.",
            ["route", "model"], self.duration,
        )
        yield self._histogram(
            "llmproxy_upstream_ttfb_seconds",
            "Time from request until the upstream's response headers.",
            ["route", "model", "upstream"], self.ttfb,
        )
        family = GaugeMetricFamily(
            "llmproxy_inflight_requests", "Requests being proxied now.", value=self.inflight
        )
        yield family
        family = CounterMetricFamily(
            "llmproxy_tokens",
            "Tokens reported by upstreams, by type (prompt, completion) and model.",
            labels=["type", "model"],
        )
        for key, n in list(self.tokens.items()):
            family.add_metric(list(key), n, created=created.get(("tokens", key)))
        yield family


class Metrics:
    """llmproxy's Prometheus instruments.

    Attributes:
        registry: The registry holding them (serve it with
            :class:`MetricsResource`).
    """

    def __init__(self, config: Config, resolver: Any = None) -> None:
        """Create the instruments.

        Args:
            config: Names the models that get their own label value.
            resolver: The caching resolver whose hits and misses to report.
        """
        self.registry = CollectorRegistry(auto_describe=True)
        self._models = frozenset(config.model_routes)
        r = self.registry
        # Requests, their durations, time to first byte, tokens, in flight.
        self._counts = _Requests()
        r.register(self._counts)
        self.upstream_errors = Counter(
            "llmproxy_upstream_errors",
            "Upstream failures, by kind (the error code) and upstream.",
            ["kind", "upstream"],
            registry=r,
        )
        self.retries = Counter(
            "llmproxy_upstream_retries",
            "Requests sent to another upstream after a failure before the first byte.",
            ["route"],
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
        self._dns = _DNSCollector(resolver)
        r.register(self._dns)

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
        self._counts.inflight += 1

    def observe(self, record: dict[str, Any]) -> None:
        """Count one finished request from its access record.

        Args:
            record: The access record's fields (see proxy.py).
        """
        counts = self._counts
        counts.inflight -= 1
        route = record.get("route") or "none"
        model = self.model_label(record.get("model"))
        upstream = record.get("upstream") or "none"
        status = record.get("status")
        status_class = f"{status // 100}xx" if isinstance(status, int) else "none"
        key = (route, model, upstream, status_class)
        requests = counts.requests
        if key not in requests:
            counts.new_request_key(route, model, upstream, key)
        requests[key] += 1
        latency = record.get("latency_ms")
        if latency is not None:
            _observe(counts.duration[(route, model)], latency / 1000.0)
        ttfb = record.get("ttfb_ms")
        if ttfb is not None:
            _observe(counts.ttfb[(route, model, upstream)], ttfb / 1000.0)
        error = record.get("error_code")
        if error:
            self.upstream_errors.labels(error, upstream).inc()
        count = record.get("prompt_tokens")
        if count:
            counts.tokens[("prompt", model)] += count
        count = record.get("completion_tokens")
        if count:
            counts.tokens[("completion", model)] += count
