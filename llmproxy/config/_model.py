"""The configuration's data model: the frozen attrs classes and their defaults.

Also :class:`ConfigError` and :func:`redact_url` (which ``Config``'s repr
uses). The client keys' and prices' classes are in ``_policy``. Everything
here is re-exported by :mod:`llmproxy.config`; import it from there.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import attrs

from llmproxy.config._policy import AuthConfig, PriceConfig

__all__ = [
    "AUTH_HEADERS",
    "DEFAULT_ADMIN_LISTEN",
    "DEFAULT_DIRECT_NETWORKS",
    "LOG_LEVELS",
    "STRATEGIES",
    "VIA_CHOICES",
    "Config",
    "ConfigError",
    "LogConfig",
    "PoolConfig",
    "RateLimitConfig",
    "RouteConfig",
    "TLSConfig",
    "TimeoutsConfig",
    "redact_url",
]


class ConfigError(Exception):
    """A configuration mistake, worded for the person who made it.

    Attributes:
        key: The key path that is wrong (``rate_limit.burst``), or the file
            name when the file itself cannot be used.
        message: What is wrong with it.
    """

    #: Where in the YAML file the key is (1-based), once known.
    line: int | None = None
    column: int | None = None

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message

    @property
    def errors(self) -> tuple[ConfigError, ...]:
        """The mistakes this error reports: itself alone."""
        return (self,)

    def describe(self) -> str:
        """``key: message``, then the place in the file when known."""
        if self.line is None:
            return str(self)
        return f"{self} (line {self.line}, column {self.column})"


class ConfigErrors(ConfigError):
    """Several configuration mistakes, found in one reading of the file.

    Its ``key`` and ``message`` are the first mistake's.

    Attributes:
        errors: Every mistake, in the order they were found.
    """

    def __init__(self, errors: list[ConfigError]) -> None:
        first = errors[0]
        super().__init__(first.key, first.message)
        self._errors = tuple(errors)
        self.args = ("; ".join(str(e) for e in errors),)

    @property
    def errors(self) -> tuple[ConfigError, ...]:
        """Every mistake, in the order found."""
        return self._errors

    def describe(self) -> str:
        """Every mistake, one a line."""
        return "\n".join(e.describe() for e in self._errors)


@attrs.frozen
class RouteConfig:
    """Where one route (a path or a model) sends requests.

    Attributes:
        urls: One or more base URLs, without a trailing slash; the request
            path is appended to the chosen one.
        via: How to reach them: ``auto`` (decide per host), ``direct`` or
            ``proxy`` (through ``proxy_url``).
        api_key: The upstream's credential; when set, it replaces whatever
            credential the client sent.
        auth_header: How ``api_key`` is sent: ``bearer``
            (``Authorization: Bearer``), ``x-api-key``, ``api-key`` or
            ``none``.
        weights: Each URL's weight (``weighted`` strategy), or None.
        strategy: ``round_robin``, ``weighted`` or ``least_outstanding``.
        retries: Further upstreams tried when one fails before the first
            byte (None: pool size - 1).
        retry_on: Upstream statuses that count as such a failure.
        eject_after: Consecutive failures that take an upstream out of the
            rotation.
        cooldown: Seconds an ejected upstream waits for its trial request
            (doubling on each repeated ejection, up to 300).
        stream_usage: ``budget``, ``always`` or ``never``: when a streamed
            request is made to ask for a usage event; None for the top
            level's ``stream_usage``.
    """

    urls: tuple[str, ...]
    via: str = "auto"
    api_key: str | None = attrs.field(default=None, repr=lambda key: "***" if key else "None")
    auth_header: str = "bearer"
    weights: tuple[int, ...] | None = None
    strategy: str = "round_robin"
    retries: int | None = None
    retry_on: tuple[int, ...] = (429, 500, 502, 503, 504)
    eject_after: int = 5
    cooldown: float = 30.0
    stream_usage: str | None = None


@attrs.frozen
class RateLimitConfig:
    """The per-client token bucket, and where limits are kept.

    Attributes:
        rate: Tokens added per second (may be fractional); None for no rate
            limit (a section holding only the store, for budgets).
        burst: Bucket size.
        key: What a client is: its ``ip`` or, with auth on, its ``api_key``.
        store: ``redis://[:password@]host:port/db`` shared by every worker
            and instance, or None for limits kept in each process.
        store_timeout: Seconds one check of the store may take.
        on_store_error: ``allow`` (let the request through) or ``deny``
            (503) when the store does not answer in time.
    """

    rate: float | None
    burst: int
    key: str = "ip"
    store: str | None = attrs.field(default=None, repr=lambda url: redact_url(url))
    store_timeout: float = 0.05
    on_store_error: str = "allow"


@attrs.frozen
class TimeoutsConfig:
    """Time limits, in seconds.

    Attributes:
        response_header: Longest wait for the upstream's response headers
            before answering 504.
        connect: Longest wait for a TCP connection to an upstream.
        client_idle: An idle client connection is closed after this long
            between requests.
        stream_idle: A response body from which no byte arrives for this
            long is aborted.
        request_read: A client must send a whole request, head and body,
            within this long of its first byte, else 408 and a close.
    """

    response_header: float = 900.0
    connect: float = 10.0
    client_idle: float = 60.0
    stream_idle: float = 300.0
    request_read: float = 30.0


@attrs.frozen
class PoolConfig:
    """The persistent upstream connection pool.

    Attributes:
        max_per_host: Idle persistent connections kept per upstream host.
        idle_timeout: Seconds an idle pooled connection is kept; keep it
            below the upstream's own keep-alive timeout.
    """

    max_per_host: int = 256
    idle_timeout: float = 50.0


#: Addresses reached directly (never through proxy_url) by default.
DEFAULT_DIRECT_NETWORKS = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "100.64.0.0/10",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
)

VIA_CHOICES = ("auto", "direct", "proxy")
STRATEGIES = ("round_robin", "weighted", "least_outstanding")


@attrs.frozen
class TLSConfig:
    """TLS to upstreams (and to an https proxy).

    Attributes:
        ca_file: A PEM file of extra CA certificates trusted in addition to
            the system trust store.
    """

    ca_file: str | None = None


LOG_LEVELS = ("debug", "info", "warn", "error", "critical")


@attrs.frozen
class LogConfig:
    """Logging.

    Attributes:
        file: The JSON log file (rotated), or None for no file.
        max_bytes: Rotate the file when it would grow past this size.
        backups: Rotated files kept.
        compress: Gzip rotated files (off the reactor thread).
        level: Lowest level logged: debug, info, warn, error, critical.
        access: Log one access record per request.
        console_access: Print access records on stdout too; by default
            only when there is no log file (the file has them all).
    """

    file: str | None = "logs/llmproxy.log"
    max_bytes: int = 100 * 1024 * 1024
    backups: int = 20
    compress: bool = True
    level: str = "info"
    access: bool = True
    console_access: bool = False


DEFAULT_ADMIN_LISTEN = "tcp:9100:interface=127.0.0.1"
AUTH_HEADERS = ("bearer", "x-api-key", "api-key", "none")


@attrs.frozen
class Config:
    """The whole, validated configuration.

    Attributes:
        listen: The public listener as a Twisted server endpoint string.
        target_map: Request path (exact, or a prefix ending in ``/``) to
            route, in file order.
        model_routes: Model name to route, in file order.
        proxy_url: The outbound HTTP proxy, if any.
        rate_limit: The per-client token bucket, if any.
        timeouts: Time limits.
        pool: Upstream connection pool settings.
        listen gets ``backlog=`` (default 1024) unless it names one.
        demo_upstream: If set, an endpoint string on which the bundled fake
            upstream runs inside the daemon (for demos).
        no_proxy: Hosts always reached directly: exact names, ``.suffix``
            domains, IP literals and CIDRs, or ``*`` for all.
        direct_networks: Upstreams whose address falls in one of these
            networks are reached directly.
        dns_cache_ttl: Seconds a DNS answer is cached.
        tls: TLS settings.
        log: Logging settings.
        admin_listen: The endpoint serving /metrics, /healthz and /readyz,
            or None for none.
        metrics: Whether Prometheus metrics are collected.
        metrics_max_models: How many distinct model names the token metrics
            label (the first seen; later ones are ``other``).
        trusted_proxies: Peers whose X-Forwarded-For / X-Real-IP are
            believed.
        auth: Client keys, or None for an open proxy.
        max_body_bytes: Largest request body accepted.
        shutdown_grace: Seconds in-flight requests may take after SIGTERM.
        model_aliases: Alias -> model: routed to the model's pool, with
            ``model`` rewritten in the body sent upstream.
        fallbacks: Model -> models tried, in order, when every upstream of
            the model failed before the first byte.
        workers: Processes serving the one listening socket (the first
            opens it, the others adopt it).
        max_connections: Open client connections per process at most; None
            for what the open-file limit allows.
        max_connections_per_client: Open connections per client address
            and process at most; None for a share of ``max_connections``.
        max_retry_wait: Longest Retry-After honoured before retrying the
            same upstream when no other is left.
        prices: Model name or glob -> price, in file order (an exact name
            wins over a glob; among globs, the first that matches).
        stream_usage: ``budget``, ``always`` or ``never``: when a streamed
            request is made to ask for a usage event (routes may say
            otherwise).
        source: Where the config came from (a file name), for messages.
    """

    listen: str
    target_map: Mapping[str, RouteConfig]
    model_routes: Mapping[str, RouteConfig] = attrs.field(
        factory=lambda: MappingProxyType({})
    )
    proxy_url: str | None = attrs.field(default=None, repr=lambda url: redact_url(url))
    rate_limit: RateLimitConfig | None = None
    timeouts: TimeoutsConfig = TimeoutsConfig()
    pool: PoolConfig = PoolConfig()
    demo_upstream: str | None = None
    no_proxy: tuple[str, ...] = ()
    direct_networks: tuple[str, ...] = DEFAULT_DIRECT_NETWORKS
    dns_cache_ttl: float = 300.0
    tls: TLSConfig = TLSConfig()
    log: LogConfig = LogConfig()
    admin_listen: str | None = DEFAULT_ADMIN_LISTEN
    metrics: bool = True
    metrics_max_models: int = 100
    trusted_proxies: tuple[str, ...] = ()
    auth: AuthConfig | None = None
    max_body_bytes: int = 32 * 1024 * 1024
    shutdown_grace: float = 30.0
    model_aliases: Mapping[str, str] = attrs.field(factory=lambda: MappingProxyType({}))
    fallbacks: Mapping[str, tuple[str, ...]] = attrs.field(
        factory=lambda: MappingProxyType({})
    )
    max_retry_wait: float = 2.0
    workers: int = 1
    max_connections: int | None = None
    max_connections_per_client: int | None = None
    prices: Mapping[str, PriceConfig] = attrs.field(factory=lambda: MappingProxyType({}))
    stream_usage: str = "budget"
    source: str = "<config>"


def redact_url(url: str | None) -> str:
    """Hide the password of a URL's ``user:password@`` part.

    The password may hold unencoded delimiters (``#``, ``?``, ``/``), so the
    URL is split at its last ``@`` rather than parsed.

    Args:
        url: A URL, or None.

    Returns:
        The URL's repr with any password replaced by ``***``.
    """
    if url is None:
        return "None"
    scheme, sep, rest = url.partition("://")
    userinfo, at, hostport = rest.rpartition("@")
    if not at:
        return repr(url)
    user, colon, _ = userinfo.partition(":")
    return repr(f"{scheme}{sep}{user}{':***' if colon else ''}@{hostport}")
