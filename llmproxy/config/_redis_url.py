"""Redis URLs (``rate_limit.store``): checked and split, without connecting.

Here rather than beside the Redis store so that the config can check a URL
at load, and the store split it, with one parser and no import of the
store's package.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import unquote

__all__ = ["REDIS_PORT", "parse_redis_url"]

#: Redis's port when the URL names none.
REDIS_PORT = 6379

_HOST = re.compile(r"[A-Za-z0-9_.-]+\Z")
_DIGITS = re.compile(r"[0-9]+\Z")


def parse_redis_url(url: str) -> tuple[str, int, int, str | None, str | None]:
    """Check and split a Redis URL.

    The form is ``redis://[[user]:password@]host[:port][/db]``: ``host`` is a
    name, an IPv4 address or a bracketed IPv6 address; ``port`` defaults to
    6379 and ``db`` to 0. The user name and password are percent-decoded. A
    password may hold any character, ``@`` and ``/`` included (everything up
    to the last ``@`` is user information), so one expanded from ``${ENV}``
    needs no escaping unless it holds ``%``.

    Args:
        url: The URL, after any ``${ENV}`` expansion.

    Returns:
        ``(host, port, db, username, password)``; the user name and password
        are None when absent.

    Raises:
        ValueError: The URL is not of that form. The message never contains
            the password (nor any other part of the URL).
    """
    if not isinstance(url, str):
        raise ValueError("not a string")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != "redis":
        if sep and scheme.lower() == "rediss":
            raise ValueError("rediss:// (TLS) is not supported; use redis://")
        raise ValueError("not a redis:// URL (redis://[[user]:password@]host[:port][/db])")
    userinfo, at, hostpart = rest.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        if not colon:
            raise ValueError(
                "a user name without a password: write redis://:PASSWORD@host "
                "or redis://USER:PASSWORD@host"
            )
        password = unquote(secret)
        if not password:
            raise ValueError("the password is empty")
        username = unquote(user) or None
    if "?" in hostpart or "#" in hostpart:
        raise ValueError("query strings and fragments are not supported")
    netloc, slash, path = hostpart.partition("/")
    host, port_text = _split_host_port(netloc)
    port = REDIS_PORT
    if port_text is not None:
        if not (_DIGITS.match(port_text) and len(port_text) <= 5 and 0 < int(port_text) < 65536):
            raise ValueError("the port is not a number from 1 to 65535")
        port = int(port_text)
    db = 0
    if path:
        if not (_DIGITS.match(path) and len(path) <= 9):
            raise ValueError("the database (the path) is not a number: write /0, /1 ...")
        db = int(path)
    return host, port, db, username, password


def _split_host_port(netloc: str) -> tuple[str, str | None]:
    """Split ``host[:port]`` (host possibly a bracketed IPv6 address).

    Args:
        netloc: What lies between the user information and the path.

    Returns:
        The host (IPv6 without brackets) and the port's text, if any.

    Raises:
        ValueError: No host, or not a host name or IP address.
    """
    port_text: str | None = None
    if netloc.startswith("["):
        end = netloc.find("]")
        if end < 0:
            raise ValueError("the host has an unclosed [")
        host, after = netloc[1:end], netloc[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("the host in [brackets] is not an IPv6 address") from None
        if after:
            if not after.startswith(":"):
                raise ValueError("unexpected text after the host")
            port_text = after[1:]
        return host, port_text
    host, colon, after = netloc.partition(":")
    if colon:
        port_text = after
    if not host:
        raise ValueError("no host")
    if not (host.isascii() and _HOST.match(host)):
        raise ValueError("the host is not a host name or IP address")
    return host, port_text
