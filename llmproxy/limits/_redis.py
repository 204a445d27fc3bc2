"""The shared limit store: rate-limit buckets and token budgets in Redis.

:class:`RedisStore` is what several processes or instances use to act as one
gateway (``rate_limit.store: "redis://[[user]:password@]host[:port][/db]"``).
It answers with Deferreds that fire within ``timeout`` seconds, with the
result or with :class:`StoreError`; the caller decides what a failure means
(``rate_limit.on_store_error``).

How it talks to Redis:

* It is a :class:`~twisted.application.service.Service`: ``startService``
  begins connecting, ``stopService`` closes.
* One connection, kept by Twisted's :class:`ClientService` (reconnecting
  forever, backoff capped near 2 s), speaking txredisapi's
  ``RedisProtocol``. txredisapi's own lazy connection queues every command
  while Redis is down, in a list that cancelling does not shrink; here a
  call without a ready connection fails at once with "not connected".
* Replies are matched to commands by order, so a command's own Deferred is
  never cancelled: the caller's Deferred is a separate one, fired once, by
  the reply or by a timer. Commands still waiting on the connection are
  bounded (:data:`MAX_OUTSTANDING`); after :data:`DROP_AFTER_TIMEOUTS`
  timeouts in a row the connection is dropped and made again.
* Each operation is one Lua script (EVALSHA, falling back to EVAL) reading
  the server's clock (``TIME``), so instances with skewed clocks agree.
* Its timers (command timeouts, the grace of a close, the wait before
  reconnecting) run on a ``clock`` of their own, the reactor unless told
  otherwise, so that tests can drive them with a fake one while the reactor
  does the I/O.

txredisapi imports the global reactor when it is imported, so it is imported
only when a :class:`RedisStore` is made, never by importing this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from twisted.application.internet import ClientService
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IAddress, IProtocol, IReactorTime, ITCPTransport
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmproxy.config import parse_redis_url
from llmproxy.limits._redis_parts import (
    _ADD,
    _TAKE,
    CLOSE_GRACE,
    CONNECT_TIMEOUT,
    DROP_AFTER_TIMEOUTS,
    MAX_OUTSTANDING,
    StoreError,
    _backoff,
    _key_part,
    _T,
    _tokens_used,
    _usage_added,
    _wait_seconds,
)

__all__ = ["RedisStore", "StoreError"]

log = Logger(namespace="llmproxy.limits.redis")


class _RedisFactory(Factory):
    """Builds txredisapi protocols for :class:`ClientService` and is their ``factory``.

    txredisapi's protocol authenticates and selects the database itself in
    ``connectionMade``. When that fails it calls ``stopTrying()`` and
    ``connectionError(message)`` on its factory and reads ``isLazy``: here
    nothing stops (the service keeps reconnecting, more slowly each time),
    the message is handed to the store, and ``isLazy`` is False so that
    txredisapi logs nothing of its own.

    Attributes:
        isLazy: Read by txredisapi after a failed AUTH or SELECT.
    """

    noisy = False
    isLazy = False

    def __init__(
        self,
        protocol_class: Any,
        username: str | None,
        password: str | None,
        db: int,
        on_connection: Callable[[Any], None],
        on_ready: Callable[[Any], None],
        on_lost: Callable[[Any], None],
        on_setup_failed: Callable[[str], None],
    ) -> None:
        """Remember how to build and report connections.

        Args:
            protocol_class: ``txredisapi.RedisProtocol``.
            username: For AUTH, or None.
            password: For AUTH, or None for no AUTH.
            db: The database to SELECT (none is sent for 0).
            on_connection: Called with each new protocol.
            on_ready: Called with a protocol once AUTH and SELECT succeeded.
            on_lost: Called with a protocol when its connection is gone.
            on_setup_failed: Called with txredisapi's message when AUTH or
                SELECT failed.
        """
        self._protocol_class = protocol_class
        self._username = username
        self._password = password
        self._db = db
        self._on_connection = on_connection
        self._on_ready = on_ready
        self._on_lost = on_lost
        self._on_setup_failed = on_setup_failed

    def buildProtocol(self, addr: IAddress) -> IProtocol:
        """Make one connection's protocol, watching it become ready and go.

        Args:
            addr: The peer's address.

        Returns:
            A ``txredisapi.RedisProtocol`` whose replies are bytes (no
            decoding, no number guessing).
        """
        protocol = self._protocol_class(
            charset=None,
            password=self._password,
            dbid=self._db or None,
            convertNumbers=False,
            username=self._username,
        )
        protocol.factory = self
        self._on_connection(protocol)
        protocol.whenConnected().addCallback(self._on_ready)
        protocol.whenDisconnected().addCallback(self._on_lost)
        return protocol

    def stopTrying(self) -> None:
        """Called by txredisapi after a failed AUTH or SELECT: keep trying.

        A password or ACL fixed on the server is picked up without a restart;
        the retries back off to about every 2 s meanwhile.
        """

    def connectionError(self, why: str) -> None:
        """Called by txredisapi with what failed in AUTH or SELECT.

        Args:
            why: txredisapi's message (Redis's error text; never the password).
        """
        self._on_setup_failed(why)


class RedisStore(Service):
    """Rate-limit buckets and budget counters shared through Redis.

    The methods match :class:`~llmproxy.limits.MemoryStore`'s, but answer
    with Deferreds that fire within ``timeout`` seconds or fail with
    :class:`StoreError`. Keys are ``{prefix}rl:{bucket}`` and
    ``{prefix}budget:{name}:{window}`` (a name over 200 bytes is hashed).

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
        host, port, db, username, password = parse_redis_url(url)
        if not (isinstance(timeout, (int, float)) and 0 < timeout < math.inf):
            raise ValueError("the timeout must be a positive number of seconds")
        import txredisapi  # here, not at the top: it imports the global reactor

        self._errors = txredisapi
        self._clock: IReactorTime = reactor if clock is None else clock
        self._timeout = float(timeout)
        self._timeout_text = f"timed out after {self._timeout * 1000:g} ms"
        self._prefix = prefix.encode("utf-8", "surrogatepass")
        self._password = password
        self._where = f"[{host}]:{port}/{db}" if ":" in host else f"{host}:{port}/{db}"
        self._max_outstanding = max_outstanding
        self._drop_after = drop_after
        self._connection: Any = None  # the connection's protocol, ready or not
        self._ready: Any = None  # the protocol commands go to, once ready
        self._outstanding = 0
        self._timeouts_in_row = 0
        self._failed_setups = 0
        self._setup_error: str | None = None
        self._closed = False
        self._waiting: list[Deferred[None]] = []  # when_connected()'s
        factory = _RedisFactory(
            txredisapi.RedisProtocol, username, password, db,
            on_connection=self._connection_made, on_ready=self._connection_ready,
            on_lost=self._connection_lost, on_setup_failed=self._setup_failed,
        )
        endpoint = HostnameEndpoint(reactor, host, port, timeout=CONNECT_TIMEOUT)
        self._service = ClientService(
            endpoint, factory, retryPolicy=self._retry_delay, clock=self._clock
        )

    @property
    def connected(self) -> bool:
        """Whether a connection is ready for commands."""
        return self._ready is not None

    def when_connected(self) -> Deferred[None]:
        """Wait until a connection is ready for commands.

        Returns:
            A Deferred firing with None at once when the store is connected,
            else when it next is; failing with :class:`StoreError` when the
            store stops first. Cancelling it ends the wait.
        """
        if self._ready is not None:
            return succeed(None)
        if self._closed:
            return fail(StoreError("the store is closed"))

        def cancel(waiting: Deferred[None]) -> None:
            if waiting in self._waiting:
                self._waiting.remove(waiting)

        waiting: Deferred[None] = Deferred(cancel)
        self._waiting.append(waiting)
        return waiting

    def startService(self) -> None:
        """Begin connecting; reconnect whenever the connection is lost.

        Never fails, whether or not Redis is up; calls made before the
        connection is ready fail with "not connected". A stopped store
        starts again.
        """
        if self.running:
            return
        super().startService()
        self._closed = False
        self._service.startService()

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
        return self._call(lambda redis: redis.eval(_TAKE, [key], args), _wait_seconds)

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
        return self._call(lambda redis: redis.get(key), _tokens_used)

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
        return self._call(lambda redis: redis.eval(_ADD, [key], args), _usage_added)

    def stopService(self) -> Deferred[None]:
        """Stop reconnecting and close the connection.

        Calls still waiting fail with :class:`StoreError`; later calls fail
        at once, as do :meth:`when_connected`'s waits. A connection that
        does not close within :data:`CLOSE_GRACE` seconds is aborted.

        Returns:
            A Deferred firing with None once the connection is closed; it
            never fails.
        """
        was_running = self.running
        super().stopService()
        self._ready = None
        waiting, self._waiting = self._waiting, []
        for wait in waiting:
            wait.errback(StoreError("the store is closed"))
        if self._closed:
            return succeed(None)
        self._closed = True
        if not was_running:
            return succeed(None)
        connection = self._connection
        guard = None
        if connection is not None:
            guard = self._clock.callLater(CLOSE_GRACE, connection.transport.abortConnection)

        def closed(_: object) -> None:
            if guard is not None and guard.active():
                guard.cancel()
            return None

        return self._service.stopService().addBoth(closed)

    def _budget_key(self, name: str, window: str) -> bytes:
        """The Redis key of ``name``'s counter in ``window``."""
        return self._prefix + b"budget:" + _key_part(name) + b":" + _key_part(window)

    def _call(self, send: Callable[[Any], Deferred[Any]], convert: Callable[[Any], _T]) -> Deferred[_T]:
        """Send one command and answer within the timeout.

        The command's own Deferred is never cancelled (replies are matched to
        commands by their order): the caller gets another Deferred, fired
        once by the reply or by the timer, whichever comes first. A reply
        coming after the timeout is dropped.

        Args:
            send: Sends the command on the protocol; returns its Deferred.
            convert: Turns the reply into the result, raising StoreError for
                a reply of the wrong kind.

        Returns:
            The caller's Deferred.
        """
        if self._closed:
            return fail(StoreError("the store is closed"))
        redis = self._ready
        if redis is None:
            detail = f" ({self._setup_error})" if self._setup_error else ""
            return fail(StoreError(f"not connected to Redis{detail}"))
        if self._outstanding >= self._max_outstanding:
            return fail(
                StoreError(f"{self._outstanding} commands already waiting for Redis")
            )
        try:
            command = send(redis)
        except Exception as e:
            return fail(StoreError(self._describe(e)))
        self._outstanding += 1

        def cancel(_: Deferred[_T]) -> None:
            if timer.active():
                timer.cancel()

        result: Deferred[_T] = Deferred(cancel)

        def timed_out() -> None:
            if result.called:
                return
            result.errback(StoreError(self._timeout_text))
            self._timeouts_in_row += 1
            if self._timeouts_in_row >= self._drop_after:
                self._drop(redis)

        timer = self._clock.callLater(self._timeout, timed_out)

        def answered(reply: object) -> None:
            self._outstanding -= 1
            if timer.active():
                timer.cancel()
            if result.called:
                return None  # too late (timed out or cancelled): dropped
            if self._ready is redis:
                self._timeouts_in_row = 0
            if isinstance(reply, Failure):
                result.errback(StoreError(self._describe(reply.value)))
                return None
            try:
                value = convert(reply)
            except StoreError as e:
                result.errback(e)
            else:
                result.callback(value)
            return None

        command.addBoth(answered)
        return result

    def _describe(self, error: BaseException) -> str:
        """One line about a failed command, without the password."""
        errors = self._errors
        if isinstance(error, errors.ResponseError):
            text = f"Redis error: {error}"
        elif isinstance(error, errors.ConnectionError):
            text = f"connection to Redis failed: {error}"
        elif isinstance(error, (errors.InvalidResponse, errors.InvalidData)):
            text = f"unexpected reply from Redis: {error}"
        else:
            text = f"{type(error).__name__}: {error}"
        return self._redact(text)

    def _redact(self, text: str) -> str:
        """``text`` on one line, at most 300 characters, without the password."""
        text = " ".join(text.split())
        if self._password:
            text = text.replace(self._password, "***")
        return text[:300]

    def _drop(self, redis: Any) -> None:
        """Abort a connection that stopped answering; the service reconnects.

        Aborted rather than closed: a close waits for the written commands
        to be sent, which a stuck server may never allow.
        """
        self._timeouts_in_row = 0
        if self._ready is redis:
            self._ready = None
        if redis.transport is not None and redis.connected:
            log.warn(
                "Redis at {where} did not answer {count} commands in a row; reconnecting",
                where=self._where, count=self._drop_after,
            )
            redis.transport.abortConnection()

    def _retry_delay(self, attempt: int) -> float:
        """Seconds before reconnecting; failed AUTH/SELECTs count as attempts."""
        return _backoff(attempt + self._failed_setups)

    def _connection_made(self, protocol: Any) -> None:
        """A TCP connection exists (AUTH and SELECT may still be under way)."""
        self._connection = protocol

    def _connection_ready(self, protocol: Any) -> None:
        """AUTH and SELECT succeeded: commands may go to ``protocol``."""
        if self._closed or self._connection is not protocol:
            return
        transport = protocol.transport
        if ITCPTransport.providedBy(transport):
            transport.setTcpNoDelay(True)  # one small command at a time
        self._ready = protocol
        self._timeouts_in_row = 0
        if self._failed_setups or self._setup_error:
            log.info("connected to Redis at {where}", where=self._where)
        self._failed_setups = 0
        self._setup_error = None
        waiting, self._waiting = self._waiting, []
        for wait in waiting:
            wait.callback(None)

    def _connection_lost(self, protocol: Any) -> None:
        """``protocol``'s connection is gone."""
        if self._ready is protocol:
            self._ready = None
            if not self._closed:
                log.info("connection to Redis at {where} lost; reconnecting", where=self._where)
        if self._connection is protocol:
            self._connection = None

    def _setup_failed(self, why: str) -> None:
        """AUTH or SELECT failed; the connection is being closed."""
        self._failed_setups += 1
        message = self._redact(why)
        if message != self._setup_error:
            log.warn("Redis at {where}: {error}", where=self._where, error=message)
        self._setup_error = message
