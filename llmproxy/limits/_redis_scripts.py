"""What the Redis store sends and what it makes of the replies.

* The Lua scripts of the operations that write: each runs atomically on
  the server and reads the server's clock (``TIME``) where it needs the
  time, so instances with skewed clocks agree.
* The reply converters, one per operation, handed to
  :meth:`~llmproxy.limits._redis_client.RedisClient.call`: each checks a
  reply's type and turns it into the operation's result, or raises
  :class:`~llmproxy.limits.StoreError` naming what came (never echoing it).

No I/O here.
"""

from __future__ import annotations

import re
from typing import Any

from llmproxy.limits._redis_client import StoreError

__all__ = ["ADD_USAGE", "TAKE", "tokens_used", "usage_added", "wait_seconds"]

_INTEGER = re.compile(rb"-?[0-9]{1,19}\Z")

#: GCRA. KEYS[1] holds the bucket's theoretical arrival time (microseconds
#: of Redis server time); ARGV[1] is microseconds per token, ARGV[2] the
#: burst. Returns 0 (a token was taken) or the microseconds until one can be.
#: The key expires when the bucket would be full again.
TAKE = """
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
ADD_USAGE = """
local used = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('EXPIREAT', KEYS[1], ARGV[2])
return used
"""


def _describe_reply(reply: Any) -> str:
    """Name a reply's type (and size) without echoing its content."""
    if isinstance(reply, (bytes, str, list)):
        return f"{type(reply).__name__} of length {len(reply)}"
    return type(reply).__name__


def _unexpected(reply: Any, wanted: str) -> StoreError:
    """The error for a reply of the wrong type or value."""
    return StoreError(f"unexpected reply from Redis ({_describe_reply(reply)}; wanted {wanted})")


def wait_seconds(reply: Any) -> float:
    """The reply of :data:`TAKE` as seconds to wait.

    Args:
        reply: Microseconds until a token can be taken (0: one was taken).

    Returns:
        The same in seconds.

    Raises:
        StoreError: The reply is not a non-negative integer.
    """
    if type(reply) is not int or reply < 0:
        raise _unexpected(reply, "a non-negative integer")
    return reply / 1_000_000


def tokens_used(reply: Any) -> int:
    """A budget counter as GET returns it.

    Args:
        reply: The counter's bytes, or None when there is none.

    Returns:
        The count (0 when missing).

    Raises:
        StoreError: The key holds something else than an integer.
    """
    if reply is None:
        return 0
    if isinstance(reply, bytes) and _INTEGER.match(reply):
        return int(reply)
    if type(reply) is int:  # a protocol that converts numbers itself
        return reply
    raise _unexpected(reply, "an integer counter")


def usage_added(reply: Any) -> None:
    """Check the reply of :data:`ADD_USAGE` (the new total).

    Args:
        reply: The counter after the addition.

    Raises:
        StoreError: The reply is not an integer.
    """
    if type(reply) is not int:
        raise _unexpected(reply, "an integer")
