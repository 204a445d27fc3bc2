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

__all__ = [
    "ADD_USAGE",
    "HELD",
    "RESERVE",
    "SETTLE",
    "TAKE",
    "budget_numbers",
    "reserved",
    "tokens_used",
    "usage_added",
    "wait_seconds",
]

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


#: The start of every budget script. KEYS[1] is the budget's counter (an
#: integer), KEYS[2] its reservations (a sorted set: id -> expiry, in
#: milliseconds of Redis server time), KEYS[3] their amounts (a hash: id ->
#: amount, and ``=total`` -> their sum). Reservations whose time is up (their
#: process died before settling) are dropped, at most 1,000 a call; ``now``,
#: ``used`` and ``total`` are then what the script goes on with.
#: ``save_total()`` writes the sum back (deleting the hash once nothing is
#: held, so that no key outlives its reservations).
_BUDGET_PROLOGUE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local total = tonumber(redis.call('HGET', KEYS[3], '=total') or '0')
local changed = false
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 1000)
for _, id in ipairs(gone) do
  total = total - (tonumber(redis.call('HGET', KEYS[3], id) or '0') or 0)
  redis.call('HDEL', KEYS[3], id)
  redis.call('ZREM', KEYS[2], id)
  changed = true
end
if total < 0 then total = 0 end
local used = redis.call('GET', KEYS[1])
if used then
  used = tonumber(used)
  if used == nil then
    return redis.error_reply('ERR the budget counter is not an integer')
  end
else
  used = 0
end
local function save_total()
  if redis.call('ZCARD', KEYS[2]) == 0 then
    redis.call('DEL', KEYS[3])
    return
  end
  redis.call('HSET', KEYS[3], '=total', string.format('%d', total))
end
"""

#: Hold ARGV[2] (the amount, an integer; 0 holds nothing) under the id
#: ARGV[1] when the counter, what is held and the amount (at least 1)
#: together are at most ARGV[3] (the budget). The reservation expires
#: ARGV[4] milliseconds from now; both reservation keys are kept until the
#: unix second ARGV[5]. Returns {1 (held) or 0 (refused), used, held}.
RESERVE = _BUDGET_PROLOGUE + """
local amount = tonumber(ARGV[2])
local need = amount
if need < 1 then need = 1 end
if used + total + need > tonumber(ARGV[3]) then
  if changed then save_total() end
  return {0, used, total}
end
if amount > 0 then
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[1])
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
  total = total + amount
  redis.call('EXPIREAT', KEYS[2], ARGV[5])
  redis.call('EXPIREAT', KEYS[3], ARGV[5])
  changed = true
end
if changed then save_total() end
return {1, used, total}
"""

#: Let go of the reservation ARGV[1] (if it is still held) and add ARGV[2]
#: (an integer, 0 or more) to the counter, which then expires at the unix
#: second ARGV[3]. Returns {used, held}.
SETTLE = _BUDGET_PROLOGUE + """
local amount = redis.call('HGET', KEYS[3], ARGV[1])
if amount then
  total = total - (tonumber(amount) or 0)
  if total < 0 then total = 0 end
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  changed = true
end
if changed then save_total() end
if tonumber(ARGV[2]) > 0 then
  used = redis.call('INCRBY', KEYS[1], ARGV[2])
  redis.call('EXPIREAT', KEYS[1], ARGV[3])
end
return {used, total}
"""

#: Read a budget: {used, held}, after dropping expired reservations.
HELD = _BUDGET_PROLOGUE + """
if changed then save_total() end
return {used, total}
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


def _integers(reply: Any, count: int) -> list[int]:
    """A reply that is a list of ``count`` non-negative integers."""
    if (
        not isinstance(reply, list)
        or len(reply) != count
        or not all(type(n) is int and n >= 0 for n in reply)
    ):
        raise _unexpected(reply, f"a list of {count} non-negative integers")
    return reply


def reserved(reply: Any) -> tuple[bool, int, int]:
    """The reply of :data:`RESERVE`.

    Args:
        reply: ``[1 or 0, used, held]``.

    Returns:
        ``(admitted, used, held)``.

    Raises:
        StoreError: The reply is not of that form.
    """
    admitted, used, held = _integers(reply, 3)
    if admitted not in (0, 1):
        raise _unexpected(reply, "0 or 1 first")
    return admitted == 1, used, held


def budget_numbers(reply: Any) -> tuple[int, int]:
    """The reply of :data:`SETTLE` or :data:`HELD`.

    Args:
        reply: ``[used, held]``.

    Returns:
        ``(used, held)``.

    Raises:
        StoreError: The reply is not of that form.
    """
    used, held = _integers(reply, 2)
    return used, held
