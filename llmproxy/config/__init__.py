"""The configuration: YAML in, frozen attrs classes out.

All validation lives here. A mistake is a :class:`ConfigError` whose
message starts with the key path that is wrong, for instance
``model_routes.gpt-4.urls[1]: not an http(s) URL: 'ftp://x'``, with its line
and column in the file; a file with several is read whole and raises
:class:`ConfigErrors` with each of them, so that the daemon can print them
all and exit before it listens. The rest of the code never sees raw dicts.

The keys file named by ``auth.keys_file`` is read at load too: its
entries are :attr:`AuthConfig.file_keys`, and its mistakes are ConfigErrors
for ``auth.keys_file`` naming the line. :func:`parse_redis_url` and
:func:`key_digest` say what ``rate_limit.store`` and a client key stand for,
to the packages that use them; :func:`parse_key_line` reads one keys file
line, :func:`find_price` finds the ``prices`` entry of a model, and
:func:`config_warnings` says what ``--check`` warns about.

No message quotes a secret (``_secrets`` says which key paths hold one),
``tls.ca_file`` is parsed certificate by certificate, and a YAML document
is bounded (size, aliases, what they expand to, nesting) before it is
walked or built.

This package imports no other llmproxy package. The implementation is split
into private modules: ``_model`` and ``_policy`` (the attrs classes,
:class:`ConfigError`, the defaults), ``_yaml`` (loading, bounds, duplicate
keys, where each key path is), ``_values`` (value converters),
``_problems`` (every mistake found in one reading), ``_secrets`` (secret
key paths),
``_sections`` (section converters), ``_ca_file`` (``tls.ca_file``),
``_keys``, ``_key_fields`` and ``_keys_file`` (``auth``, client keys'
policies and keys files), ``_prices`` (``prices``, ``stream_usage``),
``_warnings`` and ``_redis_url``. Import everything from this package.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import yaml

from llmproxy.config._dump import dump_config
from llmproxy.config._model import (
    Config,
    ConfigError,
    ConfigErrors,
    PoolConfig,
    RateLimitConfig,
    RouteConfig,
    TimeoutsConfig,
    redact_url,
)

# Public as before, though not in __all__: the redundant aliases mark them
# as re-exports.
from llmproxy.config._model import AUTH_HEADERS as AUTH_HEADERS
from llmproxy.config._model import DEFAULT_ADMIN_LISTEN as DEFAULT_ADMIN_LISTEN
from llmproxy.config._model import DEFAULT_DIRECT_NETWORKS as DEFAULT_DIRECT_NETWORKS
from llmproxy.config._model import LOG_LEVELS as LOG_LEVELS
from llmproxy.config._model import STRATEGIES as STRATEGIES
from llmproxy.config._model import VIA_CHOICES as VIA_CHOICES
from llmproxy.config._model import LogConfig as LogConfig
from llmproxy.config._model import TLSConfig as TLSConfig
from llmproxy.config._policy import BUDGET_PERIODS as BUDGET_PERIODS
from llmproxy.config._policy import BUDGET_UNITS as BUDGET_UNITS
from llmproxy.config._policy import DEFAULT_RESERVE as DEFAULT_RESERVE
from llmproxy.config._policy import STREAM_USAGE as STREAM_USAGE
from llmproxy.config._policy import AuthConfig as AuthConfig
from llmproxy.config._policy import BudgetConfig as BudgetConfig
from llmproxy.config._policy import ClientKey as ClientKey
from llmproxy.config._policy import KeyRateConfig as KeyRateConfig
from llmproxy.config._policy import PriceConfig as PriceConfig
from llmproxy.config._keys import auth_section
from llmproxy.config._keys_file import key_digest, parse_key_line
from llmproxy.config._prices import prices_section, stream_usage
from llmproxy.config._redis_url import parse_redis_url
from llmproxy.config._warnings import config_warnings, find_price
from llmproxy.config._sections import (
    _admin_listen,
    _aliases,
    _fallbacks,
    _seconds,
    _log,
    _pool,
    metrics_section,
    _rate_limit,
    _routes,
    _timeouts,
    _tls,
)
from llmproxy.config._values import (
    _endpoint,
    _expand,
    _join,
    _Mapping,
    _networks,
    _no_proxy,
    _number,
    _port,
    _positive_int,
    _proxy_url,
)
from llmproxy.config._problems import checked, collecting, report
from llmproxy.config._yaml import (
    _LOADER,
    MAX_BYTES,
    _check_bounds,
    _check_duplicates,
    _check_size,
    _line_of,
    key_marks,
    located,
)

__all__ = [
    "config_warnings",
    "dump_config",
    "find_price",
    "Config",
    "ConfigError",
    "ConfigErrors",
    "PoolConfig",
    "RateLimitConfig",
    "RouteConfig",
    "TimeoutsConfig",
    "key_digest",
    "load_config",
    "parse_config",
    "parse_key_line",
    "parse_config_text",
    "parse_redis_url",
    "redact_url",
]

DEFAULT_PORT = 8000
#: Twisted's default listen backlog is 50: too small for a burst of 1,000
#: connections.
DEFAULT_BACKLOG = 1024


def load_config(path: str, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a YAML config file.

    Args:
        path: The file to read.
        environ: Where ``${NAME}`` values come from (default ``os.environ``).

    Returns:
        The validated configuration, with the keys file's entries (if it
        names one) read.

    Raises:
        ConfigError: The file is missing, unreadable, larger than 1 MiB,
            not YAML, or wrong; or so is the keys file or ``tls.ca_file``.
    """
    try:
        with open(path, "rb") as f:
            # One byte more than the limit, which parse_config_text refuses.
            text = f.read(MAX_BYTES + 1)
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
        ConfigError: The text is larger than 1 MiB, not YAML, too big once
            its aliases are followed, or the config is wrong.
    """
    _check_size(text, source)
    loader = _LOADER(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_bounds(node, source)
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
    try:
        return parse_config(data, environ, source=source)
    except ConfigError as e:
        if node is None:
            raise
        raise located(e, key_marks(node)) from None


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
        ConfigError: Naming the key that is wrong; :class:`ConfigErrors`
            when several are (each mistake is found, in one reading).
    """
    if data is None:
        raise ConfigError(source, "the config file is empty")
    env = os.environ if environ is None else environ
    with collecting() as problems:
        try:
            fields = _fields(data, env, source)
        except ConfigError as e:
            report(e)
    if problems:
        raise problems[0] if len(problems) == 1 else ConfigErrors(problems)
    return Config(**fields, source=source)


def _fields(data: Any, env: Mapping[str, str], source: str) -> dict[str, Any]:
    """The :class:`Config` fields of a document; mistakes are reported
    (:func:`~llmproxy.config._values.report`) and read as absent."""
    top = _Mapping(_expand(data, "", env), "", source)
    top.check_keys(_TOP_KEYS)

    port = top.get("port", _port)
    listen = top.get("listen", _endpoint)
    if port is not None and listen is not None:
        report(ConfigError("listen", "give either 'port' or 'listen', not both"))
    if listen is None:
        listen = f"tcp:{DEFAULT_PORT if port is None else port}"
    backlog = top.get("backlog", _positive_int) or DEFAULT_BACKLOG
    listen = with_backlog(listen, backlog)

    target_map = top.get("target_map", _routes)
    if not target_map:
        report(ConfigError("target_map", "required: at least one path mapped to a base URL"))
    for path in target_map or ():
        if not path.startswith("/"):
            report(ConfigError(_join("target_map", path), "a path must start with '/'"))
    proxy_url = top.get("proxy_url", _proxy_url)
    if proxy_url is None:
        for table in ("target_map", "model_routes"):
            for key, route in (top.get(table, _routes) or {}).items():
                if route.via == "proxy":
                    report(ConfigError(
                        _join(_join(table, key), "via"),
                        "'proxy' needs proxy_url, which is not set",
                    ))
    direct_networks = top.get("direct_networks", _networks)
    auth = top.get("auth", auth_section)
    rate_limit = top.get("rate_limit", _rate_limit)
    if rate_limit is not None and rate_limit.key == "api_key" and auth is None:
        report(ConfigError(
            "rate_limit.key", "'api_key' needs auth (client keys), which is not set"
        ))
    model_routes = top.get("model_routes", _routes) or MappingProxyType({})
    metrics = top.get("metrics", metrics_section) or (True, None)
    return dict(
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
        admin_listen=checked(_admin_listen, top),
        metrics=metrics[0],
        metrics_max_models=metrics[1] or 100,
        trusted_proxies=top.get("trusted_proxies", _networks) or (),
        auth=auth,
        max_body_bytes=top.get("max_body_bytes", _positive_int) or 32 * 1024 * 1024,
        shutdown_grace=checked(_seconds, top, "shutdown_grace", 30.0),
        model_aliases=checked(_aliases, top, model_routes),
        fallbacks=checked(_fallbacks, top, model_routes),
        max_retry_wait=checked(_seconds, top, "max_retry_wait", 2.0),
        workers=top.get("workers", _positive_int) or 1,
        max_connections=top.get("max_connections", _positive_int),
        max_connections_per_client=top.get("max_connections_per_client", _positive_int),
        prices=top.get("prices", prices_section) or MappingProxyType({}),
        stream_usage=top.get("stream_usage", stream_usage) or "budget",
    )


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
    "workers",
    "backlog",
    "max_connections",
    "max_connections_per_client",
    "prices",
    "stream_usage",
)


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
