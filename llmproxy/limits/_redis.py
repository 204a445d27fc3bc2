"""The shared limit store: rate-limit buckets and token budgets in Redis.

:class:`RedisStore` is what several processes or instances use to act as one
gateway (``rate_limit.store: "redis://[[user]:password@]host[:port][/db]"``).
It answers with Deferreds that fire within ``timeout`` seconds, with the
result or with :class:`StoreError`; the caller decides what a failure means
(``rate_limit.on_store_error``).

This module holds the store's operations and its key names. Each operation
is one command through a :class:`~llmproxy.limits._redis_client.RedisClient`
(the connection, the timeout of each call, the bound on waiting commands):
a Lua script from :mod:`llmproxy.limits._redis_scripts` (EVALSHA, falling
back to EVAL) for those that write, and its reply converter.

txredisapi imports the global reactor when it is imported, so it is imported
only when a :class:`RedisStore` is made, never by importing this module.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime

from llmproxy.limits._redis_client import (
    DROP_AFTER_TIMEOUTS,
    MAX_OUTSTANDING,
    RedisClient,
    StoreError,
)
from llmproxy.limits._redis_scripts import (
    ADD_USAGE,
    HELD,
    RESERVE,
    SETTLE,
    TAKE,
    budget_numbers,
    reserved,
    tokens_used,
    usage_added,
    wait_seconds,
)

__all__ = ["RedisStore", "StoreError"]

#: Bucket and budget names longer than this (in UTF-8 bytes) are hashed.
MAX_KEY_PART = 200

#: Marks a hashed key part; a name that starts with it is hashed too, so a
#: hashed part and a literal one never collide.
_HASHED = b"sha256:"


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


class RedisStore(Service):
    """Rate-limit buckets and budget counters shared through Redis.

    The methods match :class:`~llmproxy.limits.MemoryStore`'s, but answer
    with Deferreds that fire within ``timeout`` seconds or fail with
    :class:`StoreError`. Keys are ``{prefix}rl:{bucket}``,
    ``{prefix}budget:{name}:{window}`` (a budget's counter), and
    ``{prefix}held:{name}:{window}`` and ``{prefix}held-amounts:{name}:{window}``
    (its reservations); a name over 200 bytes is hashed.

    As a service, it connects while running: :meth:`startService` begins
    connecting, :meth:`stopService` closes.
    """

    def __init__(
        self,
        url: str,
        reactor: Any,
        timeout: float,
        prefix: str = "llmproxy:",
        *,
        clock: IReactorTime | None = None,
        max_outstanding: int = MAX_OUTSTANDING,
        drop_after: int = DROP_AFTER_TIMEOUTS,
    ) -> None:
        """Prepare the connection (:meth:`startService` begins it).

        Args:
            url: ``redis://[[user]:password@]host[:port][/db]``.
            reactor: Connects and resolves with it (connection attempts
                time out on it too).
            timeout: Seconds every call may take (``rate_limit.store_timeout``).
            prefix: Put before every key.
            clock: Times the calls, the grace of a close and the waits
                before reconnecting (default ``reactor``).
            max_outstanding: Calls that may wait for Redis at once.
            drop_after: Timeouts in a row that make the connection be
                dropped and made again.

        Raises:
            ValueError: A malformed URL (the message never holds the
                password) or a timeout that is not a positive number.
        """
        self._client = RedisClient(
            url, reactor, timeout,
            clock=clock, max_outstanding=max_outstanding, drop_after=drop_after,
        )
        self._prefix = prefix.encode("utf-8", "surrogatepass")

    @property
    def connected(self) -> bool:
        """Whether a connection is ready for commands."""
        return self._client.connected

    def when_connected(self) -> Deferred[None]:
        """Wait until a connection is ready for commands.

        Returns:
            A Deferred firing with None at once when the store is connected,
            else when it next is; failing with :class:`StoreError` when the
            store stops first. Cancelling it ends the wait.
        """
        return self._client.when_connected()

    def startService(self) -> None:
        """Begin connecting; reconnect whenever the connection is lost.

        Never fails, whether or not Redis is up; calls made before the
        connection is ready fail with "not connected". A stopped store
        starts again.
        """
        if self.running:
            return
        super().startService()
        self._client.startService()

    def take(self, bucket: str, rate: float, burst: int) -> Deferred[float]:
        """Take one token from ``bucket``, if it has one.

        Args:
            bucket: Whose bucket (a client address or key name).
            rate: Tokens added per second.
            burst: The bucket's size.

        Returns:
            A Deferred firing with 0.0 when a token was taken, else with the
            seconds until one can be (more than 0); or failing with
            :class:`StoreError`.
        """
        if not (isinstance(rate, (int, float)) and 0 < rate < math.inf):
            return fail(StoreError("the rate must be a positive number"))
        if not (isinstance(burst, int) and burst >= 1):
            return fail(StoreError("the burst must be a positive integer"))
        key = self._prefix + b"rl:" + _key_part(bucket)
        args = [format(1_000_000 / rate, ".17g"), str(burst)]
        return self._client.call(lambda redis: redis.eval(TAKE, [key], args), wait_seconds)

    def budget_used(self, name: str, window: str) -> Deferred[int]:
        """Read the tokens counted for ``name`` in ``window``.

        Args:
            name: The client key's name.
            window: The budget window, e.g. ``day:2026-12-03``.

        Returns:
            A Deferred firing with the count (0 when there is none), or
            failing with :class:`StoreError` (also when the key holds
            something else than a counter).
        """
        key = self._budget_key(name, window)
        return self._client.call(lambda redis: redis.get(key), tokens_used)

    def add_usage(self, name: str, window: str, tokens: int, expires_at: float) -> Deferred[None]:
        """Add ``tokens`` to a budget counter and have it expire at ``expires_at``.

        One script: the counter is increased and its expiry set together.

        Args:
            name: The client key's name.
            window: The budget window, e.g. ``day:2026-12-03``.
            tokens: How many tokens to add.
            expires_at: Unix time at which the counter goes (rounded up to
                a second).

        Returns:
            A Deferred firing with None once counted, or failing with
            :class:`StoreError`.
        """
        if not isinstance(tokens, int) or isinstance(tokens, bool):
            return fail(StoreError("tokens must be an integer"))
        if not (isinstance(expires_at, (int, float)) and math.isfinite(expires_at)):
            return fail(StoreError("expires_at must be a unix time"))
        key = self._budget_key(name, window)
        args = [str(tokens), str(math.ceil(expires_at))]
        return self._client.call(lambda redis: redis.eval(ADD_USAGE, [key], args), usage_added)

    def reserve(
        self, name: str, slot: str, rid: str, amount: int, limit: int, ttl: float,
        keep_until: float,
    ) -> Deferred[tuple[bool, int, int]]:
        """Hold ``amount`` of a budget if it fits, in one script.

        It fits when what is used, what is held and ``amount`` (at least 1)
        together are at most ``limit``; reservations whose time is up are
        dropped first. Two processes on one Redis cannot both take the last
        of a budget: the script runs alone.

        Args:
            name: The key's name.
            slot: The counter's window (see
                :func:`~llmproxy.limits.budget_slot`).
            rid: The reservation's id.
            amount: What to hold (0 holds nothing but still needs 1 left).
            limit: The budget.
            ttl: Seconds the reservation lives unless settled (on Redis's
                clock).
            keep_until: Unix time until which the reservation keys are kept.

        Returns:
            A Deferred firing with ``(admitted, used, held)``, or failing
            with :class:`StoreError`.
        """
        numbers = (amount, limit)
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in numbers):
            return fail(StoreError("amounts must be integers"))
        if not (_finite(ttl) and ttl > 0 and _finite(keep_until)):
            return fail(StoreError("ttl and keep_until must be numbers of seconds"))
        args = [rid, str(amount), str(limit), str(math.ceil(ttl * 1000)),
                str(math.ceil(keep_until))]
        keys = self._budget_keys(name, slot)
        return self._client.call(lambda redis: redis.eval(RESERVE, keys, args), reserved)

    def settle(
        self, name: str, slot: str, rid: str, charge: int, keep_until: float
    ) -> Deferred[tuple[int, int]]:
        """Let go of a reservation (if still held) and count ``charge``, in one
        script.

        Args:
            name: The key's name.
            slot: The counter's window.
            rid: The reservation's id.
            charge: What the request cost, in the budget's unit.
            keep_until: Unix time at which the counter goes.

        Returns:
            A Deferred firing with ``(used, held)`` afterwards, or failing
            with :class:`StoreError`.
        """
        if not isinstance(charge, int) or isinstance(charge, bool) or charge < 0:
            return fail(StoreError("the charge must be an integer, 0 or more"))
        if not _finite(keep_until):
            return fail(StoreError("keep_until must be a unix time"))
        args = [rid, str(charge), str(math.ceil(keep_until))]
        keys = self._budget_keys(name, slot)
        return self._client.call(lambda redis: redis.eval(SETTLE, keys, args), budget_numbers)

    def held(self, name: str, slot: str) -> Deferred[tuple[int, int]]:
        """Read a budget, dropping reservations whose time is up.

        Args:
            name: The key's name.
            slot: The counter's window.

        Returns:
            A Deferred firing with ``(used, held)``, or failing with
            :class:`StoreError`.
        """
        keys = self._budget_keys(name, slot)
        return self._client.call(lambda redis: redis.eval(HELD, keys, []), budget_numbers)

    def stopService(self) -> Deferred[None]:
        """Stop reconnecting and close the connection.

        Calls still waiting fail with :class:`StoreError`; later calls fail
        at once, as do :meth:`when_connected`'s waits. A connection that
        does not close within
        :data:`~llmproxy.limits._redis_client.CLOSE_GRACE` seconds is aborted.

        Returns:
            A Deferred firing with None once the connection is closed; it
            never fails.
        """
        super().stopService()
        return self._client.stopService()

    def _budget_key(self, name: str, window: str) -> bytes:
        """The Redis key of ``name``'s counter in ``window``."""
        return self._prefix + b"budget:" + _key_part(name) + b":" + _key_part(window)

    def _budget_keys(self, name: str, slot: str) -> list[bytes]:
        """The counter, reservations and amounts keys of ``name`` in ``slot``."""
        part = _key_part(name) + b":" + _key_part(slot)
        return [
            self._prefix + b"budget:" + part,
            self._prefix + b"held:" + part,
            self._prefix + b"held-amounts:" + part,
        ]


def _finite(value: object) -> bool:
    """Whether ``value`` is a finite number."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
