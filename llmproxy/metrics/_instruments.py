"""The Prometheus instruments and what one finished request counts in them.

Every instrument lives in one :class:`Metrics` object with its own
``CollectorRegistry``, so that several proxies in one process (tests, an
embedding app) never collide. Labels stay bounded: request models that no
route names count as ``other``, models upstreams report as the first
``metrics.max_models`` names then ``other``, routes, upstreams, keys and
priced models come from the config, and client addresses are never labels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llmproxy.config import Config
from llmproxy.metrics._labels import BoundedLabels
from llmproxy.metrics._process import DNSCollector, multiprocess_dir_for

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)

#: The error codes of requests turned away before anything went upstream:
#: counted in ``llmproxy_refused_total``, not as upstream errors.
REFUSALS = frozenset({
    "invalid_api_key", "rate_limited", "insufficient_quota", "limit_store_unavailable",
    "model_not_allowed", "model_not_priced", "route_not_found",
})


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
        tokens: Usage tokens, by type (prompt, completion) and the model
            the upstream reports (the first ``max_models`` names, then
            ``other``).
        key_tokens: Usage tokens, by key name and type.
        refused: Requests turned away before anything went upstream, by
            reason (the error code).
        cost: USD spent (from ``prices``), by key name and priced model.
        estimated_tokens: Tokens charged by estimate (no usage reported),
            by key name.
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
        self.multiprocess_dir = multiprocess_dir_for(config)
        self._models = frozenset(config.model_routes)
        self._reported = BoundedLabels(config.metrics_max_models)
        self._price_label: Callable[[str | None], str] = lambda model: "other"
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
            "Tokens reported by upstreams, by type (prompt, completion) and the "
            "model the upstream reports.",
            ["type", "model"],
            registry=r,
        )
        self.key_tokens = Counter(
            "llmproxy_key_tokens",
            "Tokens reported by upstreams for named client keys, by key and type.",
            ["key", "type"],
            registry=r,
        )
        self.refused = Counter(
            "llmproxy_refused",
            "Requests turned away before anything went upstream, by reason "
            "(invalid_api_key, rate_limited, insufficient_quota, model_not_allowed, ...).",
            ["reason"],
            registry=r,
        )
        self.cost = Counter(
            "llmproxy_cost_usd",
            "USD spent, from the configured prices, by key name (none without a "
            "named key) and priced model.",
            ["key", "model"],
            registry=r,
        )
        self.estimated_tokens = Counter(
            "llmproxy_budget_estimated_tokens",
            "Tokens charged to keys' budgets by estimate (the answer reported no "
            "usage), by key name.",
            ["key"],
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
            "(check: admission, add_usage: settling, status: GET /budgets).",
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
        self.budget_usd = Counter(
            "llmproxy_budget_usd",
            "US dollars counted against client keys' money budgets, by key name.",
            ["key"],
            registry=r,
        )
        self.budget_unpriced = Counter(
            "llmproxy_budget_unpriced",
            "Answers to keys with a money budget charged nothing because no price "
            "matched the model, by key name.",
            ["key"],
            registry=r,
        )
        self.key_refused = Counter(
            "llmproxy_key_refused",
            "Requests a key's policy refused, by key name and reason "
            "(model_not_allowed, no_price).",
            ["key", "reason"],
            registry=r,
        )
        if self.multiprocess_dir is not None:
            from prometheus_client.multiprocess import MultiProcessCollector

            MultiProcessCollector(self.registry, path=self.multiprocess_dir)
        # The DNS cache counters are read from this process's resolver at
        # scrape time, which the multiprocess files cannot sum: with workers
        # they are worker 1's (the only registry served is worker 1's).
        self._dns = DNSCollector(resolver)
        self.registry.register(self._dns)
        # Labelled children by label values (bounded: the labels are).
        self._children: dict[tuple[str, str, str, str], tuple[Any, ...]] = {}
        self._errors: dict[tuple[str, str], Any] = {}

    def configure(
        self, config: Config, resolver: Any = None,
        price_label: Callable[[str | None], str] | None = None,
    ) -> None:
        """Follow a (reloaded) config: its models, its DNS cache, its prices.

        Args:
            config: The configuration.
            resolver: The caching resolver, if any.
            price_label: The cost metric's model label for a model (its
                price-table entry, or ``other``).
        """
        self._models = frozenset(config.model_routes)
        self._reported.limit = config.metrics_max_models
        self._dns.resolver = resolver
        if price_label is not None:
            self._price_label = price_label

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
            record: The access record's fields (see llmproxy/proxy/_access.py).
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
            )
        requests, duration, ttfb_histogram = children
        requests.inc()
        latency = record.get("latency_ms")
        if latency is not None:
            duration.observe(latency / 1000.0)
        ttfb = record.get("ttfb_ms")
        if ttfb is not None:
            ttfb_histogram.observe(ttfb / 1000.0)
        error = record.get("error_code")
        if error:
            if error in REFUSALS:
                self.refused.labels(error).inc()
                if error == "rate_limited":
                    self.rate_limited.inc()
            else:
                error_key = (error, upstream)
                errors = self._errors.get(error_key)
                if errors is None:
                    errors = self._errors[error_key] = self.upstream_errors.labels(
                        error, upstream
                    )
                errors.inc()
        prompt, completion = record.get("prompt_tokens"), record.get("completion_tokens")
        if prompt or completion:
            self._count_tokens(record, prompt or 0, completion or 0)

    def _count_tokens(self, record: dict[str, Any], prompt: int, completion: int) -> None:
        """Count a request's tokens (and cost) by model and by key.

        Estimated tokens (``usage_estimated``: the answer reported none) are
        counted apart, per key, never as tokens an upstream reported.
        """
        name = record.get("key_name")
        model = record.get("upstream_model") or record.get("model")
        if record.get("usage_estimated"):
            if name is not None:
                self.estimated_tokens.labels(name).inc(prompt + completion)
        else:
            reported = self._reported.label(model)
            if prompt:
                self.tokens.labels("prompt", reported).inc(prompt)
            if completion:
                self.tokens.labels("completion", reported).inc(completion)
            if name is not None:
                if prompt:
                    self.key_tokens.labels(name, "prompt").inc(prompt)
                if completion:
                    self.key_tokens.labels(name, "completion").inc(completion)
        cost = record.get("cost_usd")
        if cost:
            self.cost.labels(name or "none", self._price_label(model)).inc(cost)
