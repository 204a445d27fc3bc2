"""Pieces of the Redis store that need no connection: its URL, its errors,
its Lua scripts, its key names and the checks on Redis's replies."""

from __future__ import annotations

import hashlib
import ipaddress
import random
import re
from typing import Any, TypeVar
from urllib.parse import unquote

from twisted.application.internet import backoffPolicy

_T = TypeVar("_T")

#: Redis's port when the URL names none.
DEFAULT_PORT = 6379

#: Calls that may wait for a reply on the connection at once; more fail fast.
MAX_OUTSTANDING = 1024

#: Timeouts in a row after which the connection is dropped and made again.
DROP_AFTER_TIMEOUTS = 10

#: Bucket and budget names longer than this (in UTF-8 bytes) are hashed.
MAX_KEY_PART = 200

#: Seconds a connection attempt may take (resolving included).
CONNECT_TIMEOUT = 5.0

#: Seconds ``close()`` lets the connection close cleanly before aborting it.
CLOSE_GRACE = 1.0

#: Seconds before reconnect attempt n: 0.1, 0.2, 0.4 ... capped at 1.8, plus
#: up to 0.2 of jitter (so never more than 2 s).
_backoff = backoffPolicy(
    initialDelay=0.05, maxDelay=1.8, factor=2.0, jitter=lambda: random.uniform(0.0, 0.2)
)

#: Marks a hashed key part; a name that starts with it is hashed too, so a
#: hashed part and a literal one never collide.
_HASHED = b"sha256:"

_HOST = re.compile(r"[A-Za-z0-9_.-]+\Z")
_DIGITS = re.compile(r"[0-9]+\Z")
_INTEGER = re.compile(rb"-?[0-9]{1,19}\Z")

#: GCRA. KEYS[1] holds the bucket's theoretical arrival time (microseconds
#: of Redis server time); ARGV[1] is microseconds per token, ARGV[2] the
#: burst. Returns 0 (a token was taken) or the microseconds until one can be.
#: The key expires when the bucket would be full again.
_TAKE = """
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000000 + tonumber(now[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or not (tat >= now) then
  tat = now
elseif tat > now + burst * interval then
  tat = now + burst * interval
end
local next_tat = tat + interval
local allowed_at = next_tat - burst * interval
if allowed_at > now then
  return math.ceil(allowed_at - now)
end
redis.call('SET', KEYS[1], string.format('%.17g', next_tat),
           'PX', string.format('%d', math.ceil((next_tat - now) / 1000)))
return 0
"""

#: KEYS[1] is a budget counter; ARGV[1] the tokens to add, ARGV[2] the unix
#: second it expires at. Returns the new total.
_ADD = """
local used = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('EXPIREAT', KEYS[1], ARGV[2])
return used
"""


class StoreError(Exception):
    """The shared store did not answer usefully.

    The message says what happened ("timed out after 50 ms", "not connected",
    "unexpected reply ...", or Redis's own error text) and never holds the
    password.
    """


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
    port = DEFAULT_PORT
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


def _key_part(text: str | bytes) -> bytes:
    """A bucket or budget name as part of a Redis key, at most 200 bytes.

    Args:
        text: The name (any string).

    Returns:
        Its UTF-8 bytes, or ``sha256:`` and their hex digest when longer than
        :data:`MAX_KEY_PART` or already starting with ``sha256:``.
    """
    raw = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
    if len(raw) > MAX_KEY_PART or raw.startswith(_HASHED):
        return _HASHED + hashlib.sha256(raw).hexdigest().encode("ascii")
    return raw


def _describe_reply(reply: Any) -> str:
    """Name a reply's type (and size) without echoing its content."""
    if isinstance(reply, (bytes, str, list)):
        return f"{type(reply).__name__} of length {len(reply)}"
    return type(reply).__name__


def _unexpected(reply: Any, wanted: str) -> StoreError:
    """The error for a reply of the wrong type or value."""
    return StoreError(f"unexpected reply from Redis ({_describe_reply(reply)}; wanted {wanted})")


def _wait_seconds(reply: Any) -> float:
    """The rate-limit script's reply (microseconds) as seconds to wait."""
    if type(reply) is not int or reply < 0:
        raise _unexpected(reply, "a non-negative integer")
    return reply / 1_000_000


def _tokens_used(reply: Any) -> int:
    """A budget counter as GET returns it: missing is 0."""
    if reply is None:
        return 0
    if isinstance(reply, bytes) and _INTEGER.match(reply):
        return int(reply)
    if type(reply) is int:  # a protocol that converts numbers itself
        return reply
    raise _unexpected(reply, "an integer counter")


def _usage_added(reply: Any) -> None:
    """Check the budget script's reply (the new total)."""
    if type(reply) is not int:
        raise _unexpected(reply, "an integer")
