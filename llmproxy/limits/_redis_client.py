"""One connection to Redis, and commands on it that answer in time.

:class:`RedisClient` is what :class:`~llmproxy.limits.RedisStore` sends its
commands through. Its :meth:`~RedisClient.call` answers with a Deferred that
fires within ``timeout`` seconds, with the converted reply or with
:class:`StoreError`.

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
* Its timers (command timeouts, the grace of a close, the wait before
  reconnecting) run on a ``clock`` of their own, the reactor unless told
  otherwise, so that tests can drive them with a fake one while the reactor
  does the I/O.
* Errors are told in one line that never holds the password.

What knows txredisapi's names (its protocol factory, its errors) is in
:mod:`llmproxy.limits._redis_protocol`: txredisapi, which imports the global
reactor, is imported only when a :class:`RedisClient` is made, never by
importing this module.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IReactorTime, ITCPTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmproxy.config import parse_redis_url
from llmproxy.limits._redis_protocol import RedisFactory, describe_error

__all__ = ["DROP_AFTER_TIMEOUTS", "MAX_OUTSTANDING", "RedisClient", "StoreError"]

log = Logger(namespace="llmproxy.limits.redis")

_T = TypeVar("_T")

#: Calls that may wait for a reply on the connection at once; more fail fast.
MAX_OUTSTANDING = 1024

#: Timeouts in a row after which the connection is dropped and made again.
DROP_AFTER_TIMEOUTS = 10

#: Seconds a connection attempt may take (resolving included).
CONNECT_TIMEOUT = 5.0

#: Seconds ``stopService()`` lets the connection close cleanly before aborting it.
CLOSE_GRACE = 1.0

#: Seconds before reconnect attempt n: 0.1, 0.2, 0.4 ... capped at 1.8, plus
#: up to 0.2 of jitter (so never more than 2 s).
_backoff = backoffPolicy(
    initialDelay=0.05, maxDelay=1.8, factor=2.0, jitter=lambda: random.uniform(0.0, 0.2)
)


class StoreError(Exception):
    """The shared store did not answer usefully.

    The message says what happened ("timed out after 50 ms", "not connected",
    "unexpected reply ...", or Redis's own error text) and never holds the
    password.
    """


class RedisClient(Service):
    """One connection to Redis, kept while running; commands that answer in time.

    As a service, it connects while running: :meth:`startService` begins
    connecting, :meth:`stopService` closes.
    """

    def __init__(
        self,
        url: str,
        reactor: Any,
        timeout: float,
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
            timeout: Seconds every call may take.
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
        self._clock: IReactorTime = reactor if clock is None else clock
        self._timeout = float(timeout)
        self._timeout_text = f"timed out after {self._timeout * 1000:g} ms"
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
        factory = RedisFactory(
            username, password, db,
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
            A Deferred firing with None at once when the client is connected,
            else when it next is; failing with :class:`StoreError` when the
            client stops first. Cancelling it ends the wait.
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
        connection is ready fail with "not connected". A stopped client
        starts again.
        """
        if self.running:
            return
        super().startService()
        self._closed = False
        self._service.startService()

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

    def call(self, send: Callable[[Any], Deferred[Any]], convert: Callable[[Any], _T]) -> Deferred[_T]:
        """Send one command and answer within the timeout.

        The command's own Deferred is never cancelled (replies are matched to
        commands by their order): the caller gets another Deferred, fired
        once by the reply or by the timer, whichever comes first. A reply
        coming after the timeout is dropped.

        Args:
            send: Sends the command on the protocol (a
                ``txredisapi.RedisProtocol``); returns its Deferred.
            convert: Turns the reply into the result, raising
                :class:`StoreError` for a reply of the wrong kind.

        Returns:
            The caller's Deferred: the converted reply, or failing with
            :class:`StoreError`.
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
        return self._redact(describe_error(error))

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
