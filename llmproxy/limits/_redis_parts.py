"""Pieces of the Redis store that need no connection: its errors, its Lua
scripts, its key names and the checks on Redis's replies. (Its URL is
parsed by :func:`llmproxy.config.parse_redis_url`.)"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Any, TypeVar

from twisted.application.internet import backoffPolicy

_T = TypeVar("_T")

#: Calls that may wait for a reply on the connection at once; more fail fast.
MAX_OUTSTANDING = 1024

#: Timeouts in a row after which the connection is dropped and made again.
DROP_AFTER_TIMEOUTS = 10

#: Bucket and budget names longer than this (in UTF-8 bytes) are hashed.
MAX_KEY_PART = 200

#: Seconds a connection attempt may take (resolving included).
CONNECT_TIMEOUT = 5.0

#: Seconds ``stopService()`` lets the connection close cleanly before aborting it.
CLOSE_GRACE = 1.0

#: Seconds before reconnect attempt n: 0.1, 0.2, 0.4 ... capped at 1.8, plus
#: up to 0.2 of jitter (so never more than 2 s).
_backoff = backoffPolicy(
    initialDelay=0.05, maxDelay=1.8, factor=2.0, jitter=lambda: random.uniform(0.0, 0.2)
)

#: Marks a hashed key part; a name that starts with it is hashed too, so a
#: hashed part and a literal one never collide.
_HASHED = b"sha256:"

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
