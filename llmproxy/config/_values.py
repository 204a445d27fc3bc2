"""Value converters shared by every section of the config.

Each converter takes a YAML value and its key path, and returns the
validated value or raises :class:`~llmproxy.config.ConfigError` naming that
path: strings, numbers, ports, endpoints, URLs, networks, booleans. Also the
key-path helpers (:func:`_join`, :func:`_key_path`), ``${NAME}`` expansion
and :class:`_Mapping`, a mapping being validated.

A message quotes a value only through :func:`_shown` or :func:`_describe`,
which hide it at a secret key path, and a URL only without its
``user:password@``.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import SplitResult, quote, urlsplit

from llmproxy.config._model import ConfigError
from llmproxy.config._problems import checked, report
from llmproxy.config._secrets import HIDDEN, HIDDEN_KEY, is_secret, shows_key

T = TypeVar("T")

_ENV_PATTERN = re.compile(r"\$\{([^}]*)\}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")
_HOST_PATTERN = re.compile(r"(\*|\.?[A-Za-z0-9_.-]+|\[?[0-9A-Fa-f:.]+\]?)\Z")


def _join(parent: str, key: str) -> str:
    """Append a mapping key to a key path, quoting keys that need it."""
    if not _PLAIN_KEY.match(key):
        part = '["' + key.replace('"', '\\"') + '"]'
        return parent + part if parent else part
    return f"{parent}.{key}" if parent else key


def _key_path(path: str, key: str) -> str:
    """The key path of a mapping's key, as messages name it.

    Args:
        path: The mapping's key path.
        key: One of its keys.

    Returns:
        The key's own path, or the mapping's where the key may be a secret
        (:func:`~llmproxy.config._secrets.shows_key`).
    """
    return _join(path, key) if shows_key(path, key) else path


def _shown(value: Any, path: str) -> str:
    """A value as a message quotes it: its repr, shortened, unless secret.

    Args:
        value: The value.
        path: Its key path, which decides whether it is a secret.

    Returns:
        The repr (at most 60 characters), or :data:`HIDDEN` for a value
        at a secret key path.
    """
    if is_secret(path):
        return HIDDEN
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _describe(value: Any, path: str) -> str:
    """Name a YAML value's type for a message, with the value if short.

    Args:
        value: The value.
        path: Its key path: a secret's value is never shown.

    Returns:
        ``an integer 5``, ``a string 'x'``, ``a list``; ``an integer
        (value hidden: it is a secret)`` at a secret key path.
    """
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
        return f"{name} {_shown(value, path)}"
    return name


def _expand(value: Any, path: str, env: Mapping[str, str]) -> Any:
    """Expand ``${NAME}`` in every string value, recursively."""
    if isinstance(value, str):
        return _expand_string(value, path, env)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            where = _key_path(path, str(k))
            if not isinstance(k, str):
                # A secret mapping's key is described as a secret.
                raise ConfigError(where, f"keys must be strings, got {_describe(k, where)}")
            out[k] = _expand(v, where, env)
        return out
    if isinstance(value, list):
        return [_expand(v, f"{path}[{i}]", env) for i, v in enumerate(value)]
    return value


def _expand_string(value: str, path: str, env: Mapping[str, str]) -> str:
    """Replace each ``${NAME}`` with the environment variable's value."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if not _ENV_NAME.match(name):
            shown = _shown("${" + name + "}", path)
            raise ConfigError(path, f"not a valid variable name in ${{...}}: {shown}")
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
                path or source, f"expected a mapping, got {_describe(value, path)}"
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
                where = _key_path(self.path, key)
                what = "unknown key" if where != self.path else f"an unknown key {HIDDEN_KEY}"
                report(ConfigError(where, f"{what}{hint} (known keys: {allowed})"),
                       _join(self.path, close[0]) if close else None)

    def get(self, key: str, convert: Callable[[Any, str], T]) -> T | None:
        """Convert one key's value, or return None when it is absent/null
        (or wrong, once the mistake is reported: see :func:`report`)."""
        if key not in self.value or self.value[key] is None:
            return None
        return checked(convert, self.value[key], _join(self.path, key))


def _string(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(path, f"expected a string, got {_describe(value, path)}")
    if not value.strip():
        raise ConfigError(path, "must not be empty")
    return value


def _number(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(path, f"expected a number, got {_describe(value, path)}")
    if not value > 0 or value == float("inf"):
        raise ConfigError(path, f"must be a positive number, got {_shown(value, path)}")
    return float(value)


def _positive_int(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(path, f"expected an integer, got {_describe(value, path)}")
    if value < 1:
        raise ConfigError(path, f"must be at least 1, got {value}")
    return value


def _port(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(path, f"expected an integer port, got {_describe(value, path)}")
    if not 1 <= value <= 65535:
        raise ConfigError(path, f"port out of range (1-65535): {value}")
    return value


def _endpoint(value: Any, path: str) -> str:
    return _string(value, path).strip()


def _without_credentials(url: str) -> str:
    """A URL as messages quote it: any ``user:password@`` shown as ``***@``.

    The password may hold unencoded delimiters, so everything up to the
    last ``@`` counts as user information.

    Args:
        url: The URL as written, with or without a scheme.

    Returns:
        The URL, its user information replaced.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    _, at, host = rest.rpartition("@")
    return f"{scheme}{sep}***@{host}" if at else url


def _url(value: Any, path: str, schemes: tuple[str, ...] = ("http", "https")) -> str:
    text = _string(value, path).strip()
    shown = repr(_without_credentials(text))
    what = "an http(s) URL"
    try:
        parts = urlsplit(text)
    except ValueError as e:
        raise ConfigError(path, f"not {what}: {shown} ({e})") from None
    try:
        port = parts.port
    except ValueError as e:
        if "out of range" in str(e):
            raise ConfigError(path, f"port out of range (1-65535) in {shown}") from None
        raise ConfigError(path, f"not {what}: {shown} (the port is not a number)") from None
    if parts.scheme.lower() not in schemes or not parts.hostname:
        raise ConfigError(path, f"not {what}: {shown}")
    if port == 0:
        raise ConfigError(path, f"port out of range (1-65535) in {shown}")
    if parts.fragment or text.endswith("#"):
        raise ConfigError(path, f"a base URL cannot have a #fragment: {shown}")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            path, "credentials in a base URL are never sent upstream: remove 'user:password@'"
        )
    if parts.query:
        raise ConfigError(path, f"a base URL cannot have a ?query: {shown}")
    return _normalized(parts, text, path)


#: Bytes a base URL's path keeps; anything else is percent-encoded.
_URL_PATH_SAFE = "/%:@!$&'()*+,;=-._~"


def _normalized(parts: SplitResult, text: str, path: str) -> str:
    """A base URL as requests are sent to it: ASCII, lower-case scheme and
    host (IDNA for a non-ASCII name), the path percent-encoded, no trailing
    slash."""
    host = parts.hostname or ""
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            shown = repr(_without_credentials(text))
            raise ConfigError(path, f"not a valid host name in {shown}") from None
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    base_path = quote(parts.path, safe=_URL_PATH_SAFE)
    return f"{parts.scheme.lower()}://{host}{port}{base_path}".rstrip("/")


def _proxy_url(value: Any, path: str) -> str:
    text = _string(value, path).strip()
    # Credentials are allowed here (they become Proxy-Authorization), may
    # hold unencoded delimiters, and never appear in a message.
    scheme, sep, rest = text.partition("://")
    hostport = rest.rpartition("@")[2]
    shown = _without_credentials(text)
    if not sep:
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


def _string_list(value: Any, path: str) -> list[str]:
    """A list of strings, or one comma-separated string."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list):
        raise ConfigError(path, f"expected a list of strings, got {_describe(value, path)}")
    return [_string(item, f"{path}[{i}]").strip() for i, item in enumerate(value)]


def _network(value: str, path: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise ConfigError(path, f"not an IP network (CIDR): {_shown(value, path)}") from None


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


def _boolean(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(path, f"expected true or false, got {_describe(value, path)}")
    return value
