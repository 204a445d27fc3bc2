"""Converters for the config's sections.

One per table or composite key: routes (``target_map``, ``model_routes``),
``rate_limit``, ``timeouts``, ``pool``, ``tls``, ``admin_listen``, ``log``,
``shutdown_grace`` and ``max_retry_wait``, ``model_aliases`` and
``fallbacks``. (``auth`` has a module of its own, ``_keys``.)
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from llmproxy.config._model import (
    AUTH_HEADERS,
    DEFAULT_ADMIN_LISTEN,
    LOG_LEVELS,
    STRATEGIES,
    VIA_CHOICES,
    ConfigError,
    LogConfig,
    PoolConfig,
    RateLimitConfig,
    RouteConfig,
    TimeoutsConfig,
    TLSConfig,
)
from llmproxy.config._ca_file import check_ca_file
from llmproxy.config._prices import stream_usage
from llmproxy.config._redis_url import parse_redis_url
from llmproxy.config._problems import checked, report
from llmproxy.config._values import (
    _boolean,
    _describe,
    _endpoint,
    _join,
    _Mapping,
    _number,
    _positive_int,
    _string,
    _url,
)


def _route(value: Any, path: str) -> RouteConfig:
    if isinstance(value, str):
        return RouteConfig(urls=(_url(value, path),))
    if not isinstance(value, dict):
        raise ConfigError(
            path, f"expected a URL or a mapping with 'urls', got {_describe(value, path)}"
        )
    route = _Mapping(value, path)
    route.check_keys(
        ("urls", "via", "api_key", "auth_header", "strategy", "retries", "retry_on",
         "eject_after", "cooldown", "stream_usage")
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
        rpath = _join(path, "retries")
        raise ConfigError(rpath, f"expected an integer >= 0, got {_describe(retries, rpath)}")
    retry_on = route.value.get("retry_on", [429, 500, 502, 503, 504])
    if not isinstance(retry_on, list) or not all(
        isinstance(c, int) and not isinstance(c, bool) and 100 <= c <= 599 for c in retry_on
    ):
        rpath = _join(path, "retry_on")
        raise ConfigError(
            rpath, f"expected a list of HTTP statuses, got {_describe(retry_on, rpath)}"
        )
    eject_after = route.get("eject_after", _positive_int) or 5
    cooldown = route.get("cooldown", _number) or 30.0
    api_key = route.get("api_key", _string)
    if api_key is not None and (
        not api_key or any(ord(c) < 0x20 or ord(c) == 0x7F for c in api_key)
    ):
        # It is sent as a header value: a line break would split the request.
        raise ConfigError(
            _join(path, "api_key"), "must be non-empty, without control characters"
        )
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
        raise ConfigError(upath, f"expected a list of URLs, got {_describe(urls, upath)}")
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
        stream_usage=route.get("stream_usage", stream_usage),
    )


def _routes(value: Any, path: str) -> Mapping[str, RouteConfig]:
    table = _Mapping(value, path)
    routes = {}
    for key, route in table.value.items():
        if not key:
            report(ConfigError(_join(path, key), "an empty key is not allowed"))
            continue
        checked_route = checked(_route, route, _join(path, key))
        if checked_route is not None:
            routes[key] = checked_route
    return MappingProxyType(routes)


def _rate_limit(value: Any, path: str) -> RateLimitConfig:
    table = _Mapping(value, path)
    table.check_keys(("rate", "burst", "key", "store", "store_timeout", "on_store_error"))
    rate = table.get("rate", _number)
    burst = table.get("burst", _positive_int)
    key = table.get("key", _string) or "ip"
    if key not in ("ip", "api_key"):
        raise ConfigError(_join(path, "key"), f"expected ip or api_key, got {key!r}")
    store = table.get("store", _redis_url)
    if rate is None and store is None:
        raise ConfigError(_join(path, "rate"), "required: tokens per second")
    if burst is None:
        burst = max(1, int(rate or 1))
    on_error = table.get("on_store_error", _string) or "allow"
    if on_error not in ("allow", "deny"):
        raise ConfigError(
            _join(path, "on_store_error"), f"expected allow or deny, got {on_error!r}"
        )
    return RateLimitConfig(
        rate=rate, burst=burst, key=key, store=store,
        store_timeout=table.get("store_timeout", _number) or 0.05,
        on_store_error=on_error,
    )


def _redis_url(value: Any, path: str) -> str:
    url = _string(value, path).strip()
    try:
        parse_redis_url(url)
    except ValueError as e:
        raise ConfigError(path, str(e)) from None
    return url


def _timeouts(value: Any, path: str) -> TimeoutsConfig:
    table = _Mapping(value, path)
    fields = ("response_header", "connect", "client_idle", "stream_idle", "request_read")
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


def _tls(value: Any, path: str) -> TLSConfig:
    table = _Mapping(value, path)
    table.check_keys(("ca_file",))
    ca_file = table.get("ca_file", _string)
    if ca_file is not None:
        check_ca_file(ca_file, _join(path, "ca_file"))
    return TLSConfig(ca_file=ca_file)


def _admin_listen(top: _Mapping) -> str | None:
    """``admin_listen``: an endpoint, the default when absent, None if null."""
    if "admin_listen" not in top.value:
        return DEFAULT_ADMIN_LISTEN
    return top.get("admin_listen", _endpoint)


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
        bpath = _join(path, "backups")
        raise ConfigError(bpath, f"expected an integer >= 0, got {_describe(backups, bpath)}")
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


def _seconds(top: _Mapping, key: str, default: float) -> float:
    value = top.value.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(key, f"expected seconds >= 0, got {_describe(value, key)}")
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
            raise ConfigError(key, f"expected a list of models, got {_describe(chain, key)}")
        for i, other in enumerate(chain):
            other = _string(other, f"{key}[{i}]")
            if other not in models:
                raise ConfigError(f"{key}[{i}]", f"{other!r} is not a key of model_routes")
        fallbacks[model] = tuple(chain)
    return MappingProxyType(fallbacks)


def metrics_section(value: Any, path: str) -> tuple[bool, int | None]:
    """``metrics``: a boolean, or ``{max_models: N}`` (collected).

    Returns:
        Whether metrics are collected, and ``max_models`` if given.
    """
    if isinstance(value, bool):
        return value, None
    table = _Mapping(value, path)
    table.check_keys(("enabled", "max_models"))
    enabled = table.get("enabled", _boolean)
    return enabled is not False, table.get("max_models", _positive_int)
