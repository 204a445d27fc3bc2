"""The configuration: YAML in, frozen attrs classes out.

All validation lives here. Every mistake raises :class:`ConfigError` whose
message starts with the key path that is wrong, for instance
``model_routes.gpt-4.urls[1]: not an http(s) URL: 'ftp://x'``, so that the
daemon can print one line and exit before it listens. The rest of the code
never sees raw dicts.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, TypeVar
from urllib.parse import urlsplit

import attrs
import yaml

__all__ = [
    "Config",
    "ConfigError",
    "PoolConfig",
    "RateLimitConfig",
    "RouteConfig",
    "TimeoutsConfig",
    "load_config",
    "parse_config",
    "parse_config_text",
    "redact_url",
]

T = TypeVar("T")

DEFAULT_PORT = 8000
#: Twisted's default listen backlog is 50: too small for a burst of 1,000
#: connections.
DEFAULT_BACKLOG = 1024
_ENV_PATTERN = re.compile(r"\$\{([^}]*)\}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")
_HOST_PATTERN = re.compile(r"(\*|\.?[A-Za-z0-9_.-]+|\[?[0-9A-Fa-f:.]+\]?)\Z")


class ConfigError(Exception):
    """A configuration mistake, worded for the person who made it.

    Attributes:
        key: The key path that is wrong (``rate_limit.burst``), or the file
            name when the file itself cannot be used.
        message: What is wrong with it.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


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


@attrs.frozen
class RateLimitConfig:
    """The seed's per-client token bucket.

    Attributes:
        rate: Tokens added per second (may be fractional).
        burst: Bucket size.
        key: What a client is: its ``ip`` or, with auth on, its ``api_key``.
    """

    rate: float
    burst: int
    key: str = "ip"


@attrs.frozen
class TimeoutsConfig:
    """Time limits, in seconds.

    Attributes:
        response_header: Longest wait for the upstream's response headers
            before answering 504 (the seed's 900 s).
        connect: Longest wait for a TCP connection to an upstream.
        client_idle: An idle client connection is closed after this long
            between requests.
        stream_idle: A response body from which no byte arrives for this
            long is aborted.
    """

    response_header: float = 900.0
    connect: float = 10.0
    client_idle: float = 60.0
    stream_idle: float = 300.0


@attrs.frozen
class PoolConfig:
    """The persistent upstream connection pool.

    Attributes:
        max_per_host: Idle persistent connections kept per upstream host.
        idle_timeout: Seconds an idle pooled connection is kept; keep it
            below the upstream's own keep-alive timeout.
    """

    max_per_host: int = 64
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
class AuthConfig:
    """Client keys.

    Attributes:
        keys: Accepted keys (secrets; never shown).
        keys_file: A file of keys, one a line (``sha256:<hex>`` for a hash).
    """

    keys: tuple[str, ...] = attrs.field(default=(), repr=lambda keys: f"<{len(keys)} keys>")
    keys_file: str | None = None


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
        trusted_proxies: Peers whose X-Forwarded-For / X-Real-IP are
            believed.
        auth: Client keys, or None for an open proxy.
        max_body_bytes: Largest request body accepted.
        shutdown_grace: Seconds in-flight requests may take after SIGTERM.
        model_aliases: Alias -> model: routed to the model's pool, with
            ``model`` rewritten in the body sent upstream.
        fallbacks: Model -> models tried, in order, when every upstream of
            the model failed before the first byte.
        max_retry_wait: Longest Retry-After honoured before retrying the
            same upstream when no other is left.
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
    trusted_proxies: tuple[str, ...] = ()
    auth: AuthConfig | None = None
    max_body_bytes: int = 32 * 1024 * 1024
    shutdown_grace: float = 30.0
    model_aliases: Mapping[str, str] = attrs.field(factory=lambda: MappingProxyType({}))
    fallbacks: Mapping[str, tuple[str, ...]] = attrs.field(
        factory=lambda: MappingProxyType({})
    )
    max_retry_wait: float = 2.0
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


def load_config(path: str, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a YAML config file.

    Args:
        path: The file to read.
        environ: Where ``${NAME}`` values come from (default ``os.environ``).

    Returns:
        The validated configuration.

    Raises:
        ConfigError: The file is missing, unreadable, not YAML, or wrong.
    """
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(path, f"cannot read config file: {e.strerror}") from None
    return parse_config_text(text, environ, source=path)


def parse_config_text(
    text: str | bytes,
    environ: Mapping[str, str] | None = None,
    source: str = "<config>",
) -> Config:
    """Validate a config given as YAML text.

    Args:
        text: The YAML document.
        environ: Where ``${NAME}`` values come from (default ``os.environ``).
        source: A name for the document, used in messages.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: The text is not YAML, or the config is wrong.
    """
    loader = _LOADER(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_duplicates(node, "")
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = (e.problem or "").strip() or "cannot parse"
        raise ConfigError(source, f"invalid YAML{where}: {problem}") from None
    except yaml.reader.ReaderError as e:
        line = _line_of(text, e.position)
        raise ConfigError(
            source, f"invalid YAML at line {line}: {e.reason} (character {e.character!r})"
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(source, "invalid YAML: " + " ".join(str(e).split())) from None
    finally:
        loader.dispose()
    return parse_config(data, environ, source=source)


def parse_config(
    data: Any,
    environ: Mapping[str, str] | None = None,
    source: str = "<config>",
) -> Config:
    """Validate a config given as already-parsed YAML data.

    Args:
        data: The document: a mapping of top-level keys.
        environ: Where ``${NAME}`` values come from (default ``os.environ``).
        source: A name for the document, used in messages.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: Naming the first key that is wrong.
    """
    if data is None:
        raise ConfigError(source, "the config file is empty")
    env = os.environ if environ is None else environ
    top = _Mapping(_expand(data, "", env), "", source)
    top.check_keys(_TOP_KEYS)

    port = top.get("port", _port)
    listen = top.get("listen", _endpoint)
    if port is not None and listen is not None:
        raise ConfigError("listen", "give either 'port' or 'listen', not both")
    if listen is None:
        listen = f"tcp:{DEFAULT_PORT if port is None else port}"
    backlog = top.get("backlog", _positive_int) or DEFAULT_BACKLOG
    listen = with_backlog(listen, backlog)

    target_map = top.get("target_map", _routes)
    if not target_map:
        raise ConfigError(
            "target_map", "required: at least one path mapped to a base URL"
        )
    for path in target_map:
        if not path.startswith("/"):
            raise ConfigError(
                _join("target_map", path), "a path must start with '/'"
            )
    proxy_url = top.get("proxy_url", _proxy_url)
    if proxy_url is None:
        for table in ("target_map", "model_routes"):
            for key, route in (top.get(table, _routes) or {}).items():
                if route.via == "proxy":
                    raise ConfigError(
                        _join(_join(table, key), "via"),
                        "'proxy' needs proxy_url, which is not set",
                    )
    direct_networks = top.get("direct_networks", _networks)
    auth = top.get("auth", _auth)
    rate_limit = top.get("rate_limit", _rate_limit)
    if rate_limit is not None and rate_limit.key == "api_key" and auth is None:
        raise ConfigError("rate_limit.key", "'api_key' needs auth (client keys), which is not set")
    model_routes = top.get("model_routes", _routes) or MappingProxyType({})
    return Config(
        listen=listen,
        target_map=target_map,
        model_routes=model_routes,
        proxy_url=proxy_url,
        rate_limit=rate_limit,
        timeouts=top.get("timeouts", _timeouts) or TimeoutsConfig(),
        pool=top.get("pool", _pool) or PoolConfig(),
        demo_upstream=top.get("demo_upstream", _endpoint),
        no_proxy=top.get("no_proxy", _no_proxy) or (),
        direct_networks=DEFAULT_DIRECT_NETWORKS if direct_networks is None else direct_networks,
        dns_cache_ttl=top.get("dns_cache_ttl", _number) or 300.0,
        tls=top.get("tls", _tls) or TLSConfig(),
        log=top.get("log", _log) or LogConfig(),
        admin_listen=_admin_listen(top),
        metrics=True if top.get("metrics", _boolean) is None else top.value["metrics"],
        trusted_proxies=top.get("trusted_proxies", _networks) or (),
        auth=auth,
        max_body_bytes=top.get("max_body_bytes", _positive_int) or 32 * 1024 * 1024,
        shutdown_grace=_grace(top),
        model_aliases=_aliases(top, model_routes),
        fallbacks=_fallbacks(top, model_routes),
        max_retry_wait=_grace_like(top, "max_retry_wait", 2.0),
        source=source,
    )


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _line_of(text: str | bytes, position: int) -> int:
    """The 1-based line holding character ``position`` of ``text``."""
    newline = b"\n" if isinstance(text, bytes) else "\n"
    return text[:position].count(newline) + 1


def _check_duplicates(node: yaml.Node, path: str) -> None:
    """Refuse a mapping that names the same key twice (YAML keeps the last)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = str(key_node.value)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise ConfigError(
                        _join(path, key),
                        f"duplicate key (lines {seen[key]} and {line}); give it once",
                    )
                seen[key] = line
                _check_duplicates(value_node, _join(path, key))
            else:
                _check_duplicates(value_node, path)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicates(item, f"{path}[{i}]")


# -- the schema ------------------------------------------------------------

_TOP_KEYS = (
    "port",
    "listen",
    "proxy_url",
    "rate_limit",
    "target_map",
    "model_routes",
    "timeouts",
    "pool",
    "demo_upstream",
    "no_proxy",
    "direct_networks",
    "dns_cache_ttl",
    "tls",
    "log",
    "admin_listen",
    "metrics",
    "trusted_proxies",
    "auth",
    "max_body_bytes",
    "shutdown_grace",
    "model_aliases",
    "fallbacks",
    "max_retry_wait",
    "backlog",
)


def _join(parent: str, key: str) -> str:
    """Append a mapping key to a key path, quoting keys that need it."""
    if not _PLAIN_KEY.match(key):
        part = '["' + key.replace('"', '\\"') + '"]'
        return parent + part if parent else part
    return f"{parent}.{key}" if parent else key


def _describe(value: Any) -> str:
    """Name a YAML value's type for a message, with the value if short."""
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
        type(None): "nothing (null)",
    }
    name = names.get(type(value), type(value).__name__)
    if isinstance(value, (bool, int, float, str)):
        shown = repr(value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        return f"{name} {shown}"
    return name


def _expand(value: Any, path: str, env: Mapping[str, str]) -> Any:
    """Expand ``${NAME}`` in every string value, recursively."""
    if isinstance(value, str):
        return _expand_string(value, path, env)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(
                    _join(path, str(k)), f"keys must be strings, got {_describe(k)}"
                )
            out[k] = _expand(v, _join(path, k), env)
        return out
    if isinstance(value, list):
        return [_expand(v, f"{path}[{i}]", env) for i, v in enumerate(value)]
    return value


def _expand_string(value: str, path: str, env: Mapping[str, str]) -> str:
    """Replace each ``${NAME}`` with the environment variable's value."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if not _ENV_NAME.match(name):
            raise ConfigError(path, f"'${{{name}}}' is not a valid variable name")
        try:
            return env[name]
        except KeyError:
            raise ConfigError(
                path, f"environment variable {name} is not set"
            ) from None

    if "${" not in value:
        return value
    return _ENV_PATTERN.sub(replace, value)


class _Mapping:
    """A YAML mapping being validated, remembering its key path."""

    def __init__(self, value: Any, path: str, source: str = "<config>") -> None:
        if not isinstance(value, dict):
            raise ConfigError(
                path or source, f"expected a mapping, got {_describe(value)}"
            )
        self.value = value
        self.path = path

    def check_keys(self, known: tuple[str, ...]) -> None:
        """Refuse keys outside ``known``, suggesting the nearest one."""
        for key in self.value:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                allowed = ", ".join(known)
                raise ConfigError(
                    _join(self.path, key), f"unknown key{hint} (known keys: {allowed})"
                )

    def get(self, key: str, convert: Callable[[Any, str], T]) -> T | None:
        """Convert one key's value, or return None when it is absent/null."""
        if key not in self.value or self.value[key] is None:
            return None
        return convert(self.value[key], _join(self.path, key))


def _string(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(path, f"expected a string, got {_describe(value)}")
    if not value.strip():
        raise ConfigError(path, "must not be empty")
    return value


def _number(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(path, f"expected a number, got {_describe(value)}")
    if not value > 0 or value == float("inf"):
        raise ConfigError(path, f"must be a positive number, got {value!r}")
    return float(value)


def _positive_int(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(path, f"expected an integer, got {_describe(value)}")
    if value < 1:
        raise ConfigError(path, f"must be at least 1, got {value}")
    return value


def _port(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(path, f"expected an integer port, got {_describe(value)}")
    if not 1 <= value <= 65535:
        raise ConfigError(path, f"port out of range (1-65535): {value}")
    return value


def with_backlog(description: str, backlog: int) -> str:
    """Add ``backlog=`` to a tcp/tcp6 endpoint string that has none.

    Args:
        description: A Twisted server endpoint string.
        backlog: The listen queue length.

    Returns:
        The description, with the backlog when it applies.
    """
    kind = description.split(":", 1)[0].lower()
    if kind in ("tcp", "tcp6") and "backlog=" not in description:
        return f"{description}:backlog={backlog}"
    return description


def _endpoint(value: Any, path: str) -> str:
    return _string(value, path).strip()


def _url(value: Any, path: str, schemes: tuple[str, ...] = ("http", "https")) -> str:
    text = _string(value, path).strip()
    what = "an http(s) URL"
    try:
        parts = urlsplit(text)
    except ValueError as e:
        raise ConfigError(path, f"not {what}: {text!r} ({e})") from None
    try:
        port = parts.port
    except ValueError as e:
        if "out of range" in str(e):
            raise ConfigError(path, f"port out of range (1-65535) in {text!r}") from None
        raise ConfigError(path, f"not {what}: {text!r} (the port is not a number)") from None
    if parts.scheme.lower() not in schemes or not parts.hostname:
        raise ConfigError(path, f"not {what}: {text!r}")
    if port == 0:
        raise ConfigError(path, f"port out of range (1-65535) in {text!r}")
    if parts.fragment or text.endswith("#"):
        raise ConfigError(path, f"a base URL cannot have a #fragment: {text!r}")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            path, "credentials in a base URL are never sent upstream: remove 'user:password@'"
        )
    if parts.query:
        raise ConfigError(path, f"a base URL cannot have a ?query: {text!r}")
    return text.rstrip("/")


def _proxy_url(value: Any, path: str) -> str:
    text = _string(value, path).strip()
    # Credentials are allowed here (they become Proxy-Authorization), may
    # hold unencoded delimiters, and never appear in a message.
    scheme, sep, rest = text.partition("://")
    userinfo, at, hostport = rest.rpartition("@")
    shown = f"{scheme}{sep}{'***@' if at else ''}{hostport}"
    if not sep:
        hidden, has_at, tail = text.rpartition("@")
        shown = "***@" + tail if has_at else text
        raise ConfigError(
            path, f"not an http(s) URL: {shown!r} (write http://[user:pass@]host:port)"
        )
    if hostport.rstrip("/").count("/") or "?" in hostport or "#" in hostport:
        raise ConfigError(
            path, f"a proxy URL has no path, query or fragment: http(s)://[user:pass@]host:port, got {shown!r}"
        )
    try:
        _url(f"{scheme}://{hostport}", path)
    except ConfigError as e:
        raise ConfigError(path, e.message) from None
    return text.rstrip("/")


def _route(value: Any, path: str) -> RouteConfig:
    if isinstance(value, str):
        return RouteConfig(urls=(_url(value, path),))
    if not isinstance(value, dict):
        raise ConfigError(
            path, f"expected a URL or a mapping with 'urls', got {_describe(value)}"
        )
    route = _Mapping(value, path)
    route.check_keys(
        ("urls", "via", "api_key", "auth_header", "strategy", "retries", "retry_on",
         "eject_after", "cooldown")
    )
    strategy = route.get("strategy", _string) or "round_robin"
    if strategy not in STRATEGIES:
        raise ConfigError(
            _join(path, "strategy"),
            f"expected one of {', '.join(STRATEGIES)}, got {strategy!r}",
        )
    retries = route.value.get("retries")
    if retries is not None and (isinstance(retries, bool) or not isinstance(retries, int)
                                or retries < 0):
        raise ConfigError(
            _join(path, "retries"), f"expected an integer >= 0, got {_describe(retries)}"
        )
    retry_on = route.value.get("retry_on", [429, 500, 502, 503, 504])
    if not isinstance(retry_on, list) or not all(
        isinstance(c, int) and not isinstance(c, bool) and 100 <= c <= 599 for c in retry_on
    ):
        raise ConfigError(
            _join(path, "retry_on"), f"expected a list of HTTP statuses, got {_describe(retry_on)}"
        )
    eject_after = route.get("eject_after", _positive_int) or 5
    cooldown = route.get("cooldown", _number) or 30.0
    api_key = route.get("api_key", _string)
    auth_header = route.get("auth_header", _string) or "bearer"
    if auth_header not in AUTH_HEADERS:
        raise ConfigError(
            _join(path, "auth_header"),
            f"expected one of {', '.join(AUTH_HEADERS)}, got {auth_header!r}",
        )
    via = route.get("via", _string) or "auto"
    if via not in VIA_CHOICES:
        raise ConfigError(
            _join(path, "via"), f"expected one of {', '.join(VIA_CHOICES)}, got {via!r}"
        )
    urls = route.value.get("urls")
    upath = _join(path, "urls")
    if urls is None:
        raise ConfigError(upath, "required: a list of base URLs")
    if isinstance(urls, str):
        urls = [urls]
    if not isinstance(urls, list):
        raise ConfigError(upath, f"expected a list of URLs, got {_describe(urls)}")
    if not urls:
        raise ConfigError(upath, "must list at least one URL")
    parsed, weights = [], []
    for i, item in enumerate(urls):
        ipath = f"{upath}[{i}]"
        if isinstance(item, dict):
            entry = _Mapping(item, ipath)
            entry.check_keys(("url", "weight"))
            if "url" not in item:
                raise ConfigError(_join(ipath, "url"), "required: the base URL")
            parsed.append(_url(item["url"], _join(ipath, "url")))
            weights.append(entry.get("weight", _positive_int) or 1)
        else:
            parsed.append(_url(item, ipath))
            weights.append(1)
    return RouteConfig(
        urls=tuple(parsed),
        via=via,
        api_key=api_key,
        auth_header=auth_header,
        weights=tuple(weights) if any(w != 1 for w in weights) else None,
        strategy=strategy,
        retries=retries,
        retry_on=tuple(retry_on),
        eject_after=eject_after,
        cooldown=cooldown,
    )


def _routes(value: Any, path: str) -> Mapping[str, RouteConfig]:
    table = _Mapping(value, path)
    routes = {}
    for key, route in table.value.items():
        if not key:
            raise ConfigError(_join(path, key), "an empty key is not allowed")
        routes[key] = _route(route, _join(path, key))
    return MappingProxyType(routes)


def _rate_limit(value: Any, path: str) -> RateLimitConfig:
    table = _Mapping(value, path)
    table.check_keys(("rate", "burst", "key"))
    rate = table.get("rate", _number)
    burst = table.get("burst", _positive_int)
    key = table.get("key", _string) or "ip"
    if key not in ("ip", "api_key"):
        raise ConfigError(_join(path, "key"), f"expected ip or api_key, got {key!r}")
    if rate is None:
        raise ConfigError(_join(path, "rate"), "required: tokens per second")
    if burst is None:
        burst = max(1, int(rate))
    return RateLimitConfig(rate=rate, burst=burst, key=key)


def _timeouts(value: Any, path: str) -> TimeoutsConfig:
    table = _Mapping(value, path)
    fields = ("response_header", "connect", "client_idle", "stream_idle")
    table.check_keys(fields)
    given = {k: table.get(k, _number) for k in fields}
    return TimeoutsConfig(**{k: v for k, v in given.items() if v is not None})


def _pool(value: Any, path: str) -> PoolConfig:
    table = _Mapping(value, path)
    table.check_keys(("max_per_host", "idle_timeout"))
    given = {
        "max_per_host": table.get("max_per_host", _positive_int),
        "idle_timeout": table.get("idle_timeout", _number),
    }
    return PoolConfig(**{k: v for k, v in given.items() if v is not None})


def _string_list(value: Any, path: str) -> list[str]:
    """A list of strings, or one comma-separated string."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list):
        raise ConfigError(path, f"expected a list of strings, got {_describe(value)}")
    return [_string(item, f"{path}[{i}]").strip() for i, item in enumerate(value)]


def _network(value: str, path: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise ConfigError(path, f"not an IP network (CIDR): {value!r}") from None


def _networks(value: Any, path: str) -> tuple[str, ...]:
    items = _string_list(value, path)
    return tuple(_network(item, f"{path}[{i}]") for i, item in enumerate(items))


def _no_proxy(value: Any, path: str) -> tuple[str, ...]:
    entries = []
    for i, item in enumerate(_string_list(value, path)):
        if "/" in item:
            item = _network(item, f"{path}[{i}]")
        elif not _HOST_PATTERN.match(item):
            raise ConfigError(
                f"{path}[{i}]",
                f"expected a host name, .suffix, IP address, CIDR or '*', got {item!r}",
            )
        entries.append(item.lower())
    return tuple(entries)


def _tls(value: Any, path: str) -> TLSConfig:
    table = _Mapping(value, path)
    table.check_keys(("ca_file",))
    ca_file = table.get("ca_file", _string)
    if ca_file is not None:
        key = _join(path, "ca_file")
        try:
            with open(ca_file, "rb") as f:
                pem = f.read()
        except OSError as e:
            raise ConfigError(key, f"cannot read {ca_file!r}: {e.strerror}") from None
        if b"-----BEGIN CERTIFICATE-----" not in pem:
            raise ConfigError(key, f"{ca_file!r} holds no PEM certificate")
    return TLSConfig(ca_file=ca_file)


def _admin_listen(top: _Mapping) -> str | None:
    """``admin_listen``: an endpoint, the default when absent, None if null."""
    if "admin_listen" not in top.value:
        return DEFAULT_ADMIN_LISTEN
    return top.get("admin_listen", _endpoint)


def _boolean(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(path, f"expected true or false, got {_describe(value)}")
    return value


def _log(value: Any, path: str) -> LogConfig:
    table = _Mapping(value, path)
    table.check_keys(
        ("file", "max_bytes", "backups", "compress", "level", "access", "console_access")
    )
    defaults = LogConfig()
    level = table.get("level", _string)
    if level is not None and level.lower() not in LOG_LEVELS:
        raise ConfigError(
            _join(path, "level"), f"expected one of {', '.join(LOG_LEVELS)}, got {level!r}"
        )
    backups = table.value.get("backups")
    if backups is not None and not (isinstance(backups, int) and not isinstance(backups, bool)
                                    and backups >= 0):
        raise ConfigError(
            _join(path, "backups"), f"expected an integer >= 0, got {_describe(backups)}"
        )
    compress = table.get("compress", _boolean)
    access = table.get("access", _boolean)
    console_access = table.get("console_access", _boolean)
    file = table.get("file", _string) if "file" in table.value else defaults.file
    return LogConfig(
        access=defaults.access if access is None else access,
        console_access=(file is None) if console_access is None else console_access,
        file=file,
        max_bytes=table.get("max_bytes", _positive_int) or defaults.max_bytes,
        backups=defaults.backups if backups is None else backups,
        compress=defaults.compress if compress is None else compress,
        level=(level or defaults.level).lower(),
    )


def _grace(top: _Mapping) -> float:
    value = top.value.get("shutdown_grace")
    if value is None:
        return 30.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError("shutdown_grace", f"expected seconds >= 0, got {_describe(value)}")
    return float(value)


def _auth(value: Any, path: str) -> AuthConfig:
    table = _Mapping(value, path)
    table.check_keys(("keys", "keys_file"))
    keys = tuple(table.get("keys", _string_list) or ())
    keys_file = table.get("keys_file", _string)
    if keys_file is not None:
        try:
            with open(keys_file, "rb"):
                pass
        except OSError as e:
            raise ConfigError(
                _join(path, "keys_file"), f"cannot read {keys_file!r}: {e.strerror}"
            ) from None
    if not keys and keys_file is None:
        raise ConfigError(path, "give 'keys' or 'keys_file' (or remove 'auth')")
    return AuthConfig(keys=keys, keys_file=keys_file)


def _grace_like(top: _Mapping, key: str, default: float) -> float:
    value = top.value.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(key, f"expected seconds >= 0, got {_describe(value)}")
    return float(value)


def _aliases(top: _Mapping, models: Mapping[str, RouteConfig]) -> Mapping[str, str]:
    table = top.get("model_aliases", lambda v, p: _Mapping(v, p))
    if table is None:
        return MappingProxyType({})
    aliases = {}
    for alias, model in table.value.items():
        key = _join("model_aliases", alias)
        model = _string(model, key)
        if model not in models:
            raise ConfigError(key, f"{model!r} is not a key of model_routes")
        aliases[alias] = model
    return MappingProxyType(aliases)


def _fallbacks(
    top: _Mapping, models: Mapping[str, RouteConfig]
) -> Mapping[str, tuple[str, ...]]:
    table = top.get("fallbacks", lambda v, p: _Mapping(v, p))
    if table is None:
        return MappingProxyType({})
    fallbacks = {}
    for model, chain in table.value.items():
        key = _join("fallbacks", model)
        if model not in models:
            raise ConfigError(key, f"{model!r} is not a key of model_routes")
        if isinstance(chain, str):
            chain = [chain]
        if not isinstance(chain, list):
            raise ConfigError(key, f"expected a list of models, got {_describe(chain)}")
        for i, other in enumerate(chain):
            other = _string(other, f"{key}[{i}]")
            if other not in models:
                raise ConfigError(f"{key}[{i}]", f"{other!r} is not a key of model_routes")
        fallbacks[model] = tuple(chain)
    return MappingProxyType(fallbacks)
